"""Reference model: a NEST-style self-supervised Conformer encoder, written the NeMo way.

The structure, module names and numerics follow NVIDIA NeMo's
``AudioToMelSpectrogramPreprocessor`` -> ``ConformerEncoder`` (striding
``ConvSubsampling``, ``RelPositionalEncoding``, ``ConformerLayer`` with
``RelPositionMultiHeadAttention``) -> ``MultiSoftmaxDecoder``, so that the state
dict keys look like a NeMo checkpoint. NEST's random-projection quantizer and
input masking are left out: the SSL targets are supplied by the caller.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SSLOutput:
    """What the model returns: codebook log-probabilities and the encoder output."""

    log_probs: torch.Tensor  # (batch, frames, num_classes)
    encoded: torch.Tensor  # (batch, d_model, frames), NeMo's channels-first layout
    encoded_lengths: torch.Tensor  # (batch,) valid frames per example


def mel_filterbank(sample_rate, n_fft, n_mels, fmin=0.0, fmax=None):
    """Slaney-style mel filterbank, as ``librosa.filters.mel`` builds it: (n_mels, n_fft // 2 + 1)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    f_sp, min_log_hz, min_log_mel = 200.0 / 3, 1000.0, 15.0
    logstep = math.log(6.4) / 27.0

    def hz_to_mel(hz):
        mel = hz / f_sp
        return torch.where(hz >= min_log_hz, min_log_mel + torch.log(hz / min_log_hz) / logstep, mel)

    def mel_to_hz(mel):
        hz = mel * f_sp
        return torch.where(mel >= min_log_mel, min_log_hz * torch.exp(logstep * (mel - min_log_mel)), hz)

    limits = hz_to_mel(torch.tensor([fmin, fmax], dtype=torch.float64))
    mel_f = mel_to_hz(torch.linspace(limits[0], limits[1], n_mels + 2, dtype=torch.float64))
    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    fdiff = mel_f.diff()
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.float()


class FilterbankFeatures(nn.Module):
    """Log-mel features with per-feature normalisation over the valid frames (NeMo's featurizer)."""

    def __init__(self, sample_rate=16000, n_fft=512, window_size=0.025, window_stride=0.01,
                 n_mels=80, preemph=0.97, log_zero_guard=2**-24, mag_guard=1e-5, norm_eps=1e-5):
        super().__init__()
        self.n_fft = n_fft
        self.win_length = int(window_size * sample_rate)
        self.hop_length = int(window_stride * sample_rate)
        self.preemph = preemph
        self.log_zero_guard = log_zero_guard
        self.mag_guard = mag_guard
        self.norm_eps = norm_eps
        self.register_buffer("window", torch.hann_window(self.win_length, periodic=False))
        self.register_buffer("fb", mel_filterbank(sample_rate, n_fft, n_mels).unsqueeze(0))

    def get_seq_len(self, seq_len):
        """Number of STFT frames (``center=True``) for each audio length."""
        pad_amount = self.n_fft // 2 * 2
        return torch.floor_divide(seq_len + pad_amount - self.n_fft, self.hop_length) + 1

    def normalize_batch(self, x, seq_len):
        """Per-feature mean/std over each example's valid frames (unbiased std, like NeMo)."""
        valid = torch.arange(x.size(2), device=x.device)[None, :] < seq_len[:, None]
        count = valid.sum(dim=1)
        if bool((count < 2).any()):
            raise ValueError("per_feature normalisation needs at least two frames per example")
        x_mean = torch.where(valid.unsqueeze(1), x, 0.0).sum(dim=2) / count.unsqueeze(1)
        centered = torch.where(valid.unsqueeze(1), x - x_mean.unsqueeze(2), 0.0)
        x_std = torch.sqrt(centered.pow(2).sum(dim=2) / (count.unsqueeze(1) - 1.0))
        x_std = x_std + self.norm_eps
        return (x - x_mean.unsqueeze(2)) / x_std.unsqueeze(2)

    def forward(self, x, seq_len):
        frames = self.get_seq_len(seq_len)
        timemask = torch.arange(x.size(1), device=x.device)[None, :] < seq_len[:, None]
        x = torch.cat((x[:, :1], x[:, 1:] - self.preemph * x[:, :-1]), dim=1)
        x = x.masked_fill(~timemask, 0.0)
        x = torch.stft(x, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                       window=self.window, center=True, pad_mode="constant", return_complex=True)
        x = torch.view_as_real(x)
        x = torch.sqrt(x.pow(2).sum(-1) + self.mag_guard).pow(2.0)  # power spectrum
        x = torch.matmul(self.fb, x)
        x = torch.log(x + self.log_zero_guard)
        x = self.normalize_batch(x, frames)
        pad = torch.arange(x.size(2), device=x.device)[None, :] >= frames[:, None]
        return x.masked_fill(pad.unsqueeze(1), 0.0), frames


class AudioToMelSpectrogramPreprocessor(nn.Module):
    """Wraps the featurizer; crops the batch to its longest example first."""

    def __init__(self, **featurizer_kwargs):
        super().__init__()
        self.featurizer = FilterbankFeatures(**featurizer_kwargs)

    def forward(self, input_signal, length):
        input_signal = input_signal[:, : int(length.max())]
        return self.featurizer(input_signal, length)


class ConvSubsampling(nn.Module):
    """4x "striding" subsampling: two stride-2 Conv2d + ReLU, then a Linear to d_model."""

    def __init__(self, feat_in, d_model, conv_channels):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, conv_channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(conv_channels, conv_channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.out = nn.Linear(conv_channels * math.ceil(feat_in / 4), d_model)

    @staticmethod
    def calc_length(lengths, num_layers=2, kernel_size=3, stride=2, padding=1):
        lengths = lengths.to(torch.float)
        for _ in range(num_layers):
            lengths = torch.floor((lengths + 2 * padding - kernel_size) / stride + 1.0)
        return lengths.to(torch.long)

    def forward(self, x, lengths):
        x = self.conv(x.unsqueeze(1))  # (b, c, t, f)
        b, c, t, f = x.size()
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        return x, self.calc_length(lengths)


class RelPositionalEncoding(nn.Module):
    """Sinusoidal embeddings of relative positions (L-1 ... -(L-1)) plus input scaling."""

    def __init__(self, d_model, dropout_rate, dropout_rate_emb, max_len=512, xscale=None):
        super().__init__()
        self.d_model = d_model
        self.xscale = xscale
        self.dropout = nn.Dropout(dropout_rate)
        self.dropout_emb = nn.Dropout(dropout_rate_emb)
        self.extend_pe(max_len)

    def extend_pe(self, length):
        """(Re)build the table if it cannot cover sequences of ``length`` frames."""
        if hasattr(self, "pe") and self.pe.size(1) >= 2 * length - 1:
            return
        positions = torch.arange(length - 1, -length, -1, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / self.d_model)
        )
        pe = torch.zeros(positions.size(0), self.d_model)
        pe[:, 0::2] = torch.sin(positions * div_term)
        pe[:, 1::2] = torch.cos(positions * div_term)
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)

    def forward(self, x):
        self.extend_pe(x.size(1))
        if self.xscale:
            x = x * self.xscale
        input_len = x.size(1)
        center_pos = self.pe.size(1) // 2 + 1
        pos_emb = self.pe[:, center_pos - input_len : center_pos + input_len - 1]
        return self.dropout(x), self.dropout_emb(pos_emb)


class Swish(nn.SiLU):
    """NeMo's name for SiLU."""


class ConformerFeedForward(nn.Module):
    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.activation = Swish()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class RelPositionMultiHeadAttention(nn.Module):
    """Transformer-XL style multi-head self-attention with relative positional encoding."""

    def __init__(self, n_head, n_feat, dropout_rate):
        super().__init__()
        self.d_k = n_feat // n_head
        self.h = n_head
        self.s_d_k = math.sqrt(self.d_k)
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.dropout = nn.Dropout(dropout_rate)

    def forward_qkv(self, query, key, value):
        n_batch = query.size(0)
        q = self.linear_q(query).view(n_batch, -1, self.h, self.d_k)
        k = self.linear_k(key).view(n_batch, -1, self.h, self.d_k)
        v = self.linear_v(value).view(n_batch, -1, self.h, self.d_k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def rel_shift(x):
        """Turn scores against relative positions into scores against absolute key positions."""
        b, h, qlen, pos_len = x.size()  # (b, h, t1, 2*t1-1)
        x = F.pad(x, pad=(1, 0))  # (b, h, t1, 2*t1)
        x = x.view(b, h, -1, qlen)  # (b, h, 2*t1, t1)
        return x[:, :, 1:].view(b, h, qlen, pos_len)

    def forward_attention(self, value, scores, mask):
        n_batch = value.size(0)
        mask = mask.unsqueeze(1)  # (b, 1, t1, t2)
        scores = scores.masked_fill(mask, -10000.0)
        attn = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)
        x = torch.matmul(self.dropout(attn), value)  # (b, h, t1, d_k)
        x = x.transpose(1, 2).reshape(n_batch, -1, self.h * self.d_k)
        return self.linear_out(x)

    def forward(self, query, key, value, mask, pos_emb):
        q, k, v = self.forward_qkv(query, key, value)
        q = q.transpose(1, 2)  # (b, t1, h, d_k)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        q_with_bias_u = (q + self.pos_bias_u).transpose(1, 2)
        q_with_bias_v = (q + self.pos_bias_v).transpose(1, 2)
        matrix_bd = torch.matmul(q_with_bias_v, p.transpose(-2, -1))
        matrix_bd = self.rel_shift(matrix_bd)[:, :, :, : k.size(-2)]
        matrix_ac = torch.matmul(q_with_bias_u, k.transpose(-2, -1))
        scores = (matrix_ac + matrix_bd) / self.s_d_k
        return self.forward_attention(v, scores, mask)


class ConformerConvolution(nn.Module):
    """Pointwise conv -> GLU -> (mask padding) -> depthwise conv -> BatchNorm -> Swish -> pointwise conv."""

    def __init__(self, d_model, kernel_size):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, kernel_size=1)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, padding=(kernel_size - 1) // 2,
                                        groups=d_model)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.activation = Swish()
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, kernel_size=1)

    def forward(self, x, pad_mask):
        x = self.pointwise_conv1(x.transpose(1, 2))
        x = F.glu(x, dim=1)
        x.masked_fill_(pad_mask.unsqueeze(1), 0.0)
        x = self.depthwise_conv(x)
        x = self.activation(self.batch_norm(x))
        return self.pointwise_conv2(x).transpose(1, 2)


class ConformerLayer(nn.Module):
    """Macaron FF (half step) -> rel-pos MHSA -> conv module -> FF (half step) -> LayerNorm."""

    def __init__(self, d_model, d_ff, n_heads, conv_kernel_size, dropout, dropout_att):
        super().__init__()
        self.fc_factor = 0.5
        self.norm_feed_forward1 = nn.LayerNorm(d_model)
        self.feed_forward1 = ConformerFeedForward(d_model, d_ff, dropout)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConformerConvolution(d_model, conv_kernel_size)
        self.norm_self_att = nn.LayerNorm(d_model)
        self.self_attn = RelPositionMultiHeadAttention(n_heads, d_model, dropout_att)
        self.norm_feed_forward2 = nn.LayerNorm(d_model)
        self.feed_forward2 = ConformerFeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, x, att_mask, pos_emb, pad_mask):
        residual = x
        x = self.feed_forward1(self.norm_feed_forward1(x))
        residual = residual + self.dropout(x) * self.fc_factor

        x = self.norm_self_att(residual)
        x = self.self_attn(query=x, key=x, value=x, mask=att_mask, pos_emb=pos_emb)
        residual = residual + self.dropout(x)

        x = self.conv(self.norm_conv(residual), pad_mask=pad_mask)
        residual = residual + self.dropout(x)

        x = self.feed_forward2(self.norm_feed_forward2(residual))
        residual = residual + self.dropout(x) * self.fc_factor
        return self.norm_out(residual)


class MultiSoftmaxDecoder(nn.Module):
    """NEST's SSL head: a projection to codebook logits followed by log-softmax."""

    def __init__(self, d_model, num_classes):
        super().__init__()
        self.proj = nn.Linear(d_model, num_classes)

    def forward(self, encoder_output):
        return self.proj(encoder_output.transpose(1, 2)).log_softmax(dim=-1)


class ConformerSSLModel(nn.Module):
    """Audio (batch, samples) + lengths -> ``SSLOutput``; the NeMo modules are direct children."""

    def __init__(self, d_model=64, n_layers=3, n_heads=4, ff_expansion=4, n_mels=80,
                 conv_kernel_size=15, subsampling_channels=None, num_classes=64, dropout=0.1,
                 dropout_att=0.1, dropout_emb=0.1, sample_rate=16000, n_fft=512, xscaling=True):
        super().__init__()
        self.preprocessor = AudioToMelSpectrogramPreprocessor(sample_rate=sample_rate, n_fft=n_fft,
                                                              n_mels=n_mels)
        self.pre_encode = ConvSubsampling(n_mels, d_model, subsampling_channels or d_model)
        self.pos_enc = RelPositionalEncoding(d_model, dropout, dropout_emb,
                                             xscale=math.sqrt(d_model) if xscaling else None)
        self.layers = nn.ModuleList(
            ConformerLayer(d_model, d_model * ff_expansion, n_heads, conv_kernel_size, dropout, dropout_att)
            for _ in range(n_layers)
        )
        self.decoder = MultiSoftmaxDecoder(d_model, num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """Give norms and attention biases non-trivial values, as a trained checkpoint would have."""
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            if isinstance(module, RelPositionMultiHeadAttention):
                module.pos_bias_u.normal_(0.0, 0.1)
                module.pos_bias_v.normal_(0.0, 0.1)

    @staticmethod
    def create_masks(lengths, max_len):
        """Padding mask (b, t) and attention mask (b, t, t); True marks positions to ignore."""
        valid = torch.arange(max_len, device=lengths.device).expand(lengths.size(0), -1) < lengths.unsqueeze(-1)
        att_valid = valid.unsqueeze(1).repeat(1, max_len, 1)
        att_valid = torch.logical_and(att_valid, att_valid.transpose(1, 2))
        return ~valid, ~att_valid

    def forward(self, audio, lengths):
        features, feature_lengths = self.preprocessor(input_signal=audio, length=lengths)
        x, encoded_lengths = self.pre_encode(features.transpose(1, 2), feature_lengths)
        x, pos_emb = self.pos_enc(x)
        pad_mask, att_mask = self.create_masks(encoded_lengths, x.size(1))
        for layer in self.layers:
            x = layer(x, att_mask=att_mask, pos_emb=pos_emb, pad_mask=pad_mask)
        encoded = x.transpose(1, 2)
        return SSLOutput(self.decoder(encoded), encoded, encoded_lengths)
