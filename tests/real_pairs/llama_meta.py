"""HF ``LlamaModel`` against a Meta-style Llama written here in plain torch, in Meta's style.

The port (``MetaLlama``): ``tok_embeddings``, ``layers.N.attention.{wq,wk,wv,wo}``,
``layers.N.feed_forward.{w1,w2,w3}``, ``attention_norm`` / ``ffn_norm``, ``norm``; RoPE applied as a
complex multiplication (``view_as_complex`` on interleaved pairs, Meta's ``freqs_cis``), so the q/k
weights are stored in Meta's original checkpoint layout: per head, rows permuted from HF's
rotate-half order to interleaved pairs (the inverse of HF's ``convert_llama_weights_to_hf.permute``).
The SiLU of the feed-forward is ONE module object (``SharedSiLU``) registered in every layer, as
torchtune and NeMo reuse activation modules, and it computes SiLU through a custom
``autograd.Function`` with a hand-written backward.

``PAIR`` builds the additive mask with ``arange`` comparisons. ``PAIR_VMAP`` is the same port, but the
causal pattern is a *sparse* COO buffer (``causal_sparse``) and the causal+padding mask is built
under ``torch.vmap`` over the batch, as transformers 4.5x built its masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import Bug, Pair, randomize
from .llama_phi3 import D, FF, H, KV, L, V, inputs

HD = D // H
THETA = 10000.0


def build_ref():
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64,
                      rms_norm_eps=1e-6, rope_theta=THETA, attn_implementation="sdpa")
    torch.manual_seed(0)
    return randomize(LlamaModel(cfg), seed=2).eval()


class SiLUFn(torch.autograd.Function):
    """SiLU with a hand-written backward; ``bad_backward`` forgets the x * s * (1 - s) term."""

    @staticmethod
    def forward(ctx, x, bad_backward: bool):
        ctx.save_for_backward(x)
        ctx.bad = bad_backward
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        if ctx.bad:
            return g * s, None
        return g * (s * (1 + x * (1 - s))), None


class SharedSiLU(nn.Module):
    """One instance serves every layer; the model tells it which layer calls (``self.layer``)."""

    def __init__(self):
        super().__init__()
        self.layer = -1
        self.bad_backward = False
        self.bug_layer = None          # layer whose call computes the wrong function

    def forward(self, x):
        if self.layer == self.bug_layer:
            return F.gelu(x)
        return SiLUFn.apply(x, self.bad_backward)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def precompute_freqs_cis(dim, end, theta=THETA):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(end, dtype=torch.float32)
    return torch.polar(torch.ones(end, dim // 2), torch.outer(t, freqs))


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    fc = freqs_cis[None, :, None, :]
    return torch.view_as_real(xq_ * fc).flatten(3).type_as(xq), torch.view_as_real(xk_ * fc).flatten(3).type_as(xk)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(D, H * HD, bias=False)
        self.wk = nn.Linear(D, KV * HD, bias=False)
        self.wv = nn.Linear(D, KV * HD, bias=False)
        self.wo = nn.Linear(H * HD, D, bias=False)

    def forward(self, x, freqs_cis, mask):
        b, t, _ = x.shape
        xq, xk, xv = self.wq(x).view(b, t, H, HD), self.wk(x).view(b, t, KV, HD), self.wv(x).view(b, t, KV, HD)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        rep = H // KV
        keys = xk.repeat_interleave(rep, dim=2).transpose(1, 2)
        values = xv.repeat_interleave(rep, dim=2).transpose(1, 2)
        xq = xq.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(HD)
        scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        out = torch.matmul(scores, values).transpose(1, 2).contiguous().view(b, t, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.w1 = nn.Linear(D, FF, bias=False)
        self.w2 = nn.Linear(FF, D, bias=False)
        self.w3 = nn.Linear(D, FF, bias=False)
        self.act = act                 # shared across layers

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id, act):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention()
        self.feed_forward = FeedForward(act)
        self.attention_norm = RMSNorm(D)
        self.ffn_norm = RMSNorm(D)
        self.drop_attn_residual = False

    def forward(self, x, freqs_cis, mask):
        a = self.attention(self.attention_norm(x), freqs_cis, mask)
        h = a if self.drop_attn_residual else x + a
        self.feed_forward.act.layer = self.layer_id
        return h + self.feed_forward(self.ffn_norm(h))


class MetaLlama(nn.Module):
    def __init__(self, mask_style="arange", max_seq=32):
        super().__init__()
        self.tok_embeddings = nn.Embedding(V, D)
        act = SharedSiLU()
        self.layers = nn.ModuleList(TransformerBlock(i, act) for i in range(L))
        self.norm = RMSNorm(D)
        self.freqs_cis = precompute_freqs_cis(HD, max_seq)     # plain attribute, as in Meta's code
        self.mask_style = mask_style
        self.mask_shift = 0            # bug knob: allow attending `mask_shift` future tokens
        if mask_style == "vmap":
            self.register_buffer("causal_sparse", torch.ones(max_seq, max_seq).tril().to_sparse())

    def build_mask(self, attention_mask, t, dtype):
        pad = attention_mask.bool()
        if self.mask_style == "vmap":
            causal = self.causal_sparse.to_dense()[:t, :t].bool()
            if self.mask_shift:
                causal = torch.ones(t, t, dtype=torch.bool, device=pad.device).tril(self.mask_shift)
            allowed = torch.vmap(lambda row: causal & row[None, :])(pad)            # (b, t, t)
        else:
            q = torch.arange(t, device=pad.device)
            allowed = (q[None, :] <= q[:, None] + self.mask_shift)[None] & pad[:, None, :]
        m = torch.zeros(allowed.shape, dtype=dtype, device=pad.device)
        return m.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def forward(self, tokens, attention_mask=None, use_cache=False):
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[:t]
        mask = self.build_mask(attention_mask, t, h.dtype)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        return self.norm(h)


def meta_permute(w, n_heads):
    """HF rotate-half row layout -> Meta interleaved layout (per head)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def convert(sd: dict, permute: bool = True) -> dict:
    pm = meta_permute if permute else (lambda w, n: w)
    out = {"tok_embeddings.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"]}
    for i in range(L):
        p = f"layers.{i}."
        out[p + "attention.wq.weight"] = pm(sd[p + "self_attn.q_proj.weight"], H)
        out[p + "attention.wk.weight"] = pm(sd[p + "self_attn.k_proj.weight"], KV)
        out[p + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


def _builder(mask_style):
    def build_cand(ref):
        m = MetaLlama(mask_style)
        missing, unexpected = m.load_state_dict(convert(ref.state_dict()), strict=False)
        assert not unexpected and all(k == "causal_sparse" for k in missing), (missing, unexpected)
        return m.eval()
    return build_cand


# ---- bugs -----------------------------------------------------------------------------------------

def bug_rope_layout(m):
    """Interleaved (complex) RoPE applied to HF-layout q/k weights: the permutation was forgotten."""
    ref_like = build_ref()
    with torch.no_grad():
        for i in range(L):
            m.layers[i].attention.wq.weight.copy_(ref_like.layers[i].self_attn.q_proj.weight)
            m.layers[i].attention.wk.weight.copy_(ref_like.layers[i].self_attn.k_proj.weight)


def bug_shared_act_layer1(m):
    """The shared activation computes GELU instead of SiLU, only when layer 1 calls it."""
    m.layers[0].feed_forward.act.bug_layer = 1


def bug_silu_backward(m):
    """Custom autograd SiLU with a wrong backward: the forward is exact, gradients are not."""
    m.layers[0].feed_forward.act.bad_backward = True


def bug_mask_shift(m):
    """Causal mask off by one: each query also sees the next token."""
    m.mask_shift = 1


def bug_no_attn_residual(m):
    m.layers[1].drop_attn_residual = True


BUGS = [
    Bug("rope_layout", "wrong RoPE layout (interleaved applied to rotate-half weights)", bug_rope_layout,
        r"layers\.0\.self_attn", r"layers\.0\.attention"),
    Bug("shared_act_layer1", "bug in a module shared across layers, only when called from layer 1",
        bug_shared_act_layer1, r"layers\.1\.mlp", r"layers\.1\.feed_forward"),
    Bug("silu_backward", "wrong custom autograd backward (backward-only)", bug_silu_backward,
        r"layers\.1\.mlp", r"layers\.1\.feed_forward", direction="backward",
        note="wrong in every layer; backward reaches layer 1 first"),
    Bug("mask_shift", "mask bug (causal mask off by one)", bug_mask_shift, "", "", exact=True,
        note="both sides build the mask in the root module's forward (HF: create_causal_mask)"),
    Bug("no_attn_residual", "forgotten residual add (attention, layer 1)", bug_no_attn_residual,
        r"layers\.1", r"layers\.1", exact=True),
]

PAIR = Pair("llama_meta", build_ref, convert, _builder("arange"), inputs, BUGS,
            covers=("weights stored row-permuted (interleaved vs rotate-half RoPE)", "complex-valued RoPE",
                    "shared module instance across layers", "custom autograd.Function"))

BUGS_VMAP = [b for b in BUGS if b.name in ("mask_shift", "rope_layout", "no_attn_residual", "shared_act_layer1",
                                             "silu_backward")]
PAIR_VMAP = Pair("llama_meta_vmap", build_ref, convert, _builder("vmap"), inputs, BUGS_VMAP,
                 covers=("tensors created under torch.vmap (mask)", "sparse buffer"))
