"""fxdiff: where do two PyTorch models part ways, forward and backward?

The data flows one way: *load model -> record -> store* and *load captures -> match -> judge ->
render*. ``api.py`` is the one pipeline; the names below are the public API::

    import fxdiff
    ref = fxdiff.capture(model, args, kwargs)          # record one forward + backward run
    fxdiff.save(ref, "ref.fxd")                        # JSON + safetensors, written atomically
    report = fxdiff.compare("ref.fxd", port_model)     # run the port on ref's inputs, then diff
    report.diverged, report.first_divergence()
"""

from .api import (LiveOptions, capture, capture_spec, compare, convert, load, map_params, save, save_inputs,
                  write_checkpoint)
from .errors import FxdiffError, UserCodeError
from .judge import Tolerance, compare_tensors
from .model import Capture, ParamMap, Report, load_report
from .version import __version__

__all__ = ["Capture", "FxdiffError", "LiveOptions", "ParamMap", "Report", "Tolerance", "UserCodeError",
           "__version__", "capture", "capture_spec", "compare", "compare_tensors", "convert", "load", "load_report",
           "map_params", "save", "save_inputs", "write_checkpoint"]
