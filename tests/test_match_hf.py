"""Cross-implementation matching on real pairs: Hugging Face models against hand-written ports.

The ports (``tests/hf_ports.py``) share no module name with the Hugging Face models, fuse q/k/v,
write attention, a LayerNorm and a linear layer out by hand, and load weights through a hand-written
conversion. The equivalent pair must compare clean; each planted bug must diverge first in the
bug's module on both sides; the inferred parameter mapping must be exactly the hand-written one.
"""

from __future__ import annotations

import pytest
import torch

import hf_ports as H
from fxdiff.judge import judge
from fxdiff.match import match
from fxdiff.params import convert
from fxdiff import capture as record



@pytest.fixture(scope="module")
def bert_ref():
    ids, mask = H.bert_inputs()
    return record(H.make_bert(), (), {"input_ids": ids, "attention_mask": mask})


def _port_capture(bug=None, cfg=None):
    return record(H.make_bert_port(bug=bug, cfg=cfg), H.bert_inputs())


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_port_compares_clean(attn):
    """The equivalent port: no divergence, every op of the port accounted for, every parameter paired."""
    cfg = H.bert_config(attn_implementation=attn)
    ids, mask = H.bert_inputs()
    ref = record(H.make_bert(cfg=cfg), (), {"input_ids": ids, "attention_mask": mask})
    cand = _port_capture(cfg=cfg)
    alignment = match(ref, cand)
    report = judge(ref, cand, alignment)
    assert not report.diverged, report.first_divergence()
    assert report.summary()["nodes"]["forward_mismatches"] == 0
    # nothing of the port's own computation is left over: only the mask arithmetic differs
    leftover = {cand.node(n).meta["fxdiff_module"] for n in alignment.unmatched_cand}
    assert leftover <= {""}, alignment.unmatched_cand
    assert alignment.unmatched_cand_params == []
    assert set(alignment.unmatched_ref_params) == {"embeddings.position_ids", "embeddings.token_type_ids"}
    # every linear of the reference is paired with the port's op that computes it
    by_ref = {p.ref: p for p in alignment.pairs}
    for node in ref.nodes("call_function"):
        if node.meta["fxdiff_target"].endswith("linear"):
            assert node.name in by_ref, node.meta["fxdiff_module"]
    # q, k and v pair with slices of the one fused projection
    q = next(n for n in ref.nodes("call_function") if n.meta["fxdiff_module"] == "encoder.layer.1.attention.self.value")
    pair = by_ref[q.name]
    assert cand.node(pair.cand).meta["fxdiff_module"] == "units.1.attn.qkv" and pair.ref_slice is None
    assert pair.cand_slice == (64, 96)
    # the output projection written as matmul + add pairs with nn.Linear as one op
    out = next(n for n in ref.nodes("call_function") if n.meta["fxdiff_module"] == "encoder.layer.2.attention.output.dense")
    assert cand.node(by_ref[out.name].cand).meta["fxdiff_module"] == "units.2.attn"
    assert "parameter" in by_ref[out.name].rationale


def test_bert_sdpa_against_written_out_attention_is_one_block(bert_ref):
    cand = _port_capture()
    alignment = match(bert_ref, cand)
    sdpa = [p for p in alignment.pairs if bert_ref.node(p.ref).meta["fxdiff_target"].endswith("scaled_dot_product_attention")]
    assert len(sdpa) == 3
    for p in sdpa:
        assert "different decompositions" in p.rationale and p.confidence >= 0.75
        ops = sorted(cand.node(n).meta["fxdiff_target"].rpartition(".")[2] for n in p.cand_block)
        assert ops == ["add", "matmul", "mul", "softmax"], ops   # scores, scale, mask, softmax
    written_norm = next(p for p in alignment.pairs if bert_ref.node(p.ref).meta["fxdiff_module"] == "embeddings.LayerNorm")
    assert cand.node(written_norm.cand).meta["fxdiff_module"] == "in_norm"
    assert len(written_norm.cand_block) == 8   # mean, sub, pow, mean, add, rsqrt, mul, mul


@pytest.mark.parametrize("bug", sorted(H.BERT_BUGS))
def test_bert_port_bug_diverges_in_its_module(bert_ref, bug):
    ref_module, cand_module = H.BERT_BUGS[bug]
    cand = _port_capture(bug)
    report = judge(bert_ref, cand, match(bert_ref, cand))
    assert report.diverged
    first = report.first_divergence()["forward"]
    assert first, f"{bug}: no forward frontier"
    for entry in first:
        assert _in(entry["ref_module"], ref_module), (bug, entry)
        assert _in(entry["cand_module"], cand_module), (bug, entry)


def _randomized_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every floating tensor made distinct (no ones, no zeros)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def test_bert_parameter_mapping_is_the_hand_written_conversion(bert_ref):
    """Every port parameter is recovered, with a transform that reproduces ``convert_bert`` exactly,
    also on weights other than the ones the mapping was inferred from."""
    cand = _port_capture()
    alignment = match(bert_ref, cand)
    pairs = {p.ref: p for p in alignment.params}
    kinds = {k: (pairs[k].cand, pairs[k].transform.get("kind")) for k in pairs}
    assert kinds["encoder.layer.0.attention.self.key.weight"] == (("units.0.attn.qkv.weight",), "rows")
    assert pairs["encoder.layer.0.attention.self.key.weight"].transform == {"kind": "rows", "start": 32, "stop": 64}
    # zero biases and LayerNorms of ones have equal content everywhere: paired through their ops
    assert pairs["encoder.layer.2.attention.self.value.bias"].transform == {"kind": "rows", "start": 64, "stop": 96}
    assert pairs["encoder.layer.2.attention.self.value.bias"].cand == ("units.2.attn.qkv.bias",)
    assert pairs["encoder.layer.1.attention.output.dense.bias"].cand == ("units.1.attn.out_b",)
    assert pairs["encoder.layer.1.output.LayerNorm.weight"].cand == ("units.1.mlp.norm_weight",)
    assert pairs["embeddings.LayerNorm.bias"].cand == ("in_norm.shift",)

    model = H.make_bert(seed=3)
    state = _randomized_state(model, seed=4)
    expected = H.convert_bert(state)
    shapes = {k: tuple(v.shape) for k, v in cand.params.items()}
    got, missing = convert(state, alignment.params, shapes)
    assert missing == []
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


# -- GPT-2: transposed fused Conv1D against separate nn.Linear q/k/v ------------------------------

@pytest.fixture(scope="module")
def gpt2_pair():
    (ids,) = H.gpt2_inputs()
    return record(H.make_gpt2(), (ids,)), record(H.make_gpt2_port(), (ids,))


def _gpt2_expected(n_layers: int) -> dict[str, tuple[tuple[str, ...], dict]]:
    out = {"wte.weight": (("tokens.weight",), {"kind": "identity"}),
           "wpe.weight": (("positions.weight",), {"kind": "identity"}),
           "ln_f.weight": (("final_norm.weight",), {"kind": "identity"}),
           "ln_f.bias": (("final_norm.bias",), {"kind": "identity"})}
    for i in range(n_layers):
        H_, L = f"h.{i}.", f"layers.{i}."
        qkv = tuple(f"{L}attn.{x}" for x in "qkv")
        out[f"{H_}attn.c_attn.weight"] = (tuple(f"{n}.weight" for n in qkv),
                                          {"kind": "chain", "steps": [{"kind": "concat"}, {"kind": "transpose"}]})
        out[f"{H_}attn.c_attn.bias"] = (tuple(f"{n}.bias" for n in qkv), {"kind": "concat"})
        for h, port in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "fc_in"), ("mlp.c_proj", "fc_out")):
            out[f"{H_}{h}.weight"] = ((f"{L}{port}.weight",), {"kind": "transpose"})
            out[f"{H_}{h}.bias"] = ((f"{L}{port}.bias",), {"kind": "identity"})
        for h, port in (("ln_1", "norm1"), ("ln_2", "norm2")):
            for kind in ("weight", "bias"):
                out[f"{H_}{h}.{kind}"] = ((f"{L}{port}.{kind}",), {"kind": "identity"})
    return out


def test_gpt2_port_compares_clean_and_maps_every_parameter(gpt2_pair):
    ref, cand = gpt2_pair
    alignment = match(ref, cand)
    report = judge(ref, cand, alignment)
    assert not report.diverged, report.first_divergence()
    got = {p.ref: (p.cand, p.transform) for p in alignment.params}
    assert got == _gpt2_expected(2)
    assert alignment.unmatched_ref_params == [] and alignment.unmatched_cand_params == []
    # the fused c_attn op pairs with each of q, k, v, comparing its matching slice
    slices = sorted(p.ref_slice for p in alignment.pairs
                    if ref.node(p.ref).meta["fxdiff_module"] == "h.1.attn.c_attn")
    assert slices == [(0, 32), (32, 64), (64, 96)]


def test_gpt2_mapping_the_other_way_round(gpt2_pair):
    """The port as reference: each q/k/v weight is rows of the transposed fused Conv1D weight."""
    cand, ref = gpt2_pair
    alignment = match(ref, cand)
    assert not judge(ref, cand, alignment).diverged
    got = {p.ref: (p.cand, p.transform) for p in alignment.params}
    assert got["layers.1.attn.v.weight"] == (("h.1.attn.c_attn.weight",), {
        "kind": "chain", "steps": [{"kind": "transpose"}, {"kind": "rows", "start": 64, "stop": 96}]})
    assert got["layers.1.attn.k.bias"] == (("h.1.attn.c_attn.bias",), {"kind": "rows", "start": 32, "stop": 64})
    assert got["layers.0.fc_out.weight"] == (("h.0.mlp.c_proj.weight",), {"kind": "transpose"})
    assert len(got) == len(ref.params) and alignment.unmatched_cand_params == []


def test_a_weight_reshaped_where_its_transpose_was_meant_is_named(gpt2_pair):
    """A conversion that reshapes GPT-2's Conv1D weight (in, out) to the Linear's (out, in) instead
    of transposing it: the two pair exactly as a reshape, so every parameter value 'matched' and the
    divergence at the layer was 'introduced here' with no word of the weight."""
    ref, _ = gpt2_pair
    port = H.make_gpt2_port()
    with torch.no_grad():
        w = H.make_gpt2().state_dict()["h.1.mlp.c_proj.weight"]
        port.layers[1].fc_out.weight.copy_(w.reshape(port.layers[1].fc_out.weight.shape))
    cand = record(port, H.gpt2_inputs())
    report = judge(ref, cand, match(ref, cand))
    entry, = report.first_divergence()["forward"]
    assert entry["ref_module"] == "h.1.mlp.c_proj" and entry["blame"].startswith(
        "h.1.mlp.c_proj.weight is the candidate's layers.1.fc_out.weight reshaped to [128, 32], the shape of its "
        "transpose, not transposed"), entry
    value = next(p.value for p in report.params if p.ref == "h.1.mlp.c_proj.weight")
    assert not value.passed


def test_two_norms_weights_swapped_in_a_conversion_are_named():
    """A conversion that loads a layer's first norm's weights into its second and the second's into
    the first: the weights pair by their bytes, each with the other norm's, so each norm op paired
    with the other one and the story was 'another input' (open_clip's ln_1/ln_2 against HF CLIP)."""
    gpt2 = H.randomize(H.make_gpt2(), seed=3)
    state = H.convert_gpt2(gpt2.state_dict())
    for kind in ("weight", "bias"):
        a, b = f"layers.1.norm1.{kind}", f"layers.1.norm2.{kind}"
        state[a], state[b] = state[b], state[a]
    port = H.make_gpt2_port(converted=False)
    port.load_state_dict(state)
    ref, cand = record(gpt2, H.gpt2_inputs()), record(port, H.gpt2_inputs())
    first = judge(ref, cand, match(ref, cand)).first_divergence()["forward"]
    assert first and first[0]["blame"] == (
        "parameters swapped: h.1.ln_1.weight holds what the candidate's layers.1.norm2.weight does and "
        "h.1.ln_2.weight what its layers.1.norm1.weight does, which its ops read in the other order"), first


def test_independent_ops_computed_in_another_order(gpt2_pair):
    """Topological order is partial: projections run v, k, q on one side and q, k, v on the other.
    Every one still pairs with its counterpart, against GPT-2's fused c_attn and against the port."""
    (ids,) = H.gpt2_inputs()
    gpt2, port = gpt2_pair
    reordered = record(H.make_gpt2_port(order="vkq"), (ids,))
    for ref in (gpt2, port):
        alignment = match(ref, reordered)
        assert not judge(ref, reordered, alignment).diverged
        assert alignment.unmatched_cand == []
        by_cand = {reordered.node(p.cand).meta["fxdiff_module"]: p for p in alignment.pairs}
        for i, x in enumerate("qkv"):
            pair = by_cand[f"layers.1.attn.{x}"]
            if ref is port:
                assert ref.node(pair.ref).meta["fxdiff_module"] == f"layers.1.attn.{x}"
            else:
                assert pair.ref_slice == (32 * i, 32 * (i + 1))


# -- ViT: patch Conv2d against unfold + Linear ---------------------------------------------------------

@pytest.fixture(scope="module")
def vit_ref():
    return record(H.make_vit(), H.vit_inputs())


def test_vit_port_compares_clean_and_maps_its_parameters(vit_ref):
    cand = record(H.make_vit_port(), H.vit_inputs())
    alignment = match(vit_ref, cand)
    report = judge(vit_ref, cand, alignment)
    assert not report.diverged, report.first_divergence()
    assert alignment.unmatched_ref == [] and alignment.unmatched_cand == []
    pairs = {p.ref: p for p in alignment.params}
    assert pairs["embeddings.patch_embeddings.projection.weight"].transform == {"kind": "reshape", "shape": [32, 3, 4, 4]}
    # the Conv2d output is compared through its flattened, transposed view: the Linear's layout
    conv = next(p for p in alignment.pairs if cand.node(p.cand).meta["fxdiff_module"] == "stem.proj")
    assert vit_ref.node(conv.ref).meta["fxdiff_shape"] == cand.node(conv.cand).meta["fxdiff_shape"]
    state = _randomized_state(H.make_vit(seed=5), seed=6)
    got, missing = convert(state, alignment.params, {k: tuple(v.shape) for k, v in cand.params.items()})
    expected = H.convert_vit(state)
    assert missing == [] and set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_an_attention_scale_that_differs_is_named_either_way_round(vit_ref):
    """The port scales its scores by 1/d where HF's sdpa uses its default 1/sqrt(d): read off the
    sdpa on one side and the port's einsum, mul and softmax on the other, and confirmed by calling
    the sdpa again with the other side's scale, whichever side holds it."""
    cand = record(H.make_vit_port(bug="attn_scale"), H.vit_inputs())
    for ref, other, words in ((vit_ref, cand, "0.3536 (1/sqrt(8)) against 0.125 (1/8)"),
                              (cand, vit_ref, "0.125 (1/8) against 0.3536 (1/sqrt(8))")):
        first = judge(ref, other, match(ref, other)).first_divergence()["forward"]
        assert [entry["blame"] for entry in first] == [f"the attention's scale differs: {words}"]


def test_one_wrong_row_of_a_bfloat16_port_is_not_hidden_in_its_rms(vit_ref):
    """The port's class token gets no position embedding: one row of 17 wrong. In a bfloat16
    candidate the relative error over every row is within bfloat16's noise level, and the noise it
    then lent grew layer by layer: it was 'within noise' throughout. An element off by more than
    rounding allows is a difference at any precision; the correct port still passes."""
    images = tuple(x.to(torch.bfloat16) for x in H.vit_inputs())
    cand = record(H.make_vit_port(bug="cls_no_pos").to(torch.bfloat16), images)
    report = judge(vit_ref, cand, match(vit_ref, cand))
    first = report.first_divergence()["forward"]
    assert report.diverged and first
    assert all(_in(e["ref_module"], "embeddings") and _in(e["cand_module"], "stem") for e in first), first
    clean = record(H.make_vit_port().to(torch.bfloat16), images)
    assert not judge(vit_ref, clean, match(vit_ref, clean)).diverged


@pytest.mark.parametrize("bug", sorted(H.VIT_BUGS))
def test_vit_port_bug_diverges_in_its_module(vit_ref, bug):
    ref_module, cand_module = H.VIT_BUGS[bug]
    cand = record(H.make_vit_port(bug=bug), H.vit_inputs())
    report = judge(vit_ref, cand, match(vit_ref, cand))
    first = report.first_divergence()["forward"]
    assert report.diverged and first
    for entry in first:
        assert _in(entry["ref_module"], ref_module) and _in(entry["cand_module"], cand_module), (bug, entry)


# -- a causal text tower with padding: the padded positions are computed but never read -------------

class _TextFeatures(torch.nn.Module):
    """CLIP's text features (pooled at the end-of-text token), the padding mask passed on or not."""

    def __init__(self, model, use_mask: bool):
        super().__init__()
        self.model, self.use_mask = model, use_mask

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask if self.use_mask else None).text_embeds


def _clip_text(**overrides):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, projection_dim=16,
                         eos_token_id=99, bos_token_id=98, pad_token_id=0, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIPTextModelWithProjection(cfg).eval()


def test_an_activation_written_with_other_ops_is_named_with_both_sides_ops():
    """CLIP's QuickGELU (``x * sigmoid(1.702 x)``) against a port's GELU: 'introduced here' at
    the activation, with no word of what differs; each side's few ops are now named."""
    ref_model, port = _clip_text(hidden_act="quick_gelu"), _clip_text(hidden_act="gelu")
    port.load_state_dict(ref_model.state_dict())
    ids = torch.randint(1, 98, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = 99
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ref = record(_TextFeatures(ref_model, use_mask=True), (), inputs)
    cand = record(_TextFeatures(port, use_mask=True), (), inputs)
    entry, = judge(ref, cand, match(ref, cand)).first_divergence()["forward"]
    assert entry["blame"] == ("an activation of another kind: the reference's QuickGELU (written out) against the "
                              "candidate's GELU, exact"), entry   # was each side's ops: "ref mul, sigmoid, mul against cand gelu"
    assert entry["ref_module"].endswith("layers.0.mlp.activation_fn")


def test_values_that_differ_only_at_padded_positions_no_output_reads_are_not_a_divergence():
    """Hugging Face's CLIP text tower masks the padded keys; a port that passes no padding mask (as
    open_clip does) computes other values at the padded positions, which its causal attention keeps
    from every real token and its pooling never reads. It was DIVERGED at the first attention, every
    output and op gradient matching (their gradients are zero there on both sides)."""
    model = _clip_text()
    ids = torch.randint(1, 98, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, 7], ids[0, 8:], mask[0, 8:] = 99, 0, 0   # end of text, then padding
    ids[1, 11] = 99
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = record(_TextFeatures(model, use_mask=True), (), inputs)
    cand = record(_TextFeatures(model, use_mask=False), (), inputs)
    report = judge(ref, cand, match(ref, cand))
    assert not report.diverged, report.first_divergence()
    set_aside = [r for r in report.nodes if "zero gradient on both sides" in r.forward.note]
    assert set_aside and all(r.forward.passed for r in set_aside)
    assert any("differ only at elements no output depends on" in w for w in report.warnings)
    # what the padding changes is still seen where something reads it: the real tokens' values
    ids_read = ids.clone()
    ids_read[0, 7], ids_read[0, 11] = 5, 99   # end of text after the padding: its attention reads the pads
    inputs = {"input_ids": ids_read, "attention_mask": mask}
    ref = record(_TextFeatures(model, use_mask=True), (), inputs)
    cand = record(_TextFeatures(model, use_mask=False), (), inputs)
    report = judge(ref, cand, match(ref, cand))
    assert report.diverged
    # and values that differ where an output reads them are not said to differ only where none does
    assert not any("no output depends on" in w for w in report.warnings), report.warnings
