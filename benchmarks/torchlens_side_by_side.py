"""fxdiff and TorchLens side by side: the cost of recording every value and gradient of a run.

For each model, each way of running it goes in a fresh Python process (so that its peak resident
memory, ``VmHWM``, is its own), runs twice, and reports the second run's wall time; the processes
of one round are interleaved (model by model, way by way) and the table shows the median over
rounds of each ratio to that round's eager run, with its range:

- eager:              ``loss(model(**inputs)).backward()``
- fxdiff:             ``fxdiff.capture(...)``, every value and gradient held in memory
- fxdiff + save:      ``fxdiff.save(fxdiff.capture(...), dir)``
- torchlens:          ``torchlens.trace(..., capture=CaptureOptions(layers_to_save="all",
                      save_grads=True))`` then ``trace.log_backward(loss)``: every activation and
                      gradient, TorchLens's defaults otherwise
- torchlens + save:   the same, then ``trace.save(dir)`` (a portable bundle with activations and
                      gradients, TorchLens's default level)

Each tool records the same module: the model with its loss inside, so that the recorded
output is the loss and its backward is the one eager runs. Models (random weights, nothing
downloaded): ``conformer`` (the Conformer bench, 13M parameters), ``tiny`` (GPT-2 shape, ~1M),
``gpt2`` (GPT2LMHeadModel 124M, 1 x ``--seq`` tokens). Without TorchLens installed
(``pip install fxdiff[bench]``) the script says so and exits 0.

    PYTHONPATH=. python benchmarks/torchlens_side_by_side.py [--models conformer,tiny,gpt2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_name  # this folder is the script's

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, sys, time, shutil, gc
sys.path.insert(0, os.path.join(sys.argv[5], "benchmarks"))
import torch
torch.set_num_threads(int(sys.argv[4]))
from models import build, rss
model_name, kind, folder, seq = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[6])

class WithLoss(torch.nn.Module):
    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss
    def forward(self, **inputs):
        return self.loss(self.model(**inputs))

model, inputs, loss = build(model_name, seq)
model = WithLoss(model, loss).eval()
base = rss("VmRSS:")
out = os.path.join(folder, "c")
counts = {}

def run():
    if kind == "eager":
        model.zero_grad(set_to_none=True)
        model(**inputs).backward()
        model.zero_grad(set_to_none=True)
        return
    if kind.startswith("fxdiff"):
        import fxdiff
        capture = fxdiff.capture(model, (), inputs, loss=lambda value: value)
        counts.update(values=len(capture.values), grads=len(capture.grads))
        if kind == "fxdiff + save":
            fxdiff.save(capture, out)
        return
    import torchlens
    from torchlens.options import CaptureOptions
    model.zero_grad(set_to_none=True)
    trace = torchlens.trace(model, input_kwargs=inputs,
                            capture=CaptureOptions(layers_to_save="all", save_grads=True, random_seed=0))
    trace.log_backward(trace[trace.output_layers[0]].out)
    counts.update(values=trace.num_saved_layers, grads=trace.num_saved_grad_layers)
    if kind == "torchlens + save":
        trace.save(out)
    trace.cleanup()
    model.zero_grad(set_to_none=True)

times = []
for _ in range(2):
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) if os.path.isdir(out) else 0
shutil.rmtree(out, ignore_errors=True)
print(json.dumps({"time": times[-1], "peak": rss("VmHWM:"), "base": base, "disk": size, **counts,
                  "params": sum(p.numel() for p in model.parameters())}))
"""

KINDS = ("eager", "fxdiff", "fxdiff + save", "torchlens", "torchlens + save")


def _range(xs: list[float], fmt: str = ".2f") -> str:
    med = statistics.median(xs)
    return f"{med:{fmt}}" if len(xs) == 1 else f"{med:{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="conformer,tiny,gpt2")
    parser.add_argument("--seq", type=int, default=256, help="tokens of the GPT-2 models' input")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = parser.parse_args()
    if importlib.util.find_spec("torchlens") is None:
        print("torchlens side by side: skipped, TorchLens is not installed (pip install 'fxdiff[bench]')")
        return 0
    from importlib.metadata import version
    folder = tempfile.mkdtemp(prefix="fxdiff-torchlens-")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"machine: {os.cpu_count()} cores, {cpu_name()}; python {platform.python_version()}; {a.threads} torch "
          f"thread(s); torchlens {version('torchlens')}; load average {os.getloadavg()[0]:.1f}")
    models = a.models.split(",")
    results: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in KINDS} for m in models}
    try:
        for r in range(a.rounds):
            for model in models:
                for kind in KINDS:
                    out = subprocess.run([sys.executable, "-c", _CHILD, model, kind, folder, str(a.threads),
                                          str(ROOT), str(a.seq)], env=env, capture_output=True, text=True)
                    if out.returncode:
                        print(f"{model} / {kind}: failed\n{out.stderr[-2000:]}")
                        continue
                    results[model][kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} of {a.rounds} done; load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{'model':<10} {'way':<17} {'time / eager':>20} {'peak RSS / eager':>20} {'on disk':>9} "
          f"{'values':>7} {'grads':>6}")
    for model in models:
        eager = results[model]["eager"]
        if not eager:
            continue
        print(f"{model:<10} {'eager':<17} {_range([e['time'] for e in eager]) + ' s':>20} "
              f"{_range([e['peak'] / 2**30 for e in eager]) + ' GiB':>20}   ({eager[0]['params'] / 1e6:.1f}M params)")
        for kind in KINDS[1:]:
            rs = results[model][kind]
            if not rs:
                continue
            pairs = list(zip(rs, eager))
            time_ratio = _range([r["time"] / e["time"] for r, e in pairs]) + "x"
            peak_ratio = _range([r["peak"] / e["peak"] for r, e in pairs]) + "x"
            disk = f"{rs[0]['disk'] / 2**20:.0f} MiB" if rs[0]["disk"] else "-"
            print(f"{'':<10} {kind:<17} {time_ratio:>20} {peak_ratio:>20} {disk:>9} {rs[0]['values']:>7} "
                  f"{rs[0]['grads']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
