"""Prints the reliability summary at the end of the run (`RELIABILITY_FULL=1 pytest tests/reliability -s` for the full bounds)."""

from __future__ import annotations

import pytest

from .common import SUMMARY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = SUMMARY.render()
    if len(lines) > 1:
        terminalreporter.section("reliability summary")
        for line in lines:
            terminalreporter.write_line(line)
