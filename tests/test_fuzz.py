"""Bad input never crashes fxdiff, and nothing bad is accepted silently.

A seeded fuzzing campaign (mutated captures through ``inspect``, ``compare GOOD MUTATED`` and
``fxdiff.load``; bad command lines; hostile checkpoints; mutated reports), then one targeted test
per known failure. Each runs in process through the click CLI; ``tests/fuzzing.py`` holds the
mutators and the outcome classes. ``benchmarks/fuzz.py`` is the long run.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzzing as fz  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("FXDIFF_FUZZ_SEED", "20261203"))
N_MUTATIONS = int(os.environ.get("FXDIFF_FUZZ_CASES", "100"))
N_LINES = int(os.environ.get("FXDIFF_FUZZ_LINES", "120"))
N_REPORTS = 10
TIMEOUT = 10.0   # seconds per case: a compare of the tiny capture takes well under one
SILENT_RATE = 0.01


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    good, spec = fz.make_good_capture(work)
    return {"work": work, "good": good, "spec": spec}


def fresh(env, name: str) -> Path:
    """A copy of the good capture under a new name."""
    path = env["work"] / name
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(env["good"], path)
    return path


def summary(results) -> str:
    bad = [r for r in results if r.outcome in fz.BAD]
    lines = [fz.table(results), "", "crash sites and silent classes:"]
    for site, kinds in fz.sites(results).items():
        lines.append(f"  {site}: {', '.join(kinds[:6])}{' ...' if len(kinds) > 6 else ''}")
    lines += ["", "first bad cases:"] + [f"  {r.outcome} {r.kind} {r.command} exit={r.exit_code} {r.detail[:100]} "
                                        f"| {r.message[:100]} | {r.site}" for r in bad[:25]]
    return "\n".join(lines)


def assert_campaign(results, silent_rate=SILENT_RATE):
    counts = {o: sum(r.outcome == o for r in results) for o in fz.OUTCOMES}
    crashes = {o: counts[o] for o in ("traceback", "internal", "hang", "executed", "unclear")}
    ok = not any(crashes.values()) and counts["silent"] <= silent_rate * len(results)
    assert ok, f"{crashes}, silent {counts['silent']}/{len(results)}\n{summary(results)}"


# -- the campaign --------------------------------------------------------------------------------

def test_fuzz_mutated_captures(env):
    """Every mutation family, then random ones: inspect, compare GOOD MUTATED and fxdiff.load."""
    mutator = fz.Mutator(env["good"], seed=SEED, work=env["work"])
    results = []
    for mut in mutator.generate(N_MUTATIONS):
        results += fz.run_mutation(mut, env["good"], env["work"], timeout=TIMEOUT)
    assert_campaign(results)


def test_fuzz_command_lines(env):
    """Bad command lines (the generator makes over 200 distinct ones; a seeded sample with every
    kind runs here, all of them in benchmarks/fuzz.py): each refused with one clear line, exit 2."""
    lines = fz.bad_command_lines(env["good"], env["spec"], env["work"] / "cli")
    assert len({tuple(line.args) for line in lines}) >= 200
    sample = fz.sample_lines(lines, N_LINES, random.Random(SEED))
    results = [fz.run_bad_line(line, timeout=TIMEOUT) for line in sample]
    assert_campaign(results, silent_rate=0)


def test_fuzz_reports(env):
    """Mutated compare --json reports through render and view --no-open."""
    report = fz.good_report(env["good"], env["work"])
    results = []
    for kind, doc in fz.report_mutations(report, random.Random(SEED), N_REPORTS):
        for command in ("render", "view"):
            results.append(fz.run_report_case(kind, doc, env["work"], command, timeout=TIMEOUT))
    assert_campaign(results)


# -- helpers for the targeted tests ------------------------------------------------------------

def cli(*args, timeout=60):
    return fz.run_cli([str(a) for a in args], timeout=timeout)


def assert_clear(res, *needles):
    """Exit 2, no traceback, stderr one line ``fxdiff: error: ...`` (or click's own ``Error:`` line
    for an option value it parses) that names every needle."""
    text = res.stdout + res.stderr
    assert res.exception is None and not res.timed_out and "Traceback" not in text, \
        f"crashed: {res.tb or text[-2000:]}"
    assert res.exit_code == 2, f"exit {res.exit_code}, expected 2\n{text[-1500:]}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    ours = len(lines) == 1 and lines[0].startswith("fxdiff: error:")
    clicks = [ln for ln in lines if ln.startswith("Error:")]
    assert ours or len(clicks) == 1, f"not one clear line: {res.stderr!r}"
    line = lines[0] if ours else clicks[0]
    for needle in needles:
        assert str(needle) in line, f"{needle!r} not named in {line!r}"
    return line


def assert_refused_capture(env, mutate, *needles):
    """``mutate`` a copy of the good capture: inspect, compare and fxdiff.load all refuse it."""
    import fxdiff
    cap = fresh(env, "targeted.fxd")
    mutate(cap)
    assert_clear(cli("inspect", cap), *needles)
    assert_clear(cli("compare", env["good"], cap), *needles)
    with pytest.raises(fxdiff.FxdiffError):
        fxdiff.load(cap)


def graph_edit(fn):
    def mutate(cap):
        doc = fz.read_json(cap, fz.GRAPH)
        fn(doc)
        fz.write_json(cap, fz.GRAPH, doc)
    return mutate


def out_index(doc):
    return next(i for i, n in enumerate(doc["nodes"]) if n["op"] == "output")


def first_call(doc, used=True):
    refs = {r for n in doc["nodes"] for r in fz._node_refs(n["args"])}
    return next(i for i, n in enumerate(doc["nodes"]) if n["op"] == "call_function" and (n["name"] in refs or not used))


def views_of(cap):
    return fz.Safetensors.read(cap / fz.TENSORS).views


# -- graph.json ---------------------------------------------------------------------------------

def test_graph_without_output_is_refused(env):
    """Was: inspect exit 0, compare StopIteration."""
    assert_refused_capture(env, graph_edit(lambda d: d["nodes"].pop(out_index(d))), "graph.json", "output")


def test_empty_graph_is_refused(env):
    """Was: StopIteration."""
    assert_refused_capture(env, graph_edit(lambda d: d.__setitem__("nodes", [])), "graph.json")


def test_second_output_node_is_refused(env):
    def second(d):
        out = dict(d["nodes"][out_index(d)], name="output_1")
        d["nodes"].append(out)
    assert_refused_capture(env, graph_edit(second), "graph.json", "output")


def test_illegal_op_name_is_refused(env):
    """Was: AssertionError from torch.fx."""
    def bad_op(d):
        d["nodes"][first_call(d)]["op"] = "call_method2"
    assert_refused_capture(env, graph_edit(bad_op), "graph.json", "call_method2")


def test_non_dict_kwargs_is_refused(env):
    """Was: AssertionError from torch.fx."""
    def bad_kwargs(d):
        d["nodes"][first_call(d)]["kwargs"] = [1, 2]
    assert_refused_capture(env, graph_edit(bad_kwargs), "graph.json")


def test_non_string_module_path_is_refused(env):
    """Was: a rich error (a traceback) from printing a module path that is an int."""
    def bad_module(d):
        for n in d["nodes"]:
            if n["op"] == "call_function":
                n["meta"]["fxdiff_module"] = 3
    assert_refused_capture(env, graph_edit(bad_module), "graph.json")


def test_args_referring_to_a_later_node_are_refused(env):
    def later(d):
        i = first_call(d)
        d["nodes"][i]["args"] = {"tuple": [{"node": d["nodes"][out_index(d) - 1]["name"]}]}
    assert_refused_capture(env, graph_edit(later), "graph.json")


def test_meta_shape_inconsistent_with_tensor_is_refused(env):
    def shape(d):
        i = first_call(d)
        d["nodes"][i]["meta"]["fxdiff_shape"] = [x + 1 for x in d["nodes"][i]["meta"]["fxdiff_shape"]]
    assert_refused_capture(env, graph_edit(shape), "graph.json")


def test_target_rewritten_without_its_metadata_is_refused(env):
    """graph.json's ``target`` says one op, the node's ``fxdiff_target`` meta another."""
    def retarget(d):
        n = d["nodes"][first_call(d)]
        n["target"] = "torch.sub" if n["target"] != "torch.sub" else "torch.add"
    assert_refused_capture(env, graph_edit(retarget), "graph.json")


@pytest.mark.parametrize("target,module", [("os.system", None), ("builtins.eval", None), ("subprocess.run", None),
                                           ("this.x", "this"), ("http.server.test", "http.server")])
def test_targets_outside_torch_are_refused_and_never_imported(env, target, module):
    """Loading resolves stored target names: a name outside torch must be refused, not imported."""
    def evil(d):
        n = d["nodes"][first_call(d)]
        n["target"] = n["meta"]["fxdiff_target"] = target
    with fz.ModuleWatch([module] if module else []) as watch:
        assert_refused_capture(env, graph_edit(evil), target)
    assert not watch.imported, f"loading a capture imported {watch.imported}"


def test_target_naming_a_module_beside_the_spec_is_never_imported(env, tmp_path):
    """A target ``fz_payload.run`` would import ``fz_payload.py`` from any directory on sys.path."""
    marker = tmp_path / "payload.marker"
    (tmp_path / "fz_payload_targeted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nrun = print\n")
    sys.path.insert(0, str(tmp_path))
    try:
        def evil(d):
            n = d["nodes"][first_call(d)]
            n["target"] = n["meta"]["fxdiff_target"] = "fz_payload_targeted.run"
        with fz.ModuleWatch(["fz_payload_targeted"]) as watch:
            assert_refused_capture(env, graph_edit(evil), "fz_payload_targeted.run")
    finally:
        sys.path.remove(str(tmp_path))
    assert not marker.exists() and not watch.imported


def test_isolated_replay_never_calls_a_non_torch_target(env, tmp_path):
    """os.system with a string argument at a diverging node: the replay must not run it."""
    marker = tmp_path / "replay.marker"
    cap = fresh(env, "replay.fxd")
    doc = fz.read_json(cap, fz.GRAPH)
    i = first_call(doc)
    n = doc["nodes"][i]
    n["target"] = n["meta"]["fxdiff_target"] = "os.system"
    n["args"], n["kwargs"] = {"tuple": [f"touch {marker}"]}, {"dict": {}}
    fz.write_json(cap, fz.GRAPH, doc)
    fz._edit_view_bytes(cap, f"value/{n['name']}", random.Random(0), detach=True)
    res = cli("compare", env["good"], cap)
    assert not marker.exists(), "compare ran os.system from a capture"
    assert_clear(res, "os.system")


# -- manifest.json and files -------------------------------------------------------------------

def test_manifest_that_is_a_directory_is_refused(env):
    """Was: IsADirectoryError."""
    def mkdir(cap):
        (cap / fz.MANIFEST).unlink()
        (cap / fz.MANIFEST).mkdir()
    cap = fresh(env, "targeted.fxd")
    mkdir(cap)
    assert_clear(cli("inspect", cap), "manifest.json")
    assert_clear(cli("compare", env["good"], cap), "manifest.json")


@pytest.mark.parametrize("kind", ["dir", "fifo"])
@pytest.mark.parametrize("name", [fz.GRAPH, fz.TENSORS])
def test_data_file_that_is_a_directory_or_fifo_is_refused(env, name, kind):
    cap = fresh(env, "targeted.fxd")
    (cap / name).unlink()
    os.mkfifo(cap / name) if kind == "fifo" else (cap / name).mkdir()
    assert_clear(cli("inspect", cap, timeout=20), name)
    assert_clear(cli("compare", env["good"], cap, timeout=20), name)   # its digest check starts early


# -- tensors.safetensors: edits that keep the checksums right -----------------------------------

def test_edited_parameter_value_is_a_divergence(env):
    """Was: the parameter dropped out of the parameter table and the verdict stayed MATCH."""
    cap = fresh(env, "targeted.fxd")
    key = next(k for k in views_of(cap) if k.startswith("param/") and k.endswith("weight"))
    fz._edit_view_bytes(cap, key, random.Random(0), detach=True)
    res = cli("compare", env["good"], cap, "--all")
    assert res.exception is None and res.exit_code == 1, res.stdout[-3000:] + res.tb
    assert key.split("/", 1)[1] in res.stdout, f"parameter {key} not in the report"


def test_edited_model_input_is_not_a_match(env):
    """Was: MATCH. The stored inputs no longer agree with the placeholder values."""
    cap = fresh(env, "targeted.fxd")
    key = next(k for k in views_of(cap) if k.startswith("input"))
    fz._edit_view_bytes(cap, key, random.Random(0), detach=True)
    res = cli("compare", env["good"], cap)
    assert res.exception is None and res.exit_code in (1, 2), res.stdout[-2000:] + res.tb
    if res.exit_code == 2:
        assert_clear(res)


def test_edited_value_of_an_uncompared_node_is_not_a_match(env):
    """Was: MATCH. Integer and bool values (masks, aranges) are data too."""
    cap = fresh(env, "targeted.fxd")
    views = views_of(cap)
    key = next(k for k in views if k.startswith("value/") and views[k][1] in ("int64", "bool") and views[k][2])
    fz._edit_view_bytes(cap, key, random.Random(0), detach=True)
    res = cli("compare", env["good"], cap)
    assert res.exception is None and res.exit_code in (1, 2), f"{key}: exit {res.exit_code}"


@pytest.mark.parametrize("how", ["shape", "dtype"])
def test_view_reinterpreted_against_its_node_meta_is_refused(env, how):
    """Was: MATCH. A value whose view no longer has the node's recorded shape/dtype."""
    def reinterpret(cap):
        st = fz.Safetensors.read(cap / fz.TENSORS)
        views = st.views
        key = next(k for k in views if k.startswith("value/") and views[k][1] == "float32" and len(views[k][2]) >= 2
                   and views[k][2][-1] != views[k][2][-2])
        blob, dtype, shape, stride, off = views[key]
        if how == "shape":
            shape = list(reversed(shape))
            stride = fz._contig(shape)
        else:
            dtype = "int32"
        views[key] = [blob, dtype, shape, stride, off]
        st.views = views
        st.write(cap / fz.TENSORS)
        fz.fix_manifest(cap)
    assert_refused_capture(env, reinterpret)


# -- command lines -----------------------------------------------------------------------------

def spec(env, fn):
    return f"{env['spec']}:{fn}"


def capture_args(env, model="build", inputs="inputs", loss="loss", out=None):
    return ["capture", spec(env, model), "--inputs", spec(env, inputs), "--loss", spec(env, loss),
            "-o", out or env["work"] / "cl_out.fxd"]


# A failure in the user's own code: exit 2, one line naming the user's file (and line).

def test_model_builder_that_raises_oserror(env):
    assert_clear(cli(*capture_args(env, model="build_oserror")), "fz_tiny.py")


def test_model_forward_assertion(env):
    assert_clear(cli(*capture_args(env, model="build_forward_assert")), "user assertion", "fz_tiny.py")


def test_inputs_function_that_raises_oserror(env):
    assert_clear(cli(*capture_args(env, inputs="inputs_oserror")), "fz_tiny.py")


def test_inputs_function_that_asserts(env):
    assert_clear(cli(*capture_args(env, inputs="inputs_assert")), "fz_tiny.py")


def test_user_code_memory_error(env):
    assert_clear(cli(*capture_args(env, model="build_memory")), "fz_tiny.py")


def test_user_code_calling_sys_exit(env):
    assert_clear(cli(*capture_args(env, model="build_sys_exit")), "fz_tiny.py")


def test_loss_that_asserts(env):
    assert_clear(cli(*capture_args(env, loss="loss_assert")), "the user's loss asserts", "fz_tiny.py")


def test_loss_that_raises_live_compare(env):
    assert_clear(cli("compare", env["good"], spec(env, "build"), "--loss", spec(env, "loss_assert")), "fz_tiny.py")


@pytest.mark.parametrize("loss", ["loss_nograd", "loss_constant", "loss_int_tensor"])
def test_loss_without_grad_path_is_refused(env, loss):
    """Was: accepted, a capture with 0 gradients."""
    assert_clear(cli(*capture_args(env, loss=loss)), "--loss", loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_gpu(env, device):
    """Was: AssertionError 'Torch not compiled with CUDA enabled'."""
    assert_clear(cli(*capture_args(env), "--device", device), "--device", device)
    assert_clear(cli("compare", env["good"], spec(env, "build"), "--device", device), "--device", device)


@pytest.mark.parametrize("out", ["/proc/x", "/proc/self/x.fxd", "/sys/x"])
def test_output_where_nothing_can_be_written(env, out):
    """Was: FileNotFoundError / PermissionError from mkdtemp."""
    assert_clear(cli(*capture_args(env, out=out)), out)


def test_output_under_a_file(env):
    parent = env["work"] / "a_file"
    parent.write_text("x")
    assert_clear(cli(*capture_args(env, out=parent / "sub.fxd")), str(parent))


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("option", ["--atol", "--rtol"])
def test_bad_tolerance_is_refused(env, option, value):
    """Was: accepted (nan matches nothing, -1 everything diverges, inf everything matches)."""
    assert_clear(cli("compare", env["good"], env["good"], option, value), option)


def test_map_that_is_a_directory(env):
    """Was: IsADirectoryError."""
    d = env["work"] / "map_dir.yaml"
    d.mkdir(exist_ok=True)
    assert_clear(cli("compare", env["good"], env["good"], "--map", d), "--map", str(d))


def test_malformed_yaml_map_is_one_line(env):
    bad = env["work"] / "bad_map.yaml"
    bad.write_text("modules: [\n  - [unclosed\n")
    assert_clear(cli("compare", env["good"], env["good"], "--map", bad), "--map", str(bad))


def test_json_into_a_missing_directory(env):
    """Was: FileNotFoundError after the whole comparison ran."""
    target = env["work"] / "no_such_dir" / "r.json"
    assert_clear(cli("compare", env["good"], env["good"], "--json", target), "--json", str(target))


def test_json_onto_a_directory(env):
    d = env["work"] / "json_dir"
    d.mkdir(exist_ok=True)
    assert_clear(cli("compare", env["good"], env["good"], "--json", d), "--json", str(d))


@pytest.mark.parametrize("args", [["--json"], ["--model-explorer"]])
def test_compare_output_onto_a_fifo_is_refused_and_left_alone(env, tmp_path, args):
    """An existing output that is not a regular file (here a FIFO; /dev/full once got replaced by a
    regular file) is refused before the comparison, and stays what it was."""
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    assert_clear(cli("compare", env["good"], env["good"], *args, fifo), args[0], str(fifo))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_map_params_output_onto_a_fifo_is_refused_and_left_alone(env, tmp_path):
    fifo = tmp_path / "m.json"
    os.mkfifo(fifo)
    assert_clear(cli("map-params", env["good"], env["good"], "-o", fifo), "--output", str(fifo))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_atomic_write_refuses_a_fifo_and_writes_through_a_link(tmp_path):
    import fxdiff
    from fxdiff.util import atomic_write
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(fxdiff.FxdiffError, match="not a regular file"):
        atomic_write(fifo, "x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    link.symlink_to(real)
    atomic_write(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


@pytest.mark.parametrize("module", ["[/]", "[bold]x[/]", "a[/b]"])
def test_rich_markup_in_a_module_path_is_printed_as_text(env, module):
    """Was: rich.errors.MarkupError (a traceback) from a module path such as '[/]'."""
    cap = fresh(env, "markup.fxd")

    def retag(d):
        for n in d["nodes"]:
            if n["op"] == "call_function":
                n["meta"]["fxdiff_module"] = module
    graph_edit(retag)(cap)
    res = cli("inspect", cap)
    assert res.exit_code == 0 and module in res.stdout, res.stdout[-2000:] + res.stderr + res.tb
    res = cli("compare", env["good"], cap, "--all")
    assert res.exception is None and res.exit_code in (0, 1) and "Traceback" not in res.stderr, res.stderr + res.tb


def test_progress_line_prints_a_path_with_markup_as_text():
    """Was: rich.errors.MarkupError from the spinner of ``capture -o 'a[/]b.fxd'`` in a terminal."""
    import io
    from rich.console import Console
    from fxdiff import progress
    console = Console(file=io.StringIO(), force_terminal=True)
    with progress.shown(console, delay=0.0):
        with progress.step("saving a[/]b.fxd"):
            time.sleep(0.3)
    assert "a[/]b.fxd" in console.file.getvalue()


def test_report_field_of_the_wrong_type_is_named(env):
    """Was: TypeError/AttributeError deep in the drawing code (exit 3)."""
    doc = json.loads(fz.good_report(env["good"], env["work"]).read_text())
    doc["nodes"][0]["forward"]["passed"] = float("inf")
    bad = env["work"] / "report_bad_field.json"
    bad.write_text(json.dumps(doc))
    assert_clear(cli("render", bad, "--model-explorer", env["work"] / "me.json"), str(bad), "nodes[0].forward.passed")


def test_report_graph_node_without_a_name_is_named(env):
    """Was: KeyError 'name' in graphview (exit 3)."""
    doc = json.loads(fz.good_report(env["good"], env["work"]).read_text())
    doc["graph"]["cand"][0] = {"a": 1}
    bad = env["work"] / "report_no_name.json"
    bad.write_text(json.dumps(doc))
    assert_clear(cli("render", bad, "--model-explorer", env["work"] / "me.json"), str(bad), "graph.cand[0]")


def test_model_spec_that_takes_arguments(env):
    assert_clear(cli(*capture_args(env, model="build_takes_args")), "build_takes_args", "takes arguments")


@pytest.mark.parametrize("keys", [["args.x"], ["args.0", "args.2"], ["args.0", "feats"]])
def test_safetensors_inputs_with_bad_argument_keys(env, tmp_path, keys):
    """Was: ValueError from int('x'); a gap or a stray key silently shifted or dropped arguments."""
    from safetensors.torch import save_file
    path = tmp_path / "inputs.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    assert_clear(cli("capture", spec(env, "build"), "--inputs", path, "-o", tmp_path / "o.fxd"), "--inputs",
                 str(path))


def test_checkpoint_that_does_not_fit_the_model(env, tmp_path):
    """Was: RuntimeError from load_state_dict (exit 3)."""
    ckpt = tmp_path / "wrong.pt"
    torch.save({"inp.weight": torch.zeros(3)}, ckpt)
    assert_clear(cli(*capture_args(env), "--checkpoint", ckpt), "--checkpoint", "inp.weight")


def test_render_of_an_empty_path(env):
    """Was: IsADirectoryError on '.'."""
    assert_clear(cli("render", "", "--svg", env["work"] / "r.svg"))


def test_report_version_string_is_explained(env):
    """Was: 'report version 1; this fxdiff reads up to 1' for version "1"."""
    report = fz.good_report(env["good"], env["work"])
    doc = json.loads(report.read_text())
    doc["version"] = "1"
    bad = env["work"] / "report_v_str.json"
    bad.write_text(json.dumps(doc))
    for args in (["render", bad, "--svg", env["work"] / "v.svg"], ["view", bad, "--no-open", "-o", env["work"] / "v.html"]):
        line = assert_clear(cli(*args), str(bad))
        assert "'1'" in line or "integer" in line or "string" in line, line


# -- hostile checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", "zip.pt"])
def test_pickled_payload_checkpoint_never_runs(env, tmp_path, suffix):
    marker = tmp_path / "ran.marker"
    ckpt = tmp_path / f"evil{suffix}"
    if suffix == "zip.pt":
        fz.torch_zip_payload(ckpt, marker)
    else:
        ckpt.write_bytes(fz.pickle_payload(marker))
    assert_clear(cli(*capture_args(env), "--checkpoint", ckpt), str(ckpt))
    assert not marker.exists()


def test_pickled_payload_in_nemo_never_runs(env, tmp_path):
    marker = tmp_path / "ran.marker"
    nemo = tmp_path / "evil.nemo"
    fz.make_nemo(nemo, fz.pickle_payload(marker))
    assert_clear(cli(*capture_args(env), "--checkpoint", nemo), str(nemo))
    assert not marker.exists()


@pytest.mark.parametrize("member,kind", [("../escape.txt", "file"), ("a/../../escape.txt", "file"),
                                         ("/tmp/fxdiff_fuzz_abs.txt", "file"), ("link", "symlink"),
                                         ("hard", "hardlink")])
def test_nemo_with_unsafe_member_is_refused(env, tmp_path, member, kind):
    nemo = tmp_path / "unsafe.nemo"
    fz.make_nemo(nemo, fz.state_dict_bytes(), [(member, kind)])
    assert_clear(cli(*capture_args(env), "--checkpoint", nemo), str(nemo), member)


def test_nemo_member_over_the_size_cap_is_refused_before_reading(env, tmp_path, monkeypatch):
    """The cap on a .nemo member's size is checked on the tar header, before any byte is read.
    fxdiff.load.specs.NEMO_MEMBER_LIMIT holds the cap; a test lowers it."""
    from fxdiff.load import specs
    monkeypatch.setattr(specs, "NEMO_MEMBER_LIMIT", 1 << 20, raising=True)
    nemo = tmp_path / "big.nemo"
    fz.make_nemo(nemo, fz.state_dict_bytes() + bytes(2 << 20))
    assert_clear(cli(*capture_args(env), "--checkpoint", nemo), str(nemo), "model_weights.ckpt")


def test_nemo_with_a_3gib_member_is_not_read_into_memory(env, tmp_path):
    """A sparse .nemo whose model_weights.ckpt holds 3 GiB of zeros (not a checkpoint): refused
    with exit 2, quickly, by a process that may not allocate more than 1 GiB of heap."""
    nemo = tmp_path / "huge.nemo"
    fz.make_nemo_huge(nemo, 3 << 30)

    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))
    cmd = [sys.executable, "-c", "import sys; from fxdiff.cli import main; main(sys.argv[1:])",
           *capture_args(env), "--checkpoint", str(nemo)]
    start = time.perf_counter()
    p = subprocess.run([str(a) for a in cmd], capture_output=True, text=True, timeout=120, preexec_fn=limit,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("fxdiff: error:"), p.stderr
    assert time.perf_counter() - start < 60


# -- interrupted writes (the long kill -9 campaign is tests/test_save_kill.py) --------------------

def test_kill_between_the_two_renames_of_a_replace_leaves_a_capture(env):
    """The state a kill between ``os.replace(path, old)`` and ``os.replace(tmp, path)`` leaves:
    no capture under the name, the old one at ``.NAME.old``, the new one in ``.NAME.XXXX``.
    Loading the name must find a capture (the old or the new), and the next save tidies up."""
    import fxdiff
    name = env["work"] / "interrupted.fxd"
    old = name.with_name(f".{name.name}.old")
    tmp = name.with_name(f".{name.name}.k1ll3d.tmp")   # as tempfile.mkdtemp names it in save()
    for p in (name, old, tmp):
        shutil.rmtree(p, ignore_errors=True)
    shutil.copytree(env["good"], old)
    shutil.copytree(env["good"], tmp)
    res = cli("inspect", name)
    assert res.exit_code == 0, f"no capture under {name} after an interrupted replace: {res.stderr}"
    cap = fxdiff.load(name)
    fxdiff.save(cap, name)
    left = [p.name for p in name.parent.iterdir() if p.name.startswith(f".{name.name}.")]
    assert not left, f"temporary directories survived the next save: {left}"
