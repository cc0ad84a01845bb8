"""The tensor file of a capture: a safetensors file of byte blobs, one per storage.

Views share storage (``x.view``, ``x.t()``, a gradient passed on unchanged), so each storage's
bytes are written once, and ``__metadata__["views"]`` says how to rebuild each tensor from its
blob. The file is written by a background thread that also hashes it (xxh3), and read back by
memory-mapping it: loading a capture copies nothing, and tensors are paged in as they are used.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import json
import math
import mmap
import os
import stat
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import xxhash

from ..errors import FxdiffError

FORMAT = "fxdiff-capture"


def write_tensors(file: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """Write ``tensors`` as a safetensors file of byte blobs, one per storage; return (bytes, digest).

    Views share storage (``x.view``, ``x.t()``, a gradient passed on unchanged), so each storage's
    bytes are written once, as the span its tensors cover, and ``__metadata__["views"]`` says how
    to rebuild each tensor from its blob: ``[blob, dtype, shape, stride, byte offset]``. Nothing is
    copied to make a tensor contiguous.
    """
    spans: dict[tuple[str, int], list] = {}  # storage -> [first byte, end byte, storage]
    views = {}
    for key, t in tensors.items():
        if t.layout != torch.strided or t.device.type == "meta" or type(t) not in (torch.Tensor, torch.nn.Parameter):
            kind = "tensor" if type(t) is torch.Tensor else type(t).__name__
            raise FxdiffError(f"cannot store {key}: a {t.layout} {kind} on {t.device} holds no plain data")
        storage = t.untyped_storage()
        size = t.element_size()
        first = t.storage_offset() * size
        extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0
        sid = (str(t.device), storage.data_ptr())
        span = spans.setdefault(sid, [first, first + extent * size, storage])
        span[0], span[1] = min(span[0], first), max(span[1], first + extent * size)
        views[key] = [sid, str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride()), first]
    header: dict[str, Any] = {}
    offset = 0
    for i, span in enumerate(spans.values()):
        span[0] -= span[0] % _ALIGN  # every dtype's size divides it, so views stay aligned in their blob
        header[f"storage/{i}"] = {"dtype": "U8", "shape": [span[1] - span[0]],
                                  "data_offsets": [offset, offset + span[1] - span[0]]}
        offset += span[1] - span[0]
    index = {sid: i for i, sid in enumerate(spans)}
    for view in views.values():
        view[4] -= spans[view[0]][0]
        view[0] = index[view[0]]
    header["__metadata__"] = {"format": FORMAT, "views": json.dumps(views, separators=(",", ":"))}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with _Writer(file) as out:
        out.write(memoryview(len(head).to_bytes(8, "little") + head))
        for first, end, storage in spans.values():
            out.write(_span_bytes(storage, first, end))
    return out.size, out.digest


_ALIGN = 16


def _span_bytes(storage: torch.UntypedStorage, first: int, end: int) -> memoryview:
    """Bytes ``first:end`` of ``storage``, read in place on the CPU (copied from other devices)."""
    if end == first:
        return memoryview(b"")
    if storage.device.type == "cpu":  # the capture keeps the storage alive while this is read
        return memoryview((ctypes.c_char * (end - first)).from_address(storage.data_ptr() + first)).cast("B")
    span = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, first, (end - first,), (1,))
    return memoryview(span.cpu().numpy()).cast("B")


class _Writer:
    """Sequential file writer: the caller copies into page-aligned buffers while a background
    thread hashes (xxh3) and writes the full ones.

    Where the file system allows it, writes bypass the page cache (``O_DIRECT``): a capture is
    written once and read later, and where fresh memory is slow to fault in (virtual machines),
    filling the page cache costs more than the disk does. (Writing chunks from two threads at
    their offsets was measured slower: the disk prefers one sequential stream.)
    """

    CHUNK = 1 << 23
    ALIGN = 4096
    BUFFERS = 3

    def __init__(self, file: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd = os.open(file, flags | getattr(os, "O_DIRECT", 0), 0o666)
        except OSError:
            self.fd = os.open(file, flags, 0o666)
        self.size = 0
        self._hash = xxhash.xxh3_64()
        self._free = [mmap.mmap(-1, self.CHUNK) for _ in range(self.BUFFERS)]
        self._buf, self._fill = self._free.pop(), 0
        self._writes = ThreadPoolExecutor(1)
        self._pending: collections.deque[tuple[Future, mmap.mmap]] = collections.deque()

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def write(self, data: memoryview) -> None:
        self.size += len(data)
        while len(data):
            n = min(len(data), self.CHUNK - self._fill)
            self._buf[self._fill:self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == self.CHUNK:
                self._flush()

    def _flush(self) -> None:
        fill, length = self._fill, self._fill + (-self._fill % self.ALIGN)  # O_DIRECT writes whole blocks
        self._buf[fill:length] = bytes(length - fill)
        self._pending.append((self._writes.submit(self._write_all, memoryview(self._buf)[:length], fill), self._buf))
        if not self._free:
            written, buf = self._pending.popleft()
            written.result()
            self._free.append(buf)
        self._buf, self._fill = self._free.pop(), 0

    def _write_all(self, view: memoryview, data_bytes: int) -> None:
        self._hash.update(view[:data_bytes])
        direct = getattr(os, "O_DIRECT", 0)
        while len(view):
            try:
                view = view[os.write(self.fd, view):]
            except OSError as e:
                if e.errno != errno.EINVAL or not fcntl.fcntl(self.fd, fcntl.F_GETFL) & direct:
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~direct)  # refused here

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._fill:
                self._flush()
            for written, _ in self._pending:
                if exc_type is None:
                    written.result()
                else:
                    written.exception()  # wait; the error being raised already says what went wrong
            if exc_type is None:
                os.ftruncate(self.fd, self.size)  # drop the padding of the last block
        finally:
            self._writes.shutdown()
            os.close(self.fd)


def _rebuild(blobs: dict[str, torch.Tensor], views: dict[str, list], file: Path) -> dict[str, torch.Tensor]:
    """The tensors that ``views`` describes, as views of their storage blobs."""
    tensors = {}
    for key, (blob, dtype_name, shape, stride, first) in views.items():
        dtype = getattr(torch, str(dtype_name), None)
        data = blobs.get(f"storage/{blob}")
        if data is not None and data.data_ptr() % _ALIGN:
            data = blobs[f"storage/{blob}"] = data.clone()
        if not isinstance(dtype, torch.dtype) or str(dtype) != f"torch.{dtype_name}" or data is None or first < 0 \
                or min(shape + stride + [0]) < 0:
            raise FxdiffError(f"{file}: tensor {key} has an invalid layout {[blob, dtype_name, shape, stride, first]}")
        size = dtype.itemsize
        extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if math.prod(shape) else 0
        if first % size or first + extent * size > data.numel():
            raise FxdiffError(f"{file}: tensor {key} reaches past the end of its storage blob")
        if not extent:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        tensors[key] = data[first:first + extent * size].view(dtype).as_strided(shape, stride)
    return tensors


def read_tensors(file: Path, size: int, digest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a file written by ``write_tensors``, checked against its size and digest
    (``{"xxh3_64": hex}``, or ``{"crc32": int}`` for version-2 captures), memory-mapped."""
    if not os.path.lexists(file):
        raise FxdiffError(f"{file}: missing; the capture is incomplete")
    try:   # never blocks: a FIFO or a device is refused before it is read
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise FxdiffError(f"{file}: cannot be read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FxdiffError(f"{file}: is {'a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}, "
                              "expected the capture's tensor file")
        if st.st_size != size:
            raise FxdiffError(f"{file}: {st.st_size} bytes, manifest says {size}; the capture is truncated or was "
                              "edited")
        if size < 8:
            raise FxdiffError(f"{file}: too short to be a tensor file")
        data = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    view = memoryview(data)
    if "xxh3_64" in digest:
        ok = xxhash.xxh3_64_hexdigest(view) == digest["xxh3_64"]
    else:
        ok = zlib.crc32(view) == digest.get("crc32")
    if not ok:
        raise FxdiffError(f"{file}: checksum mismatch; the capture was modified after it was written")
    try:
        head_len = int.from_bytes(view[:8], "little")
        header = json.loads(bytes(view[8:8 + head_len]))
        meta = header.pop("__metadata__")
        views = json.loads(meta["views"])
        blobs = {}
        at = 8 + head_len   # blobs follow one another, as safetensors requires: no gap, no overlap
        for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = (8 + head_len + int(o) for o in entry["data_offsets"])
            if entry.get("dtype") != "U8" or start != at or not start <= end <= size \
                    or entry.get("shape") != [end - start]:
                raise ValueError(f"blob {key} is not the next byte range of the file")
            at = end
            blobs[key] = torch.frombuffer(data, dtype=torch.uint8, count=end - start, offset=start) \
                if end > start else torch.empty(0, dtype=torch.uint8)
        if at != size:
            raise ValueError(f"{size - at} bytes at the end belong to no blob")
        if not isinstance(views, dict):
            raise ValueError("views is not a mapping")
        tensors = _rebuild(blobs, views, file)
        _check_layout(blobs, views, file)
        return tensors
    except FxdiffError:
        raise
    except Exception as e:  # noqa: BLE001 -- any malformed header is bad input
        raise FxdiffError(f"{file}: unreadable tensor file ({type(e).__name__}: {e})") from None


def _check_layout(blobs: dict[str, torch.Tensor], views: dict[str, list], file: Path) -> None:
    """The blobs are laid out as ``write_tensors`` lays them out: numbered in the order tensors first
    use them, each used, and each exactly the span its tensors cover (its start aligned down to
    ``_ALIGN``). A tensor re-pointed at another blob, or given a blob of its own, breaks this."""
    spans: dict[int, list[int]] = {}
    for key, (blob, dtype_name, shape, stride, first) in views.items():   # valid: _rebuild took them
        if type(blob) is not int:
            raise FxdiffError(f"{file}: tensor {key} names blob {str(blob)[:20]!r}, expected a number")
        if blob not in spans and blob != len(spans):
            raise FxdiffError(f"{file}: tensor {key} uses blob {blob} before blob {len(spans)}; the tensor file was "
                              "not written by fxdiff or was edited")
        size = getattr(torch, dtype_name).itemsize
        extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if math.prod(shape) else 0
        span = spans.setdefault(blob, [first, first + extent * size])
        span[0], span[1] = min(span[0], first), max(span[1], first + extent * size)
    for blob, (first, end) in spans.items():
        if first >= _ALIGN or end != blobs[f"storage/{blob}"].numel():
            raise FxdiffError(f"{file}: blob {blob} holds bytes no tensor reads; the tensor file was not written "
                              "by fxdiff or was edited")
    if len(spans) != len(blobs):
        raise FxdiffError(f"{file}: {len(blobs) - len(spans)} blobs are read by no tensor; the tensor file was not "
                          "written by fxdiff or was edited")
