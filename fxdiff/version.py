"""The version of fxdiff."""

__version__ = "0.2.0"
