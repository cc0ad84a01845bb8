"""A tiny self-supervised speech encoder written the framework (NeMo) way.

This package stands for the reference framework in fxdiff's two-environment test: it is installed
only in the reference's environment, and its loss (``specs.ssl_loss``) lives nowhere else.
"""

from .modules import SSLEncoderModel, SSLOutput

__all__ = ["SSLEncoderModel", "SSLOutput"]
