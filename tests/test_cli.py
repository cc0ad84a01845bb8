"""The command line: capture and compare in separate processes, and every run option."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import fxdiff
from fxdiff.cli import main
from tiny_models import conformer_specs

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECS = "examples/conformer/specs.py"



def fxdiff_process(*args):
    """Start ``python -m fxdiff.cli ARGS`` in its own process, from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fxdiff.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def test_the_command_line_imports_torch_only_for_commands_that_run_it():
    """``fxdiff --help`` answers without importing torch (seconds), and the package's names stay
    what they were however it is first imported (``fxdiff.load`` is the function, not the
    subpackage ``fxdiff/load``)."""
    code = ("import sys, fxdiff.cli; from click.testing import CliRunner; "
            "assert CliRunner().invoke(fxdiff.cli.main, ['--help']).exit_code == 0; "
            "assert 'torch' not in sys.modules; import fxdiff.api, fxdiff; "
            "assert callable(fxdiff.load) and fxdiff.load is fxdiff.api.load; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_capture_and_compare_in_separate_processes(tmp_path):
    specs = conformer_specs()
    ref = tmp_path / "ref"
    code, out, err = finish(fxdiff_process("capture", f"{SPECS}:reference", "--inputs", f"{SPECS}:inputs",
                                           "--loss", f"{SPECS}:loss", "-o", ref))
    assert code == 0, err
    assert "captured" in out and fxdiff.load(ref).meta["loss"].endswith("specs.py:loss")
    candidates = {"port": None, **{f"port_bug_{bug}": path for bug, path in specs.BUGS.items()}}
    assert all(hasattr(specs, name) for name in candidates)
    names = list(candidates)
    results = {}
    for pair in (names[i:i + 2] for i in range(0, len(names), 2)):  # two at a time: one per core
        running = {name: fxdiff_process("compare", ref, f"{SPECS}:{name}", "--json", tmp_path / f"{name}.json")
                   for name in pair}
        results.update({name: finish(process) for name, process in running.items()})
    for name, bug_module in candidates.items():
        code, out, err = results[name]
        report = json.loads((tmp_path / f"{name}.json").read_text())
        if bug_module is None:
            assert code == 0, f"{name}: {err or out[-2000:]}"
            assert report["verdict"] == "match"
            continue
        assert code == 1, f"{name}: {err}"
        first = report["first_divergence"]["forward"]
        assert first, f"{name}: no first forward divergence"
        modules = [entry["ref_module"] for entry in first]
        assert all(m == bug_module or m.startswith(bug_module + ".") for m in modules), \
            f"{name}: bug in {bug_module}, first divergence in {modules}"


# -- run options, in process ----------------------------------------------------------------------

SPEC_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, scale=None):
        h = self.drop(self.norm(self.lin(x)))
        return h * scale if scale is not None else h


def model():
    torch.manual_seed(0)
    return Net()


def inputs():
    return {"x": torch.randn(6, 4, generator=torch.Generator().manual_seed(1))}


def not_a_module():
    return 3


def model_in_inference_mode():
    with torch.inference_mode():   # a habit of inference scripts; autograd cannot run through its weights
        return model()


def bert():
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=20))


def bert_inputs():
    return {"input_ids": torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(0))}
'''


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec")
    (folder / "spec.py").write_text(SPEC_SOURCE)
    return folder / "spec.py"


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def capture(spec, tmp_path, *options, name="c"):
    result = cli("capture", f"{spec}:model", "-o", tmp_path / name, *options)
    assert result.exit_code == 0, result.stderr
    return fxdiff.load(tmp_path / name)


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxdiff: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_model_built_under_inference_mode_is_refused_in_one_line(spec, tmp_path):
    result = cli("capture", f"{spec}:model_in_inference_mode", "--inputs", f"{spec}:inputs", "-o", tmp_path / "c")
    one_line_error(result, "Net", "lin.weight", "torch.inference_mode()")
    assert not (tmp_path / "c").exists()


def test_inputs_from_safetensors_and_pt_files(spec, tmp_path):
    x = torch.randn(6, 4)
    save_file({"x": x}, tmp_path / "kw.safetensors")
    save_file({"args.0": x, "kwargs.scale": torch.tensor(2.0)}, tmp_path / "call.safetensors")
    torch.save({"args": [x], "kwargs": {"scale": torch.tensor(3.0)}}, tmp_path / "call.pt")
    kw = capture(spec, tmp_path, "--inputs", tmp_path / "kw.safetensors", name="kw")
    assert torch.equal(kw.inputs["kwargs"]["x"], x)
    call = capture(spec, tmp_path, "--inputs", tmp_path / "call.safetensors", name="st")
    assert torch.equal(call.inputs["args"][0], x) and float(call.inputs["kwargs"]["scale"]) == 2.0
    pt = capture(spec, tmp_path, "--inputs", tmp_path / "call.pt", name="pt")
    assert torch.equal(pt.inputs["args"][0], x) and float(pt.inputs["kwargs"]["scale"]) == 3.0
    assert torch.allclose(pt.outputs, 1.5 * call.outputs)


def other_weights():
    """A state dict for ``Net`` unlike the one it is built with."""
    torch.manual_seed(7)
    return {"lin.weight": torch.randn(3, 4), "lin.bias": torch.randn(3), "norm.weight": torch.rand(3) + 0.5,
             "norm.bias": torch.randn(3), "norm.running_mean": torch.randn(3), "norm.running_var": torch.rand(3) + 0.5,
             "norm.num_batches_tracked": torch.tensor(5)}


def write_nemo(path, weights: dict):
    blob = io.BytesIO()
    torch.save(weights, blob)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("./model_config.yaml", b"target: Net\n"), ("./model_weights.ckpt", blob.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("kind", ["pt", "safetensors", "ckpt", "nemo"])
def test_checkpoint_formats(spec, tmp_path, kind):
    state = other_weights()
    path = tmp_path / f"weights.{kind}"
    if kind == "pt":
        torch.save(state, path)
    elif kind == "safetensors":
        save_file(state, path)
    elif kind == "ckpt":  # Lightning: the module's weights under "state_dict", each key prefixed "model."
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3, "global_step": 40,
                    "hyper_parameters": {"lr": 0.1}}, path)
    else:
        write_nemo(path, state)
    cap = capture(spec, tmp_path, "--inputs", f"{spec}:inputs", "--checkpoint", path)
    for k, v in state.items():
        assert torch.equal(cap.params[k], v), k
    loaded = cap.meta["checkpoint"]
    assert loaded["missing"] == [] and loaded["unexpected"] == []
    assert loaded["stripped_prefix"] == ("model." if kind == "ckpt" else "")


def test_checkpoint_missing_and_unexpected_keys_are_reported(spec, tmp_path):
    state = other_weights()
    del state["norm.bias"]
    state["extra.weight"] = torch.ones(2)
    torch.save(state, tmp_path / "partial.pt")
    result = cli("capture", f"{spec}:model", "--inputs", f"{spec}:inputs", "--checkpoint", tmp_path / "partial.pt",
                 "-o", tmp_path / "c")
    assert result.exit_code == 0, result.stderr
    warning, = result.stderr.strip().splitlines()
    assert "partial.pt: 1 missing keys ['norm.bias'], 1 unexpected keys ['extra.weight']" in warning
    meta = fxdiff.load(tmp_path / "c").meta["checkpoint"]
    assert meta["missing"] == ["norm.bias"] and meta["unexpected"] == ["extra.weight"]
    # a live candidate given that checkpoint: the report says so (the missing bias is why it differs)
    assert cli("capture", f"{spec}:model", "--inputs", f"{spec}:inputs", "-o", tmp_path / "ref").exit_code == 0
    result = cli("compare", tmp_path / "ref", f"{spec}:model", "--checkpoint", tmp_path / "partial.pt",
                 "--json", tmp_path / "r.json")
    assert result.exit_code == 1, result.stderr
    line = "the candidate's checkpoint " + str(tmp_path / "partial.pt") + ": 1 missing keys ['norm.bias']"
    assert any(w.startswith(line) for w in json.loads((tmp_path / "r.json").read_text())["warnings"])
    assert f"fxdiff: warning: {line}" in result.stderr


def test_mode_seed_and_dtype(spec, tmp_path):
    run = ("--inputs", f"{spec}:inputs")
    evaluated = capture(spec, tmp_path, *run, name="eval")
    trained = capture(spec, tmp_path, *run, "--mode", "train", name="train")
    assert evaluated.meta["mode"] == "eval" and trained.meta["mode"] == "train"
    # train mode normalises with batch statistics and updates the running ones; eval mode does neither
    assert torch.equal(evaluated.params["norm.running_mean"], torch.zeros(3))
    assert not torch.equal(trained.params["norm.running_mean"], torch.zeros(3))
    seeded = [capture(spec, tmp_path, *run, "--mode", "train", "--keep-dropout", "--seed", s, name=f"s{i}")
              for i, s in enumerate((1, 1, 2))]
    assert seeded[0].meta["seed"] == 1
    assert torch.equal(seeded[0].outputs, seeded[1].outputs)
    assert not torch.equal(seeded[0].outputs, seeded[2].outputs)
    assert not torch.equal(seeded[0].outputs, trained.outputs), "--keep-dropout keeps dropout"
    double = capture(spec, tmp_path, *run, "--dtype", "float64", name="f64")
    assert double.meta["dtype"] == "float64"
    assert {v.dtype for v in double.values.values() if v.is_floating_point()} == {torch.float64}
    assert all(p.dtype == torch.float64 for k, p in double.params.items() if "num_batches" not in k)


def test_fx_tracer_option(spec, tmp_path):
    traced = capture(spec, tmp_path, "--inputs", f"{spec}:inputs", "--tracer", "fx")
    assert traced.meta["tracer"] == "fx"
    result = cli("capture", f"{spec}:bert", "--inputs", f"{spec}:bert_inputs", "--tracer", "fx", "-o", tmp_path / "b")
    one_line_error(result, "--tracer fx: BertModel cannot be traced")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("case", ["missing file", "bad spec", "wrong function", "not a module", "missing inputs",
                                  "missing checkpoint", "bad dtype", "inputs do not fit", "pickled inputs"])
def test_bad_input_is_exit_2_with_one_line_naming_it(spec, tmp_path, case):
    good = ("--inputs", f"{spec}:inputs")
    if case == "pickled inputs":
        torch.save({"x": torch.ones(6, 4), "f": print}, tmp_path / "evil.pt")
    args, needles = {
        "missing file": ([f"{tmp_path}/nofile.py:model", *good], ["nofile.py", "not found"]),
        "bad spec": ([str(spec), *good], [str(spec), "expected 'path/to/file.py:function'"]),
        "wrong function": ([f"{spec}:nope", *good], ["has no function 'nope'"]),
        "not a module": ([f"{spec}:not_a_module", *good], ["returned int, expected a torch.nn.Module"]),
        "missing inputs": ([f"{spec}:model", "--inputs", tmp_path / "none.safetensors"],
                           ["--inputs", "none.safetensors: file not found"]),
        "missing checkpoint": ([f"{spec}:model", *good, "--checkpoint", tmp_path / "w.pt"],
                               ["--checkpoint", "w.pt: file not found"]),
        "bad dtype": ([f"{spec}:model", *good, "--dtype", "float8"], ["--dtype float8: expected one of"]),
        "inputs do not fit": ([f"{spec}:model", "--inputs", f"{spec}:bert_inputs"],
                              ["TypeError", "input_ids"]),
        "pickled inputs": ([f"{spec}:model", "--inputs", tmp_path / "evil.pt"],
                           ["--inputs", "evil.pt: cannot be loaded safely (weights_only=True): it holds a "
                            "pickled print, which would run code to load"]),
    }[case]
    one_line_error(cli("capture", *args, "-o", tmp_path / "c"), *needles)
    assert not (tmp_path / "c").exists()


def test_bad_input_in_a_separate_process_has_no_traceback(spec, tmp_path):
    code, out, err = finish(fxdiff_process("capture", f"{spec}:not_a_module", "--inputs", f"{spec}:inputs",
                                           "-o", tmp_path / "c"))
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"fxdiff: error: model '{spec}:not_a_module': returned int, "
                                        "expected a torch.nn.Module"]
