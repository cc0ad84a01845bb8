"""The reference model, with a framework's module names and habits (NeMo's ConformerEncoder / NEST).

``SSLEncoderModel``: channels-first features ``(batch, feat_in, frames)`` and their lengths ->
``pre_encode`` (Linear + dropout) -> ``mask_processor`` (NEST-style random block masking of
frames with a learned embedding, train mode only, positions drawn with ``torch.rand``) ->
``pos_enc`` (xscale, sinusoidal positions, dropout) -> ``layers.N`` (pre-norm SwiGLU feed-forward
and multi-head self-attention with separate q/k/v projections, each with residual dropout) ->
``final_norm`` -> ``decoder`` (Linear + log-softmax over a codebook).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

INF_VAL = 10000.0  # NeMo masks attention scores with -INF_VAL, not -inf


@dataclass
class SSLOutput:
    """What the model returns, as a framework model would: a dataclass, channels-first encodings."""

    log_probs: torch.Tensor  # (batch, frames, num_classes)
    encoded: torch.Tensor  # (batch, d_model, frames)
    encoded_lengths: torch.Tensor  # (batch,)
    masks: torch.Tensor  # (batch, frames) bool: frames replaced by the mask embedding


class LinearFrontend(nn.Module):
    """Project each feature frame to d_model; dropout after the projection."""

    def __init__(self, feat_in, d_model, dropout):
        super().__init__()
        self.out = nn.Linear(feat_in, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, lengths):
        return self.dropout(self.out(x)), lengths


class RandomBlockMasking(nn.Module):
    """NEST-style masking: blocks of ``block_size`` frames, drawn with torch.rand, get an embedding."""

    def __init__(self, d_model, block_size=4, mask_prob=0.3):
        super().__init__()
        self.block_size = block_size
        self.mask_prob = mask_prob
        self.mask_embedding = nn.Parameter(0.1 * torch.randn(d_model))

    def forward(self, x, lengths):
        batch, frames, _ = x.shape
        if not self.training:
            return x, torch.zeros(batch, frames, dtype=torch.bool, device=x.device)
        num_blocks = max(1, int(frames * self.mask_prob / self.block_size))
        span = (lengths - self.block_size).clamp(min=1).to(x.dtype)
        starts = (torch.rand(batch, num_blocks, device=x.device) * span[:, None]).long()
        t = torch.arange(frames, device=x.device)
        inside = (t[None, None, :] >= starts[:, :, None]) & (t[None, None, :] < starts[:, :, None] + self.block_size)
        masks = inside.any(dim=1)
        x = torch.where(masks.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)
        return x, masks


class PositionalEncoding(nn.Module):
    """Absolute sinusoidal positions added to the xscale'd input, then dropout."""

    def __init__(self, d_model, dropout, max_len=512):
        super().__init__()
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)

    def forward(self, x):
        x = x * self.xscale + self.pe[:, : x.size(1)]
        return self.dropout(x)


class SwiGLUFeedForward(nn.Module):
    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.gate = nn.Linear(d_model, d_ff)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.gate(x)) * self.linear1(x)))


class MultiHeadAttention(nn.Module):
    """NeMo's MultiHeadAttention: separate q/k/v projections, scores / sqrt(d_k), masked softmax."""

    def __init__(self, n_head, n_feat, dropout_rate):
        super().__init__()
        self.d_k = n_feat // n_head
        self.h = n_head
        self.s_d_k = math.sqrt(self.d_k)
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(dropout_rate)

    def forward_qkv(self, query, key, value):
        n_batch = query.size(0)
        q = self.linear_q(query).view(n_batch, -1, self.h, self.d_k).transpose(1, 2)
        k = self.linear_k(key).view(n_batch, -1, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(value).view(n_batch, -1, self.h, self.d_k).transpose(1, 2)
        return q, k, v

    def forward_attention(self, value, scores, mask):
        n_batch = value.size(0)
        mask = mask.unsqueeze(1)  # (batch, 1, time1, time2)
        scores = scores.masked_fill(mask, -INF_VAL)
        attn = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)
        x = torch.matmul(self.dropout(attn), value)
        x = x.transpose(1, 2).reshape(n_batch, -1, self.h * self.d_k)
        return self.linear_out(x)

    def forward(self, query, key, value, mask):
        q, k, v = self.forward_qkv(query, key, value)
        scores = torch.matmul(q, k.transpose(-2, -1)) / self.s_d_k
        return self.forward_attention(v, scores, mask)


class TransformerLayer(nn.Module):
    """Pre-norm block: x + dropout(ff(norm(x))), then x + dropout(mhsa(norm(x)))."""

    def __init__(self, d_model, d_ff, n_heads, dropout, dropout_att):
        super().__init__()
        self.norm_feed_forward = nn.LayerNorm(d_model)
        self.feed_forward = SwiGLUFeedForward(d_model, d_ff, dropout)
        self.norm_self_att = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(n_heads, d_model, dropout_att)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, att_mask):
        residual = x
        x = self.feed_forward(self.norm_feed_forward(x))
        residual = residual + self.dropout(x)
        x = self.norm_self_att(residual)
        x = self.self_attn(x, x, x, att_mask)
        return residual + self.dropout(x)


class SSLEncoderModel(nn.Module):
    def __init__(self, feat_in=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, num_classes=16,
                 dropout=0.1, dropout_att=0.1, block_size=4, mask_prob=0.3):
        super().__init__()
        self.pre_encode = LinearFrontend(feat_in, d_model, dropout)
        self.mask_processor = RandomBlockMasking(d_model, block_size, mask_prob)
        self.pos_enc = PositionalEncoding(d_model, dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d_model, d_ff, n_heads, dropout, dropout_att) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, num_classes)

    def forward(self, audio_signal, length):
        x = audio_signal.transpose(1, 2)  # (batch, frames, feat_in)
        x, length = self.pre_encode(x, length)
        x, masks = self.mask_processor(x, length)
        x = self.pos_enc(x)
        valid = torch.arange(x.size(1), device=x.device)[None, :] < length[:, None]
        att_mask = ~(valid[:, None, :] & valid[:, :, None])  # True where attention is not allowed
        for layer in self.layers:
            x = layer(x, att_mask)
        x = self.final_norm(x)
        log_probs = torch.log_softmax(self.decoder(x), dim=-1)
        return SSLOutput(log_probs=log_probs, encoded=x.transpose(1, 2), encoded_lengths=length, masks=masks)
