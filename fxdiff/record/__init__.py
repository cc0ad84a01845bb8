"""Load model -> **record**: run a model once, forward and backward, and record it as a ``Capture``.

A tracer is a function ``(model, args, kwargs, RunConfig) -> Run``; ``TRACERS`` holds the two that
ship (``eager``, the default, records the model's own run; ``fx`` runs its
``torch.fx.symbolic_trace`` graph). A new tracer is one function, passed in ``tracers``.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Mapping

import torch

from ..errors import FxdiffError
from ..model.capture import Capture
from ..util import gc_paused
from .eager import record_eager
from .fx import record_fx
from .recorder import Recorder
from .session import BackwardSeed, Loss, Run, RunConfig, assemble, input_target, objective

Tracer = Callable[[torch.nn.Module, tuple, dict, RunConfig], Run]
TRACERS: Mapping[str, Tracer] = {"eager": record_eager, "fx": record_fx}

__all__ = ["BackwardSeed", "Loss", "input_target", "objective", "Recorder", "RunConfig", "TRACERS", "record"]


def record(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, config: RunConfig = RunConfig(),
           *, tracer: str = "eager", tracers: Mapping[str, Tracer] = TRACERS,
           meta: dict[str, Any] | None = None) -> Capture:
    """Run ``model(*args, **kwargs)`` forward and backward once, as ``config`` says, and record it.

    The model's tensors, grads, train/eval flags and every RNG state are left exactly as they were.
    """
    if tracer not in tracers:
        raise FxdiffError(f"tracer must be one of {', '.join(tracers)}, not {tracer!r}", option="tracer")
    started = datetime.datetime.now(datetime.timezone.utc)
    with gc_paused():
        run = tracers[tracer](model, tuple(args), dict(kwargs or {}), config)
        return assemble(model, run, tracer=tracer, config=config, started=started, meta=meta)
