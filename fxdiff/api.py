"""The one pipeline: capture, compare, map parameters, convert weights. The CLI is a thin layer
over these functions; a notebook or a test calling them gets the same results.

*load model -> record -> store*: ``capture`` (a module) or ``capture_spec`` (a model spec string,
the CLI's way), then ``save``. *load captures -> match -> judge -> render*: ``compare``, which takes
two captures, or a capture and a live candidate that it runs on the capture's saved inputs.

What a live candidate inherits from the reference (its "rules"): the saved inputs (unless
``inputs`` is given; those the reference's gradient reached require grad), the seed, the mode and
whether dropout was kept (unless given), and the backward seed: without a ``loss`` of its own, the
candidate's backward starts from the reference's gradient of the loss with respect to each matched
output, so the candidate's environment needs none of the reference's code. With its own ``loss``
the two loss values are compared too. And,
unless ``rng_replay=False``, the reference's random draws: the candidate runs once, is aligned,
and runs again with each random op that pairs with one of the reference's (same op, same shape,
same constant arguments) taking the reference's draw; dropout takes the reference's keep mask
and applies it to the candidate's own input. Two captures cannot be replayed.
Executing a model spec, inputs spec or loss spec runs that code: that is their point. Nothing
named inside a capture, report or checkpoint is ever imported or called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import tree
from .errors import FxdiffError
from .judge import Tolerance, judge
from .judge.tensors import statistics
from .load import specs
from .match import UserMap, match
from .model.alignment import ParamMap
from .model.capture import Capture
from .model.report import Report
from .params import convert as convert_state
from .progress import step
from .record import BackwardSeed, RunConfig, input_target, record
from .record.recorder import Keep
from .replay import drew, random_differences, replay_table, replayed, withheld
from .store import is_capture, load, load_deferred, save, trim
from .store.summary import is_summary

Side = Capture | str | os.PathLike
LossSpec = Callable[..., torch.Tensor] | str | None

__all__ = ["LiveOptions", "capture", "capture_spec", "compare", "convert", "load", "map_params", "save",
           "save_inputs"]


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, loss: LossSpec = None,
            seed: int = 0, mode: str = "eval", keep_dropout: bool = False, autocast: torch.dtype | str | None = None,
            tracer: str = "eager", meta: dict[str, Any] | None = None, keep: str = "both",
            modules: str | None = None, stream_to: str | os.PathLike | None = None) -> Capture:
    """Run ``model(*args, **kwargs)`` forward and backward once and record it.

    ``loss`` maps the output (and, if it takes two arguments, the model) to a scalar; a
    ``file.py:function`` string names one. Default: a seeded random cotangent on every floating
    output. ``autocast`` (``"bfloat16"``, ``torch.float16``...) runs forward under ``torch.autocast``.
    ``keep``: ``"both"`` (every value and gradient), ``"values"`` (no node gradients), ``"grads"``
    (values summarised) or ``"summary"`` (both summarised, and the parameters and their gradients:
    statistics, a fixed-seed sample and a hash; ``store.summary``). ``modules``: a regular
    expression; only ops inside modules whose path matches it are kept (values made outside and
    used inside become placeholders).
    ``stream_to``: write the capture to this directory while the model runs (each value and
    gradient goes to disk as it is produced: memory stays near the model's own) and return it
    memory-mapped from there; ``save`` is then not needed.
    """
    config = RunConfig(mode=mode, seed=seed, keep_dropout=keep_dropout, loss=_loss(loss), autocast=_dtype(autocast),
                       keep=keep, modules=modules, stream_to=None if stream_to is None else str(stream_to))
    return record(model, args, kwargs, config, tracer=tracer, meta=meta)


@dataclasses.dataclass(frozen=True)
class LiveOptions:
    """How to build and run a model given as a spec, or a live candidate. ``None``: inherit/default."""

    inputs: Any = None              # a spec, (args, kwargs), a dict of kwargs, a tuple of args
    loss: LossSpec = None
    checkpoint: str | None = None
    mode: str | None = None
    keep_dropout: bool | None = None
    seed: int | None = None
    device: str | None = None
    dtype: torch.dtype | str | None = None
    autocast: torch.dtype | str | None = None
    tracer: str = "eager"
    rng_replay: bool = True
    keep: str = "both"              # capture only: see ``capture``
    modules: str | None = None      # capture only
    stream_to: str | None = None    # capture only

    def given(self) -> list[str]:
        """The options set to something other than their default."""
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]


def capture_spec(model: str | torch.nn.Module, **run: Any) -> Capture:
    """Build ``model`` (a ``file.py:function`` spec, or a module), load its checkpoint and inputs,
    and record it: what ``fxdiff capture`` does. ``run`` holds ``LiveOptions`` fields."""
    options = LiveOptions(**run)
    if options.inputs is None:
        raise FxdiffError("a model needs inputs to run", option="inputs")
    config = RunConfig(mode=options.mode or "eval", seed=options.seed or 0, keep_dropout=bool(options.keep_dropout),
                       loss=_loss(options.loss), autocast=_dtype(options.autocast), keep=options.keep,
                       modules=options.modules, stream_to=options.stream_to)
    with _built(model, options) as (built, meta):
        args, kwargs = _inputs(options.inputs, built, options)
        meta["inputs"] = options.inputs if isinstance(options.inputs, str) else "given in Python"
        if isinstance(options.loss, str):
            meta["loss"] = options.loss   # a description: a capture's loss is never loaded from it
        with step(f"capturing {_label(model)}"):
            return record(built, args, kwargs, config, tracer=options.tracer, meta=meta)


def compare(ref: Side | torch.nn.Module, cand: Side | torch.nn.Module, *, user_map: UserMap | str | None = None,
            tolerance: Tolerance | None = None, ref_label: str | None = None, cand_label: str | None = None,
            histograms: bool = False, **run: Any) -> Report:
    """Align ``cand`` to ``ref`` and judge every pair.

    Each side is a ``Capture``, a capture directory, a module or a ``file.py:function`` model spec.
    A live reference runs with ``options`` (inputs required); a live candidate runs on the
    reference's saved inputs under the rules in the module docstring, ``options`` overriding.
    ``options`` given with two captures are refused: they would change nothing. ``run`` holds
    ``LiveOptions`` fields (``inputs``, ``loss``, ``checkpoint``, ``mode``, ``seed``, ``dtype``...).
    ``histograms``: compute each pair's error histogram (the HTML report draws them; they cost time).

    Capture directories are checked against their digests while they are matched and judged;
    a capture modified after it was written is refused before the report is returned.
    """
    options = LiveOptions(**run)
    checks: list[Callable[[], None]] = []
    try:
        ref_capture = _reference(ref, options, checks)
        user_map = _user_map(user_map)
        if _is_live(cand):
            cand_capture = run_candidate(ref_capture, cand, options, user_map)
        else:
            given = [name for name in options.given() if name != "rng_replay"]   # two captures are never replayed
            if not _is_live(ref) and given:
                raise FxdiffError(f"{', '.join(given)}: these options run a model, and both sides are captures",
                                  option=given[0])
            cand_capture = _as_capture(cand, checks)
        ref_capture, cand_capture = _comparable(ref_capture, cand_capture)
        with step("matching"):
            alignment = match(ref_capture, cand_capture, user_map)
        trim()   # what matching read goes back to the page cache
        with step("judging"), statistics(histograms=histograms):
            report = judge(ref_capture, cand_capture, alignment, tolerance or Tolerance(),
                           ref_label=ref_label or _label(ref), cand_label=cand_label or _label(cand))
        report.replayed = replayed(ref_capture, cand_capture, alignment)
        report.warnings[:0] = [f"the {side}'s checkpoint {line}" for side, c in (("reference", ref_capture),
                                                                                ("candidate", cand_capture))
                               if (line := specs.checkpoint_warning(c.meta.get("checkpoint")))]
        if not _is_live(cand):
            report.warnings.extend(_setup_differences(ref_capture, cand_capture) + random_differences(report))
        else:   # a live candidate runs as the reference did, but for the options that say otherwise
            report.warnings.extend(_setup_differences(ref_capture, cand_capture, _OVERRIDDEN)
                                   + (withheld(ref_capture, cand_capture, alignment) if options.rng_replay else []))
    except BaseException:
        for check in checks:   # a modified capture is the error to report, whatever it caused
            check()
        raise
    for check in checks:
        check()
    return report


def _comparable(ref: Capture, cand: Capture) -> tuple[Capture, Capture]:
    """Two captures as far as both can be compared: when one kept no node gradients (``--keep
    values``), the other's are set aside too (missing is not different)."""
    if "values" in (ref.info.keep, cand.info.keep):
        ref, cand = dataclasses.replace(ref, grads={}), dataclasses.replace(cand, grads={})
    return ref, cand


def run_candidate(ref: Capture, cand: str | torch.nn.Module, options: LiveOptions,
                  user_map: UserMap | None = None) -> Capture:
    """Record a live candidate as ``compare`` does: on ``ref``'s inputs, seed, mode and backward seed,
    and, with ``options.rng_replay`` and the eager tracer, again with ``ref``'s random draws where
    its random ops pair with ``ref``'s (``user_map`` helps align them)."""
    info = ref.info
    config = RunConfig(mode=options.mode or info.mode, seed=info.seed if options.seed is None else options.seed,
                       keep_dropout=info.keep_dropout if options.keep_dropout is None else bool(options.keep_dropout),
                       autocast=_dtype(options.autocast))
    if options.loss is not None:
        config = dataclasses.replace(config, loss=_loss(options.loss))
    elif any(map(is_summary, ref.output_grads.values())):
        raise FxdiffError("the reference capture keeps its outputs' gradients as summaries (--keep summary, outputs "
                          f"over {Keep.OUTPUT_BYTES >> 20} MiB), which cannot seed the candidate's backward pass; "
                          "give the candidate's loss", option="loss")
    elif ref.output_grads:
        config = dataclasses.replace(config, backward_seed=BackwardSeed(tree.flatten(ref.outputs), ref.output_grads))
    elif info.loss not in (None, "random cotangent"):
        raise FxdiffError("the reference capture holds no output gradients (it was made by an older fxdiff) and "
                          "its loss was code; give the candidate's loss", option="loss")
    with _built(cand, options) as (model, meta):
        args, kwargs = _candidate_inputs(ref, model, options, meta)
        with step(f"running {_label(cand)}"):
            once = record(model, args, kwargs, config, tracer=options.tracer, meta=meta)
        draws = _reference_draws(ref, once, options, user_map)
        if not draws:
            return once
        with step(f"running {_label(cand)} again with the reference's random draws"):
            return record(model, args, kwargs, dataclasses.replace(config, replay=draws), tracer=options.tracer,
                          meta=meta)


def _candidate_inputs(ref: Capture, model: torch.nn.Module, options: LiveOptions,
                      meta: dict[str, Any]) -> tuple[tuple, dict]:
    """A live candidate's call: ``options.inputs``, or the reference's saved inputs, floating ones in
    the candidate's own dtype unless one is asked for, requiring grad where the reference's did."""
    if options.inputs is not None:
        meta["inputs"] = options.inputs if isinstance(options.inputs, str) else "given in Python"
        return _inputs(options.inputs, model, options)
    first = next(model.parameters(), None)
    own = options if options.dtype is not None or first is None or not first.is_floating_point() \
        else dataclasses.replace(options, dtype=first.dtype)
    args, kwargs = _inputs((tuple(ref.inputs.get("args", ())), dict(ref.inputs.get("kwargs", {}))), model, own)
    meta["inputs"] = "the reference's saved inputs"
    with_grad = {n.target for n in ref.graph.nodes if n.op == "placeholder" and n.name in ref.grads}
    for path, t in tree.flatten({"args": args, "kwargs": kwargs}):
        if input_target(path) in with_grad and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_()
    return args, kwargs


def _reference_draws(ref: Capture, cand: Capture, options: LiveOptions,
                     user_map: UserMap | None) -> dict[int, torch.Tensor]:
    """The replay table for a candidate run once: empty unless replay is on, the tracer eager and both sides drew."""
    if not (options.rng_replay and options.tracer == "eager" and drew(ref, cand)):
        return {}
    with step("matching random ops"):
        return replay_table(ref, cand, match(ref, cand, user_map))


def map_params(ref: Side | torch.nn.Module, cand: Side | torch.nn.Module, *,
               user_map: UserMap | str | None = None, **run: Any) -> ParamMap:
    """Which ``cand`` parameter(s) hold each ``ref`` parameter, and with what transform.

    The full matcher runs: tensors of equal content (norm weights of ones, zero biases) are told
    apart by the matched ops that consume them.
    """
    options = LiveOptions(**run)
    ref_capture = _reference(ref, options)
    user_map = _user_map(user_map)
    params_only = UserMap(params=user_map.params) if user_map else None
    cand_capture = run_candidate(ref_capture, cand, options, params_only) if _is_live(cand) else _as_capture(cand)
    with step("matching"):
        alignment = match(ref_capture, cand_capture, params_only)
    rank = {name: i for i, name in enumerate(ref_capture.params)}
    pairs = sorted(alignment.params, key=lambda p: rank.get(p.ref, len(rank)))
    return ParamMap(pairs, alignment.unmatched_ref_params, alignment.unmatched_cand_params,
                    cand_shapes={k: list(v.shape) for k, v in cand_capture.params.items()})


def convert(mapping: ParamMap, ref_checkpoint: str | dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A state dict for the candidate built from a reference checkpoint through ``mapping``, and
    the candidate tensors it could not fill."""
    state = specs.read_state_dict(ref_checkpoint) if isinstance(ref_checkpoint, str) else ref_checkpoint
    return convert_state(state, mapping.pairs, {k: tuple(v) for k, v in mapping.cand_shapes.items()})


def save_inputs(path: str | os.PathLike, args: tuple = (), kwargs: dict | None = None) -> Path:
    """Write a model call as ``.safetensors`` for ``inputs``, atomically: tensors (copies, so
    tensors sharing memory can be written), and non-tensor arguments in its metadata."""
    from .util import atomic_write
    return atomic_write(path, specs.inputs_file(tuple(args), dict(kwargs or {})))


def write_checkpoint(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict as ``.safetensors``, atomically."""
    from safetensors.torch import save as st_save

    from .util import atomic_write
    return atomic_write(path, st_save({k: v.contiguous() for k, v in state.items()}))


# -- the rules, in one place --------------------------------------------------------------------

def _is_live(side: Any) -> bool:
    """A module, a model spec, a Hugging Face model directory or a ``.nemo`` file: a model to run."""
    if isinstance(side, torch.nn.Module):
        return True
    return isinstance(side, (str, os.PathLike)) and not is_capture(side) and (
        ":" in str(side) or specs.is_model_file(str(side)))


def _as_capture(side: Side, checks: list[Callable[[], None]] | None = None) -> Capture:
    """``side`` as a capture; with ``checks``, a directory's digest is checked in a thread and the
    function that waits for that check is appended to ``checks``."""
    if isinstance(side, Capture):
        return side
    if isinstance(side, (str, os.PathLike)) and not Path(side).is_dir() and ":" not in str(side):
        raise FxdiffError(f"{side}: not a capture directory nor a model (file.py:function, a Hugging Face model "
                          "directory or a .nemo file)")
    with step(f"loading {side}"):
        if checks is None:
            return load(side)
        capture, check = load_deferred(side)
    checks.append(check)
    return capture


def _reference(ref: Side | torch.nn.Module, options: LiveOptions,
               checks: list[Callable[[], None]] | None = None) -> Capture:
    return capture_spec(ref, **dataclasses.asdict(options)) if _is_live(ref) else _as_capture(ref, checks)


@contextlib.contextmanager
def _built(model: str | torch.nn.Module, options: LiveOptions) -> Iterator[tuple[torch.nn.Module, dict[str, Any]]]:
    """The model (weights loaded, placed on the device and dtype asked for) and metadata about it.
    A module given in Python is changed only for the block: its tensors are put back after it."""
    meta: dict[str, Any] = {}
    restore = None
    if isinstance(model, (str, os.PathLike)):
        meta["model"] = str(model)
        model = specs.load_model(str(model))
    elif options.checkpoint or options.device or options.dtype:
        restore = _tensors_put_back(model, copy=bool(options.checkpoint))
    try:
        if options.checkpoint:
            loaded = specs.load_checkpoint(model, options.checkpoint)
            meta["checkpoint"] = dataclasses.asdict(loaded)
        placed, _, _ = specs.place(model, (), {}, options.device, _dtype(options.dtype))
        yield placed, meta
    finally:
        if restore is not None:
            restore()


def _tensors_put_back(model: torch.nn.Module, copy: bool) -> Callable[[], None]:
    """A function that gives ``model``'s parameters and buffers back the tensors they hold now
    (``Module.to`` replaces them); with ``copy``, copies of them (loading a checkpoint writes into them)."""
    held = [(m, kind, name, t, t.data.clone() if copy else t.data, t.grad)
            for m in model.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items() if t is not None]

    def restore() -> None:
        for m, kind, name, t, data, grad in held:
            getattr(m, kind)[name] = t   # the object the caller held, holding its own data again
            t.data = data
            if t.grad is not grad:
                t.grad = grad
    return restore


def _inputs(inputs: Any, model: torch.nn.Module, options: LiveOptions) -> tuple[tuple, dict]:
    """The call's arguments, on the model's device, floating tensors in ``options.dtype`` if given:
    from a spec, an ``(args, kwargs)`` pair, or what a spec may return (a dict of keyword
    arguments, a tuple of positional ones, one tensor)."""
    if isinstance(inputs, str):
        args, kwargs = specs.load_inputs(inputs)
    elif isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], (tuple, list)) \
            and isinstance(inputs[1], dict):
        args, kwargs = tuple(inputs[0]), inputs[1]
    else:
        try:
            args, kwargs = specs.split_call(inputs, "inputs")
        except FxdiffError as e:
            raise FxdiffError(str(e), option="inputs") from None
    first = next(model.parameters(), None)
    device = options.device or (str(first.device) if first is not None else None)
    _, args, kwargs = specs.place(model, args, kwargs, device, _dtype(options.dtype))
    return args, kwargs


def _user_map(user_map: UserMap | str | os.PathLike | None) -> UserMap | None:
    if isinstance(user_map, (str, os.PathLike)):
        try:
            return UserMap.load(str(user_map))
        except FxdiffError as e:
            raise FxdiffError(str(e), option="map") from None
    return user_map


def _loss(loss: LossSpec) -> Callable[..., torch.Tensor] | None:
    return specs.load_loss(loss) if isinstance(loss, str) else loss


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    return specs.parse_dtype(dtype) if isinstance(dtype, str) else dtype


def _label(side: Any) -> str:
    if isinstance(side, (str, os.PathLike)):
        return str(side)
    if isinstance(side, torch.nn.Module):
        return type(side).__name__
    return (side.info.model or "capture") if isinstance(side, Capture) else str(side)


_SETUP = ("mode", "keep_dropout", "dtype", "device", "seed", "torch", "autocast")
_OVERRIDDEN = ("mode", "keep_dropout", "seed")   # a live candidate's, when its options change them


def _setup_differences(ref: Capture, cand: Capture, keys: tuple[str, ...] = _SETUP) -> list[str]:
    """How two captures were run differently, in words: each difference can explain a divergence."""
    out = []
    ref_info, cand_info = ref.info, cand.info
    for key in keys:
        a, b = getattr(ref_info, key), getattr(cand_info, key)
        if a != b:
            out.append(f"the captures differ in {key}: {a} vs {b}")
    return out

