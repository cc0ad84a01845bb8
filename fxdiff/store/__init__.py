"""Record -> **store** -> load captures: a capture directory of JSON and safetensors."""

from .capture_dir import is_capture, load, load_deferred, read_meta, save, writing
from .tensor_file import evict, trim

__all__ = ["evict", "is_capture", "load", "load_deferred", "read_meta", "save", "trim", "writing"]
