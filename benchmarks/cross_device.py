"""The same model on another device or under another torch: fxdiff's default verdicts must call it
clean (within noise), and must still find a planted bug.

On a machine with a GPU (captures on the CPU and on CUDA, compares them there):
    PYTHONPATH=. python benchmarks/cross_device.py capture OUT
Here, with OUT brought back (captures with this torch and compares with those):
    PYTHONPATH=. python benchmarks/cross_device.py compare OUT

Models: the bundled Conformer (short inputs; its STFT runs on both devices) and a tiny GPT-2 from
transformers whose weights are set from a fixed seed, so both machines build the same one
whatever the library versions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "conformer"))

import torch  # noqa: E402

import fxdiff  # noqa: E402


def conformer(bug=None):
    import specs
    model = specs.make_model("port" if bug else "reference", bug=bug)
    return model, (), specs.make_inputs(seconds=(0.5, 0.35)), specs.loss


def gpt2(bug=None):
    from transformers import GPT2Config, GPT2Model
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32, attn_implementation="eager")
    model = GPT2Model(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    if bug:
        model.h[1].ln_2.eps = 1e-2
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, (ids,), {"use_cache": False}, None


MODELS = {"conformer": (conformer, "glu_order"), "gpt2": (gpt2, "norm_eps")}


def run(build, device: str, bug=None):
    model, args, kwargs, loss = build(bug)
    model = model.to(device)
    move = lambda t: t.to(device)  # noqa: E731
    return fxdiff.capture(model, tuple(map(move, args)), {k: move(v) if isinstance(v, torch.Tensor) else v
                                                         for k, v in kwargs.items()}, loss=loss)


def line(label: str, report) -> str:
    first = report.first_divergence()["forward"]
    where = f"; first divergence {first[0]['ref_module']}" if first else ""
    return f"{label:<48} {report.verdict}{where}"


def main(mode: str, out: str) -> None:
    folder = Path(out)
    here = f"torch {torch.__version__}"
    for name, (build, bug) in MODELS.items():
        if mode == "capture":
            cpu, gpu = run(build, "cpu"), run(build, "cuda")
            fxdiff.save(cpu, folder / f"{name}-cpu")
            fxdiff.save(gpu, folder / f"{name}-cuda")
            print(line(f"{name}: cpu vs cuda ({here})", fxdiff.compare(cpu, gpu)))
            print(line(f"{name}: cpu vs cuda with a bug", fxdiff.compare(cpu, run(build, "cuda", bug))))
        else:
            mine = run(build, "cpu")
            for side in ("cpu", "cuda"):
                theirs = fxdiff.load(folder / f"{name}-{side}")
                label = f"{name}: {side}, torch {theirs.meta['torch']} vs cpu, {here}"
                print(line(label, fxdiff.compare(theirs, mine)))
            print(line(f"{name}: cuda capture vs a bug here", fxdiff.compare(fxdiff.load(folder / f"{name}-cuda"),
                                                                           run(build, "cpu", bug))))


if __name__ == "__main__":
    main(*sys.argv[1:3])
