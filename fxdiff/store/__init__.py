"""Record -> **store** -> load captures: a capture directory of JSON and safetensors."""

from .capture_dir import is_capture, load, read_meta, save, writing

__all__ = ["is_capture", "load", "read_meta", "save", "writing"]
