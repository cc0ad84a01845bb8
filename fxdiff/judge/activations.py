"""An activation read off a capture's ops, whether one op computes it (``F.gelu`` and its
``approximate``, ``silu``) or it is written out (Hugging Face's ``gelu_new``, ``0.5 * x * (1 +
tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``; GELU with ``erf``; QuickGELU, ``x * sigmoid(1.702 * x)``),
so that two sides computing another GELU are told so, not only that a value differs."""

from __future__ import annotations

import math

import torch.fx

from ..ops import node_key

_FUSED = {"silu": "SiLU", "relu": "ReLU", "sigmoid": "sigmoid", "tanh": "tanh", "hardswish": "Hardswish",
          "mish": "Mish", "elu": "ELU"}
_MOST_OPS = 12   # a written-out activation takes a few ops; more, and it is something else


def activation_of(node: torch.fx.Node) -> str | None:
    """``GELU, tanh approximation (written out)``: the activation whose output ``node`` is, or None;
    ``kind`` tells two alike however each is written."""
    key = node_key(node)
    if key == "gelu":
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "GELU, tanh approximation" if approximate == "tanh" else "GELU, exact"
    if key in _FUSED:
        return _FUSED[key]
    ops, numbers = _block(node)
    if not ops:
        return None
    if "tanh" in ops and any(math.isclose(n, 0.044715, rel_tol=1e-3) for n in numbers):
        return "GELU, tanh approximation (written out)"
    if "erf" in ops:
        return "GELU, exact (written out)"
    if "sigmoid" in ops and any(math.isclose(n, 1.702, rel_tol=1e-3) for n in numbers):
        return "QuickGELU (written out)"
    return None


def kind(description: str) -> str:
    """An ``activation_of`` description without how it is written."""
    return description.removesuffix(" (written out)")


def _block(node: torch.fx.Node) -> tuple[list[str], list[float]]:
    """The op keys and numbers on the way back from ``node`` to the one tensor it is all computed
    from: empty where there is more than one such tensor or too many ops."""
    ops, numbers, seen, stack, sources = [], [], set(), [node], set()
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op != "call_function" or len(ops) > _MOST_OPS:
            sources.add(n.name)
            continue
        key = node_key(n)
        if key not in _ELEMENTWISE:
            sources.add(n.name)
            continue
        ops.append(key)
        numbers += [float(a) for a in n.args if type(a) in (int, float)]
        stack.extend(n.all_input_nodes)
    return (ops, numbers) if len(sources) == 1 and len(ops) <= _MOST_OPS else ([], [])


_ELEMENTWISE = {"mul", "add", "sub", "div", "pow", "tanh", "erf", "sigmoid", "exp", "neg", "rsub", "truediv",
                "radd", "rmul", "sqrt"}
