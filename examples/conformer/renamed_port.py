"""A second port of ``reference.py`` with its own module names and nesting.

Same function as the reference, different layout, as a porter targeting another
code base might write it:

* each block's sub-layers own their LayerNorm and residual connection
  (``blocks.N.ffn_in.norm``, ``blocks.N.attn.norm``, ...);
* the attention uses one fused ``qkv`` Linear (rows ordered q, k, v);
* the conv module's pointwise convolutions are ``nn.Linear`` layers (``expand``, ``shrink``).

``convert_state_dict`` maps a reference (NeMo-style) state dict onto these names.
``RenamedConformerSSL(bug=NAME)`` plants one porting bug in module ``BUGS_RENAMED[NAME]``.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BUGS_RENAMED = {
    "rel_shift": "blocks.0.attn",  # relative shift pads on the wrong side (off by one)
    "qkv_order": "blocks.1.attn",  # fused projection split as k, q, v
    "half_step": "blocks.1.ffn_in",  # first macaron feed-forward added with weight 1, not 0.5
    "layernorm_eps": "blocks.2.attn.norm",  # LayerNorm eps 0.1 instead of 1e-5
    "conv_padding": "blocks.2.convmod",  # padded frames not zeroed before the depthwise conv
}


@dataclass
class SSLOutput:
    log_probs: torch.Tensor
    encoded: torch.Tensor
    encoded_lengths: torch.Tensor


def padding_mask(lengths, max_len):
    """(batch, max_len) bool, True on padded frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


class LogMel(nn.Module):
    """Pre-emphasis, power STFT, mel projection and log; returns (b, n_mels, frames) and frame counts."""

    def __init__(self, sample_rate, n_fft, n_mels):
        super().__init__()
        self.n_fft, self.win, self.hop = n_fft, sample_rate // 40, sample_rate // 100
        self.register_buffer("window", torch.hann_window(self.win, periodic=False))
        self.register_buffer("fb", torch.zeros(n_mels, n_fft // 2 + 1))  # filled by convert_state_dict

    def forward(self, audio, lengths):
        audio = torch.cat((audio[:, :1], audio[:, 1:] - 0.97 * audio[:, :-1]), dim=1)
        audio = audio.masked_fill(padding_mask(lengths, audio.size(1)), 0.0)
        spec = torch.view_as_real(torch.stft(audio, self.n_fft, self.hop, self.win, self.window,
                                             center=True, pad_mode="constant", return_complex=True))
        power = torch.sqrt(spec.pow(2).sum(-1) + 1e-5).pow(2.0)
        frames = (lengths + 2 * (self.n_fft // 2) - self.n_fft) // self.hop + 1
        return torch.log(self.fb @ power + 2**-24), frames


class Frontend(nn.Module):
    """Log-mel features, normalised per mel bin over the valid frames; returns (b, frames, n_mels)."""

    def __init__(self, sample_rate, n_fft, n_mels):
        super().__init__()
        self.mel = LogMel(sample_rate, n_fft, n_mels)

    def forward(self, audio, lengths):
        feats, frames = self.mel(audio[:, : int(lengths.max())], lengths)
        pad = padding_mask(frames, feats.size(2))[:, None]
        count = (~pad).sum(-1)
        if bool((count < 2).any()):
            raise ValueError("feature normalisation needs at least two frames per example")
        mean = feats.masked_fill(pad, 0.0).sum(-1) / count
        std = ((feats - mean[..., None]).masked_fill(pad, 0.0).pow(2).sum(-1) / (count - 1.0)).sqrt() + 1e-5
        feats = ((feats - mean[..., None]) / std[..., None]).masked_fill(pad, 0.0)
        return feats.transpose(1, 2), frames


class Subsample(nn.Module):
    """Two stride-2 3x3 convolutions over (time, mel), flattened and projected to d_model."""

    def __init__(self, n_mels, d_model, channels):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
        self.proj = nn.Linear(channels * ((n_mels + 3) // 4), d_model)

    def forward(self, feats, frames):
        x = self.convs(feats.unsqueeze(1))
        x = self.proj(x.transpose(1, 2).flatten(2))
        return x, ((frames + 1) // 2 + 1) // 2  # each conv: ceil(n / 2) frames


class RelPositions(nn.Module):
    """Scales the input (by sqrt(d_model)) and returns sinusoidal embeddings of offsets t-1 ... 1-t."""

    def __init__(self, d_model, dropout, dropout_emb, xscaling):
        super().__init__()
        self.d_model = d_model
        self.scale = math.sqrt(d_model) if xscaling else 1.0
        self.drop = nn.Dropout(dropout)
        self.drop_emb = nn.Dropout(dropout_emb)

    def forward(self, x):
        t = x.size(1)
        offsets = torch.arange(t - 1, -t, -1, dtype=torch.float32, device=x.device)[:, None]
        inv_freq = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32, device=x.device)
                             * -(math.log(10000.0) / self.d_model))
        pos = torch.zeros(2 * t - 1, self.d_model, device=x.device)
        pos[:, 0::2] = torch.sin(offsets * inv_freq)
        pos[:, 1::2] = torch.cos(offsets * inv_freq)
        return self.drop(x * self.scale), self.drop_emb(pos[None])


class MacaronFFN(nn.Module):
    """Pre-norm feed-forward with a half-step residual."""

    bug = None

    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.inner_drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = self.fc2(self.inner_drop(F.silu(self.fc1(self.norm(x)))))
        step = 1.0 if self.bug == "half_step" else 0.5  # BUG half_step: full-step residual
        return x + self.drop(h) * step


def rel_shift(scores, wrong_side=False):
    """Transformer-XL shift: (b, h, t, 2t-1) scores per relative offset -> (b, h, t, t) per key."""
    b, h, t, n = scores.shape
    # BUG rel_shift: padding the right instead of the left shifts every row by one
    scores = F.pad(scores, (0, 1) if wrong_side else (1, 0))
    return scores.view(b, h, n + 1, t)[:, :, 1:].reshape(b, h, t, n)[..., :t]


class SelfAttention(nn.Module):
    """Pre-norm relative-position self-attention with fused q/k/v and a residual."""

    bug = None

    def __init__(self, d_model, n_heads, dropout_att, dropout):
        super().__init__()
        self.heads = n_heads
        self.norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.pos_proj = nn.Linear(d_model, d_model, bias=False)
        self.bias_u = nn.Parameter(torch.zeros(n_heads, d_model // n_heads))
        self.bias_v = nn.Parameter(torch.zeros(n_heads, d_model // n_heads))
        self.attn_drop = nn.Dropout(dropout_att)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, att_mask, pos):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        if self.bug == "qkv_order":  # BUG qkv_order: split as k, q, v
            q, k = k, q
        # (b, t, h, d_head) views
        q, k, v, p = (y.unflatten(-1, (self.heads, -1)) for y in (q, k, v, self.pos_proj(pos)))
        ac = torch.einsum("bihd,bjhd->bhij", q + self.bias_u, k)
        bd = torch.einsum("bihd,bjhd->bhij", q + self.bias_v, p)
        scores = (ac + rel_shift(bd, wrong_side=self.bug == "rel_shift")) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(att_mask[:, None], -10000.0)
        weights = self.attn_drop(scores.softmax(-1).masked_fill(att_mask[:, None], 0.0))
        out = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(b, t, d)
        return x + self.drop(self.proj(out))


class ConvModule(nn.Module):
    """Pre-norm GLU + depthwise-conv module with a residual; pointwise convs as Linear layers."""

    bug = None

    def __init__(self, d_model, kernel_size, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.expand = nn.Linear(d_model, 2 * d_model)
        self.dw = nn.Conv1d(d_model, d_model, kernel_size, padding=(kernel_size - 1) // 2, groups=d_model)
        self.bn = nn.BatchNorm1d(d_model)
        self.shrink = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, pad_mask):
        h = F.glu(self.expand(self.norm(x)), dim=-1)
        if self.bug != "conv_padding":  # BUG conv_padding: padded frames leak into the conv
            h.masked_fill_(pad_mask[..., None], 0.0)
        h = F.silu(self.bn(self.dw(h.transpose(1, 2)))).transpose(1, 2)
        return x + self.drop(self.shrink(h))


class Block(nn.Module):
    def __init__(self, d_model, d_ff, n_heads, kernel_size, dropout, dropout_att):
        super().__init__()
        self.ffn_in = MacaronFFN(d_model, d_ff, dropout)
        self.attn = SelfAttention(d_model, n_heads, dropout_att, dropout)
        self.convmod = ConvModule(d_model, kernel_size, dropout)
        self.ffn_out = MacaronFFN(d_model, d_ff, dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, att_mask, pad_mask, pos):
        x = self.attn(self.ffn_in(x), att_mask, pos)
        return self.norm(self.ffn_out(self.convmod(x, pad_mask)))


class RenamedConformerSSL(nn.Module):
    """Same constructor knobs as the reference, plus ``bug`` (a key of ``BUGS_RENAMED`` or None)."""

    def __init__(self, d_model=64, n_layers=3, n_heads=4, ff_expansion=4, n_mels=80,
                 conv_kernel_size=15, subsampling_channels=None, num_classes=64, dropout=0.1,
                 dropout_att=0.1, dropout_emb=0.1, sample_rate=16000, n_fft=512, xscaling=True,
                 bug=None):
        super().__init__()
        self.frontend = Frontend(sample_rate, n_fft, n_mels)
        self.subsample = Subsample(n_mels, d_model, subsampling_channels or d_model)
        self.posenc = RelPositions(d_model, dropout, dropout_emb, xscaling)
        self.blocks = nn.ModuleList(
            Block(d_model, ff_expansion * d_model, n_heads, conv_kernel_size, dropout, dropout_att)
            for _ in range(n_layers)
        )
        self.head = nn.Linear(d_model, num_classes)
        if bug is not None:
            module = self.get_submodule(BUGS_RENAMED[bug])
            if bug == "layernorm_eps":
                module.eps = 0.1
            else:
                module.bug = bug

    def forward(self, audio, lengths):
        feats, frames = self.frontend(audio, lengths)
        x, lengths = self.subsample(feats, frames)
        x, pos = self.posenc(x)
        pad_mask = padding_mask(lengths, x.size(1))
        att_mask = pad_mask[:, None, :] | pad_mask[:, :, None]
        for block in self.blocks:
            x = block(x, att_mask, pad_mask, pos)
        return SSLOutput(self.head(x).log_softmax(-1), x.transpose(1, 2), lengths)


def convert_state_dict(ref_sd):
    """Map a reference (NeMo-style) state dict onto ``RenamedConformerSSL``'s names and shapes."""
    renames = {  # reference prefix -> renamed prefix, applied per layer where {i} appears
        "preprocessor.featurizer.window": "frontend.mel.window",
        "pre_encode.conv.": "subsample.convs.",
        "pre_encode.out.": "subsample.proj.",
        "decoder.proj.": "head.",
        "layers.{i}.norm_feed_forward1.": "blocks.{i}.ffn_in.norm.",
        "layers.{i}.feed_forward1.linear1.": "blocks.{i}.ffn_in.fc1.",
        "layers.{i}.feed_forward1.linear2.": "blocks.{i}.ffn_in.fc2.",
        "layers.{i}.norm_self_att.": "blocks.{i}.attn.norm.",
        "layers.{i}.self_attn.linear_out.": "blocks.{i}.attn.proj.",
        "layers.{i}.self_attn.linear_pos.": "blocks.{i}.attn.pos_proj.",
        "layers.{i}.self_attn.pos_bias_u": "blocks.{i}.attn.bias_u",
        "layers.{i}.self_attn.pos_bias_v": "blocks.{i}.attn.bias_v",
        "layers.{i}.norm_conv.": "blocks.{i}.convmod.norm.",
        "layers.{i}.conv.depthwise_conv.": "blocks.{i}.convmod.dw.",
        "layers.{i}.conv.batch_norm.": "blocks.{i}.convmod.bn.",
        "layers.{i}.norm_feed_forward2.": "blocks.{i}.ffn_out.norm.",
        "layers.{i}.feed_forward2.linear1.": "blocks.{i}.ffn_out.fc1.",
        "layers.{i}.feed_forward2.linear2.": "blocks.{i}.ffn_out.fc2.",
        "layers.{i}.norm_out.": "blocks.{i}.norm.",
    }
    n_layers = len({key.split(".")[1] for key in ref_sd if key.startswith("layers.")})
    rules = {}
    for old, new in renames.items():
        for i in range(n_layers if "{i}" in old else 1):
            rules[old.format(i=i)] = new.format(i=i)

    out = {"frontend.mel.fb": ref_sd["preprocessor.featurizer.fb"].squeeze(0)}
    for i in range(n_layers):
        attn, conv = f"layers.{i}.self_attn.", f"layers.{i}.conv."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [ref_sd[f"{attn}linear_{x}.{kind}"] for x in "qkv"], dim=0)
            out[f"blocks.{i}.convmod.expand.{kind}"] = ref_sd[f"{conv}pointwise_conv1.{kind}"].squeeze(-1)
            out[f"blocks.{i}.convmod.shrink.{kind}"] = ref_sd[f"{conv}pointwise_conv2.{kind}"].squeeze(-1)
    for key, value in ref_sd.items():
        for old, new in rules.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
    return out
