"""The SVG drawing, the HTML report (in a real headless Chromium) and the Model Explorer export,
on the Conformer example's clean and buggy comparisons and on synthetic reports."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

import fxdiff
from fxdiff.cli import main
from fxdiff.render import model_explorer, scale
from fxdiff.render.graphview import build_view
from fxdiff.render.html import render_html, write_html
from fxdiff.render.svg import draw, fit_scale, render_svg

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
SVG = "{http://www.w3.org/2000/svg}"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def conformer(tmp_path_factory):
    """The example's reference capture, and its comparison with the clean port and a buggy one."""
    ex = _load(ROOT / "examples" / "conformer" / "specs.py", "fxdiff_test_render_conformer_specs")
    ref = fxdiff.capture(ex.reference(), kwargs=ex.inputs(), loss=ex.loss)
    clean = fxdiff.compare(ref, ex.port(), loss=ex.loss)
    buggy = fxdiff.compare(ref, ex.port_bug_glu_order(), loss=ex.loss)
    d = tmp_path_factory.mktemp("render")
    fxdiff.save(ref, d / "ref.fxd")
    buggy.save(d / "buggy.json")
    clean.save(d / "clean.json")
    return {"ref": ref, "clean": clean, "buggy": buggy, "dir": d, "ex": ex}


@pytest.fixture(scope="module")
def synthetic():
    bench = _load(ROOT / "benchmarks" / "render.py", "fxdiff_test_render_bench")
    return bench


def _units(svg_text: str, prefix: str = "f") -> dict[str, ET.Element]:
    root = ET.fromstring(svg_text)   # valid XML or this raises
    return {g.get("id"): g for g in root.iter(f"{SVG}g")
            if "unit" in (g.get("class") or "").split() and g.get("id", "").startswith(prefix + "_")}


def _classes(g: ET.Element) -> set[str]:
    return set((g.get("class") or "").split())


def _fill(g: ET.Element) -> str:
    shape = next(e for e in g if e.tag in (f"{SVG}path", f"{SVG}polygon"))
    return shape.get("fill")


def _stroke(g: ET.Element) -> tuple[str, float]:
    shape = next(e for e in g if e.tag in (f"{SVG}path", f"{SVG}polygon"))
    return shape.get("stroke"), float(shape.get("stroke-width", "1"))


def _text(g: ET.Element) -> str:
    return " ".join(t.text or "" for t in g.iter(f"{SVG}text"))


def _title(g: ET.Element) -> str:
    return g.find(f"{SVG}title").text or ""


@needs_dot
def test_buggy_svg_marks_first_divergence_and_colours_by_metric(conformer):
    report = conformer["buggy"]
    assert report.diverged and any(r.first_forward for r in report.nodes)
    view = build_view(report, "forward")
    svg_text = draw(view, "max_abs")
    units = _units(svg_text)
    assert len(units) == len(view.units)
    scl = fit_scale(view, "max_abs")
    firsts = [g for g in units.values() if "first" in _classes(g)]
    assert firsts, "the first divergence is drawn"
    for g in firsts:   # outlined, and says so
        stroke, width = _stroke(g)
        assert stroke == scale.FIRST_LINE and width >= 3
    first_rows = {r.ref_node for r in report.nodes if r.first_forward}
    assert any(r in _title(g) for g in firsts for r in first_rows)

    diverged = []
    for u, unit in enumerate(view.units):
        s = view.unit_summary(u, "forward", "max_abs")
        g = units[f"f_{unit.id}"]
        assert s["status"] in _classes(g)
        if s["status"] in ("diverged", "first"):
            assert _fill(g) == scl.color(s["worst"])       # the colour is the metric's
            diverged.append((s["worst"], _fill(g)))
        elif s["status"] == "clean":
            assert _fill(g) == scale.CLEAN
    # worse error, darker (redder) fill: luminance falls as the measure grows
    diverged.sort()
    lum = [_luminance(f) for _, f in diverged if f != scale.INFINITE]
    assert len(set(lum)) > 1 and all(a >= b - 1e-9 for a, b in zip(lum, lum[1:]))


def _luminance(fill: str) -> float:
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b


@needs_dot
def test_unmatched_nodes_are_grey_on_their_side(conformer):
    report = conformer["buggy"]
    assert report.unmatched.ref and report.unmatched.cand
    view = build_view(report, "forward", depth=99, fold=False, max_nodes=10**6)   # everything open
    units = _units(draw(view))
    sides = {"ref_only": 0, "cand_only": 0}
    for unit in view.units:
        g = units[f"f_{unit.id}"]
        if unit.kind == "node" and view.items[unit.items[0]].side != "pair":
            side = view.items[unit.items[0]].side
            sides[side] += 1
            assert side in _classes(g) and _fill(g) == scale.UNMATCHED
            assert side.replace("_", " ") in _text(g)        # "ref only" / "cand only" on the box
            name = view.items[unit.items[0]].ref or view.items[unit.items[0]].cand
            assert name in _title(g)
    assert sides["ref_only"] == len(report.unmatched.ref)
    assert sides["cand_only"] == len(report.unmatched.cand)


@needs_dot
def test_clean_comparison_has_no_red(conformer):
    ex = conformer["ex"]
    same = fxdiff.compare(conformer["ref"], ex.reference(), loss=ex.loss)
    assert not same.diverged
    svg_text = render_svg(same, "both")
    units = _units(svg_text) | _units(svg_text, "b")
    assert units and not [g for g in units.values() if _classes(g) & {"diverged", "first", "ref_only", "cand_only"}]
    assert "MATCH" in svg_text and "DIVERGED" not in svg_text
    # the clean port: every box's colour is what the report says about its nodes
    port = conformer["clean"]
    view = build_view(port, "forward")
    units = _units(draw(view))
    for u, unit in enumerate(view.units):
        status = view.unit_summary(u, "forward", "max_abs")["status"]
        assert status in _classes(units[f"f_{unit.id}"])
        if status == "clean":
            assert _fill(units[f"f_{unit.id}"]) == scale.CLEAN
    mismatched = port.summary()["nodes"]["forward_mismatches"]
    assert bool(mismatched) == any(_classes(g) & {"diverged", "first"} for g in units.values())


@needs_dot
def test_tooltips_carry_names_shapes_and_metrics(conformer):
    report = conformer["buggy"]
    units = _units(render_svg(report, "both"), prefix="b")
    assert units, "the backward panel is drawn too"
    units.update(_units(render_svg(report, "both")))
    row = next(r for r in report.nodes if r.first_forward)
    g = next(g for g in units.values() if g.get("id").startswith("f_") and f"ref  {row.ref_node} " in _title(g))
    tip = _title(g)
    assert row.cand_node in tip and "x".join(map(str, row.ref_shape)) in tip
    assert "forward: DIFF, introduced here" in tip and "max abs" in tip


@needs_dot
def test_collapsed_and_folded_boxes_say_how_many_nodes(conformer, synthetic):
    report = synthetic.synthetic_report(5000)
    view = build_view(report, "forward")
    units = _units(draw(view))
    folds = [u for u in view.units if u.kind == "fold"]
    assert folds and all(len(u.modules) >= 2 for u in folds)
    for unit in view.units:
        if unit.kind in ("fold", "module", "run"):
            assert f"{len(unit.items)} nodes" in _text(units[f"f_{unit.id}"])
    text = " ".join(_text(units[f"f_{u.id}"]) for u in folds)
    assert re.search(r"\d+ x Block, folded", text) and "all clean" in text
    # the layer holding the bug stays open, with its first divergence drawn as a node
    first = next(r for r in report.nodes if r.first_forward)
    assert any(u.kind == "node" and view.items[u.items[0]].ref == first.ref_node for u in view.units)
    # --depth collapses the example's modules into boxes that count their nodes
    small = build_view(conformer["buggy"], "forward", depth=1, focus=False)
    boxes = [u for u in small.units if u.kind == "module"]
    assert boxes and all(module_depth_ok(u.path, 1) for u in boxes)
    units = _units(draw(small))
    for u in boxes:
        assert f"{len(u.items)} nodes" in _text(units[f"f_{u.id}"])


def module_depth_ok(path: str, depth: int) -> bool:
    return path.count(".") + 1 == depth


@needs_dot
def test_big_report_renders_fast_and_small(synthetic):
    import time
    report = synthetic.synthetic_report(5000)
    t = time.perf_counter()
    svg_text = render_svg(report, "both")
    assert time.perf_counter() - t < 10
    assert len(_units(svg_text)) <= 2 * 150


def test_model_explorer_node_data(conformer, tmp_path):
    report = conformer["buggy"]
    doc = model_explorer.node_data(report, "forward")
    assert set(doc) == {"results", "thresholds"}
    row = next(r for r in report.nodes if r.first_forward)
    res = doc["results"][row.ref_node]
    assert math.isclose(res["value"], min(row.forward.max_abs_diff, model_explorer.BIGGEST))
    assert re.fullmatch(r"#[0-9a-f]{6}", res["bgColor"])
    assert all(name in {r.ref_node for r in report.nodes} for name in doc["results"])
    paths = model_explorer.write_node_data(report, tmp_path / "me.json", "both")
    assert [p.name for p in paths] == ["me.forward.json", "me.backward.json"]
    for p in paths:
        json.loads(p.read_text())   # strict JSON: no Infinity / NaN


@needs_dot
def test_cli_render_compare_and_view(conformer, tmp_path):
    d = conformer["dir"]
    runner = CliRunner()
    r = runner.invoke(main, ["render", str(d / "buggy.json"), "--svg", str(tmp_path / "g.svg"), "--html",
                             str(tmp_path / "r.html"), "--model-explorer", str(tmp_path / "me.json"),
                             "--direction", "forward", "--depth", "2"])
    assert r.exit_code == 0, r.output
    ET.parse(tmp_path / "g.svg")
    assert (tmp_path / "r.html").stat().st_size > 10_000 and (tmp_path / "me.json").exists()
    # compare two captures and draw in the same run
    cand = fxdiff.capture(conformer["ex"].port_bug_glu_order(), kwargs=conformer["ex"].inputs(), loss=conformer["ex"].loss)
    fxdiff.save(cand, tmp_path / "cand.fxd")
    r = runner.invoke(main, ["compare", str(d / "ref.fxd"), str(tmp_path / "cand.fxd"), "--svg",
                             str(tmp_path / "c.svg"), "--metric", "max_rel"])
    assert r.exit_code == 1, r.output
    assert "graph written to" in r.output and ET.parse(tmp_path / "c.svg")
    # view without a display prints the path
    env = {k: None for k in ("DISPLAY", "WAYLAND_DISPLAY")}
    r = runner.invoke(main, ["view", str(d / "buggy.json"), "-o", str(tmp_path / "v.html")], env=env)
    assert r.exit_code == 0 and r.output.strip().endswith("v.html") and (tmp_path / "v.html").exists()


def test_cli_bad_input_is_one_line(conformer, tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    for args in (["render", str(bad), "--svg", str(tmp_path / "x.svg")],
                 ["render", str(conformer["dir"] / "buggy.json")],
                 ["render", str(tmp_path / "missing.json"), "--svg", str(tmp_path / "x.svg")]):
        r = runner.invoke(main, args)
        assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("fxdiff: error:"), r.output
    r = runner.invoke(main, ["render", str(conformer["dir"] / "buggy.json"), "--svg", str(tmp_path / "x.svg")],
                      env={"PATH": str(tmp_path)})
    assert r.exit_code == 2 and "install Graphviz" in r.output and r.output.count("\n") == 1


def _chrome(profile):
    """Headless chromium with its profile in ``profile`` (a test's own folder: nothing is left behind)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(binary) and os.path.exists(driver)):
        pytest.skip("chromium and chromedriver are not installed (make system-deps)")
    opts = Options()
    opts.binary_location = binary
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
              f"--user-data-dir={profile}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


@needs_dot
def test_html_report_in_headless_chromium(conformer, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    report = conformer["buggy"]
    page = render_html(report)
    assert not re.search(r'(?:src|href)\s*=\s*"(?:https?:)?//', page), "nothing loads from the network"
    path = write_html(report, tmp_path / "report.html")
    ARTIFACTS.mkdir(exist_ok=True)
    driver = _chrome(tmp_path / "chrome-profile")
    try:
        driver.get(path.resolve().as_uri())
        WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready"))
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        svg = driver.find_element(By.CSS_SELECTOR, ".viewport:not([hidden]) svg")
        assert svg.is_displayed() and svg.size["width"] > 100 and svg.size["height"] > 100
        first = driver.find_element(By.CSS_SELECTOR, ".viewport:not([hidden]) g.unit.u-node.first")
        driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", first)
        details = driver.find_element(By.ID, "details").text
        tip = first.find_element(By.TAG_NAME, "title").get_attribute("textContent")
        row = next(r for r in report.nodes if r.first_forward and f"ref  {r.ref_node}  " in tip)
        assert "max abs diff" in details and "introduced here" in details
        assert row.ref_node in details and row.cand_node in details
        assert _fmt_js(row.forward.max_abs_diff) in details
        # what replaying the candidate's ops alone said, or why they could not be replayed
        said = {"introduced": "introduced here: the candidate's ops, replayed alone", "amplified": "amplified here:"}
        assert said[row.cause()] in details if row.cause() else f"not replayed in isolation: {row.isolated_why}" in details
        # the table filters and sorts; a row click shows that node
        driver.find_element(By.CSS_SELECTOR, "#tables input[type=search]").send_keys(row.ref_node)
        cells = driver.find_elements(By.CSS_SELECTOR, "#tables tbody tr")
        assert cells and all(row.ref_node in c.text for c in cells)
        driver.find_element(By.CSS_SELECTOR, "#tables th").click()
        assert driver.find_elements(By.CSS_SELECTOR, "#tables th.sorted-desc")
        assert driver.find_elements(By.CSS_SELECTOR, "#chart circle")
        driver.execute_script("document.getElementById('graph-area').scrollIntoView()")
        driver.save_screenshot(str(ARTIFACTS / "html-report.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
    finally:
        driver.quit()


def _fmt_js(x: float) -> str:
    """The report script's number format (fmt in report.js)."""
    if x == 0:
        return "0"
    if math.isinf(x):
        return "inf"
    if 1e-3 <= abs(x) < 1e5:
        return f"{float(f'{x:.3g}'):g}"
    m, e = f"{x:.2e}".split("e")
    return f"{m}e{int(e)}"
