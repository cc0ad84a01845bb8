"""On a GPU (skipped without one): held, streamed and summary captures of a real model agree.

A tiny Hugging Face GPT-2 on CUDA: the streamed capture's values and gradients are bit-identical
to the held capture's, a summary capture compares as a match against the full one, and a capture
on the GPU compares within noise against the same model on the CPU. Summaries made by the Triton
kernel agree with those ``summarise`` makes on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import fxdiff
from fxdiff.store.summary import is_summary, summarise

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


def test_large_outputs_of_a_gpu_summary_capture_are_summarised_there(tmp_path, monkeypatch):
    from fxdiff.record.recorder import Keep
    model, ids = _gpt2("cuda")
    full = fxdiff.capture(model, (ids,))
    monkeypatch.setattr(Keep, "OUTPUT_BYTES", 0)
    fxdiff.capture(model, (ids,), keep="summary", stream_to=tmp_path / "s")
    summary = fxdiff.load(tmp_path / "s")
    assert is_summary(summary.outputs["logits"]) and is_summary(summary.output_grads["logits"])
    from fxdiff.store.device_summary import unit_digest
    assert summary.output_grads["logits"].digest == unit_digest(full.output_grads["logits"])
    assert fxdiff.compare(full, summary).verdict == "match"


def test_gpu_capture_is_within_noise_of_the_cpu_one():
    model, ids = _gpt2("cuda")
    gpu = fxdiff.capture(model, (ids,))
    model, ids = _gpt2("cpu")
    cpu = fxdiff.capture(model, (ids,))
    assert not fxdiff.compare(cpu, gpu).diverged


def test_summaries_made_on_the_gpu_agree_with_the_cpu():
    from fxdiff.store.device_summary import DeviceSummaries, content_digest, unit_digest
    g = torch.Generator().manual_seed(0)
    special = torch.randn(400, 300, generator=g)
    special[1, 2], special[5, 5], special[7, 1] = float("nan"), float("inf"), -float("inf")
    tensors = [torch.randn(3, 70000, generator=g).to(torch.bfloat16), special.t(), torch.zeros(0),
               torch.randint(-9, 9, (70,), generator=g, dtype=torch.int32), torch.rand(50000, generator=g) > 0.5,
               torch.randn(40, 40, dtype=torch.complex64, generator=g), torch.randn(9000, generator=g).half(),
               torch.full((5,), float("nan")), torch.randint(0, 9, (7,), generator=g)]
    large = torch.randn(5_000_011, generator=g)   # more blocks than programs: each program reads several
    large[17], large[4_000_000] = float("nan"), float("inf")
    tensors += [large, large.double()[:3_000_001], torch.randint(-5, 5, (3_000_000,), generator=g, dtype=torch.int8)]
    device = DeviceSummaries()
    on_gpu = [t.cuda() for t in tensors]
    on_gpu.append(on_gpu[-3][1:4_000_000])   # a pointer that is not 16-byte aligned
    tensors.append(tensors[-3][1:4_000_000])
    # twice: a kind's first launch goes through Triton's JIT, later ones straight to the compiled kernel
    made = [device.add(t, content=True) for t in on_gpu + on_gpu]
    device.finish()
    for t, s in zip(tensors + tensors, made):
        cpu = summarise(t, content=True)
        assert torch.equal(s.sample.view(torch.uint8), cpu.sample.view(torch.uint8)), t.dtype
        spread = 1e-6 * math.sqrt(cpu.stats["sumsq"])   # the CPU sums float32 chunks in float32
        assert s.stats == pytest.approx(cpu.stats, rel=1e-5, abs=spread), t.dtype
        assert s.digest == unit_digest(t) and s.content == cpu.content == content_digest(t), t.dtype
    from fxdiff.store.device_summary import _kernel
    assert _kernel().constants_too is not None, "every launch went through Triton's JIT"


def test_summary_capture_on_gpu_summarises_parameters_and_pairs_them_with_a_cpu_capture():
    model, ids = _gpt2("cuda")
    summary = fxdiff.capture(model, (ids,), keep="summary")
    assert all(is_summary(t) and t.content for t in summary.params.values())
    assert all(is_summary(g) for g in summary.param_grads.values())
    model, ids = _gpt2("cpu")
    report = fxdiff.compare(fxdiff.capture(model, (ids,)), summary)
    assert not report.diverged and not report.unmatched.ref_params
