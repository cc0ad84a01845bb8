"""A capture written while the model runs (``capture(..., stream_to=path)``, the CLI's ``-o``).

Each value and gradient is copied as it is produced, the moment the recorder sees it, into the
tensor file's write buffers, and a background thread writes them to disk; the recorder then keeps
nothing of it. A capture so costs the model's own memory plus the buffers (``BUFFERS`` x 8 MiB),
not the sum of every value and gradient. Copying when produced is what the recorder's
copy-on-write rules need: the bytes are the value as produced, whatever the model writes later.

On a GPU the copy is a device-to-device clone in the model's stream (ordered before any later
in-place write, and fast), then an asynchronous copy to pinned host memory on a side stream that
overlaps compute; a feeder thread waits for each and hands it to the writer. At most ``IN_FLIGHT``
bytes are in transit; past that the model waits for the disk.

Views share storage: a tensor whose bytes lie inside a blob already written, of a storage not
written to since (its version counter unchanged), is stored as a view of that blob, as ``save``
does. The file is the same safetensors layout as ``save`` writes, with the header in space reserved
at its start and written last; so its digest is two xxh3 digests, of the header and of the data
(manifest ``{"xxh3_64_header", "xxh3_64_data", "data_offset"}``), and such a capture is format
version 4. What is not a value or a gradient (parameters, their gradients, inputs and outputs)
is appended when the run ends.

Every ``TRIM`` bytes the C heap's free pages go back to the system (glibc's ``malloc_trim``): the
model's tensors freed during backward, between the small objects a capture allocates meanwhile,
are otherwise kept by the allocator (on layers of GPT-2 774M's shape the peak grew by 0.17 GiB a
layer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import mmap
import os
import queue
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import torch
import xxhash

from ..errors import FxdiffError
from .tensor_file import _ALIGN, _FILE_ALIGN, FORMAT, _span_bytes, _Writer, byte_span

HEADER = 1 << 20          # bytes reserved for the safetensors header (some 6000 tensors; moved if more)
BUFFERS = 8               # write buffers of 8 MiB: bursts up to 64 MiB do not wait for the disk
IN_FLIGHT = 1 << 30       # bytes of GPU copies in transit at most
TRIM = 1 << 28            # bytes stored between two returns of the C heap's free pages


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


class TensorStream:
    """The tensor file of a capture being written while the model runs (see the module docstring).

    ``put(key, t)`` copies ``t`` (``"value/NAME"``, ``"grad/NAME"``...) into the file; ``close()``
    writes the header and returns ``(bytes, digest)`` for the manifest; ``abort()`` gives up.
    Thread-safe: gradients arrive from autograd's threads.
    """

    def __init__(self, file: Path):
        self.file = file
        self._reserve = HEADER
        self._writer = _Writer(file, base=self._reserve, buffers=BUFFERS)
        self._lock = threading.RLock()
        self._blobs: list[list[int]] = []          # [offset in data, length] (length padded)
        self._views: dict[str, list] = {}
        self._spans: dict[tuple[str, int], list] = {}   # storage -> [(storage ref, version, first, end, blob)]
        self._closed = False
        self._gpu: _GpuFeeder | None = None
        self._untrimmed = 0
        self.error: BaseException | None = None

    # -- adding tensors
    def put(self, key: str, t: torch.Tensor) -> None:
        """Store ``t`` under ``key`` as it is now."""
        first, end = byte_span(key, t)
        t = t.detach()
        gpu = None
        with self._lock:
            if self.error is not None:
                raise FxdiffError(f"{self.file}: writing the capture failed ({self.error})")
            storage = t.untyped_storage()
            sid = (str(t.device), storage.data_ptr())
            found = self._find(sid, t, first, end)
            if found is None:
                lo = first - first % _ALIGN
                blob, start = self._new_blob(sid, storage, t, lo, end)
                if storage.device.type == "cuda" and end > lo:
                    gpu = (blob, storage, lo, end)
                else:
                    self._append(blob, _span_bytes(storage, lo, end))   # copied to the CPU now
            else:
                blob, start = found
            self._views[key] = [blob, str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride()),
                                first - start]
            self._untrimmed += end - first
            trim = self._untrimmed >= TRIM
            if trim:
                self._untrimmed = 0
        if trim and _malloc_trim() is not None:
            _malloc_trim()(0)
        if gpu is not None:   # outside the lock: it may wait for the feeder, which takes the lock
            if self._gpu is None:
                with self._lock:
                    if self._gpu is None:
                        self._gpu = _GpuFeeder(self)
            self._gpu.put(*gpu)

    def _find(self, sid, t: torch.Tensor, first: int, end: int) -> tuple[int, int] | None:
        """A written blob of this storage, not written to since, that holds bytes ``first:end``.
        (The storage is known by a weak reference to its Python object, which torch keeps while the
        storage lives; where it does not, nothing is found and the bytes are written again.)"""
        for ref, version, lo, hi, blob in self._spans.get(sid, ()):
            if ref() is not None and version == t._version and lo <= first and end <= hi:
                return blob, lo
        return None

    def _new_blob(self, sid, storage: torch.UntypedStorage, t: torch.Tensor, lo: int, end: int) -> tuple[int, int]:
        blob = len(self._blobs)
        self._blobs.append([-1, end - lo + (-(end - lo) % _FILE_ALIGN)])
        spans = self._spans.setdefault(sid, [])
        if len(spans) > 8:   # storages freed since (their address reused): forget them
            spans[:] = [x for x in spans if x[0]() is not None]
        try:
            spans.append((weakref.ref(storage), t._version, lo, end, blob))
        except TypeError:
            pass
        return blob, lo

    def _append(self, blob: int, data: memoryview) -> None:
        """Write ``data`` as blob ``blob`` (under the lock; from the feeder thread for GPU blobs)."""
        with self._lock:
            self._blobs[blob][0] = self._writer.size
            self._writer.write(data)
            pad = self._blobs[blob][1] - len(data)
            if pad:
                self._writer.write(memoryview(bytes(pad)))

    # -- ending
    def close(self) -> tuple[int, dict[str, Any]]:
        """Wait for the last copies, write the header; returns (file bytes, manifest digest)."""
        if self._gpu is not None:
            self._gpu.close()
        if self.error is not None:
            self.abort()
            raise FxdiffError(f"{self.file}: writing the capture failed ({self.error})")
        header: dict[str, Any] = {}
        for i, (offset, length) in enumerate(self._blobs):
            header[f"storage/{i}"] = {"dtype": "U8", "shape": [length], "data_offsets": [offset, offset + length]}
        header["__metadata__"] = {"format": FORMAT, "views": json.dumps(self._views, separators=(",", ":"))}
        head = json.dumps(header, separators=(",", ":")).encode()
        writer = self._writer
        writer.__exit__(None, None, None)
        self._closed = True
        reserve = self._reserve
        if len(head) > reserve - 8:   # more tensors than the space kept for the header: move the data
            reserve = len(head) + 8 + (-(len(head) + 8) % self._reserve)
            _move_data(self.file, self._reserve, reserve, writer.size)
        head = (reserve - 8).to_bytes(8, "little") + head + b" " * (reserve - 8 - len(head))
        buf = mmap.mmap(-1, reserve)   # page-aligned, as O_DIRECT wants
        buf[:] = head
        fd = os.open(self.file, os.O_WRONLY)
        try:
            view = memoryview(buf)
            written = 0
            while written < reserve:
                written += os.pwrite(fd, view[written:], written)
            view.release()
        finally:
            os.close(fd)
            buf.close()
        digest = {"xxh3_64_header": xxhash.xxh3_64_hexdigest(head), "xxh3_64_data": writer.digest,
                  "data_offset": reserve}
        return reserve + writer.size, digest

    def abort(self) -> None:
        if self._gpu is not None:
            self._gpu.close(drain=False)
        if not self._closed:
            self._closed = True
            try:
                self._writer.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except Exception:  # noqa: BLE001 -- the capture is being abandoned
                pass


def _move_data(file: Path, old: int, new: int, size: int) -> None:
    """Move ``size`` bytes at ``old`` to ``new`` (> old) in ``file``, copying from the end."""
    with open(file, "r+b") as f:
        end = size
        step = 1 << 26
        while end > 0:
            start = max(0, end - step)
            f.seek(old + start)
            chunk = f.read(end - start)
            f.seek(new + start)
            f.write(chunk)
            end = start


class _GpuFeeder:
    """Copies GPU blobs to pinned host memory on a side stream and feeds them to the writer."""

    def __init__(self, stream: TensorStream):
        self.owner = stream
        self.copies: dict[torch.device, torch.cuda.Stream] = {}
        self.queue: queue.Queue = queue.Queue()
        self.in_flight = 0
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="fxdiff-stream-gpu", daemon=True)
        self.thread.start()

    def put(self, blob: int, storage: torch.UntypedStorage, lo: int, end: int) -> None:
        n = end - lo
        with self.cv:
            while self.in_flight and self.in_flight + n > IN_FLIGHT:
                self.cv.wait()
            self.in_flight += n
        device = storage.device
        with torch.cuda.device(device):
            copies = self.copies.get(device)
            if copies is None:
                copies = self.copies[device] = torch.cuda.Stream(device)
            span = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, lo, (n,), (1,))
            clone = span.clone()     # in the model's stream: before any later in-place write
            ready = torch.cuda.Event()
            ready.record()
            host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            with torch.cuda.stream(copies):
                copies.wait_event(ready)
                host.copy_(clone, non_blocking=True)
                done = torch.cuda.Event()
                done.record(copies)
            clone.record_stream(copies)   # its memory is not reused before the copy ends
            del clone, span
        self.queue.put((blob, host, done, n))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            blob, host, done, n = item
            try:
                done.synchronize()
                if self.owner.error is None:
                    self.owner._append(blob, memoryview(host.numpy()))
            except BaseException as e:  # noqa: BLE001 -- reported by close()
                self.owner.error = e
            finally:
                with self.cv:
                    self.in_flight -= n
                    self.cv.notify_all()

    def close(self, drain: bool = True) -> None:
        if not drain:
            self.owner.error = self.owner.error or RuntimeError("aborted")
        self.queue.put(None)
        self.thread.join()


# -- the capture directory around it -----------------------------------------------------------

_OPEN: dict[str, "CaptureStream"] = {}


class CaptureStream:
    """A capture directory being written during a run: holds the write lock of ``path`` and a
    temporary directory beside it; ``finish(capture)`` completes and swaps it in (``save``'s
    guarantees: a reader or a kill sees the old capture or the new one)."""

    def __init__(self, path: str | os.PathLike):
        from .capture_dir import MANIFEST, TENSORS, writing
        self.path = Path(path)
        if self.path.exists() and not (self.path / MANIFEST).is_file():
            raise FxdiffError(f"{self.path}: exists and is not an fxdiff capture; refusing to overwrite it")
        previous = _OPEN.pop(str(self.path.resolve()), None)
        if previous is not None:   # a run that was recorded again (copying): its stream is dropped
            previous.abort()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FxdiffError(f"{self.path}: cannot create its folder ({e.strerror})") from None
        self._lock = writing(self.path)
        self._lock.__enter__()
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
            self.tensors = TensorStream(self.tmp / TENSORS)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        self.done = False
        _OPEN[str(self.path.resolve())] = self
        self._finalizer = weakref.finalize(self, CaptureStream._cleanup, self.tensors, self.tmp, self._lock)

    def put(self, key: str, t: torch.Tensor) -> None:
        self.tensors.put(key, t)

    @staticmethod
    def _cleanup(tensors: TensorStream, tmp: Path, lock) -> None:
        tensors.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            lock.__exit__(None, None, None)
        except Exception:  # noqa: BLE001
            pass

    def abort(self) -> None:
        if not self.done:
            self.done = True
            _OPEN.pop(str(self.path.resolve()), None)
            self._finalizer()

    def finish(self, capture, targets=None) -> Path:
        """Write what the run left (parameters, gradients, inputs, outputs), the header, the graph
        and the manifest, and put the capture in place."""
        from .capture_dir import _finish_streamed
        try:
            _finish_streamed(self, capture, targets)
        except BaseException:
            self.abort()
            raise
        self.done = True
        _OPEN.pop(str(self.path.resolve()), None)
        self._finalizer.detach()
        try:
            self._lock.__exit__(None, None, None)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)   # the old capture, swapped out (or nothing)
        return self.path
