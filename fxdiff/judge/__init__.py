"""Match -> **judge**: compare every aligned pair of tensors and find where a divergence starts."""

from .assemble import judge
from .tensors import Tolerance, compare_tensors, statistics

__all__ = ["Tolerance", "compare_tensors", "judge", "statistics"]
