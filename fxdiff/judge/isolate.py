"""Isolated replay: run the candidate's block on the reference's inputs (teacher forcing).

A node at the frontier of the failing set has matched inputs that pass, yet its own value fails.
Either the candidate's computation there differs (the divergence is *introduced* here), or inputs
that differ within tolerance were amplified. Replaying the candidate's ops that lead to the node,
from the reference's values at every matched boundary, tells the two apart.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..model.capture import TARGET, VMAP_DIMS, Capture
from ..store.summary import is_summary
from ..targets import Targets

MAX_BLOCK = 64   # ops replayed at most for one node


class _NotReplayable(Exception):
    pass


def replay(ref: Capture, cand: Capture, cand_node: str, boundary: dict[str, str],
           targets: Targets | None = None) -> torch.Tensor | None:
    """The candidate's value of ``cand_node`` recomputed from the reference's values.

    ``boundary`` maps candidate node names to the reference nodes whose values stand in for them
    (matched pairs of equal shape). Only ops on the allowlist (``targets``) are called. Returns None
    when the block cannot be replayed: too large, an op off the allowlist, or one whose arguments
    were not recorded in a replayable form.
    """
    nodes = {n.name: n for n in cand.graph.nodes}
    memo: dict[str, Any] = {}
    try:
        with torch.no_grad():
            return _value(nodes[cand_node], ref, cand, boundary, memo, targets or Targets.default(), root=True)
    except _NotReplayable:
        return None


def replay_backward(ref: Capture, cand: Capture, cand_node: str, consumers: dict[str, str],
                    boundary: dict[str, str], targets: Targets | None = None) -> torch.Tensor | None:
    """The gradient at ``cand_node`` that the candidate's ops give when differentiated by autograd
    from the reference: its forward ops from ``cand_node`` (set to the reference's value) to its
    compared ``consumers`` (candidate node -> reference node) are replayed, and the reference's
    gradients at the consumers are taken back through them. None when the block cannot be replayed.

    Compared with the candidate's recorded gradient, it tells a backward that is not the derivative
    of the forward (a custom ``autograd.Function``, a gradient hook) from ops whose derivative differs.
    """
    nodes = {n.name: n for n in cand.graph.nodes}
    source = boundary.get(cand_node)
    if source is None or any(c not in nodes or ref.grads.get(r) is None for c, r in consumers.items()):
        return None
    if is_summary(ref.values[source]) or any(is_summary(ref.grads[r]) for r in consumers.values()):
        return None   # summarised (capture --keep): no elements to replay from
    x = ref.values[source].detach().clone().requires_grad_(_differentiable(ref.values[source]))
    memo: dict[str, Any] = {cand_node: x}
    try:
        with torch.enable_grad():
            outs = [_value(nodes[c], ref, cand, boundary, memo, targets or Targets.default(), root=True)
                    for c in consumers]
            seeds = [ref.grads[r].to(o.dtype) for o, r in zip(outs, consumers.values())]
            if not x.requires_grad or any(not isinstance(o, torch.Tensor) or o.shape != g.shape
                                          for o, g in zip(outs, seeds)):
                return None
            grad, = torch.autograd.grad(outs, x, seeds, allow_unused=True)
    except (_NotReplayable, RuntimeError):
        return None
    return grad


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _value(node: torch.fx.Node, ref, cand, boundary, memo, targets: Targets, root=False) -> Any:
    if node.name in memo:
        return memo[node.name]
    if not root and node.name in boundary:
        if is_summary(ref.values[boundary[node.name]]):
            raise _NotReplayable(node.name)   # summarised (capture --keep): no elements to stand in
        out = ref.values[boundary[node.name]].clone()   # clone: the block may write in place
    elif node.op == "placeholder":
        raise _NotReplayable(node.name)   # an unmatched input: nothing to stand in for it
    elif node.op == "get_attr":
        source = cand.params if str(node.target) in cand.params else None
        if source is None and node.name not in cand.values:
            raise _NotReplayable(node.name)
        out = (source[str(node.target)] if source is not None else cand.values[node.name]).clone()
    elif node.op == "call_function":
        if len(memo) >= MAX_BLOCK:
            raise _NotReplayable("block too large")
        if VMAP_DIMS in node.meta:
            raise _NotReplayable(f"{node.name}: ran per sample inside torch.vmap")
        args = _map(node.args, ref, cand, boundary, memo, targets)
        kwargs = _map(node.kwargs, ref, cand, boundary, memo, targets)
        fn = targets.resolve(str(node.meta.get(TARGET)))
        if fn is None:
            raise _NotReplayable(f"{node.name}: {node.meta.get(TARGET)} is not on the allowlist")
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- any failure means this op cannot be replayed here
            raise _NotReplayable(f"{node.name}: {e}") from None
        if out is None and args and isinstance(args[0], torch.Tensor):
            out = args[0]   # setitem and friends write their first argument
    else:
        raise _NotReplayable(node.name)
    memo[node.name] = out
    return out


def _map(a: Any, *ctx) -> Any:
    if isinstance(a, torch.fx.Node):
        return _value(a, *ctx)
    if isinstance(a, tuple):
        return tuple(_map(x, *ctx) for x in a)
    if isinstance(a, list):
        return [_map(x, *ctx) for x in a]
    if isinstance(a, dict):
        return {k: _map(v, *ctx) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_map(a.start, *ctx), _map(a.stop, *ctx), _map(a.step, *ctx))
    if isinstance(a, str) and a.startswith("<"):
        raise _NotReplayable(a)   # an object recorded only by its type
    return a
