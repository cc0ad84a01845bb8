"""``tracer="fx"``: same capture as eager for traceable models, refused where the trace is not the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdiff
from fxdiff.model.capture import MODULE, TARGET
from tiny_models import build



@pytest.mark.parametrize("mode", ["eval", "train"])
def test_traceable_model_gives_the_same_capture_with_both_tracers(mode):
    model, args, kwargs, _ = build("mlp")
    eager = fxdiff.capture(model, args, kwargs, mode=mode)
    traced = fxdiff.capture(model, args, kwargs, mode=mode, tracer="fx")
    assert traced.meta["tracer"] == "fx" and eager.meta["tracer"] == "eager"

    def layout(cap):
        return [(n.name, n.op, n.meta.get(TARGET), n.meta.get(MODULE)) for n in cap.graph.nodes]
    assert layout(traced) == layout(eager)
    assert {n.meta.get(MODULE) for n in traced.graph.nodes} >= {"", "blocks.0.1", "blocks.1.4", "head"}
    assert all(torch.equal(v, eager.values[n]) for n, v in traced.values.items())
    assert traced.grads.keys() == eager.grads.keys()
    assert all(torch.equal(g, eager.grads[n]) for n, g in traced.grads.items())
    report = fxdiff.compare(eager, traced)
    assert not report.diverged
    assert report.summary()["nodes"]["pairs"] >= len(eager.values) // 2


def test_custom_function_with_a_wrong_backward_is_refused():
    model, args, kwargs, _ = build("custom_function")
    with pytest.raises(fxdiff.FxdiffError, match=r"traced graph of CustomFunctionModel does not reproduce the "
                                                  r"model: the gradient of parameter inner\.weight differs"):
        fxdiff.capture(model, args, kwargs, tracer="fx")
    assert fxdiff.capture(model, args, kwargs).param_grads  # eager records it


class FrozenBranch(nn.Module):
    """Part of the forward runs under no_grad: a trace, which drops the context, would differentiate it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            gate = torch.sigmoid(self.a(x))
        return self.b(x) * gate + self.a(x)


def test_no_grad_region_is_refused():
    torch.manual_seed(0)
    with pytest.raises(fxdiff.FxdiffError, match=r"FrozenBranch does not reproduce the model: the gradient of "
                                                  r"parameter a\.(weight|bias) differs"):
        fxdiff.capture(FrozenBranch(), (torch.randn(3, 4),), tracer="fx")


def test_untraceable_hugging_face_model_gives_one_clear_line():
    model, args, kwargs, _ = build("bert")
    with pytest.raises(fxdiff.FxdiffError) as info:
        fxdiff.capture(model, args, kwargs, tracer="fx")
    message = str(info.value)
    assert message.startswith("tracer fx: BertModel cannot be traced by torch.fx.symbolic_trace (")
    assert message.endswith("use the eager tracer") and "\n" not in message


def test_unknown_tracer_is_an_error():
    model, args, kwargs, _ = build("mlp")
    with pytest.raises(fxdiff.FxdiffError, match="tracer must be one of eager, fx"):
        fxdiff.capture(model, args, kwargs, tracer="dynamo")
