"""The matcher's own least-cost assignment gives scipy's answer, ties included (look-alike ops
are paired the same way scipy paired them)."""

from __future__ import annotations

import random

import pytest

from fxdiff.match.patience import assignment


def test_assignment_equals_scipy_with_ties():
    lsa = pytest.importorskip("scipy.optimize").linear_sum_assignment
    rng = random.Random(0)
    for trial in range(3000):
        nr, nc = rng.randint(1, 12 if trial % 10 else 64), rng.randint(1, 12 if trial % 10 else 64)
        pool = [0.0, 1.0, 2.0, 1e9] if trial % 3 == 0 else [rng.random() for _ in range(3)] + [1e9]
        cost = [[rng.choice(pool) if trial % 2 else rng.random() * 2 for _ in range(nc)] for _ in range(nr)]
        rows, cols = lsa(cost)
        assert assignment(cost) == (list(rows), list(cols)), cost
    assert assignment([]) == ([], [])
    assert assignment([[0.0] * 3] * 3) == ([0, 1, 2], [0, 1, 2])
