"""On a GPU (skipped without one): held, streamed and summary captures of a real model agree.

A tiny Hugging Face GPT-2 on CUDA: the streamed capture's values and gradients are bit-identical
to the held capture's, a summary capture compares as a match against the full one, and a capture
on the GPU compares within noise against the same model on the CPU.
"""

from __future__ import annotations

import pytest
import torch

import fxdiff

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpt2(device: str):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128, attn_implementation="eager")
    model = GPT2LMHeadModel(config).to(device).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    return model, ids


def test_streamed_capture_on_gpu_is_bit_identical_to_the_held_one(tmp_path):
    model, ids = _gpt2("cuda")
    held = fxdiff.capture(model, (ids,))
    fxdiff.capture(model, (ids,), stream_to=tmp_path / "s.fxd")
    streamed = fxdiff.load(tmp_path / "s.fxd")
    assert set(streamed.values) == set(held.values) and set(streamed.grads) == set(held.grads)
    for table, other in ((held.values, streamed.values), (held.grads, streamed.grads)):
        for name, t in table.items():
            assert torch.equal(t.cpu(), other[name].cpu()), name
    assert fxdiff.compare(held, streamed).verdict == "match"


def test_summary_capture_on_gpu_compares_as_a_match_against_the_full_one():
    model, ids = _gpt2("cuda")
    full = fxdiff.capture(model, (ids,))
    summary = fxdiff.capture(model, (ids,), keep="summary")
    report = fxdiff.compare(full, summary)
    assert report.verdict == "match", report.first_divergence()


def test_gpu_capture_is_within_noise_of_the_cpu_one():
    model, ids = _gpt2("cuda")
    gpu = fxdiff.capture(model, (ids,))
    model, ids = _gpt2("cpu")
    cpu = fxdiff.capture(model, (ids,))
    assert not fxdiff.compare(cpu, gpu).diverged
