"""Rotary position embeddings, told by their values. A rotation turns nothing at position 0, so a
query or key that agrees there and differs further on was rotated another way (other frequencies,
other features paired, other positions), where one that differs at position 0 already differs for
another reason. What each side rotates with is read off its graph: the float buffers no gradient
reaches on the way to it (``inv_freq``, a cos/sin cache), and the base a table of frequencies
``base ** (-2i / d)`` was made with."""

from __future__ import annotations

import math

import torch
import torch.fx

from ..model.capture import Capture
from ..store.summary import is_summary


def agrees_at_start(a: torch.Tensor, b: torch.Tensor, close) -> bool:
    """Whether ``a`` and ``b``, laid out (..., positions, features), agree at the first position
    (by ``close``) while differing after it."""
    if a.shape != b.shape or a.dim() < 2 or a.shape[-2] < 2:
        return False
    return close(a[..., :1, :], b[..., :1, :]) and not close(a[..., 1:, :], b[..., 1:, :])


def tables(capture: Capture, node: torch.fx.Node) -> list[str]:
    """The floating-point buffers (tensors the capture holds no gradient for) that ``node`` is made
    from, in the order the graph reads them."""
    seen: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.name not in seen:
            seen.add(n.name)
            stack.extend(n.all_input_nodes)
    found = []
    for n in capture.graph.nodes:
        name = str(n.target)
        if n.op == "get_attr" and n.name in seen and name not in found and name not in capture.param_grads:
            t = capture.params.get(name)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                found.append(name)
    return found


def base(t: torch.Tensor) -> float | None:
    """The base of rotary frequencies ``t`` (1-D, ``base ** (-2i / d)`` for ``i < d / 2``: 1, then
    falling geometrically), rounded to 3 significant digits; None when ``t`` is no such table."""
    if is_summary(t) or t.dim() != 1 or len(t) < 3 or not t.is_floating_point():
        return None
    f = t.double()
    if not math.isclose(float(f[0]), 1.0, rel_tol=1e-3) or not 0 < float(f[1]) < 1:
        return None
    ratio = float(f[1])
    if not torch.allclose(f, ratio ** torch.arange(len(f), dtype=torch.float64), rtol=1e-3):
        return None
    value = ratio ** -len(f)
    digits = 2 - math.floor(math.log10(value))
    return round(value, digits)
