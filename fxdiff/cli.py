"""The ``fxdiff`` command line: a thin layer over the Python API."""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from . import __version__, specs, store
from .compare import rerun
from .errors import FxdiffError
from .judge import Tolerance, judge
from .match import UserMap, match
from .record import record

# Wide tables when piped to a file or CI log; the terminal's own width otherwise.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _fail(message: str) -> None:
    click.echo(f"fxdiff: error: {message}", err=True)
    sys.exit(2)


def _user_frame(exc: BaseException) -> str:
    """``file:line`` of the innermost frame outside torch and fxdiff, to point at user code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/fxdiff/" not in f.filename]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def guarded(fn):
    """Turn bad input into a one-line error and exit code 2, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FxdiffError as e:
            _fail(str(e))
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            _fail(f"{type(e).__name__}: {first}{_user_frame(e)}")
    return wrapper


def run_options(fn):
    """Options that say how to run a model: inputs, loss, weights, mode, seed, device, dtype."""
    options = [
        click.option("--inputs", help="file.py:function, .safetensors or .pt with the model inputs."),
        click.option("--loss", help="file.py:function taking the model output, returning a scalar "
                                    "(default: a seeded random cotangent on every floating output)."),
        click.option("--checkpoint", help="Weights to load: .pt/.pth/.bin, Lightning .ckpt, .safetensors, .nemo."),
        click.option("--mode", type=click.Choice(["eval", "train"]), help="Module mode (default eval)."),
        click.option("--keep-dropout", is_flag=True, default=None, help="In train mode, keep dropout active."),
        click.option("--seed", type=int, help="Seed for torch, numpy and random (default 0)."),
        click.option("--device", help="Device to run on, e.g. cpu or cuda:0."),
        click.option("--dtype", help="Cast the model and floating inputs: float32, float64, float16, bfloat16."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _build(model_spec: str, o: dict[str, Any]):
    """Model (weights loaded, placed) and the metadata describing how it was built."""
    model = specs.load_model(model_spec)
    meta: dict[str, Any] = {"model": model_spec}
    if o.get("checkpoint"):
        loaded = specs.load_checkpoint(model, o["checkpoint"])
        meta["checkpoint"] = {"path": loaded.path, "missing": loaded.missing, "unexpected": loaded.unexpected,
                              "stripped_prefix": loaded.stripped_prefix}
        if loaded.missing or loaded.unexpected:
            click.echo(f"fxdiff: warning: {o['checkpoint']}: {len(loaded.missing)} missing keys "
                       f"{loaded.missing[:5]}, {len(loaded.unexpected)} unexpected keys {loaded.unexpected[:5]}",
                       err=True)
    model, _, _ = specs.place(model, (), {}, o.get("device"), specs.parse_dtype(o.get("dtype")))
    return model, meta


def _loss(spec: str | None):
    return specs.load_loss(spec) if spec else None


def _capture_model(model_spec: str, o: dict[str, Any]):
    if not o.get("inputs"):
        raise FxdiffError("--inputs is required to run a model spec")
    model, meta = _build(model_spec, o)
    args, kwargs = specs.load_inputs(o["inputs"])
    _, args, kwargs = specs.place(model, args, kwargs, o.get("device"), specs.parse_dtype(o.get("dtype")))
    meta.update(inputs=o["inputs"], loss=_abs_spec(o.get("loss")))
    return record(model, args, kwargs, loss=_loss(o.get("loss")), seed=o.get("seed") or 0,
                  mode=o.get("mode") or "eval", keep_dropout=bool(o.get("keep_dropout")), meta=meta,
                  tracer=o.get("tracer") or "eager")


def _abs_spec(spec: str | None) -> str | None:
    """A file spec with an absolute path, so a later live compare finds it from anywhere."""
    if spec and ".py:" in spec and Path(spec.rpartition(":")[0]).is_file():
        path, _, fn = spec.rpartition(":")
        return f"{Path(path).resolve()}:{fn}"
    return spec


@click.group()
@click.version_option(__version__, prog_name="fxdiff")
def main() -> None:
    """Find where two PyTorch models part ways, forward and backward."""


@main.command()
@click.argument("model")
@run_options
@click.option("-o", "--output", required=True, type=click.Path(), help="Capture directory to write.")
@click.option("--tracer", type=click.Choice(["eager", "fx"]), default="eager", show_default=True,
              help="eager: record the model's own run; fx: run its torch.fx.symbolic_trace graph "
                   "(refused unless outputs and gradients equal eager's).")
@guarded
def capture(model: str, output: str, **o: Any) -> None:
    """Run MODEL (file.py:function or package.module:function) and record it."""
    cap = _capture_model(model, o)
    path = store.save(cap, output)
    s = cap.summary()
    console.print(f"captured {s['ops']} ops, {s['values']} values, {s['grads']} gradients, "
                  f"{s['param_grads']} parameter gradients -> {path}")


@main.command()
@click.argument("capture_dir", metavar="CAPTURE")
@click.option("--top", default=10, show_default=True, help="How many of the largest nodes to list.")
@guarded
def inspect(capture_dir: str, top: int) -> None:
    """Print a summary of a capture: counts, sizes, versions, largest nodes."""
    from rich.table import Table

    cap = store.load(capture_dir)
    s = cap.summary()
    m = cap.meta
    console.print(f"[bold]{capture_dir}[/]: {m.get('model', m.get('model_class'))}")
    console.print(f"  fxdiff {m.get('fxdiff')}, torch {m.get('torch')}, python {m.get('python')}, "
                  f"tracer {m.get('tracer')}, {m.get('mode')} mode, seed {m.get('seed')}, "
                  f"device {m.get('device')}, dtype {m.get('dtype')}, captured {m.get('started')}")
    console.print(f"  {s['nodes']} nodes ({s['ops']} ops, {s['inputs']} inputs), {s['params']} params/buffers, "
                  f"{s['values']} values, {s['grads']} gradients, {s['param_grads']} parameter gradients")
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in s["bytes"].items())
    console.print(f"  sizes: {sizes}")
    table = Table(title=f"Largest {top} nodes", title_justify="left")
    for col in ("node", "module", "op", "shape", "dtype", "grad"):
        table.add_column(col)
    from .capture import DTYPE, GRAD, MODULE, SHAPE
    from .match import node_key
    ranked = sorted((n for n in cap.graph.nodes if n.name in cap.values),
                    key=lambda n: -cap.values[n.name].numel())
    for n in ranked[:top]:
        table.add_row(n.name, n.meta.get(MODULE) or "<root>", node_key(n), str(tuple(n.meta.get(SHAPE) or ())),
                      str(n.meta.get(DTYPE)), n.meta.get(GRAD, "-"))
    console.print(table)


def shape_options(fn):
    """Options that say how to draw a report: direction, metric, collapsing, folding."""
    from .render.scale import METRICS
    options = [
        click.option("--direction", type=click.Choice(["forward", "backward", "both"]), default="both",
                     show_default=True, help="Draw forward values, backward gradients, or both side by side."),
        click.option("--metric", type=click.Choice(list(METRICS)), default="max_abs", show_default=True,
                     help="Error measure that colours the nodes (log scale)."),
        click.option("--depth", type=click.IntRange(min=1), help="Collapse modules nested deeper than N "
                     "(default: fit the drawing to --max-nodes boxes)."),
        click.option("--max-nodes", type=click.IntRange(min=1), default=150, show_default=True,
                     help="Box budget: without --depth, modules open while they fit; past it, runs of "
                          "similar consecutive ops merge into one box."),
        click.option("--focus/--no-focus", default=True, show_default=True,
                     help="Keep the modules around the first divergence open."),
        click.option("--fold/--no-fold", default=True, show_default=True,
                     help="Fold runs of identical sibling blocks that say the same thing into one box."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def drawing_options(fn):
    """--svg, --html, --model-explorer, and how to draw."""
    options = [
        click.option("--svg", "svg_path", type=click.Path(dir_okay=False),
                     help="Write the matched graph as SVG here (a .png or .pdf path gets that format)."),
        click.option("--html", "html_path", type=click.Path(dir_okay=False),
                     help="Write a self-contained HTML report (graph, tables, charts) here."),
        click.option("--model-explorer", "me_path", type=click.Path(dir_okay=False),
                     help="Write per-node metrics as Model Explorer node data (X.json; both directions: "
                          "X.forward.json and X.backward.json)."),
    ]
    fn = shape_options(fn)
    for option in reversed(options):
        fn = option(fn)
    return fn


DRAWING_KEYS = ("svg_path", "html_path", "me_path", "direction", "metric", "depth", "max_nodes", "focus", "fold")


def _drawing(o: dict[str, Any]) -> dict[str, Any]:
    """Take the drawing options out of ``o``; fail early (before any work) when dot is missing."""
    d = {k: o.pop(k) for k in DRAWING_KEYS if k in o}
    if d.get("svg_path") or d.get("html_path"):
        from .render.svg import require_dot
        require_dot()
    return d


def _draw(report, d: dict[str, Any]) -> None:
    """Write what the drawing options ask for."""
    shape = {k: d[k] for k in ("metric", "depth", "focus", "fold", "max_nodes") if k in d}
    direction = d.get("direction", "both")
    if d.get("svg_path"):
        from .render.svg import write_svg
        console.print(f"graph written to {write_svg(report, d['svg_path'], direction, **shape)}")
    if d.get("html_path"):
        from .render.html import write_html
        console.print(f"HTML report written to {write_html(report, d['html_path'], direction, **shape)}")
    if d.get("me_path"):
        from .render.model_explorer import write_node_data
        paths = write_node_data(report, d["me_path"], direction, metric=d.get("metric", "max_abs"))
        console.print("Model Explorer node data written to " + ", ".join(map(str, paths)))


@main.command()
@click.argument("ref")
@click.argument("cand")
@run_options
@click.option("--atol", default=1e-5, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", default=1e-5, show_default=True, help="Relative tolerance.")
@click.option("--map", "map_path", type=click.Path(), help="YAML/JSON file of module regexes and parameter "
                                                            "pairs for what the matcher cannot settle.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON here.")
@click.option("--all", "show_all", is_flag=True, help="Show every row, not only the mismatches.")
@drawing_options
@guarded
def compare(ref: str, cand: str, atol: float, rtol: float, map_path: str | None, json_path: str | None,
            show_all: bool, **o: Any) -> None:
    """Compare REF and CAND; each is a capture directory or a model spec.

    A model spec CAND runs on REF's saved inputs, seed, mode and loss; --inputs, --loss and the
    other run options apply to it and override. Exit code: 0 match, 1 divergence, 2 bad input.
    """
    from .render import text

    drawing = _drawing(o)
    user_map = UserMap.load(map_path) if map_path else None
    ref_cap, cand_cap = _sides(ref, cand, o)
    report = judge(ref_cap, cand_cap, match(ref_cap, cand_cap, user_map), Tolerance(atol, rtol),
                   ref_label=ref, cand_label=cand)
    console.print(text.render(report, show_all))
    if json_path:
        report.save(json_path)
        console.print(f"report written to {json_path}")
    _draw(report, drawing)
    sys.exit(1 if report.diverged else 0)


def _sides(ref: str, cand: str, o: dict[str, Any]):
    """The two captures to compare: loaded, or recorded live (CAND on REF's saved inputs)."""
    ref_cap = store.load(ref) if store.is_capture(ref) else _capture_model(_spec(ref, "REF"), o)
    if store.is_capture(cand):
        return ref_cap, store.load(cand)
    model, meta = _build(_spec(cand, "CAND"), o)
    args = kwargs = None
    if o.get("inputs"):
        args, kwargs = specs.load_inputs(o["inputs"])
        _, args, kwargs = specs.place(model, args, kwargs, o.get("device"), specs.parse_dtype(o.get("dtype")))
    loss_spec = o.get("loss") or ref_cap.meta.get("loss")
    cand_cap = rerun(ref_cap, model, loss=_loss(loss_spec), args=args, kwargs=kwargs,
                     meta={**meta, "loss": _abs_spec(loss_spec), "inputs": o.get("inputs") or f"{ref} (saved)"})
    return ref_cap, cand_cap


@main.command("map-params")
@click.argument("ref")
@click.argument("cand")
@run_options
@click.option("--map", "map_path", type=click.Path(), help="YAML/JSON file of parameter pairs to impose.")
@click.option("-o", "--output", type=click.Path(), help="Write the mapping as JSON here.")
@click.option("--convert", "ref_checkpoint", help="A REF checkpoint to convert into CAND's layout.")
@click.option("--out", "cand_checkpoint", type=click.Path(), help="Where --convert writes CAND's .safetensors.")
@guarded
def map_params(ref: str, cand: str, map_path: str | None, output: str | None, ref_checkpoint: str | None,
               cand_checkpoint: str | None, **o: Any) -> None:
    """Infer which CAND parameter(s) hold each REF parameter, and with what transform.

    REF and CAND are captures or model specs (a CAND spec runs on REF's inputs). With --convert,
    write a checkpoint for CAND built from a REF checkpoint through that mapping.
    """
    from rich.table import Table

    from .params import convert

    if bool(ref_checkpoint) != bool(cand_checkpoint):
        raise FxdiffError("--convert and --out go together")
    user = UserMap(params=UserMap.load(map_path).params) if map_path else None
    ref_cap, cand_cap = _sides(ref, cand, o)
    # the full matcher: tensors of equal content (norms of ones, zero biases) are told apart by
    # the matched ops that consume them
    alignment = match(ref_cap, cand_cap, user)
    pairs, ref_left, cand_left = (list(alignment.params), alignment.unmatched_ref_params,
                                  alignment.unmatched_cand_params)
    rank = {name: i for i, name in enumerate(ref_cap.params)}
    pairs.sort(key=lambda p: rank[p.ref])
    table = Table(title="Parameter correspondence", title_justify="left")
    for col in ("ref parameter", "cand parameter(s)", "transform", "evidence"):
        table.add_column(col)
    for p in pairs:
        table.add_row(p.ref, ", ".join(p.cand), _transform_text(p.transform), p.evidence)
    console.print(table)
    console.print(f"{len(pairs)} mapped; unmapped: {len(ref_left)} ref {ref_left[:8]}, "
                  f"{len(cand_left)} cand {cand_left[:8]}")
    if output:
        import json
        doc = {"format": "fxdiff-param-map", "version": 1, "ref": ref, "cand": cand,
               "pairs": [{"ref": p.ref, "cand": list(p.cand), "transform": p.transform, "evidence": p.evidence,
                          "confidence": p.confidence} for p in pairs],
               "unmapped": {"ref": ref_left, "cand": cand_left}}
        Path(output).write_text(json.dumps(doc, indent=1))
        console.print(f"mapping written to {output}")
    if ref_checkpoint:
        from safetensors.torch import save_file
        state, missing = convert(specs.read_state_dict(ref_checkpoint), pairs,
                                 {k: tuple(v.shape) for k, v in cand_cap.params.items()})
        tmp = Path(cand_checkpoint).with_name(f".{Path(cand_checkpoint).name}.tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(cand_checkpoint)
        console.print(f"converted {len(state)} tensors -> {cand_checkpoint}"
                      + (f"; not filled: {missing}" if missing else ""))


def _transform_text(t: dict) -> str:
    kind = t.get("kind", "identity")
    if kind == "chain":
        return " then ".join(_transform_text(s) for s in t["steps"])
    if kind == "rows":
        return f"rows {t['start']}:{t['stop']}"
    if kind == "reshape":
        return f"reshape {tuple(t['shape'])}"
    if kind == "permute_rows":
        return "row permutation"
    return kind


def _spec(side: str, name: str) -> str:
    if Path(side).is_dir():
        store.read_meta(side)  # raises the precise reason this directory is not a capture
    if ":" not in side:
        raise FxdiffError(f"{name} {side!r}: not a capture directory nor a model spec (file.py:function)")
    return side


@main.command()
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@drawing_options
@guarded
def render(report_path: str, **o: Any) -> None:
    """Draw a saved report (compare --json): --svg, --html, --model-explorer; no captures needed."""
    from .report import load_report

    drawing = _drawing(o)
    if not any(drawing.get(k) for k in ("svg_path", "html_path", "me_path")):
        raise FxdiffError("nothing to write: give --svg PATH, --html PATH or --model-explorer PATH")
    _draw(load_report(report_path), drawing)


@main.command()
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write the HTML (default: REPORT with an .html suffix).")
@click.option("--no-open", is_flag=True, help="Only write the file; do not open a browser.")
@shape_options
@guarded
def view(report_path: str, output: str | None, no_open: bool, **o: Any) -> None:
    """Write the HTML report of a saved report and open it in a browser (else print its path)."""
    from .render.html import open_in_browser, write_html
    from .render.svg import require_dot
    from .report import load_report

    drawing = _drawing(o)
    require_dot()
    report = load_report(report_path)
    out = Path(output) if output else Path(report_path).with_suffix(".html")
    shape = {k: drawing[k] for k in ("metric", "depth", "focus", "fold", "max_nodes") if k in drawing}
    path = write_html(report, out, drawing.get("direction", "both"), **shape).resolve()
    if not no_open and open_in_browser(path):
        console.print(f"opened {path}")
    else:
        click.echo(str(path))


if __name__ == "__main__":
    main()
