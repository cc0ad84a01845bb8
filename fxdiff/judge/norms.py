"""A normalisation read off a capture's ops: which kind it is and its eps, whether one op computes it
(``layer_norm``, ``rms_norm``, ``group_norm``) or it is written out (``x * rsqrt(mean(x**2) + eps)``,
Hugging Face's RMSNorm; ``(x - mean) / sqrt(var + eps)``). Two sides that normalise another way,
or with another eps, are told so where one side writes the norm out and the other calls it."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from ..ops import DEFAULT_OPS, node_key
from . import arguments
from .attention import through_casts

_KINDS = {"layer_norm": "layer norm", "rms_norm": "RMS norm", "group_norm": "group norm", "batch_norm": "batch norm"}


@dataclasses.dataclass(frozen=True)
class Norm:
    """One side's normalisation."""

    kind: str             # "RMS norm", "layer norm" (the mean subtracted), ...
    eps: float | None     # None: the op's default, which depends on the dtype (rms_norm)
    written: bool         # written out in elementwise ops, not one call
    outside: bool = False   # eps added to the root, not under it: x / (sqrt(s) + eps)

    def words(self) -> str:
        """``RMS norm (written out, eps 1e-05)``."""
        eps = "eps the dtype's" if self.eps is None else f"eps {self.eps:g}"
        written, outside = "written out, " if self.written else "", " outside the root" if self.outside else ""
        return f"{self.kind} ({written}{eps}{outside})"


def norm_of(node: torch.fx.Node) -> Norm | None:
    """The normalisation whose output ``node`` is, or that it scales by a weight, casts or views;
    None when it is none."""
    node = _core(node)
    key = node_key(node)
    if key in _KINDS:
        eps = arguments.named(node).get("eps")
        return Norm(_KINDS[key], float(eps) if type(eps) in (int, float) else None, False)
    return _written(node)


def _core(node: torch.fx.Node) -> torch.fx.Node:
    """Back from ``node`` through views, casts and a product with a parameter (the norm's weight)."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
        key = node_key(node)
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if DEFAULT_OPS.is_view(node, key) or key == "type_as":   # casts to a dtype are views
            node = tensors[0]
        elif key == "mul" and len(tensors) == 2 and sum(_parameter(t) for t in tensors) == 1:
            node = next(t for t in tensors if not _parameter(t))
        elif key == "add" and len(tensors) == 2 and sum(_parameter(t) for t in tensors) == 1 \
                and node_key(next(t for t in tensors if not _parameter(t))) in ("mul", "div"):
            node = next(t for t in tensors if not _parameter(t))   # the norm's bias
        else:
            break
    return node


def _parameter(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a parameter, through views, casts and a number added to it (Gemma's gain
    ``1 + w``)."""
    while node.op == "call_function" and len(node.all_input_nodes) == 1:
        key = node_key(node)
        if not (DEFAULT_OPS.is_view(node, key)
                or key in ("add", "sub", "radd", "rsub") and any(type(a) in (int, float) for a in node.args)):
            return False
        node = node.all_input_nodes[0]
    return node.op == "get_attr"


def source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor that the norm whose output ``node`` is normalises (through casts, and before its
    mean is taken away); None when ``node`` is no norm's output."""
    if norm_of(node) is None:
        return None
    node = _core(node)
    if node_key(node) in _KINDS:
        return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
    x = through_casts(_operands(node)[0])
    return through_casts(x.args[0]) if node_key(x) == "sub" and isinstance(x.args[0], torch.fx.Node) else x


def _operands(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(x, root)`` of a product by a root or a quotient by one, a norm written out."""
    key = node_key(node)
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if key not in ("mul", "div") or len(tensors) != 2:
        return None
    return tensors if key == "div" or node_key(tensors[1]) == "rsqrt" else tensors[::-1]


def _written(node: torch.fx.Node) -> Norm | None:
    """``x * rsqrt(s + eps)`` or ``x / sqrt(s + eps)``, ``s`` the mean of ``x``'s squares (an RMS
    norm) or its variance (``x`` less its mean: a layer norm)."""
    key = node_key(node)
    if _operands(node) is None:
        return None
    x, root = _operands(node)
    want = "sqrt" if key == "div" else "rsqrt"
    root = through_casts(root)
    outside = _plus_number(root) if key == "div" else None
    if outside is not None:   # x / (sqrt(s) + eps)
        root = through_casts(outside[0])
        if node_key(root) != "sqrt" or not isinstance(root.args[0], torch.fx.Node):
            return None
        return Norm("layer norm" if node_key(through_casts(x)) == "sub" else "RMS norm", outside[1], True, True)
    if node_key(root) != want or not isinstance(root.args[0], torch.fx.Node):
        return None
    added = _plus_number(through_casts(root.args[0]))
    if added is None:
        return None
    return Norm("layer norm" if node_key(through_casts(x)) == "sub" else "RMS norm", added[1], True)


def _plus_number(node: torch.fx.Node) -> tuple[torch.fx.Node, float] | None:
    """``(t, c)`` where ``node`` is ``t + c``, ``c`` a number."""
    if node_key(node) != "add":
        return None
    numbers = [a for a in node.args if type(a) in (int, float)]
    inner = [a for a in node.args if isinstance(a, torch.fx.Node)]
    return (inner[0], float(numbers[0])) if len(numbers) == 1 and len(inner) == 1 else None


def gain(node: torch.fx.Node) -> tuple[float, str] | None:
    """The gain of the norm whose output ``node`` is (or a view or cast of): the number added to its
    weight (Gemma's ``1 + w``: 1; Llama's ``w``: 0) and the weight's name; None where it has none or
    it cannot be told."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
        key = node_key(node)
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if DEFAULT_OPS.is_view(node, key) or key == "type_as":
            node = tensors[0]
        elif key == "mul" and len(tensors) == 2 and sum(_parameter(t) for t in tensors) == 1 \
                and norm_of(next(t for t in tensors if not _parameter(t))) is not None:
            return _offset(next(t for t in tensors if _parameter(t)))
        elif key in _KINDS:
            weight = arguments.named(node).get("weight")
            return _offset(weight) if isinstance(weight, torch.fx.Node) and _parameter(weight) else None
        else:
            return None
    return None


def _offset(node: torch.fx.Node) -> tuple[float, str] | None:
    """A parameter through views, casts and numbers added to it: the numbers' sum and its name."""
    total = 0.0
    while node.op == "call_function":
        key = node_key(node)
        if key in ("add", "radd"):
            total += sum(a for a in node.args if type(a) in (int, float))
        elif not DEFAULT_OPS.is_view(node, key):
            return None
        node = node.all_input_nodes[0]
    return total, str(node.target)
