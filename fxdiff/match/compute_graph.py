"""One capture reduced to the nodes that compute, with the features the matcher aligns them by."""

from __future__ import annotations

import re
import warnings
from collections import Counter, defaultdict
from typing import Any, Iterable

import torch
import torch.fx

from ..model.capture import DTYPE, MODULE, NOT_STORED, SHAPE, Capture
from ..ops import DEFAULT_OPS, OpKeys

LEVELS = 5   # feature levels; no level matches ops of different sizes: the judge could not compare them
_INT = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


class ComputeGraph:
    """One capture reduced to its computing nodes, in topological order, with their features."""

    def __init__(self, capture: Capture, ops: OpKeys = DEFAULT_OPS):
        self.capture = capture
        self.root: dict[str, str] = {}        # every value node -> the computing node it aliases
        self.members: dict[str, list[str]] = defaultdict(list)  # computing node -> its aliases
        self.order: list[str] = []            # computing nodes
        self.key: dict[str, str] = {}
        self.numel: dict[str, int] = {}
        self.dtype: dict[str, str | None] = {}   # the value's dtype, by name ("float32")
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
            if node.op == "get_attr" and node.name not in values \
                    and not (NOT_STORED in node.meta and str(node.target) not in capture.params):
                param_of[node.name] = str(node.target)
                self.param_order.append(str(node.target))
                continue
            key = ops.node_key(node)
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
            view = ops.is_view(node, key)
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
            self.dtype[name] = node.meta.get(DTYPE)
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
        import networkx as nx   # here, not at the top: capturing needs none of it, and it takes 0.12 s to import
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


def _prod(shape: Iterable[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out
