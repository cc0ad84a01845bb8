"""Save and load captures: a directory of JSON and safetensors, written atomically, never pickled.

Layout of a capture directory::

    manifest.json        format name and version, metadata, sizes and CRC32s of the files below
    graph.json           the FX graph (nodes, targets by qualified name, args, per-node meta),
                         plus the structure of the inputs and outputs
    tensors.safetensors  values, grads, params, param_grads, inputs and outputs: one byte blob per
                         storage, and in its metadata how each tensor views its blob

A capture written by one torch version loads in another: targets are stored by name and resolved
on load (an op missing from the reading torch becomes a named stand-in). Loaded tensors that shared
storage when they were saved (a value and its transpose) share it again.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import json
import math
import mmap
import os
import shutil
import tempfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.fx

from . import tree
from .capture import FORMAT, TARGET, VERSION, Capture
from .errors import FxdiffError
from .record import gc_paused, resolve_target

MANIFEST, GRAPH, TENSORS = "manifest.json", "graph.json", "tensors.safetensors"
_SECTIONS = ("value", "grad", "param", "param_grad")


@gc_paused()
def save(capture: Capture, path: str | os.PathLike) -> Path:
    """Write ``capture`` to directory ``path`` atomically (a temporary directory, then a rename)."""
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
    graph_bytes = json.dumps(graph_doc, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        (tmp / GRAPH).write_bytes(graph_bytes)
        size, crc = _write_tensors(tmp / TENSORS, tensors)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "meta": capture.meta,
            "files": {
                GRAPH: {"bytes": len(graph_bytes), "crc32": zlib.crc32(graph_bytes)},
                TENSORS: {"bytes": size, "crc32": crc},
            },
        }
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


def _write_tensors(file: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Write ``tensors`` as a safetensors file of byte blobs, one per storage; return (bytes, CRC32).

    Views share storage (``x.view``, ``x.t()``, a gradient passed on unchanged), so each storage's
    bytes are written once, as the span its tensors cover, and ``__metadata__["views"]`` says how
    to rebuild each tensor from its blob: ``[blob, dtype, shape, stride, byte offset]``. Nothing is
    copied to make a tensor contiguous.
    """
    spans: dict[tuple[str, int], list] = {}  # storage -> [first byte, end byte, storage]
    views = {}
    for key, t in tensors.items():
        if t.layout != torch.strided or t.device.type == "meta":
            raise FxdiffError(f"cannot store {key}: a {t.layout} tensor on {t.device} holds no plain data")
        storage = t.untyped_storage()
        size = t.element_size()
        first = t.storage_offset() * size
        extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0
        sid = (str(t.device), storage.data_ptr())
        span = spans.setdefault(sid, [first, first + extent * size, storage])
        span[0], span[1] = min(span[0], first), max(span[1], first + extent * size)
        views[key] = [sid, str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride()), first]
    header: dict[str, Any] = {}
    offset = 0
    for i, span in enumerate(spans.values()):
        span[0] -= span[0] % _ALIGN  # every dtype's size divides it, so views stay aligned in their blob
        header[f"storage/{i}"] = {"dtype": "U8", "shape": [span[1] - span[0]],
                                  "data_offsets": [offset, offset + span[1] - span[0]]}
        offset += span[1] - span[0]
    index = {sid: i for i, sid in enumerate(spans)}
    for view in views.values():
        view[4] -= spans[view[0]][0]
        view[0] = index[view[0]]
    header["__metadata__"] = {"format": FORMAT, "views": json.dumps(views, separators=(",", ":"))}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with _Writer(file) as out:
        out.write(memoryview(len(head).to_bytes(8, "little") + head))
        for first, end, storage in spans.values():
            out.write(_span_bytes(storage, first, end))
    return out.size, out.crc


_ALIGN = 16


def _span_bytes(storage: torch.UntypedStorage, first: int, end: int) -> memoryview:
    """Bytes ``first:end`` of ``storage``, read in place on the CPU (copied from other devices)."""
    if end == first:
        return memoryview(b"")
    if storage.device.type == "cpu":  # the capture keeps the storage alive while this is read
        return memoryview((ctypes.c_char * (end - first)).from_address(storage.data_ptr() + first)).cast("B")
    span = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, first, (end - first,), (1,))
    return memoryview(span.cpu().numpy()).cast("B")


class _Writer:
    """Sequential file writer: the caller computes the CRC32 and copies into page-aligned buffers
    while a background thread writes the full ones.

    Where the file system allows it, writes bypass the page cache (``O_DIRECT``): a capture is
    written once and read later, and where fresh memory is slow to fault in (virtual machines),
    filling the page cache costs more than the disk does. (Writing chunks from two threads at
    their offsets was measured slower: the disk prefers one sequential stream.)
    """

    CHUNK = 1 << 23
    ALIGN = 4096
    BUFFERS = 3

    def __init__(self, file: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd = os.open(file, flags | getattr(os, "O_DIRECT", 0), 0o666)
        except OSError:
            self.fd = os.open(file, flags, 0o666)
        self.size = 0
        self.crc = 0
        self._free = [mmap.mmap(-1, self.CHUNK) for _ in range(self.BUFFERS)]
        self._buf, self._fill = self._free.pop(), 0
        self._writes = ThreadPoolExecutor(1)
        self._pending: collections.deque[tuple[Future, mmap.mmap]] = collections.deque()

    def write(self, data: memoryview) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        while len(data):
            n = min(len(data), self.CHUNK - self._fill)
            self._buf[self._fill:self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == self.CHUNK:
                self._flush()

    def _flush(self) -> None:
        fill, length = self._fill, self._fill + (-self._fill % self.ALIGN)  # O_DIRECT writes whole blocks
        self._buf[fill:length] = bytes(length - fill)
        self._pending.append((self._writes.submit(self._write_all, memoryview(self._buf)[:length]), self._buf))
        if not self._free:
            written, buf = self._pending.popleft()
            written.result()
            self._free.append(buf)
        self._buf, self._fill = self._free.pop(), 0

    def _write_all(self, view: memoryview) -> None:
        direct = getattr(os, "O_DIRECT", 0)
        while len(view):
            try:
                view = view[os.write(self.fd, view):]
            except OSError as e:
                if e.errno != errno.EINVAL or not fcntl.fcntl(self.fd, fcntl.F_GETFL) & direct:
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~direct)  # refused here

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._fill:
                self._flush()
            for written, _ in self._pending:
                if exc_type is None:
                    written.result()
                else:
                    written.exception()  # wait; the error being raised already says what went wrong
            if exc_type is None:
                os.ftruncate(self.fd, self.size)  # drop the padding of the last block
        finally:
            self._writes.shutdown()
            os.close(self.fd)


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
        blobs = st_load(raw[TENSORS])
        header = json.loads(raw[TENSORS][8:8 + int.from_bytes(raw[TENSORS][:8], "little")])
        meta = header.get("__metadata__", {})
        tensors = _rebuild(blobs, json.loads(meta["views"]))
    except FxdiffError:
        raise
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
        raise FxdiffError(f"{path / TENSORS}: unreadable capture data ({type(e).__name__}: {e})") from None
    tables: dict[str, dict[str, torch.Tensor]] = {s: {} for s in _SECTIONS}
    for key, t in tensors.items():
        section, _, name = key.partition("/")
        if section in tables:
            tables[section][name] = t
    try:
        graph = _graph_from_json(doc["nodes"])
        inputs = tree.decode(doc["inputs"], tensors)
        outputs = tree.decode(doc["outputs"], tensors)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
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
    if not isinstance(version, int) or version != VERSION:
        raise FxdiffError(f"{path}: capture format version {version}; this fxdiff reads version {VERSION} "
                          f"(capture again)")
    return manifest


def _rebuild(blobs: dict[str, torch.Tensor], views: dict[str, list]) -> dict[str, torch.Tensor]:
    """The tensors that ``views`` describes, as views of their storage blobs."""
    tensors = {}
    for key, (blob, dtype_name, shape, stride, first) in views.items():
        dtype = getattr(torch, str(dtype_name), None)
        data = blobs.get(f"storage/{blob}")
        if data is not None and data.storage_offset() % _ALIGN:
            data = blobs[f"storage/{blob}"] = data.clone()
        if not isinstance(dtype, torch.dtype) or data is None or first < 0 or min(shape + stride + [0]) < 0:
            raise FxdiffError(f"tensor {key} has an invalid layout {[blob, dtype_name, shape, stride, first]}")
        size = dtype.itemsize
        extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if math.prod(shape) else 0
        if first % size or first + extent * size > data.numel():
            raise FxdiffError(f"tensor {key} reaches past the end of its storage blob")
        if not extent:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        tensors[key] = data[first:first + extent * size].view(dtype).as_strided(shape, stride)
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
