"""Noise-aware verdicts and where a divergence is blamed, on small models written two ways."""

import torch
from torch import nn

import fxdiff
from fxdiff.judge import Tolerance


class Block(nn.Module):
    def __init__(self, d=16, residual=True, scale=1.0):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.residual, self.scale = residual, scale

    def forward(self, x):
        h = self.fc2(torch.tanh(self.fc1(self.norm(x)))) * self.scale
        return x + h if self.residual else h


class Net(nn.Module):
    def __init__(self, **bug):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block(), Block()])
        self.head = nn.Linear(16, 4)
        for k, v in bug.items():
            setattr(self.blocks[1], k, v)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class BadTanh(torch.autograd.Function):
    """tanh with a backward that forgets the square: a backward-only bug."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        y, = ctx.saved_tensors
        return g * (1 - y)


X = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(1))


def test_a_bfloat16_candidate_is_within_noise_and_a_real_bug_still_diverges():
    ref = fxdiff.capture(Net(), (X,))
    report = fxdiff.compare(ref, Net(), dtype="bfloat16")
    assert report.verdict == "within noise" and not report.diverged
    assert all(r.forward.noise >= 8 * torch.finfo(torch.bfloat16).eps for r in report.nodes if r.forward.noise)
    bug = fxdiff.compare(ref, Net(scale=1.5), dtype="bfloat16")
    assert bug.diverged
    assert {e["ref_module"] for e in bug.first_divergence()["forward"]} <= {"blocks.1", "blocks.1.fc2"}


def test_strict_tolerance_flags_what_the_noise_model_accepts():
    ref = fxdiff.capture(Net(), (X,))
    assert not fxdiff.compare(ref, Net(), dtype="float64").diverged
    assert fxdiff.compare(ref, Net(), dtype="bfloat16", tolerance=Tolerance(atol=1e-6, rtol=0)).diverged


def test_a_forgotten_residual_add_is_blamed_on_its_block():
    report = fxdiff.compare(fxdiff.capture(Net(), (X,)), Net(residual=False))
    first = report.first_divergence()["forward"]
    assert [e["ref_module"] for e in first] == ["blocks.1"] and first[0]["blame"].startswith("ref-only add")


def test_backward_divergences_after_a_forward_one_are_marked_as_its_consequence():
    report = fxdiff.compare(fxdiff.capture(Net(), (X,)), Net(scale=1.5))
    backward = report.first_divergence()["backward"]
    assert backward and all(e["consequence_of_forward"] for e in backward)


def test_a_custom_backward_is_isolated_by_replaying_the_candidates_ops():
    class Custom(Net):
        def forward(self, x):
            for i, b in enumerate(self.blocks):
                if i == 1:
                    h = b.fc2(BadTanh.apply(b.fc1(b.norm(x))))
                    x = x + h
                else:
                    x = b(x)
            return self.head(x)
    report = fxdiff.compare(fxdiff.capture(Net(), (X,)), Custom())
    assert not report.first_divergence()["forward"]
    entry, = report.first_divergence()["backward"]
    assert entry["isolated"] == "custom backward" and not entry["consequence_of_forward"]
    assert entry["cand_module"] == "" and entry["blame"].startswith("backward only")


def test_mixed_precision_as_users_run_it_on_the_bundled_example():
    """The Conformer's STFT has no bfloat16 CPU kernel, so the model cannot be cast; autocast runs it."""
    spec = "examples/conformer/specs.py"
    ref = fxdiff.capture_spec(f"{spec}:reference", inputs=f"{spec}:inputs", loss=f"{spec}:loss")
    assert fxdiff.compare(ref, f"{spec}:port", autocast="bfloat16").verdict == "within noise"
    bug = fxdiff.compare(ref, f"{spec}:port_bug_glu_order", autocast="bfloat16")
    assert [(e["ref_module"], e["cand_module"]) for e in bug.first_divergence()["forward"]] == [("layers.2.conv",) * 2]
