"""HF ``GPT2Model`` (transposed ``Conv1D`` layers, ``gelu_new`` written out with tanh) against HF
``GPTBigCodeModel`` with ``multi_query=False`` (``nn.Linear`` layers, ``F.gelu(approximate="tanh")``,
and a fused ``c_attn`` whose output is viewed as ``(heads, 3 * head_dim)``: per head [q_h, k_h, v_h]).

Conversion: every Conv1D weight transposed; ``c_attn`` rows regrouped from GPT-2's [q | k | v] blocks
into BigCode's per-head interleaving (a row permutation of the fused projection).
"""

from __future__ import annotations

import types

import torch

from . import Bug, Pair, randomize

D, H, L, V, T = 32, 4, 2, 97, 12
HD = D // H


def build_ref():
    from transformers import GPT2Config, GPT2Model
    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=D, n_layer=L, n_head=H, n_inner=4 * D,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    return randomize(GPT2Model(cfg), seed=3).eval()


def regroup_qkv(w_t):
    """(3D, ...) rows [q; k; v] -> per-head [q_h; k_h; v_h]."""
    rest = w_t.shape[1:]
    return w_t.reshape(3, H, HD, *rest).transpose(0, 1).reshape(3 * D, *rest)


def convert(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.c_attn.weight"):
            out[k] = regroup_qkv(v.t())
        elif k.endswith("attn.c_attn.bias"):
            out[k] = regroup_qkv(v)
        elif any(k.endswith(s) for s in ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            out[k] = v.t()
        else:
            out[k] = v
    return out


def build_cand(ref):
    from transformers import GPTBigCodeConfig, GPTBigCodeModel
    cfg = GPTBigCodeConfig(vocab_size=V, n_positions=32, n_embd=D, n_layer=L, n_head=H, n_inner=4 * D,
                           multi_query=False, activation_function="gelu_pytorch_tanh",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    m = GPTBigCodeModel(cfg)
    missing, unexpected = m.load_state_dict(convert(ref.state_dict()), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return m.eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, -4:] = 0
    return (ids,), {"attention_mask": mask, "use_cache": False}


# ---- bugs -----------------------------------------------------------------------------------------

def bug_exact_gelu(m):
    """Layer 1's MLP uses exact GELU where GPT-2 uses the tanh approximation."""
    m.h[1].mlp.act = torch.nn.GELU()


def bug_attn_scale(m):
    m.h[0].attn.scaling = 1.0          # scale_attn_weights=False: scores not divided by sqrt(d)


def bug_qk_swap(m):
    """Fused c_attn regrouped as [k_h, q_h, v_h]: q/k role swap in the fused weight (layer 1)."""
    a = m.h[1].attn.c_attn
    with torch.no_grad():
        w = a.weight.view(H, 3, HD, D)
        b = a.bias.view(H, 3, HD)
        a.weight.copy_(w[:, [1, 0, 2]].reshape(3 * D, D))
        a.bias.copy_(b[:, [1, 0, 2]].reshape(3 * D))


def bug_norm_eps(m):
    m.h[0].ln_2.eps = 1e-1


def bug_no_attn_residual(m):
    blk = m.h[1]

    def forward(self, hidden_states, encoder_hidden_states=None, layer_past=None, attention_mask=None,
                encoder_attention_mask=None, use_cache=False, output_attentions=False, **kwargs):
        h = self.ln_1(hidden_states)
        h, _ = self.attn(h, layer_past=layer_past, attention_mask=attention_mask, use_cache=use_cache,
                         output_attentions=output_attentions, **kwargs)   # bug: + residual dropped
        return h + self.mlp(self.ln_2(h))
    blk.forward = types.MethodType(forward, blk)


BUGS = [
    Bug("exact_gelu", "wrong activation (exact gelu vs tanh gelu)", bug_exact_gelu, r"h\.1\.mlp", r"h\.1\.mlp"),
    Bug("attn_scale", "wrong attention scale (missing 1/sqrt(d))", bug_attn_scale, r"h\.0\.attn", r"h\.0\.attn"),
    Bug("qk_swap", "fused-weight role swap (q/k in per-head c_attn)", bug_qk_swap, r"h\.1\.attn", r"h\.1\.attn"),
    Bug("norm_eps", "wrong norm eps", bug_norm_eps, r"h\.0\.ln_2", r"h\.0\.ln_2"),
    Bug("no_attn_residual", "forgotten residual add", bug_no_attn_residual, r"h\.1", r"h\.1", exact=True),
]

PAIR = Pair("gpt2_bigcode", build_ref, convert, build_cand, inputs, BUGS,
            covers=("Conv1D (transposed) vs Linear", "fused qkv with per-head row interleaving",
                    "gelu_new written out vs F.gelu(tanh)", "eager vs sdpa"))
