"""Per-thread scratch buffers and torch on one thread: how chunked passes over large tensors
(the judge, parameter digests) stay at memory speed. Fresh memory is slow to fault in (virtual
machines especially), and torch's own parallel loops stall on small chunks when the machine is
loaded: measured 0.3 ns per element for a float32 to bfloat16 conversion into a reused buffer on
one thread, 4-8 ns into fresh memory or on two threads."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

MIN_ELEMENTS = 1 << 18   # a buffer holds at least this many elements (the judge's chunk)

_SCRATCH = threading.local()


def scratch(n: int, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """A 1-D buffer of ``n`` elements, this thread's own for ``slot``: reused call after call (the
    same view while ``n`` stays the same, as it does chunk after chunk)."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    view = bufs.get((slot, dtype, "view"))
    if view is not None and view.shape == (n,):
        return view
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(slot, dtype)] = torch.empty(max(n, MIN_ELEMENTS), dtype=dtype)
    view = bufs[(slot, dtype, "view")] = buf[:n]
    return view


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread in the calling thread meanwhile. On exit the thread count is set back,
    which also restores the default that new threads start with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
