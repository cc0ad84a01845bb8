"""Pairs of independent real implementations of one function, for judging fxdiff on real ports.

Each pair module defines a ``Pair``: ``build_ref()`` (a tiny reference model, random weights, fixed
seed), ``build_cand(ref)`` (an independent implementation whose weights are *converted* from the
reference's by ``convert``), ``inputs()`` (the reference's ``(args, kwargs)``; a candidate with another call convention is
wrapped in a thin module taking the reference's arguments) and a list of ``Bug`` variants planted
in the converted candidate.

Localisation (see ``localised``): a bug is localised when ONE entry of the report's first-divergence
frontier (``report.first_divergence()["forward"]`` for forward bugs, ``["backward"]`` for
backward-only bugs, whose forward frontier must also be empty) has a ``ref_module`` inside the bug's
reference module and a ``cand_module`` inside the bug's candidate module. "Inside" means the module
path itself or one of its dotted ancestors *fully* matches the bug's regex (so a bug in
``layers.1.mlp`` is localised by a node in ``layers.1.mlp.down_proj``, but not by one in
``layers.1`` or ``layers.0.mlp``, nor by the root module ``""``).
"""

from __future__ import annotations

import dataclasses
import re
import traceback
from typing import Any, Callable

import torch

BF16 = torch.bfloat16


@dataclasses.dataclass
class Bug:
    """One porting bug: ``apply(cand)`` plants it in a converted candidate (in place or returning a
    new module); ``ref_re`` / ``cand_re`` are the module paths (regex, full match on the path or an
    ancestor) where it lives on each side."""

    name: str
    kind: str
    apply: Callable[[torch.nn.Module], torch.nn.Module | None]
    ref_re: str
    cand_re: str
    direction: str = "forward"      # "backward": the forward pass is unchanged
    note: str = ""
    exact: bool = False             # the reported module must BE the bug's module, not a descendant


@dataclasses.dataclass
class Pair:
    name: str
    build_ref: Callable[[], torch.nn.Module]
    convert: Callable[[dict], dict]                       # ref state dict -> cand state dict
    build_cand: Callable[[torch.nn.Module], torch.nn.Module]  # converted candidate (wrapped)
    inputs: Callable[[], tuple[tuple, dict]]
    bugs: list[Bug]
    covers: tuple[str, ...] = ()                         # failure classes this pair exercises
    note: str = ""
    # how the candidate runs in bfloat16: cast with .to(), or under torch.autocast where the library
    # itself cannot run after a cast
    bf16_by: str = "cast"

    def bug(self, name: str) -> Bug:
        for b in self.bugs:
            if b.name == name:
                return b
        raise KeyError(f"{self.name}: no bug {name!r}")


def seeded(seed: int = 0):
    torch.manual_seed(seed)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every floating parameter with seeded random values: 1-D norm gains near 1, other
    1-D parameters (biases) small, matrices ~ N(0, 1/fan_in). No parameter is left constant (constant
    tensors cannot be told apart by content, and zero biases hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            r = torch.randn(p.shape, generator=g)
            low = name.lower()
            if p.ndim == 1 and any(k in low for k in ("norm", "ln_", ".g", "gamma")) and not low.endswith("bias"):
                p.copy_(1.0 + 0.1 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(r / fan_in ** 0.5)
    return model


def _inside(path: str, pattern: str, exact: bool = False) -> bool:
    if path is None:
        return False
    if exact:
        return re.fullmatch(pattern, path) is not None
    parts = path.split(".") if path else []
    for i in range(len(parts), 0, -1):
        if re.fullmatch(pattern, ".".join(parts[:i])):
            return True
    return pattern == "" and path == ""


def localised(report, bug: Bug) -> tuple[bool, list[dict]]:
    """Whether the report's first divergence names the bug's module on both sides (see module doc);
    returns the frontier entries that were examined."""
    fd = report.first_divergence()
    entries = fd["backward"] if bug.direction == "backward" else fd["forward"]
    if bug.direction == "backward" and fd["forward"]:
        return False, fd["forward"]
    ok = any(_inside(e["ref_module"], bug.ref_re, bug.exact) and _inside(e["cand_module"], bug.cand_re, bug.exact)
             for e in entries)
    return ok, entries


@dataclasses.dataclass
class Result:
    pair: str
    variant: str | None
    dtype: str
    report: Any
    verdict_ok: bool
    localised: bool
    details: dict


def build(pair: Pair, variant: str | None = None):
    """(ref model, cand model, bug or None)."""
    ref = pair.build_ref().eval()
    cand = pair.build_cand(ref)
    bug = pair.bug(variant) if variant else None
    if bug is not None:
        out = bug.apply(cand)
        cand = out if out is not None else cand
    return ref, cand.eval(), bug


def run_pair(pair: Pair, variant: str | None = None, dtype: torch.dtype = torch.float32, ref_capture=None):
    """Capture ref with ``fxdiff.capture`` and compare the candidate live against it, in ``dtype``
    (cast, or under autocast: see ``Pair.bf16_by``), on the reference's saved inputs.

    Returns ``(report, verdict_ok, localised, details)``: ``verdict_ok`` is "clean port compares
    clean" for ``variant=None`` and "bug diverges" for a bug; ``localised`` is as in the module doc
    (True for a clean port that compares clean). ``details`` holds the frontier, the bug, and on a
    capture/compare failure the exception (``report`` is then None)."""
    import fxdiff

    details: dict[str, Any] = {"pair": pair.name, "variant": variant or "clean", "dtype": str(dtype).replace("torch.", "")}
    stage = "build"
    try:
        ref, cand, bug = build(pair, variant)
        details["bug"] = bug
        args, kwargs = pair.inputs()
        stage = "capture ref"
        if ref_capture is None:
            ref_capture = fxdiff.capture(ref, args=args, kwargs=kwargs, mode="eval", seed=0)
        stage = "compare"
        # the port runs live on the reference's saved inputs and starts its backward from the
        # reference's output gradients, as in the two-environment workflow
        low = {} if dtype == torch.float32 else {"dtype" if pair.bf16_by == "cast" else "autocast": dtype}
        report = fxdiff.compare(ref_capture, cand, **low)
    except Exception as e:  # noqa: BLE001 - the benchmark reports every failure
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{f.filename.rsplit('fxdiff/', 1)[-1]}:{f.lineno} ({f.name})" for f in reversed(tb)
                      if "fxdiff/" in f.filename), None)
        details.update(error=f"{type(e).__name__}: {e}", stage=stage, where=where,
                       traceback="".join(traceback.format_exception(e)))
        return None, False, False, details
    details["ref_capture"] = ref_capture
    fd = report.first_divergence()
    details["frontier"] = fd
    if bug is None:
        ok = not report.diverged
        return report, ok, ok, details
    loc, entries = localised(report, bug)
    details["entries"] = entries
    return report, bool(report.diverged), loc, details


PAIR_MODULES = ("llama_phi3", "llama_meta", "gpt2_bigcode", "wav2vec2_hubert", "llama_xtransformers",
                "llama_torchtune")


def _registry() -> dict[str, Pair]:
    import importlib
    pairs = {}
    for mod in PAIR_MODULES:
        m = importlib.import_module(f"{__name__}.{mod}")
        for attr in sorted(vars(m)):
            if attr.startswith("PAIR") and isinstance(getattr(m, attr), Pair):
                pairs[getattr(m, attr).name] = getattr(m, attr)
    return pairs


PAIRS: dict[str, Pair] = _registry()
