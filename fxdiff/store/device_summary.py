"""Summaries of GPU tensors computed where the tensors are, with no wait for the GPU.

``summary.summarise`` reads a tensor's statistics back to the host chunk by chunk: on a GPU every
read waits for the model's queued work, hundreds of times a run. ``DeviceSummaries.add(t)`` instead
queues, in the tensor's stream (so before any later write to it), one pass over the tensor that
writes, for each block of ``BLOCK`` elements, its partial statistics and hashes (a Triton kernel
where Triton is installed, torch operations otherwise), gathers the sample, and copies both to
pinned host memory asynchronously. It returns the ``Summary`` at once; ``finish()`` waits for the
GPU once and fills in every summary's statistics (the partials of all summaries added at once, in
float64, on the host) and hash. Nothing of the tensor is kept: the GPU memory this costs is the
partials, 72 bytes a block. The samples stay where they arrived, in blocks of pinned memory that
go back to torch's cache of pinned memory with the capture.

The hash of these summaries is ``unit_digest``: ``"u1:"`` and two 32-bit sums, over the tensor's
units (elements of up to 4 bytes, 32-bit words of wider ones) in row-major order, of a bijective
mix of each unit's bits and its position. It can be computed in any order on any device, so the
GPU computes it in blocks, and a full tensor loaded on the CPU gets the same value from
``unit_digest``; a changed unit always changes both sums.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy
import torch

from .summary import SAMPLE, Summary, sample_index

PREFIX = "u1:"
BLOCK = 8192        # elements a Triton program reads: one row of partials each
_SAMPLE_BLOCK = 1024
_MASK = 0xFFFFFFFF
_K = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1)
_COLUMNS = 9        # sum, sumsq, min, max (float64 bits), nan, +inf, -inf, hash 1, hash 2
_TORCH_CHUNK = 1 << 22
_UNSIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}


def _mix(u: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit mixes of units ``u`` at positions ``i`` (int64 tensors holding values below
    2**32; products wrap in int64, whose low 32 bits are what is kept)."""
    a = ((u ^ ((i * _K[0]) & _MASK)) * _K[1]) & _MASK
    a = a ^ (a >> 13)
    a = (a * _K[2]) & _MASK
    a = a ^ (a >> 16)
    b = (((u + ((i * _K[3]) & _MASK)) & _MASK) * _K[4]) & _MASK
    b = b ^ (b >> 15)
    b = (b * _K[0]) & _MASK
    b = b ^ (b >> 13)
    return a, b


def _units(flat: torch.Tensor) -> torch.Tensor:
    """The row-major units of a contiguous 1-D tensor as int64 values in [0, 2**32)."""
    if flat.dtype == torch.bool:
        return flat.to(torch.int64)
    size = flat.element_size()
    u = flat.view(_UNSIGNED[size]).to(torch.int64)
    return u & ((1 << (8 * min(size, 4))) - 1)


def unit_digest(t: torch.Tensor) -> str:
    """``"u1:"`` and the hash of ``t``'s units (see the module docstring), on ``t``'s device."""
    flat = _flat(t)
    h1 = h2 = 0
    units = _units(flat) if flat.numel() else flat.new_zeros(0, dtype=torch.int64)
    for start in range(0, units.numel(), _TORCH_CHUNK):
        u = units[start:start + _TORCH_CHUNK]
        a, b = _mix(u, torch.arange(start, start + u.numel(), device=u.device) & _MASK)
        h1 += int(a.sum())
        h2 += int(b.sum())
    return f"{PREFIX}{h1 & _MASK:08x}{h2 & _MASK:08x}"


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    real = torch.view_as_real(t) if t.is_complex() else t
    return real.reshape(-1)


def _torch_parts(flat: torch.Tensor) -> torch.Tensor:
    """One row of partials (``_COLUMNS``, as the Triton kernel writes them) of ``flat``, computed
    with torch operations on its device, with no read back to the host."""
    device = flat.device
    total = torch.zeros(4, dtype=torch.float64, device=device)
    total[2], total[3] = math.inf, -math.inf
    counts = torch.zeros(5, dtype=torch.int64, device=device)
    units = _units(flat) if flat.numel() else None
    per_unit = units.numel() // max(flat.numel(), 1) if units is not None else 1
    for start in range(0, flat.numel(), _TORCH_CHUNK):
        c = flat[start:start + _TORCH_CHUNK].to(torch.float64)
        finite = torch.isfinite(c)
        g = torch.where(finite, c, 0.0)
        total[0] += g.sum()
        total[1] += g.square().sum()
        total[2] = torch.minimum(total[2], torch.where(finite, c, math.inf).min())
        total[3] = torch.maximum(total[3], torch.where(finite, c, -math.inf).max())
        counts[0] += torch.isnan(c).sum()
        counts[1] += (c == math.inf).sum()
        counts[2] += (c == -math.inf).sum()
        u = units[start * per_unit:(start + c.numel()) * per_unit]
        lo = start * per_unit
        a, b = _mix(u, torch.arange(lo, lo + u.numel(), device=device) & _MASK)
        counts[3] += a.sum()
        counts[4] += b.sum()
    return torch.cat([total.view(torch.int64), counts]).reshape(1, _COLUMNS)


_KERNEL: Any = None


def _kernel():
    """The Triton kernel (compiled on first use), or None where Triton is not installed."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL or None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _KERNEL = False
        return None

    @triton.jit
    def parts_kernel(x_ptr, n, parts_ptr, positions_ptr, sample_ptr, k, blocks,
                     BITS: tl.constexpr, IS_BOOL: tl.constexpr, BLOCK: tl.constexpr, SAMPLE_BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if pid < blocks:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            inside = offs < n
            x = tl.load(x_ptr + offs, mask=inside, other=0)
            f = x.to(tl.float64)
            finite = (tl.abs(f) <= 1.7976931348623157e308) & inside   # false for NaN and infinities
            g = tl.where(finite, f, 0.0)
            row = parts_ptr + pid.to(tl.int64) * 9
            tl.store(row + 0, tl.sum(g, 0).to(tl.int64, bitcast=True))
            tl.store(row + 1, tl.sum(g * g, 0).to(tl.int64, bitcast=True))
            tl.store(row + 2, tl.min(tl.where(finite, f, 1.7976931348623157e308), 0).to(tl.int64, bitcast=True))
            tl.store(row + 3, tl.max(tl.where(finite, f, -1.7976931348623157e308), 0).to(tl.int64, bitcast=True))
            tl.store(row + 4, tl.sum(((f != f) & inside).to(tl.int64), 0))
            tl.store(row + 5, tl.sum(((f > 1.7976931348623157e308) & inside).to(tl.int64), 0))
            tl.store(row + 6, tl.sum(((f < -1.7976931348623157e308) & inside).to(tl.int64), 0))
            if IS_BOOL:
                u = x.to(tl.int64)
            elif BITS == 8:
                u = x.to(tl.uint8, bitcast=True).to(tl.int64)
            elif BITS == 16:
                u = x.to(tl.uint16, bitcast=True).to(tl.int64)
            else:
                u = x.to(tl.uint32, bitcast=True).to(tl.int64)
            i = offs & 0xFFFFFFFF
            a = ((u ^ ((i * 0x9E3779B1) & 0xFFFFFFFF)) * 0x85EBCA77) & 0xFFFFFFFF
            a = a ^ (a >> 13)
            a = (a * 0xC2B2AE3D) & 0xFFFFFFFF
            a = a ^ (a >> 16)
            b = (((u + ((i * 0x27D4EB2F) & 0xFFFFFFFF)) & 0xFFFFFFFF) * 0x165667B1) & 0xFFFFFFFF
            b = b ^ (b >> 15)
            b = (b * 0x9E3779B1) & 0xFFFFFFFF
            b = b ^ (b >> 13)
            tl.store(row + 7, tl.sum(tl.where(inside, a, 0), 0))
            tl.store(row + 8, tl.sum(tl.where(inside, b, 0), 0))
        else:
            j = (pid - blocks).to(tl.int64) * SAMPLE_BLOCK + tl.arange(0, SAMPLE_BLOCK)
            wanted = j < k
            at = tl.load(positions_ptr + j, mask=wanted, other=0)
            tl.store(sample_ptr + j, tl.load(x_ptr + at, mask=wanted), mask=wanted)

    _KERNEL = parts_kernel
    return _KERNEL


class _Pinned:
    """Pinned host memory handed out in slices of large blocks (one allocation per block, not per
    tensor: allocating pinned memory takes long)."""

    BLOCK = 1 << 23

    def __init__(self):
        self.blocks: list[torch.Tensor] = []
        self.used = self.BLOCK

    def take(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = -(-n * dtype.itemsize // 8) * 8
        if not self.blocks or self.used + nbytes > self.blocks[-1].numel():
            self.blocks.append(torch.empty(max(self.BLOCK, nbytes), dtype=torch.uint8,
                                           pin_memory=torch.cuda.is_available()))
            self.used = 0
        self.used += nbytes
        return self.blocks[-1][self.used - nbytes:self.used].view(dtype)[:n]


class DeviceSummaries:
    """Summaries of CUDA tensors computed on their device (see the module docstring)."""

    def __init__(self):
        self._pending: list[tuple[Summary, torch.Tensor, int]] = []
        self._positions: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._devices: set[torch.device] = set()
        self._host = _Pinned()

    def _positions_on(self, numel: int, device: torch.device) -> torch.Tensor:
        key = (numel, device)
        found = self._positions.get(key)
        if found is None:
            positions = sample_index(numel)
            found = self._positions[key] = positions if device.type != "cuda" else \
                positions.pin_memory().to(device, non_blocking=True)
        return found

    def add(self, t: torch.Tensor) -> Summary:
        """The summary of ``t`` (a CUDA tensor; on the CPU, torch operations do the same work) as it is
        now; its statistics, sample and hash are complete after ``finish``."""
        t = t.detach()
        real = torch.view_as_real(t) if t.is_complex() else t
        flat = real.reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        n, device = flat.numel(), flat.device
        positions = sample_index(n)
        k = positions.numel()
        on_device = self._positions_on(n, device)
        cuda = device.type == "cuda"
        kernel = _kernel() if cuda and flat.element_size() <= 4 and 0 < n < 2**31 else None
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():
            if kernel is not None:
                blocks = -(-n // BLOCK)
                words = blocks * _COLUMNS
                buf = torch.empty(words + -(-k * flat.element_size() // 8), dtype=torch.int64, device=device)
                kernel[(blocks + -(-k // _SAMPLE_BLOCK),)](flat, n, buf, on_device, buf[words:].view(flat.dtype), k,
                                                           blocks, BITS=8 * flat.element_size(),
                                                           IS_BOOL=flat.dtype == torch.bool, BLOCK=BLOCK,
                                                           SAMPLE_BLOCK=_SAMPLE_BLOCK)
                host = self._host.take(buf.numel(), torch.int64)
                host.copy_(buf, non_blocking=True)
                parts = host[:words].view(blocks, _COLUMNS)
                sample = host[words:].view(flat.dtype)[:k]
            else:
                device_parts = _torch_parts(flat)
                device_sample = flat.index_select(0, on_device) if n else flat[:0]
                parts = self._host.take(_COLUMNS, torch.int64).view(1, _COLUMNS)
                sample = self._host.take(k, flat.dtype)
                parts.copy_(device_parts, non_blocking=cuda)
                sample.copy_(device_sample, non_blocking=cuda)
        if cuda:
            self._devices.add(device)
        summary = Summary(tuple(real.shape), real.dtype, {}, sample, positions, None)
        self._pending.append((summary, parts, n))
        return summary

    def finish(self) -> None:
        """Wait for the GPU once and complete every summary added so far (the partials of all of
        them added up at once)."""
        for device in self._devices:
            torch.cuda.synchronize(device)
        self._devices.clear()
        if self._pending:
            parts = [p.numpy() for _, p, _ in self._pending]
            starts = numpy.cumsum([0] + [len(p) for p in parts[:-1]])
            every = numpy.concatenate(parts)
            floats = every.view(numpy.float64)   # the first four columns hold float64 bits
            sums = numpy.add.reduceat(floats[:, :2], starts).tolist()
            low = numpy.minimum.reduceat(floats[:, 2], starts).tolist()
            high = numpy.maximum.reduceat(floats[:, 3], starts).tolist()
            counts = (numpy.add.reduceat(every[:, 4:], starts) & _MASK).tolist()   # hash sums modulo 2**32
            for (summary, _, n), (s, sq), lo, hi, (nan, pos, neg, h1, h2) in \
                    zip(self._pending, sums, low, high, counts):
                finite = lo <= hi
                summary.stats.update(numel=float(n), sum=s, sumsq=sq, min=lo if finite else 0.0,
                                     max=hi if finite else 0.0, nan=float(nan), posinf=float(pos), neginf=float(neg))
                summary.digest = f"{PREFIX}{h1:08x}{h2:08x}"
        self._pending.clear()
        self._host = _Pinned()


__all__ = ["DeviceSummaries", "PREFIX", "SAMPLE", "unit_digest"]
