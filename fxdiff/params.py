"""Parameter transforms: how a candidate's parameter(s) map onto a reference parameter.

A transform is a small JSON-able dict, so a mapping file can hold it and a conversion can apply it:

- ``{"kind": "identity"}``
- ``{"kind": "transpose"}``                   2-D weight stored transposed
- ``{"kind": "reshape", "shape": [...]}``     e.g. a kernel-1 Conv1d weight vs a Linear weight
- ``{"kind": "rows", "start": a, "stop": b}`` the reference is a row block of one fused candidate
- ``{"kind": "concat"}``                      the reference is the candidates concatenated on dim 0
- ``{"kind": "permute_rows", "index": [...]}`` rows reordered (per-head layouts such as RoPE)
- ``{"kind": "chain", "steps": [...]}``       several of the above, applied in order
"""

from __future__ import annotations

import torch

from .errors import FxdiffError


def apply_transform(parts: list[torch.Tensor], transform: dict) -> torch.Tensor:
    """The reference-layout tensor obtained from candidate tensor(s) ``parts``."""
    kind = transform.get("kind", "identity")
    if kind == "chain":
        out = parts
        for step in transform["steps"]:
            out = [apply_transform(out, step)]
        return out[0]
    if kind == "concat":
        return torch.cat(parts, dim=0)
    if len(parts) != 1:
        raise FxdiffError(f"transform {kind!r} takes one tensor, got {len(parts)}")
    t = parts[0]
    if kind == "identity":
        return t
    if kind == "transpose":
        return t.t()
    if kind == "reshape":
        return t.reshape(transform["shape"])
    if kind == "rows":
        return t[transform["start"]:transform["stop"]]
    if kind == "permute_rows":
        return t[torch.as_tensor(transform["index"], dtype=torch.long)]
    raise FxdiffError(f"unknown parameter transform {kind!r}")
