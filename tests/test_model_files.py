"""Less Python to write: a Hugging Face model directory or a .nemo file as MODEL, a loss taking
``(output, model)``, and ``.safetensors`` inputs with non-tensor arguments and tensors that share memory."""

from __future__ import annotations

import sys
import tarfile
import types

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import fxdiff
from fxdiff.cli import main
from fxdiff.load.specs import load_inputs

transformers = pytest.importorskip("transformers")

LOSS = '''
def loss(output, model):
    """Uses the model: its config scales the loss."""
    return output.last_hidden_state.pow(2).mean() * model.config.hidden_size
'''


def tiny_bert(path, perturb=False):
    """A random-weight BERT saved with ``save_pretrained``; ``perturb``: layer 1's output dense changed."""
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    if perturb:
        with torch.no_grad():
            model.encoder.layer[1].output.dense.weight.mul_(1.01)
    model.save_pretrained(path)
    return path


def call():
    """Token ids, one tensor as both the attention mask and the token types, and non-tensor arguments."""
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return (), {"input_ids": ids, "attention_mask": mask, "token_type_ids": mask,
                "output_hidden_states": True, "return_dict": True, "head_mask": None}


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_inputs_with_shared_memory_and_non_tensors_round_trip(tmp_path):
    args, kwargs = call()
    with pytest.raises(RuntimeError, match="share memory"):   # why save_inputs exists
        save_file({"attention_mask": kwargs["attention_mask"], "token_type_ids": kwargs["token_type_ids"]},
                  str(tmp_path / "refused.safetensors"))
    path = fxdiff.save_inputs(tmp_path / "in.safetensors", (torch.ones(2), [3, "x", None]), {**kwargs, "n": 2.5})
    back_args, back_kwargs = load_inputs(str(path))
    assert torch.equal(back_args[0], torch.ones(2)) and back_args[1] == [3, "x", None]
    assert back_kwargs.keys() == {*kwargs, "n"} and back_kwargs["n"] == 2.5
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(back_kwargs[key], kwargs[key])
    assert back_kwargs["output_hidden_states"] is True and back_kwargs["head_mask"] is None


def test_inputs_refuse_what_json_cannot_hold(tmp_path):
    with pytest.raises(fxdiff.FxdiffError, match="kwargs.dtype is a dtype"):
        fxdiff.save_inputs(tmp_path / "in.safetensors", (), {"dtype": torch.float32})


def test_hf_directory_as_model_with_a_loss_of_output_and_model(tmp_path):
    ref_dir, bug_dir = tiny_bert(tmp_path / "bert"), tiny_bert(tmp_path / "bert_bug", perturb=True)
    fxdiff.save_inputs(tmp_path / "in.safetensors", *call())
    (tmp_path / "loss.py").write_text(LOSS)
    result = cli("capture", ref_dir, "--inputs", tmp_path / "in.safetensors", "--loss", f"{tmp_path}/loss.py:loss",
                 "-o", tmp_path / "ref")
    assert result.exit_code == 0, result.output
    ref = fxdiff.load(tmp_path / "ref")
    assert ref.meta["model"] == str(ref_dir) and ref.meta["model_class"].endswith("BertModel")
    model = transformers.AutoModel.from_pretrained(ref_dir).eval()
    with torch.no_grad():
        expected = model(**call()[1]).last_hidden_state.pow(2).mean().item() * 16
    assert ref.meta["loss_value"] == pytest.approx(expected, rel=1e-5), "the loss got the output and the model"
    assert ref.inputs["kwargs"]["output_hidden_states"] is True, "non-tensor arguments reach the model"
    result = cli("compare", tmp_path / "ref", ref_dir)
    assert result.exit_code == 0, result.output
    result = cli("compare", tmp_path / "ref", bug_dir, "--json", tmp_path / "bug.json")
    assert result.exit_code == 1, result.output
    first = fxdiff.load_report(tmp_path / "bug.json").first_divergence()["forward"]
    assert first and all(e["cand_module"].startswith("encoder.layer.1.output") for e in first), first


@pytest.fixture
def nemo_file(tmp_path):
    path = tmp_path / "model.nemo"
    with tarfile.open(path, "w") as tar:
        (tmp_path / "model_config.yaml").write_text("target: some.Model\n")
        tar.add(tmp_path / "model_config.yaml", "model_config.yaml")
    return path


def test_nemo_file_needs_nemo(nemo_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "nemo", None)   # not importable, whatever is installed
    result = cli("capture", nemo_file, "--inputs", "x.safetensors", "-o", nemo_file.parent / "ref")
    assert result.exit_code == 2
    assert "needs NeMo" in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_nemo_file_restored_with_nemo(nemo_file, monkeypatch):
    """NeMo's own restore_from builds the model (a stand-in NeMo here), on the CPU."""
    calls = []

    class ModelPT:
        @classmethod
        def restore_from(cls, restore_path, map_location=None):
            calls.append((restore_path, map_location))
            torch.manual_seed(0)
            return torch.nn.Linear(3, 2)

    nemo, core = types.ModuleType("nemo"), types.ModuleType("nemo.core")
    core.ModelPT, nemo.core = ModelPT, core
    monkeypatch.setitem(sys.modules, "nemo", nemo)
    monkeypatch.setitem(sys.modules, "nemo.core", core)
    cap = fxdiff.capture_spec(str(nemo_file), inputs=((torch.ones(1, 3),), {}))
    assert calls == [(str(nemo_file), torch.device("cpu"))]
    assert cap.meta["model_class"] == "torch.nn.modules.linear.Linear"
