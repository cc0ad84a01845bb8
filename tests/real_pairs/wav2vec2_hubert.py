"""HF ``Wav2Vec2Model`` against HF ``HubertModel``: the same conv feature encoder, feature
projection, convolutional positional embedding (weight-normed) and post-norm transformer encoder.
The outputs differ in structure: Wav2Vec2 returns ``(last_hidden_state, extract_features)``, HuBERT
only ``last_hidden_state``; ``extract_features`` is a reference-only output (to be reported
unmatched, not diverged).

Conversion: identity on names (``feat_proj_layer_norm=True`` gives HuBERT Wav2Vec2's projection norm).
"""

from __future__ import annotations

import types

import torch

from . import Bug, Pair, randomize

D, L, H, FF = 32, 2, 4, 64
SAMPLES = 400


def _cfg_kwargs():
    return dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF,
                conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), conv_bias=False,
                feat_extract_norm="group", num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                mask_time_prob=0.0, mask_feature_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, do_stable_layer_norm=False)


def build_ref():
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    torch.manual_seed(0)
    return randomize(Wav2Vec2Model(Wav2Vec2Config(**_cfg_kwargs(), attn_implementation="eager")), seed=4).eval()


def convert(sd: dict) -> dict:
    return dict(sd)


def build_cand(ref):
    from transformers import HubertConfig, HubertModel
    m = HubertModel(HubertConfig(**_cfg_kwargs(), feat_proj_layer_norm=True, attn_implementation="sdpa"))
    missing, unexpected = m.load_state_dict(convert(ref.state_dict()), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return m.eval()


def inputs():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, SAMPLES, generator=g),), {}


# ---- bugs -----------------------------------------------------------------------------------------

def bug_tanh_gelu(m):
    """Second conv layer of the feature encoder uses tanh-approximated GELU."""
    m.feature_extractor.conv_layers[1].activation = torch.nn.GELU(approximate="tanh")


def bug_attn_scale(m):
    m.encoder.layers[1].attention.scaling = 1.0 / (D // H)


def bug_norm_eps(m):
    m.encoder.layers[0].final_layer_norm.eps = 1e-1


def bug_no_ff_residual(m):
    layer = m.encoder.layers[0]

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        attn_residual = hidden_states
        h, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        h = self.layer_norm(attn_residual + self.dropout(h))
        h = self.feed_forward(h)                       # bug: h + feed_forward(h)
        return self.final_layer_norm(h)
    layer.forward = types.MethodType(forward, layer)


def bug_pos_conv_pad(m):
    """Positional conv: the extra right frame removed on the wrong side (left instead of right)."""
    pad = m.encoder.pos_conv_embed.padding

    def forward(self, hidden_states):
        return hidden_states[:, :, 1:] if self.num_pad_remove > 0 else hidden_states
    pad.forward = types.MethodType(forward, pad)


BUGS = [
    Bug("tanh_gelu", "wrong activation (tanh gelu vs exact)", bug_tanh_gelu,
        r"feature_extractor\.conv_layers\.1", r"feature_extractor\.conv_layers\.1"),
    Bug("attn_scale", "wrong attention scale", bug_attn_scale, r"encoder\.layers\.1\.attention", r"encoder\.layers\.1\.attention"),
    Bug("norm_eps", "wrong norm eps", bug_norm_eps, r"encoder\.layers\.0\.final_layer_norm", r"encoder\.layers\.0\.final_layer_norm"),
    Bug("no_ff_residual", "forgotten residual add", bug_no_ff_residual, r"encoder\.layers\.0", r"encoder\.layers\.0", exact=True),
    Bug("pos_conv_pad", "off-by-one padding removal in the positional conv", bug_pos_conv_pad,
        r"encoder\.pos_conv_embed", r"encoder\.pos_conv_embed"),
]

PAIR = Pair("wav2vec2_hubert", build_ref, convert, build_cand, inputs, BUGS,
            covers=("outputs differ in structure (ref-only extract_features)", "weight-norm parametrization",
                    "GroupNorm conv front end"))
