"""Parameter correspondence by content: transforms found, inverted by ``convert``, and flagged when
content alone cannot decide."""

from __future__ import annotations

import torch

from fxdiff.params import apply_transform, convert, correspond


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rope_permutation(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's Llama conversion: per head, interleaved (x0, y0, x1, y1...) rows become
    halves (x0, x1..., y0, y1...), as ``convert_llama_weights_to_hf.permute`` does."""
    dim_out, dim_in = w.shape
    return w.view(heads, dim_out // heads // 2, 2, dim_in).transpose(1, 2).reshape(dim_out, dim_in)


def _only(pairs, ref_name):
    (p,) = [p for p in pairs if p.ref == ref_name]
    return p


def test_row_permutation_per_head_rope_layout():
    g = _gen(1)
    wq, wk, wo = (torch.randn(16, 16, generator=g) for _ in range(3))
    ref = {"attn.wq.weight": wq, "attn.wk.weight": wk, "attn.wo.weight": wo}
    cand = {"self_attn.q_proj.weight": rope_permutation(wq, heads=2),
            "self_attn.k_proj.weight": rope_permutation(wk, heads=2),
            "self_attn.o_proj.weight": wo.clone()}
    pairs, ref_left, cand_left = correspond(ref, cand, list(ref), list(cand))
    assert ref_left == [] and cand_left == []
    q = _only(pairs, "attn.wq.weight")
    assert q.cand == ("self_attn.q_proj.weight",) and q.transform["kind"] == "permute_rows"
    assert q.confidence == 1.0
    assert sorted(q.transform["index"]) == list(range(16)) and q.transform["index"] != list(range(16))
    assert torch.equal(apply_transform([cand["self_attn.q_proj.weight"]], q.transform), wq)
    assert _only(pairs, "attn.wo.weight").transform == {"kind": "identity"}
    # and back: a new reference checkpoint converted into the candidate's layout
    new = {k: torch.randn(v.shape, generator=g) for k, v in ref.items()}
    out, missing = convert(new, pairs, {k: tuple(v.shape) for k, v in cand.items()})
    assert missing == []
    assert torch.equal(out["self_attn.q_proj.weight"], rope_permutation(new["attn.wq.weight"], heads=2))
    assert torch.equal(out["self_attn.k_proj.weight"], rope_permutation(new["attn.wk.weight"], heads=2))


def test_gpt2_style_transposed_fused_conv1d_both_ways():
    """GPT-2 stores q/k/v as one (d, 3d) Conv1D weight: x @ W. A port has three (d, d) Linear weights."""
    g, d = _gen(2), 8
    w, b = torch.randn(d, 3 * d, generator=g), torch.randn(3 * d, generator=g)
    gpt = {"c_attn.weight": w, "c_attn.bias": b}
    port = {f"{x}.weight": w[:, i * d:(i + 1) * d].t().contiguous() for i, x in enumerate("qkv")}
    port.update({f"{x}.bias": b[i * d:(i + 1) * d].clone() for i, x in enumerate("qkv")})

    pairs, ref_left, cand_left = correspond(gpt, port, list(gpt), list(port))
    assert ref_left == [] and cand_left == []
    weight = _only(pairs, "c_attn.weight")
    assert weight.cand == ("q.weight", "k.weight", "v.weight")
    assert weight.transform == {"kind": "chain", "steps": [{"kind": "concat"}, {"kind": "transpose"}]}
    assert torch.equal(apply_transform([port[n] for n in weight.cand], weight.transform), w)
    assert _only(pairs, "c_attn.bias").transform == {"kind": "concat"}
    out, missing = convert(gpt, pairs, {k: tuple(v.shape) for k, v in port.items()})
    assert missing == [] and all(torch.equal(out[k], port[k]) for k in port)

    pairs, ref_left, cand_left = correspond(port, gpt, list(port), list(gpt))
    assert ref_left == [] and cand_left == []
    k = _only(pairs, "k.weight")
    assert k.cand == ("c_attn.weight",)
    assert k.transform == {"kind": "chain", "steps": [{"kind": "transpose"}, {"kind": "rows", "start": d, "stop": 2 * d}]}
    assert torch.equal(apply_transform([w], k.transform), port["k.weight"])
    out, missing = convert(port, pairs, {k: tuple(v.shape) for k, v in gpt.items()})
    assert missing == [] and torch.equal(out["c_attn.weight"], w) and torch.equal(out["c_attn.bias"], b)


def test_kernel_one_conv_against_linear_is_a_reshape():
    w = torch.randn(6, 4, 1, generator=_gen(3))
    pairs, _, _ = correspond({"pointwise.weight": w}, {"expand.weight": w.squeeze(-1).clone()},
                             ["pointwise.weight"], ["expand.weight"])
    assert pairs[0].transform == {"kind": "reshape", "shape": [6, 4, 1]}
    out, missing = convert({"pointwise.weight": w * 2}, pairs, {"expand.weight": (6, 4)})
    assert missing == [] and torch.equal(out["expand.weight"], (w * 2).squeeze(-1))


def test_equal_content_is_flagged_not_trusted():
    """Zero biases are all alike: content pairs them only in order of use, at lower confidence."""
    ref = {"a.bias": torch.zeros(4), "b.bias": torch.zeros(4), "w": torch.randn(4, 4, generator=_gen(4))}
    cand = {"x.bias": torch.zeros(4), "y.bias": torch.zeros(4), "v": ref["w"].clone()}
    pairs, _, _ = correspond(ref, cand, ["a.bias", "w", "b.bias"], ["y.bias", "v", "x.bias"])
    assert _only(pairs, "w").confidence == 1.0
    a = _only(pairs, "a.bias")
    assert a.cand == ("y.bias",) and a.confidence < 1.0 and "order of use" in a.evidence
