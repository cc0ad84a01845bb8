"""What can go wrong, and whose fault it is: the exit code of every failure follows from its type.

- ``FxdiffError``: bad input (a file, an option, a capture that is not valid data). Exit 2.
- ``UserCodeError``: the user's own code (a model spec, an inputs or loss function, the model's
  forward) raised. Exit 2, with the spec and the file:line of the user's frame.
- anything else escaping fxdiff is a bug in fxdiff. Exit 3, with its traceback.

Messages speak of files and API parameters, never of command-line flags: ``option`` names the
parameter a message is about, and the CLI adds its flag.
"""

from __future__ import annotations

import traceback
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


class FxdiffError(Exception):
    """Bad input. ``option`` names the parameter it concerns (``"inputs"``, ``"checkpoint"``...)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class UserCodeError(FxdiffError):
    """The user's own code raised: a model builder, an inputs or loss function, a model's forward."""


def user_frame(exc: BaseException) -> str | None:
    """``file:line`` of the innermost traceback frame outside fxdiff and torch, if there is one."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_PACKAGE) and "/torch/" not in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else None


def in_fxdiff(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is fxdiff's own code."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(_PACKAGE)


def blame_user(what: str, exc: BaseException) -> UserCodeError:
    """A one-line error saying that ``what`` (e.g. ``"model spec port.py:build"``) raised ``exc``."""
    first = (str(exc).strip().splitlines() or [""])[0]
    where = user_frame(exc)
    text = f"{what} raised {type(exc).__name__}" + (f": {first}" if first else "") + (f" at {where}" if where else "")
    return UserCodeError(text)
