"""Op keys: the built-in table, and extending it without touching the default."""

from __future__ import annotations

import pytest

from fxdiff.errors import FxdiffError
from fxdiff.match import UserMap
from fxdiff.ops import DEFAULT_OPS, op_key


def test_spellings_share_one_key():
    assert {op_key(t) for t in ("torch.Tensor.__mul__", "torch.mul", "torch.Tensor.mul_")} == {"mul"}
    assert op_key("torch.nn.functional.linear") == op_key("torch.addmm") == "linear"


def test_register_returns_an_extended_copy():
    ops = DEFAULT_OPS.register("gelu", "my_gelu")
    assert ops.op_key("torch.my_gelu") == "gelu"
    assert DEFAULT_OPS.op_key("torch.my_gelu") == "my_gelu"
    assert ops.transparent == DEFAULT_OPS.transparent


def test_map_file_errors_name_the_file_not_a_flag(tmp_path):
    with pytest.raises(FxdiffError, match=r"^map file .*missing\.yaml: file not found$"):
        UserMap.load(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.json").write_text('{"modules": [["a"]]}')
    with pytest.raises(FxdiffError, match=r"^map file .*bad\.json: each 'modules' entry"):
        UserMap.load(str(tmp_path / "bad.json"))


def test_a_slice_that_keeps_a_whole_dimension_is_a_view():
    """``h[:, -0:]`` (Hugging Face's logits_to_keep of 0) and ``h[:, :n]`` past the end keep everything."""
    import torch.fx
    from fxdiff.model.capture import SHAPE, TARGET
    from fxdiff.ops import DEFAULT_OPS, node_key
    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta[SHAPE] = [2, 5, 8]
    def index(idx):
        n = g.call_function(torch.Tensor.__getitem__, (x, idx))
        n.meta[TARGET] = "torch.Tensor.__getitem__"
        return DEFAULT_OPS.is_view(n, node_key(n))
    assert index((slice(None), slice(0, None)))
    assert index((slice(None), slice(None, 5), slice(0, 99)))
    assert index((Ellipsis, slice(0, 8)))
    assert not index((slice(None), slice(None, 4)))
    assert not index((Ellipsis, slice(1, None)))
    assert not index((slice(None), slice(None, None, 2)))
