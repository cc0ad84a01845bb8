"""Compare two captures, or a capture and a live model: load -> match -> judge -> report."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from . import store
from .capture import Capture
from .judge import Tolerance, judge
from .match import UserMap, match
from .record import record
from .report import Report

Side = Capture | str | os.PathLike


def as_capture(side: Side) -> Capture:
    """A capture object from a capture or a capture directory."""
    return side if isinstance(side, Capture) else store.load(side)


def rerun(ref: Capture, model: torch.nn.Module, *, loss: Callable[[Any], torch.Tensor] | None = None,
          args: tuple | None = None, kwargs: dict | None = None, meta: dict | None = None) -> Capture:
    """Record ``model`` on ``ref``'s saved inputs with its seed and mode (or the given inputs)."""
    if args is None and kwargs is None:
        args, kwargs = tuple(ref.inputs.get("args", ())), dict(ref.inputs.get("kwargs", {}))
    return record(model, args or (), kwargs or {}, loss=loss, seed=int(ref.meta.get("seed", 0)),
                  mode=ref.meta.get("mode", "eval"), keep_dropout=bool(ref.meta.get("keep_dropout", False)),
                  meta=meta)


def compare(ref: Side, cand: Side | torch.nn.Module, *, tolerance: Tolerance = Tolerance(),
            loss: Callable[[Any], torch.Tensor] | None = None, user_map: UserMap | None = None) -> Report:
    """Align ``cand`` to ``ref`` and judge every pair; a module ``cand`` runs on ``ref``'s inputs."""
    ref_capture = as_capture(ref)
    if isinstance(cand, torch.nn.Module):
        cand_capture = rerun(ref_capture, cand, loss=loss)
    else:
        cand_capture = as_capture(cand)
    alignment = match(ref_capture, cand_capture, user_map)
    return judge(ref_capture, cand_capture, alignment, tolerance,
                 ref_label=_label(ref), cand_label=_label(cand))


def _label(side: Any) -> str:
    if isinstance(side, (str, os.PathLike)):
        return str(side)
    if isinstance(side, torch.nn.Module):
        return type(side).__name__
    return side.meta.get("model", "capture") if isinstance(side, Capture) else str(side)
