"""GPU time of the summary kernel (``store/device_summary.py``): what ``--keep summary`` costs a
GPU tensor, as microseconds an ``add`` and the bytes read a second.

For each dtype and size, 30 summaries of one tensor are queued behind a ``torch.cuda._sleep`` that
keeps the GPU busy while the host queues them, so that the time between the two CUDA events is the
kernels' own, not the host's launches. Needs a CUDA device (and Triton, or the torch fallback is
what is timed); run from the repository root: ``python benchmarks/summary_kernel_cuda.py``.
"""

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fxdiff.store.device_summary import DeviceSummaries, _kernel  # noqa: E402

CASES = ((torch.bfloat16, 1 << 24), (torch.float32, 1 << 24), (torch.bfloat16, 32768 * 5632),
         (torch.float64, 1 << 25), (torch.int64, 1 << 25), (torch.bfloat16, 3000))
REPEAT = 30


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("summary_kernel_cuda.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"{'Triton kernel' if _kernel() is not None else 'torch fallback (Triton is not installed)'}")
    for dtype, n in CASES:
        x = torch.randn(n, device="cuda").to(dtype)
        summaries = DeviceSummaries()
        for _ in range(3):   # compiled and warm
            summaries.add(x)
        summaries.finish()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)
        start.record()
        for _ in range(REPEAT):
            summaries.add(x)
        end.record()
        torch.cuda.synchronize()
        summaries.finish()
        ms = start.elapsed_time(end) / REPEAT
        print(f"{str(dtype):15} {n:>11} elements: {ms * 1e3:8.1f} us an add, "
              f"{x.numel() * x.element_size() / ms / 1e6:7.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
