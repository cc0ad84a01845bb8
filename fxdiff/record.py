"""Record an eager model run as a ``torch.fx.Graph`` with every node's value and gradient.

The model runs as it always does, under a ``TorchFunctionMode`` that sees each torch-level call
(``F.linear``, ``Tensor.add``, ``torch.stft``...). Dataflow edges come from tensor identity, module
paths from global module forward (pre-)hooks, gradients from tensor hooks fired by the real
backward pass.
Nothing is replayed, so custom ``autograd.Function``s, tensor hooks, ``no_grad`` regions, in-place ops
and Python control flow on tensor values all record exactly what eager computes.

Values and gradients are held by reference, not copied: a value is copied only just before an op
that may write to its storage (in-place ops, ``out=``, ``inplace=True``, batch norm's running
statistics), and, at the end of the run, when something outside the capture (the model's
parameters, a cache it keeps) still shares its storage. A write the recorder did not foresee is
caught by the tensors' version counters, and the run is then recorded again, copying every value
and gradient as it is produced.

A node's gradient is d(loss)/d(its value as produced): what flows into the autograd node that
produced it, as ``torch.autograd.grad(loss, torch.autograd.graph.get_gradient_edge(t))`` taken at
production would give. A node with no path to the loss has no entry in ``Capture.grads``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import inspect
import math
import operator
import platform
import random
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import __version__, tree
from .capture import DTYPE, GRAD, MODULE, MODULE_TYPE, SHAPE, TARGET, Capture

Loss = Callable[[Any], torch.Tensor]

TRACERS = ("eager", "fx")

_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
            F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout, torch.feature_dropout}
_CONST_TYPES = (type(None), bool, int, float, complex, str, torch.dtype, torch.device,
                torch.layout, torch.memory_format)
_INPLACE_DUNDERS = {"__setitem__", "__set__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                    "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                    "__ilshift__", "__irshift__", "__imatmul__"}
_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "record_stream"}
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
def _storage_base_uses() -> int:
    """Uses a live tensor's storage reports beyond the tensor itself, counted as ``release`` counts:
    1 on torch 2.13, which keeps the Python storage object alive with the storage; 0 on torch 2.9."""
    if _storage_use_count is None:
        return 0
    t = torch.empty(1)
    return _storage_use_count(t.untyped_storage()._cdata) - 1


_STORAGE_BASE_USES = _storage_base_uses()


def mutated(tensor: torch.Tensor, *writers: torch.Tensor) -> torch.Tensor:
    """Stand-in target for a tensor changed in place through an alias: its previous value, then
    the in-place results that wrote to it, where the recorder saw them."""
    return tensor


def target_name(func: Any) -> str:
    """Qualified, importable name of a torch callable, e.g. ``torch.Tensor.add``."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__" and hasattr(func, "__self__"):  # property such as Tensor.T
        return f"torch.Tensor.{func.__self__.__name__}"
    if getattr(func, "__objclass__", None) is not None:  # method descriptor of TensorBase
        return f"torch.Tensor.{name}"
    module = getattr(func, "__module__", None) or "torch"
    if module.startswith("torch._C._VariableFunctions"):
        module = "torch"
    return f"{module}.{getattr(func, '__qualname__', name)}".replace("._VariableFunctionsClass", "")


def resolve_target(name: str) -> Callable:
    """The callable a stored target name refers to in this torch, or a named stand-in."""
    head, _, attr = name.rpartition(".")
    obj: Any = None
    if head in ("torch.Tensor",):
        obj = getattr(torch.Tensor, attr, None)
    elif head:
        try:
            import importlib
            obj = getattr(importlib.import_module(head), attr, None)
        except Exception:  # noqa: BLE001 -- any import failure means "not in this torch"
            obj = None
    if callable(obj):
        return obj

    def missing(*args, **kwargs):
        raise RuntimeError(f"{name} does not exist in torch {torch.__version__}")
    missing.__name__ = missing.__qualname__ = attr or name
    missing.__module__ = head or "fxdiff.missing"
    return missing


class Aliased(Exception):
    """A value or gradient held by reference was overwritten by a write the recorder did not foresee."""


class _Live:
    """What the recorder knows about a live tensor: its node, version and whether it is hooked."""

    __slots__ = ("ref", "node", "version", "hooked")

    def __init__(self, tensor: torch.Tensor, node: torch.fx.Node, hooked: bool):
        self.ref = weakref.ref(tensor)
        self.node = node
        self.version = tensor._version
        self.hooked = hooked


@dataclasses.dataclass(frozen=True)
class Slot:
    """Placeholder for a recorded tensor inside an input/output structure, filled after the run."""

    node: str


class Recorder(TorchFunctionMode):
    """A ``TorchFunctionMode`` that builds an FX graph of the torch calls it sees.

    Subclass and override ``record_call`` to change what becomes a node; pass the subclass to
    ``record(recorder=...)``. ``copy=True`` copies every value and gradient when it is produced.
    """

    def __init__(self, model: torch.nn.Module, *, disable_dropout: bool, copy: bool = False):
        super().__init__()
        self.graph = torch.fx.Graph()
        self.values: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.disable_dropout = disable_dropout
        self.copy = copy
        self._live: dict[int, _Live] = {}
        self._stack: list[tuple[str, str]] = [("", type(model).__name__)]
        self._frozen: dict[int, str] = {}   # id -> qualified name of parameters and buffers
        self._shared: dict[int, list[str]] = {}  # storage address -> values held by reference there
        self._held: dict[str, int] = {}      # value held by reference -> its version when produced
        self._grad_versions: dict[str, int] = {}
        self._names: dict[Any, tuple[str, str]] = {}
        self._n_const = 0
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            self._frozen.setdefault(id(t), name)
        self._paths = {id(m): (path, type(m).__name__) for path, m in model.named_modules() if path}
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
                       torch.nn.modules.module.register_module_forward_hook(self._leave, always_call=True)]

    # -- module paths -------------------------------------------------------------------------
    def _enter(self, module, args):
        entry = self._paths.get(id(module))
        if entry is not None:
            self._stack.append(entry)

    def _leave(self, module, args, output):
        if id(module) in self._paths and len(self._stack) > 1:
            self._stack.pop()

    @contextlib.contextmanager
    def inside(self, path: str, type_name: str) -> Iterator[None]:
        """Attribute the ops recorded meanwhile to module ``path`` (for graphs that inline modules)."""
        self._stack.append((path, type_name))
        try:
            yield
        finally:
            self._stack.pop()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- values held by reference -------------------------------------------------------------
    def _keep(self, name: str, t: torch.Tensor, copy: bool) -> None:
        value = t.detach()
        key = None if copy else _storage_key(value)
        if key is None:
            value = value.clone()
        else:
            self._shared.setdefault(key, []).append(name)
            self._held[name] = value._version
        self.values[name] = value

    def protect(self, tensors: list[torch.Tensor]) -> None:
        """Copy the values held by reference that share storage with ``tensors``, before a write."""
        for t in tensors:
            for name in self._shared.pop(_storage_key(t), ()):
                value = self.values[name]
                if value._version != self._held.pop(name):
                    raise Aliased(name)
                self.values[name] = value.clone()

    def release(self) -> None:
        """End of run: check nothing held was overwritten; copy values whose storage is shared outside.

        Call once the run's own tensors (outputs, inputs, loss) are gone, and before the model's
        state is restored: the model's parameters and whatever it kept still count as outside.
        """
        for name, version in self._grad_versions.items():
            if self.grads[name]._version != version:
                raise Aliased(f"gradient of {name}")
        for key, names in self._shared.items():
            values = [self.values[n] for n in names]
            if any(v._version != self._held[n] for n, v in zip(names, values)):
                raise Aliased(names[0])
            ours = len({id(v) for v in values}) + _STORAGE_BASE_USES
            if _storage_use_count is None or _storage_use_count(values[0].untyped_storage()._cdata) > ours:
                for n, v in zip(names, values):
                    self.values[n] = v.clone()
        self._shared.clear()
        self._held.clear()

    # -- nodes --------------------------------------------------------------------------------
    def _new_node(self, op: str, target: Any, args: tuple, kwargs: dict, name: str,
                  module: tuple[str, str] | None = None) -> torch.fx.Node:
        node = self.graph.create_node(op, target, args, kwargs, name=name)
        node.meta[MODULE], node.meta[MODULE_TYPE] = module or self._stack[-1]
        node.meta[TARGET] = target if isinstance(target, str) else self._name(target)[0]
        return node

    def _name(self, func: Any) -> tuple[str, str]:
        """(qualified target, short node name) of ``func``, cached."""
        try:
            return self._names[func]
        except (KeyError, TypeError):
            target = target_name(func)
            names = (target, target.rpartition(".")[2].strip("_") or "op")
            with contextlib.suppress(TypeError):
                self._names[func] = names
            return names

    def _hold(self, node: torch.fx.Node, t: torch.Tensor, copy: bool | None = None) -> None:
        """Make ``node`` the producer of ``t`` and keep its value."""
        self._keep(node.name, t, self.copy if copy is None else copy)
        node.meta[SHAPE] = list(t.shape)
        node.meta[DTYPE] = str(t.dtype).removeprefix("torch.")
        live = _Live(t, node, hooked=False)
        self._live[id(t)] = live
        self._watch(live, t)

    def _watch(self, live: _Live, t: torch.Tensor) -> None:
        if not live.hooked and t.requires_grad:
            t.register_hook(self._store_grad(live.node.name))
            live.hooked = True

    def _store_grad(self, name: str):
        def store(grad):
            if self.copy:
                grad = grad.detach().clone()
            else:
                self._grad_versions[name] = grad._version
            self.grads[name] = grad
        return store

    def add_input(self, path: str, t: torch.Tensor) -> torch.fx.Node:
        """Add a graph input (placeholder) for tensor ``t`` found at ``path`` in the call."""
        node = self._new_node("placeholder", path, (), {}, name=_identifier(path), module=self._stack[0])
        self._hold(node, t)
        return node

    def node_of(self, t: torch.Tensor, version: int) -> torch.fx.Node:
        """The node that produced ``t`` as it was at ``version``, creating one when it is new."""
        live = self._live.get(id(t))
        if live is not None and live.ref() is t:
            if live.version != version:
                sources = [live.node]
                base = self._live.get(id(t._base)) if t._base is not None else None
                if base is not None and base.ref() is t._base and base.node is not live.node:
                    sources.append(base.node)
                node = self._new_node("call_function", mutated, tuple(sources), {}, name="mutated")
                self._hold(node, t)
                return node
            self._watch(live, t)
            return live.node
        if id(t) in self._frozen:
            name = self._frozen[id(t)]
            owner = name.rpartition(".")[0]
            node = self._new_node("get_attr", name, (), {}, name=_identifier(name), module=(owner, ""))
            node.meta[SHAPE] = list(t.shape)
            node.meta[DTYPE] = str(t.dtype).removeprefix("torch.")
            self._live[id(t)] = _Live(t, node, hooked=True)
            return node
        self._n_const += 1
        node = self._new_node("get_attr", f"_fxdiff_constant_{self._n_const}", (), {}, name="constant")
        self._hold(node, t, copy=True)  # made outside the run, so it may change outside it
        return node

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.disable_dropout:
            args, kwargs, skip = _without_dropout(func, args, kwargs)
            if skip:
                return args[0] if args else kwargs["input"]
        return self.call(func, args, kwargs)

    def call(self, func, args: tuple, kwargs: dict) -> Any:
        """Run ``func`` and record it."""
        inputs = _tensors((args, kwargs))
        versions = [t._version for t in inputs]
        written = _written(func, args, kwargs)
        if written:
            self.protect(written)
        out = func(*args, **kwargs)
        self.record_call(func, args, kwargs, out, inputs, versions)
        return out

    def record_call(self, func, args, kwargs, out, inputs, versions) -> None:
        """Turn one finished call into graph nodes (none for calls that yield no new tensor)."""
        outs = tree.flatten(out) if not isinstance(out, torch.Tensor) else [("0", out)]
        in_ids = {id(t): i for i, t in enumerate(inputs)}
        produced = []
        for path, t in outs:
            i = in_ids.get(id(t))
            if i is None or inputs[i]._version != versions[i]:
                produced.append((path, t))
        for i, t in enumerate(inputs):  # inputs changed in place but not returned (setitem, out=)
            if t._version != versions[i] and id(t) not in self._frozen \
                    and all(t is not o for _, o in outs):
                produced.append((f"mutated.{i}", t))
        if not produced:
            return
        before = dict(zip(map(id, inputs), versions))
        fx_args, fx_kwargs = _to_fx((args, kwargs), lambda t: self.node_of(t, before[id(t)]))
        name = self._name(func)[1]
        node = self._new_node("call_function", func, tuple(fx_args), fx_kwargs, name=name)
        if len(produced) == 1 and (produced[0][1] is out or not outs):
            self._hold(node, produced[0][1])
            self._sync_base(produced[0][1], node, in_ids)
            return
        for path, t in produced:
            index = int(path) if path.isdigit() else path
            item = self._new_node("call_function", operator.getitem, (node, index), {}, name=f"{name}_out")
            item.meta[MODULE], item.meta[MODULE_TYPE] = node.meta[MODULE], node.meta[MODULE_TYPE]
            self._hold(item, t)
            self._sync_base(t, item, in_ids)

    def _sync_base(self, t: torch.Tensor, node: torch.fx.Node, in_ids: dict[int, int]) -> None:
        """After an in-place write to a view, give its (live) base a ``mutated`` node fed by the write."""
        base = t._base
        if base is None or id(t) not in in_ids:
            return
        live = self._live.get(id(base))
        if live is None or live.ref() is not base or live.version == base._version:
            return
        item = self._new_node("call_function", mutated, (live.node, node), {}, name="mutated")
        self._hold(item, base)

    def finish(self, outputs: Any) -> list[torch.fx.Node]:
        """Add the output node over the tensors of ``outputs``; return the nodes, in leaf order."""
        nodes = [self.node_of(t, t._version) for _, t in tree.flatten(outputs)]
        self.graph.output(nodes)
        return nodes

    def mark_grads(self) -> None:
        """After backward: note on each value node whether a gradient reached it."""
        for node in self.graph.nodes:
            if node.name in self.values:
                node.meta[GRAD] = "recorded" if node.name in self.grads else "none"


def _identifier(path: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in path) or "x"


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, meta...
        return None


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, slice):
        return _tensors((obj.start, obj.stop, obj.step))
    return []


_WRITE_RULES: dict[Any, Any] = {}
# Running statistics are written without a version bump, so they are named here: positions in
# the builtins (input, weight, bias, running_mean, running_var, ...).
_RUNNING_STATS = {torch.batch_norm: (3, 4), torch.instance_norm: (3, 4), torch.native_batch_norm: (3, 4)}


@dataclasses.dataclass(frozen=True)
class _WriteRule:
    """Which arguments a call may write: ``(position, keyword)`` pairs, all tensors, or only when
    its ``inplace`` flag (at ``flag``) is set."""

    args: tuple[tuple[int, str], ...] = ()
    every: bool = False
    flag: int | None = None


def _write_rule(func: Any) -> _WriteRule | None:
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        schema = getattr(func, "_schema", None)
        mutable = schema is None or any(a.alias_info is not None and a.alias_info.is_write
                                        for a in schema.arguments)
        return _WriteRule(every=True) if mutable else None
    if func in _RUNNING_STATS:
        return _WriteRule(args=tuple((i, "") for i in _RUNNING_STATS[func]))
    name = getattr(func, "__name__", "")
    if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")
                                    and name not in _NOT_WRITES):
        return _WriteRule(args=((0, "input"),))
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    stats = tuple((params.index(p), p) for p in ("running_mean", "running_var") if p in params)
    if stats:
        return _WriteRule(args=stats)
    if "inplace" in params:
        return _WriteRule(args=((0, params[0]),), flag=params.index("inplace"))
    return None


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Tensors that ``func(*args, **kwargs)`` may write to (a superset of what it writes)."""
    try:
        rule = _WRITE_RULES[func]
    except KeyError:
        rule = _WRITE_RULES[func] = _write_rule(func)
    except TypeError:
        rule = _write_rule(func)
    out = kwargs.get("out")
    written = _tensors(out) if out is not None else []
    if rule is None:
        return written
    if rule.every:
        return written + _tensors((args, kwargs))
    if rule.flag is not None and not (kwargs.get("inplace") is True
                                      or (len(args) > rule.flag and args[rule.flag] is True)):
        return written
    for position, keyword in rule.args:
        written += _tensors(args[position] if len(args) > position else kwargs.get(keyword))
    return written


def _to_fx(obj: Any, node_of: Callable[[torch.Tensor], torch.fx.Node]) -> Any:
    """``obj`` with tensors replaced by their nodes and non-graph objects by their repr."""
    kind = type(obj)
    if kind in _CONST_TYPES:
        return obj
    if isinstance(obj, torch.Tensor):
        return node_of(obj)
    if kind is tuple or kind is list:
        return kind(_to_fx(v, node_of) for v in obj)
    if isinstance(obj, tuple):  # torch.Size, namedtuples
        return tuple(_to_fx(v, node_of) for v in obj)
    if isinstance(obj, list):
        return [_to_fx(v, node_of) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_fx(v, node_of) for k, v in obj.items()}
    if isinstance(obj, _CONST_TYPES):
        return obj
    if isinstance(obj, slice):
        return slice(*(_to_fx(v, node_of) for v in (obj.start, obj.stop, obj.step)))
    if obj is Ellipsis:
        return obj
    text = repr(obj)
    return text if len(text) < 200 else f"<{type(obj).__name__}>"


def _without_dropout(func, args, kwargs):
    """(args, kwargs, skip): dropout calls become identities; attention dropout goes to 0."""
    if func in _DROPOUT:
        return args, kwargs, True
    if func is F.scaled_dot_product_attention:
        if len(args) > 4:
            return args[:4] + (0.0,) + args[5:], kwargs, False
        return args, {**kwargs, "dropout_p": 0.0}, False
    if func is F.multi_head_attention_forward:
        return args, {**kwargs, "training": False}, False
    return args, kwargs, False


class NoDropout(TorchFunctionMode):
    """Run a model with dropout disabled, as the recorder does in train mode, recording nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs, skip = _without_dropout(func, args, kwargs or {})
        if skip:
            return args[0] if args else kwargs["input"]
        return func(*args, **kwargs)


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Restore the model's tensors, grads, train/eval flags and all RNG states on exit.

    Parameters and buffers are put back as objects (one re-registered during the run is replaced
    by the original, one added is removed) and by value. Yields the copies taken on entry, by
    ``id`` of the tensor; they are not changed afterwards.
    """
    modules = list(model.modules())
    slots = [(m, dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set)) for m in modules]
    tensors = {id(t): t for _, p, b, _ in slots for t in (*p.values(), *b.values()) if t is not None}
    saved = {k: t.detach().clone() for k, t in tensors.items()}
    grads = [(p, p.grad) for p in model.parameters()]
    training = [(m, m.training) for m in modules]
    rng = _rng_state()
    try:
        yield saved
    finally:
        for m, params, buffers, non_persistent in slots:
            if not (_same(m._parameters, params) and _same(m._buffers, buffers)):
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)
            m._non_persistent_buffers_set = non_persistent
        with torch.no_grad():
            for k, t in tensors.items():
                t.copy_(saved[k])
        for p, g in grads:
            p.grad = g
        for m, flag in training:
            m.training = flag
        _set_rng_state(rng)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: a run creates many graph objects, none of them cyclic
    garbage, and collections triggered by them would scan the whole heap again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _same(now: dict, before: dict) -> bool:
    return now.keys() == before.keys() and all(now[k] is v for k, v in before.items())


def _rng_state():
    state = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy
        numpy.random.set_state(state["numpy"])


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def random_cotangent_loss(outputs: Any, seed: int) -> torch.Tensor:
    """``sum_i sum(out_i * R_i) / sqrt(numel_i)`` over floating outputs, ``R_i`` seeded by position.

    Unlike ``mean()``, a random cotangent gives every element a different gradient, so an op whose
    outputs sum to a constant (softmax) still passes a non-zero gradient back. With no such output
    (nothing requires grad) it is a constant zero, and the run records values only.
    """
    total = None
    for i, (_, t) in enumerate(tree.flatten(outputs)):
        if not (t.is_floating_point() or t.is_complex()) or not t.requires_grad:
            continue
        gen = torch.Generator().manual_seed(seed * 1000003 + i)
        r = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
        term = (t * r).sum() / math.sqrt(max(t.numel(), 1))
        total = term if total is None else total + term
    return total if total is not None else torch.zeros((), dtype=torch.float64)


def objective(loss: Loss | None, outputs: Any, seed: int) -> torch.Tensor:
    """The scalar that backward starts from: ``loss(outputs)``, or the seeded random cotangent."""
    value = loss(outputs) if loss is not None else random_cotangent_loss(outputs, seed)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError("the loss must return a scalar tensor")
    return value


def clone_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Private copies of the call's tensors (same ``requires_grad``), so the run cannot alter the caller's."""
    def fresh(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(t.requires_grad)
    return tree.map_tensors(tuple(args), fresh), tree.map_tensors(dict(kwargs), fresh)


def check_mode(mode: str, tracer: str) -> None:
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', not {mode!r}")
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {', '.join(TRACERS)}, not {tracer!r}")


def record(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
           loss: Loss | None = None, seed: int = 0, mode: str = "eval", keep_dropout: bool = False,
           meta: dict | None = None, tracer: str = "eager", recorder: type[Recorder] = Recorder) -> Capture:
    """Run ``model(*args, **kwargs)`` forward and backward once and record it as a ``Capture``.

    ``loss`` maps the model output to a scalar (default: ``random_cotangent_loss``). In ``train``
    mode dropout is disabled unless ``keep_dropout``. The model's tensors, grads, train/eval flags
    and every RNG state are left exactly as they were. ``tracer="fx"`` records the graph that
    ``torch.fx.symbolic_trace`` gives instead (see ``record_fx``); ``recorder`` is the eager
    tracer's ``Recorder`` class.
    """
    check_mode(mode, tracer)
    if tracer == "fx":
        from .record_fx import record_fx
        return record_fx(model, args, kwargs, loss=loss, seed=seed, mode=mode, keep_dropout=keep_dropout,
                         meta=meta)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        run = _run_eager(model, args, dict(kwargs or {}), loss, seed, mode, keep_dropout, recorder, copy=False)
    except Aliased:
        run = _run_eager(model, args, dict(kwargs or {}), loss, seed, mode, keep_dropout, recorder, copy=True)
    return assemble(model, run, tracer="eager", mode=mode, seed=seed, keep_dropout=keep_dropout,
                    started=started, meta=meta)


@dataclasses.dataclass
class Run:
    """What one recorded run produced, before it becomes a ``Capture``."""

    recorder: Recorder
    inputs: Any              # {"args": [...], "kwargs": {...}} with Slots for tensors
    outputs: Any             # the output structure with Slots for tensors
    params: dict[str, torch.Tensor]
    param_grads: dict[str, torch.Tensor]
    loss_value: float


def _run_eager(model, args, kwargs, loss, seed, mode, keep_dropout, recorder_cls, copy) -> Run:
    with gc_paused(), preserved_state(model) as before:
        model.train(mode == "train")
        seed_everything(seed)
        for p in model.parameters():
            p.grad = None
        call_args, call_kwargs = clone_call(args, kwargs)
        rec = recorder_cls(model, disable_dropout=mode == "train" and not keep_dropout, copy=copy)
        run = record_run(model, rec, call_args, call_kwargs,
                         lambda a=call_args, k=call_kwargs: model(*a, **k), loss, seed, before)
        del call_args, call_kwargs
        rec.release()
    return run


def record_run(model: torch.nn.Module, rec: Recorder, call_args: tuple, call_kwargs: dict,
               forward: Callable[[], Any], loss: Loss | None, seed: int, before: dict[int, torch.Tensor],
               check: Callable[[Any], None] | None = None) -> Run:
    """Run ``forward()`` under ``rec``, then the loss and backward: the core every tracer shares.

    ``check(outputs)`` may refuse the run before it is kept. The caller drops its own references to
    the call and then calls ``rec.release()``.
    """
    call = {"args": call_args, "kwargs": call_kwargs}
    placeholders = {id(t): rec.add_input(path.removeprefix("kwargs."), t).name
                    for path, t in tree.flatten(call)}
    try:
        with torch.enable_grad(), rec:
            outputs = forward()
        out_nodes = iter(rec.finish(outputs))
        value = objective(loss, outputs, seed)
        if value.requires_grad:
            value.backward()
        rec.mark_grads()
    finally:
        rec.remove_hooks()
    if check is not None:
        check(outputs)
    return Run(rec, inputs=tree.plain(call, lambda t: Slot(placeholders[id(t)])),
               outputs=tree.plain(outputs, lambda t: Slot(next(out_nodes).name)),
               params=model_tensors(model, before), param_grads=taken_grads(model),
               loss_value=float(value.detach().double()))


def model_tensors(model: torch.nn.Module, before: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's parameters as the run used them (``before``: copies from ``preserved_state``) and
    copies of its buffers as the run left them (batch norm's running statistics), by name."""
    params = {n: before[id(p)] if id(p) in before else p.detach().clone() for n, p in model.named_parameters()}
    params.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return params


def taken_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The run's parameter gradients; the caller puts the model's own ``.grad`` back afterwards."""
    return {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}


def assemble(model: torch.nn.Module, run: Run, *, tracer: str, mode: str, seed: int, keep_dropout: bool,
             started: datetime.datetime, meta: dict | None) -> Capture:
    """The ``Capture`` of a finished run, its slots filled and its metadata written."""
    rec = run.recorder
    graph_nodes = {n.name: n for n in rec.graph.nodes}

    def fill(slot: Slot) -> torch.Tensor:
        if slot.node in rec.values:
            return rec.values[slot.node]
        return run.params[str(graph_nodes[slot.node].target)]  # a parameter returned as is

    ops = sum(1 for n in rec.graph.nodes if n.op == "call_function")
    first = next(iter(run.params.values()), None)
    info = {
        "fxdiff": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tracer": tracer,
        "mode": mode,
        "seed": seed,
        "keep_dropout": keep_dropout,
        "loss_value": run.loss_value,
        "device": str(first.device) if first is not None else "cpu",
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "started": started.isoformat(timespec="seconds"),
        "ops": ops,
        "modules": {path: type(m).__name__ for path, m in model.named_modules()},
        **(meta or {}),
    }
    return Capture(graph=rec.graph, values=rec.values, grads=rec.grads, params=run.params,
                   param_grads=run.param_grads, inputs=tree.map_leaves(run.inputs, Slot, fill),
                   outputs=tree.map_leaves(run.outputs, Slot, fill), meta=info)
