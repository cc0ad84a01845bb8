"""The run core every tracer shares: prepare the model, run forward under a recorder, seed the
backward pass, and turn what was recorded into a ``Capture``.

A run leaves the model as it found it (parameters, buffers, ``.grad``, train/eval flags, the torch,
numpy and Python RNG states). Backward starts from the gradient of the loss with respect to each
model output, evaluated on detached copies of the outputs: these *output gradients* are stored in
the capture, so a candidate can later run its backward from the reference's seed without the
reference's loss code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import math
import os
import platform
import random
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import tree
from ..version import __version__
from ..errors import FxdiffError, UserCodeError, blame_user, in_fxdiff
from ..model.capture import GRAD, MODULE, NOT_STORED, TARGET, Capture
from ..outputs import in_layout_of, pair_outputs
from .plain import as_plain, is_plain
from ..store.stream import CaptureStream
from ..store.tensor_file import _span_bytes, byte_span
from ..util import dtype_name
from .recorder import BOUNDARY, Keep, Recorder, Slot

Loss = Callable[..., torch.Tensor]
MODES = ("eval", "train")
NOT_RECORDED = "not recorded"   # node.meta[GRAD] when the capture keeps no gradients (--keep values)


@dataclasses.dataclass(frozen=True)
class BackwardSeed:
    """A reference's output leaves (path, value) and its loss's gradient for each, by path."""

    outputs: list[tuple[str, torch.Tensor]]
    grads: dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How a model is run for a capture.

    ``loss`` takes the model output (and, if it accepts a second argument, the model) and returns a
    scalar; without it, backward starts from a seeded random cotangent on every floating output.
    ``backward_seed`` starts backward from a reference's output gradients instead, each given to
    the candidate output that pairs with its reference output: a candidate run so needs none of the
    reference's code. ``autocast`` runs forward
    under ``torch.autocast`` in that dtype (mixed precision as users run it). ``replay`` gives the
    run's k-th random call the reference's draw ``replay[k]`` (``recorder.reference_draw``): how a
    live candidate takes the reference's dropout masks and random numbers.
    """

    mode: str = "eval"
    seed: int = 0
    keep_dropout: bool = False
    loss: Loss | None = None
    backward_seed: BackwardSeed | None = None
    autocast: torch.dtype | None = None
    replay: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    keep: str = "both"            # what is kept of each node: see ``Keep`` (recorder.py)
    modules: str | None = None    # keep only ops inside modules matching this regular expression
    stream_to: str | None = None  # write the capture here while the model runs (store/stream.py)

    def __post_init__(self):
        if self.mode not in MODES:
            raise FxdiffError(f"mode must be 'eval' or 'train', not {self.mode!r}", option="mode")
        if self.keep not in Keep.MODES:
            raise FxdiffError(f"keep must be one of {', '.join(Keep.MODES)}, not {self.keep!r}", option="keep")
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as e:
                raise FxdiffError(f"modules {self.modules!r} is not a regular expression ({e})",
                                  option="modules") from None

    @property
    def kept(self) -> Keep:
        return Keep.of(self.keep, self.modules)
        if self.loss is not None and self.backward_seed is not None:
            raise FxdiffError("give a loss or output gradients to start backward from, not both", option="loss")

    @property
    def disable_dropout(self) -> bool:
        return self.mode == "train" and not self.keep_dropout


class Saved(dict):
    """The copies ``preserved_state`` takes on entry, by ``id`` of the tensor. CUDA parameters are
    copied to pinned host memory on a side stream while the run goes on (a second copy on the GPU
    would add the model's size to its peak memory): ``wait_device()`` makes the current stream wait
    for those copies (the recorder calls it before an op writes to a parameter) and ``ready()``
    makes the host wait. A write the recorder does not see (through ``.data``) may reach the copy,
    and one that leaves the version counter unchanged is not undone."""

    def __init__(self, spill: "_Spill | None" = None):
        super().__init__()
        self.spill = spill                     # where CPU tensors' copies go instead of memory
        self.versions: dict[int, int] = {}     # CUDA parameters copied to the host: version on entry
        self._done: list[tuple[torch.device, torch.cuda.Event]] = []
        self._waited = False

    def copy(self, tensors: dict[int, torch.Tensor], params: set[int]) -> None:
        side: dict[torch.device, torch.cuda.Stream] = {}
        for k, t in tensors.items():
            if k not in params or t.device.type != "cuda" or not is_plain(t) or not t.is_contiguous():
                self[k] = t.detach() if self.spill is not None and self.spill.add(k, t) else t.detach().clone()
                continue
            stream = side.get(t.device)
            if stream is None:
                stream = side[t.device] = torch.cuda.Stream(t.device)
                stream.wait_stream(torch.cuda.current_stream(t.device))
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(t.detach(), non_blocking=True)
            t.record_stream(stream)
            self[k] = host
            self.versions[k] = t._version
        for device, stream in side.items():
            done = torch.cuda.Event()
            done.record(stream)
            self._done.append((device, done))

    def wait_device(self) -> None:
        if not self._waited:
            for device, done in self._done:
                torch.cuda.current_stream(device).wait_event(done)
            self._waited = True

    def ready(self) -> "Saved":
        for _, done in self._done:
            done.synchronize()
        return self


SPILL_AT = 1 << 28   # bytes of CPU parameters and buffers from which a streamed capture spills their copies


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module, spill: str | os.PathLike | None = None) -> Iterator[Saved]:
    """Restore the model's tensors, grads, train/eval flags and all RNG states on exit.

    Parameters and buffers are put back as objects (one re-registered during the run is replaced
    by the original, one added is removed) and by value (a CUDA parameter only when its version
    counter moved: see ``Saved``). Yields the copies taken on entry (``Saved``); they are not
    changed afterwards. With ``spill`` (a folder: a streamed capture, whose memory should stay near
    the model's own), the copies of CPU tensors go to a temporary file there instead of memory when
    they are ``SPILL_AT`` bytes or more, and what is yielded for them is the tensor itself, put back
    in place on exit.
    """
    modules = list(model.modules())
    slots = [(m, dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set)) for m in modules]
    tensors = {id(t): t for _, p, b, _ in slots for t in (*p.values(), *b.values()) if _writable(t)}
    cpu_bytes = sum(t.numel() * t.element_size() for t in tensors.values() if t.device.type == "cpu")
    saved = Saved(_Spill.open(spill) if spill is not None and cpu_bytes >= SPILL_AT else None)
    saved.copy(tensors, {id(t) for _, p, _, _ in slots for t in p.values() if t is not None})
    grads = [(p, p.grad) for p in model.parameters()]
    training = [(m, m.training) for m in modules]
    rng = _rng_state()
    try:
        yield saved
    finally:
        for m, params, buffers, non_persistent in slots:
            if isinstance(m, torch.jit.ScriptModule):   # TorchScript's own dicts: its tensors are put back below
                continue
            if not (_same(m._parameters, params) and _same(m._buffers, buffers)):
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)
            m._non_persistent_buffers_set = non_persistent
        saved.ready()
        with torch.no_grad():
            for k, t in tensors.items():
                if k in saved.versions and saved.versions[k] == t._version:   # a CUDA parameter nothing wrote to
                    continue
                if saved.spill is not None and saved.spill.restore(k, t):
                    continue
                if not t.is_quantized:   # quantized tensors have no copy_; the object is put back above
                    t.copy_(saved[k])
        if saved.spill is not None:
            saved.spill.close()
        for p, g in grads:
            p.grad = g
        for m, flag in training:
            m.training = flag
        _set_rng_state(rng)


class _Spill:
    """Copies of CPU tensors' bytes in an unlinked temporary file (``preserved_state``'s ``spill``)."""

    def __init__(self, file):
        self.file = file
        self.where: dict[int, tuple] = {}   # id -> (offset, storage address, first, end, dtype, shape, stride)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "_Spill | None":
        """A spill file in ``folder`` (created), or None where it cannot be made (copies stay in memory)."""
        try:
            os.makedirs(folder, exist_ok=True)
            return cls(tempfile.TemporaryFile(dir=folder))
        except OSError:
            return None

    def add(self, key: int, t: torch.Tensor) -> bool:
        """Write ``t``'s bytes; False for a tensor that is not a plain CPU one (copied in memory)."""
        if t.device.type != "cpu" or t.layout != torch.strided or type(t) not in (torch.Tensor, torch.nn.Parameter) \
                or t.is_quantized:
            return False
        first, end = byte_span("", t)
        storage = t.untyped_storage()
        offset = self.file.tell()
        self.file.write(_span_bytes(storage, first, end))
        self.where[key] = (offset, storage.data_ptr(), first, end, t.dtype, t.shape, t.stride())
        return True

    def restore(self, key: int, t: torch.Tensor) -> bool:
        """Put ``t``'s bytes back from the file (in place where it kept its storage and layout)."""
        where = self.where.get(key)
        if where is None:
            return False
        offset, address, first, end, dtype, shape, stride = where
        if end == first:
            return True
        self.file.seek(offset)
        storage = t.untyped_storage()
        if storage.data_ptr() == address and (t.dtype, t.shape, t.stride()) == (dtype, shape, stride) \
                and byte_span("", t) == (first, end):
            self.file.readinto(_span_bytes(storage, first, end))
            return True
        data = torch.empty(end - first, dtype=torch.uint8)
        self.file.readinto(memoryview(data.numpy()))
        t.copy_(data.view(dtype).as_strided(shape, stride))
        return True

    def close(self) -> None:
        self.file.close()


def _writable(t: torch.Tensor | None) -> bool:
    """Whether a run could have written to ``t``: not an inference tensor (those cannot be written
    outside inference mode) nor one whose elements share memory (expanded: no op writes to those)."""
    return t is not None and not t.is_inference() and not any(n > 1 and st == 0 for n, st in zip(t.shape, t.stride()))


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
    if type(seed) is not int or not -2**63 <= seed < 2**64:   # torch.manual_seed's range
        raise FxdiffError(f"seed {str(seed)[:40]}: expected an integer from -2**63 to 2**64 - 1", option="seed")
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


def clone_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Private copies of the call's tensors (same ``requires_grad``), so the run cannot alter the caller's."""
    def fresh(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(t.requires_grad)
    return tree.map_tensors(tuple(args), fresh), tree.map_tensors(dict(kwargs), fresh)


@contextlib.contextmanager
def prepared(model: torch.nn.Module, args: tuple, kwargs: dict,
             config: RunConfig) -> Iterator[tuple[dict[int, torch.Tensor], tuple, dict]]:
    """Set the model up for one run and restore it afterwards: yields the parameter copies taken
    on entry (by ``id``) and private copies of the call's arguments."""
    inference = [n for n, p in model.named_parameters() if p.is_inference()]
    if inference:
        raise FxdiffError(f"{type(model).__name__}: its parameter {inference[0]}"
                          + (f" (and {len(inference) - 1} more)" if len(inference) > 1 else "")
                          + " was made under torch.inference_mode(), which autograd cannot run through; "
                          "build or load the model outside it (torch.no_grad() is fine)")
    spill = None if config.stream_to is None else Path(config.stream_to).absolute().parent
    with preserved_state(model, spill) as before:
        model.train(config.mode == "train")
        seed_everything(config.seed)
        for p in model.parameters():
            p.grad = None
        call_args, call_kwargs = clone_call(args, kwargs)
        yield before, call_args, call_kwargs


def forward_context(model: torch.nn.Module, config: RunConfig) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on the model's device when ``config.autocast`` asks for it."""
    if config.autocast is None:
        return contextlib.nullcontext()
    first = next(model.parameters(), None)
    device = first.device.type if first is not None else "cpu"
    return torch.autocast(device_type=device, dtype=config.autocast)


@dataclasses.dataclass
class Run:
    """What one recorded run produced, before it becomes a ``Capture``."""

    recorder: Recorder
    inputs: Any              # {"args": [...], "kwargs": {...}} with Slots for tensors
    outputs: Any             # the output structure with Slots for tensors
    params: dict[str, torch.Tensor]
    param_grads: dict[str, torch.Tensor]
    output_grads: dict[str, torch.Tensor]
    loss_value: float | None
    not_stored: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> why
    stream: Any = None       # store.stream.CaptureStream the run is being written to


def record_run(model: torch.nn.Module, rec: Recorder, call_args: tuple, call_kwargs: dict,
               forward: Callable[[], Any], config: RunConfig, before: dict[int, torch.Tensor],
               check: Callable[[Any], None] | None = None) -> Run:
    """Run ``forward()`` under ``rec``, then the backward pass: the core every tracer shares.

    ``check(outputs)`` may refuse the run before it is kept. The caller drops its own references to
    the call and then calls ``rec.release()``.
    """
    call = {"args": call_args, "kwargs": call_kwargs}
    stream = CaptureStream(config.stream_to) if config.stream_to is not None else None
    try:
        return _record_run(model, rec, call, forward, config, before, check, stream)
    except BaseException:
        if stream is not None:
            stream.abort()
        raise


def _record_run(model, rec, call, forward, config, before, check, stream) -> Run:
    rec.replay = dict(config.replay)
    if isinstance(before, Saved):
        rec.before_frozen_write = before.wait_device
    if not config.kept.everything or stream is not None:
        rec.restrict(config.kept, stream)
    if stream is not None and config.keep != "summary":
        _put_params_early(model, before, stream)
    placeholders = {id(t): rec.add_input(input_target(path), t).name
                    for path, t in tree.flatten(call)}
    try:
        with torch.enable_grad(), rec, forward_context(model, config):
            outputs = forward()
    except (Exception, SystemExit) as e:  # user code may call sys.exit
        if in_fxdiff(e) and e is not rec.failed_op:
            raise
        raise blame_user(f"the forward pass of {type(model).__name__}", e) from e
    finished = rec.finish(outputs)
    whole = config.kept.whole_outputs(outputs)
    rec.keep_outputs(finished, outputs, whole)
    out_nodes = iter(finished)
    try:
        with _param_grads_streamed(model, rec, config, stream):
            loss_value, output_grads = backward(model, outputs, config)
    except FxdiffError:
        raise
    except (Exception, SystemExit) as e:   # autograd's own complaints about the model's graph included
        if in_fxdiff(e):
            raise
        raise blame_user(f"the backward pass of {type(model).__name__}", e) from e
    not_stored: dict[str, str] = {}
    output_grads = plain_tensors(output_grads, "output_grads.", not_stored)
    if not whole:
        output_grads = {path: rec.summarise(g) for path, g in output_grads.items()}
    summary = config.keep == "summary"   # parameters and their gradients summarised too, on their device
    params = model_tensors(model, before, not_stored, rec.summarise_param if summary else None)
    param_grads = taken_grads(model, not_stored, rec.summarise if summary else None)
    rec.finish_summaries()
    rec.mark_grads()
    if check is not None:
        check(outputs)
    return Run(rec, inputs=tree.plain(call, lambda t: Slot(placeholders[id(t)])),
               outputs=tree.plain(outputs, lambda t: Slot(next(out_nodes).name)),
               params=params, param_grads=param_grads,
               output_grads=output_grads,
               loss_value=loss_value, not_stored=not_stored, stream=stream)


def _put_params_early(model: torch.nn.Module, before: dict[int, torch.Tensor], stream: CaptureStream) -> None:
    """Hand a streamed capture the parameters' copies taken on entry, which are what it stores and
    which nothing writes: the disk takes them during the run instead of after it (finishing finds
    them written). CPU copies held in memory only (not those of CUDA parameters, still in transit)."""
    if not isinstance(before, Saved) or before.spill is not None:
        return
    for name, p in model.named_parameters():
        copy = before.get(id(p))
        if copy is not None and id(p) not in before.versions and copy.device.type == "cpu" and is_plain(copy):
            stream.put(f"param/{name}", copy, defer=True)


@contextlib.contextmanager
def _param_grads_streamed(model: torch.nn.Module, rec: Recorder, config: RunConfig,
                          stream: CaptureStream | None) -> Iterator[None]:
    """Hand a streamed capture each parameter's gradient as soon as backward has accumulated it, so
    that the disk takes them during backward instead of after it (finishing finds them written;
    the size of the model less to wait for at the end). A later write to one is caught as any
    value's is (``TensorStream.verify``), and the run recorded again copying, these gradients then
    handed over after it."""
    if stream is None or config.keep == "summary" or rec.copy:
        yield
        return

    def put(name: str, p: torch.Tensor) -> None:
        if p.grad is not None and is_plain(p.grad):
            stream.put(f"param_grad/{name}", p.grad.detach(), defer=True)

    handles = [p.register_post_accumulate_grad_hook(lambda p, name=name: put(name, p))
               for name, p in model.named_parameters() if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def input_target(path: str) -> str:
    """The target of the placeholder for the call's tensor at ``path`` (``args.0``, ``kwargs.x``):
    keyword arguments by their name."""
    return path.removeprefix("kwargs.")


def plain_tensors(tensors: dict[str, torch.Tensor], prefix: str = "",
                  not_stored: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``tensors`` as a capture can store them (``plain.as_plain``: sparse made dense, quantized
    dequantized); those that cannot be stored are left out, and why goes to ``not_stored``
    under ``prefix + name``."""
    out = {}
    for name, t in tensors.items():
        if is_plain(t):
            out[name] = t
            continue
        value, why = as_plain(t)
        if value is None:
            if not_stored is not None:
                not_stored[prefix + name] = why
        else:
            out[name] = value
    return out


def backward(model: torch.nn.Module, outputs: Any, config: RunConfig) -> tuple[float | None, dict[str, torch.Tensor]]:
    """Run backward from the model's outputs; return (loss value, gradient of the loss by output path).

    The output gradients are taken on detached copies of the outputs, so each is the output's own
    share of the loss's gradient (not what reaches it through other outputs): seeding a candidate
    with them reproduces this backward pass. With ``config.backward_seed`` the loss is skipped.
    """
    leaves = [(p, t) for p, t in tree.flatten(outputs)
              if t.requires_grad and (t.is_floating_point() or t.is_complex())]
    if config.backward_seed is not None:
        seed = config.backward_seed
        pairs, _, _ = pair_outputs(seed.outputs, leaves)
        mine, theirs = dict(leaves), dict(seed.outputs)
        seeds = [(mine[p.cand], in_layout_of(seed.grads[p.ref], theirs[p.ref], mine[p.cand]))
                 for p in pairs if p.ref in seed.grads]
        if seeds:
            with _no_draws(model, config):
                torch.autograd.backward([t for t, _ in seeds], [g.to(t.device, t.dtype) for t, g in seeds])
        return None, {}
    with torch.enable_grad():
        value = objective(config, outputs, model)
        if not value.requires_grad:
            if config.loss is not None and leaves:
                raise FxdiffError(f"the loss {_loss_label(config.loss)} returned a tensor with no gradient path to "
                                  "the model's outputs", option="loss")
            return float(value.detach().double()), {}
        grads = _output_grads(config, outputs, leaves, model)
        with _no_draws(model, config):
            value.backward()
    return float(value.detach().double()), grads


class _Draws(TorchDispatchMode):
    """Notes the first random op that runs under it drawing from torch's default generator (fxdiff's
    own draws, a summary's sample positions, come from generators of their own)."""

    op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.op is None and torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()) \
                and kwargs.get("generator") is None:
            self.op = func
        return func(*args, **kwargs)


@contextlib.contextmanager
def _no_draws(model: torch.nn.Module, config: RunConfig) -> Iterator[None]:
    """Refuse a backward pass that draws random numbers when the recorded forward's draws were
    changed (dropout switched off, or the reference's draws replayed): such a backward runs part of
    the forward again (activation checkpointing), with draws of its own, so its gradients are not
    those of the forward recorded. (torch function modes, the recorder's way of changing draws,
    are not active in backward.)"""
    if not (config.disable_dropout or config.replay):
        yield
        return
    draws = _Draws()
    try:
        with draws:
            yield
    except Exception:   # autograd's own complaint (checkpoint's CheckpointError) is the consequence
        if draws.op is None:
            raise
    if draws.op is not None:
        changed = "without dropout" if config.disable_dropout else "with the reference's random draws"
        raise FxdiffError(f"{type(model).__name__} runs part of its forward again during backward (activation "
                          f"checkpointing) and draws random numbers there ({draws.op}), but its forward was "
                          f"recorded {changed}, so the gradients would not be that forward's; turn activation "
                          "checkpointing off" + (", or keep dropout" if config.disable_dropout else
                                                 ", or compare with rng_replay=False"),
                          option="keep_dropout" if config.disable_dropout else None)


def _output_grads(config: RunConfig, outputs: Any, leaves: list[tuple[str, torch.Tensor]],
                  model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """d(loss)/d(each output leaf), the leaves taken as independent: the loss on detached copies.
    A tensor returned at several paths (Hugging Face's last hidden state, also the last of
    ``hidden_states``) is one leaf: its gradient is stored under its first path only, so a backward
    seeded from these gradients counts it once."""
    stand_ins: dict[int, tuple[str, torch.Tensor]] = {}
    for p, t in leaves:
        stand_ins.setdefault(id(t), (p, t.detach().requires_grad_()))
    copies = _retyped(outputs, tree.map_tensors(outputs, lambda t: stand_ins[id(t)][1] if id(t) in stand_ins
                                                else t.detach()))
    value = objective(config, copies, model)
    paths = [p for p, _ in stand_ins.values()]
    inputs = [t for _, t in stand_ins.values()]
    grads = torch.autograd.grad(value, inputs, allow_unused=True) if value.requires_grad else [None] * len(inputs)
    return {p: g for p, g in zip(paths, grads) if g is not None}


def _retyped(like: Any, copy: Any) -> Any:
    """``copy`` (``tree.map_tensors`` of ``like``) in ``like``'s own mapping type when that type can be
    rebuilt from its items (a Hugging Face ``ModelOutput``): the loss gets what the model returns."""
    if isinstance(like, Mapping) and type(like) is not dict and isinstance(copy, dict):
        try:
            return type(like)(**copy)
        except TypeError:
            return copy
    return copy


def objective(config: RunConfig, outputs: Any, model: torch.nn.Module | None = None) -> torch.Tensor:
    """The scalar backward starts from: ``config.loss`` of the outputs, or the seeded random cotangent."""
    if config.loss is None:
        return random_cotangent_loss(outputs, config.seed)
    try:
        value = config.loss(outputs, model) if model is not None and _takes_model(config.loss) else config.loss(outputs)
    except (Exception, SystemExit) as e:
        raise blame_user(f"the loss {_loss_label(config.loss)}", e) from e
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise UserCodeError(f"the loss {_loss_label(config.loss)} returned {type(value).__name__}"
                            f"{'' if not isinstance(value, torch.Tensor) else f' of shape {tuple(value.shape)}'}; "
                            "expected a scalar tensor")
    return value.reshape(())


def _loss_label(loss: Loss) -> str:
    """``file.py:function`` of a loss function, for messages."""
    name = getattr(loss, "__qualname__", None) or type(loss).__name__
    code = getattr(loss, "__code__", None)
    return f"{os.path.basename(code.co_filename)}:{name}" if code is not None else name


def _takes_model(loss: Loss) -> bool:
    """Whether ``loss`` accepts a second positional argument (the model)."""
    try:
        params = list(inspect.signature(loss).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def model_tensors(model: torch.nn.Module, before: dict[int, torch.Tensor],
                  not_stored: dict[str, str] | None = None,
                  summarise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's parameters as the run used them (``before``: copies from ``preserved_state``) and
    copies of its buffers as the run left them (batch norm's running statistics), by name, as
    ``plain_tensors`` stores them (unstorable ones left out, why in ``not_stored["params.NAME"]``).
    With ``summarise`` (``keep="summary"``), their summaries instead: a CUDA parameter the run did
    not write to is summarised where it is, not from its copy on the host."""
    versions = before.versions if isinstance(before, Saved) else {}
    if summarise is None or any(versions[id(p)] != p._version for p in model.parameters() if id(p) in versions):
        if isinstance(before, Saved):
            before.ready()
    params = {n: p.detach() if summarise is not None and versions.get(id(p)) == p._version
              else before[id(p)] if id(p) in before else p.detach().clone() for n, p in model.named_parameters()}
    params.update({n: b.detach() if summarise is not None else b.detach().clone() for n, b in model.named_buffers()})
    params = plain_tensors(params, "params.", not_stored)
    return params if summarise is None else {n: summarise(t) for n, t in params.items()}


def taken_grads(model: torch.nn.Module, not_stored: dict[str, str] | None = None,
                summarise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The run's parameter gradients (with ``summarise``, their summaries); the caller puts the
    model's own ``.grad`` back afterwards."""
    grads = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    grads = plain_tensors(grads, "param_grads.", not_stored)
    return grads if summarise is None else {n: summarise(g) for n, g in grads.items()}


def assemble(model: torch.nn.Module, run: Run, *, tracer: str, config: RunConfig, started: datetime.datetime,
             meta: dict | None) -> Capture:
    """The ``Capture`` of a finished run, its slots filled and its metadata written."""
    rec = run.recorder
    graph, values, grads = _kept(rec, config)
    graph_nodes = {n.name: n for n in graph.nodes}

    not_stored = dict(run.not_stored)
    full_outputs = rec.output_values or {}

    def fill(slot: Slot) -> torch.Tensor | None:
        if slot.node in full_outputs:
            return full_outputs[slot.node]
        if slot.node in values:
            return values[slot.node]
        node = graph_nodes[slot.node]
        if node.op == "get_attr" and str(node.target) in run.params:
            return run.params[str(node.target)]  # a parameter returned as is
        not_stored[f"{node.op}.{slot.node}"] = node.meta.get(NOT_STORED) or not_stored.get(
            f"params.{node.target}", "no value was recorded")
        return None

    ops = sum(1 for n in graph.nodes if n.op == "call_function")
    first = next(model.parameters(), None)   # the capture's copies of CUDA parameters are on the host
    first = first if first is not None else next(iter(run.params.values()), None)
    info = {
        "fxdiff": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tracer": tracer,
        "mode": config.mode,
        "seed": config.seed,
        "keep_dropout": config.keep_dropout,
        "autocast": dtype_name(config.autocast) if config.autocast else None,
        "loss": _loss_name(config),
        "loss_value": run.loss_value,
        "device": str(first.device) if first is not None else "cpu",
        # float32 convolutions and matrix products on CUDA may round their inputs to TF32
        "tf32": first is not None and first.device.type == "cuda"
        and bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32),
        "dtype": dtype_name(first.dtype) if first is not None else None,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "started": started.isoformat(timespec="seconds"),
        "ops": ops,
        "modules": {path: type(m).__name__ for path, m in model.named_modules()},
        **({"keep": config.keep} if config.keep != "both" else {}),
        **({"kept_modules": config.modules} if config.modules else {}),
        **(meta or {}),
    }
    inputs, outputs = tree.map_leaves(run.inputs, Slot, fill), tree.map_leaves(run.outputs, Slot, fill)
    if not_stored:
        info["not_stored"] = not_stored
    capture = Capture(graph=graph, values=values, grads=grads, params=run.params,
                      param_grads=run.param_grads, inputs=inputs, outputs=outputs,
                      output_grads=run.output_grads, meta=info)
    if run.stream is None:
        return capture
    return run.stream.finish(capture)   # memory-mapped from the file just written


def _kept(rec: Recorder, config: RunConfig) -> tuple[torch.fx.Graph, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The graph, values and gradients of the capture, as ``config.keep`` / ``config.modules`` ask.

    With ``modules``, ops outside the kept modules are dropped; a value made outside and used
    inside (or returned) becomes a placeholder of the producer's name holding its value and
    gradient, ``node.meta[BOUNDARY]`` naming the op that made it. Without gradients kept, value
    nodes are marked ``GRAD = "not recorded"`` (not the same as no gradient)."""
    keep = config.kept
    if keep.grads == "none":
        for node in rec.graph.nodes:
            if node.op == "call_function" and node.meta.get(GRAD) == "none":
                node.meta[GRAD] = NOT_RECORDED
    if keep.modules is None:
        return rec.graph, rec.values, rec.grads
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    outside: dict[str, torch.fx.Node] = {}

    def arg(a: torch.fx.Node) -> torch.fx.Node:
        if a.name not in env:   # made outside, used here: a placeholder named by its producer
            source = outside[a.name]
            p = graph.placeholder(a.name)
            p.meta.update({k: v for k, v in source.meta.items() if k.startswith("fxdiff_")})
            p.meta[BOUNDARY] = source.meta.get(TARGET, "")
            p.meta[TARGET] = a.name
            if a.name not in rec.values and a.name not in (rec.output_values or {}):
                p.meta.setdefault(NOT_STORED, "made outside the kept modules and not kept")
            env[a.name] = p
        return env[a.name]

    for node in rec.graph.nodes:
        if node.op == "output":
            graph.output(torch.fx.map_arg(node.args[0], arg))
        elif node.op == "call_function" and not keep.inside(node.meta.get(MODULE, "")):
            outside[node.name] = node
        else:
            env[node.name] = graph.node_copy(node, arg)
    values = {k: v for k, v in rec.values.items() if k in env}
    for name, value in (rec.output_values or {}).items():   # an output made outside: its placeholder's value
        if name in env and env[name].op == "placeholder" and name not in values:
            values[name] = value
            env[name].meta.pop(NOT_STORED, None)
    grads = {k: v for k, v in rec.grads.items() if k in env}
    return graph, values, grads


def _loss_name(config: RunConfig) -> str:
    """What backward started from, in words (a description: nothing is ever loaded from it)."""
    if config.backward_seed is not None:
        return "the reference's output gradients"
    if config.loss is None:
        return "random cotangent"
    return f"{getattr(config.loss, '__module__', '?')}.{getattr(config.loss, '__qualname__', 'loss')}"
