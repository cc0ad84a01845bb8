"""No tensor type aborts a capture or a compare: sparse, vmap-batched, complex, subclass, quantized, meta.

What can be stored safely is stored as a plain tensor (sparse dense, quantized dequantized, a
subclass as a plain view); what cannot is left out, with the reason in ``node.meta[NOT_STORED]``
(graph values) or ``capture.meta["not_stored"]`` (parameters, buffers, inputs, outputs).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import fxdiff
from fxdiff.model.capture import NOT_STORED
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


def test_vmap_batched_values_are_not_stored_and_say_why(tmp_path):
    torch.manual_seed(0)
    capture, loaded = check(VmapMask(), torch.randn(2, 3, 4), tmp_path)
    why = reasons(loaded)
    assert why and all(r == "a batched tensor inside torch.vmap" for r in why.values())
    assert not set(why) & set(loaded.values) and not set(why) & set(loaded.grads)
    for name in why:  # the node keeps its per-example shape and dtype
        assert loaded.node(name).meta["fxdiff_shape"] is not None


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


def test_float64_capture_against_float32_live_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    ref = fxdiff.capture(model.double(), (x.double(),))
    report = fxdiff.compare(ref, model.float())
    assert report.diverged is False
    assert all(r.backward is not None and r.backward.passed for r in report.nodes if r.backward is not None)
    assert report.summary()["param_grads"]["matched"] == 4
