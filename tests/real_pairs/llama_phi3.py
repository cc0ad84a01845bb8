"""HF ``LlamaModel`` (separate q/k/v, gate/up; SDPA) against HF ``Phi3Model`` (fused ``qkv_proj`` and
``gate_up_proj``; eager attention). Same function: pre-norm RMSNorm decoder, rotate-half RoPE, SiLU GLU.

Conversion: ``qkv_proj = cat(q, k, v)`` rows, ``gate_up_proj = cat(gate, up)`` rows, everything else
by name.
"""

from __future__ import annotations

import types

import torch

from . import Bug, Pair, randomize

D, H, KV, FF, L, V, T = 32, 4, 2, 64, 2, 97, 12


def build_ref():
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64,
                      rms_norm_eps=1e-6, attn_implementation="sdpa")
    torch.manual_seed(0)
    return randomize(LlamaModel(cfg), seed=1).eval()


def convert(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if ".self_attn.q_proj." in k:
            p = k.replace("q_proj", "")
            out[k.replace("q_proj", "qkv_proj")] = torch.cat(
                [sd[p.replace("self_attn.", "self_attn.q_proj")], sd[p.replace("self_attn.", "self_attn.k_proj")],
                 sd[p.replace("self_attn.", "self_attn.v_proj")]], 0)
        elif ".mlp.gate_proj." in k:
            out[k.replace("gate_proj", "gate_up_proj")] = torch.cat([v, sd[k.replace("gate_proj", "up_proj")]], 0)
        elif any(s in k for s in (".k_proj.", ".v_proj.", ".up_proj.")):
            continue
        else:
            out[k] = v
    return out


def build_cand(ref):
    from transformers import Phi3Config, Phi3Model
    c = ref.config
    cfg = Phi3Config(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                     num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64,
                     original_max_position_embeddings=64, rms_norm_eps=c.rms_norm_eps, pad_token_id=0,
                     attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    m = Phi3Model(cfg)
    missing, unexpected = m.load_state_dict(convert(ref.state_dict()), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return m.eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, -3:] = 0
    return (ids,), {"attention_mask": mask, "use_cache": False}


# ---- bugs -----------------------------------------------------------------------------------------

def _swap_rows(w, a, b, n):
    w = w.clone()
    w[a:a + n], w[b:b + n] = w[b:b + n].clone(), w[a:a + n].clone()
    return w


def bug_qk_swap(m):
    """Fused qkv assembled as (k, q, v): role swap in the fused weight (layer 1; GQA: q has H*hd
    rows, k KV*hd rows, so swap only the first KV heads of q with k)."""
    attn = m.layers[1].self_attn
    hd = D // H
    with torch.no_grad():
        attn.qkv_proj.weight.copy_(_swap_rows(attn.qkv_proj.weight, 0, H * hd, KV * hd))


def bug_gate_up_swap(m):
    """gate_up_proj built as cat(up, gate): GLU halves swapped (layer 0)."""
    mlp = m.layers[0].mlp
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(mlp.gate_up_proj.weight.roll(FF, 0))


def bug_norm_eps(m):
    m.layers[1].post_attention_layernorm.variance_epsilon = 1e-2


def bug_attn_scale(m):
    m.layers[0].self_attn.scaling = 1.0 / (D // H)      # 1/d instead of 1/sqrt(d)


def bug_no_mlp_residual(m):
    """Layer 1 forgets the residual around its MLP (the add is missing on the candidate side)."""
    layer = m.layers[1]

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        h = residual + self.resid_attn_dropout(h)
        h = self.post_attention_layernorm(h)
        return self.resid_mlp_dropout(self.mlp(h))     # bug: residual + ... dropped
    layer.forward = types.MethodType(forward, layer)


BUGS = [
    Bug("qk_swap", "fused-weight role swap (q/k in qkv_proj)", bug_qk_swap, r"layers\.1\.self_attn", r"layers\.1\.self_attn"),
    Bug("gate_up_swap", "fused-weight role swap (GLU gate/value halves)", bug_gate_up_swap, r"layers\.0\.mlp", r"layers\.0\.mlp"),
    Bug("norm_eps", "wrong norm eps", bug_norm_eps, r"layers\.1\.post_attention_layernorm", r"layers\.1\.post_attention_layernorm"),
    Bug("attn_scale", "wrong attention scale", bug_attn_scale, r"layers\.0\.self_attn", r"layers\.0\.self_attn"),
    Bug("no_mlp_residual", "forgotten residual add", bug_no_mlp_residual, r"layers\.1", r"layers\.1", exact=True),
]

PAIR = Pair("llama_phi3", build_ref, convert, build_cand, inputs, BUGS,
            covers=("fused vs separate projections (qkv, gate_up)", "sdpa vs eager attention decomposition"))
