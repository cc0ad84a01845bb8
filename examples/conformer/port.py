"""Independent port of ``reference.py``, written in a different style.

Module and parameter names match the reference (``port.load_state_dict(ref.state_dict())``
works) and the numerics match exactly, but the code is organised differently: free
helper functions, masks as float multipliers, relative-position scores gathered with
an explicit index instead of NeMo's pad-and-reshape ``rel_shift``.

``ConformerSSLPort(bug=NAME)`` plants one realistic porting bug, in the module
``BUGS[NAME]`` (the first place the outputs diverge from the reference).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BUGS = {
    "feature_std": "preprocessor.featurizer",  # biased (1/N) std in feature normalisation
    "layernorm_eps": "layers.1.norm_self_att",  # LayerNorm eps 0.1 instead of 1e-5
    "rel_shift": "layers.1.self_attn",  # relative position i - j read as j - i
    "conv_padding": "layers.0.conv",  # padded frames not zeroed before the depthwise conv
    "glu_order": "layers.2.conv",  # GLU halves swapped (gates the wrong half)
    "half_step": "layers.2",  # second macaron feed-forward added with weight 1, not 0.5
}


@dataclass
class SSLOutput:
    log_probs: torch.Tensor
    encoded: torch.Tensor
    encoded_lengths: torch.Tensor


def valid_mask(lengths, max_len):
    """(batch, max_len) bool, True on the frames that hold data."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def slaney_mel_filters(sample_rate, n_fft, n_mels):
    """Triangular mel filters on the Slaney scale, area-normalised: (1, n_mels, n_fft // 2 + 1)."""
    def to_mel(hz):
        return hz * 3 / 200 if hz < 1000 else 15 + 27 * math.log(hz / 1000) / math.log(6.4)

    def to_hz(mel):
        return mel * 200 / 3 if mel < 15 else 1000 * math.exp((mel - 15) * math.log(6.4) / 27)

    top = to_mel(sample_rate / 2)
    edges = torch.tensor([to_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)], dtype=torch.float64)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - left) / (center - left)
    falling = (right - freqs) / (right - center)
    filters = torch.minimum(rising, falling).clamp(min=0) * 2 / (right - left)
    return filters.float().unsqueeze(0)


def sinusoid_table(length, dim):
    """Embeddings of relative positions length-1, ..., -(length-1), sin/cos interleaved."""
    positions = torch.arange(length - 1, -length, -1, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    angles = positions * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)[None]


class FilterbankFeatures(nn.Module):
    bug = None

    def __init__(self, sample_rate, n_fft, n_mels):
        super().__init__()
        self.n_fft = n_fft
        self.win_length = sample_rate // 40  # 25 ms
        self.hop_length = sample_rate // 100  # 10 ms
        self.register_buffer("window", torch.hann_window(self.win_length, periodic=False))
        self.register_buffer("fb", slaney_mel_filters(sample_rate, n_fft, n_mels))

    def log_mel(self, audio):
        spec = torch.stft(audio, self.n_fft, self.hop_length, self.win_length, self.window,
                          center=True, pad_mode="constant", return_complex=True)
        re_im = torch.view_as_real(spec)
        power = torch.sqrt(re_im.pow(2).sum(-1) + 1e-5).pow(2.0)
        return torch.log(torch.matmul(self.fb, power) + 2**-24)

    def normalize(self, feats, frames):
        mask = valid_mask(frames, feats.size(2)).unsqueeze(1).to(feats.dtype)
        n = mask.sum(dim=2)
        mean = (feats * mask).sum(dim=2) / n
        sq_dev = ((feats - mean.unsqueeze(2)) * mask).pow(2).sum(dim=2)
        # BUG feature_std: biased variance (divide by N instead of N - 1)
        std = torch.sqrt(sq_dev / (n if self.bug == "feature_std" else n - 1.0)) + 1e-5
        return (feats - mean.unsqueeze(2)) / std.unsqueeze(2)

    def forward(self, audio, lengths):
        frames = (lengths + self.n_fft // 2 * 2 - self.n_fft) // self.hop_length + 1
        if (frames < 2).any():
            raise ValueError("feature normalisation needs at least two frames per example")
        emphasized = torch.cat((audio[:, :1], audio[:, 1:] - 0.97 * audio[:, :-1]), dim=1)
        emphasized = emphasized.masked_fill(~valid_mask(lengths, audio.size(1)), 0.0)
        feats = self.normalize(self.log_mel(emphasized), frames)
        feats = feats.masked_fill(~valid_mask(frames, feats.size(2)).unsqueeze(1), 0.0)
        return feats, frames


class Preprocessor(nn.Module):
    def __init__(self, sample_rate, n_fft, n_mels):
        super().__init__()
        self.featurizer = FilterbankFeatures(sample_rate, n_fft, n_mels)

    def forward(self, audio, lengths):
        longest = lengths.max().item()
        return self.featurizer(audio[:, :longest], lengths)


class Subsampling(nn.Module):
    def __init__(self, n_mels, d_model, channels):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, 2, 1), nn.ReLU())
        self.out = nn.Linear(channels * -(-n_mels // 4), d_model)

    def forward(self, feats, lengths):
        x = self.conv(feats[:, None])
        x = self.out(x.permute(0, 2, 1, 3).flatten(2))
        for _ in range(2):
            lengths = (lengths - 1) // 2 + 1
        return x, lengths


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, dropout, dropout_emb, xscale):
        super().__init__()
        self.xscale = xscale
        self.dropout = nn.Dropout(dropout)
        self.dropout_emb = nn.Dropout(dropout_emb)
        self.register_buffer("pe", sinusoid_table(512, d_model), persistent=False)

    def forward(self, x):
        t = x.size(1)
        if self.pe.size(1) < 2 * t - 1:
            self.pe = sinusoid_table(t, self.pe.size(2)).to(self.pe.device)
        mid = self.pe.size(1) // 2
        if self.xscale:
            x = x * self.xscale
        return self.dropout(x), self.dropout_emb(self.pe[:, mid - t + 1 : mid + t])


class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class RelPosSelfAttention(nn.Module):
    bug = None

    def __init__(self, n_heads, d_model, dropout):
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
            setattr(self, name, nn.Linear(d_model, d_model))
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.d_head))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.d_head))
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x):
        """(b, t, d) -> (b, heads, t, d_head)"""
        return x.unflatten(-1, (self.n_heads, self.d_head)).transpose(1, 2)

    def relative_index(self, t, device):
        """Column of the (2t-1)-wide positional score row that pairs query i with key j."""
        i = torch.arange(t, device=device)[:, None]
        j = torch.arange(t, device=device)[None, :]
        # BUG rel_shift: relative position taken as j - i instead of i - j
        return (t - 1) + (i - j if self.bug == "rel_shift" else j - i)

    def forward(self, query, key, value, mask, pos_emb):
        projections = (self.linear_q, self.linear_k, self.linear_v)
        q, k, v = (self.split_heads(lin(x)) for lin, x in zip(projections, (query, key, value)))
        p = self.split_heads(self.linear_pos(pos_emb))
        content = torch.matmul(q + self.pos_bias_u[:, None], k.transpose(-2, -1))
        position = torch.matmul(q + self.pos_bias_v[:, None], p.transpose(-2, -1))
        t = query.size(1)
        index = self.relative_index(t, query.device).expand(*position.shape[:2], t, t)
        scores = (content + torch.gather(position, 3, index)) / math.sqrt(self.d_head)
        mask = mask[:, None]
        attn = torch.softmax(scores.masked_fill(mask, -10000.0), dim=-1).masked_fill(mask, 0.0)
        context = torch.matmul(self.dropout(attn), v)
        return self.linear_out(context.transpose(1, 2).flatten(2))


class ConvModule(nn.Module):
    bug = None

    def __init__(self, d_model, kernel_size):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x, pad_mask):
        x = self.pointwise_conv1(x.transpose(1, 2))
        if self.bug == "glu_order":  # BUG glu_order: halves swapped, so the wrong half is gated
            x = x.roll(x.size(1) // 2, dims=1)
        x = F.glu(x, dim=1)
        if self.bug != "conv_padding":  # BUG conv_padding: padded frames leak into the conv
            x = x.masked_fill(pad_mask[:, None], 0.0)
        x = self.activation(self.batch_norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class ConformerBlock(nn.Module):
    bug = None

    def __init__(self, d_model, d_ff, n_heads, kernel_size, dropout, dropout_att):
        super().__init__()
        self.norm_feed_forward1 = nn.LayerNorm(d_model)
        self.feed_forward1 = FeedForward(d_model, d_ff, dropout)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConvModule(d_model, kernel_size)
        self.norm_self_att = nn.LayerNorm(d_model)
        self.self_attn = RelPosSelfAttention(n_heads, d_model, dropout_att)
        self.norm_feed_forward2 = nn.LayerNorm(d_model)
        self.feed_forward2 = FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, x, att_mask, pos_emb, pad_mask):
        x = x + 0.5 * self.dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        h = self.norm_self_att(x)
        x = x + self.dropout(self.self_attn(h, h, h, att_mask, pos_emb))
        x = x + self.dropout(self.conv(self.norm_conv(x), pad_mask))
        ff2_scale = 1.0 if self.bug == "half_step" else 0.5  # BUG half_step: full-step residual
        x = x + ff2_scale * self.dropout(self.feed_forward2(self.norm_feed_forward2(x)))
        return self.norm_out(x)


class Decoder(nn.Module):
    def __init__(self, d_model, num_classes):
        super().__init__()
        self.proj = nn.Linear(d_model, num_classes)

    def forward(self, encoded):
        return F.log_softmax(self.proj(encoded.transpose(1, 2)), dim=-1)


class ConformerSSLPort(nn.Module):
    """Same constructor knobs as the reference, plus ``bug`` (a key of ``BUGS`` or None)."""

    def __init__(self, d_model=64, n_layers=3, n_heads=4, ff_expansion=4, n_mels=80,
                 conv_kernel_size=15, subsampling_channels=None, num_classes=64, dropout=0.1,
                 dropout_att=0.1, dropout_emb=0.1, sample_rate=16000, n_fft=512, xscaling=True,
                 bug=None):
        super().__init__()
        self.preprocessor = Preprocessor(sample_rate, n_fft, n_mels)
        self.pre_encode = Subsampling(n_mels, d_model, subsampling_channels or d_model)
        self.pos_enc = PositionalEncoding(d_model, dropout, dropout_emb, math.sqrt(d_model) if xscaling else None)
        self.layers = nn.ModuleList(
            ConformerBlock(d_model, ff_expansion * d_model, n_heads, conv_kernel_size, dropout, dropout_att)
            for _ in range(n_layers)
        )
        self.decoder = Decoder(d_model, num_classes)
        if bug is not None:
            plant_bug(self, bug)

    def forward(self, audio, lengths):
        feats, frames = self.preprocessor(audio, lengths)
        x, lengths = self.pre_encode(feats.transpose(1, 2), frames)
        x, pos_emb = self.pos_enc(x)
        valid = valid_mask(lengths, x.size(1))
        att_mask = ~(valid[:, :, None] & valid[:, None, :])
        for block in self.layers:
            x = block(x, att_mask, pos_emb, ~valid)
        encoded = x.transpose(1, 2)
        return SSLOutput(self.decoder(encoded), encoded, lengths)


def plant_bug(model, name):
    """Switch on bug ``name`` in the single module ``BUGS[name]``."""
    module = model.get_submodule(BUGS[name])
    if name == "layernorm_eps":
        module.eps = 0.1
    else:
        module.bug = name
