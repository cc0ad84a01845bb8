"""Parameters of equal content, paired through the matched ops that consume them."""

from __future__ import annotations

from collections import defaultdict

import torch

from ..model.alignment import Pair, ParamPair
from ..params import Digests, correspond, output_slice, summarised
from ..store.summary import is_summary
from .compute_graph import ComputeGraph
from .confidence import CERTAIN, CONSUMED_BY_PAIR, ORDER_OF_USE


def settle_params(r: ComputeGraph, c: ComputeGraph, params: list[ParamPair],
                  pairs: list[Pair]) -> tuple[list[ParamPair], list[str], list[str]]:
    """Keep the parameter pairs that content alone decides; pair the rest through matched ops.

    Returns the parameter pairs in reference order of first use, and the reference and candidate
    parameters left unpaired.
    """
    rp, cp = r.capture.params, c.capture.params
    kept = [p for p in params if p.confidence >= CERTAIN]
    done_r = {p.ref for p in kept}
    used_c = {n for p in kept if output_slice(p.transform) is None for n in p.cand}   # rows: shared
    summaries = summarised(rp, cp)
    dig_r, dig_c = Digests(rp, summaries), Digests(cp, summaries)
    pieces: dict[str, list[tuple[int, str, bool]]] = defaultdict(list)   # ref param -> (start, cand, transposed)
    for pair in pairs:
        ref_params = [x for n in (pair.ref, *pair.ref_block) for x in r.params_of.get(n, ())]
        cand_params = [x for n in (pair.cand, *pair.cand_block) for x in c.params_of.get(n, ())]
        for x in ref_params:
            if x in done_r:
                continue
            if dig_r[x] is None:   # a summary that cannot tell
                continue
            for y in cand_params:
                if y in used_c:
                    continue
                found = _fit(rp[x], dig_r[x], cp[y], dig_c, y, pair)
                if found is None:
                    continue
                if found[0] == "piece":
                    if all(q != y for _, q, _ in pieces[x]):
                        pieces[x].append((found[1], y, found[2]))
                    if _covered(rp[x], pieces[x], cp):
                        steps = [{"kind": "concat"}] + ([{"kind": "transpose"}] if pieces[x][0][2] else [])
                        names = tuple(q for _, q, _ in sorted(pieces[x]))
                        transform = steps[0] if len(steps) == 1 else {"kind": "chain", "steps": steps}
                        kept.append(ParamPair(x, names, transform, f"equal content, concatenation of "
                                              f"{', '.join(names)}; consumers matched ({pair.rationale})",
                                              CONSUMED_BY_PAIR))
                        done_r.add(x)
                        used_c.update(names)
                        break
                    continue
                kept.append(ParamPair(x, (y,), found[1], f"equal content; consumers matched ({pair.rationale})",
                                      CONSUMED_BY_PAIR))
                done_r.add(x)
                if output_slice(found[1]) is None:
                    used_c.add(y)
                break
    # what is left, in order of first use, then unused tensors (buffers no op read)
    ref_left = [n for n in dict.fromkeys([*r.param_order, *rp]) if n not in done_r]
    cand_left = [n for n in dict.fromkeys([*c.param_order, *cp]) if n not in used_c]
    rest, ref_left, cand_left = correspond({n: rp[n] for n in ref_left}, {n: cp[n] for n in cand_left},
                                           ref_left, cand_left)
    kept += [ParamPair(p.ref, p.cand, p.transform, p.evidence, min(p.confidence, ORDER_OF_USE)) for p in rest]
    # a fused candidate tensor covered partly here, partly by content: it is used, not left over
    fused_used = {n for p in kept for n in p.cand}
    cand_left = [n for n in cand_left if n not in fused_used]
    rank = {n: i for i, n in enumerate(r.param_order)}
    kept.sort(key=lambda p: rank.get(p.ref, len(rank)))
    return kept, ref_left, cand_left


def _fit(x: torch.Tensor, dx: bytes, y: torch.Tensor, dig_c: Digests, name: str, pair: Pair):
    """How reference tensor ``x`` is found in candidate tensor ``y`` (called ``name``; digests in
    ``dig_c``) of a matched op pair: ("whole", transform), ("piece", start row, transposed) or None."""
    if x.numel() == y.numel() and dig_c[(name, False)] == dx:
        return ("whole", {"kind": "identity"} if tuple(x.shape) == tuple(y.shape)
                else {"kind": "reshape", "shape": list(x.shape)})
    if y.dim() == 2 and x.numel() == y.numel() and dig_c[(name, True)] == dx:
        return ("whole", {"kind": "transpose"})
    if pair.cand_slice and y.dim() >= 1 and not is_summary(y):
        s0, s1 = pair.cand_slice
        for view, pre in ((y, []), (y.t(), [{"kind": "transpose"}]) if y.dim() == 2 else (None, None)):
            if view is None or view.shape[0] < s1:
                continue
            part = view[s0:s1]
            if part.numel() == x.numel() and dig_c.of(part) == dx:
                rows = {"kind": "rows", "start": s0, "stop": s1}
                return ("whole", {"kind": "chain", "steps": pre + [rows]} if pre else rows)
    if pair.ref_slice and x.dim() >= 1 and not is_summary(x):
        s0, s1 = pair.ref_slice
        for view, transposed in ((x, False), (x.t() if x.dim() == 2 else None, True)):
            if view is None or view.shape[0] < s1:
                continue
            part = view[s0:s1]
            if part.numel() == y.numel() and dig_c.of(part) == dig_c[(name, False)]:
                return ("piece", s0, transposed)
    return None


def _covered(x: torch.Tensor, pieces: list[tuple[int, str, bool]], cand: dict[str, torch.Tensor]) -> bool:
    """Whether the candidate ``pieces`` found so far add up to all rows of ``x``."""
    rows = x.shape[1] if pieces and pieces[0][2] else x.shape[0]
    return sum(cand[q].shape[0] for _, q, _ in pieces) == rows
