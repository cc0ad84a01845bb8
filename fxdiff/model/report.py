"""The result of a comparison: plain dataclasses, and their JSON form (``fxdiff-report``).

A ``Report`` holds everything the renderers need, including both graphs' structure, so a saved
report can be drawn later without the captures.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import FxdiffError
from ..util import atomic_write, dumps, read_regular, to_float
from . import report_doc

FORMAT = "fxdiff-report"
VERSION = 1


@dataclasses.dataclass
class Metrics:
    """How one candidate tensor differs from its reference tensor."""

    passed: bool
    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    cosine: float | None
    ref_rms: float
    mismatched: int               # elements outside the tolerance
    numel: int
    note: str = ""                # e.g. "shape (2, 3) vs (3, 2)", "gradient on ref only"
    histogram: list[int] = dataclasses.field(default_factory=list)  # see HIST_EDGES
    rms_diff: float = 0.0         # RMS of cand - ref
    max_scaled_diff: float = 0.0  # max of |cand - ref| / max(|ref|, RMS): the worst element, at its own scale
    cand_rms: float = 0.0
    eps: float = 0.0              # machine epsilon of the coarser of the two dtypes (0: exact dtypes)
    # noise-aware verdicts: the relative error measured (RMS of the difference over the tensors' RMS)
    # and the noise level it was judged against; None under a strict --atol/--rtol
    error: float | None = None
    noise: float | None = None

    @property
    def within_noise(self) -> bool:
        """Passed, though not bit for bit: the difference is within the noise level."""
        return self.passed and self.max_abs_diff > 0 and self.noise is not None


_FLOAT_FIELDS = ("max_abs_diff", "max_rel_diff", "mean_abs_diff", "cosine", "ref_rms", "rms_diff", "cand_rms", "eps",
                 "error", "noise", "max_scaled_diff")

LIVE_ELEMENTS = "compared where some output depends on it"   # a Metrics.note: elements no output reads set aside

# Metrics.histogram[0] counts |diff| == 0; bin k >= 1 counts [HIST_EDGES[k], HIST_EDGES[k+1]), the
# first decade also holding anything below 1e-12 and the last anything from 10 up.
HIST_EDGES = [0.0] + [10.0 ** e for e in range(-12, 2)]


@dataclasses.dataclass
class NodeRow:
    """One matched pair of nodes and how their forward values and gradients compare."""

    ref_node: str
    cand_node: str
    ref_module: str
    cand_module: str
    op: str
    ref_shape: list[int] | None
    cand_shape: list[int] | None
    forward: Metrics | None
    backward: Metrics | None      # None: no gradient on either side
    rationale: str
    confidence: float
    depth: int                    # position in the reference's topological order
    first_forward: bool = False
    first_backward: bool = False
    ref_slice: list[int] | None = None    # [start, stop] of the last dim compared (fused outputs)
    cand_slice: list[int] | None = None
    cand_permuted: bool = False           # the candidate's features compared in the reference's order
    ref_block: list[str] = dataclasses.field(default_factory=list)   # nodes folded into a block match
    cand_block: list[str] = dataclasses.field(default_factory=list)
    # first forward divergences only: the candidate's block replayed on the reference's inputs, or
    # why it could not be (naming the node and op that stopped it)
    isolated: Metrics | None = None
    isolated_why: str | None = None
    # first forward divergences only: an op on one side only between this row and its compared
    # inputs, which the divergence is blamed on: (what, reference module, candidate module)
    blame: list[str] | None = None
    # first backward divergences only: a forward divergence at this node or after it explains it;
    # the candidate's ops differentiated back from the reference's gradients at their consumers, or
    # why they could not be
    consequence: bool = False
    isolated_backward: Metrics | None = None
    isolated_backward_why: str | None = None
    # "forward", "backward": a difference past the noise level that the replays explain as rounding
    # carried by the same computation on both sides (``cause``, ``backward_cause``); judged within
    # noise (under --atol/--rtol it still fails)
    explained: list[str] = dataclasses.field(default_factory=list)

    def cause(self) -> str | None:
        """What the isolated replay says of a first divergence: ``introduced`` when the candidate's
        block alone, fed the reference's inputs, already differs; ``amplified`` when it reproduces
        the reference, so inputs within tolerance were amplified; None when not replayed."""
        if self.isolated is None:
            return None
        return "amplified" if self.isolated.passed else "introduced"

    def backward_cause(self) -> str | None:
        """What differentiating the candidate's ops back from the reference's gradients says of a
        backward first divergence: ``introduced`` when that derivative differs from the reference;
        when it agrees, ``amplified`` if the candidate's recorded gradient is the same ops' derivative
        at its own forward values (which, within noise, moved a kink: relu's mask, a max), else
        ``custom backward`` (its own backward is not that derivative); None when not replayed."""
        if self.isolated_backward is None:
            return None
        if not self.isolated_backward.passed:
            return "introduced"
        return "amplified" if "backward" in self.explained else "custom backward"


@dataclasses.dataclass
class ParamRow:
    """A parameter correspondence and how the parameter gradients compare."""

    ref: str
    cand: list[str]
    transform: dict
    evidence: str
    grad: Metrics | None
    value: Metrics | None = None
    # why a gradient the reference has was not compared (``grad`` None), e.g. seeded from an output
    # the other side does not have
    grad_uncompared: str | None = None


@dataclasses.dataclass
class OutputRow:
    """A pair of model outputs (leaf paths, see ``outputs.py``) and how the candidate's differs."""

    ref: str
    cand: str | None      # None only in reports of early versions, which paired outputs by position
    metrics: Metrics
    # a first forward divergence: it differs although every compared value it depends on matches.
    # The nodes that made it (ref_node, cand_node, ref_module, cand_module, op), the ops between
    # those values and it that pair with nothing (unpaired_ops: {"ref": [node...], "cand": [node...]})
    # and, where a story fits, blame: [what, reference module, candidate module]
    frontier: dict[str, Any] | None = None


@dataclasses.dataclass
class UnmatchedNode:
    """A node with no counterpart on the other side, and why."""

    node: str
    module: str = ""
    op: str = ""
    shape: list[int] | None = None
    reason: str = ""


@dataclasses.dataclass
class Unmatched:
    """What found no counterpart on the other side, and which of it could not be compared at all."""

    ref: list[UnmatchedNode] = dataclasses.field(default_factory=list)     # nodes
    cand: list[UnmatchedNode] = dataclasses.field(default_factory=list)
    ref_params: list[str] = dataclasses.field(default_factory=list)        # parameters and buffers
    cand_params: list[str] = dataclasses.field(default_factory=list)
    ref_outputs: list[str] = dataclasses.field(default_factory=list)       # output leaf paths
    cand_outputs: list[str] = dataclasses.field(default_factory=list)
    trained_ref_params: list[str] = dataclasses.field(default_factory=list)   # of ref_params: with a gradient
    trained_cand_params: list[str] = dataclasses.field(default_factory=list)  # of cand_params: with a gradient
    ref_inputs: list[str] = dataclasses.field(default_factory=list)        # of ref: the model's inputs

    @classmethod
    def from_dict(cls, doc: dict[str, list]) -> "Unmatched":
        """Read the JSON form; keys it does not know (a later version's) are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        lists = {k: list(v) for k, v in doc.items() if k in known}
        for side in ("ref", "cand"):
            lists[side] = [_known(UnmatchedNode, u) for u in lists.get(side, [])]
        return cls(**lists)


@dataclasses.dataclass
class Report:
    """Everything ``fxdiff compare`` found; ``diverged`` is the verdict."""

    ref: dict[str, Any]
    cand: dict[str, Any]
    tolerance: dict[str, float]
    outputs: list[OutputRow]
    nodes: list[NodeRow]
    params: list[ParamRow]
    unmatched: Unmatched
    graph: dict[str, list[dict[str, Any]]]       # structure of both graphs, for rendering
    warnings: list[str] = dataclasses.field(default_factory=list)   # setup differences worth knowing
    # random ops of a live candidate that took the reference's draw: {ref_node, cand_node, op, ref_module,
    # cand_module, call (the candidate's k-th random call)}
    replayed: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def forward_output_match(self) -> bool:
        return all(o.metrics.passed for o in self.outputs)

    @property
    def diverged(self) -> bool:
        """True when any output, node value, gradient, parameter or parameter gradient differs, or
        a trained reference parameter found no counterpart (it could not be compared). Inputs and
        outputs on one side only are listed: call conventions differ (a mask against lengths)."""
        s = self.summary()
        return (not s["forward_output_match"] or s["param_grads"]["mismatched"] > 0
                or s["param_values"]["mismatched"] > 0 or s["uncompared"]["trained_ref_params"] > 0
                or s["nodes"]["forward_mismatches"] > 0 or s["nodes"]["backward_mismatches"] > 0)

    @property
    def verdict(self) -> str:
        """``"diverged"``; ``"within noise"`` when every difference is within its noise level but
        some tensors are not bit for bit equal; ``"match"`` when none differs at all."""
        if self.diverged:
            return "diverged"
        metrics = [m for r in self.nodes for m in (r.forward, r.backward)] + [o.metrics for o in self.outputs]
        metrics += [m for p in self.params for m in (p.grad, p.value)]
        return "within noise" if any(m is not None and m.within_noise for m in metrics) else "match"

    def first_divergence(self) -> dict[str, list[dict[str, Any]]]:
        """The earliest mismatching nodes, forward and backward, whose matched inputs all match.
        ``ref_module`` and ``cand_module`` say where the divergence starts: the modules its story
        blames (an op one side alone has, in a module before the node), else the node's own, which
        ``ref_node_module`` and ``cand_node_module`` always give."""
        def entry(row: NodeRow, m: Metrics) -> dict[str, Any]:
            return {"ref_node": row.ref_node, "cand_node": row.cand_node,
                    "ref_module": row.blame[1] if row.blame else row.ref_module,
                    "cand_module": row.blame[2] if row.blame else row.cand_module,
                    "ref_node_module": row.ref_module, "cand_node_module": row.cand_module, "op": row.op,
                    "max_abs_diff": m.max_abs_diff, "max_rel_diff": m.max_rel_diff, "cosine": m.cosine,
                    "error": m.error, "noise": m.noise, "isolated": row.cause(), "not_isolated": row.isolated_why,
                    "blame": row.blame[0] if row.blame else None}
        return {
            "forward": [entry(r, r.forward) for r in self.nodes if r.first_forward]
            + [{**o.frontier, **_frontier_blame(o.frontier), "output": o.ref,
                "max_abs_diff": o.metrics.max_abs_diff, "max_rel_diff": o.metrics.max_rel_diff,
                "cosine": o.metrics.cosine, "error": o.metrics.error, "noise": o.metrics.noise, "isolated": None,
                "not_isolated": None}
               for o in self.outputs if o.frontier],
            "backward": [{**entry(r, r.backward), "consequence_of_forward": r.consequence,
                          "isolated": r.backward_cause(), "not_isolated": r.isolated_backward_why}
                         for r in self.nodes if r.first_backward],
        }

    def summary(self) -> dict[str, Any]:
        """Counts and match rates. ``tensors`` counts the reference's parameters and buffers:
        ``trained`` (a gradient on either side; the parameter gradients compared plus the trained
        ones without a counterpart) and ``buffers_or_frozen`` (no gradient) add up to ``total``;
        ``unpaired`` of them found no counterpart."""
        fwd = [r.forward for r in self.nodes if r.forward is not None]
        bwd = [r.backward for r in self.nodes if r.backward is not None]
        grads = [p.grad for p in self.params if p.grad is not None]
        ok = sum(g.passed for g in grads)
        values = [p.value for p in self.params if p.value is not None]
        unpaired = len(self.unmatched.ref_params)
        uncompared = sum(p.grad is None and p.grad_uncompared is not None for p in self.params)
        trained = len(grads) + uncompared + len(self.unmatched.trained_ref_params)
        return {
            "forward_output_match": self.forward_output_match,
            "tensors": {"total": len(self.params) + unpaired, "trained": trained,
                        "buffers_or_frozen": len(self.params) + unpaired - trained, "unpaired": unpaired},
            "param_grads": {"matched": ok, "mismatched": len(grads) - ok,
                            "match_rate": ok / len(grads) if grads else 1.0},
            "param_values": {"compared": len(values), "mismatched": sum(not v.passed for v in values)},
            "uncompared": {"trained_ref_params": len(self.unmatched.trained_ref_params), "param_grads": uncompared,
                           "ref_inputs": len(self.unmatched.ref_inputs),
                           "ref_outputs": len(self.unmatched.ref_outputs),
                           "cand_outputs": len(self.unmatched.cand_outputs)},
            "nodes": {
                "pairs": len(self.nodes),
                "forward_matches": sum(m.passed for m in fwd),
                "forward_mismatches": sum(not m.passed for m in fwd),
                "backward_matches": sum(m.passed for m in bwd),
                "backward_mismatches": sum(not m.passed for m in bwd),
                "forward_match_rate": sum(m.passed for m in fwd) / len(fwd) if fwd else 1.0,
                "backward_match_rate": sum(m.passed for m in bwd) / len(bwd) if bwd else 1.0,
                "unmatched_ref": len(self.unmatched.ref),
                "unmatched_cand": len(self.unmatched.cand),
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written by ``compare --json``."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "verdict": self.verdict,
            "ref": self.ref,
            "cand": self.cand,
            "tolerance": self.tolerance,
            "summary": self.summary(),
            "first_divergence": self.first_divergence(),
            "outputs": [dataclasses.asdict(o) for o in self.outputs],
            "nodes": [dataclasses.asdict(r) for r in self.nodes],
            "params": [dataclasses.asdict(p) for p in self.params],
            "unmatched": dataclasses.asdict(self.unmatched),
            "graph": self.graph,
            "warnings": self.warnings,
            "replayed": self.replayed,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON report atomically."""
        return atomic_write(path, dumps(self.to_dict(), default=str))

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "Report":
        """Rebuild a report from its JSON document (fields a later version added are left out)."""
        def metrics(d):
            if not d:
                return None
            floats = {k: to_float(d[k]) for k in _FLOAT_FIELDS if k in d}
            return _known(Metrics, {**d, **floats})
        return cls(
            ref=doc["ref"], cand=doc["cand"], tolerance=doc["tolerance"],
            outputs=[OutputRow(ref=o["ref"], cand=o.get("cand"), metrics=metrics(o["metrics"]),
                               frontier=o.get("frontier")) for o in doc["outputs"]],
            nodes=[_known(NodeRow, {**r, "forward": metrics(r["forward"]), "backward": metrics(r["backward"]),
                                    "isolated": metrics(r.get("isolated")),
                                    "isolated_backward": metrics(r.get("isolated_backward"))})
                   for r in doc["nodes"]],
            params=[_known(ParamRow, {**p, "grad": metrics(p["grad"]), "value": metrics(p.get("value"))})
                    for p in doc["params"]],
            unmatched=Unmatched.from_dict(doc["unmatched"]), graph=doc["graph"],
            warnings=list(doc.get("warnings", [])), replayed=list(doc.get("replayed", [])),
        )


def _frontier_blame(frontier: dict[str, Any]) -> dict[str, Any]:
    """An output frontier's story for ``first_divergence``: its text, and the modules it blames."""
    blame = frontier.get("blame")
    if not blame:
        return {"blame": None}
    return {"blame": blame[0], "ref_module": blame[1], "cand_module": blame[2],
            "ref_node_module": frontier["ref_module"], "cand_node_module": frontier["cand_module"]}


def _known(cls: type, fields: dict[str, Any]) -> Any:
    """``cls(**fields)`` without the fields ``cls`` does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in names})


def load_report(path: str | os.PathLike) -> Report:
    """Read a report written by ``Report.save`` / ``compare --json``."""
    if not str(path):
        raise FxdiffError("report path is empty: give the JSON file compare --json wrote")
    path = Path(path)
    if not os.path.lexists(path):
        raise FxdiffError(f"{path}: report not found")
    try:
        doc = json.loads(read_regular(path, f"report {path}"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FxdiffError(f"{path}: not a JSON report ({(str(e).strip().splitlines() or [type(e).__name__])[0]})") \
            from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FxdiffError(f"{path}: not an {FORMAT} document")
    version = doc.get("version")
    if type(version) is not int or not 1 <= version <= VERSION:
        raise FxdiffError(f"{path}: report version {version!r}; this fxdiff reads versions 1 to {VERSION}")
    report_doc.check(doc, path)
    try:
        return Report.from_dict(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FxdiffError(f"{path}: malformed report ({type(e).__name__}: {e})") from None
