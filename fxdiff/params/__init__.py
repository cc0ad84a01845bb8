"""Parameter correspondence between two captures, and checkpoint conversion through it.

See ``correspond.py`` for how tensors are paired and the transforms that relate them.
"""

from .correspond import Digests, apply_transform, convert, correspond, digest, output_index, output_slice, summarised

__all__ = ["Digests", "apply_transform", "convert", "correspond", "digest", "output_index", "output_slice",
           "summarised"]
