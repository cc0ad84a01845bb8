"""The matching benchmark's synthetic pairs, small: the matcher recovers the known correspondence."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fxdiff.match import GraphMatcher

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "matching.py"
_spec = importlib.util.spec_from_file_location("fxdiff_bench_matching", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_synthetic_pair_is_aligned_as_the_truth_says():
    ref, cand, truth = bench.build_pair(30)
    alignment = GraphMatcher(ref, cand).match()
    accuracy, wrong = bench.accuracy(truth, alignment)
    assert accuracy >= 0.99 and wrong == 0
    # fused qkv: each of q, k, v pairs with its slice of the one projection
    slices = sorted(p.cand_slice for p in alignment.pairs if ref.node(p.ref).meta["fxdiff_module"].startswith(
        "encoder.layer.5.attention.self.") and p.cand_slice)
    assert slices == [(0, 8), (8, 16), (16, 24)]
    # the written-out LayerNorm of layer 3 is one block against layer_norm
    ln = next(p for p in alignment.pairs if ref.node(p.ref).meta["fxdiff_module"] == "encoder.layer.3.output.ln")
    assert len(ln.cand_block) == 8
    assert not alignment.unmatched_cand and not alignment.unmatched_ref


def test_truth_is_not_trivially_satisfied():
    """A deliberately wrong alignment scores badly: the accuracy measure can fail."""
    ref, cand, truth = bench.build_pair(4)
    alignment = GraphMatcher(ref, cand).match()
    shifted = [type(p)(p.ref, q.cand, p.rationale) for p, q in zip(alignment.pairs, alignment.pairs[1:])]
    alignment.pairs = shifted
    accuracy, wrong = bench.accuracy(truth, alignment)
    assert accuracy < 0.5 and wrong > 10
