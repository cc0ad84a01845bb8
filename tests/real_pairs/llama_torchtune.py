"""HF ``LlamaForCausalLM`` against torchtune's Llama (``torchtune.models.llama3.llama3``, a
``TransformerDecoder``): an independent implementation from another library (``F.rms_norm`` on float32,
interleaved RoPE from a cos/sin cache, GQA by ``expand``, SDPA with a boolean mask, float32 logits).

Conversion is torchtune's own checkpoint path, ``torchtune.models.convert_weights.hf_to_tune``: keys
renamed (``attn.output_proj``, ``mlp.w1/w2/w3``, ``sa_norm.scale`` ...) and q/k rows permuted per head
from HF's rotate-half layout to torchtune's interleaved pairs. torchtune's builder makes ONE
``RotaryPositionalEmbeddings`` and hands it to every layer's attention, so the module is registered at
``layers.0.attn.pos_embeddings`` only and called from every layer. The candidate is wrapped
(``TuneWrapper``) to take the reference's ``(input_ids, attention_mask=, use_cache=)`` and build
torchtune's boolean ``[b, s, s]`` mask (causal and key padding).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from . import Bug, Pair, randomize
from .llama_phi3 import D, FF, H, KV, L, V, inputs

HD = D // H
THETA = 10000.0     # Llama 2 checkpoints; torchtune's llama3 builder defaults to 500_000
EPS = 1e-6          # torchtune's llama3 builder defaults to 1e-5


def build_ref():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64,
                      rms_norm_eps=EPS, rope_theta=THETA, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return randomize(LlamaForCausalLM(cfg), seed=7).eval()


def _tt(**kw):
    from torchtune.models.llama3 import llama3
    args = dict(vocab_size=V, num_layers=L, num_heads=H, num_kv_heads=KV, embed_dim=D, max_seq_len=64,
                intermediate_dim=FF, norm_eps=EPS, rope_base=THETA)
    args.update(kw)
    return llama3(**args)


class TuneWrapper(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        b, s = input_ids.shape
        causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()
        mask = causal[None] if attention_mask is None else causal[None] & attention_mask.bool()[:, None, :]
        return self.net(input_ids, mask=mask.expand(b, s, s))


def convert(sd: dict, permute: bool = True) -> dict:
    from torchtune.models.convert_weights import _FROM_HF, get_mapped_key, hf_to_tune
    if permute:
        out = hf_to_tune(sd, num_heads=H, num_kv_heads=KV, dim=D)
    else:
        out = {get_mapped_key(k, _FROM_HF): v for k, v in sd.items()}
    return {"net." + k: v for k, v in out.items()}


def _load(m, sd):
    m.load_state_dict(sd)      # strict: every key converted, none left over
    return m.eval()


def build_cand(ref):
    return _load(TuneWrapper(_tt()), convert(ref.state_dict()))


# ---- bugs -----------------------------------------------------------------------------------------

def bug_rope_unpermuted(cand):
    """HF q/k rows loaded as they are (the checkpoint's rotate-half layout under torchtune's interleaved
    RoPE): the permutation of ``hf_to_tune`` was skipped."""
    return _load(TuneWrapper(_tt()), convert(build_ref().state_dict(), permute=False))


def bug_rope_base(cand):
    """Built with the llama3 builder's default ``rope_base`` (500 000) for a checkpoint trained with 10 000:
    the shared RoPE rotates with the wrong frequencies in every layer."""
    return _load(TuneWrapper(_tt(rope_base=500_000)), convert(build_ref().state_dict()))


def bug_norm_eps(cand):
    """Built with the builder's default ``norm_eps`` (1e-5) for a checkpoint whose config says 1e-6."""
    return _load(TuneWrapper(_tt(norm_eps=1e-5)), convert(build_ref().state_dict()))


def bug_glu_swap(cand):
    """``gate_proj`` loaded into ``w3`` and ``up_proj`` into ``w1`` (layer 0): SiLU applied to the wrong half."""
    mlp = cand.net.layers[0].mlp
    with torch.no_grad():
        w1 = mlp.w1.weight.clone()
        mlp.w1.weight.copy_(mlp.w3.weight)
        mlp.w3.weight.copy_(w1)


def bug_gqa_tiled(cand):
    """Layer 1 repeats the kv heads tiled (``repeat``: kv head j serves q heads j, j + KV, ...) where
    Llama groups them (``repeat_interleave``: q heads 2j, 2j + 1)."""
    attn = cand.net.layers[1].attn

    def forward(self, x, y=None, *, mask=None, input_pos=None):
        b, s, _ = x.shape
        q = self.pos_embeddings(self.q_proj(x).view(b, s, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.pos_embeddings(self.k_proj(y).view(b, s, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(y).view(b, s, -1, self.head_dim).transpose(1, 2)
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1)
        out = self._attention_call(q, k, v, mask=mask, dropout_p=0.0, is_causal=False)
        return self.output_proj(out.transpose(1, 2).contiguous().view(b, s, -1))
    attn.forward = types.MethodType(forward, attn)


def bug_shared_rope_layer1(cand):
    """The RoPE instance shared by all layers rotates by twice the position when layer 1 calls it (a
    position scale applied at one call site; a uniform offset would cancel in q.k): the module's
    registered path is layer 0's."""
    net = cand.net
    rope = net.layers[0].attn.pos_embeddings
    assert all(layer.attn.pos_embeddings is rope for layer in net.layers)
    rope.caller = -1

    def caller(i):
        def hook(module, args):
            rope.caller = i
        return hook

    def shift(module, args, kwargs):
        if module.caller == 1:
            s = args[0].shape[1]
            kwargs = {**kwargs, "input_pos": 2 * torch.arange(s, device=args[0].device)}
        return args, kwargs

    for i, layer in enumerate(net.layers):
        layer.attn.register_forward_pre_hook(caller(i))
    rope.register_forward_pre_hook(shift, with_kwargs=True)


def bug_no_mlp_residual(cand):
    """Layer 1 forgets the residual around its MLP."""
    layer = cand.net.layers[1]

    def forward(self, x, *, mask=None, input_pos=None, **kwargs):
        h = self.sa_norm(x)
        h = self.sa_scale(self.attn(h, h, mask=mask, input_pos=input_pos)) + x
        return self.mlp_scale(self.mlp(self.mlp_norm(h)))       # bug: h + ... dropped
    layer.forward = types.MethodType(forward, layer)


BUGS = [
    Bug("rope_unpermuted", "wrong RoPE layout (q/k permutation skipped)", bug_rope_unpermuted,
        r"model\.layers\.0\.self_attn", r"net\.layers\.0\.attn"),
    Bug("rope_base", "wrong RoPE base (builder default)", bug_rope_base,
        r"model\.layers\.0\.self_attn", r"net\.layers\.0\.attn"),
    Bug("norm_eps", "wrong norm eps (builder default)", bug_norm_eps,
        r"model\.layers\.0\.input_layernorm", r"net\.layers\.0\.sa_norm"),
    Bug("glu_swap", "GLU gate/up swapped in the conversion (layer 0)", bug_glu_swap,
        r"model\.layers\.0\.mlp", r"net\.layers\.0\.mlp"),
    Bug("gqa_tiled", "GQA head mapping wrong (kv heads tiled, layer 1)", bug_gqa_tiled,
        r"model\.layers\.1\.self_attn", r"net\.layers\.1\.attn"),
    Bug("shared_rope_layer1", "bug in a module shared across layers, only when called from layer 1",
        bug_shared_rope_layer1, r"model\.layers\.1\.self_attn", r"net\.layers\.1\.attn"),
    Bug("no_mlp_residual", "forgotten residual add (MLP, layer 1)", bug_no_mlp_residual,
        r"model\.layers\.1", r"net\.layers\.1", exact=True),
]

PAIR = Pair("llama_torchtune", build_ref, convert, build_cand, inputs, BUGS,
            covers=("library port (torchtune)", "weights stored row-permuted (interleaved RoPE)",
                    "shared module instance across layers (RoPE)", "GQA by expand", "boolean SDPA mask",
                    "different call convention (wrapper)", "logits output"))
