"""Canonical op keys: one name for the many spellings of the same computation.

``torch.nn.functional.linear``, ``torch._C._nn.linear`` and ``torch.addmm`` are all ``linear``;
``Tensor.__mul__``, ``Tensor.mul`` and ``torch.mul`` are all ``mul``. ``OpKeys`` holds that table
and what the matcher and the judge need to know about ops; ``DEFAULT_OPS`` is the built-in one and
``DEFAULT_OPS.register(key, *names)`` returns an extended copy.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch.fx

from .model.capture import SHAPE, TARGET

_PREFIXES = ("torch.Tensor.", "torch._tensor.Tensor.", "torch.functional.", "torch.nn.functional.",
             "torch._C._nn.", "torch._C._linalg.", "torch.special.", "torch.linalg.", "torch.fft.", "torch.",
             "operator.", "_operator.", "fxdiff.record.", "fxdiff.")

GETITEM = ("operator.getitem", "_operator.getitem")

_ALIASES = (
    ("linear", "linear", "addmm"),
    ("matmul", "matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "einsum"),
    ("add", "add", "__add__", "__radd__", "__iadd__", "add_"),
    ("sub", "sub", "__sub__", "__rsub__", "__isub__", "sub_", "subtract", "rsub"),
    ("mul", "mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply"),
    ("div", "div", "__truediv__", "__rtruediv__", "__itruediv__", "div_", "true_divide", "divide"),
    ("floor_divide", "floor_divide", "__floordiv__", "__rfloordiv__", "__ifloordiv__"),
    ("neg", "neg", "__neg__", "negative"),
    ("pow", "pow", "__pow__", "__rpow__", "square"),
    ("getitem", "__getitem__", "getitem"),
    ("setitem", "__setitem__"),
    ("layer_norm", "layer_norm", "native_layer_norm"),
    ("batch_norm", "batch_norm"),
    ("group_norm", "group_norm"),
    ("silu", "silu", "swish"),
    ("gelu", "gelu"),
    ("relu", "relu", "relu_"),
    ("sigmoid", "sigmoid", "sigmoid_"),
    ("softmax", "softmax", "_softmax"),
    ("log_softmax", "log_softmax"),
    ("conv", "conv1d", "conv2d", "conv3d", "convolution"),
    ("masked_fill", "masked_fill", "masked_fill_"),
    ("sdpa", "scaled_dot_product_attention"),
    ("cat", "cat", "concat", "concatenate"),
    ("mutated", "mutated"),
)

# Ops that move or relabel data without computing: contracted when aligning two graphs.
_TRANSPARENT = (
    "view", "reshape", "permute", "transpose", "t", "contiguous", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "expand_as", "view_as", "reshape_as", "clone", "detach", "to", "type",
    "float", "double", "half", "bfloat16", "mT", "T", "movedim", "swapaxes", "getitem_out",
    "requires_grad_", "mutated",
)

# Ops whose values are uninitialised memory: never compared.
_UNINITIALISED = ("empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided")

# Multi-output ops whose items are slices of their one input: contracted like views.
_SPLITS = ("chunk", "split", "split_with_sizes", "unbind", "tensor_split", "hsplit", "vsplit")

# Ops that draw random numbers: two runs differ there unless the draws are replayed.
RANDOM_OPS = frozenset({
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "feature_dropout",
    "rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "randperm", "bernoulli", "multinomial",
    "normal", "poisson", "uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "cauchy_",
    "log_normal_"})


class OpKeys:
    """An op-key table: stripped op name -> canonical key, plus the op sets keyed by canonical key.

    ``transparent`` ops move or relabel data, ``uninitialised`` ones produce uninitialised memory,
    ``splits`` are multi-output ops whose items are slices of their one input.
    """

    def __init__(self, aliases: dict[str, str], transparent: Iterable[str], uninitialised: Iterable[str],
                 splits: Iterable[str]):
        self.aliases = dict(aliases)
        self.transparent = frozenset(transparent)
        self.uninitialised = frozenset(uninitialised)
        self.splits = frozenset(splits)
        self._keys: dict[str, str] = {}   # op_key's answers so far

    @classmethod
    def default(cls) -> OpKeys:
        """The built-in table."""
        return cls({name: key for key, *names in _ALIASES for name in names}, _TRANSPARENT, _UNINITIALISED,
                   _SPLITS)

    def register(self, key: str, *names: str) -> OpKeys:
        """A copy of this table that also maps each stripped op name in ``names`` to ``key``."""
        return OpKeys({**self.aliases, **dict.fromkeys(names, key)}, self.transparent, self.uninitialised,
                      self.splits)

    def op_key(self, target: str) -> str:
        """Canonical key of a stored target name, e.g. ``torch.Tensor.__mul__`` -> ``mul``."""
        key = self._keys.get(target)
        if key is None:
            key = self._keys[target] = self._op_key(target)
        return key

    def _op_key(self, target: str) -> str:
        name = target
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name in self.aliases:
            return self.aliases[name]
        if name.endswith("_") and not name.startswith("_") and name[:-1] in self.aliases:
            return self.aliases[name[:-1]]
        return name

    def node_key(self, node: torch.fx.Node) -> str:
        """The canonical op key of a node: ``input`` for placeholders, ``param`` / ``constant`` for
        get_attr, and for one output of a multi-output op the key of that op."""
        if node.op == "placeholder":
            return "input"
        if node.op == "get_attr":
            return "constant" if str(node.target).startswith("_fxdiff_constant") else "param"
        target = node.meta.get(TARGET, str(node.target))
        if target in GETITEM and node.args and isinstance(node.args[0], torch.fx.Node):
            return self.node_key(node.args[0])
        return self.op_key(target)

    def is_view(self, node: torch.fx.Node, key: str) -> bool:
        """Whether ``node`` (of key ``key``) only moves or relabels data: a transparent op, an item
        of a split, ``x[idx]`` that only adds or keeps dimensions (``x[:, None]``), an item of its
        first dimension (``x[0]``, as ``x.unbind()[0]``: ``nn.MultiheadAttention``'s q, k and v), or
        a pad of nothing (Hugging Face's Swin pads its image to whole windows, by 0 where it fits)."""
        item_of_split = (node.meta.get(TARGET) in GETITEM and bool(node.args)
                         and isinstance(node.args[0], torch.fx.Node) and key in self.splits)
        return key in self.transparent or item_of_split or (key == "getitem" and _view_index(node)) \
            or (key == "pad" and _pads_nothing(node))


def _pads_nothing(node: torch.fx.Node) -> bool:
    """Sizes all 0; or, given as tensors (EnCodec's padding buffers, 0 here), a result of its input's
    shape (a pad that crops as much as it adds, the one other way to keep it, is not met in models)."""
    sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if not isinstance(sizes, (list, tuple)) or any(type(n) is int and n != 0 for n in sizes):
        return False
    source = node.args[0] if node.args else None
    return all(type(n) is int for n in sizes) or (
        isinstance(source, torch.fx.Node) and source.meta.get(SHAPE) is not None
        and source.meta.get(SHAPE) == node.meta.get(SHAPE))


def _view_index(node: torch.fx.Node) -> bool:
    if len(node.args) < 2:
        return False
    if type(node.args[1]) is int:
        return True
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if not all(i is None or i is Ellipsis or isinstance(i, slice) for i in idx):
        return False
    taken = [i for i in idx if i is not None]   # one per dimension of the source, ``...`` for the rest
    shape = node.args[0].meta.get(SHAPE) if isinstance(node.args[0], torch.fx.Node) else None
    sizes: list[int | None] = [None] * len(taken)
    if shape is not None and taken.count(Ellipsis) <= 1:
        at = taken.index(Ellipsis) if Ellipsis in taken else len(taken)
        after = len(taken) - at - 1
        sizes = [*shape[:at], None, *(shape[len(shape) - after:] if after > 0 else [])][:len(taken)]
    return all(i is Ellipsis or _whole(i, n) for i, n in zip(taken, sizes))


def _whole(i: Any, size: int | None) -> bool:
    """Whether index ``i`` keeps the whole of a dimension of ``size``: ``:``, ``0:``, ``:n`` past its end
    (Hugging Face's ``hidden_states[:, -0:]``, its ``logits_to_keep`` of 0)."""
    if not isinstance(i, slice) or i.start not in (None, 0) or i.step not in (None, 1):
        return False
    return i.stop is None or (type(i.stop) is int and size is not None and i.stop >= size)


DEFAULT_OPS = OpKeys.default()


def op_key(target: str, ops: OpKeys = DEFAULT_OPS) -> str:
    """``ops.op_key(target)``."""
    return ops.op_key(target)


def node_key(node: torch.fx.Node, ops: OpKeys = DEFAULT_OPS) -> str:
    """``ops.node_key(node)``."""
    return ops.node_key(node)
