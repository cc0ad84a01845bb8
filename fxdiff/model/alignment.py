"""The result type of matching two captures, shared by the matcher, the judge and the renderers."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Pair:
    """Node ``ref`` of the reference corresponds to node ``cand`` of the candidate.

    ``ref_slice`` / ``cand_slice`` (``start, stop`` on the last dimension) select the part of a
    fused node's output that corresponds to the other side, e.g. the q block of a fused qkv
    projection; ``cand_index`` reorders the candidate's last dimension into the reference's. ``ref_block`` / ``cand_block`` list the nodes folded into a many-to-many match.
    """

    ref: str
    cand: str
    rationale: str
    confidence: float = 1.0
    ref_slice: tuple[int, int] | None = None
    cand_slice: tuple[int, int] | None = None
    # features of the candidate's output in the reference's order: a weight stored row-permuted
    # (a per-head RoPE layout) makes its op's output features permuted the same way
    cand_index: tuple[int, ...] | None = None
    ref_block: tuple[str, ...] = ()
    cand_block: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ParamPair:
    """Reference parameter ``ref`` equals ``transform`` applied to candidate parameter(s) ``cand``."""

    ref: str
    cand: tuple[str, ...]
    transform: dict = dataclasses.field(default_factory=lambda: {"kind": "identity"})
    evidence: str = "same name"
    confidence: float = 1.0


@dataclasses.dataclass
class Alignment:
    """Matched node pairs (in reference order), the parameter correspondence, and what is left."""

    pairs: list[Pair]
    params: list[ParamPair]
    unmatched_ref: list[str]
    unmatched_cand: list[str]
    unmatched_ref_params: list[str] = dataclasses.field(default_factory=list)
    unmatched_cand_params: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ParamMap:
    """Which candidate parameter(s) hold each reference parameter, and how: a weight conversion.

    Its JSON form (``fxdiff-param-map``) is what ``map-params -o`` writes.
    """

    pairs: list[ParamPair]
    unmapped_ref: list[str]
    unmapped_cand: list[str]
    cand_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def to_dict(self, ref_label: str = "ref", cand_label: str = "cand") -> dict:
        return {"format": "fxdiff-param-map", "version": 1, "ref": ref_label, "cand": cand_label,
                "pairs": [{"ref": p.ref, "cand": list(p.cand), "transform": p.transform, "evidence": p.evidence,
                           "confidence": p.confidence} for p in self.pairs],
                "unmapped": {"ref": self.unmapped_ref, "cand": self.unmapped_cand}}
