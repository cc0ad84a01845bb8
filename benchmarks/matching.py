"""Benchmark: align synthetic transformer-like graph pairs whose names and decompositions differ.

The reference has separate q/k/v ``linear`` ops under ``encoder.layer.N.attention.self.{query,key,
value}``, hand-written attention and ``F.layer_norm``. The candidate computes the same function
with other module names and nesting (``stages.S.blocks.J.attn.qkv``..., so even the integers in
the paths differ), one fused qkv projection split by ``chunk``, the attention output projection
spelled ``matmul + add``, ``scaled_dot_product_attention`` in odd layers and a written-out
LayerNorm (mean/var/rsqrt) in every seventh layer. Both sides hold the same
weights; LayerNorm parameters of the first norm are ones and zeros (equal content in every layer),
as freshly initialised models have them.

The captures are built directly (an fx graph with fxdiff's node meta, real values of tiny tensors),
with the ground-truth node correspondence, so the benchmark measures alignment time and accuracy:
the share of reference computing nodes whose matched candidate node(s) are exactly the true ones
(or none, when the truth is none). Run ``python benchmarks/matching.py [--sizes 1000 10000 50000]``;
``--structure-only`` gives the candidate other weights, so that only structure can align the graphs
(the fused q/k/v projections then stay unmatched: nothing says which rows hold q).
"""

from __future__ import annotations

import argparse
import math
import operator
import sys
import time
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxdiff.model.capture import DTYPE, MODULE, MODULE_TYPE, SHAPE, TARGET, Capture  # noqa: E402
from fxdiff.match import GraphMatcher  # noqa: E402

D, HEADS, SEQ, FF = 8, 2, 4, 16
DH = D // HEADS


class _Builder:
    """Builds one capture: every op runs on tiny tensors so values are real."""

    def __init__(self) -> None:
        self.graph = torch.fx.Graph()
        self.values: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}
        self.tensor: dict[str, torch.Tensor] = {}   # every node's tensor (params included)

    def _node(self, op: str, target, args: tuple, module: str, name: str, target_name: str,
              value: torch.Tensor | None) -> torch.fx.Node:
        node = self.graph.create_node(op, target, args, {}, name=name)
        node.meta[MODULE], node.meta[MODULE_TYPE], node.meta[TARGET] = module, "", target_name
        if value is not None:
            node.meta[SHAPE], node.meta[DTYPE] = list(value.shape), "float32"
            self.tensor[node.name] = value
        return node

    def input(self, name: str, t: torch.Tensor) -> torch.fx.Node:
        node = self._node("placeholder", name, (), "", name, name, t)
        self.values[node.name] = t
        return node

    def param(self, qualname: str, t: torch.Tensor) -> torch.fx.Node:
        node = self._node("get_attr", qualname, (), qualname.rpartition(".")[0], qualname.replace(".", "_"),
                          qualname, t)
        self.params[qualname] = t
        return node

    def call(self, fn, target_name: str, *args, module: str) -> torch.fx.Node:
        value = fn(*[self.tensor[a.name] if isinstance(a, torch.fx.Node) else a for a in args])
        node = self._node("call_function", fn, tuple(args), module, target_name.rpartition(".")[2].strip("_"),
                          target_name, value)
        self.values[node.name] = value
        return node

    def chunk(self, x: torch.fx.Node, k: int, module: str) -> list[torch.fx.Node]:
        """A multi-output op as the recorder stores it: the op without a value, then getitems."""
        parts = self.tensor[x.name].chunk(k, -1)
        op = self._node("call_function", torch.Tensor.chunk, (x, k, -1), module, "chunk", "torch.Tensor.chunk", None)
        out = []
        for i, p in enumerate(parts):
            item = self._node("call_function", operator.getitem, (op, i), module, "chunk_out", "_operator.getitem", p)
            self.values[item.name] = p
            out.append(item)
        return out

    def finish(self, out: torch.fx.Node) -> Capture:
        self.graph.output([out])
        return Capture(self.graph, self.values, {}, self.params, {}, {"args": [], "kwargs": {}},
                       [self.tensor[out.name]], {"model": "synthetic"})


def _heads(b: _Builder, x, module):
    x = b.call(lambda t: t.view(1, SEQ, HEADS, DH), "torch.Tensor.view", x, module=module)
    return b.call(lambda t: t.transpose(1, 2), "torch.Tensor.transpose", x, module=module)


def _merge(b: _Builder, x, module):
    x = b.call(lambda t: t.transpose(1, 2), "torch.Tensor.transpose", x, module=module)
    return b.call(lambda t: t.reshape(1, SEQ, D), "torch.Tensor.reshape", x, module=module)


def _weights(n_layers: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    return [{"ln1_w": torch.ones(D), "ln1_b": torch.zeros(D), "ln2_w": 1 + rnd(D), "ln2_b": rnd(D),
             "wq": rnd(D, D), "bq": rnd(D), "wk": rnd(D, D), "bk": rnd(D), "wv": rnd(D, D), "bv": rnd(D),
             "wo": rnd(D, D), "bo": rnd(D), "w1": rnd(FF, D), "b1": rnd(FF), "w2": rnd(D, FF), "b2": rnd(D)}
            for _ in range(n_layers)]


def build_pair(n_layers: int, seed: int = 0, same_weights: bool = True) -> tuple[Capture, Capture, dict[str, set[str]]]:
    """(reference, candidate, truth): ``truth[ref_node]`` is the set of candidate nodes it
    corresponds to (empty: none). Only computing nodes are listed. With ``same_weights=False``
    the candidate has other weights: no parameter content anchors anything, structure must."""
    weights = _weights(n_layers, seed)
    cand_weights = weights if same_weights else _weights(n_layers, seed + 100)
    x0 = torch.randn(1, SEQ, D, generator=torch.Generator().manual_seed(seed + 1))
    r, c = _Builder(), _Builder()
    truth: dict[str, set[str]] = {}
    hr = r.input("x", x0)
    hc = c.input("hidden", x0)
    truth[hr.name] = {hc.name}
    scale = DH ** -0.5
    for i, (w, wc) in enumerate(zip(weights, cand_weights)):
        # ---- reference layer ------------------------------------------------------------
        L = f"encoder.layer.{i}"
        ln1 = r.call(F.layer_norm, "torch.nn.functional.layer_norm", hr, (D,),
                     r.param(f"{L}.attention.ln.weight", w["ln1_w"]), r.param(f"{L}.attention.ln.bias", w["ln1_b"]),
                     module=f"{L}.attention.ln")
        qkv_r = []
        for x in "qkv":
            name = {"q": "query", "k": "key", "v": "value"}[x]
            lin = r.call(F.linear, "torch._C._nn.linear", ln1, r.param(f"{L}.attention.self.{name}.weight", w["w" + x]),
                         r.param(f"{L}.attention.self.{name}.bias", w["b" + x]), module=f"{L}.attention.self.{name}")
            qkv_r.append(lin)
        q, k, v = (_heads(r, t, f"{L}.attention.self") for t in qkv_r)
        kt = r.call(lambda t: t.transpose(-2, -1), "torch.Tensor.transpose", k, module=f"{L}.attention.self")
        s = r.call(torch.matmul, "torch.matmul", q, kt, module=f"{L}.attention.self")
        s2 = r.call(torch.mul, "torch.Tensor.mul", s, scale, module=f"{L}.attention.self")
        p = r.call(lambda t: torch.softmax(t, -1), "torch.softmax", s2, module=f"{L}.attention.self")
        o = r.call(torch.matmul, "torch.matmul", p, v, module=f"{L}.attention.self")
        om = _merge(r, o, f"{L}.attention.self")
        proj_r = r.call(F.linear, "torch._C._nn.linear", om, r.param(f"{L}.attention.output.dense.weight", w["wo"]),
                        r.param(f"{L}.attention.output.dense.bias", w["bo"]), module=f"{L}.attention.output.dense")
        add1_r = r.call(torch.add, "torch.Tensor.add", hr, proj_r, module=f"{L}.attention.output")
        ln2_r = r.call(F.layer_norm, "torch.nn.functional.layer_norm", add1_r, (D,),
                       r.param(f"{L}.output.ln.weight", w["ln2_w"]), r.param(f"{L}.output.ln.bias", w["ln2_b"]),
                       module=f"{L}.output.ln")
        fc1_r = r.call(F.linear, "torch._C._nn.linear", ln2_r, r.param(f"{L}.intermediate.dense.weight", w["w1"]),
                       r.param(f"{L}.intermediate.dense.bias", w["b1"]), module=f"{L}.intermediate.dense")
        act_r = r.call(F.gelu, "torch._C._nn.gelu", fc1_r, module=f"{L}.intermediate.act")
        fc2_r = r.call(F.linear, "torch._C._nn.linear", act_r, r.param(f"{L}.output.dense.weight", w["w2"]),
                       r.param(f"{L}.output.dense.bias", w["b2"]), module=f"{L}.output.dense")
        hr = r.call(torch.add, "torch.Tensor.add", add1_r, fc2_r, module=f"{L}.output")

        # ---- candidate layer --------------------------------------------------------------
        B = f"stages.{i // 4}.blocks.{i % 4}"
        n1 = c.call(F.layer_norm, "torch.nn.functional.layer_norm", hc, (D,), c.param(f"{B}.norm1.weight", wc["ln1_w"]),
                    c.param(f"{B}.norm1.bias", wc["ln1_b"]), module=f"{B}.norm1")
        qkv = c.call(F.linear, "torch._C._nn.linear", n1,
                     c.param(f"{B}.attn.qkv.weight", torch.cat([wc["wq"], wc["wk"], wc["wv"]])),
                     c.param(f"{B}.attn.qkv.bias", torch.cat([wc["bq"], wc["bk"], wc["bv"]])), module=f"{B}.attn.qkv")
        cq, ck, cv = (_heads(c, t, f"{B}.attn") for t in c.chunk(qkv, 3, f"{B}.attn"))
        if i % 2:
            att = c.call(F.scaled_dot_product_attention, "torch._C._nn.scaled_dot_product_attention", cq, ck, cv,
                         module=f"{B}.attn")
            cand_att = {o.name: {att.name}, s.name: set(), s2.name: set(), p.name: set()}
        else:
            kt_c = c.call(lambda t: t.transpose(-2, -1), "torch.Tensor.transpose", ck, module=f"{B}.attn")
            sc = c.call(torch.matmul, "torch.matmul", cq, kt_c, module=f"{B}.attn")
            sc2 = c.call(torch.mul, "torch.Tensor.mul", sc, scale, module=f"{B}.attn")
            pc = c.call(lambda t: torch.softmax(t, -1), "torch.softmax", sc2, module=f"{B}.attn")
            att = c.call(torch.matmul, "torch.matmul", pc, cv, module=f"{B}.attn")
            cand_att = {o.name: {att.name}, s.name: {sc.name}, s2.name: {sc2.name}, p.name: {pc.name}}
        am = _merge(c, att, f"{B}.attn")
        wo = c.param(f"{B}.attn.out.weight", wc["wo"])
        wo_t = c.call(lambda t: t.t(), "torch.Tensor.t", wo, module=f"{B}.attn.out")
        mm = c.call(torch.matmul, "torch.matmul", am, wo_t, module=f"{B}.attn.out")
        proj_c = c.call(torch.add, "torch.Tensor.add", mm, c.param(f"{B}.attn.out.bias", wc["bo"]), module=f"{B}.attn.out")
        add1_c = c.call(torch.add, "torch.Tensor.add", hc, proj_c, module=f"{B}")
        if i % 7 == 3:  # LayerNorm written out
            m = f"{B}.norm2"
            mu = c.call(lambda t: t.mean(-1, keepdim=True), "torch.Tensor.mean", add1_c, module=m)
            xc = c.call(torch.sub, "torch.Tensor.sub", add1_c, mu, module=m)
            sq = c.call(lambda t: t.pow(2), "torch.Tensor.pow", xc, module=m)
            var = c.call(lambda t: t.mean(-1, keepdim=True), "torch.Tensor.mean", sq, module=m)
            ve = c.call(torch.add, "torch.Tensor.add", var, 1e-5, module=m)
            rs = c.call(torch.rsqrt, "torch.rsqrt", ve, module=m)
            xn = c.call(torch.mul, "torch.Tensor.mul", xc, rs, module=m)
            xw = c.call(torch.mul, "torch.Tensor.mul", xn, c.param(f"{m}.weight", wc["ln2_w"]), module=m)
            ln2_c = c.call(torch.add, "torch.Tensor.add", xw, c.param(f"{m}.bias", wc["ln2_b"]), module=m)
        else:
            ln2_c = c.call(F.layer_norm, "torch.nn.functional.layer_norm", add1_c, (D,),
                           c.param(f"{B}.norm2.weight", wc["ln2_w"]), c.param(f"{B}.norm2.bias", wc["ln2_b"]),
                           module=f"{B}.norm2")
        fc1_c = c.call(F.linear, "torch._C._nn.linear", ln2_c, c.param(f"{B}.mlp.up.weight", wc["w1"]),
                       c.param(f"{B}.mlp.up.bias", wc["b1"]), module=f"{B}.mlp.up")
        act_c = c.call(F.gelu, "torch._C._nn.gelu", fc1_c, module=f"{B}.mlp")
        fc2_c = c.call(F.linear, "torch._C._nn.linear", act_c, c.param(f"{B}.mlp.down.weight", wc["w2"]),
                       c.param(f"{B}.mlp.down.bias", wc["b2"]), module=f"{B}.mlp.down")
        hc = c.call(torch.add, "torch.Tensor.add", add1_c, fc2_c, module=f"{B}")

        truth.update({ln1.name: {n1.name}, **{t.name: {qkv.name} for t in qkv_r}, **cand_att,
                      proj_r.name: {proj_c.name}, add1_r.name: {add1_c.name}, ln2_r.name: {ln2_c.name},
                      fc1_r.name: {fc1_c.name}, act_r.name: {act_c.name}, fc2_r.name: {fc2_c.name},
                      hr.name: {hc.name}})
    return r.finish(hr), c.finish(hc), truth


def accuracy(truth: dict[str, set[str]], alignment) -> tuple[float, int]:
    """(share of reference nodes matched exactly as the truth says, number of wrong pairs)."""
    got: dict[str, set[str]] = {n: set() for n in truth}
    wrong = 0
    for p in alignment.pairs:
        if p.ref in got:
            got[p.ref].add(p.cand)
            wrong += p.cand not in truth[p.ref]
    return sum(got[n] == truth[n] for n in truth) / len(truth), wrong


NODES_PER_LAYER = 40  # per side, on average


def run(sizes: list[int], repeat: int = 1, same_weights: bool = True) -> list[dict]:
    rows = []
    for target in sizes:
        layers = max(1, round(target / NODES_PER_LAYER))
        ref, cand, truth = build_pair(layers, same_weights=same_weights)
        best = cpu = math.inf
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            alignment = GraphMatcher(ref, cand).match()
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
        acc, wrong = accuracy(truth, alignment)
        n = max(len(ref.graph.nodes), len(cand.graph.nodes))
        rows.append({"layers": layers, "ref_nodes": len(ref.graph.nodes), "cand_nodes": len(cand.graph.nodes),
                     "seconds": best, "cpu_seconds": cpu, "accuracy": acc, "wrong_pairs": wrong,
                     "unmatched_ref": len(alignment.unmatched_ref), "unmatched_cand": len(alignment.unmatched_cand),
                     "us_per_nlogn": 1e6 * best / (n * math.log2(n))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000],
                        help="approximate nodes per side")
    parser.add_argument("--repeat", type=int, default=1, help="time the best of this many runs")
    parser.add_argument("--structure-only", action="store_true",
                        help="give the candidate other weights: no parameter content to anchor on")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: thread start-up would dominate building the graphs
    rows = run(args.sizes, args.repeat, same_weights=not args.structure_only)
    print(f"{'layers':>6} {'ref nodes':>9} {'cand nodes':>10} {'align s':>8} {'cpu s':>6} {'accuracy':>8} "
          f"{'wrong':>6} {'unm ref':>7} {'unm cand':>8} {'us/(n log2 n)':>13} {'vs first':>8}")
    for row in rows:
        print(f"{row['layers']:>6} {row['ref_nodes']:>9} {row['cand_nodes']:>10} {row['seconds']:>8.2f} "
              f"{row['cpu_seconds']:>6.2f} {row['accuracy']:>8.2%} {row['wrong_pairs']:>6} {row['unmatched_ref']:>7} "
              f"{row['unmatched_cand']:>8} {row['us_per_nlogn']:>13.2f} "
              f"{row['us_per_nlogn'] / rows[0]['us_per_nlogn']:>8.2f}")
    print("align s: wall-clock seconds of GraphMatcher(ref, cand).match() (best of --repeat); cpu s: its process "
          "CPU time;\nus/(n log2 n): wall-clock time over n log2 n, n = nodes of the larger side; vs first: that "
          "ratio against the smallest size (1.0 = exactly n log n growth).")


if __name__ == "__main__":
    main()
