"""The graph file of a capture: the FX graph as JSON, read back as data.

Each node is ``{name, op, target, args, kwargs, meta}``. Reading validates the document before any
stage uses it: one output node, last; known ops; arguments that refer to earlier nodes; metadata of
the right types; and op targets on the allowlist (``targets.py``), which is the only way a name in
the file reaches a callable. Anything else is refused with the node and what was expected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.fx

from ..errors import FxdiffError
from ..model.capture import BOUNDARY, DTYPE, GRAD, MODULE, MODULE_TYPE, NO_GRAD, NOT_STORED, SHAPE, TARGET, VMAP_DIMS
from ..targets import OPAQUE, Targets
from ..util import dtype_name, finite
from .summary import GRAD_SUMMARY, VALUE_SUMMARY

_OPS = ("placeholder", "get_attr", "call_function", "output")
_META_TYPES = {MODULE: str, MODULE_TYPE: str, TARGET: str, DTYPE: (str, type(None)), GRAD: str, NOT_STORED: str,
               VALUE_SUMMARY: dict, GRAD_SUMMARY: dict, BOUNDARY: str,
               VMAP_DIMS: int, NO_GRAD: bool}


class _Invalid(Exception):
    """A node that is not what a capture graph may hold."""


def node_to_json(node: torch.fx.Node, targets: Targets) -> dict[str, Any]:
    """One node as JSON; an op off the allowlist is stored as ``fxdiff.opaque`` (its name kept in meta)."""
    return {
        "name": node.name,
        "op": node.op,
        "target": targets.stored_name(node.meta.get(TARGET)) if node.op == "call_function" else str(node.target),
        "args": _arg_to_json(node.args),
        "kwargs": _arg_to_json(node.kwargs),
        "meta": {k: v for k, v in node.meta.items() if k.startswith("fxdiff_")},
    }


def _arg_to_json(a: Any) -> Any:
    if isinstance(a, torch.fx.Node):
        return {"node": a.name}
    if isinstance(a, bool) or a is None or isinstance(a, (int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, tuple):
        return {"tuple": [_arg_to_json(v) for v in a]}
    if isinstance(a, list):
        return [_arg_to_json(v) for v in a]
    if isinstance(a, dict):
        return {"dict": {k: _arg_to_json(v) for k, v in a.items()}}
    if isinstance(a, slice):
        return {"slice": [_arg_to_json(v) for v in (a.start, a.stop, a.step)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, torch.dtype):
        return {"dtype": dtype_name(a)}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, complex):
        return {"complex": [finite(a.real), finite(a.imag)]}
    return {"repr": str(a)}


def _arg_from_json(a: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    if isinstance(a, list):
        return [_arg_from_json(v, nodes) for v in a]
    if not isinstance(a, dict):
        if a is not None and not isinstance(a, (bool, int, float, str)):
            raise _Invalid(f"argument of type {type(a).__name__}")
        return a
    if len(a) != 1:
        raise _Invalid(f"argument {str(a)[:60]} is not one tagged value")
    (tag, v), = a.items()
    if tag == "node":
        if not isinstance(v, str) or v not in nodes:
            raise _Invalid(f"argument refers to node {str(v)[:60]!r}, which does not come before it")
        return nodes[v]
    if tag in ("tuple", "slice", "complex") and not isinstance(v, list) or tag == "dict" and not isinstance(v, dict):
        raise _Invalid(f"{tag} argument holds {type(v).__name__}")
    if tag == "tuple":
        return tuple(_arg_from_json(x, nodes) for x in v)
    if tag == "dict":
        return {k: _arg_from_json(x, nodes) for k, x in v.items()}
    if tag == "slice":
        if len(v) != 3:
            raise _Invalid("a slice argument holds start, stop and step")
        return slice(*(_arg_from_json(x, nodes) for x in v))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        if not _non_finite(v):
            raise _Invalid(f"float argument {str(v)[:40]!r} is not inf or nan")
        return float(v)
    if tag == "dtype":
        dtype = getattr(torch, str(v), None)
        if not isinstance(dtype, torch.dtype):
            raise _Invalid(f"{str(v)[:40]!r} is not a torch dtype")
        return dtype
    if tag == "device":
        try:
            return torch.device(v)
        except (RuntimeError, TypeError, ValueError):
            raise _Invalid(f"{str(v)[:40]!r} is not a torch device") from None
    if tag == "complex":   # parts that are not finite are written as strings (util.finite)
        if len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) or _non_finite(x) for x in v):
            raise _Invalid("a complex argument holds its real and imaginary parts")
        return complex(*(float(x) for x in v))
    if tag == "repr":
        return str(v)  # an object recorded only by its text
    raise _Invalid(f"unknown argument tag {str(tag)[:40]!r}")


def _non_finite(v: Any) -> bool:
    """``v`` is a non-finite float as the writer spells it (``repr``: ``inf``, ``-inf``, ``nan``)."""
    return isinstance(v, str) and v.strip().lower().lstrip("+-") in ("inf", "nan", "infinity")


def graph_from_json(docs: Any, targets: Targets, file: Path) -> torch.fx.Graph:
    """The FX graph of ``docs`` (see the module docstring for what is checked)."""
    if not isinstance(docs, list) or not docs:
        raise FxdiffError(f"{file}: the graph has no nodes")
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for i, d in enumerate(docs):
        name = d.get("name") if isinstance(d, dict) else None
        try:
            node = _node_from_json(graph, d, nodes, targets, last=i == len(docs) - 1)
        except _Invalid as e:
            raise FxdiffError(f"{file}: node {str(name)[:60]!r}: {e}") from None
        except RecursionError:
            raise FxdiffError(f"{file}: node {str(name)[:60]!r}: arguments nested too deeply") from None
        nodes[node.name] = node
    return graph


def _node_from_json(graph: torch.fx.Graph, d: Any, nodes: dict[str, torch.fx.Node], targets: Targets,
                    last: bool) -> torch.fx.Node:
    if not isinstance(d, dict) or not {"name", "op", "target", "args", "kwargs"} <= set(d):
        raise _Invalid("expected an object with name, op, target, args, kwargs")
    name, op, target, meta = d["name"], d["op"], d["target"], d.get("meta", {})
    if not isinstance(name, str) or not name.isidentifier():
        raise _Invalid("the name is not an identifier")
    if op not in _OPS:
        raise _Invalid(f"op {str(op)[:40]!r} is not one of {', '.join(_OPS)}")
    if (op == "output") != last:
        raise _Invalid("the graph must end with its one output node")
    if not isinstance(target, str) or (not target and op in ("placeholder", "get_attr")):
        raise _Invalid("the target is not a string" if not isinstance(target, str) else "the target is empty")
    if not isinstance(meta, dict) or any(k in meta and not isinstance(meta[k], t) for k, t in _META_TYPES.items()):
        raise _Invalid("metadata of the wrong types")
    shape = meta.get(SHAPE)
    if shape is not None and not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise _Invalid("the recorded shape is not a list of sizes")
    args = _arg_from_json(d["args"], nodes)
    kwargs = _arg_from_json(d["kwargs"], nodes)
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise _Invalid("args must be a sequence and kwargs a mapping")
    if op in ("placeholder", "get_attr") and (args or kwargs):
        raise _Invalid(f"a {op} node takes no arguments")
    if op == "call_function" and not isinstance(meta.get(TARGET), str):
        raise _Invalid(f"metadata has no {TARGET}")
    if op == "output":
        if len(args) != 1 or not isinstance(args[0], (list, tuple)) \
                or not all(isinstance(a, torch.fx.Node) for a in args[0]):
            raise _Invalid("the output node takes one argument, the list of nodes it outputs")
        node = graph.output(args[0])
    else:
        if name in nodes:
            raise _Invalid("a second node of that name")
        fn: Any = target
        if op == "call_function":
            fn = targets.resolve(target)
            if fn is None:
                raise _Invalid(f"target {target[:80]!r} is not an op fxdiff may call; the capture is refused")
            if target != OPAQUE and meta.get(TARGET, target) != target:
                raise _Invalid(f"target {target[:80]!r} disagrees with its metadata {str(meta.get(TARGET))[:80]!r}")
        node = graph.create_node(op, fn, tuple(args), kwargs, name=name)
    node.meta.update(meta)
    if op == "call_function":
        node.meta.setdefault(TARGET, target)
    return node
