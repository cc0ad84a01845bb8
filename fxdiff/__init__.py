"""fxdiff: where do two PyTorch models part ways, forward and backward?

The data flows one way: *load model -> record -> store* and *load captures -> match -> judge ->
render*. Each stage is a module with one job; the names below are the whole public API::

    import fxdiff
    ref = fxdiff.capture(model, args, kwargs)          # record one forward + backward run
    fxdiff.save(ref, "ref.fxd")                        # JSON + safetensors, written atomically
    report = fxdiff.compare("ref.fxd", port_model)     # run the port on ref's inputs, then diff
    report.diverged, report.first_divergence()
"""

__version__ = "0.1.0"

from .capture import Capture  # noqa: E402
from .compare import compare  # noqa: E402
from .errors import FxdiffError  # noqa: E402
from .judge import Tolerance, compare_tensors  # noqa: E402
from .record import record as capture  # noqa: E402
from .report import Report, load_report  # noqa: E402
from .store import load, save  # noqa: E402

__all__ = ["Capture", "FxdiffError", "Report", "Tolerance", "capture", "compare", "compare_tensors",
           "load", "load_report", "save"]
