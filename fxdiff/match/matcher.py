"""``GraphMatcher``: the stages of matching, run in order over one ``PairSet``."""

from __future__ import annotations

import dataclasses

from ..model.alignment import Alignment
from ..model.capture import Capture
from ..ops import DEFAULT_OPS, OpKeys
from ..params import correspond
from ..util import gc_paused
from .anchors import input_anchors, longest_chain, output_anchors, param_anchors, user_anchors
from .compute_graph import ComputeGraph
from .confidence import CERTAIN, CROSSED
from .pairset import PairSet
from .patience import fill
from .propagate import fold_blocks, propagate, same_layout
from .settle import settle_params
from .usermap import UserMap


class GraphMatcher:
    """Aligns a candidate capture to a reference capture; call ``match()`` for the ``Alignment``."""

    def __init__(self, ref: Capture, cand: Capture, user_map: UserMap | None = None, ops: OpKeys = DEFAULT_OPS):
        with gc_paused():
            self.ref, self.cand = ComputeGraph(ref, ops), ComputeGraph(cand, ops)
        self.user_map = user_map or UserMap()
        self._alignment: Alignment | None = None

    def match(self) -> Alignment:
        """Compute (once) and return the alignment."""
        if self._alignment is None:
            with gc_paused():
                self._alignment = self._match()
        return self._alignment

    def _match(self) -> Alignment:
        r, c = self.ref, self.cand
        params, _, _ = correspond(r.capture.params, c.capture.params, r.param_order, c.param_order,
                                  self.user_map.params)
        hard = [p for p in params if p.confidence >= CERTAIN]
        anchors = input_anchors(r, c) + output_anchors(r, c) + param_anchors(r, c, hard)
        chain = longest_chain(anchors, r.pos, c.pos, forced=user_anchors(r, c, self.user_map))
        ps = PairSet(r, c)
        for p in chain:
            ps.add(p)
        # Topological order is a partial order: a port may compute independent ops (q, k, v) in
        # another order. Certain anchors off the chain still pair; only the chain bounds windows.
        for p in anchors:
            if (p.confidence >= CERTAIN and (p.ref_slice or not ps.matched_ref(p.ref))
                    and (p.cand_slice or not ps.matched_cand(p.cand))):
                ps.add(p)
        fill(ps, chain)
        propagate(ps)
        fold_blocks(ps)
        for k, p in enumerate(ps.pairs):   # an order-made pair whose inputs pair crosswise: order alone
            if p.confidence < CERTAIN and ps.crossed(p):
                ps.replace(k, dataclasses.replace(p, confidence=min(p.confidence, CROSSED),
                                                  rationale=f"{p.rationale}; its inputs pair crosswise"))
        pairs = sorted(ps.pairs, key=lambda p: (r.pos[p.ref], c.pos[p.cand]))
        params, ref_left, cand_left = settle_params(r, c, params, pairs)
        return Alignment(
            pairs=[same_layout(r, c, p) for p in pairs],
            params=params,
            unmatched_ref=[n for n in r.order if ps.free_ref(n)],
            unmatched_cand=[n for n in c.order if ps.free_cand(n)],
            unmatched_ref_params=ref_left,
            unmatched_cand_params=cand_left,
        )


def match(ref: Capture, cand: Capture, user_map: UserMap | None = None, ops: OpKeys = DEFAULT_OPS) -> Alignment:
    """Align ``cand`` to ``ref``: shorthand for ``GraphMatcher(ref, cand, user_map, ops).match()``."""
    return GraphMatcher(ref, cand, user_map, ops).match()
