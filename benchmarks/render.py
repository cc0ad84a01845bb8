"""Benchmark: draw synthetic comparison reports of 1k, 5k and 20k graph nodes.

Each report is built directly as a ``Report`` (no model runs): a transformer-like chain of
identical layers (pre-norm attention with q/k/v projections, softmax attention and an MLP; every
linear and norm with its weight and bias as ``get_attr`` nodes, so 41 graph nodes per layer),
where the candidate has a bug in the softmax of one layer two thirds of the way down. Upstream
of it every node matches to rounding noise; the bug's node is the first forward divergence and
the error grows downstream; gradients diverge upstream of it (the first backward divergence is at
the bug) and a few nodes per layer are unmatched, as in real ports.

Timed, per size: ``build_view`` (union graph, module tree, collapsing and folding), the SVG
(forward and backward side by side: collapsing + DOT + Graphviz ``dot`` layout), and the full
HTML report (both directions drawn, data embedded). A "flat" 5k variant erases every module
path, so nothing collapses by module and long runs of similar ops are merged instead. Run
``python benchmarks/render.py [--sizes 1000 5000 20000] [--out DIR]``; the drawings go to DIR
when given.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxdiff.render.graphview import build_view  # noqa: E402
from fxdiff.render.html import render_html  # noqa: E402
from fxdiff.render.svg import render_svg  # noqa: E402
from fxdiff.model.report import HIST_EDGES, Metrics, NodeRow, OutputRow, Report, Unmatched, UnmatchedNode  # noqa: E402

D, HEADS, SEQ, BATCH = 256, 4, 128, 2
DH = D // HEADS


def _metrics(err: float, passed: bool, numel: int, rng: random.Random) -> Metrics:
    hist = [0] * (len(HIST_EDGES) + 2)
    if err == 0:
        hist[0] = numel
    else:
        top = min(len(hist) - 2, max(1, int(math.log10(err)) + 13))
        for k in range(max(1, top - 4), top + 1):
            hist[k] = numel // 5
    return Metrics(passed=passed, max_abs_diff=err, max_rel_diff=err * rng.uniform(5, 50), mean_abs_diff=err / 7,
                   cosine=1.0 - min(1.0, err * err), ref_rms=1.0, mismatched=0 if passed else numel // 3,
                   numel=numel, histogram=hist)


def synthetic_report(target_nodes: int, seed: int = 0) -> Report:
    """A report of a ``target_nodes``-node transformer-like graph with one bug (see the docstring)."""
    rng = random.Random(seed)
    per_layer = 41
    layers = max(2, (target_nodes - 8) // per_layer)
    bug_layer = (2 * layers) // 3
    ref: list[dict] = []
    cand: list[dict] = []
    rows: list[NodeRow] = []
    unmatched = Unmatched()
    order: dict[str, int] = {}

    def node(name, op, module, shape, inputs, kind="call_function", side="both", cand_name=None):
        entry = {"name": name, "op": op, "kind": kind, "target": op, "module": module, "shape": shape,
                 "dtype": "float32", "inputs": inputs}
        order[name] = len(ref)
        if side in ("both", "ref"):
            ref.append(entry)
        if side in ("both", "cand"):
            cand.append({**entry, "name": cand_name or name})
        return name

    def param(name, module, shape):
        return node(name, "param", module, shape, [], kind="get_attr")

    x = node("input", "input", "", [BATCH, SEQ, D], [], kind="placeholder")
    bug_node = None
    grad_scale = {}
    for i in range(layers):
        m = f"layers.{i}"

        def lin(tag, inp, out=D, sub="attn"):
            mod = f"{m}.{sub}.{tag}" if sub else f"{m}.{tag}"
            w = param(f"{mod.replace('.', '_')}_weight", mod, [out, D])
            b = param(f"{mod.replace('.', '_')}_bias", mod, [out])
            return node(f"linear_{i}_{tag}", "linear", mod, [BATCH, SEQ, out], [inp, w, b])

        def norm(tag, inp):
            mod = f"{m}.{tag}"
            w = param(f"{mod.replace('.', '_')}_weight", mod, [D])
            b = param(f"{mod.replace('.', '_')}_bias", mod, [D])
            return node(f"layer_norm_{i}_{tag}", "layer_norm", mod, [BATCH, SEQ, D], [inp, w, b])

        h = norm("norm1", x)
        q, k, v = lin("q", h), lin("k", h), lin("v", h)
        heads = []
        for t, src in (("q", q), ("k", k), ("v", v)):
            vw = node(f"view_{i}_{t}", "view", f"{m}.attn", [BATCH, SEQ, HEADS, DH], [src])
            heads.append(node(f"transpose_{i}_{t}", "transpose", f"{m}.attn", [BATCH, HEADS, SEQ, DH], [vw]))
        kt = node(f"transpose_{i}_kt", "transpose", f"{m}.attn", [BATCH, HEADS, DH, SEQ], [heads[1]])
        s = node(f"matmul_{i}_s", "matmul", f"{m}.attn", [BATCH, HEADS, SEQ, SEQ], [heads[0], kt])
        s = node(f"div_{i}", "div", f"{m}.attn", [BATCH, HEADS, SEQ, SEQ], [s])
        if i == bug_layer:   # the candidate scales the scores once more before softmax
            s2 = node(f"mul_{i}_bug", "mul", f"{m}.attn", [BATCH, HEADS, SEQ, SEQ], [s], side="cand")
            unmatched.cand.append(UnmatchedNode(s2, f"{m}.attn", "mul", [BATCH, HEADS, SEQ, SEQ]))
        p = node(f"softmax_{i}", "softmax", f"{m}.attn", [BATCH, HEADS, SEQ, SEQ], [s])
        if i == bug_layer:
            bug_node = p
            cand[-1]["inputs"] = [s2]
        a = node(f"matmul_{i}_o", "matmul", f"{m}.attn", [BATCH, HEADS, SEQ, DH], [p, heads[2]])
        a = node(f"transpose_{i}_o", "transpose", f"{m}.attn", [BATCH, SEQ, HEADS, DH], [a])
        a = node(f"reshape_{i}", "reshape", f"{m}.attn", [BATCH, SEQ, D], [a])
        a = lin("out", a)
        x = node(f"add_{i}_1", "add", m, [BATCH, SEQ, D], [x, a])
        h = norm("norm2", x)
        h = lin("fc1", h, out=4 * D, sub="mlp")
        h = node(f"gelu_{i}", "gelu", f"{m}.mlp.act", [BATCH, SEQ, 4 * D], [h])
        h = node(f"dropout_{i}", "dropout", f"{m}.mlp", [BATCH, SEQ, 4 * D], [h], side="ref")
        unmatched.ref.append(UnmatchedNode(h, f"{m}.mlp", "dropout", [BATCH, SEQ, 4 * D]))
        h = lin("fc2", h, sub="mlp")
        x = node(f"add_{i}_2", "add", m, [BATCH, SEQ, D], [x, h])
        grad_scale[i] = 1.0
    x = norm_final = node("layer_norm_final", "layer_norm", "norm", [BATCH, SEQ, D], [x])
    node("output", "output", "", None, [norm_final], kind="output")
    while len(ref) < target_nodes:   # pad with clean elementwise ops in a head module
        x = node(f"identity_{len(ref)}", "clone", "head", [BATCH, SEQ, D], [x])

    bug_pos = order[bug_node]
    unmatched_names = {u.node for u in unmatched.ref}
    for n in ref:
        if n["kind"] in ("get_attr", "output") or n["name"] in unmatched_names:
            continue
        pos = order[n["name"]]
        numel = math.prod(n["shape"] or [1])
        if pos < bug_pos:
            fwd = _metrics(rng.choice([0.0, 1e-7, 3e-7, 1e-6]), True, numel, rng)
            bwd = _metrics(1e-4 * (1 + (bug_pos - pos) / 200), False, numel, rng)
        elif pos == bug_pos:
            fwd = _metrics(3e-2, False, numel, rng)
            bwd = _metrics(1e-4, False, numel, rng)
        else:
            grow = 3e-2 * (1 + (pos - bug_pos) / 150)
            fwd = _metrics(grow * rng.uniform(0.5, 1.5), False, numel, rng)
            bwd = _metrics(rng.choice([0.0, 1e-7]), True, numel, rng)
        if n["kind"] == "placeholder":
            bwd = None
        rows.append(NodeRow(
            ref_node=n["name"], cand_node=n["name"], ref_module=n["module"], cand_module=n["module"], op=n["op"],
            ref_shape=n["shape"], cand_shape=n["shape"], forward=fwd, backward=bwd,
            rationale="synthetic", confidence=1.0, depth=pos,
            first_forward=pos == bug_pos, first_backward=pos == bug_pos))
    return Report(
        ref={"label": f"synthetic-{target_nodes}-ref", "modules": {f"layers.{i}": "Block" for i in range(layers)}},
        cand={"label": f"synthetic-{target_nodes}-cand"},
        tolerance={"atol": 1e-5, "rtol": 1e-5},
        outputs=[OutputRow("output", "output", _metrics(0.1, False, BATCH * SEQ * D, rng))],
        nodes=rows, params=[], unmatched=unmatched, graph={"ref": ref, "cand": cand},
    )


def flat_report(target_nodes: int) -> Report:
    """The same graph with every module path erased: nothing to collapse or fold by module."""
    report = synthetic_report(target_nodes)
    for side in ("ref", "cand"):
        report.graph[side] = [{**n, "module": ""} for n in report.graph[side]]
    for r in report.nodes:
        r.ref_module = r.cand_module = ""
    for u in report.unmatched.ref + report.unmatched.cand:
        u.module = ""
    report.ref["label"] += " (flat)"
    return report


def _time(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--out", type=Path, help="Write the SVG and HTML drawings here.")
    args = ap.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'graph nodes':>11} {'boxes':>6} {'view s':>7} {'SVG s':>7} {'HTML s':>7} {'HTML MB':>8}")
    worst_5k = None
    cases = [(size, "", synthetic_report) for size in args.sizes]
    if 5000 in args.sizes:
        cases.append((5000, " flat", flat_report))
    for size, tag, build in cases:
        report = build(size)
        n = len(report.graph["ref"])
        t_view, view = _time(lambda: build_view(report, "both"))
        t_svg, svg = _time(lambda: render_svg(report, "both"))
        t_html, page = _time(lambda: render_html(report, "both"))
        print(f"{str(n) + tag:>11} {len(view.units):>6} {t_view:>7.2f} {t_svg:>7.2f} {t_html:>7.2f} {len(page) / 2**20:>8.1f}",
              flush=True)
        if size == 5000:
            worst_5k = max(worst_5k or 0.0, t_svg, t_html)
        if args.out:
            stem = f"synthetic-{size}{tag.strip() and '-' + tag.strip()}"
            (args.out / f"{stem}.svg").write_text(svg)
            (args.out / f"{stem}.html").write_text(page)
    if worst_5k is not None:
        print(f"5k-node reports: {worst_5k:.2f} s at most, SVG or HTML "
              f"({'within' if worst_5k < 10 else 'OVER'} the 10 s budget)")


if __name__ == "__main__":
    main()
