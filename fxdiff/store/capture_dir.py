"""Save and load captures: a directory of JSON and safetensors, written atomically, never pickled.

Layout of a capture directory::

    manifest.json        format name and version, metadata, sizes and digests of the files below
    graph.json           the FX graph (see ``graph_json.py``) and the structure of inputs and outputs
    tensors.safetensors  values, grads, params, param_grads, inputs, outputs and output gradients
                         (see ``tensor_file.py``)

A capture written by one torch version loads in another. Writing holds a lock beside the
directory (a second writer to the same path is refused; ``writing`` holds it for longer, as the
CLI's ``capture`` does), builds the capture in a temporary directory and swaps it into place in one
step, so a reader or a kill sees the old capture or the new one, never neither (where the swap
takes two renames, a reader finds the old one at ``.NAME.old`` between them); temporary
directories left by killed writers are removed by the next writer. Loading validates everything
before use (``graph_json.py``, ``tensor_file.py``, ``consistency.py``) and reads only regular files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import tree
from ..digest import MANIFEST, TENSORS, check_later
from ..errors import FxdiffError
from ..model.capture import FORMAT, READABLE_VERSIONS, VERSION, Capture
from ..targets import Targets
from ..util import atomic_write, dumps, gc_paused, json_bytes, libc, read_regular
from . import consistency
from .graph_json import graph_from_json, node_to_json
from .summary import GRAD_SUMMARY, VALUE_SUMMARY, Summary, is_summary
from .summary import from_json as summary_from_json, to_json as summary_to_json
from .tensor_file import read_tensors, write_tensors

GRAPH = "graph.json"
SUMMARIES = "summaries"   # graph.json: the summaries of tensors that have no node, by section and name
# parameters and their gradients; a summary capture's large outputs (by tensor key) and their gradients
_NAMED_SUMMARIES = ("param", "param_grad", "output", "output_grad")
PARTIAL_VERSION = 4   # what captures that keep less than every value and gradient are written as
_SECTIONS = ("value", "grad", "param", "param_grad", "output_grad")


def save(capture: Capture, path: str | os.PathLike, targets: Targets | None = None) -> Path:
    """Write ``capture`` to directory ``path``, replacing a capture already there in one step."""
    path = Path(path)
    targets = targets or Targets.default()
    if path.exists() and not (path / MANIFEST).is_file():
        raise FxdiffError(f"{path}: exists and is not an fxdiff capture; refusing to overwrite it")
    contents = _contents(capture, targets)
    with writing(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            (tmp / GRAPH).write_bytes(contents.graph_bytes)
            size, digest = write_tensors(tmp / TENSORS, contents.tensors)
            _complete(tmp, path, capture, contents.graph_bytes, size, {"xxh3_64": digest}, contents.partial)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FxdiffError(f"{path}: cannot write the capture ({e.strerror or e})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


@dataclasses.dataclass
class _Contents:
    """What a capture directory holds, ready to write."""

    tensors: dict[str, torch.Tensor]   # by key; a summary's sample in its place
    summaries: dict[str, Summary]      # the summaries whose samples ``tensors`` holds, by the same key
    doc: dict[str, Any]                # graph.json's document
    graph_bytes: bytes
    partial: bool                      # keeps less than every tensor: format version 4


def _contents(capture: Capture, targets: Targets, streamed: set[str] = frozenset()) -> _Contents:
    """The contents of ``capture``'s directory; keys in ``streamed`` are already in the file."""
    tensors = {key: t for key, t in _keyed(capture) if key not in streamed}
    with gc_paused():
        graph_doc = {
            "inputs": tree.encode(capture.inputs, tensors, "input"),
            "outputs": tree.encode(capture.outputs, tensors, "output"),
        }
        summaries = {key: t for key, t in tensors.items() if is_summary(t) and not key.startswith("input.")}
        for key, t in summaries.items():   # its sample as the tensor, its statistics in graph.json
            tensors[key] = t.sample
        docs = {tuple(key.split("/", 1)) if "/" in key else ("output", key): summary_to_json(t)
                for key, t in summaries.items()}
        graph_doc = {"nodes": [_with_summaries(node_to_json(n, targets), docs) for n in capture.graph.nodes],
                     **graph_doc}
    by_name = {section: {name: doc for (s, name), doc in docs.items() if s == section}
               for section in _NAMED_SUMMARIES}
    if any(by_name.values()):
        graph_doc[SUMMARIES] = {section: docs for section, docs in by_name.items() if docs}
    # partial captures (capture --keep values/grads/summary) are version 4: a version-3 reader
    # would take a missing or summarised tensor for a difference
    partial = bool(summaries) or capture.meta.get("keep", "both") != "both"
    return _Contents(tensors, summaries, graph_doc, json_bytes(graph_doc), partial)


def _keyed(capture: Capture) -> Iterator[tuple[str, torch.Tensor]]:
    """The capture's values, gradients, parameters and their gradients by file key (``value/NAME``...)."""
    tables = (capture.values, capture.grads, capture.params, capture.param_grads, capture.output_grads)
    for section, table in zip(_SECTIONS, tables):
        for name, t in table.items():
            yield f"{section}/{name}", t


def _format_version(partial: bool, digest: dict[str, Any]) -> int:
    """A capture's format version: 4 for one that keeps less than every tensor (``partial``) or was
    written while its model ran (its tensor file's ``digest`` is two digests), 3 otherwise."""
    return PARTIAL_VERSION if partial or "xxh3_64_header" in digest else VERSION


def _complete(tmp: Path, path: Path, capture: Capture, graph_bytes: bytes, size: int, digest: dict[str, Any],
              partial: bool) -> dict[str, Any]:
    """Write the manifest into ``tmp`` and swap ``tmp`` in at ``path`` (the write lock held); returns
    the metadata as written."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    manifest = {
        "format": FORMAT,
        "version": _format_version(partial, digest),
        "meta": capture.meta,
        "files": {
            GRAPH: {"bytes": len(graph_bytes), "xxh3_64": _digest(graph_bytes)},
            TENSORS: {"bytes": size, **digest},
        },
    }
    text = dumps(manifest, indent=1, default=str)
    atomic_write(tmp / MANIFEST, text)
    _swap_in(tmp, path)
    return json.loads(text)["meta"]


def _finish_streamed(stream, capture: Capture, targets: Targets | None) -> Capture:
    """Complete a capture whose values and gradients ``stream`` (``stream.CaptureStream``) wrote
    during the run: the remaining tensors, the header, the graph and the manifest. Returns
    ``capture`` with its tensors memory-mapped from the file written (its summaries as they are:
    their samples are small) and its metadata as written."""
    targets = targets or Targets.default()
    try:
        # the parameters and their gradients are copied while the graph is written out (nothing
        # writes to them any more: the deferred copies need no protect)
        written = stream.tensors._views   # most went early: the parameters before the run, their gradients in backward
        for section, table in (("param", capture.params), ("param_grad", capture.param_grads)):
            for name, t in table.items():
                if f"{section}/{name}" not in written and not is_summary(t):
                    stream.put(f"{section}/{name}", t, defer=True)
        stream.tensors.wake()
        contents = _contents(capture, targets, set(stream.tensors._views))
        stream.tensors.put_all(contents.tensors)
        views = stream.tensors._views   # in the capture's order, as save() writes them
        stream.tensors._views = {**{k: views[k] for k, _ in _keyed(capture) if k in views}, **views}
        (stream.tmp / GRAPH).write_bytes(contents.graph_bytes)
        size, digest = stream.tensors.close()
        meta = _complete(stream.tmp, stream.path, capture, contents.graph_bytes, size, digest, contents.partial)
        mapped = stream.tensors.mapped(stream.path / TENSORS, skip=contents.summaries)
    except OSError as e:
        raise FxdiffError(f"{stream.path}: cannot write the capture ({e.strerror or e})") from None
    tables = _tables({**mapped, **contents.summaries})
    inputs = tree.decode(contents.doc["inputs"], tables["input"])
    outputs = tree.decode(contents.doc["outputs"], tables["output"])
    return Capture(graph=capture.graph, values=tables["value"], grads=tables["grad"], params=tables["param"],
                   param_grads=tables["param_grad"], inputs=inputs, outputs=outputs,
                   output_grads=tables["output_grad"], meta=meta)


def load(path: str | os.PathLike, targets: Targets | None = None) -> Capture:
    """Read and validate a capture directory; its tensors are memory-mapped, not copied."""
    return _load(Path(path), targets, verify=True)


def load_deferred(path: str | os.PathLike, targets: Targets | None = None) -> tuple[Capture, Callable[[], None]]:
    """``load``, with the digest of the tensor file checked in a thread meanwhile: returns the
    capture and a function that waits for the check and raises ``FxdiffError`` if it failed.
    Call it before anything read from the capture is reported."""
    path = Path(path)
    try:
        capture, (file, expected) = _load(path, targets, verify=False)
    except FxdiffError:
        _load(path, targets, verify=True)   # a modified file says so first, as load() does
        raise
    return capture, check_later(file, expected)


def _load(path: Path, targets: Targets | None, verify: bool):
    if not str(path):
        raise FxdiffError("capture path is empty")
    path = _readable(path)
    manifest = _read_manifest(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(files.get(f), dict) for f in (GRAPH, TENSORS)):
        raise FxdiffError(f"{path / MANIFEST}: no sizes and digests of {GRAPH} and {TENSORS}")
    graph_file = path / GRAPH
    if not os.path.lexists(graph_file):
        raise FxdiffError(f"{graph_file}: missing; the capture is incomplete")
    raw = read_regular(graph_file)
    expected = files[GRAPH]
    if len(raw) != expected.get("bytes"):
        raise FxdiffError(f"{graph_file}: {len(raw)} bytes, manifest says {expected.get('bytes')}; "
                          "the capture is truncated or was edited")
    if not _digest_ok(raw, expected):
        raise FxdiffError(f"{graph_file}: checksum mismatch; the capture was modified after it was written")
    if not isinstance(files[TENSORS].get("bytes"), int):
        raise FxdiffError(f"{path / MANIFEST}: no size for {TENSORS}")
    tensors = read_tensors(path / TENSORS, files[TENSORS]["bytes"], files[TENSORS], verify=verify)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FxdiffError(f"{graph_file}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(doc, dict):
        raise FxdiffError(f"{graph_file}: expected an object with nodes, inputs and outputs")
    graph = graph_from_json(doc.get("nodes"), targets or Targets.default(), graph_file)
    tables = _tables(tensors)
    for node in graph.nodes:
        for section, key in (("value", VALUE_SUMMARY), ("grad", GRAD_SUMMARY)):
            if key in node.meta and node.name in tables[section]:
                tables[section][node.name] = summary_from_json(node.meta[key], tables[section][node.name],
                                                               f"{graph_file}: node {node.name!r}")
    _named_summaries(doc, tables, graph_file)
    if not {"inputs", "outputs"} <= set(doc):
        raise FxdiffError(f"{graph_file}: expected an object with nodes, inputs and outputs")
    try:   # each structure reads tensors of its own section only
        inputs = tree.decode(doc["inputs"], tables["input"])
        outputs = tree.decode(doc["outputs"], tables["output"])
    except FxdiffError as e:
        raise FxdiffError(f"{graph_file}: {e}") from None
    except RecursionError:
        raise FxdiffError(f"{graph_file}: inputs or outputs nested too deeply") from None
    if not (isinstance(inputs, dict) and set(inputs) <= {"args", "kwargs"}
            and isinstance(inputs.get("args", ()), (list, tuple)) and isinstance(inputs.get("kwargs", {}), dict)):
        raise FxdiffError(f"{graph_file}: inputs are not {{'args': [...], 'kwargs': {{...}}}}")
    meta = manifest.get("meta", {})
    if not isinstance(meta, dict):
        raise FxdiffError(f"{path / MANIFEST}: meta is not a mapping")
    partial = meta.get("keep", "both") != "both" or any(map(is_summary, (t for table in tables.values()
                                                                       for t in table.values())))
    expected = _format_version(partial, files[TENSORS])
    if manifest["version"] >= 3 and manifest["version"] != expected:
        raise FxdiffError(f"{path / MANIFEST}: says version {manifest['version']}, but a capture "
                          + ("written while its model ran or keeping less" if expected == PARTIAL_VERSION else
                             "saved whole after its run") + f" is version {expected}")
    consistency.check(graph, tensors, tables, inputs, outputs, [doc["inputs"], doc["outputs"]], meta,
                      manifest["version"], path)
    capture = Capture(graph=graph, values=tables["value"], grads=tables["grad"], params=tables["param"],
                      param_grads=tables["param_grad"], inputs=inputs, outputs=outputs,
                      output_grads=tables["output_grad"], meta=meta)
    return capture if verify else (capture, (path / TENSORS, files[TENSORS]))


def _tables(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of a capture file by section: ``value``, ``grad``... by name (``value/NAME``), and
    the tensors of the inputs and outputs (``input``, ``output``) by key (``input.0``)."""
    tables: dict[str, dict[str, torch.Tensor]] = {s: {} for s in (*_SECTIONS, "input", "output")}
    for key, t in tensors.items():
        section, _, name = key.partition("/")
        if section in tables:
            tables[section][name] = t
        elif key.startswith(("input.", "output.")):
            tables[key.partition(".")[0]][key] = t
    return tables


def _named_summaries(doc: dict[str, Any], tables: dict[str, dict[str, torch.Tensor]], graph_file: Path) -> None:
    """Put the summaries ``graph.json`` lists by name (``SUMMARIES``) in place of their samples in ``tables``."""
    named = doc.get(SUMMARIES, {})
    if not (isinstance(named, dict) and set(named) <= set(_NAMED_SUMMARIES)
            and all(isinstance(v, dict) for v in named.values())):
        raise FxdiffError(f"{graph_file}: {SUMMARIES} is not a mapping of summaries by section and name")
    for section, docs in named.items():
        for name, summary in docs.items():
            if name not in tables[section]:
                raise FxdiffError(f"{graph_file}: a summary of {section} {str(name)[:80]!r}, which {TENSORS} does "
                                  "not hold; the capture is inconsistent")
            tables[section][name] = summary_from_json(summary, tables[section][name],
                                                      f"{graph_file}: {section} {name!r}")


def _with_summaries(doc: dict[str, Any], summaries: dict[tuple[str, str], dict]) -> dict[str, Any]:
    for section, key in (("value", VALUE_SUMMARY), ("grad", GRAD_SUMMARY)):
        found = summaries.get((section, doc["name"]))
        if found is not None:
            doc["meta"][key] = found
    return doc


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a capture, without reading its tensors."""
    meta = _read_manifest(_readable(Path(path))).get("meta", {})
    return meta if isinstance(meta, dict) else {}


def is_capture(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a capture manifest."""
    return (_readable(Path(path)) / MANIFEST).is_file()


def _readable(path: Path) -> Path:
    """Where the capture named ``path`` is: ``path``, or the old capture a writer killed between
    the two renames of a replace left at ``.NAME.old`` (read in place: only a writer, holding the
    lock, moves it back)."""
    if not path.name:   # "", ".", "/"
        return path
    old = path.with_name(f".{path.name}.old")
    if not os.path.lexists(path) and old.is_dir():
        return old
    return path


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FxdiffError(f"{path}: not a capture directory")
    file = path / MANIFEST
    if not os.path.lexists(file):
        raise FxdiffError(f"{path}: no {MANIFEST}; not an fxdiff capture")
    try:
        manifest = json.loads(read_regular(file))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FxdiffError(f"{file}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FxdiffError(f"{file}: format is not {FORMAT!r}")
    version = manifest.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise FxdiffError(f"{path}: capture format version {version!r}; this fxdiff reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))} (capture again with this fxdiff)")
    return manifest


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _digest(data: bytes | memoryview) -> str:
    import xxhash
    return xxhash.xxh3_64_hexdigest(data)


def _digest_ok(data: bytes, expected: dict[str, Any]) -> bool:
    if "xxh3_64" in expected:
        return _digest(data) == expected["xxh3_64"]
    import zlib
    return zlib.crc32(data) == expected.get("crc32")


# -- writing safely -----------------------------------------------------------------------------

_held: dict[str, int] = {}     # lock files this process holds -> the thread holding each
_held_guard = threading.Lock()


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of capture directory ``path`` for the block: another process, or
    another thread, that asks for it meanwhile is refused at once (``FxdiffError``). ``save``
    takes it too; inside the block the same thread saves without waiting on itself. The CLI holds
    it for a whole ``capture``, so a second capture to the same output is refused before it runs
    the model."""
    path = Path(path)
    key = os.path.abspath(path.with_name(f".{path.name}.lock"))
    with _held_guard:
        holder = _held.get(key)
    if holder == threading.get_ident():
        yield path
        return
    if holder is not None:
        raise FxdiffError(f"{path}: another fxdiff process is writing this capture right now")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FxdiffError(f"{path}: cannot create its folder ({e.strerror})") from None
    with _writing(path):
        with _held_guard:
            _held[key] = threading.get_ident()
        try:
            yield path
        finally:
            with _held_guard:
                _held.pop(key, None)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Hold the write lock of ``path`` (refusing when another process holds it), then clear what
    killed writers left behind."""
    lock_file = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise FxdiffError(f"{path}: cannot write here ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock_file).st_ino:  # its holder removed it as we opened it
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise FxdiffError(f"{path}: another fxdiff process is writing this capture right now") from None
        try:
            _clean(path)
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock_file)
    finally:
        os.close(fd)


def _clean(path: Path) -> None:
    """With the lock held: restore a capture a kill left half-replaced, remove stale temporaries."""
    _recover(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _recover(path: Path) -> None:
    """A kill between the two renames of a plain replace leaves the old capture under ``.NAME.old``."""
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        with contextlib.suppress(OSError):
            os.replace(old, path)


_RENAME_EXCHANGE = 2


def _swap_in(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` in one step; an existing capture there ends up at ``tmp`` and is removed."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = path.with_name(f".{path.name}.old")   # no atomic exchange here: two renames, recoverable
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unavailable."""
    renameat2 = getattr(libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0
