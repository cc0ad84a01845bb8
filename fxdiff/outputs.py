"""Pair the model outputs of two runs by what they are, not where they sit.

Outputs are tensor leaves of nested structures (tuples, dicts, ``ModelOutput``s), named by their
path (``last_hidden_state``, ``0``). A leaf pairs with the leaf of the same path and size; the rest
pair among leaves of the same size and kind, closest values first. A leaf left over exists on
one side only: it is reported as unmatched, never compared.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class OutputPair:
    """Reference output ``ref`` corresponds to candidate output ``cand`` (leaf paths)."""

    ref: str
    cand: str
    rationale: str


def pair_outputs(ref: list[tuple[str, torch.Tensor]],
                 cand: list[tuple[str, torch.Tensor]]) -> tuple[list[OutputPair], list[str], list[str]]:
    """(pairs in reference order, reference leaves left over, candidate leaves left over)."""
    from .judge.tensors import value_distance   # the judge imports this module

    cand_by_path = dict(cand)
    pairs: dict[str, OutputPair] = {}
    used: set[str] = set()
    for path, t in ref:
        other = cand_by_path.get(path)
        if other is not None and other.numel() == t.numel() and _kind(other) == _kind(t):
            pairs[path] = OutputPair(path, path, "same name and size")
            used.add(path)
    left = [(p, t) for p, t in ref if p not in pairs]
    free = [(p, t) for p, t in cand if p not in used]
    options = sorted((value_distance(t, u), p, q) for p, t in left for q, u in free
                     if u.numel() == t.numel() and _kind(u) == _kind(t))
    for _, p, q in options:
        if p not in pairs and q not in used:
            pairs[p] = OutputPair(p, q, "same size, closest values")
            used.add(q)
    ordered = [pairs[p] for p, _ in ref if p in pairs]
    return ordered, [p for p, _ in ref if p not in pairs], [q for q, _ in cand if q not in used]


def in_layout_of(g: torch.Tensor, ref: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """``g``, a tensor laid out like the reference output ``ref`` (its gradient), laid out like the
    candidate output ``cand`` it pairs with: through the dimension permutation that lays ``ref``
    out like ``cand`` where one fits ((batch, features, time) against (batch, time, features)),
    else a reshape."""
    from .judge.tensors import layout_permutation   # the judge imports this module

    order = layout_permutation(cand, ref) if ref.shape != cand.shape else None
    return g.permute(order) if order is not None else g.reshape(cand.shape)


def _kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return "complex"
    return "float" if t.is_floating_point() else "exact"
