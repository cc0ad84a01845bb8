"""The data that passes between stages: captures, alignments and reports (plain dataclasses)."""

from .alignment import Alignment, Pair, ParamMap, ParamPair
from .capture import Capture
from .report import Metrics, NodeRow, ParamRow, Report, load_report

__all__ = ["Alignment", "Capture", "Metrics", "NodeRow", "ParamMap", "ParamPair", "ParamRow", "Pair", "Report", "load_report"]
