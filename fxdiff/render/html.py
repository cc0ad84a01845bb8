"""One self-contained HTML report: summary, graph with pan and zoom, node details, error-vs-depth
chart, sortable and filterable tables. No network access: the CSS, the JavaScript
(``assets/report.css``, ``assets/report.js``), the SVG drawings and the data are all inlined, so
the file works from ``file://`` and can be mailed or attached to a bug.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import webbrowser
from importlib import resources
from pathlib import Path
from typing import Any

from ..version import __version__
from ..model.report import HIST_EDGES, Metrics, Report
from . import scale as sc
from .graphview import View, build_view
from ..util import atomic_write, dumps
from .svg import draw, fit_scale


def render_html(report: Report, direction: str = "both", *, metric: str = sc.DEFAULT_METRIC,
                depth: int | None = None, focus: bool = True, fold: bool = True, max_nodes: int = 150) -> str:
    """The HTML report as a string. ``direction`` picks the graph views (``both``: a tab each);
    the other options shape the drawing as in ``svg.render_svg``."""
    sc.check_metric(metric)
    view = build_view(report, direction, depth=depth, focus=focus, fold=fold, max_nodes=max_nodes)
    scale = fit_scale(view, metric)
    svgs = {d: _strip_prolog(draw(view, metric, directions=(d,), scale=scale)) for d in view.directions}
    data = _data(report, view, metric)
    graphs = "\n".join(
        f'<div class="viewport" data-direction="{d}" hidden>{svg}</div>' for d, svg in svgs.items())
    title = f"fxdiff: {report.ref.get('label', 'ref')} vs {report.cand.get('label', 'cand')}"
    parts = {"TITLE": _esc(title), "CSS": _asset("report.css"), "GRAPHS": graphs, "DATA": _script_json(data),
             "JS": _asset("report.js")}
    # one pass over the template, so no inserted text is ever taken for a placeholder
    return re.sub(r"/\*(TITLE|CSS|GRAPHS|DATA|JS)\*/", lambda m: parts[m.group(1)], _asset("report.html"))


def write_html(report: Report, path: str | os.PathLike, direction: str = "both", **options: Any) -> Path:
    """Render the HTML report and write it to ``path``."""
    return atomic_write(path, render_html(report, direction, **options))


def open_in_browser(path: str | os.PathLike) -> bool:
    """Open ``path`` in a web browser when one can be shown; False when none can."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    if os.environ.get("BROWSER") == "none":
        return False
    try:
        return webbrowser.open(Path(path).resolve().as_uri())
    except webbrowser.Error:
        return False


def _data(report: Report, view: View, metric: str) -> dict[str, Any]:
    """Everything the page's script needs, in compact arrays (see ``assets/report.js``)."""
    s = report.summary()
    return {
        "fxdiff": __version__,
        "verdict": "diverged" if report.diverged else "match",
        "ref": _side_meta(report.ref),
        "cand": _side_meta(report.cand),
        "tolerance": report.tolerance,
        "summary": s,
        "first": report.first_divergence(),
        "metric": metric,
        "metrics": {k: v[0] for k, v in sc.METRICS.items()},
        "directions": list(view.directions),
        "hist_edges": HIST_EDGES,
        # row: ref, cand, ref_module, cand_module, op, ref_shape, cand_shape, fwd, bwd, rationale,
        #      confidence, depth, first_forward, first_backward, ref_slice, cand_slice,
        #      [forward isolation: cause, why not], [backward isolation: cause, why not]
        "rows": [[r.ref_node, r.cand_node, r.ref_module, r.cand_module, r.op, r.ref_shape, r.cand_shape,
                  _m(r.forward), _m(r.backward), r.rationale, r.confidence, r.depth, r.first_forward,
                  r.first_backward, r.ref_slice, r.cand_slice, [r.cause(), r.isolated_why],
                  [r.backward_cause(), r.isolated_backward_why]] for r in report.nodes],
        # item: ref, cand, side, module, op, ref_shape, cand_shape, rows, cand_module
        "items": [[it.ref, it.cand, it.side, it.module, it.op, it.ref_shape, it.cand_shape, it.rows, it.cand_module]
                  for it in view.items],
        # unit: id, kind, path, folded modules, items
        "units": [[u.id, u.kind, u.path, u.modules, u.items] for u in view.units],
        "classes": view.module_classes,
        "params": [[p.ref, p.cand, p.transform.get("kind", "identity") if isinstance(p.transform, dict) else str(p.transform),
                    _m(p.grad), _m(p.value), p.evidence] for p in report.params],
        "outputs": [[o.ref, o.cand, _m(o.metrics)] for o in report.outputs],
        "unmatched": {side: [[u.node, u.module, u.op, u.shape] for u in getattr(report.unmatched, side)]
                      for side in ("ref", "cand")},
    }


def _side_meta(meta: dict[str, Any]) -> dict[str, Any]:
    keep = ("label", "model", "model_class", "checkpoint", "inputs", "loss", "mode", "seed", "device", "dtype",
            "torch", "fxdiff", "tracer", "started", "loss_value")
    return {k: meta[k] for k in keep if k in meta}


def _m(m: Metrics | None) -> list[Any] | None:
    """passed, max_abs, max_rel, mean_abs, cosine, ref_rms, mismatched, numel, note, histogram, and
    every measure of ``scale.METRICS`` by name: the page reads them, it does not define them."""
    if m is None:
        return None
    d = dataclasses.asdict(m)
    return [int(d["passed"]), d["max_abs_diff"], d["max_rel_diff"], d["mean_abs_diff"], d["cosine"], d["ref_rms"],
            d["mismatched"], d["numel"], d["note"], d["histogram"], {k: sc.measure(m, k) for k in sc.METRICS}]


def _script_json(data: Any) -> str:
    """JSON for a ``<script type="application/json">``: non-finite numbers as strings, no ``</``."""
    return dumps(data, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def _strip_prolog(svg: str) -> str:
    """The ``<svg>`` element alone, to inline in HTML."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def _asset(name: str) -> str:
    return resources.files("fxdiff.render").joinpath("assets", name).read_text(encoding="utf-8")


def _esc(s: str) -> str:
    import html
    return html.escape(s, quote=True)
