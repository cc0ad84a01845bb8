"""Capture directories: round trips, damaged and hostile files, atomic writes, no unpickling."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tarfile

import pytest
import torch
import xxhash

import fxdiff
from fxdiff.load import specs
from fxdiff.errors import FxdiffError
from fxdiff.store.capture_dir import GRAPH, MANIFEST, TENSORS
from fxdiff.store.summary import is_summary
from tiny_models import build

ROOT = pathlib.Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def conformer_capture():
    model, args, kwargs, loss = build("conformer")
    return fxdiff.capture(model, args, kwargs, loss=loss, meta={"note": "round trip"})


def assert_same_structure(a, b):
    """Equal nested structures: same container types and keys, equal tensors (dtype, shape, values)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_structure(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_structure(x, y)
    else:
        assert a == b or (a != a and b != b)


def assert_same_capture(a, b):
    nodes_a, nodes_b = list(a.graph.nodes), list(b.graph.nodes)
    assert [(n.name, n.op) for n in nodes_a] == [(n.name, n.op) for n in nodes_b]
    for x, y in zip(nodes_a, nodes_b):
        assert {k: v for k, v in x.meta.items() if k.startswith("fxdiff_")} == \
            {k: v for k, v in y.meta.items() if k.startswith("fxdiff_")}
        assert [getattr(i, "name", None) for i in x.all_input_nodes] == [i.name for i in y.all_input_nodes]
        assert str(x.args) == str(y.args) and str(x.kwargs) == str(y.kwargs)
    for table in ("values", "grads", "params", "param_grads"):
        assert_same_structure(getattr(a, table), getattr(b, table))
    assert_same_structure(a.inputs, b.inputs)
    assert_same_structure(a.outputs, b.outputs)
    assert json.loads(json.dumps(a.meta, default=str)) == b.meta


def test_round_trip_keeps_graph_meta_tensors_and_structures(tmp_path, conformer_capture):
    cap = conformer_capture
    dtypes = {v.dtype for v in cap.values.values()}
    assert {torch.complex64, torch.bool, torch.int64, torch.float32} <= dtypes
    assert any(not v.is_contiguous() for v in cap.values.values())
    assert isinstance(cap.outputs, dict) and set(cap.outputs) == {"log_probs", "encoded", "encoded_lengths"}
    fxdiff.save(cap, tmp_path / "c")
    loaded = fxdiff.load(tmp_path / "c")
    assert_same_capture(cap, loaded)
    assert loaded.meta["note"] == "round trip"


@pytest.mark.parametrize("name, dtype", [("gpt2", torch.float32), ("mha", torch.float32), ("mlp", torch.bfloat16),
                                         ("mlp", torch.float64)])
def test_round_trip_of_model_outputs_and_dtypes(tmp_path, name, dtype):
    model, args, kwargs, loss = build(name, dtype)
    cap = fxdiff.capture(model, args, kwargs, loss=loss)
    fxdiff.save(cap, tmp_path / "c")
    loaded = fxdiff.load(tmp_path / "c")
    assert_same_capture(cap, loaded)
    assert {v.dtype for v in loaded.grads.values()} == {dtype}


def test_non_tensor_inputs_and_nested_structures_round_trip(tmp_path):
    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, pair, options, scale=1.0, tag="x"):
            a, b = pair
            h = self.lin(a) * scale + b
            return {"h": h, "parts": [h.sum(0), (h.mean(),)], "tag": tag, "nan": float("nan")}

    x = torch.randn(2, 3)
    cap = fxdiff.capture(Nested(), ((x, x * 2), {"flag": True, "k": 3}), {"scale": 0.5, "tag": "t"})
    assert_same_structure(cap.inputs, {"args": ((x, x * 2), {"flag": True, "k": 3}),
                                       "kwargs": {"scale": 0.5, "tag": "t"}})
    fxdiff.save(cap, tmp_path / "c")
    loaded = fxdiff.load(tmp_path / "c")
    assert_same_capture(cap, loaded)
    assert loaded.inputs["args"][1] == {"flag": True, "k": 3} and loaded.inputs["kwargs"]["tag"] == "t"
    assert isinstance(loaded.outputs["parts"][1], tuple) and loaded.outputs["tag"] == "t"


@pytest.mark.parametrize("keep", ["both", "summary"])
def test_non_finite_numbers_in_arguments_outputs_and_summaries_round_trip(tmp_path, keep):
    """The graph document is written with orjson, which would turn inf and nan into null: every
    float the writers put in it is spelled as a string when it is not finite."""
    class Extremes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)

        def forward(self, x):
            h = torch.clamp(self.lin(x), min=-math.inf, max=math.inf)
            big = h * 0 + 1e308   # its sum and sum of squares overflow to inf
            z = torch.full((2,), complex(math.inf, -math.inf))
            return {"h": h, "big": big, "s": big.sum(), "z": z, "edge": -math.inf}

    x = torch.randn(4, 3, dtype=torch.float64)
    cap = fxdiff.capture(Extremes(), (x,), loss=lambda out: out["h"].sum(), keep=keep)
    fxdiff.save(cap, tmp_path / "c")
    loaded = fxdiff.load(tmp_path / "c")
    clamp = next(n for n in loaded.graph.nodes if "clamp" in str(n.target))
    assert sorted(v for v in clamp.kwargs.values()) == [-math.inf, math.inf]
    assert loaded.outputs["edge"] == -math.inf
    full = next(n for n in loaded.graph.nodes if "full" in str(n.target))
    assert full.args[1] == complex(math.inf, -math.inf)
    if keep == "summary":
        stats = [v.stats for v in loaded.values.values() if is_summary(v) and v.stats["sum"] == math.inf]
        assert stats and all(s["sumsq"] == math.inf and s["max"] == 1e308 for s in stats)
    else:
        assert_same_capture(cap, loaded)


def test_tensors_file_is_safetensors_with_each_storage_written_once(tmp_path, conformer_capture):
    from safetensors.torch import load_file

    cap = conformer_capture
    fxdiff.save(cap, tmp_path / "c")
    blobs = load_file(tmp_path / "c" / TENSORS)
    tensors = [*cap.values.values(), *cap.grads.values(), *cap.params.values(), *cap.param_grads.values(),
               *cap.output_grads.values()]
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(blobs) == len(storages) < len(tensors)
    assert sum(b.numel() for b in blobs.values()) < sum(t.numel() * t.element_size() for t in tensors)
    loaded = fxdiff.load(tmp_path / "c")
    view, base = next((n, m) for n, v in cap.values.items() if not v.is_contiguous()
                      for m, w in cap.values.items()
                      if w.is_contiguous() and w.untyped_storage().data_ptr() == v.untyped_storage().data_ptr())
    assert loaded.values[view].untyped_storage().data_ptr() == loaded.values[base].untyped_storage().data_ptr()


# -- damaged captures -----------------------------------------------------------------------------

def damage_truncate(d):
    data = (d / TENSORS).read_bytes()
    (d / TENSORS).write_bytes(data[: len(data) // 2])


def damage_flip_byte(d):
    data = bytearray((d / TENSORS).read_bytes())
    data[len(data) - 100] ^= 0x01
    (d / TENSORS).write_bytes(bytes(data))


def damage_edit_graph(d):
    doc = json.loads((d / GRAPH).read_text())
    doc["nodes"][5]["name"] = "renamed"
    (d / GRAPH).write_text(json.dumps(doc))


def damage_future_version(d):
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["version"] = 99
    (d / MANIFEST).write_text(json.dumps(manifest))


def damage_bad_manifest(d):
    (d / MANIFEST).write_text("{not json")


def damage_edit_graph_and_checksum(d):
    """An edit that keeps the checksums consistent: a node that refers to a node that does not exist."""
    doc = json.loads((d / GRAPH).read_text())
    doc["nodes"][6]["args"] = [{"node": "no_such_node"}]
    data = json.dumps(doc).encode()
    (d / GRAPH).write_bytes(data)
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["files"][GRAPH] = {"bytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
    (d / MANIFEST).write_text(json.dumps(manifest))


DAMAGE = {
    "truncated": (damage_truncate, r"tensors\.safetensors: \d+ bytes, manifest says \d+; the capture is truncated"),
    "byte flipped": (damage_flip_byte, r"tensors\.safetensors: checksum mismatch"),
    "graph edited": (damage_edit_graph, r"graph\.json: .*(checksum mismatch|bytes, manifest says)"),
    "future version": (damage_future_version, r"capture format version 99; this fxdiff reads versions 2, 3"),
    "bad manifest": (damage_bad_manifest, r"manifest\.json: not valid JSON"),
    "no tensors": (lambda d: (d / TENSORS).unlink(), r"tensors\.safetensors: missing; the capture is incomplete"),
    "no graph": (lambda d: (d / GRAPH).unlink(), r"graph\.json: missing; the capture is incomplete"),
    "no manifest": (lambda d: (d / MANIFEST).unlink(), r"no manifest\.json; not an fxdiff capture"),
    "malformed graph": (damage_edit_graph_and_checksum, r"graph\.json: node '\w+': argument refers to node 'no_such_node', which does not come before it"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, conformer_capture):
    path = tmp_path_factory.mktemp("store") / "good"
    fxdiff.save(conformer_capture, path)
    return path


def copy_of(saved, tmp_path):
    import shutil
    return pathlib.Path(shutil.copytree(saved, tmp_path / "c"))


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_capture_gives_a_clear_error(tmp_path, saved, kind):
    damage, message = DAMAGE[kind]
    d = copy_of(saved, tmp_path)
    damage(d)
    with pytest.raises(FxdiffError, match=message):
        fxdiff.load(d)


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fxdiff.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("kind, command", [("truncated", "inspect"), ("future version", "compare")])
def test_damaged_capture_on_the_command_line_is_one_line_and_exit_2(tmp_path, saved, kind, command):
    damage, message = DAMAGE[kind]
    d = copy_of(saved, tmp_path)
    damage(d)
    result = run_cli(command, d, *([saved] if command == "compare" else []))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("fxdiff: error: ") and re.search(message, lines[0]), lines[0]


def test_not_a_capture_directory(tmp_path):
    with pytest.raises(FxdiffError, match="not a capture directory"):
        fxdiff.load(tmp_path / "missing")


# -- never unpickled ------------------------------------------------------------------------------

class Trap:
    """Unpickling this touches a marker file: proof that the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pt_file_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": torch.ones(2), "payload": Trap(marker)}, tmp_path / "inputs.pt")
    with pytest.raises(FxdiffError, match=r"inputs .*inputs\.pt: cannot be loaded safely \(weights_only=True\): "
                                          r"it holds a pickled \S+, which would run code to load"):
        specs.load_inputs(str(tmp_path / "inputs.pt"))
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": Trap(marker)}, tmp_path / "model.ckpt")
    with pytest.raises(FxdiffError, match=r"checkpoint .*model\.ckpt: cannot be loaded safely"):
        specs.read_state_dict(str(tmp_path / "model.ckpt"))
    assert not marker.exists()


def nemo(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_nemo_archive_with_an_escaping_member_is_refused(tmp_path):
    weights = io.BytesIO()
    torch.save({"w": torch.ones(2)}, weights)
    archive = tmp_path / "inner" / "model.nemo"
    archive.parent.mkdir()
    nemo(archive, {"model_config.yaml": b"a: 1", "../escaped.txt": b"x", "model_weights.ckpt": weights.getvalue()})
    with pytest.raises(FxdiffError, match=r"unsafe archive member '\.\./escaped\.txt'"):
        specs.read_state_dict(str(archive))
    assert not (tmp_path / "escaped.txt").exists()
    nemo(archive, {"/abs/model_weights.ckpt": weights.getvalue()})
    with pytest.raises(FxdiffError, match="unsafe archive member"):
        specs.read_state_dict(str(archive))


def test_loading_a_capture_never_unpickles(tmp_path, saved):
    """Loading runs with an audit hook that fails on any unpickling (the ``pickle.find_class`` event)."""
    code = (
        "import sys\n"
        "def hook(event, args):\n"
        "    if event == 'pickle.find_class':\n"
        "        raise RuntimeError(f'unpickled {args}')\n"
        "import torch, fxdiff\n"
        "sys.addaudithook(hook)\n"
        f"cap = fxdiff.load({str(saved)!r})\n"
        "print(len(cap.values))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 100


# -- atomic writes ------------------------------------------------------------------------------

def test_failed_save_keeps_the_previous_capture_and_leaves_no_debris(tmp_path, conformer_capture):
    path = tmp_path / "c"
    fxdiff.save(conformer_capture, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    broken = fxdiff.Capture(**{**conformer_capture.__dict__,
                               "values": {**conformer_capture.values, "zz_meta": torch.empty(4, device="meta")}})
    with pytest.raises(FxdiffError, match="cannot store value/zz_meta: a torch.strided tensor on meta"):
        fxdiff.save(broken, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    fxdiff.load(path)


def test_save_replaces_a_capture_but_never_another_directory(tmp_path, conformer_capture):
    model, args, kwargs, loss = build("mlp")
    small = fxdiff.capture(model, args, kwargs)
    fxdiff.save(conformer_capture, tmp_path / "c")
    fxdiff.save(small, tmp_path / "c")
    assert len(fxdiff.load(tmp_path / "c").values) == len(small.values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FxdiffError, match="exists and is not an fxdiff capture"):
        fxdiff.save(small, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_save_failing_midway_through_the_tensors_keeps_the_previous_capture(tmp_path):
    """The file size limit (RLIMIT_FSIZE) makes the write fail part way through, as a full disk would."""
    code = (
        "import errno, resource, signal, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "import torch, fxdiff\n"
        "from tiny_models import build\n"
        "model, args, kwargs, _ = build('conformer')\n"
        "cap = fxdiff.capture(model, args, kwargs)\n"
        f"fxdiff.save(cap, {str(tmp_path / 'c')!r})\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "try:\n"
        f"    fxdiff.save(cap, {str(tmp_path / 'c')!r})\n"
        "except fxdiff.FxdiffError as e:\n"
        "    print('failed', 'File too large' in str(e))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "failed True"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert (tmp_path / "c" / TENSORS).stat().st_size > 1 << 20
    assert len(fxdiff.load(tmp_path / "c").values) > 100


# -- large captures: aligned blobs, pages handed back, digest checked while comparing ---------------

def test_blobs_start_aligned_and_load_without_copies(tmp_path, saved):
    from fxdiff.store import tensor_file

    raw = (saved / TENSORS).read_bytes()
    head_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + head_len])
    header.pop("__metadata__")
    assert (8 + head_len) % 64 == 0
    assert all((8 + head_len + entry["data_offsets"][0]) % 64 == 0 for entry in header.values())
    loaded = fxdiff.load(saved)
    mappings = list(tensor_file._MAPPINGS.items())
    for t in loaded.values.values():
        if t.numel():   # a view of the mapped file, not a copy
            ptr = t.untyped_storage().data_ptr()
            assert any(base <= ptr < base + size for base, (size, _) in mappings)


def test_unaligned_files_of_older_versions_still_load(tmp_path, conformer_capture, monkeypatch):
    from fxdiff.store import tensor_file

    monkeypatch.setattr(tensor_file, "_FILE_ALIGN", 1)   # blobs anywhere, as fxdiff wrote them before
    fxdiff.save(conformer_capture, tmp_path / "old")
    monkeypatch.undo()
    assert_same_capture(conformer_capture, fxdiff.load(tmp_path / "old"))


def test_evicted_tensors_read_the_same(saved, conformer_capture):
    from fxdiff.store import evict, trim

    loaded = fxdiff.load(saved)
    name, value = max(loaded.values.items(), key=lambda kv: kv[1].numel())
    before = value.clone()
    evict(value)
    assert torch.equal(value, before)
    trim()
    assert_same_structure(loaded.values, conformer_capture.values)
    evict(torch.ones(3), None)   # not mapped: left alone


@pytest.mark.parametrize("kind", ["byte flipped", "truncated"])
def test_compare_refuses_a_modified_capture_before_reporting(tmp_path, saved, kind):
    damage, message = DAMAGE[kind]
    d = copy_of(saved, tmp_path)
    damage(d)
    with pytest.raises(FxdiffError, match=message):
        fxdiff.compare(saved, d)
    with pytest.raises(FxdiffError, match=message):
        fxdiff.compare(d, saved)


def test_a_modified_header_is_reported_as_modified(tmp_path, saved):
    d = copy_of(saved, tmp_path)
    data = bytearray((d / TENSORS).read_bytes())
    data[20] ^= 0x20   # inside the JSON header
    (d / TENSORS).write_bytes(bytes(data))
    with pytest.raises(FxdiffError, match=r"checksum mismatch"):
        fxdiff.compare(saved, d)



def test_a_digest_check_begun_early_is_joined_and_a_change_after_it_caught(tmp_path, saved):
    """``fxdiff compare`` begins checking its captures before it imports torch (``digest.start``);
    the loader joins that check, and one of a file changed since is made again."""
    from fxdiff import digest
    d = copy_of(saved, tmp_path)
    digest.start(d)
    assert str(d / TENSORS) in digest._STARTED
    assert not fxdiff.compare(saved, d).diverged
    assert str(d / TENSORS) not in digest._STARTED   # joined, not left behind
    digest.start(d)
    digest._STARTED[str(d / TENSORS)][1].result()   # done: rewriting a file being read through a mapping faults
    DAMAGE["byte flipped"][0](d)
    with pytest.raises(FxdiffError, match="checksum mismatch"):
        fxdiff.compare(saved, d)
    digest.start(tmp_path / "nothing here")   # not a capture: left for the loader to report
    assert not any(f.startswith(str(tmp_path / "nothing here")) for f in digest._STARTED)

# -- captures written while the model runs (capture(stream_to=...), the CLI's -o) ----------------

@pytest.mark.parametrize("name", ["conformer", "gpt2", "mha"])
def test_streamed_capture_equals_a_saved_one(tmp_path, name):
    model, args, kwargs, loss = build(name)
    saved = fxdiff.load(fxdiff.save(fxdiff.capture(model, args, kwargs, loss=loss), tmp_path / "saved"))
    streamed = fxdiff.capture(model, args, kwargs, loss=loss, stream_to=tmp_path / "streamed")
    streamed.meta["started"] = saved.meta["started"]
    assert_same_capture(saved, streamed)
    manifest = json.loads((tmp_path / "streamed" / MANIFEST).read_text())
    assert manifest["version"] == 4 and "xxh3_64_header" in manifest["files"][TENSORS]
    sizes = [(tmp_path / d / TENSORS).stat().st_size for d in ("saved", "streamed")]
    assert sizes[1] < sizes[0] * 1.1 + (2 << 20)   # views written once here too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "streamed"]   # no debris, no lock


class EmptyAfterLarge(torch.nn.Module):
    """Large values, each followed by empty ones, while the large ones may still wait to be copied."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(256, 256)

    def forward(self, x):
        for _ in range(4):
            x = self.lin(x)
            x = x + x[:, :0].sum() + x.new_zeros(0).sum()
        return x


def test_streamed_capture_with_empty_tensors_reads_back(tmp_path):
    torch.manual_seed(0)
    model, x = EmptyAfterLarge(), torch.randn(4096, 256)
    saved = fxdiff.load(fxdiff.save(fxdiff.capture(model, (x,)), tmp_path / "saved"))
    for i in range(3):
        streamed = fxdiff.capture(model, (x,), stream_to=tmp_path / "streamed")
        assert any(v.numel() == 0 for v in streamed.values.values())
        loaded = fxdiff.load(tmp_path / "streamed")
        loaded.meta["started"] = saved.meta["started"]
        assert_same_capture(saved, loaded)


def test_the_writer_hands_whole_blocks_over_early_and_keeps_the_rest(tmp_path):
    """``_Writer.flush_whole`` (a streamed run's end): the whole blocks buffered go to disk at once,
    the rest stays buffered in order; the file and its digest are those of the bytes written, the
    parts of one write (empty ones, ones across a buffer's end) in order."""
    from fxdiff.store.tensor_file import _Writer
    data = torch.randint(0, 256, (3 * _Writer.CHUNK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cuts = [0, 10, 4096, 5000, 9000, _Writer.CHUNK - 3, _Writer.CHUNK + 4096 * 3 + 7, 2 * _Writer.CHUNK + 1, len(data)]
    with _Writer(tmp_path / "f", base=4096) as writer:
        for lo, hi in zip(cuts, cuts[1:]):
            mid = (lo + hi) // 2
            writer.write([data[lo:mid], data[mid:mid], data[mid:hi]])
            writer.flush_whole()
            writer.flush_whole()   # nothing whole left: no write
        writer.submit_rest()
    written = (tmp_path / "f").read_bytes()
    assert len(written) == 4096 + len(data) and written[4096:] == data.numpy().tobytes()
    assert writer.digest == xxhash.xxh3_64_hexdigest(data.numpy().tobytes())


def test_views_of_one_block_put_together_are_one_blob_the_reader_accepts(tmp_path):
    """``put_all``: slices of one block (a GPU summary capture's samples, on the host) are written as
    one blob, the span they cover, gaps between them included; a slice of a blob already written is
    a view of it; the file passes the reader's layout checks."""
    from fxdiff.store.stream import TensorStream
    from fxdiff.store.tensor_file import read_tensors

    block, other = torch.randn(1000), torch.randn(64)
    tensors = {f"value/s{i}": block[i * 30 + 3:i * 30 + 20] for i in range(30)}
    tensors["value/bf16"] = block[950:990].view(torch.bfloat16)
    tensors["value/alone"] = other[8:40]
    stream = TensorStream(tmp_path / TENSORS)
    stream.put("grad/whole", other)
    stream.put_all(tensors)
    size, digest = stream.close()
    assert len(stream._blobs) == 2
    for read in (stream.mapped(tmp_path / TENSORS), read_tensors(tmp_path / TENSORS, size, digest)):
        assert read.keys() == {*tensors, "grad/whole"}
        assert all(torch.equal(read[k], t) for k, t in tensors.items())


class WritesItsWeights(torch.nn.Module):
    """Writes its weights in forward where no version counter sees it, and swaps one's storage."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        self.a.weight.data.mul_(2)
        self.b.weight.data = self.b.weight.data * 3
        return y


@pytest.mark.parametrize("spill_at", [0, 1 << 40], ids=["copies in a file", "copies in memory"])
def test_a_streamed_capture_keeps_the_weights_the_run_used_and_puts_them_back(tmp_path, monkeypatch, spill_at):
    """Streamed, the copies of the parameters taken before the run go to a file, not memory, from
    ``SPILL_AT`` bytes of them."""
    from fxdiff.record import session
    monkeypatch.setattr(session, "SPILL_AT", spill_at)
    torch.manual_seed(0)
    model, x = WritesItsWeights(), torch.randn(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held = fxdiff.capture(model, (x,))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    streamed = fxdiff.capture(model, (x,), stream_to=tmp_path / "s")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(streamed.params[k], v) for k, v in before.items())
    streamed.meta["started"] = held.meta["started"]
    assert_same_capture(held, streamed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


class ClipsItsGradients(torch.nn.Module):
    """The hook of the parameter whose gradient is accumulated last rescales another's gradient in
    place, after that one was accumulated (gradient clipping done inside backward)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.b.weight.register_post_accumulate_grad_hook(self.clip)

    def clip(self, _):
        self.a.weight.grad.mul_(0.5)

    def forward(self, x):
        return self.a(torch.tanh(self.b(x)))


@pytest.mark.parametrize("name", ["gpt2", "clips"])
def test_streamed_parameter_gradients_go_to_disk_during_backward(tmp_path, monkeypatch, name):
    """Each parameter's gradient is handed to the stream once backward has accumulated it, not after
    the run: finishing finds them written. One the model rewrites afterwards is stored as it was left."""
    from fxdiff.store.stream import CaptureStream
    if name == "gpt2":
        model, args, kwargs, loss = build("gpt2")
    else:
        torch.manual_seed(0)
        model, args, kwargs, loss = ClipsItsGradients(), (torch.randn(4, 8),), {}, None
    held = fxdiff.capture(model, args, kwargs, loss=loss)
    written = []
    finish = CaptureStream.finish

    def noting(self, capture, targets=None):
        written.append({k for k in self.tensors._views if k.startswith("param_grad/")})
        return finish(self, capture, targets)
    monkeypatch.setattr(CaptureStream, "finish", noting)
    streamed = fxdiff.capture(model, args, kwargs, loss=loss, stream_to=tmp_path / "s")
    # the rewrite is caught and the run recorded again, copying: its gradients are handed over after it
    assert written[-1] == (set() if name == "clips" else {f"param_grad/{k}" for k in held.param_grads})
    streamed.meta["started"] = held.meta["started"]
    assert_same_capture(held, streamed)
    loaded = fxdiff.load(tmp_path / "s")
    loaded.meta["started"] = held.meta["started"]
    assert_same_capture(held, loaded)


def test_streamed_header_grows_past_its_reserve(tmp_path, conformer_capture, monkeypatch):
    from fxdiff.store import stream

    model, args, kwargs, loss = build("conformer")
    monkeypatch.setattr(stream, "HEADER", 4096)
    streamed = fxdiff.capture(model, args, kwargs, loss=loss, stream_to=tmp_path / "s", meta={"note": "round trip"})
    streamed.meta["started"] = conformer_capture.meta["started"]
    assert_same_capture(conformer_capture, streamed)


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_modified_streamed_capture_is_refused(tmp_path, where):
    model, args, kwargs, loss = build("mha")
    fxdiff.capture(model, args, kwargs, loss=loss, stream_to=tmp_path / "s")
    data = bytearray((tmp_path / "s" / TENSORS).read_bytes())
    data[20 if where == "header" else len(data) - 30] ^= 0x04
    (tmp_path / "s" / TENSORS).write_bytes(bytes(data))
    with pytest.raises(FxdiffError, match="checksum mismatch"):
        fxdiff.load(tmp_path / "s")


def test_a_streamed_capture_is_held_to_what_a_saved_one_promises(tmp_path):
    """A streamed capture keeps every tensor, as a saved one does: its inputs must be its
    placeholders' values (checked on loading, as for version 3), and its version must be 4."""
    import fuzzing as fz   # its safetensors editor and manifest fixer
    model, args, kwargs, loss = build("mha")
    fxdiff.capture(model, args, kwargs, loss=loss, stream_to=tmp_path / "s")
    st = fz.Safetensors.read(tmp_path / "s" / TENSORS)
    views = st.views
    key = next(k for k in views if k.startswith("input."))
    views[key][2][0] -= 1   # the stored input is a slice of the placeholder's value
    st.views = views
    st.write(tmp_path / "s" / TENSORS)
    fz.fix_manifest(tmp_path / "s")
    with pytest.raises(FxdiffError, match="inputs"):
        fxdiff.load(tmp_path / "s")
    fxdiff.capture(model, args, kwargs, loss=loss, stream_to=tmp_path / "t")
    manifest = json.loads((tmp_path / "t" / MANIFEST).read_text())
    manifest["version"] = 3
    (tmp_path / "t" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FxdiffError, match="says version 3"):
        fxdiff.load(tmp_path / "t")


def test_a_failing_streamed_capture_leaves_the_previous_one_and_no_debris(tmp_path):
    model, args, kwargs, loss = build("mlp")
    fxdiff.capture(model, args, kwargs, stream_to=tmp_path / "s")
    before = (tmp_path / "s" / TENSORS).read_bytes()

    def bad_loss(out):
        raise ValueError("no loss today")
    with pytest.raises(fxdiff.UserCodeError):
        fxdiff.capture(model, args, kwargs, loss=bad_loss, stream_to=tmp_path / "s")
    assert (tmp_path / "s" / TENSORS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
