"""Verdicts on tensor pairs and the first-divergence frontier, on real recorded models."""

import io
import json
import math

import numpy
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdiff
from fxdiff.judge import Tolerance, compare_tensors
from fxdiff.ops import node_key


def test_tolerance_is_allclose_rule():
    ref = torch.tensor([1.0, 100.0, 0.0])
    assert compare_tensors(ref, ref + torch.tensor([0.0, 9e-4, 9e-6]), Tolerance(1e-5, 1e-5)).passed
    m = compare_tensors(ref, ref + torch.tensor([0.0, 2e-3, 0.0]), Tolerance(1e-5, 1e-5))
    assert not m.passed and m.mismatched == 1
    assert math.isclose(m.max_abs_diff, 2e-3, rel_tol=1e-3)


def test_nan_and_inf_compare_as_data():
    ref = torch.tensor([float("nan"), float("inf"), 1.0])
    assert compare_tensors(ref, ref.clone(), Tolerance(1e-5, 1e-5)).passed
    m = compare_tensors(ref, torch.tensor([1.0, float("inf"), 1.0]), Tolerance(1e-5, 1e-5))
    assert not m.passed and "NaN/Inf" in m.note
    assert math.isfinite(m.max_abs_diff)  # one NaN does not poison the statistics


def test_integer_tensors_must_be_equal():
    assert compare_tensors(torch.arange(4), torch.arange(4), Tolerance(1e-5, 1e-5)).passed
    assert not compare_tensors(torch.arange(4), torch.arange(4) + 1, Tolerance(atol=10)).passed


def test_layouts_are_aligned_before_comparing():
    ref = torch.randn(2, 3, 5)
    m = compare_tensors(ref, ref.permute(0, 2, 1).contiguous(), Tolerance(1e-5, 1e-5))
    assert m.passed and "permuted" in m.note
    assert not compare_tensors(ref, torch.randn(2, 3, 4), Tolerance(1e-5, 1e-5)).passed


def test_histogram_counts_every_element():
    ref = torch.zeros(1000)
    cand = ref.clone()
    cand[:10] = 1e-7
    cand[10:12] = 5.0
    m = compare_tensors(ref, cand, Tolerance(1e-5, 1e-5))
    assert sum(m.histogram) == 1000 and m.histogram[0] == 988


class Branches(nn.Module):
    """Two parallel branches joined at the end: each can diverge on its own."""

    def __init__(self, eps_a=1e-5, scale_b=1.0):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6, eps=eps_a))
        self.b = nn.Linear(6, 6)
        self.scale_b = scale_b
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)) + self.b(x) * self.scale_b)


def _build(**kw):
    torch.manual_seed(0)
    return Branches(**kw)


def test_frontier_reports_each_diverging_branch():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    ref = fxdiff.capture(_build(), (x,))
    report = fxdiff.compare(ref, _build(eps_a=0.5, scale_b=1.5))
    assert report.diverged
    first = report.first_divergence()["forward"]
    assert {e["ref_module"] for e in first} == {"a.1", ""}   # the LayerNorm, and the scaling mul at root
    assert all(e["max_abs_diff"] > 1e-3 for e in first)
    # nodes downstream of a divergence are not "first"
    assert not any(r.first_forward for r in report.nodes if r.ref_module == "head")


def test_clean_comparison_and_gradient_scale_invariance():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    ref = fxdiff.capture(_build(), (x,), loss=lambda out: out.sum() * 1e-9)
    report = fxdiff.compare(ref, _build(), loss=lambda out: out.sum() * 1e-9)
    assert not report.diverged
    assert report.summary()["nodes"]["backward_matches"] > 0
    # a tiny loss scale does not make a real gradient bug pass: scale only branch b's backward
    cand = _build()
    cand.b.weight.register_hook(lambda g: g * 1.01)
    report = fxdiff.compare(ref, cand, loss=lambda out: out.sum() * 1e-9)
    bad = [p.ref for p in report.params if not p.grad.passed]
    assert bad == ["b.weight"]


class Amplifier(nn.Module):
    """A gain of 100 after a linear layer: differences within tolerance become visible."""

    def __init__(self, nudge=0.0):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        with torch.no_grad():
            self.lin.weight.add_(nudge)

    def forward(self, x):
        return self.lin(x) * 100


def _amplifier(nudge=0.0):
    torch.manual_seed(0)
    return Amplifier(nudge)


def test_isolated_replay_tells_introduced_from_amplified(tmp_path):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    fxdiff.save(fxdiff.capture(_amplifier(), (x,)), tmp_path / "ref")
    ref = fxdiff.load(tmp_path / "ref")   # replay resolves the stored targets
    # a 1e-6 nudge of the weights stays within atol at the linear, then grows 100-fold
    amplified = fxdiff.compare(ref, _amplifier(nudge=1e-6), tolerance=Tolerance(atol=1e-5, rtol=0))
    (first,) = amplified.first_divergence()["forward"]
    assert first["op"] == "mul" and first["isolated"] == "amplified"
    # the branch test's LayerNorm eps is wrong in the candidate's own op: introduced there
    x6 = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    introduced = fxdiff.compare(fxdiff.capture(_build(), (x6,)), _build(eps_a=0.5))
    causes = {e["ref_module"]: e["isolated"] for e in introduced.first_divergence()["forward"]}
    assert causes["a.1"] == "introduced"


def test_values_past_float16s_range_compare_as_float16_holds_them_and_an_overflow_still_fails():
    """-3.4e38 (``finfo(float32).min``, a mask's -inf) against float16's -65504 is no difference; a
    float32 1e5 against a float16 that overflowed to inf is one."""
    ref = torch.tensor([1.0, -3.4e38, 2.0, -3.4e38])
    cand = torch.tensor([1.0, -65504.0, 2.0, -65504.0], dtype=torch.float16)
    m = compare_tensors(ref, cand, Tolerance())
    assert m.max_abs_diff == 0 and m.rms_diff == 0
    overflowed = compare_tensors(torch.tensor([1.0, 1e5]), torch.tensor([1.0, float("inf")], dtype=torch.float16),
                                 Tolerance())
    assert not overflowed.passed and "NaN/Inf" in overflowed.note


def test_float32_and_bfloat16_stand_ins_for_minus_infinity_compare_equal_and_float64_keeps_its_range():
    """T5 under bfloat16 autocast builds its causal mask from ``finfo(bfloat16).min`` (-3.3895e38),
    the float32 reference from ``finfo(float32).min`` (-3.4028e38): no value but such stand-ins lives
    past bfloat16's range. In float64 huge values are values."""
    ref = torch.tensor([0.0, torch.finfo(torch.float32).min, 1.5])
    cand = torch.tensor([0.0, torch.finfo(torch.bfloat16).min, 1.5])
    assert compare_tensors(ref, cand, Tolerance()).max_abs_diff == 0
    m = compare_tensors(torch.tensor([1e39, 1.0], dtype=torch.float64),
                        torch.tensor([2e39, 1.0], dtype=torch.float64), Tolerance())
    assert m.max_abs_diff == 1e39 and not m.passed


def test_float64_values_whose_squares_overflow_are_still_compared():
    """Was a pass whatever they held: the RMS of 1e200s is infinite in float64, and every relative
    error divided by it was zero."""
    ref = torch.tensor([1e200, -3e200, 1.0], dtype=torch.float64)
    assert compare_tensors(ref, ref.clone(), Tolerance()).passed
    m = compare_tensors(ref, ref * torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64), Tolerance())
    assert not m.passed and math.isfinite(m.ref_rms) and m.ref_rms > 1e200


class NoGradBlock(nn.Module):
    """Three layers; with ``bug``, the middle one runs under ``torch.no_grad`` (a port's mistake)."""

    def __init__(self, bug=False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.bug = bug

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad() if self.bug else torch.enable_grad():
            h = torch.tanh(self.b(h))
        return self.c(h)


def test_a_block_run_without_autograd_is_named_where_the_gradient_stops(tmp_path):
    """The gradient stops at the block's output: the first backward divergence, its reason the
    autograd-off run (not a custom backward)."""
    torch.manual_seed(0)
    ref, x = NoGradBlock(), torch.randn(3, 4)
    port = NoGradBlock(bug=True)
    port.load_state_dict(ref.state_dict())
    cap = fxdiff.capture(ref, (x,))
    fxdiff.capture(port, (x,), stream_to=tmp_path / "port")   # the autograd-off mark survives the file
    for report in (fxdiff.compare(cap, port), fxdiff.compare(cap, tmp_path / "port")):
        assert report.verdict == "diverged"
        first, = [r for r in report.nodes if r.first_backward]
        assert first.op == "tanh" and first.ref_module == "" and first.blame is None
        assert "the candidate made it with autograd off" in first.isolated_backward_why
        assert {p.ref for p in report.params if not p.grad.passed} == {"a.weight", "a.bias", "b.weight", "b.bias"}


class NoGradScale(nn.Module):
    """A scale made from a weight; with ``bug``, under ``torch.no_grad`` (its gradient cut)."""

    def __init__(self, bug=False):
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 2)
        self.bug = bug

    def forward(self, x):
        with torch.no_grad() if self.bug else torch.enable_grad():
            scale = self.a.weight.norm()
        return self.c(self.a(x) / scale)


def test_a_gradient_cut_at_a_parameter_is_the_first_divergence():
    torch.manual_seed(0)
    ref, x = NoGradScale(), torch.randn(3, 4)
    port = NoGradScale(bug=True)
    port.load_state_dict(ref.state_dict())
    report = fxdiff.compare(fxdiff.capture(ref, (x,)), port)
    first, = [r for r in report.nodes if r.first_backward]
    assert first.op == "norm" and "autograd off" in first.isolated_backward_why
    assert [p.ref for p in report.params if not p.grad.passed] == ["a.weight"]


class TwoTowers(nn.Module):
    """Image and text features made into logits as CLIP does. The reference's order is open_clip's,
    ``s * img @ txt.T``; ``hf_order`` computes Hugging Face's ``((txt @ img.T) * s).T``, whose last
    ops pair with none of the reference's. Porting bugs: ``no_exp`` (the scale used as stored),
    ``text_rolled`` (the text features in another order)."""

    def __init__(self, hf_order=False, no_exp=False, text_rolled=False):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
        self.txt = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8))
        self.img_proj, self.txt_proj = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(1.5))
        self.hf_order, self.no_exp, self.text_rolled = hf_order, no_exp, text_rolled

    def forward(self, image, text):
        i = nn.functional.normalize(self.img_proj(self.img(image)), dim=-1)
        t = self.txt(text)
        t = nn.functional.normalize(self.txt_proj(t.roll(1, -1) if self.text_rolled else t), dim=-1)
        s = self.logit_scale if self.no_exp else self.logit_scale.exp()
        return ((t @ i.T) * s).T if self.hf_order else s * i @ t.T


def _towers(**kw):
    torch.manual_seed(0)
    ref = TwoTowers()
    return ref, _port(ref, **kw)


def _port(ref, **kw):
    port = TwoTowers(**kw)
    port.load_state_dict(ref.state_dict())
    return port


def _tower_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 6, generator=g), torch.randn(3, 5, generator=g)


def test_an_output_made_by_ops_that_pair_with_none_is_the_first_forward_divergence():
    ref, port = _towers(hf_order=True)
    cap = fxdiff.capture(ref, _tower_inputs())
    assert not fxdiff.compare(cap, port).diverged   # the same logits, the other order
    report = fxdiff.compare(cap, _port(ref, hf_order=True, no_exp=True))
    assert report.diverged and not any(r.first_forward for r in report.nodes)
    entry, = report.first_divergence()["forward"]
    assert entry["output"] == "0" and "exp" in entry["unpaired_ops"]["ref"]
    assert "exp" not in " ".join(entry["unpaired_ops"]["cand"])
    # the projections' gradients differ because the logits do: not a backward bug of their own
    assert all(e["consequence_of_forward"] for e in report.first_divergence()["backward"])
    text = _text(report)
    assert "forward: output 0" in text and "made after the last compared values" in text
    assert "backward only" not in text and "forward: none" not in text
    assert fxdiff.Report.from_dict(json.loads(json.dumps(report.to_dict()))).outputs[0].frontier == \
        report.outputs[0].frontier


def test_a_forward_bug_in_one_tower_explains_the_other_towers_gradients():
    """d logits / d image features = upstream gradient @ text features: the image side's gradient
    differs because the text tower's forward does, though its own forward matches."""
    ref, port = _towers(text_rolled=True)
    report = fxdiff.compare(fxdiff.capture(ref, _tower_inputs()), port)
    forward, = report.first_divergence()["forward"]
    assert forward["op"] == "linear" and forward["blame"] == "cand-only roll (roll)"
    backward = report.first_divergence()["backward"]
    assert all(e["consequence_of_forward"] for e in backward)
    rows = {r.ref_node: r for r in report.nodes}
    assert any(rows[e["ref_node"]].forward.passed for e in backward)   # the image side of the product
    assert "backward only" not in _text(report)


def test_under_autocast_ops_kept_in_float32_are_judged_at_autocasts_precision():
    """The norms and ``exp`` run in float32 under bfloat16 autocast, on what the bfloat16 matrix
    products before them rounded; where their consumers pair with nothing (the logits, computed in
    another order), nothing brings that noise to them."""
    ref, port = _towers(hf_order=True)
    cap = fxdiff.capture(ref, _tower_inputs())
    report = fxdiff.compare(cap, port, autocast="bfloat16")
    assert report.verdict == "within noise", _text(report)
    assert fxdiff.compare(cap, _port(ref, hf_order=True, no_exp=True), autocast="bfloat16").diverged


def _text(report) -> str:
    from rich.console import Console
    from fxdiff.render.text import render
    console = Console(width=200, record=True, file=io.StringIO(), color_system=None)
    console.print(render(report))
    return console.export_text()


def test_the_summary_says_when_no_gradient_was_compared():
    ref, port = _towers()
    kept_values = fxdiff.capture(ref, _tower_inputs(), keep="values")
    text = _text(fxdiff.compare(kept_values, port))
    assert "op gradients:        none compared" in text and "op values:           13 match (100.0%), 0 differ" in text


class MHABlock(nn.Module):
    """A norm, self-attention through ``nn.MultiheadAttention``, a head."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.norm(x)
        return self.head(self.attn(x, x, x, need_weights=False)[0])


class WrittenAttention(nn.Module):
    """``MHABlock`` as Hugging Face writes attention: q, k and v projections and
    ``scaled_dot_product_attention``; ``scale``: a porting bug."""

    def __init__(self, scale=None):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.q, self.k, self.v, self.out = (nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)
        self.scale = scale

    def forward(self, x):
        b, n, _ = x.shape
        x = self.norm(x)
        heads = [p(x).view(b, n, 2, 4).transpose(1, 2) for p in (self.q, self.k, self.v)]
        o = nn.functional.scaled_dot_product_attention(*heads, scale=self.scale)
        return self.head(self.out(o.transpose(1, 2).reshape(b, n, 8)))

    def load_from(self, ref: MHABlock) -> "WrittenAttention":
        with torch.no_grad():
            for proj, w, bias in zip((self.q, self.k, self.v), ref.attn.in_proj_weight.chunk(3),
                                     ref.attn.in_proj_bias.chunk(3)):
                proj.weight.copy_(w)
                proj.bias.copy_(bias)
            self.out.load_state_dict(ref.attn.out_proj.state_dict())
            self.norm.load_state_dict(ref.norm.state_dict())
            self.head.load_state_dict(ref.head.state_dict())
        return self


def test_nn_multihead_attention_is_recorded_op_by_op_and_a_bug_beside_it_named():
    """``nn.MultiheadAttention`` hands its whole forward to the recorder as one op
    (``multi_head_attention_forward``); it is recorded as the ops it runs (its packed projection, q, k
    and v items of it, ``sdpa``, the output projection), which pair with a port's separate
    projections. A wrong scale in the port was found at the opaque op with no story; a q and k
    loaded into each other's rows of the packed projection, with none either."""
    torch.manual_seed(0)
    ref, x = MHABlock(), torch.randn(2, 5, 8)
    cap = fxdiff.capture(ref, (x,))
    ops = {node_key(n) for n in cap.graph.nodes}
    assert {"linear", "sdpa"} <= ops and "multi_head_attention_forward" not in ops
    assert not fxdiff.compare(cap, WrittenAttention().load_from(ref)).diverged
    entry, = fxdiff.compare(cap, WrittenAttention(scale=1 / 4).load_from(ref)).first_divergence()["forward"]
    assert entry["blame"] == "the attention's scale differs: 0.5 (1/sqrt(4)) against 0.25 (1/4)"
    assert entry["ref_module"] == "attn"
    swapped = MHABlock()   # the port is nn.MultiheadAttention, its q and k rows crossed
    swapped.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for t in (swapped.attn.in_proj_weight, swapped.attn.in_proj_bias):
            t[:8], t[8:16] = t[8:16].clone(), t[:8].clone()
    entry, = fxdiff.compare(fxdiff.capture(WrittenAttention().load_from(ref), (x,)), swapped).first_divergence()["forward"]
    assert entry["blame"] == ("the attention's query and key swapped: the candidate passes as the query what the "
                              "reference passes as the key (made in k), and the other way round"), entry
    written = WrittenAttention().load_from(ref)   # the other way round: the fused projection the reference's
    with torch.no_grad():
        for a, b in ((written.q.weight, written.k.weight), (written.q.bias, written.k.bias)):
            a_, b_ = a.clone(), b.clone()
            a.copy_(b_)
            b.copy_(a_)
    entry, = fxdiff.compare(cap, written).first_divergence()["forward"]
    assert entry["blame"] == ("the parts of a fused projection in each other's places: here the reference reads "
                              "[0:8] of attn's output, which the candidate computes in k; the candidate reads q's, "
                              "which pairs with [8:16]"), entry
    # its attention dropout, drawn inside the sdpa it calls, is recorded and replayed like any dropout
    dropping = MHABlock()
    dropping.attn.dropout = 0.5
    cap = fxdiff.capture(dropping, (x,), mode="train", keep_dropout=True)
    assert "dropout" in {node_key(n) for n in cap.graph.nodes}
    assert fxdiff.compare(cap, dropping).verdict == "match"


class Heads(nn.Module):
    """A body and a head; with ``hidden``, the body's output returned too (as Hugging Face models
    return hidden states)."""

    def __init__(self, hidden=False):
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.hidden = hidden

    def forward(self, x):
        h = self.body(x)
        return {"out": self.head(h), **({"hidden": h} if self.hidden else {})}


def test_gradients_seeded_from_an_output_on_one_side_only_are_trained_and_not_compared():
    torch.manual_seed(0)
    ref, x = Heads(), torch.randn(3, 4)
    cand = Heads(hidden=True)
    cand.load_state_dict(ref.state_dict())
    report = fxdiff.compare(fxdiff.capture(ref, (x,)), fxdiff.capture(cand, (x,)))
    s = report.summary()
    assert s["tensors"]["trained"] == 4 and s["tensors"]["buffers_or_frozen"] == 0
    assert s["uncompared"]["param_grads"] == 2 and s["param_grads"]["matched"] == 2
    text = _text(report)
    assert "gradients not compared, seeded from different outputs on each side: body.weight, body.bias" in text
    assert "parameter gradients: 2 match, 0 differ, 2 not compared" in text


def _bn_port_with_running_stats_swapped():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        ref[1].running_mean.uniform_(-1, 1)
        ref[1].running_var.uniform_(0.5, 2)
    port = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    state = ref.state_dict()
    state["1.running_mean"], state["1.running_var"] = state["1.running_var"], state["1.running_mean"]
    port.load_state_dict(state)
    return ref, port, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_buffers_used_in_each_others_place_are_named():
    """Paired by content, the running mean pairs with the port's running variance: the matched
    batch_norm ops read them in each other's place, which the report says."""
    ref, port, x = _bn_port_with_running_stats_swapped()
    report = fxdiff.compare(fxdiff.capture(ref, (x,)), port)
    assert report.diverged
    swapped = {p.ref: p for p in report.params if not p.value.passed}
    assert set(swapped) == {"1.running_mean", "1.running_var"}
    assert "used in each other's place" in swapped["1.running_mean"].value.note
    assert any(w.startswith("1.running_mean holds the candidate's 1.running_var") for w in report.warnings)


def test_buffers_updated_their_own_way_pair_by_the_argument_they_are_read_at():
    """In train mode batch norm normalises by the batch's statistics (the outputs agree) and updates
    the running ones, which then pair by content with nothing: they pair as the same argument of the
    matched batch_norm ops, and differ (it said 'match, bit for bit')."""
    ref, port, x = _bn_port_with_running_stats_swapped()
    report = fxdiff.compare(fxdiff.capture(ref, (x,), mode="train"), port)
    assert report.diverged and not report.unmatched.ref_params
    stats = {p.ref: p for p in report.params if p.ref.startswith("1.running")}
    assert {k: p.cand for k, p in stats.items()} == {"1.running_mean": ["1.running_mean"],
                                                     "1.running_var": ["1.running_var"]}
    assert not any(p.value.passed for p in stats.values())


def test_a_live_candidate_run_in_another_mode_than_the_capture_says_so():
    ref, port, x = _bn_port_with_running_stats_swapped()
    cap = fxdiff.capture(ref, (x,))
    assert not fxdiff.compare(cap, ref).warnings
    assert "the captures differ in mode: eval vs train" in fxdiff.compare(cap, ref, mode="train").warnings


class Bottleneck(nn.Module):
    """A ResNet bottleneck that downsamples in its 3x3 conv, or (``stride_on_1x1``, a porting bug
    of Hugging Face's ``downsample_in_bottleneck``) in the 1x1 before it."""

    def __init__(self, stride_on_1x1=False):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1, stride=2 if stride_on_1x1 else 1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=1 if stride_on_1x1 else 2, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv3, self.head = nn.Conv2d(4, 6, 1, bias=False), nn.Linear(6, 2)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.head(self.conv3(y).mean((2, 3)))


def test_an_op_whose_output_size_differs_is_where_the_divergence_starts():
    """Its weight pairs it with its counterpart although their outputs differ in size: the first
    divergence is the 1x1 conv the stride moved to (it was the 3x3 after it)."""
    torch.manual_seed(0)
    ref = Bottleneck()
    port = Bottleneck(stride_on_1x1=True)
    port.load_state_dict(ref.state_dict())
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 4, 8, 8),)), port)
    entry, = report.first_divergence()["forward"]
    assert (entry["ref_module"], entry["cand_module"], entry["op"]) == ("conv1", "conv1", "conv")
    assert entry["isolated"] == "introduced"


class PickedToken(nn.Module):
    """A norm over every token then the first one picked (open_clip's ``ln_post``), or, with
    ``pick_first``, the token picked and then normed (Hugging Face's ``post_layernorm``): equal."""

    def __init__(self, pick_first=False):
        super().__init__()
        self.proj, self.norm, self.head = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2)
        nn.init.uniform_(self.norm.weight, 0.5, 1.5)
        self.pick_first = pick_first

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.norm(h[:, 0]) if self.pick_first else self.norm(h)[:, 0])


def test_one_op_applied_to_inputs_of_other_sizes_is_not_a_divergence():
    """The norm's weight pairs the two norms, whose outputs differ in size because their inputs do:
    the ops around them run in another order, which is no divergence (it was one, 'shape (2, 5, 8)
    vs (2, 8)', once ops of one weight paired whatever their sizes)."""
    torch.manual_seed(0)
    ref = PickedToken()
    port = PickedToken(pick_first=True)
    port.load_state_dict(ref.state_dict())
    assert not fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 5, 6),)), port).diverged


class Positions(nn.Module):
    """A table of positions added to a conv's output: as a buffer (openai-whisper's encoder) or,
    with ``lookup``, looked up by position from a frozen embedding and then added (Hugging Face's
    ``WhisperEncoder``)."""

    def __init__(self, lookup=False):
        super().__init__()
        self.conv, self.head = nn.Conv1d(3, 8, 3, padding=1), nn.Linear(8, 2)
        if lookup:
            self.positions = nn.Embedding(10, 8).requires_grad_(False)
        else:
            self.register_buffer("positions", torch.randn(10, 8))
        self.lookup = lookup

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)
        return self.head(torch.relu(h + (self.positions(torch.arange(10)) if self.lookup else self.positions)))


def test_a_table_added_is_not_the_same_table_looked_up():
    """The two tables pair by content, but the reference's add (activations + table) is not the
    candidate's lookup of the table: they were paired by their users' sizes, and a correct Whisper
    port was DIVERGED at 'encoder add, cand embed_positions embedding'."""
    torch.manual_seed(0)
    ref, port = Positions(), Positions(lookup=True)
    port.load_state_dict({**ref.state_dict(), "positions.weight": ref.positions}, strict=False)
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(1, 3, 10),)), port)   # the sum's size is the table's
    assert report.verdict == "match", _text(report)


class Body(Heads):
    """``Heads`` returning its body's output alone, by another name: none of its outputs pairs."""

    def forward(self, x):
        return {"features": self.body(x)}


def test_a_match_with_no_gradient_compared_says_it_is_forward_only():
    """No output pairs, so the candidate's backward has no seed: the values that pair match, and
    the verdict says nothing behind them was compared (it said 'MATCH, bit for bit')."""
    torch.manual_seed(0)
    ref, x = Heads(), torch.randn(3, 4)
    cand = Body()
    cand.load_state_dict(ref.state_dict())
    report = fxdiff.compare(fxdiff.capture(ref, (x,)), cand)
    assert not report.diverged
    assert _text(report).startswith("MATCH, bit for bit; forward only: no gradient was compared")


class WeightNormed(nn.Module):
    """Weight-normed convolutions (EnCodec's, HiFi-GAN's): torch._weight_norm makes each weight."""

    def __init__(self):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.a, self.b = wn(nn.Conv1d(2, 4, 3, padding=1)), wn(nn.Conv1d(4, 2, 3, padding=1))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_weight_norm_gain_ported_wrong_is_introduced_at_the_weight_norm():
    """torch._weight_norm is private, so it was off the replay allowlist: 'introduced here or
    amplified is not known'."""
    torch.manual_seed(0)
    ref, port = WeightNormed(), WeightNormed()
    state = ref.state_dict()
    gain = "b.parametrizations.weight.original0"
    port.load_state_dict({**state, gain: state[gain] * 1.5})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(1, 2, 16),)), port)
    entry, = report.first_divergence()["forward"]
    assert (entry["ref_module"], entry["op"], entry["isolated"]) == ("b.parametrizations.weight.0", "_weight_norm",
                                                                      "introduced"), entry


class Recurrent(nn.Module):
    """An LSTM between two projections (EnCodec's SEANet keeps one)."""

    def __init__(self):
        super().__init__()
        self.inp, self.lstm, self.out = nn.Linear(3, 4), nn.LSTM(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.lstm(self.inp(x))[0])


def test_lstm_gates_converted_in_another_order_are_a_difference_not_a_layout():
    """Rows permuted in blocks (gates i, f, g, o stored as i, g, f, o) were accepted as a layout:
    'parameter and buffer values: all match', the LSTM's output 'compared with its features
    reordered like the weight'. An LSTM's output does not follow its weight's rows."""
    torch.manual_seed(0)
    ref, port = Recurrent(), Recurrent()
    order = torch.cat([torch.arange(0, 4), torch.arange(8, 12), torch.arange(4, 8), torch.arange(12, 16)])
    port.load_state_dict({k: v[order] if k.startswith("lstm.") else v for k, v in ref.state_dict().items()})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(5, 2, 3),)), port)
    failed = {p.ref for p in report.params if p.value is not None and not p.value.passed}
    assert failed == {f"lstm.{w}_{x}_l0" for w in ("weight", "bias") for x in ("ih", "hh")}
    assert any("lstm.weight_ih_l0 is the candidate's with its 16 rows in another order" in w for w in report.warnings)
    first = report.first_divergence()["forward"]
    assert {(e["ref_module"], e["op"], e["isolated"]) for e in first} == {("lstm", "lstm", "introduced")}, first


class Causal(nn.Module):
    """Causal self-attention: scaled and masked by sdpa itself (openai-whisper's), or (``port``) its
    query scaled first and a mask built and passed (Hugging Face's), ``diagonal`` its first
    masked diagonal above the main one (2: each token also sees the next, a port's bug)."""

    def __init__(self, port=False, diagonal=1):
        super().__init__()
        self.qkv, self.port, self.diagonal = nn.Linear(8, 24), port, diagonal

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        if not self.port:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.diagonal is None:   # no mask at all
            return F.scaled_dot_product_attention(q * 0.5, k, v, scale=1.0)
        mask = torch.full((5, 5), float("-inf")).triu(self.diagonal)
        return F.scaled_dot_product_attention(q * 0.5, k, v, attn_mask=mask[None, None], scale=1.0)


def test_a_causal_mask_off_by_one_is_named_as_the_positions_it_masks():
    """The divergence was blamed on the port's query scale alone, which the correct port runs too;
    then on that scale 'or the side input it alone passes, built by triu'; now on what each side
    masks, is_causal against the mask built and passed."""
    torch.manual_seed(0)
    ref, x = Causal(), torch.randn(1, 5, 8)
    ports = [Causal(port=True, diagonal=d) for d in (1, 2)]
    for port in ports:
        port.load_state_dict(ref.state_dict())
    cap = fxdiff.capture(ref, (x,))
    assert not fxdiff.compare(cap, ports[0]).diverged
    first = next(r for r in fxdiff.compare(cap, ports[1]).nodes if r.first_forward)
    assert first.op == "sdpa" and first.blame[0] == (
        "the attention's mask differs: the reference masks 8 positions the candidate does not (the first [0, 0, 0, 1]), "
        "the candidate 0 the reference does not"), first.blame
    # with no mask in its place, the flag is the difference (sdpa's is_causal, which torch's own list
    # of its parameters leaves out, read from its docstring)
    unmasked = Causal(port=True, diagonal=None)
    unmasked.load_state_dict(ref.state_dict())
    first = next(r for r in fxdiff.compare(cap, unmasked).nodes if r.first_forward)
    assert first.blame[0] == "its arguments differ: is_causal True against False", first.blame


class TimeFirst(nn.Module):
    """Residual layers, in (time, batch, features) as fairseq runs them, or (``batch_first``) in
    (batch, time, features) as Hugging Face does."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.layers, self.batch_first = nn.ModuleList(nn.Linear(4, 4) for _ in range(40)), batch_first

    def forward(self, x):   # x: (batch, time, features)
        h = x if self.batch_first else x.transpose(0, 1)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return h if self.batch_first else h.transpose(0, 1)


def test_values_compared_transposed_stand_in_for_each_other_in_the_replay():
    """The replay took only pairs of one shape as its boundary: a bias not copied, behind values of
    the other layout, was 'not replayed in isolation: more than 64 of the candidate's ops lie
    between ...' (a fair-esm port's)."""
    torch.manual_seed(0)
    ref, port = TimeFirst(), TimeFirst(batch_first=True)
    port.load_state_dict({**ref.state_dict(), "layers.39.bias": torch.zeros(4)})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 5, 4),)), port)
    entry, = report.first_divergence()["forward"]
    assert (entry["ref_module"], entry["op"], entry["isolated"]) == ("layers.39", "linear", "introduced"), entry
    clean = TimeFirst(batch_first=True)
    clean.load_state_dict(ref.state_dict())
    assert not fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 5, 4),)), clean).diverged


class Chain(nn.Module):
    """``TimeFirst`` without residuals: one long chain of ops."""

    def __init__(self, batch_first=False, depth=400):
        super().__init__()
        self.layers, self.batch_first = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth)), batch_first

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h if self.batch_first else h.transpose(0, 1)


def test_a_replay_counts_the_ops_of_a_deep_chain_and_stops_at_its_limit():
    """The limit counted the ops replayed so far, which a chain reaches only on its way back: with
    no boundary on it, a chain deeper than Python's recursion limit crashed (RecursionError)."""
    from fxdiff.judge.isolate import MAX_BLOCK, replay
    torch.manual_seed(0)
    ref, port = Chain(), Chain(batch_first=True)
    port.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 4)
    r, c = fxdiff.capture(ref, (x,)), fxdiff.capture(port, (x,))
    last = [n.name for n in c.graph.nodes if n.op == "call_function"][-1]
    why = replay(r, c, last, {"args_0": "args_0"}, r.values["args_0"])
    assert why == f"more than {MAX_BLOCK} of the candidate's ops lie between {last} and values that match the reference"


class Rotated(nn.Module):
    """Two layers scaling by a table of frequencies: one table a layer (fair-esm's rotary
    embeddings), or (``shared``) one table for both (Hugging Face's ESM), computed with ``base``."""

    def __init__(self, shared=False, base=10000.0):
        super().__init__()
        self.lin = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        table = 1.0 / base ** (torch.arange(0, 4, 2) / 4)
        if shared:
            self.register_buffer("inv_freq", table)
        else:
            for layer in self.lin:
                layer.register_buffer("inv_freq", table.clone())
        self.shared = shared

    def forward(self, x):
        for layer in self.lin:
            x = torch.tanh(layer(x) * (self.inv_freq if self.shared else layer.inv_freq).repeat(2))
        return x


def test_a_table_kept_once_pairs_with_each_copy_of_it_and_shows_a_difference():
    """Content pairs one tensor with one: the reference's second copy was 'no counterpart', and a
    table computed with another base, unpaired on both sides, passed silently."""
    torch.manual_seed(0)
    ref, x = Rotated(), torch.randn(3, 4)
    port = Rotated(shared=True)
    port.load_state_dict({k: v for k, v in ref.state_dict().items() if "inv_freq" not in k}, strict=False)
    report = fxdiff.compare(fxdiff.capture(ref, (x,)), port)
    assert report.verdict == "match" and not report.unmatched.ref_params
    bug = Rotated(shared=True, base=500.0)
    bug.load_state_dict({k: v for k, v in ref.state_dict().items() if "inv_freq" not in k}, strict=False)
    report = fxdiff.compare(fxdiff.capture(ref, (x,)), bug)
    assert {p.ref for p in report.params if p.value is not None and not p.value.passed} == \
        {"lin.0.inv_freq", "lin.1.inv_freq"}


class NormAct(nn.BatchNorm2d):
    """A batch norm that applies its activation itself (timm's ``BatchNormAct2d``)."""

    def __init__(self, channels, act):
        super().__init__(channels)
        self.act = act()

    def forward(self, x):
        return self.act(super().forward(x))


class Stem(nn.Module):
    """A stem's conv, norm and activation (torchvision's EfficientNet; ``act``: timm's, a norm that
    applies the activation given), then depthwise and pointwise blocks."""

    def __init__(self, act=None):
        super().__init__()
        norm_act = (nn.BatchNorm2d(8), nn.SiLU()) if act is None else (NormAct(8, act),)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *norm_act)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                                                    nn.SiLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
                                      for _ in range(2)))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _stem_report(act):
    torch.manual_seed(0)
    ref, x = Stem().eval(), torch.randn(2, 3, 16, 16)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    cand = Stem(act).eval()
    cand.load_state_dict(ref.state_dict())
    return fxdiff.compare(fxdiff.capture(ref, (x,)), cand)


def test_a_hardswish_ported_for_a_silu_is_replayed_where_it_runs():
    """F.hardswish and F.hardsigmoid are missing from torch's list of overridable functions, so they
    were off the replay allowlist: 'introduced here or amplified is not known'."""
    assert not _stem_report(act=nn.SiLU).diverged
    first = next(r for r in _stem_report(act=nn.Hardswish).nodes if r.first_forward)
    assert (first.ref_module, first.cand_module, first.op, first.cause()) == ("stem.2", "stem.1.act", "silu",
                                                                              "introduced")



class Normed(nn.Module):
    def __init__(self, eps=1e-5):
        super().__init__()
        self.proj, self.norm, self.head = nn.Linear(4, 8), nn.LayerNorm(8, eps=eps), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


def test_a_constant_argument_ported_wrong_is_named():
    """A norm's eps, an attention's scale: the op was 'introduced here' with no word of why."""
    torch.manual_seed(0)
    ref, port = Normed(), Normed(eps=1e-1)
    port.load_state_dict(ref.state_dict())
    first = next(r for r in fxdiff.compare(fxdiff.capture(ref, (torch.randn(3, 4),)), port).nodes if r.first_forward)
    assert first.blame == ["its arguments differ: eps 1e-05 against 0.1", "norm", "norm"], first.blame


class WindowNorm(nn.Module):
    """A norm over an image's tokens: timm's Swin normalises the (batch, height, width, channels)
    image; Hugging Face's (``flat``) the (batch, tokens, channels) sequence, then views it as the image."""

    def __init__(self, flat: bool, eps=1e-5):
        super().__init__()
        self.flat, self.norm, self.head = flat, nn.LayerNorm(8, eps=eps), nn.Linear(8, 2)

    def forward(self, x):   # x: (batch, 16 tokens, 8)
        y = self.norm(x).view(-1, 4, 4, 8) if self.flat else self.norm(x.view(-1, 4, 4, 8))
        return self.head(y.roll(1, dims=1))


def test_an_argument_ported_wrong_is_named_where_a_view_of_the_op_pairs():
    """HF's Swin norm, viewed after it, pairs as its view with timm's norm: the eps its config got
    wrong was not looked for ('introduced here' at layer_norm against view)."""
    torch.manual_seed(0)
    ref, port = WindowNorm(flat=False), WindowNorm(flat=True, eps=1e-2)
    port.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 8)
    cand = fxdiff.capture(port, (x,))
    first = next(r for r in fxdiff.compare(fxdiff.capture(ref, (x,)), cand).nodes if r.first_forward)
    assert (first.op, node_key(cand.node(first.cand_node))) == ("layer_norm", "view"), first
    assert first.blame == ["its arguments differ: eps 1e-05 against 0.01", "norm", "norm"], first.blame


def test_a_square_weight_transposed_where_both_sides_read_it_alike_is_a_difference():
    """A square projection's weight loaded transposed, both sides reading it with ``F.linear``,
    paired as a layout ('transpose'): 'parameter values: all match', the op 'introduced here'."""
    torch.manual_seed(0)
    ref, port = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), nn.Sequential(nn.Linear(4, 4), nn.Tanh(),
                                                                                         nn.Linear(4, 2))
    port.load_state_dict({**ref.state_dict(), "0.weight": ref[0].weight.detach().t().contiguous()})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(3, 4),)), port)
    first = next(r for r in report.nodes if r.first_forward)
    assert first.blame[0] == ("0.weight is the candidate's 0.weight transposed, though both sides' linear ops "
                              "(linear, linear) read it as their weight: not a layout, a difference"), first.blame
    assert [p.ref for p in report.params if p.value is not None and not p.value.passed] == ["0.weight"]


class FusedAttention(nn.Module):
    """timm's attention: one qkv projection, split by reshape, permute and unbind, written out."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, 8))


class SplitAttention(nn.Module):
    """Hugging Face's: three projections and ``scaled_dot_product_attention``."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        b, n, _ = x.shape
        heads = [p(x).view(b, n, 2, 4).transpose(1, 2) for p in (self.q, self.k, self.v)]
        return self.proj(F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(b, n, 8))


def test_query_and_key_swapped_out_of_a_fused_reference_projection_are_named():
    """timm's fused qkv against HF's three projections, q and k converted into each other's
    places: 'introduced here' at the attention (written out on one side, sdpa on the other)."""
    torch.manual_seed(0)
    ref = FusedAttention()
    w, bias = ref.qkv.weight.detach(), ref.qkv.bias.detach()

    def port(order):
        cand = SplitAttention()
        for name, i in zip("qkv", order):
            getattr(cand, name).load_state_dict({"weight": w[8 * i:8 * i + 8], "bias": bias[8 * i:8 * i + 8]})
        cand.proj.load_state_dict(ref.proj.state_dict())
        return cand
    captured = fxdiff.capture(ref, (torch.randn(2, 5, 8),))
    assert not fxdiff.compare(captured, port((0, 1, 2))).diverged
    first = next(r for r in fxdiff.compare(captured, port((1, 0, 2))).nodes if r.first_forward)
    assert first.blame[0] == ("the attention's query and key swapped: the candidate passes as the query what the "
                              "reference passes as the key, and the other way round"), first.blame


def test_a_weight_norm_dropped_in_a_conversion_is_named():
    """wav2vec2's positional conv under weight norm, converted by copying ``v`` as the weight:
    'introduced here' at the conv, the ref-only weight norm, on parameters alone, unnamed."""
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 4), weight_norm(nn.Conv1d(4, 4, 3, padding=1), dim=2), nn.GELU())
    port = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 3, padding=1), nn.GELU())
    with torch.no_grad():
        ref[1].parametrizations.weight.original0.mul_(1.5)   # g, not the norm of v
    port.load_state_dict({"0.weight": ref[0].weight, "0.bias": ref[0].bias, "1.bias": ref[1].bias,
                          "1.weight": ref[1].parametrizations.weight.original1})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 4, 4),)), port)
    first = next(r for r in report.nodes if r.first_forward)
    assert first.blame[0] == ("ref-only _weight_norm (weight_norm) makes a tensor it reads from "
                              "1.parametrizations.weight.original1, 1.parametrizations.weight.original0; the candidate "
                              "reads 1.weight, the counterpart of 1.parametrizations.weight.original1, as it is"), \
        first.blame


def test_a_weight_norm_over_another_dim_is_named_on_its_parameters():
    """The port re-applies weight norm over the output channels (dim 0), not the kernel (dim 2): the
    weight agrees, so nothing in the forward pass differs; the direction parameter and its gradient
    did, with nothing said about why."""
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 4), weight_norm(nn.Conv1d(4, 4, 3, padding=1), dim=2), nn.GELU())
    port = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 3, padding=1), nn.GELU())
    with torch.no_grad():
        ref[1].parametrizations.weight.original0.mul_(1.5)
    port.load_state_dict({"0.weight": ref[0].weight, "0.bias": ref[0].bias, "1.bias": ref[1].bias,
                          "1.weight": ref[1].weight.detach()})
    port[1] = weight_norm(port[1], dim=0)
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 4, 4),)), port)
    assert report.diverged and not any(r.first_forward for r in report.nodes)
    direction = next(p for p in report.params if p.ref == "1.parametrizations.weight.original1")
    assert direction.grad.note == direction.value.note == "read by _weight_norm with dim 2 against 0", direction
    assert "1.parametrizations.weight.original1 is read by _weight_norm with dim 2 against 0 (the candidate's " \
        "1.parametrizations.weight.original1)" in report.warnings, report.warnings


class Trimmed(nn.Module):
    """wav2vec2's positional conv with an even kernel, one frame trimmed after it: the last
    (``x[:, :, :-1]``, Hugging Face's) or, ported wrong, the first (``x[..., 1:]``); ``same`` trims
    the last, written as ``x[..., :-1]``."""

    def __init__(self, index):
        super().__init__()
        self.index, self.conv, self.head = index, nn.Conv1d(4, 4, 2, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(x)[self.index].transpose(1, 2))


def test_an_index_ported_wrong_is_named_and_one_written_another_way_is_not():
    """The slice a port trims its conv's output with, wrong: 'introduced here' at the getitem."""
    torch.manual_seed(0)
    ref = Trimmed((slice(None), slice(None), slice(None, -1)))
    same, bug = Trimmed((Ellipsis, slice(None, -1))), Trimmed((Ellipsis, slice(1, None)))
    same.load_state_dict(ref.state_dict())
    bug.load_state_dict(ref.state_dict())
    captured = fxdiff.capture(ref, (torch.randn(2, 4, 6),))
    assert not fxdiff.compare(captured, same).diverged
    first = next(r for r in fxdiff.compare(captured, bug).nodes if r.first_forward)
    assert first.blame[0] == "its arguments differ: index [:, :, :-1] against [..., 1:]", first.blame


class BiasTable(nn.Module):
    """Swin's relative position bias: a table of biases looked up by an index buffer built in
    ``__init__`` (``wrong``: without the multiplier that makes its pairs distinct), under a name of
    each side's."""

    def __init__(self, name: str, wrong: bool = False):
        super().__init__()
        self.table, self.proj, self.name = nn.Parameter(torch.randn(9, 2)), nn.Linear(4, 4), name
        pos = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")).flatten(1)
        rel = (pos[:, :, None] - pos[:, None, :]).permute(1, 2, 0) + 1
        self.register_buffer(name, rel[..., 0] * (1 if wrong else 3) + rel[..., 1])

    def forward(self, x):   # x: (batch, heads 2, tokens 4, 4)
        bias = self.table[getattr(self, self.name).view(-1)].view(4, 4, 2).permute(2, 0, 1)
        return self.proj((x @ x.transpose(-1, -2) + bias).softmax(-1) @ x)


def test_an_index_buffer_built_another_way_is_named():
    """The buffer pairs with nothing (no content does), so no value of it differed: 'introduced
    here' at the lookup, 'parameter values: all match'; then named as a tensor that pairs with
    nothing, now with where the two indices differ."""
    torch.manual_seed(0)
    ref, bug = BiasTable("relative_position_index"), BiasTable("index", wrong=True)
    bug.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "relative_position_index"}, strict=False)
    first = next(r for r in fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 2, 4, 4),)), bug).nodes
                 if r.first_forward)
    assert first.blame[0] == ("its index differs at 12 of 16 elements (the first [0]: 4 against 2): the reference's "
                              "read from relative_position_index, the candidate's read from index"), first.blame


class ConvNorm(nn.Module):
    """wav2vec2's first conv block: a GroupNorm of one group per channel over time, or (``layer``)
    a LayerNorm over the channels, between transposes."""

    def __init__(self, layer: bool):
        super().__init__()
        self.layer, self.conv, self.head = layer, nn.Conv1d(1, 4, 3), nn.Linear(4, 2)
        self.norm = nn.LayerNorm(4) if layer else nn.GroupNorm(4, 4)

    def forward(self, x):
        y = self.conv(x)
        y = self.norm(y.transpose(1, 2)).transpose(1, 2) if self.layer else self.norm(y)
        return self.head(F.gelu(y).transpose(1, 2))


def test_a_norm_ported_as_another_is_named_as_the_two_ops():
    """GroupNorm ported as LayerNorm, the same weights: 'introduced here' with no word of the two norms."""
    torch.manual_seed(0)
    ref, bug = ConvNorm(layer=False), ConvNorm(layer=True)
    bug.load_state_dict(ref.state_dict())
    first = next(r for r in fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 1, 9),)), bug).nodes if r.first_forward)
    assert first.blame[0] == "computed with other ops: ref group_norm(eps=1e-05) against cand layer_norm(eps=1e-05)", \
        first.blame


class Upsample(nn.Module):
    """EnCodec's upsampling: a transposed conv trimmed by a slice, then a residual unit and its
    shortcut, which pads by nothing: by the number 0, or (``tensor_pad``, Hugging Face's) by a
    buffer holding 0."""

    def __init__(self, start: int, tensor_pad: bool):
        super().__init__()
        torch.manual_seed(0)
        self.start, self.tensor_pad = start, tensor_pad
        self.up, self.block, self.short = nn.ConvTranspose1d(4, 4, 4, stride=2), nn.Conv1d(4, 4, 3, padding=1), \
            nn.Conv1d(4, 4, 1)
        self.register_buffer("padding_total", torch.tensor(0))

    def forward(self, x):
        y = self.up(x)
        y = y[..., self.start:self.start + y.shape[-1] - 2]
        s = F.pad(y, (self.padding_total, self.padding_total)) if self.tensor_pad else F.pad(y, (0, 0))
        return self.block(F.elu(y)) + self.short(s)


def test_a_trim_ported_wrong_is_placed_at_the_slice_its_pair_of_paired_inputs():
    """The slice pairs only weakly (its consumers differ: a pad by 0 against one by a buffer), and a
    weak pair that differs with everything upstream agreeing was set aside as a look-alike: the
    divergence was placed at its consumers. Here both call one function on values that pair."""
    x = torch.randn(1, 4, 10)
    captured = fxdiff.capture(Upsample(0, tensor_pad=False), (x,))
    assert not fxdiff.compare(captured, Upsample(0, tensor_pad=True)).diverged
    first = [r for r in fxdiff.compare(captured, Upsample(2, tensor_pad=True)).nodes if r.first_forward]
    assert [(r.op, r.blame[0]) for r in first] == [("getitem", "its arguments differ: index [..., 0:20] against "
                                                               "[..., 2:22]")], first


class MaskedWindows(nn.Module):
    """Attention over shifted windows with the mask that keeps windows apart: a buffer built in
    ``__init__`` and added to the scores of an attention written out, as timm's Swin does; ``masked``
    False: a port that left it out, calling ``scaled_dot_product_attention`` where ``sdpa``."""

    def __init__(self, masked: bool, sdpa: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.masked, self.sdpa, self.qkv, self.proj = masked, sdpa, nn.Linear(8, 24), nn.Linear(8, 8)
        if masked:
            self.register_buffer("attn_mask", torch.tensor([0.0, -100.0]).repeat_interleave(2).expand(4, 4).clone())

    def forward(self, x):   # x: (batch, 4 tokens, 8)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.sdpa:
            return self.proj(F.scaled_dot_product_attention(q, k, v))
        scores = q @ k.transpose(-1, -2) * 8 ** -0.5
        if self.masked:
            scores = scores + self.attn_mask
        return self.proj(scores.softmax(-1) @ v)


def test_a_mask_buffer_left_out_of_a_port_is_named():
    """timm's shifted-window mask is a buffer; HF's port builds its own, and one that built none
    was 'introduced here' at the attention, the buffer listed among the unpaired; then named as a
    tensor that pairs with nothing; now as what the reference alone adds to the scores."""
    ref = MaskedWindows(masked=True)
    captured = fxdiff.capture(ref, (torch.randn(2, 4, 8),))
    stories = []
    for sdpa in (True, False):
        bug = MaskedWindows(masked=False, sdpa=sdpa)
        bug.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "attn_mask"})
        stories.append(next(r for r in fxdiff.compare(captured, bug).nodes if r.first_forward).blame[0])
    assert stories == ["the reference adds attn_mask to the attention's scores, the candidate nothing (max abs diff "
                       "100)",   # the add folded into the attention the candidate fuses
                       "ref-only add (add), reading attn_mask, which pairs with nothing"], stories


class SpecAugmented(nn.Module):
    """HF's wav2vec2 in train mode: frames picked by a mask made with numpy overwritten in place by a
    learned embedding (SpecAugment) before the positional conv; ``augment`` False: torchaudio's,
    which has none."""

    def __init__(self, augment: bool):
        super().__init__()
        torch.manual_seed(0)
        self.augment, self.proj, self.conv = augment, nn.Linear(4, 4), nn.Conv1d(4, 4, 3, padding=1)
        if augment:
            self.masked_spec_embed = nn.Parameter(torch.rand(4))

    def forward(self, x):   # x: (batch, 6 frames, 4)
        h = self.proj(x)
        if self.augment:
            h[torch.tensor(numpy.arange(6) % 3 == 0).expand(len(h), 6)] = self.masked_spec_embed
        return self.conv(h.transpose(1, 2))


def test_a_one_sided_write_of_a_mask_made_from_constants_is_named():
    """The in-place write reads the activations, a parameter and a mask made from constants: it
    was not taken for an op added to the computation, and the conv after it was 'introduced here'."""
    ref, port = SpecAugmented(augment=True), SpecAugmented(augment=False)
    port.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "masked_spec_embed"})
    first = next(r for r in fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 6, 4),)), port).nodes if r.first_forward)
    assert first.blame[0] == "ref-only setitem (setitem)", first.blame


class ShiftedWindows(nn.Module):
    """Swin's shifted windows: timm rolls the image, then pads it to whole windows; Hugging Face
    (``pad_first``) pads, then rolls. Where the image fits its windows, the pad is by 0. ``shift``
    None: no roll at all."""

    def __init__(self, pad_first: bool, shift: int = 2):
        super().__init__()
        self.pad_first, self.shift = pad_first, shift
        self.norm, self.mix, self.head = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):   # x: (batch, 4, 4, 8)
        x = self.norm(x)
        if self.shift is None:   # a port that forgot the shift
            x = F.pad(x, (0, 0, 0, 0, 0, 0))
        elif self.pad_first:
            x = F.pad(x, (0, 0, 0, 0, 0, 0)).roll((-self.shift, -self.shift), dims=(1, 2))
        else:
            x = F.pad(x.roll((-2, -2), dims=(1, 2)), (0, 0, 0, 0, 0, 0))
        return self.head(self.mix(x).flatten(1, 2)[:, :3])


def test_a_roll_and_a_pad_of_nothing_in_the_other_order_pair_and_a_wrong_shift_is_named():
    """HF's Swin pads, then rolls; timm's rolls, then pads (by 0 here). The rolls paired with
    nothing, and a wrong shift was blamed on 'a side input that differs: pad'."""
    torch.manual_seed(0)
    ref, port, bug = ShiftedWindows(pad_first=False), ShiftedWindows(pad_first=True), ShiftedWindows(True, shift=1)
    port.load_state_dict(ref.state_dict())
    bug.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 4, 8)
    captured = fxdiff.capture(ref, (x,))
    report = fxdiff.compare(captured, port)
    assert not report.diverged and "roll" not in {u.op for u in report.unmatched.ref}, report.unmatched.ref
    first = next(r for r in fxdiff.compare(captured, bug).nodes if r.first_forward)
    assert (first.op, first.blame[0]) == ("roll", "its arguments differ: shifts (-2, -2) against (-1, -1)"), first
    unshifted = ShiftedWindows(True, shift=None)
    unshifted.load_state_dict(ref.state_dict())
    first = next(r for r in fxdiff.compare(captured, unshifted).nodes if r.first_forward)
    assert first.blame[0] == "ref-only roll (roll)", first.blame   # behind the pad of nothing, a view


class ChannelsFirst(nn.Module):
    """An encoder returning (batch, features, time) as NeMo's does, or (``time_major``) (batch, time,
    features) as Hugging Face's Parakeet does."""

    def __init__(self, time_major=False):
        super().__init__()
        self.conv, self.time_major = nn.Conv1d(4, 6, 3, padding=1), time_major

    def forward(self, x):
        y = torch.tanh(self.conv(x))
        return y.transpose(1, 2) if self.time_major else y


def test_a_live_candidates_backward_starts_from_the_references_gradient_in_its_own_layout():
    """The output pairs through a transpose, but the seed of the candidate's backward was the
    reference's gradient reshaped: every gradient of a correct port differed."""
    torch.manual_seed(0)
    ref, port = ChannelsFirst(), ChannelsFirst(time_major=True)
    port.load_state_dict(ref.state_dict())
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 4, 7),), loss=lambda y: (y * y.detach()).sum()), port)
    assert report.verdict == "match", report.first_divergence()
    assert report.summary()["param_grads"]["matched"] == 2


class MaskedAttention(nn.Module):
    """Attention weights zeroed where masked after the softmax (NeMo's), or (``port``) left at the
    softmax's zeros, only whole padded rows zeroed (none here): equal values, gradients that
    differ only where the softmax's derivative is zero."""

    def __init__(self, port=False):
        super().__init__()
        self.q, self.k, self.v, self.port = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), port

    def forward(self, x, mask):
        scores = (self.q(x) @ self.k(x).transpose(1, 2)).masked_fill(mask, float("-inf"))
        weights = scores.softmax(-1)
        weights = weights.masked_fill(mask.all(-1, keepdim=True) if self.port else mask, 0.0)
        return weights @ self.v(x)


def test_a_gradient_that_differs_only_where_it_reaches_nothing_is_not_a_divergence():
    """A correct NeMo FastConformer port was DIVERGED: the gradient of the masked weights, which the
    softmax's derivative zeroes on the way back, differs; every gradient it reaches agrees."""
    torch.manual_seed(0)
    ref, port = MaskedAttention(), MaskedAttention(port=True)
    port.load_state_dict(ref.state_dict())
    x, mask = torch.randn(2, 5, 4), torch.rand(2, 5, 5) > 0.7
    mask[..., 0] = False   # no row masked whole
    report = fxdiff.compare(fxdiff.capture(ref, (x, mask)), port)
    assert report.verdict == "match", report.first_divergence()
    assert any("differ only where they reach none of their inputs' gradients" in w for w in report.warnings)
    assert report.summary()["param_grads"]["mismatched"] == 0


def test_a_live_candidates_inputs_may_be_given_as_a_spec_returns_them():
    """A dict of keyword arguments, a tuple of positional ones or an (args, kwargs) pair; a dict
    crashed (ValueError: its keys were split as args and kwargs)."""
    torch.manual_seed(0)
    model, x = Normed(), torch.randn(3, 4)
    cap = fxdiff.capture(model, (x,))
    for inputs in ({"x": x}, (x,), ((x,), {}), x):
        assert fxdiff.compare(cap, model, inputs=inputs).verdict == "match", type(inputs)
    with pytest.raises(fxdiff.FxdiffError, match="inputs: got int"):
        fxdiff.compare(cap, model, inputs=3)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        q, k, v = (proj(x).view(1, 5, 2, 2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 5, 4)


def test_separate_projections_given_each_others_weights_are_named_where_they_cross():
    """q and k each match the reference's k and q (their weights pair them so) and cross at the
    attention: it was 'introduced here' at the attention, with no word of a swap; then 'another
    input' there; now the weights loaded under each other's names."""
    torch.manual_seed(0)
    ref, port = Attention(), Attention()
    state = ref.state_dict()
    port.load_state_dict({**state, **{f"q.{w}": state[f"k.{w}"] for w in ("weight", "bias")},
                          **{f"k.{w}": state[f"q.{w}"] for w in ("weight", "bias")}})
    first = next(r for r in fxdiff.compare(fxdiff.capture(ref, (torch.randn(1, 5, 4),)), port).nodes
                 if r.first_forward)
    assert first.op == "sdpa" and first.blame[0] == ("parameters crossed: q.weight holds the values of the candidate's "
                                                     "k.weight, and the candidate's q.weight those of k.weight: names "
                                                     "crossed"), first.blame


class RelativeScores(nn.Module):
    """NeMo's relative-position attention scores: the query plus one learned bias meets the keys,
    plus another the positions (``torch.matmul``, or the method on the port's side)."""

    def __init__(self, method: bool = False, crossed: bool = False):
        super().__init__()
        self.q, self.k, self.pos = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
        self.pos_bias_u, self.pos_bias_v = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.method, self.crossed = method, crossed

    def forward(self, x, p):
        q, k, p = self.q(x), self.k(x), self.pos(p)
        mm = torch.Tensor.matmul if self.method else torch.matmul
        u, v = (self.pos_bias_v, self.pos_bias_u) if self.crossed else (self.pos_bias_u, self.pos_bias_v)
        return mm(q + v, p.transpose(-1, -2)) + mm(q + u, k.transpose(-1, -2))


def test_two_values_of_one_module_crossed_at_an_op_are_named_by_what_they_are_made_with():
    """The port's biases used in each other's places (NeMo's pos_bias_u and pos_bias_v): each
    q + bias pairs with the reference's other one by value, and they cross at the product with the
    positions, written ``torch.matmul`` on one side and ``Tensor.matmul`` on the other. It was
    'introduced here' (their targets differ) and, named by module, would name one module twice."""
    torch.manual_seed(0)
    ref, port = RelativeScores(), RelativeScores(method=True, crossed=True)
    port.load_state_dict(ref.state_dict())
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(3, 4), torch.randn(3, 4))), port)
    first = {r.ref_node: r.blame[0] for r in report.nodes if r.first_forward}   # both products
    assert set(first) == {"matmul", "matmul_1"}, first
    for node, (given, expected) in (("matmul", ("u", "v")), ("matmul_1", ("v", "u"))):
        assert first[node] == (f"another input: the candidate passes the counterpart of the reference's "
                               f"{'add_1' if given == 'u' else 'add'} (add, made with pos_bias_{given}) where the "
                               f"reference passes {'add' if given == 'u' else 'add_1'} (add, made with "
                               f"pos_bias_{expected})"), first[node]


class RotaryRef(nn.Module):
    """A Llama-style attention block as Hugging Face writes it: the rotary cos and sin computed in
    the forward from ``inv_freq`` once, at the model level, and grouped-query attention left to sdpa."""

    def __init__(self, width=32, heads=4, groups=2):
        super().__init__()
        self.heads, self.groups, self.dim = heads, groups, width // heads
        self.embed = nn.Embedding(50, width)
        self.q, self.k, self.v = (nn.Linear(width, n * self.dim, bias=False) for n in (heads, groups, groups))
        self.o = nn.Linear(width, width, bias=False)
        self.register_buffer("inv_freq", _inverse_frequencies(10_000.0, self.dim), persistent=False)

    def tables(self, t):
        freqs = torch.arange(t)[None, :, None].float() * self.inv_freq[None, None]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * 1.0, emb.sin() * 1.0   # (1, t, dim), scaled by attention_scaling

    def rotate(self, x, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x1, x2 = x[..., :self.dim // 2], x[..., self.dim // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, ids):
        x = self.embed(ids)
        cos, sin = self.tables(ids.shape[1])
        q, k, v = (p(x).view(*x.shape[:2], n, self.dim).transpose(1, 2)
                   for p, n in ((self.q, self.heads), (self.k, self.groups), (self.v, self.groups)))
        y = self.attend(self.rotate(q, cos, sin), self.rotate(k, cos, sin), v)
        return self.o(y.transpose(1, 2).reshape(x.shape)) + x

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _inverse_frequencies(base: float, dim: int) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)


class RotaryPort(RotaryRef):
    """The port, as litgpt writes it: cos and sin precomputed into buffers (``base``: a porting
    bug), rotated on the first ``rope_n_elem`` features (all of them here), and the key and value
    heads expanded for the query groups before sdpa."""

    def __init__(self, base=10_000.0):
        super().__init__()
        freqs = torch.arange(64)[:, None].float() * _inverse_frequencies(base, self.dim)[None]
        self.register_buffer("cos", torch.cat((freqs, freqs), dim=-1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((freqs, freqs), dim=-1).sin(), persistent=False)

    def tables(self, t):
        return self.cos[:t].unsqueeze(0), self.sin[:t].unsqueeze(0)

    def rotate(self, x, cos, sin):
        roped = super().rotate(x[..., :self.dim], cos, sin)
        return torch.cat((roped, x[..., self.dim:]), dim=-1)

    def attend(self, q, k, v):
        r = self.heads // self.groups
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1),
                                              is_causal=True)


@pytest.mark.skipif(torch.__version__ < "2.5", reason="sdpa's enable_gqa needs torch 2.5")
def test_a_wrong_rotary_base_is_blamed_on_the_tables_not_on_an_op_one_side_adds():
    """litgpt against Hugging Face Llama with the wrong RoPE base: the divergence at the rotated q
    and k (or at sdpa) was blamed on an op the port alone has and that is correct (the slice of
    the features to rotate here; litgpt's key/value head expansion, which the reference leaves to
    sdpa), and the rotary tables, which pair only weakly, were not named; then named as a value
    made another way at the rotation."""
    torch.manual_seed(0)
    ref, ids = RotaryRef().eval(), torch.randint(0, 50, (2, 12))
    captured = fxdiff.capture(ref, (ids,))
    for base, diverged in ((10_000.0, False), (500_000.0, True)):
        port = RotaryPort(base).eval()
        port.load_state_dict(ref.state_dict(), strict=False)
        report = fxdiff.compare(captured, port)
        assert report.diverged == diverged
    firsts = [r for r in report.nodes if r.first_forward]
    blamed = [r.blame for r in firsts if r.blame]
    # the tables themselves differ first (a slice of all the features a view, the rotation pairs for
    # certain): each side's way of making them is named
    assert firsts and all(r.blame for r in firsts), firsts
    assert {b[0] for b in blamed} == {
        f"a value each side computes from its parameters, buffers and constants alone differs: the reference's made "
        f"with arange, mul, cat, {f}, mul from inv_freq, the candidate's made with getitem from {f}" for f in ("cos", "sin")}, \
        blamed


class PooledStem(nn.Module):
    """torchvision's ResNet stem: conv, norm, in-place ReLU, max pool; then a residual block
    (``residual=False``: a port that forgot its add), its ReLU in place or not (Hugging Face's is not)."""

    def __init__(self, kernel=3, residual=True, inplace=True):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.block, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)
        self.kernel, self.residual, self.inplace = kernel, residual, inplace

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)), inplace=self.inplace)
        x = F.max_pool2d(x, self.kernel, stride=2, padding=1)
        y = self.block(x)
        x = F.relu(y + x if self.residual else y, inplace=self.inplace)
        return self.head(x.mean((2, 3)))


def _pooled_report(**port):
    torch.manual_seed(0)
    ref, x = PooledStem().eval(), torch.randn(2, 3, 16, 16)
    cand = PooledStem(**port).eval()
    cand.load_state_dict(ref.state_dict())
    return fxdiff.capture(ref, (x,)), fxdiff.compare(fxdiff.capture(ref, (x,)), cand)


def test_each_max_pool_is_stored_by_its_own_name_and_replayed_as_itself():
    """torch makes F.max_pool1d/2d/3d (and the adaptive and fractional ones) with boolean_dispatch:
    all were stored as its inner ``fn`` and replayed as whichever the allowlist saw last, max_pool3d,
    which fails on 4-d input: a wrong kernel could not be told introduced."""
    captured, report = _pooled_report(kernel=4)
    assert any(n.meta.get("fxdiff_target") == "torch.nn.functional.max_pool2d" for n in captured.graph.nodes)
    first = next(r for r in report.nodes if r.first_forward)
    assert (first.op, first.cause(), first.isolated_why) == ("max_pool2d", "introduced", None), first
    assert first.blame[0] == "its arguments differ: kernel_size 3 against 4", first.blame


def test_a_forgotten_residual_is_not_blamed_on_an_in_place_flag():
    """torchvision's ReLU runs in place, Hugging Face's does not: a port that forgot the residual
    add was blamed on 'its arguments differ: inplace True against False'."""
    _, report = _pooled_report(residual=False, inplace=False)
    first = next(r for r in report.nodes if r.first_forward)
    assert first.blame[0].startswith("ref-only add"), first.blame


def test_a_capture_that_stored_max_pools_by_their_inner_name_still_loads(tmp_path):
    """Captures written before max pools had their own names hold boolean_dispatch's ``fn``, which
    cannot tell them apart: they load, and those ops are never replayed."""
    import xxhash
    captured, _ = _pooled_report()
    path = fxdiff.save(captured, tmp_path / "old")
    text = (path / "graph.json").read_text().replace("torch.nn.functional.max_pool2d",
                                                    "torch.nn.functional.boolean_dispatch.<locals>.fn")
    (path / "graph.json").write_text(text)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["graph.json"] = {"bytes": len(text.encode()), "xxh3_64": xxhash.xxh3_64_hexdigest(text.encode())}
    (path / "manifest.json").write_text(json.dumps(manifest))
    old = fxdiff.load(path)
    assert [n.name for n in old.graph.nodes if n.meta.get("fxdiff_target", "").endswith("<locals>.fn")] == ["max_pool2d"]
    assert fxdiff.compare(old, captured).verdict == "match"


class Diluted(nn.Module):
    """A value (``t``) then a residual sum that dilutes its error (``u``) and a difference that brings
    it back (``v``): ``scale`` is a porting bug in ``t``."""

    def __init__(self, scale=2.0):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(16, 16), nn.Linear(16, 4)
        self.scale = scale

    def forward(self, x):
        t = self.lin1(x) * self.scale
        u = t + 6.0 * x
        return self.lin2(torch.tanh(u - 6.0 * x))


def test_a_value_after_a_divergence_lends_no_noise_even_where_it_passes():
    """timm's ViT against Hugging Face's with the class token's position left out, the port cast to
    bfloat16: the logits, 58% off, 'matched'. A node after the divergence passed on its own rounding
    (a residual add dilutes the error below bfloat16's), and its error, the bug's, then set the
    noise level of what followed, eight times larger at each step."""
    torch.manual_seed(0)
    ref, x = Diluted().eval(), torch.randn(8, 16)
    port = Diluted(scale=2.5).eval()
    port.load_state_dict(ref.state_dict())
    report = fxdiff.compare(fxdiff.capture(ref, (x,)), port, dtype=torch.bfloat16)
    by_node = {r.ref_node: r for r in report.nodes}
    assert by_node["add"].forward.passed and not by_node["sub"].forward.passed   # the sum dilutes, the difference does not
    assert not any(o.metrics.passed for o in report.outputs)
    assert [r.ref_node for r in report.nodes if r.first_forward] == ["mul"]
    # backward: the gradients before the divergent values carry its difference, not their noise
    assert not by_node["sub"].backward.passed and report.summary()["param_grads"]["mismatched"] >= 3


class Activated(nn.Module):
    """``F.gelu(x)`` as Hugging Face's GELUActivation calls it, or with ``approximate`` given (timm's
    nn.GELU), and a layer norm whose eps is passed by position or by keyword."""

    def __init__(self, approximate=None, eps_by_keyword=False):
        super().__init__()
        self.proj, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)
        self.approximate, self.eps_by_keyword = approximate, eps_by_keyword

    def forward(self, x):
        h = self.proj(x)
        h = F.gelu(h) if self.approximate is None else F.gelu(h, approximate=self.approximate)
        n = self.norm
        if self.eps_by_keyword:
            return F.layer_norm(h, n.normalized_shape, n.weight, n.bias, eps=1e-5)
        return F.layer_norm(h, n.normalized_shape, n.weight, n.bias, 1e-5)


def test_an_argument_one_side_leaves_to_its_default_is_compared_with_the_default():
    """HF calls F.gelu(x), timm passes approximate='tanh': only keywords both sides passed were
    compared, so the wrong GELU was 'introduced here' with no word of why; an argument passed by
    position on one side and by keyword on the other is the same argument."""
    torch.manual_seed(0)
    ref, x = Activated().eval(), torch.randn(4, 8)
    captured = fxdiff.capture(ref, (x,))
    same = Activated(approximate="none", eps_by_keyword=True).eval()
    same.load_state_dict(ref.state_dict())
    assert not fxdiff.compare(captured, same).diverged
    port = Activated(approximate="tanh", eps_by_keyword=True).eval()
    port.load_state_dict(ref.state_dict())
    first = next(r for r in fxdiff.compare(captured, port).nodes if r.first_forward)
    assert first.blame[0] == "its arguments differ: approximate 'none' against 'tanh'", first.blame


class AlwaysDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, training=True)


class Mlp(nn.Module):
    def __init__(self, dropout=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.drop = AlwaysDropout() if dropout else nn.Identity()

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class WithMlp(nn.Module):
    def __init__(self, dropout=False):
        super().__init__()
        self.mlp, self.head = Mlp(dropout), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(x + self.mlp(x))


def test_an_op_in_a_module_that_holds_nothing_matched_is_placed_by_its_parent():
    """A dropout left on in eval, in timm's ``mlp.drop2`` (which holds no other op): the story said
    'in <root> (cand blocks.0.mlp.drop2)', the module with nothing matched having no counterpart."""
    torch.manual_seed(0)
    ref, x = WithMlp().eval(), torch.randn(4, 8)
    port = WithMlp(dropout=True).eval()
    port.load_state_dict(ref.state_dict())
    first = next(r for r in fxdiff.compare(fxdiff.capture(ref, (x,)), port).nodes if r.first_forward)
    assert first.blame[0].startswith("cand-only dropout") and first.blame[1:] == ["mlp", "mlp.drop"], first.blame


def test_a_classifier_with_its_rows_reordered_is_named_and_its_weight_differs():
    """torchvision's ResNet against Hugging Face's with the classifier's rows (its classes) reordered
    in the conversion: the weight paired by content as 'identical rows, permuted' and its value was
    counted as matching, with the first divergence at the linear and no word of why."""
    torch.manual_seed(0)
    ref, x = WithMlp().eval(), torch.randn(4, 8)
    port = WithMlp().eval()
    state = ref.state_dict()
    state["head.weight"], state["head.bias"] = state["head.weight"][[1, 0]], state["head.bias"][[1, 0]]
    port.load_state_dict(state)
    report = fxdiff.compare(fxdiff.capture(ref, (x,)), port)
    first = next(r for r in report.nodes if r.first_forward)
    assert first.blame[0].startswith("head.weight is the candidate's head.weight with its rows in another order ([1, 0])")
    assert not next(p for p in report.params if p.ref == "head.weight").value.passed
    assert any(w.startswith("head.weight is the candidate's") for w in report.warnings)


class SeparateQKV(nn.Module):
    """Attention as Hugging Face's ViT writes it: q, k and v projections, each viewed into heads."""

    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def split(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x):
        y = F.scaled_dot_product_attention(self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(x.shape))


class FusedQKV(nn.Module):
    """timm's Attention: one qkv projection, split into heads by reshape, permute and unbind;
    ``order``: which of the fused blocks the port reads as q, k and v (a conversion bug)."""

    def __init__(self, width=16, heads=2, order=(0, 1, 2)):
        super().__init__()
        self.heads, self.order = heads, order
        self.qkv, self.o = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        parts = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = (parts[i] for i in self.order)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def test_q_and_k_read_from_each_others_block_of_a_fused_qkv_split_by_heads_are_named():
    """timm's ViT with q and k swapped in its fused qkv: the slices of the fused output pair with
    HF's q and k projections, but timm's query is a head-split item of it, which pairs with nothing,
    so the crossing was not seen; which block of the fused output each item reads is now worked out
    by replaying its views on the output's element numbers."""
    torch.manual_seed(0)
    ref, x = SeparateQKV().eval(), torch.randn(2, 5, 16)
    state = {"qkv.weight": torch.cat([ref.q.weight, ref.k.weight, ref.v.weight]),
             "qkv.bias": torch.cat([ref.q.bias, ref.k.bias, ref.v.bias]), "o.weight": ref.o.weight, "o.bias": ref.o.bias}
    captured = fxdiff.capture(ref, (x,))
    for order, crossed in (((0, 1, 2), None), ((1, 0, 2), ("k", "q"))):
        port = FusedQKV(order=order).eval()
        port.load_state_dict(state)
        report = fxdiff.compare(captured, port)
        assert report.diverged == bool(crossed)
    first = next(r for r in report.nodes if r.first_forward)
    assert first.blame[0] == ("the attention's query and key swapped: the candidate passes as the query what the "
                              "reference passes as the key (made in k), and the other way round"), first.blame
    # told by the values each side passes; a summary capture keeps none, and the pairs tell it
    first = next(r for r in fxdiff.compare(fxdiff.capture(ref, (x,), keep="summary"), port).nodes if r.first_forward)
    assert first.blame[0] == ("another input: the candidate passes what the reference computes in k where the "
                              "reference passes what it computes in q"), first.blame


class Positioned(nn.Module):
    """Tokens plus a learned position table, by the table's own name on each side (``table``: the
    name a port gives it)."""

    def __init__(self, table="pos"):
        super().__init__()
        self.proj, self.head, self.table = nn.Linear(8, 8), nn.Linear(8, 2), table
        self.register_parameter(table, nn.Parameter(torch.randn(1, 6, 8)))

    def forward(self, x):
        return self.head(torch.relu(self.proj(x) + getattr(self, self.table)))


def test_a_position_table_shifted_in_a_conversion_is_paired_by_the_add_that_reads_it_and_named():
    """timm's pos_embed rolled by one row against HF's position_embeddings: content left both
    unpaired ('no counterpart'), the add that reads them takes its arguments in any order so the
    role rule skipped it, and the first divergence at the add said nothing of the table."""
    torch.manual_seed(0)
    ref, x = Positioned().eval(), torch.randn(3, 6, 8)
    port = Positioned(table="pos_embed").eval()
    state = {("pos_embed" if k == "pos" else k): v for k, v in ref.state_dict().items()}
    state["pos_embed"] = torch.roll(state["pos_embed"], 1, dims=1)
    port.load_state_dict(state)
    report = fxdiff.compare(fxdiff.capture(ref, (x,)), port)
    assert not report.unmatched.ref_params and not next(p for p in report.params if p.ref == "pos").value.passed
    first = next(r for r in report.nodes if r.first_forward)
    assert first.blame[0] == "a tensor it reads differs: pos against the candidate's pos_embed", first.blame


class SharedReLUBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice, after the first convolution and
    after the residual add; ``separate``: Hugging Face's, an activation module for each, and
    ``last_relu=False`` a port that dropped the one after the add."""

    def __init__(self, separate=False, last_relu=True):
        super().__init__()
        self.conv1, self.conv2, self.head = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2)
        self.relu = nn.ReLU()
        if separate:
            self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.separate, self.last_relu = separate, last_relu

    def forward(self, x):
        y = self.conv2((self.act1 if self.separate else self.relu)(self.conv1(x))) + x
        if self.last_relu:
            y = (self.act2 if self.separate else self.relu)(y)
        return self.head(y.mean((2, 3)))


def test_a_one_sided_op_in_a_module_called_twice_is_placed_where_its_input_is():
    """torchvision's ResNet against HF's with the ReLU after the residual add dropped: its
    counterpart was named as HF's first activation, present and correct, because torchvision's
    one ReLU module is also called after the first convolution."""
    torch.manual_seed(0)
    ref, x = SharedReLUBlock().eval(), torch.randn(2, 4, 6, 6)
    port = SharedReLUBlock(separate=True, last_relu=False).eval()
    port.load_state_dict(ref.state_dict(), strict=False)
    first = next(r for r in fxdiff.compare(fxdiff.capture(ref, (x,)), port).nodes if r.first_forward)
    assert first.blame[0].startswith("ref-only relu") and first.blame[1:] == ["relu", ""], first.blame


class PaddedFrames(nn.Module):
    """wav2vec2's padded frames zeroed before the encoder: Hugging Face builds the mask from the
    attention mask's lengths (``hf``), torchaudio from the lengths with ``arange >= lengths``;
    ``strict`` True: a port that wrote ``>`` and leaves the first padded frame."""

    def __init__(self, hf: bool, strict: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.hf, self.strict, self.proj, self.head = hf, strict, nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, attention_mask):   # x: (batch, 6 frames, 4)
        h = self.proj(x)
        lengths = attention_mask.sum(-1)
        if self.hf:
            keep = torch.zeros(h.shape[:2], dtype=torch.long)
            keep[torch.arange(len(h)), lengths - 1] = 1
            keep = keep.flip(-1).cumsum(-1).flip(-1).bool()
            h[~keep.unsqueeze(-1).repeat(1, 1, h.shape[-1])] = 0
        else:
            frames = torch.arange(h.shape[1]).expand(len(h), -1)
            h[frames > lengths[:, None] if self.strict else frames >= lengths[:, None]] = 0
        return self.head(h).mean(1)


def test_a_padding_mask_built_another_way_that_differs_is_named_where_it_is_written():
    """A mask built from lengths with ``>`` for ``>=`` had no story; the reference's zeroed element
    read "max rel diff 2.4e+38", a zero clamped to float32's tiny, which reads as a measurement."""
    x, mask = torch.randn(2, 6, 4), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    captured = fxdiff.capture(PaddedFrames(hf=True), (x, mask))
    assert not fxdiff.compare(captured, PaddedFrames(hf=False)).diverged
    first = next(r for r in fxdiff.compare(captured, PaddedFrames(hf=False, strict=True)).nodes if r.first_forward)
    assert first.op == "setitem" and first.blame[0].startswith(
        "the mask it writes through differs at 1 of 2x6 positions ([1, 4]; ref's picks 2, the candidate's 1): "
        "ref's made with "), first.blame
    assert first.blame[0].endswith("the candidate's made with arange, gt from sum_1"), first.blame
    assert first.forward.max_rel_diff == math.inf


class PatchMerging(nn.Module):
    """Swin's patch merging: timm reshapes and permutes each 2x2 neighbourhood into the features
    (``hf`` False), Hugging Face concatenates its four strided slices; ``order``: the slices'
    order, (0, 1, 2, 3) the one that agrees."""

    def __init__(self, hf: bool, order: tuple[int, ...] = (0, 1, 2, 3)):
        super().__init__()
        torch.manual_seed(0)
        self.hf, self.order = hf, order
        self.mix, self.norm, self.reduction = nn.Linear(4, 4), nn.LayerNorm(16), nn.Linear(16, 8, bias=False)

    def forward(self, x):   # x: (batch, 4, 4, 4 features)
        x = self.mix(x)
        b, h, w, c = x.shape
        if self.hf:
            parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
            x = torch.cat([parts[i] for i in self.order], -1).view(b, -1, 4 * c)
        else:
            x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3).view(b, -1, 4 * c)
        return self.reduction(self.norm(x))


def test_features_concatenated_in_another_order_are_named_at_the_op_that_reads_them():
    """Swin's 2x2 patches merged as x0, x2, x1, x3: both sides rearrange with ops that pair with
    nothing, and the norm reading them was 'introduced here' with no story."""
    x = torch.randn(2, 4, 4, 4)
    captured = fxdiff.capture(PatchMerging(hf=False), (x,))
    assert not fxdiff.compare(captured, PatchMerging(hf=True)).diverged
    first = next(r for r in fxdiff.compare(captured, PatchMerging(hf=True, order=(0, 2, 1, 3))).nodes
                 if r.first_forward)
    assert (first.op, first.blame[0]) == ("layer_norm", (
        "its input holds the same features along its last dimension in another order: the candidate's [4:8] is "
        "the reference's [8:12], the candidate's [8:12] is the reference's [4:8] (ref's view, the candidate's "
        "view)")), first.blame


class RelativeBias(nn.Module):
    """Swin's relative position bias: a table of one column per head, looked up by an index buffer
    and added to the attention scores."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qk, self.table = nn.Linear(4, 8), nn.Parameter(torch.randn(7, 2))
        self.register_buffer("index", (torch.arange(4)[:, None] - torch.arange(4)[None] + 3).flatten(), persistent=False)

    def forward(self, x):   # x: (batch, 4 tokens, 4)
        q, k = self.qk(x).view(len(x), 4, 2, 4).transpose(1, 2).chunk(2, -1)
        bias = self.table[self.index].view(4, 4, 2).permute(2, 0, 1)
        return (q @ k.transpose(-1, -2) + bias).softmax(-1)


def test_a_table_with_its_heads_in_another_order_is_named_on_the_table_and_where_it_is_read():
    """The port's relative position table with its head columns swapped in a conversion: the
    table and the op reading it were named, not how the table differs."""
    ref, port = RelativeBias(), RelativeBias()
    port.load_state_dict({**ref.state_dict(), "table": ref.table.detach()[:, [1, 0]]})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 4, 4),)), port)
    table = next(p for p in report.params if p.ref == "table")
    assert table.value.note == "the candidate's columns in another order: the reference's [1, 0]", table.value
    first = next(r for r in report.nodes if r.first_forward)
    assert first.blame[0] == ("a tensor it reads differs: table against the candidate's table: the candidate's "
                              "columns in another order: the reference's [1, 0]"), first.blame



class TinyLM(nn.Module):
    """An embedding, a norm and an output projection; ``keep_slice``: Hugging Face's
    ``hidden_states[:, -0:]`` before it (``logits_to_keep`` 0, a slice of everything)."""

    def __init__(self, keep_slice: bool):
        super().__init__()
        torch.manual_seed(0)
        self.keep_slice = keep_slice
        self.embed, self.norm, self.head = nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 10, bias=False)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        return self.head(h[:, -0:] if self.keep_slice else h)


def test_an_output_projection_loaded_from_the_embedding_is_named_not_a_slice_of_everything():
    """torchtune's output loaded from the embedding: blamed on 'ref-only getitem', HF's slice that
    keeps every position, though the projection's weight was seen to differ."""
    ids = torch.randint(0, 10, (2, 5))
    ref, port = TinyLM(keep_slice=True), TinyLM(keep_slice=False)
    port.load_state_dict({**ref.state_dict(), "head.weight": ref.embed.weight.detach()})
    first = next(r for r in fxdiff.compare(fxdiff.capture(ref, (ids,)), port).nodes if r.first_forward)
    assert first.blame[0] == ("a tensor it reads differs: head.weight against the candidate's head.weight: the "
                              "candidate's holds the values of embed.weight"), first.blame


class RotatedAttention(Attention):
    """The query and key rotated by a table of their positions before the attention (as RoPE
    does), the value not."""

    def forward(self, x):
        table = torch.linspace(0.5, 1.5, 5)[None, None, :, None]
        q, k, v = (proj(x).view(1, 5, 2, 2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q * table + q.flip(-1), k * table + k.flip(-1), v)
        return out.transpose(1, 2).reshape(1, 5, 4)


def test_two_projections_whose_names_cross_their_values_are_named():
    """A conversion that loads k_proj's weights into v_proj and v_proj's into k_proj: each pairs, by
    its values, with the other's namesake, the values "all match", and the attention was
    'introduced here' with nothing said (the key is rotated, the value not: no input crosses as is)."""
    torch.manual_seed(0)
    ref, port = RotatedAttention(), RotatedAttention()
    state = ref.state_dict()
    port.load_state_dict({**state, **{f"k.{w}": state[f"v.{w}"] for w in ("weight", "bias")},
                          **{f"v.{w}": state[f"k.{w}"] for w in ("weight", "bias")}})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(1, 5, 4),)), port)
    first = next(r for r in report.nodes if r.first_forward)
    assert first.blame is not None and first.blame[0].startswith("parameters crossed: "), first.blame
    notes = {p.ref: p.value.note for p in report.params}
    assert notes["k.weight"] == ("holds the values of the candidate's v.weight, and the candidate's k.weight those of "
                                 "v.weight: names crossed"), notes


class RMSNormed(nn.Module):
    """A projection and a norm: Hugging Face's RMSNorm written out (``how`` "hf"), torchtune's
    ``F.rms_norm``, a ``layer_norm`` (a port that subtracts the mean), or eps added outside the root."""

    def __init__(self, how: str, eps: float = 1e-5):
        super().__init__()
        torch.manual_seed(0)
        self.how, self.eps, self.proj, self.weight = how, eps, nn.Linear(8, 8), nn.Parameter(1 + torch.rand(8))

    def forward(self, x):
        h = self.proj(x)
        if self.how == "hf":
            h32 = h.to(torch.float32)
            return self.weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)).to(h.dtype)
        if self.how == "outside":
            return self.weight * (h / (h.pow(2).mean(-1, keepdim=True).sqrt() + self.eps))
        norm = F.rms_norm if self.how == "rms_norm" else F.layer_norm
        return norm(h.float(), (8,), eps=self.eps).to(h.dtype) * self.weight


@pytest.mark.parametrize("port,story", [
    (RMSNormed("rms_norm", eps=1e-3), "its eps differs: 1e-05 against 0.001 (the reference's RMS norm (written out, eps "
                                   "1e-05), the candidate's RMS norm (eps 0.001))"),
    (RMSNormed("layer_norm"), "a norm of another kind: the reference's RMS norm (written out, eps 1e-05) against the "
                           "candidate's layer norm (eps 1e-05)"),
    (RMSNormed("outside"), "its eps added elsewhere: the reference's RMS norm (written out, eps 1e-05) against the "
                        "candidate's RMS norm (written out, eps 1e-05 outside the root)")], ids=["eps", "kind", "outside"])
def test_a_norm_written_out_on_one_side_is_compared_with_the_others_by_kind_and_eps(port, story):
    """Hugging Face's RMSNorm written out against torchtune's rms_norm: another eps was 'computed with
    other ops' naming the candidate's eps alone (the same ops as a correct port's); a layer_norm, and
    eps outside the root, had no story, or 'a side input that differs: add'."""
    x = torch.randn(4, 8) * 0.01   # small: eps counts
    captured = fxdiff.capture(RMSNormed("hf"), (x,))
    assert not fxdiff.compare(captured, RMSNormed("rms_norm")).diverged
    port.load_state_dict(RMSNormed("hf").state_dict())
    first = next(r for r in fxdiff.compare(captured, port).nodes if r.first_forward)
    assert first.blame is not None and first.blame[0] == story, first.blame


def test_an_input_the_candidate_never_reads_is_said():
    """A port that ignores the padding mask it is given: nothing said of the input itself."""
    x, mask = torch.randn(2, 6, 4), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])

    class Unmasked(PaddedFrames):
        def forward(self, x, attention_mask):
            return self.head(self.proj(x)).mean(1)

    report = fxdiff.compare(fxdiff.capture(PaddedFrames(hf=True), (x, mask)), Unmasked(hf=True))
    assert any(w.startswith("the candidate never reads its input ") and w.endswith(", which the reference reads")
               for w in report.warnings), report.warnings


class BiasedAttention(nn.Module):
    """Causal attention with a learned bias a head on its scores: written out, the mask filled in
    (``sdpa`` False), or an ``sdpa`` given bias and mask as one ``attn_mask``; ``bug``: the port's
    bias transposed, or its heads in another order."""

    def __init__(self, sdpa: bool, bug: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.sdpa, self.bug = sdpa, bug
        self.qkv, self.out, self.bias = nn.Linear(8, 24), nn.Linear(8, 8), nn.Parameter(torch.randn(2, 5, 5))

    def forward(self, x):   # x: (1, 5 tokens, 8)
        return self.out(self.attend(x).transpose(1, 2).reshape(1, 5, 8))

    def attend(self, x):
        q, k, v = self.qkv(x).view(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        bias = self.bias.transpose(-1, -2) if self.bug == "transposed" else self.bias[[1, 0]] if self.bug else self.bias
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(causal, float("-inf")))
        scores = (q @ k.transpose(-1, -2)) * 0.5 + self.bias
        return scores.masked_fill(causal, torch.finfo(scores.dtype).min).softmax(-1) @ v


@pytest.mark.parametrize("bug,story", [
    ("transposed", ": the candidate's is the reference's transposed, query and key positions swapped"),
    ("heads", ": the candidate's heads in another order, the reference's [1, 0]")])
def test_a_bias_on_attention_scores_built_another_way_is_compared_whole(bug, story):
    """The bias a port adds to its scores, with the mask, through sdpa's attn_mask, against one added
    and masked in the reference's written-out attention: the bias pairs with nothing there (T5's
    relative position bias, Swin's table), and stories were 'ops that differ: ref where against cand
    softmax', or none."""
    x = torch.randn(1, 5, 8)
    captured = fxdiff.capture(BiasedAttention(sdpa=False), (x,))
    assert not fxdiff.compare(captured, BiasedAttention(sdpa=True)).diverged
    first = next(r for r in fxdiff.compare(captured, BiasedAttention(sdpa=True, bug=bug)).nodes if r.first_forward)
    assert first.blame[0].startswith("the bias added to the attention's scores differs where neither side masks (max "
                                     "abs diff ") and first.blame[0].endswith(story), first.blame


class GatedGelu(nn.Module):
    """T5's gated-GELU feed-forward: Hugging Face's GELU written out (``gelu_new``), or (``port``)
    ``F.gelu(approximate=approximate)``; ``swapped``: the activation on the value's projection."""

    def __init__(self, port: bool = False, swapped: bool = False, approximate: str = "tanh", gated: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.port, self.swapped, self.approximate, self.gated = port, swapped, approximate, gated
        self.wi_0, self.wi_1, self.wo = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        if not self.gated:   # a port without the gate: wi_1 converted, loaded, never read
            return self.wo(F.gelu(self.wi_0(x), approximate=self.approximate))
        gate, value = (self.wi_1(x), self.wi_0(x)) if self.swapped else (self.wi_0(x), self.wi_1(x))
        if self.port:
            act = F.gelu(gate, approximate=self.approximate)
        else:
            act = 0.5 * gate * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * torch.pow(gate, 3.0))))
        return self.wo(act * value)


def test_a_gated_units_gate_and_value_swapped_are_named_at_their_product():
    """'ops that differ: ref mul against cand gelu' (the GELU the same on both sides), then nothing."""
    x = torch.randn(4, 8)
    captured = fxdiff.capture(GatedGelu(), (x,))
    assert not fxdiff.compare(captured, GatedGelu(port=True)).diverged
    first = next(r for r in fxdiff.compare(captured, GatedGelu(port=True, swapped=True)).nodes if r.first_forward)
    assert first.blame[0] == ("the gate and the value swapped: the candidate applies gelu to the counterpart of what "
                              "the reference computes in wi_1 and multiplies by that of wi_0; the reference applies its "
                              "activation to wi_0"), first.blame


class FlatTimeFirst(TimeFirst):
    """``TimeFirst`` whose last layer reads its input flattened with ``view`` (valid on the tensor it
    made itself, not on the reference's value permuted into its layout)."""

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1).contiguous()
        for layer in self.layers[:-1]:
            h = h + torch.tanh(layer(h))
        flat = h.contiguous().view(-1, 4) if self.batch_first else h.view(-1, 4)
        return self.layers[-1](flat)


def test_a_view_of_a_value_taken_in_another_layout_is_replayed_as_the_reshape_it_stands_for():
    """The candidate views what the replay gives it, the reference's value permuted into the
    candidate's layout: 'not replayed in isolation: view_5 (view) fails on the reference's values:
    view size is not compatible with input tensor's size and stride' (torchtune against an eager
    Hugging Face Llama, a transposed output projection then without its story)."""
    torch.manual_seed(0)
    ref, port = FlatTimeFirst(batch_first=True), FlatTimeFirst()
    port.load_state_dict({**ref.state_dict(), "layers.39.bias": torch.zeros(4)})
    x = torch.randn(2, 5, 4)
    captured = fxdiff.capture(ref, (x,))
    report = fxdiff.compare(captured, port)
    entry, = report.first_divergence()["forward"]
    assert (entry["op"], entry["isolated"], entry["not_isolated"]) == ("linear", "introduced", None), entry


class SplitHeads(nn.Module):
    """A projection split into two heads, then merged back by a linear over both; ``swapped``: the
    port's heads put back in the other order with slices and a stack (litgpt's key groups ordered
    wrongly)."""

    def __init__(self, swapped: bool = False, scores: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.swapped, self.scores, self.proj, self.out = swapped, scores, nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):   # x: (1, 5 tokens, 8)
        h = self.proj(x).view(1, 5, 2, 4).transpose(1, 2)
        if self.swapped:
            h = torch.stack([h[:, 1], h[:, 0]], 1)
        if self.scores:   # read by head: (1, 2, 5, 5)
            return torch.matmul(h, torch.ones(4, 5))
        return self.out(h.transpose(1, 2).reshape(1, 5, 8))


def test_heads_put_back_in_another_order_are_named_where_they_are_read():
    """Both sides' heads are views and slices that pair with nothing: 'introduced here' at the
    projection that reads them (litgpt's key groups in another order, a dimension before the last,
    were 'ref-only linear in k_proj'; now 'along dimension 1 of [2, 2, 16, 16]: the reference's [1, 0]')."""
    captured = fxdiff.capture(SplitHeads(), (torch.randn(1, 5, 8),))
    port = SplitHeads(swapped=True)
    port.load_state_dict(SplitHeads().state_dict())
    first = next(r for r in fxdiff.compare(captured, port).nodes if r.first_forward)
    assert first.blame[0] == ("its input holds the same features along its last dimension in another order: the "
                              "candidate's [0:4] is the reference's [4:8], the candidate's [4:8] is the reference's "
                              "[0:4] (ref's reshape, the candidate's reshape)"), first.blame
    captured = fxdiff.capture(SplitHeads(scores=True), (torch.randn(1, 5, 8),))
    port = SplitHeads(swapped=True, scores=True)
    port.load_state_dict(SplitHeads().state_dict())
    first = next(r for r in fxdiff.compare(captured, port).nodes if r.first_forward)
    assert first.blame[0] == ("its input holds its values in another order along dimension 1 of [1, 2, 5, 4]: the "
                              "reference's [1, 0] (ref's transpose, the candidate's stack)"), first.blame



def test_a_gelu_written_out_against_another_gelu_is_named_as_the_two_kinds():
    """torchtune's exact GELU against Hugging Face's gated-gelu written out with tanh: 'a value made
    another way on each side differs: ref mul against cand gelu'; the same GELU written another way
    is no story of its own (it compares clean)."""
    captured = fxdiff.capture(GatedGelu(), (torch.randn(4, 8),))
    first = next(r for r in fxdiff.compare(captured, GatedGelu(port=True, approximate="none")).nodes if r.first_forward)
    assert first.blame[0] == ("an activation of another kind: the reference's GELU, tanh approximation (written out) "
                              "against the candidate's GELU, exact"), first.blame


class FinalNorm(nn.Module):
    """Two layers, a final RMS norm written out as Hugging Face's Llama does, and a head; ``norm``
    False: a port whose final norm is an ``Identity``."""

    def __init__(self, norm: bool = True, gemma: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.has_norm, self.gemma, self.body, self.head = norm, gemma, nn.Linear(8, 8), nn.Linear(8, 4)
        self.norm_weight = nn.Parameter(1 + torch.rand(8))

    def forward(self, x):
        h = x + self.body(x)
        if self.has_norm and self.gemma:   # Gemma's: in float32, gain 1 + w, cast back
            f = h.float()
            h = (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.norm_weight.float())).type_as(h)
        elif self.has_norm:
            h = self.norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        return self.head(h)


@pytest.mark.parametrize("gemma", [False, True])
def test_a_norm_one_side_alone_runs_before_an_op_is_named_there(gemma):
    """A final norm ported as an Identity was 'introduced here' at the head, no story (Gemma's, its
    gain ``1 + w``, after the story was told for Llama's)."""
    x = torch.randn(3, 8)
    port = FinalNorm(norm=False)
    port.load_state_dict({k: v for k, v in FinalNorm().state_dict().items() if k != "norm_weight"}, strict=False)
    first = next(r for r in fxdiff.compare(fxdiff.capture(FinalNorm(gemma=gemma), (x,)), port).nodes if r.first_forward)
    assert first.blame[0] == "ref-only RMS norm (written out, eps 1e-06): the candidate passes its input as it is", \
        first.blame


def test_a_norms_gain_ported_without_its_one_is_named():
    """Gemma's gain ``1 + w`` ported as Llama's ``w`` with ``w`` as it is: 'ref-only add makes a
    tensor it reads from norm_weight' in float32, 'a side input that differs: mul' in bfloat16. A
    port that converts its weight to ``1 + w`` agrees."""
    x = torch.randn(3, 8)
    ref = FinalNorm(gemma=True)
    captured = fxdiff.capture(ref, (x,))
    state = ref.state_dict()
    converted = FinalNorm()
    converted.load_state_dict({**state, "norm_weight": 1 + state["norm_weight"]})
    report = fxdiff.compare(captured, converted)   # its weight differs from the reference's by the one
    assert not report.first_divergence()["forward"] and all(o.metrics.passed for o in report.outputs)
    port = FinalNorm()
    port.load_state_dict(state)
    first = next(r for r in fxdiff.compare(captured, port).nodes if r.first_forward)
    assert first.blame[0] == "the norm's gain differs: the reference multiplies by 1 + norm_weight, the candidate by " \
                             "norm_weight", first.blame


class PhiBlock(nn.Module):
    """Phi-3's fused projections, written out: ``qkv`` sliced into q, k and v, ``gate_up`` halved by
    ``chunk``; the port (``port``) has a projection a part, as torchtune's."""

    def __init__(self, port=False):
        super().__init__()
        self.port = port
        if port:
            self.q, self.k, self.v = (nn.Linear(8, 8, bias=False) for _ in range(3))
            self.w1, self.w3 = nn.Linear(8, 12, bias=False), nn.Linear(8, 12, bias=False)
        else:
            self.qkv, self.gate_up = nn.Linear(8, 24, bias=False), nn.Linear(8, 24, bias=False)
        self.o, self.down = nn.Linear(8, 8, bias=False), nn.Linear(12, 8, bias=False)
        self.act = nn.SiLU()

    def forward(self, x):
        if self.port:
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            qkv = self.qkv(x)
            q, k, v = qkv[..., :8], qkv[..., 8:16], qkv[..., 16:]
        heads = [t.view(1, 5, 2, 4).transpose(1, 2) for t in (q, k, v)]
        x = x + self.o(F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(1, 5, 8))
        gate, up = (self.w1(x), self.w3(x)) if self.port else self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(self.act(gate) * up)


def _phi_port(ref, qkv=(0, 1, 2), gate_up=(0, 1)):
    """A ``PhiBlock`` port loaded with ``ref``'s weights split into parts, taken in the given order."""
    port = PhiBlock(port=True)
    parts, halves = ref.qkv.weight.detach().split(8), ref.gate_up.weight.detach().split(12)
    port.load_state_dict({"q.weight": parts[qkv[0]], "k.weight": parts[qkv[1]], "v.weight": parts[qkv[2]],
                          "w1.weight": halves[gate_up[0]], "w3.weight": halves[gate_up[1]],
                          "o.weight": ref.o.weight, "down.weight": ref.down.weight})
    return port


def test_the_parts_of_a_fused_projection_taken_in_another_order_are_named():
    """Phi-3's fused qkv and gate_up against torchtune's projections, split in another order by a
    conversion: each part pairs with a block of the fused weight by its values, in any order, so
    'parameter values: all match' and the stories were wrong ('ref-only getitem', a slice the port
    has as its k projection; 'computed with other ops: ref chunk, silu against cand silu')."""
    torch.manual_seed(0)
    ref = PhiBlock()
    captured = fxdiff.capture(ref, (torch.randn(1, 5, 8),))
    assert not fxdiff.compare(captured, _phi_port(ref)).diverged
    first = next(r for r in fxdiff.compare(captured, _phi_port(ref, qkv=(0, 2, 1))).nodes if r.first_forward)
    assert first.blame == ["the parts of a fused projection in each other's places: here the reference reads [8:16] "
                           "of qkv's output, which the candidate computes in v; the candidate reads k's, which pairs "
                           "with [16:24]", "qkv", "k"], first.blame
    first = next(r for r in fxdiff.compare(captured, _phi_port(ref, gate_up=(1, 0))).nodes if r.first_forward)
    assert first.blame == ["the parts of a fused projection in each other's places: here the reference reads [0:12] "
                           "of gate_up's output, which the candidate computes in w3; the candidate reads w1's, which "
                           "pairs with [12:24]", "gate_up", "w1"], first.blame


class TiedLM(nn.Module):
    """An embedding, a layer and an output projection; ``tied``: the projection reads the
    embedding's weight (Gemma's, GPT-2's), else its own."""

    def __init__(self, tied=True):
        super().__init__()
        self.embed, self.mid = nn.Embedding(12, 6), nn.Linear(6, 6)
        self.head = None if tied else nn.Linear(6, 12, bias=False)

    def forward(self, ids):
        h = torch.tanh(self.mid(self.embed(ids)))
        return F.linear(h, self.embed.weight) if self.head is None else self.head(h)


def _untied(ref, weight):
    port = TiedLM(tied=False)
    port.load_state_dict({**ref.state_dict(), "head.weight": weight})
    return port


def test_a_tied_weight_ported_as_an_untied_copy_is_named_on_its_gradient():
    """The forward pass agrees and the embedding's gradient differs (the tied one sums both uses):
    'DIVERGED' with a parameter gradient row and 'trained in the candidate only: head.weight'."""
    torch.manual_seed(0)
    ref, ids = TiedLM(), torch.randint(0, 12, (2, 5))
    report = fxdiff.compare(fxdiff.capture(ref, (ids,)), _untied(ref, ref.embed.weight.detach().clone()))
    assert report.diverged and not any(r.first_forward for r in report.nodes)
    row = next(p for p in report.params if p.ref == "embed.weight")
    assert row.grad.note == ("tied in the reference, also read in <root>; the candidate's head.weight there is a copy, "
                             "untied")
    assert any(w.startswith("embed.weight is tied in the reference") for w in report.warnings), report.warnings


def test_a_tied_weight_ported_as_another_tensor_is_named_where_it_is_read():
    """No story: the candidate's head pairs with nothing, the reference reads a weight that pairs."""
    torch.manual_seed(0)
    ref, ids = TiedLM(), torch.randint(0, 12, (2, 5))
    report = fxdiff.compare(fxdiff.capture(ref, (ids,)), _untied(ref, torch.randn(12, 6)))
    entry, = report.first_divergence()["forward"]
    assert entry["blame"] == ("the candidate reads head.weight here, which pairs with nothing; the reference reads "
                              "embed.weight, tied (read in embed too)"), entry


def test_the_parts_of_a_fused_weight_taken_at_other_rows_are_placed_in_it():
    """k taken at rows 4:12 of a fused qkv (8:16 where it is), gate and up split into even and odd
    rows: no concatenation of the parts is the fused weight, so nothing paired ('not compared, no
    counterpart'), with no word of where each part came from."""
    torch.manual_seed(0)
    ref = PhiBlock()
    w, g = ref.qkv.weight.detach(), ref.gate_up.weight.detach()
    port = PhiBlock(port=True)
    port.load_state_dict({"q.weight": w[:8], "k.weight": w[4:12], "v.weight": w[16:], "w1.weight": g[0::2],
                          "w3.weight": g[1::2], "o.weight": ref.o.weight, "down.weight": ref.down.weight})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(1, 5, 8),)), port)
    for line in ("q.weight pairs with nothing: its rows are qkv.weight's rows [0:8]",
                 "k.weight pairs with nothing: its rows are qkv.weight's rows [4:12]",
                 "qkv.weight: rows [4:8] are in two of them", "qkv.weight: rows [12:16] are in none of them",
                 "w1.weight pairs with nothing: its rows are gate_up.weight's rows [0:23:2]",
                 "w3.weight pairs with nothing: its rows are gate_up.weight's rows [1:24:2]"):
        assert line in report.warnings, report.warnings
    grouped = PhiBlock(port=True)   # read per group of heads, [q, k, v] twice (GPT-NeoX's, Falcon's)
    grouped.load_state_dict({"q.weight": w[[0, 1, 2, 3, 12, 13, 14, 15]], "k.weight": w[[4, 5, 6, 7, 16, 17, 18, 19]],
                             "v.weight": w[[8, 9, 10, 11, 20, 21, 22, 23]], "w1.weight": g[:12], "w3.weight": g[12:],
                             "o.weight": ref.o.weight, "down.weight": ref.down.weight})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(1, 5, 8),)), grouped)
    assert "k.weight pairs with nothing: its rows are qkv.weight's rows [4:8], [16:20]" in report.warnings, \
        report.warnings


class _SiluWrongBackward(torch.autograd.Function):
    """SiLU whose backward leaves out the derivative of its sigmoid."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return g * torch.sigmoid(x)


class WrongSilu(nn.Module):
    def forward(self, x):
        return _SiluWrongBackward.apply(x)


def test_a_wrong_backward_after_a_slice_of_a_fused_output_is_named():
    """Its forward value a slice of the reference's fused gate_up: 'not replayed in isolation: ...
    compared as a slice of a fused output, which the replay does not split', and no story. The
    candidate's backward is checked against the derivative of its own forward ops instead."""
    torch.manual_seed(0)
    ref = PhiBlock()
    port = _phi_port(ref)
    port.act = WrongSilu()
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(1, 5, 8),)), port)
    assert not report.first_divergence()["forward"]
    entry, = report.first_divergence()["backward"]
    assert entry["blame"] == ("backward only: the candidate's backward through act is not the derivative of its "
                              "forward ops (a custom autograd.Function or a gradient hook)"), entry


class ScaledEmbedding(nn.Module):
    """Gemma's embedding scaled by sqrt(d): from a buffer (``port`` False), or by a tensor made in
    the forward pass, in ``dtype`` (a port's: in bfloat16, 8.5 for sqrt(72))."""

    def __init__(self, port=False, dtype=torch.float32):
        super().__init__()
        self.embed, self.head, self.port, self.dtype = nn.Embedding(10, 72), nn.Linear(72, 4), port, dtype
        self.register_buffer("embed_scale", torch.tensor(72 ** 0.5), persistent=False)

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(h * (torch.tensor(72 ** 0.5, dtype=self.dtype) if self.port else self.embed_scale))


def test_a_factor_made_another_way_is_named_by_the_two_numbers():
    """'computed with other ops: ref mul against cand tensor, mul' (the correct port makes its
    tensor and multiplies too)."""
    torch.manual_seed(0)
    ref, ids = ScaledEmbedding(), torch.randint(0, 10, (2, 5))
    captured = fxdiff.capture(ref, (ids,))
    assert not fxdiff.compare(captured, _loaded(ScaledEmbedding(port=True), ref)).diverged
    first = next(r for r in fxdiff.compare(captured, _loaded(ScaledEmbedding(True, torch.bfloat16), ref)).nodes
                 if r.first_forward)
    assert first.blame[0] == "its factor differs: 8.485281 (embed_scale) against 8.5 (tensor)", first.blame


def _loaded(model: nn.Module, source: nn.Module) -> nn.Module:
    model.load_state_dict(source.state_dict())
    return model


class NormedEmbedding(nn.Module):
    """An embedding, an RMS norm and a head; ``scale``: a port that scales the embedding by sqrt(d)
    first (Gemma's habit, in a port of a model that does not)."""

    def __init__(self, scale=None):
        super().__init__()
        self.embed, self.head, self.scale = nn.Embedding(10, 64), nn.Linear(64, 4), scale
        self.gain = nn.Parameter(1 + 0.2 * torch.randn(64))

    def forward(self, ids):
        h = self.embed(ids)
        h = h * self.scale if self.scale else h
        return self.head(F.rms_norm(h, (64,), self.gain, eps=1e-5) + h)


def test_a_norms_input_scaled_on_one_side_is_named():
    """'computed with other ops: ref pow, mean, ... against cand mul, rms_norm' (the norm alike, the
    scale before it folded into its match): now the scale, by its number."""
    torch.manual_seed(0)
    ref, ids = NormedEmbedding(), torch.randint(0, 10, (2, 5))
    port = NormedEmbedding(scale=8.0)
    port.load_state_dict(ref.state_dict())
    entries = fxdiff.compare(fxdiff.capture(ref, (ids,)), port).first_divergence()["forward"]
    assert {e["blame"] for e in entries} == {"cand-only mul by 8 (mul) of the norm's input, where the reference "
                                             "normalises it as it is"}, entries


class RootEps(nn.Module):
    """An RMS norm written out as Hugging Face's Llama does, between two layers; ``outside``: a port
    that adds eps to the root, not under it."""

    def __init__(self, outside=False):
        super().__init__()
        self.a, self.b, self.outside = nn.Linear(16, 16), nn.Linear(16, 4), outside
        self.gain = nn.Parameter(1 + 0.2 * torch.randn(16))

    def forward(self, x):
        h = self.a(x)
        ms = h.pow(2).mean(-1, keepdim=True)
        h = h / (ms.sqrt() + 1e-5) if self.outside else h * torch.rsqrt(ms + 1e-5)
        return self.b(self.gain * h)


def test_the_norm_an_op_inside_it_leads_to_is_read_off_the_graph():
    """A bfloat16 Phi-3 port with eps outside the root paired the reference's eps addition (under the
    root) with its own (outside it), two different values, and blamed 'cand-only sqrt'; the norms
    those additions lead to tell the story (the Phi-3 trial's pairing, which a toy does not make:
    here the walk itself)."""
    from fxdiff.judge.stories import _norm_after
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    for outside in (False, True):
        graph = fxdiff.capture(RootEps(outside=outside), (x,)).graph
        add = next(n for n in graph.nodes if n.op == "call_function" and 1e-5 in n.args)
        norm = _norm_after(add)
        assert norm is not None and (norm.kind, norm.eps, norm.outside) == ("RMS norm", 1e-5, outside), norm


class NormedOutput(FinalNorm):
    """``FinalNorm`` without its head: the final norm's output is the model's (T5's encoder)."""

    def forward(self, x):
        h = x + self.body(x)
        if self.has_norm:
            h = self.norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        return h


def test_a_final_norm_left_out_before_the_output_is_named_there(tmp_path):
    """The output differs with no compared value before it differing ('made after the last compared
    values'), with no story: the output's frontier now has one, in the text and the saved JSON."""
    from fxdiff.model.report import load_report
    x = torch.randn(3, 8)
    port = NormedOutput(norm=False)
    port.load_state_dict({k: v for k, v in NormedOutput().state_dict().items() if k != "norm_weight"}, strict=False)
    report = fxdiff.compare(fxdiff.capture(NormedOutput(), (x,)), port)
    entry, = report.first_divergence()["forward"]
    told = "ref-only RMS norm (written out, eps 1e-06): the candidate returns its input as it is"
    assert entry["output"] == "0" and entry["blame"] == told, entry
    assert f"starts at: {told}" in " ".join(_text(report).split())
    report.save(tmp_path / "report.json")
    assert load_report(tmp_path / "report.json").first_divergence()["forward"][0]["blame"] == told


def test_a_parameter_the_candidate_loads_and_never_reads_is_named_where_the_reference_reads_it():
    """T5's gated GELU ported without its gate: 'introduced here' at the product, no story."""
    captured = fxdiff.capture(GatedGelu(), (torch.randn(4, 8),))
    first = next(r for r in fxdiff.compare(captured, GatedGelu(port=True, gated=False)).nodes if r.first_forward)
    assert first.blame == ["the candidate never reads its wi_1.weight, the counterpart of wi_1.weight, which the "
                           "reference reads here", "wi_1", ""], first.blame
