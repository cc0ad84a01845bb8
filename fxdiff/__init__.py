"""fxdiff: where do two PyTorch models part ways, forward and backward?

The data flows one way: *load model -> record -> store* and *load captures -> match -> judge ->
render*. ``api.py`` is the one pipeline; the names below are the public API::

    import fxdiff
    ref = fxdiff.capture(model, args, kwargs)          # record one forward + backward run
    fxdiff.save(ref, "ref.fxd")                        # JSON + safetensors, written atomically
    report = fxdiff.compare("ref.fxd", port_model)     # run the port on ref's inputs, then diff
    report.diverged, report.first_divergence()

The names are imported on first use: the command line begins its work (checking the captures it
was given) before torch, which takes seconds to import, is loaded.
"""

import importlib
import importlib.util
import random

from .errors import FxdiffError, UserCodeError
from .version import __version__

# Importing the subpackage ``fxdiff.load`` (the "load model" stage) binds the name ``load`` here, to
# the subpackage. It is imported now and the name dropped, so that ``fxdiff.load`` is the function
# ``load`` (through ``__getattr__``) however the package is first used.
importlib.import_module(".load", __name__)
globals().pop("load")

_FROM = {**dict.fromkeys(["LiveOptions", "capture", "capture_spec", "compare", "convert", "load", "map_params",
                          "save", "save_inputs", "write_checkpoint"], "api"),
         **dict.fromkeys(["Tolerance", "compare_tensors"], "judge"),
         **dict.fromkeys(["Capture", "ParamMap", "Report", "load_report"], "model")}

__all__ = ["Capture", "FxdiffError", "LiveOptions", "ParamMap", "Report", "Tolerance", "UserCodeError",
           "__version__", "capture", "capture_spec", "compare", "compare_tensors", "convert", "load", "load_report",
           "map_params", "save", "save_inputs", "write_checkpoint"]


def __getattr__(name: str):
    state = random.getstate()   # rich draws from Python's random when imported: the caller's draws stay theirs
    try:
        if name in _FROM:
            value = globals()[name] = getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
            return value
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)   # a module, as ``fxdiff.store.load``
    finally:
        random.setstate(state)
    raise AttributeError(f"module 'fxdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
