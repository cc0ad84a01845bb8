"""Masked writes and selections (``x[mask] = 0``, ``masked_fill``, ``where``): which elements of
their result a mask picks, read off a capture's stored values, so that two sides' masks built each
its own way (a padding mask from lengths against one from an attention mask) can be compared."""
from __future__ import annotations

import torch
import torch.fx

from ..model.capture import DTYPE, SHAPE, TARGET, Capture
from ..store.summary import is_summary

# where each function takes its mask; whether the mask covers the leading dimensions (an index)
# rather than broadcasting from the trailing ones; what it does where the mask is true
_MASK_AT = {"torch.Tensor.__setitem__": (1, True, "writes"),
            "torch.Tensor.masked_fill": (1, False, "writes"), "torch.Tensor.masked_fill_": (1, False, "writes"),
            "torch.masked_fill": (1, False, "writes"),
            "torch.where": (0, False, "selects"), "torch.Tensor.where": (1, False, "selects")}


def use(node: torch.fx.Node) -> str | None:
    """What ``node`` does with its mask ("writes" where it is true, or "selects" its first value
    there), if it is such an op: two ops of one use pick alike with alike masks."""
    found = _MASK_AT.get(str(node.meta.get(TARGET)))
    return found[2] if found is not None else None


def mask_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The bool mask ``node`` writes through or selects with, if it is such an op."""
    found = _MASK_AT.get(str(node.meta.get(TARGET)))
    if found is None or len(node.args) <= found[0]:
        return None
    mask = node.args[found[0]]
    return mask if isinstance(mask, torch.fx.Node) and mask.meta.get(DTYPE) == "bool" else None


def picked(capture: Capture, node: torch.fx.Node) -> torch.Tensor | None:
    """The elements of ``node``'s result that its mask picks, as a bool tensor of that shape; None
    where the mask's value was not kept or does not cover the result."""
    mask = mask_of(node)
    if mask is None or mask.name not in capture.values:
        return None
    at_start = _MASK_AT[str(node.meta.get(TARGET))][1]
    value = capture.values[mask.name]
    shape = node.meta.get(SHAPE)
    if is_summary(value) or not shape or value.dim() > len(shape):
        return None
    if at_start:
        value = value.reshape(*value.shape, *[1] * (len(shape) - value.dim()))
    try:
        return torch.broadcast_to(value, shape)
    except RuntimeError:
        return None
