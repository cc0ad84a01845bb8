"""Growth from matched pairs: their unmatched inputs and users, the ops folded into blocks of
different decompositions, and the layout a pair is reported in."""

from __future__ import annotations

import dataclasses
import heapq
from collections import Counter
from typing import Callable, Iterable

from ..model.alignment import Pair
from .compute_graph import ComputeGraph
from .confidence import SIZE_ONLY, SOLE_INPUT, STEP_BACK, USER_OF_PAIR, VOUCHES
from .pairset import PairSet

BLOCK_LIMIT = 64   # the most inner nodes one many-to-many block may fold


def propagate(ps: PairSet) -> None:
    """Pair the unmatched inputs (and same-key users) of matched pairs where sizes single them out."""
    r, c = ps.ref, ps.cand
    queue = [(-r.pos[p.ref], -c.pos[p.cand], p.ref, p.cand) for p in ps.pairs]
    heapq.heapify(queue)   # latest first: inputs are settled from the outputs backwards
    forward = list(ps.pairs)
    while queue or forward:
        while queue:
            _, _, x, y = heapq.heappop(queue)
            for p in pair_inputs(ps, x, y):
                if ps.add(p):
                    heapq.heappush(queue, (-r.pos[p.ref], -c.pos[p.cand], p.ref, p.cand))
                    forward.append(p)
        grown = []
        for p in sorted(forward, key=lambda p: r.pos[p.ref]):
            for q in pair_users(ps, p.ref, p.cand):
                if ps.add(q):
                    grown.append(q)
                    heapq.heappush(queue, (-r.pos[q.ref], -c.pos[q.cand], q.ref, q.cand))
        forward = grown


def pair_inputs(ps: PairSet, x: str, y: str) -> list[Pair]:
    """Pairs of the free inputs of the pair (``x``, ``y``) and of its blocks, singled out by size."""
    r, c = ps.ref, ps.cand
    pair = ps.get(x, y)
    ins_r = [a for a in _block_inputs(r, x, pair.ref_block) if ps.free_ref(a)]
    ins_c = [b for b in _block_inputs(c, y, pair.cand_block) if ps.free_cand(b)]
    if not ins_r or not ins_c:
        return []
    if len(ins_r) == len(ins_c) == 1 and r.numel[ins_r[0]] == c.numel[ins_c[0]] and pair.confidence >= VOUCHES:
        # the one unmatched input of a well-matched pair on both sides: nearly as strong as that
        # pair (a little less at each step back, so a chain of them ends weak)
        same = r.key[ins_r[0]] == c.key[ins_c[0]]
        return [Pair(ins_r[0], ins_c[0], f"sole unmatched input of a matched pair "
                     f"({'same op' if same else 'different decompositions'})",
                     round(min(SOLE_INPUT, pair.confidence - STEP_BACK), 2))]
    return _unique_pairs(r, c, ins_r, ins_c, lambda n: r.numel[n], lambda n: c.numel[n],
                         "input of a matched pair", SIZE_ONLY)


def pair_users(ps: PairSet, x: str, y: str) -> list[Pair]:
    """Pairs of the free users of the pair (``x``, ``y``) singled out by key and size, consistent
    with the pairs made so far."""
    r, c = ps.ref, ps.cand
    us_r = [a for a in r.succs.get(x, ()) if ps.free_ref(a)]
    us_c = [b for b in c.succs.get(y, ()) if ps.free_cand(b)]
    if not us_r or not us_c:
        return []
    return [p for p in _unique_pairs(r, c, us_r, us_c, lambda n: (r.key[n], r.numel[n]),
                                     lambda n: (c.key[n], c.numel[n]), "user of a matched pair", USER_OF_PAIR)
            if ps.consistent(p.ref, p.cand)]


def _block_inputs(side: ComputeGraph, node: str, inner: Iterable[str]) -> list[str]:
    group = {node, *inner}
    out = []
    for n in group:
        out += [a for a in side.preds[n] if a not in group]
    return list(dict.fromkeys(out))


def _unique_pairs(r: ComputeGraph, c: ComputeGraph, xs: list[str], ys: list[str], fx: Callable, fy: Callable,
                  rationale: str, confidence: float) -> list[Pair]:
    """Pairs (x, y) whose size is unique among ``xs`` and ``ys``, else whose (key, size) is."""
    out = []
    for level in (0, 1):
        kx = Counter(fx(n) if level == 0 else (r.key[n], fx(n)) for n in xs)
        ky = Counter(fy(n) if level == 0 else (c.key[n], fy(n)) for n in ys)
        index = {fy(n) if level == 0 else (c.key[n], fy(n)): n for n in ys}
        for n in xs:
            k = fx(n) if level == 0 else (r.key[n], fx(n))
            if kx[k] == 1 and ky.get(k) == 1:
                m = index[k]
                if all(p.ref != n and p.cand != m for p in out):
                    how = "same op" if r.key[n] == c.key[m] else "different decompositions"
                    out.append(Pair(n, m, f"{rationale} ({how})", confidence))
    return out


def fold_blocks(ps: PairSet) -> None:
    """For pairs of different ops (decompositions), fold the unmatched ops that feed only them."""
    r, c = ps.ref, ps.cand
    for k, p in enumerate(ps.pairs):
        if r.key[p.ref] == c.key[p.cand] or p.ref_slice or p.cand_slice:
            continue
        ref_block = _cone(r, p.ref, p.ref_block, ps.free_ref) if r.key[p.ref] != "input" else ()
        cand_block = _cone(c, p.cand, p.cand_block, ps.free_cand) if c.key[p.cand] != "input" else ()
        ref_block = tuple(dict.fromkeys(p.ref_block + ref_block))
        cand_block = tuple(dict.fromkeys(p.cand_block + cand_block))
        if (ref_block, cand_block) != (p.ref_block, p.cand_block):
            ps.replace(k, dataclasses.replace(p, ref_block=ref_block, cand_block=cand_block))


def _cone(side: ComputeGraph, node: str, folded: tuple[str, ...], free: Callable[[str], bool]) -> tuple[str, ...]:
    """The unmatched ops that feed ``node`` (or the ops already ``folded`` into it) and nothing
    outside it, back to matched ops, in ``node``'s module, its submodules or the modules that enclose
    it (a decomposition lives in the module of the op it decomposes or in the code that calls it; an
    op of another module, such as the residual add of the layer before a norm, left out on the other
    side, stays unmatched); () when more than ``BLOCK_LIMIT`` of them (a whole unmatched region is
    not one block)."""
    inside: dict[str, None] = dict.fromkeys(folded)
    home = side.module.get(node, "")
    stack = [a for n in (node, *folded) for a in side.preds[n] if free(a)]
    while stack:
        n = stack.pop()
        if n in inside or side.key[n] == "input" or not _nested(side.module.get(n, ""), home):
            continue
        inside[n] = None
        if len(inside) > BLOCK_LIMIT:
            return ()
        stack += [a for a in side.preds[n] if free(a)]
    group = set(inside) | {node}
    # keep only ops all of whose users lie inside the block: the rest is shared with other paths
    changed = True
    while changed:
        changed = False
        for n in list(inside):
            if n not in folded and any(u not in group for u in side.succs.get(n, ())):
                del inside[n]
                group.discard(n)
                changed = True
    return tuple(sorted(inside, key=side.pos.__getitem__))


def _nested(a: str, b: str) -> bool:
    """Whether one module path is the other or encloses it."""
    return not a or not b or a == b or a.startswith(b + ".") or b.startswith(a + ".")


def same_layout(r: ComputeGraph, c: ComputeGraph, p: Pair) -> Pair:
    """The pair, with one side named by a view of its op whose shape is the other side's
    (a Conv2d output flattened and transposed against a Linear over patches), if it has one."""
    if p.ref_slice or p.cand_slice or r.shape.get(p.ref) == c.shape.get(p.cand):
        return p
    for side, node, want, replace in ((r, p.ref, c.shape.get(p.cand), "ref"),
                                      (c, p.cand, r.shape.get(p.ref), "cand")):
        alias = next((m for m in side.members.get(node, ())
                      if side.shape.get(m) == want and m in side.capture.values), None)
        if alias is not None and alias != node:
            return dataclasses.replace(p, **{replace: alias})
    return p
