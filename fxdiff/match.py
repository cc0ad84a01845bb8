"""Align two captures whose module names and op decompositions may differ.

``GraphMatcher(ref, cand).match()`` returns an ``Alignment`` (see ``alignment.py``), much as
``difflib.SequenceMatcher`` returns opcodes. The stages:

1. **Canonicalise.** Op keys from ``ops.py``; transparent ops (view, transpose, ``x[:, None]``, the
   items of a ``chunk``/``split``...) are contracted into their producer, views of parameters
   (``w.t()``) into the parameter, and a ``matmul`` whose only use is adding a bias vector becomes
   one ``linear`` with that add, leaving a DAG of computing nodes per side.
2. **Hard anchors.** Graph inputs by value, graph outputs by position; parameters by content
   (``params.correspond``): the op consuming an anchored parameter is anchored with its
   counterpart, including 1:k blocks (one fused qkv projection against separate q, k, v: the pair
   compares a slice of the fused output) and decompositions (``layer_norm`` against a written-out
   norm: the consumers of the weight and of the bias form one block). Only parameters whose content
   is unique on both sides anchor; tensors of equal content (LayerNorm ones, zero biases) are
   settled later by structure. A user map's module pairs come first and win. The anchors that
   agree with both topological orders bound the windows below; the other certain ones still pair
   (a port may run independent ops, q/k/v, in another order).
3. **Soft anchors.** Between consecutive hard anchors, recursive patience alignment: keys unique
   in both windows, longest order-consistent chain, recursion into the gaps with weaker keys
   (op key, size, module path when both sides share their names, integer indices of module paths,
   op ordinal, Weisfeiler-Lehman hash of the predecessors). A pair whose users are other ops is
   weak (a different formula that happens to start alike). Small leftover windows pair look-alike
   ops (same key and size) whose matched inputs agree, using value closeness only to choose among
   them.
4. **Propagate.** The unmatched inputs of a matched pair correspond when their sizes (then op keys)
   single them out: this pairs the outputs of different decompositions (``sdpa`` against
   ``matmul, softmax, matmul``; ``layer_norm`` against mean/var/rsqrt) as one many-to-many block,
   whose inner nodes are listed in ``ref_block`` / ``cand_block``. Unmatched users of a matched pair
   with the same key and size correspond too.
5. **Parameters of equal content** are paired through the matched ops that consume them; what is
   still ambiguous is paired in order of first use, with a lower confidence.

Every pair carries a rationale and a confidence; pairs below 0.75 rest on order or sizes alone, and
the judge drops them when their values disagree although everything upstream agrees. What matches
nothing is listed as unmatched. Values are never used to accept or reject a structural match: they
stop agreeing after the point of divergence, which is exactly where a comparison needs the
alignment most.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx
from scipy.optimize import linear_sum_assignment

from .alignment import Alignment, Pair, ParamPair
from .capture import MODULE, SHAPE, TARGET, Capture
from .errors import FxdiffError
from .ops import TRANSPARENT, op_key
from .params import _Digests, correspond, digest, output_slice
from .record import gc_paused

__all__ = ["Alignment", "GraphMatcher", "Pair", "ParamPair", "UserMap", "match", "node_key"]

_SMALL_GAP = 64     # windows up to this size get the look-alike pass
_BLOCK_LIMIT = 64   # the most inner nodes one many-to-many block may fold
_INT = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")
_GETITEM = ("operator.getitem", "_operator.getitem")
# Multi-output ops whose items are slices of their one input: contracted like views.
_SPLITS = {"chunk", "split", "split_with_sizes", "unbind", "tensor_split", "hsplit", "vsplit"}


def node_key(node: torch.fx.Node) -> str:
    """The canonical op key of a node: ``input`` for placeholders, ``param`` / ``constant`` for
    get_attr, and for one output of a multi-output op the key of that op."""
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "constant" if str(node.target).startswith("_fxdiff_constant") else "param"
    target = node.meta.get(TARGET, str(node.target))
    if target in _GETITEM and node.args and isinstance(node.args[0], torch.fx.Node):
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
        self.preds: dict[str, list[str]] = {}
        self.succs: dict[str, list[str]] = defaultdict(list)
        self.params_of: dict[str, list[str]] = {}
        self.param_users: dict[str, list[str]] = defaultdict(list)
        self.param_order: list[str] = []
        param_of: dict[str, str] = {}         # get_attr nodes and views of them -> parameter name
        multi: dict[str, tuple[str, list[str], list[str]]] = {}  # multi-output op -> (key, inputs, params)
        fx_nodes: dict[str, torch.fx.Node] = {}
        dropped: set[str] = set()
        values = capture.values
        self.shape: dict[str, tuple[int, ...]] = {}
        for node in capture.graph.nodes:
            fx_nodes[node.name] = node
            if node.op == "output":
                continue
            if node.meta.get(SHAPE) is not None:
                self.shape[node.name] = tuple(node.meta[SHAPE])
            if node.op == "get_attr" and node.name not in values:
                param_of[node.name] = str(node.target)
                self.param_order.append(str(node.target))
                continue
            key = node_key(node)
            inputs: list[str] = []
            params: list[str] = []
            for a in node.all_input_nodes:
                if a.name in self.root:
                    inputs.append(self.root[a.name])
                elif a.name in param_of:
                    params.append(param_of[a.name])
                elif a.name in multi:
                    inputs += multi[a.name][1]
                    params += multi[a.name][2]
            inputs = list(dict.fromkeys(inputs))
            if node.name not in values:
                if node.op == "call_function":
                    multi[node.name] = (key, inputs, params)
                continue
            item_of_split = (node.meta.get(TARGET) in _GETITEM and node.args and
                             isinstance(node.args[0], torch.fx.Node) and key in _SPLITS)
            view = key in TRANSPARENT or item_of_split or (key == "getitem" and _view_index(node))
            if view and not inputs and len(params) == 1:
                param_of[node.name] = params[0]   # w.t(), w[:, None]: still the parameter
                continue
            if view and len(inputs) == 1 and not params:
                base = inputs[0]
                self.root[node.name] = base
                self.members[base].append(node.name)
                continue
            name = node.name
            folded = self._bias_add(node, key, inputs, params, fx_nodes)
            if folded is not None:   # matmul(x, w.t()) + b: one linear, named by the add
                key, inputs, params = "linear", self.preds[folded], self.params_of[folded] + params
                dropped.add(folded)
                for alias in self.members[folded]:
                    self.root[alias] = name
                self.members[name] = self.members.pop(folded)
                for a in inputs:
                    self.succs[a] = [name if u == folded else u for u in self.succs[a]]
                for w in self.params_of[folded]:
                    self.param_users[w] = [name if u == folded else u for u in self.param_users[w]]
            self.root[name] = name
            self.members[name].append(name)
            self.order.append(name)
            self.key[name] = key
            self.numel[name] = _prod(node.meta.get(SHAPE) or [])
            self.module[name] = node.meta.get(MODULE, "")
            self.preds[name] = inputs
            for a in inputs:
                self.succs[a].append(name)
            self.params_of[name] = list(dict.fromkeys(params))
            for param in self.params_of[name]:
                self.param_users[param].append(name)
        if dropped:
            self.order = [n for n in self.order if n not in dropped]
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
        # The computing graph, and Weisfeiler-Lehman hashes of each node's predecessors (labels: op
        # keys, two rounds), which tell apart look-alike ops fed by different computations.
        self.graph = nx.DiGraph()
        self.graph.add_nodes_from((n, {"label": self.key[n]}) for n in self.order)
        self.graph.add_edges_from((p, n) for n in self.order for p in self.preds[n])
        with warnings.catch_warnings():  # networkx >= 3.5 notes that directed hashes changed
            warnings.simplefilter("ignore", UserWarning)
            hashes = nx.weisfeiler_lehman_subgraph_hashes(self.graph.reverse(copy=False), node_attr="label",
                                                          iterations=2, digest_size=8)
        self.wl = {n: tuple(hashes[n]) for n in self.order}
        # what a node's value is used for: pairs whose users differ are weaker evidence
        self.use = {n: frozenset(self.key[u] for u in self.succs.get(n, ())) for n in self.order}
        self._features: dict[int, dict[str, Any]] = {}

    def _bias_add(self, node: torch.fx.Node, key: str, inputs: list[str], params: list[str],
                  fx_nodes: dict[str, torch.fx.Node]) -> str | None:
        """The matmul that ``node`` adds a bias vector to, when the pair is a linear written out."""
        if key != "add" or len(inputs) != 1 or len(params) != 1:
            return None
        m = inputs[0]
        bias = self.capture.params.get(params[0])
        shape = node.meta.get(SHAPE) or []
        if (self.key.get(m) not in ("matmul", "linear") or len(self.params_of.get(m, ())) != 1
                or bias is None or bias.dim() != 1 or not shape or bias.shape[0] != shape[-1]):
            return None
        aliases = set(self.members[m])
        users = {u.name for a in aliases for u in fx_nodes[a].users if u.name not in aliases}
        return m if users == {node.name} else None

    def features(self, level: int) -> dict[str, Any]:
        """The matching key of every computing node at strictness ``level`` (0 strictest).

        Level 0 uses module paths and is only used when both sides share their names.
        """
        if level not in self._features:
            k, s, ints, wl = self.key, self.numel, self.ints, self.wl
            if level == 0:
                f = {n: hash((k[n], s[n], self.module[n], self.ordinal_sized[n], wl[n][0])) for n in self.order}
            elif level == 1:
                f = {n: hash((k[n], s[n], ints[n], self.ordinal[n] if self.module[n] else -1, wl[n][1]))
                     for n in self.order}
            elif level == 2:
                f = {n: hash((k[n], s[n], ints[n], wl[n][0])) for n in self.order}
            elif level == 3:
                f = {n: hash((k[n], s[n], ints[n])) for n in self.order}
            else:
                f = {n: hash((k[n], s[n])) for n in self.order}
            self._features[level] = f
        return self._features[level]


_LEVELS = 5   # no level matches ops of different sizes: the judge could not compare them
_RATIONALE = ["same module path and op order"] + [f"patience alignment (level {k})" for k in range(1, _LEVELS)]
_CONFIDENCE = [1.0, 0.95, 0.9, 0.85, 0.8]


def _view_index(node: torch.fx.Node) -> bool:
    """Whether ``x[idx]`` only adds or keeps dimensions (``x[:, None]``, ``x[..., None]``)."""
    if len(node.args) < 2:
        return False
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in idx)


def _prod(shape: Iterable[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


class GraphMatcher:
    """Aligns a candidate capture to a reference capture; call ``match()`` for the ``Alignment``."""

    def __init__(self, ref: Capture, cand: Capture, user_map: UserMap | None = None):
        with gc_paused():
            self.ref, self.cand = _Side(ref), _Side(cand)
        self.user_map = user_map or UserMap()
        self._alignment: Alignment | None = None
        self.pairs: list[Pair] = []
        self.r2c: dict[str, list[str]] = defaultdict(list)   # ref node -> matched cand nodes
        self.c2r: dict[str, list[str]] = defaultdict(list)
        self.r_block: dict[str, str] = {}   # ref node folded into a block -> the block's ref node
        self.c_block: dict[str, str] = {}
        self.pair_of: dict[tuple[str, str], Pair] = {}

    def match(self) -> Alignment:
        """Compute (once) and return the alignment."""
        if self._alignment is None:
            with gc_paused():
                self._alignment = self._match()
        return self._alignment

    # -- bookkeeping ----------------------------------------------------------------------------
    def _add(self, p: Pair) -> bool:
        if p.cand in self.r2c.get(p.ref, ()):
            return False
        self.pairs.append(p)
        self.pair_of.setdefault((p.ref, p.cand), p)
        self.r2c[p.ref].append(p.cand)
        self.c2r[p.cand].append(p.ref)
        for n in p.ref_block:
            self.r_block.setdefault(n, p.ref)
        for n in p.cand_block:
            self.c_block.setdefault(n, p.cand)
        return True

    def _free_ref(self, n: str) -> bool:
        return n not in self.r2c and n not in self.r_block

    def _free_cand(self, n: str) -> bool:
        return n not in self.c2r and n not in self.c_block

    # -- stages ---------------------------------------------------------------------------------
    def _match(self) -> Alignment:
        r, c = self.ref, self.cand
        params, _, _ = correspond(r.capture.params, c.capture.params, r.param_order, c.param_order,
                                  self.user_map.params)
        hard = [p for p in params if p.confidence >= 1.0]
        anchors = self._input_anchors() + self._output_anchors() + self._param_anchors(hard)
        chain = _longest_chain(anchors, r.pos, c.pos, forced=self._user_anchors())
        for p in chain:
            self._add(p)
        # Topological order is a partial order: a port may compute independent ops (q, k, v) in
        # another order. Certain anchors off the chain still pair; only the chain bounds windows.
        for p in anchors:
            if (p.confidence >= 1.0 and (p.ref_slice or p.ref not in self.r2c)
                    and (p.cand_slice or p.cand not in self.c2r)):
                self._add(p)
        self._fill(chain)
        self._propagate()
        self._fold_blocks()
        pairs = sorted(self.pairs, key=lambda p: (r.pos[p.ref], c.pos[p.cand]))
        params, ref_left, cand_left = self._settle_params(params, pairs)
        return Alignment(
            pairs=[self._same_layout(p) for p in pairs],
            params=params,
            unmatched_ref=[n for n in r.order if self._free_ref(n)],
            unmatched_cand=[n for n in c.order if self._free_cand(n)],
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

    def _output_anchors(self) -> list[Pair]:
        """Graph outputs by position, where both sides produce them with the same size."""
        r, c = self.ref, self.cand

        def roots(side: _Side) -> list[str | None]:
            return [side.root.get(n.name) for n in side.capture.output_nodes()]
        out = []
        for i, (a, b) in enumerate(zip(roots(r), roots(c))):
            if a is None or b is None or r.key[a] == "input" or c.key[b] == "input":
                continue
            if r.numel[a] == c.numel[b] and r.key[a] == c.key[b]:
                out.append(Pair(a, b, f"graph output {i}", 0.9))
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
        r, c = self.ref, self.cand
        cand_keys = {(c.module[n], c.key[n], c.ordinal[n]): n for n in c.order if c.key[n] != "input"}
        out = []
        for n in r.order:
            if r.key[n] == "input":
                continue
            path = rename(r.module[n])
            m = cand_keys.get((path, r.key[n], r.ordinal[n])) if path is not None else None
            if m is not None:
                out.append(Pair(n, m, f"user map ({r.module[n]} -> {path})", 1.0))
        return out

    def _param_anchors(self, params: list[ParamPair]) -> list[Pair]:
        """The ops that consume corresponding parameters correspond too (in order of use).

        When one side's op consumes parameters that the other side spreads over several ops (a
        ``linear`` against ``matmul`` + bias ``add``; ``layer_norm`` against a written-out norm), the
        last of those ops pairs and the others join it as a block.
        """
        r, c = self.ref, self.cand
        raw = []
        for pp in params:
            ref_users = r.param_users.get(pp.ref, [])
            steps = pp.transform["steps"] if pp.transform.get("kind") == "chain" else [pp.transform]
            if any(s.get("kind") == "concat" for s in steps):  # one fused reference op, k candidate ops
                offset = 0
                for name in pp.cand:
                    rows = c.capture.params[name].shape[0]
                    for ru, cu in zip(ref_users, c.param_users.get(name, [])):
                        if r.key[ru] == c.key[cu]:
                            raw.append(Pair(ru, cu, f"parameter {pp.ref} = concat({', '.join(pp.cand)})",
                                            pp.confidence, ref_slice=(offset, offset + rows)))
                    offset += rows
                continue
            cand_users = c.param_users.get(pp.cand[0], [])
            block = output_slice(pp.transform)
            for ru, cu in zip(ref_users, cand_users):
                if block is not None:
                    if r.key[ru] == c.key[cu]:
                        raw.append(Pair(ru, cu, f"parameter {pp.ref} = {pp.cand[0]}[{block[0]}:{block[1]}]",
                                        pp.confidence, cand_slice=block))
                elif r.numel[ru] == c.numel[cu]:
                    raw.append(Pair(ru, cu, f"parameter {pp.ref} <-> {pp.cand[0]}", pp.confidence))
        return self._merge_decomposed(raw)

    def _merge_decomposed(self, raw: list[Pair]) -> list[Pair]:
        """One op on one side anchored to several on the other: keep the last, fold the others."""
        r, c = self.ref, self.cand
        sliced = [p for p in raw if p.ref_slice or p.cand_slice]
        plain = [p for p in raw if not (p.ref_slice or p.cand_slice)]
        by_ref: dict[str, list[Pair]] = defaultdict(list)
        for p in plain:
            by_ref[p.ref].append(p)
        merged = []
        for ref_node, group in by_ref.items():
            cands = sorted({p.cand for p in group}, key=c.pos.__getitem__)
            last = cands[-1]
            inner = tuple(x for x in cands[:-1] if _reaches(c.preds, x, last, c.pos))
            best = next(p for p in group if p.cand == last)
            merged.append(Pair(ref_node, last, best.rationale, best.confidence, cand_block=inner))
        by_cand: dict[str, list[Pair]] = defaultdict(list)
        for p in merged:
            by_cand[p.cand].append(p)
        out = list(sliced)
        for cand_node, group in by_cand.items():
            refs = sorted({p.ref for p in group}, key=r.pos.__getitem__)
            last = refs[-1]
            inner = tuple(x for x in refs[:-1] if _reaches(r.preds, x, last, r.pos))
            best = next(p for p in group if p.ref == last)
            out.append(Pair(last, cand_node, best.rationale, best.confidence, ref_block=inner,
                            cand_block=best.cand_block))
        return out

    def _fill(self, chain: list[Pair]) -> None:
        """Align the windows between consecutive anchors of the chain."""
        r, c = self.ref, self.cand
        bounds = [(-1, -1)] + sorted({(r.pos[p.ref], c.pos[p.cand]) for p in chain}) + [(len(r.order), len(c.order))]
        first_level = 0 if self._same_names() else 1
        for (r0, c0), (r1, c1) in zip(bounds, bounds[1:]):
            a = [n for n in r.order[r0 + 1:r1] if self._free_ref(n)]
            b = [n for n in c.order[c0 + 1:c1] if self._free_cand(n)]
            if a and b:
                self._patience(a, b, first_level)

    def _patience(self, a: list[str], b: list[str], level: int) -> None:
        """Recursive patience alignment of windows ``a`` and ``b`` (an explicit stack, earlier
        windows first, so pairs upstream are settled before the gaps below them)."""
        r, c = self.ref, self.cand
        stack = [(a, b, level)]
        while stack:
            a, b, level = stack.pop()
            chain: list[tuple[int, int]] = []
            while a and b and level < _LEVELS:
                fa, fb = r.features(level), c.features(level)
                ka = Counter(fa[n] for n in a)
                kb = Counter(fb[n] for n in b)
                index_b = {fb[n]: j for j, n in enumerate(b) if kb[fb[n]] == 1}
                chain = _lis([(i, index_b[fa[n]]) for i, n in enumerate(a)
                              if ka[fa[n]] == 1 and fa[n] in index_b])
                if chain:
                    break
                level += 1
            if not chain:
                if a and b and len(a) <= _SMALL_GAP and len(b) <= _SMALL_GAP:
                    self._small_gap(a, b)
                continue
            for i, j in chain:
                x, y = a[i], b[j]
                if r.use[x] == c.use[y]:
                    self._add(Pair(x, y, _RATIONALE[level], _CONFIDENCE[level]))
                else:
                    self._add(Pair(x, y, f"{_RATIONALE[level]}, used by other ops", min(_CONFIDENCE[level], 0.7)))
            bounds = [(-1, -1)] + chain + [(len(a), len(b))]
            gaps = [(a[i0 + 1:i1], b[j0 + 1:j1], level) for (i0, j0), (i1, j1) in zip(bounds, bounds[1:])
                    if i1 - i0 > 1 and j1 - j0 > 1]
            stack.extend(reversed(gaps))

    def _consistent(self, x: str, y: str) -> bool:
        """Whether pairing ``x`` with ``y`` agrees with the pairs made so far on their inputs:
        every matched input of one is matched to an input of the other."""
        ins_r, ins_c = set(self._inputs_ref(x)), set(self._inputs_cand(y))
        for a in ins_r:
            mapped = self.r2c.get(a)
            if mapped and not ins_c.intersection(mapped):
                return False
        for b in ins_c:
            mapped = self.c2r.get(b)
            if mapped and not ins_r.intersection(mapped):
                return False
        return True

    def _inputs_ref(self, n: str) -> list[str]:
        return [self.r_block.get(a, a) for a in self.ref.preds[n]]

    def _inputs_cand(self, n: str) -> list[str]:
        return [self.c_block.get(a, a) for a in self.cand.preds[n]]

    def _small_gap(self, a: list[str], b: list[str]) -> None:
        """Look-alike ops (same key and size) whose matched inputs agree, paired by value closeness
        among themselves, kept in order."""
        r, c = self.ref, self.cand
        groups: dict[tuple, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for i, n in enumerate(a):
            groups[(r.key[n], r.numel[n])][0].append(i)
        for j, n in enumerate(b):
            groups[(c.key[n], c.numel[n])][1].append(j)
        candidates = []
        for ia, jb in groups.values():
            if not (ia and jb):
                continue
            ok = [[self._consistent(a[i], b[j]) for j in jb] for i in ia]
            cost = [[_value_distance(r.capture.values[a[i]], c.capture.values[b[j]]) if ok[x][y] else 1e9
                     for y, j in enumerate(jb)] for x, i in enumerate(ia)]
            rows, cols = linear_sum_assignment(cost)
            candidates += [(ia[x], jb[y]) for x, y in zip(rows, cols) if ok[x][y]]
        for i, j in _lis(sorted(candidates)):
            self._add(Pair(a[i], b[j], "look-alike ops, paired by value", 0.6))

    def _propagate(self) -> None:
        """Pair the unmatched inputs (and same-key users) of matched pairs where sizes single them out."""
        r, c = self.ref, self.cand
        queue = [(-r.pos[p.ref], -c.pos[p.cand], p.ref, p.cand) for p in self.pairs]
        heapq.heapify(queue)   # latest first: inputs are settled from the outputs backwards
        forward = list(self.pairs)
        while queue or forward:
            while queue:
                _, _, x, y = heapq.heappop(queue)
                for p in self._pair_inputs(x, y):
                    if self._add(p):
                        heapq.heappush(queue, (-r.pos[p.ref], -c.pos[p.cand], p.ref, p.cand))
                        forward.append(p)
            grown = []
            for p in sorted(forward, key=lambda p: r.pos[p.ref]):
                for q in self._pair_users(p.ref, p.cand):
                    if self._add(q):
                        grown.append(q)
                        heapq.heappush(queue, (-r.pos[q.ref], -c.pos[q.cand], q.ref, q.cand))
            forward = grown

    def _block_inputs(self, side: _Side, node: str, inner: Iterable[str]) -> list[str]:
        group = {node, *inner}
        out = []
        for n in group:
            out += [a for a in side.preds[n] if a not in group]
        return list(dict.fromkeys(out))

    def _pair_inputs(self, x: str, y: str) -> list[Pair]:
        r, c = self.ref, self.cand
        pair = self.pair_of[(x, y)]
        ins_r = [a for a in self._block_inputs(r, x, pair.ref_block) if self._free_ref(a)]
        ins_c = [b for b in self._block_inputs(c, y, pair.cand_block) if self._free_cand(b)]
        if not ins_r or not ins_c:
            return []
        if len(ins_r) == len(ins_c) == 1 and r.numel[ins_r[0]] == c.numel[ins_c[0]] and pair.confidence >= 0.85:
            # the one unmatched input of a well-matched pair on both sides: nearly as strong as that
            # pair (a little less at each step back, so a chain of them ends weak)
            same = r.key[ins_r[0]] == c.key[ins_c[0]]
            return [Pair(ins_r[0], ins_c[0], f"sole unmatched input of a matched pair "
                         f"({'same op' if same else 'different decompositions'})",
                         round(min(0.8, pair.confidence - 0.1), 2))]
        return self._unique_pairs(ins_r, ins_c, lambda n: r.numel[n], lambda n: c.numel[n],
                                  "input of a matched pair", 0.6)

    def _pair_users(self, x: str, y: str) -> list[Pair]:
        r, c = self.ref, self.cand
        us_r = [a for a in r.succs.get(x, ()) if self._free_ref(a)]
        us_c = [b for b in c.succs.get(y, ()) if self._free_cand(b)]
        if not us_r or not us_c:
            return []
        return [p for p in self._unique_pairs(us_r, us_c, lambda n: (r.key[n], r.numel[n]),
                                              lambda n: (c.key[n], c.numel[n]), "user of a matched pair", 0.7)
                if self._consistent(p.ref, p.cand)]

    def _unique_pairs(self, xs: list[str], ys: list[str], fx, fy, rationale: str, confidence: float) -> list[Pair]:
        """Pairs (x, y) whose size is unique among ``xs`` and ``ys``, else whose (key, size) is."""
        r, c = self.ref, self.cand
        out = []
        for level in (0, 1):
            kx = Counter(fx(n) if level == 0 else (r.key[n], fx(n)) for n in xs)
            ky = Counter(fy(n) if level == 0 else (c.key[n], fy(n)) for n in ys)
            index = {fy(n) if level == 0 else (c.key[n], fy(n)): n for n in ys}
            for n in xs:
                k = fx(n) if level == 0 else (r.key[n], fx(n))
                if kx[k] == 1 and ky.get(k) == 1:
                    m = index[k]
                    if all(p.ref != n and p.cand != m for p in out):
                        how = "same op" if r.key[n] == c.key[m] else "different decompositions"
                        out.append(Pair(n, m, f"{rationale} ({how})", confidence))
        return out

    def _fold_blocks(self) -> None:
        """For pairs of different ops (decompositions), fold the unmatched ops that feed only them."""
        r, c = self.ref, self.cand
        for k, p in enumerate(self.pairs):
            if r.key[p.ref] == c.key[p.cand] or p.ref_slice or p.cand_slice:
                continue
            ref_block = _cone(r, p.ref, p.ref_block, self._free_ref) if r.key[p.ref] != "input" else ()
            cand_block = _cone(c, p.cand, p.cand_block, self._free_cand) if c.key[p.cand] != "input" else ()
            ref_block = tuple(dict.fromkeys(p.ref_block + ref_block))
            cand_block = tuple(dict.fromkeys(p.cand_block + cand_block))
            if (ref_block, cand_block) != (p.ref_block, p.cand_block):
                self.pairs[k] = Pair(p.ref, p.cand, p.rationale, p.confidence, p.ref_slice, p.cand_slice,
                                     ref_block, cand_block)
                self.pair_of[(p.ref, p.cand)] = self.pairs[k]
                for n in ref_block:
                    self.r_block.setdefault(n, p.ref)
                for n in cand_block:
                    self.c_block.setdefault(n, p.cand)

    def _same_layout(self, p: Pair) -> Pair:
        """The pair, with one side named by a view of its op whose shape is the other side's
        (a Conv2d output flattened and transposed against a Linear over patches), if it has one."""
        r, c = self.ref, self.cand
        if p.ref_slice or p.cand_slice or r.shape.get(p.ref) == c.shape.get(p.cand):
            return p
        for side, node, want, replace in ((r, p.ref, c.shape.get(p.cand), "ref"),
                                          (c, p.cand, r.shape.get(p.ref), "cand")):
            alias = next((m for m in side.members.get(node, ())
                          if side.shape.get(m) == want and m in side.capture.values), None)
            if alias is not None and alias != node:
                return dataclasses.replace(p, **{replace: alias})
        return p

    # -- parameters -----------------------------------------------------------------------------
    def _settle_params(self, params: list[ParamPair],
                       pairs: list[Pair]) -> tuple[list[ParamPair], list[str], list[str]]:
        """Keep the parameter pairs that content alone decides; pair the rest through matched ops."""
        r, c = self.ref, self.cand
        rp, cp = r.capture.params, c.capture.params
        kept = [p for p in params if p.confidence >= 1.0]
        done_r = {p.ref for p in kept}
        used_c = {n for p in kept if output_slice(p.transform) is None for n in p.cand}   # rows: shared
        digest_r: dict[str, bytes] = {}
        dig_c = _Digests(cp)
        pieces: dict[str, list[tuple[int, str, bool]]] = defaultdict(list)   # ref param -> (start, cand, transposed)
        for pair in pairs:
            ref_params = [x for n in (pair.ref, *pair.ref_block) for x in r.params_of.get(n, ())]
            cand_params = [x for n in (pair.cand, *pair.cand_block) for x in c.params_of.get(n, ())]
            for x in ref_params:
                if x in done_r:
                    continue
                if x not in digest_r:
                    digest_r[x] = digest(rp[x])
                for y in cand_params:
                    if y in used_c:
                        continue
                    found = _fit(rp[x], digest_r[x], cp[y], dig_c, y, pair)
                    if found is None:
                        continue
                    if found[0] == "piece":
                        if all(q != y for _, q, _ in pieces[x]):
                            pieces[x].append((found[1], y, found[2]))
                        if _covered(rp[x], pieces[x], cp):
                            steps = [{"kind": "concat"}] + ([{"kind": "transpose"}] if pieces[x][0][2] else [])
                            names = tuple(q for _, q, _ in sorted(pieces[x]))
                            transform = steps[0] if len(steps) == 1 else {"kind": "chain", "steps": steps}
                            kept.append(ParamPair(x, names, transform, f"equal content, concatenation of "
                                                  f"{', '.join(names)}; consumers matched ({pair.rationale})", 0.9))
                            done_r.add(x)
                            used_c.update(names)
                            break
                        continue
                    kept.append(ParamPair(x, (y,), found[1], f"equal content; consumers matched ({pair.rationale})",
                                          0.9))
                    done_r.add(x)
                    if output_slice(found[1]) is None:
                        used_c.add(y)
                    break
        # what is left, in order of first use, then unused tensors (buffers no op read)
        ref_left = [n for n in dict.fromkeys([*r.param_order, *rp]) if n not in done_r]
        cand_left = [n for n in dict.fromkeys([*c.param_order, *cp]) if n not in used_c]
        rest, ref_left, cand_left = correspond({n: rp[n] for n in ref_left}, {n: cp[n] for n in cand_left},
                                               ref_left, cand_left)
        kept += [ParamPair(p.ref, p.cand, p.transform, p.evidence, min(p.confidence, 0.7)) for p in rest]
        # a fused candidate tensor covered partly here, partly by content: it is used, not left over
        fused_used = {n for p in kept for n in p.cand}
        cand_left = [n for n in cand_left if n not in fused_used]
        rank = {n: i for i, n in enumerate(r.param_order)}
        kept.sort(key=lambda p: rank.get(p.ref, len(rank)))
        return kept, ref_left, cand_left


def _fit(x: torch.Tensor, dx: bytes, y: torch.Tensor, dig_c: "_Digests", name: str, pair: Pair):
    """How reference tensor ``x`` is found in candidate tensor ``y`` (called ``name``; digests in
    ``dig_c``) of a matched op pair: ("whole", transform), ("piece", start row, transposed) or None."""
    if x.numel() == y.numel() and dig_c[(name, False)] == dx:
        return ("whole", {"kind": "identity"} if tuple(x.shape) == tuple(y.shape)
                else {"kind": "reshape", "shape": list(x.shape)})
    if y.dim() == 2 and x.numel() == y.numel() and dig_c[(name, True)] == dx:
        return ("whole", {"kind": "transpose"})
    if pair.cand_slice and y.dim() >= 1:
        s0, s1 = pair.cand_slice
        for view, pre in ((y, []), (y.t(), [{"kind": "transpose"}]) if y.dim() == 2 else (None, None)):
            if view is None or view.shape[0] < s1:
                continue
            part = view[s0:s1]
            if part.numel() == x.numel() and digest(part) == dx:
                rows = {"kind": "rows", "start": s0, "stop": s1}
                return ("whole", {"kind": "chain", "steps": pre + [rows]} if pre else rows)
    if pair.ref_slice and x.dim() >= 1:
        s0, s1 = pair.ref_slice
        for view, transposed in ((x, False), (x.t() if x.dim() == 2 else None, True)):
            if view is None or view.shape[0] < s1:
                continue
            part = view[s0:s1]
            if part.numel() == y.numel() and digest(part) == dig_c[(name, False)]:
                return ("piece", s0, transposed)
    return None


def _covered(x: torch.Tensor, pieces: list[tuple[int, str, bool]], cand: dict[str, torch.Tensor]) -> bool:
    rows = x.shape[1] if pieces and pieces[0][2] else x.shape[0]
    return sum(cand[q].shape[0] for _, q, _ in pieces) == rows


def _reaches(preds: dict[str, list[str]], src: str, dst: str, pos: dict[str, int], limit: int = 64) -> bool:
    """Whether ``src`` is an ancestor of ``dst`` (searching at most ``limit`` nodes back)."""
    stack, seen = [dst], {dst}
    while stack and len(seen) <= limit:
        n = stack.pop()
        for a in preds[n]:
            if a == src:
                return True
            if a not in seen and pos[a] > pos[src]:
                seen.add(a)
                stack.append(a)
    return False


def _cone(side: _Side, node: str, folded: tuple[str, ...], free) -> tuple[str, ...]:
    """The unmatched ops that feed ``node`` (or the ops already ``folded`` into it) and nothing
    outside it, back to matched ops; () when more than ``_BLOCK_LIMIT`` of them (a whole unmatched
    region is not one block)."""
    inside: dict[str, None] = dict.fromkeys(folded)
    stack = [a for n in (node, *folded) for a in side.preds[n] if free(a)]
    while stack:
        n = stack.pop()
        if n in inside or side.key[n] == "input":
            continue
        inside[n] = None
        if len(inside) > _BLOCK_LIMIT:
            return ()
        stack += [a for a in side.preds[n] if free(a)]
    group = set(inside) | {node}
    # keep only ops all of whose users lie inside the block: the rest is shared with other paths
    changed = True
    while changed:
        changed = False
        for n in list(inside):
            if n not in folded and any(u not in group for u in side.succs.get(n, ())):
                del inside[n]
                group.discard(n)
                changed = True
    return tuple(sorted(inside, key=side.pos.__getitem__))


def _value_distance(x, y) -> float:
    """How unlike two tensors are (0 = equal), for breaking ties between look-alike ops."""
    x, y = x.detach().reshape(-1).double(), y.detach().reshape(-1).double()
    if x.numel() != y.numel():
        return 2.0
    if not x.numel():
        return 0.0
    scale = float(x.abs().max().clamp_min(1e-30))
    d = float((x - y).abs().max()) / scale
    return min(d, 2.0) if d == d else 2.0


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


def _longest_chain(anchors: list[Pair], rpos: dict[str, int], cpos: dict[str, int],
                   forced: list[Pair] = ()) -> list[Pair]:
    """Anchors consistent with both topological orders; 1:k blocks share a position on one side.

    ``forced`` anchors (the user's) win: the others must fit between them and not reuse their nodes.
    """
    def chain(items: list[Pair]) -> list[Pair]:
        groups: dict[tuple[int, int], list[Pair]] = defaultdict(list)
        for p in items:
            groups[(rpos[p.ref], cpos[p.cand])].append(p)
        return [p for point in _lis(sorted(groups), strict=False) for p in groups[point]]
    if not forced:
        return chain(anchors)
    forced = chain(forced)
    fr, fc = [rpos[p.ref] for p in forced], [cpos[p.cand] for p in forced]
    taken_r, taken_c = {p.ref for p in forced}, {p.cand for p in forced}

    def fits(p: Pair) -> bool:
        x, y = rpos[p.ref], cpos[p.cand]
        return (p.ref not in taken_r and p.cand not in taken_c
                and bisect.bisect_left(fr, x) == bisect.bisect_left(fc, y)
                and bisect.bisect_right(fr, x) == bisect.bisect_right(fc, y))
    return chain(forced + [p for p in anchors if fits(p)])


def match(ref: Capture, cand: Capture, user_map: UserMap | None = None) -> Alignment:
    """Align ``cand`` to ``ref``: shorthand for ``GraphMatcher(ref, cand, user_map).match()``."""
    return GraphMatcher(ref, cand, user_map).match()
