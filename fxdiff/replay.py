"""Random-op replay across implementations: a live candidate's random ops that the alignment pairs
with the reference's (dropout, ``rand``/``randn``/``bernoulli``/``randperm``/``multinomial``,
in-place ``uniform_``/``normal_``...) take the reference's recorded draws, so two implementations
that consume the random number generator differently still compare in train mode.

The candidate runs once, is aligned with the reference, and runs again with the replay table this
module builds (``replay_table``: call index -> the reference's draw); the recorder applies it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from .model.alignment import Alignment
from .model.capture import MODULE, SHAPE, Capture
from .model.report import Report
from .ops import RANDOM_OPS, node_key
from .record.recorder import RANDOM_CALL, REPLAYED, is_random, reference_draw


def drew(ref: Capture, cand: Capture) -> bool:
    """Whether both runs drew random numbers (else there is nothing to replay)."""
    return any(RANDOM_CALL in n.meta for n in cand.graph.nodes) and any(map(is_random, ref.graph.nodes))


def replay_table(ref: Capture, cand: Capture, alignment: Alignment) -> dict[int, torch.Tensor]:
    """``ref``'s draw for each random call of ``cand`` (by call index) that ``alignment`` pairs with a
    random op of ``ref`` of the same op, shape and constant arguments (dropout's ``p`` excepted: the
    candidate applies its own to the reference's mask)."""
    ref_nodes, cand_nodes = {n.name: n for n in ref.graph.nodes}, {n.name: n for n in cand.graph.nodes}
    table = {}
    for pair in alignment.pairs:
        r, c = ref_nodes[pair.ref], cand_nodes[pair.cand]
        k = c.meta.get(RANDOM_CALL)
        if k is None or not is_random(r) or pair.ref_slice or pair.cand_slice or _random_op(r) != _random_op(c) \
                or r.meta.get(SHAPE) != c.meta.get(SHAPE):
            continue
        if "dropout" not in _random_op(c) and _constants(r) != _constants(c):
            continue
        draw = reference_draw(r, ref.values, ref.grads)
        if draw is not None:
            table[k] = draw
    return table


def _random_op(node: torch.fx.Node) -> str:
    """The random op a node runs, ``rand_like`` and ``rand`` alike."""
    return node_key(node).removesuffix("_like")


_NOT_CONSTANTS = ("dtype", "device", "layout", "generator", "requires_grad", "pin_memory", "memory_format", "out")


def _constants(node: torch.fx.Node) -> list:
    """The numbers and flags a random op was called with (sizes, bounds, probabilities), in order."""
    found: list = []

    def walk(x: Any) -> None:
        if isinstance(x, (bool, int, float)):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(node.args)
    walk([v for k, v in node.kwargs.items() if k not in _NOT_CONSTANTS])
    return found


def replayed(ref: Capture, cand: Capture, alignment: Alignment) -> list[dict[str, Any]]:
    """The pairs whose candidate random op took the reference's draw, for the report."""
    ref_nodes, cand_nodes = {n.name: n for n in ref.graph.nodes}, {n.name: n for n in cand.graph.nodes}
    return [{"ref_node": p.ref, "cand_node": p.cand, "op": node_key(cand_nodes[p.cand]),
             "ref_module": ref_nodes[p.ref].meta.get(MODULE, ""),
             "cand_module": cand_nodes[p.cand].meta.get(MODULE, ""), "call": cand_nodes[p.cand].meta[RANDOM_CALL]}
            for p in alignment.pairs if cand_nodes[p.cand].meta.get(REPLAYED)]


def withheld(ref: Capture, cand: Capture, alignment: Alignment) -> list[str]:
    """Paired random ops of one kind and shape whose arguments differ (a stochastic depth rate
    ported wrong), in words: the candidate drew its own numbers there."""
    ref_nodes, cand_nodes = {n.name: n for n in ref.graph.nodes}, {n.name: n for n in cand.graph.nodes}
    found = []
    for pair in alignment.pairs:
        r, c = ref_nodes[pair.ref], cand_nodes[pair.cand]
        if RANDOM_CALL in c.meta and is_random(r) and _random_op(r) == _random_op(c) \
                and r.meta.get(SHAPE) == c.meta.get(SHAPE) and "dropout" not in _random_op(c) \
                and _constants(r) != _constants(c):
            found.append(f"{_random_op(c)} at {c.meta.get(MODULE, '') or '<root>'} drew its own numbers: its "
                         f"arguments {_constants(c)} differ from the reference's {_constants(r)} at "
                         f"{r.meta.get(MODULE, '') or '<root>'}, so the reference's draw was not given to it")
    return found


def random_differences(report: Report) -> list[str]:
    """Two captures whose paired random ops drew differently, in words: only a live candidate is replayed."""
    differ = [r for r in report.nodes if r.op in RANDOM_OPS and r.forward is not None and not r.forward.passed]
    if not differ:
        return []
    where = ", ".join(f"{r.op} at {r.ref_module or '<root>'}" for r in differ[:3])
    return [f"{len(differ)} paired random ops drew differently ({where}{', ...' if len(differ) > 3 else ''}): "
            "two captures cannot be replayed; compare the candidate live (a model spec or module) to give it "
            "the reference's random draws"]
