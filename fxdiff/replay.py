"""Random-op replay across implementations: a live candidate's random ops that the alignment pairs
with the reference's (dropout, ``rand``/``randn``/``bernoulli``/``randperm``/``multinomial``,
in-place ``uniform_``/``normal_``...) take the reference's recorded draws, so two implementations
that consume the random number generator differently still compare in train mode.

The candidate runs once, is aligned with the reference, and runs again with the replay table this
module builds (``replay_table``: call index -> the reference's draw); the recorder applies it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx

from .model.alignment import Alignment
from .model.capture import MODULE, SHAPE, Capture
from .model.report import Report
from .ops import RANDOM_OPS, node_key
from .record.recorder import RANDOM_CALL, REPLAYED, is_random, reference_draw
from .store.summary import is_summary


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
        if pair.ref_slice or pair.cand_slice:
            continue
        r, c = ref_nodes[pair.ref], cand_nodes[pair.cand]
        translated = _mask_as_uniforms(r, c, ref)
        if translated is not None:
            table[translated[0]] = translated[1]
            continue
        k = c.meta.get(RANDOM_CALL)
        if k is None or not is_random(r) or _random_op(r) != _random_op(c) or r.meta.get(SHAPE) != c.meta.get(SHAPE):
            continue
        if "dropout" not in _random_op(c) and _constants(r) != _constants(c):
            continue
        draw = reference_draw(r, ref.values, ref.grads)
        if draw is not None:
            table[k] = draw
    return table


def _mask_as_uniforms(r: torch.fx.Node, c: torch.fx.Node, ref: Capture) -> tuple[int, torch.Tensor] | None:
    """For a reference's Bernoulli mask paired with a candidate's uniforms that it thresholds itself
    (stochastic depth: timm's ``bernoulli_(keep)`` against Hugging Face's ``floor(keep + rand)``, or a
    ``rand < keep``), the candidate's call and uniforms its own threshold turns into the same mask;
    else None. Paired is the draw, or a value made of it alone (``keep + rand``, the mask, a view of it)."""
    if _random_op(r).rstrip("_") != "bernoulli":
        return None
    uniform = _drawn_from(c)
    if _random_op(uniform) != "rand" or RANDOM_CALL not in uniform.meta or len(uniform.users) != 1:
        return None
    use = next(iter(uniform.users))
    numbers = [a for a in use.args if type(a) in (int, float)]
    if len(numbers) != 1 or not 0 < numbers[0] < 1 or len(use.all_input_nodes) != 1:
        return None
    q, key = float(numbers[0]), node_key(use)
    if key == "add" and any(node_key(u).rstrip("_") == "floor" for u in use.users):
        kept, dropped = 1 - q / 2, 0.0          # floor(q + u) is 1 where u >= 1 - q
    elif key in ("lt", "le") and use.args[0] is uniform:
        kept, dropped = 0.0, (1 + q) / 2        # u < q
    elif key in ("gt", "ge") and use.args[0] is uniform:
        kept, dropped = (1 + q) / 2, 0.0        # u > q
    else:
        return None
    mask, shape = ref.values.get(r.name), uniform.meta.get(SHAPE)
    if mask is None or is_summary(mask) or shape is None or mask.numel() != math.prod(shape):
        return None   # one mask a sample, of (batch, 1, 1, 1) on one side and (batch, 1, 1) on the other, is alike
    return uniform.meta[RANDOM_CALL], torch.where(mask != 0, kept, dropped).reshape(shape)


def _drawn_from(node: torch.fx.Node) -> torch.fx.Node:
    """The draw ``node`` is made of alone (``keep + u``, its ``floor``, ``u < keep``, a cast, a view
    of those; a few steps back), or ``node``."""
    found = node
    for _ in range(4):
        if RANDOM_CALL in found.meta:
            return found
        if len(found.all_input_nodes) != 1:
            break
        found = found.all_input_nodes[0]
    return found if RANDOM_CALL in found.meta else node


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
    found: dict[str, dict[str, Any]] = {}
    for p in alignment.pairs:
        c, random = cand_nodes[p.cand], is_random(ref_nodes[p.ref])
        if random:   # paired with a draw made into a mask: a Bernoulli's, replayed as uniforms
            c = _drawn_from(c)
        if c.meta.get(REPLAYED) and (random or c.name not in found):   # once a draw, by the random op it took
            found[c.name] = {"ref_node": p.ref, "cand_node": c.name, "op": node_key(c),
                             "ref_module": ref_nodes[p.ref].meta.get(MODULE, ""),
                             "cand_module": c.meta.get(MODULE, ""), "call": c.meta[RANDOM_CALL]}
    return sorted(found.values(), key=lambda e: e["call"])


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
