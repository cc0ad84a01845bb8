"""Soft anchors: recursive patience alignment of the windows between hard anchors, and look-alike
ops paired in small leftover windows."""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict

import torch

from ..model.alignment import Pair
from .compute_graph import LEVELS, ComputeGraph
from .confidence import OTHER_USERS, PATIENCE, SIZE_ONLY
from .pairset import PairSet

SMALL_GAP = 64     # windows up to this size get the look-alike pass
_RATIONALE = ["same module path and op order"] + [f"patience alignment (level {k})" for k in range(1, LEVELS)]


def fill(ps: PairSet, chain: list[Pair]) -> None:
    """Align the windows between consecutive anchors of the chain."""
    r, c = ps.ref, ps.cand
    bounds = [(-1, -1)] + sorted({(r.pos[p.ref], c.pos[p.cand]) for p in chain}) + [(len(r.order), len(c.order))]
    first_level = 0 if same_names(r, c) else 1
    for (r0, c0), (r1, c1) in zip(bounds, bounds[1:]):
        a = [n for n in r.order[r0 + 1:r1] if ps.free_ref(n)]
        b = [n for n in c.order[c0 + 1:c1] if ps.free_cand(n)]
        if a and b:
            patience(ps, a, b, first_level)


def same_names(r: ComputeGraph, c: ComputeGraph) -> bool:
    """Whether most reference module paths also exist in the candidate."""
    ref_mods = {m for m in r.module.values() if m}
    return bool(ref_mods) and len(ref_mods & set(c.module.values())) >= 0.5 * len(ref_mods)


def patience(ps: PairSet, a: list[str], b: list[str], level: int) -> None:
    """Recursive patience alignment of windows ``a`` and ``b`` (an explicit stack, earlier
    windows first, so pairs upstream are settled before the gaps below them)."""
    r, c = ps.ref, ps.cand
    stack = [(a, b, level)]
    while stack:
        a, b, level = stack.pop()
        chain: list[tuple[int, int]] = []
        while a and b and level < LEVELS:
            fa, fb = r.features(level), c.features(level)
            ka = Counter(fa[n] for n in a)
            kb = Counter(fb[n] for n in b)
            index_b = {fb[n]: j for j, n in enumerate(b) if kb[fb[n]] == 1}
            chain = lis([(i, index_b[fa[n]]) for i, n in enumerate(a)
                         if ka[fa[n]] == 1 and fa[n] in index_b])
            if chain:
                break
            level += 1
        if not chain:
            if a and b and len(a) <= SMALL_GAP and len(b) <= SMALL_GAP:
                small_gap(ps, a, b)
            continue
        for i, j in chain:
            x, y = a[i], b[j]
            if r.use[x] == c.use[y]:
                ps.add(Pair(x, y, _RATIONALE[level], PATIENCE[level]))
            else:
                ps.add(Pair(x, y, f"{_RATIONALE[level]}, used by other ops", min(PATIENCE[level], OTHER_USERS)))
        bounds = [(-1, -1)] + chain + [(len(a), len(b))]
        gaps = [(a[i0 + 1:i1], b[j0 + 1:j1], level) for (i0, j0), (i1, j1) in zip(bounds, bounds[1:])
                if i1 - i0 > 1 and j1 - j0 > 1]
        stack.extend(reversed(gaps))


def small_gap(ps: PairSet, a: list[str], b: list[str]) -> None:
    """Look-alike ops (same key and size) whose matched inputs agree, paired by value closeness
    among themselves, kept in order."""
    r, c = ps.ref, ps.cand
    groups: dict[tuple, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, n in enumerate(a):
        groups[(r.key[n], r.numel[n])][0].append(i)
    for j, n in enumerate(b):
        groups[(c.key[n], c.numel[n])][1].append(j)
    candidates = []
    for ia, jb in groups.values():
        if not (ia and jb):
            continue
        ok = [[ps.consistent(a[i], b[j]) for j in jb] for i in ia]
        if all(sum(row) <= 1 for row in ok) and all(sum(col) <= 1 for col in zip(*ok)):
            # no op has two consistent partners: every optimal assignment takes exactly these pairs
            candidates += [(ia[x], jb[y]) for x, row in enumerate(ok) for y, fits in enumerate(row) if fits]
            continue
        from scipy.optimize import linear_sum_assignment   # imported when needed: 0.4 s
        cost = [[_value_distance(r.capture.values[a[i]], c.capture.values[b[j]]) if ok[x][y] else 1e9
                 for y, j in enumerate(jb)] for x, i in enumerate(ia)]
        rows, cols = linear_sum_assignment(cost)
        candidates += [(ia[x], jb[y]) for x, y in zip(rows, cols) if ok[x][y]]
    for i, j in lis(sorted(candidates)):
        ps.add(Pair(a[i], b[j], "look-alike ops, paired by value", SIZE_ONLY))


def _value_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """How unlike two tensors are (0 = equal), for breaking ties between look-alike ops: the largest
    difference over the reference's largest magnitude, complex tensors by their real and imaginary
    parts (``judge.tensors.value_distance``: read in chunks in the tensors' own precision,
    summarised values on their sample)."""
    from ..judge.tensors import value_distance
    return value_distance(x, y)


def lis(pairs: list[tuple[int, int]], strict: bool = True) -> list[tuple[int, int]]:
    """Longest chain of ``pairs`` (sorted by the first coordinate) increasing in the second
    (non-decreasing when not ``strict``)."""
    find = bisect.bisect_left if strict else bisect.bisect_right
    tails: list[int] = []
    tails_idx: list[int] = []
    prev = [-1] * len(pairs)
    for k, (_, j) in enumerate(pairs):
        pos = find(tails, j)
        if pos == len(tails):
            tails.append(j)
            tails_idx.append(k)
        else:
            tails[pos] = j
            tails_idx[pos] = k
        prev[k] = tails_idx[pos - 1] if pos else -1
    out, k = [], tails_idx[-1] if tails_idx else -1
    while k >= 0:
        out.append(pairs[k])
        k = prev[k]
    return out[::-1]
