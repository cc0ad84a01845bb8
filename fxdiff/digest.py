"""Digests of capture tensor files (xxh3), checked in a background thread.

Checking a capture's tensor file reads every byte of it, so ``compare`` does it in a thread while
it matches and judges. This module does not import torch: the command line starts the checks of
the captures it was given (``start``) before it imports torch, which takes seconds, and the
loader later joins the check already under way (``check_later``) instead of reading the file again.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import xxhash

from .errors import FxdiffError
from .util import dontneed, read_regular

MANIFEST, TENSORS = "manifest.json", "tensors.safetensors"
CHUNK = 1 << 26

# One thread: the digests are needed only when the report is, and a second thread would take a core
# from matching and judging, which are on the way there.
_POOL = ThreadPoolExecutor(1, thread_name_prefix="fxdiff-verify")
_STARTED: dict[str, tuple[tuple, Future]] = {}   # file -> (what was checked, the check)


def verify_digest(file: Path, digest: dict[str, Any], data: mmap.mmap | None = None) -> None:
    """Raise unless ``file`` (or its mapping ``data``) has ``digest``: ``{"xxh3_64": hex}``,
    ``{"crc32": int}`` (version 2), or, for a capture written while its model ran,
    ``{"xxh3_64_header": hex, "xxh3_64_data": hex, "data_offset": n}``. Reads the file once, in
    chunks whose pages are handed back as soon as they are hashed."""
    if sum(k in digest for k in ("xxh3_64", "xxh3_64_header", "crc32")) != 1:
        raise FxdiffError(f"{file}: the manifest gives no single digest of it; the capture was edited")
    own = data is None
    if own:
        with open(file, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None
    try:
        if "xxh3_64_header" in digest:
            split = digest.get("data_offset")
            size = len(data) if data is not None else 0
            ok = isinstance(split, int) and 0 <= split <= size and \
                _digest_of(data, "xxh3", 0, split) == digest["xxh3_64_header"] and \
                _digest_of(data, "xxh3", split, size) == digest.get("xxh3_64_data")
        elif "xxh3_64" in digest:
            ok = _digest_of(data, "xxh3") == digest["xxh3_64"]
        else:
            ok = _digest_of(data, "crc32") == digest.get("crc32")
    finally:
        if own and data is not None:
            data.close()
    if not ok:
        raise FxdiffError(f"{file}: checksum mismatch; the capture was modified after it was written")


def _digest_of(data: mmap.mmap | None, kind: str, lo: int = 0, hi: int | None = None) -> str | int:
    """xxh3-64 (hex) or CRC32 of ``data[lo:hi]``."""
    h = xxhash.xxh3_64() if kind == "xxh3" else None
    crc = 0
    size = len(data) if data is not None else 0
    hi = size if hi is None else hi
    with memoryview(data if data is not None else b"") as view:
        for start in range(lo, hi, CHUNK):
            end = min(hi, start + CHUNK)
            with view[start:end] as part:
                if h is not None:
                    h.update(part)
                else:
                    crc = zlib.crc32(part, crc)
            dontneed(data, start, end - start)
    return h.hexdigest() if h is not None else crc


def check_later(file: Path, digest: dict[str, Any]) -> Callable[[], None]:
    """Check ``file`` against ``digest`` in the background thread (joining a check that ``start``
    began on the same file, unchanged since, against the same digest); returns a function that
    waits for the check and raises ``FxdiffError`` if it failed."""
    key, started = _STARTED.pop(os.path.abspath(file), (None, None))
    if started is None or key != _key(file, digest):
        started = _POOL.submit(verify_digest, file, digest)
    return started.result


def start(capture_dir: str | os.PathLike) -> None:
    """Begin checking the tensor file of the capture at ``capture_dir``, if it is one; a later
    ``check_later`` of that file joins the check. Anything unreadable is left for the loader to
    report."""
    try:
        folder = Path(capture_dir)
        digest = json.loads(read_regular(folder / MANIFEST))["files"][TENSORS]
        key = _key(folder / TENSORS, digest)
    except (FxdiffError, ValueError, TypeError, KeyError, RecursionError):
        return
    file = os.path.abspath(folder / TENSORS)
    if key is not None and _STARTED.get(file, (None,))[0] != key:
        _STARTED[file] = key, _POOL.submit(verify_digest, folder / TENSORS, digest)


def _key(file: Path, digest: Any) -> tuple | None:
    """What makes two checks the same: the file (by identity, size and modification time) and the
    digest it is held to; None for what cannot be looked at or is not a regular file (a FIFO would
    block the check)."""
    try:
        st = os.stat(file)
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, json.dumps(digest, sort_keys=True)
    except (OSError, TypeError, ValueError):
        return None
