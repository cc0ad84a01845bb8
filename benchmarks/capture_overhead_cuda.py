"""Capture overhead on a CUDA GPU: the Conformer bench model, eager fwd+bwd vs ``fxdiff.capture``.

Prints the median wall time of each (tensors kept on the GPU, nothing written) and the peak GPU
memory of each, as ratios to eager. Needs a CUDA device; run from the repository root.
"""

import importlib.util
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fxdiff  # noqa: E402

spec = importlib.util.spec_from_file_location("conformer_specs", ROOT / "examples/conformer/specs.py")
specs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(specs)


def timed(fn, repeat=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del result
    return statistics.median(times)


def peak(fn):
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated()


def main():
    if not torch.cuda.is_available():
        sys.exit("capture_overhead_cuda.py needs a CUDA device")
    model = specs.bench_reference().cuda().eval()
    inputs = {k: v.cuda() for k, v in specs.bench_inputs().items()}

    def eager():
        specs.loss(model(**inputs)).backward()
        model.zero_grad(set_to_none=True)

    def capture():
        return fxdiff.capture(model, kwargs=inputs, loss=specs.loss)

    e, c = timed(eager), timed(capture)
    pe, pc = peak(eager), peak(capture)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: eager fwd+bwd {e * 1e3:.1f} ms, "
          f"capture {c * 1e3:.1f} ms ({c / e:.2f}x); peak GPU memory eager {pe / 2**30:.2f} GiB, "
          f"capture {pc / 2**30:.2f} GiB ({pc / pe:.2f}x)")


if __name__ == "__main__":
    main()
