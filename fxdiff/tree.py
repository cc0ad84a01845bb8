"""Nested call structures (args, kwargs, outputs) with tensors as leaves.

Models take and return tuples, dicts, dataclasses and Hugging Face ``ModelOutput``s. These helpers
walk them without pickling anything: ``flatten`` lists tensor leaves with readable paths, and
``encode`` / ``decode`` turn a structure into JSON with tensors stored by key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable

import torch

from .errors import FxdiffError

_PRIMITIVES = (type(None), bool, int, float, str)


def _children(obj: Any) -> list[tuple[str, Any]] | None:
    if isinstance(obj, Mapping):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    return None


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Tensor leaves of ``obj`` as ``(path, tensor)``, depth first, e.g. ``("logits", t)``."""
    if isinstance(obj, torch.Tensor):
        return [(prefix or "0", obj)]
    children = _children(obj)
    if children is None:
        return []
    out = []
    for key, value in children:
        out.extend(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """A copy of ``obj`` with every tensor leaf replaced by ``fn(leaf)``; other leaves kept.

    Containers keep their type (a ``Mapping`` other than ``dict`` becomes a ``dict``), so the copy
    can be passed to the model in place of the original.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def plain(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` as ``decode(encode(obj))`` would give it back, with tensor leaves replaced by ``fn(leaf)``.

    Mappings and dataclasses become dicts, namedtuples tuples, other objects their ``repr``;
    tensors are visited in ``flatten`` order.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, _PRIMITIVES) or isinstance(obj, (torch.dtype, torch.device)):
        return obj
    if isinstance(obj, list):
        return [plain(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v, fn) for v in obj)
    children = _children(obj)
    if children is not None:
        return {k: plain(v, fn) for k, v in children}
    return repr(obj)


def map_leaves(obj: Any, kind: type, fn: Callable[[Any], Any]) -> Any:
    """A copy of a plain structure (dicts, lists, tuples) with leaves of type ``kind`` mapped by ``fn``."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_leaves(v, kind, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_leaves(v, kind, fn) for v in obj)
    return obj


def encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-able form of ``obj``; tensors go into ``tensors`` under keys starting with ``prefix``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach()
        return {"__tensor__": key}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if isinstance(obj, _PRIMITIVES):
        return obj
    if isinstance(obj, (torch.dtype, torch.device)):
        return {"__" + type(obj).__name__ + "__": str(obj)}
    if isinstance(obj, Mapping):
        return {"__dict__": [[str(k), encode(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__" + ("list" if isinstance(obj, list) else "tuple") + "__":
                [encode(v, tensors, prefix) for v in obj]}
    children = _children(obj)
    if children is not None:
        return {"__dict__": [[k, encode(v, tensors, prefix)] for k, v in children]}
    return {"__repr__": repr(obj)}


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode``: dicts come back as dicts, dataclasses as dicts."""
    if isinstance(obj, _PRIMITIVES):
        return obj
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict) or len(obj) != 1:
        raise FxdiffError(f"unexpected structure in capture: {str(obj)[:80]}")
    (tag, value), = obj.items()
    if tag == "__tensor__":
        if not isinstance(value, str) or value not in tensors:
            raise FxdiffError(f"capture refers to tensor {str(value)[:80]!r}, which is missing")
        return tensors[value]
    if tag in ("__float__", "__dtype__", "__device__", "__repr__") and not isinstance(value, str):
        raise FxdiffError(f"{tag} in capture holds {type(value).__name__}, expected a string")
    if tag in ("__dict__", "__list__", "__tuple__") and not isinstance(value, list):
        raise FxdiffError(f"{tag} in capture holds {type(value).__name__}, expected a list")
    if tag == "__float__":
        if value.lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
            raise FxdiffError(f"__float__ in capture holds {value[:40]!r}, expected nan or inf")
        return float(value)
    if tag == "__dtype__":
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise FxdiffError(f"{value[:40]!r} in capture is not a torch dtype")
        return dtype
    if tag == "__device__":
        try:
            return torch.device(value)
        except (RuntimeError, ValueError):
            raise FxdiffError(f"{value[:40]!r} in capture is not a torch device") from None
    if tag == "__dict__":
        if not all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str) for kv in value):
            raise FxdiffError("__dict__ in capture is not a list of [key, value] pairs")
        return {k: decode(v, tensors) for k, v in value}
    if tag == "__list__":
        return [decode(v, tensors) for v in value]
    if tag == "__tuple__":
        return tuple(decode(v, tensors) for v in value)
    if tag == "__repr__":
        return value
    raise FxdiffError(f"unknown tag {str(tag)[:40]!r} in capture")
