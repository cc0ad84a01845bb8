"""The user's overrides for what the matcher cannot settle, and the YAML/JSON file that holds them."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from ..errors import FxdiffError
from ..model.alignment import ParamPair
from ..util import read_regular


@dataclass
class UserMap:
    """Overrides for what the matcher cannot settle: module-path regexes and parameter pairs.

    ``modules`` holds ``(ref_regex, cand_replacement)``: a reference module path matching the regex,
    rewritten with ``re.sub``, names the candidate module whose ops pair with it in order.
    """

    modules: list[tuple[str, str]] = field(default_factory=list)
    params: list[ParamPair] = field(default_factory=list)

    @classmethod
    def load(cls, path: str) -> UserMap:
        """Read a YAML or JSON mapping file (see the README for its shape)."""
        is_yaml = path.endswith((".yaml", ".yml"))
        text = read_regular(path, f"map file {path}")
        try:
            doc = yaml.safe_load(text) if is_yaml else json.loads(text)
        except (ValueError, yaml.YAMLError, RecursionError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]   # YAML's own message spans lines
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or first
            raise FxdiffError(f"map file {path}: not valid {'YAML' if is_yaml else 'JSON'} ({problem}{at})") from None
        if not isinstance(doc, dict) or not set(doc) <= {"modules", "params"}:
            raise FxdiffError(f"map file {path}: expected a mapping with keys 'modules' and/or 'params'")
        if not isinstance(doc.get("modules") or [], list) or not isinstance(doc.get("params") or {}, dict):
            raise FxdiffError(f"map file {path}: 'modules' is a list of [ref_regex, cand_path] and 'params' a "
                              "mapping of reference parameter names")
        modules = []
        for item in doc.get("modules") or []:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise FxdiffError(f"map file {path}: each 'modules' entry is [ref_regex, cand_path], "
                                  f"got {str(item)[:80]}")
            try:
                re.compile(item[0])
            except (re.error, RecursionError, OverflowError) as e:
                raise FxdiffError(f"map file {path}: bad regex {item[0][:80]!r} ({e})") from None
            modules.append((str(item[0]), str(item[1])))
        params = []
        for ref_name, value in (doc.get("params") or {}).items():
            where = f"map file {path}: params.{str(ref_name)[:80]}"
            if not isinstance(ref_name, str):
                raise FxdiffError(f"{where}: a parameter name is a string")
            if isinstance(value, str):
                params.append(ParamPair(ref_name, (value,), {"kind": "identity"}, "user map"))
            elif isinstance(value, dict) and "cand" in value and set(value) <= {"cand", "transform"}:
                cand = value["cand"] if isinstance(value["cand"], list) else [value["cand"]]
                if not cand or not all(isinstance(c, str) for c in cand):
                    raise FxdiffError(f"{where}: cand is a candidate parameter name or a list of them")
                transform = value.get("transform", {"kind": "identity"})
                _check_transform(transform, len(cand), where)
                params.append(ParamPair(ref_name, tuple(cand), transform, "user map"))
            else:
                raise FxdiffError(f"{where}: expected a name or {{cand, transform}}")
        return cls(modules, params)


# transform kind -> its fields and their checks (see fxdiff/params/correspond.py)
def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TRANSFORMS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "identity": {}, "transpose": {}, "concat": {},
    "reshape": {"shape": lambda v: _ints(v) and all(i >= 0 for i in v)},
    "rows": {"start": lambda v: _int(v) and v >= 0, "stop": lambda v: _int(v) and v >= 0},
    "permute_rows": {"index": lambda v: _ints(v) and sorted(v) == list(range(len(v)))},
    "offset": {"value": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)},
}


def _check_transform(t: Any, parts: int, where: str, depth: int = 0) -> None:
    """Refuse a transform that is not one ``apply_transform`` knows, with the fields it needs."""
    if not isinstance(t, dict) or not isinstance(t.get("kind", "identity"), str):
        raise FxdiffError(f"{where}: transform is a mapping with a 'kind'")
    kind = t.get("kind", "identity")
    if kind == "chain" and depth == 0:
        steps = t.get("steps")
        if not isinstance(steps, list) or not steps or set(t) != {"kind", "steps"}:
            raise FxdiffError(f"{where}: a chain transform has a non-empty list of steps")
        for i, step in enumerate(steps):
            _check_transform(step, parts if i == 0 else 1, where, depth + 1)
        return
    fields = _TRANSFORMS.get(kind)
    if fields is None:
        raise FxdiffError(f"{where}: unknown transform kind {kind[:40]!r}; expected one of "
                          f"{', '.join(list(_TRANSFORMS) + ['chain'])}")
    bad = [f for f, ok in fields.items() if f not in t or not ok(t[f])] + sorted(set(t) - {"kind", *fields})
    if bad:
        raise FxdiffError(f"{where}: transform {kind!r} needs {', '.join(fields) or 'no fields'}; "
                          f"check {', '.join(map(str, bad))}")
    if kind == "rows" and t["start"] >= t["stop"]:
        raise FxdiffError(f"{where}: transform 'rows' needs start < stop")
    if parts > 1 and kind != "concat":
        raise FxdiffError(f"{where}: {parts} candidate parameters need a 'concat' transform (first in a chain)")
