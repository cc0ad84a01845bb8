"""The streaming judge (``fxdiff/judge/tensors.py``) against a plain float64 reference of the same
rules: bit-identical pairs give zero-diff metrics, chunked (and threaded) results equal unchunked
ones, NaN/Inf, layouts, dtypes, strict counts and gradient scaling behave as before. Semantics
only: no timings."""

from __future__ import annotations

import math

import pytest
import torch

from fxdiff.judge import tensors
from fxdiff.judge.noise import OWN_ROUNDING
from fxdiff.judge.tensors import Tolerance, compare_tensors, grad_metrics, statistics
from fxdiff.model.report import HIST_EDGES


# -- the reference: the judge before it streamed (whole tensors, float64 sums) ------------------

def _rms(t):
    return float(t.double().abs().square().mean().sqrt()) if t.numel() else 0.0


def _cosine(a, b):
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a.dot(b) / (na * nb))


def _histogram(diff):
    diff = diff.reshape(-1)
    nz = diff[diff > 0]
    zero = diff.numel() - nz.numel()
    if nz.numel() == 0:
        return [zero] + [0] * (len(HIST_EDGES) - 1)
    logs = nz.double().log10().clamp(-12, 1.5)
    counts = torch.histc(logs, bins=len(HIST_EDGES) - 1, min=-12, max=2)
    return [zero] + [int(c) for c in counts]


def reference(ref, cand, tol, scale_by=None):
    """(metrics dict) as the judge computed them before; ``scale_by``: strict gradient scale."""
    a, b = ref.detach().cpu(), cand.detach().cpu()
    if tuple(a.shape) != tuple(b.shape):
        b = b.reshape(a.shape) if a.numel() == b.numel() else None
    if a.is_complex() or b.is_complex():
        a, b = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(b.to(torch.complex128))
    exact = not (a.is_floating_point() and b.is_floating_point())
    dtype = torch.float64 if exact else torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    special_bad, both = 0, None
    if not exact and not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        special_bad = int(((~fa | ~fb) & ~((~fa & ~fb) & ((a == b) | (a.isnan() & b.isnan())))).sum())
        both = fa & fb
        a, b = torch.where(both, a, 0), torch.where(both, b, 0)
    diff = (a.double() - b.double()).abs() if dtype in (torch.float16, torch.bfloat16) else (a - b).abs()
    eps = 0.0 if exact else max(torch.finfo(ref.dtype if not ref.is_complex() else ref.dtype.to_real()).eps,
                                torch.finfo(cand.dtype if not cand.is_complex() else cand.dtype.to_real()).eps)
    ref_rms, cand_rms, rms_diff = _rms(a), _rms(b), _rms(diff)
    if exact:
        bad = int((diff != 0).sum())
    elif tol.strict:
        s = scale_by if scale_by is not None else 1.0
        bad = int((diff > (tol.atol or 0.0) * s + (tol.rtol or 0.0) * a.abs()).sum())
    else:
        bad = int((diff > OWN_ROUNDING * eps * max(ref_rms, cand_rms)).sum())
    bad += special_bad
    if diff.numel() == 0:
        return dict(passed=bad == 0, max_abs_diff=0.0, max_rel_diff=0.0, max_scaled_diff=0.0, mean_abs_diff=0.0, cosine=None,
                    ref_rms=0.0, cand_rms=0.0, rms_diff=0.0, mismatched=0, numel=0, eps=0.0, histogram=[])
    max_abs = float(diff.max())
    tiny = torch.finfo(dtype).tiny
    rel = float((diff / a.abs().to(diff.dtype)).nan_to_num(nan=0.0, posinf=math.inf).max()) if max_abs > 0 else 0.0
    scaled = float((diff / a.abs().to(diff.dtype).clamp_min(max(ref_rms, cand_rms, tiny))).max())
    return dict(passed=bad == 0, max_abs_diff=max_abs, max_rel_diff=rel, max_scaled_diff=scaled,
                mean_abs_diff=float(diff.sum(dtype=torch.float64)) / max(diff.numel(), 1),
                cosine=None if exact else _cosine(a, b), ref_rms=ref_rms, cand_rms=cand_rms, rms_diff=rms_diff,
                mismatched=bad, numel=diff.numel(), eps=eps,
                histogram=_histogram(diff if both is None else diff[both]))


def close(x, y, rel=1e-5, abs_=0.0):
    if x is None or y is None:
        return x is y
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    if math.isinf(x) or math.isinf(y):
        return x == y
    return abs(x - y) <= max(rel * max(abs(x), abs(y)), abs_)


def assert_like_reference(m, want, histogram=True):
    assert m.passed == want["passed"]
    assert m.mismatched == want["mismatched"] and m.numel == want["numel"]
    assert m.max_abs_diff == pytest.approx(want["max_abs_diff"], rel=1e-6, nan_ok=True)
    assert close(m.max_rel_diff, want["max_rel_diff"], 1e-5)
    assert close(m.max_scaled_diff, want["max_scaled_diff"], 1e-5), (m.max_scaled_diff, want["max_scaled_diff"])
    for key in ("ref_rms", "cand_rms", "rms_diff", "mean_abs_diff"):
        assert close(getattr(m, key), want[key], 1e-4, 1e-30), (key, getattr(m, key), want[key])
    if want["cosine"] is None:
        assert m.cosine is None
    else:   # 1 - cos keeps its digits when the tensors nearly agree
        assert close(1 - m.cosine, 1 - want["cosine"], 2e-2, 1e-12), (m.cosine, want["cosine"])
    assert m.eps == want["eps"] or m.numel == 0
    if histogram:
        assert sum(m.histogram) == sum(want["histogram"])
        assert m.histogram == want["histogram"]


@pytest.fixture(params=[None, 64], ids=["one-chunk", "chunks-of-64"])
def chunked(request, monkeypatch):
    """Run each case unchunked, and again in chunks of 64 elements spread over threads."""
    if request.param:
        monkeypatch.setattr(tensors, "CHUNK", request.param)
        monkeypatch.setattr(tensors, "_PARALLEL_MIN", 2 * request.param)
    return request.param


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def cases():
    g = _gen()
    x = torch.randn(37, 53, generator=g)
    noise = x + x * 1e-6 * torch.randn(37, 53, generator=g)
    with_nan = x.clone()
    with_nan[3, 4], with_nan[5, 5], with_nan[7, 1] = float("nan"), float("inf"), -float("inf")
    cand_nan = with_nan + 1e-7
    cand_nan[7, 1] = float("inf")            # -inf vs inf: differs
    zeros_and_relu = torch.relu(x)
    yield "noise", x, noise
    yield "identical copy", x, x.clone()
    yield "nan and inf as data", with_nan, cand_nan
    yield "relu zeros", zeros_and_relu, torch.relu(noise)
    yield "ref zero, cand not", torch.zeros(100), torch.full((100,), 1e-9)
    yield "tiny gradients", x * 1e-24, noise * 1e-24
    yield "huge values", x * 1e30, noise * 1e30
    yield "bf16 vs float32", x.bfloat16(), x
    yield "float16 pair", x.half(), noise.half()
    yield "float64 vs float32", x.double(), noise
    yield "transposed alike", x.t(), noise.t()
    yield "transposed vs contiguous", x.t(), noise.t().contiguous()
    yield "expanded", torch.randn(1, 53, generator=g).expand(37, 53), torch.randn(37, 53, generator=g)
    yield "sliced", x[::2, 1::3], noise[::2, 1::3]
    yield "0-dim", torch.tensor(1.5), torch.tensor(1.5000001)
    yield "empty", torch.empty(0, 3), torch.empty(0, 3)
    yield "integers", torch.arange(1000) % 7, (torch.arange(1000) % 7).index_fill(0, torch.tensor([5, 500]), 3)
    yield "bool", torch.rand(300, generator=g) > 0.5, torch.rand(300, generator=g) > 0.5
    yield "int vs float", torch.arange(100), torch.arange(100).float() + 0.5
    yield "complex", torch.randn(40, 3, dtype=torch.complex64, generator=g), \
        torch.randn(40, 3, dtype=torch.complex64, generator=g)
    yield "totally different", x, torch.randn(37, 53, generator=g)
    yield "opposite", x, -x


@pytest.mark.parametrize("name, ref, cand", list(cases()), ids=[c[0] for c in cases()])
@pytest.mark.parametrize("tol", [Tolerance(), Tolerance(1e-5, 1e-5), Tolerance(rtol=1e-6), Tolerance(atol=1e-7)],
                         ids=["noise", "strict", "rtol-only", "atol-only"])
def test_streaming_judge_equals_the_whole_tensor_reference(name, ref, cand, tol, chunked):
    assert_like_reference(compare_tensors(ref, cand, tol), reference(ref, cand, tol))


def test_bit_identical_pairs_give_zero_diff_metrics(chunked):
    x = torch.randn(1000, generator=_gen(1))
    for other in (x, x.clone()):
        m = compare_tensors(x, other, Tolerance())
        assert m.passed and m.mismatched == 0 and m.max_abs_diff == m.max_rel_diff == m.mean_abs_diff == 0
        assert m.rms_diff == 0 and m.cosine == 1.0 and m.ref_rms == m.cand_rms == pytest.approx(_rms(x), rel=1e-6)
        assert m.histogram == [1000] + [0] * (len(HIST_EDGES) - 1)
    nan = torch.full((10,), float("nan"))
    assert compare_tensors(nan, nan.clone(), Tolerance()).passed   # NaN where NaN is: equal as data


def test_histograms_only_when_asked():
    x = torch.randn(500, generator=_gen(2))
    with statistics(histograms=False):
        m = compare_tensors(x, x + 1e-3, Tolerance())
    assert m.histogram == [] and m.max_abs_diff > 0
    with statistics(histograms=True):
        assert sum(compare_tensors(x, x + 1e-3, Tolerance()).histogram) == 500


@pytest.mark.parametrize("floor", [0.0, 10.0])
def test_strict_gradients_count_relative_to_their_scale(floor, chunked):
    g = _gen(3)
    ref = torch.randn(400, generator=g) * 1e-3
    cand = ref + torch.randn(400, generator=g) * 2e-8
    tol = Tolerance(atol=1e-5, rtol=0.0)
    m = grad_metrics(ref, cand, tol, floor)
    scale = max(_rms(ref), _rms(cand), floor)
    want = reference(ref, cand, tol, scale_by=scale)
    assert m.mismatched == want["mismatched"] and m.passed == want["passed"]
    assert "judged relative to RMS" in m.note
    raw = reference(ref, cand, tol)
    assert m.max_abs_diff == pytest.approx(raw["max_abs_diff"])


def test_permuted_layout_picks_the_closest_permutation(chunked):
    ref = torch.randn(4, 3, 3, generator=_gen(4))   # (2, 0, 1) and (2, 1, 0) both fit the shape
    m = compare_tensors(ref, ref.permute(1, 2, 0).contiguous(), Tolerance(1e-6, 1e-6))
    assert m.passed and "permuted (2, 0, 1)" in m.note
    m = compare_tensors(ref, ref.permute(2, 1, 0).contiguous(), Tolerance(1e-6, 1e-6))
    assert m.passed and "permuted (2, 1, 0)" in m.note


def test_large_pair_is_split_over_threads_and_agrees():
    g = _gen(5)
    ref = torch.randn(3 * tensors.CHUNK + 17, generator=g)
    cand = ref + ref * 1e-6 * torch.randn(ref.shape, generator=g)
    cand[12345] += 1.0
    for tol in (Tolerance(), Tolerance(1e-5, 1e-5)):
        assert_like_reference(compare_tensors(ref, cand, tol), reference(ref, cand, tol))


def test_rms_in_chunks(chunked):
    x = torch.randn(1000, generator=_gen(6))
    for t in (x, x * 1e-25, x.bfloat16(), x.reshape(10, 100).t(), torch.arange(10)):
        assert tensors.rms(t) == pytest.approx(_rms(t), rel=1e-5)
