"""What recording costs: eager fwd+bwd vs ``fxdiff.capture`` in memory vs capture + save to disk.

For two models, the Conformer example at its bench size (``examples/conformer/specs.py``:
``bench_reference()`` on ``bench_inputs()``, 13M parameters, one fwd+bwd about 1 s on one CPU
thread) and a GPT-2 of about 1M parameters (4 layers of width 128, vocabulary 1000, 256 tokens;
random weights from its config, as ``capture_memory.py``'s ``tiny``), times, in one process and
interleaved so that background load hits every kind alike, the median of ``--repeat`` runs of:

- eager:        ``loss(model(**inputs)).backward()``
- capture:      ``fxdiff.capture(model, (), inputs, loss=loss)``, every value and gradient kept in memory
- capture+save: the same, then ``fxdiff.save`` to a fresh directory under ``--dir`` (``fxdiff capture --no-stream``)
- capture stream: ``fxdiff.capture(..., stream_to=dir)``, each value and gradient written as it is
  produced (what ``fxdiff capture -o`` does)

Targets (issue 11), in wall-clock time: on the Conformer bench capture <= 1.5x eager and capture + save
(either way) <= 1.5x; on the ~1M-parameter model, capture + save <= 2x. CPU time is printed too, of
the whole process (all threads) and of the model's own thread (``main``): on a shared machine they
vary less than wall time, but leave out the time spent waiting for the disk, and the whole
process's counts the writer threads' work that overlaps the run. The disk's write speed is measured
first, with the capture writer, and each kind that writes prints the time writing its bytes takes
at that speed: capture + save takes about capture plus that, while a stream, which writes as the
model runs, can hide it (the speed measured varies from run to run on a virtual machine's disk).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

import fxdiff
from machine import cpu_name, disk_speed  # this folder is the script's
from models import build

TARGETS = {"Conformer bench": {"capture": 1.5, "capture+save": 1.5, "capture stream": 1.5},
           "GPT-2 ~1M": {"capture+save": 2.0, "capture stream": 2.0}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each kind (default 5; x10 for the small model)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--mode", choices=["eval", "train"], default="eval")
    parser.add_argument("--dir", default=None, help="where captures are written (default: the temp dir)")
    a = parser.parse_args()

    torch.set_num_threads(a.threads)
    print(f"machine: {os.cpu_count()} cores, {cpu_name()}; torch {torch.__version__}, {a.threads} thread(s), "
          f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    speed = disk_speed(a.dir)
    print(f"disk: the capture writer puts {speed / 1e9:.2f} GB/s on it")
    ok = True
    for name, model, repeat in (("Conformer bench", "conformer", a.repeat), ("GPT-2 ~1M", "tiny", 10 * a.repeat)):
        ok &= bench(name, *build(model), repeat, a, speed)
    return 0 if ok else 1


def bench(name: str, model: torch.nn.Module, inputs: dict, loss, repeat: int, a: argparse.Namespace,
          speed: float) -> bool:
    """Time every kind on one model and print the ratios; whether every target was met."""
    folder = tempfile.mkdtemp(prefix="fxdiff-bench-", dir=a.dir)
    sizes = {}

    def eager():
        model.train(a.mode == "train")
        model.zero_grad(set_to_none=True)
        loss(model(**inputs)).backward()
        model.zero_grad(set_to_none=True)

    def capture():
        return fxdiff.capture(model, (), inputs, loss=loss, mode=a.mode)

    def capture_save():
        path = fxdiff.save(capture(), os.path.join(folder, "c"))
        sizes["disk"] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))

    def capture_stream():
        fxdiff.capture(model, (), inputs, loss=loss, mode=a.mode, stream_to=os.path.join(folder, "c"))

    kinds = {"eager": eager, "capture": capture, "capture+save": capture_save, "capture stream": capture_stream}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    main: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        cap = capture()  # warm-up, and the sizes to report
        tensors = [*cap.values.values(), *cap.grads.values(), *cap.params.values(), *cap.param_grads.values()]
        sizes["memory"] = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
        ops = cap.summary()["ops"]
        del cap, tensors
        for fn in kinds.values():
            shutil.rmtree(os.path.join(folder, "c"), ignore_errors=True)
            fn()
        for _ in range(repeat):
            for kind, fn in kinds.items():
                shutil.rmtree(os.path.join(folder, "c"), ignore_errors=True)
                start, start_cpu, start_main = time.perf_counter(), time.process_time(), time.thread_time()
                fn()
                times[kind].append(time.perf_counter() - start)
                cpu[kind].append(time.process_time() - start_cpu)
                main[kind].append(time.thread_time() - start_main)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    params = sum(p.numel() for p in model.parameters())
    print(f"model: {name}, {params / 1e6:.2f}M params, {ops} ops recorded, {a.mode} mode; capture "
          f"{sizes['memory'] / 2**20:.0f} MiB in memory, {sizes['disk'] / 2**20:.0f} MiB on disk; load average "
          f"{os.getloadavg()[0]:.1f}")
    base, base_cpu, base_main = (statistics.median(v["eager"]) for v in (times, cpu, main))
    ok = True
    for kind, values in times.items():
        median = statistics.median(values)
        ratio = median / base
        target = TARGETS[name].get(kind)
        verdict = "" if target is None else f"  (target <= {target}x: {'met' if ratio <= target else 'MISSED'})"
        if kind != "eager" and kind != "capture":   # what writing the bytes alone costs on this disk
            verdict += f"; writing its bytes at the disk's measured speed {sizes['disk'] / speed / base:.2f}x"
        ok &= target is None or ratio <= target
        print(f"{kind:>14}: median {median:.3f} s wall ({min(values):.3f}-{max(values):.3f}), {ratio:.2f}x eager{verdict}; cpu "
              f"{statistics.median(cpu[kind]) / base_cpu:.2f}x, main thread {statistics.median(main[kind]) / base_main:.2f}x")
    return ok


if __name__ == "__main__":
    sys.exit(main())
