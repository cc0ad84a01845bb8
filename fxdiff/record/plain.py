"""Which tensors a capture can store, and the plain tensor that stands in for one that is not plain.

A capture stores plain strided tensors with real storage. Others are turned into one where that is
safe and loses nothing the comparison uses (a sparse tensor becomes its dense value, a quantized one
its dequantized value, a tensor subclass with real storage a plain view of its data); the rest (a
batched tensor inside ``torch.vmap``, a meta tensor, a wrapper subclass with no storage of its own)
are not stored, and the reason is recorded instead. A batched tensor inside ``torch.vmap`` is stored
as the plain tensor behind it: every sample's value, with the vmap dimensions first (``unbatched``).
"""

from __future__ import annotations

import torch

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_functorch = getattr(torch._C, "_functorch", None)


def transformed(t: torch.Tensor) -> str | None:
    """Why ``t`` is a functorch transform's wrapper (``vmap``, ``grad``, ``jvp``), or None."""
    if _functorch is None:
        return None
    try:
        if _functorch.is_batchedtensor(t):
            return "a batched tensor inside torch.vmap"
        if _functorch.is_functorch_wrapped_tensor(t):
            return "a tensor wrapped by a functorch transform (torch.func.grad, jvp, vmap)"
    except (RuntimeError, TypeError):
        return None
    return None


def unbatched(t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """For a batched tensor inside ``torch.vmap`` (nested or not): (a plain view holding every
    sample's value, with the vmap dimensions first, outermost first; how many there are). None for
    any other tensor, and for one that some other functorch transform wraps too. The view's base
    is the tensor behind ``t``."""
    if _functorch is None or not _batched(t):
        return None
    dims: list[int] = []   # where each level's batch dim sits in the current physical tensor, innermost first
    u = t
    while _batched(u):
        b = _functorch.maybe_get_bdim(u)
        dims = [d + (d >= b) for d in dims] + [b]
        u = _functorch.get_unwrapped(u)
    if transformed(u) is not None or type(u) not in _PLAIN_TYPES:
        return None
    front = dims[::-1]
    with torch._C.DisableTorchFunctionSubclass():
        return u.permute(front + [d for d in range(u.dim()) if d not in front]), len(front)


def _batched(t: torch.Tensor) -> bool:
    try:
        return bool(_functorch.is_batchedtensor(t))
    except (RuntimeError, TypeError):
        return False


def is_plain(t: torch.Tensor) -> bool:
    """Whether ``t`` can be stored as it is: a strided, unquantized ``torch.Tensor`` with real storage."""
    return (type(t) in _PLAIN_TYPES and t.layout == torch.strided and not t.is_quantized
            and t.device.type != "meta" and not t.is_nested and transformed(t) is None)


def unstorable(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be stored even after conversion (see ``as_plain``), or None if it can."""
    why = transformed(t)
    if why is not None:
        return why
    if t.device.type == "meta":
        return "a meta tensor (it has no data)"
    if getattr(t, "is_nested", False):
        return "a nested tensor"
    if type(t) not in _PLAIN_TYPES and t.layout == torch.strided and _no_storage(t):
        return f"a {type(t).__name__} (a tensor subclass without storage of its own)"
    return None


def as_plain(t: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """(a detached plain tensor holding ``t``'s value, or None; why it is not stored, or None).

    A plain tensor comes back as ``t.detach()`` (sharing its storage); the others as a new tensor,
    except a simple subclass, which comes back as a plain view of its own storage.
    """
    why = unstorable(t)
    if why is not None:
        return None, why
    try:
        with torch._C.DisableTorchFunctionSubclass():
            value = t.detach()
            if type(value) not in _PLAIN_TYPES:
                value = value.as_subclass(torch.Tensor)
            if value.is_quantized:
                value = value.dequantize()
            if value.layout != torch.strided:
                value = value.to_dense()
    except (RuntimeError, NotImplementedError, TypeError) as e:
        return None, f"a {t.layout} {type(t).__name__} that could not be made plain ({type(e).__name__}: {e})"[:300]
    if not is_plain(value):
        return None, f"a {t.layout} {type(t).__name__} on {t.device}"
    return value, None


def _no_storage(t: torch.Tensor) -> bool:
    try:
        return t.numel() > 0 and t.untyped_storage().data_ptr() == 0
    except (RuntimeError, NotImplementedError, TypeError):
        return True
