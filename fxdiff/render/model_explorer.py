"""Per-node metrics in Google Model Explorer's node-data JSON format.

Model Explorer (github.com/google-ai-edge/model-explorer) draws a graph and overlays per-node
values loaded from a JSON file ("custom node data"): ``{"results": {node_id: {"value": v,
"bgColor": c}}, "thresholds": [{"value": v, "bgColor": c}, ...]}``. fxdiff writes one such file per
direction, keyed by node name (the fx node names of fxdiff's capture, which follow
``torch.fx``'s naming as Model Explorer's PyTorch adapter does). The value is the chosen error
measure; ``bgColor`` is the colour fxdiff's own drawing gives the node, and the thresholds are
the decades of the log scale, so the overlay reads the same as ``fxdiff compare --svg``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..errors import FxdiffError
from ..util import atomic_write, dumps
from ..model.report import Report
from . import scale as sc

BIGGEST = sys.float_info.max   # JSON has no infinity: an infinite error is written as the largest float


def node_data(report: Report, direction: str = "forward", *, metric: str = sc.DEFAULT_METRIC,
              side: str = "ref") -> dict[str, Any]:
    """The node-data document of one direction, keyed by ``side``'s ("ref" or "cand") node names.

    Every compared node gets a result; a node paired several times (a fused output) keeps its
    worst value. Unmatched and uncompared nodes carry no value, so Model Explorer leaves them plain.
    """
    sc.check_metric(metric)
    if direction not in sc.DIRECTIONS:
        raise FxdiffError(f"Model Explorer node data is per direction: forward or backward, not {direction!r}")
    if side not in ("ref", "cand"):
        raise FxdiffError(f"side must be ref or cand, not {side!r}")
    worst: dict[str, tuple[float, str]] = {}
    for row in report.nodes:
        m = sc.row_metrics(row, direction)
        v = sc.measure(m, metric)
        if v is None:
            continue
        name = row.ref_node if side == "ref" else row.cand_node
        status = sc.row_status(row, direction)
        if name not in worst or sc.STATUS_RANK[status] > sc.STATUS_RANK[worst[name][1]] or \
                (status == worst[name][1] and v > worst[name][0]):
            worst[name] = (v, status)
    scale = sc.Scale.fit([v for v, s in worst.values() if s in ("diverged", "first")], metric)
    results = {}
    for name, (v, status) in worst.items():
        fill = sc.CLEAN if status == "clean" else scale.color(v)
        results[name] = {"value": min(v, BIGGEST), "bgColor": fill, "textColor": sc.text_color(fill)}
    thresholds = [{"value": 10.0 ** k, "bgColor": scale.color(10 ** (k - 0.5)),
                   "textColor": sc.text_color(scale.color(10 ** (k - 0.5)))} for k in range(scale.lo + 1, scale.hi + 1)]
    thresholds.append({"value": BIGGEST, "bgColor": sc.INFINITE, "textColor": "#ffffff"})
    return {"results": results, "thresholds": thresholds}


def write_node_data(report: Report, path: str | os.PathLike, direction: str = "both", *,
                    metric: str = sc.DEFAULT_METRIC, side: str = "ref") -> list[Path]:
    """Write the node data: to ``path`` for one direction; for ``both``, to ``<stem>.forward.json``
    and ``<stem>.backward.json`` beside it. Returns the paths written."""
    directions = sc.check_direction(direction)
    path = Path(path)
    out = []
    for d in directions:
        target = path if len(directions) == 1 else path.with_name(f"{_stem(path)}.{d}.json")
        doc = node_data(report, d, metric=metric, side=side)
        out.append(atomic_write(target, dumps(doc, indent=1)))
    return out


def _stem(path: Path) -> str:
    return path.name[:-5] if path.name.endswith(".json") else path.name
