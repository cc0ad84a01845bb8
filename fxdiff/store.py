"""Save and load captures: a directory of JSON and safetensors, written atomically, never pickled.

Layout of a capture directory::

    manifest.json        format name and version, metadata, sizes and CRC32s of the files below
    graph.json           the FX graph (nodes, targets by qualified name, args, per-node meta),
                         plus the structure of the inputs and outputs
    tensors.safetensors  values, grads, params, param_grads, inputs and outputs

A capture written by one torch version loads in another: targets are stored by name and resolved
on load (an op missing from the reading torch becomes a named stand-in).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.fx

from . import tree
from .capture import FORMAT, TARGET, VERSION, Capture
from .errors import FxdiffError
from .record import resolve_target

MANIFEST, GRAPH, TENSORS = "manifest.json", "graph.json", "tensors.safetensors"
_SECTIONS = ("value", "grad", "param", "param_grad")


def save(capture: Capture, path: str | os.PathLike) -> Path:
    """Write ``capture`` to directory ``path`` atomically (a temporary directory, then a rename)."""
    from safetensors.torch import save as st_save

    path = Path(path)
    if path.exists() and not (path / MANIFEST).is_file():
        raise FxdiffError(f"{path}: exists and is not an fxdiff capture; refusing to overwrite it")
    tensors: dict[str, torch.Tensor] = {}
    for section, table in zip(_SECTIONS, (capture.values, capture.grads, capture.params, capture.param_grads)):
        for name, t in table.items():
            tensors[f"{section}/{name}"] = t
    graph_doc = {
        "nodes": [_node_to_json(n) for n in capture.graph.nodes],
        "inputs": tree.encode(capture.inputs, tensors, "input"),
        "outputs": tree.encode(capture.outputs, tensors, "output"),
    }
    blob = st_save({k: _storable(v) for k, v in tensors.items()},
                   metadata={"format": FORMAT, "dtypes": json.dumps(_complex_dtypes(tensors))})
    graph_bytes = json.dumps(graph_doc, separators=(",", ":")).encode()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "meta": capture.meta,
        "files": {
            GRAPH: {"bytes": len(graph_bytes), "crc32": zlib.crc32(graph_bytes)},
            TENSORS: {"bytes": len(blob), "crc32": zlib.crc32(blob)},
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        (tmp / GRAPH).write_bytes(graph_bytes)
        (tmp / TENSORS).write_bytes(blob)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path: str | os.PathLike) -> Capture:
    """Read a capture directory, checking format, version, sizes and checksums."""
    from safetensors.torch import load as st_load

    path = Path(path)
    manifest = _read_manifest(path)
    files = manifest.get("files", {})
    raw = {}
    for name in (GRAPH, TENSORS):
        file = path / name
        if not file.is_file():
            raise FxdiffError(f"{file}: missing; the capture is incomplete")
        data = file.read_bytes()
        expected = files.get(name, {})
        if len(data) != expected.get("bytes"):
            raise FxdiffError(f"{file}: {len(data)} bytes, manifest says {expected.get('bytes')}; "
                              "the capture is truncated or was edited")
        if zlib.crc32(data) != expected.get("crc32"):
            raise FxdiffError(f"{file}: checksum mismatch; the capture was modified after it was written")
        raw[name] = data
    try:
        doc = json.loads(raw[GRAPH])
        tensors = st_load(raw[TENSORS])
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
        raise FxdiffError(f"{path}: unreadable capture data ({type(e).__name__}: {e})") from None
    tensors = _restore_complex(tensors, raw[TENSORS])
    tables: dict[str, dict[str, torch.Tensor]] = {s: {} for s in _SECTIONS}
    for key, t in tensors.items():
        section, _, name = key.partition("/")
        if section in tables:
            tables[section][name] = t
    try:
        graph = _graph_from_json(doc["nodes"])
        inputs = tree.decode(doc["inputs"], tensors)
        outputs = tree.decode(doc["outputs"], tensors)
    except (KeyError, TypeError, IndexError) as e:
        raise FxdiffError(f"{path / GRAPH}: malformed graph ({type(e).__name__}: {e})") from None
    return Capture(graph=graph, values=tables["value"], grads=tables["grad"], params=tables["param"],
                   param_grads=tables["param_grad"], inputs=inputs, outputs=outputs,
                   meta=manifest.get("meta", {}))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a capture, without reading its tensors."""
    return _read_manifest(Path(path)).get("meta", {})


def is_capture(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a capture manifest."""
    return (Path(path) / MANIFEST).is_file()


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FxdiffError(f"{path}: not a capture directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise FxdiffError(f"{path}: no {MANIFEST}; not an fxdiff capture") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FxdiffError(f"{path / MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FxdiffError(f"{path / MANIFEST}: format is not {FORMAT!r}")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise FxdiffError(f"{path}: capture format version {version}; this fxdiff reads up to {VERSION}")
    return manifest


def _storable(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous()


def _complex_dtypes(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items() if t.is_complex()]


def _restore_complex(tensors: dict[str, torch.Tensor], blob: bytes) -> dict[str, torch.Tensor]:
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8:8 + header_len]).get("__metadata__", {})
    for key in json.loads(meta.get("dtypes", "[]")):
        tensors[key] = torch.view_as_complex(tensors[key])
    return tensors


# -- graph <-> JSON ---------------------------------------------------------------------------

def _node_to_json(node: torch.fx.Node) -> dict[str, Any]:
    return {
        "name": node.name,
        "op": node.op,
        "target": node.meta.get(TARGET) if node.op == "call_function" else str(node.target),
        "args": _arg_to_json(node.args),
        "kwargs": _arg_to_json(node.kwargs),
        "meta": {k: v for k, v in node.meta.items() if k.startswith("fxdiff_")},
    }


def _arg_to_json(a: Any) -> Any:
    if isinstance(a, torch.fx.Node):
        return {"node": a.name}
    if isinstance(a, bool) or a is None or isinstance(a, (int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, tuple):
        return {"tuple": [_arg_to_json(v) for v in a]}
    if isinstance(a, list):
        return [_arg_to_json(v) for v in a]
    if isinstance(a, dict):
        return {"dict": {k: _arg_to_json(v) for k, v in a.items()}}
    if isinstance(a, slice):
        return {"slice": [_arg_to_json(v) for v in (a.start, a.stop, a.step)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, complex):
        return {"complex": [a.real, a.imag]}
    return {"repr": str(a)}


def _arg_from_json(a: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    if isinstance(a, list):
        return [_arg_from_json(v, nodes) for v in a]
    if not isinstance(a, dict):
        return a
    (tag, v), = a.items()
    if tag == "node":
        return nodes[v]
    if tag == "tuple":
        return tuple(_arg_from_json(x, nodes) for x in v)
    if tag == "dict":
        return {k: _arg_from_json(x, nodes) for k, x in v.items()}
    if tag == "slice":
        return slice(*(_arg_from_json(x, nodes) for x in v))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        return float(v)
    if tag == "dtype":
        return getattr(torch, v, v)
    if tag == "device":
        return torch.device(v)
    if tag == "complex":
        return complex(*v)
    return v  # "repr": kept as its text


def _graph_from_json(docs: list[dict[str, Any]]) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for d in docs:
        args = _arg_from_json(d["args"], nodes)
        kwargs = _arg_from_json(d["kwargs"], nodes)
        if d["op"] == "output":
            node = graph.output(args[0])
        else:
            target = resolve_target(d["target"]) if d["op"] == "call_function" else d["target"]
            node = graph.create_node(d["op"], target, tuple(args), kwargs, name=d["name"])
            if node.name != d["name"]:
                raise FxdiffError(f"duplicate node name {d['name']!r} in capture graph")
        node.meta.update(d.get("meta", {}))
        nodes[d["name"]] = node
    return graph
