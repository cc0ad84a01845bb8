"""Record an eager model run as a ``torch.fx.Graph`` with every node's value and gradient.

The model runs as it always does, under a ``TorchFunctionMode`` that sees each torch-level call
(``F.linear``, ``Tensor.add``, ``torch.stft``...). Dataflow edges come from tensor identity, module
paths from forward pre/post hooks, gradients from tensor hooks fired by the real backward pass.
Nothing is replayed, so custom ``autograd.Function``s, tensor hooks, ``no_grad`` regions, in-place ops
and Python control flow on tensor values all record exactly what eager computes.
"""

from __future__ import annotations

import contextlib
import datetime
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

_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
            F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout, torch.feature_dropout}
_CONST_TYPES = (type(None), bool, int, float, complex, str, torch.dtype, torch.device,
                torch.layout, torch.memory_format)


def mutated(tensor: torch.Tensor) -> torch.Tensor:
    """Stand-in target for a tensor changed in place through a view, seen at its next use."""
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


class _Live:
    """What the recorder knows about a live tensor: its node, version and whether it is hooked."""

    __slots__ = ("ref", "node", "version", "hooked")

    def __init__(self, tensor: torch.Tensor, node: torch.fx.Node, hooked: bool):
        self.ref = weakref.ref(tensor)
        self.node = node
        self.version = tensor._version
        self.hooked = hooked


class Recorder(TorchFunctionMode):
    """A ``TorchFunctionMode`` that builds an FX graph of the torch calls it sees.

    Subclass and override ``record_call`` to change what becomes a node.
    """

    def __init__(self, model: torch.nn.Module, *, disable_dropout: bool):
        super().__init__()
        self.graph = torch.fx.Graph()
        self.values: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.disable_dropout = disable_dropout
        self._live: dict[int, _Live] = {}
        self._stack: list[tuple[str, str]] = [("", type(model).__name__)]
        self._frozen: dict[int, str] = {}   # id -> qualified name of parameters and buffers
        self._n_const = 0
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            self._frozen.setdefault(id(t), name)
        self._hooks = []
        for path, module in model.named_modules():
            if path:
                self._hooks.append(module.register_forward_pre_hook(self._enter(path)))
                self._hooks.append(module.register_forward_hook(self._leave, always_call=True))

    # -- module paths -------------------------------------------------------------------------
    def _enter(self, path: str):
        def hook(module, args):
            self._stack.append((path, type(module).__name__))
        return hook

    def _leave(self, module, args, output):
        if len(self._stack) > 1:
            self._stack.pop()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- nodes --------------------------------------------------------------------------------
    def _new_node(self, op: str, target: Any, args: tuple, kwargs: dict, name: str,
                  module: tuple[str, str] | None = None) -> torch.fx.Node:
        node = self.graph.create_node(op, target, args, kwargs, name=name)
        node.meta[MODULE], node.meta[MODULE_TYPE] = module or self._stack[-1]
        node.meta[TARGET] = target if isinstance(target, str) else target_name(target)
        return node

    def _hold(self, node: torch.fx.Node, t: torch.Tensor) -> None:
        """Make ``node`` the producer of ``t`` and store its value."""
        self.values[node.name] = t.detach().clone()
        node.meta[SHAPE] = list(t.shape)
        node.meta[DTYPE] = str(t.dtype).removeprefix("torch.")
        live = _Live(t, node, hooked=False)
        self._live[id(t)] = live
        self._watch(live, t)

    def _watch(self, live: _Live, t: torch.Tensor) -> None:
        if not live.hooked and t.requires_grad:
            name = live.node.name

            def store(grad, name=name):
                self.grads[name] = grad.detach().clone()
            t.register_hook(store)
            live.hooked = True

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
                node = self._new_node("call_function", mutated, (live.node,), {}, name="mutated")
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
        self._hold(node, t)
        return node

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.disable_dropout:
            args, kwargs, skip = _without_dropout(func, args, kwargs)
            if skip:
                return args[0] if args else kwargs["input"]
        inputs = _tensors((args, kwargs))
        versions = [t._version for t in inputs]
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
        name = target_name(func).rpartition(".")[2].strip("_") or "op"
        node = self._new_node("call_function", func, tuple(fx_args), fx_kwargs, name=name)
        if len(produced) == 1 and (produced[0][1] is out or not outs):
            self._hold(node, produced[0][1])
            return
        for path, t in produced:
            index = int(path) if path.isdigit() else path
            item = self._new_node("call_function", operator.getitem, (node, index), {}, name=f"{name}_out")
            item.meta[MODULE], item.meta[MODULE_TYPE] = node.meta[MODULE], node.meta[MODULE_TYPE]
            self._hold(item, t)

    def finish(self, outputs: Any) -> None:
        """Add the output node over the tensors of ``outputs``."""
        self.graph.output([self.node_of(t, t._version) for _, t in tree.flatten(outputs)])

    def mark_grads(self) -> None:
        """After backward: note on each value node whether a gradient reached it."""
        for node in self.graph.nodes:
            if node.name in self.values:
                node.meta[GRAD] = "recorded" if node.name in self.grads else "none"


def _identifier(path: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in path) or "x"


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


def _to_fx(obj: Any, node_of: Callable[[torch.Tensor], torch.fx.Node]) -> Any:
    """``obj`` with tensors replaced by their nodes and non-graph objects by their repr."""
    if isinstance(obj, torch.Tensor):
        return node_of(obj)
    if isinstance(obj, tuple):
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
    return repr(obj) if len(repr(obj)) < 200 else f"<{type(obj).__name__}>"


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


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module) -> Iterator[None]:
    """Restore the model's tensors, grads, train/eval flags and all RNG states on exit."""
    tensors = list(model.parameters()) + list(model.buffers())
    saved = [t.detach().clone() for t in tensors]
    grads = [p.grad for p in model.parameters()]
    training = [(m, m.training) for m in model.modules()]
    rng = _rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        for m, flag in training:
            m.training = flag
        _set_rng_state(rng)


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
    outputs sum to a constant (softmax) still passes a non-zero gradient back.
    """
    total = None
    for i, (_, t) in enumerate(tree.flatten(outputs)):
        if not (t.is_floating_point() or t.is_complex()) or not t.requires_grad:
            continue
        gen = torch.Generator().manual_seed(seed * 1000003 + i)
        r = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
        term = (t * r).sum() / math.sqrt(max(t.numel(), 1))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the model output has no floating tensor that requires grad")
    return total


def record(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
           loss: Loss | None = None, seed: int = 0, mode: str = "eval",
           keep_dropout: bool = False, meta: dict | None = None) -> Capture:
    """Run ``model(*args, **kwargs)`` forward and backward once and record it as a ``Capture``.

    ``loss`` maps the model output to a scalar (default: ``random_cotangent_loss``). In ``train``
    mode dropout is disabled unless ``keep_dropout``. The model's tensors, grads, train/eval flags
    and every RNG state are left exactly as they were.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', not {mode!r}")
    kwargs = dict(kwargs or {})
    started = datetime.datetime.now(datetime.timezone.utc)
    with preserved_state(model):
        model.train(mode == "train")
        seed_everything(seed)
        for p in model.parameters():
            p.grad = None
        call_args = tree.map_tensors(tuple(args), lambda t: t.detach().clone().requires_grad_(t.requires_grad))
        call_kwargs = tree.map_tensors(kwargs, lambda t: t.detach().clone().requires_grad_(t.requires_grad))
        saved_inputs = {"args": tree.map_tensors(call_args, lambda t: t.detach().clone()),
                        "kwargs": tree.map_tensors(call_kwargs, lambda t: t.detach().clone())}
        recorder = Recorder(model, disable_dropout=mode == "train" and not keep_dropout)
        for path, t in tree.flatten({"args": call_args, "kwargs": call_kwargs}):
            recorder.add_input(path.removeprefix("kwargs."), t)
        try:
            with torch.enable_grad(), recorder:
                outputs = model(*call_args, **call_kwargs)
            recorder.finish(outputs)
            objective = (loss or (lambda out: random_cotangent_loss(out, seed)))(outputs)
            if not isinstance(objective, torch.Tensor) or objective.numel() != 1:
                raise ValueError("the loss must return a scalar tensor")
            if objective.requires_grad:
                objective.backward()
            recorder.mark_grads()
        finally:
            recorder.remove_hooks()
        param_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        params.update({n: b.detach().clone() for n, b in model.named_buffers()})
        outputs = tree.map_tensors(outputs, lambda t: t.detach().clone())
    ops = [n for n in recorder.graph.nodes if n.op == "call_function"]
    info = {
        "fxdiff": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tracer": "eager",
        "mode": mode,
        "seed": seed,
        "keep_dropout": keep_dropout,
        "loss_value": float(objective.detach().double()),
        "device": str(next(iter(params.values())).device) if params else "cpu",
        "dtype": str(next(iter(params.values())).dtype).removeprefix("torch.") if params else None,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "started": started.isoformat(timespec="seconds"),
        "ops": len(ops),
        "modules": {path: type(m).__name__ for path, m in model.named_modules()},
        **(meta or {}),
    }
    return Capture(graph=recorder.graph, values=recorder.values, grads=recorder.grads,
                   params=params, param_grads=param_grads, inputs=saved_inputs,
                   outputs=outputs, meta=info)
