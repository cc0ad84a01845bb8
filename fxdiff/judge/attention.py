"""An attention's scale, read off a capture's ops: the factor on the query-key products before the
softmax. A ``scaled_dot_product_attention`` has its own (its ``scale``, else 1/sqrt of the head
size) times the constant factors its query and key were multiplied by on their way to it; written
out, the scale is the product of the constant factors between the ``matmul`` of query and key and
the ``softmax``, and on the two operands. A port whose scale differs (1/sqrt(d) forgotten or applied
twice, 1/d for 1/sqrt(d)) is told by calling one side's attention again with the other side's
scale (``rescaled``): it then gives the other side's value.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..model.capture import SHAPE, TARGET, Capture
from ..ops import DEFAULT_OPS, GETITEM, node_key
from ..store.summary import is_summary
from ..targets import Targets
from . import arguments
from .rows import stored


@dataclasses.dataclass(frozen=True)
class Scale:
    """The scale of one side's attention."""

    value: float                  # the factor on the query-key products
    head: int                     # the size of a head (the query's last dimension); 0 if not recorded
    sdpa: torch.fx.Node | None    # the side's scaled_dot_product_attention, when it is one
    own: float                    # that call's own scale (its argument or default); 1.0 written out
    views: tuple[torch.fx.Node, ...] = ()   # the views from the attention's output to the node asked about

    def words(self) -> str:
        """``0.25 (1/sqrt(16))``: the value and, where it is one, the usual form it takes."""
        if self.head and math.isclose(self.value, self.head ** -0.5, rel_tol=1e-5):
            return f"{self.value:.4g} (1/sqrt({self.head}))"
        if self.head and math.isclose(self.value, 1 / self.head, rel_tol=1e-5):
            return f"{self.value:.4g} (1/{self.head})"
        return f"{self.value:.4g}" + (" (none)" if self.value == 1 else "")


def scale_of(node: torch.fx.Node) -> Scale | None:
    """The scale of the attention whose output ``node`` is, or a view of (a
    ``scaled_dot_product_attention``, or the product of a softmax and the values); None when it is
    no attention or a factor on the way cannot be read as a constant."""
    node, views = _under_views(node)
    scale = _scale_at(node)
    return dataclasses.replace(scale, views=views) if scale is not None else None


def _under_views(node: torch.fx.Node) -> tuple[torch.fx.Node, tuple[torch.fx.Node, ...]]:
    """The node ``node`` is a view of (through views of one tensor), and those views, in order."""
    views = []
    while node.op == "call_function" and DEFAULT_OPS.is_view(node, node_key(node)) and _operands(node)[:1] == [node.args[0]]:
        views.append(node)
        node = node.args[0]
    return node, tuple(reversed(views))


def _scale_at(node: torch.fx.Node) -> Scale | None:
    if node_key(node) == "sdpa":
        args = arguments.named(node)
        q, k = args.get("query"), args.get("key")
        if not isinstance(q, torch.fx.Node) or not isinstance(k, torch.fx.Node):
            return None
        head = _head(q)
        own = args.get("scale")
        own = head ** -0.5 if own is None and head else own
        if not _number(own):
            return None
        return Scale(own * _factor(q)[0] * _factor(k)[0], head, node, float(own))
    written = _written_out(node)
    if written is None:
        return None
    f, q, k, _ = written
    return Scale(f * _factor(q)[0] * _factor(k)[0], _head(q), None, 1.0)


def _written_out(node: torch.fx.Node) -> tuple[float, torch.fx.Node, torch.fx.Node, torch.fx.Node] | None:
    """An attention written out whose output ``node`` is, the product of a softmax and the values:
    the constant factor between the query-key product and the softmax, and the product's two
    operands and the values; None when it is none."""
    operands = _operands(node)
    if node_key(node) != "matmul" or len(operands) != 2:
        return None
    probs = through_casts(operands[0])
    if node_key(probs) != "softmax" or not isinstance(probs.args[0], torch.fx.Node):
        return None
    f, scores = _factor(probs.args[0], scores=True)
    if node_key(scores) != "matmul" or len(_operands(scores)) != 2:
        return None
    return (f, *_operands(scores), operands[1])


def roles(node: torch.fx.Node) -> dict[str, torch.fx.Node] | None:
    """The query, key and value of the attention whose output ``node`` is, or a view of, each
    where the way back from it through views and constant factors ends (an sdpa's arguments;
    written out, the operands of the query-key product and the value the probabilities multiply);
    None when it is no attention."""
    node = _under_views(node)[0]
    if node_key(node) == "sdpa":
        args = arguments.named(node)
        found = {role: args.get(role) for role in ("query", "key", "value")}
    else:
        written = _written_out(node)
        if written is None:
            return None
        found = dict(zip(("query", "key", "value"), written[1:]))
    if not all(isinstance(n, torch.fx.Node) for n in found.values()):
        return None
    return {role: _unscaled(n) for role, n in found.items()}


def inputs(node: torch.fx.Node) -> dict[str, tuple[torch.fx.Node, bool]] | None:
    """The query, key and value of the attention whose output ``node`` is, or a view of, as it takes
    them (after the rotations, head repeats and views that make them; before a multiplication by a
    number), each with whether it holds the key's last two dimensions swapped (the key a written-out
    query-key product reads); None when it is no attention."""
    node = _under_views(node)[0]
    if node_key(node) == "sdpa":
        args = arguments.named(node)
        found = {role: (args.get(role), False) for role in ("query", "key", "value")}
    else:
        written = _written_out(node)
        if written is None:
            return None
        found = {"query": (written[1], False), "key": (written[2], True), "value": (written[3], False)}
    if not all(isinstance(n, torch.fx.Node) for n, _ in found.values()):
        return None
    return {role: (_unmultiplied(n), swapped) for role, (n, swapped) in found.items()}


def _unmultiplied(node: torch.fx.Node) -> torch.fx.Node:
    """Back from ``node`` through multiplications and divisions by a number."""
    while node.op == "call_function" and node_key(node) in ("mul", "div") and not node.kwargs:
        tensors, numbers = _operands(node), [a for a in node.args if _number(a)]
        if len(tensors) != 1 or len(numbers) != 1 or node.args[0] is not tensors[0] and node_key(node) == "div" \
                or "rtruediv" in str(node.meta.get(TARGET)):
            return node
        node = tensors[0]
    return node


def _unscaled(node: torch.fx.Node) -> torch.fx.Node:
    """Back from ``node`` through views and constant factors, stopping at an item of a split or a
    getitem (q, k and v unbound from one fused projection stay told apart)."""
    while node.op == "call_function" and node.meta.get(TARGET) not in GETITEM:
        tensors = _operands(node)
        if len(tensors) != 1:
            return node
        key = node_key(node)
        if not (DEFAULT_OPS.is_view(node, key) or key in ("mul", "div") and _factor(node)[1] is not node):
            return node
        node = tensors[0]
    return node


def rescaled(capture: Capture, scale: Scale, factor: float) -> torch.Tensor | None:
    """``scale.sdpa`` called again on ``capture``'s values with its own scale times ``factor``; None
    when it cannot be (a value not stored, dropout inside it, arguments this torch does not take)."""
    args = arguments.named(scale.sdpa)
    if args.get("dropout_p") or any(not isinstance(k, str) for k in args):
        return None
    values: dict[str, Any] = {}
    for k, a in args.items():
        if isinstance(a, torch.fx.Node):
            a = capture.values.get(a.name)
            if a is None or is_summary(a):
                return None
        values[k] = a
    values["scale"] = scale.own * factor
    targets = Targets.default()
    try:
        with torch.no_grad():
            out = F.scaled_dot_product_attention(**values)
            for view in scale.views:   # as recorded: arguments other than the tensor viewed are constants
                if len(_operands(view)) != 1 or any(isinstance(v, torch.fx.Node) for v in view.kwargs.values()):
                    return None
                out = targets.resolve(str(view.meta.get(TARGET)))(out, *view.args[1:], **view.kwargs)
    except (TypeError, RuntimeError, ValueError):
        return None
    return out if isinstance(out, torch.Tensor) else None


def _factor(node: torch.fx.Node, scores: bool = False) -> tuple[float, torch.fx.Node]:
    """The product of the constant factors on the way back from ``node`` through views and
    multiplications or divisions by a number, and where that way ends. With ``scores``, also
    through what masks attention scores: ``masked_fill``, and an ``add`` one of whose operands
    alone comes from a ``matmul`` (an additive mask)."""
    f = 1.0
    while True:
        key = node_key(node)
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        numbers = [a for a in node.args if _number(a)]
        if node.op != "call_function" or not tensors:
            return f, node
        if DEFAULT_OPS.is_view(node, key):
            node = tensors[0]
        elif key == "mul" and len(tensors) == 1 and len(numbers) == 1 and not node.kwargs:
            f, node = f * numbers[0], tensors[0]
        elif (key == "div" and len(node.args) == 2 and node.args[0] is tensors[0] and numbers and not node.kwargs
              and "rtruediv" not in str(node.meta.get(TARGET))):
            f, node = f / numbers[0], tensors[0]
        elif scores and key == "masked_fill":
            node = tensors[0]
        elif scores and key == "add" and len(tensors) == 2:
            ways = [_factor(t, scores=True) for t in tensors]
            products = [w for w in ways if node_key(w[1]) == "matmul"]
            if len(products) != 1:
                return f, node
            return f * products[0][0], products[0][1]
        else:
            return f, node


def _operands(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensors a product multiplies (an ``einsum``'s after its equation)."""
    return [a for a in node.args if isinstance(a, torch.fx.Node)]


def through_casts(node: torch.fx.Node) -> torch.fx.Node:
    """Back from ``node`` through views, casts and a dropout (on attention probabilities; a norm's
    statistics read through its casts too, ``norms``). Not ``stories._through_views``: no compared
    values to stop at, and ``type_as`` and dropout taken too."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node) \
            and (DEFAULT_OPS.is_view(node, node_key(node)) or node_key(node) in _ON_PROBABILITIES):
        node = node.args[0]
    return node


_ON_PROBABILITIES = {"type_as", "dropout"}


def _head(q: torch.fx.Node) -> int:
    shape = q.meta.get(SHAPE)
    return int(shape[-1]) if shape else 0


def _number(x: Any) -> bool:
    return type(x) in (int, float) and x != 0


def bias_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node that brings ``bias``'s mask or bias into the attention whose output ``node`` is (an
    sdpa's ``attn_mask``, the first tensor added to the scores or mask filled in): where it is built."""
    node = _under_views(node)[0]
    if node_key(node) == "sdpa":
        mask = arguments.named(node).get("attn_mask")
        return _under_views(mask)[0] if isinstance(mask, torch.fx.Node) else None
    if _written_out(node) is None:
        return None
    terms = _score_terms(through_casts(_operands(node)[0]).args[0])
    if not terms or not (terms[0] or terms[1]):
        return None
    source = terms[0][0][1] if terms[0] else terms[1][0][0]
    return _under_views(source)[0] if isinstance(source, torch.fx.Node) else None


def bias(capture: Capture, node: torch.fx.Node) -> torch.Tensor | None:
    """What the attention whose output ``node`` is (or a view of) adds to its scores before the
    softmax, over the scores' shape, its masked positions -inf whatever number each side masks with
    (-inf, the dtype's lowest, -10000): a ``scaled_dot_product_attention``'s ``attn_mask`` (a bool
    one as 0 and -inf) or ``is_causal``; written out, the tensors added to the query-key product and
    the positions a ``masked_fill`` masks. None when it is no attention or a value was not kept."""
    node = _under_views(node)[0]
    if node_key(node) == "sdpa":
        args = arguments.named(node)
        q, k, mask = args.get("query"), args.get("key"), args.get("attn_mask")
        if not isinstance(q, torch.fx.Node) or not isinstance(k, torch.fx.Node) \
                or not q.meta.get(SHAPE) or not k.meta.get(SHAPE):
            return None
        shape = [*q.meta[SHAPE][:-1], k.meta[SHAPE][-2]]
        out = torch.zeros(shape[-2:])
        if mask is not None:
            value = stored(capture, mask)
            if value is None:
                return None
            out = torch.zeros(()).masked_fill(~value, -math.inf) if value.dtype == torch.bool else value.double()
        if args.get("is_causal") is True:
            out = out + torch.zeros(shape[-2:]).masked_fill(torch.ones(shape[-2:], dtype=torch.bool).triu(1), -math.inf)
        return _masked(out, shape)
    written = _written_out(node)
    if written is None:
        return None
    scores = through_casts(_operands(node)[0]).args[0]
    terms = _score_terms(scores)
    shape = scores.meta.get(SHAPE)
    if terms is None or not shape:
        return None
    out: torch.Tensor = torch.zeros(())
    for factor, term in terms[0]:
        value = stored(capture, term)
        if value is None:
            return None
        out = out + factor * value.double()
    for mask, fill in terms[1]:
        value = stored(capture, mask)
        if value is None or not _number(fill) or fill > _MASKED:
            return None
        out = out.masked_fill(value, -math.inf)
    return _masked(out, shape)


_MASKED = -9999.0   # a bias this low masks its position: -10000 (torchaudio), the dtype's lowest, -inf


def _masked(bias: torch.Tensor, shape: list[int]) -> torch.Tensor | None:
    try:
        bias = torch.broadcast_to(bias.double(), shape)
    except RuntimeError:
        return None
    return bias.masked_fill(bias <= _MASKED, -math.inf)


def _score_terms(node: torch.fx.Node) -> tuple[list[tuple[float, torch.fx.Node]],
                                               list[tuple[torch.fx.Node, Any]]] | None:
    """Back from the softmax's input to the query-key product: the tensors added on the way, each
    with the constant factor applied after it, and the masks and values ``masked_fill`` writes;
    None where the way holds anything else."""
    f, terms, fills = 1.0, [], []
    while True:
        key = node_key(node)
        tensors = _operands(node)
        if node.op != "call_function" or not tensors:
            return None
        if key == "matmul":
            return terms, fills
        if DEFAULT_OPS.is_view(node, key) or key in _ON_PROBABILITIES:
            node = tensors[0]
        elif key in ("mul", "div") and _factor(node)[1] is not node:
            g, node = _factor(node)
            f *= g
        elif key == "masked_fill" and len(node.args) >= 3 and node.args[0] is tensors[0]:
            fills.append((node.args[1], node.args[2]))
            node = tensors[0]
        elif key == "add" and len(tensors) == 2:
            ways = [node_key(_factor(t, scores=True)[1]) == "matmul" for t in tensors]
            if ways.count(True) != 1:
                return None
            terms.append((f, tensors[ways.index(False)]))
            node = tensors[ways.index(True)]
        else:
            return None
