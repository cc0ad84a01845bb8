"""Entry points for ``fxdiff capture`` (``fxdiff_refmodel.specs:<function>``).

``build`` gives the reference with seeded weights, ``inputs`` a fixed batch, ``ssl_loss`` the
framework's own loss (it reads ``SSLOutput`` fields, so it only runs on this package's outputs),
and ``write_weights`` saves the weights as ``.safetensors`` for the port to convert.
"""

import torch

from .modules import SSLEncoderModel

SEED = 0
CONFIG = dict(feat_in=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, num_classes=16)


def build():
    """The reference model, initialised under ``torch.manual_seed(SEED)`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return SSLEncoderModel(**CONFIG)


def inputs():
    """Two utterances of 40 and 32 feature frames, channels-first, zero-padded, and their lengths."""
    generator = torch.Generator().manual_seed(1)
    length = torch.tensor([40, 32])
    audio_signal = torch.randn(2, CONFIG["feat_in"], 40, generator=generator)
    audio_signal = audio_signal.masked_fill(torch.arange(40)[None, None, :] >= length[:, None, None], 0.0)
    return {"audio_signal": audio_signal, "length": length}


def ssl_loss(output):
    """Masked cross-entropy against fixed pseudo-random codebook targets, over the masked frames
    when any are masked (train mode), over all valid frames otherwise."""
    log_probs, lengths, masks = output.log_probs, output.encoded_lengths, output.masks
    batch, frames, classes = log_probs.shape
    targets = torch.randint(classes, (batch, frames), generator=torch.Generator().manual_seed(SEED))
    valid = torch.arange(frames, device=log_probs.device)[None, :] < lengths[:, None]
    if bool(masks.any()):
        valid = valid & masks
    weight = valid.to(log_probs.dtype)
    nll = -log_probs.gather(-1, targets.to(log_probs.device).unsqueeze(-1)).squeeze(-1)
    return (nll * weight).sum() / weight.sum()


def write_weights(path):
    """Save ``build()``'s state dict as safetensors at ``path``."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in build().state_dict().items()}, str(path))
    return path
