"""Summarised tensors: what ``capture --keep summary`` (or ``grads``) keeps of a value or gradient
(``summary`` also of the parameters and their gradients).

A ``Summary`` stands in a capture for a tensor it no longer holds. It has the tensor's shape and
dtype (so a capture's structure, matching and reports are unchanged) and holds

- whole-tensor statistics, in float64: element count, sum, sum of squares, minimum and maximum of
  the finite elements, and counts of NaN, +Inf and -Inf;
- a fixed-seed sample of ``SAMPLE`` elements: one at a seeded position in each of ``SAMPLE``
  equal strata of the row-major order (``sample_index``), the same positions for every tensor of
  that size, so two summaries, or a summary and a full tensor, compare element for element;
- a hash of its row-major bytes, so bit-identical tensors are known as such: xxh3 for tensors
  on the CPU, ``device_summary.unit_digest`` for tensors on a GPU (whose summaries
  ``device_summary.DeviceSummaries`` computes there, without waiting for the GPU);
- for a parameter, ``content``: ``device_summary.content_digest``, a hash of its elements rounded
  to bfloat16, by which ``params.correspond`` pairs it with the other side's parameters.

The judge (``judge/tensors.py``) compares a summary with a summary or with a full tensor on the
sample, and bounds what the sample cannot see with the statistics (``|rms_a - rms_b|``,
``|max_a - max_b|``... are lower bounds of the difference). Anything else that would compute
with a summary's elements raises ``SummarisedValue``. Complex tensors are summarised as their
real view (real and imaginary parts).

In a capture directory a summary is its sample, stored as the tensor, and its statistics, in the
node's metadata (``fxdiff_value_summary`` / ``fxdiff_grad_summary``; for parameters, outputs and
their gradients, which have no node, in graph.json's ``summaries`` by name); such captures are
format version 4.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import xxhash

from ..errors import FxdiffError
from ..util import dtype_name, finite

SAMPLE = 4096
SEED = 0
VALUE_SUMMARY = "fxdiff_value_summary"
GRAD_SUMMARY = "fxdiff_grad_summary"
_STATS = ("numel", "sum", "sumsq", "min", "max", "nan", "posinf", "neginf")
_CHUNK = 1 << 18


class SummarisedValue(FxdiffError):
    """An operation needed the elements of a tensor that the capture keeps only as a summary."""


@functools.lru_cache(maxsize=256)
def _sample_index_cached(numel: int, k: int, seed: int) -> torch.Tensor:
    if numel <= k:
        return torch.arange(numel)
    g = torch.Generator().manual_seed(seed)
    bounds = (torch.arange(k + 1, dtype=torch.float64) * numel / k).floor().long()
    width = (bounds[1:] - bounds[:-1]).double()
    return bounds[:-1] + (torch.rand(k, generator=g, dtype=torch.float64) * width).long()


def sample_index(numel: int, k: int = SAMPLE, seed: int = SEED) -> torch.Tensor:
    """Row-major positions of the sample of a tensor of ``numel`` elements (all of them up to ``k``)."""
    return _sample_index_cached(int(numel), int(k), int(seed))


class Summary(torch.Tensor):
    """A tensor's shape, dtype, statistics, sample and hash, in place of the tensor (see the module
    docstring). ``positions`` are the row-major indices the sample was taken at."""

    stats: dict[str, float]
    sample: torch.Tensor
    positions: torch.Tensor
    digest: str | None
    content: str | None   # a parameter's ``device_summary.content_digest``, which pairs parameters

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, shape, dtype: torch.dtype, stats: dict[str, float], sample: torch.Tensor,
                positions: torch.Tensor, digest: str | None, content: str | None = None):
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=torch.device("cpu"))
        t.stats, t.sample, t.positions, t.digest, t.content = stats, sample, positions, digest, content
        return t

    def __init__(self, *args, **kwargs):
        super().__init__()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return args[0]
        if func is torch.ops.aten.slice.Tensor:
            return args[0]._slice(*args[1:], **kwargs)
        raise SummarisedValue(f"{name} needs the elements of a tensor this capture keeps only as a summary "
                              "(statistics and a sample: capture --keep both to keep them)")

    def __repr__(self) -> str:  # noqa: D105
        return f"Summary(shape={tuple(self.shape)}, dtype={self.dtype}, sample of {self.sample.numel()})"

    def _slice(self, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> "Summary":
        """The summary of ``t[..., start:end]`` along ``dim``: the sample elements that fall inside
        (the whole-tensor statistics do not carry over)."""
        shape = list(self.shape)
        dim = dim % len(shape)
        size = shape[dim]
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None or end > size else (end + size if end < 0 else end)
        start, end = max(0, min(start, size)), max(0, min(end, size))
        coords = list(torch.unravel_index(self.positions, tuple(shape))) if self.positions.numel() else \
            [torch.empty(0, dtype=torch.long)] * len(shape)
        c = coords[dim]
        keep = (c >= start) & (c < end) & ((c - start) % step == 0)
        new = list(shape)
        new[dim] = len(range(start, end, step))
        coords = [x[keep] for x in coords]
        coords[dim] = (coords[dim] - start) // step
        positions = _ravel(coords, new)
        return Summary(new, self.dtype, {}, self.sample[keep], positions, None)


def _ravel(coords: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    flat = torch.zeros_like(coords[0]) if coords else torch.zeros(0, dtype=torch.long)
    for c, n in zip(coords, shape):
        flat = flat * n + c
    return flat


def is_summary(t: Any) -> bool:
    return isinstance(t, Summary)


def all_zero(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` (a tensor or a summary) is zero."""
    if isinstance(t, Summary):
        st = t.stats
        return st["min"] == st["max"] == 0 and not (st["nan"] or st["posinf"] or st["neginf"])
    return not bool(t.any())


def summarise(t: torch.Tensor, content: bool = False) -> Summary:
    """The summary of ``t`` as it is now (on its device; statistics and sample come back to the CPU);
    with ``content`` (a parameter), also its ``device_summary.content_digest``."""
    t = t.detach()
    real = torch.view_as_real(t) if t.is_complex() else t
    numel = real.numel()
    positions = sample_index(numel)
    stats = dict.fromkeys(_STATS, 0.0)
    stats["numel"] = float(numel)
    stats["min"], stats["max"] = math.inf, -math.inf
    flat = real.reshape(-1) if real.is_contiguous() else None
    if numel:
        from ..judge.tensors import _Chunks   # the statistics do not depend on the order of the elements
        chunks = _Chunks(real, real)
        for k in range(len(chunks)):
            _add_stats(stats, chunks.pair(k)[0])
        if flat is not None:
            sample = flat.index_select(0, positions.to(flat.device))
        else:
            sample = real[torch.unravel_index(positions.to(real.device), tuple(real.shape))]
    else:
        sample = real.reshape(-1)[:0]
    if stats["min"] > stats["max"]:
        stats["min"] = stats["max"] = 0.0
    digest = _digest(real) if real.device.type == "cpu" else None
    if content:
        from .device_summary import content_digest
        content = content_digest(real)
    return Summary(real.shape, real.dtype, stats, sample.cpu().clone(), positions, digest, content or None)


def _add_stats(stats: dict[str, float], chunk: torch.Tensor) -> None:
    """Add one chunk's sums (float32 chunks are summed as float32, totals kept in float64; anything
    with NaN, infinities or magnitudes float32 squares cannot hold is redone in float64)."""
    from ..judge.tensors import _sumsq
    c = chunk if chunk.dtype in (torch.float32, torch.float64) else \
        chunk.to(torch.float32 if chunk.is_floating_point() else torch.float64)
    total = float(c.sum())
    if math.isfinite(total):
        lo, hi = torch.aminmax(c)
        sumsq = _sumsq(c)
        if math.isfinite(sumsq):
            stats["sum"] += total
            stats["sumsq"] += sumsq
            stats["min"] = min(stats["min"], float(lo))
            stats["max"] = max(stats["max"], float(hi))
            return
    c = c.to(torch.float64)
    finite = torch.isfinite(c)
    if not bool(finite.all()):
        stats["nan"] += int(torch.isnan(c).sum())
        stats["posinf"] += int((c == math.inf).sum())
        stats["neginf"] += int((c == -math.inf).sum())
        c = c[finite]
    if not c.numel():
        return
    lo, hi = torch.aminmax(c)
    stats["sum"] += float(c.sum())
    stats["sumsq"] += float(torch.dot(c, c))
    stats["min"] = min(stats["min"], float(lo))
    stats["max"] = max(stats["max"], float(hi))


def _digest(t: torch.Tensor, like: str | None = None) -> str:
    """xxh3 of ``t``'s bytes in row-major order (read in blocks: no copy of the whole tensor); with
    ``like`` a hash of a GPU summary (``device_summary.unit_digest``), the hash computed as that one was."""
    from .device_summary import PREFIX, unit_digest
    if like is not None and like.startswith(PREFIX):
        return unit_digest(t)
    from ..params.correspond import _row_major_blocks
    h = xxhash.xxh3_64()
    for block in _row_major_blocks(t):
        block = block.contiguous().reshape(-1)
        h.update((block.view(torch.uint8) if block.dtype != torch.bool else block).numpy())
    return h.hexdigest()


# -- in a capture directory --------------------------------------------------------------------

def to_json(s: Summary) -> dict[str, Any]:
    """The statistics and hash of a summary, for the node's metadata (the sample is stored as a tensor)."""
    stats = s.stats
    values = [stats[k] for k in _STATS]
    if not math.isfinite(sum(values)):   # rare: one is not finite (or their sum overflows)
        values = [finite(v) for v in values]
    doc = {"shape": list(s.shape), "dtype": dtype_name(s.dtype), "sample": SAMPLE, "seed": SEED,
           **dict(zip(_STATS, values)), "hash": s.digest}
    if s.content:
        doc["content"] = s.content
    return doc


def from_json(doc: Any, sample: torch.Tensor, where: str) -> Summary:
    """The summary described by ``doc`` (node metadata) with its stored ``sample``; refuses anything malformed."""
    def bad(what: str) -> FxdiffError:
        return FxdiffError(f"{where}: malformed summary ({what})")
    if not isinstance(doc, dict):
        raise bad("not a mapping")
    shape, dtype_name = doc.get("shape"), doc.get("dtype")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise bad("shape")
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype) or dtype.is_complex:
        raise bad("dtype")
    stats = {}
    for k in _STATS:
        v = doc.get(k)
        try:
            stats[k] = float(v)
        except (TypeError, ValueError):
            raise bad(k) from None
    numel = math.prod(shape)
    if stats["numel"] != numel or doc.get("sample") != SAMPLE or doc.get("seed") != SEED:
        raise bad("element count or sampling")
    positions = sample_index(numel)
    if sample.dim() != 1 or sample.numel() != positions.numel() or sample.dtype != dtype:
        raise bad("sample")
    digest, content = doc.get("hash"), doc.get("content")
    if digest is not None and not isinstance(digest, str):
        raise bad("hash")
    if content is not None and not isinstance(content, str):
        raise bad("content hash")
    return Summary(shape, dtype, stats, sample, positions, digest, content)
