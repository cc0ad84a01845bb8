"""An independent port of ``fxdiff_refmodel`` for the port's environment, which lacks that package.

Written the other way round from the reference: functional style (``F.linear``, ``F.layer_norm``,
``F.dropout``) over raw parameters, other module names and nesting (each norm inside its
sub-layer), a fused ``qkv`` projection, a fused gate/up projection, a tuple output with
``(log_probs, encoded, lengths, masks)``, and the random numbers drawn in another order: the
block-masking positions are drawn before the frontend's dropout runs, where the reference draws
them after.

``build()`` returns the port. Its weights come from ``port.safetensors`` next to this file when
there is one, else from ``fxdiff compare ... --checkpoint`` (the reference's weights converted by
``tests/test_two_env.py``: renames, q/k/v and gate/up concatenated). ``build_bug()`` is the
same port with one porting bug: block 1's attention scales its scores by ``1/sqrt(d_model)``
instead of ``1/sqrt(d_head)``.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL, N_HEADS, D_FF, FEAT_IN, N_CLASSES, N_BLOCKS = 32, 4, 64, 16, 16, 2
P_DROP = 0.1
BLOCK, MASK_PROB = 4, 0.3
WEIGHTS = Path(__file__).with_suffix(".safetensors")


def _param(*shape, std=0.1):
    return nn.Parameter(torch.randn(*shape) * std)


def sinusoids(length, dim):
    """Absolute sinusoidal positions (length, dim)."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class Linear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = _param(d_out, d_in)
        self.bias = _param(d_out)


class GatedFFN(nn.Module):
    """norm -> fused [gate; up] projection -> silu(gate) * up -> dropout -> out."""

    def __init__(self):
        super().__init__()
        self.norm_w, self.norm_b = nn.Parameter(torch.ones(D_MODEL)), nn.Parameter(torch.zeros(D_MODEL))
        self.w_in, self.b_in = _param(2 * D_FF, D_MODEL), _param(2 * D_FF)
        self.w_out, self.b_out = _param(D_MODEL, D_FF), _param(D_MODEL)

    def forward(self, h):
        y = F.layer_norm(h, (D_MODEL,), self.norm_w, self.norm_b)
        gate, up = F.linear(y, self.w_in, self.b_in).chunk(2, dim=-1)
        y = F.dropout(F.silu(gate) * up, P_DROP, self.training)
        return F.linear(y, self.w_out, self.b_out)


class SelfAttention(nn.Module):
    """norm -> fused qkv -> masked softmax attention -> out projection."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.norm_w, self.norm_b = nn.Parameter(torch.ones(D_MODEL)), nn.Parameter(torch.zeros(D_MODEL))
        self.qkv_w, self.qkv_b = _param(3 * D_MODEL, D_MODEL), _param(3 * D_MODEL)
        self.out_w, self.out_b = _param(D_MODEL, D_MODEL), _param(D_MODEL)

    def forward(self, h, blocked):
        b, t, _ = h.shape
        y = F.layer_norm(h, (D_MODEL,), self.norm_w, self.norm_b)
        q, k, v = F.linear(y, self.qkv_w, self.qkv_b).view(b, t, 3, N_HEADS, D_MODEL // N_HEADS) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        blocked = blocked.unsqueeze(1)
        probs = scores.masked_fill(blocked, -10000.0).softmax(dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(F.dropout(probs, P_DROP, self.training), v)
        return F.linear(out.transpose(1, 2).reshape(b, t, D_MODEL), self.out_w, self.out_b)


class Block(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.ffn = GatedFFN()
        self.attn = SelfAttention(scale)

    def forward(self, h, blocked):
        h = h + F.dropout(self.ffn(h), P_DROP, self.training)
        return h + F.dropout(self.attn(h, blocked), P_DROP, self.training)


class SSLPort(nn.Module):
    def __init__(self, bug_scale_block=None):
        super().__init__()
        self.embed = Linear(FEAT_IN, D_MODEL)
        self.mask_emb = _param(D_MODEL)
        head_scale = (D_MODEL // N_HEADS) ** -0.5
        self.blocks = nn.ModuleList(
            Block(D_MODEL ** -0.5 if i == bug_scale_block else head_scale) for i in range(N_BLOCKS))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = Linear(D_MODEL, N_CLASSES)
        self.register_buffer("pos", sinusoids(512, D_MODEL).unsqueeze(0), persistent=False)

    def draw_mask(self, b, t, lengths):
        """Frames to replace by ``mask_emb``: blocks of BLOCK frames at random valid starts."""
        u = torch.rand(b, max(1, int(t * MASK_PROB / BLOCK)))
        first = (u * (lengths - BLOCK).clamp(min=1).float().unsqueeze(1)).long()
        offset = torch.arange(t).view(1, 1, t) - first.unsqueeze(-1)
        return ((offset >= 0) & (offset < BLOCK)).any(dim=1)

    def forward(self, audio_signal, length):
        x = audio_signal.transpose(1, 2)
        b, t, _ = x.shape
        # the masked positions first: the reference draws them after its frontend dropout
        mask = self.draw_mask(b, t, length) if self.training else torch.zeros(b, t, dtype=torch.bool)
        h = F.dropout(F.linear(x, self.embed.weight, self.embed.bias), P_DROP, self.training)
        if self.training:
            h = torch.where(mask.unsqueeze(-1), self.mask_emb, h)
        h = F.dropout(h * math.sqrt(D_MODEL) + self.pos[:, :t], P_DROP, self.training)
        keep = torch.arange(t).unsqueeze(0) < length.unsqueeze(1)
        blocked = ~(keep.unsqueeze(1) & keep.unsqueeze(2))
        for block in self.blocks:
            h = block(h, blocked)
        h = self.norm(h)
        log_probs = F.log_softmax(F.linear(h, self.head.weight, self.head.bias), dim=-1)
        return log_probs, h.transpose(1, 2), length, mask


def _make(bug_scale_block=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = SSLPort(bug_scale_block)
    if WEIGHTS.is_file():
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(WEIGHTS)))
    return model


def build():
    """The port (weights from port.safetensors beside this file, or from --checkpoint)."""
    return _make()


def build_bug():
    """The port with block 1's attention scaled by 1/sqrt(d_model) instead of 1/sqrt(d_head)."""
    return _make(bug_scale_block=1)

