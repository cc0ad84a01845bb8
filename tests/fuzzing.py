"""A deterministic, seeded fuzzer for fxdiff: mutated captures, bad command lines, hostile
checkpoints and mutated reports, run in process through the click CLI and the Python API.

Everything here is driven by ``random.Random(seed)``: the same seed gives the same cases.

Vocabulary
----------
A :class:`Mutation` turns a copy of a good capture directory into a damaged one. It says

* ``kind``      -- the family, e.g. ``graph.drop_output`` or ``tensors.edit_param``;
* ``semantic``  -- True: the mutated capture no longer means what the good one meant, so
  ``fxdiff compare GOOD MUTATED`` must not exit 0; False: benign (same meaning), None: unknown
  (random byte flips with the checksum fixed: only crashes are counted);
* ``invalid``   -- True: the capture is inconsistent (a graph without output, a view that does not
  fit its blob, a node meta that disagrees with its tensor...), so ``fxdiff inspect`` and
  ``fxdiff.load`` must refuse it with a clear error;
* ``forbidden`` -- module names a mutated target refers to: importing them is code execution;
* ``marker``    -- a file a payload would create if fxdiff ran it.

Edits of graph.json / manifest.json / tensors.safetensors recompute the manifest's sizes and
digests (xxh3_64 in format version 3, CRC32 in version 2; unless the mutation is about the
checksum itself), so they reach the parser.

:func:`run_cli` runs one command line in process (``click.testing.CliRunner``) under a
``signal.alarm`` timeout and :func:`classify` names the outcome:

``clear_error``  exit 2, stderr one line ``fxdiff: error: ...``, no traceback
``usage``        exit 2 from click's own option parsing (``Usage: ... Error: ...``), no traceback
``verdict``      exit 0 or 1 where that is a legitimate answer
``unclear``      no traceback, but not one clear line either: exit 2 with a message over several
                 lines, or another exit code (user code calling ``sys.exit(5)`` passed through)
``internal``     exit 3 with a traceback (fxdiff says it has a bug: a crash site to fix)
``traceback``    an uncaught exception or traceback text with another exit code
``hang``         the per-case timeout fired
``silent``       bad input accepted: a semantic mutation compared as MATCH (exit 0), an invalid
                 capture inspected/loaded without complaint, a bad command line that exited 0/1
``executed``     a payload's marker file appeared or a module named by a mutated target got imported
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import sys
import tarfile
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

MANIFEST, GRAPH, TENSORS = "manifest.json", "graph.json", "tensors.safetensors"
OUTCOMES = ("clear_error", "usage", "verdict", "unclear", "internal", "traceback", "hang", "silent", "executed")
BAD = ("unclear", "internal", "traceback", "hang", "silent", "executed")

# ---------------------------------------------------------------------------------------------
# the model files: a tiny real transformer, plus builders, inputs and losses that misbehave

SPEC_SOURCE = r'''
"""Tiny model for the fxdiff fuzzer (written by tests/fuzzing.py)."""
import os
import sys

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d=16, h=2):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.h = h

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        s = (q @ k.transpose(-1, -2)) / (d // self.h) ** 0.5
        s = s.masked_fill(~mask[:, None, None, :], -1e9)
        a = s.softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff(x)


class Tiny(nn.Module):
    def __init__(self, width=16, blocks=2):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 5)

    def forward(self, feats, lengths):
        mask = torch.arange(feats.shape[1])[None, :] < lengths[:, None]
        x = self.inp(feats)
        for blk in self.blocks:
            x = blk(x, mask)
        return {"logits": self.head(x), "lengths": lengths}


def build():
    torch.manual_seed(0)
    return Tiny()


def build_big():
    """About 25 MB of parameters: a save slow enough to be killed in the middle."""
    torch.manual_seed(0)
    return Tiny(width=int(os.environ.get("FXDIFF_FUZZ_WIDTH", "768")), blocks=1)


def inputs():
    g = torch.Generator().manual_seed(1)
    return {"feats": torch.randn(2, 6, 8, generator=g), "lengths": torch.tensor([6, 4])}


def loss(out):
    return out["logits"].log_softmax(-1)[..., 0].mean()


# -- misbehaving user code --------------------------------------------------------------------

def build_raises():
    raise RuntimeError("the user's model builder failed")


def build_value_error():
    raise ValueError("bad config in the user's builder")


def build_oserror():
    open("/nonexistent/fxdiff-fuzz/weights.bin")


def build_recursion():
    def f(n):
        return f(n + 1)
    return f(0)


def build_not_module():
    return 42


def build_none():
    return None


def build_sys_exit():
    sys.exit(5)


def build_memory():
    raise MemoryError("user code ran out of memory")


def build_forward_raises():
    class Broken(nn.Module):
        def forward(self, feats, lengths):
            raise RuntimeError("forward failed in user code")
    return Broken()


def build_forward_assert():
    class Broken(nn.Module):
        def forward(self, feats, lengths):
            assert feats.shape[0] == 99, "user assertion"
    return Broken()


def build_wrong_signature():
    return nn.Linear(3, 3)


def build_takes_args(x):
    return nn.Linear(3, 3)


def inputs_raises():
    raise RuntimeError("the user's inputs function failed")


def inputs_oserror():
    open("/nonexistent/fxdiff-fuzz/batch.pt")


def inputs_int():
    return 7


def inputs_none():
    return None


def inputs_string():
    return "feats"


def inputs_wrong_keys():
    return {"nope": torch.zeros(1)}


def loss_raises(out):
    raise RuntimeError("the user's loss failed")


def loss_assert(out):
    assert out["logits"].shape[0] == 99, "the user's loss asserts"


def inputs_assert():
    assert False, "the user's inputs function asserts"


def loss_nograd(out):
    return out["logits"].detach().sum()


def loss_constant(out):
    return torch.tensor(1.0)


def loss_nonscalar(out):
    return out["logits"]


def loss_none(out):
    return None


def loss_string(out):
    return "loss"


def loss_int_tensor(out):
    return out["lengths"].sum()


def loss_key_error(out):
    return out["nope"]


def loss_takes_two(out, other):
    return out["logits"].sum()


NOT_CALLABLE = 3
'''

SYNTAX_ERROR_SOURCE = "def build(:\n    return 1\n"
IMPORT_ERROR_SOURCE = "import fxdiff_fuzz_no_such_module\n\ndef build():\n    return None\n"
RAISE_ON_IMPORT_SOURCE = "raise RuntimeError('module-level failure in user file')\n"


def write_specs(folder: Path) -> Path:
    """Write the spec files into ``folder``; return the path of the tiny model's file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fz_tiny.py").write_text(SPEC_SOURCE)
    (folder / "fz_syntax.py").write_text(SYNTAX_ERROR_SOURCE)
    (folder / "fz_importerror.py").write_text(IMPORT_ERROR_SOURCE)
    (folder / "fz_raises.py").write_text(RAISE_ON_IMPORT_SOURCE)
    return folder / "fz_tiny.py"


# ---------------------------------------------------------------------------------------------
# running the CLI in process

class CaseTimeout(BaseException):
    """Raised by the alarm: a BaseException, so ``except Exception`` in fxdiff does not swallow it."""


@dataclasses.dataclass
class Result:
    args: list[str]
    exit_code: int | None
    stdout: str
    stderr: str
    exception: BaseException | None
    tb: str
    seconds: float
    timed_out: bool = False


def _alarm(signum, frame):
    raise CaseTimeout()


@contextlib.contextmanager
def time_limit(seconds: float):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_cli(args: list[str], timeout: float = 30.0, env: dict | None = None) -> Result:
    """Run ``fxdiff ARGS`` in this process through click's test runner."""
    from click.testing import CliRunner

    from fxdiff.cli import main
    runner = CliRunner()
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            r = runner.invoke(main, args, catch_exceptions=True, env=env)
    except CaseTimeout:
        return Result(args, None, "", "", None, "", time.perf_counter() - start, timed_out=True)
    except BaseException as e:  # noqa: BLE001 -- KeyboardInterrupt, GeneratorExit ... from inside
        return Result(args, None, "", "", e, traceback.format_exc(), time.perf_counter() - start)
    exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    tb = "".join(traceback.format_exception(*r.exc_info)) if exc is not None and r.exc_info else ""
    stderr = r.stderr if hasattr(r, "stderr") else ""
    return Result(args, r.exit_code, r.stdout, stderr, exc, tb, time.perf_counter() - start)


def _has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text or re.search(r'File ".*", line \d+', text) is not None


def classify(res: Result, expect_error: bool, executed: bool = False) -> str:
    """The outcome of one CLI case; ``expect_error``: exit 0/1 would be accepting bad input."""
    if executed:
        return "executed"
    if res.timed_out:
        return "hang"
    text = res.stdout + res.stderr
    if res.exception is not None:
        return "traceback"
    if res.exit_code == 3 and _has_traceback(res.stderr):
        return "internal"
    if _has_traceback(text):
        return "traceback"
    if res.exit_code == 2:
        err = [ln for ln in res.stderr.splitlines() if ln.strip()]
        if len(err) == 1 and err[0].startswith("fxdiff: error:"):
            return "clear_error"
        if any(ln.startswith("Error:") for ln in err) and not _has_traceback(res.stderr):
            return "usage"
        return "unclear"   # exit 2 with something else than one clear line
    if res.exit_code in (0, 1):
        return "silent" if expect_error else "verdict"
    return "unclear"


def crash_site(res_or_exc) -> str:
    """``Type at file:line`` of the innermost fxdiff frame (else the innermost frame); for an
    exit 3, read from the traceback the CLI printed."""
    exc = res_or_exc.exception if isinstance(res_or_exc, Result) else res_or_exc
    if exc is None and isinstance(res_or_exc, Result) and _has_traceback(res_or_exc.stderr):
        return _printed_site(res_or_exc.stderr)
    if exc is None:
        return "-"
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/fxdiff/" in f.filename]
    f = (ours or frames or [None])[-1]
    where = f"{f.filename.split('/fxdiff/')[-1] if '/fxdiff/' in f.filename else f.filename}:{f.lineno}" if f else "?"
    if ours and "/fxdiff/" in f.filename:
        where = "fxdiff/" + where
    msg = str(exc).splitlines()[0][:80] if str(exc) else ""
    return f"{type(exc).__name__} at {where}" + (f" ({msg})" if msg else "")


def _printed_site(text: str) -> str:
    """``Type at file:line`` from a printed traceback: its innermost fxdiff frame and last line."""
    frames = re.findall(r'File "([^"]*)", line (\d+)', text)
    ours = [f for f in frames if "/fxdiff/" in f[0]]
    f = (ours or frames or [("?", "?")])[-1]
    where = ("fxdiff/" + f[0].split("/fxdiff/")[-1] if "/fxdiff/" in f[0] else f[0]) + f":{f[1]}"
    tb_lines = text.split("Traceback (most recent call last)")[-1].splitlines()
    exception_line = r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Iteration)\b"
    last = next((ln for ln in tb_lines if re.match(exception_line, ln)), "?")
    return f"{last.split(':')[0]} at {where}" + (f" ({last.partition(': ')[2][:80]})" if ": " in last else "")


class ModuleWatch:
    """Which modules named in ``names`` got imported during the block (they were absent before)."""

    def __init__(self, names: Iterable[str]):
        self.names = [n for n in names if n]
        self.before = {n for n in self.names if n in sys.modules}
        self.imported: list[str] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for n in self.names:
            if n in sys.modules and n not in self.before:
                self.imported.append(n)
                del sys.modules[n]   # so the next case can notice it again
        return False


# ---------------------------------------------------------------------------------------------
# reading and writing capture files

def crc(data: bytes) -> int:
    return zlib.crc32(data)


def xxh3(data: bytes) -> str:
    import xxhash
    return xxhash.xxh3_64_hexdigest(data)


DIGEST = "xxh3_64"   # the manifest's digest of each file (format version 3; version 2 had "crc32")


def fix_manifest(cap: Path) -> None:
    """Recompute sizes and digests in ``cap/manifest.json`` (when it is still a JSON dict): an
    entry's ``xxh3_64``, its two digests split at ``data_offset`` for a capture written while its
    model ran, or its ``crc32`` for a version-2 manifest."""
    mpath = cap / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except Exception:  # noqa: BLE001
        return
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return
    for name in (GRAPH, TENSORS):
        f = cap / name
        entry = manifest["files"].get(name)
        if isinstance(entry, dict) and f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            entry["bytes"] = len(data)
            if "crc32" in entry and DIGEST not in entry:
                entry["crc32"] = crc(data)
            elif "xxh3_64_header" in entry and isinstance(entry.get("data_offset"), int):   # written while the model ran
                split = min(8 + int.from_bytes(data[:8], "little"), len(data)) if len(data) >= 8 else 0
                entry["data_offset"] = split
                entry["xxh3_64_header"], entry["xxh3_64_data"] = xxh3(data[:split]), xxh3(data[split:])
            else:
                entry[DIGEST] = xxh3(data)
    mpath.write_text(json.dumps(manifest, indent=1))


def read_json(cap: Path, name: str) -> Any:
    return json.loads((cap / name).read_text())


def write_json(cap: Path, name: str, doc: Any, fix: bool = True) -> None:
    (cap / name).write_text(json.dumps(doc, separators=(",", ":")))
    if fix:
        fix_manifest(cap)


@dataclasses.dataclass
class Safetensors:
    header: dict
    data: bytes

    @classmethod
    def read(cls, file: Path) -> "Safetensors":
        raw = file.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        return cls(json.loads(raw[8:8 + n]), raw[8 + n:])

    @property
    def views(self) -> dict:
        return json.loads(self.header["__metadata__"]["views"])

    @views.setter
    def views(self, v: dict) -> None:
        self.header["__metadata__"]["views"] = json.dumps(v, separators=(",", ":"))

    def blob(self, i: int) -> bytearray:
        a, b = self.header[f"storage/{i}"]["data_offsets"]
        return bytearray(self.data[a:b])

    def blobs(self) -> list[bytearray]:
        n = sum(1 for k in self.header if k.startswith("storage/"))
        return [self.blob(i) for i in range(n)]

    def set_blobs(self, blobs: list[bytes | bytearray]) -> None:
        meta = self.header["__metadata__"]
        self.header = {}
        off = 0
        for i, b in enumerate(blobs):
            self.header[f"storage/{i}"] = {"dtype": "U8", "shape": [len(b)], "data_offsets": [off, off + len(b)]}
            off += len(b)
        self.header["__metadata__"] = meta
        self.data = b"".join(bytes(b) for b in blobs)

    def write(self, file: Path) -> None:
        head = json.dumps(self.header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        file.write_bytes(len(head).to_bytes(8, "little") + head + self.data)


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "complex64": 8}
_FMT = {"float64": "<d", "float32": "<f", "int64": "<q", "int32": "<i", "int16": "<h", "int8": "<b", "uint8": "<B"}


def _perturb(buf: bytearray, dtype: str, at: int) -> None:
    """Change the element at byte ``at`` of ``buf`` so that it surely compares different."""
    if dtype in _FMT:
        fmt = _FMT[dtype]
        size = struct.calcsize(fmt)
        (v,) = struct.unpack_from(fmt, buf, at)
        if dtype.startswith("float"):
            v = 0.0 if v != v or abs(v) == float("inf") else v + max(1.0, abs(v))
        else:
            v = v + 1 if v < (1 << (8 * size - 2)) else v - 1
            if dtype == "uint8":
                v %= 256
        struct.pack_into(fmt, buf, at, v)
    elif dtype == "bool":
        buf[at] = 0 if buf[at] else 1
    else:  # float16 / bfloat16: flip a high exponent bit pattern to a different finite number
        v = int.from_bytes(buf[at:at + 2], "little")
        buf[at:at + 2] = ((v ^ 0x3C00) if dtype == "float16" else (v ^ 0x3F80)).to_bytes(2, "little")


# ---------------------------------------------------------------------------------------------
# mutations of a capture

@dataclasses.dataclass
class Mutation:
    kind: str
    semantic: bool | None
    invalid: bool
    apply: Callable[[Path], None]
    detail: str = ""
    forbidden: tuple[str, ...] = ()
    marker: str | None = None
    needs_payload: str | None = None   # module source to drop on sys.path for import payloads

    @property
    def expect_error(self) -> bool:
        return self.invalid


EVIL_TARGETS = [  # (target, module that must not be imported or None when it is there already)
    ("os.system", None), ("builtins.eval", None), ("builtins.exec", None), ("subprocess.run", "subprocess"),
    ("this.x", "this"), ("__hello__.main", "__hello__"), ("__phello__.spam.main", "__phello__.spam"),
    ("http.server.test", "http.server"), ("smtplib.SMTP", "smtplib"), ("ftplib.FTP", "ftplib"),
    ("xmlrpc.server.SimpleXMLRPCServer", "xmlrpc.server"), ("wsgiref.simple_server.make_server", "wsgiref.simple_server"),
    ("pdb.set_trace", "pdb"), ("code.interact", "code"), ("pty.spawn", "pty"), ("tabnanny.check", "tabnanny"),
    ("zipapp.create_archive", "zipapp"), ("sqlite3.connect", "sqlite3"), ("mailbox.mbox", "mailbox"),
    ("imaplib.IMAP4", "imaplib"), ("poplib.POP3", "poplib"), ("shelve.open", "shelve"), ("dbm.open", "dbm"),
    ("getpass.getpass", "getpass"), ("webbrowser.get", "webbrowser"), ("shutil.rmtree", None),
    ("os.remove", None), ("builtins.open", None), ("builtins.__import__", None), ("pickle.loads", None),
    ("importlib.import_module", None), ("ctypes.CDLL", "ctypes"), ("nonexistent_pkg_fz.op", None),
    ("torch.nonexistent_op_fz", None), ("", None), ("torch", None), ("...", None), ("os.", None),
]


class CaptureModel:
    """What the mutators need to know about the good capture: node names, views, blobs..."""

    def __init__(self, good: Path):
        self.good = good
        self.manifest = read_json(good, MANIFEST)
        self.graph = read_json(good, GRAPH)
        self.st = Safetensors.read(good / TENSORS)
        self.views = self.st.views
        self.nodes = self.graph["nodes"]
        self.names = [n["name"] for n in self.nodes]
        self.calls = [i for i, n in enumerate(self.nodes) if n["op"] == "call_function"]
        self.out_index = next(i for i, n in enumerate(self.nodes) if n["op"] == "output")
        self.used = {a for n in self.nodes for a in _node_refs(n["args"]) + _node_refs(n["kwargs"])}
        self.sections: dict[str, list[str]] = {}
        for key in self.views:
            self.sections.setdefault(key.split("/")[0] if "/" in key else key.split(".")[0], []).append(key)


def _node_refs(a: Any) -> list[str]:
    if isinstance(a, list):
        return [r for x in a for r in _node_refs(x)]
    if isinstance(a, dict):
        if set(a) == {"node"}:
            return [a["node"]]
        return [r for x in a.values() for r in _node_refs(x)]
    return []


def _graph_edit(fn: Callable[[dict], None], fix: bool = True) -> Callable[[Path], None]:
    def apply(cap: Path) -> None:
        doc = read_json(cap, GRAPH)
        fn(doc)
        write_json(cap, GRAPH, doc, fix)
    return apply



def _manifest_edit(fn: Callable[[dict], Any]) -> Callable[[Path], None]:
    """``fn`` edits the manifest in place (returns None) or returns a replacement wrapped in a list."""
    def apply(cap: Path) -> None:
        doc = read_json(cap, MANIFEST)
        new = fn(doc)
        (cap / MANIFEST).write_text(json.dumps(doc if new is None else new[0], indent=1))
    return apply


def _tensor_edit(fn: Callable[[Safetensors], None]) -> Callable[[Path], None]:
    def apply(cap: Path) -> None:
        st = Safetensors.read(cap / TENSORS)
        fn(st)
        st.write(cap / TENSORS)
        fix_manifest(cap)
    return apply


def _raw_edit(name: str, fn: Callable[[bytearray], bytes | bytearray], fix: bool) -> Callable[[Path], None]:
    def apply(cap: Path) -> None:
        data = bytearray((cap / name).read_bytes())
        (cap / name).write_bytes(bytes(fn(data)))
        if fix:
            fix_manifest(cap)
    return apply


def _retype_values(rng: random.Random) -> Any:
    return rng.choice([None, 0, -1, 1.5, "x", "", [], {}, [1, 2], {"a": 1}, True, 2 ** 70, "9" * 50])


def _set_path(doc: Any, path: list, value: Any) -> None:
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def _del_path(doc: Any, path: list) -> None:
    for p in path[:-1]:
        doc = doc[p]
    del doc[path[-1]]


class Mutator:
    """Seeded generator of capture mutations against one good capture."""

    def __init__(self, good: Path, seed: int = 0, work: Path | None = None):
        self.m = CaptureModel(good)
        self.rng = random.Random(seed)
        self.work = work or good.parent
        self.families: list[tuple[str, Callable[[], Mutation]]] = [
            (name[4:], getattr(self, name)) for name in sorted(dir(self)) if name.startswith("mut_")]

    def generate(self, n: int) -> list[Mutation]:
        """``n`` mutations: every family once (in order), then families drawn at random."""
        out = []
        for i in range(n):
            name, fn = self.families[i] if i < len(self.families) else self.rng.choice(self.families)
            out.append(fn())
        return out

    # -- helpers -----------------------------------------------------------------------------
    def _call(self) -> int:
        return self.rng.choice(self.m.calls)

    def _used_call(self) -> int:
        return self.rng.choice([i for i in self.m.calls if self.m.names[i] in self.m.used])

    # -- raw bytes ---------------------------------------------------------------------------
    def mut_raw_flip(self) -> Mutation:
        name = self.rng.choice([MANIFEST, GRAPH, TENSORS])
        size = (self.m.good / name).stat().st_size
        at, bit = self.rng.randrange(size), 1 << self.rng.randrange(8)

        def flip(d):
            d[at] ^= bit
            return d
        # a flip in manifest.json can hit a meta field (benign) or a checksum digit (refused)
        return Mutation(f"raw.flip.{name}", True if name != MANIFEST else None, name != MANIFEST,
                        _raw_edit(name, flip, fix=False), f"byte {at} bit {bit}")

    def mut_raw_flip_crc_fixed(self) -> Mutation:
        name = self.rng.choice([GRAPH, TENSORS])
        size = (self.m.good / name).stat().st_size
        n = self.rng.choice([1, 1, 2, 8])
        spots = [(self.rng.randrange(size), 1 << self.rng.randrange(8)) for _ in range(n)]

        def flip(d):
            for at, bit in spots:
                d[at] ^= bit
            return d
        return Mutation(f"raw.flip_crc_fixed.{name}", None, False, _raw_edit(name, flip, fix=True), str(spots))

    def mut_raw_truncate(self) -> Mutation:
        name = self.rng.choice([MANIFEST, GRAPH, TENSORS])
        size = (self.m.good / name).stat().st_size
        keep = self.rng.choice([0, 1, 7, 8, size // 2, size - 1, self.rng.randrange(size)])
        fix = name != MANIFEST and self.rng.random() < 0.5
        return Mutation(f"raw.truncate{'_crc_fixed' if fix else ''}.{name}", True, True,
                        _raw_edit(name, lambda d: d[:keep], fix=fix), f"keep {keep}")

    def mut_raw_append(self) -> Mutation:
        name = self.rng.choice([GRAPH, TENSORS])
        junk = self.rng.choice([b"\x00", b" ", b"garbage", os.urandom(0) + bytes(range(256))])
        fix = self.rng.random() < 0.7
        # trailing whitespace after JSON is benign; anything else after the data is damage
        semantic = None if fix else True
        return Mutation(f"raw.append{'_crc_fixed' if fix else ''}.{name}", semantic, not fix,
                        _raw_edit(name, lambda d: d + junk, fix=fix), repr(junk[:8]))

    def mut_raw_empty(self) -> Mutation:
        name = self.rng.choice([MANIFEST, GRAPH, TENSORS])
        return Mutation(f"raw.empty.{name}", True, True, _raw_edit(name, lambda d: b"", fix=True))

    def mut_raw_not_utf8(self) -> Mutation:
        name = self.rng.choice([MANIFEST, GRAPH])
        return Mutation(f"raw.not_utf8.{name}", True, True,
                        _raw_edit(name, lambda d: b"\xff\xfe" + d[2:], fix=name == GRAPH))

    # -- manifest.json ----------------------------------------------------------------------
    def mut_manifest_delete(self) -> Mutation:
        path = self.rng.choice([["format"], ["version"], ["files"], ["files", GRAPH], ["files", TENSORS],
                                ["files", GRAPH, DIGEST], ["files", TENSORS, "bytes"]])
        return Mutation(f"manifest.delete.{'.'.join(path)}", True, True, _manifest_edit(lambda d: _del_path(d, path)))

    def mut_manifest_delete_meta(self) -> Mutation:
        return Mutation("manifest.delete.meta", False, False, _manifest_edit(lambda d: _del_path(d, ["meta"])))

    def mut_manifest_retype(self) -> Mutation:
        path = self.rng.choice([["format"], ["version"], ["files"], ["meta"], ["files", GRAPH],
                                ["files", TENSORS, DIGEST], ["files", GRAPH, "bytes"]])
        value = _retype_values(self.rng)
        # a retyped meta is not fatal in principle; everything else is
        invalid = path != ["meta"]
        return Mutation(f"manifest.retype.{'.'.join(path)}", True if invalid else None, invalid,
                        _manifest_edit(lambda d: _set_path(d, path, value)), repr(value))

    def mut_manifest_version(self) -> Mutation:
        own = self.m.manifest["version"]   # 3, or 4 for a capture written while its model ran
        v = self.rng.choice([x for x in (1, 3, 4, 0, -2, "3", 3.0, True, None, 2 ** 64) if not (type(x) is int and x == own)])
        return Mutation("manifest.version", True, True, _manifest_edit(lambda d: _set_path(d, ["version"], v)), repr(v))

    def mut_manifest_not_dict(self) -> Mutation:
        v = self.rng.choice([[], None, "fxdiff-capture", 2, [{"format": "fxdiff-capture", "version": 2}]])
        return Mutation("manifest.not_dict", True, True, _manifest_edit(lambda d: [v]), repr(v))

    def mut_manifest_meta_retype(self) -> Mutation:
        key = self.rng.choice(["loss", "model", "seed", "mode", "device", "dtype", "modules", "torch", "started"])
        value = _retype_values(self.rng)
        return Mutation(f"manifest.meta_retype.{key}", None, False,
                        _manifest_edit(lambda d: _set_path(d, ["meta", key], value)), repr(value))

    def mut_manifest_as_version2(self) -> Mutation:
        """The same capture described by a version-2 manifest (CRC32 digests): still readable."""
        def to_v2(d):
            d["version"] = 2
            for entry in d["files"].values():
                entry.pop(DIGEST, None)
                entry["crc32"] = 0
        def apply(cap):
            _manifest_edit(to_v2)(cap)
            fix_manifest(cap)
        return Mutation("manifest.as_version2", False, False, apply)

    def mut_manifest_extra_field(self) -> Mutation:
        return Mutation("manifest.extra_field", False, False,
                        _manifest_edit(lambda d: _set_path(d, ["x_fuzz"], {"a": [1, 2]})))

    def mut_manifest_huge_number(self) -> Mutation:
        path = self.rng.choice([["files", TENSORS, "bytes"], ["files", GRAPH, DIGEST]])
        v = self.rng.choice([10 ** 400, -1, 2 ** 63])
        return Mutation("manifest.huge_number", True, True, _manifest_edit(lambda d: _set_path(d, path, v)), repr(v))

    # -- graph.json: whole-graph edits ------------------------------------------------------
    def mut_graph_empty(self) -> Mutation:
        return Mutation("graph.empty", True, True, _graph_edit(lambda d: d.__setitem__("nodes", [])))

    def mut_graph_only_output(self) -> Mutation:
        return Mutation("graph.only_output", True, True,
                        _graph_edit(lambda d: d.__setitem__("nodes", [{**d["nodes"][-1], "args": {"tuple": [[]]}}])))

    def mut_graph_drop_output(self) -> Mutation:
        i = self.m.out_index
        return Mutation("graph.drop_output", True, True, _graph_edit(lambda d: d["nodes"].pop(i)))

    def mut_graph_duplicate_output(self) -> Mutation:
        i = self.m.out_index
        where = self.rng.choice(["end", "middle"])

        def f(d):
            out = copy.deepcopy(d["nodes"][i])
            out["name"] = "output_1"
            if where == "end":
                d["nodes"].append(out)
            else:
                d["nodes"].insert(len(d["nodes"]) // 2, {**out, "args": {"tuple": [[]]}})
        return Mutation(f"graph.duplicate_output.{where}", True, True, _graph_edit(f))

    def mut_graph_output_not_last(self) -> Mutation:
        i = self.m.out_index

        def f(d):
            out = d["nodes"].pop(i)
            d["nodes"].insert(len(d["nodes"]) - 3, out)
        return Mutation("graph.output_not_last", True, True, _graph_edit(f))

    def mut_graph_output_args(self) -> Mutation:
        i = self.m.out_index
        v = self.rng.choice([{"tuple": []}, {"tuple": [[]]}, {"tuple": [{"node": "nope"}]}, [], 3,
                             {"tuple": [[{"node": self.m.names[0]}]]}])
        # outputs pointing at an input instead of the head, or at nothing
        return Mutation("graph.output_args", True, True, _graph_edit(lambda d: d["nodes"][i].__setitem__("args", v)),
                        repr(v))

    def mut_graph_top_retype(self) -> Mutation:
        key = self.rng.choice(["nodes", "inputs", "outputs", None])
        v = _retype_values(self.rng)

        def f(d):
            if key is None:
                d.clear()
                d["nodes"] = v
            else:
                d[key] = v
        return Mutation(f"graph.top_retype.{key}", True, True, _graph_edit(f), repr(v))

    def mut_graph_top_delete(self) -> Mutation:
        key = self.rng.choice(["nodes", "inputs", "outputs"])
        return Mutation(f"graph.top_delete.{key}", True, True, _graph_edit(lambda d: d.pop(key)))

    def mut_graph_not_dict(self) -> Mutation:
        v = self.rng.choice([[], None, 1, "nodes"])

        def apply(cap):
            (cap / GRAPH).write_text(json.dumps(v))
            fix_manifest(cap)
        return Mutation("graph.not_dict", True, True, apply, repr(v))

    def mut_graph_deep_nesting(self) -> Mutation:
        depth = self.rng.choice([10_000, 100_000])
        i = self._call()

        def apply(cap):
            text = (cap / GRAPH).read_text()
            doc = json.loads(text)
            doc["nodes"][i]["kwargs"] = "@@DEEP@@"
            text = json.dumps(doc, separators=(",", ":")).replace('"@@DEEP@@"', "[" * depth + "]" * depth)
            (cap / GRAPH).write_text(text)
            fix_manifest(cap)
        return Mutation("graph.deep_nesting", True, True, apply, f"depth {depth}")

    def mut_graph_huge(self) -> Mutation:
        n = self.rng.choice([20_000, 50_000])
        i = self._call()

        def f(d):
            d["nodes"][i]["args"] = {"tuple": [{"node": self.m.names[0]}] * n}
        return Mutation("graph.huge_args", None, False, _graph_edit(f), f"{n} args")   # a size/time probe

    def mut_graph_reorder(self) -> Mutation:
        i = self._used_call()

        def f(d):
            node = d["nodes"].pop(i)
            d["nodes"].insert(0, node)   # before the nodes it reads
        return Mutation("graph.node_before_its_inputs", True, True, _graph_edit(f), self.m.names[i])

    def mut_graph_reformat(self) -> Mutation:
        def apply(cap):
            (cap / GRAPH).write_text(json.dumps(read_json(cap, GRAPH), indent=2))
            fix_manifest(cap)
        return Mutation("graph.reformat", False, False, apply)

    # -- graph.json: node edits ------------------------------------------------------------
    def mut_node_delete_field(self) -> Mutation:
        i = self.rng.choice(self.m.calls + [0, self.m.out_index])
        key = self.rng.choice(["name", "op", "target", "args", "kwargs"])
        return Mutation(f"node.delete_field.{key}", True, True,
                        _graph_edit(lambda d: d["nodes"][i].pop(key)), self.m.names[i])

    def mut_node_delete_meta(self) -> Mutation:
        i = self._call()
        key = self.rng.choice([None, "fxdiff_shape", "fxdiff_dtype", "fxdiff_grad", "fxdiff_module", "fxdiff_target"])

        def f(d):
            if key is None:
                d["nodes"][i].pop("meta")
            else:
                d["nodes"][i]["meta"].pop(key, None)
        return Mutation(f"node.delete_meta.{key}", None, key in ("fxdiff_shape", "fxdiff_dtype", "fxdiff_grad",
                                                                   "fxdiff_target"), _graph_edit(f), self.m.names[i])

    def mut_node_retype_field(self) -> Mutation:
        i = self.rng.choice(self.m.calls + [0, self.m.out_index])
        key = self.rng.choice(["name", "op", "target", "args", "meta"])
        v = _retype_values(self.rng)
        return Mutation(f"node.retype.{key}", True, True,
                        _graph_edit(lambda d: d["nodes"][i].__setitem__(key, v)), f"{self.m.names[i]} = {v!r}")

    def mut_node_not_dict(self) -> Mutation:
        i = self.rng.randrange(len(self.m.nodes))
        v = self.rng.choice([None, [], "node", 3])
        return Mutation("node.not_dict", True, True, _graph_edit(lambda d: d["nodes"].__setitem__(i, v)), repr(v))

    def mut_node_illegal_op(self) -> Mutation:
        i = self.rng.choice(self.m.calls + [0])
        op = self.rng.choice(["call_method2", "", "CALL_FUNCTION", "call_module", "root", "output ", "placeholder;",
                              "get_attr\x00", "import os"])
        # call_module is a legal fx op but a capture never holds one (no modules are stored)
        return Mutation("node.illegal_op", True, True, _graph_edit(lambda d: d["nodes"][i].__setitem__("op", op)),
                        repr(op))

    def mut_node_op_swap(self) -> Mutation:
        i = self._call()
        op = self.rng.choice(["placeholder", "get_attr", "output", "call_method"])
        return Mutation("node.op_swap", True, True, _graph_edit(lambda d: d["nodes"][i].__setitem__("op", op)),
                        f"{self.m.names[i]} -> {op}")

    def mut_node_evil_target(self) -> Mutation:
        i = self._call()
        target, module = self.rng.choice(EVIL_TARGETS)
        both = self.rng.random() < 0.5   # also rewrite the meta, so target and meta agree

        def f(d):
            d["nodes"][i]["target"] = target
            if both:
                d["nodes"][i]["meta"]["fxdiff_target"] = target
        return Mutation(f"node.evil_target{'.meta_too' if both else ''}", True, True, _graph_edit(f),
                        f"{self.m.names[i]} -> {target}", forbidden=(module,) if module else ())

    def mut_node_payload_target(self) -> Mutation:
        """A target naming a module next to the user's spec file: importing it runs its code."""
        i = self._call()
        tag = f"fz_payload_{self.rng.randrange(10 ** 9)}"
        marker = str(self.work / f"{tag}.marker")
        both = self.rng.random() < 0.5

        def f(d):
            d["nodes"][i]["target"] = f"{tag}.run"
            if both:
                d["nodes"][i]["meta"]["fxdiff_target"] = f"{tag}.run"
        return Mutation("node.payload_target", True, True, _graph_edit(f), f"{self.m.names[i]} -> {tag}.run",
                        forbidden=(tag,), marker=marker,
                        needs_payload=f"open({marker!r}, 'w').write('imported')\ndef run(*a, **k):\n"
                                      f"    open({marker!r}, 'w').write('called')\n")

    def mut_node_call_payload(self) -> Mutation:
        """A target rewritten to os.system / builtins.exec with a string argument and a diverging
        value, so that an isolated replay of the node would run the command."""
        i = self.rng.choice([i for i in self.m.calls if self.m.names[i] in self.m.used
                             and f"value/{self.m.names[i]}" in self.m.views])   # chunk holds no value
        marker = str(self.work / f"fz_call_{self.rng.randrange(10 ** 9)}.marker")
        target, arg = self.rng.choice([("os.system", f"touch {marker}"),
                                       ("builtins.exec", f"open({marker!r}, 'w').write('x')"),
                                       ("builtins.eval", f"open({marker!r}, 'w').write('x')"),
                                       ("subprocess.run", f"touch {marker}")])
        name = self.m.names[i]

        def apply(cap):
            doc = read_json(cap, GRAPH)
            node = doc["nodes"][i]
            node["target"] = node["meta"]["fxdiff_target"] = target
            node["args"] = {"tuple": [arg]} if target != "subprocess.run" else {"tuple": [arg]}
            node["kwargs"] = {"dict": {"shell": True}} if target == "subprocess.run" else {"dict": {}}
            write_json(cap, GRAPH, doc)
            _edit_view_bytes(cap, f"value/{name}", self.rng, detach=True)
        return Mutation("node.call_payload", True, True, apply, f"{name} -> {target}({arg!r})", marker=marker)

    def mut_node_target_other_op(self) -> Mutation:
        i = self._call()
        old = self.m.nodes[i]["target"]
        new = self.rng.choice([t for t in ("torch.add", "torch.sub", "torch.mul", "torch.Tensor.transpose",
                                           "torch.nn.functional.gelu", "torch.softmax") if t != old])
        both = self.rng.random() < 0.5

        def f(d):
            d["nodes"][i]["target"] = new
            if both:
                d["nodes"][i]["meta"]["fxdiff_target"] = new
        # target and meta disagreeing is an inconsistent capture; agreeing, another op that happens to
        # have produced the same value (only a replay could tell)
        return Mutation(f"node.target_other_op{'.meta_too' if both else ''}", None if both else True, not both,
                        _graph_edit(f),
                        f"{self.m.names[i]}: {old} -> {new}")

    def mut_node_kwargs_not_dict(self) -> Mutation:
        i = self._call()
        v = self.rng.choice([[1, 2], 3, "x", None, {"tuple": []}, {"tuple": [1]}, True])
        return Mutation("node.kwargs_not_dict", True, True,
                        _graph_edit(lambda d: d["nodes"][i].__setitem__("kwargs", v)), repr(v))

    def mut_node_args_not_tuple(self) -> Mutation:
        i = self._call()
        v = self.rng.choice([3, "x", None, {"dict": {}}, {"node": self.m.names[0]}, True])
        return Mutation("node.args_not_tuple", True, True,
                        _graph_edit(lambda d: d["nodes"][i].__setitem__("args", v)), repr(v))

    def mut_node_bad_tag(self) -> Mutation:
        i = self._call()
        v = self.rng.choice([{"node": 3}, {"node": None}, {"slice": [1]}, {"slice": 3}, {"dtype": "nope"},
                             {"dtype": "Tensor"}, {"device": "nope:0"}, {"complex": "x"}, {"float": "x"},
                             {"tuple": 3}, {"dict": []}, {"a": 1, "b": 2}, {}, {"unknown_tag": 1},
                             {"float": "1e999999"}, {"device": "cuda:99"}])
        # well-formed values of another meaning: the args no longer produce the stored value, which
        # only a replay could tell
        plausible = v in ({"unknown_tag": 1}, {"float": "1e999999"}, {"device": "cuda:99"})

        def f(d):
            d["nodes"][i]["args"] = {"tuple": d["nodes"][i]["args"].get("tuple", [])[:1] + [v]}
        return Mutation(f"node.bad_arg_tag{'.plausible' if plausible else ''}", None if plausible else True,
                        not plausible, _graph_edit(f), repr(v))

    def mut_node_module_path(self) -> Mutation:
        i = self._call()
        v = self.rng.choice([3, None, ["blocks", 0], {"a": 1}, 1.5, True, "[bold]rich markup[/]", "a" * 100000,
                             "[/]", "\x1b[31m"])
        invalid = not isinstance(v, str)
        return Mutation(f"node.module_path{'' if invalid else '.str'}", True if invalid else None, invalid,
                        _graph_edit(lambda d: d["nodes"][i]["meta"].__setitem__("fxdiff_module", v)),
                        repr(v)[:60])

    def mut_node_module_type(self) -> Mutation:
        i = self._call()
        v = self.rng.choice([3, None, ["x"], "[/]"])
        return Mutation("node.module_type", None, False,   # display only
                        _graph_edit(lambda d: d["nodes"][i]["meta"].__setitem__("fxdiff_module_type", v)), repr(v))

    def mut_node_ref_later(self) -> Mutation:
        i = self._call()
        later = self.rng.choice(self.m.names[i + 1:self.m.out_index] or [self.m.names[self.m.out_index - 1]])

        def f(d):
            args = d["nodes"][i]["args"]
            d["nodes"][i]["args"] = {"tuple": [{"node": later}] + list(args.get("tuple", []))[1:]}
        return Mutation("node.ref_later", True, True, _graph_edit(f), f"{self.m.names[i]} reads {later}")

    def mut_node_ref_missing(self) -> Mutation:
        i = self._call()
        ghost = self.rng.choice(["ghost", "", "output", "__init__", "0"])
        where = self.rng.choice(["args", "kwargs", "output"])

        def f(d):
            if where == "args":
                d["nodes"][i]["args"] = {"tuple": [{"node": ghost}]}
            elif where == "kwargs":
                d["nodes"][i]["kwargs"] = {"dict": {"input": {"node": ghost}}}
            else:
                d["nodes"][self.m.out_index]["args"] = {"tuple": [[{"node": ghost}]]}
        return Mutation(f"node.ref_missing.{where}", True, True, _graph_edit(f), ghost)

    def mut_node_ref_self(self) -> Mutation:
        i = self._call()
        return Mutation("node.ref_self", True, True,
                        _graph_edit(lambda d: d["nodes"][i].__setitem__("args", {"tuple": [{"node": self.m.names[i]}]})))

    def mut_node_delete(self) -> Mutation:
        i = self._used_call()
        return Mutation("node.delete_used", True, True, _graph_edit(lambda d: d["nodes"].pop(i)), self.m.names[i])

    def mut_node_duplicate(self) -> Mutation:
        i = self._call()
        return Mutation("node.duplicate", True, True,
                        _graph_edit(lambda d: d["nodes"].insert(i + 1, copy.deepcopy(d["nodes"][i]))), self.m.names[i])

    def mut_node_rename(self) -> Mutation:
        i = self._used_call()
        new = self.rng.choice(["renamed_fz", "", "output", "x y", "1abc", "a.b", self.m.names[0]])
        return Mutation("node.rename", True, True,
                        _graph_edit(lambda d: d["nodes"][i].__setitem__("name", new)), f"{self.m.names[i]} -> {new!r}")

    def mut_node_meta_shape(self) -> Mutation:
        i = self._call()
        old = self.m.nodes[i]["meta"].get("fxdiff_shape") or [1]
        v = self.rng.choice([list(reversed(old)) if len(set(old)) > 1 else old + [1], old[:-1], old + [2],
                             [x + 1 for x in old], [-1], "x", [1.5], [10 ** 30]])
        return Mutation("node.meta_shape", True, True,
                        _graph_edit(lambda d: d["nodes"][i]["meta"].__setitem__("fxdiff_shape", v)), f"{old} -> {v}")

    def mut_node_meta_dtype(self) -> Mutation:
        i = self._call()
        old = self.m.nodes[i]["meta"].get("fxdiff_dtype")
        v = self.rng.choice([d for d in ("float64", "int64", "bool", "float16", "nope", 3, None) if d != old])
        return Mutation("node.meta_dtype", True, True,
                        _graph_edit(lambda d: d["nodes"][i]["meta"].__setitem__("fxdiff_dtype", v)), f"{old} -> {v}")

    def mut_node_meta_grad(self) -> Mutation:
        i = self._call()
        old = self.m.nodes[i]["meta"].get("fxdiff_grad")
        v = {"recorded": "none", "none": "recorded"}.get(old, "recorded")
        return Mutation("node.meta_grad", True, True,
                        _graph_edit(lambda d: d["nodes"][i]["meta"].__setitem__("fxdiff_grad", v)), f"{old} -> {v}")

    def mut_node_name_weird(self) -> Mutation:
        i = self._call()
        v = self.rng.choice([3, None, ["a"], "\x00", "../../x", "a" * 10000])
        return Mutation("node.name_weird", True, True, _graph_edit(lambda d: d["nodes"][i].__setitem__("name", v)),
                        repr(v)[:40])

    def mut_node_placeholder_target(self) -> Mutation:
        v = self.rng.choice([3, None, "", "other_input"])
        bad = not (isinstance(v, str) and v)
        return Mutation(f"node.placeholder_target{'' if bad else '.renamed'}", True if bad else None, bad,
                        _graph_edit(lambda d: d["nodes"][0].__setitem__("target", v)), repr(v))

    def mut_node_get_attr_target(self) -> Mutation:
        idx = [i for i, n in enumerate(self.m.nodes) if n["op"] == "get_attr"]
        i = self.rng.choice(idx)
        other = self.m.nodes[idx[0] if i != idx[0] else idx[-1]]["target"]   # another parameter, never its own
        v = self.rng.choice(["nope.weight", 3, None, "", "__class__", other])
        return Mutation("node.get_attr_target", True, True,
                        _graph_edit(lambda d: d["nodes"][i].__setitem__("target", v)), f"{self.m.names[i]} -> {v!r}")

    def mut_graph_io_structure(self) -> Mutation:
        key = self.rng.choice(["inputs", "outputs"])
        v = self.rng.choice([{"__tensor__": "nope"}, {"__dict__": 3}, {"__tuple__": [{"__tensor__": 5}]},
                             {"__dict__": [["a"]]}, {"__weird__": 1}, {"__tensor__": "value/linear"},
                             {"__dict__": [["args", {"__tuple__": []}]]}, []])
        return Mutation(f"graph.io_structure.{key}", True, True,
                        _graph_edit(lambda d: d.__setitem__(key, v)), repr(v))

    def mut_graph_output_swap(self) -> Mutation:
        """The outputs structure points at another stored tensor: the recorded outputs change."""
        outs = [k for k in self.m.views if k.startswith("output.")]   # not output_grad/ (format 3)
        other = self.rng.choice([k for k in self.m.views if k.startswith("value/") and self.m.views[k][1] == "float32"])
        target = outs[0]

        def f(d):
            d["outputs"] = json.loads(json.dumps(d["outputs"]).replace(f'"{target}"', f'"{other}"'))
        return Mutation("graph.output_swap", True, False, _graph_edit(f), f"{target} -> {other}")

    # -- tensors.safetensors ------------------------------------------------------------------
    def _view_key(self, section: str) -> str:
        keys = [k for k in self.m.views if (k.startswith(section + "/") or k.startswith(section + "."))
                and self.m.views[k][2] and 0 not in self.m.views[k][2]]
        return self.rng.choice(keys)

    def mut_tensors_edit(self) -> Mutation:
        section = self.rng.choice(["param", "input", "value", "grad", "param_grad", "output"])
        key = self._view_key(section)
        detach = self.rng.random() < 0.5 or section in ("input", "output")
        seed = self.rng.randrange(10 ** 9)
        return Mutation(f"tensors.edit_{section}{'.detached' if detach else '.shared'}", True, False,
                        lambda cap: _edit_view_bytes(cap, key, random.Random(seed), detach), key)

    def mut_tensors_view_shape(self) -> Mutation:
        key = self._view_key(self.rng.choice(["value", "param", "grad"]))
        blob, dtype, shape, stride, off = self.m.views[key]
        choice = self.rng.choice(["reverse", "flatten", "drop_dim", "grow", "zero", "negative"])
        if choice == "reverse" and len(set(shape)) > 1:
            new = list(reversed(shape))
            new_stride = _contig(new)
        elif choice == "flatten" and len(shape) > 1:
            new, new_stride = [_prod(shape)], [1]
        elif choice == "drop_dim" and shape[0] > 1:
            new, new_stride = [shape[0] - 1] + shape[1:], stride
        elif choice == "grow":
            new, new_stride = [shape[0] + 1] + shape[1:], stride
        elif choice == "negative":
            new, new_stride = [-shape[0]] + shape[1:], stride
        else:
            new, new_stride = [0] + shape[1:], stride
        return Mutation(f"tensors.view_shape.{choice}", True, True,
                        _views_edit(lambda v: v.__setitem__(key, [blob, dtype, new, new_stride, off])),
                        f"{key}: {shape} -> {new}")

    def mut_tensors_view_dtype(self) -> Mutation:
        key = self._view_key(self.rng.choice(["value", "param", "grad", "input"]))
        blob, dtype, shape, stride, off = self.m.views[key]
        new = self.rng.choice([d for d in ("int32", "float64", "float16", "bool", "uint8", "complex64", "nope",
                                           "Tensor", "float", "__class__", "qint8") if d != dtype])
        keep = self.rng.random() < 0.5 and new in _ITEMSIZE
        if keep:   # same bytes: rescale the shape so that the view still fits its blob
            ratio = _ITEMSIZE[dtype] / _ITEMSIZE[new]
            shape2 = shape[:-1] + [int(shape[-1] * ratio)] if shape[-1] * ratio >= 1 else shape
            stride2, off2 = _contig(shape2), off
        else:
            shape2, stride2, off2 = shape, stride, off
        return Mutation(f"tensors.view_dtype{'.refit' if keep else ''}", True, True,
                        _views_edit(lambda v: v.__setitem__(key, [blob, new, shape2, stride2, off2])),
                        f"{key}: {dtype} -> {new}")

    def mut_tensors_view_stride(self) -> Mutation:
        key = self._view_key(self.rng.choice(["value", "param", "grad"]))
        blob, dtype, shape, stride, off = self.m.views[key]
        if len(shape) < 2 or shape[-1] < 2:
            new = [0] * len(stride)   # every element reads the first one
        else:
            new = list(stride)
            new[-1], new[-2] = stride[-2], stride[-1]
            if new == stride:
                new[-1] = 0
        bad = self.rng.choice([None, None, [-1] * len(stride), [10 ** 12] * len(stride), stride[:-1]])
        new = bad if bad is not None else new
        return Mutation(f"tensors.view_stride{'.bad' if bad is not None else ''}", True, bad is not None,
                        _views_edit(lambda v: v.__setitem__(key, [blob, dtype, shape, new, off])), f"{key}: {new}")

    def mut_tensors_view_offset(self) -> Mutation:
        key = self._view_key(self.rng.choice(["value", "param", "grad"]))
        blob, dtype, shape, stride, off = self.m.views[key]
        size = _ITEMSIZE.get(dtype, 4)
        new = self.rng.choice([off + size, off - size, off + 1, -1, 10 ** 15, 2 ** 63, "0", 1.5])
        valid_move = new in (off + size, off - size) and isinstance(new, int) and new >= 0
        return Mutation(f"tensors.view_offset{'' if valid_move else '.bad'}", True, not valid_move,
                        _views_edit(lambda v: v.__setitem__(key, [blob, dtype, shape, stride, new])),
                        f"{key}: {off} -> {new}")

    def mut_tensors_view_blob(self) -> Mutation:
        """A view re-pointed at another blob. In a file written in one go the blobs follow the views'
        order, so any such edit breaks the layout; in one written while the model ran they come in the
        order the run made them, and a tensor moved into another blob that holds its bytes is a
        well-formed capture of other values (``compare`` tells, ``load`` cannot)."""
        key = self._view_key(self.rng.choice(["value", "param", "grad"]))
        blob, dtype, shape, stride, off = self.m.views[key]
        n_blobs = sum(1 for k in self.m.st.header if k.startswith("storage/"))
        new = self.rng.choice([n_blobs, -1, "0", None, 1.5, (blob + 1) % n_blobs])
        streamed = "xxh3_64_header" in self.m.manifest["files"][TENSORS]
        moved = streamed and type(new) is int and 0 <= new < n_blobs
        return Mutation("tensors.view_blob", True, None if moved else True,
                        _views_edit(lambda v: v.__setitem__(key, [new, dtype, shape, stride, off])),
                        f"{key}: blob {blob} -> {new!r}")

    def mut_tensors_view_entry(self) -> Mutation:
        key = self._view_key(self.rng.choice(["value", "param", "grad", "input", "output"]))
        v = self.rng.choice([None, [], [0], "x", {"a": 1}, [0, "float32", [1], [1], 0, "extra"],
                             [0, "float32", 3, [1], 0], [0, "float32", [1], 3, 0], [0, "float32", ["a"], [1], 0]])
        return Mutation("tensors.view_entry", True, True, _views_edit(lambda views: views.__setitem__(key, v)),
                        f"{key} = {v!r}")

    def mut_tensors_view_drop(self) -> Mutation:
        section = self.rng.choice(["value", "grad", "param", "param_grad", "input", "output"])
        key = self._view_key(section)
        return Mutation(f"tensors.view_drop.{section}", True, True, _views_edit(lambda v: v.pop(key)), key)

    def mut_tensors_view_extra(self) -> Mutation:
        key = self._view_key("value")
        name = self.rng.choice(["value/ghost_node", "param/ghost.weight", "grad/ghost", "weird/x", "noslash"])
        semantic = name.startswith(("param/", "value/", "grad/"))
        return Mutation(f"tensors.view_extra.{name.split('/')[0]}", semantic or None, semantic,
                        _views_edit(lambda v: v.__setitem__(name, v[key])), name)

    def mut_tensors_views_retype(self) -> Mutation:
        v = self.rng.choice(["not json", "[]", "3", "null", "{", json.dumps({"a": 1}), None, 3])

        def f(st):
            if v is None:
                st.header["__metadata__"].pop("views")
            elif isinstance(v, int):
                st.header.pop("__metadata__")
            else:
                st.header["__metadata__"]["views"] = v
        return Mutation("tensors.views_retype", True, True, _tensor_edit(f), repr(v))

    def mut_tensors_header(self) -> Mutation:
        choice = self.rng.choice(["blob_dtype", "offsets_overlap", "offsets_past_end", "header_len_huge",
                                  "header_not_json", "blob_shape"])

        def apply(cap):
            raw = bytearray((cap / TENSORS).read_bytes())
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + n])
            if choice == "header_len_huge":
                raw[:8] = (2 ** 62).to_bytes(8, "little")
            elif choice == "header_not_json":
                raw[8:8 + n] = b"{" + b" " * (n - 1)
            else:
                h = header["storage/0"]
                if choice == "blob_dtype":
                    h["dtype"] = "F32"
                    h["shape"] = [h["shape"][0] // 4]
                elif choice == "offsets_overlap":
                    header["storage/1"]["data_offsets"] = [0, header["storage/1"]["data_offsets"][1] -
                                                           header["storage/1"]["data_offsets"][0]]
                elif choice == "offsets_past_end":
                    last = max(header, key=lambda k: header[k]["data_offsets"][1] if k != "__metadata__" else -1)
                    header[last]["data_offsets"][1] += 1 << 20
                    header[last]["shape"] = [header[last]["data_offsets"][1] - header[last]["data_offsets"][0]]
                elif choice == "blob_shape":
                    h["shape"] = [h["shape"][0] + 4]
                head = json.dumps(header, separators=(",", ":")).encode()
                head += b" " * (-len(head) % 8)
                raw = bytearray(len(head).to_bytes(8, "little") + head + raw[8 + n:])
            (cap / TENSORS).write_bytes(bytes(raw))
            fix_manifest(cap)
        return Mutation(f"tensors.header.{choice}", True, True, apply)

    # -- files replaced --------------------------------------------------------------------
    def mut_fs_dir(self) -> Mutation:
        name = self.rng.choice([MANIFEST, GRAPH, TENSORS])

        def apply(cap):
            (cap / name).unlink()
            (cap / name).mkdir()
        return Mutation(f"fs.dir.{name}", True, True, apply)

    def mut_fs_missing(self) -> Mutation:
        name = self.rng.choice([MANIFEST, GRAPH, TENSORS])
        return Mutation(f"fs.missing.{name}", True, True, lambda cap: (cap / name).unlink())

    def mut_fs_symlink(self) -> Mutation:
        name = self.rng.choice([MANIFEST, GRAPH, TENSORS])
        to = self.rng.choice(["dangling", "loop", "etc_passwd", "dir", "self_copy"])

        def apply(cap):
            f = cap / name
            if to == "self_copy":
                copy_ = cap.parent / f"{cap.name}.{name}.real"
                shutil.copy(f, copy_)
                f.unlink()
                f.symlink_to(copy_)
                return
            f.unlink()
            target = {"dangling": cap / "nope", "loop": f, "etc_passwd": Path("/etc/passwd"), "dir": cap}[to]
            f.symlink_to(target)
        return Mutation(f"fs.symlink.{to}", to != "self_copy", to != "self_copy", apply, name)

    def mut_fs_fifo(self) -> Mutation:
        name = self.rng.choice([MANIFEST, GRAPH, TENSORS])

        def apply(cap):
            (cap / name).unlink()
            os.mkfifo(cap / name)
        return Mutation(f"fs.fifo.{name}", True, True, apply)

    def mut_fs_capture_is_file(self) -> Mutation:
        def apply(cap):
            shutil.rmtree(cap)
            cap.write_text("not a directory")
        return Mutation("fs.capture_is_file", True, True, apply)


def _prod(xs):
    p = 1
    for x in xs:
        p *= x
    return p


def _contig(shape: list[int]) -> list[int]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return list(reversed(stride))


def _views_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def f(st: Safetensors) -> None:
        v = st.views
        fn(v)
        st.views = v
    return _tensor_edit(f)


def canonical_layout(blobs: list, views: dict) -> tuple[list, dict]:
    """Blobs and views laid out as fxdiff writes them (and checks on load): blobs numbered in the
    order the views first use them, each cut to the span its views cover, its start aligned down
    to 16 bytes. An edit that gives one tensor a blob of its own stays a well-formed file."""
    import torch
    spans: dict[int, list[int]] = {}
    for blob, dtype, shape, stride, off in views.values():
        extent = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if _prod(shape) else 0
        end = off + extent * getattr(torch, dtype).itemsize
        span = spans.setdefault(blob, [off, end])
        span[0], span[1] = min(span[0], off), max(span[1], end)
    starts = {blob: lo - lo % 16 for blob, (lo, _) in spans.items()}
    index = {blob: i for i, blob in enumerate(spans)}
    new_blobs = [bytearray(blobs[blob][starts[blob]:hi]) for blob, (_, hi) in spans.items()]
    new_views = {k: [index[b], d, sh, st, off - starts[b]] for k, (b, d, sh, st, off) in views.items()}
    return new_blobs, new_views


def _edit_view_bytes(cap: Path, key: str, rng: random.Random, detach: bool) -> None:
    """Change one element of tensor ``key``; ``detach``: give the view its own edited blob copy,
    so only this tensor changes (not the values that shared its storage)."""
    st = Safetensors.read(cap / TENSORS)
    views = st.views
    blob, dtype, shape, stride, off = views[key]
    size = _ITEMSIZE[dtype]
    idx = [rng.randrange(n) for n in shape]
    at = off + sum(i * s for i, s in zip(idx, stride)) * size
    blobs = st.blobs()
    if detach:
        buf = bytearray(blobs[blob])
        _perturb(buf, dtype, at)
        blobs.append(buf)
        views[key] = [len(blobs) - 1, dtype, shape, stride, off]
        blobs, views = canonical_layout(blobs, views)
    else:
        _perturb(blobs[blob], dtype, at)
    st.set_blobs(blobs)
    st.views = views
    st.write(cap / TENSORS)
    fix_manifest(cap)


# ---------------------------------------------------------------------------------------------
# running capture cases

@dataclasses.dataclass
class CaseResult:
    family: str          # "capture", "cli", "checkpoint", "report"
    kind: str
    command: str         # "inspect", "compare", "load", "capture", ...
    outcome: str
    exit_code: int | None
    detail: str
    site: str = "-"
    message: str = ""
    seconds: float = 0.0


def _first_line(res: Result) -> str:
    lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
    return lines[0][:160] if lines else ""


def _api_load(path: Path, timeout: float):
    import fxdiff
    from fxdiff.errors import FxdiffError
    try:
        with time_limit(timeout):
            fxdiff.load(path)
    except CaseTimeout:
        return "hang", None
    except FxdiffError:
        return "clear_error", None
    except BaseException as e:  # noqa: BLE001
        return "traceback", e
    return "ok", None


def run_mutation(mut: Mutation, good: Path, work: Path, commands=("inspect", "compare", "load"),
                 timeout: float = 20.0) -> list[CaseResult]:
    """Apply ``mut`` to a copy of ``good`` under ``work`` and run it through ``commands``: ``inspect``,
    ``compare`` (GOOD MUTATED), ``compare_ref`` (MUTATED GOOD: the mutated capture as the reference,
    whose values the isolated replay feeds the candidate's ops) and ``load`` (``fxdiff.load``)."""
    cap = work / "mutated.fxd"
    if cap.is_symlink() or cap.is_file():
        cap.unlink()
    elif cap.exists():
        shutil.rmtree(cap)
    for stale in work.glob("mutated.fxd.*.real"):
        stale.unlink()
    shutil.copytree(good, cap)
    payload = None
    if mut.needs_payload:
        payload = work / f"{mut.forbidden[0]}.py"
        payload.write_text(mut.needs_payload)
    if work.resolve().as_posix() not in sys.path and mut.needs_payload:
        sys.path.append(work.resolve().as_posix())
    out: list[CaseResult] = []
    try:
        mut.apply(cap)
        for command in commands:
            if out and out[-1].outcome == "hang":
                break   # one hang says it; the next command would wait as long
            with ModuleWatch(mut.forbidden) as watch:
                if command == "load":
                    outcome, exc = _api_load(cap, timeout)
                    code, res = None, None
                else:
                    args = {"inspect": ["inspect", str(cap)], "compare": ["compare", str(good), str(cap)],
                            "compare_ref": ["compare", str(cap), str(good)]}[command]
                    res = run_cli(args, timeout)
                    exc, code = res.exception, res.exit_code
            marker_hit = bool(mut.marker and Path(mut.marker).exists())
            if marker_hit:
                marker_text = Path(mut.marker).read_text().strip()
                Path(mut.marker).unlink()
            executed = marker_hit or bool(watch.imported)
            what = ""
            if marker_hit:
                target = re.sub(r"\d+", "N", mut.detail.split("-> ")[-1].split("(")[0])
                what = f"ran {target}" + (f" (payload module {marker_text})" if marker_text in ("imported", "called")
                                          else " (the payload command ran)")
            elif watch.imported:
                what = "imported " + ", ".join(re.sub(r"\d+", "N", m) for m in watch.imported)
            if command == "load":
                if executed:
                    outcome = "executed"
                elif outcome == "ok":
                    outcome = "silent" if mut.invalid else "verdict"
                site, msg = crash_site(exc) if exc else "-", ""
                site = what or site
            else:
                if command == "inspect":
                    outcome = classify(res, expect_error=mut.invalid, executed=executed)
                else:
                    outcome = classify(res, expect_error=False, executed=executed)
                    if outcome == "verdict" and res.exit_code == 0 and (mut.semantic or mut.invalid):
                        outcome = "silent"
                site, msg = what or crash_site(res), _first_line(res)
            out.append(CaseResult("capture", mut.kind, command, outcome, code,
                                  mut.detail + (f" [imported {watch.imported}]" if watch.imported else ""), site, msg,
                                  res.seconds if res else 0.0))
    finally:
        if payload is not None:
            payload.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------
# the good capture

def make_good_capture(work: Path) -> tuple[Path, Path]:
    """Write the spec files and capture the tiny model; return (capture dir, spec file)."""
    import torch
    spec = write_specs(work / "specs")
    good = work / "good.fxd"
    if not (good / MANIFEST).is_file():
        threads = torch.get_num_threads()
        res = run_cli(["capture", f"{spec}:build", "--inputs", f"{spec}:inputs", "--loss", f"{spec}:loss",
                       "-o", str(good)], timeout=120)
        torch.set_num_threads(threads)
        if res.exit_code != 0:
            raise RuntimeError(f"could not capture the tiny model: {res.stderr}{res.stdout}{res.tb}")
    return good, spec


# ---------------------------------------------------------------------------------------------
# hostile checkpoints and inputs

class _Payload:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def pickle_payload(marker: Path) -> bytes:
    """A pickle whose load runs ``touch marker`` through os.system."""
    return pickle.dumps({"weight": _Payload(f"touch {marker}")}, protocol=2)


def torch_zip_payload(path: Path, marker: Path) -> None:
    """A torch.save-style zip checkpoint whose data.pkl calls os.system."""
    import torch
    torch.save({"w": torch.zeros(2)}, path)
    import zipfile
    with zipfile.ZipFile(path) as z:
        items = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in items if n.endswith("data.pkl"))
    items[name] = pickle_payload(marker)
    with zipfile.ZipFile(path, "w") as z:
        for n, d in items.items():
            z.writestr(n, d)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def make_nemo(path: Path, weights: bytes, extra: list[tuple[str, str]] = (), weights_name: str = "model_weights.ckpt"):
    """A .nemo tar: ``extra`` members (name, kind) with kind file/symlink/hardlink/dir."""
    with tarfile.open(path, "w") as tar:
        for name, kind in extra:
            if kind == "file":
                _add_member(tar, name, b"x")
            elif kind == "symlink":
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            elif kind == "hardlink":
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
                tar.addfile(info)
            elif kind == "dir":
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
        _add_member(tar, "model_config.yaml", b"d_model: 16\n")
        if weights_name:
            _add_member(tar, weights_name, weights)


def make_nemo_huge(path: Path, declared: int, body: bytes = b"PK\x03\x04garbage") -> None:
    """A .nemo whose model_weights.ckpt declares ``declared`` bytes; the file is sparse, so the
    member really holds that many (zero) bytes without taking disk space."""
    with open(path, "wb") as f:
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.size = declared
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.write(body)
        end = 512 + declared + (-declared % 512)
        f.truncate(end + 1024)   # the data, padding and two zero end blocks


def state_dict_bytes() -> bytes:
    import torch
    buf = io.BytesIO()
    torch.save({"inp.weight": torch.zeros(16, 8)}, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# bad command lines

@dataclasses.dataclass
class BadLine:
    kind: str
    args: list[str]
    expect_error: bool = True
    marker: str | None = None
    note: str = ""


def bad_command_lines(good: Path, spec: Path, work: Path) -> list[BadLine]:
    """At least 200 distinct command lines that must be refused (exit 2, one clear line)."""
    import torch
    work.mkdir(parents=True, exist_ok=True)
    s = str(spec)
    sdir = str(spec.parent)
    g = str(good)
    f = {}   # files used by the lines

    def file(name, data: bytes | str):
        p = work / name
        if isinstance(data, str):
            p.write_text(data)
        else:
            p.write_bytes(data)
        f[name] = str(p)
        return str(p)

    empty_dir = work / "empty_dir"
    empty_dir.mkdir(exist_ok=True)
    a_dir = str(empty_dir)
    not_cap = work / "not_a_capture"
    not_cap.mkdir(exist_ok=True)
    (not_cap / "x.txt").write_text("x")
    plain = file("plain.txt", "hello\n")
    garbage = file("garbage.bin", bytes(range(256)) * 4)
    file("garbage.safetensors", b"\x00" * 3)
    file("garbage.pt", b"not a zip")
    file("empty.pt", b"")
    file("list.yaml", "- a\n- b\n")
    file("bad.yaml", "modules: [\n  - [unclosed\n")
    file("bad.json", "{nope")
    file("badregex.yaml", "modules:\n  - ['layers\\.(\\d+', 'x']\n")
    file("badentry.yaml", "modules:\n  - 3\n")
    file("badparams.yaml", "params: [1, 2]\n")
    file("unknownkey.yaml", "nodes: {}\n")
    file("params_ghost.yaml", "params:\n  ghost.weight: other.weight\n")
    file("params_transform.yaml", "params:\n  inp.weight: {cand: inp.weight, transform: {kind: nope}}\n")
    file("params_rows.yaml", "params:\n  inp.weight: {cand: inp.weight, transform: {kind: rows, start: 'a'}}\n")
    file("params_cand_int.yaml", "params:\n  inp.weight: {cand: 3}\n")
    file("params_int_key.yaml", "params:\n  3: inp.weight\n")
    file("empty.yaml", "")
    file("null.json", "null")
    file("map.txt", "modules: []\n")
    file("huge_regex.yaml", "modules:\n  - ['(a+)+$', 'x']\n")
    file("tabs.yaml", "modules:\n\t- [a, b]\n")
    file("bom.json", "\ufeff{}")
    marker_pkl = work / "pickle_ran.marker"
    file("evil.pt", pickle_payload(marker_pkl))
    file("evil.pth", pickle_payload(marker_pkl))
    file("evil.bin", pickle_payload(marker_pkl))
    file("evil.ckpt", pickle_payload(marker_pkl))
    torch_zip_payload(work / "evil_zip.pt", marker_pkl)
    f["evil_zip.pt"] = str(work / "evil_zip.pt")
    torch.save({"inp.weight": torch.zeros(16, 8)}, work / "ok.pt")
    torch.save({"unrelated": torch.zeros(1)}, work / "unrelated.pt")
    torch.save([1, 2, 3], work / "list.pt")
    torch.save({"inp.weight": torch.zeros(3)}, work / "wrong_shape.pt")
    torch.save({"feats": torch.zeros(2, 6, 8)}, work / "inputs_partial.pt")
    torch.save({"feats": torch.zeros(2, 6, 9), "lengths": torch.tensor([6, 4])}, work / "inputs_wrong_shape.pt")
    from safetensors.torch import save_file
    save_file({"nope": torch.zeros(1)}, str(work / "inputs_wrong.safetensors"))
    save_file({"args.x": torch.zeros(1)}, str(work / "inputs_badargs.safetensors"))
    save_file({"inp.weight": torch.zeros(3)}, str(work / "wrong_shape.safetensors"))
    # inputs files with the call's structure in their metadata (fxdiff.save_inputs), damaged
    for name, structure in [("call_not_json", "{nope"), ("call_not_dict", "[1]"),
                            ("call_missing_tensor", '{"args": [{"fxdiff.tensor": "args.9"}], "kwargs": {}}'),
                            ("call_key_not_str", '{"args": [{"fxdiff.tensor": [1]}], "kwargs": {}}'),
                            ("call_deep", '{"args": ' + "[" * 100000 + "]" * 100000 + ', "kwargs": {}}')]:
        save_file({"args.0": torch.zeros(2, 6, 8)}, str(work / f"{name}.safetensors"), metadata={"fxdiff.args": structure})
    hf_dir = work / "hf_model"   # MODEL as a Hugging Face directory whose config is not one
    hf_dir.mkdir(exist_ok=True)
    (hf_dir / "config.json").write_text('{"model_type": "nope"}')
    file("model.nemo", b"not a tar" * 10)
    make_nemo(work / "traversal.nemo", state_dict_bytes(), [("../escape.txt", "file")])
    make_nemo(work / "traversal2.nemo", state_dict_bytes(), [("a/../../escape.txt", "file")])
    make_nemo(work / "absolute.nemo", state_dict_bytes(), [("/tmp/fxdiff_fuzz_abs.txt", "file")])
    make_nemo(work / "symlink.nemo", state_dict_bytes(), [("link", "symlink")])
    make_nemo(work / "hardlink.nemo", state_dict_bytes(), [("hard", "hardlink")])
    make_nemo(work / "weights_symlink.nemo", b"", [("model_weights.ckpt", "symlink")], weights_name="")
    make_nemo(work / "no_weights.nemo", b"", weights_name="")
    make_nemo(work / "evil_weights.nemo", pickle_payload(marker_pkl))
    make_nemo(work / "garbage_weights.nemo", b"garbage")
    make_nemo(work / "dotdot_weights.nemo", state_dict_bytes(), weights_name="../model_weights.ckpt")
    make_nemo_huge(work / "huge.nemo", 3 << 30)
    file("not_tar.nemo", b"not a tar" * 100)
    (work / "dir.nemo").mkdir(exist_ok=True)
    (work / "dir.pt").mkdir(exist_ok=True)
    (work / "dir.safetensors").mkdir(exist_ok=True)
    (work / "dir.yaml").mkdir(exist_ok=True)
    (work / "dir.json").mkdir(exist_ok=True)
    (work / "dir.py").mkdir(exist_ok=True)
    a_file_parent = str(work / "plain.txt" / "sub")
    counter = iter(range(10 ** 6))

    def missing():   # a fresh one each time: a command that creates it must not hide the next
        return str(work / f"no{next(counter)}" / "such" / "dir")
    w = str(work)

    cap = ["capture"]
    o = ["-o", str(work / "out.fxd")]
    run = ["--inputs", f"{s}:inputs", "--loss", f"{s}:loss"]
    lines: list[BadLine] = []

    def add(kind, args, **kw):
        lines.append(BadLine(kind, [str(a) for a in args], **kw))

    # -- model specs ------------------------------------------------------------------------
    for m in [f"{w}/nope.py:build", f"{s}:nope", f"{s}:", ":build", s, f"{s}:1bad", f"{s}:NOT_CALLABLE",
              f"{s}:build_raises", f"{s}:build_value_error", f"{s}:build_oserror", f"{s}:build_recursion",
              f"{s}:build_not_module", f"{s}:build_none", f"{s}:build_sys_exit", f"{s}:build_memory",
              f"{s}:build_forward_raises", f"{s}:build_forward_assert", f"{s}:build_wrong_signature",
              f"{s}:build_takes_args",
              f"{sdir}/fz_syntax.py:build", f"{sdir}/fz_importerror.py:build", f"{sdir}/fz_raises.py:build",
              f"{w}/dir.py:build", f"{plain}:build", "fxdiff_fuzz_nope_pkg:build", "os:getcwd", "os.path:join",
              "json:loads", "torch:zeros", "builtins:exit", "", ":", "a:b:c", f"{s}:build:extra",
              f"{s}:__import__", f"{s}:build ", "this:x", str(hf_dir), f"{w}/model.nemo"]:
        add("capture.model_spec", cap + [m] + run + o)
    # -- inputs ----------------------------------------------------------------------------
    for i in [None, f"{s}:inputs_raises", f"{s}:inputs_oserror", f"{s}:inputs_assert", f"{s}:inputs_int", f"{s}:inputs_none",
              f"{s}:inputs_string", f"{s}:inputs_wrong_keys", f"{s}:nope", f"{w}/nope.safetensors",
              f"{w}/nope.pt", f"{w}/garbage.safetensors", f"{w}/garbage.pt", f"{w}/empty.pt", f"{w}/evil.pt",
              f"{w}/evil_zip.pt", f"{w}/evil.pth", f"{w}/list.pt", f"{w}/inputs_partial.pt",
              f"{w}/inputs_wrong_shape.pt", f"{w}/inputs_wrong.safetensors", f"{w}/inputs_badargs.safetensors",
              f"{w}/dir.pt", f"{w}/dir.safetensors", plain, a_dir, "", "inputs",
              *(f"{w}/{n}.safetensors" for n in ("call_not_json", "call_not_dict", "call_missing_tensor",
                                                 "call_key_not_str", "call_deep"))]:
        args = cap + [f"{s}:build"] + (["--inputs", i] if i is not None else []) + ["--loss", f"{s}:loss"] + o
        add("capture.inputs", args, marker=str(marker_pkl) if i and "evil" in i else None)
    # -- loss ------------------------------------------------------------------------------
    for l in ["loss_raises", "loss_assert", "loss_nograd", "loss_constant", "loss_nonscalar", "loss_none", "loss_string",
              "loss_int_tensor", "loss_key_error", "nope", "NOT_CALLABLE"]:
        add("capture.loss", cap + [f"{s}:build", "--inputs", f"{s}:inputs", "--loss", f"{s}:{l}"] + o)
    # a loss of two arguments gets the model as its second (README: "--loss"): a valid line
    add("capture.loss_with_model", cap + [f"{s}:build", "--inputs", f"{s}:inputs", "--loss", f"{s}:loss_takes_two"] + o,
        expect_error=False)
    for l in [f"{w}/nope.py:loss", "torch:nope"]:
        add("capture.loss", cap + [f"{s}:build", "--inputs", f"{s}:inputs", "--loss", l] + o)
    # -- checkpoints -----------------------------------------------------------------------
    for c in ["nope.pt", "evil.pt", "evil_zip.pt", "evil.pth", "evil.bin", "evil.ckpt", "garbage.pt", "empty.pt",
              "garbage.safetensors", "list.pt", "unrelated.pt", "wrong_shape.pt", "wrong_shape.safetensors",
              "traversal.nemo", "traversal2.nemo", "absolute.nemo", "symlink.nemo", "hardlink.nemo",
              "weights_symlink.nemo", "no_weights.nemo", "evil_weights.nemo", "garbage_weights.nemo",
              "dotdot_weights.nemo", "huge.nemo", "not_tar.nemo", "dir.nemo", "dir.pt", "dir.safetensors",
              "plain.txt", "garbage.bin"]:
        add("capture.checkpoint", cap + [f"{s}:build"] + run + ["--checkpoint", f"{w}/{c}"] + o,
            marker=str(marker_pkl) if "evil" in c else None)
    # -- run options -----------------------------------------------------------------------
    for opt, vals in [("--device", ["cuda", "cuda:0", "cuda:7", "mps", "xpu", "nope", "meta", "cuda:-1",
                                    "hpu"]),
                      ("--dtype", ["int8", "nope", "float8", "", "complex64", "int64"]),
                      ("--seed", ["abc", "1.5", "", "99999999999999999999999"]),
                      ("--mode", ["test", ""]), ("--tracer", ["jit", ""])]:
        for v in vals:
            add(f"capture.{opt[2:]}", cap + [f"{s}:build"] + run + [opt, v] + o)
    # -- output ----------------------------------------------------------------------------
    for out in ["/proc/x", "/proc/self/x.fxd", "/dev/null", "/dev/full/x", plain, a_file_parent, a_dir,
                str(not_cap), "", "/", "/sys/x", g + "/graph.json"]:
        add("capture.output", cap + [f"{s}:build"] + run + ["-o", out])
    add("capture.no_output", cap + [f"{s}:build"] + run)
    add("capture.no_model", cap + o)
    # -- inspect ---------------------------------------------------------------------------
    for x in [f"{w}/nope", plain, a_dir, str(not_cap), "", "/", "/proc", "/dev/null", g + "/manifest.json", f"{s}:build"]:
        add("inspect.path", ["inspect", x])
    for t in ["-1", "abc", "1e9", ""]:
        add("inspect.top", ["inspect", g, "--top", t])
    # -- compare ---------------------------------------------------------------------------
    for v in ["nan", "-1", "inf", "-inf", "abc", "", "1e400", "-0.5", "NaN", "+inf"]:
        add("compare.atol", ["compare", g, g, "--atol", v])
        add("compare.rtol", ["compare", g, g, "--rtol", v])
    for x in [f"{w}/nope", plain, a_dir, str(not_cap), "/proc", "/dev/null", "x:y", f"{s}:nope", "", g + "/graph.json"]:
        add("compare.ref", ["compare", x, g])
        add("compare.cand", ["compare", g, x])
    for mp in ["nope.yaml", "dir.yaml", "dir.json", "bad.yaml", "bad.json", "list.yaml", "badregex.yaml",
               "badentry.yaml", "badparams.yaml", "unknownkey.yaml", "params_ghost.yaml", "params_transform.yaml",
               "params_rows.yaml", "params_cand_int.yaml", "params_int_key.yaml", "null.json", "map.txt",
               "tabs.yaml", "garbage.bin", "plain.txt"]:
        add("compare.map", ["compare", g, g, "--map", f"{w}/{mp}"])
    # (never a device node: as root, compare --json /dev/full replaced /dev/full with a regular file)
    for j in [f"{missing()}/r.json", "/proc/x.json", a_dir, a_file_parent + ".json", "/"]:
        add("compare.json", ["compare", g, g, "--json", j])
    # (--svg, --html and --model-explorer create missing parent directories by design)
    for opt, v in [("--svg", a_dir), ("--svg", "/proc/g.svg"), ("--svg", a_file_parent + ".svg"),
                   ("--html", "/proc/r.html"), ("--html", a_dir),
                   ("--model-explorer", "/proc/me.json"), ("--model-explorer", a_file_parent + ".json"),
                   ("--metric", "nope"), ("--depth", "0"), ("--depth", "-3"), ("--max-nodes", "0"),
                   ("--max-nodes", "abc"), ("--direction", "up")]:
        add(f"compare.{opt[2:]}", ["compare", g, g, opt, v])
    for extra in [["--inputs", f"{s}:inputs_raises"], ["--loss", f"{s}:loss_raises"], ["--loss", f"{s}:loss_nograd"],
                  ["--device", "cuda"], ["--checkpoint", f"{w}/evil.pt"], ["--checkpoint", f"{w}/traversal.nemo"],
                  ["--dtype", "nope"], ["--inputs", f"{w}/evil.pt"]]:
        add("compare.live_cand", ["compare", g, f"{s}:build"] + extra,
            marker=str(marker_pkl) if "evil" in extra[1] else None)
    for m in ["build_raises", "build_not_module", "build_forward_raises", "nope", "build_sys_exit"]:
        add("compare.live_cand", ["compare", g, f"{s}:{m}"])
    add("compare.live_ref_no_inputs", ["compare", f"{s}:build", g])
    # -- map-params ------------------------------------------------------------------------
    add("map-params.convert_alone", ["map-params", g, g, "--convert", f"{w}/ok.pt"])
    add("map-params.out_alone", ["map-params", g, g, "--out", f"{w}/x.safetensors"])
    for c in ["nope.pt", "evil.pt", "traversal.nemo", "garbage.pt", "dir.pt"]:
        add("map-params.convert", ["map-params", g, g, "--convert", f"{w}/{c}", "--out", f"{w}/x.safetensors"],
            marker=str(marker_pkl) if "evil" in c else None)
    for out in [f"{missing()}/x.safetensors", "/proc/x.safetensors", a_dir]:
        add("map-params.out", ["map-params", g, g, "--convert", f"{w}/ok.pt", "--out", out])
    for out in [f"{missing()}/m.json", "/proc/m.json", a_dir]:
        add("map-params.output", ["map-params", g, g, "-o", out])
    add("map-params.map", ["map-params", g, g, "--map", f"{w}/bad.yaml"])
    # -- render / view ---------------------------------------------------------------------
    for r in [f"{w}/nope.json", a_dir, plain, garbage, f"{w}/null.json", f"{w}/bom.json", "/dev/null", ""]:
        add("render.report", ["render", r, "--svg", f"{w}/r.svg"])
        add("view.report", ["view", r, "--no-open", "-o", f"{w}/r.html"])
    # -- the command line itself -------------------------------------------------------------
    for args in [["nope"], ["compare"], ["compare", g], ["inspect"], ["capture"], ["compare", g, g, "--nope"],
                 ["inspect", g, g], ["render"], ["view"], ["--nope"]]:
        add("cli.usage", args)
    return lines


def sample_lines(lines: list[BadLine], n: int, rng: random.Random) -> list[BadLine]:
    """``n`` of ``lines``: one of every kind first, then drawn at random (seeded)."""
    by_kind: dict[str, list[BadLine]] = {}
    for line in lines:
        by_kind.setdefault(line.kind, []).append(line)
    picked = [rng.choice(v) for _, v in sorted(by_kind.items())]
    rest = [line for line in lines if line not in picked]
    return picked + rng.sample(rest, max(0, min(len(rest), n - len(picked))))


def run_bad_line(line: BadLine, timeout: float = 30.0) -> CaseResult:
    if line.marker:
        Path(line.marker).unlink(missing_ok=True)
    res = run_cli(line.args, timeout)
    executed = bool(line.marker and Path(line.marker).exists())
    outcome = classify(res, expect_error=line.expect_error, executed=executed)
    return CaseResult("cli", line.kind, line.args[0] if line.args else "", outcome, res.exit_code,
                      " ".join(line.args)[-200:], crash_site(res), _first_line(res), res.seconds)


# ---------------------------------------------------------------------------------------------
# mutated reports

def good_report(good: Path, work: Path) -> Path:
    """A diverging compare report: GOOD against a copy with one parameter edited."""
    path = work / "report.json"
    if path.is_file():
        return path
    cand = work / "report_cand.fxd"
    if not cand.exists():
        shutil.copytree(good, cand)
        m = CaptureModel(good)
        key = next(k for k in m.views if k.startswith("value/") and m.views[k][1] == "float32"
                   and k.split("/", 1)[1] in m.names[m.calls[len(m.calls) // 2]:])
        _edit_view_bytes(cand, key, random.Random(0), detach=True)
    res = run_cli(["compare", str(good), str(cand), "--json", str(path)], timeout=120)
    if not path.is_file():
        raise RuntimeError(f"could not write a report: {res.stderr}{res.stdout}{res.tb}")
    return path


def report_mutations(report: Path, rng: random.Random, n: int) -> list[tuple[str, Any]]:
    """``n`` (kind, document) pairs: the good report's JSON with one edit each."""
    doc = json.loads(report.read_text())
    out = []
    fixed = [
        ("version_str", lambda d: d.__setitem__("version", "1")),
        ("version_future", lambda d: d.__setitem__("version", 99)),
        ("version_none", lambda d: d.pop("version")),
        ("format", lambda d: d.__setitem__("format", "nope")),
        ("not_dict", lambda d: [d]),
        ("empty", lambda d: {}),
    ]
    for kind, fn in fixed:
        d = copy.deepcopy(doc)
        r = fn(d)
        out.append((f"report.{kind}", d if r is None else r))
    paths = list(_json_paths(doc))
    while len(out) < n:
        d = copy.deepcopy(doc)
        path = rng.choice(paths)
        op = rng.choice(["delete", "retype", "retype", "nan"])
        try:
            if op == "delete" and path:
                _del_path(d, path)
            elif op == "nan":
                _set_path(d, path, float(rng.choice(["nan", "inf", "-inf"])))
            elif path:
                _set_path(d, path, _retype_values(rng))
        except (KeyError, IndexError, TypeError):
            continue
        out.append((f"report.{op}.{_path_kind(path)}", d))
    return out


def _json_paths(doc, prefix=()):
    yield list(prefix)
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            yield from _json_paths(v, prefix + (i,))


def _path_kind(path) -> str:
    return ".".join("N" if isinstance(p, int) else str(p) for p in path[:3]) or "root"


def run_report_case(kind: str, doc: Any, work: Path, command: str, timeout: float = 30.0) -> CaseResult:
    path = work / "mutated_report.json"
    path.write_text(json.dumps(doc))
    if command == "render":
        args = ["render", str(path), "--svg", str(work / "mr.svg")]
    else:
        args = ["view", str(path), "--no-open", "-o", str(work / "mr.html")]
    res = run_cli(args, timeout)
    outcome = classify(res, expect_error=False)
    return CaseResult("report", kind, command, outcome, res.exit_code, "", crash_site(res), _first_line(res),
                      res.seconds)


# ---------------------------------------------------------------------------------------------
# tables

def table(results: list[CaseResult], by: Callable[[CaseResult], str] = lambda r: r.kind) -> str:
    rows: dict[str, dict[str, int]] = {}
    for r in results:
        row = rows.setdefault(by(r), dict.fromkeys(("cases",) + OUTCOMES, 0))
        row["cases"] += 1
        row[r.outcome] += 1
    cols = ("cases",) + OUTCOMES
    width = max([len(k) for k in rows] + [10])
    lines = [f"{'kind':<{width}} " + " ".join(f"{c:>11}" for c in cols)]
    total = dict.fromkeys(cols, 0)
    for k in sorted(rows):
        lines.append(f"{k:<{width}} " + " ".join(f"{rows[k][c]:>11}" for c in cols))
        for c in cols:
            total[c] += rows[k][c]
    lines.append(f"{'TOTAL':<{width}} " + " ".join(f"{total[c]:>11}" for c in cols))
    return "\n".join(lines)


def sites(results: list[CaseResult]) -> dict[str, list[str]]:
    """Distinct crash sites (and silent classes) -> the kinds that reached them."""
    out: dict[str, set[str]] = {}
    for r in results:
        if r.outcome in ("traceback", "internal", "hang", "executed", "unclear"):
            key = f"{r.outcome}: {r.site if r.site != '-' else r.message}"
        elif r.outcome == "silent":
            key = f"silent: {r.command} exit {r.exit_code}"
        else:
            continue
        out.setdefault(key, set()).add(f"{r.kind} ({r.command})")
    return {k: sorted(v) for k, v in sorted(out.items())}
