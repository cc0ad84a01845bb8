"""The result type of matching two captures, shared by the matcher, the judge and the renderers."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Pair:
    """Node ``ref`` of the reference corresponds to node ``cand`` of the candidate.

    ``ref_slice`` / ``cand_slice`` (``start, stop`` on the last dimension) select the part of a
    fused node's output that corresponds to the other side, e.g. the q block of a fused qkv
    projection. ``ref_block`` / ``cand_block`` list the nodes folded into a many-to-many match.
    """

    ref: str
    cand: str
    rationale: str
    confidence: float = 1.0
    ref_slice: tuple[int, int] | None = None
    cand_slice: tuple[int, int] | None = None
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
