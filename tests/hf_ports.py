"""Hand-written ports of Hugging Face models, with their own names and decompositions.

``BertPort`` computes ``transformers.BertModel`` (eval mode, SDPA attention) with none of its module
names: ``tok``/``seg``/``pos_table`` embeddings, a LayerNorm written out (mean, var, rsqrt) at the
input, ``units.N`` blocks whose attention has one fused ``qkv`` projection, attention written by
hand (matmul, scale, mask, softmax, matmul) and an output projection spelled ``matmul + add`` with
bare parameters, and a pooler ``summary``. ``convert_bert`` maps a ``BertModel`` state dict onto it.
``BertPort(cfg, bug=NAME)`` plants one porting bug; ``BERT_BUGS[NAME]`` says where it shows, as
(reference module prefix, candidate module prefix).

``GPT2Port`` computes ``transformers.GPT2Model`` with separate q/k/v ``nn.Linear`` layers where GPT-2
has one transposed ``Conv1D`` (``c_attn``), ``nn.Linear`` everywhere else, SDPA and PyTorch's tanh
GELU; ``convert_gpt2`` maps a ``GPT2Model`` state dict onto it. ``make_gpt2_port(order="vkq")``
runs the projections in another order.

``ViTPort`` computes ``transformers.ViTModel`` with patches cut by ``unfold`` and projected by a
``Linear`` (a strided ``Conv2d`` in ViT), a fused ``qkv`` split by ``unbind``, einsum attention and an
``nn.Sequential`` MLP; ``convert_vit`` maps the weights, ``VIT_BUGS`` lists its planted bugs.

The module-level builders (``bert_reference`` ...) are model specs for the command line.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BERT_BUGS = {
    "norm_eps": ("encoder.layer.1.output.LayerNorm", "units.1.mlp"),           # LayerNorm eps 1e-3
    "attn_scale": ("encoder.layer.0.attention.self", "units.0.attn"),          # scores / d_head, not sqrt
    "no_residual": ("encoder.layer.1.attention.output", "units.1.attn"),       # residual dropped
    "qk_swap": ("encoder.layer.2.attention.self", "units.2.attn"),             # scores k.q^T
    "mask_ignored": ("encoder.layer.1.attention.self", "units.1.attn"),        # padding mask not applied
}


def bert_config(**overrides):
    from transformers import BertConfig
    kwargs = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa")
    kwargs.update(overrides)
    return BertConfig(**kwargs)


class ManualNorm(nn.Module):
    """LayerNorm over the last dimension, written out."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))
        self.shift = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        var = xc.pow(2).mean(-1, keepdim=True)
        return xc * torch.rsqrt(var + self.eps) * self.gain + self.shift


class Mixer(nn.Module):
    """Post-norm self-attention: fused qkv, hand-written softmax attention, matmul+add output."""

    bug = None

    def __init__(self, d: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out_w = nn.Parameter(torch.empty(d, d))
        self.out_b = nn.Parameter(torch.zeros(d))
        self.norm = nn.LayerNorm(d, eps=eps)
        nn.init.normal_(self.out_w, std=0.02)

    def forward(self, x, mask_bias):
        b, t, d = x.shape
        dh = d // self.heads
        q, k, v = (y.view(b, t, self.heads, dh).transpose(1, 2) for y in self.qkv(x).chunk(3, dim=-1))
        if self.bug == "qk_swap":
            q, k = k, q
        scale = 1.0 / dh if self.bug == "attn_scale" else 1.0 / math.sqrt(dh)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if self.bug != "mask_ignored":
            scores = scores + mask_bias
        ctx = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, t, d)
        h = ctx @ self.out_w.t() + self.out_b
        return self.norm(h if self.bug == "no_residual" else h + x)


class FeedForward(nn.Module):
    """Post-norm MLP; the norm is F.layer_norm on the module's own parameters."""

    def __init__(self, d: int, ff: int, eps: float):
        super().__init__()
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)
        self.norm_weight = nn.Parameter(torch.ones(d))
        self.norm_bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        h = F.gelu(self.up(x))
        return F.layer_norm(self.down(h) + x, (x.shape[-1],), self.norm_weight, self.norm_bias, self.eps)


class Unit(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, eps: float):
        super().__init__()
        self.attn = Mixer(d, heads, eps)
        self.mlp = FeedForward(d, ff, eps)

    def forward(self, x, mask_bias):
        return self.mlp(self.attn(x, mask_bias))


class BertPort(nn.Module):
    """``BertModel`` (eval) written another way; returns (hidden states, pooled)."""

    def __init__(self, cfg, bug: str | None = None):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.seg = nn.Embedding(cfg.type_vocab_size, d)
        self.pos_table = nn.Parameter(torch.zeros(cfg.max_position_embeddings, d))
        self.in_norm = ManualNorm(d, eps)
        self.units = nn.ModuleList(Unit(d, cfg.num_attention_heads, cfg.intermediate_size, eps)
                                   for _ in range(cfg.num_hidden_layers))
        self.summary = nn.Linear(d, d)
        if bug == "norm_eps":
            self.units[1].mlp.eps = 1e-3
        elif bug is not None:
            module = self.get_submodule(BERT_BUGS[bug][1])
            module.bug = bug

    def forward(self, ids, mask):
        t = ids.shape[1]
        x = self.tok(ids) + self.seg(torch.zeros_like(ids)) + self.pos_table[:t]
        x = self.in_norm(x)
        mask_bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for unit in self.units:
            x = unit(x, mask_bias)
        return x, torch.tanh(self.summary(x[:, 0]))


def convert_bert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``BertModel`` state dict in ``BertPort``'s names and layout."""
    out = {
        "tok.weight": sd["embeddings.word_embeddings.weight"],
        "seg.weight": sd["embeddings.token_type_embeddings.weight"],
        "pos_table": sd["embeddings.position_embeddings.weight"],
        "in_norm.gain": sd["embeddings.LayerNorm.weight"],
        "in_norm.shift": sd["embeddings.LayerNorm.bias"],
        "summary.weight": sd["pooler.dense.weight"],
        "summary.bias": sd["pooler.dense.bias"],
    }
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    for i in range(n_layers):
        L, U = f"encoder.layer.{i}.", f"units.{i}."
        for kind in ("weight", "bias"):
            out[f"{U}attn.qkv.{kind}"] = torch.cat([sd[f"{L}attention.self.{x}.{kind}"]
                                                    for x in ("query", "key", "value")])
        out[f"{U}attn.out_w"] = sd[f"{L}attention.output.dense.weight"]
        out[f"{U}attn.out_b"] = sd[f"{L}attention.output.dense.bias"]
        out[f"{U}attn.norm.weight"] = sd[f"{L}attention.output.LayerNorm.weight"]
        out[f"{U}attn.norm.bias"] = sd[f"{L}attention.output.LayerNorm.bias"]
        out[f"{U}mlp.up.weight"] = sd[f"{L}intermediate.dense.weight"]
        out[f"{U}mlp.up.bias"] = sd[f"{L}intermediate.dense.bias"]
        out[f"{U}mlp.down.weight"] = sd[f"{L}output.dense.weight"]
        out[f"{U}mlp.down.bias"] = sd[f"{L}output.dense.bias"]
        out[f"{U}mlp.norm_weight"] = sd[f"{L}output.LayerNorm.weight"]
        out[f"{U}mlp.norm_bias"] = sd[f"{L}output.LayerNorm.bias"]
    return out


def make_bert(seed: int = 0, cfg=None):
    """A ``BertModel`` with Hugging Face's own random initialisation, in eval mode."""
    from transformers import BertModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(cfg or bert_config(), add_pooling_layer=True).eval()


def make_bert_port(seed: int = 0, bug: str | None = None, cfg=None):
    ref = make_bert(seed, cfg)
    port = BertPort(cfg or bert_config(), bug=bug).eval()
    port.load_state_dict(convert_bert(ref.state_dict()))
    return port


def bert_inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return ids, mask


# -- GPT-2 ----------------------------------------------------------------------------------------

def gpt2_config(**overrides):
    from transformers import GPT2Config
    kwargs = dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                  eos_token_id=0, attn_implementation="eager")
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


class CausalAttention(nn.Module):
    order = "qkv"   # the order in which the projections run

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        heads = {name: getattr(self, name)(x).view(b, t, self.heads, -1).transpose(1, 2) for name in self.order}
        q, k, v = heads["q"], heads["k"], heads["v"]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = CausalAttention(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.fc_in = nn.Linear(d, ff)
        self.fc_out = nn.Linear(ff, d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc_out(F.gelu(self.fc_in(self.norm2(x)), approximate="tanh"))


class GPT2Port(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_embd
        self.tokens = nn.Embedding(cfg.vocab_size, d)
        self.positions = nn.Embedding(cfg.n_positions, d)
        self.layers = nn.ModuleList(DecoderLayer(d, cfg.n_head, 4 * d, cfg.layer_norm_epsilon)
                                    for _ in range(cfg.n_layer))
        self.final_norm = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)


def convert_gpt2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``GPT2Model`` state dict in ``GPT2Port``'s names and layout (Conv1D weights transposed)."""
    out = {"tokens.weight": sd["wte.weight"], "positions.weight": sd["wpe.weight"],
           "final_norm.weight": sd["ln_f.weight"], "final_norm.bias": sd["ln_f.bias"]}
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("h.")})
    for i in range(n_layers):
        H, L = f"h.{i}.", f"layers.{i}."
        w, b = sd[f"{H}attn.c_attn.weight"], sd[f"{H}attn.c_attn.bias"]
        d = w.shape[0]
        for j, x in enumerate("qkv"):
            out[f"{L}attn.{x}.weight"] = w[:, j * d:(j + 1) * d].t()
            out[f"{L}attn.{x}.bias"] = b[j * d:(j + 1) * d]
        out[f"{L}attn.o.weight"] = sd[f"{H}attn.c_proj.weight"].t()
        out[f"{L}attn.o.bias"] = sd[f"{H}attn.c_proj.bias"]
        out[f"{L}fc_in.weight"] = sd[f"{H}mlp.c_fc.weight"].t()
        out[f"{L}fc_in.bias"] = sd[f"{H}mlp.c_fc.bias"]
        out[f"{L}fc_out.weight"] = sd[f"{H}mlp.c_proj.weight"].t()
        out[f"{L}fc_out.bias"] = sd[f"{H}mlp.c_proj.bias"]
        for n, m in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[f"{L}{m}.weight"] = sd[f"{H}{n}.weight"]
            out[f"{L}{m}.bias"] = sd[f"{H}{n}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def make_gpt2(seed: int = 0):
    from transformers import GPT2Model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2Model(gpt2_config()).eval()


def make_gpt2_port(seed: int = 0, converted: bool = True, order: str = "qkv"):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1000)
        port = GPT2Port(gpt2_config()).eval()
    for layer in port.layers:
        layer.attn.order = order
    if converted:
        port.load_state_dict(convert_gpt2(make_gpt2(seed).state_dict()))
    return port


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter distinct random values (a trained checkpoint has no all-ones norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# -- model specs for the command line -------------------------------------------------------------

def bert_reference():
    return make_bert()


def bert_port():
    return make_bert_port()


def gpt2_reference():
    return make_gpt2()


def gpt2_port():
    return make_gpt2_port()


def gpt2_port_fresh():
    """The port with its own random initialisation (no weights loaded)."""
    return make_gpt2_port(converted=False)


def gpt2_inputs():
    return (torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(3)),)


# -- ViT: patch Conv2d against unfold + Linear --------------------------------------------------------

VIT_BUGS = {
    "patch_order": ("embeddings.patch_embeddings", "stem"),              # patches flattened (p, p, c)
    "cls_no_pos": ("embeddings", "stem"),                                # no position embedding on [CLS]
    "attn_scale": ("layers.1.attention", "trunk.1"),                     # scores scaled by 1/d, not 1/sqrt(d)
}


def vit_config(**overrides):
    from transformers import ViTConfig
    kwargs = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, attn_implementation="sdpa")
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


class Stem(nn.Module):
    """Patches cut with ``unfold`` and projected by a Linear (a Conv2d with stride = kernel in HF)."""

    bug = None

    def __init__(self, channels: int, patch: int, d: int, n_patches: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(channels * patch * patch, d)
        self.cls = nn.Parameter(torch.zeros(d))
        self.pos = nn.Parameter(torch.zeros(n_patches + 1, d))

    def forward(self, images):
        b, c, h, w = images.shape
        p = self.patch
        tiles = images.unfold(2, p, p).unfold(3, p, p)             # (b, c, h/p, w/p, p, p)
        order = (0, 2, 3, 4, 5, 1) if self.bug == "patch_order" else (0, 2, 3, 1, 4, 5)
        x = self.proj(tiles.permute(*order).reshape(b, (h // p) * (w // p), c * p * p))
        x = torch.cat([self.cls.expand(b, 1, -1), x], dim=1)
        if self.bug == "cls_no_pos":
            return torch.cat([x[:, :1], x[:, 1:] + self.pos[1:]], dim=1)
        return x + self.pos


class ViTBlock(nn.Module):
    bug = None

    def __init__(self, d: int, heads: int, ff: int, eps: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.heads) ** (-1 if self.bug == "attn_scale" else -0.5)
        y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(b, t, d)
        x = x + self.out(y)
        return x + self.ff(self.ln2(x))


class ViTPort(nn.Module):
    def __init__(self, cfg, bug: str | None = None):
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.stem = Stem(cfg.num_channels, p, d, (cfg.image_size // p) ** 2)
        self.trunk = nn.ModuleList(ViTBlock(d, cfg.num_attention_heads, cfg.intermediate_size, cfg.layer_norm_eps)
                                   for _ in range(cfg.num_hidden_layers))
        self.post_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(d, d)
        if bug is not None:
            self.get_submodule(VIT_BUGS[bug][1]).bug = bug

    def forward(self, images):
        x = self.stem(images)
        for block in self.trunk:
            x = block(x)
        x = self.post_norm(x)
        return {"tokens": x, "pooled": torch.tanh(self.head(x[:, 0]))}


def convert_vit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``ViTModel`` state dict in ``ViTPort``'s names and layout."""
    w = sd["embeddings.patch_embeddings.projection.weight"]
    out = {"stem.proj.weight": w.reshape(w.shape[0], -1), "stem.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "stem.cls": sd["embeddings.cls_token"].reshape(-1), "stem.pos": sd["embeddings.position_embeddings"][0],
           "post_norm.weight": sd["layernorm.weight"], "post_norm.bias": sd["layernorm.bias"],
           "head.weight": sd["pooler.dense.weight"], "head.bias": sd["pooler.dense.bias"]}
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(n_layers):
        L, T = f"layers.{i}.", f"trunk.{i}."
        for kind in ("weight", "bias"):
            out[f"{T}qkv.{kind}"] = torch.cat([sd[f"{L}attention.{x}_proj.{kind}"] for x in "qkv"])
            out[f"{T}out.{kind}"] = sd[f"{L}attention.o_proj.{kind}"]
            out[f"{T}ln1.{kind}"] = sd[f"{L}layernorm_before.{kind}"]
            out[f"{T}ln2.{kind}"] = sd[f"{L}layernorm_after.{kind}"]
            out[f"{T}ff.0.{kind}"] = sd[f"{L}mlp.fc1.{kind}"]
            out[f"{T}ff.2.{kind}"] = sd[f"{L}mlp.fc2.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def make_vit(seed: int = 0):
    from transformers import ViTModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTModel(vit_config(), add_pooling_layer=True).eval()


def make_vit_port(seed: int = 0, bug: str | None = None):
    port = ViTPort(vit_config(), bug=bug).eval()
    port.load_state_dict(convert_vit(make_vit(seed).state_dict()))
    return port


def vit_inputs():
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)),)
