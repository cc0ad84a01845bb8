"""No tensor type aborts a capture or a compare: sparse, vmap-batched, complex, subclass, quantized, meta.

What can be stored safely is stored as a plain tensor (sparse dense, quantized dequantized, a
subclass as a plain view, a value inside ``torch.vmap`` as every sample's value, batch first); what
cannot is left out, with the reason in ``node.meta[NOT_STORED]`` (graph values) or
``capture.meta["not_stored"]`` (parameters, buffers, inputs, outputs).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxdiff
from fxdiff.model.capture import NOT_STORED, VMAP_DIMS
from fxdiff.params.correspond import digest

warnings.filterwarnings("ignore", category=UserWarning)


class SparseBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        adj = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2], [1, 2, 3]]), torch.tensor([1., 2., 3.]), (4, 4))
        self.register_buffer("adj", adj)

    def forward(self, x):
        return torch.sparse.mm(self.adj, self.lin(x).t()).t() + self.adj.to_dense().sum()


class VmapMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        n = x.shape[1]
        mask = torch.vmap(lambda i: (torch.arange(n) <= i).float())(torch.arange(n))
        h = self.lin(x)
        return ((h @ h.transpose(-1, -2)) + (1 - mask) * -1e4).softmax(-1) @ h


class Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.fft.irfft(torch.fft.rfft(self.lin(x), dim=-1) * 2, n=8, dim=-1)


class Tagged(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


class WithSubclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x).as_subclass(Tagged)
        return (y * 2).relu().as_subclass(torch.Tensor) + 1


class QuantizedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.quantize_per_tensor(torch.linspace(-1, 1, 4), 0.1, 0, torch.qint8))

    def forward(self, x):
        return self.lin(x) * self.scale.dequantize()


class MetaIntermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        shape_only = torch.empty(3, device="meta") * 2
        return self.lin(x) + shape_only.shape[0]


def round_trip(capture, tmp_path):
    fxdiff.save(capture, tmp_path / "c")
    return fxdiff.load(tmp_path / "c")


def reasons(capture):
    return {n.name: n.meta[NOT_STORED] for n in capture.graph.nodes if NOT_STORED in n.meta}


def check(model, x, tmp_path):
    """Capture, save, load, and compare against the same live model: clean."""
    torch.manual_seed(0)
    capture = fxdiff.capture(model, (x,))
    loaded = round_trip(capture, tmp_path)
    report = fxdiff.compare(loaded, model)
    assert report.diverged is False
    return capture, loaded


def test_sparse_buffer_is_stored_dense(tmp_path):
    torch.manual_seed(0)
    model = SparseBuffer()
    capture, loaded = check(model, torch.randn(3, 4), tmp_path)
    assert loaded.params["adj"].layout == torch.strided
    assert torch.equal(loaded.params["adj"], model.adj.to_dense())
    assert all(v.layout == torch.strided for v in loaded.values.values())
    assert "not_stored" not in capture.meta
    digest(model.adj)  # sparse digests hash their dense value
    assert digest(model.adj) == digest(model.adj.to_dense())


def test_vmap_values_are_stored_batch_first_and_stay_connected(tmp_path):
    torch.manual_seed(0)
    model = VmapMask()
    capture, loaded = check(model, torch.randn(2, 3, 4), tmp_path)
    assert not reasons(loaded)
    inside = [n for n in loaded.graph.nodes if VMAP_DIMS in n.meta]
    assert inside and all(n.meta[VMAP_DIMS] == 1 for n in inside)
    for n in inside:   # every sample's value, the batch first
        assert list(loaded.values[n.name].shape) == n.meta["fxdiff_shape"]
    # the mask that leaves vmap is the value of the last op inside, moved by a node of its own
    out, = [n for n in loaded.graph.nodes if n.name.startswith("vmap_out")]
    n = 3
    assert torch.equal(loaded.values[out.name], (torch.arange(n)[None, :] <= torch.arange(n)[:, None]).float())
    assert out.all_input_nodes[0] in inside and not any(n.name.startswith("constant") for n in loaded.graph.nodes)


class HFVmapMask(nn.Module):
    """Attention whose mask transformers builds with four nested ``torch.vmap``s (its path for
    custom mask functions) under its own ``TorchFunctionMode``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, pad):
        from transformers.masking_utils import sdpa_mask
        mask = sdpa_mask(batch_size=x.shape[0], q_length=x.shape[1], kv_length=x.shape[1], attention_mask=pad,
                         allow_is_causal_skip=False, use_vmap=True)
        h = self.lin(x)[:, None]
        return torch.nn.functional.scaled_dot_product_attention(h, h, h, attn_mask=mask)


def test_transformers_nested_vmap_mask_is_stored_and_connected(tmp_path):
    torch.manual_seed(0)
    model = HFVmapMask()
    x, pad = torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    capture = fxdiff.capture(model, (x, pad))
    loaded = round_trip(capture, tmp_path)
    assert not reasons(loaded)
    # batch, query and key positions (the mask function does not use the head's)
    assert max(n.meta.get(VMAP_DIMS, 0) for n in loaded.graph.nodes) == 3
    sdpa, = [n for n in loaded.graph.nodes if n.name.startswith("scaled_dot_product_attention")]
    mask = sdpa.kwargs.get("attn_mask") or sdpa.args[3]
    expected = (torch.arange(5)[None, :] <= torch.arange(5)[:, None]) & pad[:, None, None, :]
    assert torch.equal(loaded.values[mask.name], expected)
    # the mask is built from the run's own values: the graph reaches the padding input
    seen, stack = set(), [mask]
    while stack:
        node = stack.pop()
        seen.add(node.name)
        stack += [a for a in node.all_input_nodes if a.name not in seen]
    assert "args_1" in seen   # the padding mask, the second input
    assert not fxdiff.compare(loaded, model).diverged
def test_complex_intermediates_round_trip(tmp_path):
    torch.manual_seed(0)
    capture, loaded = check(Spectral(), torch.randn(2, 8), tmp_path)
    complex_values = [n for n, v in capture.values.items() if v.is_complex()]
    assert complex_values
    for n in complex_values:
        assert loaded.values[n].dtype == capture.values[n].dtype
        assert torch.equal(loaded.values[n], capture.values[n])
    assert any(capture.grads[n].is_complex() for n in complex_values if n in capture.grads)


def test_tensor_subclass_values_are_stored_plain(tmp_path):
    torch.manual_seed(0)
    capture, loaded = check(WithSubclass(), torch.randn(2, 4), tmp_path)
    assert not reasons(capture)
    assert all(type(v) is torch.Tensor for v in capture.values.values())
    assert any(n.name.startswith("relu") for n in capture.graph.nodes)


def test_quantized_buffer_is_stored_dequantized(tmp_path):
    torch.manual_seed(0)
    model = QuantizedBuffer()
    capture, loaded = check(model, torch.randn(2, 4), tmp_path)
    assert loaded.params["scale"].dtype == torch.float32
    assert torch.equal(loaded.params["scale"], model.scale.dequantize())
    assert digest(model.scale) == digest(model.scale.dequantize())


def test_meta_intermediates_are_not_stored(tmp_path):
    torch.manual_seed(0)
    capture, loaded = check(MetaIntermediate(), torch.randn(2, 4), tmp_path)
    why = reasons(loaded)
    assert why and all(r == "a meta tensor (it has no data)" for r in why.values())


def test_meta_buffer_is_left_out_with_its_reason(tmp_path):
    model = nn.Linear(4, 4)
    model.register_buffer("placeholder", torch.empty(5, device="meta"))
    capture = fxdiff.capture(model, (torch.randn(2, 4),))
    assert capture.meta["not_stored"] == {"params.placeholder": "a meta tensor (it has no data)"}
    assert "placeholder" not in capture.params
    loaded = round_trip(capture, tmp_path)
    assert loaded.meta["not_stored"] == capture.meta["not_stored"]
    assert fxdiff.compare(loaded, capture).diverged is False


class InferenceBlock(nn.Module):
    """Constants made under ``torch.inference_mode()`` inside the forward, and a buffer made under it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        with torch.inference_mode():
            self.register_buffer("shift", torch.arange(4.0))

    def forward(self, x):
        with torch.inference_mode():
            scale = torch.ones(4) * 2
            scale.add_(1)
        return self.lin(x) * scale.clone() + self.shift + scale


@pytest.mark.parametrize("streamed", [False, True])
def test_inference_tensors_are_constants_of_the_run(tmp_path, streamed):
    torch.manual_seed(0)
    model, x = InferenceBlock(), torch.randn(2, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cap = fxdiff.capture(model, (x,), stream_to=tmp_path / "c" if streamed else None)
    assert torch.equal(cap.outputs, model(x))
    targets = [str(n.target) for n in cap.graph.nodes]
    assert not any("ones" in t for t in targets)   # made under inference mode: not an op of the run
    constant = [n.name for n in cap.graph.nodes if n.op == "get_attr" and "constant" in n.name]
    assert [cap.values[n].tolist() for n in constant] == [[3.0] * 4]
    assert set(cap.param_grads) == {"lin.weight", "lin.bias"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert fxdiff.compare(cap, model).verdict == "match"


class ExpandedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("pos", torch.arange(4.0).expand(3, 4), persistent=False)   # rows share memory

    def forward(self, x):
        return self.lin(x + self.pos)


@pytest.mark.parametrize("streamed", [False, True])
def test_buffer_whose_elements_share_memory_is_left_as_it_is(tmp_path, streamed):
    torch.manual_seed(0)
    model, x = ExpandedBuffer(), torch.randn(3, 4)
    pos = model.pos
    cap = fxdiff.capture(model, (x,), stream_to=tmp_path / "c" if streamed else None)
    assert model.pos is pos and torch.equal(pos, torch.arange(4.0).expand(3, 4))
    assert torch.equal(cap.params["pos"], pos) and fxdiff.compare(cap, model).verdict == "match"


def test_float64_capture_against_float32_live_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    ref = fxdiff.capture(model.double(), (x.double(),))
    report = fxdiff.compare(ref, model.float())
    assert report.diverged is False
    assert all(r.backward is not None and r.backward.passed for r in report.nodes if r.backward is not None)
    assert report.summary()["param_grads"]["matched"] == 4
