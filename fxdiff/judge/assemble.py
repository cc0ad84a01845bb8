"""Judge an alignment: compare tensors pair by pair and find where a divergence starts.

A candidate element passes when ``|cand - ref| <= atol + rtol * |ref|`` (``torch.allclose``'s rule),
computed in the tensors' common floating dtype (the difference of two nearby floats is exact) with
sums in float64. NaN and infinities are compared as data: equal when they sit at the same positions
with the same sign. Integer and bool tensors must be equal. Gradients are judged relative to their
scale (see ``tensors.grad_metrics``). The tensor comparison itself is ``tensors.py``.

Weak pairs (matched on op order alone) whose values differ while everything matched upstream
agrees are dropped as likely mis-pairings. The first divergence is then the frontier of the failing
set: forward, the failing pairs whose nearest matched ancestors all pass; backward, the failing
gradient pairs whose nearest matched descendants all pass. Parallel branches can each have one, so
every frontier pair is reported, each replayed in isolation (``isolate.py``) and told, where the ops
say it, what starts it (``stories.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Collection

import torch
import torch.fx

from .. import tree
from ..model.alignment import Alignment, ParamPair
from ..model.capture import DTYPE, MODULE, NO_GRAD, SHAPE, TARGET, Capture
from . import arguments, noise, stories
from .isolate import replay, replay_backward
from .rows import block_after, coarser, counterpart_module, cut, own_verdict, replay_boundary
from ..match.confidence import CERTAIN, WEAK
from ..ops import DEFAULT_OPS, RANDOM_OPS, node_key
from ..outputs import OutputPair, pair_outputs
from ..params import apply_transform
from ..model.report import LIVE_ELEMENTS, Metrics, NodeRow, OutputRow, ParamRow, Report, Unmatched, UnmatchedNode
from ..store.summary import all_zero, is_summary
from ..util import named_dtype
from .tensors import Tolerance, compare_many, compare_tensors, layout_permutation, machine_eps, rms_many
from .tensors import grad_metrics as _grad_metrics


def grad_floor(grads: dict[str, torch.Tensor], measured: dict[str, Metrics | None] | None = None) -> float:
    """A tenth of the median RMS of a family of gradients: the least scale one is judged against.
    ``measured``: comparisons of whole gradients by name, whose ``ref_rms`` is taken as measured."""
    known = {n: m.ref_rms for n, m in (measured or {}).items() if m is not None and n in grads}
    rms = sorted([*known.values(), *rms_many(t for n, t in grads.items() if n not in known)])
    return 0.1 * rms[len(rms) // 2] if rms else 0.0


def judge(ref: Capture, cand: Capture, alignment: Alignment, tol: Tolerance = Tolerance(),
          ref_label: str = "ref", cand_label: str = "cand") -> Report:
    """Compare every aligned pair of ``ref`` and ``cand`` and build the report."""
    alignment, roles = _by_role(ref, cand, _by_name(ref, cand, alignment))
    roles.update(_unfollowed(ref, alignment))
    ref_nodes = {n.name: n for n in ref.graph.nodes}
    cand_nodes = {n.name: n for n in cand.graph.nodes}
    # strict bounds scale gradients by the floors, so they are needed first; otherwise they come after,
    # from the RMS the comparisons measure (a pass over every gradient fewer)
    node_floor = grad_floor(ref.grads) if tol.strict else 0.0
    param_floor = grad_floor(ref.param_grads) if tol.strict else 0.0
    depth = {n.name: i for i, n in enumerate(ref.graph.nodes)}
    out_pairs, ref_outputs_left, cand_outputs_left = pair_outputs(tree.flatten(ref.outputs), tree.flatten(cand.outputs))
    mixed_ref, mixed_cand, warnings = _seeded_elsewhere(ref, cand, out_pairs, ref_outputs_left, cand_outputs_left, tol)
    rows: list[NodeRow] = []
    untracked: list[tuple[NodeRow, str]] = []   # a gradient missing on a side that made the op with autograd off
    calls, sizes = [], []
    for pair in alignment.pairs:
        rn, cn = ref_nodes[pair.ref], cand_nodes[pair.cand]
        op = node_key(rn)
        if op in DEFAULT_OPS.uninitialised or pair.ref not in ref.values or pair.cand not in cand.values:
            continue
        rows.append(NodeRow(
            ref_node=pair.ref, cand_node=pair.cand,
            ref_module=rn.meta.get(MODULE, ""), cand_module=cn.meta.get(MODULE, ""), op=op,
            ref_shape=rn.meta.get(SHAPE), cand_shape=cn.meta.get(SHAPE), forward=None, backward=None,
            rationale=pair.rationale, confidence=pair.confidence, depth=depth[pair.ref],
            ref_slice=list(pair.ref_slice) if pair.ref_slice else None,
            cand_slice=list(pair.cand_slice) if pair.cand_slice else None,
            cand_permuted=pair.cand_index is not None,
            ref_block=list(pair.ref_block), cand_block=list(pair.cand_block),
        ))
        calls.append(functools.partial(_node_pair, ref.values, cand.values, pair, tol))
        sizes.append(ref.values[pair.ref].numel())
        side = "ref" if pair.ref not in ref.grads and rn.meta.get(NO_GRAD) else \
            "cand" if pair.cand not in cand.grads and cn.meta.get(NO_GRAD) else None
        if side is not None:
            untracked.append((rows[-1], side))
        skip = pair.ref in mixed_ref or pair.cand in mixed_cand or side is not None
        calls.append(functools.partial(_node_pair, ref.grads, cand.grads, pair, tol, node_floor) if not skip
                     else _nothing)
        sizes.append(0 if skip or pair.ref not in ref.grads else ref.grads[pair.ref].numel())
    params = [ParamRow(ref=pp.ref, cand=list(pp.cand), transform=pp.transform, evidence=pp.evidence, grad=None,
                       value=None) for pp in alignment.params]
    for pp, row in zip(alignment.params, params):
        mixed = pp.ref in mixed_ref or any(c in mixed_cand for c in pp.cand)
        if mixed and pp.ref in ref.param_grads:
            row.grad_uncompared = "the two sides' gradients are seeded from different outputs"
        calls.append(functools.partial(_param_pair, ref.params, cand.params, pp, tol))
        calls.append(functools.partial(_param_pair, ref.param_grads, cand.param_grads, pp, tol, param_floor)
                     if not mixed else _nothing)
        sizes += [ref.params[pp.ref].numel(), 0 if mixed else ref.params[pp.ref].numel()]
    done = iter(compare_many(calls, sizes))
    for row in (*rows, *params):
        if isinstance(row, NodeRow):
            row.forward, row.backward = next(done), next(done)
        else:
            row.value, row.grad = next(done), next(done)
    if not tol.strict:
        node_floor = grad_floor(ref.grads, {r.ref_node: r.backward for r in rows if r.ref_slice is None})
        param_floor = grad_floor(ref.param_grads, {p.ref: p.grad for p in params})
    precision = noise.run_precision(ref.info, cand.info)
    lowered = [] if tol.strict else _lowered(ref, cand, rows)
    if not tol.strict:
        noise.judge(ref.graph, rows, params, node_floor, param_floor, precision)
    for side in ("ref", "cand"):   # on the verdicts within noise: a gradient that differs only by rounding reaches
        reached = _gradient_reaches(ref if side == "ref" else cand, side, rows, params)
        for row in (r for r, s in untracked if s == side and not reached(r)):
            row.backward = _grad_metrics(ref.grads.get(row.ref_node), cand.grads.get(row.cand_node), tol, node_floor)
    dead = [] if tol.strict else _dead_elements_aside(ref, cand, rows, tol)
    if dead:
        noise.judge(ref.graph, rows, params, node_floor, param_floor, precision)
        warnings.append(f"values of {len(dead)} op(s) differ only at elements no output depends on "
                        f"({', '.join(dead[:4])}): "
                        "their gradient is zero on both sides (positions no output reads: padding one side masks and "
                        "the other does not, attention scores a mask removes, -inf on one side and the dtype's lowest "
                        "number on the other), so those elements were not compared")
    rows, rejected = _verify_weak(ref.graph, rows, {n.name for n in cand.graph.nodes
                                                    if n.op == "call_function" and node_key(n) in RANDOM_OPS},
                                  _on_paired_inputs(ref, cand, rows))
    unjudged = _verify_weak_grads(ref.graph, rows)
    if not tol.strict and (rejected or unjudged):   # what was set aside no longer counts as a divergence
        noise.judge(ref.graph, rows, params, node_floor, param_floor, precision)
    _mark_frontier(ref.graph, rows)
    for _ in range(EXPLAIN_ROUNDS):
        explained = _isolate_frontier(ref, cand, rows, tol) + _isolate_backward(ref, cand, rows, tol, node_floor)
        if tol.strict or not explained:
            break
        noise.judge(ref.graph, rows, params, node_floor, param_floor, precision)
        _mark_frontier(ref.graph, rows)
    unreached = [] if tol.strict else _reach_nothing(ref.graph, rows)
    if unreached:
        warnings.append(f"gradients of {len(unreached)} op(s) not judged ({', '.join(unreached[:4])}): they differ "
                        "only where they reach none of their inputs' gradients, which agree (where the derivative "
                        "of the op that made them is zero, as at attention weights one side's mask zeroes)")
        noise.judge(ref.graph, rows, params, node_floor, param_floor, precision)
        _mark_frontier(ref.graph, rows)
    roles.update(stories.reordered_rows(ref, cand, rows, alignment))
    for p in params:
        if p.ref in roles and p.value is not None:
            p.value = dataclasses.replace(p.value, passed=False, note=roles[p.ref])
            warnings.append(f"{p.ref} {roles[p.ref]}")
    read = stories.name_parameters(ref, cand, params, rows)
    if not any(r.first_forward for r in rows):   # else the forward story says it at the op
        warnings += read
    warnings += stories.place_unpaired(ref, cand, alignment)
    warnings += _unread_inputs(ref, cand, rows)
    outputs = _compare_outputs(ref, cand, out_pairs, tol, rows, precision)
    if _output_frontier(ref, cand, outputs, rows):   # their backward passes are its consequences too
        _mark_frontier(ref.graph, rows, {o.frontier["ref_node"] for o in outputs if o.frontier})
    stories.tell(ref, cand, rows, params, alignment, rejected, lowered, tol)
    stories.tell_outputs(ref, cand, outputs, rows)
    return Report(
        warnings=warnings,
        ref={"label": ref_label, **ref.meta},
        cand={"label": cand_label, **cand.meta},
        tolerance=dataclasses.asdict(tol),
        outputs=outputs,
        nodes=rows,
        params=params,
        unmatched=Unmatched(
            ref=[_describe(ref_nodes[n]) for n in alignment.unmatched_ref]
            + [_describe(ref_nodes[r.ref_node], WEAK_REASON) for r in rejected],
            cand=[_describe(cand_nodes[n]) for n in alignment.unmatched_cand]
            + [_describe(cand_nodes[r.cand_node], WEAK_REASON) for r in rejected],
            ref_params=list(alignment.unmatched_ref_params), cand_params=list(alignment.unmatched_cand_params),
            ref_outputs=ref_outputs_left, cand_outputs=cand_outputs_left,
            trained_ref_params=[n for n in alignment.unmatched_ref_params if n in ref.param_grads],
            trained_cand_params=[n for n in alignment.unmatched_cand_params if n in cand.param_grads],
            ref_inputs=[n for n in alignment.unmatched_ref if ref_nodes[n].op == "placeholder"]),
        graph={"ref": _structure(ref), "cand": _structure(cand)},
    )


def _unread_inputs(ref: Capture, cand: Capture, rows: list[NodeRow]) -> list[str]:
    """A line for each paired input that one side reads and the other does not (a port that ignores
    the attention mask it is given)."""
    said = []
    for row in rows:
        if row.op != "input":
            continue
        used = [bool(c.node(n).users) for c, n in ((ref, row.ref_node), (cand, row.cand_node))]
        if used[0] != used[1]:
            said.append(f"the {'candidate' if used[0] else 'reference'} never reads its input "
                        f"{row.cand_node if used[0] else row.ref_node}, which the "
                        f"{'reference' if used[0] else 'candidate'} reads")
    return said


def _lowered(ref: Capture, cand: Capture, rows: list[NodeRow]) -> list[NodeRow]:
    """The rows whose candidate value is of a coarser floating dtype than the reference's and than
    the candidate's own parameters (a norm whose statistics a port computes in bfloat16 inside a
    float32 model): judged at the reference's precision, not the coarser one a comparison of two
    dtypes takes, which passed them, and everything after them, as bfloat16 rounding. A candidate
    run in that dtype (its parameters in it, ``--dtype``, autocast) lowers it on purpose."""
    if cand.info.autocast:
        return []
    own = [t.dtype for t in cand.params.values() if not is_summary(t) and t.is_floating_point()]
    working = max(map(machine_eps, own), default=0.0) if own else math.inf
    found = []
    for row in rows:
        a, b = (named_dtype(str(c.node(n).meta.get(DTYPE))) for c, n in ((ref, row.ref_node), (cand, row.cand_node)))
        if a is None or b is None or not (a.is_floating_point and b.is_floating_point):
            continue
        if machine_eps(b) > max(machine_eps(a), working):
            row.forward = dataclasses.replace(row.forward, eps=machine_eps(a)) if row.forward is not None else None
            row.backward = dataclasses.replace(row.backward, eps=machine_eps(a)) if row.backward is not None else None
            found.append(row)
    return found


def _dead_elements_aside(ref: Capture, cand: Capture, rows: list[NodeRow], tol: Tolerance) -> list[str]:
    """Judge each pair of values that fails again on the elements some output depends on: where the
    gradient is zero on both sides (padded positions that no output reads, which HF's CLIP text
    tower computes with the padded keys masked and open_clip's without), a difference cannot reach
    the loss. A pair that passes there is set aside so; one that still fails, or whose gradient is
    zero everywhere (that says nothing of its elements), is left as it was. Returns the reference
    nodes set aside."""
    changed = []
    for row in rows:
        m = row.forward
        if m is None or m.passed or row.cand_permuted:
            continue
        a, b = ref.values.get(row.ref_node), cand.values.get(row.cand_node)
        ga, gb = ref.grads.get(row.ref_node), cand.grads.get(row.cand_node)
        if any(t is None or is_summary(t) for t in (a, b, ga, gb)):
            continue
        a, ga, b, gb = (cut(t, block) for t, block in ((a, row.ref_slice), (ga, row.ref_slice),
                                                        (b, row.cand_slice), (gb, row.cand_slice)))
        order = layout_permutation(a, b) if a.shape != b.shape and b.shape == gb.shape else None
        if order is not None:   # compared with its dimensions in another order (time, batch against batch, time)
            b, gb = b.permute(order), gb.permute(order)
        if not a.shape == b.shape == ga.shape == gb.shape:
            continue
        dead = (ga == 0) & (gb == 0)
        if not dead.any() or dead.all():
            continue
        live = compare_tensors(a, torch.where(dead, a.to(b.dtype), b), tol)
        if live.passed:
            row.forward = dataclasses.replace(live, note=f"{LIVE_ELEMENTS}: {int(dead.sum())} of {dead.numel()} "
                                                         "elements have a zero gradient on both sides")
            changed.append(row.ref_node)
    return changed


def _nothing() -> None:
    return None


def _node_pair(ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor], pair, tol: Tolerance,
               floor: float | None = None) -> Metrics | None:
    """A pair's values (``floor`` None) or gradients (judged relative to their scale, at least ``floor``)."""
    a = cut(ref.get(pair.ref), pair.ref_slice)
    b = cut(cand.get(pair.cand), pair.cand_slice, pair.cand_index)
    return compare_tensors(a, b, tol) if floor is None else _grad_metrics(a, b, tol, floor)


def _param_pair(ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor], pp, tol: Tolerance,
                floor: float | None = None) -> Metrics | None:
    """A parameter pair's values (``floor`` None; None when the candidate holds none) or gradients."""
    if floor is None:
        b = _transformed(cand, pp)
        return compare_tensors(ref[pp.ref], b, tol) if b is not None else None
    return _grad_metrics(ref.get(pp.ref), _transformed(cand, pp, gradient=True), tol, floor)


def _transformed(table: dict[str, torch.Tensor], pp, gradient: bool = False) -> torch.Tensor | None:
    """The candidate tensor(s) of a parameter pair (or their gradients) in the reference's layout."""
    parts = [table.get(name) for name in pp.cand]
    if any(p is None for p in parts):
        return None
    if any(is_summary(p) for p in parts):   # compared in row-major order: a reshape changes nothing
        kind = pp.transform.get("kind", "identity")
        if len(parts) != 1 or kind not in ("identity", "reshape", "rows"):
            return None   # the transform needs the elements
        return parts[0] if kind != "rows" else apply_transform(parts, pp.transform, gradient)
    return apply_transform(parts, pp.transform, gradient)


def _by_name(ref: Capture, cand: Capture, alignment: Alignment) -> Alignment:
    """Reference tensors that content left unpaired, read by the run, paired with the one tensor of
    the candidate's that the run reads under the same last name, of the same shape: a rotary
    table the candidate keeps once where the reference keeps one a layer (``inv_freq``), or one
    computed with another base, whose difference is then shown, not left 'not compared'."""
    def read(capture: Capture) -> set[str]:
        return {str(n.target) for n in capture.graph.nodes if n.op == "get_attr" and n.users}
    used_c = read(cand)
    by_leaf: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for name in used_c & cand.params.keys():
        by_leaf.setdefault((name.rpartition(".")[2], tuple(cand.params[name].shape)), []).append(name)
    found = []
    for name in read(ref) & set(alignment.unmatched_ref_params):
        options = by_leaf.get((name.rpartition(".")[2], tuple(ref.params[name].shape)), [])
        if len(options) == 1 and ref.params[name].dtype == cand.params[options[0]].dtype:
            found.append(ParamPair(name, (options[0],), {"kind": "identity"}, "the same name and shape, read by "
                                   "both runs", WEAK))
    if not found:
        return alignment
    paired_r, paired_c = {p.ref for p in found}, {p.cand[0] for p in found}
    return dataclasses.replace(alignment, params=[*alignment.params, *found],
                               unmatched_ref_params=[n for n in alignment.unmatched_ref_params if n not in paired_r],
                               unmatched_cand_params=[n for n in alignment.unmatched_cand_params if n not in paired_c])


def _by_role(ref: Capture, cand: Capture, alignment: Alignment) -> tuple[Alignment, dict[str, str]]:
    """Parameters read at the same argument of matched ops of one kind. Those that content left
    unpaired on both sides (buffers each side updated its own way in train mode) are paired; and
    a reference parameter paired by content with another tensor than the one the candidate reads
    in its place (BatchNorm's running mean and variance swapped) is named: ``{ref param: what}``."""
    whole = {"identity", "reshape"}
    paired = {p.ref: p.cand for p in alignment.params if p.transform.get("kind", "identity") in whole}
    holder = {p.cand[0]: p.ref for p in alignment.params
              if len(p.cand) == 1 and p.transform.get("kind", "identity") in whole}
    left_r, left_c = set(alignment.unmatched_ref_params), set(alignment.unmatched_cand_params)
    found, roles = [], {}
    for pair in alignment.pairs:
        rn, cn = ref.node(pair.ref), cand.node(pair.cand)
        key = node_key(rn)   # the same function below, whose arguments mean the same (addmm's differ from linear's)
        if rn.op != "call_function" or rn.meta.get(TARGET) != cn.meta.get(TARGET):
            continue
        if key in arguments.SYMMETRIC:   # arguments in any order: the one tensor each side reads that content left unpaired
            xs = [str(a.target) for a in rn.all_input_nodes if a.op == "get_attr" and str(a.target) in left_r]
            ys = [str(b.target) for b in cn.all_input_nodes if b.op == "get_attr" and str(b.target) in left_c]
            if len(xs) == len(ys) == 1 and xs[0] in ref.params and ys[0] in cand.params \
                    and ref.params[xs[0]].shape == cand.params[ys[0]].shape:
                found.append(ParamPair(xs[0], (ys[0],), {"kind": "identity"},
                                       f"the one tensor left unpaired that matched {key} ops read", WEAK))
                left_r.discard(xs[0])
                left_c.discard(ys[0])
            continue
        for _, a, b in arguments.side_by_side(rn, cn):
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a.op == b.op == "get_attr"):
                continue
            x, y = str(a.target), str(b.target)
            if x not in ref.params or y not in cand.params:
                continue
            if x in left_r and y in left_c and ref.params[x].shape == cand.params[y].shape:
                found.append(ParamPair(x, (y,), {"kind": "identity"}, f"read at the same argument of matched {key} ops",
                                       WEAK))
                left_r.discard(x)
                left_c.discard(y)
            elif x in paired and len(paired[x]) == 1 and paired[x] != (y,) and holder.get(y, x) != x and x not in roles \
                    and pair.confidence >= CERTAIN:   # ops paired by their place alone may be a place off
                # crossed: x holds another tensor's values, and y those of another reference tensor
                # (a weight tied on one side and copied on the other is no crossing: its copy holds nothing else)
                roles[x] = (f"holds the candidate's {paired[x][0]}, but the matched {key} ops ({pair.ref}, {pair.cand}) "
                            f"read it where the candidate reads {y}: the two are used in each other's place")
    if not found:
        return alignment, roles
    return dataclasses.replace(alignment, params=[*alignment.params, *found],
                               unmatched_ref_params=[n for n in alignment.unmatched_ref_params if n in left_r],
                               unmatched_cand_params=[n for n in alignment.unmatched_cand_params if n in left_c]), roles


def _unfollowed(ref: Capture, alignment: Alignment) -> dict[str, str]:
    """Parameters paired by content with their rows in another order, which an op reading them
    does not follow: ``{ref param: what}``. Only an op whose output's features are the weight's
    rows (a linear, a fused per-head projection, a bias added) is laid out that way; an LSTM's
    gate blocks, or a table looked up by index (an embedding, a codebook), compute something else
    from rows in another order."""
    rows = {p.ref: len(p.transform["index"]) for p in alignment.params if p.transform.get("kind") == "permute_rows"}
    attrs = {n.name: str(n.target) for n in ref.graph.nodes if n.op == "get_attr" and str(n.target) in rows}
    found = {}
    for node in ref.graph.nodes:
        if node.op != "call_function" or DEFAULT_OPS.is_view(node, node_key(node)):
            continue
        # a multi-output op (lstm: output, h, c) holds no value itself: its items' sizes
        sizes = {tuple(x.meta[SHAPE])[-1:] for x in (node, *node.users) if x.meta.get(SHAPE)}
        for name in (attrs[a.name] for a in node.all_input_nodes if a.name in attrs):
            if name not in found and sizes and (rows[name],) not in sizes:
                found[name] = (f"is the candidate's with its {rows[name]} rows in another order, which its "
                               f"{node_key(node)} op ({node.name}) does not follow: not a layout, a difference")
    return found


def _compare_outputs(ref: Capture, cand: Capture, pairs: list[OutputPair], tol: Tolerance,
                     rows: list[NodeRow], precision: float) -> list[OutputRow]:
    """The paired outputs (``outputs.py``), judged like the nodes that made them."""
    ref_out, cand_out = dict(tree.flatten(ref.outputs)), dict(tree.flatten(cand.outputs))
    after = noise.after_divergence(ref.graph, rows)
    inherited = max([r.forward.error or 0.0 for r in rows
                     if r.forward is not None and r.forward.passed and r.ref_node not in after], default=0.0)
    # an output that is a view of a value whose difference the replays explained (codes picked by
    # argmax, flipped by rounding, stacked and transposed) is explained with it: an exact dtype
    # alone has no noise to pass within
    explained = {(r.ref_node, r.cand_node) for r in rows if "forward" in r.explained}
    nodes = [_output_nodes(ref), _output_nodes(cand)]
    compared = []
    for p in pairs:
        metrics = compare_tensors(ref_out[p.ref], cand_out[p.cand], tol)
        if not tol.strict:
            metrics = noise.verdict(metrics, inherited, precision=precision,
                                    tail_max=math.inf if explained else noise.TAIL_MAX)
            seen = (_viewed(nodes[0].get(p.ref)), _viewed(nodes[1].get(p.cand)))
            metrics = noise.explained(metrics, seen in explained)
        compared.append(OutputRow(ref=p.ref, cand=p.cand, metrics=metrics))
    return compared


def _output_nodes(capture: Capture) -> dict[str, torch.fx.Node]:
    """The node each output leaf is, by its path."""
    return dict(zip((p for p, _ in tree.flatten(capture.outputs)), capture.output_nodes()))


def _viewed(node: torch.fx.Node | None) -> str | None:
    """The name of the op whose value ``node`` shows through views (``transpose``, ``view``...)."""
    while node is not None and node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node) \
            and DEFAULT_OPS.is_view(node, node_key(node)):
        node = node.args[0]
    return node.name if node is not None else None


def _output_frontier(ref: Capture, cand: Capture, outputs: list[OutputRow], rows: list[NodeRow]) -> bool:
    """Give ``frontier`` to the outputs that differ although no compared value they depend on does:
    the ops between those values and the output pair with nothing (one side computes
    ``s * img @ txt.T``, the other ``(txt @ img.T) * s``), so the divergence starts among them.
    Whether any output is one."""
    nodes = {"ref": _output_nodes(ref), "cand": _output_nodes(cand)}
    failing = {r.ref_node for r in rows if r.forward is not None and not r.forward.passed}
    compared = {"ref": {r.ref_node for r in rows}, "cand": {r.cand_node for r in rows}}
    found = False
    for o in outputs:
        rn, cn = nodes["ref"].get(o.ref), nodes["cand"].get(o.cand)
        if o.metrics.passed or rn is None or cn is None or not failing.isdisjoint(_ancestors([rn])):
            continue
        unpaired = {side: [x.name for x in _unpaired_before(n, compared[side])]
                    for side, n in (("ref", rn), ("cand", cn))}
        o.frontier = {"ref_node": rn.name, "cand_node": cn.name, "ref_module": rn.meta.get(MODULE, ""),
                      "cand_module": cn.meta.get(MODULE, ""), "op": node_key(rn), "unpaired_ops": unpaired}
        found = True
    return found


def _unpaired_before(node: torch.fx.Node, compared: set[str]) -> list[torch.fx.Node]:
    """The ops ``node`` depends on through ops that are not compared (itself included), in graph order."""
    seen, stack, ops = {node.name}, [node], []
    while stack:
        n = stack.pop()
        if n.name in compared or n.op != "call_function":
            continue
        ops.append(n)
        for a in n.all_input_nodes:
            if a.name not in seen:
                seen.add(a.name)
                stack.append(a)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(ops, key=order.__getitem__)


def _seeded_elsewhere(ref: Capture, cand: Capture, pairs: list[OutputPair], ref_left: list[str],
                      cand_left: list[str], tol: Tolerance) -> tuple[set[str], set[str], list[str]]:
    """Nodes and parameters whose gradients cannot be compared, and why, in words.

    A gradient is comparable only where both backward passes started from the same seed. An output
    on one side only that received a gradient feeds that gradient into everything it depends on;
    and if paired outputs got different gradients (two captures with different losses), nothing
    can be compared backward. Returns (reference nodes, candidate nodes, warnings).
    """
    for p in pairs:
        a, b = ref.output_grads.get(p.ref), cand.output_grads.get(p.cand)
        if a is None or b is None:
            continue
        m = compare_tensors(a, b, tol)
        if not own_verdict(m, tol).passed:
            every = ({n.name for n in ref.graph.nodes} | set(ref.params),
                     {n.name for n in cand.graph.nodes} | set(cand.params))
            return (*every, [f"the two runs started backward from different gradients of output {p.ref} "
                             "(different losses?): gradients are not compared"])
    warnings, mixed = [], []
    for capture, left, side in ((ref, ref_left, "reference"), (cand, cand_left, "candidate")):
        seeded = [p for p in left if p in capture.output_grads and not all_zero(capture.output_grads[p])]
        nodes = dict(zip((p for p, _ in tree.flatten(capture.outputs)), capture.output_nodes()))
        mixed.append(_ancestors([nodes[p] for p in seeded if p in nodes]))
        if seeded:
            warnings.append(f"the {side}'s gradients include those of output(s) {', '.join(seeded)}, which the other "
                            f"side does not have: {len(mixed[-1])} nodes upstream of them are not compared backward")
    return mixed[0], mixed[1], warnings


def _ancestors(nodes: list[torch.fx.Node]) -> set[str]:
    """The names of ``nodes`` and of every node they depend on (parameters: their targets too)."""
    seen: set[str] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op == "get_attr":
            seen.add(str(n.target))
        stack.extend(n.all_input_nodes)
    return seen


def _describe(node: torch.fx.Node, reason: str = "no counterpart found") -> UnmatchedNode:
    return UnmatchedNode(node=node.name, module=node.meta.get(MODULE, ""), op=node_key(node),
                         shape=node.meta.get(SHAPE), reason=reason)


EXPLAIN_ROUNDS = 32   # frontiers replayed at most: each explained row may reveal the next one after it
WEAK_REASON = "weak match (op order only) contradicted by values with no divergence upstream"


def _verify_weak(graph: torch.fx.Graph, rows: list[NodeRow], random_cand: Collection[str] = (),
                 anchored: Collection[int] = ()) -> tuple[list[NodeRow], list[NodeRow]]:
    """Drop weak pairs whose values differ although everything matched upstream agrees.

    Such a pair is more likely a mis-pairing of look-alike ops (two ``add``s of a length formula
    written differently) than a divergence; a real divergence there still shows at the next
    strongly matched node. Random ops paired with random ops (``random_cand``: the candidate's)
    are kept: two runs that drew differently differ there; one paired with what the other side
    makes of its draw (timm's Bernoulli mask with HF's ``keep + rand``, before its ``floor``) is
    not. So are the pairs in ``anchored`` (by ``id``): one function on both sides, called on
    values that pair with each other (EnCodec's trim of a transposed conv's output, its slice
    ported wrong). Returns (kept, rejected).
    """
    by_ref = noise.rows_by_ref(rows)
    rejected: list[NodeRow] = []
    preds: dict[str, set[str]] = {}
    for n in graph.nodes:  # topological: decisions upstream are final before a node is seen
        acc: set[str] = set()
        for a in n.all_input_nodes:
            acc |= {a.name} if a.name in by_ref else preds.get(a.name, set())
        preds[n.name] = acc
        if n.name not in by_ref:
            continue
        clean_upstream = all(x.forward.passed for p in acc for x in by_ref[p])
        keep = [r for r in by_ref[n.name]
                if not (r.confidence < WEAK and not r.forward.passed and clean_upstream and id(r) not in anchored
                        and (r.op not in RANDOM_OPS or r.cand_node not in random_cand))]
        rejected += [r for r in by_ref[n.name] if r not in keep]
        if keep:
            by_ref[n.name] = keep
        else:
            del by_ref[n.name]
    kept = [r for r in rows if r.ref_node in by_ref and r in by_ref[r.ref_node]]
    return kept, rejected


def _on_paired_inputs(ref: Capture, cand: Capture, rows: list[NodeRow]) -> set[int]:
    """The rows (by ``id``) whose two ops call one function on values that pair with each other
    surely (not weakly), input by input (parameters aside)."""
    pair_of = {r.ref_node: r.cand_node for r in rows if not (r.ref_slice or r.cand_slice) and r.confidence >= WEAK}
    found = set()
    for r in rows:
        rn, cn = ref.node(r.ref_node), cand.node(r.cand_node)
        xs = [a.name for a in rn.all_input_nodes if a.op != "get_attr"]
        ys = [a.name for a in cn.all_input_nodes if a.op != "get_attr"]
        if rn.op == "call_function" and xs and len(xs) == len(ys) and arguments.same_function(rn, cn) \
                and [pair_of.get(x) for x in xs] == ys:
            found.add(id(r))
    return found


def _verify_weak_grads(graph: torch.fx.Graph, rows: list[NodeRow]) -> list[str]:
    """Drop the gradient comparison of weak pairs whose values agree but whose gradients differ
    although every compared gradient after them agrees: the gradient of a node depends on how its
    value is used, and look-alike ops paired by value can be used differently (one side slices a
    value that also feeds the output directly, the other routes all of it through slices). A wrong
    backward there still shows at the strongly matched ops before them. Said on each row (on every
    comparison of two implementations a few are: not a warning). Returns the reference nodes."""
    by_ref = noise.rows_by_ref(rows)
    _, succs = noise.nearest(graph, set(by_ref))
    dropped = []
    for r in rows:
        after = [x for s in succs[r.ref_node] for x in by_ref[s]]
        if (r.confidence < WEAK and r.backward is not None and not r.backward.passed and r.forward.passed
                and after and all(x.backward is not None and x.backward.passed for x in after)):
            r.backward = None
            r.rationale += ("; gradient not judged: it differs although every gradient after it agrees, so the two "
                            "ops are used differently (paired by their place, not their role)")
            dropped.append(r.ref_node)
    return dropped


def _reach_nothing(graph: torch.fx.Graph, rows: list[NodeRow]) -> list[str]:
    """Drop the gradient comparison of values that match whose gradients differ although the
    gradients of their nearest compared inputs, made from theirs, all agree: the difference lies
    where the derivative of the op that made them is zero (NeMo zeroes masked attention weights
    after the softmax, a port leaves them at softmax's zero), so it reaches no parameter. A wrong
    backward shows at those inputs. Returns the reference nodes."""
    by_ref = noise.rows_by_ref(rows)
    preds, _ = noise.nearest(graph, set(by_ref))
    dropped = []
    for r in rows:
        before = [x.backward for p in preds[r.ref_node] for x in by_ref[p] if x.backward is not None]   # not a mask's
        if (r.backward is not None and not r.backward.passed and r.forward is not None and r.forward.passed
                and before and all(m.passed for m in before)):
            r.backward = None
            dropped.append(r.ref_node)
    return dropped


def _structure(capture: Capture) -> list[dict[str, Any]]:
    """Each node's name, op, module, shape and inputs: enough to draw the graph."""
    return [{"name": n.name, "op": node_key(n), "kind": n.op, "target": n.meta.get(TARGET, str(n.target)),
             "module": n.meta.get(MODULE, ""), "shape": n.meta.get(SHAPE), "dtype": n.meta.get(DTYPE),
             "inputs": [a.name for a in n.all_input_nodes]}
            for n in capture.graph.nodes]


def _isolate_frontier(ref: Capture, cand: Capture, rows: list[NodeRow], tol: Tolerance) -> list[NodeRow]:
    """Replay the candidate's block behind each forward frontier row not replayed yet on the
    reference's values; where it cannot be, say why (``NodeRow.isolated_why``). Returns the rows
    the replays explain: the candidate's block computes the reference's function, and its own
    value from its own inputs, so its difference is its inputs' (which passed) carried through
    that function, plus its own rounding."""
    boundary, layouts = replay_boundary(ref, cand, rows)
    own_boundary = {c: c for c in boundary if c not in layouts}
    explained = []
    for row in rows:
        if not row.first_forward or row.isolated is not None or row.isolated_why is not None:
            continue
        if row.cand_permuted:
            row.isolated_why = _not_plain(row)
            continue
        out = replay(ref, cand, row.cand_node, boundary, ref.values[row.ref_node], layouts=layouts)
        if isinstance(out, str):
            row.isolated_why = out
            continue
        # a slice of a fused output: the replay makes the whole output, compared on the same columns
        m = compare_tensors(cut(ref.values[row.ref_node], row.ref_slice), cut(out, row.cand_slice), tol)
        precision = coarser(ref.values[row.ref_node], cand.values[row.cand_node])
        if row.forward.eps and m.eps > row.forward.eps:   # a candidate's own coarser dtype (``_lowered``) is no excuse
            m, precision = dataclasses.replace(m, eps=row.forward.eps), row.forward.eps
        row.isolated = own_verdict(m, tol, precision=precision)
        if not row.isolated.passed:
            continue
        # and its own value is what its block computes from its own inputs (so, in a capture edited
        # after the run, a changed value is not taken for one its inputs carried)
        own = replay(cand, cand, row.cand_node, own_boundary, cand.values[row.cand_node])
        if not isinstance(own, str):
            m = compare_tensors(cut(cand.values[row.cand_node], row.cand_slice), cut(own, row.cand_slice), tol)
            if own_verdict(m, tol, precision=precision).passed:
                row.explained.append("forward")
                explained.append(row)
    return explained


def _gradient_reaches(capture: Capture, side: str, rows: list[NodeRow],
                      params: list[ParamRow]) -> Callable[[NodeRow], bool]:
    """For a row whose node ``side`` made with autograd off: whether the gradient reaches that side's
    region of such ops where it enters, as on the other side. Then the ops inside have no gradient to
    compare (a reentrant checkpoint's first forward, whose backward runs it again); when a gradient
    at an input of the region (an op's, a parameter's) differs, the missing one is a difference too
    (a port that cut the gradient with ``torch.no_grad``)."""
    rows_at = {r.ref_node if side == "ref" else r.cand_node: r for r in rows}
    params_at = {name: p for p in params for name in ([p.ref] if side == "ref" else p.cand)}

    def reaches(row: NodeRow) -> bool:
        start = capture.node(row.ref_node if side == "ref" else row.cand_node)
        seen, stack = {start}, [start]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                if a.meta.get(NO_GRAD):
                    stack.append(a)
                    continue
                at = params_at.get(str(a.target)) if a.op == "get_attr" else rows_at.get(a.name)
                judged = None if at is None else at.grad if isinstance(at, ParamRow) else at.backward
                if judged is not None and not judged.passed:
                    return False
        return True
    return reaches


def _isolate_backward(ref: Capture, cand: Capture, rows: list[NodeRow], tol: Tolerance,
                      node_floor: float) -> list[NodeRow]:
    """For each backward first divergence not replayed yet that no forward divergence explains,
    differentiate the candidate's ops back from its compared consumers with the reference's
    gradients there (``isolate.replay_backward``). If that derivative agrees with the reference,
    the same ops differentiated at the candidate's own values, from its own gradients, tell the two
    reasons its recorded gradient can differ: where they reproduce it, its backward is the
    derivative of its forward, moved by forward values that differ within noise (a relu's mask, a
    max): the row is returned, explained; where they do not, its gradient came from a backward of
    its own (a custom ``autograd.Function``, a hook), blamed on the module of those ops."""
    plain = {r.cand_node: r for r in rows
             if r.forward.passed and r.ref_shape == r.cand_shape and not (r.ref_slice or r.cand_slice or r.cand_permuted)}
    boundary = {c: r.ref_node for c, r in plain.items()}
    own_boundary = {c: c for c in plain}
    explained = []
    for row in rows:
        if not row.first_backward or row.consequence or row.isolated_backward is not None \
                or row.isolated_backward_why is not None:
            continue
        cut = [who for who, c, name in (("reference", ref, row.ref_node), ("candidate", cand, row.cand_node))
               if name not in c.grads and c.node(name).meta.get(NO_GRAD)]
        if cut:
            row.isolated_backward_why = (f"the {cut[0]} made it with autograd off (torch.no_grad), which cuts the "
                                         "gradient there")
            continue
        # a slice of a fused output: no reference value or gradient of its own to replay from, but the
        # candidate's backward can still be checked against the derivative of its own forward ops
        sliced = row.cand_node not in plain and bool(row.ref_slice or row.cand_slice) and row.forward.passed
        if row.cand_node not in plain and not sliced:
            row.isolated_backward_why = _not_plain(row)
            continue
        block, consumers = block_after(cand.node(row.cand_node), plain)
        if not consumers:
            row.isolated_backward_why = (f"no op of the candidate that uses {row.cand_node} is compared: there is no "
                                         "reference gradient to start from")
            continue
        unusable = [c for c in consumers if plain[c].backward is None or not plain[c].backward.passed]
        if unusable:
            c = plain[unusable[0]]
            consumer = f"its consumer {c.cand_node} ({c.op} in {c.cand_module or '<root>'})"
            if c.backward is None and cand.node(c.cand_node).meta.get(NO_GRAD):
                row.isolated_backward_why = (f"{consumer} ran with autograd off in the candidate (torch.no_grad, or "
                                             "a reentrant checkpoint's forward): no gradient to start from")
            else:
                row.isolated_backward_why = (f"the gradient at {consumer} "
                                             f"{'was not compared' if c.backward is None else 'differs too'}: "
                                             "no agreeing reference gradient to start from")
            continue
        precision = coarser(ref.values[row.ref_node], cand.values[row.cand_node])
        if not sliced:
            grad = replay_backward(ref, cand, row.cand_node, {c: boundary[c] for c in consumers}, boundary)
            if isinstance(grad, str):
                row.isolated_backward_why = grad
                continue
            m = _grad_metrics(ref.grads.get(row.ref_node), grad, tol, node_floor)
            row.isolated_backward = own_verdict(m, tol, node_floor, precision, backward=True)
            if not row.isolated_backward.passed:
                continue
        own = replay_backward(cand, cand, row.cand_node, {c: c for c in consumers},
                              {**own_boundary, row.cand_node: row.cand_node})
        if not isinstance(own, str):
            m = _grad_metrics(cand.grads.get(row.cand_node), own, tol, node_floor)
            if own_verdict(m, tol, node_floor, precision, backward=True).passed:
                if sliced:
                    row.isolated_backward_why = _not_plain(row)
                    continue
                row.explained.append("backward")
                explained.append(row)
                continue
        elif sliced:
            row.isolated_backward_why = own
            continue
        ops = [n for n in block if not (DEFAULT_OPS.is_view(n, node_key(n)) or node_key(n) in DEFAULT_OPS.splits
                                        or node_key(n) == "getitem")]   # past a fused output's split
        module = (ops[0] if ops else block[0] if block else cand.node(consumers[0])).meta.get(MODULE, "")
        row.blame = [f"backward only: the candidate's backward through {module or '<root>'} is not the derivative "
                     "of its forward ops (a custom autograd.Function or a gradient hook)",
                     counterpart_module(rows, module, "cand") or row.ref_module, module]
    return explained


def _not_plain(row: NodeRow) -> str:
    """Why the reference's value of ``row`` (a row whose forward value passes) cannot stand in for
    the candidate's in a replay."""
    if row.cand_permuted:
        return (f"{row.cand_node} is compared with its features reordered like the weight that made them, "
                "a layout the replay does not carry")
    if row.ref_slice or row.cand_slice:
        return f"{row.cand_node} is compared as a slice of a fused output, which the replay does not split"
    return (f"{row.cand_node} has shape {row.cand_shape} and the reference's {row.ref_node} {row.ref_shape}: "
            "one cannot stand in for the other")


def _mark_frontier(graph: torch.fx.Graph, rows: list[NodeRow], outputs_failed: Collection[str] = ()) -> None:
    """Set ``first_forward`` / ``first_backward`` on the frontier rows of the failing set: failing
    rows with no failing row among their compared ancestors (backward: descendants), however far.
    ``outputs_failed``: nodes of outputs that differ with no failing row before them."""
    by_ref = noise.rows_by_ref(rows)
    preds, succs = noise.nearest(graph, set(by_ref))
    order = [n.name for n in graph.nodes if n.name in by_ref]

    def fails(name: str, direction: str) -> bool:
        return any(getattr(x, direction) is not None and not getattr(x, direction).passed for x in by_ref[name])
    tainted: dict[str, bool] = {}   # a failing row upstream (forward) or downstream (backward)
    for name in order:
        tainted[name] = any(fails(p, "forward") or tainted[p] for p in preds[name])
        for row in by_ref[name]:
            row.first_forward = row.forward is not None and not row.forward.passed and not tainted[name]
    explained = _meets_forward_divergence(graph, {name for name in order if fails(name, "forward")}
                                          | set(outputs_failed))
    tainted.clear()
    for name in reversed(order):
        tainted[name] = any(fails(s, "backward") or tainted[s] for s in succs[name])
        for row in by_ref[name]:
            row.first_backward = row.backward is not None and not row.backward.passed and not tainted[name]
            row.consequence = row.first_backward and name in explained


def _meets_forward_divergence(graph: torch.fx.Graph, failed: set[str]) -> set[str]:
    """The nodes whose backward pass a forward divergence (at the ``failed`` nodes) explains: the
    gradient reaching a node goes back through the ops after it, and each uses its forward values,
    the node's own and what it combines them with (the text features in ``image @ text.T``), so
    a node explains it when one of the ops after it (or itself) takes a value that differs. The
    output node, which only collects the outputs, combines nothing."""
    differs: set[str] = set()
    for n in graph.nodes:
        if n.op != "output" and (n.name in failed or any(a.name in differs for a in n.all_input_nodes)):
            differs.add(n.name)
    meets: set[str] = set()
    for n in reversed(graph.nodes):
        if n.name in differs or any(u.name in meets for u in n.users):
            meets.add(n.name)
    return meets
