"""What the benchmarks print about the machine they ran on."""

import os
import platform
import tempfile
import time


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def disk_speed(folder: str | None = None, size: int = 1 << 30) -> float:
    """Bytes a second the capture writer (``O_DIRECT`` where allowed) puts on disk in ``folder``
    (default: the temp dir), from ``size`` bytes of host memory: a capture that writes ``B`` bytes
    spends about ``B`` / this on it, whatever the recorder does (a virtual machine's disk varies)."""
    import torch
    from fxdiff.store.tensor_file import _Writer
    data = torch.ones(64 << 20, dtype=torch.uint8)
    fd, file = tempfile.mkstemp(prefix="fxdiff-disk-", dir=folder)
    os.close(fd)
    try:
        start = time.perf_counter()
        writer = _Writer(file)
        for _ in range(size // data.numel()):
            writer.write([data])
        writer.__exit__(None, None, None)
        return size / (time.perf_counter() - start)
    finally:
        os.unlink(file)
