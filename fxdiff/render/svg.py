"""The matched graph as a Graphviz drawing: report -> view -> DOT -> SVG.

Boxes are coloured by divergence (see ``scale``), grouped into one frame per module, and carry
an SVG ``<title>`` tooltip with both sides' names, shapes and metrics. Layout is Graphviz ``dot``
(layered: the engine that draws a dataflow DAG top to bottom with few crossings). Its time grows
faster than linearly (the 20k-node benchmark graph drawn fully open took it 6 minutes on a 2-core
machine), so the view is collapsed *before* layout (``graphview``) and ``dot`` sees a budget of
boxes (150 in the HTML report; the same graph collapsed: 0.4 s). A drawing shows less by default
(``screen_view``): the nodes a few steps around the first divergence, in at most 40 boxes. Views of
more than ``BIG`` boxes (only when asked for) get polyline edges and capped network-simplex and
crossing-minimisation passes.

Each box's SVG element has ``id="<f|b>_u<N>"`` and classes ``unit u-<kind> <status>``
(e.g. ``unit u-node first``; kinds: node, module, fold, run), which the HTML report and the tests
rely on.
"""

from __future__ import annotations

import html
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import graphviz

from ..errors import FxdiffError
from ..util import atomic_write
from ..model.report import Report
from . import scale as sc
from .graphview import View, build_view

FONT = "Helvetica,Arial,sans-serif"
PREFIX = {"forward": "f", "backward": "b"}
STATUS_WORD = {"clean": "all clean", "none": "not compared", "ref_only": "ref only", "cand_only": "cand only",
               "unmatched": "unmatched", "diverged": "differ", "first": "introduced here"}
BIG = 600          # boxes beyond which edges are drawn as polylines (spline routing dominates dot's time)


def render_svg(report: Report, direction: str | None = None, *, metric: str = sc.DEFAULT_METRIC,
               **options: Any) -> str:
    """The SVG drawing of ``report``; ``direction`` and ``options`` as ``screen_view`` takes them."""
    sc.check_metric(metric)
    return draw(screen_view(report, direction, **options), metric)


def screen_view(report: Report, direction: str | None = None, *, max_nodes: int = 40, around: int = 5,
                **options: Any) -> View:
    """What a drawing shows by default: the direction the first divergence is in (forward when
    values diverge, backward when only gradients do), the nodes within ``around`` steps of it, in
    at most ``max_nodes`` boxes: a picture a screen can show. See ``graphview.build_view``."""
    if direction is None:
        only_backward = not any(r.first_forward for r in report.nodes) and any(r.first_backward for r in report.nodes)
        direction = "backward" if only_backward else "forward"
    return build_view(report, direction, max_nodes=max_nodes, around=around, **options)


RASTER = {".png": "png", ".pdf": "pdf"}


def write_svg(report: Report, path: str | os.PathLike, direction: str | None = None, **options: Any) -> Path:
    """Render ``report`` and write the SVG to ``path`` (a ``.png`` or ``.pdf`` path gets that format,
    laid out the same, without the hover tooltips)."""
    fmt = RASTER.get(Path(path).suffix.lower())
    if fmt is None:
        return atomic_write(path, render_svg(report, direction, **options))
    metric = sc.check_metric(options.pop("metric", sc.DEFAULT_METRIC))
    dot, _ = to_dot(screen_view(report, direction, **options), metric)
    if fmt == "png":
        dot.graph_attr["dpi"] = "110"
    return atomic_write(path, run_dot(dot, fmt))


def draw(view: View, metric: str = sc.DEFAULT_METRIC, *, directions: tuple[str, ...] | None = None,
         scale: sc.Scale | None = None, title: bool = True) -> str:
    """Lay out a view with Graphviz and return the SVG text, tooltips filled in.

    ``directions`` picks the panels (default: the view's); ``scale`` the colour scale (default:
    fitted to the view), so separately drawn panels can share one."""
    dot, tooltips = to_dot(view, metric, directions=directions, scale=scale, title=title)
    svg = run_dot(dot)
    return _fill_titles(svg, tooltips)


def require_dot() -> None:
    """A one-line ``FxdiffError`` unless Graphviz's ``dot`` is on PATH."""
    if shutil.which("dot") is None:
        raise FxdiffError(MISSING_DOT)


MISSING_DOT = ("Graphviz `dot` was not found on PATH: install Graphviz "
               "(apt-get install graphviz, brew install graphviz, conda install graphviz)")


def run_dot(dot: graphviz.Digraph, fmt: str = "svg") -> str | bytes:
    """Run Graphviz ``dot``; a one-line ``FxdiffError`` when it is missing or fails."""
    try:
        out = dot.pipe(format=fmt, engine="dot")
    except graphviz.ExecutableNotFound:
        raise FxdiffError(MISSING_DOT) from None
    except graphviz.CalledProcessError as e:
        first = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        raise FxdiffError(f"Graphviz dot failed: {first[0] if first else e}") from None
    except Exception as e:  # subprocess.TimeoutExpired, OSError
        raise FxdiffError(f"Graphviz dot failed: {type(e).__name__}: {e}") from None
    return out.decode("utf-8") if fmt == "svg" else out


def fit_scale(view: View, metric: str) -> sc.Scale:
    """One scale for every panel of the view, fitted to the diverged nodes' measures."""
    values = [view.item_measure(i, d, metric) for d in view.directions for i in range(len(view.items))
              if view.item_status(i, d) in ("diverged", "first")]
    return sc.Scale.fit(values, metric)


def to_dot(view: View, metric: str = sc.DEFAULT_METRIC, *, directions: tuple[str, ...] | None = None,
           scale: sc.Scale | None = None, title: bool = True) -> tuple[graphviz.Digraph, dict[str, str]]:
    """The DOT graph of a view, and the tooltip text of every box and frame by SVG id."""
    directions = directions or view.directions
    scale = scale or fit_scale(view, metric)
    big = len(view.units) * len(directions) > BIG
    g = graphviz.Digraph("fxdiff", graph_attr={
        "rankdir": "TB", "newrank": "true", "compound": "true", "fontname": FONT, "fontsize": "11",
        "nodesep": "0.18", "ranksep": "0.32", "pad": "0.25", "bgcolor": "white", "outputorder": "edgesfirst",
        "splines": "polyline" if big else "spline", "labelloc": "t", "labeljust": "l",
        **({"nslimit": "4", "nslimit1": "4", "mclimit": "0.3", "searchsize": "10"} if big else {}),
    }, node_attr={"shape": "box", "style": "rounded,filled", "fontname": FONT, "fontsize": "10",
                  "margin": "0.07,0.025", "height": "0.3", "penwidth": "1"},
        edge_attr={"arrowsize": "0.55", "color": "#8f8f8f", "penwidth": "0.8"})
    if title:
        g.attr(label=_title(view, directions))
    tooltips: dict[str, str] = {}
    g.node("legend", label=_legend(scale), shape="plaintext", style="", margin="0", id="legend")
    for d in directions:
        p = PREFIX[d]
        if len(directions) > 1:
            with g.subgraph(name=f"cluster_{p}") as panel:
                panel.attr(label=f"<<b>{'forward: values' if d == 'forward' else 'backward: gradients'}</b>>",
                           style="rounded", color="#444444", penwidth="1.4", fontsize="13", id=f"{p}_panel",
                           margin="12")
                _panel(panel, view, d, scale, tooltips)
        else:
            _panel(g, view, d, scale, tooltips)
    return g, tooltips


def _panel(g: graphviz.Digraph, view: View, d: str, scale: sc.Scale, tooltips: dict[str, str]) -> None:
    p = PREFIX[d]
    summaries = [view.unit_summary(u, d, scale.metric) for u in range(len(view.units))]

    def emit(graph: graphviz.Digraph, path: str, level: int) -> None:
        cluster = view.clusters[path]
        for u in cluster.units:
            _node(graph, view, u, d, summaries[u], scale, tooltips)
        for child in cluster.children:
            cid = f"{p}_m_{_slug(child)}"
            with graph.subgraph(name=f"cluster_{cid}") as sub:
                cls = view.module_classes.get(child, "")
                rel = child[len(path) + 1:] if path else child
                cls_html = f' <font color="#666666">{_esc(cls)}</font>' if cls else ""
                sub.attr(label=f"<<b>{_esc(rel)}</b>{cls_html}>",
                         style="rounded,filled", fillcolor="#f6f6f6" if level % 2 == 0 else "#ececec",
                         color="#b5b5b5", fontsize="10", id=cid, margin="7")
                tooltips[cid] = f"{child}{' (' + cls + ')' if cls else ''}"
                emit(sub, child, level + 1)

    emit(g, "", 0)
    for a, b in view.edges:
        src = a if d == "forward" else b     # the end the value (gradient) comes from
        status = summaries[src]["status"]
        attrs: dict[str, str] = {}
        if status in ("diverged", "first"):
            attrs.update(color="#c0392b", penwidth="1.3")
        elif status in ("ref_only", "cand_only", "unmatched") or \
                summaries[b if src == a else a]["status"] in ("ref_only", "cand_only"):
            attrs.update(color="#aaaaaa", style="dashed")
        if d == "backward":
            attrs["dir"] = "back"
        g.edge(f"{p}_{view.units[a].id}", f"{p}_{view.units[b].id}", **attrs)


def _node(g: graphviz.Digraph, view: View, u: int, d: str, s: dict[str, Any], scale: sc.Scale,
          tooltips: dict[str, str]) -> None:
    unit = view.units[u]
    status = s["status"]
    attrs = _style(status, s["worst"], scale)
    if unit.kind != "node":
        attrs["shape"] = "box3d"
        attrs["style"] = attrs["style"].replace("rounded,", "")
    sid = f"{PREFIX[d]}_{unit.id}"
    attrs.update(id=sid, **{"class": f"unit u-{unit.kind} {status}"})
    label = _node_label(view, u, d, s) if unit.kind == "node" else _box_label(view, u, s)
    g.node(f"{PREFIX[d]}_{unit.id}", label=label, **attrs)
    tooltips[sid] = tooltip(view, u, d, s, scale.metric)


def _style(status: str, worst: float | None, scale: sc.Scale) -> dict[str, str]:
    if status in ("diverged", "first"):
        fill = scale.color(worst)
        return {"fillcolor": fill, "fontcolor": sc.text_color(fill), "style": "rounded,filled",
                "color": sc.FIRST_LINE if status == "first" else sc.DIVERGED_LINE,
                "penwidth": "4" if status == "first" else "1.4"}
    if status == "clean":
        return {"fillcolor": sc.CLEAN, "color": sc.CLEAN_LINE, "style": "rounded,filled"}
    if status in ("ref_only", "cand_only", "unmatched"):
        return {"fillcolor": sc.UNMATCHED, "color": sc.UNMATCHED_LINE, "fontcolor": sc.UNMATCHED_TEXT,
                "style": "rounded,filled,dashed"}
    return {"fillcolor": sc.NONE, "color": sc.NONE_LINE, "style": "rounded,filled"}


def _node_label(view: View, u: int, d: str, s: dict[str, Any]) -> str:
    unit = view.units[u]
    it = view.items[unit.items[0]]
    where = it.module[len(unit.parent) + 1:] if unit.parent and it.module.startswith(unit.parent + ".") \
        else (it.module if not unit.parent and it.module else "")
    lines = [f"<b>{_esc(it.op)}</b>" + (f' <font point-size="8">{_esc(where)}</font>' if where else "")]
    ref_shape, cand_shape = it.ref_shape, it.cand_shape
    if it.side == "cand_only":
        ref_shape, cand_shape = cand_shape, None
    shape = _shape(ref_shape)
    if cand_shape is not None and ref_shape is not None and list(cand_shape) != list(ref_shape):
        shape += f" | cand {_shape(cand_shape)}"
    if shape:
        lines.append(f'<font point-size="8">{_esc(shape)}</font>')
    status = s["status"]
    if status in ("diverged", "first"):
        lines.append(f'<font point-size="8">{"introduced here: " if status == "first" else ""}'
                     f'{_esc(sc.fmt(s["worst"]))}</font>')
    elif status in ("ref_only", "cand_only"):
        lines.append(f'<font point-size="8"><i>{STATUS_WORD[status]}</i></font>')
    return "<" + "<br/>".join(lines) + ">"


def _box_label(view: View, u: int, s: dict[str, Any]) -> str:
    unit = view.units[u]
    counts = s["counts"]
    n = len(unit.items)
    if unit.kind == "fold":
        first, last = unit.modules[0], unit.modules[-1]
        head = f"<b>{_esc(_rel(first, unit.parent))} .. {_esc(_rel(last, unit.parent))}</b>"
        cls = view.module_classes.get(first, "")
        lines = [head, f"{len(unit.modules)} x {_esc(cls or 'identical block')}, folded"]
    elif unit.kind == "run":
        lines = [f"<b>{n} consecutive ops</b>", f'<font point-size="9">{_esc(run_ops(view, u))}</font>']
    else:
        cls = view.module_classes.get(unit.path, "")
        lines = [f"<b>{_esc(_rel(unit.path, unit.parent))}</b>" + (f" ({_esc(cls)})" if cls else "")]
    bad = counts["diverged"] + counts["first"]
    facts = [f"{n} nodes"]
    if bad:
        facts.append(f"{bad} differ, worst {_esc(sc.fmt(s['worst']))}")
    elif counts["clean"]:
        facts.append("all clean" if counts["clean"] + counts["none"] + counts["ref_only"] + counts["cand_only"] == n
                     else f"{counts['clean']} clean")
    unmatched = counts["ref_only"] + counts["cand_only"]
    if unmatched:
        facts.append(f"{unmatched} unmatched")
    if counts["first"]:
        facts.append("introduced here")
    lines.append(f'<font point-size="9">{" · ".join(facts)}</font>')
    return "<" + "<br/>".join(lines) + ">"


def tooltip(view: View, u: int, d: str, s: dict[str, Any], metric: str) -> str:
    """Plain text shown on hover: both sides' names, shapes and the metrics."""
    unit = view.units[u]
    rows = view.report.nodes
    if unit.kind != "node":
        if unit.kind == "fold":
            head = f"{unit.modules[0]} .. {unit.modules[-1]} ({len(unit.modules)} identical blocks, folded)"
        elif unit.kind == "run":
            head = f"{len(unit.items)} consecutive ops in {unit.path or '<root>'}: {run_ops(view, u)}"
        else:
            head = f"{unit.path} ({view.module_classes.get(unit.path, 'module')}), collapsed"
        counts = s["counts"]
        parts = [head, f"{len(unit.items)} nodes: " + ", ".join(f"{v} {STATUS_WORD.get(k, k)}"
                                                              for k, v in sorted(counts.items()))]
        if s["worst_item"] is not None:
            it = view.items[s["worst_item"]]
            parts.append(f"worst {d} {sc.METRICS[metric][0]} = {sc.fmt(s['worst'])} at {it.ref} ({it.module})")
        return "\n".join(parts)
    it = view.items[unit.items[0]]
    parts = []
    if it.side != "cand_only":
        parts.append(f"ref  {it.ref}  [{it.module or '<root>'}]  {it.op}  {_shape(it.ref_shape) or '-'}")
    if it.side == "pair" and it.rows:
        r0 = rows[it.rows[0]]
        parts.append(f"cand {r0.cand_node}  [{r0.cand_module or '<root>'}]  {_shape(r0.cand_shape) or '-'}")
    elif it.side == "cand_only":
        parts.append(f"cand {it.cand}  [{it.cand_module or '<root>'}]  {it.op}  {_shape(it.cand_shape) or '-'}")
    if it.side != "pair":
        parts.append(f"{STATUS_WORD[it.side]}: no counterpart on the other side")
    elif not it.rows:
        parts.append("matched, not compared (no value recorded)")
    for k in it.rows:
        r = rows[k]
        for dd in sc.DIRECTIONS:
            m = sc.row_metrics(r, dd)
            if m is None:
                parts.append(f"{dd}: -")
                continue
            verdict = "ok" if m.passed else ("DIFF, introduced here" if sc.row_status(r, dd) == "first" else "DIFF")
            cos = f"  cos {m.cosine:.6f}" if m.cosine is not None else ""
            parts.append(f"{dd}: {verdict}  max abs {sc.fmt(m.max_abs_diff)}  max rel {sc.fmt(m.max_rel_diff)}"
                         f"  mean abs {sc.fmt(m.mean_abs_diff)}{cos}  {m.mismatched}/{m.numel} off"
                         + (f"  ({m.note})" if m.note else ""))
        if r.ref_slice or r.cand_slice:
            parts.append(f"slices: ref {r.ref_slice} cand {r.cand_slice}")
        parts.append(f"matched by {r.rationale} (confidence {r.confidence:.2f})")
    return "\n".join(parts)


def run_ops(view: View, u: int, most: int = 4) -> str:
    """The commonest op keys of a merged run, e.g. ``add x12, mul x3, ...``."""
    counts = Counter(view.items[i].op for i in view.units[u].items)
    text = ", ".join(f"{op} x{c}" if c > 1 else op for op, c in counts.most_common(most))
    return text + (", ..." if len(counts) > most else "")


def _title(view: View, directions: tuple[str, ...]) -> str:
    r = view.report
    verdict = '<font color="#b00020"><b>DIVERGED</b></font>' if r.diverged else '<font color="#2e7d32"><b>MATCH</b></font>'
    fd = r.first_divergence()
    first = []
    for d in directions:
        entries = fd.get(d, [])
        if entries:
            e = entries[0] if d == "forward" else entries[-1]
            more = f" (+{len(entries) - 1} more)" if len(entries) > 1 else ""
            first.append(f"{d}: {_esc(e['ref_module'] or '<root>')} {_esc(e['op'])} ({_esc(e['ref_node'])}){more}")
    lines = [f"<b>fxdiff</b>  ref {_esc(_short(r.ref.get('label', 'ref')))}  vs  cand "
             f"{_esc(_short(r.cand.get('label', 'cand')))}: {verdict}"]
    if first:
        lines.append("first divergence: " + "; ".join(first))
    if view.left_out:
        lines.append(f'<font point-size="9" color="#666666">{len(view.items)} of {len(view.items) + view.left_out} '
                     f"nodes drawn: those within {view.around} steps of the first divergence</font>")
    if view.hidden:
        lines.append(f'<font point-size="9" color="#666666">{view.hidden} of {len(view.items)} nodes are '
                     "inside collapsed or folded boxes</font>")
    return "<" + '<br align="left"/>'.join(lines) + '<br align="left"/>>'


def _legend(scale: sc.Scale) -> str:
    cells = []
    for k in range(scale.lo, scale.hi):
        fill = scale.color(10 ** (k + 0.5))
        cells.append(f'<td bgcolor="{fill}"><font color="{sc.text_color(fill)}" point-size="8">1e{k}</font></td>')
    cells.append(f'<td bgcolor="{sc.INFINITE}"><font color="#ffffff" point-size="8">inf</font></td>')
    span = len(cells)
    cats = [
        f'<td bgcolor="{sc.CLEAN}" color="{sc.CLEAN_LINE}"><font point-size="8">clean</font></td>',
        f'<td bgcolor="{scale.color(10 ** (scale.hi - 0.5))}" color="{sc.FIRST_LINE}" border="3">'
        f'<font point-size="8" color="#ffffff">introduced here</font></td>',
        f'<td bgcolor="{sc.UNMATCHED}" color="{sc.UNMATCHED_LINE}"><font point-size="8" color="{sc.UNMATCHED_TEXT}">'
        'unmatched</font></td>',
        f'<td bgcolor="{sc.NONE}" color="{sc.NONE_LINE}"><font point-size="8">not compared</font></td>',
    ]
    return (f'<<table border="0" cellborder="1" cellspacing="2" cellpadding="3">'
            f'<tr><td colspan="{span}" border="0" align="left"><font point-size="9"><b>diverged</b>: '
            f'{_esc(scale.description)}, log scale</font></td></tr>'
            f'<tr>{"".join(cells)}</tr>'
            f'<tr><td colspan="{span}" border="0"><table border="0" cellborder="1" cellspacing="2" cellpadding="3">'
            f'<tr>{"".join(cats)}</tr></table></td></tr></table>>')


def _fill_titles(svg: str, tooltips: dict[str, str]) -> str:
    """Replace each box's and frame's ``<title>`` (Graphviz writes the DOT name) by its tooltip."""
    def sub(m: re.Match) -> str:
        text = tooltips.get(html.unescape(m.group(2)))
        return m.group(0) if text is None else f"{m.group(1)}{html.escape(text, quote=False)}</title>"
    return re.sub(r'(<g id="([^"]+)" class="[^"]*">\n<title>)[^<]*</title>', sub, svg)


def _esc(s: str) -> str:
    return html.escape(str(s), quote=True)


def _shape(shape: list[int] | None) -> str:
    if shape is None:
        return ""
    return "x".join(str(x) for x in shape) if len(shape) else "scalar"


def _rel(path: str, parent: str) -> str:
    return path[len(parent) + 1:] if parent and path.startswith(parent + ".") else path


def _slug(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", path) or "root"


def _short(label: str, n: int = 60) -> str:
    return label if len(label) <= n else "..." + label[-(n - 3):]
