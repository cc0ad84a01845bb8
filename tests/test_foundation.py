"""The foundation: captures are inert data, one pipeline for the API and the CLI, exit codes that
mean one thing each, and no hidden state left behind."""

import json
import subprocess
import sys

import pytest
import torch
import xxhash
from click.testing import CliRunner

import fxdiff
from fxdiff.cli import main
from fxdiff.judge.isolate import replay
from fxdiff.model.capture import TARGET
from fxdiff.ops import node_key
from fxdiff.store.capture_dir import GRAPH, MANIFEST
from fxdiff.targets import Targets


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * 2


@pytest.fixture(scope="module")
def small_capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("cap") / "small"
    fxdiff.save(fxdiff.capture(Small(), (torch.randn(2, 4),)), path)
    return path


def _retarget(src, dst, target: str) -> str:
    """A copy of capture ``src`` at ``dst`` whose first op names ``target``, checksums recomputed."""
    import shutil
    shutil.copytree(src, dst)
    doc = json.loads((dst / GRAPH).read_text())
    node = next(n for n in doc["nodes"] if n["op"] == "call_function")
    node["target"] = target
    node["meta"][TARGET] = target
    data = json.dumps(doc).encode()
    (dst / GRAPH).write_bytes(data)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["files"][GRAPH] = {"bytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return node["name"]


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.run", "this.x",
                                    "fxdiff_marker_module.run", "torch.load", "torch.hub.load"])
def test_a_capture_naming_anything_off_the_allowlist_is_refused_and_nothing_runs(small_capture, tmp_path, target):
    bad = tmp_path / "bad"
    node = _retarget(small_capture, bad, target)
    (tmp_path / "fxdiff_marker_module.py").write_text(
        f"open({str(tmp_path / 'marker')!r}, 'w').write('ran')\ndef run(*a):\n    pass\n")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
            "before = set(sys.modules)\n"
            "from fxdiff.cli import main\n"
            "import fxdiff.api  # what the command imports itself (torch among it)\n"
            "loaded = set(sys.modules)\n"
            f"try:\n    main(['compare', {str(small_capture)!r}, {str(bad)!r}])\n"
            "except SystemExit as e:\n"
            "    new = set(sys.modules) - loaded\n"
            "    print('EXIT', e.code, sorted(m for m in new if m.split('.')[0] in ('this', 'fxdiff_marker_module', 'subprocess')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "EXIT 2 []" in out.stdout, out.stdout + out.stderr
    assert f"node {node!r}: target {target!r} is not an op fxdiff may call" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "marker").exists()


def test_the_isolation_replay_calls_only_allowlisted_targets(small_capture):
    cap = fxdiff.load(small_capture)
    last_op = [n for n in cap.graph.nodes if n.op == "call_function"][-1]
    boundary = {n.name: n.name for n in cap.graph.nodes if n.op == "placeholder"}
    assert isinstance(replay(cap, cap, last_op.name, boundary, torch.zeros(())), torch.Tensor)
    calls = []
    last_op.meta[TARGET] = "builtins.print"
    last_op.target = lambda *a, **k: calls.append(a)
    why = replay(cap, cap, last_op.name, boundary, torch.zeros(()))
    assert why == f"{last_op.name} ({node_key(last_op)}): builtins.print is not on the replay allowlist" and not calls
    assert "builtins.print" not in Targets.default()
    # factories that build masks are replayed; random and uninitialised ones are not
    assert {"torch.zeros", "torch.arange", "torch.Tensor.new_ones"} <= set(Targets.default()._callables)
    assert not {"torch.rand", "torch.randn", "torch.empty", "torch.Tensor.new_empty"} & set(Targets.default()._callables)


def test_compare_of_a_capture_with_its_own_model_is_clean_without_a_loss():
    model, x = Small(), torch.randn(5, 4)

    def loss(out):
        return (out ** 3).mean()
    ref = fxdiff.capture(model, (x,), loss=loss)
    report = fxdiff.compare(ref, model)     # no loss: the recorded output gradients seed backward
    assert not report.diverged
    assert report.summary()["param_grads"]["matched"] == 2
    assert all(r.backward is not None and r.backward.max_abs_diff == 0 for r in report.nodes if r.backward)


@pytest.mark.parametrize("with_params", [True, False])
def test_inputs_the_reference_took_gradients_of_take_them_in_the_candidate(with_params):
    """A saved input is stored without ``requires_grad``; the candidate's copy gets it back where the
    reference recorded a gradient (else: a false backward divergence, blamed on a custom backward)."""
    model = Small() if with_params else torch.nn.Softmax(-1)
    x = torch.randn(5, 4, requires_grad=True)
    ref = fxdiff.capture(model, (x,))
    placeholder = next(n.name for n in ref.graph.nodes if n.op == "placeholder")
    assert placeholder in ref.grads
    report = fxdiff.compare(ref, model)
    assert report.verdict == "match"
    row = next(r for r in report.nodes if r.ref_node == placeholder)
    assert row.backward is not None and row.backward.max_abs_diff == 0
    plain = fxdiff.capture(model, (x.detach(),))   # and an input the reference took none of takes none
    row = next(r for r in fxdiff.compare(plain, model).nodes if r.ref_node == placeholder)
    assert row.backward is None


def test_the_api_and_the_cli_give_the_same_report(tmp_path):
    spec = tmp_path / "spec.py"
    spec.write_text("import torch\n"
                    "def build():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())\n"
                    "def inputs():\n    return (torch.randn(2, 4, generator=torch.Generator().manual_seed(1)),)\n"
                    "def bug():\n    m = build()\n    m[1] = torch.nn.Sigmoid()\n    return m\n")
    ref = fxdiff.capture_spec(f"{spec}:build", inputs=f"{spec}:inputs")
    fxdiff.save(ref, tmp_path / "ref")
    api = fxdiff.compare(tmp_path / "ref", f"{spec}:bug")
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "ref"), f"{spec}:bug", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1
    cli = fxdiff.load_report(tmp_path / "r.json")
    assert cli.summary() == api.summary()
    assert cli.first_divergence() == api.first_divergence()
    text = (tmp_path / "r.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))


class Kwargs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x, **extra):
        return self.lin(x)


def test_no_module_hooks_remain_after_a_capture_that_fails_early():
    hooks = torch.nn.modules.module
    before = (len(hooks._global_forward_pre_hooks), len(hooks._global_forward_hooks))
    with pytest.raises(fxdiff.FxdiffError):
        fxdiff.capture(Kwargs(), (torch.randn(1, 2),), tracer="fx")

    class Raises(torch.nn.Module):
        def forward(self, x):
            raise ZeroDivisionError("in the model")
    with pytest.raises(fxdiff.UserCodeError, match="raised ZeroDivisionError: in the model at test_foundation.py"):
        fxdiff.capture(Raises(), (torch.randn(1),))
    assert (len(hooks._global_forward_pre_hooks), len(hooks._global_forward_hooks)) == before


@pytest.fixture
def specs(tmp_path):
    spec = tmp_path / "port.py"
    spec.write_text("import torch\n"
                    "def build():\n    torch.manual_seed(0)\n    return torch.nn.Linear(3, 3)\n"
                    "def other():\n    torch.manual_seed(1)\n    return torch.nn.Linear(3, 3)\n"
                    "def broken():\n    return 1 / 0\n"
                    "def inputs():\n    return (torch.ones(2, 3),)\n")
    runner = CliRunner()
    assert runner.invoke(main, ["capture", f"{spec}:build", "--inputs", f"{spec}:inputs", "-o", str(tmp_path / "ref")]).exit_code == 0
    return spec, tmp_path / "ref", runner


def test_exit_0_on_a_match(specs):
    spec, ref, runner = specs
    assert runner.invoke(main, ["compare", str(ref), f"{spec}:build"]).exit_code == 0


def test_exit_1_on_a_divergence(specs):
    spec, ref, runner = specs
    assert runner.invoke(main, ["compare", str(ref), f"{spec}:other"]).exit_code == 1


def test_exit_2_names_the_user_code_that_raised(specs):
    spec, ref, runner = specs
    result = runner.invoke(main, ["compare", str(ref), f"{spec}:broken"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"fxdiff: error: model spec {spec}:broken raised ZeroDivisionError: "
                                     "division by zero at port.py:9")


def test_exit_2_names_a_backward_that_fails_in_the_model(tmp_path):
    """Was exit 3, "a bug in fxdiff": a Hugging Face RWKV in eval mode writes its recurrent state in
    place after saving it for backward, and autograd refuses; eager fails the same way."""
    spec = tmp_path / "inplace.py"
    spec.write_text("import torch\n"
                    "class Model(torch.nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n        self.lin = torch.nn.Linear(3, 3)\n"
                    "    def forward(self, x):\n        y = self.lin(x).sigmoid()\n        y.mul_(2)\n        return y\n"
                    "def build():\n    return Model()\n"
                    "def inputs():\n    return (torch.ones(2, 3),)\n")
    result = CliRunner().invoke(main, ["capture", f"{spec}:build", "--inputs", f"{spec}:inputs",
                                       "-o", str(tmp_path / "out.fxd")])
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxdiff: error: the backward pass of Model raised RuntimeError: "
                                                   "one of the variables needed for gradient computation"), lines
    assert not (tmp_path / "out.fxd").exists()


def test_exit_3_with_a_traceback_for_a_bug_in_fxdiff(specs, monkeypatch):
    spec, ref, runner = specs
    import fxdiff.judge.assemble as assemble
    monkeypatch.setattr(assemble, "_structure", lambda capture: {}["a bug"])
    result = runner.invoke(main, ["compare", str(ref), f"{spec}:build"])
    assert result.exit_code == 3
    assert "Traceback" in result.stderr and "KeyError" in result.stderr
    assert "this is a bug in fxdiff" in result.stderr


def test_capture_metadata_is_read_typed_and_a_field_of_the_wrong_type_is_named(tmp_path):
    """The metadata fields the code reads (``Capture.info``), on a Hugging Face BERT; a saved
    capture whose field has the wrong type is bad input, named on one line (exit 2)."""
    import shutil
    from tests.hf_ports import bert_inputs, make_bert

    cap = fxdiff.capture(make_bert(), bert_inputs(), mode="train", seed=3)
    info = cap.info
    assert (info.mode, info.seed, info.keep, info.keep_dropout, info.tf32, info.device, info.dtype) == \
        ("train", 3, "both", False, False, "cpu", "float32")
    assert info.model_class == "transformers.models.bert.modeling_bert.BertModel" and info.torch == torch.__version__
    fxdiff.save(cap, tmp_path / "ref")
    shutil.copytree(tmp_path / "ref", tmp_path / "edited")
    manifest = json.loads((tmp_path / "edited" / MANIFEST).read_text())
    manifest["meta"]["seed"] = "3"
    (tmp_path / "edited" / MANIFEST).write_text(json.dumps(manifest))
    assert fxdiff.load(tmp_path / "edited").meta["seed"] == "3"    # kept as stored
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "ref"), str(tmp_path / "edited")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "fxdiff: error: capture metadata: seed is str, expected int"
