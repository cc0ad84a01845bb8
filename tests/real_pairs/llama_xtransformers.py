"""HF ``LlamaForCausalLM`` against lucidrains' x-transformers ``TransformerWrapper(Decoder(...))``
with rotary embeddings, RMSNorm and a SiLU GLU feed-forward: an independent implementation from a
different library (einops rearranges, ``F.normalize``-based RMSNorm, interleaved RoPE, a fused GLU
projection whose first half is the value and second half the gate, and a bias the reference lacks).

Conversion: q/k rows permuted per head from HF's rotate-half layout to interleaved pairs; GLU
``proj = cat(up, gate)`` with a zero bias; layer ``i``'s attention is x-transformers block ``2i``,
its feed-forward block ``2i + 1``. RMSNorm gains are stored minus one (x-transformers' ``unit_offset``). ``F.normalize`` clamps the norm at 1e-12, so the reference uses
``rms_norm_eps=1e-12``. The candidate is wrapped (``XWrapper``) to take the reference's
``(input_ids, attention_mask=, use_cache=)`` and turn the mask into x-transformers' boolean ``mask``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import Bug, Pair, randomize
from .llama_meta import meta_permute

D, H, FF, L, V, T = 32, 4, 64, 2, 97, 12
HD = D // H
UNIT_OFFSET = 1.0    # x-transformers 2.x RMSNorm stores g with gamma = g + 1 (unit_offset)


def build_ref():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=H, max_position_embeddings=64,
                      rms_norm_eps=1e-12, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return randomize(LlamaForCausalLM(cfg), seed=5).eval()


def _xt(rotary_emb_dim=HD):
    from x_transformers import Decoder, TransformerWrapper
    return TransformerWrapper(
        num_tokens=V, max_seq_len=32, use_abs_pos_emb=False,
        attn_layers=Decoder(dim=D, depth=L, heads=H, attn_dim_head=HD, rotary_pos_emb=True,
                            rotary_emb_dim=rotary_emb_dim, use_rmsnorm=True, ff_glu=True, ff_swish=True,
                            ff_no_bias=True, ff_mult=FF / D))


class XWrapper(nn.Module):
    def __init__(self, net, use_mask=True):
        super().__init__()
        self.net = net
        self.use_mask = use_mask

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        mask = attention_mask.bool() if (attention_mask is not None and self.use_mask) else None
        return self.net(input_ids, mask=mask)


def convert(sd: dict, permute: bool = True, glu_order=("up", "gate")) -> dict:
    pm = meta_permute if permute else (lambda w, n: w)
    out = {"net.token_emb.emb.weight": sd["model.embed_tokens.weight"],
           "net.attn_layers.final_norm.g": sd["model.norm.weight"] - UNIT_OFFSET, "net.to_logits.weight": sd["lm_head.weight"]}
    for i in range(L):
        r, a, f = f"model.layers.{i}.", f"net.attn_layers.layers.{2 * i}.", f"net.attn_layers.layers.{2 * i + 1}."
        out[a + "0.0.g"] = sd[r + "input_layernorm.weight"] - UNIT_OFFSET
        out[a + "1.to_q.weight"] = pm(sd[r + "self_attn.q_proj.weight"], H)
        out[a + "1.to_k.weight"] = pm(sd[r + "self_attn.k_proj.weight"], H)
        out[a + "1.to_v.weight"] = sd[r + "self_attn.v_proj.weight"]
        out[a + "1.to_out.weight"] = sd[r + "self_attn.o_proj.weight"]
        out[f + "0.0.g"] = sd[r + "post_attention_layernorm.weight"] - UNIT_OFFSET
        out[f + "1.ff.0.proj.weight"] = torch.cat([sd[r + f"mlp.{n}_proj.weight"] for n in glu_order], 0)
        out[f + "1.ff.0.proj.bias"] = torch.zeros(2 * FF)
        out[f + "1.ff.2.weight"] = sd[r + "mlp.down_proj.weight"]
    return out


def _load(m, sd):
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return m.eval()


def build_cand(ref):
    return _load(XWrapper(_xt()), convert(ref.state_dict()))


def inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, T), generator=g)
    # no padding: x-transformers computes padded *query* rows differently from HF (don't-care values
    # that a default loss would still weigh), so this pair is compared on full rows only
    mask = torch.ones(2, T, dtype=torch.long)
    return (ids,), {"attention_mask": mask, "use_cache": False}


# ---- bugs -----------------------------------------------------------------------------------------

def _rebuild(**kw):
    def apply(cand):
        rotary = kw.pop("rotary_emb_dim", HD) if "rotary_emb_dim" in kw else HD
        return _load(XWrapper(_xt(rotary)), convert(build_ref().state_dict(), **kw))
    return apply


def bug_partial_rotary(cand):
    """x-transformers' default ``rotary_emb_dim = dim_head // 2``: RoPE on half of each head only."""
    return _load(XWrapper(_xt(HD // 2)), convert(build_ref().state_dict()))


def bug_not_causal(cand):
    """Layer 0's attention built without the causal mask (``causal=False`` on its ``Attend``)."""
    at = cand.net.attn_layers.layers[0][1]
    at.causal = at.attend.causal = False


def bug_attn_scale(cand):
    cand.net.attn_layers.layers[2][1].attend.scale = 1.0 / HD


BUGS = [
    Bug("rope_unpermuted", "wrong RoPE (interleaved applied to rotate-half q/k rows)", _rebuild(permute=False),
        r"model\.layers\.0\.self_attn", r"net\.attn_layers\.layers\.0\.1"),
    Bug("glu_swap", "fused GLU gate/value halves swapped", _rebuild(glu_order=("gate", "up")),
        r"model\.layers\.0\.mlp", r"net\.attn_layers\.layers\.1\.1"),
    Bug("partial_rotary", "wrong RoPE (rotary on half the head dims)", bug_partial_rotary,
        r"model\.layers\.0\.self_attn", r"net\.attn_layers\.layers\.0\.1"),
    Bug("not_causal", "mask bug (causal mask missing in layer 0)", bug_not_causal,
        r"model\.layers\.0\.self_attn", r"net\.attn_layers\.layers\.0\.1"),
    Bug("attn_scale", "wrong attention scale (layer 1)", bug_attn_scale,
        r"model\.layers\.1\.self_attn", r"net\.attn_layers\.layers\.2\.1"),
]

PAIR = Pair("llama_xtransformers", build_ref, convert, build_cand, inputs, BUGS,
            covers=("library port (einops, F.normalize RMSNorm)", "weights stored row-permuted (interleaved RoPE)",
                    "fused GLU with extra zero bias", "different call convention (wrapper)", "logits output"),
            bf16_by="autocast",
            note="x-transformers 2.31.10 cannot run after .to(bfloat16) even without fxdiff (its attention returns "
                 "float32 and GLU.proj then fails 'mat1 and mat2 must have the same dtype'): bf16 runs under autocast")
