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
import functools
import inspect
import math
import operator
import re
import types
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import tree
from ..model.capture import BOUNDARY, DTYPE, GRAD, MODULE, MODULE_TYPE, NO_GRAD, NOT_STORED, SHAPE, TARGET, VMAP_DIMS
from ..ops import DEFAULT_OPS, RANDOM_OPS, node_key
from ..store.device_summary import DeviceSummaries
from ..store.summary import is_summary, summarise
from ..targets import mutated, target_name
from ..util import dtype_name, tensor_version
from .plain import as_plain, is_plain, transformed, unbatched

_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
            F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout, torch.feature_dropout,
            torch.feature_alpha_dropout}
# Random ops besides dropout: draws return new tensors, fills write into their first argument.
_DRAWS = {torch.rand, torch.randn, torch.rand_like, torch.randn_like, torch.randint, torch.randint_like,
          torch.randperm, torch.bernoulli, torch.Tensor.bernoulli, torch.multinomial, torch.Tensor.multinomial,
          torch.normal, torch.poisson}
_FILLS = {torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.bernoulli_, torch.Tensor.random_,
          torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_, torch.Tensor.log_normal_}
RANDOM_CALL = "fxdiff_random_call"   # node.meta: k for the run's k-th random call (from 0)
REPLAYED = "fxdiff_replayed"         # node.meta: True when that call took the reference's draw
_ALPHA = 1.7580993408473766          # SELU's alpha, as alpha dropout uses it
_CONST_TYPES = (type(None), bool, int, float, complex, str, torch.dtype, torch.device,
                torch.layout, torch.memory_format)
_CONST_KINDS = frozenset(_CONST_TYPES)
_INPLACE_DUNDERS = {"__setitem__", "__set__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                    "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                    "__ilshift__", "__irshift__", "__imatmul__"}
_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "record_stream"}
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


@functools.cache
def _storage_base_uses() -> int:
    """Uses a live tensor's storage reports beyond the tensor itself, counted as ``release`` counts:
    1 on torch 2.13, which keeps the Python storage object alive with the storage; 0 on torch 2.9."""
    if _storage_use_count is None:
        return 0
    t = torch.empty(1)
    return _storage_use_count(t.untyped_storage()._cdata) - 1


class Aliased(Exception):
    """A value or gradient held by reference was overwritten by a write the recorder did not foresee."""


class _Live:
    """What the recorder knows about a live tensor: its node, version, whether it is hooked, and
    the handle of the hook that stores its gradient."""

    __slots__ = ("ref", "node", "version", "hooked", "handle")

    def __init__(self, tensor: torch.Tensor, node: torch.fx.Node, hooked: bool):
        self.ref = weakref.ref(tensor)
        self.node = node
        self.version = tensor_version(tensor)
        self.hooked = hooked
        self.handle = None


@dataclasses.dataclass(frozen=True)
class Slot:
    """Placeholder for a recorded tensor inside an input/output structure, filled after the run."""

    node: str


@dataclasses.dataclass(frozen=True)
class Keep:
    """What a recorder keeps (``capture --keep`` / ``--modules``).

    ``values`` and ``grads``: ``"full"`` (the tensors), ``"summary"`` (statistics, a sample and a
    hash: ``store.summary``) or ``"none"`` (gradients only). ``modules``: a regular expression;
    when given, only ops inside a module whose path (or an enclosing module's path) matches it in
    full are kept. The model still runs whole; a tensor made outside and used inside becomes a
    placeholder named by the node that produced it, holding its value and gradient in full.
    Graph inputs are always kept in full, and so are the values of the outputs.
    """

    values: str = "full"
    grads: str = "full"
    modules: re.Pattern | None = None

    MODES = {"both": ("full", "full"), "values": ("full", "none"), "grads": ("summary", "full"),
             "summary": ("summary", "summary")}
    OUTPUT_BYTES = 64 << 20

    @classmethod
    def of(cls, keep: str = "both", modules: str | None = None) -> "Keep":
        values, grads = cls.MODES[keep]
        return cls(values, grads, re.compile(modules) if modules else None)

    @property
    def everything(self) -> bool:
        return self.values == self.grads == "full" and self.modules is None

    def whole_outputs(self, outputs: Any) -> bool:
        """Whether the tensors of ``outputs`` and their gradients are kept whole."""
        if self.grads != "summary":
            return True
        return sum(t.numel() * t.element_size() for _, t in tree.flatten(outputs)) <= self.OUTPUT_BYTES

    def inside(self, path: str) -> bool:
        """Whether module ``path``, or a module enclosing it, matches ``modules``."""
        if self.modules is None:
            return True
        parts = path.split(".") if path else []
        return any(self.modules.fullmatch(".".join(parts[:i])) for i in range(len(parts), 0, -1)) \
            or bool(self.modules.fullmatch(""))


_OUTSIDE = "_fxdiff_outside"     # node.meta: made outside the kept modules (dropped when the capture is made)


class Recorder(TorchFunctionMode):
    """A ``TorchFunctionMode`` that builds an FX graph of the torch calls it sees.

    Subclass and override ``record_call`` to change what becomes a node; pass the subclass to
    ``record(recorder=...)``. ``copy=True`` copies every value and gradient when it is produced.
    ``replay`` maps k to the reference's draw for the run's k-th random call (see ``reference_draw``).
    """

    def __init__(self, model: torch.nn.Module, *, disable_dropout: bool, copy: bool = False):
        super().__init__()
        self.graph = torch.fx.Graph()
        self.values: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.disable_dropout = disable_dropout
        self.copy = copy
        self.failed_op: BaseException | None = None   # an exception raised by one of the model's ops
        self._live: dict[int, _Live] = {}
        self._stack: list[tuple[str, str]] = [("", type(model).__name__)]
        self._frozen: dict[int, str] = {}   # id -> qualified name of parameters and buffers
        self._shared: dict[int, list[str]] = {}  # storage address -> values held by reference there
        self._held: dict[str, int] = {}      # value held by reference -> its version when produced
        self._grad_versions: dict[str, int] = {}
        self._names: dict[Any, tuple[str, str]] = {}
        self._n_const = 0
        # values made inside torch.vmap: (the tensor behind, the stored view's layout, the node)
        self._batched: list[tuple[weakref.ref, tuple, torch.fx.Node]] = []
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            self._frozen.setdefault(id(t), name)
        # every path of every module: one object reused in several places (a shared activation)
        # is named by the call site, the path that extends the caller's
        self._paths: dict[int, list[str]] = {}
        self._types: dict[int, str] = {}
        for path, m in model.named_modules(remove_duplicate=False):
            if path:
                self._paths.setdefault(id(m), []).append(path)
                self._types[id(m)] = type(m).__name__
        self._hooks: list[Any] = []
        self._entered: set[str] = set()   # modules whose forward ran
        self.replay: dict[int, torch.Tensor] = {}
        self.random_calls = 0

    def __enter__(self):
        """Start recording: module hooks are registered here and removed on exit, whatever happens."""
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
                       torch.nn.modules.module.register_module_forward_hook(self._leave, always_call=True)]
        try:
            return super().__enter__()
        except BaseException:
            self._remove_hooks()
            raise

    def __exit__(self, exc_type, exc, tb):
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- module paths -------------------------------------------------------------------------
    def _enter(self, module, args):
        paths = self._paths.get(id(module))
        if paths is not None:
            path = paths[0] if len(paths) == 1 else _call_site(paths, self._stack[-1][0])
            self._stack.append((path, self._types[id(module)]))
            self._entered.add(path)

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

    # -- values held by reference -------------------------------------------------------------
    keep: Keep = Keep()          # set by ``restrict`` before the run
    output_values: dict | None = None
    stream: Any = None           # store.stream.CaptureStream: values and gradients go to disk as produced

    def restrict(self, keep: Keep, stream: Any = None) -> None:
        """Keep only what ``keep`` asks for; with ``stream``, write values and gradients to it as
        they are produced instead of holding them (call before the run)."""
        self.keep = keep
        self.stream = stream
        self.output_values = {}
        self._outside_refs: dict[str, weakref.ref] = {}

    def keep_outputs(self, nodes: list[torch.fx.Node], outputs: Any, whole: bool = True) -> None:
        """The outputs' values in full, for the nodes whose values are not kept, and with ``whole``
        for those whose values are summarised."""
        if self.keep.everything and self.stream is None:
            return
        for node, (_, t) in zip(nodes, tree.flatten(outputs)):
            value = self.values.get(node.name)
            if not isinstance(value, torch.Tensor) or (is_summary(value) and whole) or value.device.type == "meta":
                self.output_values[node.name] = t.detach()
            if self._outside_refs.pop(node.name, None) is not None and self.keep.grads != "none" \
                    and t.requires_grad and transformed(t) is None:   # made outside: its gradient too
                try:
                    t.register_hook(self._store_grad(node.name))
                except RuntimeError:
                    pass

    _device_summaries: DeviceSummaries | None = None

    def summarise(self, t: torch.Tensor, content: bool = False):
        """The summary of ``t``: computed on its GPU without waiting for it (completed by
        ``finish_summaries``), or on the CPU; with ``content``, a parameter's (which holds the hash
        that pairs parameters)."""
        if t.device.type != "cuda":
            return summarise(t, content)
        if self._device_summaries is None:
            self._device_summaries = DeviceSummaries()
        return self._device_summaries.add(t, content)

    def summarise_param(self, t: torch.Tensor):
        return self.summarise(t, content=True)

    def finish_summaries(self) -> None:
        """Complete the summaries of GPU tensors (one wait for the GPU): call after backward."""
        if self._device_summaries is not None:
            self._device_summaries.finish()

    def _keep(self, name: str, t: torch.Tensor, copy: bool, summary: bool = False, stream: bool = False) -> None:
        if summary:
            self.values[name] = self.summarise(t)
            return
        if stream:   # to the capture file: held only until the stream has copied it
            self.stream.put(f"value/{name}", t, defer=not copy)
            self.values[name] = _stand_in(t)
            return
        value = t.detach()
        key = None if copy else _storage_key(value)
        if key is None:
            value = value.clone()
        else:
            self._shared.setdefault(key, []).append(name)
            self._held[name] = value._version
        self.values[name] = value

    before_frozen_write: Callable[[], None] | None = None   # called before a write to a parameter or buffer

    def protect(self, tensors: list[torch.Tensor]) -> None:
        """Copy the values held by reference that share storage with ``tensors``, before a write."""
        if self.stream is not None:
            self.stream.protect(tensors)
        if self.before_frozen_write is not None and any(id(t) in self._frozen for t in tensors):
            self.before_frozen_write()
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
        if self.stream is not None:
            overwritten = self.stream.settle()
            if overwritten is not None:
                raise Aliased(overwritten)
        for name, version in self._grad_versions.items():
            if self.grads[name]._version != version:
                raise Aliased(f"gradient of {name}")
        for key, names in self._shared.items():
            values = [self.values[n] for n in names]
            if any(v._version != self._held[n] for n, v in zip(names, values)):
                raise Aliased(names[0])
            ours = len({id(v) for v in values}) + _storage_base_uses()
            if _storage_use_count is None or _storage_use_count(values[0].untyped_storage()._cdata) > ours:
                for n, v in zip(names, values):
                    self.values[n] = v.clone()
        self._shared.clear()
        self._held.clear()

    # -- nodes --------------------------------------------------------------------------------
    def _new_node(self, op: str, target: Any, args: tuple, kwargs: dict, name: str,
                  module: tuple[str, str] | None = None) -> torch.fx.Node:
        # args go in after: create_node walks them with pytree, looking for symbolic ints (an eager
        # run has none), which costs more than the rest of recording an op
        node = self.graph.create_node(op, target, (), kwargs, name=name)
        if args:
            node.args = args
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

    def hold(self, node: torch.fx.Node, t: torch.Tensor, copy: bool | None = None) -> None:
        """Make ``node`` the producer of ``t`` and keep its value (an extension point: a subclass can
        look at every value as it is produced)."""
        copy = self.copy if copy is None else copy
        node.meta[SHAPE] = list(t.shape)
        node.meta[DTYPE] = dtype_name(t.dtype)
        if node.op == "call_function" and not torch.is_grad_enabled() and not t.requires_grad:
            node.meta[NO_GRAD] = True   # no gradient can reach it
        keep = self.keep
        if not keep.everything:
            if node.op == "call_function" and not keep.inside(node.meta[MODULE]):
                node.meta[_OUTSIDE] = True   # no value, no gradient; a placeholder if used inside
                self._outside_refs[node.name] = weakref.ref(t)
                self._live[id(t)] = _Live(t, node, hooked=True)
                return
            if keep.modules is not None:
                self._keep_boundary(node)
        summary = keep.values == "summary" and node.op == "call_function"
        stream = self.stream is not None and node.op == "call_function"
        stored = True
        plain = is_plain(t)
        batched = None if plain else unbatched(t)
        if plain:
            self._keep(node.name, t, copy, summary, stream)
        elif batched is not None:   # inside torch.vmap: every sample's value, the vmap dims first
            value, node.meta[VMAP_DIMS] = batched
            node.meta[SHAPE] = list(value.shape)
            behind = value._base if value._base is not None else value
            self._batched.append((weakref.ref(behind), _layout(value), node))
            self._keep(node.name, value, True, summary, stream)
        else:  # sparse, quantized, a subclass: kept as a plain tensor; meta...: not kept
            value, why = as_plain(t)
            if value is None:
                node.meta[NOT_STORED] = why
                stored = False
            else:
                self._keep(node.name, value, copy, summary, stream)
        # no value, no gradient: no hook either; none when gradients are not kept
        live = _Live(t, node, hooked=not stored or (keep.grads == "none" and node.op == "call_function"))
        self._live[id(t)] = live
        self._watch(live, t, plain)

    def _keep_boundary(self, node: torch.fx.Node) -> None:
        """Keep, in full, the values made outside the kept modules that ``node`` consumes (looking
        through the multi-output op whose item ``node`` is)."""
        inputs = list(node.all_input_nodes)
        for a in list(inputs):
            if a.op == "call_function" and a.name not in self.values and _OUTSIDE not in a.meta:
                inputs += a.all_input_nodes   # the op of a getitem, which holds no value itself
        for a in inputs:
            ref = self._outside_refs.pop(a.name, None)
            t = ref() if ref is not None else None
            if t is None:
                continue
            value = t if is_plain(t) else as_plain(t)[0]
            if value is None:
                continue
            a.meta[BOUNDARY] = a.meta.get(TARGET, "")
            self._keep(a.name, value, self.copy, stream=self.stream is not None)
            if self.keep.grads != "none" and t.requires_grad and transformed(t) is None:
                try:
                    t.register_hook(self._store_grad(a.name))
                except RuntimeError:
                    pass

    def _watch(self, live: _Live, t: torch.Tensor, plain: bool = False) -> None:
        if not live.hooked and t.requires_grad and (plain or transformed(t) is None):
            try:
                live.handle = t.register_hook(self._store_grad(live.node.name))
            except RuntimeError:   # a tensor that cannot take hooks: its gradient is not recorded
                pass
            live.hooked = True
            # made with autograd off, it requires grad now: the output of a custom autograd.Function's
            # forward (BLOOM's GeLUFunction), which apply() hands on as the Function's output
            live.node.meta.pop(NO_GRAD, None)

    def _watch_base(self, tensors: list[torch.Tensor]) -> None:
        """Before an in-place write to views: a view's hook never fires once it is written to (the
        write moves the view elsewhere in autograd's graph, through its base), so the gradient of
        the value it held is taken from its base's, whose hooks get the gradient of the base as it
        was before the write, and viewed as the view was (``Tensor._view_func``)."""
        for t in tensors:
            live = self._live.get(id(t))
            if live is None or live.ref() is not t or live.handle is None or t._base is None:
                continue
            view = getattr(t, "_view_func", None)   # torch >= 2.1
            if view is None:
                continue
            store = self._store_grad(live.node.name)

            def from_base(grad: torch.Tensor, view=view, store=store) -> None:
                try:
                    grad = view(grad)
                except (RuntimeError, NotImplementedError):   # a view torch cannot replay: not recorded
                    return
                store(grad)
            try:
                t._base.register_hook(from_base)
            except RuntimeError:   # a base that cannot take hooks: the gradient is not recorded
                continue
            live.handle.remove()
            live.handle = None

    def _store_grad(self, name: str):
        def store(grad):
            plain = is_plain(grad)
            if not plain:
                grad, _ = as_plain(grad)
                if grad is None:
                    return
            if self.keep.grads == "summary":
                self.grads[name] = self.summarise(grad)
                return
            if self.stream is not None:
                self.stream.verify()
                self.stream.put(f"grad/{name}", grad, defer=not self.copy)
                self.grads[name] = _stand_in(grad)
                return
            if plain:
                if self.copy:
                    grad = grad.detach().clone()
                else:
                    self._grad_versions[name] = grad._version
            self.grads[name] = grad
        return store

    def add_input(self, path: str, t: torch.Tensor) -> torch.fx.Node:
        """Add a graph input (placeholder) for tensor ``t`` found at ``path`` in the call."""
        node = self._new_node("placeholder", path, (), {}, name=_identifier(path), module=self._stack[0])
        self.hold(node, t)
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
                self.hold(node, t)
                return node
            self._watch(live, t)
            return live.node
        if id(t) in self._frozen:
            name = self._frozen[id(t)]
            owner = name.rpartition(".")[0]
            node = self._new_node("get_attr", name, (), {}, name=_identifier(name), module=(owner, ""))
            node.meta[SHAPE] = list(t.shape)
            node.meta[DTYPE] = dtype_name(t.dtype)
            if not is_plain(t):
                value, why = as_plain(t)
                if value is None:
                    node.meta[NOT_STORED] = why
            self._live[id(t)] = _Live(t, node, hooked=True)
            return node
        node = self._vmap_edge(t)
        if node is not None:
            return node
        self._n_const += 1
        node = self._new_node("get_attr", f"_fxdiff_constant_{self._n_const}", (), {}, name="constant")
        self.hold(node, t, copy=True)  # made outside the run, so it may change outside it
        return node

    def _vmap_edge(self, t: torch.Tensor) -> torch.fx.Node | None:
        """The node of a tensor that crosses a ``torch.vmap`` boundary, or None for any other.

        Coming out, a tensor is the memory of a value made inside, its dims in another order (the
        batch dim moved to ``out_dims``) and broadcast over the levels the value did not depend
        on: ``permute``, ``reshape`` and ``expand`` nodes after that value's node. Going in, a
        batched tensor wraps a value of the run: a ``movedim`` of its node (the batch dim to the
        front). Either way the values inside stay connected to the ops that made and use them.
        """
        batched = unbatched(t)
        value = batched[0] if batched is not None else t
        layout = _layout(value)
        for ref, inside, node in reversed(self._batched):
            moves = _moves(inside, layout) if ref() is not None else None
            if moves is not None:
                order, kept = moves
                with torch._C.DisableTorchFunction():   # views of t: the values of the steps
                    narrowed = value[tuple(slice(None) if k else slice(0, 1) for k in kept)]
                    steps = [(torch.permute, order, narrowed.reshape([n for n, k in zip(value.shape, kept) if k]
                                                                      + [1] * (len(order) - sum(kept)))),
                             (torch.reshape, list(narrowed.shape), narrowed),
                             (torch.Tensor.expand, list(value.shape), value)]
                needed = [order != sorted(order), narrowed.shape != steps[0][2].shape, value.shape != narrowed.shape]
                for (op, arg, v), need in zip(steps, needed):
                    if need or (op is torch.permute and not any(needed)):   # at least one node
                        node = self._new_node("call_function", op, (node, arg), {}, name="vmap_out")
                        self.hold(node, t if v is value else v)
                return node
        if batched is None:
            return None
        functorch = torch._C._functorch
        inner, b = functorch.get_unwrapped(t), functorch.maybe_get_bdim(t)
        outer = unbatched(inner)
        k = outer[1] if outer is not None else 0
        source = self.node_of(inner, inner._version)
        node = self._new_node("call_function", torch.movedim, (source, k + b, k), {}, name="vmap_in")
        self.hold(node, t)
        return node

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.disable_dropout:
            args, kwargs, skip = _without_dropout(func, args, kwargs)
            if skip:
                return args[0] if args else kwargs["input"]
        if _is_random(func, args, kwargs):
            return self._random_call(func, args, kwargs)
        if torch.is_inference_mode_enabled():   # autograd sees none of it: its results are constants to the run
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention and _attention_dropout(args, kwargs) and not _runs_again():
            # its dropout draws inside the kernel, where they can be neither recorded nor replayed: the
            # same attention written out, recorded op by op, its dropout an F.dropout
            return self._op_by_op(_attention, args, kwargs)
        if func in _WRITTEN_OUT:
            written = _written_out(func)
            if written is not None:
                return self._op_by_op(written, args, kwargs)
        return self.call(func, args, kwargs)

    def _op_by_op(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """Run ``fn`` (plain Python over torch functions) with its ops recorded one by one: the
        mode alone entered again, the module hooks being in place already."""
        TorchFunctionMode.__enter__(self)
        try:
            return fn(*args, **kwargs)
        finally:
            TorchFunctionMode.__exit__(self, None, None, None)

    def _random_call(self, func, args: tuple, kwargs: dict) -> Any:
        """Run and record the run's next random call, with the reference's draw when ``replay`` has it."""
        k, draw = self.random_calls, self.replay.get(self.random_calls)
        self.random_calls += 1
        out = self.call(func, args, kwargs, None if draw is None else lambda: _replayed(func, draw, args, kwargs))
        live = self._live.get(id(out)) if isinstance(out, torch.Tensor) else None
        if live is not None and live.ref() is out:
            live.node.meta[RANDOM_CALL] = k
            if draw is not None and draw.shape == out.shape:
                live.node.meta[REPLAYED] = True
        return out

    def call(self, func, args: tuple, kwargs: dict, run: Callable[[], Any] | None = None) -> Any:
        """Run ``func`` (or ``run()`` in its place) and record it as ``func``."""
        if self.stream is not None:
            self.stream.verify()
        inputs = _arg_tensors(args, kwargs)
        versions = _versions(inputs)
        written = _written(func, args, kwargs)
        if written:
            self.protect(written)
            self._watch_base(written)
        try:
            out = func(*args, **kwargs) if run is None else run()
        except BaseException as e:
            self.failed_op = e
            raise
        self.record_call(func, args, kwargs, out, inputs, versions)
        return out

    def record_call(self, func, args, kwargs, out, inputs, versions) -> None:
        """Turn one finished call into graph nodes (none for calls that yield no new tensor)."""
        outs = tree.flatten(out) if not isinstance(out, torch.Tensor) else [("0", out)]
        in_ids = {id(t): i for i, t in enumerate(inputs)}
        now = _versions(inputs)
        produced = []
        for path, t in outs:
            i = in_ids.get(id(t))
            if i is None or now[i] != versions[i]:
                produced.append((path, t))
        for i, t in enumerate(inputs):  # inputs changed in place but not returned (setitem, out=)
            if now[i] != versions[i] and id(t) not in self._frozen \
                    and all(t is not o for _, o in outs):
                produced.append((f"mutated.{i}", t))
        if not produced:
            return
        before = dict(zip(map(id, inputs), versions))
        node_of = lambda t: self.node_of(t, before[id(t)])  # noqa: E731
        fx_args = tuple([_to_fx(a, node_of) for a in args])
        fx_kwargs = {str(k): _to_fx(v, node_of) for k, v in kwargs.items()}
        name = self._name(func)[1]
        node = self._new_node("call_function", func, fx_args, fx_kwargs, name=name)
        if len(produced) == 1 and (produced[0][1] is out or not outs):
            self.hold(node, produced[0][1])
            self._sync_base(produced[0][1], node, in_ids)
            return
        for path, t in produced:
            index = int(path) if path.isdigit() else path
            item = self._new_node("call_function", operator.getitem, (node, index), {}, name=f"{name}_out")
            item.meta[MODULE], item.meta[MODULE_TYPE] = node.meta[MODULE], node.meta[MODULE_TYPE]
            self.hold(item, t)
            self._sync_base(t, item, in_ids)

    def _sync_base(self, t: torch.Tensor, node: torch.fx.Node, in_ids: dict[int, int]) -> None:
        """After an in-place write to a view, give its (live) base a ``mutated`` node fed by the write."""
        base = t._base
        if base is None or id(t) not in in_ids:
            return
        live = self._live.get(id(base))
        if live is None or live.ref() is not base or live.version == tensor_version(base):
            return
        item = self._new_node("call_function", mutated, (live.node, node), {}, name="mutated")
        self.hold(item, base)

    def finish(self, outputs: Any) -> list[torch.fx.Node]:
        """Add the output node over the tensors of ``outputs``; return the nodes, in leaf order."""
        nodes = [self.node_of(t, tensor_version(t)) for _, t in tree.flatten(outputs)]
        self.graph.output(nodes)
        if self.keep.modules is None:   # what --modules keeps was decided by the paths as they were
            self._place_methods()
        return nodes

    def _place_methods(self) -> None:
        """Attribute to a module whose forward never ran the ops that read its parameters or buffers
        (directly or through a view, ``embed.t()``): a method other than ``forward`` (EnCodec's
        ``quantizer.encode``) runs no module hook, so its ops were the caller's."""
        types = {path: self._types[i] for i, paths in self._paths.items() for path in paths}
        owner_of = {n.name: n.meta[MODULE] for n in self.graph.nodes if n.op == "get_attr"}   # and views of them
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            here = node.meta[MODULE]
            owners = {owner_of[a.name] for a in node.all_input_nodes if a.name in owner_of}
            if len(owners) == 1 and len(node.all_input_nodes) == 1 and node_key(node) in DEFAULT_OPS.transparent:
                owner_of[node.name] = next(iter(owners))
            owners = {o for o in owners if o in types and o != here and o.startswith(f"{here}." if here else "")
                      and not any(p in self._entered for p in _prefixes(o, here))}
            if len(owners) == 1:
                owner = owners.pop()
                node.meta[MODULE], node.meta[MODULE_TYPE] = owner, types[owner]

    def mark_grads(self) -> None:
        """After backward: note on each value node whether a gradient reached it."""
        for node in self.graph.nodes:
            if node.name in self.values:
                node.meta[GRAD] = "recorded" if node.name in self.grads else "none"


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """What a recorder holds for a value written to the capture file: its shape and dtype, no data."""
    return _meta(t.shape, t.stride(), t.dtype)


@functools.lru_cache(maxsize=4096)
def _meta(shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")   # shared: nothing writes to it


def _layout(t: torch.Tensor) -> tuple:
    try:
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()
    except (RuntimeError, NotImplementedError, TypeError):   # no storage to compare
        return None, 0, tuple(t.shape), ()


def _moves(a: tuple, b: tuple) -> tuple[list[int], list[bool]] | None:
    """How the tensor laid out as ``b`` is made from the one laid out as ``a`` (the same memory):
    ``(order, kept)`` such that it is ``a.permute(order)``, reshaped to ``b``'s shape with 1 for
    each dim not ``kept``, then expanded to ``b``'s shape (dims ``b`` broadcasts). None if it is not."""
    (ptr, offset, shape, stride), (ptr_b, offset_b, shape_b, stride_b) = a, b
    if ptr is None or (ptr, offset) != (ptr_b, offset_b):
        return None
    free = [j for j in range(len(shape)) if shape[j] != 1]
    order, kept = [], []
    for size, step in zip(shape_b, stride_b):
        j = next((j for j in free if (shape[j], stride[j]) == (size, step)), None) if size != 1 and step else None
        if j is None and size != 1 and step:
            return None
        if j is not None:
            free.remove(j)
            order.append(j)
        kept.append(j is not None)
    if free:
        return None
    return order + [j for j in range(len(shape)) if j not in order], kept


def _call_site(paths: list[str], caller: str) -> str:
    """Of a shared module's paths, the one that extends the calling module's path the furthest."""
    def shared(path: str) -> int:
        a, b = path.split("."), caller.split(".") if caller else []
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    return max(paths, key=shared)


def _prefixes(path: str, above: str) -> list[str]:
    """The module paths from below ``above`` down to ``path`` (``a.b``, ``a.b.c`` for ``a.b.c``
    below ``a``)."""
    parts, skip = path.split("."), len(above.split(".")) if above else 0
    return [".".join(parts[:k]) for k in range(skip + 1, len(parts) + 1)]


def _identifier(path: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in path) or "x"


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, meta...
        return None


def _versions(tensors: list[torch.Tensor]) -> list[int | None]:
    """``util.tensor_version`` of each, quicker when none is an inference tensor."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        return [tensor_version(t) for t in tensors]


def _arg_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """``_tensors((args, kwargs))``, quicker for the usual flat call."""
    found = []
    for group in (args, kwargs.values()) if kwargs else (args,):
        for a in group:
            if isinstance(a, torch.Tensor):
                found.append(a)
            elif type(a) not in _CONST_KINDS:
                found += _tensors(a)
    return found


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
    if kind in _CONST_KINDS:
        return obj
    if isinstance(obj, torch.Tensor):
        return node_of(obj)
    if kind is tuple or kind is list:
        return kind([_to_fx(v, node_of) for v in obj])
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


# torch functions written in Python that hand themselves to the recorder as one op, though they are a
# whole block of a model: ``nn.MultiheadAttention``'s (its projections, attention and output
# projection, which another implementation writes as separate ops)
_WRITTEN_OUT = (F.multi_head_attention_forward,)


@functools.cache
def _written_out(fn: Callable) -> Callable | None:
    """``fn`` running its own body under the recorder: a copy whose check for a torch function
    handler (``has_torch_function``, which would hand the call to the recorder again) says no, so
    that the ops it calls are recorded instead. None where ``fn`` is not such a function."""
    if not isinstance(fn, types.FunctionType) or "has_torch_function" not in fn.__globals__:
        return None
    names = {**fn.__globals__, "has_torch_function": lambda *_: False}
    copy = types.FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _attention_dropout(args: tuple, kwargs: dict) -> float:
    """The dropout probability of an ``F.scaled_dot_product_attention`` call."""
    return float(args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0))


def _runs_again() -> bool:
    """Whether the op being recorded will run again in backward (activation checkpointing: a
    reentrant checkpoint's first forward runs without autograd, a non-reentrant one under saved-tensor
    hooks), outside the recorder: it must be recorded as it will run then."""
    if not torch.is_grad_enabled():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)   # torch's own, not public
    if top is None:
        return False
    try:
        return top(False) is not None   # (ignore_is_tracing)
    except TypeError:   # a torch whose version of it takes no argument
        return top() is not None


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, as its reference implementation in torch's documentation
    computes it, the dropout an ``F.dropout`` of the attention weights."""
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return F.dropout(torch.softmax(scores, dim=-1), dropout_p, training=True) @ value


def is_random(node: torch.fx.Node) -> bool:
    """Whether a capture node is a random op: dropout, a draw (``torch.rand``), a fill (``uniform_``)."""
    return str(node.meta.get(TARGET, node.target)).rpartition(".")[2] in RANDOM_OPS


def _dropout_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, float, bool, bool]:
    """(input, p, training, inplace) of a dropout call, ``F.dropout``'s or ``torch.dropout``'s spelling."""
    given = dict(zip(("input", "p", "training", "inplace"), args))
    given.update({"training" if k == "train" else k: v for k, v in kwargs.items()})
    training, inplace = bool(given.get("training", True)), bool(given.get("inplace", False))
    return given["input"], float(given.get("p", 0.5)), training, inplace


def _is_random(func, args: tuple, kwargs: dict) -> bool:
    """Whether this call draws random numbers (a dropout only when training with ``p > 0``)."""
    if func in _DROPOUT:
        _, p, training, _ = _dropout_args(args, kwargs)
        return training and p > 0
    return func in _DRAWS or func in _FILLS


def _alpha_scale(p: float) -> float:
    return 1 / math.sqrt((_ALPHA * _ALPHA * p + 1) * (1 - p))


def reference_draw(node: torch.fx.Node, values: dict[str, torch.Tensor],
                   grads: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What a candidate takes from the reference's random op ``node``: the value it drew, or for
    dropout its keep mask (bool) recovered from values. Where dropout's input is 0 the output is 0
    either way; there the input's gradient tells, when the dropout is its only user (elsewhere: kept,
    which changes no value). None when a value needed was not stored."""
    out = values.get(node.name)
    if out is None or "dropout" not in str(node.meta.get(TARGET, node.target)):
        return out
    source = node.args[0] if node.args else node.kwargs.get("input")
    x = values.get(source.name) if isinstance(source, torch.fx.Node) else None
    if x is None or x.shape != out.shape:
        return None
    if "alpha" in str(node.meta.get(TARGET)):
        p = float(node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5))
        a, x, out = _alpha_scale(p), x.double(), out.double()
        return (out - (x + _ALPHA * p) * a).abs() <= (out - _ALPHA * (p - 1) * a).abs()
    grad = grads.get(source.name) if len(source.users) == 1 else None
    kept_at_zero = grad != 0 if grad is not None and grad.shape == x.shape else True
    return (out != 0) | ((x == 0) & kept_at_zero)


def _replayed(func, draw: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    """Run a random call, then give it the reference's ``draw`` where the shapes agree: a dropout
    applies the reference's keep mask to its own input with its own ``p``; a fill copies the draw
    in; a draw returns it, with the op's own gradient path (straight through)."""
    if func in _DROPOUT:
        x, p, _, inplace = _dropout_args(args, kwargs)
        if draw.shape != x.shape:
            return func(*args, **kwargs)
        func(x.detach(), p, True)   # draw as the op would, so later random calls see the same RNG state
        keep = draw.to(x.device, x.dtype)
        if "alpha" in func.__name__:
            out = (x * keep + _ALPHA * (keep - 1 + p)) * _alpha_scale(p)
        else:
            out = x * (keep / (1 - p)) if p < 1 else x * 0
        return x.copy_(out) if inplace else out
    out = func(*args, **kwargs)
    if draw.shape != out.shape:
        return out
    value = draw.to(out.device, out.dtype)
    if any(out is t for t in _tensors((args, kwargs))):   # a fill, or out=: written in place
        return out.copy_(value)
    return out + (value - out).detach() if out.requires_grad else value


class NoDropout(TorchFunctionMode):
    """Run a model with dropout disabled, as the recorder does in train mode, recording nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs, skip = _without_dropout(func, args, kwargs or {})
        if skip:
            return args[0] if args else kwargs["input"]
        return func(*args, **kwargs)

