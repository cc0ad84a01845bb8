"""The ``fxdiff`` command line: parse, call the API (``api.py``), print, exit.

Exit codes: 0 match, 1 divergence, 2 bad input or a failure in the user's own code (one line),
3 a bug in fxdiff (with its traceback). The API, and torch with it, is imported by the commands
that need it: ``--help`` answers at once, and ``compare`` starts checking its captures' digests
while torch is imported.
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from . import digest, progress
from .errors import FxdiffError
from .util import check_replaceable
from .version import __version__

# Wide tables when piped to a file or CI log; the terminal's own width otherwise.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

EXIT_MATCH, EXIT_DIVERGED, EXIT_BAD_INPUT, EXIT_BUG = 0, 1, 2, 3


class _Commands(click.Group):
    """The command group; its ``main`` turns every outcome into one of the four exit codes."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with progress.shown():
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()   # the help text, as for --help
            code = EXIT_BAD_INPUT
        except click.UsageError as e:   # one line, like every other bad input
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"fxdiff: error: {' '.join(e.format_message().split())}{where}", err=True)
            code = EXIT_BAD_INPUT
        except click.ClickException as e:
            e.show()
            code = EXIT_BAD_INPUT
        except click.Abort:
            click.echo("fxdiff: interrupted", err=True)
            code = EXIT_BAD_INPUT
        except FxdiffError as e:
            click.echo(f"fxdiff: error: {_with_flag(e)}", err=True)
            code = EXIT_BAD_INPUT
        except Exception:  # noqa: BLE001 -- anything else is ours to fix
            traceback.print_exc()
            click.echo(f"fxdiff {__version__}: internal error: this is a bug in fxdiff; please report it with the "
                       "traceback above", err=True)
            code = EXIT_BUG
        code = code if isinstance(code, int) else EXIT_MATCH
        if standalone_mode:
            sys.exit(code)
        return code


def _with_flag(e: FxdiffError) -> str:
    """The library's message, its parameter named by the command-line flag that sets it."""
    text = " ".join(str(e).split())
    if not e.option:
        return text
    flag = "--" + e.option.replace("_", "-")
    return flag + text[len(e.option):] if text.startswith(e.option + " ") else f"{flag}: {text}"


def _finite(ctx, param, value):
    if value is not None and not (value >= 0 and value != float("inf")):
        raise click.BadParameter(f"{value} is not a finite, non-negative number")
    return value


def _writable(path: str, flag: str, capture: bool = False) -> None:
    """Refuse, before any work, an output path whose folder does not exist or cannot be written,
    or that exists and must not be replaced: a directory (unless ``capture`` and it holds one), a
    device, a FIFO."""
    if not path:
        raise FxdiffError(f"{flag}: empty path")
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise FxdiffError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise FxdiffError(f"{flag} {path}: folder {folder} is not writable")
    if capture:
        from .store import is_capture
        if os.path.lexists(path) and not is_capture(path):
            raise FxdiffError(f"{flag} {path}: exists and is not an fxdiff capture; refusing to overwrite it")
        return
    check_replaceable(path, f"{flag} {path}")


def run_options(fn):
    """Options that say how to run a model: inputs, loss, weights, mode, seed, device, dtype."""
    options = [
        click.option("--inputs", help="file.py:function, .safetensors or .pt with the model inputs (fxdiff.save_inputs "
                                      "writes a .safetensors with non-tensor arguments and shared tensors)."),
        click.option("--loss", help="file.py:function taking the model output (and optionally the model), "
                                    "returning a scalar (default: a seeded random cotangent on every floating "
                                    "output; a live candidate starts from the reference's output gradients)."),
        click.option("--checkpoint", help="Weights to load: .pt/.pth/.bin, Lightning .ckpt, .safetensors, .nemo."),
        click.option("--mode", type=click.Choice(["eval", "train"]), help="Module mode (default eval)."),
        click.option("--keep-dropout", is_flag=True, default=None, help="In train mode, keep dropout active."),
        click.option("--seed", type=int, help="Seed for torch, numpy and random (default 0)."),
        click.option("--device", help="Device to run on, e.g. cpu or cuda:0."),
        click.option("--dtype", help="Cast the model and floating inputs: float32, float64, float16, bfloat16."),
        click.option("--autocast", help="Run forward under torch.autocast in this dtype (bfloat16, float16) "
                                        "instead of casting the model."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _live(o: dict[str, Any], tracer: str = "eager") -> dict[str, Any]:
    """The run options given on the command line, as ``api.LiveOptions`` fields."""
    return {**{f: o[f] for f in _RUN_OPTIONS if o.get(f) is not None}, "tracer": tracer}


_RUN_OPTIONS = ("inputs", "loss", "checkpoint", "mode", "keep_dropout", "seed", "device", "dtype", "autocast")


@click.group(cls=_Commands)
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
@click.option("--keep", type=click.Choice(["both", "values", "grads", "summary"]), default="both", show_default=True,
              help="What to keep of each node: values and gradients; values only; gradients, with values "
                   "summarised; or summaries of both, and of the parameters and their gradients (statistics, "
                   "a fixed-seed sample of elements and a hash: enough to compare and localise, in a fraction "
                   "of the memory and disk; the model's outputs and their gradients are kept whole up to 64 MiB, "
                   "beyond which comparing a live candidate needs its --loss).")
@click.option("--modules", "modules", metavar="REGEX",
              help="Keep only the ops inside modules whose path matches REGEX in full (e.g. 'layers\\.1[0-5]'); "
                   "the model still runs whole, and values made outside and used inside become placeholders.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Write each value and gradient to OUTPUT while the model runs, so that memory stays near "
                   "the model's own; --no-stream holds the whole capture in memory and saves it after the run.")
def capture(model: str, output: str, tracer: str, keep: str, modules: str | None, stream: bool, **o: Any) -> int:
    """Run MODEL (file.py:function, package.module:function, a Hugging Face model directory or a .nemo
    file) and record it.

    Loading MODEL, --inputs and --loss executes that code: it is your model code.
    """
    from . import api
    from .load.specs import checkpoint_warning
    from .store import writing

    _writable(output, "--output", capture=True)
    with writing(output):   # a second capture to the same output is refused now, not after its run
        cap = api.capture_spec(model, **_live(o, tracer), keep=keep, modules=modules,
                               stream_to=output if stream else None)
        loaded = checkpoint_warning(cap.meta.get("checkpoint"))
        if loaded:
            click.echo(f"fxdiff: warning: {loaded}", err=True)
        if not stream:
            with progress.step(f"saving {output}"):
                api.save(cap, output)
    path = Path(output)
    s = cap.summary()
    console.print(f"captured {s['ops']} ops, {s['values']} values, {s['grads']} gradients, "
                  f"{s['param_grads']} parameter gradients -> {path}", markup=False)
    return EXIT_MATCH


@main.command()
@click.argument("capture_dir", metavar="CAPTURE")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0),
              help="How many of the largest nodes to list.")
def inspect(capture_dir: str, top: int) -> int:
    """Print a summary of a capture: counts, sizes, versions, largest nodes."""
    from . import api
    from .render.text import capture_summary

    console.print(capture_summary(api.load(capture_dir), capture_dir, top))
    return EXIT_MATCH


def shape_options(fn):
    """Options that say how to draw a report: direction, metric, collapsing, folding."""
    from .render.scale import METRICS
    options = [
        click.option("--direction", type=click.Choice(["forward", "backward", "both"]),
                     help="Draw forward values, backward gradients, or both side by side (default: --svg draws "
                          "the direction the first divergence is in, --html both)."),
        click.option("--metric", type=click.Choice(list(METRICS)), default="max_abs", show_default=True,
                     help="Error measure that colours the nodes (log scale)."),
        click.option("--depth", type=click.IntRange(min=1), help="Collapse modules nested deeper than N "
                     "(default: fit the drawing to --max-nodes boxes)."),
        click.option("--max-nodes", type=click.IntRange(min=1),
                     help="Box budget (default 40 for --svg, 150 for --html): without --depth, modules open "
                          "while they fit; past it, runs of similar consecutive ops merge into one box."),
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
        click.option("--around", type=click.IntRange(min=0),
                     help="--svg draws only the nodes within N steps upstream or downstream of the first "
                          "divergence (default 5; 0 draws the whole graph)."),
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


DRAWING_KEYS = ("svg_path", "html_path", "me_path", "direction", "metric", "depth", "max_nodes", "focus", "fold",
                "around")


def _drawing(o: dict[str, Any]) -> dict[str, Any]:
    """Take the drawing options out of ``o``; fail early (before any work) when dot is missing."""
    d = {k: o.pop(k) for k in DRAWING_KEYS if k in o}
    for key, flag in (("svg_path", "--svg"), ("html_path", "--html"), ("me_path", "--model-explorer")):
        if d.get(key):
            _writable(d[key], flag)
    if d.get("svg_path") or d.get("html_path"):
        from .render.svg import require_dot
        require_dot()
    return d


def _shape(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in ("metric", "depth", "focus", "fold", "max_nodes") if d.get(k) is not None}


def _draw(report, d: dict[str, Any]) -> None:
    """Write what the drawing options ask for; options left out take each writer's defaults."""
    shape = _shape(d)
    direction = d.get("direction") or "both"
    if d.get("svg_path"):
        from .render.svg import write_svg
        extra = {"around": d["around"]} if d.get("around") is not None else {}
        console.print(f"graph written to {write_svg(report, d['svg_path'], d.get('direction'), **shape, **extra)}",
                      markup=False)
    if d.get("html_path"):
        from .render.html import write_html
        console.print(f"HTML report written to {write_html(report, d['html_path'], direction, **shape)}", markup=False)
    if d.get("me_path"):
        from .render.model_explorer import write_node_data
        paths = write_node_data(report, d["me_path"], direction, metric=d.get("metric", "max_abs"))
        console.print("Model Explorer node data written to " + ", ".join(map(str, paths)), markup=False)


@main.command()
@click.argument("ref")
@click.argument("cand")
@run_options
@click.option("--atol", type=float, callback=_finite, help="Strict mode: absolute tolerance for every element.")
@click.option("--rtol", type=float, callback=_finite, help="Strict mode: relative tolerance for every element.")
@click.option("--map", "map_path", type=click.Path(), help="YAML/JSON file of module regexes and parameter "
                                                            "pairs for what the matcher cannot settle.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON here.")
@click.option("--modules-depth", type=click.IntRange(min=1),
              help="Rows of the module table: the modules N levels deep (default: the repeated blocks, such as "
                   "layers.0, layers.1, ..., and the modules beside them).")
@click.option("--ops", is_flag=True, help="Also list the ops (matched node pairs) that differ, and those that pair with nothing.")
@click.option("--all", "show_all", is_flag=True, help="Show every row of every table, ops included, not only "
                                                      "the mismatches.")
@click.option("--no-rng-replay", is_flag=True, help="Let a live CAND draw its own random numbers (dropout masks, "
                                                   "torch.rand...) instead of taking REF's where its random ops pair.")
@drawing_options
def compare(ref: str, cand: str, atol: float | None, rtol: float | None, map_path: str | None,
            json_path: str | None, modules_depth: int | None, ops: bool, show_all: bool, no_rng_replay: bool,
            **o: Any) -> int:
    """Compare REF and CAND; each is a capture directory or a model (as for capture).

    A model spec CAND runs on REF's saved inputs, seed and mode, and starts its backward pass from
    REF's output gradients; --inputs, --loss and the other run options apply to it and override.
    Exit code: 0 match, 1 divergence, 2 bad input, 3 a bug in fxdiff.
    """
    for side in (ref, cand):
        digest.start(side)   # meanwhile, torch is imported
    from . import api
    from .judge import Tolerance
    from .render import text

    drawing = _drawing(o)
    if json_path:
        _writable(json_path, "--json")
    tolerance = Tolerance(atol if atol is not None else Tolerance.atol, rtol if rtol is not None else Tolerance.rtol)
    replay = {"rng_replay": False} if no_rng_replay else {}
    drawn = any(drawing.get(k) for k in ("svg_path", "html_path", "me_path"))
    report = api.compare(ref, cand, user_map=map_path, tolerance=tolerance, histograms=drawn, **_live(o), **replay)
    for warning in report.warnings:
        click.echo(f"fxdiff: warning: {warning}", err=True)
    console.print(text.render(report, show_all, ops, modules_depth))
    if json_path:
        report.save(json_path)
        console.print(f"report written to {json_path}", markup=False)
    _draw(report, drawing)
    return EXIT_DIVERGED if report.diverged else EXIT_MATCH


@main.command("map-params")
@click.argument("ref")
@click.argument("cand")
@run_options
@click.option("--map", "map_path", type=click.Path(), help="YAML/JSON file of parameter pairs to impose.")
@click.option("-o", "--output", type=click.Path(), help="Write the mapping as JSON here.")
@click.option("--convert", "ref_checkpoint", help="A REF checkpoint to convert into CAND's layout.")
@click.option("--out", "cand_checkpoint", type=click.Path(), help="Where --convert writes CAND's .safetensors.")
def map_params(ref: str, cand: str, map_path: str | None, output: str | None, ref_checkpoint: str | None,
               cand_checkpoint: str | None, **o: Any) -> int:
    """Infer which CAND parameter(s) hold each REF parameter, and with what transform.

    REF and CAND are captures or model specs (a CAND spec runs on REF's inputs). With --convert,
    write a checkpoint for CAND built from a REF checkpoint through that mapping.
    """
    from rich.table import Table
    from rich.text import Text

    from . import api

    if bool(ref_checkpoint) != bool(cand_checkpoint):
        raise FxdiffError("--convert and --out go together")
    for path, flag in ((output, "--output"), (cand_checkpoint, "--out")):
        if path:
            _writable(path, flag)
    mapping = api.map_params(ref, cand, user_map=map_path, **_live(o))
    table = Table(title="Parameter correspondence", title_justify="left")
    for col in ("ref parameter", "cand parameter(s)", "transform", "evidence"):
        table.add_column(col, overflow="fold")
    for p in mapping.pairs:
        table.add_row(*(Text(str(c)) for c in (p.ref, ", ".join(p.cand), _transform_text(p.transform), p.evidence)))
    console.print(table)
    console.print(f"{len(mapping.pairs)} mapped; unmapped: {len(mapping.unmapped_ref)} ref "
                  f"{mapping.unmapped_ref[:8]}, {len(mapping.unmapped_cand)} cand {mapping.unmapped_cand[:8]}",
                  markup=False)
    if output:
        from .util import atomic_write, dumps
        atomic_write(output, dumps(mapping.to_dict(ref, cand), indent=1))
        console.print(f"mapping written to {output}", markup=False)
    if ref_checkpoint:
        state, missing = api.convert(mapping, ref_checkpoint)
        api.write_checkpoint(state, cand_checkpoint)
        console.print(f"converted {len(state)} tensors -> {cand_checkpoint}"
                      + (f"; not filled: {missing}" if missing else ""), markup=False)
    return EXIT_MATCH


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


@main.command()
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@drawing_options
def render(report_path: str, **o: Any) -> None:
    """Draw a saved report (compare --json): --svg, --html, --model-explorer; no captures needed."""
    from .model.report import load_report

    drawing = _drawing(o)
    if not any(drawing.get(k) for k in ("svg_path", "html_path", "me_path")):
        raise FxdiffError("nothing to write: give --svg PATH, --html PATH or --model-explorer PATH")
    _draw(load_report(report_path), drawing)
    return 0


@main.command()
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write the HTML (default: REPORT with an .html suffix).")
@click.option("--no-open", is_flag=True, help="Only write the file; do not open a browser.")
@shape_options
def view(report_path: str, output: str | None, no_open: bool, **o: Any) -> None:
    """Write the HTML report of a saved report and open it in a browser (else print its path)."""
    from .render.html import open_in_browser, write_html
    from .render.svg import require_dot
    from .model.report import load_report

    drawing = _drawing(o)
    require_dot()
    report = load_report(report_path)
    out = Path(output) if output else Path(report_path).with_suffix(".html")
    path = write_html(report, out, drawing.get("direction") or "both", **_shape(drawing)).resolve()
    if not no_open and open_in_browser(path):
        console.print(f"opened {path}", markup=False)
    else:
        click.echo(str(path))
    return 0


def run() -> None:
    """The ``fxdiff`` program: ``main``, then exit without the interpreter's teardown of every
    module it imported (0.6-1 s once torch is loaded). Output is flushed and exit handlers run
    first; whatever wrote files closed them before ``main`` returned."""
    code = main(standalone_mode=False)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):   # e.g. a closed pipe: the interpreter reports it as it always did
        sys.exit(code)
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    run()
