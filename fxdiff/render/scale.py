"""Error measures and the colour scale every graphical renderer shares.

A node's *status* in one direction (forward values or backward gradients) is one of:

- ``clean``     compared, every element within tolerance
- ``diverged``  compared, some element outside tolerance
- ``first``     diverged, and all its matched inputs (backward: consumers) are clean: introduced here
- ``none``      nothing to compare in this direction (no gradient, an uninitialised op, ...)
- ``ref_only`` / ``cand_only``  unmatched: the node exists on that side only

Diverged nodes are coloured on a log scale of the chosen measure; clean, unmatched and
uncompared nodes have fixed colours, so the categories read at a glance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import FxdiffError

if TYPE_CHECKING:
    from ..model.report import Metrics, NodeRow

DIRECTIONS = ("forward", "backward")


def _ratio(num: float, den: float) -> float:
    if num == 0:
        return 0.0
    return num / den if den > 0 else math.inf


# name -> (description, function of Metrics); a value is >= 0, larger is worse, may be inf
METRICS: dict[str, tuple[str, Callable[[Metrics], float]]] = {
    "max_abs": ("max |cand - ref|", lambda m: m.max_abs_diff),
    "max_rel": ("max |cand - ref| / |ref|", lambda m: m.max_rel_diff),
    "mean_abs": ("mean |cand - ref|", lambda m: m.mean_abs_diff),
    "rel_mean": ("mean |cand - ref| / rms(ref)", lambda m: _ratio(m.mean_abs_diff, m.ref_rms)),
    "cosine": ("1 - cosine similarity", lambda m: math.inf if m.cosine is None and not m.passed
               else max(0.0, 1.0 - (m.cosine if m.cosine is not None else 1.0))),
    "mismatch": ("fraction of elements outside tolerance", lambda m: _ratio(m.mismatched, m.numel)),
}
DEFAULT_METRIC = "max_abs"

# fixed colours of the categories
CLEAN = "#d8f0d2"
CLEAN_LINE = "#5a9e52"
NONE = "#ffffff"
NONE_LINE = "#9a9a9a"
UNMATCHED = "#dcdcdc"
UNMATCHED_LINE = "#8a8a8a"
UNMATCHED_TEXT = "#555555"
FIRST_LINE = "#1a3cff"      # the outline of an introduced-here node
DIVERGED_LINE = "#8c1010"
INFINITE = "#49006a"        # shape mismatch, missing gradient, NaN where ref is finite
# diverged: a YlOrRd ramp over log10(measure)
RAMP = ["#ffe680", "#fec44f", "#fe9929", "#f03b20", "#c4001a", "#7f0012"]


def check_metric(name: str) -> str:
    if name not in METRICS:
        raise FxdiffError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return name


def check_direction(direction: str) -> tuple[str, ...]:
    """The directions a ``--direction`` value stands for."""
    if direction == "both":
        return DIRECTIONS
    if direction not in DIRECTIONS:
        raise FxdiffError(f"unknown direction {direction!r}; choose forward, backward or both")
    return (direction,)


def measure(m: Metrics | None, metric: str) -> float | None:
    """The chosen error measure of one comparison (None when nothing was compared)."""
    if m is None:
        return None
    v = METRICS[metric][1](m)
    return math.inf if v != v else float(v)  # NaN -> inf: as bad as it gets


def row_metrics(row: NodeRow, direction: str) -> Metrics | None:
    return row.forward if direction == "forward" else row.backward


def row_status(row: NodeRow, direction: str) -> str:
    m = row_metrics(row, direction)
    if m is None:
        return "none"
    if m.passed:
        return "clean"
    first = row.first_forward if direction == "forward" else row.first_backward
    return "first" if first else "diverged"


STATUS_RANK = {"none": 0, "clean": 1, "diverged": 2, "first": 3}


def worst_status(statuses: Iterable[str]) -> str:
    return max(statuses, key=STATUS_RANK.__getitem__, default="none")


@dataclass(frozen=True)
class Scale:
    """A log10 colour scale over whole decades ``[10**lo, 10**hi]`` for diverged nodes."""

    metric: str
    lo: int
    hi: int

    @classmethod
    def fit(cls, values: Iterable[float | None], metric: str) -> "Scale":
        """The decades spanning the finite positive ``values`` (the diverged nodes' measures)."""
        finite = [v for v in values if v is not None and 0 < v < math.inf]
        if not finite:
            return cls(metric, -6, 0)
        lo, hi = math.floor(math.log10(min(finite))), math.ceil(math.log10(max(finite)))
        hi = max(hi, lo + 1)
        return cls(metric, max(min(lo, hi - 3), hi - 16), hi)  # 3 to 16 decades

    def position(self, v: float) -> float:
        """Where ``v`` sits on the scale, 0..1."""
        if v <= 0:
            return 0.0
        return min(1.0, max(0.0, (math.log10(v) - self.lo) / (self.hi - self.lo)))

    def color(self, v: float | None) -> str:
        """The fill of a diverged node whose measure is ``v``."""
        if v is None:
            return RAMP[0]
        if v == math.inf:
            return INFINITE
        return interpolate(RAMP, self.position(v))

    @property
    def description(self) -> str:
        return METRICS[self.metric][0]


def interpolate(stops: list[str], t: float) -> str:
    """The colour at ``t`` (0..1) along evenly spaced ``stops``."""
    t = min(1.0, max(0.0, t)) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    a, b = _rgb(stops[i]), _rgb(stops[i + 1])
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b))


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return int(hex_color[1:3], 16), int(hex_color[3:5], 16), int(hex_color[5:7], 16)


def text_color(fill: str) -> str:
    """Black or white, whichever reads better on ``fill``."""
    r, g, b = _rgb(fill)
    return "#ffffff" if 0.299 * r + 0.587 * g + 0.114 * b < 140 else "#111111"


def fmt(x: float | None) -> str:
    """A measure in 3 significant digits."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if x == math.inf:
        return "inf"
    return f"{x:.3g}"
