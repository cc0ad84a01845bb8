"""Terminal tables for a report, with rich. Data in, renderables out; the caller prints them."""

from __future__ import annotations

from typing import Iterator

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.markup import escape
from rich.text import Text

from ..ops import node_key
from ..model.capture import DTYPE, GRAD, MODULE, SHAPE, Capture
from ..model.report import Metrics, Report


def fmt(x: float | None) -> str:
    """A diff or a ratio in 3 significant digits."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.3g}"


def _verdict(m: Metrics | None) -> Text:
    if m is None:
        return Text("-", style="dim")
    if m.within_noise:
        return Text(f"ok, within {_precision(m.eps)} noise", style="green")
    return Text("ok", style="green") if m.passed else Text("DIFF", style="bold red")


_PRECISIONS = {2.0 ** -7: "bfloat16", 2.0 ** -10: "float16", 2.0 ** -23: "float32", 2.0 ** -52: "float64"}


def _precision(eps: float) -> str:
    return _PRECISIONS.get(eps, f"eps {eps:.3g}")


def _rule(report: Report) -> str:
    """How the verdicts were reached, in words."""
    tol = report.tolerance
    if tol.get("atol") is not None or tol.get("rtol") is not None:
        return f"strict: |cand - ref| <= {tol.get('atol') or 0:g} + {tol.get('rtol') or 0:g} * |ref| for every element"
    metrics = [m for r in report.nodes for m in (r.forward, r.backward) if m is not None]
    noisy = [m for m in metrics if m.within_noise]
    coarsest = max((m.eps for m in metrics), default=0.0)
    return (f"noise-aware ({_precision(coarsest)}): {len(noisy)} of {len(metrics)} comparisons differ within "
            "their noise level (see the report's error and noise per node)")


def _node_name(node: str, module: str) -> str:
    return f"{module or '<root>'} [dim]{node}[/dim]"


def outputs_table(report: Report) -> Table:
    table = Table(title="Forward outputs", title_justify="left")
    for col in ("ref output", "cand output", "match", "max abs diff", "max rel diff", "cosine"):
        table.add_column(col)
    for o in report.outputs:
        m = o["metrics"]
        table.add_row(o["ref"], o["cand"] or "-", _verdict(m), fmt(m.max_abs_diff), fmt(m.max_rel_diff),
                      fmt(m.cosine))
    return table


def params_table(report: Report, show_all: bool) -> Table:
    rows = [p for p in report.params if show_all or (p.grad is not None and not p.grad.passed)]
    table = Table(title="Parameter gradients", title_justify="left")
    for col in ("ref parameter", "cand parameter", "transform", "match", "max abs diff", "max rel diff"):
        table.add_column(col)
    for p in rows:
        table.add_row(p.ref, ", ".join(p.cand), p.transform.get("kind", "identity"), _verdict(p.grad),
                      fmt(p.grad.max_abs_diff if p.grad else None), fmt(p.grad.max_rel_diff if p.grad else None))
    hidden = len(report.params) - len(rows)
    if hidden:
        table.caption = f"{hidden} matching parameter gradients not shown (--all shows them)"
    return table


def nodes_table(report: Report, show_all: bool) -> Table:
    rows = [r for r in report.nodes if show_all or _failing(r)]
    table = Table(title="Intermediate nodes", title_justify="left")
    for col in ("ref node", "cand node", "op", "fwd", "bwd", "fwd max abs", "bwd max abs", "match basis"):
        table.add_column(col)
    for r in rows:
        mark = " [bold yellow]<- first[/]" if r.first_forward or r.first_backward else ""
        table.add_row(_node_name(r.ref_node, r.ref_module) + mark, _node_name(r.cand_node, r.cand_module),
                      r.op, _verdict(r.forward), _verdict(r.backward),
                      fmt(r.forward.max_abs_diff if r.forward else None),
                      fmt(r.backward.max_abs_diff if r.backward else None), r.rationale)
    hidden = len(report.nodes) - len(rows)
    if hidden:
        table.caption = f"{hidden} matching nodes not shown (--all shows them)"
    return table


def _failing(r) -> bool:
    return (r.forward is not None and not r.forward.passed) or (r.backward is not None and not r.backward.passed)


def summary_panel(report: Report) -> Panel:
    s = report.summary()
    n, p = s["nodes"], s["param_grads"]
    lines = [
        f"forward output match: {'yes' if s['forward_output_match'] else 'NO'}",
        f"parameter gradients: {p['matched']} match, {p['mismatched']} differ ({p['match_rate']:.1%})",
        f"node values:         {n['forward_matches']} match, {n['forward_mismatches']} differ "
        f"({n['forward_match_rate']:.1%})",
        f"node gradients:      {n['backward_matches']} match, {n['backward_mismatches']} differ "
        f"({n['backward_match_rate']:.1%})",
        f"unmatched nodes:     {n['unmatched_ref']} ref, {n['unmatched_cand']} cand",
        f"verdicts:            {_rule(report)}",
    ]
    verdict = "[bold red]DIVERGED[/]" if report.diverged else "[bold green]MATCH[/]"
    return Panel("\n".join(lines), title=f"Summary: {verdict}", title_align="left")


def first_divergence_panel(report: Report) -> Panel:
    fd = report.first_divergence()
    lines = []
    for direction in ("forward", "backward"):
        entries = fd[direction]
        if not entries:
            lines.append(f"[bold]{direction}[/]: none")
        for e in entries:
            lines.append(f"[bold]{direction}[/]: ref {e['ref_module'] or '<root>'} ({e['ref_node']})  <->  "
                         f"cand {e['cand_module'] or '<root>'} ({e['cand_node']})  op={e['op']}  "
                         f"max abs {fmt(e['max_abs_diff'])}, max rel {fmt(e['max_rel_diff'])}"
                         + _CAUSE.get(e.get("isolated"), ""))
    return Panel("\n".join(lines), title="First divergence", title_align="left")


_CAUSE = {
    "introduced": "\n    [bold]introduced here[/]: the candidate's ops, replayed on the reference's inputs, already differ",
    "amplified": "\n    [bold]amplified[/]: replayed on the reference's inputs the candidate agrees; "
                 "input differences within tolerance grew here",
}


def capture_summary(cap: Capture, label: str, top: int = 10) -> RenderableType:
    """What ``fxdiff inspect`` prints: versions, setup, counts, sizes and the largest nodes."""
    s, m = cap.summary(), cap.meta
    lines = [
        f"[bold]{escape(label)}[/]: {escape(str(m.get('model', m.get('model_class'))))}",
        f"  fxdiff {m.get('fxdiff')}, torch {m.get('torch')}, python {m.get('python')}, tracer {m.get('tracer')}, "
        f"{m.get('mode')} mode, seed {m.get('seed')}, device {m.get('device')}, dtype {m.get('dtype')}, "
        f"captured {m.get('started')}",
        f"  {s['nodes']} nodes ({s['ops']} ops, {s['inputs']} inputs), {s['params']} params/buffers, "
        f"{s['values']} values, {s['grads']} gradients, {s['param_grads']} parameter gradients",
        "  sizes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in s["bytes"].items()),
    ]
    table = Table(title=f"Largest {top} nodes", title_justify="left")
    for col in ("node", "module", "op", "shape", "dtype", "grad"):
        table.add_column(col, overflow="fold")
    ranked = sorted((n for n in cap.graph.nodes if n.name in cap.values), key=lambda n: -cap.values[n.name].numel())
    for n in ranked[:top]:
        table.add_row(n.name, str(n.meta.get(MODULE) or "<root>"), node_key(n), str(tuple(n.meta.get(SHAPE) or ())),
                      str(n.meta.get(DTYPE)), str(n.meta.get(GRAD, "-")))
    return Group(*(Text.from_markup(line) for line in lines), table)


def render(report: Report, show_all: bool = False) -> RenderableType:
    """All sections of the terminal report, in order."""
    def parts() -> Iterator[RenderableType]:
        yield outputs_table(report)
        if report.params:
            yield params_table(report, show_all)
        yield nodes_table(report, show_all)
        yield summary_panel(report)
        yield first_divergence_panel(report)
    return Group(*parts())
