"""The user's overrides for what the matcher cannot settle, and the YAML/JSON file that holds them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import yaml

from ..errors import FxdiffError
from ..model.alignment import ParamPair


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
        try:
            with open(path) as f:
                doc = yaml.safe_load(f) if is_yaml else json.load(f)
        except FileNotFoundError:
            raise FxdiffError(f"map file {path}: file not found") from None
        except OSError as e:
            raise FxdiffError(f"map file {path}: cannot be read ({e.strerror})") from None
        except (ValueError, yaml.YAMLError) as e:
            raise FxdiffError(f"map file {path}: not valid {'YAML' if is_yaml else 'JSON'} ({e})") from None
        if not isinstance(doc, dict) or not set(doc) <= {"modules", "params"}:
            raise FxdiffError(f"map file {path}: expected a mapping with keys 'modules' and/or 'params'")
        modules = []
        for item in doc.get("modules") or []:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise FxdiffError(f"map file {path}: each 'modules' entry is [ref_regex, cand_path], got {item!r}")
            try:
                re.compile(item[0])
            except re.error as e:
                raise FxdiffError(f"map file {path}: bad regex {item[0]!r} ({e})") from None
            modules.append((str(item[0]), str(item[1])))
        params = []
        for ref_name, value in (doc.get("params") or {}).items():
            if isinstance(value, str):
                params.append(ParamPair(ref_name, (value,), {"kind": "identity"}, "user map"))
            elif isinstance(value, dict) and "cand" in value:
                cand = value["cand"] if isinstance(value["cand"], list) else [value["cand"]]
                params.append(ParamPair(ref_name, tuple(cand), value.get("transform", {"kind": "identity"}),
                                        "user map"))
            else:
                raise FxdiffError(f"map file {path}: params.{ref_name}: expected a name or {{cand, transform}}")
        return cls(modules, params)
