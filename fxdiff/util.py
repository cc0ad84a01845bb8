"""Small helpers every stage shares: a garbage-collector pause, atomic writes, strict JSON."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import FxdiffError


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block: recording and matching create many
    objects, none of them cyclic garbage, and collections triggered by them rescan the whole heap."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader (or a kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise FxdiffError(f"{path}: cannot write here ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FxdiffError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by a string (``"inf"``, ``"-inf"``, ``"nan"``),
    so that it can be written as strict JSON, which has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_float(x: Any) -> float | None:
    """The inverse of ``finite`` for one number: ``"inf"`` -> ``math.inf``; None stays None."""
    return None if x is None else float(x)


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (no ``Infinity``/``NaN`` tokens): non-finite floats become strings, see ``finite``."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
