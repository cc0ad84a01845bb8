"""Helpers over the judged rows that the verdicts and the stories share: the part of a fused
tensor a row compares, where a replay of the candidate's ops takes the reference's values and how
its result is judged, the ops after a node up to the compared ones, a module's counterpart."""

from __future__ import annotations

import math
import os
from typing import Any, Collection

import torch
import torch.fx

from ..model.capture import Capture
from ..model.report import Metrics, NodeRow
from ..store.summary import is_summary
from . import noise
from .tensors import Tolerance, layout_permutation, machine_eps


def cut(t: torch.Tensor | None, block: tuple[int, int] | list[int] | None,
         index: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """The ``start:stop`` block of the last dimension (the part of a fused output that pairs), or
    the last dimension reordered by ``index`` (features permuted like the weight that made them)."""
    if t is None:
        return None
    if index is not None and t.shape[-1] == len(index):
        return t[..., torch.as_tensor(index)]
    return t if block is None else t[..., block[0]:block[1]]


def stored(capture: Capture, node: Any) -> torch.Tensor | None:
    """The value ``capture`` keeps for ``node`` (a parameter's or buffer's for one read by name), or
    None where it keeps none, or only a summary."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = capture.params.get(str(node.target)) if node.op == "get_attr" else None
    value = capture.values.get(node.name) if value is None else value
    return value if isinstance(value, torch.Tensor) and not is_summary(value) else None


def replay_boundary(ref: Capture, cand: Capture,
                    rows: list[NodeRow]) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Where a replay of the candidate's ops takes the reference's values: the passing pairs
    compared whole (candidate node -> reference node), and the layouts of those compared with
    their dimensions in another order (see ``_layouts``)."""
    whole = [r for r in rows if r.forward.passed and not (r.ref_slice or r.cand_slice or r.cand_permuted)]
    boundary = {r.cand_node: r.ref_node for r in whole if r.ref_shape == r.cand_shape}
    layouts = _layouts(ref, cand, [r for r in whole if r.ref_shape != r.cand_shape])
    boundary.update({r.cand_node: r.ref_node for r in whole if r.cand_node in layouts})
    return boundary, layouts


def _layouts(ref: Capture, cand: Capture, rows: list[NodeRow]) -> dict[str, tuple[int, ...]]:
    """For pairs compared with the candidate's dimensions in another order (fairseq's (time, batch,
    features) against (batch, time, features)): the permutation that lays the reference's value
    out like the candidate's, by candidate node."""
    found = {}
    for r in rows:
        a, b = ref.values.get(r.ref_node), cand.values.get(r.cand_node)
        if a is None or b is None or is_summary(a) or is_summary(b):
            continue
        p = layout_permutation(a, b)   # b.permute(p) is laid out like a
        if p is not None:
            found[r.cand_node] = tuple(sorted(range(len(p)), key=p.__getitem__))
    return found


def coarser(a: torch.Tensor, b: torch.Tensor) -> float:
    """The machine epsilon of the coarser of two values' dtypes: a replay at one side's precision
    compared with the other side's value carries the rounding of both."""
    return max(machine_eps(a.dtype), machine_eps(b.dtype))


def own_verdict(m: Metrics | None, tol: Tolerance, floor: float = 0.0, precision: float = 0.0,
                 backward: bool = False) -> Metrics | None:
    """A comparison judged on its own: as measured under ``--atol``/``--rtol``, else against its
    own rounding, with nothing inherited from inputs (a replay, a backward seed)."""
    if tol.strict:
        return m
    return noise.verdict(m, 0.0, floor, precision=precision, tail_max=math.inf if backward else noise.TAIL_MAX)


def block_after(node: torch.fx.Node, compared: Collection[str]) -> tuple[list[torch.fx.Node], list[str]]:
    """The ops between ``node`` and its nearest ``compared`` users, and those users."""
    block, consumers, queue, seen = [], [], list(node.users), set()
    while queue:
        n = queue.pop(0)
        if n.name in seen or n.op != "call_function":
            continue
        seen.add(n.name)
        if n.name in compared:
            consumers.append(n.name)
        else:
            block.append(n)
            queue.extend(n.users)
    return block, consumers


def counterpart_module(rows: list[NodeRow], module: str, side: str) -> str:
    """The module on the other side that corresponds to ``module``: where the matched rows of
    ``module`` (else of its submodules, else of its nearest ancestor's but the root) lie on the
    other side."""
    mine, theirs = ("ref_module", "cand_module") if side == "ref" else ("cand_module", "ref_module")
    while True:
        exact = [getattr(r, theirs) for r in rows if getattr(r, mine) == module]
        if exact:
            return max(set(exact), key=exact.count)
        inner = [getattr(r, theirs).split(".") for r in rows if getattr(r, mine).startswith(module + ".")]
        if inner or "." not in module:   # not the root's: its rows are anywhere
            return ".".join(os.path.commonprefix(inner)) if inner else ""
        module = module.rpartition(".")[0]   # a module holding nothing matched (a dropout): its parent's
