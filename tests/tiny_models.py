"""Small real models for the capture tests: random weights, built from configs, nothing downloaded.

Each builder returns ``(model, args, kwargs, loss)``; ``loss`` is None for fxdiff's default.
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import nn

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "conformer")


def conformer_specs():
    """The Conformer example's ``specs`` module."""
    if EXAMPLE not in sys.path:
        sys.path.insert(0, EXAMPLE)
    import specs
    return specs


def conformer():
    specs = conformer_specs()
    return specs.make_model("reference"), (), specs.make_inputs(seconds=(0.5, 0.35)), specs.loss


def _hf_quiet():
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def bert():
    t = _hf_quiet()
    torch.manual_seed(0)
    model = t.BertModel(t.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=32))
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return model, (), {"input_ids": ids, "attention_mask": mask}, None


def gpt2():
    t = _hf_quiet()
    torch.manual_seed(0)
    model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                           bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    return model, (), {"input_ids": ids, "use_cache": False}, None


def wav2vec2():
    t = _hf_quiet()
    torch.manual_seed(0)
    model = t.Wav2Vec2Model(t.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4))
    audio = torch.randn(2, 800, generator=torch.Generator().manual_seed(1))
    return model, (audio,), {}, None


def whisper():
    t = _hf_quiet()
    torch.manual_seed(0)
    model = t.WhisperModel(t.WhisperConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=16,
        max_source_positions=20, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1))
    g = torch.Generator().manual_seed(1)
    return model, (), {"input_features": torch.randn(2, 16, 40, generator=g),
                       "decoder_input_ids": torch.randint(0, 99, (2, 5), generator=g), "use_cache": False}, None


class MHAModel(nn.Module):
    """Token embedding -> nn.MultiheadAttention with a padding mask -> LayerNorm -> Linear."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.embed = nn.Embedding(11, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 5)

    def forward(self, ids, pad):
        x = self.embed(ids)
        y, weights = self.attn(x, x, x, key_padding_mask=pad)
        return {"logits": self.out(self.norm(x + y)), "weights": weights}


def mha():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    return MHAModel(), (ids, pad), {}, None


class WrongCube(torch.autograd.Function):
    """``x ** 3`` whose backward claims ``2 x`` (not the true ``3 x^2``): a replay would be right, eager is not."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x * x

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad * 2 * x


class CustomFunctionModel(nn.Module):
    """Linear -> custom autograd.Function -> Linear."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 8)
        self.outer = nn.Linear(8, 3)

    def forward(self, x):
        return self.outer(torch.tanh(WrongCube.apply(self.inner(x))))


def custom_function():
    torch.manual_seed(0)
    return CustomFunctionModel(), (torch.randn(4, 6, generator=torch.Generator().manual_seed(1)),), {}, None


class MLP(nn.Module):
    """A model ``torch.fx.symbolic_trace`` can trace: residual MLP blocks with LayerNorm and GELU."""

    def __init__(self, d=12, blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(),
                                                  nn.Dropout(0.1), nn.Linear(2 * d, d)) for _ in range(blocks))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x) / math.sqrt(2)
        return self.head(x).log_softmax(-1)


def mlp():
    torch.manual_seed(0)
    return MLP(), (torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1)),), {}, None


MODELS = {"conformer": conformer, "bert": bert, "gpt2": gpt2, "wav2vec2": wav2vec2, "whisper": whisper,
          "mha": mha, "custom_function": custom_function, "mlp": mlp}


def build(name: str, dtype: torch.dtype = torch.float32):
    """``(model, args, kwargs, loss)`` for model ``name``, floating tensors cast to ``dtype``."""
    from fxdiff import tree

    model, args, kwargs, loss = MODELS[name]()
    model = model.to(dtype)

    def cast(t):
        return t.to(dtype) if t.is_floating_point() else t
    return model, tree.map_tensors(args, cast), tree.map_tensors(kwargs, cast), loss
