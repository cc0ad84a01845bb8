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

from ..model.capture import DTYPE, TARGET, VMAP_DIMS, Capture
from ..ops import RANDOM_OPS, node_key
from ..store.summary import is_summary
from ..targets import Targets
from ..util import named_dtype

MAX_BLOCK = 64   # ops replayed at most for one node


class _NotReplayable(Exception):
    """Why a block cannot be replayed, in words naming the node and its op."""


def replay(ref: Capture, cand: Capture, cand_node: str, boundary: dict[str, str], like: torch.Tensor,
           targets: Targets | None = None, layouts: dict[str, tuple[int, ...]] | None = None) -> torch.Tensor | str:
    """The candidate's value of ``cand_node`` recomputed from the reference's values.

    ``boundary`` maps candidate node names to the reference nodes whose values stand in for them
    (matched pairs of equal shape, or, with ``layouts``, of dimensions in another order: the
    reference's value permuted so, a (time, batch) layout for a (batch, time) one). The
    candidate's parameters are moved to the device of ``like`` (the reference's value of the
    node) and, floating, cast to its dtype: the replay asks whether the candidate computes the
    reference's function, at the reference's precision; where its ops cannot (they cast to the
    candidate's own dtype), at the candidate's. Only ops on the allowlist (``targets``)
    are called. When the block cannot be replayed, returns why instead, naming the node: too many
    ops, an op off the allowlist or drawing random numbers, an unmatched input, a value not
    stored, arguments not recorded in a replayable form, or an op that fails on the reference's
    values.
    """
    nodes = {n.name: n for n in cand.graph.nodes}
    try:
        with torch.no_grad():
            try:
                out = _Block(ref, cand, boundary, {}, targets, cand_node, like, layouts).value(nodes[cand_node],
                                                                                               root=True)
            except _NotReplayable:
                if not _precisions_differ(ref, cand, boundary):
                    raise
                # ops of the candidate's that cast to its own dtype (a norm's `.to(x.dtype)`) meet the
                # reference's: replayed at the candidate's precision instead
                out = _Block(ref, cand, boundary, {}, targets, cand_node, like, layouts,
                             own_precision=True).value(nodes[cand_node], root=True)
    except _NotReplayable as e:
        return str(e)
    if not isinstance(out, torch.Tensor):
        return f"{_named(nodes[cand_node])} replays to a {type(out).__name__}, not a tensor"
    return out


def replay_backward(ref: Capture, cand: Capture, cand_node: str, consumers: dict[str, str],
                    boundary: dict[str, str], targets: Targets | None = None) -> torch.Tensor | str:
    """The gradient at ``cand_node`` that the candidate's ops give when differentiated by autograd
    from the reference: its forward ops from ``cand_node`` (set to the reference's value) to its
    compared ``consumers`` (candidate node -> reference node) are replayed, and the reference's
    gradients at the consumers are taken back through them. When the block cannot be replayed,
    returns why instead (as ``replay`` does).

    Compared with the candidate's recorded gradient, it tells a backward that is not the derivative
    of the forward (a custom ``autograd.Function``, a gradient hook) from ops whose derivative differs.
    """
    nodes = {n.name: n for n in cand.graph.nodes}
    source = boundary.get(cand_node)
    if source is None:
        return f"{cand_node} has no reference value of its shape to start from"
    for c, r in consumers.items():
        if ref.grads.get(r) is None:
            return f"the reference recorded no gradient at {r} (the counterpart of consumer {c})"
        if is_summary(ref.grads[r]):
            return f"the reference's gradient at {r} is summarised (capture --keep), not stored"
    if is_summary(ref.values[source]):
        return f"the reference's value of {source} is summarised (capture --keep), not stored"
    if not _differentiable(ref.values[source]):
        return f"{cand_node} holds {str(ref.values[source].dtype).removeprefix('torch.')} values: no gradient"
    own = _dtype(cand, nodes[cand_node])
    x = ref.values[source].detach().clone().requires_grad_()
    block = _Block(ref, cand, boundary, {cand_node: x}, targets, cand_node, x)
    try:
        with torch.enable_grad():
            try:
                outs = [block.value(nodes[c], root=True) for c in consumers]
            except _NotReplayable:   # at the candidate's precision, as `replay` does
                if own is None or not own.is_floating_point or own == x.dtype:
                    raise
                x = ref.values[source].detach().to(own, copy=True).requires_grad_()
                block = _Block(ref, cand, boundary, {cand_node: x}, targets, cand_node, x, own_precision=True)
                outs = [block.value(nodes[c], root=True) for c in consumers]
            seeds = []
            for c, o, r in zip(consumers, outs, consumers.values()):
                if not isinstance(o, torch.Tensor) or o.shape != ref.grads[r].shape:
                    got = list(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
                    return (f"consumer {_named(nodes[c])} replays to {got}, the reference's gradient at {r} "
                            f"has shape {list(ref.grads[r].shape)}")
                if not o.requires_grad:
                    return f"consumer {_named(nodes[c])} does not depend differentiably on {cand_node} when replayed"
                seeds.append(ref.grads[r].to(o.device, o.dtype))
            grad, = torch.autograd.grad(outs, x, seeds, allow_unused=True)
    except _NotReplayable as e:
        return str(e)
    except RuntimeError as e:
        return f"autograd failed through the replayed ops: {_first_line(e)}"
    if grad is None:
        return f"the replayed consumers do not depend on {cand_node}"
    return grad


def _call(fn: Any, args: Any, kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; a ``view`` of a value the reference holds in another memory layout
    (its dimensions permuted into the candidate's) as the ``reshape`` it stands for."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError:
        if fn is not torch.Tensor.view:
            raise
        return torch.Tensor.reshape(*args, **kwargs)


def _precisions_differ(ref: Capture, cand: Capture, boundary: dict[str, str]) -> bool:
    """Whether a value at the boundary has another floating dtype on the candidate's side."""
    for c, r in boundary.items():
        a, own = ref.values.get(r), _dtype(cand, cand.node(c))
        if isinstance(a, torch.Tensor) and own is not None and a.is_floating_point() and own.is_floating_point \
                and a.dtype != own:
            return True
    return False


def _dtype(capture: Capture, node: torch.fx.Node) -> torch.dtype | None:
    """The dtype of ``node``'s value in ``capture``, where it holds a tensor."""
    value = capture.values.get(node.name)
    if isinstance(value, torch.Tensor) and not is_summary(value):
        return value.dtype
    return named_dtype(str(node.meta.get(DTYPE)))


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _named(node: torch.fx.Node) -> str:
    """``name (op)``, the op as the user wrote it."""
    return f"{node.name} ({node_key(node)})" if node.op == "call_function" else node.name


def _first_line(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= 160 else line[:157] + "..."


class _Block:
    """The candidate's ops evaluated from the reference's values at the boundary (memoised), for
    the node called ``subject``."""

    def __init__(self, ref: Capture, cand: Capture, boundary: dict[str, str], memo: dict[str, Any],
                 targets: Targets | None, subject: str, like: torch.Tensor,
                 layouts: dict[str, tuple[int, ...]] | None = None, own_precision: bool = False):
        self.ref, self.cand, self.boundary, self.memo = ref, cand, boundary, memo
        self.own_precision = own_precision   # values taken at the candidate's dtypes, its parameters as they are
        self.targets = targets or Targets.default()
        self.subject = subject
        self.like = like   # the candidate's parameters take its device and (floating) dtype
        self.layouts = layouts or {}
        self.ops = 0   # ops entered, counted before their inputs are: a deep chain counts as a wide block does

    def value(self, node: torch.fx.Node, root: bool = False) -> Any:
        if node.name in self.memo:
            return self.memo[node.name]
        ref, cand, boundary = self.ref, self.cand, self.boundary
        if not root and node.name in boundary:
            if is_summary(ref.values[boundary[node.name]]):
                raise _NotReplayable(f"the reference's value of {boundary[node.name]} (standing in for {node.name}) "
                                     "is summarised (capture --keep), not stored")
            out = ref.values[boundary[node.name]]
            if node.name in self.layouts:
                out = out.permute(self.layouts[node.name])
            own = _dtype(cand, node) if self.own_precision else None
            out = out.to(own, copy=True) if own is not None and out.is_floating_point() and own.is_floating_point \
                else out.clone()   # the block may write in place
        elif node.op == "placeholder":
            raise _NotReplayable(f"{node.name} is an input of the candidate with no counterpart of its shape "
                                 "in the reference")
        elif node.op == "get_attr":
            source = cand.params if str(node.target) in cand.params else None
            if source is None and node.name not in cand.values:
                raise _NotReplayable(f"the candidate's {node.target} ({node.name}) was not stored")
            out = source[str(node.target)] if source is not None else cand.values[node.name]
            if is_summary(out):
                raise _NotReplayable(f"the candidate's {node.target} ({node.name}) is summarised (capture --keep), "
                                     "not stored")
            dtype = self.like.dtype if out.is_floating_point() and self.like.is_floating_point() \
                and not self.own_precision else out.dtype
            out = out.to(self.like.device, dtype, copy=True)
        elif node.op == "call_function":
            self.ops += 1
            if self.ops > MAX_BLOCK:
                raise _NotReplayable(f"more than {MAX_BLOCK} of the candidate's ops lie between {self.subject} and "
                                     "values that match the reference")
            if node_key(node) in RANDOM_OPS:
                raise _NotReplayable(f"{_named(node)} draws random numbers: a replay would draw others")
            if VMAP_DIMS in node.meta:
                raise _NotReplayable(f"{_named(node)} ran per sample inside torch.vmap")
            args = self.map(node.args, node)
            kwargs = self.map(node.kwargs, node)
            fn = self.targets.resolve(str(node.meta.get(TARGET)))
            if fn is None:
                raise _NotReplayable(f"{_named(node)}: {node.meta.get(TARGET)} is not on the replay allowlist")
            try:
                out = _call(fn, args, kwargs)
            except Exception as e:  # noqa: BLE001 -- any failure means this op cannot be replayed here
                raise _NotReplayable(f"{_named(node)} fails on the reference's values: {_first_line(e)}") from None
            if out is None and args and isinstance(args[0], torch.Tensor):
                out = args[0]   # setitem and friends write their first argument
        else:
            raise _NotReplayable(f"{node.name} is a {node.op} node")
        self.memo[node.name] = out
        return out

    def map(self, a: Any, owner: torch.fx.Node) -> Any:
        """An op's argument with its nodes replaced by their replayed values."""
        if isinstance(a, torch.fx.Node):
            return self.value(a)
        if isinstance(a, tuple):
            return tuple(self.map(x, owner) for x in a)
        if isinstance(a, list):
            return [self.map(x, owner) for x in a]
        if isinstance(a, dict):
            return {k: self.map(v, owner) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self.map(a.start, owner), self.map(a.stop, owner), self.map(a.step, owner))
        if isinstance(a, str) and a.startswith("<"):
            raise _NotReplayable(f"an argument of {_named(owner)} was recorded only by its type, {a}")
        return a
