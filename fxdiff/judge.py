"""Judge an alignment: compare tensors pair by pair and find where a divergence starts.

A candidate element passes when ``|cand - ref| <= atol + rtol * |ref|`` (``torch.allclose``'s rule),
computed in float64. NaN and infinities are compared as data: equal when they sit at the same
positions with the same sign. Integer and bool tensors must be equal.

The first divergence is the frontier of the failing set: forward, the failing pairs whose nearest
matched ancestors all pass; backward, the failing gradient pairs whose nearest matched
descendants all pass. Parallel branches can each have one, so every frontier pair is reported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx

from . import tree
from .capture import DTYPE, MODULE, SHAPE, TARGET, Capture
from .match import Alignment, Pair, node_key
from .ops import UNINITIALISED
from .report import HIST_EDGES, Metrics, NodeRow, ParamRow, Report


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Elementwise tolerance: ``|cand - ref| <= atol + rtol * |ref|``."""

    atol: float = 1e-5
    rtol: float = 1e-5


def compare_tensors(ref: torch.Tensor, cand: torch.Tensor, tol: Tolerance) -> Metrics:
    """Metrics of ``cand`` against ``ref`` and whether every element is within ``tol``."""
    if tuple(ref.shape) != tuple(cand.shape):
        if ref.numel() != cand.numel():
            return _failed(ref, f"shape {tuple(ref.shape)} vs {tuple(cand.shape)}")
        cand = cand.reshape(ref.shape)
    if not (ref.is_floating_point() or ref.is_complex()) or not (cand.is_floating_point() or cand.is_complex()):
        a, b = ref.cpu().to(torch.float64), cand.cpu().to(torch.float64)
        diff = (a - b).abs()
        bad = int((a != b).sum())
        return Metrics(passed=bad == 0, max_abs_diff=_f(diff.max()) if diff.numel() else 0.0,
                       max_rel_diff=0.0 if bad == 0 else math.inf, mean_abs_diff=_f(diff.mean()) if diff.numel() else 0.0,
                       cosine=None, ref_rms=_rms(a), mismatched=bad, numel=a.numel(),
                       histogram=_histogram(diff))
    a = ref.detach().cpu().to(torch.complex128 if ref.is_complex() else torch.float64)
    b = cand.detach().cpu().to(a.dtype)
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    same_special = (~finite_a & ~finite_b) & ((a == b) | (torch.isnan(a) & torch.isnan(b)))
    special_bad = int(((~finite_a | ~finite_b) & ~same_special).sum())
    both = finite_a & finite_b
    diff = torch.where(both, (a - b).abs(), torch.zeros((), dtype=torch.float64))
    scale = torch.where(both, a.abs(), torch.zeros((), dtype=torch.float64))
    bad = int((diff > tol.atol + tol.rtol * scale).sum()) + special_bad
    rel = diff / scale.clamp_min(1e-30)
    rel = torch.where(diff == 0, torch.zeros((), dtype=torch.float64), rel)
    note = f"{special_bad} NaN/Inf positions differ" if special_bad else ""
    return Metrics(
        passed=bad == 0,
        max_abs_diff=_f(diff.max()) if diff.numel() else 0.0,
        max_rel_diff=_f(rel.max()) if rel.numel() else 0.0,
        mean_abs_diff=_f(diff.mean()) if diff.numel() else 0.0,
        cosine=_cosine(torch.where(both, a, 0), torch.where(both, b, 0)),
        ref_rms=_rms(torch.where(both, a, 0)),
        mismatched=bad,
        numel=a.numel(),
        note=note,
        histogram=_histogram(diff[both]),
    )


def _f(x: torch.Tensor) -> float:
    return float(x.real if x.is_complex() else x)


def _rms(t: torch.Tensor) -> float:
    return float(t.abs().pow(2).mean().sqrt()) if t.numel() else 0.0


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.reshape(-1), b.reshape(-1)
    na, nb = a.abs().pow(2).sum().sqrt(), b.abs().pow(2).sum().sqrt()
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float((a.conj() * b).sum().real / (na * nb))


def _histogram(diff: torch.Tensor) -> list[int]:
    diff = diff.reshape(-1).to(torch.float64)
    zero = int((diff == 0).sum())
    nz = diff[diff > 0]
    edges = torch.tensor(HIST_EDGES[1:] + [math.inf], dtype=torch.float64)
    counts = torch.bincount(torch.bucketize(nz, edges, right=True), minlength=len(edges) + 1)
    return [zero] + counts.tolist()[:len(edges) + 1]


def _failed(ref: torch.Tensor, note: str) -> Metrics:
    return Metrics(passed=False, max_abs_diff=math.inf, max_rel_diff=math.inf, mean_abs_diff=math.inf,
                   cosine=None, ref_rms=_rms(ref.detach().cpu().double()) if ref.numel() else 0.0,
                   mismatched=ref.numel(), numel=ref.numel(), note=note)


def _missing_grad(side: str, numel: int) -> Metrics:
    return Metrics(passed=False, max_abs_diff=math.inf, max_rel_diff=math.inf, mean_abs_diff=math.inf,
                   cosine=None, ref_rms=0.0, mismatched=numel, numel=numel, note=f"gradient on {side} only")


def _grad_metrics(ref_g: torch.Tensor | None, cand_g: torch.Tensor | None, tol: Tolerance) -> Metrics | None:
    if ref_g is None and cand_g is None:
        return None
    if ref_g is None:
        return _missing_grad("cand", cand_g.numel())
    if cand_g is None:
        return _missing_grad("ref", ref_g.numel())
    return compare_tensors(ref_g, cand_g, tol)


def judge(ref: Capture, cand: Capture, alignment: Alignment, tol: Tolerance = Tolerance(),
          ref_label: str = "ref", cand_label: str = "cand") -> Report:
    """Compare every aligned pair of ``ref`` and ``cand`` and build the report."""
    ref_nodes = {n.name: n for n in ref.graph.nodes}
    cand_nodes = {n.name: n for n in cand.graph.nodes}
    depth = {n.name: i for i, n in enumerate(ref.graph.nodes)}
    rows: list[NodeRow] = []
    for pair in alignment.pairs:
        rn, cn = ref_nodes[pair.ref], cand_nodes[pair.cand]
        op = node_key(rn)
        if op in UNINITIALISED or pair.ref not in ref.values or pair.cand not in cand.values:
            continue
        rows.append(NodeRow(
            ref_node=pair.ref, cand_node=pair.cand,
            ref_module=rn.meta.get(MODULE, ""), cand_module=cn.meta.get(MODULE, ""), op=op,
            ref_shape=rn.meta.get(SHAPE), cand_shape=cn.meta.get(SHAPE),
            forward=compare_tensors(ref.values[pair.ref], cand.values[pair.cand], tol),
            backward=_grad_metrics(ref.grads.get(pair.ref), cand.grads.get(pair.cand), tol),
            rationale=pair.rationale, confidence=pair.confidence, depth=depth[pair.ref],
        ))
    _mark_frontier(ref.graph, rows)
    params = []
    for pp in alignment.params:
        ref_g = ref.param_grads.get(pp.ref)
        cand_g = _transformed(cand.param_grads, pp)
        params.append(ParamRow(ref=pp.ref, cand=list(pp.cand), transform=pp.transform, evidence=pp.evidence,
                               grad=_grad_metrics(ref_g, cand_g, tol),
                               value=compare_tensors(ref.params[pp.ref], _transformed(cand.params, pp), tol)
                               if _transformed(cand.params, pp) is not None else None))
    return Report(
        ref={"label": ref_label, **ref.meta},
        cand={"label": cand_label, **cand.meta},
        tolerance=dataclasses.asdict(tol),
        outputs=_compare_outputs(ref, cand, tol),
        nodes=rows,
        params=params,
        unmatched={"ref": [_describe(ref_nodes[n]) for n in alignment.unmatched_ref],
                   "cand": [_describe(cand_nodes[n]) for n in alignment.unmatched_cand]},
        graph={"ref": _structure(ref), "cand": _structure(cand)},
    )


def _transformed(table: dict[str, torch.Tensor], pp) -> torch.Tensor | None:
    """The candidate tensor(s) of a parameter pair mapped into the reference's layout."""
    from .params import apply_transform
    parts = [table.get(name) for name in pp.cand]
    if any(p is None for p in parts):
        return None
    return apply_transform(parts, pp.transform)


def _compare_outputs(ref: Capture, cand: Capture, tol: Tolerance) -> list[dict[str, Any]]:
    ref_out, cand_out = tree.flatten(ref.outputs), tree.flatten(cand.outputs)
    rows = []
    for i, (rpath, rt) in enumerate(ref_out):
        cpath, ct = cand_out[i] if i < len(cand_out) else (None, None)
        metrics = compare_tensors(rt, ct, tol) if ct is not None else _failed(rt, "missing on cand")
        rows.append({"ref": rpath, "cand": cpath, "metrics": metrics})
    return rows


def _describe(node: torch.fx.Node) -> dict[str, Any]:
    return {"node": node.name, "module": node.meta.get(MODULE, ""), "op": node_key(node),
            "shape": node.meta.get(SHAPE)}


def _structure(capture: Capture) -> list[dict[str, Any]]:
    """Each node's name, op, module, shape and inputs: enough to draw the graph."""
    return [{"name": n.name, "op": node_key(n), "kind": n.op, "target": n.meta.get(TARGET, str(n.target)),
             "module": n.meta.get(MODULE, ""), "shape": n.meta.get(SHAPE), "dtype": n.meta.get(DTYPE),
             "inputs": [a.name for a in n.all_input_nodes]}
            for n in capture.graph.nodes]


def _mark_frontier(graph: torch.fx.Graph, rows: list[NodeRow]) -> None:
    """Set ``first_forward`` / ``first_backward`` on the frontier rows of the failing set."""
    by_ref = {r.ref_node: r for r in rows}
    nodes = list(graph.nodes)
    preds: dict[str, set[str]] = {}
    for n in nodes:  # nearest compared ancestors, through uncompared nodes
        acc: set[str] = set()
        for a in n.all_input_nodes:
            acc |= {a.name} if a.name in by_ref else preds.get(a.name, set())
        preds[n.name] = acc
    succs: dict[str, set[str]] = {}
    for n in reversed(nodes):
        acc = set()
        for u in n.users:
            acc |= {u.name} if u.name in by_ref else succs.get(u.name, set())
        succs[n.name] = acc
    for row in rows:
        if row.forward is not None and not row.forward.passed:
            row.first_forward = all(by_ref[p].forward.passed for p in preds[row.ref_node])
        if row.backward is not None and not row.backward.passed:
            row.first_backward = all(by_ref[s].backward is None or by_ref[s].backward.passed
                                     for s in succs[row.ref_node])
