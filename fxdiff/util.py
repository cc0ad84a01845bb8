"""Small helpers every stage shares: a garbage-collector pause, atomic writes, strict JSON."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import json
import math
import mmap
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import orjson

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


def read_regular(path: str | os.PathLike, what: str = "") -> bytes:
    """The bytes of ``path``, which must be a regular file (a link to one is fine): a directory,
    a FIFO, a device or a link loop is refused without blocking on it. ``what`` starts the
    message (default: the path)."""
    label = what or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FxdiffError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise FxdiffError(f"{label}: is a directory, expected a file") from None
    except OSError as e:
        raise FxdiffError(f"{label}: cannot be read ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
            raise FxdiffError(f"{label}: is {kind}, expected a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise FxdiffError(f"{label}: cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)


def check_replaceable(path: str | os.PathLike, what: str = "") -> None:
    """Refuse an existing ``path`` that a new file must not replace: anything but a regular file
    (a directory, a device such as ``/dev/full``, a FIFO, a socket). ``what`` starts the message."""
    label = what or str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise FxdiffError(f"{label}: cannot write here ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise FxdiffError(f"{label}: is a directory")
    if not stat.S_ISREG(mode):
        raise FxdiffError(f"{label}: exists and is not a regular file; refusing to replace it")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader (or a kill) sees the old file or the new one, never half of one. An existing ``path``
    that is not a regular file (a directory, a device, a FIFO) is refused, never replaced; a
    link to a regular file is written through (the file it points at is replaced)."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    check_replaceable(path)
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


def json_bytes(obj: Any) -> bytes:
    """Compact JSON of a large document whose writer passed every float through ``finite`` (orjson,
    some 15x faster than ``json``, writes a non-finite float as ``null`` instead of failing); what
    orjson refuses (integers past 64 bits, types it does not know) goes through ``dumps``."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return dumps(obj, separators=(",", ":")).encode()


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (no ``Infinity``/``NaN`` tokens): non-finite floats become strings, see ``finite``."""
    try:   # most documents hold none: only those that do are walked
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(finite(obj), allow_nan=False, **kwargs)


def dontneed(data: mmap.mmap, start: int, length: int) -> None:
    """Unmap the pages of ``data[start:start + length]`` from this process (the file's pages stay in
    the page cache, and are mapped again when touched)."""
    if not hasattr(mmap, "MADV_DONTNEED") or length <= 0:
        return
    page = mmap.PAGESIZE
    lo = start - start % page
    hi = min(len(data), start + length + (-(start + length) % page))
    try:
        data.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):
        pass


def tensor_version(t: Any) -> int | None:
    """A tensor's version counter (``t._version``), or None for an inference tensor, which keeps
    none (made under ``torch.inference_mode()``, it cannot be written outside it)."""
    try:
        return t._version
    except RuntimeError:
        return None


@functools.cache
def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``"float32"`` (cached: it is asked for every tensor recorded or stored)."""
    return str(dtype).removeprefix("torch.")


@functools.cache
def named_dtype(name: str) -> Any:
    """The torch dtype ``dtype_name`` calls ``name`` (``"float32"``; not an alias such as ``"float"``),
    or None: a name read from a file is looked up, never called."""
    import torch   # here, not at the top: this module is imported before torch is (``digest``)
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype_name(dtype) == name else None


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library (looked up once: ``find_library`` runs ``ldconfig``), or None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None
