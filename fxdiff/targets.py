"""Op targets: the names a capture stores for its ops, and the only callables those names can reach.

A capture is data. Its ``graph.json`` names each op (``torch.nn.functional.linear``,
``torch.Tensor.add``, ``operator.getitem``), and a loaded graph needs callables for the isolation
replay. Names map to callables through an allowlist built from what torch itself declares
overridable (the ops a ``TorchFunctionMode`` sees), a few tensor factories, the arithmetic of
``operator``, and fxdiff's stand-ins under stable names. Nothing is imported to resolve a name. The recorder stores an op
outside the list under the inert name ``fxdiff.opaque`` (its own name kept as metadata), and
loading refuses a capture that names anything else.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import torch

OPAQUE = "fxdiff.opaque"      # an op fxdiff recorded but will not call (a user's autograd.Function...)
MUTATED = "fxdiff.mutated"


def mutated(tensor: torch.Tensor, *writers: torch.Tensor) -> torch.Tensor:
    """Stand-in target for a tensor changed in place through an alias: its previous value, then
    the in-place results that wrote to it, where the recorder saw them."""
    return tensor


def opaque(*args: Any, **kwargs: Any) -> Any:
    """Stand-in target for an op that is recorded but never called."""
    raise RuntimeError("an opaque op cannot be replayed")


# Names earlier captures stored: the stand-in by the module that implemented it; the pooling
# functions torch makes with boolean_dispatch, all under its inner function's name, which cannot tell
# them apart (opaque: never replayed).
_LEGACY = {"fxdiff.record.mutated": MUTATED, "torch.nn.functional.boolean_dispatch.<locals>.fn": OPAQUE}

_OPERATOR = ("getitem", "setitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos",
             "abs", "invert", "and_", "or_", "xor", "lshift", "rshift", "matmul", "eq", "ne", "lt", "le",
             "gt", "ge", "not_", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand",
             "ior", "ixor", "ilshift", "irshift", "imatmul")
# Overridable, but not computation: they reach storage, files, hooks or host memory.
_DENIED = ("hook", "storage", "__reduce", "__setstate__", "__torch_", "apply_", "map_", "map2_", "share_memory",
           "numpy", "tolist", "pin_memory", "record_stream", "_make_subclass", "_make_wrapper", "__deepcopy__",
           "__dlpack", "from_file", "new_tensor")
# Not overridable (they take no tensor), but computation only: models build masks and positions with
# them, and the isolation replay needs them to rerun those. Random and uninitialised ones are left out.
_FACTORIES = ("zeros", "ones", "full", "arange", "eye", "linspace", "logspace", "tensor", "scalar_tensor",
              "Tensor.new_zeros", "Tensor.new_ones", "Tensor.new_full")
# Private, so not listed as overridable, yet computation that public modules call: weight_norm's
# (legacy and parametrized) core, in every EnCodec, HiFi-GAN or DAC port.
_PRIVATE = ("_weight_norm",)
# Overridable (a TorchFunctionMode sees them) but missing from torch's list: MobileNetV3's and
# EfficientNet-lite's activations, and the view ``nn.MultiheadAttention`` splits q, k and v with.
_UNLISTED = ("nn.functional.hardswish", "nn.functional.hardsigmoid", "_tensor.Tensor.unflatten")


def target_name(func: Any) -> str:
    """Qualified name of a torch callable as the recorder sees it, e.g. ``torch.Tensor.add``."""
    if func is mutated:
        return MUTATED
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__" and hasattr(func, "__self__"):  # property such as Tensor.T
        prop = func.__self__
        return f"torch.Tensor.{getattr(prop, '__name__', None) or getattr(prop.fget, '__name__', 'property')}"
    if getattr(func, "__objclass__", None) is not None:  # method descriptor of TensorBase
        return f"torch.Tensor.{name}"
    module = getattr(func, "__module__", None) or "torch"
    if module.startswith("torch._C._VariableFunctions"):
        module = "torch"
    qualname = getattr(func, "__qualname__", name)
    if "<locals>" in qualname:   # made by a factory (F.max_pool2d is one of torch's boolean_dispatch ``fn``s)
        qualname = name
    return f"{module}.{qualname}".replace("._VariableFunctionsClass", "")


class Targets:
    """The allowlist: stored op names and the callables they stand for. ``Targets.default()``."""

    def __init__(self, callables: dict[str, Callable]):
        self._callables = dict(callables)

    @classmethod
    @functools.cache
    def default(cls) -> "Targets":
        """torch's overridable functions and tensor methods, ``operator``'s arithmetic, stand-ins."""
        from torch.overrides import get_overridable_functions

        table: dict[str, Callable] = {}
        for namespace, funcs in get_overridable_functions().items():
            for func in funcs:
                name = target_name(func)
                if not name.startswith("torch.") or any(d in name for d in _DENIED):
                    continue
                if callable(func) and not isinstance(func, type):
                    table[name] = _getter(func) if getattr(func, "__name__", "") == "__get__" else func
                ns_name = getattr(namespace, "__name__", None)
                attr = getattr(func, "__name__", None)
                if isinstance(ns_name, str) and ns_name.startswith("torch") and attr and callable(func) \
                        and getattr(namespace, attr, None) is func:
                    table.setdefault(f"{ns_name}.{attr}", func)
        for name in _FACTORIES:
            owner, _, attr = name.rpartition(".")
            table.setdefault(f"torch.{name}", getattr(torch.Tensor if owner else torch, attr))
        for name in _PRIVATE:
            table[f"torch.{name}"] = getattr(torch, name)
        for name in _UNLISTED:
            table[f"torch.{name}"] = functools.reduce(getattr, name.split("."), torch)
        for name in _OPERATOR:
            table[f"operator.{name}"] = table[f"_operator.{name}"] = getattr(operator, name)
        table[MUTATED] = mutated
        table[OPAQUE] = opaque
        return cls(table)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _LEGACY.get(name, name) in self._callables

    def stored_name(self, name: str) -> str:
        """The target to store for an op called ``name``: the name when allowed, else ``OPAQUE``."""
        return name if name in self else OPAQUE

    def resolve(self, name: str) -> Callable | None:
        """The callable an allowed name stands for; None for a name that is not on the list."""
        return self._callables.get(_LEGACY.get(name, name))


def _getter(descriptor_get: Any) -> Callable:
    prop = descriptor_get.__self__

    def get(tensor: torch.Tensor) -> Any:
        return prop.__get__(tensor, type(tensor))
    get.__name__ = get.__qualname__ = target_name(descriptor_get).rpartition(".")[2]
    return get
