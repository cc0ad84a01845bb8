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
from .match import match
from .record import record

console = Console(highlight=False)


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
                  mode=o.get("mode") or "eval", keep_dropout=bool(o.get("keep_dropout")), meta=meta)


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


@main.command()
@click.argument("ref")
@click.argument("cand")
@run_options
@click.option("--atol", default=1e-5, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", default=1e-5, show_default=True, help="Relative tolerance.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON here.")
@click.option("--all", "show_all", is_flag=True, help="Show every row, not only the mismatches.")
@guarded
def compare(ref: str, cand: str, atol: float, rtol: float, json_path: str | None, show_all: bool,
            **o: Any) -> None:
    """Compare REF and CAND; each is a capture directory or a model spec.

    A model spec CAND runs on REF's saved inputs, seed, mode and loss; --inputs, --loss and the
    other run options apply to it and override. Exit code: 0 match, 1 divergence, 2 bad input.
    """
    from .render import text

    ref_cap = store.load(ref) if store.is_capture(ref) else _capture_model(_spec(ref, "REF"), o)
    if store.is_capture(cand):
        cand_cap = store.load(cand)
    else:
        model, meta = _build(_spec(cand, "CAND"), o)
        args = kwargs = None
        if o.get("inputs"):
            args, kwargs = specs.load_inputs(o["inputs"])
            _, args, kwargs = specs.place(model, args, kwargs, o.get("device"), specs.parse_dtype(o.get("dtype")))
        loss_spec = o.get("loss") or ref_cap.meta.get("loss")
        cand_cap = rerun(ref_cap, model, loss=_loss(loss_spec), args=args, kwargs=kwargs,
                         meta={**meta, "loss": _abs_spec(loss_spec), "inputs": o.get("inputs") or f"{ref} (saved)"})
    report = judge(ref_cap, cand_cap, match(ref_cap, cand_cap), Tolerance(atol, rtol),
                   ref_label=ref, cand_label=cand)
    console.print(text.render(report, show_all))
    if json_path:
        report.save(json_path)
        console.print(f"report written to {json_path}")
    sys.exit(1 if report.diverged else 0)


def _spec(side: str, name: str) -> str:
    if Path(side).is_dir():
        store.read_meta(side)  # raises the precise reason this directory is not a capture
    if ":" not in side:
        raise FxdiffError(f"{name} {side!r}: not a capture directory nor a model spec (file.py:function)")
    return side


if __name__ == "__main__":
    main()
