"""fxdiff on pairs of independent real implementations (``tests/real_pairs``).

For every pair: the correct port compares clean at default settings, in float32 and with a
bfloat16 candidate (reported as within bfloat16 noise); every trained reference parameter is paired
and judged; every planted bug diverges and its first divergence names the bug's module on both
sides (see ``tests.real_pairs.localised``). With a bfloat16 candidate, every bug whose effect (its
relative error in float32) exceeds bfloat16's noise is localised too, and the others are reported
"within noise", never as a plain match.
"""

from __future__ import annotations

import pytest
import torch

from fxdiff.judge.noise import OWN_ROUNDING
from tests.real_pairs import BF16, PAIRS, build, run_pair

PAIR_NAMES = list(PAIRS)
BUG_CASES = [(p, b.name) for p in PAIR_NAMES for b in PAIRS[p].bugs]
_REF_CAPTURES: dict[str, object] = {}
_FP32: dict[tuple[str, str], object] = {}
_BF16: dict[tuple[str, str], object] = {}


def _run(pair_name, variant=None, dtype=torch.float32):
    import fxdiff
    pair = PAIRS[pair_name]
    if pair_name not in _REF_CAPTURES:
        ref, _, _ = build(pair)
        args, kwargs = pair.inputs()
        _REF_CAPTURES[pair_name] = fxdiff.capture(ref, args=args, kwargs=kwargs, mode="eval", seed=0)
    report, verdict_ok, loc, details = run_pair(pair, variant, dtype, ref_capture=_REF_CAPTURES[pair_name])
    assert report is not None, f"{pair_name}/{variant or 'clean'}/{dtype}: {details['stage']} failed: " \
                               f"{details['error']} at {details['where']}"
    if variant:
        (_FP32 if dtype == torch.float32 else _BF16)[(pair_name, variant)] = report
    return report, verdict_ok, loc, details


def _frontier(details) -> str:
    fd = details["frontier"]
    return "; ".join(f"{d}: {e['ref_module']!r} | {e['cand_module']!r} ({e['op']}, {e['max_abs_diff']:.3g})"
                     for d in ("forward", "backward") for e in fd[d][:6])


@pytest.mark.parametrize("pair", PAIR_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_correct_port_compares_clean(pair, dtype):
    report, ok, _, details = _run(pair, None, dtype)
    assert not report.diverged, f"false divergence on a correct port: {report.summary()} | {_frontier(details)}"
    if dtype == BF16:
        assert report.verdict == "within noise"


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_every_trained_reference_parameter_is_paired_and_judged(pair):
    report, _, _, _ = _run(pair)
    ref, _, _ = build(PAIRS[pair])
    names = {n for n, p in ref.named_parameters() if p.requires_grad}
    rows = {r.ref: r for r in report.params}
    assert names <= set(rows), f"reference parameters left unpaired: {sorted(names - set(rows))}"
    failed = sorted(n for n in names if rows[n].grad is not None and not rows[n].grad.passed)
    assert not failed, f"paired parameters whose gradients differ: {failed}"
    # a gradient that includes an output the other side does not have is not judged, and says so
    unjudged = sorted(n for n in names if rows[n].grad is None)
    assert not unjudged or any("which the other side does not have" in w for w in report.warnings), unjudged


@pytest.mark.parametrize("pair,bug", BUG_CASES, ids=[f"{p}-{b}" for p, b in BUG_CASES])
def test_bug_diverges_in_its_module(pair, bug):
    report, diverged, loc, details = _run(pair, bug)
    b = PAIRS[pair].bug(bug)
    assert diverged, f"{b.kind}: reported clean"
    assert loc, (f"{b.kind}: expected ref {b.ref_re!r} / cand {b.cand_re!r} "
                 f"({b.direction}{', exact' if b.exact else ''}); first divergence: {_frontier(details)}")


@pytest.mark.parametrize("pair,bug", BUG_CASES, ids=[f"{p}-{b}" for p, b in BUG_CASES])
def test_bug_with_bf16_candidate_is_localised_or_within_noise(pair, bug):
    b = PAIRS[pair].bug(bug)
    fp32 = _FP32.get((pair, bug)) or _run(pair, bug)[0]
    entries = fp32.first_divergence()["backward" if b.direction == "backward" else "forward"]
    effect = max((e["error"] or 0.0 for e in entries), default=0.0)
    report, diverged, loc, details = _run(pair, bug, BF16)
    if effect > OWN_ROUNDING * torch.finfo(BF16).eps:
        assert loc, f"{b.kind} (effect {effect:.3g}): not localised in bf16; first divergence: {_frontier(details)}"
    else:
        assert report.verdict in ("within noise", "diverged"), f"{b.kind} (effect {effect:.3g}): called a plain match"


@pytest.mark.parametrize("pair,bug", BUG_CASES, ids=[f"{p}-{b}" for p, b in BUG_CASES])
def test_first_divergence_is_isolated_or_says_why(pair, bug):
    """Each first divergence of a planted bug is replayed alone on the reference's values and found
    to start there, or the report says why it could not be replayed, naming the node that stopped it."""
    report = _FP32.get((pair, bug)) or _run(pair, bug)[0]
    nodes = {n["name"] for side in ("ref", "cand") for n in report.graph[side]}
    fd = report.first_divergence()
    entries = fd["forward"] + [e for e in fd["backward"] if not e["consequence_of_forward"]]
    assert entries
    for e in entries:
        if e["isolated"] is not None:
            assert e["isolated"] in ("introduced", "custom backward") and e["not_isolated"] is None, e
        else:
            assert e["not_isolated"] and any(w.strip("(),:") in nodes for w in e["not_isolated"].split()), e
    if pair == "llama_xtransformers" and bug == "partial_rotary":
        # x-transformers rotates q and k in many small ops between the projections and the attention
        (e,) = fd["forward"]
        assert e["not_isolated"] == (f"more than 64 of the candidate's ops lie between {e['cand_node']} and values "
                                     "that match the reference")


@pytest.mark.parametrize("pair,bug", BUG_CASES, ids=[f"{p}-{b}" for p, b in BUG_CASES])
def test_a_bfloat16_candidates_first_divergence_is_replayed_despite_its_own_casts(pair, bug):
    """Seven of these replays failed: the candidate's ops cast to bfloat16 on their own (torchtune's
    norm, x-transformers' attention) and met the float32 parameters the replay gave them."""
    report = _BF16.get((pair, bug)) or _run(pair, bug, BF16)[0]
    for e in report.first_divergence()["forward"]:
        assert not e["not_isolated"] or "dtype" not in e["not_isolated"] and "scalar type" not in e["not_isolated"], e


def test_a_custom_backward_behind_a_fused_weight_is_named(tmp_path):
    """Phi-3 computes gate and value in one fused projection; a SiLU with a wrong hand-written
    backward makes the first backward divergence the gate's slice of that output, which the
    backward replay cannot start from ('not replayed in isolation: ... a slice of a fused output,
    which the replay does not split', and no story). The candidate's backward is checked against
    the derivative of its own forward ops instead: the report, its text and its saved JSON name it."""
    import fxdiff
    from fxdiff.model.report import load_report
    from fxdiff.render import text
    from tests.test_report_text import show
    from tests.real_pairs.llama_meta import SiLUFn

    class WrongBackwardSiLU(torch.nn.Module):
        def forward(self, x):
            return SiLUFn.apply(x, True)
    pair = PAIRS["llama_phi3"]
    ref, cand, _ = build(pair)
    cand.layers[1].mlp.activation_fn = WrongBackwardSiLU()
    args, kwargs = pair.inputs()
    report = fxdiff.compare(fxdiff.capture(ref, args=args, kwargs=kwargs, mode="eval", seed=0), cand)
    assert not report.first_divergence()["forward"]
    (e,) = report.first_divergence()["backward"]
    blame = ("backward only: the candidate's backward through layers.1.mlp.activation_fn is not the derivative of "
             "its forward ops (a custom autograd.Function or a gradient hook)")
    assert (e["ref_node_module"], e["cand_node_module"]) == ("layers.1.mlp.gate_proj", "layers.1.mlp.gate_up_proj")
    assert e["blame"] == blame and e["cand_module"] == "layers.1.mlp.activation_fn" and not e["consequence_of_forward"]
    assert blame in " ".join(show(text.render(report), width=300).split())
    report.save(tmp_path / "report.json")
    (row,) = [r for r in load_report(tmp_path / "report.json").nodes if r.first_backward]
    assert row.blame[0] == blame and row.isolated_backward is None
