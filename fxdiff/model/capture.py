"""The core data model: a recorded model run as a ``torch.fx.Graph`` plus its tensors.

Every node of ``Capture.graph`` is one torch-level op that ran (``call_function``), a model
input (``placeholder``), a parameter or buffer (``get_attr``) or the output. Per-node facts live in
``node.meta`` under the keys below; tensors live beside the graph, keyed by node name.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Iterator

import torch
import torch.fx

from ..errors import FxdiffError

FORMAT = "fxdiff-capture"
VERSION = 3
READABLE_VERSIONS = (2, 3, 4)   # version 2 has no output gradients; 4: partial captures (capture --keep)

# node.meta keys
MODULE = "fxdiff_module"        # dotted path of the innermost module that called the op ("" = root)
MODULE_TYPE = "fxdiff_module_type"  # class name of that module
TARGET = "fxdiff_target"        # qualified name of the op, e.g. "torch.nn.functional.layer_norm"
SHAPE = "fxdiff_shape"          # output shape as a list, or None when the node holds no tensor
DTYPE = "fxdiff_dtype"          # output dtype as a string, e.g. "float32"
GRAD = "fxdiff_grad"            # "recorded": a gradient was stored; "none": no gradient flowed
NOT_STORED = "fxdiff_not_stored"  # why a tensor the node produced has no stored value
VMAP_DIMS = "fxdiff_vmap_dims"  # the op ran per sample inside torch.vmap: the stored value's leading dims are the batch
BOUNDARY = "fxdiff_boundary"    # placeholder for a value made outside the kept modules: the op that made it
NO_GRAD = "fxdiff_no_grad"      # True: made with autograd off (torch.no_grad, a reentrant checkpoint's forward)


_KINDS = {"str": str, "int": int, "bool": bool, "dict": dict}


@dataclasses.dataclass(frozen=True)
class CaptureInfo:
    """The metadata fields fxdiff reads back, typed (``Capture.info``); ``Capture.meta`` keeps
    every field as stored. A field that is absent takes the default here."""

    model: str | None = None          # the model spec, when captured from one
    model_class: str | None = None
    mode: str = "eval"
    seed: int = 0
    keep_dropout: bool = False
    keep: str = "both"                # what was stored: both, values, grads or summary
    loss: str | None = None           # a description; a capture's loss is never code
    tf32: bool = False                # float32 matrix products may have rounded to TF32 (CUDA)
    dtype: str | None = None
    device: str | None = None
    autocast: str | None = None
    torch: str | None = None
    fxdiff: str | None = None
    python: str | None = None
    tracer: str | None = None
    started: str | None = None
    checkpoint: dict | None = None    # what loading the checkpoint found (``specs.LoadedCheckpoint``)

    @classmethod
    def of(cls, meta: dict[str, Any]) -> "CaptureInfo":
        """The fields of ``meta``; ``FxdiffError`` naming a field of the wrong type."""
        found = {}
        for f in dataclasses.fields(cls):
            value = meta.get(f.name)
            if value is None:
                continue
            kind = _KINDS[f.type.partition(" ")[0]]   # the annotation (a string here) without "| None"
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise FxdiffError(f"capture metadata: {f.name} is {type(value).__name__}, expected {kind.__name__}")
            found[f.name] = value
        return cls(**found)


# each graph's nodes by name, built on first use and again when a name is missing or stale (the stories
# look nodes up by name in loops: a scan of the graph each time was quadratic)
_BY_NAME: weakref.WeakKeyDictionary[torch.fx.Graph, dict[str, torch.fx.Node]] = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class Capture:
    """One recorded run of a model: graph, per-node values and gradients, parameters, I/O, metadata.

    ``values[name]`` is the forward value of node ``name`` as it was produced;
    ``grads[name]`` is d(loss)/d(that value); a node with no entry in ``grads`` received no gradient,
    which is not the same as a zero gradient. ``output_grads`` holds the loss's own gradient with
    respect to each output leaf: the seed of the backward pass, which a candidate can start from. Values and gradients are views where the run's tensors
    were (a transpose shares memory with its input): read them, never write to them. ``inputs`` and
    ``outputs`` keep the call's structure (nested lists/tuples/dicts) with tensors in place.
    """

    graph: torch.fx.Graph
    values: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    param_grads: dict[str, torch.Tensor]
    inputs: dict[str, Any]          # {"args": [...], "kwargs": {...}}
    outputs: Any
    meta: dict[str, Any]
    # d(loss)/d(output leaf), by the leaf's path in ``outputs``: where backward started
    output_grads: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def info(self) -> CaptureInfo:
        """The metadata fields fxdiff reads, typed (``meta`` holds them all, as stored)."""
        return CaptureInfo.of(self.meta)

    def nodes(self, op: str | None = None) -> Iterator[torch.fx.Node]:
        """Graph nodes in topological order, optionally only those with ``node.op == op``."""
        return (n for n in self.graph.nodes if op is None or n.op == op)

    def node(self, name: str) -> torch.fx.Node:
        """The node called ``name``."""
        by_name = _BY_NAME.get(self.graph)
        found = by_name.get(name) if by_name is not None else None
        if found is None or found.graph is not self.graph or found.name != name or getattr(found, "_erased", False):
            by_name = _BY_NAME[self.graph] = {n.name: n for n in self.graph.nodes}
            found = by_name.get(name)
            if found is None:
                raise KeyError(name)
        return found

    def output_nodes(self) -> list[torch.fx.Node]:
        """The nodes feeding the graph's output, in output-leaf order."""
        out = next(n for n in self.graph.nodes if n.op == "output")
        return [a for a in out.args[0] if isinstance(a, torch.fx.Node)]

    def summary(self) -> dict[str, Any]:
        """Counts and sizes, for ``fxdiff inspect`` and notebooks."""
        def nbytes(d):
            return sum(t.numel() * t.element_size() for t in d.values())

        ops = sum(1 for _ in self.nodes("call_function"))
        return {
            "nodes": len(self.graph.nodes),
            "ops": ops,
            "inputs": sum(1 for _ in self.nodes("placeholder")),
            "params": len(self.params),
            "values": len(self.values),
            "grads": len(self.grads),
            "param_grads": len(self.param_grads),
            "bytes": {
                "values": nbytes(self.values),
                "grads": nbytes(self.grads),
                "params": nbytes(self.params),
                "param_grads": nbytes(self.param_grads),
            },
        }
