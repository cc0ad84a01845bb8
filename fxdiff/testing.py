"""Regression tests for ports: ``assert_equivalent(ref, cand)`` in a pytest test.

    from fxdiff.testing import assert_equivalent

    def test_port_matches_reference():
        assert_equivalent("tests/data/ref.fxd", build_port())
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from .api import compare
from .model.report import Report


def assert_equivalent(ref: Any, cand: Any, **compare_options: Any) -> Report:
    """``fxdiff.compare(ref, cand, **compare_options)``; raise ``AssertionError`` when it diverges.

    The message names the first divergence, forward and backward, then the terminal report.
    Returns the report when the two match.
    """
    report = compare(ref, cand, **compare_options)
    if report.diverged:
        raise AssertionError(failure_message(report))
    return report


def failure_message(report: Report) -> str:
    """The first divergence in one line per direction, then the report as plain text."""
    from .render.text import render

    lines = [f"fxdiff: {report.cand.get('label', 'cand')} diverges from {report.ref.get('label', 'ref')}"]
    for direction, entries in report.first_divergence().items():
        for e in entries or [None]:
            lines.append(f"  first {direction} divergence: " + (
                "none" if e is None else
                f"ref {e['ref_module'] or '<root>'} ({e['ref_node']}) <-> cand {e['cand_module'] or '<root>'} "
                f"({e['cand_node']}), op {e['op']}, max abs diff {e['max_abs_diff']:.3g}"))
    console = Console(record=True, width=120, file=io.StringIO(), color_system=None)
    console.print(render(report))
    return "\n".join(lines) + "\n\n" + console.export_text()
