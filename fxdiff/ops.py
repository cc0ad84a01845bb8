"""Canonical op keys: one name for the many spellings of the same computation.

``torch.nn.functional.linear``, ``torch._C._nn.linear`` and ``torch.addmm`` are all ``linear``;
``Tensor.__mul__``, ``Tensor.mul`` and ``torch.mul`` are all ``mul``. ``register`` extends the table.
"""

from __future__ import annotations

_PREFIXES = ("torch.Tensor.", "torch._tensor.Tensor.", "torch.functional.", "torch.nn.functional.",
             "torch._C._nn.", "torch._C._linalg.", "torch.special.", "torch.linalg.", "torch.fft.", "torch.",
             "operator.", "_operator.", "fxdiff.record.")

_ALIASES: dict[str, str] = {}

# Ops that move or relabel data without computing: contracted when aligning two graphs.
TRANSPARENT = {
    "view", "reshape", "permute", "transpose", "t", "contiguous", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "expand_as", "view_as", "reshape_as", "clone", "detach", "to", "type",
    "float", "double", "half", "bfloat16", "mT", "T", "movedim", "swapaxes", "getitem_out",
    "requires_grad_", "mutated",
}

# Ops whose values are uninitialised memory: never compared.
UNINITIALISED = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


_KEYS: dict[str, str] = {}   # op_key's answers so far


def register(key: str, *names: str) -> None:
    """Map each stripped op name in ``names`` to the canonical ``key``."""
    for name in names:
        _ALIASES[name] = key
    _KEYS.clear()


register("linear", "linear", "addmm")
register("matmul", "matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "einsum")
register("add", "add", "__add__", "__radd__", "__iadd__", "add_")
register("sub", "sub", "__sub__", "__rsub__", "__isub__", "sub_", "subtract", "rsub")
register("mul", "mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply")
register("div", "div", "__truediv__", "__rtruediv__", "__itruediv__", "div_", "true_divide", "divide")
register("floor_divide", "floor_divide", "__floordiv__", "__rfloordiv__", "__ifloordiv__")
register("neg", "neg", "__neg__", "negative")
register("pow", "pow", "__pow__", "__rpow__", "square")
register("getitem", "__getitem__", "getitem")
register("setitem", "__setitem__")
register("layer_norm", "layer_norm", "native_layer_norm")
register("batch_norm", "batch_norm")
register("group_norm", "group_norm")
register("silu", "silu", "swish")
register("gelu", "gelu")
register("relu", "relu", "relu_")
register("sigmoid", "sigmoid", "sigmoid_")
register("softmax", "softmax", "_softmax")
register("log_softmax", "log_softmax")
register("conv", "conv1d", "conv2d", "conv3d", "convolution")
register("masked_fill", "masked_fill", "masked_fill_")
register("sdpa", "scaled_dot_product_attention")
register("cat", "cat", "concat", "concatenate")
register("mutated", "mutated")


def op_key(target: str) -> str:
    """Canonical key of a stored target name, e.g. ``torch.Tensor.__mul__`` -> ``mul``."""
    key = _KEYS.get(target)
    if key is None:
        key = _KEYS[target] = _op_key(target)
    return key


def _op_key(target: str) -> str:
    name = target
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name in _ALIASES:
        return _ALIASES[name]
    if name.endswith("_") and not name.startswith("_") and name[:-1] in _ALIASES:
        return _ALIASES[name[:-1]]
    return name
