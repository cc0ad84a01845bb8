"""The pairs made so far: the one mutable object the matching stages share."""

from __future__ import annotations

from ..model.alignment import Pair
from .compute_graph import ComputeGraph


class PairSet:
    """Pairs between two compute graphs, in the order they were made, indexed both ways.

    A node is *matched* when it is one end of a pair, *folded* when it lies inside a pair's
    many-to-many block, and *free* when neither.
    """

    def __init__(self, ref: ComputeGraph, cand: ComputeGraph):
        self.ref, self.cand = ref, cand
        self.pairs: list[Pair] = []
        self._ref_to_cand: dict[str, list[str]] = {}
        self._cand_to_ref: dict[str, list[str]] = {}
        self._ref_block: dict[str, str] = {}    # ref node folded into a block -> the block's ref node
        self._cand_block: dict[str, str] = {}
        self._pair_of: dict[tuple[str, str], Pair] = {}

    def add(self, p: Pair) -> bool:
        """Add ``p`` unless its two nodes are already paired; whether it was added."""
        if p.cand in self._ref_to_cand.get(p.ref, ()):
            return False
        self.pairs.append(p)
        self._pair_of.setdefault((p.ref, p.cand), p)
        self._ref_to_cand.setdefault(p.ref, []).append(p.cand)
        self._cand_to_ref.setdefault(p.cand, []).append(p.ref)
        self._fold(p)
        return True

    def replace(self, k: int, p: Pair) -> None:
        """Put ``p`` (same nodes, larger blocks) in place of the ``k``-th pair."""
        self.pairs[k] = p
        self._pair_of[(p.ref, p.cand)] = p
        self._fold(p)

    def _fold(self, p: Pair) -> None:
        for n in p.ref_block:
            self._ref_block.setdefault(n, p.ref)
        for n in p.cand_block:
            self._cand_block.setdefault(n, p.cand)

    def get(self, ref: str, cand: str) -> Pair:
        """The pair of ``ref`` and ``cand``."""
        return self._pair_of[(ref, cand)]

    def matched_ref(self, n: str) -> bool:
        """Whether reference node ``n`` is one end of a pair."""
        return n in self._ref_to_cand

    def matched_cand(self, n: str) -> bool:
        """Whether candidate node ``n`` is one end of a pair."""
        return n in self._cand_to_ref

    def free_ref(self, n: str) -> bool:
        """Whether reference node ``n`` is neither matched nor folded into a block."""
        return n not in self._ref_to_cand and n not in self._ref_block

    def free_cand(self, n: str) -> bool:
        """Whether candidate node ``n`` is neither matched nor folded into a block."""
        return n not in self._cand_to_ref and n not in self._cand_block

    def inputs_ref(self, n: str) -> list[str]:
        """The inputs of reference node ``n``, a folded one named by its block's node."""
        return [self._ref_block.get(a, a) for a in self.ref.preds[n]]

    def inputs_cand(self, n: str) -> list[str]:
        """The inputs of candidate node ``n``, a folded one named by its block's node."""
        return [self._cand_block.get(a, a) for a in self.cand.preds[n]]

    def crossed(self, p: Pair) -> bool:
        """Whether pair ``p`` contradicts the pairs of its inputs both ways, an input of each side (of
        its block, from outside it) matched to nothing the other side reads, while an op like it
        that does read one is free (two look-alike slices taken of the query on one side and of the
        key on the other, paired by their order)."""
        def outside(nodes: set[str], inputs) -> set[str]:
            return {a for n in nodes for a in inputs(n)} - nodes
        mine, theirs = {p.ref, *p.ref_block}, {p.cand, *p.cand_block}
        ins_r, ins_c = outside(mine, self.inputs_ref), outside(theirs, self.inputs_cand)

        def against(ins: set[str], mapping: dict[str, list[str]], other: set[str]) -> bool:
            mapped = [mapping[a] for a in ins if a in mapping]
            return bool(mapped) and not any(other.intersection(m) for m in mapped)
        if not (against(ins_r, self._ref_to_cand, ins_c) and against(ins_c, self._cand_to_ref, ins_r)):
            return False
        # a partner that agrees is free: an op like the other side's that reads the partner of an
        # input (where none is, the inputs themselves pair crosswise: a port's own swap, told at this pair)
        mine = {u for a in ins_r for m in self._ref_to_cand.get(a, ()) for u in self.cand.succs[m]}
        theirs = {u for b in ins_c for m in self._cand_to_ref.get(b, ()) for u in self.ref.succs[m]}
        return any(self.free_cand(u) and self.cand.key[u] == self.cand.key[p.cand]
                   and self.cand.numel[u] == self.cand.numel[p.cand] for u in mine) \
            or any(self.free_ref(u) and self.ref.key[u] == self.ref.key[p.ref]
                   and self.ref.numel[u] == self.ref.numel[p.ref] for u in theirs)

    def consistent(self, x: str, y: str) -> bool:
        """Whether pairing ``x`` with ``y`` agrees with the pairs made so far on their inputs:
        every matched input of one is matched to an input of the other."""
        ins_r, ins_c = set(self.inputs_ref(x)), set(self.inputs_cand(y))
        for a in ins_r:
            mapped = self._ref_to_cand.get(a)
            if mapped and not ins_c.intersection(mapped):
                return False
        for b in ins_c:
            mapped = self._cand_to_ref.get(b)
            if mapped and not ins_r.intersection(mapped):
                return False
        return True
