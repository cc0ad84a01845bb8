"""Hard anchors: graph inputs, graph outputs, the user's module map and parameters of unique content;
and the chain of them that agrees with both topological orders."""

from __future__ import annotations

import bisect
import re
from collections import defaultdict

import torch

from ..model.alignment import Pair, ParamPair
from ..params import output_index, output_slice
from ..util import named_dtype
from .compute_graph import ComputeGraph
from .confidence import CERTAIN, GRAPH_OUTPUT, SIZE_ONLY
from .patience import lis
from .usermap import UserMap


def input_anchors(r: ComputeGraph, c: ComputeGraph) -> list[Pair]:
    """Graph inputs: identical values first, then equal shape and dtype, in order."""
    ref_in = [n for n in r.order if r.key[n] == "input"]
    cand_in = [n for n in c.order if c.key[n] == "input"]
    out, free = [], list(cand_in)
    rv, cv = r.capture.values, c.capture.values
    for rule in ("identical value", "same shape and kind"):
        for n in ref_in:
            if any(p.ref == n for p in out):
                continue
            for m in free:
                a, b = rv[n], cv[m]
                if a.shape == b.shape and a.is_floating_point() == b.is_floating_point() and \
                        (rule != "identical value" or _identical(a, b)):
                    out.append(Pair(n, m, f"input: {rule}", CERTAIN if rule == "identical value" else SIZE_ONLY))
                    free.remove(m)
                    break
    return out


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values at the coarser of the two precisions, NaNs in the same places counting as equal
    (an input cast to the candidate's dtype is still the same input)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_floating_point() and a.dtype != b.dtype:
        coarse = a.dtype if torch.finfo(a.dtype).eps > torch.finfo(b.dtype).eps else b.dtype
        a, b = a.to(coarse), b.to(coarse)
    elif a.dtype != b.dtype:
        return False
    same = a == b
    if a.is_floating_point():
        same |= a.isnan() & b.isnan()
    return bool(same.all())


def output_anchors(r: ComputeGraph, c: ComputeGraph) -> list[Pair]:
    """Graph outputs by position, where both sides produce them with the same size."""
    def roots(side: ComputeGraph) -> list[str | None]:
        return [side.root.get(n.name) for n in side.capture.output_nodes()]
    out = []
    for i, (a, b) in enumerate(zip(roots(r), roots(c))):
        if a is None or b is None or r.key[a] == "input" or c.key[b] == "input":
            continue
        if r.numel[a] == c.numel[b] and r.key[a] == c.key[b]:
            out.append(Pair(a, b, f"graph output {i}", GRAPH_OUTPUT))
    return out


def user_anchors(r: ComputeGraph, c: ComputeGraph, user_map: UserMap) -> list[Pair]:
    """The ops of the user map's module pairs, in order within each module."""
    if not user_map.modules:
        return []
    rules = [(re.compile(pattern), repl) for pattern, repl in user_map.modules]

    def rename(path: str) -> str | None:
        for pattern, repl in rules:
            if pattern.fullmatch(path):
                return pattern.sub(repl, path)
        return None
    cand_keys = {(c.module[n], c.key[n], c.ordinal[n]): n for n in c.order if c.key[n] != "input"}
    out = []
    for n in r.order:
        if r.key[n] == "input":
            continue
        path = rename(r.module[n])
        m = cand_keys.get((path, r.key[n], r.ordinal[n])) if path is not None else None
        if m is not None:
            out.append(Pair(n, m, f"user map ({r.module[n]} -> {path})", CERTAIN))
    return out


def param_anchors(r: ComputeGraph, c: ComputeGraph, params: list[ParamPair]) -> list[Pair]:
    """The ops that consume corresponding parameters correspond too (in order of use).

    When one side's op consumes parameters that the other side spreads over several ops (a
    ``linear`` against ``matmul`` + bias ``add``; ``layer_norm`` against a written-out norm), the
    last of those ops pairs and the others join it as a block.
    """
    raw = []
    for pp in params:
        ref_users = r.param_users.get(pp.ref, [])
        steps = pp.transform["steps"] if pp.transform.get("kind") == "chain" else [pp.transform]
        if any(s.get("kind") == "concat" for s in steps):  # one fused reference op, k candidate ops
            offset = 0
            for name in pp.cand:
                rows = c.capture.params[name].shape[0]
                for ru, cu in zip(ref_users, c.param_users.get(name, [])):
                    if r.key[ru] == c.key[cu]:
                        raw.append(Pair(ru, cu, f"parameter {pp.ref} = concat({', '.join(pp.cand)})",
                                        pp.confidence, ref_slice=(offset, offset + rows)))
                offset += rows
            continue
        cand_users = c.param_users.get(pp.cand[0], [])
        block = output_slice(pp.transform)
        index = output_index(pp.transform)
        for ru, cu in zip(ref_users, cand_users):
            if block is not None:
                if r.key[ru] == c.key[cu]:
                    raw.append(Pair(ru, cu, f"parameter {pp.ref} = {pp.cand[0]}[{block[0]}:{block[1]}]",
                                    pp.confidence, cand_slice=block))
            elif index is not None:   # an output whose features are the rows, reordered like them
                if r.key[ru] == c.key[cu] and r.numel[ru] == c.numel[cu] and r.shape.get(ru, (0,))[-1:] == (len(index),):
                    raw.append(Pair(ru, cu, f"parameter {pp.ref} = {pp.cand[0]} with rows permuted",
                                    pp.confidence, cand_index=index))
            elif _reads_data(r, ru) != _reads_data(c, cu):
                continue   # x + table against embedding(positions, table): the table looked up is not the sum
            elif r.numel[ru] == c.numel[cu] or (r.key[ru] == c.key[cu] and pp.confidence >= CERTAIN
                                                  and _input_sizes(r, ru) == _input_sizes(c, cu)):
                # the same op with the same unique weight on inputs of the same sizes, whose output's
                # size differs (a stride or padding ported wrong): there the divergence starts (an
                # input of another size is the ops around it in another order: a norm before or
                # after a token is picked)
                raw.append(Pair(ru, cu, f"parameter {pp.ref} <-> {pp.cand[0]}", pp.confidence))
    return merge_decomposed(r, c, raw)


def _reads_data(g: ComputeGraph, node: str) -> bool:
    """Whether ``node`` combines its parameters with floating-point values (activations), rather
    than with integer indices or nothing (a lookup or a function of the weights alone)."""
    return any(_floating(g.dtype.get(p)) for p in g.preds.get(node, ()))


def _floating(dtype: str | None) -> bool:
    kind = named_dtype(dtype) if dtype else None
    return kind is None or kind.is_floating_point or kind.is_complex


def _input_sizes(g: ComputeGraph, node: str) -> list[int] | None:
    """The sizes of ``node``'s inputs other than parameters, in order; None when it has none."""
    return [g.numel[p] for p in g.preds.get(node, ())] or None


def merge_decomposed(r: ComputeGraph, c: ComputeGraph, raw: list[Pair]) -> list[Pair]:
    """One op on one side anchored to several on the other: keep the last, fold the others."""
    sliced = [p for p in raw if p.ref_slice or p.cand_slice or p.cand_index]
    plain = [p for p in raw if not (p.ref_slice or p.cand_slice or p.cand_index)]
    by_ref: dict[str, list[Pair]] = defaultdict(list)
    for p in plain:
        by_ref[p.ref].append(p)
    merged = []
    for ref_node, group in by_ref.items():
        cands = sorted({p.cand for p in group}, key=c.pos.__getitem__)
        last = cands[-1]
        inner = tuple(x for x in cands[:-1] if _reaches(c, x, last))
        best = next(p for p in group if p.cand == last)
        merged.append(Pair(ref_node, last, best.rationale, best.confidence, cand_block=inner))
    by_cand: dict[str, list[Pair]] = defaultdict(list)
    for p in merged:
        by_cand[p.cand].append(p)
    out = list(sliced)
    for cand_node, group in by_cand.items():
        refs = sorted({p.ref for p in group}, key=r.pos.__getitem__)
        last = refs[-1]
        inner = tuple(x for x in refs[:-1] if _reaches(r, x, last))
        best = next(p for p in group if p.ref == last)
        out.append(Pair(last, cand_node, best.rationale, best.confidence, ref_block=inner,
                        cand_block=best.cand_block))
    return out


def _reaches(side: ComputeGraph, src: str, dst: str, limit: int = 64) -> bool:
    """Whether ``src`` is an ancestor of ``dst`` (searching at most ``limit`` nodes back)."""
    preds, pos = side.preds, side.pos
    stack, seen = [dst], {dst}
    while stack and len(seen) <= limit:
        n = stack.pop()
        for a in preds[n]:
            if a == src:
                return True
            if a not in seen and pos[a] > pos[src]:
                seen.add(a)
                stack.append(a)
    return False


def longest_chain(anchors: list[Pair], rpos: dict[str, int], cpos: dict[str, int],
                  forced: list[Pair] = ()) -> list[Pair]:
    """Anchors consistent with both topological orders; 1:k blocks share a position on one side.

    ``forced`` anchors (the user's) win: the others must fit between them and not reuse their nodes.
    """
    def chain(items: list[Pair]) -> list[Pair]:
        groups: dict[tuple[int, int], list[Pair]] = defaultdict(list)
        for p in items:
            groups[(rpos[p.ref], cpos[p.cand])].append(p)
        return [p for point in lis(sorted(groups), strict=False) for p in groups[point]]
    if not forced:
        return chain(anchors)
    forced = chain(forced)
    fr, fc = [rpos[p.ref] for p in forced], [cpos[p.cand] for p in forced]
    taken_r, taken_c = {p.ref for p in forced}, {p.cand for p in forced}

    def fits(p: Pair) -> bool:
        x, y = rpos[p.ref], cpos[p.cand]
        return (p.ref not in taken_r and p.cand not in taken_c
                and bisect.bisect_left(fr, x) == bisect.bisect_left(fc, y)
                and bisect.bisect_right(fr, x) == bisect.bisect_right(fc, y))
    return chain(forced + [p for p in anchors if fits(p)])
