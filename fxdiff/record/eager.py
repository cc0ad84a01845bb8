"""The default tracer: record the model's own eager run (see ``recorder.py``)."""

from __future__ import annotations

import torch

from .recorder import Aliased, Recorder
from .session import Run, RunConfig, prepared, record_run


def record_eager(model: torch.nn.Module, args: tuple, kwargs: dict, config: RunConfig,
                 recorder: type[Recorder] = Recorder) -> Run:
    """Run ``model(*args, **kwargs)`` forward and backward once under ``recorder``.

    Values are held by reference; if a write the recorder did not foresee overwrote one, the run
    is recorded again, copying every value as it is produced.
    """
    try:
        return _run(model, args, kwargs, config, recorder, copy=False)
    except Aliased:
        return _run(model, args, kwargs, config, recorder, copy=True)


def _run(model, args, kwargs, config, recorder_cls, copy) -> Run:
    with prepared(model, args, kwargs, config) as (before, call_args, call_kwargs):
        rec = recorder_cls(model, disable_dropout=config.disable_dropout, copy=copy)
        run = record_run(model, rec, call_args, call_kwargs,
                         lambda a=call_args, k=call_kwargs: model(*a, **k), config, before)
        del call_args, call_kwargs
        rec.release()
    return run
