"""Match -> **judge**: compare every aligned pair of tensors and find where a divergence starts."""

from .assemble import Tolerance, compare_tensors, judge

__all__ = ["Tolerance", "compare_tensors", "judge"]
