"""Align two captures whose module names and op decompositions may differ.

``GraphMatcher(ref, cand).match()`` returns an ``Alignment`` (see ``alignment.py``), much as
``difflib.SequenceMatcher`` returns opcodes. The stages:

1. **Canonicalise.** Op keys from ``ops.py``; transparent ops (view, transpose, getitem...) are
   contracted into their producer, leaving a networkx DiGraph of computing nodes per side.
2. **Hard anchors.** Graph inputs by value; parameters by content (``params.correspond``), and the
   op consuming an anchored parameter with it, including 1:k blocks (one fused qkv projection
   against separate q, k, v: the pair compares a slice of the fused output); same module paths
   when both sides share their names; a user map (regexes on module paths) on top.
3. **Soft anchors.** Between consecutive hard anchors, recursive patience alignment: keys unique
   in both windows, longest order-consistent chain, recursion into the gaps with weaker keys
   (op key, size, integer indices of module paths, op ordinal, Weisfeiler-Lehman hash of the
   predecessors).
4. **Gaps.** Small leftover windows go to ``difflib.SequenceMatcher`` on op keys; a replaced run of
   different ops whose last outputs agree in size becomes one many-to-many block.

Values are never used to accept or reject a structural match: they stop agreeing after the point
of divergence, which is exactly where a comparison needs the alignment most.
"""

from __future__ import annotations

import bisect
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch.fx
from scipy.optimize import linear_sum_assignment

from .alignment import Alignment, Pair, ParamPair
from .capture import MODULE, SHAPE, TARGET, Capture
from .errors import FxdiffError
from .ops import TRANSPARENT, op_key
from .params import correspond, output_slice

__all__ = ["Alignment", "GraphMatcher", "Pair", "ParamPair", "UserMap", "match", "node_key"]

_SMALL_GAP = 64     # windows up to this size get the difflib pass
_INT = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def node_key(node: torch.fx.Node) -> str:
    """The canonical op key of a node: ``input`` for placeholders, ``param`` / ``constant`` for
    get_attr, and for one output of a multi-output op the key of that op."""
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "constant" if str(node.target).startswith("_fxdiff_constant") else "param"
    target = node.meta.get(TARGET, str(node.target))
    if target == "operator.getitem" and node.args and isinstance(node.args[0], torch.fx.Node):
        return node_key(node.args[0])
    return op_key(target)


@dataclass
class UserMap:
    """Overrides for what the matcher cannot settle: module-path regexes and parameter pairs.

    ``modules`` holds ``(ref_regex, cand_replacement)``: a reference module path matching the regex,
    rewritten with ``re.sub``, names the candidate module whose ops pair with it in order.
    """

    modules: list[tuple[str, str]] = field(default_factory=list)
    params: list[ParamPair] = field(default_factory=list)

    @classmethod
    def load(cls, path: str) -> "UserMap":
        """Read a YAML or JSON mapping file (see the README for its shape)."""
        import json

        import yaml
        try:
            with open(path) as f:
                doc = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
        except FileNotFoundError:
            raise FxdiffError(f"--map {path}: file not found") from None
        except (ValueError, yaml.YAMLError) as e:
            raise FxdiffError(f"--map {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} ({e})") from None
        if not isinstance(doc, dict) or not set(doc) <= {"modules", "params"}:
            raise FxdiffError(f"--map {path}: expected a mapping with keys 'modules' and/or 'params'")
        modules = []
        for item in doc.get("modules") or []:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise FxdiffError(f"--map {path}: each 'modules' entry is [ref_regex, cand_path], got {item!r}")
            try:
                re.compile(item[0])
            except re.error as e:
                raise FxdiffError(f"--map {path}: bad regex {item[0]!r} ({e})") from None
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
                raise FxdiffError(f"--map {path}: params.{ref_name}: expected a name or {{cand, transform}}")
        return cls(modules, params)


class _Side:
    """One capture reduced to its computing nodes, in topological order, with their features."""

    def __init__(self, capture: Capture):
        self.capture = capture
        self.root: dict[str, str] = {}        # every value node -> the computing node it aliases
        self.members: dict[str, list[str]] = defaultdict(list)  # computing node -> its aliases
        self.order: list[str] = []            # computing nodes
        self.key: dict[str, str] = {}
        self.numel: dict[str, int] = {}
        self.module: dict[str, str] = {}
        self.param_users: dict[str, list[str]] = defaultdict(list)
        self.param_order: list[str] = []
        self.graph = nx.DiGraph()
        values = capture.values
        for node in capture.graph.nodes:
            if node.op == "get_attr" and node.name not in values:
                self.param_order.append(str(node.target))
                continue
            if node.name not in values:
                continue
            key = node_key(node)
            inputs = [a for a in node.all_input_nodes if a.name in self.root]
            if key in TRANSPARENT and len(inputs) == 1:
                base = self.root[inputs[0].name]
                self.root[node.name] = base
                self.members[base].append(node.name)
                continue
            name = node.name
            self.root[name] = name
            self.members[name].append(name)
            self.order.append(name)
            self.key[name] = key
            shape = node.meta.get(SHAPE) or []
            self.numel[name] = _prod(shape)
            self.module[name] = node.meta.get(MODULE, "")
            self.graph.add_node(name, label=key)
            for a in inputs:
                self.graph.add_edge(self.root[a.name], name)
            for param in _params_used(node):
                self.param_users[param].append(name)
        self.pos = {n: i for i, n in enumerate(self.order)}
        self.ints = {n: tuple(int(m) for m in _INT.findall(self.module[n])) for n in self.order}
        counts: Counter = Counter()
        self.ordinal, self.ordinal_sized = {}, {}
        for n in self.order:
            k = (self.module[n], self.key[n])
            self.ordinal[n] = counts[k]
            counts[k] += 1
            self.ordinal_sized[n] = counts[k + (self.numel[n],)]
            counts[k + (self.numel[n],)] += 1
        with warnings.catch_warnings():  # networkx warns that directed hashes changed in 3.5
            warnings.simplefilter("ignore", UserWarning)
            hashes = nx.weisfeiler_lehman_subgraph_hashes(self.graph.reverse(copy=False), node_attr="label",
                                                          iterations=2, digest_size=8)
        self.wl = {n: hashes.get(n, ["", ""]) for n in self.order}

    def features(self, n: str, level: int) -> tuple:
        """The matching key of computing node ``n`` at strictness ``level`` (0 strictest).

        Level 0 uses module paths and is only used when both sides share their names.
        """
        base = (self.key[n], self.numel[n])
        if level == 0:
            return base + (self.module[n], self.ordinal_sized[n], self.wl[n][0])
        if level == 1:
            return base + (self.ints[n], self.ordinal[n] if self.module[n] else -1, self.wl[n][1])
        if level == 2:
            return base + (self.ints[n], self.wl[n][0])
        if level == 3:
            return base + (self.ints[n],)
        if level == 4:
            return base
        return (self.key[n],)


_LEVELS = 6
_RATIONALE = ["same module path and op order"] + [f"patience alignment (level {k})" for k in range(1, _LEVELS)]
_CONFIDENCE = [1.0, 0.95, 0.9, 0.85, 0.8, 0.7]


def _prod(shape: Iterable[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _params_used(node: torch.fx.Node) -> list[str]:
    """Parameters a node reads, directly or through transparent ops on them (``weight.t()``)."""
    out = []
    for a in node.all_input_nodes:
        while a.op == "call_function" and node_key(a) in TRANSPARENT and a.all_input_nodes:
            a = a.all_input_nodes[0]
        if a.op == "get_attr" and not str(a.target).startswith("_fxdiff_constant"):
            out.append(str(a.target))
    return out


class GraphMatcher:
    """Aligns a candidate capture to a reference capture; call ``match()`` for the ``Alignment``."""

    def __init__(self, ref: Capture, cand: Capture, user_map: UserMap | None = None):
        self.ref, self.cand = _Side(ref), _Side(cand)
        self.user_map = user_map or UserMap()
        self._alignment: Alignment | None = None

    def match(self) -> Alignment:
        """Compute (once) and return the alignment."""
        if self._alignment is None:
            self._alignment = self._match()
        return self._alignment

    # -- stages ---------------------------------------------------------------------------------
    def _match(self) -> Alignment:
        r, c = self.ref, self.cand
        params, ref_left, cand_left = correspond(r.capture.params, c.capture.params, r.param_order,
                                                 c.param_order, self.user_map.params)
        anchors = self._input_anchors() + self._user_anchors() + self._param_anchors(params)
        chain = _longest_chain(anchors, r.pos, c.pos)
        pairs = list(chain)
        pairs += self._fill(chain)
        pairs = _dedupe(pairs)
        pairs.sort(key=lambda p: (r.pos[p.ref], c.pos[p.cand]))
        used_r, used_c = {p.ref for p in pairs}, {p.cand for p in pairs}
        return Alignment(
            pairs=pairs,
            params=params,
            unmatched_ref=[n for n in r.order if n not in used_r],
            unmatched_cand=[n for n in c.order if n not in used_c],
            unmatched_ref_params=ref_left,
            unmatched_cand_params=cand_left,
        )

    def _input_anchors(self) -> list[Pair]:
        """Graph inputs: identical values first, then equal shape and dtype, in order."""
        r, c = self.ref, self.cand
        ref_in = [n for n in r.order if r.key[n] == "input"]
        cand_in = [n for n in c.order if c.key[n] == "input"]
        out, free = [], list(cand_in)
        rv, cv = r.capture.values, c.capture.values
        for rule in ("identical value", "same shape and dtype"):
            for n in ref_in:
                if any(p.ref == n for p in out):
                    continue
                for m in free:
                    a, b = rv[n], cv[m]
                    same = a.shape == b.shape and a.dtype == b.dtype
                    if same and (rule != "identical value" or bool((a == b).all()) or
                                 (a.is_floating_point() and bool(a.isnan().any()) and bool(a.equal(b)))):
                        out.append(Pair(n, m, f"input: {rule}", 1.0 if rule == "identical value" else 0.6))
                        free.remove(m)
                        break
        return out

    def _same_names(self) -> bool:
        """Whether most reference module paths also exist in the candidate."""
        ref_mods = {m for m in self.ref.module.values() if m}
        return bool(ref_mods) and len(ref_mods & set(self.cand.module.values())) >= 0.5 * len(ref_mods)

    def _user_anchors(self) -> list[Pair]:
        if not self.user_map.modules:
            return []
        rules = [(re.compile(pattern), repl) for pattern, repl in self.user_map.modules]

        def rename(path: str) -> str | None:
            for pattern, repl in rules:
                if pattern.fullmatch(path):
                    return pattern.sub(repl, path)
            return None
        return self._pair_by_path(rename, "user map", 1.0)

    def _pair_by_path(self, rename, rationale: str, confidence: float) -> list[Pair]:
        r, c = self.ref, self.cand
        cand_keys = {(c.module[n], c.key[n], c.ordinal[n]): n for n in c.order if c.key[n] != "input"}
        out = []
        for n in r.order:
            if r.key[n] == "input":
                continue
            path = rename(r.module[n])
            if path is None:
                continue
            m = cand_keys.get((path, r.key[n], r.ordinal[n]))
            if m is not None:
                out.append(Pair(n, m, rationale, confidence))
        return out

    def _param_anchors(self, params: list[ParamPair]) -> list[Pair]:
        """The ops that consume corresponding parameters correspond too (in order of use)."""
        r, c = self.ref, self.cand
        out = []
        for pp in params:
            ref_users = r.param_users.get(pp.ref, [])
            if pp.transform.get("kind") == "concat":  # one fused reference op, k candidate ops
                offset = 0
                for name in pp.cand:
                    rows = c.capture.params[name].shape[0]
                    for ru, cu in zip(ref_users, c.param_users.get(name, [])):
                        if r.key[ru] == c.key[cu] == "linear":
                            out.append(Pair(ru, cu, f"parameter {pp.ref} = concat({', '.join(pp.cand)})",
                                            pp.confidence, ref_slice=(offset, offset + rows)))
                    offset += rows
                continue
            cand_users = c.param_users.get(pp.cand[0], [])
            block = output_slice(pp.transform)
            for ru, cu in zip(ref_users, cand_users):
                if block is not None:
                    if r.key[ru] == c.key[cu] == "linear":
                        out.append(Pair(ru, cu, f"parameter {pp.ref} = {pp.cand[0]}[{block[0]}:{block[1]}]",
                                        pp.confidence, cand_slice=block))
                elif r.numel[ru] == c.numel[cu]:
                    out.append(Pair(ru, cu, f"parameter {pp.ref} <-> {pp.cand[0]}", pp.confidence))
        return out

    def _fill(self, chain: list[Pair]) -> list[Pair]:
        """Align the windows between consecutive anchors of the chain."""
        r, c = self.ref, self.cand
        used_r = {p.ref for p in chain}
        used_c = {p.cand for p in chain}
        bounds = [(-1, -1)] + sorted({(r.pos[p.ref], c.pos[p.cand]) for p in chain}) + [(len(r.order), len(c.order))]
        out = []
        first_level = 0 if self._same_names() else 1
        for (r0, c0), (r1, c1) in zip(bounds, bounds[1:]):
            a = [n for n in r.order[r0 + 1:r1] if n not in used_r]
            b = [n for n in c.order[c0 + 1:c1] if n not in used_c]
            if a and b:
                out.extend(self._patience(a, b, first_level))
        return out

    def _patience(self, a: list[str], b: list[str], level: int) -> list[Pair]:
        r, c = self.ref, self.cand
        if not a or not b:
            return []
        if level == _LEVELS:
            return self._small_gap(a, b) if len(a) <= _SMALL_GAP and len(b) <= _SMALL_GAP else []
        ka = Counter(r.features(n, level) for n in a)
        kb = Counter(c.features(n, level) for n in b)
        index_b = {c.features(n, level): j for j, n in enumerate(b) if kb[c.features(n, level)] == 1}
        candidates = [(i, index_b[k]) for i, n in enumerate(a)
                      if ka[k := r.features(n, level)] == 1 and k in index_b]
        chain = _lis(candidates)
        if not chain:
            return self._patience(a, b, level + 1)
        out = [Pair(a[i], b[j], _RATIONALE[level], _CONFIDENCE[level]) for i, j in chain]
        bounds = [(-1, -1)] + chain + [(len(a), len(b))]
        for (i0, j0), (i1, j1) in zip(bounds, bounds[1:]):
            out.extend(self._patience(a[i0 + 1:i1], b[j0 + 1:j1], level))
        return out

    def _small_gap(self, a: list[str], b: list[str]) -> list[Pair]:
        """Look-alike ops (same key and size) paired by value closeness, kept in order; a run of
        different ops between them whose last outputs agree in size becomes one block."""
        r, c = self.ref, self.cand
        groups: dict[tuple, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for i, n in enumerate(a):
            groups[(r.key[n], r.numel[n])][0].append(i)
        for j, n in enumerate(b):
            groups[(c.key[n], c.numel[n])][1].append(j)
        candidates = []
        for ia, jb in groups.values():
            if ia and jb:
                cost = [[_value_distance(r.capture.values[a[i]], c.capture.values[b[j]]) for j in jb] for i in ia]
                rows, cols = linear_sum_assignment(cost)
                candidates += [(ia[x], jb[y]) for x, y in zip(rows, cols)]
        chain = _lis(sorted(candidates))
        out = [Pair(a[i], b[j], "look-alike ops, paired by value", 0.6) for i, j in chain]
        bounds = [(-1, -1)] + chain + [(len(a), len(b))]
        for (i0, j0), (i1, j1) in zip(bounds, bounds[1:]):
            if i1 - i0 > 2 and j1 - j0 > 2 and r.numel[a[i1 - 2]] == c.numel[b[j1 - 2]]:
                out.append(Pair(a[i1 - 2], b[j1 - 2], "block boundary (different decompositions)", 0.5,
                                ref_block=tuple(a[i0 + 1:i1 - 1]), cand_block=tuple(b[j0 + 1:j1 - 1])))
        return out


def _value_distance(x, y) -> float:
    """How unlike two tensors are (0 = equal), for breaking ties between look-alike ops."""
    x, y = x.detach().reshape(-1).double(), y.detach().reshape(-1).double()
    if x.numel() != y.numel():
        return 2.0
    scale = float(x.abs().max().clamp_min(1e-30)) if x.numel() else 1.0
    return min(float((x - y).abs().max()) / scale, 2.0) if x.numel() else 0.0


def _lis(pairs: list[tuple[int, int]], strict: bool = True) -> list[tuple[int, int]]:
    """Longest chain of ``pairs`` (sorted by the first coordinate) increasing in the second
    (non-decreasing when not ``strict``)."""
    find = bisect.bisect_left if strict else bisect.bisect_right
    tails: list[int] = []
    tails_idx: list[int] = []
    prev = [-1] * len(pairs)
    for k, (_, j) in enumerate(pairs):
        pos = find(tails, j)
        if pos == len(tails):
            tails.append(j)
            tails_idx.append(k)
        else:
            tails[pos] = j
            tails_idx[pos] = k
        prev[k] = tails_idx[pos - 1] if pos else -1
    out, k = [], tails_idx[-1] if tails_idx else -1
    while k >= 0:
        out.append(pairs[k])
        k = prev[k]
    return out[::-1]


def _longest_chain(anchors: list[Pair], rpos: dict[str, int], cpos: dict[str, int]) -> list[Pair]:
    """Anchors consistent with both topological orders; 1:k blocks share a position on one side."""
    groups: dict[tuple[int, int], list[Pair]] = defaultdict(list)
    for p in anchors:
        groups[(rpos[p.ref], cpos[p.cand])].append(p)
    return [p for point in _lis(sorted(groups), strict=False) for p in groups[point]]


def _dedupe(pairs: list[Pair]) -> list[Pair]:
    seen, out = set(), []
    for p in pairs:
        k = (p.ref, p.cand, p.ref_slice, p.cand_slice)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def match(ref: Capture, cand: Capture, user_map: UserMap | None = None) -> Alignment:
    """Align ``cand`` to ``ref``: shorthand for ``GraphMatcher(ref, cand, user_map).match()``."""
    return GraphMatcher(ref, cand, user_map).match()


def describe(alignment: Alignment) -> dict[str, Any]:
    """Counts of pairs by rationale, for reports and benchmarks."""
    return dict(Counter(p.rationale.split(" (")[0] for p in alignment.pairs))
