"""What recording costs: eager fwd+bwd vs ``fxdiff.capture`` in memory vs capture + save to disk.

Builds the Conformer example at its bench size (``examples/conformer/specs.py``: ``bench_reference()``
on ``bench_inputs()``, one fwd+bwd about 1 s on one CPU thread) and times, in one process and
interleaved so that background load hits all three alike, the median of ``--repeat`` runs of:

- eager:        ``loss(model(**inputs)).backward()``
- capture:      ``fxdiff.capture(model, (), inputs, loss=loss)``, every value and gradient kept in memory
- capture+save: the same, then ``fxdiff.save`` to a fresh directory under ``--dir``
- capture stream: ``fxdiff.capture(..., stream_to=dir)``, each value and gradient written as it is
  produced (what ``fxdiff capture -o`` does)

Targets: capture <= 1.5x eager, capture+save and capture stream <= 2x eager, in wall-clock time. CPU time (all
threads of the process) is printed too: on a shared machine it varies less than wall time, but it
leaves out the time spent waiting for the disk.
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

from machine import cpu_name  # this folder is the script's

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "conformer"))

import specs  # noqa: E402

import fxdiff  # noqa: E402

TARGETS = {"capture": 1.5, "capture+save": 2.0, "capture stream": 2.0}



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each kind (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--mode", choices=["eval", "train"], default="eval")
    parser.add_argument("--dir", default=None, help="where captures are written (default: the temp dir)")
    a = parser.parse_args()

    torch.set_num_threads(a.threads)
    model, inputs, loss = specs.bench_reference(), specs.bench_inputs(), specs.loss
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
    try:
        cap = capture()  # warm-up, and the sizes to report
        tensors = [*cap.values.values(), *cap.grads.values(), *cap.params.values(), *cap.param_grads.values()]
        sizes["memory"] = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
        ops = cap.summary()["ops"]
        del cap, tensors
        eager()
        for _ in range(a.repeat):
            for kind, fn in kinds.items():
                shutil.rmtree(os.path.join(folder, "c"), ignore_errors=True)
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                times[kind].append(time.perf_counter() - start)
                cpu[kind].append(time.process_time() - start_cpu)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    params = sum(p.numel() for p in model.parameters())
    print(f"machine: {os.cpu_count()} cores, {cpu_name()}; torch {torch.__version__}, {a.threads} thread(s), "
          f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    print(f"model: Conformer bench, {params / 1e6:.1f}M params, {ops} ops recorded, {a.mode} mode; "
          f"capture {sizes['memory'] / 2**20:.0f} MiB in memory, {sizes['disk'] / 2**20:.0f} MiB on disk")
    base, base_cpu = statistics.median(times["eager"]), statistics.median(cpu["eager"])
    ok = True
    for kind, values in times.items():
        median = statistics.median(values)
        ratio = median / base
        target = TARGETS.get(kind)
        verdict = "" if target is None else f"  (target <= {target}x: {'met' if ratio <= target else 'MISSED'})"
        ok &= target is None or ratio <= target
        print(f"{kind:>14}: median {median:.3f} s wall [{', '.join(f'{v:.2f}' for v in values)}], "
              f"{ratio:.2f}x eager{verdict}; cpu {statistics.median(cpu[kind]):.3f} s, "
              f"{statistics.median(cpu[kind]) / base_cpu:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
