"""Compare two tensors at memory speed: chunk by chunk, in their own precision, on every core.

``compare_tensors(ref, cand, tol)`` returns the ``Metrics`` of ``cand`` against ``ref``. The
tensors are read in chunks of ``MIN_CHUNK`` to ``CHUNK`` elements (views where the layout allows,
copies of one chunk otherwise), in the pair's own precision: the difference of two float32 tensors
is taken in float32 (exact for nearby values), float16 and bfloat16 in float32; sums are float32
within a chunk (float64 where float32 would under- or overflow) and float64 across chunks.
Temporaries live in per-thread scratch buffers (fresh memory is slow to fault in), so memory stays
at a few chunks per thread whatever the size of the tensors, and the pages of memory-mapped
captures are handed back as soon as a pair is judged (``store.tensor_file.evict``).

Two sweeps over the chunks:

- the first finds the bit-identical chunks (the raw bytes equal: one comparison) and the sums of
  squares, which fix every scale: the RMS, the noise model's own-rounding level, a gradient's
  scale under ``--atol``, the ``max(|ref|, RMS)`` of ``max_scaled_diff``. A bit-identical pair
  costs no more;
- the second visits only the chunks that differ and takes everything else from one difference
  ``d = ref - cand`` and a few dot products: the RMS of ``d``, ``max |d|``, ``mean |d|``,
  ``max |d| / |ref|``, ``max |d| / max(|ref|, RMS)``, the exact count of elements out of bounds
  (in chunks whose ``max |d|`` exceeds the least bound), and the cosine, whose ``1 - cos`` comes
  from ``d`` itself (``(|d|^2 - (|ref| - |cand|)^2) / 2|ref||cand|`` with
  ``|ref|^2 - |cand|^2 = d.ref + d.cand = 2 d.ref - d.d``), so it keeps its digits for nearly equal
  tensors. Only chunks holding NaN or infinities take the masked path that compares them as data.

The error histogram is computed only when a drawing asks for it (``statistics(histograms=True)``,
set by ``compare(..., histograms=True)`` and by the CLI's ``--svg``, ``--html`` and
``--model-explorer``); otherwise ``Metrics.histogram`` is empty.

Pairs of more than ``_PARALLEL_MIN`` elements are split over a small pool of threads (one per
core, each running torch on one thread: torch's own parallel loops stall when the machine is
loaded). Summarised tensors (``store.summary``, ``capture --keep``) compare on their sample.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch

from ..model.report import HIST_EDGES, Metrics
from ..scratch import one_torch_thread as _one_torch_thread, scratch as _scratch
from ..store.summary import Summary, summarise
from .noise import OWN_ROUNDING

CHUNK = 1 << 18              # elements per chunk at most: a few of them fit in a core's cache
MIN_CHUNK = 1 << 15          # chunks shrink down to this so that mid-sized pairs split over the threads
_PARALLEL_MIN = 1 << 17      # smaller pairs run on the calling thread
_TINY_SUM = 1e-30            # float32 sums of squares (and products) below this are redone in float64
_HISTOGRAMS = contextvars.ContextVar("fxdiff_histograms", default=True)
_WHOLE_PAIRS = contextvars.ContextVar("fxdiff_whole_pairs", default=False)   # in compare_many: no split


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Strict mode, when ``atol`` or ``rtol`` is given: every element must satisfy
    ``|cand - ref| <= atol + rtol * |ref|``. Without either, verdicts are noise-aware (``noise.py``)."""

    atol: float | None = None
    rtol: float | None = None

    @property
    def strict(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def bound(self, scale: torch.Tensor) -> torch.Tensor | float:
        """The elementwise bound: strict mode's, or the own-rounding level of the noise model."""
        return (self.atol or 0.0) + (self.rtol or 0.0) * scale


@contextlib.contextmanager
def statistics(*, histograms: bool) -> Iterator[None]:
    """Whether the comparisons made inside compute error histograms (only drawings show them)."""
    token = _HISTOGRAMS.set(histograms)
    try:
        yield
    finally:
        _HISTOGRAMS.reset(token)


def compare_tensors(ref: torch.Tensor, cand: torch.Tensor, tol: Tolerance) -> Metrics:
    """Metrics of ``cand`` against ``ref`` and whether every element is within ``tol``."""
    return _compare(ref, cand, tol)


def grad_metrics(ref_g: torch.Tensor | None, cand_g: torch.Tensor | None, tol: Tolerance,
                 floor: float = 0.0) -> Metrics | None:
    """Gradients are judged relative to their scale: both are divided by the larger RMS of the two,
    or by ``floor`` when that is larger, before the tolerance applies. The loss, and so every
    gradient, has an arbitrary scale; and a gradient that is analytically zero holds only rounding
    noise, which the floor (tied to the model's typical gradient) keeps from counting as a
    difference. The reported diffs stay in the gradients' own units.

    Under a strict tolerance an element fails when ``|cand - ref| > atol * scale + rtol * |ref|``
    (the rule applied to both divided by ``scale``), counted in the same pass."""
    if ref_g is None and cand_g is None:
        return None
    if ref_g is None:
        return _missing_grad("cand", cand_g.numel())
    if cand_g is None:
        return _missing_grad("ref", ref_g.numel(), rms(ref_g))
    return _compare(ref_g, cand_g, tol, grad_floor=floor if tol.strict else None)


def compare_many(calls: list[Callable[[], Metrics | None]], sizes: list[int]) -> list[Metrics | None]:
    """The results of ``calls``, each judging one pair (``compare_tensors``, ``grad_metrics``), in
    order. They run on every core a pair at a time, largest (``sizes``) first, each pair on one
    thread: a pair split over the cores pays a handoff per sweep, and its small steps leave the
    cores idle."""
    workers = min(_workers(), len(calls))
    if workers < 2:
        return [call() for call in calls]
    results: list[Metrics | None] = [None] * len(calls)
    order = iter(sorted(range(len(calls)), key=lambda i: -sizes[i]))
    lock = threading.Lock()
    failed: list[BaseException] = []

    def drain() -> None:
        token = _WHOLE_PAIRS.set(True)
        try:
            with _one_torch_thread():
                while not failed:
                    with lock:
                        i = next(order, None)
                    if i is None:
                        return
                    results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 -- raised by the caller once every thread is done
            failed.append(e)
        finally:
            _WHOLE_PAIRS.reset(token)

    others = [_pool().submit(contextvars.copy_context().run, drain) for _ in range(workers - 1)]
    drain()
    for other in others:
        other.result()
    if failed:
        raise failed[0]
    return results


def rms(t: torch.Tensor) -> float:
    """Root mean square of ``t`` (complex: of its elements' magnitudes), in one chunked pass; the
    pages of a memory-mapped tensor are handed back afterwards."""
    try:
        with _one_torch_thread():
            return _rms(t.detach())
    finally:
        _evict(t)


def rms_many(ts: Iterable[torch.Tensor]) -> list[float]:
    """``rms`` of each tensor, spread over the judge's threads."""
    ts = list(ts)
    if _workers() < 2 or len(ts) < 2:
        return [rms(t) for t in ts]
    with _one_torch_thread():
        return list(_pool().map(rms, ts))


def _rms(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    if isinstance(t, Summary):
        return _summary_rms(t)
    if t.is_complex():
        return math.sqrt(2.0) * _rms(torch.view_as_real(t))
    total = 0.0
    for x in _Chunks(t, t).flat_views(0):
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32 if x.is_floating_point() else torch.float64)
        total += _sumsq(x)
    return math.sqrt(total / t.numel())


def _scaled_rms(t: torch.Tensor) -> float:
    """The RMS of ``t``'s finite elements (the others count as zeros, as in ``_masked``), taken on
    them divided by the largest: where their squares overflow even float64 (|x| > 1e154)."""
    finite = [x[torch.isfinite(x)].double() for x in _Chunks(t, t).flat_views(0)]
    peak = max((float(x.abs().max()) for x in finite if x.numel()), default=0.0)
    if peak == 0:
        return 0.0
    return peak * math.sqrt(sum(_sumsq(x / peak) for x in finite) / t.numel())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` of two tensors of one shape, in one chunked pass in their common precision
    (NaN if any difference is NaN)."""
    return _chunked_max(a, b)


def max_abs(t: torch.Tensor) -> float:
    """``max |t|``, in one chunked pass (NaN if ``t`` holds NaN)."""
    return _chunked_max(t, None)


def _chunked_max(a: torch.Tensor, b: torch.Tensor | None) -> float:
    if a.numel() == 0:
        return 0.0
    a = a.detach()
    b = b.detach() if b is not None else None
    if b is not None and a.device != b.device:   # two devices (a capture against a live GPU run): compare on the CPU
        a, b = a.cpu(), b.cpu()
    cdt = _compute_dtype(a.dtype, (b if b is not None else a).dtype)
    best = 0.0
    chunks = _Chunks(a, b if b is not None else a)
    with _one_torch_thread():
        for k in range(len(chunks)):
            x, y = chunks.pair(k)
            v = x.to(cdt) if b is None else torch.sub(x.to(cdt), y.to(cdt))
            top = float(v.abs_().max()) if b is not None else float(v.abs().max())
            if top != top:
                return math.nan
            best = max(best, top)
    return best


def same_layout(ref: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``cand`` laid out like ``ref``: a dimension permutation when one fits (the closest one if
    several do, e.g. square attention maps), else a reshape."""
    best = layout_permutation(ref, cand)
    if best is not None:
        return cand.permute(best), f"candidate permuted {best}"
    return cand.reshape(ref.shape), f"candidate reshaped from {tuple(cand.shape)}"


def layout_permutation(ref: torch.Tensor, cand: torch.Tensor) -> tuple[int, ...] | None:
    """The dimension permutation that lays ``cand`` out like ``ref`` (the closest one if several
    fit), or None when none does."""
    if cand.dim() != ref.dim() or sorted(cand.shape) != sorted(ref.shape):
        return None
    fits = [p for p in itertools.permutations(range(cand.dim())) if tuple(cand.shape[i] for i in p) == tuple(ref.shape)]
    if len(fits) <= 1:
        return fits[0] if fits else None

    def distance(p):
        d = max_abs_diff(ref, cand.permute(p))
        return math.inf if d != d else d
    return min(fits, key=distance)


def value_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """How unlike two tensors are (0 = equal), for breaking ties between look-alike ops: the largest
    difference over the first's largest magnitude, capped at 2 (2 also when they cannot be
    compared; complex tensors by their real and imaginary parts). Read in chunks, in the tensors' own
    precision; summaries compare on their sample."""
    x, y = (torch.view_as_real(t.detach()) if not isinstance(t, Summary) and t.is_complex() else t for t in (x, y))
    if x.numel() != y.numel():
        return 2.0
    if not x.numel():
        return 0.0
    if isinstance(x, Summary) or isinstance(y, Summary):
        pair = _samples(x, y)
        if pair is None:
            return 2.0
        x, y = pair
    x, y = x.detach(), y.detach()
    if x.shape != y.shape:
        x, y = x.reshape(-1), y.reshape(-1)
    scale = max_abs(x)
    d = max_abs_diff(x, y) / max(scale, 1e-30) if scale == scale else math.nan
    return min(d, 2.0) if d == d else 2.0


# -- summarised tensors (capture --keep summary / grads) -----------------------------------------

def _summary_rms(s: Summary) -> float:
    if s.stats:
        return math.sqrt(s.stats["sumsq"] / s.stats["numel"]) if s.stats["numel"] else 0.0
    return _rms(s.sample) if s.sample.numel() else 0.0


def _as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.detach()) if not isinstance(t, Summary) and t.is_complex() else t


def _gather(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Elements of a full tensor at row-major ``positions`` (no copy of the tensor)."""
    t = t.detach()
    if not positions.numel():
        return t.reshape(-1)[:0].cpu()
    index = positions.to(t.device)
    if t.is_contiguous():
        return t.reshape(-1).index_select(0, index).cpu()
    return t[torch.unravel_index(index, tuple(t.shape))].cpu()


def _samples(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The elements of ``a`` and ``b`` (same count, at least one a summary) at the positions both
    hold, in row-major order; None when they hold none in common."""
    a, b = _as_real(a), _as_real(b)
    if isinstance(a, Summary) and isinstance(b, Summary):
        if a.positions.shape == b.positions.shape and torch.equal(a.positions, b.positions):
            return a.sample, b.sample
        common, ia, ib = _intersect(a.positions, b.positions)
        return (a.sample[ia], b.sample[ib]) if common else None
    if isinstance(a, Summary):
        return a.sample, _gather(b, a.positions)
    return _gather(a, b.positions), b.sample


def _intersect(pa: torch.Tensor, pb: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    sa, ia = torch.sort(pa)
    sb, ib = torch.sort(pb)
    ka, kb = torch.isin(sa, sb), torch.isin(sb, sa)
    return int(ka.sum()), ia[ka], ib[kb]


def _stats_of(t: torch.Tensor) -> dict[str, float]:
    return t.stats if isinstance(t, Summary) else summarise(t).stats


def _compare_summarised(ref: torch.Tensor, cand: torch.Tensor, tol: Tolerance, grad_floor: float | None) -> Metrics:
    """A pair where one side or both are summaries: compared element for element on the sample,
    bounded below by what the whole-tensor statistics say, identical when the hashes agree."""
    a, b = _as_real(ref), _as_real(cand)
    n = a.numel()
    if n != b.numel():
        return Metrics(passed=False, max_abs_diff=math.inf, max_rel_diff=math.inf, mean_abs_diff=math.inf,
                       cosine=None, ref_rms=_rms(a), mismatched=n, numel=n,
                       note=f"shape {tuple(ref.shape)} vs {tuple(cand.shape)}")
    if n == 0:   # nothing to differ
        return Metrics(passed=True, max_abs_diff=0.0, max_rel_diff=0.0, mean_abs_diff=0.0, cosine=None,
                       ref_rms=0.0, cand_rms=0.0, rms_diff=0.0, mismatched=0, numel=0, note="empty")
    notes = []
    if tuple(a.shape) != tuple(b.shape):
        notes.append(f"candidate {tuple(cand.shape)} compared in row-major order (a summary cannot be permuted)")
    exact = not (a.is_floating_point() and b.is_floating_point())
    eps = 0.0 if exact else max(machine_eps(a.dtype), machine_eps(b.dtype))
    stats_a = a.stats if isinstance(a, Summary) else None
    stats_b = b.stats if isinstance(b, Summary) else None
    if stats_a or stats_b:   # a sliced summary has no statistics: the full side's are not needed either
        stats_a = stats_a if stats_a is not None else (_stats_of(a) if stats_b else None)
        stats_b = stats_b if stats_b is not None else (_stats_of(b) if stats_a else None)
    digest_a = a.digest if isinstance(a, Summary) else None
    digest_b = b.digest if isinstance(b, Summary) else None
    if a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and (digest_a or digest_b):
        from ..store.summary import _digest
        digest_a = digest_a or (_digest(a, digest_b) if not isinstance(a, Summary) and a.device.type == "cpu" else None)
        digest_b = digest_b or (_digest(b, digest_a) if not isinstance(b, Summary) and b.device.type == "cpu" else None)
        if digest_a is not None and digest_a == digest_b:
            rms_a = math.sqrt(stats_a["sumsq"] / n) if stats_a else _rms(a)
            hist = [n] + [0] * (len(HIST_EDGES) - 1) if _HISTOGRAMS.get() else []
            return Metrics(passed=True, max_abs_diff=0.0, max_rel_diff=0.0, mean_abs_diff=0.0,
                           cosine=None if eps == 0 else 1.0, ref_rms=rms_a, cand_rms=rms_a, rms_diff=0.0, eps=eps,
                           mismatched=0, numel=n, histogram=hist,
                           note="; ".join(notes + ["summary: bit-identical (equal hashes)"]))
    pair = _samples(a, b)
    if pair is None or not pair[0].numel():
        return Metrics(passed=False, max_abs_diff=math.inf, max_rel_diff=math.inf, mean_abs_diff=math.inf,
                       cosine=None, ref_rms=_rms(a), mismatched=n, numel=n,
                       note="; ".join(notes + ["summaries with no sampled elements in common"]))
    sa, sb = pair
    k = sa.numel()
    full_rms = (math.sqrt(stats_a["sumsq"] / n), math.sqrt(stats_b["sumsq"] / n)) if stats_a and stats_b else None
    m = _Pair(sa.detach(), sb.detach(), tol, grad_floor, _HISTOGRAMS.get(), rms=full_rms).run()
    ref_rms, cand_rms, rms_diff = m.ref_rms, m.cand_rms, m.rms_diff
    max_abs, max_scaled, mean_abs, special = m.max_abs, m.max_scaled, m.mean_abs, m.special_bad
    bound_bad = False
    if stats_a and stats_b:
        mean_gap = abs(stats_a["sum"] - stats_b["sum"]) / n
        rms_diff = max(rms_diff, abs(ref_rms - cand_rms), mean_gap)
        mean_abs = max(mean_abs, mean_gap)
        special = max(special, sum(abs(stats_a[x] - stats_b[x]) for x in ("nan", "posinf", "neginf")))
        if not any(stats_a[x] or stats_b[x] for x in ("nan", "posinf", "neginf")):
            edge_gap = max(abs(stats_a["max"] - stats_b["max"]), abs(stats_a["min"] - stats_b["min"]))
            largest = max(abs(stats_a["max"]), abs(stats_a["min"]))
            max_abs = max(max_abs, edge_gap)
            if edge_gap:   # an element differs by edge_gap, at a magnitude of at most ``largest``
                max_scaled = max(max_scaled, edge_gap / max(largest, ref_rms, cand_rms, 1e-300))
            if tol.strict:
                scale = max(ref_rms, cand_rms, grad_floor) if grad_floor is not None else 1.0
                limit = (tol.atol or 0.0) * (scale if scale and math.isfinite(scale) else 1.0) \
                    + (tol.rtol or 0.0) * largest
                bound_bad = edge_gap > limit
    sampled_bad = m.bad - m.special_bad
    bad = (math.ceil(sampled_bad * n / k) if sampled_bad else 0) + int(special) + int(bound_bad)
    notes.append(f"summary: judged on a sample of {k} of {n} elements and whole-tensor statistics"
                 + (f"; {int(special)} NaN/Inf positions differ" if special else "")
                 + ("; mismatched elements estimated from the sample" if sampled_bad else ""))
    if m.scale_note:
        notes.append(m.scale_note)
    return Metrics(passed=bad == 0, max_abs_diff=max_abs, max_rel_diff=m.max_rel, max_scaled_diff=max_scaled,
                   mean_abs_diff=mean_abs, cosine=m.cosine, ref_rms=ref_rms, cand_rms=cand_rms, rms_diff=rms_diff,
                   eps=eps, mismatched=min(bad, n), numel=n, histogram=m.histogram, note="; ".join(notes))


# -- the pass ----------------------------------------------------------------------------------

def _compare(ref: torch.Tensor, cand: torch.Tensor, tol: Tolerance, grad_floor: float | None = None) -> Metrics:
    if isinstance(ref, Summary) or isinstance(cand, Summary):
        return _compare_summarised(ref, cand, tol, grad_floor)
    layout = ""
    if tuple(ref.shape) != tuple(cand.shape):
        if ref.numel() != cand.numel():
            return _failed(ref, f"shape {tuple(ref.shape)} vs {tuple(cand.shape)}")
        cand, layout = same_layout(ref, cand)
    notes = [layout] if layout else []
    a, b = ref.detach(), cand.detach()
    try:
        m = _Pair(a, b, tol, grad_floor, _HISTOGRAMS.get()).run()
    finally:
        _evict(ref, cand)
    if m.special_bad:
        notes.append(f"{m.special_bad} NaN/Inf positions differ")
    if m.scale_note:
        notes.append(m.scale_note)
    return m.metrics("; ".join(notes))


_BF16_MAX = torch.finfo(torch.bfloat16).max
_STAND_INS = 1e36   # a difference this large comes from values near the end of float32's range


def _max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max if dtype.is_floating_point else math.inf


def _saturated(t: torch.Tensor, limit: float) -> torch.Tensor:
    """``t`` with its finite elements clamped to ``[-limit, limit]`` (a copy; infinities and NaN kept)."""
    return torch.where(torch.isfinite(t), t.clamp(-limit, limit), t)


def _compute_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    if not (a.is_floating_point and b.is_floating_point):
        return torch.float64
    dt = torch.promote_types(a, b)
    return torch.float32 if dt in (torch.float16, torch.bfloat16) or dt.itemsize < 4 else dt


class _Acc:
    """What the chunks of one pair add up to (sums in float64)."""

    __slots__ = ("dd", "dx", "sum_abs", "max_abs", "max_rel", "max_scaled", "special_bad", "bad", "hist",
                 "peaks")

    def __init__(self):
        self.dd = self.dx = self.sum_abs = 0.0   # d = x - y: x ref, y cand
        self.max_abs = self.max_rel = self.max_scaled = 0.0
        self.special_bad = 0      # NaN/Inf positions that differ
        self.bad = 0              # elements out of bounds
        self.hist = [0] * len(HIST_EDGES)
        self.peaks: list[tuple[int, float]] = []   # (chunk, max |d|) of the chunks that differ

    def merge(self, o: "_Acc") -> None:
        for f in ("dd", "dx", "sum_abs", "special_bad", "bad"):
            setattr(self, f, getattr(self, f) + getattr(o, f))
        self.max_abs = _nanmax(self.max_abs, o.max_abs)
        self.max_rel = _nanmax(self.max_rel, o.max_rel)
        self.max_scaled = _nanmax(self.max_scaled, o.max_scaled)
        self.hist = [p + q for p, q in zip(self.hist, o.hist)]
        self.peaks += o.peaks


def _max_ratio(d: torch.Tensor, ax: torch.Tensor, out: torch.Tensor) -> float:
    """max |d| / |ref|: infinite where a zero reference differs (as torch.testing says it), where
    clamping the zero to a tiny number printed 2.4e+38, a figure that reads as a measurement."""
    return float(torch.div(d, ax, out=out).nan_to_num_(nan=0.0, posinf=math.inf).max())


def _nanmax(a: float, b: float) -> float:
    if a != a or b != b:
        return math.nan
    return max(a, b)


@dataclasses.dataclass
class _Result:
    passed: bool
    max_abs: float
    max_rel: float
    max_scaled: float
    mean_abs: float
    cosine: float | None
    ref_rms: float
    cand_rms: float
    rms_diff: float
    eps: float
    bad: int
    numel: int
    histogram: list[int]
    special_bad: int
    scale_note: str = ""

    def metrics(self, note: str) -> Metrics:
        if self.numel == 0:
            return Metrics(passed=self.bad == 0, max_abs_diff=0.0, max_rel_diff=0.0, mean_abs_diff=0.0, cosine=None,
                           ref_rms=0.0, mismatched=0, numel=0, note=note)
        return Metrics(rms_diff=self.rms_diff, cand_rms=self.cand_rms, eps=self.eps, max_scaled_diff=self.max_scaled,
                       passed=self.bad == 0, max_abs_diff=self.max_abs, max_rel_diff=self.max_rel,
                       mean_abs_diff=self.mean_abs, cosine=self.cosine, ref_rms=self.ref_rms, mismatched=self.bad,
                       numel=self.numel, note=note, histogram=self.histogram)


@dataclasses.dataclass(frozen=True)
class _Bound:
    atol: float
    rtol: float


_SAME, _DIFFERS, _MASKED = 0, 1, 2   # what a chunk is, after the first sweep


class _Pair:
    """One comparison, in two sweeps over the chunks.

    The first finds the bit-identical chunks and the sums of squares (the tensors' RMS: every
    bound and scale depends on it); the second visits only the chunks that differ and takes
    everything else from ``d = x - y``, counting out-of-bound elements as it goes.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, tol: Tolerance, grad_floor: float | None,
                 histograms: bool, rms: tuple[float, float] | None = None):
        if a.is_complex() or b.is_complex():
            common = torch.promote_types(a.dtype, b.dtype)
            if not common.is_complex:
                common = torch.complex128
            a, b = torch.view_as_real(a.to(common)), torch.view_as_real(b.to(common))
        self.orig = (a.dtype, b.dtype)
        self.exact = not (a.is_floating_point() and b.is_floating_point())
        self.cdt = _compute_dtype(a.dtype, b.dtype)
        # float16 holds no finite value past 65504: a wider side's larger ones (finfo(float32).min as
        # an attention mask's -inf) are compared as the narrower side would hold them
        self.range = None if self.exact or _max(a.dtype) == _max(b.dtype) else min(_max(a.dtype), _max(b.dtype))
        self.stand_ins = self.range is None and not self.exact and _max(a.dtype) <= _max(torch.float32)
        self.tiny = torch.finfo(torch.float64 if self.exact else torch.promote_types(a.dtype, b.dtype)).tiny
        self.tol = tol
        self.grad_floor = grad_floor
        self.histograms = histograms
        self.rms = rms                  # (ref, cand) RMS to use instead of the measured ones (summaries)
        self.raw = a.dtype == b.dtype   # bit-identical chunks can be recognised
        self.workers = 1 if _WHOLE_PAIRS.get() else _workers()   # (read before torch is set to one thread)
        self.chunks = _Chunks(a, b, self.workers)
        self.n = a.numel()

    def run(self) -> _Result:
        n = self.n
        eps = 0.0 if self.exact else max(machine_eps(self.orig[0]), machine_eps(self.orig[1]))
        if n == 0:
            return _Result(True, 0.0, 0.0, 0.0, 0.0, None, 0.0, 0.0, 0.0, eps, 0, 0, [], 0)
        with _one_torch_thread():
            kinds = [item for part in self._map(self._first, range(len(self.chunks))) for item in part]
            xx = sum(item[2] for item in kinds)
            yy = sum(item[3] for item in kinds)
            ref_rms, cand_rms = self.rms if self.rms is not None else (math.sqrt(xx / n), math.sqrt(yy / n))
            if math.inf in (ref_rms, cand_rms) and self.rms is None:   # squares past float64's range
                ref_rms, cand_rms = (_scaled_rms(side) if value == math.inf else value
                                     for side, value in ((self.chunks.a, ref_rms), (self.chunks.b, cand_rms)))
            self.scale = max(ref_rms, cand_rms, self.tiny)
            self.bound, note = self._bound(ref_rms, cand_rms, eps)
            todo = [(k, kind) for k, kind, _, _ in kinds if kind != _SAME]
            acc = _Acc()
            if self.histograms:
                acc.hist[0] += sum(self.chunks.size(k) for k, kind, _, _ in kinds if kind == _SAME)
            for part in self._map(self._second, todo):
                acc.merge(part)
            if self.tol.strict and self.grad_floor is not None and not math.isfinite(acc.max_abs) \
                    and (self.bound.atol, self.bound.rtol) != (self.tol.atol or 0.0, self.tol.rtol or 0.0):
                # a difference that overflows: the raw rule, not relative to the gradient's scale
                self.bound, note = _Bound(self.tol.atol or 0.0, self.tol.rtol or 0.0), ""
                acc.bad = sum(self._map(self._count, [k for k, _ in todo]))
        bad = acc.bad + acc.special_bad
        return _Result(passed=bad == 0, max_abs=acc.max_abs, max_rel=acc.max_rel if acc.max_abs > 0 else 0.0,
                       max_scaled=acc.max_scaled if acc.max_abs > 0 or acc.max_abs != acc.max_abs else 0.0,
                       mean_abs=acc.sum_abs / n, cosine=None if self.exact else _cosine(xx, yy, acc),
                       ref_rms=ref_rms, cand_rms=cand_rms, rms_diff=math.sqrt(acc.dd / n), eps=eps, bad=bad,
                       numel=n, histogram=acc.hist if self.histograms else [], special_bad=acc.special_bad,
                       scale_note=note)

    def _bound(self, ref_rms: float, cand_rms: float, eps: float) -> tuple[_Bound, str]:
        """The elementwise bound ``atol + rtol * |ref|``, once the first sweep measured the scales."""
        if self.exact:
            return _Bound(0.0, 0.0), ""
        if not self.tol.strict:   # provisional: beyond the tensors' own rounding; noise.py gives the verdict
            return _Bound(OWN_ROUNDING * eps * max(ref_rms, cand_rms), 0.0), ""
        atol, rtol = self.tol.atol or 0.0, self.tol.rtol or 0.0
        if self.grad_floor is None:
            return _Bound(atol, rtol), ""
        scale = max(ref_rms, cand_rms, self.grad_floor)
        if scale == 0 or not math.isfinite(scale):
            return _Bound(atol, rtol), ""
        return _Bound(atol * scale, rtol), f"judged relative to RMS {scale:.3g}"

    def _map(self, fn, items) -> list:
        """``fn(part)`` over parts of ``items``: on the calling thread, or one part on it and one per
        pool thread for the others."""
        items = list(items)
        workers = min(self.workers, len(items))
        if workers < 2 or self.n < _PARALLEL_MIN:
            return [fn(items)]
        parts = [items[w::workers] for w in range(workers)]
        others = [_pool().submit(fn, part) for part in parts[1:]]
        try:
            first = fn(parts[0])   # the calling thread takes a part itself: one thread handoff fewer
        except BaseException:
            for other in others:
                other.exception()   # wait for them: the pages they read are handed back next
            raise
        return [first, *(other.result() for other in others)]

    # -- first sweep: which chunks differ, and the sums of squares
    def _first(self, ks) -> list[tuple[int, int, float, float]]:
        out = []
        for k in ks:
            x, y = self.chunks.pair(k)
            if self.raw and _bits_equal(x, y):
                xx = _sumsq(x.to(self.cdt))
                if math.isfinite(xx):
                    out.append((k, _SAME, xx, xx))
                    continue
            if x.dtype != self.cdt or y.dtype != self.cdt:
                x, y = x.to(self.cdt), y.to(self.cdt)
            if self.range is not None:
                x, y = _saturated(x, self.range), _saturated(y, self.range)
            if self.exact:
                out.append((k, _DIFFERS, float(torch.dot(x, x)), float(torch.dot(y, y))))
                continue
            xx, yy = _sumsq(x), _sumsq(y)
            if math.isfinite(xx) and math.isfinite(yy):
                out.append((k, _DIFFERS, xx, yy))
                continue
            x, y, _ = _masked(x, y)
            out.append((k, _MASKED, _sumsq(x), _sumsq(y)))
        return out

    # -- second sweep: everything from d = x - y
    def _second(self, todo) -> _Acc:
        acc = _Acc()
        for k, kind in todo:
            x, y = self.chunks.pair(k)
            if x.dtype != self.cdt or y.dtype != self.cdt:
                x, y = x.to(self.cdt), y.to(self.cdt)
            if self.range is not None:
                x, y = _saturated(x, self.range), _saturated(y, self.range)
            finite = None
            if kind == _MASKED:
                fa, fb = torch.isfinite(x), torch.isfinite(y)
                acc.special_bad += int(((~fa | ~fb) & ~((~fa & ~fb) & ((x == y) | (x.isnan() & y.isnan())))).sum())
                x, y, finite = _masked(x, y)
            if self.exact:
                self._exact_chunk(k, x, y, acc)
            else:
                self._chunk(k, x, y, acc, finite)
        return acc

    def _chunk(self, k: int, x: torch.Tensor, y: torch.Tensor, acc: _Acc, finite: torch.Tensor | None) -> None:
        n, dt = x.numel(), x.dtype
        d = torch.sub(x, y, out=_scratch(n, dt, "d"))   # scratch buffers: fresh memory is slow to fault in
        lo, hi = torch.aminmax(d)
        peak = max(float(hi), -float(lo))   # infinite where finite values differ by more than the dtype holds
        if _STAND_INS <= peak < math.inf and self.stand_ins:
            # finfo(float32).min against finfo(bfloat16).min, each a mask's -inf (autocast): nothing
            # but such stand-ins lives past bfloat16's range, so they are compared as it holds them
            x, y = _saturated(x, _BF16_MAX), _saturated(y, _BF16_MAX)
            torch.sub(x, y, out=d)
            lo, hi = torch.aminmax(d)
            peak = max(float(hi), -float(lo))
        if peak == 0:
            if self.histograms:
                acc.hist[0] += d.numel() if finite is None else int(finite.sum())
            return
        acc.dd += _sumsq(d) if math.isfinite(peak) else math.inf
        dx = float(torch.dot(d, x))
        if x.dtype != torch.float64 and not (math.isfinite(dx)
                                             and peak * self.scale * math.sqrt(d.numel()) >= _TINY_SUM):
            d64 = d.double()   # products that float32 flushes to zero, or overflows
            dx = float(torch.dot(d64, x.double()))
        acc.dx += dx
        d = d.abs_()
        acc.max_abs = _nanmax(acc.max_abs, peak)
        total = float(d.sum())
        acc.sum_abs += total if math.isfinite(total) or not math.isfinite(peak) else float(d.sum(dtype=torch.float64))
        ax = torch.abs(x, out=_scratch(n, dt, "ax"))
        q = _scratch(n, dt, "q")
        acc.max_rel = _nanmax(acc.max_rel, _max_ratio(d, ax, q))
        if peak > self.bound.atol:
            limit = torch.mul(ax, self.bound.rtol, out=q).add_(self.bound.atol) if self.bound.rtol else self.bound.atol
            acc.bad += _count_above(d, limit, _scratch(n, dt, "c"))
        acc.max_scaled = _nanmax(acc.max_scaled,
                                 float(torch.div(d, torch.clamp(ax, min=self.scale, out=q), out=q).max()))
        if self.histograms:
            _histogram(d, acc.hist, peak, None if finite is None else int(finite.sum()), _scratch(n, dt, "c"))

    def _exact_chunk(self, k: int, x: torch.Tensor, y: torch.Tensor, acc: _Acc) -> None:
        """Integer and bool tensors (or one of them): they must be equal; sums in float64."""
        d = torch.sub(x, y).abs_()
        acc.dd += float(torch.dot(d, d))
        peak = float(d.max())
        acc.max_abs = _nanmax(acc.max_abs, peak)
        acc.sum_abs += float(d.sum())
        if not peak == 0:
            ax = x.abs()
            acc.max_rel = _nanmax(acc.max_rel, _max_ratio(d, ax, torch.empty_like(d)))
            acc.max_scaled = _nanmax(acc.max_scaled, float((d / ax.clamp_min_(self.scale)).max()))
        acc.bad += int(torch.count_nonzero(d != 0))
        if self.histograms:
            _histogram(d, acc.hist, peak)

    def _count(self, ks: list[int]) -> int:
        """How many elements of chunks ``ks`` have ``|d| > atol + rtol * |ref|`` (``self.bound``)."""
        total = 0
        for k in ks:
            x, y = self.chunks.pair(k)
            x, y = x.to(self.cdt), y.to(self.cdt)
            if not self.exact and not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
                x, y, _ = _masked(x, y)
            d = torch.sub(x, y).abs_()
            limit = x.abs().mul_(self.bound.rtol).add_(self.bound.atol) if self.bound.rtol else self.bound.atol
            total += _count_above(d, limit)
        return total


def _masked(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` and ``y`` with zeros where either is NaN or infinite, and where both are finite."""
    both = torch.isfinite(x) & torch.isfinite(y)
    return torch.where(both, x, 0), torch.where(both, y, 0), both


def _cosine(xx: float, yy: float, acc: _Acc) -> float | None:
    """Cosine of the two tensors from the pass's sums. ``1 - cos`` is taken from the difference,
    ``(|d|^2 - (|x| - |y|)^2) / (2 |x| |y|)`` with ``|x| - |y| = (d.x + d.y) / (|x| + |y|)``, so that it
    keeps its digits when the tensors nearly agree."""
    nx, ny = math.sqrt(xx), math.sqrt(yy)
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    if not all(map(math.isfinite, (nx, ny, acc.dd, acc.dx))):
        return math.nan
    gap = (2 * acc.dx - acc.dd) / (nx + ny)   # d.x + d.y, with d.y = d.x - d.d
    one_minus = (acc.dd - gap * gap) / (2 * nx * ny)
    return 1.0 - min(2.0, max(0.0, one_minus))


def _sumsq(x: torch.Tensor) -> float:
    """``sum(x * x)`` of a 1-D chunk, redone in float64 where float32 squares would under- or overflow."""
    s = float(torch.dot(x, x))
    if x.dtype == torch.float64 or _TINY_SUM <= s < math.inf:
        return s
    if s != s or (s == 0 and not bool(x.any())):
        return s
    x = x.double()
    return float(torch.dot(x, x))


def _count_above(d: torch.Tensor, limit: float | torch.Tensor, out: torch.Tensor | None = None) -> int:
    """How many elements of ``d`` exceed ``limit``, exactly. With ``out`` (floating scratch of
    ``d``'s size, at most 2^24 elements): the float sum of the comparison's zeros and ones written
    into it, several times faster in torch than counting a boolean mask."""
    if out is None or d.numel() > 1 << 24:
        return int(torch.count_nonzero(d > limit))
    return int(torch.gt(d, limit, out=out).sum())


_BELOW_EDGES: dict[torch.dtype, list[float]] = {}


def _below_edges(dtype: torch.dtype) -> list[float]:
    """For each decade edge 10^k of the histogram, the largest value of ``dtype`` below it: ``d >= 10^k``
    exactly when ``d`` exceeds it."""
    edges = _BELOW_EDGES.get(dtype)
    if edges is None:
        exact = torch.tensor(HIST_EDGES[2:], dtype=torch.float64)
        near = exact.to(dtype)
        near = torch.where(near.double() < exact, near, torch.nextafter(near, torch.tensor(-math.inf, dtype=dtype)))
        edges = _BELOW_EDGES[dtype] = near.tolist()
    return edges


def _histogram(d: torch.Tensor, hist: list[int], peak: float, valid: int | None = None,
               out: torch.Tensor | None = None) -> None:
    """Add the counts of ``|d|`` (``d >= 0``, ``peak = max d``) to ``hist``: ``== 0``, then per decade
    from 1e-12 (the first bin also holds anything smaller) to >= 10 (``model.report.HIST_EDGES``).
    ``valid``: how many elements count (the others are zeros standing for NaN/Inf)."""
    nonzero = int(float(torch.sign(d).sum()))
    hist[0] += (d.numel() if valid is None else valid) - nonzero
    above = [(_count_above(d, edge, out) if edge < peak else 0) for edge in _below_edges(d.dtype)]
    for i, (lo, hi) in enumerate(zip([nonzero] + above, above + [0])):
        hist[1 + i] += lo - hi


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether two chunks of one dtype hold the same bytes (NaN payloads included)."""
    if x.dtype == torch.bool:
        return torch.equal(x, y)
    view = _INT_VIEW.get(x.element_size())
    if view is None:
        return False
    return torch.equal(x.view(view), y.view(view))


def machine_eps(dtype: torch.dtype) -> float:
    """The machine epsilon of ``dtype`` (of its real part if complex; 0 for exact dtypes)."""
    return torch.finfo(dtype).eps if dtype.is_floating_point else (torch.finfo(dtype.to_real()).eps if dtype.is_complex else 0.0)


def _failed(ref: torch.Tensor, note: str) -> Metrics:
    ref_rms = rms(ref) if ref.numel() else 0.0
    return Metrics(passed=False, max_abs_diff=math.inf, max_rel_diff=math.inf, mean_abs_diff=math.inf,
                   cosine=None, ref_rms=ref_rms, mismatched=ref.numel(), numel=ref.numel(), note=note)


def _missing_grad(side: str, numel: int, ref_rms: float = 0.0) -> Metrics:
    return Metrics(passed=False, max_abs_diff=math.inf, max_rel_diff=math.inf, mean_abs_diff=math.inf,
                   cosine=None, ref_rms=ref_rms, mismatched=numel, numel=numel, note=f"gradient on {side} only")


# -- chunks ------------------------------------------------------------------------------------

class _Chunks:
    """Matching 1-D chunks of two tensors of one shape, by index.

    When both are laid out alike in one dense block (contiguous, or the same permutation of
    dense), the chunks are slices of that block: elementwise statistics do not depend on the
    order of the elements. Otherwise blocks of the leading dimensions are taken, each made
    contiguous on its own (a copy of one chunk, never of the tensor).
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, workers: int = 1):
        self.a, self.b = a, b
        self.n = a.numel()
        self.two_devices = a.device != b.device
        # about four chunks a thread where the pair is not large
        self.chunk = size = min(CHUNK, max(MIN_CHUNK, -(-self.n // (4 * workers))))
        flat_a, flat_b = _dense_block(a), _dense_block(b)
        if flat_a is not None and flat_b is not None and (a.stride() == b.stride() or a.dim() <= 1):
            self.flat = (flat_a, flat_b)
            self.count = max(1, -(-self.n // size))
            return
        self.flat = None
        shape = list(a.shape) or [1]
        if not a.shape:
            self.a, self.b = a.reshape(1), b.reshape(1)
        inner, dim = 1, len(shape)
        while dim > 0 and inner * shape[dim - 1] <= size:
            dim -= 1
            inner *= shape[dim]
        if dim == 0:   # the whole tensor is one chunk
            self.blocks: list[tuple] = [()]
        else:
            split = dim - 1                      # walk dim `split` in steps, the dims before it one by one
            step = max(1, size // inner)
            outer = itertools.product(*(range(s) for s in shape[:split]))
            self.blocks = [(*idx, slice(j, min(j + step, shape[split])))
                           for idx in outer for j in range(0, shape[split], step)]
        self.count = len(self.blocks)

    def __len__(self) -> int:
        return self.count

    def pair(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flat is not None:
            lo, hi = k * self.chunk, min(self.n, (k + 1) * self.chunk)
            x, y = self.flat[0][lo:hi], self.flat[1][lo:hi]
        else:
            index = self.blocks[k]
            x, y = self.a[index].reshape(-1), self.b[index].reshape(-1)
        if self.two_devices:   # a capture against a live run on a GPU: this chunk compared on the CPU
            x, y = x.cpu(), y.cpu()
        return x, y

    def size(self, k: int) -> int:
        """How many elements chunk ``k`` holds."""
        if self.flat is not None:
            return min(self.n, (k + 1) * self.chunk) - k * self.chunk
        return self.a[self.blocks[k]].numel()

    def flat_views(self, side: int) -> Iterator[torch.Tensor]:
        for k in range(self.count):
            yield self.pair(k)[side]


def _dense_block(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s elements as one 1-D view of its storage, when they fill a block of it exactly
    (contiguous, or dense in another dimension order); else None."""
    if t.is_contiguous():
        return t.reshape(-1)
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return None
        expected *= n
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


# -- threads -----------------------------------------------------------------------------------

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, torch.get_num_threads(), 8))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fxdiff-judge",
                                       initializer=torch.set_num_threads, initargs=(1,))
        return _POOL


def _evict(*tensors: torch.Tensor) -> None:
    """Hand the pages of memory-mapped tensors back once they are judged (they stay in the page cache)."""
    from ..store.tensor_file import evict
    evict(*tensors)
