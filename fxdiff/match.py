"""Align the nodes and parameters of two captures.

``match(ref, cand)`` returns an ``Alignment``: pairs of nodes whose tensors should be equal, each
with a rationale and a confidence, the parameter correspondence, and what stayed unmatched. This
module aligns by module path and op order, which is right when both sides use the same names.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch.fx

from .capture import MODULE, TARGET, Capture
from .ops import op_key


@dataclasses.dataclass(frozen=True)
class Pair:
    """Node ``ref`` of the reference corresponds to node ``cand`` of the candidate."""

    ref: str
    cand: str
    rationale: str
    confidence: float = 1.0


@dataclasses.dataclass(frozen=True)
class ParamPair:
    """Reference parameter ``ref`` equals ``transform`` applied to candidate parameter(s) ``cand``."""

    ref: str
    cand: tuple[str, ...]
    transform: dict = dataclasses.field(default_factory=lambda: {"kind": "identity"})
    evidence: str = "name"


@dataclasses.dataclass
class Alignment:
    """The result of matching two captures."""

    pairs: list[Pair]
    params: list[ParamPair]
    unmatched_ref: list[str]
    unmatched_cand: list[str]


def node_key(node: torch.fx.Node) -> str:
    """The canonical op key of a node (``input`` for placeholders, ``param`` for get_attr)."""
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "param" if not str(node.target).startswith("_fxdiff_constant") else "constant"
    return op_key(node.meta.get(TARGET, str(node.target)))


def _named_keys(capture: Capture) -> dict[tuple, str]:
    """(module, op key, ordinal) for every value node; ordinals count per (module, op key)."""
    seen: dict[tuple[str, str], int] = defaultdict(int)
    keys = {}
    for node in capture.graph.nodes:
        if node.name not in capture.values:
            continue
        if node.op == "placeholder":
            keys[("input", str(node.target))] = node.name
            continue
        base = (node.meta.get(MODULE, ""), node_key(node))
        keys[base + (seen[base],)] = node.name
        seen[base] += 1
    return keys


def match(ref: Capture, cand: Capture) -> Alignment:
    """Pair nodes with equal module path, op key and ordinal; parameters with equal names."""
    ref_keys, cand_keys = _named_keys(ref), _named_keys(cand)
    pairs = [Pair(r, cand_keys[k], "module path and op order") for k, r in ref_keys.items() if k in cand_keys]
    order = {n.name: i for i, n in enumerate(ref.graph.nodes)}
    pairs.sort(key=lambda p: order[p.ref])
    paired_ref = {p.ref for p in pairs}
    paired_cand = {p.cand for p in pairs}
    params = [ParamPair(name, (name,)) for name in ref.params if name in cand.params]
    return Alignment(
        pairs=pairs,
        params=params,
        unmatched_ref=[n for n in ref_keys.values() if n not in paired_ref],
        unmatched_cand=[n for n in cand_keys.values() if n not in paired_cand],
    )
