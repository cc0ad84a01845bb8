"""The matcher through the command line: ``map-params --convert``, ``compare --map`` (YAML and
JSON), and captures made with different call conventions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import hf_ports as H
from fxdiff import store
from fxdiff.cli import main
from fxdiff.match import match
from fxdiff import capture as record
from test_match_conformer import S

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
PORTS = Path(H.__file__).resolve()
CONFORMER = ROOT / "examples" / "conformer" / "specs.py"



def test_map_params_convert_reproduces_the_reference(tmp_path):
    """Infer the GPT-2 -> port mapping, convert *another* GPT-2 checkpoint with it, load the result
    into a freshly initialised port: the port then computes what that GPT-2 computes."""
    other = H.randomize(H.make_gpt2(seed=7), seed=8)   # no all-ones norms or zero biases left
    torch.save(other.state_dict(), tmp_path / "ref.pt")
    cmd = [sys.executable, "-m", "fxdiff.cli", "map-params", f"{PORTS}:gpt2_reference", f"{PORTS}:gpt2_port",
           "--inputs", f"{PORTS}:gpt2_inputs", "-o", str(tmp_path / "map.json"),
           "--convert", str(tmp_path / "ref.pt"), "--out", str(tmp_path / "cand.safetensors")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "map.json").read_text())
    assert doc["unmapped"] == {"ref": [], "cand": []}
    assert len(doc["pairs"]) == len(other.state_dict())
    kinds = {p["ref"]: p["transform"]["kind"] for p in doc["pairs"]}
    assert kinds["h.1.attn.c_attn.weight"] == "chain" and kinds["h.1.mlp.c_fc.weight"] == "transpose"

    port = H.gpt2_port_fresh()
    state = load_file(tmp_path / "cand.safetensors")
    assert set(state) == set(port.state_dict())
    before = port(*H.gpt2_inputs())
    port.load_state_dict(state, strict=True)
    with torch.no_grad():
        want = other(*H.gpt2_inputs()).last_hidden_state
        got = port(*H.gpt2_inputs())
    assert not torch.allclose(before, want, atol=1e-3)   # the fresh port really was different
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- compare --map ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def conformer_dirs(tmp_path_factory):
    """Saved captures: reference, renamed port, renamed port with its own (fresh) weights."""
    root = tmp_path_factory.mktemp("conformer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        fresh = S._renamed.RenamedConformerSSL()
    out = {}
    for name, model in (("ref", S.reference()), ("renamed", S.renamed()), ("fresh", fresh)):
        out[name] = store.save(record(model, (), S.inputs(), loss=S.loss), root / name)
    return out


def _compare(*args):
    return CliRunner().invoke(main, ["compare", *map(str, args)])


def test_yaml_map_pairs_modules_and_parameters(conformer_dirs, tmp_path):
    """A port with other weights: content cannot anchor anything, the mapping file does."""
    (tmp_path / "map.yaml").write_text(
        "modules:\n"
        "  - ['layers\\.(\\d+)\\.feed_forward1\\.linear1', 'blocks.\\1.ffn_in.fc1']\n"
        "  - ['layers\\.(\\d+)\\.feed_forward2\\.linear2', 'blocks.\\1.ffn_out.fc2']\n"
        "params:\n"
        "  layers.0.feed_forward1.linear1.weight: blocks.0.ffn_in.fc1.weight\n"
        "  layers.2.self_attn.linear_v.weight:\n"
        "    cand: blocks.2.attn.qkv.weight\n"
        "    transform: {kind: rows, start: 128, stop: 192}\n")
    out = tmp_path / "report.json"
    result = _compare(conformer_dirs["ref"], conformer_dirs["fresh"], "--map", tmp_path / "map.yaml", "--json", out)
    assert result.exit_code == 1, result.output   # the weights differ
    doc = json.loads(out.read_text())
    from_map = {(r["ref_module"], r["cand_module"]) for r in doc["nodes"] if r["rationale"].startswith("user map")}
    for i in range(3):
        assert (f"layers.{i}.feed_forward1.linear1", f"blocks.{i}.ffn_in.fc1") in from_map
        assert (f"layers.{i}.feed_forward2.linear2", f"blocks.{i}.ffn_out.fc2") in from_map
    assert len(from_map) == 6
    params = {p["ref"]: p for p in doc["params"]}
    assert params["layers.0.feed_forward1.linear1.weight"]["cand"] == ["blocks.0.ffn_in.fc1.weight"]
    assert params["layers.0.feed_forward1.linear1.weight"]["evidence"] == "user map"
    v = params["layers.2.self_attn.linear_v.weight"]
    assert v["evidence"] == "user map" and v["transform"] == {"kind": "rows", "start": 128, "stop": 192}
    # without the file, nothing is said to come from it and those linears are not paired by it
    plain = match(store.load(conformer_dirs["ref"]), store.load(conformer_dirs["fresh"]))
    assert not any(p.rationale.startswith("user map") for p in plain.pairs)
    assert not any(p.evidence == "user map" for p in plain.params)


def test_json_map_wins_over_content(conformer_dirs, tmp_path):
    """Explicit pairs override what content would say (q taken from the k rows; layer 2's first
    feed-forward paired with its second), and are reported as coming from the file."""
    (tmp_path / "map.json").write_text(json.dumps({
        "modules": [["decoder\\.proj", "head"], ["layers\\.2\\.feed_forward1\\.linear1", "blocks.2.ffn_out.fc1"]],
        "params": {"layers.0.self_attn.linear_q.weight": {
            "cand": "blocks.0.attn.qkv.weight", "transform": {"kind": "rows", "start": 64, "stop": 128}}},
    }))
    out = tmp_path / "report.json"
    result = _compare(conformer_dirs["ref"], conformer_dirs["renamed"], "--map", tmp_path / "map.json", "--json", out)
    doc = json.loads(out.read_text())
    head = [r for r in doc["nodes"] if r["ref_module"] == "decoder.proj"]
    assert head and all(r["rationale"].startswith("user map") and r["cand_module"] == "head" for r in head)
    crossed = [r for r in doc["nodes"] if r["ref_module"] == "layers.2.feed_forward1.linear1"]
    assert [(r["cand_module"], r["rationale"][:8], r["forward"]["passed"]) for r in crossed] == \
        [("blocks.2.ffn_out.fc1", "user map", False)]
    q = next(p for p in doc["params"] if p["ref"] == "layers.0.self_attn.linear_q.weight")
    assert q["evidence"] == "user map" and q["value"]["passed"] is False
    assert result.exit_code == 1, result.output   # its gradient is compared against k's
    # the rest is still matched: by content, or for k (whose rows the file gave to q) by its op
    params = {p["ref"]: p for p in doc["params"]}
    assert params["layers.0.self_attn.linear_out.weight"]["evidence"] == "identical bytes"
    k = params["layers.0.self_attn.linear_k.weight"]
    assert k["cand"] == ["blocks.0.attn.qkv.weight"] and k["transform"] == {"kind": "rows", "start": 64, "stop": 128}
    assert k["value"]["passed"] is True and k["evidence"] != "user map"


# -- different call conventions ------------------------------------------------------------------

class HFStyle(torch.nn.Module):
    """The reference called the Hugging Face way: ``input_values`` and an ``attention_mask``."""

    def __init__(self):
        super().__init__()
        self.model = S.reference()

    def forward(self, input_values, attention_mask):
        return self.model(input_values, attention_mask.sum(-1))


class TorchaudioStyle(torch.nn.Module):
    """The renamed port called positionally, lengths first."""

    def __init__(self):
        super().__init__()
        self.model = S.renamed()

    def forward(self, lengths, waveforms):
        return self.model(waveforms, lengths)


def hf_style():
    return HFStyle()


def torchaudio_style():
    return TorchaudioStyle()


def hf_inputs():
    x = S.inputs()
    mask = (torch.arange(x["audio"].shape[1])[None, :] < x["lengths"][:, None]).long()
    return {"input_values": x["audio"], "attention_mask": mask}


def torchaudio_inputs():
    x = S.inputs()
    return (x["lengths"], x["audio"])


def test_captures_with_their_own_call_conventions_compare(tmp_path):
    runner = CliRunner()
    for name, model, inputs in (("ref", "hf_style", "hf_inputs"), ("cand", "torchaudio_style", "torchaudio_inputs")):
        result = runner.invoke(main, ["capture", f"{HERE}:{model}", "--inputs", f"{HERE}:{inputs}",
                                      "--loss", f"{CONFORMER}:loss", "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    out = tmp_path / "report.json"
    result = _compare(tmp_path / "ref", tmp_path / "cand", "--json", out)
    assert result.exit_code == 0, result.output
    ref, cand = store.load(tmp_path / "ref"), store.load(tmp_path / "cand")
    alignment = match(ref, cand)
    inputs = {(p.ref, p.cand) for p in alignment.pairs if p.rationale.startswith("input: ")}
    # the audio pairs by value although its name and position differ; the mask has no counterpart
    assert inputs == {("input_values", "args_1")}
    assert "attention_mask" in alignment.unmatched_ref
    lengths = next(p for p in alignment.pairs if p.cand == "args_0")   # lengths: a sum of the mask
    assert ref.node(lengths.ref).meta["fxdiff_target"].endswith("sum")
