"""A loaded capture's tensors against its graph: every stored tensor is where the graph says and
of the shape and dtype it records, before any stage uses them.

A capture whose files were edited consistently (digests recomputed) passes the checksums; this
is what catches an edit that changes meaning without breaking the format:

- each ``value/NAME`` and ``grad/NAME`` belongs to a node ``NAME`` of the graph, with the shape and
  dtype its metadata records (a gradient has its value's); a node's ``fxdiff_grad`` says whether a
  gradient is stored;
- a trained parameter has the shape and dtype of its ``get_attr`` node and of its gradient; every
  parameter or buffer belongs to a module the capture lists; a ``get_attr`` node's tensor is stored
  or its absence explained;
- each ``output_grad/PATH`` is the gradient of an output leaf, of its shape and dtype;
- the stored inputs and outputs are the values of the graph's placeholders and of the nodes its
  output node reads, leaf by leaf (format versions 3 and 4: earlier writers did not promise it);
- there is no tensor the capture does not use;
- (format 3 and 4) only a node with a stored value records a shape, dtype and gradient status,
  unless it says why its value is not stored; a ``get_attr`` node reads a tensor of the module it
  is recorded in, or holds a constant.

A capture that keeps less (``capture --keep``, ``--modules``) is held to what it keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.fx

from .. import tree
from ..errors import FxdiffError
from ..model.capture import DTYPE, GRAD, MODULE, NO_GRAD, NOT_STORED, SHAPE, TARGET
from ..util import dtype_name
from .summary import is_summary

GRAPH, TENSORS = "graph.json", "tensors.safetensors"

_SECTIONS = ("value", "grad", "param", "param_grad", "output_grad")


def check(graph: torch.fx.Graph, tensors: dict[str, torch.Tensor], tables: dict[str, dict[str, torch.Tensor]],
          inputs: Any, outputs: Any, io_doc: Any, meta: dict[str, Any], version: int, file: Path) -> None:
    """Raise ``FxdiffError`` naming the capture ``file`` (its directory), the files and the tensor
    when the capture is inconsistent.

    ``tables`` are the tensors by section, ``io_doc`` the JSON of the inputs and outputs (for the
    tensor keys they use)."""
    def refuse(what: str) -> None:
        raise FxdiffError(f"{file}: {what}; the capture is inconsistent")

    used = set(_tensor_keys(io_doc))
    for key in tensors:
        section = key.partition("/")[0] if "/" in key else None
        if section not in _SECTIONS and key not in used:
            refuse(f"{TENSORS} holds tensor {key[:80]!r}, which {GRAPH} does not use")

    nodes = {n.name: n for n in graph.nodes}
    values, grads = tables["value"], tables["grad"]
    # kept less than every node (capture --keep, --modules); a full capture written while the model
    # ran is version 4 too, and whole
    partial = meta.get("keep", "both") != "both" or bool(meta.get("kept_modules"))
    for name, value in values.items():
        node = nodes.get(name)
        if node is None or node.op == "output":
            refuse(f"{TENSORS} holds a value for {name[:80]!r}, which is no node of {GRAPH}")
        if not is_summary(value):   # a summary holds statistics and a sample, checked on reading
            _agrees(value, node.meta, f"value of node {name!r}", refuse)
        if partial and node.meta.get(GRAD) not in ("recorded", "none"):   # keeps values only, or some modules
            continue
        if node.meta.get(GRAD) not in ("recorded", "none"):
            refuse(f"{GRAPH}: node {name!r} does not say whether it received a gradient")
        if (node.meta[GRAD] == "recorded") != (name in grads):
            refuse(f"{GRAPH}: node {name!r} says its gradient is {'' if node.meta[GRAD] == 'recorded' else 'not '}"
                   f"recorded, and {TENSORS} " + ("does not hold" if name not in grads else "holds") + " one")
    for name, grad in grads.items():
        if name not in values:
            refuse(f"{TENSORS} holds a gradient for {name[:80]!r}, which has no value")
        if nodes[name].meta.get(NO_GRAD):
            refuse(f"{GRAPH}: node {name!r} says it ran with autograd off, and {TENSORS} holds a gradient of it")
        if not (is_summary(grad) or is_summary(values[name])):
            _same_layout(grad, values[name], f"gradient of node {name!r}", "its value", refuse)

    params, param_grads = tables["param"], tables["param_grad"]
    modules = meta.get("modules")
    for name in params:
        if isinstance(modules, dict) and name.rpartition(".")[0] not in modules:
            refuse(f"{TENSORS} holds parameter {name[:80]!r}, which belongs to no module of the model")
    for name, grad in param_grads.items():
        if name not in params:
            refuse(f"{TENSORS} holds a gradient for parameter {name[:80]!r}, which is not stored")
        _same_layout(grad, params[name], f"gradient of parameter {name!r}", "the parameter", refuse)
    for node in graph.nodes:
        if node.op == "call_function" and not isinstance(node.meta.get(TARGET), str):
            refuse(f"{GRAPH}: node {node.name!r} records no target")
        if node.op != "get_attr" or node.name in values:
            continue
        target = str(node.target)
        if target in params:
            if target in param_grads and not is_summary(params[target]):   # a trained parameter, as the run
                _agrees(params[target], node.meta, f"parameter {target!r}", refuse)  # used it (a buffer may change)
        elif not node.meta.get(NOT_STORED):
            refuse(f"{GRAPH}: node {node.name!r} reads {target[:80]!r}, which {TENSORS} does not hold")

    leaves = dict(tree.flatten(outputs))
    for path, grad in tables["output_grad"].items():
        if path not in leaves:
            refuse(f"{TENSORS} holds a gradient for output {path[:80]!r}, which is no output")
        _same_layout(grad, leaves[path], f"gradient of output {path!r}", "the output", refuse)

    if version >= 3 and not partial:   # a partial capture keeps less (values only, summaries, some modules)
        _check_node_meta(graph, values, refuse)
        placeholders = [values[n.name] for n in graph.nodes if n.op == "placeholder" and n.name in values]
        _same_leaves([t for _, t in tree.flatten(inputs)], placeholders, f"the inputs {GRAPH} lists",
                     "the values of its placeholders", refuse)
        out_node = next(n for n in graph.nodes if n.op == "output")
        produced = []
        for n in out_node.args[0]:
            t = values.get(n.name)
            if t is None and n.op == "get_attr":
                t = params.get(str(n.target))
            if t is not None:
                produced.append(t)
        _same_leaves(list(leaves.values()), produced, f"the outputs {GRAPH} lists",
                     "the values its output node reads", refuse)


_CONSTANT = "_fxdiff_constant_"   # the target of a get_attr node for a tensor made outside the model


def _check_node_meta(graph: torch.fx.Graph, values: dict[str, torch.Tensor], refuse) -> None:
    """What only a node with a stored value records (shape, dtype, gradient status; unless the
    node explains why its value is not stored); a get_attr node reads a parameter or buffer of
    the module it is recorded in, or holds a constant of its own."""
    for node in graph.nodes:
        stored = node.name in values
        if node.op == "get_attr":
            target = str(node.target)
            constant = target.startswith(_CONSTANT)
            if stored and not constant or constant and not stored and not node.meta.get(NOT_STORED):
                refuse(f"{GRAPH}: node {node.name!r} reads {target[:80]!r} and "
                       + ("holds a value of its own" if stored else "holds none"))
            if not constant and node.meta.get(MODULE) != target.rpartition(".")[0]:
                refuse(f"{GRAPH}: node {node.name!r} reads {target[:80]!r} from module "
                       f"{str(node.meta.get(MODULE))[:80]!r}")
            if not stored and GRAD in node.meta:
                refuse(f"{GRAPH}: node {node.name!r} records a gradient status without a value")
        elif not stored and node.op != "output" and not node.meta.get(NOT_STORED):
            recorded = [k for k in (SHAPE, DTYPE, GRAD) if k in node.meta]
            if recorded:
                refuse(f"{GRAPH}: node {node.name!r} records {', '.join(recorded)} but {TENSORS} holds no value "
                       "for it")


def _tensor_keys(doc: Any):
    """The ``{"__tensor__": key}`` keys in a JSON structure (already decoded once, so well formed)."""
    stack = [doc]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack.extend(obj)
        elif isinstance(obj, dict):
            for tag, value in obj.items():
                if tag == "__tensor__":
                    yield value
                else:
                    stack.append(value)




def _agrees(t: torch.Tensor, meta: dict[str, Any], what: str, refuse) -> None:
    """``t`` has the shape and dtype a node's metadata records (a quantized tensor is stored
    dequantized)."""
    shape, dtype = meta.get(SHAPE), meta.get(DTYPE)
    if not isinstance(shape, list) or not isinstance(dtype, str):
        refuse(f"{GRAPH} records no shape and dtype for the {what}")
    if list(t.shape) != shape:
        refuse(f"the {what} in {TENSORS} has shape {list(t.shape)}, {GRAPH} records {shape}")
    stored = dtype_name(t.dtype)
    if stored != dtype and not (dtype.startswith(("qint", "quint")) and t.is_floating_point()):
        refuse(f"the {what} in {TENSORS} is {stored}, {GRAPH} records {dtype}")


def _same_layout(t: torch.Tensor, of: torch.Tensor, what: str, other: str, refuse) -> None:
    if t.shape != of.shape or t.dtype != of.dtype:
        refuse(f"the {what} in {TENSORS} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, "
               f"{other} {str(of.dtype).removeprefix('torch.')} {list(of.shape)}")


def _same_leaves(leaves: list[torch.Tensor], expected: list[torch.Tensor], what: str, other: str, refuse) -> None:
    if len(leaves) != len(expected):
        refuse(f"{what} hold {len(leaves)} tensors, {other} are {len(expected)}")
    for i, (a, b) in enumerate(zip(leaves, expected)):
        if not _equal(a, b):
            refuse(f"{what} differ from {other} at tensor {i}")


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN equals NaN); views of the same bytes without reading them; a summary
    (``--keep summary``) by its hash."""
    if is_summary(a) or is_summary(b):
        return is_summary(a) and is_summary(b) and a.digest == b.digest
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0 or (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()):
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
