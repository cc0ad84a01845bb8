"""Recording less: ``capture --keep values|grads|summary`` and ``--modules REGEX``.

A summary capture holds statistics, a fixed-seed sample and a hash per tensor; it still compares
(against a summary or a full capture) and still finds where a planted bug starts. A ``--modules``
capture holds only the ops of the modules asked for; values made outside and used inside become
placeholders named by the node that made them.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import fxdiff
from fxdiff.cli import main
from fxdiff.model.capture import BOUNDARY, GRAD, MODULE
from fxdiff.store.summary import SAMPLE, Summary, SummarisedValue, summarise
from tiny_models import EXAMPLE, conformer_specs

SPEC = f"{EXAMPLE}/specs.py"


@pytest.fixture(scope="module")
def specs():
    return conformer_specs()


@pytest.fixture(scope="module")
def run(specs):
    """(model, kwargs, loss) of the small Conformer reference."""
    return specs.make_model("reference"), specs.make_inputs(seconds=(0.5, 0.35)), specs.loss


@pytest.fixture(scope="module")
def full(run):
    model, kwargs, loss = run
    return fxdiff.capture(model, (), kwargs, loss=loss)


def capture(run, **keep):
    model, kwargs, loss = run
    return fxdiff.capture(model, (), kwargs, loss=loss, **keep)


def stored_bytes(cap) -> int:
    tensors = [*(getattr(t, "sample", t) for t in cap.values.values()),
               *(getattr(t, "sample", t) for t in cap.grads.values())]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}.values())


def frontier_modules(report, direction="forward"):
    return {(e["ref_module"], e["cand_module"]) for e in report.first_divergence()[direction]}


# -- summaries -------------------------------------------------------------------------------------

def test_summary_holds_statistics_a_sample_and_a_hash():
    x = torch.randn(300, 50, generator=torch.Generator().manual_seed(0))
    x[3, 4] = float("nan")
    s = summarise(x.t())
    assert isinstance(s, Summary) and s.shape == (50, 300) and s.dtype == torch.float32
    assert s.sample.numel() == SAMPLE
    flat = x.t().reshape(-1)
    assert torch.equal(s.sample.nan_to_num(7.0), flat[s.positions].nan_to_num(7.0))
    finite = flat[flat.isfinite()].double()
    assert s.stats["nan"] == 1 and s.stats["sumsq"] == pytest.approx(float((finite ** 2).sum()))
    assert s.stats["max"] == pytest.approx(float(finite.max()))
    assert s.digest == summarise(x.t().contiguous()).digest != summarise(x.t() + 1).digest
    with pytest.raises(SummarisedValue, match="keeps only as a summary"):
        s + 1


def test_summary_capture_is_small_round_trips_and_compares_with_a_full_one(tmp_path, run, full):
    cap = capture(run, keep="summary")
    ops = [n for n in cap.graph.nodes if n.op == "call_function" and n.name in cap.values]
    assert ops and all(isinstance(cap.values[n.name], Summary) for n in ops)
    assert all(not isinstance(cap.values[n.name], Summary) for n in cap.graph.nodes if n.op == "placeholder")
    assert all(isinstance(g, Summary) for g in cap.grads.values() if g.dim())
    assert not any(isinstance(t, Summary) for _, t in fxdiff.tree.flatten(cap.outputs))
    assert all(v.sample.numel() <= SAMPLE for v in cap.values.values() if isinstance(v, Summary))
    assert stored_bytes(cap) < stored_bytes(full) * 0.6
    path = fxdiff.save(cap, tmp_path / "s")
    assert json.loads((path / "manifest.json").read_text())["version"] == 4
    loaded = fxdiff.load(path)
    some = ops[len(ops) // 2].name
    assert loaded.values[some].stats == cap.values[some].stats
    assert torch.equal(loaded.values[some].sample, cap.values[some].sample)
    for ref, cand in ((full, loaded), (loaded, full), (loaded, fxdiff.load(path))):
        report = fxdiff.compare(ref, cand)
        assert not report.diverged, report.summary()
        assert report.summary()["nodes"]["pairs"] > 50
    same = fxdiff.compare(loaded, cap)
    assert all("bit-identical" in r.forward.note for r in same.nodes if isinstance(loaded.values[r.ref_node], Summary))


@pytest.mark.parametrize("keep", ["summary", "grads"])
def test_summary_capture_still_finds_where_a_bug_starts(specs, run, full, keep):
    bugged = specs.make_model("port", bug="rel_shift")
    want = fxdiff.compare(full, bugged)
    got = fxdiff.compare(capture(run, keep=keep), bugged)
    assert want.diverged and got.diverged
    assert frontier_modules(got) == frontier_modules(want) == {("layers.1.self_attn", "layers.1.self_attn")}
    assert frontier_modules(got, "backward") == frontier_modules(want, "backward")
    row = next(r for r in got.nodes if r.first_forward)
    assert "sample of" in row.forward.note


def test_keep_values_drops_node_gradients_and_compares_the_rest(tmp_path, run, full):
    cap = capture(run, keep="values")
    assert not cap.grads and cap.param_grads
    assert {n.meta.get(GRAD) for n in cap.graph.nodes if n.op == "call_function" and n.name in cap.values} == \
        {"not recorded"}
    path = fxdiff.save(cap, tmp_path / "v")
    report = fxdiff.compare(full, path)
    assert not report.diverged and all(r.backward is None for r in report.nodes)
    assert all(p.grad is not None for p in report.params if p.ref in full.param_grads)


def test_keep_grads_keeps_gradients_whole(run, full):
    cap = capture(run, keep="grads")
    name = next(n for n, g in full.grads.items() if g.numel() > SAMPLE)
    assert torch.equal(cap.grads[name], full.grads[name]) and isinstance(cap.values[name], Summary)


# -- modules ---------------------------------------------------------------------------------------

def test_modules_keeps_only_the_ops_asked_for(tmp_path, run, full):
    cap = capture(run, modules=r"layers\.1")
    ops = [n for n in cap.graph.nodes if n.op == "call_function"]
    assert ops and all(n.meta[MODULE] == "layers.1" or n.meta[MODULE].startswith("layers.1.") for n in ops)
    boundary = [n for n in cap.graph.nodes if BOUNDARY in n.meta]
    assert boundary and all(n.op == "placeholder" for n in boundary)
    for n in boundary:   # named by its producer, holding the producer's value and gradient
        assert torch.equal(cap.values[n.name], full.values[n.name])
        if n.name in full.grads:
            assert torch.allclose(cap.grads[n.name], full.grads[n.name])
    for n in ops:
        assert torch.equal(cap.values[n.name], full.values[n.name])
    assert len(cap.values) < len(full.values) / 2
    path = fxdiff.save(cap, tmp_path / "m")
    assert json.loads((path / "manifest.json").read_text())["version"] == 3
    report = fxdiff.compare(path, full)
    assert not report.diverged
    inside = {r.ref_node for r in fxdiff.compare(full, full).nodes if r.ref_module.startswith("layers.1")}
    assert inside <= {r.ref_node for r in report.nodes if r.ref_node == r.cand_node}


def test_modules_capture_localises_a_bug_inside(specs, run):
    bugged = specs.make_model("port", bug="rel_shift")
    report = fxdiff.compare(capture(run, modules=r"layers\.1", keep="summary"), bugged)
    assert report.diverged
    assert ("layers.1.self_attn", "layers.1.self_attn") in frontier_modules(report)


def test_bad_options_are_refused(run):
    with pytest.raises(fxdiff.FxdiffError, match="keep must be one of"):
        capture(run, keep="everything")
    with pytest.raises(fxdiff.FxdiffError, match="not a regular expression"):
        capture(run, modules="layers.(")


def test_command_line(tmp_path):
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()
    out = tmp_path / "s"
    result = runner.invoke(main, ["capture", f"{SPEC}:reference", "--inputs", f"{SPEC}:inputs", "--loss",
                                  f"{SPEC}:loss", "--keep", "summary", "--modules", r"layers\.[01]", "-o", str(out)])
    assert result.exit_code == 0, result.output
    cap = fxdiff.load(out)
    assert cap.meta["keep"] == "summary" and cap.meta["kept_modules"] == r"layers\.[01]"
    result = runner.invoke(main, ["compare", str(out), f"{SPEC}:port"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["compare", str(out), f"{SPEC}:port_bug_rel_shift"])
    assert result.exit_code == 1, result.output


def test_summaries_made_on_the_device_agree_with_the_cpu_and_hash_like_a_full_tensor():
    """``DeviceSummaries`` (what a capture on a GPU uses; here its torch-operation path on the CPU)
    keeps the statistics and sample ``summarise`` keeps, and a hash that a full tensor reproduces."""
    from fxdiff.judge.tensors import Tolerance, _compare
    from fxdiff.store.device_summary import DeviceSummaries, unit_digest
    g = torch.Generator().manual_seed(0)
    special = torch.randn(40, 30, generator=g)
    special[1, 2], special[5, 5], special[7, 1] = float("nan"), float("inf"), -float("inf")
    tensors = [torch.randn(3, 7000, generator=g).to(torch.bfloat16), special.t(), torch.zeros(0),
               torch.randint(-9, 9, (70,), generator=g), torch.rand(50, generator=g) > 0.5,
               torch.randn(4, 4, dtype=torch.complex64, generator=g)]
    device = DeviceSummaries()
    made = [device.add(t) for t in tensors]
    device.finish()
    for t, s in zip(tensors, made):
        cpu = summarise(t)
        assert s.shape == cpu.shape and s.dtype == cpu.dtype
        assert torch.equal(s.sample.view(torch.uint8), cpu.sample.view(torch.uint8))
        assert s.stats == pytest.approx(cpu.stats, rel=1e-5)   # summarise adds float32 chunks
        assert s.digest == unit_digest(t) == unit_digest(t.contiguous())
        assert s.digest != unit_digest(t.float() + 1) or not t.numel()
    x = tensors[0]
    same, moved = x.clone(), x.clone()
    moved.view(-1)[12345] += 1
    assert unit_digest(moved) != made[0].digest
    assert "bit-identical" in _compare(made[0], same, Tolerance()).note
    assert "bit-identical" not in _compare(made[0], moved, Tolerance()).note


def test_empty_tensors_compare_as_equal_between_a_summary_and_a_full_capture():
    """A Hugging Face GPT-2 fed no padding makes empty tensors on the way; a summary of one has
    no sample, and nothing in it can differ."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32, vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    full = fxdiff.capture(model, (ids,))
    assert any(v.numel() == 0 for v in full.values.values())
    assert fxdiff.compare(full, fxdiff.capture(model, (ids,), keep="summary")).verdict == "match"


# -- parameters in a summary capture ---------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2():
    """A small Hugging Face GPT-2, its input, and a copy with one weight perturbed."""
    import copy
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=64, vocab_size=1024,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    bugged = copy.deepcopy(model)
    with torch.no_grad():
        bugged.transformer.h[1].mlp.c_fc.weight[3, 5] += 0.5
    return model, ids, bugged


def test_summary_capture_summarises_parameters_and_round_trips_them(tmp_path, gpt2):
    model, ids, _ = gpt2
    full = fxdiff.capture(model, (ids,))
    cap = fxdiff.capture(model, (ids,), keep="summary")
    assert set(cap.params) == set(full.params) and set(cap.param_grads) == set(full.param_grads)
    assert all(isinstance(t, Summary) and t.content.startswith("c1:") for t in cap.params.values())
    assert all(isinstance(t, Summary) for t in cap.param_grads.values())
    kept = sum(t.sample.numel() * t.sample.element_size() for t in (*cap.params.values(), *cap.param_grads.values()))
    whole = sum(t.numel() * t.element_size() for t in (*full.params.values(), *full.param_grads.values()))
    assert kept < whole / 10
    saved, streamed = fxdiff.save(cap, tmp_path / "s"), tmp_path / "t"
    fxdiff.capture(model, (ids,), keep="summary", stream_to=streamed)
    for path in (saved, streamed):
        loaded = fxdiff.load(path)
        name = "transformer.wte.weight"
        assert loaded.params[name].stats == cap.params[name].stats
        assert loaded.params[name].content == cap.params[name].content
        assert torch.equal(loaded.param_grads[name].sample, cap.param_grads[name].sample)


@pytest.mark.parametrize("ref_keep, cand_keep", [("summary", "summary"), ("summary", "both"), ("both", "summary")])
def test_a_weight_bug_is_localised_with_summarised_parameters(gpt2, ref_keep, cand_keep):
    model, ids, bugged = gpt2
    same = fxdiff.compare(fxdiff.capture(model, (ids,), keep=ref_keep), fxdiff.capture(model, (ids,), keep=cand_keep))
    assert same.verdict == "match" and not same.unmatched.ref_params
    assert all("identical" in p.evidence or "equal content" in p.evidence for p in same.params)
    report = fxdiff.compare(fxdiff.capture(model, (ids,), keep=ref_keep), fxdiff.capture(bugged, (ids,), keep=cand_keep))
    assert report.diverged
    assert frontier_modules(report) == {("transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_fc")}
    assert not report.unmatched.ref_params   # no content pairs it: the weight read in its place does
    weight, = [p for p in report.params if p.ref == "transformer.h.1.mlp.c_fc.weight"]
    assert weight.cand == ["transformer.h.1.mlp.c_fc.weight"] and "same argument" in weight.evidence
    assert not weight.value.passed


def test_summarised_parameters_pair_with_a_fused_full_tensor():
    """A summary parameter is paired by its content hash, also as rows of a fused full tensor."""
    from fxdiff.params import correspond
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    ref = {"q": summarise(q, content=True), "k": summarise(k, content=True), "b": summarise(q.t(), content=True)}
    cand = {"qk": torch.cat([q, k]).double(), "b": q.t().contiguous()}
    pairs, ref_left, cand_left = correspond(ref, cand, ["q", "k", "b"], ["qk", "b"])
    found = {p.ref: (p.cand, p.transform.get("kind")) for p in pairs}
    assert found == {"q": (("qk",), "rows"), "k": (("qk",), "rows"), "b": (("b",), "identity")}
    assert not ref_left and not cand_left


def test_large_outputs_of_a_summary_capture_are_summarised_with_their_gradients(tmp_path, gpt2, monkeypatch):
    """A language model's logits can be the largest tensor of a run: over ``Keep.OUTPUT_BYTES`` a
    summary capture summarises the outputs and their gradients too; a live candidate then needs its loss."""
    from fxdiff.record.recorder import Keep
    model, ids, bugged = gpt2
    loss = lambda out: out.logits.square().mean()  # noqa: E731
    full = fxdiff.capture(model, (ids,), loss=loss)
    assert not any(isinstance(t, Summary) for t in fxdiff.capture(model, (ids,), loss=loss, keep="summary").output_grads.values())
    monkeypatch.setattr(Keep, "OUTPUT_BYTES", full.outputs["logits"].nbytes - 1)
    cap = fxdiff.capture(model, (ids,), loss=loss, keep="summary")
    assert isinstance(cap.outputs["logits"], Summary) and isinstance(cap.output_grads["logits"], Summary)
    saved, streamed = fxdiff.save(cap, tmp_path / "s"), tmp_path / "t"
    fxdiff.capture(model, (ids,), loss=loss, keep="summary", stream_to=streamed)
    for path in (saved, streamed):
        loaded = fxdiff.load(path)
        assert loaded.outputs["logits"].digest == cap.outputs["logits"].digest
        assert loaded.output_grads["logits"].stats == cap.output_grads["logits"].stats
        assert fxdiff.compare(full, loaded).verdict == fxdiff.compare(loaded, full).verdict == "match"
    bugged_full = fxdiff.capture(bugged, (ids,), loss=loss)
    report = fxdiff.compare(fxdiff.load(saved), bugged_full)
    assert report.diverged and not report.outputs[0].metrics.passed
    assert frontier_modules(report) == {("transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_fc")}
    with pytest.raises(fxdiff.FxdiffError, match="gradients as summaries.*give the candidate's loss"):
        fxdiff.compare(saved, model)
    assert fxdiff.compare(saved, model, loss=loss).verdict == "match"
