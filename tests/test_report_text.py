"""The terminal report and the default drawing, on real comparisons of the bundled Conformer example:
a per-module table naming the bug's module, no empty tables, names never cut, parameter rows
grouped by module when many, counts that add up, buffer values, and an SVG a screen can show."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

import fxdiff
from fxdiff.cli import main
from fxdiff.render import text
from fxdiff.render.svg import screen_view

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "examples" / "conformer" / "specs.py"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("fxdiff_test_report_text_specs", SPECS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(ex, tmp_path_factory):
    """The reference capture (saved too) and its comparisons with the clean port and two buggy ones."""
    ref = fxdiff.capture(ex.reference(), kwargs=ex.inputs(), loss=ex.loss)
    folder = tmp_path_factory.mktemp("report_text")
    fxdiff.save(ref, folder / "ref.fxd")
    return {"ref": ref, "dir": folder,
            "clean": fxdiff.compare(ref, ex.port(), loss=ex.loss),
            "glu": fxdiff.compare(ref, ex.port_bug_glu_order(), loss=ex.loss),
            "conv_padding": fxdiff.compare(ref, ex.port_bug_conv_padding(), loss=ex.loss)}


def show(renderable, width: int = 200) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def block(module: str) -> str:
    """The example's module table rows, worked out by hand: a layer, else the top-level module."""
    parts = module.split(".") if module else []
    return ".".join(parts[:2]) if parts[:1] == ["layers"] else ".".join(parts[:1])


def _differs(rows) -> bool:
    return any(m is not None and not m.passed for r in rows for m in (r.forward, r.backward))


def _section(out: str, title: str) -> str:
    start = out.index(title)
    return out[start:out.index("\n\n", start)]


@pytest.mark.parametrize("bug, module", [("glu", "layers.2"), ("conv_padding", "layers.0")])
def test_module_table_names_the_bug_module_and_counts_the_rest(runs, bug, module):
    report = runs[bug]
    out = show(text.render(report))
    assert out.index("First divergence") < out.index("Modules") < out.index("Parameter gradients") \
        < out.index("Summary")
    table = _section(out, "Modules")
    groups = defaultdict(list)
    for r in report.nodes:
        groups[block(r.ref_module)].append(r)
    differ = [k for k, rows in groups.items() if _differs(rows)]
    same = len(groups) - len(differ)
    assert same > 0 and module in differ
    listed = re.findall(r"^│ (\S+) ", table, re.M)
    assert sorted(listed) == sorted(k or "<root>" for k in differ)
    assert f"and {same} more modules match" in table
    first = next(r for r in report.nodes if r.first_forward)
    row = next(line for line in table.splitlines() if line.startswith(f"│ {module} "))
    assert row.count("DIFF") == 2 and first.ref_node in row and "<- first" in row
    # the modules before the bug compute the same values: their forward column says so
    before = [k for k in differ if k.startswith("layers.") and k < module]
    for k in before:
        cells = next(line for line in table.splitlines() if line.startswith(f"│ {k} ")).split("│")
        assert cells[2].strip() == "ok" and cells[3].strip().startswith("DIFF")


def test_module_table_rows_by_depth_and_by_repeated_blocks(runs):
    report = runs["glu"]
    paths = {p for n in report.graph["ref"] for p in text._prefixes(n["module"] or "")}
    assert {"pre_encode.conv.0", "pre_encode.conv.1", "layers.0"} <= paths
    assert text.repeated_blocks(paths) == {"layers.0", "layers.1", "layers.2"}
    assert text.repeated_blocks({"encoder", "decoder.proj"}) == set()
    key = text.module_key(report)
    assert [key(m) for m in ("layers.2.conv.depthwise_conv", "pre_encode.conv.0", "decoder.proj", "")] == \
        ["layers.2", "pre_encode", "decoder", ""]
    table = _section(show(text.render(report, modules_depth=1)), "Modules")
    assert re.search(r"^│ layers +│ DIFF", table, re.M) and not re.search(r"^│ layers\.2 ", table, re.M)


def test_a_clean_comparison_prints_no_table_and_a_diverged_one_no_empty_table(runs):
    out = show(text.render(runs["clean"]))
    assert out.splitlines()[0].startswith("MATCH")
    assert "┏" not in out and "┃" not in out, "every section of a clean comparison is one line"
    assert "outputs: all 3 match (log_probs, encoded, encoded_lengths)" in out
    assert "parameter gradients: all 119 match" in out and "parameter and buffer values: all 131 match" in out
    assert re.search(r"modules: all \d+ match", out) and "First divergence" not in out
    out = show(text.render(runs["glu"]))
    for body in re.findall(r"┡[^\n]*\n(.*?)└", out, re.S):
        assert body.strip().startswith("│"), "a table has rows"
    assert "log_probs" in _section(out, "Outputs") and "Ops" not in out, "op rows only on request"
    assert "Ops" in show(text.render(runs["glu"], ops=True))


def test_names_are_never_cut_on_a_narrow_console(runs):
    report = runs["glu"]
    out = show(text.render(report, ops=True, modules_depth=3), width=60)
    assert "…" not in out
    failing = [r for r in report.nodes if _differs([r])]
    names = [f"{r.ref_module} {r.ref_node}" for r in failing]
    assert max(map(len, names)) > 40
    for name in names:
        if len(name) <= 56:
            assert name in out, name
    modules = {".".join(r.ref_module.split(".")[:3]) for r in failing}
    longest = max(modules, key=len)
    assert len(longest) > 25 and re.search(rf"^  {re.escape(longest)}\s*$", out, re.M)


def test_parameter_rows_grouped_by_module_when_many(runs):
    report = runs["glu"]
    bad = [p for p in report.params if p.grad is not None and not p.grad.passed]
    assert len(bad) > text.MANY
    table = _section(show(text.render(report)), "Parameter gradients, by module")
    counts = defaultdict(lambda: [0, 0])
    for p in report.params:
        if p.grad is not None:
            counts[block(p.ref.rpartition(".")[0])][0] += not p.grad.passed
            counts[block(p.ref.rpartition(".")[0])][1] += 1
    rows = [line for line in table.splitlines() if line.startswith("│ ")]
    assert len(rows) == sum(1 for k, (b, _) in counts.items() if b)
    for k, (b, n) in counts.items():
        if b:
            assert any(re.match(rf"│ {re.escape(k)} +│ {b} of {n} ", line) for line in rows), k
    assert not any(line.startswith(f"│ {p.ref} ") for p in bad for line in rows)
    matching = sum(n - b for b, n in counts.values())
    assert f"and {matching} more parameter {'gradient matches' if matching == 1 else 'gradients match'}" in table


def test_few_parameter_rows_one_each_with_why(ex, runs):
    port = ex.port()
    port.layers[0].norm_out.weight.requires_grad_(False)        # a parameter the port forgot to train
    report = fxdiff.compare(runs["ref"], port, loss=ex.loss)
    out = show(text.render(report), width=60)
    assert report.diverged and out.splitlines()[0].startswith("DIVERGED: 1 of 119 parameter gradients differ")
    table = _section(out, "Parameter gradients")
    assert "by module" not in table
    assert "layers.0.norm_out.weight" in table and "gradient on ref only" in table
    assert "and 118 more parameter gradients match" in table


def test_counts_add_up(ex, runs):
    model = ex.reference()
    n_params, n_buffers = len(list(model.named_parameters())), len(list(model.named_buffers()))
    for name in ("clean", "glu"):
        s = runs[name].summary()["tensors"]
        assert s == {"total": n_params + n_buffers, "trained": n_params, "buffers_or_frozen": n_buffers,
                     "unpaired": 0}
        assert s["total"] == len(runs["ref"].params) and s["trained"] == len(runs["ref"].param_grads)
    # a parameter frozen on both sides: counted with the buffers, not with the trained ones
    frozen, port = ex.reference(), ex.port()
    for model in (frozen, port):
        model.decoder.proj.bias.requires_grad_(False)
    ref = fxdiff.capture(frozen, kwargs=ex.inputs(), loss=ex.loss)
    report = fxdiff.compare(ref, port, loss=ex.loss)
    assert not report.diverged
    s = report.summary()
    t, g = s["tensors"], s["param_grads"]
    assert (t["trained"], t["buffers_or_frozen"]) == (n_params - 1, n_buffers + 1)
    assert t["trained"] + t["buffers_or_frozen"] == t["total"] == len(ref.params)
    assert g["matched"] + g["mismatched"] + s["uncompared"]["trained_ref_params"] + s["uncompared"]["param_grads"] \
        == t["trained"]
    out = " ".join(show(text.summary_panel(report)).replace("│", " ").split())
    assert f"{t['total']} parameters and buffers = {n_params - 1} trained + {n_buffers + 1} buffers or frozen" in out


def test_buffer_values_are_compared_and_shown(ex, tmp_path):
    """BatchNorm running statistics updated with another momentum: the values differ, nothing else."""
    ref = fxdiff.capture(ex.reference(), kwargs=ex.inputs(), loss=ex.loss, mode="train")
    port = ex.port()
    for m in port.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.momentum = 0.5
    stats = [n for n, _ in ex.reference().named_buffers() if "running_" in n]
    (tmp_path / "map.json").write_text(json.dumps({"params": {n: n for n in stats}}))
    report = fxdiff.compare(ref, port, loss=ex.loss, user_map=str(tmp_path / "map.json"))
    out = show(text.render(report))
    assert out.splitlines()[0] == f"DIVERGED: {len(stats)} of {len(ref.params)} parameter and buffer values differ"
    table = _section(out, "Parameter and buffer values")
    listed = re.findall(r"^│ (\S+) +│ DIFF", table, re.M)
    assert sorted(listed) == sorted(stats)
    assert f"and {len(ref.params) - len(stats)} more values match" in table
    assert "parameter gradients: all 119 match" in out


def test_first_divergence_says_why_it_is_believed(ex, runs):
    report = runs["glu"]
    out = " ".join(_section(show(text.render(report)), "First divergence").split())
    first = next(r for r in report.nodes if r.first_forward)
    m = first.forward
    assert first.cause() == "introduced"
    assert f"forward: {first.ref_module} {first.ref_node} ({first.op})" in out
    assert f"relative error {text.fmt(m.error)} is {m.error / m.noise:.3g}x its noise level {text.fmt(m.noise)}" in out
    assert "introduced here" in out
    if first.blame:      # an op on one side only, or a role swap, that the divergence starts at
        assert f"starts at: {first.blame[0]} in {first.blame[1]}" in out
    back = next(r for r in report.nodes if r.first_backward)
    assert f"backward: {back.ref_module} {back.ref_node}" in out
    assert "consequence of the forward divergence" in out
    # a float64 port of a float32 reference: a match, within float32 noise
    report = fxdiff.compare(runs["ref"], ex.port(), loss=ex.loss, dtype="float64")
    assert show(text.verdict(report)).strip() == "MATCH, within float32 noise"


def test_saved_reports_keep_their_json_form_and_older_or_newer_ones_load(runs, tmp_path):
    """Outputs and unmatched entries are dataclasses in memory and the same JSON objects on disk; a
    report written before the isolation reasons existed loads and prints as it did, and one with
    fields of a later version loads without them."""
    from fxdiff.model.report import OutputRow, UnmatchedNode
    report = runs["glu"]
    doc = json.loads(json.dumps(report.to_dict(), default=str))
    assert set(doc["outputs"][0]) == {"ref", "cand", "metrics", "frontier"}
    assert set(doc["unmatched"]) == {"ref", "cand", "ref_params", "cand_params", "ref_outputs", "cand_outputs",
                                     "trained_ref_params", "trained_cand_params", "ref_inputs"}
    assert set(doc["unmatched"]["cand"][0]) == {"node", "module", "op", "shape", "reason"}
    for row in doc["nodes"]:
        for key in ("isolated_why", "isolated_backward_why"):
            del row[key]
    for row in doc["outputs"]:
        del row["frontier"]
    older = tmp_path / "older.json"
    older.write_text(json.dumps(doc))
    loaded = fxdiff.load_report(older)
    assert isinstance(loaded.outputs[0], OutputRow) and isinstance(loaded.unmatched.cand[0], UnmatchedNode)
    assert [u.node for u in loaded.unmatched.cand] == [u.node for u in report.unmatched.cand]
    assert show(text.render(loaded)) == show(text.render(report))
    doc["nodes"][0]["added_later"] = 1
    doc["unmatched"]["added_later"] = ["x"]
    doc["outputs"][0]["metrics"]["added_later"] = 0.5
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(doc))
    assert fxdiff.load_report(newer).summary() == report.summary()


@needs_dot
def test_default_svg_fits_a_screen(runs, tmp_path):
    svg = tmp_path / "glu.svg"
    result = CliRunner().invoke(main, ["compare", str(runs["dir"] / "ref.fxd"), f"{SPECS}:port_bug_glu_order",
                                       "--svg", str(svg)])
    assert result.exit_code == 1, result.output
    assert "Ops" not in result.output and "Modules" in result.output
    root = ET.parse(svg).getroot()
    width, height = (float(root.get(k).removesuffix("pt")) for k in ("width", "height"))
    assert width <= 1600 and height <= 1000, (width, height)
    units = [g for g in root.iter("{http://www.w3.org/2000/svg}g") if "unit" in (g.get("class") or "").split()]
    assert units and all(g.get("id").startswith("f_") for g in units), "the forward view only"
    first = [g for g in units if "first" in g.get("class").split()]
    assert first and "glu_2" in ET.tostring(first[0], encoding="unicode")
    view = screen_view(runs["glu"])
    assert view.left_out > len(view.items), "most of the graph is left out"
    for path, cluster in view.clusters.items():   # no frame that holds nothing but one frame
        assert not path or cluster.units or len(cluster.children) > 1, path
    # the whole graph on request is far bigger
    runs["glu"].save(tmp_path / "r.json")
    result = CliRunner().invoke(main, ["render", str(tmp_path / "r.json"), "--svg", str(svg), "--around", "0"])
    assert result.exit_code == 0, result.output
    root = ET.parse(svg).getroot()
    assert float(root.get("height").removesuffix("pt")) > 1000


class Lookup(torch.nn.Module):
    """Positions looked up from a table, trained or (``frozen``) not, added to a projection."""

    def __init__(self, frozen=False):
        super().__init__()
        self.proj, self.positions = torch.nn.Linear(3, 4), torch.nn.Embedding(5, 4)
        self.positions.requires_grad_(not frozen)

    def forward(self, x):
        return torch.tanh(self.proj(x) + self.positions(torch.arange(5)))


def test_a_gradient_on_one_side_only_is_said_in_words_not_infinite_differences():
    torch.manual_seed(0)
    ref, port = Lookup(), Lookup(frozen=True)
    port.load_state_dict(ref.state_dict())
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(2, 5, 3),)), port)
    out = " ".join(_section(show(text.render(report)), "First divergence").split())
    assert "backward: positions embedding (embedding)" in out
    assert "gradient on ref only: none reached the candidate's op" in out and "inf" not in out
    assert "output 0: matches" in show(text.render(report))   # one tensor returned: no "all 1 match (0)"
    assert "its own backward is not their derivative" not in out   # a frozen table, not a custom backward


class RefDecoder(torch.nn.Module):
    """A decoder that makes its logits itself from the token table (openai-whisper's)."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.emb = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(6, 4)

    def forward(self, x):
        return self.norm(torch.tanh(self.lin(x))) @ self.emb.weight.T


class Ref(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = RefDecoder()

    def forward(self, x):
        return self.decoder(x)


class PortDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(torch.tanh(self.lin(x)))


class Port(torch.nn.Module):
    """The same, its logits made by a head beside the decoder (Hugging Face's ``proj_out``)."""

    def __init__(self):
        super().__init__()
        self.body, self.proj_out = PortDecoder(), torch.nn.Linear(4, 6, bias=False)

    def forward(self, x):
        return self.proj_out(self.body(x))


def test_a_module_row_names_the_module_most_of_its_ops_pair_into():
    """The logits product pairs with a head outside the decoder's counterpart: the row named the
    candidate's root ('decoder (cand hf)'), the common prefix of every op's module."""
    torch.manual_seed(0)
    ref, port = Ref(), Port()
    state = ref.state_dict()
    port.load_state_dict({"body.lin.weight": state["decoder.lin.weight"] + 1e-2, "body.lin.bias": state["decoder.lin.bias"],
                          "body.norm.weight": state["decoder.norm.weight"], "body.norm.bias": state["decoder.norm.bias"],
                          "proj_out.weight": state["decoder.emb.weight"]})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(3, 4),)), port)
    assert "decoder (cand body)" in _section(show(text.render(report)), "Modules")


class Keyed(torch.nn.Module):
    """Keys projected without a bias (openai-whisper's), or (``bias``) with one (a port's mistake)."""

    def __init__(self, bias=False):
        super().__init__()
        self.key, self.head = torch.nn.Linear(4, 4, bias=bias), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.key(x)))


def test_a_parameter_trained_in_the_candidate_only_is_named():
    """It was counted ('2 without a counterpart') but never named, the reference's leftovers only."""
    torch.manual_seed(0)
    ref, port = Keyed(), Keyed(bias=True)
    port.load_state_dict({**ref.state_dict(), "key.bias": torch.zeros(4)})
    report = fxdiff.compare(fxdiff.capture(ref, (torch.randn(3, 4),)), port)
    assert report.unmatched.trained_cand_params == ["key.bias"]
    assert "trained in the candidate only, no counterpart in the reference: key.bias" in show(text.render(report))


def test_a_bit_for_bit_match_says_so_on_its_verdicts_line():
    """A port that agrees bit for bit read 'noise-aware (float32): 0 of 45 comparisons pass within
    their noise level, not bit for bit', as if none had passed."""
    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)), torch.randn(3, 4)
    report = fxdiff.compare(fxdiff.capture(model, (x,)), model)
    line = next(line for line in show(text.render(report)).splitlines() if "verdicts:" in line)
    assert re.search(r"noise-aware \(float32\): all \d+ comparisons bit for bit", line), line


def test_the_ops_that_pair_with_nothing_are_listed_with_the_ops():
    """Only their count was printed ('8 ref, 8 cand ops unmatched'), even with --all; their names,
    modules and why were in the JSON report alone."""
    class Block(torch.nn.Module):
        def __init__(self, residual=True):
            super().__init__()
            self.lin, self.residual = torch.nn.Linear(4, 4), residual

        def forward(self, x):
            y = torch.relu(self.lin(x))
            return (y + x if self.residual else y).sum(-1)

    torch.manual_seed(0)
    ref, x = Block(), torch.randn(3, 4)
    port = Block(residual=False)
    port.load_state_dict(ref.state_dict())
    report = fxdiff.compare(fxdiff.capture(ref, (x,)), port)
    assert "Unmatched ops" not in show(text.render(report))
    out = show(text.render(report, ops=True))
    assert "Unmatched ops" in out and re.search(r"ref[│ ]+<root> add[│ ]+add[│ ]+3x4[│ ]+no counterpart found", out), out
