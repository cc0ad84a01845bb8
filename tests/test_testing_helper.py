"""fxdiff.testing.assert_equivalent: a port's regression test in one line."""

import pytest
import torch
from torch import nn

import fxdiff
from fxdiff.testing import assert_equivalent


class Ref(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 8)
        self.act = nn.GELU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.act(self.encoder(x)))


class Port(nn.Module):
    """The same function under other names; ``bug``: tanh-approximated GELU in the middle block."""

    def __init__(self, bug=False):
        super().__init__()
        self.proj_in = nn.Linear(6, 8)
        self.mid = nn.GELU(approximate="tanh" if bug else "none")
        self.proj_out = nn.Linear(8, 3)

    def forward(self, x):
        return self.proj_out(self.mid(self.proj_in(x)))


def pair(bug=False):
    torch.manual_seed(0)
    ref = Ref()
    port = Port(bug)
    port.load_state_dict({"proj_in.weight": ref.encoder.weight, "proj_in.bias": ref.encoder.bias,
                          "proj_out.weight": ref.head.weight, "proj_out.bias": ref.head.bias})
    return ref, port


X = (torch.randn(4, 6, generator=torch.Generator().manual_seed(1)),)


def test_clean_port_passes():
    ref, port = pair()
    report = assert_equivalent(fxdiff.capture(ref, X), port)
    assert not report.diverged


def test_bug_raises_naming_the_module():
    ref, port = pair(bug=True)
    with pytest.raises(AssertionError) as caught:
        assert_equivalent(fxdiff.capture(ref, X), port)
    message = str(caught.value)
    first = message.splitlines()[1]
    assert "first forward divergence: ref act" in first and "cand mid" in first, message
    assert "first backward divergence" in message
    modules = message[message.index("Modules"):]   # the rendered report's per-module table
    assert "DIVERGED" in message and "act (cand mid)" in modules, message
    assert "\x1b[" not in message, "plain text, no terminal colours"


def test_options_reach_compare():
    """Compare options pass through: under a loose strict tolerance the bug variant passes."""
    ref, port = pair(bug=True)
    assert_equivalent(fxdiff.capture(ref, X), port, tolerance=fxdiff.Tolerance(atol=1.0, rtol=1.0))
