"""The shape of a saved report (``compare --json``), checked before a report is rebuilt from it:
``render`` and ``view`` draw whatever a report holds, so a field of the wrong type is refused here,
naming it, instead of failing deep in the drawing code.

Only the fields present are checked, besides those the drawing code cannot do without
(``Report.from_dict`` says which others are required), so a report with fields added by a later
version still loads where their types agree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import FxdiffError

NUM = "number"          # an int or float, or a non-finite float written as "inf", "-inf", "nan"
ANY = "anything"
REQUIRED = "!required"  # in an object's spec: the fields it must have (the drawing code indexes them)


class _Map:
    """A mapping from string keys to values of one spec."""

    def __init__(self, values: Any):
        self.values = values


_METRICS = {"passed": bool, "max_abs_diff": NUM, "max_rel_diff": NUM, "mean_abs_diff": NUM, "cosine": (NUM, None),
            "ref_rms": NUM, "mismatched": int, "numel": int, "note": str, "histogram": [int], "rms_diff": NUM,
            "cand_rms": NUM, "eps": NUM, "error": (NUM, None), "noise": (NUM, None)}
_SHAPE = ([int], None)
_NODE = {"ref_node": str, "cand_node": str, "ref_module": str, "cand_module": str, "op": str, "ref_shape": _SHAPE,
         "cand_shape": _SHAPE, "forward": (_METRICS, None), "backward": (_METRICS, None), "rationale": str,
         "confidence": NUM, "depth": int, "first_forward": bool, "first_backward": bool, "ref_slice": _SHAPE,
         "cand_slice": _SHAPE, "cand_permuted": bool, "ref_block": [str], "cand_block": [str],
         "isolated": (_METRICS, None), "isolated_why": (str, None), "blame": ([str], None), "consequence": bool,
         "isolated_backward": (_METRICS, None), "isolated_backward_why": (str, None), "explained": [str]}
_PARAM = {"ref": str, "cand": [str], "transform": _Map(ANY), "evidence": str, "grad": (_METRICS, None),
          "value": (_METRICS, None), "grad_uncompared": (str, None)}
_OUTPUT = {REQUIRED: ("ref", "metrics"), "ref": str, "cand": (str, None), "metrics": _METRICS,
           "frontier": ({REQUIRED: ("ref_node", "cand_node", "ref_module", "cand_module", "op", "unpaired_ops"),
                         "ref_node": str, "cand_node": str, "ref_module": str, "cand_module": str, "op": str,
                         "unpaired_ops": {"ref": [str], "cand": [str]}}, None)}
_GRAPH_NODE = {REQUIRED: ("name",), "name": str, "op": str, "kind": str, "target": str, "module": str, "shape": _SHAPE,
               "dtype": (str, None), "inputs": [str]}
_UNMATCHED_NODE = {REQUIRED: ("node",), "node": str, "module": str, "op": str, "shape": _SHAPE, "reason": str}
_UNMATCHED = {"ref": [_UNMATCHED_NODE], "cand": [_UNMATCHED_NODE], "ref_params": [str], "cand_params": [str],
              "ref_outputs": [str], "cand_outputs": [str], "trained_ref_params": [str], "trained_cand_params": [str], "ref_inputs": [str]}
_SIDE = {"label": str, "modules": _Map(str)}
REPORT = {"ref": _SIDE, "cand": _SIDE, "tolerance": {"atol": (NUM, None), "rtol": (NUM, None)},
          "outputs": [_OUTPUT], "nodes": [_NODE], "params": [_PARAM], "unmatched": _UNMATCHED,
          "graph": {"ref": [_GRAPH_NODE], "cand": [_GRAPH_NODE]}, "warnings": [str]}


def check(doc: dict[str, Any], path: str | Path) -> None:
    """Raise ``FxdiffError`` naming ``path`` and the first field of ``doc`` of the wrong type."""
    where = _mismatch(doc, REPORT, "")
    if where is not None:
        raise FxdiffError(f"{path}: malformed report: {where}")


def _mismatch(value: Any, spec: Any, at: str) -> str | None:
    """Where ``value`` departs from ``spec`` (a description), or None when it fits."""
    if isinstance(spec, tuple):
        misses = [_mismatch(value, s, at) for s in spec]
        if None in misses:
            return None
        alike = [m for s, m in zip(spec, misses)   # the complaint of the alternative of the value's own kind
                 if isinstance(value, dict) and isinstance(s, (dict, _Map))
                 or isinstance(value, list) and isinstance(s, list)]
        return (alike or misses)[0]
    if spec is None:
        return None if value is None else f"{at or 'the report'} is {_kind(value)}"
    if spec is ANY:
        return None
    if spec is NUM:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or \
            (isinstance(value, str) and value.lower() in ("inf", "-inf", "+inf", "nan", "infinity", "-infinity"))
        return None if ok else f"{at} is {_kind(value)}, expected a number"
    if spec in (bool, int, str):
        ok = isinstance(value, spec) and (spec is bool or not isinstance(value, bool))
        return None if ok else f"{at} is {_kind(value)}, expected {spec.__name__}"
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{at} is {_kind(value)}, expected a list"
        for i, item in enumerate(value):
            miss = _mismatch(item, spec[0], f"{at}[{i}]")
            if miss is not None:
                return miss
        return None
    if not isinstance(value, dict):
        return f"{at or 'the report'} is {_kind(value)}, expected an object"
    if isinstance(spec, _Map):
        for key, item in value.items():
            miss = _mismatch(item, spec.values, f"{at}.{key}")
            if miss is not None:
                return miss
        return None
    for key in spec.get(REQUIRED, ()):
        if key not in value:
            return f"{at} has no {key}"
    for key, item_spec in spec.items():
        if key != REQUIRED and key in value:
            miss = _mismatch(value[key], item_spec, f"{at}.{key}" if at else key)
            if miss is not None:
                return miss
    return None


def _kind(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return type(value).__name__ if value is not None else "null"
