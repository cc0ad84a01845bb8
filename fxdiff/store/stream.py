"""A capture written while the model runs (``capture(..., stream_to=path)``, the CLI's ``-o``).

Each value and gradient goes to the tensor file as it is produced: a copier thread copies it into
the file's write buffers and a writer thread writes them to disk, so the model's own thread only
hands the tensor over. The stream holds a tensor only until it is copied, at most ``PENDING`` bytes
of them (past that the model waits); a capture so costs the model's own memory plus that and the
buffers (``BUFFERS`` x 8 MiB), not the sum of every value and gradient. An idle copier is woken
once ``WAKE`` bytes wait, not for each tensor: each wake cost the model's thread more than most
copies take. It takes up to ``BATCH`` bytes of tensors at a time and copies them all in one call
that does not hold the GIL (``tensor_file._Writer.write``), so that the model's thread, which needs
the GIL between ops, seldom waits for it (with the disk writes off, a copy per tensor with the GIL
taken back after each cost the ~1M-parameter GPT-2 of ``benchmarks/capture_overhead.py`` 8-10 ms a
run more than no copies at all; one call a batch, 1-3 ms). The bytes must be the value as
produced, whatever the model writes later: before a write the recorder foresees (``protect``), a tensor still queued is copied aside (one
being copied is waited for); a write it did not foresee is caught by the tensor's version counter,
checked when the copy is made and again at the recorder's next call (``verify``), and ``settle``
then names the tensor, so that the run is recorded again copying each tensor the moment it is
produced (``put(..., defer=False)``).

On a GPU the copy is a device-to-device clone in the model's stream (ordered before any later
in-place write, and fast), then an asynchronous copy to pinned host memory on a side stream that
overlaps compute; a feeder thread waits for each and hands it to the writer. At most
``GPU_IN_FLIGHT`` bytes of clones are on the GPU (the model's peak memory grows by no more) and
``HOST_IN_FLIGHT`` bytes wait in pinned memory for the disk; past those the model waits.

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

import collections
import os
import queue
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Collection

import torch
import xxhash

from ..errors import FxdiffError
from ..util import dtype_name, json_bytes, libc, tensor_version
from .tensor_file import _ALIGN, _FILE_ALIGN, FORMAT, _Writer, byte_span, map_written, padding, storage_bytes

HEADER = 1 << 20          # bytes reserved for the safetensors header (some 6000 tensors; moved if more)
BUFFERS = 8               # write buffers of 8 MiB: bursts up to 64 MiB do not wait for the disk
PENDING = 1 << 28         # bytes of CPU tensors waiting for the copier at most
WAKE = 1 << 23            # bytes waiting when an idle copier is woken (each wake costs the model's thread)
BATCH = 1 << 20           # bytes the copier takes from the queue at once
GPU_IN_FLIGHT = 1 << 27   # bytes of GPU clones being copied to the host at most
HOST_IN_FLIGHT = 1 << 31  # bytes of pinned host copies waiting for the disk at most
TRIM = 1 << 30            # bytes stored between two returns of the C heap's free pages (each costs time)
_SPANS = 16               # blobs of one storage that later views of it are looked for in


def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    return getattr(libc(), "malloc_trim", None)


class TensorStream:
    """The tensor file of a capture being written while the model runs (see the module docstring).

    ``put(key, t)`` stores ``t`` (``"value/NAME"``, ``"grad/NAME"``...) in the file; ``close()``
    writes the header and returns ``(bytes, digest)`` for the manifest; ``abort()`` gives up.
    Thread-safe: gradients arrive from autograd's threads.
    """

    def __init__(self, file: Path):
        self.file = file
        self._reserve = HEADER
        self._writer = _Writer(file, base=self._reserve, buffers=BUFFERS)
        self._lock = threading.RLock()          # the layout (blobs, views, spans) and the copier's queue
        self._write_lock = threading.Lock()     # one thread at a time appends to the file
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued = 0                        # bytes in the queue
        self._waiting: dict[int, int] = {}      # storage address -> its items queued or being copied
        self._copying: list[_Item] = []         # taken from the queue, being copied
        self._recent: list[_Item] = []          # copied; their version is checked once more (``verify``)
        self._copier: threading.Thread | None = None
        self._idle = False                      # the copier waits for work
        self._stop = False
        self.overwritten: str | None = None     # a tensor written to before it was copied
        self._blobs: list[list[int]] = []          # [offset in data, length] (length padded)
        self._views: dict[str, list] = {}
        self._spans: dict[tuple[str, int], list] = {}   # storage -> [(storage ref, version, first, end, blob)]
        self._closed = False
        self._gpu: _GpuFeeder | None = None
        self._untrimmed = 0
        self.error: BaseException | None = None

    # -- adding tensors
    def put(self, key: str, t: torch.Tensor, defer: bool = False) -> None:
        """Store ``t`` under ``key`` as it is now: copied before this returns, or with ``defer`` (a
        CPU tensor) by the copier thread, the caller calling ``protect`` before it writes to it."""
        first, end = byte_span(key, t)
        # no detach() or is_inference(): torch releases the GIL in those, and while the copier runs
        # taking it back cost 3-12 us a call
        version = tensor_version(t)
        gpu = now = None
        with self._lock:
            self._raise_failure()
            storage = t.untyped_storage()
            sid = (str(t.device), storage.data_ptr())
            found = self._find(sid, version, first, end)
            if found is None:
                lo = first - first % _ALIGN
                blob, start = self._new_blob(sid, storage, version, lo, end)
                if end == lo:
                    pass   # no bytes: close() places it at the end of the file
                elif storage.device.type == "cuda":
                    gpu = (blob, storage, lo, end)
                elif defer and storage.device.type == "cpu" and version is not None:
                    self._enqueue(_Item(key, blob, t, version, storage, lo, end))
                else:
                    now = (blob, storage, lo, end)
            else:
                blob, start = found
            self._view(key, t, blob, start, first)
            while self._queued > PENDING and self.error is None:
                self._changed.wait()
            self._untrimmed += end - first
            trim = self._untrimmed >= TRIM
            if trim:
                self._untrimmed = 0
        if now is not None:
            self._append([(now[0], storage_bytes(*now[1:]))])   # copied now
        if trim and _malloc_trim() is not None:
            _malloc_trim()(0)
        if gpu is not None:   # outside the lock: it may wait for the feeder, which takes the lock
            if self._gpu is None:
                with self._lock:
                    if self._gpu is None:
                        self._gpu = _GpuFeeder(self)
            self._gpu.put(*gpu)

    def put_all(self, tensors: dict[str, torch.Tensor]) -> None:
        """``put`` each of ``tensors``, copied now; the CPU tensors of one storage not written yet
        become one blob, the span they cover (as ``save`` writes them): many small views of one
        block (a summary capture's samples) cost one copy, not one each."""
        groups: dict[int, list] = {}
        for key, t in tensors.items():
            if not t.is_cpu or not t.numel() or t.layout != torch.strided:
                self.put(key, t)
            else:
                groups.setdefault(t.untyped_storage().data_ptr(), []).append((key, t, *byte_span(key, t)))
        for address, group in groups.items():
            if len(group) == 1:
                self.put(*group[0][:2])
                continue
            with self._lock:
                self._raise_failure()
                storage = group[0][1].untyped_storage()
                sid = ("cpu", address)
                found = [self._find(sid, tensor_version(x[1]), *x[2:]) for x in group] if sid in self._spans \
                    else [None] * len(group)
                new = [x for x, f in zip(group, found) if f is None]
                if new:
                    lo, hi = min(x[2] for x in new), max(x[3] for x in new)
                    lo -= lo % _ALIGN
                    blob, start = self._new_blob(sid, storage, tensor_version(new[0][1]), lo, hi)
                for (key, t, first, _), f in zip(group, found):
                    self._view(key, t, *(f or (blob, start)), first)
            if new:
                self._append([(blob, storage_bytes(storage, lo, hi))])

    def _raise_failure(self) -> None:
        """Raise what went wrong in a copying or writing thread, if anything did."""
        if self.error is not None:
            raise FxdiffError(f"{self.file}: writing the capture failed ({self.error})")

    def _view(self, key: str, t: torch.Tensor, blob: int, start: int, first: int) -> None:
        self._views[key] = [blob, dtype_name(t.dtype), list(t.shape), list(t.stride()), first - start]

    def _find(self, sid, version: int | None, first: int, end: int) -> tuple[int, int] | None:
        """A written blob of this storage, not written to since, that holds bytes ``first:end``.
        (The storage is known by a weak reference to its Python object, which torch keeps while the
        storage lives; where it does not, nothing is found and the bytes are written again.)"""
        if version is None:
            return None
        for ref, written, lo, hi, blob in self._spans.get(sid, ()):
            if ref() is not None and version == written and lo <= first and end <= hi:
                return blob, lo
        return None

    def _new_blob(self, sid, storage: torch.UntypedStorage, version: int | None, lo: int,
                  end: int) -> tuple[int, int]:
        blob = len(self._blobs)
        self._blobs.append([-1, end - lo + (-(end - lo) % _FILE_ALIGN)])
        if version is None:   # an inference tensor: its storage's later views cannot be told unchanged
            return blob, lo
        spans = self._spans.setdefault(sid, [])
        if len(spans) >= _SPANS:   # storages freed since (their address reused) are forgotten, then the oldest
            spans[:] = [x for x in spans if x[0]() is not None][1 - _SPANS:]   # spans (found again, written again)
        try:
            spans.append((weakref.ref(storage), version, lo, end, blob))
        except TypeError:
            pass
        return blob, lo

    def _append(self, blobs: list[tuple[int, torch.Tensor]]) -> None:
        """Write each ``(blob, bytes)`` (from the copier thread, the feeder thread for GPU blobs,
        or the caller's), in one ``_Writer.write``."""
        with self._write_lock:
            parts, offset = [], self._writer.size
            for blob, data in blobs:
                self._blobs[blob][0] = offset
                parts += [data, padding(self._blobs[blob][1] - data.numel())]
                offset += self._blobs[blob][1]
            self._writer.write(parts)

    # -- deferred copies
    def _enqueue(self, item: "_Item") -> None:
        self._queue.append(item)
        self._queued += item.end - item.lo
        self._waiting[item.address] = self._waiting.get(item.address, 0) + 1
        if self._copier is None:
            self._copier = threading.Thread(target=self._copy, name="fxdiff-stream-copy", daemon=True)
            self._copier.start()
        if self._idle and self._queued >= WAKE:
            self._changed.notify_all()

    def _copy(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop:
                    self._idle = True
                    self._changed.wait()
                    self._idle = False
                if self._stop:
                    return
                batch, size = [], 0   # up to BATCH bytes: one round trip of the lock for them all
                while self._queue and (not batch or size + self._queue[0].end - self._queue[0].lo <= BATCH):
                    item = self._queue.popleft()
                    batch.append(item)
                    size += item.end - item.lo
                self._copying = batch
            try:
                if self.error is None:
                    self._append([(item.blob, storage_bytes(item.storage, item.lo, item.end)) for item in batch])
            except BaseException as e:  # noqa: BLE001 -- reported by put() and close()
                self.error = e
            with self._lock:   # in recent before it leaves waiting: protect() looks at both without the lock
                for item in batch:
                    if item.tensor._version != item.version:
                        self.overwritten = self.overwritten or item.key
                    else:
                        self._recent.append(item)
                    left = self._waiting.pop(item.address) - 1
                    if left:
                        self._waiting[item.address] = left
                self._copying = []
                self._queued -= size
                self._changed.notify_all()

    def verify(self) -> None:
        """Check the tensors copied since the last check against their version when handed over
        (the caller's writes since are over: a copy that overlapped one is caught here)."""
        if self._recent:
            with self._lock:
                self._verify()

    def _verify(self) -> None:
        for item in self._recent:
            if item.tensor._version != item.version:
                self.overwritten = self.overwritten or item.key
        self._recent.clear()

    def protect(self, tensors: list[torch.Tensor]) -> None:
        """Before a write to ``tensors``: copy aside the queued tensors that share their storage."""
        if not self._waiting and not self._recent:
            return
        with self._lock:
            self._verify()
            addresses = set()
            for t in tensors:
                try:
                    if t.device.type == "cpu":
                        addresses.add(t.untyped_storage().data_ptr())
                except (RuntimeError, NotImplementedError, TypeError):
                    pass
            addresses &= self._waiting.keys()
            if not addresses:
                return
            for item in self._queue:
                if item.address in addresses:
                    item.aside()
            while any(item.address in addresses for item in self._copying):
                self._changed.wait()
            self._verify()

    def wake(self) -> None:
        """Start copying what is queued, however little."""
        with self._lock:
            self._changed.notify_all()

    def settle(self) -> str | None:
        """Wait for the queued copies; the key of a tensor written to before it was copied, or None."""
        with self._lock:
            self._changed.notify_all()   # the copier may be waiting for more
            while self._queue or self._copying:
                self._changed.wait()
            self._verify()
            overwritten = self.overwritten
        with self._write_lock:
            self._writer.flush_whole()
        return overwritten

    def _stop_copier(self, drain: bool) -> None:
        with self._lock:
            if not drain:
                self._queue.clear()
            self._changed.notify_all()
            while self._queue or self._copying:
                self._changed.wait()
            self._stop = True
            self._changed.notify_all()
        if self._copier is not None:
            self._copier.join()
        self._recent.clear()

    # -- ending
    def close(self) -> tuple[int, dict[str, Any]]:
        """Wait for the last copies, write the header; returns (file bytes, manifest digest)."""
        self._stop_copier(drain=True)
        if self._gpu is not None:
            self._gpu.close()
        if self.error is not None:
            self.abort()
            self._raise_failure()
        writer = self._writer
        writer.submit_rest()   # the last bytes go to disk while the header is made and written
        # GPU blobs reach the file when their copies end, after blobs made later on the CPU: number
        # the blobs in file order, as save() does; empty ones go at the end of the file
        blobs = [(offset if length else writer.size, length) for offset, length in self._blobs]
        order = sorted(range(len(blobs)), key=lambda i: blobs[i])
        number = {old: new for new, old in enumerate(order)}
        header: dict[str, Any] = {}
        for i, old in enumerate(order):
            offset, length = blobs[old]
            header[f"storage/{i}"] = {"dtype": "U8", "shape": [length], "data_offsets": [offset, offset + length]}
        views = {k: [number[v[0]], *v[1:]] for k, v in self._views.items()}
        header["__metadata__"] = {"format": FORMAT, "views": json_bytes(views).decode()}
        head = json_bytes(header)
        reserve = self._reserve
        moved = len(head) > reserve - 8
        if moved:   # more tensors than the space kept for the header: move the data, once it is written
            writer.__exit__(None, None, None)
            reserve = len(head) + 8 + (-(len(head) + 8) % self._reserve)
            _move_data(self.file, self._reserve, reserve, writer.size)
        head = (reserve - 8).to_bytes(8, "little") + head + b" " * (reserve - 8 - len(head))
        fd = os.open(self.file, os.O_WRONLY)   # through the page cache: no alignment to keep
        try:
            view = memoryview(head)
            written = 0
            while written < reserve:
                written += os.pwrite(fd, view[written:], written)
        finally:
            os.close(fd)
        if not moved:
            writer.__exit__(None, None, None)
        self._closed = True
        digest = {"xxh3_64_header": xxhash.xxh3_64_hexdigest(head), "xxh3_64_data": writer.digest,
                  "data_offset": reserve}
        self.size, self.data_offset = reserve + writer.size, reserve
        return self.size, digest

    def mapped(self, file: Path, skip: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """After ``close``: the tensors but those in ``skip``, memory-mapped from ``file`` (where the
        file now is)."""
        views = {k: v for k, v in self._views.items() if k not in skip} if skip else self._views
        return map_written(file, self.size, self.data_offset, self._blobs, views)

    def abort(self) -> None:
        self._stop_copier(drain=False)
        if self._gpu is not None:
            self._gpu.close(drain=False)
        if not self._closed:
            self._closed = True
            try:
                self._writer.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except Exception:  # noqa: BLE001 -- the capture is being abandoned
                pass


class _Item:
    """A CPU tensor waiting for the copier: bytes ``lo:end`` of ``storage`` become blob ``blob``."""

    __slots__ = ("key", "blob", "tensor", "version", "storage", "lo", "end", "address")

    def __init__(self, key: str, blob: int, tensor: torch.Tensor, version: int, storage: torch.UntypedStorage,
                 lo: int, end: int):
        self.key, self.blob, self.tensor, self.version = key, blob, tensor, version
        self.storage, self.lo, self.end, self.address = storage, lo, end, storage.data_ptr()

    def aside(self) -> None:
        """Copy the bytes now, into memory of its own, so that a write to the storage changes nothing."""
        if self.storage.data_ptr() != self.address:
            return   # already aside
        span = torch.empty(0, dtype=torch.uint8).set_(self.storage, self.lo, (self.end - self.lo,), (1,)).clone()
        self.tensor, self.version, self.storage = span, span._version, span.untyped_storage()
        self.end -= self.lo
        self.lo = 0


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
    """Copies GPU blobs to pinned host memory on a side stream and feeds them to the writer.

    Each blob is first cloned on the GPU, in the model's stream; the clones still being copied hold
    at most ``GPU_IN_FLIGHT`` bytes (the model waits for the oldest copy past that), so the GPU's
    memory stays near the model's own. The pinned copies waiting for the disk hold at most
    ``HOST_IN_FLIGHT`` bytes."""

    def __init__(self, stream: TensorStream):
        self.owner = stream
        self.copies: dict[torch.device, torch.cuda.Stream] = {}
        self.queue: queue.Queue = queue.Queue()
        self.on_gpu: collections.deque = collections.deque()   # (copy done, bytes), oldest first
        self.gpu_bytes = 0
        self.host_bytes = 0
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="fxdiff-stream-gpu", daemon=True)
        self.thread.start()

    def put(self, blob: int, storage: torch.UntypedStorage, lo: int, end: int) -> None:
        n = end - lo
        with self.cv:
            while self.on_gpu and (self.on_gpu[0][0].query() or self.gpu_bytes + n > GPU_IN_FLIGHT):
                done, m = self.on_gpu.popleft()
                done.synchronize()
                self.gpu_bytes -= m
            while self.host_bytes and self.host_bytes + n > HOST_IN_FLIGHT:
                self.cv.wait()
            self.gpu_bytes += n
            self.host_bytes += n
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
        with self.cv:
            self.on_gpu.append((done, n))
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
                    self.owner._append([(blob, host)])
            except BaseException as e:  # noqa: BLE001 -- reported by close()
                self.owner.error = e
            finally:
                del host
                with self.cv:
                    self.host_bytes -= n
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

    def put(self, key: str, t: torch.Tensor, defer: bool = False) -> None:
        self.tensors.put(key, t, defer)

    def protect(self, tensors: list[torch.Tensor]) -> None:
        self.tensors.protect(tensors)

    def verify(self) -> None:
        self.tensors.verify()

    def settle(self) -> str | None:
        return self.tensors.settle()

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

    def finish(self, capture, targets=None):
        """Write what the run left (parameters, gradients, inputs, outputs), the header, the graph
        and the manifest, and put the capture in place; returns ``capture`` with its tensors
        memory-mapped from there."""
        from .capture_dir import _finish_streamed
        try:
            written = _finish_streamed(self, capture, targets)
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
        return written
