"""What to draw for a report: the matched graph, grouped by module, collapsed and folded to stay readable.

The drawing is the *union* of the two graphs: one box per matched pair (placed by the reference),
plus the reference-only and candidate-only nodes, each joined to its neighbours. Parameters and
buffers (``get_attr`` nodes) are left out. Every box sits in the cluster of its module path
(candidate-only nodes in the reference module their candidate module corresponds to).

Big graphs are cut down *before* layout:

- a module can be collapsed into one box (``depth``: every module nested deeper than ``depth``
  dotted components; by default the modules that do not fit in ``max_nodes`` boxes);
- a run of consecutive sibling modules with identical structure (the reference's ops and shapes)
  whose comparisons all say the same thing (all clean, or all diverged downstream of the
  divergence) is folded into one box
  ("layers.3 .. layers.16: 14 x ConformerLayer, all clean");
- the modules around the first divergence (the node, its inputs and consumers) always stay open.

``build_view`` does the work; the renderers (``svg``, ``html``) only read the ``View``.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..errors import FxdiffError
from ..model.report import Report
from .scale import check_direction, measure, row_status, worst_status


@dataclass
class Item:
    """One node of the union graph: a matched pair, or a node on one side only."""

    ref: str | None
    cand: str | None
    side: str                      # "pair", "ref_only" or "cand_only"
    module: str                    # module path it is drawn in (the reference's path space)
    op: str
    ref_shape: list[int] | None
    cand_shape: list[int] | None
    rows: list[int]                # indices into ``report.nodes`` (several for a fused output)
    order: float                   # position in the reference's topological order
    cand_module: str = ""


@dataclass
class Unit:
    """One box in the drawing: a node, a collapsed module or a fold of identical modules."""

    id: str
    kind: str                      # "node", "module" or "fold"
    items: list[int]
    parent: str                    # the module whose cluster holds this box
    path: str = ""                 # module: its path; fold: the first folded module's path
    modules: list[str] = field(default_factory=list)  # fold: every folded module, in order
    order: float = 0.0


@dataclass
class Cluster:
    path: str
    units: list[int] = field(default_factory=list)
    children: list[str] = field(default_factory=list)


@dataclass
class View:
    report: Report
    directions: tuple[str, ...]
    items: list[Item]
    units: list[Unit]
    edges: list[tuple[int, int]]              # unit index -> unit index, data flow direction
    clusters: dict[str, Cluster]              # "" is the top level
    module_classes: dict[str, str]            # module path -> class name (reference side)
    hidden: int = 0                           # union-graph nodes not drawn as their own box
    around: int = 0                           # drawn: the nodes this many steps from the first divergence
    left_out: int = 0                         # union-graph nodes outside that window

    def item_status(self, i: int, direction: str) -> str:
        it = self.items[i]
        if it.side != "pair":
            return it.side
        if not it.rows:
            return "none"
        return worst_status(row_status(self.report.nodes[r], direction) for r in it.rows)

    def item_measure(self, i: int, direction: str, metric: str) -> float | None:
        vals = [measure(_metrics(self.report.nodes[r], direction), metric) for r in self.items[i].rows]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    def unit_summary(self, u: int, direction: str, metric: str) -> dict[str, Any]:
        """Status, worst measure and counts of one box in one direction."""
        unit = self.units[u]
        counts: Counter[str] = Counter()
        worst: float | None = None
        worst_item = None
        for i in unit.items:
            s = self.item_status(i, direction)
            counts[s] += 1
            if s in ("diverged", "first"):
                v = self.item_measure(i, direction, metric)
                if v is not None and (worst is None or v > worst):
                    worst, worst_item = v, i
        if counts["first"]:
            status = "first"
        elif counts["diverged"]:
            status = "diverged"
        elif counts["clean"]:
            status = "clean"
        elif counts["ref_only"] and not counts["cand_only"] and len(counts) == 1:
            status = "ref_only"
        elif counts["cand_only"] and not counts["ref_only"] and len(counts) == 1:
            status = "cand_only"
        elif counts["ref_only"] or counts["cand_only"]:
            status = "unmatched"
        else:
            status = "none"
        return {"status": status, "worst": worst, "worst_item": worst_item, "counts": counts}


def _metrics(row, direction):
    return row.forward if direction == "forward" else row.backward


def module_depth(path: str) -> int:
    return 0 if not path else path.count(".") + 1


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _prefixes(path: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b", "a.b.c"]``."""
    if not path:
        return []
    parts = path.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def union_items(report: Report) -> tuple[list[Item], list[tuple[int, int]]]:
    """The union graph's nodes (reference order first) and its edges, as item indices."""
    ref_graph = report.graph.get("ref") or []
    cand_graph = report.graph.get("cand") or []
    if not ref_graph and report.nodes:
        raise FxdiffError("the report holds no graph structure to draw")
    rows_by_ref: dict[str, list[int]] = defaultdict(list)
    rows_by_cand: dict[str, list[int]] = defaultdict(list)
    for k, r in enumerate(report.nodes):
        rows_by_ref[r.ref_node].append(k)
        rows_by_cand[r.cand_node].append(k)
    unmatched_ref = {u.node for u in report.unmatched.ref}
    unmatched_cand = {u.node for u in report.unmatched.cand}

    items: list[Item] = []
    ref_item: dict[str, int] = {}
    for pos, n in enumerate(ref_graph):
        if n.get("kind") == "get_attr":
            continue
        rows = rows_by_ref.get(n["name"], [])
        cand = report.nodes[rows[0]].cand_node if rows else None
        row0 = report.nodes[rows[0]] if rows else None
        ref_item[n["name"]] = len(items)
        items.append(Item(
            ref=n["name"], cand=cand, side="ref_only" if n["name"] in unmatched_ref else "pair",
            module=n.get("module") or "", op=n.get("op") or n.get("kind", "?"),
            ref_shape=n.get("shape"), cand_shape=row0.cand_shape if row0 else None, rows=rows,
            order=float(pos), cand_module=row0.cand_module if row0 else ""))
    edges: set[tuple[int, int]] = set()
    for n in ref_graph:
        v = ref_item.get(n["name"])
        if v is None:
            continue
        for a in n.get("inputs", ()):
            u = ref_item.get(a)
            if u is not None and u != v:
                edges.add((u, v))

    # candidate-only nodes: placed in the reference module their candidate module pairs with
    module_map = _cand_module_map(report)
    cand_targets: dict[str, list[int]] = {}      # cand node -> items it is drawn as
    for name, rows in rows_by_cand.items():
        cand_targets[name] = sorted({ref_item[report.nodes[k].ref_node] for k in rows
                                     if report.nodes[k].ref_node in ref_item})
    last_order = -1.0
    reach: dict[str, frozenset[int]] = {}        # cand node -> drawn items it stands for / reaches back to
    for n in cand_graph:
        name = n["name"]
        if n.get("kind") == "get_attr":
            reach[name] = frozenset()
            continue
        if name in unmatched_cand:
            last_order += 1e-3
            cand_targets[name] = [len(items)]
            items.append(Item(ref=None, cand=name, side="cand_only",
                              module=_map_module(n.get("module") or "", module_map),
                              op=n.get("op") or n.get("kind", "?"), ref_shape=None, cand_shape=n.get("shape"),
                              rows=[], order=last_order, cand_module=n.get("module") or ""))
        targets = cand_targets.get(name, [])
        if targets:
            last_order = max(last_order, max(items[t].order for t in targets))
        sources: set[int] = set()
        for a in n.get("inputs", ()):
            sources |= reach.get(a, frozenset())
        for t in targets:
            for s in sources:
                if s != t and (items[s].side == "cand_only" or items[t].side == "cand_only"):
                    edges.add((s, t))
        reach[name] = frozenset(targets) if targets else frozenset(sources)
    return items, sorted(edges)


def _cand_module_map(report: Report) -> dict[str, str]:
    """Candidate module path -> the reference module path its nodes pair with most."""
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for r in report.nodes:
        votes[r.cand_module][r.ref_module] += 1
    return {c: v.most_common(1)[0][0] for c, v in votes.items()}


def _map_module(cand_module: str, module_map: dict[str, str]) -> str:
    if cand_module in module_map:
        return module_map[cand_module]
    head, tail = cand_module, []
    while head:
        head, _, last = head.rpartition(".")
        tail.insert(0, last)
        if head in module_map:
            mapped = module_map[head]
            return ".".join([mapped, *tail]) if mapped else ".".join(tail)
    return cand_module


class _Tree:
    """The module tree of the union graph's items."""

    def __init__(self, items: list[Item]):
        self.direct: dict[str, list[int]] = defaultdict(list)
        self.children: dict[str, list[str]] = defaultdict(list)
        self.first: dict[str, float] = {"": -1.0}
        self.size: Counter[str] = Counter()
        for i, it in enumerate(items):
            self.direct[it.module].append(i)
            self.size[""] += 1
            for p in _prefixes(it.module):
                self.size[p] += 1
                if p not in self.first:
                    self.first[p] = it.order
                    self.children[_parent(p)].append(p)
                else:
                    self.first[p] = min(self.first[p], it.order)
        for kids in self.children.values():
            kids.sort(key=self.first.__getitem__)

    def subtree_items(self, path: str) -> list[int]:
        out, stack = [], [path]
        while stack:
            p = stack.pop()
            out.extend(self.direct.get(p, ()))
            stack.extend(self.children.get(p, ()))
        return out


def build_view(report: Report, direction: str = "both", *, depth: int | None = None, focus: bool = True,
               fold: bool = True, max_nodes: int = 150, max_focus: int = 3, around: int = 0) -> View:
    """Decide what to draw: see the module docstring. ``depth=None`` fits the view to ``max_nodes``;
    ``focus`` keeps the modules around the first ``max_focus`` divergences per direction open;
    ``around`` > 0 draws only the nodes within that many steps upstream or downstream of them."""
    directions = check_direction(direction)
    if "backward" in directions and direction == "both" and not any(r.backward for r in report.nodes):
        directions = ("forward",)
    if depth is not None and depth < 1:
        raise FxdiffError(f"--depth must be 1 or more, not {depth}")
    if max_nodes < 1:
        raise FxdiffError(f"--max-nodes must be 1 or more, not {max_nodes}")
    if around < 0:
        raise FxdiffError(f"--around must be 0 or more, not {around}")
    items, item_edges = union_items(report)
    view = View(report=report, directions=directions, items=items, units=[], edges=[], clusters={},
                module_classes=dict((report.ref.get("modules") or {})))
    statuses = [tuple(view.item_status(i, d) for d in directions) for i in range(len(items))]
    first: set[int] = set()
    for k, d in enumerate(directions):  # the earliest few in the direction the error flows
        firsts = sorted((i for i, st in enumerate(statuses) if st[k] == "first"),
                        key=lambda i: items[i].order, reverse=d == "backward")
        first.update(firsts[:max_focus])
    if around and first:
        keep = sorted(_within(first, item_edges, around))
        new = {old: k for k, old in enumerate(keep)}
        view.around, view.left_out = around, len(items) - len(keep)
        items = view.items = [items[i] for i in keep]
        statuses = [statuses[i] for i in keep]
        item_edges = [(new[u], new[v]) for u, v in item_edges if u in new and v in new]
        first = {new[i] for i in first}
    tree = _Tree(items)

    focus_items: set[int] = set()
    if focus:
        focus_items = set(first)
        for u, v in item_edges:   # the path around the divergence: inputs and consumers
            if u in first:
                focus_items.add(v)
            if v in first:
                focus_items.add(u)
    focus_modules = {p for i in focus_items for p in ["", *_prefixes(items[i].module)]}

    folds = _find_folds(tree, items, statuses, focus_modules) if fold else {}
    folded = {m for run in folds.values() for f in run for m in f}

    expanded = {""}
    expanded |= {m for m in focus_modules if m not in folded}
    if depth is not None:
        expanded |= {m for m in tree.first if m and module_depth(m) < depth and m not in folded}
        expanded = _close_upwards(expanded)
    else:
        _fit(tree, items, statuses, expanded, folds, folded, max_nodes)

    _place(view, tree, expanded, folds, item_edges, statuses, focus_items, max_nodes)
    return view


def _within(start: set[int], edges: list[tuple[int, int]], steps: int) -> set[int]:
    """The items at most ``steps`` edges upstream or downstream of ``start`` (not sideways: a
    shared input does not pull in all its other consumers)."""
    succ: dict[int, list[int]] = defaultdict(list)
    pred: dict[int, list[int]] = defaultdict(list)
    for u, v in edges:
        succ[u].append(v)
        pred[v].append(u)
    found = set(start)
    for nbrs in (succ, pred):
        frontier = set(start)
        for _ in range(steps):
            frontier = {w for u in frontier for w in nbrs[u]} - found
            found |= frontier
    return found


def _close_upwards(expanded: set[str]) -> set[str]:
    return {m for m in expanded if all(p in expanded for p in _prefixes(_parent(m)))}


def _find_folds(tree: _Tree, items: list[Item], statuses: list[tuple[str, ...]],
                focus_modules: set[str]) -> dict[str, list[list[str]]]:
    """Parent module -> runs (2 or more) of consecutive identical siblings that say the same thing."""
    sig: dict[str, tuple[int, int]] = {}
    verdict: dict[str, str | None] = {}
    for path in sorted(tree.first, key=module_depth, reverse=True):
        if not path:
            continue
        members = sorted(tree.subtree_items(path), key=lambda i: items[i].order)
        cut = len(path) + 1
        ref_side = [i for i in members if items[i].side != "cand_only"]   # the reference's structure
        sig[path] = (hash(tuple((items[i].module[cut:], items[i].op, tuple(items[i].ref_shape or ()))
                                for i in ref_side)), len(ref_side))
        flat = {s for i in members for s in statuses[i]}
        if "first" in flat:
            verdict[path] = None
        elif "diverged" in flat:
            verdict[path] = "diverged"
        elif "clean" in flat:
            verdict[path] = "clean"
        else:
            verdict[path] = None
    folds: dict[str, list[list[str]]] = {}
    for parent, kids in tree.children.items():
        run: list[str] = []
        for k in [*kids, None]:
            ok = k is not None and verdict.get(k) and k not in focus_modules and tree.size[k] > 1
            if ok and run and sig[k] == sig[run[0]] and verdict[k] == verdict[run[0]]:
                run.append(k)
                continue
            if len(run) >= 2:
                folds.setdefault(parent, []).append(run)
            run = [k] if ok else []
    return folds


def _box_units(tree: _Tree, path: str, folds: dict[str, list[list[str]]], folded: set[str]) -> int:
    """How many boxes an open module shows when its children stay closed."""
    runs = folds.get(path, [])
    return len(tree.direct.get(path, ())) + len([k for k in tree.children.get(path, ()) if k not in folded]) \
        + len(runs)


def _fit(tree: _Tree, items: list[Item], statuses: list[tuple[str, ...]], expanded: set[str],
         folds: dict[str, list[list[str]]], folded: set[str], budget: int) -> None:
    """Open modules, worst and shallowest first, while the drawing stays within ``budget`` boxes."""
    bad: Counter[str] = Counter()
    for i, st in enumerate(statuses):
        if any(s in ("diverged", "first") for s in st):
            for p in _prefixes(items[i].module):
                bad[p] += 1
    expanded |= _close_upwards(expanded)
    count = 0
    heap: list[tuple[int, int, float, str]] = []

    def push_children(path: str) -> None:
        for k in tree.children.get(path, ()):
            if k not in folded and k not in expanded:
                heapq.heappush(heap, (0 if bad[k] else 1, module_depth(k), tree.first[k], k))

    for m in sorted(expanded, key=module_depth):
        count += _box_units(tree, m, folds, folded) - (1 if m else 0)
        push_children(m)
    while heap:
        *_, k = heapq.heappop(heap)
        if k in expanded:
            continue
        delta = _box_units(tree, k, folds, folded) - 1
        if count + delta <= budget or tree.size[k] <= 1:
            expanded.add(k)
            count += delta
            push_children(k)


def _place(view: View, tree: _Tree, expanded: set[str], folds: dict[str, list[list[str]]],
           item_edges: list[tuple[int, int]], statuses: list[tuple[str, ...]], focus_items: set[int],
           budget: int | None) -> None:
    """Make the units, clusters and unit edges for the chosen open modules and folds."""
    items = view.items
    fold_of = {m: (parent, run) for parent, runs in folds.items() for run in runs for m in run}
    units: list[Unit] = []

    def add_unit(unit: Unit, members: list[int]) -> None:
        unit.items = sorted(members, key=lambda i: items[i].order)
        unit.order = min((items[i].order for i in members), default=0.0)
        units.append(unit)

    def visit(path: str) -> None:
        for i in tree.direct.get(path, ()):
            add_unit(Unit(id="", kind="node", items=[], parent=path), [i])
        seen_runs: set[int] = set()
        for k in tree.children.get(path, ()):
            if k in fold_of:
                run = fold_of[k][1]
                if id(run) in seen_runs:
                    continue
                seen_runs.add(id(run))
                members = [i for m in run for i in tree.subtree_items(m)]
                add_unit(Unit(id="", kind="fold", items=[], parent=path, path=run[0], modules=list(run)), members)
            elif k in expanded:
                visit(k)
            else:
                members = tree.subtree_items(k)
                kind = "node" if len(members) == 1 else "module"
                add_unit(Unit(id="", kind=kind, items=[], parent=path if kind == "module"
                              else items[members[0]].module, path=k), members)

    visit("")
    if budget is not None and len(units) > budget:
        units = _merge_runs(units, items, statuses, focus_items, budget)
    units.sort(key=lambda u: u.order)
    item_unit = [-1] * len(items)
    for idx, u in enumerate(units):
        u.id = f"u{idx}"
        for i in u.items:
            item_unit[i] = idx
    view.units = units

    # clusters: the open modules; one holding a single box is not worth a frame, the box goes up
    open_paths = sorted({""} | {p for u in view.units for p in _prefixes(u.parent)}, key=module_depth,
                        reverse=True)
    members: dict[str, list[int]] = defaultdict(list)
    for idx, u in enumerate(view.units):
        members[u.parent].append(idx)
    kids: dict[str, list[str]] = defaultdict(list)
    flat: set[str] = set()
    for p in open_paths:
        if not p:
            continue
        if len(members.get(p, ())) == 1 and not kids.get(p):
            members[_parent(p)].extend(members.pop(p))
            flat.add(p)
        else:
            kids[_parent(p)].append(p)
    view.clusters = {}
    for p in reversed(open_paths):
        if p in flat:
            continue
        view.clusters[p] = Cluster(p, units=sorted(members.get(p, []), key=lambda k: view.units[k].order),
                                   children=sorted(kids.get(p, []), key=lambda c: tree.first.get(c, math.inf)))
        for k in view.clusters[p].units:
            view.units[k].parent = p
    _drop_empty_frames(view.clusters)
    edges = {(item_unit[a], item_unit[b]) for a, b in item_edges}
    view.edges = sorted((a, b) for a, b in edges if a != b and a >= 0 and b >= 0)
    view.hidden = len(items) - sum(1 for u in view.units if u.kind == "node")


def _drop_empty_frames(clusters: dict[str, Cluster]) -> None:
    """A frame that holds nothing but one other frame says nothing: the inner one takes its place
    (drawn ``layers.1.self_attn`` instead of ``layers`` > ``1`` > ``self_attn``)."""
    inner = {p: c.children[0] for p, c in clusters.items() if p and not c.units and len(c.children) == 1}
    for p in inner:
        del clusters[p]
    for c in clusters.values():
        for k, child in enumerate(c.children):
            while child in inner:
                child = inner[child]
            c.children[k] = child


def _merge_runs(units: list[Unit], items: list[Item], statuses: list[tuple[str, ...]], focus_items: set[int],
                budget: int) -> list[Unit]:
    """Still over budget (a module with hundreds of ops of its own, a flat graph): merge runs of
    3 or more single-node boxes of one module that say the same thing into one box, longest runs
    first, until the drawing fits. A run is consecutive in the whole graph's topological order, so
    no path leaves it and comes back: merging never draws a cycle."""
    rank = {i: r for r, i in enumerate(sorted(range(len(items)), key=lambda i: items[i].order))}
    by_parent: dict[str, list[int]] = defaultdict(list)
    for k, u in enumerate(units):
        if u.kind == "node":
            by_parent[u.parent].append(k)

    def key(k: int):
        i = units[k].items[0]
        if i in focus_items or "first" in statuses[i]:
            return None
        return statuses[i], items[i].side

    runs: list[list[int]] = []
    for idxs in by_parent.values():
        idxs.sort(key=lambda k: units[k].order)
        run: list[int] = []
        for k in [*idxs, None]:
            kk = key(k) if k is not None else None
            if kk is not None and run and key(run[0]) == kk and \
                    rank[units[k].items[0]] == rank[units[run[-1]].items[0]] + 1:
                run.append(k)
                continue
            if len(run) >= 3:
                runs.append(run)
            run = [k] if kk is not None else []
    runs.sort(key=len, reverse=True)
    excess = len(units) - budget
    merged: set[int] = set()
    out: list[Unit] = []
    for run in runs:
        if excess <= 0:
            break
        members = [i for k in run for i in units[k].items]
        out.append(Unit(id="", kind="run", items=sorted(members, key=lambda i: items[i].order),
                        parent=units[run[0]].parent, path=units[run[0]].parent,
                        order=min(units[k].order for k in run)))
        merged.update(run)
        excess -= len(run) - 1
    return [u for k, u in enumerate(units) if k not in merged] + out
