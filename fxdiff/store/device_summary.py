"""Summaries of GPU tensors computed where the tensors are, with no wait for the GPU.

``summary.summarise`` reads a tensor's statistics back to the host chunk by chunk: on a GPU every
read waits for the model's queued work, hundreds of times a run. ``DeviceSummaries.add(t)`` instead
queues, in the tensor's stream (so before any later write to it), one kernel over the tensor (Triton
where it is installed, torch operations otherwise) that adds its statistics and hashes into one row
of 9 numbers and gathers its sample, both into large blocks of device memory shared by every
summary of the run. It returns the ``Summary`` at once; ``finish()`` waits for the GPU once, copies
those blocks to the host (a few copies for the whole run, not one per tensor) and fills in every
summary's statistics, hash and sample. Nothing of the tensor is kept: the GPU memory this costs is
a row and a sample a tensor. The sums of squares and of elements are added in float64 atomically,
so their last bits may vary run to run; the hashes, counts, minimum and maximum are exact.

The hash of these summaries is ``unit_digest``: ``"u1:"`` and two 32-bit sums, over the tensor's
units (elements of up to 4 bytes, 32-bit words of wider ones) in row-major order, of a bijective
mix of each unit's bits and its position. It can be computed in any order on any device, so the
GPU computes it in blocks, and a full tensor loaded on the CPU gets the same value from
``unit_digest``; a changed unit always changes both sums. A parameter's summary also holds
``content_digest``, the same hash of its elements rounded to bfloat16, every NaN as one (``"c1:"``):
what pairs parameters across captures whatever their precision (``params.correspond``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import numpy
import torch

from .summary import SAMPLE, Summary, sample_index

PREFIX = "u1:"
CONTENT = "c1:"
BLOCK = 1024        # elements a Triton program reads at a time
_WARPS = 8
_PER_SM = 8         # programs a multiprocessor of the GPU runs for one tensor, at most
_SAMPLE_BLOCK = 1024
_MASK = 0xFFFFFFFF
_K = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1)
_COLUMNS = 9        # sum, sumsq (float64), min, max (ordered keys), nan, +inf, -inf, hash 1, hash 2
_TORCH_CHUNK = 1 << 22
_NUMPY_CHUNK = 1 << 20
_UNSIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}
_LOW63 = (1 << 63) - 1
_BF16_NAN = 0x7FC0   # the NaN of a content hash (GPUs and CPUs round NaN to bfloat16 differently)
_INT64 = torch.iinfo(torch.int64)


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


def _numpy_units(flat: torch.Tensor) -> numpy.ndarray:
    """The row-major units of a contiguous 1-D CPU tensor as a numpy uint32 array."""
    raw = flat.view(torch.uint8).numpy() if flat.dtype != torch.bool else flat.numpy().view(numpy.uint8)
    size = flat.element_size()
    return raw.view({1: numpy.uint8, 2: numpy.uint16}.get(size, numpy.uint32))


def _numpy_sums(u: numpy.ndarray, start: int) -> tuple[int, int]:
    """The two sums of ``_mix`` over units ``u`` (uint8, uint16 or uint32) at positions from ``start``,
    in uint32 arithmetic (products wrap at 2**32, as the hash wants)."""
    k = [numpy.uint32(x) for x in _K]
    u = u.astype(numpy.uint32, copy=False)
    i = numpy.arange(start, start + u.size, dtype=numpy.uint64).astype(numpy.uint32)
    a = i * k[0]
    a ^= u
    a *= k[1]
    a ^= a >> numpy.uint32(13)
    a *= k[2]
    a ^= a >> numpy.uint32(16)
    b = i
    b *= k[3]
    b += u
    b *= k[4]
    b ^= b >> numpy.uint32(15)
    b *= k[0]
    b ^= b >> numpy.uint32(13)
    return int(a.sum(dtype=numpy.uint64)), int(b.sum(dtype=numpy.uint64))


def _hash(flat: torch.Tensor, rounded: bool = False) -> str:
    """The two sums' hex digits for a 1-D tensor (read on the CPU in chunks); with ``rounded``, of
    its elements rounded to bfloat16 (floating tensors)."""
    flat = flat.detach()
    rounded = rounded and flat.is_floating_point() and flat.dtype != torch.bfloat16
    h1 = h2 = 0
    per_unit = max(1, flat.element_size() // 4) if not rounded else 1
    step = _NUMPY_CHUNK // per_unit
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step]
        chunk = _rounded(chunk) if rounded else chunk
        chunk = chunk.cpu().contiguous()
        a, b = _numpy_sums(_numpy_units(chunk), start * per_unit)
        h1 += a
        h2 += b
    return f"{h1 & _MASK:08x}{h2 & _MASK:08x}"


def _rounded(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bfloat16, every NaN the same NaN."""
    r = t.to(torch.bfloat16)
    r.view(torch.int16).masked_fill_(r.isnan(), _BF16_NAN)
    return r


def unit_digest(t: torch.Tensor) -> str:
    """``"u1:"`` and the hash of ``t``'s units (see the module docstring)."""
    return PREFIX + _hash(_flat(t))


def content_digest(t: torch.Tensor) -> str:
    """``"c1:"`` and the hash of ``t``'s elements rounded to bfloat16 (its units, if not floating)."""
    return CONTENT + _hash(_flat(t), rounded=True)


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    real = torch.view_as_real(t) if t.is_complex() else t
    return real.reshape(-1)


def _keys(bits: torch.Tensor) -> torch.Tensor:
    """Float64 bits (int64) as keys that order as the floats do."""
    return bits ^ ((bits >> 63) & _LOW63)


def _torch_parts(flat: torch.Tensor) -> torch.Tensor:
    """The row (``_COLUMNS``, as the Triton kernel leaves it) of non-empty ``flat``, computed with
    torch operations on its device, with no read back to the host."""
    device = flat.device   # no element is set from the host: on a GPU that would wait for it
    total = torch.cat([torch.zeros(2, dtype=torch.float64, device=device),
                       torch.full((1,), math.inf, dtype=torch.float64, device=device),
                       torch.full((1,), -math.inf, dtype=torch.float64, device=device)])
    counts = torch.zeros(5, dtype=torch.int64, device=device)
    units = _units(flat)
    per_unit = units.numel() // flat.numel()
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
    bits = total.view(torch.int64)
    return torch.cat([bits[:2], _keys(bits[2:]), counts])


_KERNEL: Any = None


def _kernel():
    """The Triton kernel's launcher (the kernel compiled on first use), or None where Triton is not
    installed."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL or None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _KERNEL = False
        return None

    @triton.jit(do_not_specialize=["n", "row", "k", "at", "blocks", "programs"])
    def parts_kernel(x_ptr, n, rows_f, rows_i, row, positions_ptr, sample_ptr, k, at, blocks, programs,
                     BITS: tl.constexpr, IS_BOOL: tl.constexpr, NARROW: tl.constexpr, BLOCK: tl.constexpr,
                     SAMPLE_BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if pid < programs:   # blocks pid, pid + programs, ...: kept in registers, added to the row once
            if NARROW:   # floats of up to 32 bits: bounded and classified in float32, which is exact
                big = 3.4028234663852886e38
                lo = tl.full([BLOCK], big, tl.float32)
                hi = tl.full([BLOCK], -big, tl.float32)
            else:
                big = 1.7976931348623157e308
                lo = tl.full([BLOCK], big, tl.float64)
                hi = tl.full([BLOCK], -big, tl.float64)
            s = tl.zeros([BLOCK], tl.float64)
            sq = tl.zeros([BLOCK], tl.float64)
            nan = tl.zeros([BLOCK], tl.int32)
            pos = tl.zeros([BLOCK], tl.int32)
            neg = tl.zeros([BLOCK], tl.int32)
            h1 = tl.zeros([BLOCK], tl.uint32)   # the hashes are sums modulo 2**32, as uint32 adds wrap
            h2 = tl.zeros([BLOCK], tl.uint32)
            whole = n // BLOCK   # blocks with no element past the end (offsets fit in int32: n < 2**31 - BLOCK)
            for masked in tl.static_range(2):   # the whole blocks with no mask, then the partial one
                if masked:
                    first, stop = tl.where(pid == whole % programs, whole, blocks), blocks
                else:
                    first, stop = pid, whole
                for b in range(first, stop, programs):
                    offs = b * BLOCK + tl.arange(0, BLOCK)
                    if masked:
                        inside = offs < n
                        x = tl.load(x_ptr + offs, mask=inside, other=0)   # a zero is no NaN or infinity
                    else:
                        x = tl.load(x_ptr + offs)
                    if NARROW:
                        f = x.to(tl.float32)
                    else:
                        f = x.to(tl.float64)
                    finite = tl.abs(f) <= big   # false for NaN and infinities
                    if masked:
                        finite = finite & inside
                    g = tl.where(finite, f, 0.0).to(tl.float64)
                    s += g
                    sq += g * g
                    lo = tl.minimum(lo, tl.where(finite, f, big))
                    hi = tl.maximum(hi, tl.where(finite, f, -big))
                    nan += (f != f).to(tl.int32)
                    pos += (f > big).to(tl.int32)
                    neg += (f < -big).to(tl.int32)
                    for word in tl.static_range(2 if BITS == 64 else 1):   # 8-byte elements: two 32-bit units
                        if BITS == 64:
                            u = (x.to(tl.int64, bitcast=True) >> (32 * word)).to(tl.uint32)
                            i = offs.to(tl.uint32) * 2 + word
                        else:
                            if IS_BOOL:
                                u = x.to(tl.uint32)
                            elif BITS == 8:
                                u = x.to(tl.uint8, bitcast=True).to(tl.uint32)
                            elif BITS == 16:
                                u = x.to(tl.uint16, bitcast=True).to(tl.uint32)
                            else:
                                u = x.to(tl.uint32, bitcast=True)
                            i = offs.to(tl.uint32)   # products of uint32 wrap at 2**32
                        a = (u ^ (i * 0x9E3779B1)) * 0x85EBCA77
                        a = a ^ (a >> 13)
                        a = a * 0xC2B2AE3D
                        a = a ^ (a >> 16)
                        c = (u + i * 0x27D4EB2F) * 0x165667B1
                        c = c ^ (c >> 15)
                        c = c * 0x9E3779B1
                        c = c ^ (c >> 13)
                        if masked:
                            a = tl.where(inside, a, 0)
                            c = tl.where(inside, c, 0)
                        h1 += a
                        h2 += c
            low = tl.min(lo, 0).to(tl.float64).to(tl.int64, bitcast=True)
            high = tl.max(hi, 0).to(tl.float64).to(tl.int64, bitcast=True)
            base = row.to(tl.int64) * 9
            tl.atomic_add(rows_f + base, tl.sum(s, 0))
            tl.atomic_add(rows_f + base + 1, tl.sum(sq, 0))
            tl.atomic_min(rows_i + base + 2, low ^ ((low >> 63) & 0x7FFFFFFFFFFFFFFF))
            tl.atomic_max(rows_i + base + 3, high ^ ((high >> 63) & 0x7FFFFFFFFFFFFFFF))
            tl.atomic_add(rows_i + base + 4, tl.sum(nan.to(tl.int64), 0))
            tl.atomic_add(rows_i + base + 5, tl.sum(pos.to(tl.int64), 0))
            tl.atomic_add(rows_i + base + 6, tl.sum(neg.to(tl.int64), 0))
            tl.atomic_add(rows_i + base + 7, tl.sum(h1, 0).to(tl.int64))
            tl.atomic_add(rows_i + base + 8, tl.sum(h2, 0).to(tl.int64))
        else:
            j = (pid - programs).to(tl.int64) * SAMPLE_BLOCK + tl.arange(0, SAMPLE_BLOCK)
            wanted = j < k
            where = tl.load(positions_ptr + j, mask=wanted, other=0)
            tl.store(sample_ptr + at + j, tl.load(x_ptr + where, mask=wanted), mask=wanted)

    _KERNEL = _Launcher(parts_kernel)
    return _KERNEL


class _Launcher:
    """Launches the kernel through its compiled form once one exists for the arguments' kind.

    Triton's JIT binds and specialises every argument again on each launch: ~60 us of Python, more
    than the kernel itself takes on most tensors, thousands of times a run. The first launch of each
    kind (the tensor's device, dtype and 16-byte alignment, which is what Triton specialises a pointer
    on, and whether it is sampled; the integers are not specialised) goes through the JIT, which
    compiles; later ones call the compiled kernel. Whether a compiled kernel takes the compile-time
    constants among its arguments changed between Triton versions, so it is found once, by launching
    both ways on a test tensor and comparing with the JIT's row; where neither agrees, every launch
    goes through the JIT."""

    def __init__(self, jit):
        self.jit = jit
        self.compiled: dict[tuple, Any] = {}
        self.constants_too: bool | None = None   # None: launch through the JIT
        self.tested = False

    def __call__(self, programs: int, args: tuple, constants: dict[str, Any]) -> None:
        x, k = args[0], args[7]   # the other pointers are to blocks this module allocates: aligned
        key = (x.device, x.dtype, x.data_ptr() % 16 == 0, k > 0)
        compiled = self.compiled.get(key)
        if compiled is None or self.constants_too is None:
            self.compiled[key] = self.jit[(programs,)](*args, **constants, num_warps=_WARPS)
            if not self.tested:
                self.tested = True
                self.constants_too = self._test(args[0].device)
        elif self.constants_too:
            compiled[(programs, 1, 1)](*args, *constants.values())
        else:
            compiled[(programs, 1, 1)](*args)

    def _test(self, device: torch.device) -> bool | None:
        """How compiled kernels take their arguments here (see the class docstring)."""
        x = torch.linspace(-3, 5, BLOCK, device=device)   # one program: its sums added in one order
        rows = []
        for way in ("jit", True, False):
            slab = _empty_rows(1, device)
            sample = torch.zeros(SAMPLE, device=device)
            programs, args, constants = _arguments(x, slab, slab.view(torch.float64), 0, sample, 0)
            if way == "jit":
                compiled = self.jit[(programs,)](*args, **constants, num_warps=_WARPS)
            else:
                try:
                    compiled[(programs, 1, 1)](*args, *(constants.values() if way else ()))
                except Exception:  # noqa: BLE001 -- any failure rules this way out
                    continue
            torch.cuda.synchronize(device)
            if way != "jit" and torch.equal(slab, rows[0][0]) and torch.equal(sample, rows[0][1]):
                return way
            rows.append((slab, sample))
        return None


@functools.cache
def _programs(device: torch.device) -> int:
    """How many programs read a large tensor: a few a multiprocessor, each adding its share to the
    row once. (With a program a block, all adding to the same row, the atomic adds waited on each
    other: 180 us against 57 us for 16.8M bfloat16 elements on an H200.)"""
    return _PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


_POSITIONS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _positions_on(numel: int, device: torch.device) -> torch.Tensor:
    """``sample_index(numel)`` on ``device`` (kept for later runs: a few sizes, 32 KiB each)."""
    key = (numel, device)
    found = _POSITIONS.get(key)
    if found is None:
        positions = sample_index(numel)
        found = _POSITIONS[key] = positions if device.type != "cuda" else \
            positions.pin_memory().to(device, non_blocking=True)
    return found


def _empty_rows(n: int, device: torch.device) -> torch.Tensor:
    """``n`` empty rows, flat (made on ``device``: a copy from the host would wait for the GPU)."""
    rows = torch.zeros(n, _COLUMNS, dtype=torch.int64, device=device)
    rows[:, 2], rows[:, 3] = _INT64.max, _INT64.min
    return rows.view(-1)


def _arguments(flat: torch.Tensor, rows: torch.Tensor, floats: torch.Tensor, row: int, out: torch.Tensor | None,
               at: int) -> tuple[int, tuple, dict[str, Any]]:
    """(programs, arguments, constants) of the kernel that adds non-empty ``flat``'s statistics and
    hashes to row ``row`` of ``rows`` (``floats`` the same memory as float64) and, with ``out``,
    writes its sample at element ``at`` of ``out``."""
    n, size, device = flat.numel(), flat.element_size(), flat.device
    k = min(n, SAMPLE) if out is not None else 0
    blocks = -(-n // BLOCK)
    programs = min(blocks, _programs(device))
    args = (flat, n, floats, rows, row, _positions_on(n, device) if k else rows, out if k else flat, k, at, blocks,
            programs)
    constants = {"BITS": 8 * size, "IS_BOOL": flat.dtype == torch.bool,
                 "NARROW": flat.is_floating_point() and size <= 4, "BLOCK": BLOCK, "SAMPLE_BLOCK": _SAMPLE_BLOCK}
    return programs + -(-k // _SAMPLE_BLOCK), args, constants


class _Slabs:
    """Device memory handed out in slices of large blocks (one allocation a block, not a tensor):
    rows of ``_COLUMNS`` int64 (the blocks start filled with empty rows), or 8-byte aligned bytes."""

    SIZE = 1 << 21   # bytes a block of samples
    ROWS = 1 << 15   # rows a block of rows

    def __init__(self, device: torch.device, rows: bool):
        self.device, self.rows = device, rows
        self.blocks: list[torch.Tensor] = []
        self.floats: list[torch.Tensor] = []   # a block of rows as float64
        self.used = self.SIZE

    def take(self, n: int) -> tuple[int, int]:
        """(block, offset) of ``n`` rows, or of ``n`` bytes (offset in bytes)."""
        n = n * _COLUMNS if self.rows else -(-n // 8) * 8
        if not self.blocks or self.used + n > self.blocks[-1].numel():
            if self.rows:
                block = _empty_rows(self.ROWS, self.device)
                self.floats.append(block.view(torch.float64))
            else:
                block = torch.empty(max(self.SIZE, n), dtype=torch.uint8, device=self.device)
            self.blocks.append(block)
            self.used = 0
        self.used += n
        return len(self.blocks) - 1, self.used - n

    def filled(self) -> list[torch.Tensor]:
        """The blocks on the host, the last one as far as it was handed out."""
        return [b[:self.used if i == len(self.blocks) - 1 else b.numel()].cpu() for i, b in enumerate(self.blocks)]


class DeviceSummaries:
    """Summaries of CUDA tensors computed on their device (see the module docstring)."""

    def __init__(self):
        # (summary, device, row block, row, sample block, sample offset, k, numel, dtype, content row)
        self._pending: list[tuple] = []
        self._rows: dict[torch.device, _Slabs] = {}
        self._samples: dict[torch.device, _Slabs] = {}
        self._views: dict[tuple[torch.device, int, torch.dtype], torch.Tensor] = {}

    def _queue(self, flat: torch.Tensor, sample: bool) -> tuple[int, int, int, int]:
        """Queue the row of contiguous 1-D ``flat`` (and with ``sample`` its sample): (row block,
        row, sample block, sample offset in bytes)."""
        n, device, size = flat.numel(), flat.device, flat.element_size()
        rows = self._rows.get(device) or self._rows.setdefault(device, _Slabs(device, rows=True))
        rblock, at = rows.take(1)
        if n == 0:   # the row is already an empty tensor's
            return rblock, at // _COLUMNS, 0, 0
        slab = rows.blocks[rblock]
        k = min(n, SAMPLE) if sample else 0
        sblock = sat = 0
        out = None
        if k:
            samples = self._samples.get(device) or self._samples.setdefault(device, _Slabs(device, rows=False))
            sblock, sat = samples.take(k * size)
            key = (device, sblock, flat.dtype)
            out = self._views.get(key)
            if out is None:
                out = self._views[key] = samples.blocks[sblock].view(flat.dtype)
        launch = _kernel() if device.type == "cuda" and flat.dtype != torch.uint64 and n < 2**31 - BLOCK else None
        if launch is not None:
            launch(*_arguments(flat, slab, rows.floats[rblock], at // _COLUMNS, out, sat // size))
        else:
            slab[at:at + _COLUMNS].copy_(_torch_parts(flat))
            if k:
                torch.index_select(flat, 0, _positions_on(n, device), out=out[sat // size:sat // size + k])
        return rblock, at // _COLUMNS, sblock, sat

    def add(self, t: torch.Tensor, content: bool = False) -> Summary:
        """The summary of ``t`` (a CUDA tensor; on the CPU, torch operations do the same work) as it is
        now; its statistics, sample and hash (and with ``content`` its ``content_digest``) are
        complete after ``finish``."""
        t = t.detach()
        real = torch.view_as_real(t) if t.is_complex() else t
        flat = real.reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        device = flat.device
        switch = device.type == "cuda" and device.index != torch.cuda.current_device()
        with torch.cuda.device(device) if switch else contextlib.nullcontext():
            rblock, row, sblock, sat = self._queue(flat, sample=True)
            rounded = None
            if content and flat.is_floating_point() and flat.dtype != torch.bfloat16:
                rounded = self._queue(_rounded(flat), sample=False)[:2]
        positions = sample_index(flat.numel())
        summary = Summary(tuple(real.shape), real.dtype, {}, None, positions, None, CONTENT if content else None)
        self._pending.append((summary, device, rblock, row, sblock, sat, positions.numel(), flat.numel(),
                              flat.dtype, rounded))
        return summary

    def finish(self) -> None:
        """Wait for the GPU once and complete every summary added so far (a few copies to the host
        for all of them)."""
        if not self._pending:
            return
        for device in self._rows:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        rows, samples = {}, {}
        for device, slabs in self._rows.items():   # per block: statistics as lists, counts and hashes as lists
            rows[device] = []
            for block in slabs.filled():
                table = block.numpy().reshape(-1, _COLUMNS)
                keys = table[:, 2:4]
                bounds = numpy.where(keys < 0, keys ^ _LOW63, keys).view(numpy.float64)
                rows[device].append((numpy.concatenate([table[:, :2].view(numpy.float64), bounds], axis=1).tolist(),
                                     numpy.concatenate([table[:, 4:7], table[:, 7:] & _MASK], axis=1).tolist()))
        for device, slabs in self._samples.items():
            samples[device] = slabs.filled()
        for summary, device, rblock, row, sblock, sat, k, n, dtype, rounded in self._pending:
            floats, ints = rows[device][rblock]
            (s, sq, lo, hi), (nan, pos, neg, h1, h2) = floats[row], ints[row]
            finite = lo <= hi
            summary.stats.update(numel=float(n), sum=s, sumsq=sq, min=lo if finite else 0.0,
                                 max=hi if finite else 0.0, nan=float(nan), posinf=float(pos), neginf=float(neg))
            summary.digest = f"{PREFIX}{h1:08x}{h2:08x}"
            if summary.content is not None:
                c1, c2 = rows[device][rounded[0]][1][rounded[1]][3:] if rounded is not None else (h1, h2)
                summary.content = f"{CONTENT}{c1:08x}{c2:08x}"
            summary.sample = samples[device][sblock][sat:sat + k * dtype.itemsize].view(dtype) if k else \
                torch.empty(0, dtype=dtype)
        self._pending.clear()
        self._rows.clear()
        self._samples.clear()
        self._views.clear()


__all__ = ["CONTENT", "DeviceSummaries", "PREFIX", "SAMPLE", "content_digest", "unit_digest"]
