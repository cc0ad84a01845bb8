"""RNG replay: train mode with dropout kept compares two implementations that draw randomness differently.

Each pair below computes the same function, written independently, but consumes the RNG in another
order (branches evaluated the other way round; random masks drawn before the dropout rather than
after it) and in another style (``nn.Dropout`` modules vs ``F.dropout``). Without replay, the same
seed gives each side different dropout masks and random draws, so everything downstream differs.
With replay (the default), each random op the alignment pairs takes the reference's recorded value
in the candidate, and the comparison is clean. This file is also a model spec file for the CLI
test (``tests/test_rng_replay.py:ref_branches`` ...).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import fxdiff
from fxdiff.cli import main

HERE = Path(__file__).resolve()
D_IN, D_HID, D_OUT, T = 8, 16, 4, 6
P = 0.3
# the op keys of the random ops these models run (report["first_divergence"] entries' "op")
RANDOM_OPS = {"dropout", "rand", "randn", "bernoulli", "randperm", "normal_", "uniform_", "rand_like", "randn_like"}


def _seeded(cls, *args):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(*args)


def inputs():
    return (torch.randn(2, T, D_IN, generator=torch.Generator().manual_seed(1)),)


# -- pair 1: two dropped-out branches, evaluated left-right vs right-left -------------------------

class RefBranches(nn.Module):
    """nn.Dropout modules; the left branch runs (and draws its mask) first."""

    def __init__(self):
        super().__init__()
        self.left = nn.Linear(D_IN, D_HID)
        self.left_act = nn.Tanh()
        self.left_drop = nn.Dropout(P)
        self.right = nn.Linear(D_IN, D_HID)
        self.right_act = nn.SiLU()
        self.right_drop = nn.Dropout(P)
        self.out_drop = nn.Dropout(P)
        self.out = nn.Linear(D_HID, D_OUT)

    def forward(self, x):
        a = self.left_drop(self.left_act(self.left(x)))
        b = self.right_drop(self.right_act(self.right(x)))
        return self.out(self.out_drop(a + b))


class CandBranches(nn.Module):
    """F.dropout over raw parameters; the right branch runs first. ``bug``: sigmoid for tanh."""

    def __init__(self, bug=False):
        super().__init__()
        self.bug = bug
        self.w_l, self.b_l = nn.Parameter(torch.empty(D_HID, D_IN)), nn.Parameter(torch.empty(D_HID))
        self.w_r, self.b_r = nn.Parameter(torch.empty(D_HID, D_IN)), nn.Parameter(torch.empty(D_HID))
        self.w_o, self.b_o = nn.Parameter(torch.empty(D_OUT, D_HID)), nn.Parameter(torch.empty(D_OUT))

    def forward(self, x):
        r = F.dropout(F.silu(F.linear(x, self.w_r, self.b_r)), P, self.training)
        act = torch.sigmoid if self.bug else torch.tanh
        lft = F.dropout(act(F.linear(x, self.w_l, self.b_l)), P, self.training)
        return F.linear(F.dropout(lft + r, P, self.training), self.w_o, self.b_o)


def _branches_state(ref: RefBranches) -> dict[str, torch.Tensor]:
    s = ref.state_dict()
    return {"w_l": s["left.weight"], "b_l": s["left.bias"], "w_r": s["right.weight"], "b_r": s["right.bias"],
            "w_o": s["out.weight"], "b_o": s["out.bias"]}


def ref_branches():
    return _seeded(RefBranches)


def cand_branches(bug=False):
    cand = CandBranches(bug)
    cand.load_state_dict(_branches_state(ref_branches()))
    return cand


def cand_branches_bug():
    return cand_branches(bug=True)


# -- pair 2: NEST-style random masking and noise, drawn after vs before the dropout ---------------

class RefMasking(nn.Module):
    """dropout, then (train mode) block-free random frame masking with torch.rand, a learned mask
    embedding plus in-place normal_ noise, a torch.randperm frame shuffle, a torch.bernoulli
    frame keep and an in-place uniform_ gain per example; in that order."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D_IN, D_HID)
        self.drop = nn.Dropout(P)
        self.mask_embedding = nn.Parameter(torch.randn(D_HID))
        self.out = nn.Linear(D_HID, D_OUT)

    def forward(self, x):
        h = self.drop(self.proj(x))
        if self.training:
            masked = torch.rand(h.shape[:2], device=h.device) < 0.3
            noise = torch.empty_like(h).normal_()
            h = torch.where(masked.unsqueeze(-1), self.mask_embedding + 0.1 * noise, h)
            h = h[:, torch.randperm(h.shape[1], device=h.device)]
            keep = torch.bernoulli(torch.full((h.shape[0], h.shape[1], 1), 0.8, device=h.device))
            gain = torch.empty(h.shape[0], 1, 1, device=h.device).uniform_(0.5, 1.5)
            h = h * keep * gain
        return self.out(h)


class CandMasking(nn.Module):
    """The same function; every random draw happens up front, in reverse order, before the dropout."""

    def __init__(self):
        super().__init__()
        self.w_in, self.b_in = nn.Parameter(torch.empty(D_HID, D_IN)), nn.Parameter(torch.empty(D_HID))
        self.emb = nn.Parameter(torch.empty(D_HID))
        self.w_out, self.b_out = nn.Parameter(torch.empty(D_OUT, D_HID)), nn.Parameter(torch.empty(D_OUT))

    def forward(self, x):
        b, t, _ = x.shape
        if self.training:
            gain = torch.empty(b, 1, 1).uniform_(0.5, 1.5)
            keep = torch.bernoulli(torch.full((b, t, 1), 0.8))
            order = torch.randperm(t)
            noise = torch.empty(b, t, D_HID).normal_()
            masked = torch.rand(b, t) < 0.3
        h = F.dropout(F.linear(x, self.w_in, self.b_in), P, self.training)
        if self.training:
            h = torch.where(masked[..., None], self.emb + 0.1 * noise, h)
            h = h[:, order] * keep * gain
        return F.linear(h, self.w_out, self.b_out)


def ref_masking():
    return _seeded(RefMasking)


def cand_masking():
    s = ref_masking().state_dict()
    cand = CandMasking()
    cand.load_state_dict({"w_in": s["proj.weight"], "b_in": s["proj.bias"], "emb": s["mask_embedding"],
                          "w_out": s["out.weight"], "b_out": s["out.bias"]})
    return cand


PAIRS = {"branches": (ref_branches, cand_branches), "masking": (ref_masking, cand_masking)}


def capture_train(build_ref):
    return fxdiff.capture(build_ref(), inputs(), mode="train", keep_dropout=True, seed=0)


def is_random(node) -> bool:
    """Whether a capture node is a random op (by its recorded target, e.g. torch.rand)."""
    target = str(node.meta.get("fxdiff_target", node.target)).rsplit(".", 1)[-1]
    return target in RANDOM_OPS or "dropout" in target


def first_forward(report):
    return report.first_divergence()["forward"]


# -- the API ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair", list(PAIRS))
def test_pair_is_one_function(pair):
    """Control: in eval mode (no randomness) the two implementations match."""
    build_ref, build_cand = PAIRS[pair]
    ref = fxdiff.capture(build_ref(), inputs(), mode="eval")
    report = fxdiff.compare(ref, build_cand())
    assert report.diverged is False, report.summary()


@pytest.mark.parametrize("pair", list(PAIRS))
def test_train_mode_with_dropout_is_clean_with_replay(pair):
    build_ref, build_cand = PAIRS[pair]
    ref = capture_train(build_ref)
    dropped = [n.name for n in ref.nodes("call_function")
               if "dropout" in str(n.meta.get("fxdiff_target")) and bool((ref.values[n.name] == 0).any())]
    assert dropped, "the reference ran with dropout active"
    report = fxdiff.compare(ref, build_cand())  # replay is on by default; mode, dropout, seed from ref
    assert report.diverged is False, (report.summary(), first_forward(report))
    summary = report.summary()
    assert summary["nodes"]["forward_matches"] > 0 and summary["nodes"]["backward_matches"] > 0
    assert fxdiff.compare(ref, build_cand(), rng_replay=True).diverged is False


@pytest.mark.parametrize("pair", list(PAIRS))
def test_train_mode_with_dropout_diverges_without_replay(pair):
    build_ref, build_cand = PAIRS[pair]
    ref = capture_train(build_ref)
    report = fxdiff.compare(ref, build_cand(), rng_replay=False)
    assert report.diverged is True
    first = first_forward(report)
    # at the random ops, or (when the alignment leaves differing random ops unpaired) their consumers
    assert first and all(e["op"] in RANDOM_OPS or any(map(is_random, ref.node(e["ref_node"]).all_input_nodes))
                         for e in first), first
    # a random op is not replayed in isolation (it would draw again), and the report says so
    at_random = [e for e in first if e["op"] in RANDOM_OPS]
    assert at_random and all(e["isolated"] is None and e["not_isolated"] ==
                             f"{e['cand_node']} ({e['op']}) draws random numbers: a replay would draw others"
                             for e in at_random), at_random


def test_replay_does_not_hide_a_bug():
    """A real difference (sigmoid for tanh in the left branch) still diverges, at that branch: replay
    hands the candidate the reference's random draws (dropout's mask), not the values they produced."""
    ref = capture_train(ref_branches)
    report = fxdiff.compare(ref, cand_branches_bug())
    assert report.diverged is True
    first = first_forward(report)
    assert first, "no first forward divergence"
    assert all(e["ref_module"] in ("left_act", "left_drop") for e in first), first


# -- the CLI ---------------------------------------------------------------------------------------

def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.mark.parametrize("pair", list(PAIRS))
def test_cli_replay_on_by_default_and_off_with_flag(tmp_path, pair):
    ref = tmp_path / "ref"
    result = cli("capture", f"{HERE}:ref_{pair}", "--inputs", f"{HERE}:inputs", "--mode", "train",
                 "--keep-dropout", "-o", ref)
    assert result.exit_code == 0, result.output
    result = cli("compare", ref, f"{HERE}:cand_{pair}", "--json", tmp_path / "on.json")
    assert result.exit_code == 0, result.output
    result = cli("compare", ref, f"{HERE}:cand_{pair}", "--no-rng-replay", "--json", tmp_path / "off.json")
    assert result.exit_code == 1, result.output
    assert fxdiff.load_report(tmp_path / "off.json").diverged
    assert not fxdiff.load_report(tmp_path / "on.json").diverged


# -- every kind of random op, drawn in the other order on each side ---------------------------------

class Drawn(nn.Module):
    """A linear layer, then ``fn(h)``: the random part under test (module ``noise``)."""

    def __init__(self, fn):
        super().__init__()
        self.proj = _seeded(nn.Linear, D_IN, D_HID)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.proj(x))


def draws_ref(h):
    a, b, c = torch.randn(h.shape), torch.rand_like(h), torch.randn_like(h)
    return h * b + a * c


def draws_cand(h):
    c = torch.randn_like(h)
    b = torch.rand_like(h)
    return h * b + torch.randn(h.shape) * c


def indices_ref(h):
    frame = torch.randint(0, T, (h.shape[0],))
    picks = torch.multinomial(h.detach().abs().sum(-1), 2)
    shift = torch.empty(h.shape[0], dtype=torch.long).random_(0, 4)
    rows = torch.arange(h.shape[0])
    return h[rows, frame] + h[rows, picks[:, 0]] * h[rows, picks[:, 1]] + shift[:, None]


def indices_cand(h):
    shift = torch.empty(h.shape[0], dtype=torch.long).random_(0, 4)
    picks = torch.multinomial(h.detach().abs().sum(-1), 2)
    frame = torch.randint(0, T, (h.shape[0],))
    rows = torch.arange(h.shape[0])
    return h[rows, frame] + h[rows, picks[:, 0]] * h[rows, picks[:, 1]] + shift[:, None]


def dropouts_ref(h):
    keep = torch.empty(h.shape).bernoulli_(0.7)
    a = F.alpha_dropout(h, 0.2, True)
    b = F.dropout1d(h.transpose(1, 2), 0.3, True).transpose(1, 2)
    c = F.dropout(torch.relu(h) * 1.5, 0.4, True, inplace=True)   # zeros from relu; written in place
    return a * keep + b + c


def dropouts_cand(h):
    c = F.dropout(1.5 * torch.relu(h), 0.4, True)
    b = F.dropout1d(h.transpose(1, 2), 0.3, True).transpose(1, 2)
    a = F.alpha_dropout(h, 0.2, True)
    return a * torch.empty(h.shape).bernoulli_(0.7) + b + c


def spec_augment_ref(h, width=3):
    """SpecAugment-style time and feature masks: widths drawn, then starts."""
    b, t, f = h.shape
    tw, fw = torch.randint(1, width + 1, (b, 1)), torch.randint(1, width + 1, (b, 1))
    t0, f0 = (torch.rand(b, 1) * (t - tw)).long(), (torch.rand(b, 1) * (f - fw)).long()
    tpos, fpos = torch.arange(t)[None], torch.arange(f)[None]
    time = (tpos >= t0) & (tpos < t0 + tw)
    feat = (fpos >= f0) & (fpos < f0 + fw)
    return h.masked_fill(time[:, :, None] | feat[:, None, :], 0.0)


def spec_augment_cand(h, width=3):
    """The same masks, each start drawn right after its width (look-alike draws keep their order:
    the matcher pairs those by order)."""
    b, t, f = h.shape
    tw = torch.randint(1, width + 1, (b, 1))
    t0 = (torch.rand(b, 1) * (t - tw)).long()
    fw = torch.randint(1, width + 1, (b, 1))
    f0 = (torch.rand(b, 1) * (f - fw)).long()
    feat = (torch.arange(f)[None] >= f0) & (torch.arange(f)[None] < f0 + fw)
    time = (torch.arange(t)[None] >= t0) & (torch.arange(t)[None] < t0 + tw)
    return h.masked_fill(feat[:, None, :] | time[:, :, None], 0.0)


KINDS = {"draws": (draws_ref, draws_cand, {"randn", "rand_like", "randn_like"}),
         "indices": (indices_ref, indices_cand, {"randint", "multinomial", "random_"}),
         "dropouts": (dropouts_ref, dropouts_cand, {"bernoulli_", "alpha_dropout", "dropout1d", "dropout"}),
         "spec_augment": (spec_augment_ref, spec_augment_cand, {"randint", "rand"})}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_random_op_is_replayed(kind):
    ref_fn, cand_fn, ops = KINDS[kind]
    ref = fxdiff.capture(Drawn(ref_fn), inputs(), mode="train", keep_dropout=True)
    assert fxdiff.compare(ref, Drawn(cand_fn), rng_replay=False).diverged, "the two draw differently"
    report = fxdiff.compare(ref, Drawn(cand_fn))
    assert report.diverged is False, (report.summary(), first_forward(report), report.unmatched)
    assert {e["op"] for e in report.replayed} == ops, report.replayed
    assert all(e["ref_node"] in ref.values and isinstance(e["call"], int) for e in report.replayed)


def test_replay_casts_to_the_candidates_dtype():
    ref = fxdiff.capture(Drawn(draws_ref), inputs(), mode="train")
    report = fxdiff.compare(ref, Drawn(draws_cand), dtype="float64")
    assert report.diverged is False and len(report.replayed) == 3, report.summary()


def test_other_distribution_parameters_are_not_replayed():
    """uniform_(0.5, 1.5) against uniform_(0, 1): a bug replay must not hide."""
    ref = fxdiff.capture(Drawn(lambda h: h * torch.empty(h.shape).uniform_(0.5, 1.5)), inputs(), mode="train")
    report = fxdiff.compare(ref, Drawn(lambda h: h * torch.empty(h.shape).uniform_()))
    assert report.diverged and report.replayed == []
    assert [e["op"] for e in first_forward(report)] == ["uniform_"], first_forward(report)
    assert report.warnings == ["uniform_ at <root> drew its own numbers: its arguments [] differ from the "
                               "reference's [0.5, 1.5] at <root>, so the reference's draw was not given to it"]


def test_two_captures_are_not_replayed_and_the_report_says_so():
    ref = capture_train(ref_branches)
    cand = fxdiff.capture(cand_branches(), inputs(), mode="train", keep_dropout=True)
    report = fxdiff.compare(ref, cand)
    assert report.diverged and report.replayed == []
    assert any("cannot be replayed" in w for w in report.warnings), report.warnings
    same = fxdiff.compare(ref, ref)
    assert not same.diverged and not any("random" in w for w in same.warnings)


class _DropPath(nn.Module):
    """A residual block under stochastic depth, one keep draw a sample: timm's ``bernoulli_(keep)``
    on a (batch, 1, 1) tensor, or Hugging Face's (``floored``) ``floor(keep + rand)`` on (batch, 1),
    or a ``rand < keep`` (``below``)."""

    def __init__(self, style: str, keep: float = 0.6):
        super().__init__()
        torch.manual_seed(0)
        self.style, self.keep, self.mlp = style, keep, nn.Sequential(nn.Linear(D_IN, D_HID), nn.GELU(),
                                                                     nn.Linear(D_HID, D_IN))

    def forward(self, x):
        y = self.mlp(x)
        if self.style == "timm":
            mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(self.keep)
        elif self.style == "floored":
            mask = (self.keep + torch.rand(x.shape[0], 1, dtype=x.dtype)).floor_()[:, :, None]
        else:
            mask = (torch.rand(x.shape[0], 1) < self.keep).to(x.dtype)[:, :, None]
        return x + y * mask / self.keep


@pytest.mark.parametrize("style", ["floored", "below"])
def test_a_bernoulli_mask_is_replayed_into_the_uniforms_a_candidate_thresholds(style):
    """timm's stochastic depth against Hugging Face's: the same mask a sample, drawn as a Bernoulli
    on one side and as uniforms the other side thresholds itself. They were paired and not replayed:
    DIVERGED at the draws in train mode with dropout kept."""
    inputs = (torch.randn(16, T, D_IN, generator=torch.Generator().manual_seed(1)),)
    ref = fxdiff.capture(_DropPath("timm"), inputs, mode="train", keep_dropout=True, seed=0)
    mask = next(n.name for n in ref.nodes("call_function") if "bernoulli" in str(n.meta.get("fxdiff_target")))
    assert 0 < int((ref.values[mask] == 0).sum()) < 16   # some samples kept, some dropped
    report = fxdiff.compare(ref, _DropPath(style))
    assert not report.diverged, first_forward(report)
    assert report.replayed and report.replayed[0]["op"] == "rand", report.replayed
    assert fxdiff.compare(ref, _DropPath(style), rng_replay=False).diverged
