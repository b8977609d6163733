"""A pytest plugin (loaded by conftest.py): only skips that need hardware this machine cannot have may pass.

CI runs on a CPU-only VM: a test may skip because it needs a GPU or a Jetson (and must say so). Any other skip means
a missing setup step or a broken assumption, so it fails the run instead of hiding. That holds for skips at
collection time too (`pytest.importorskip` at module level, `pytestmark = skipif(...)`), which skip a whole module
without a single test report.
"""

from __future__ import annotations

from typing import Any

import pytest

EXPECTED_SKIP = ("needs a GPU", "needs a Jetson")
# On a Jetson only: tests whose premise is a machine without what a Jetson has (no real TensorRT-LLM, no sound card)
# or newer than JetPack 6 (systemd 250+, Python 3.11 wheels). Their reasons start "on a Jetson:"; anywhere else such
# a skip still fails the run, so CI keeps checking what they check.
JETSON_ONLY_SKIP = "on a Jetson:"
_unexpected_skips: list[str] = []


def allowed(reason: str, on_jetson: bool) -> bool:
    return any(expected in reason for expected in EXPECTED_SKIP) or (on_jetson and JETSON_ONLY_SKIP in reason)


def _on_jetson() -> bool:
    from edge_llama.jetson import is_jetson  # plain file reads

    return is_jetson()


ON_JETSON = _on_jetson()


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def _check(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report)
        if not allowed(reason, ON_JETSON):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _check(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _check(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _unexpected_skips:
        allowance = f"{EXPECTED_SKIP}" + (f" and, on this Jetson, {JETSON_ONLY_SKIP!r}" if ON_JETSON else "")
        terminalreporter.write_line(f"FAILED: {len(_unexpected_skips)} unexpected skip(s) (only {allowance} "
                                    "may skip):", red=True)
        for line in _unexpected_skips:
            terminalreporter.write_line(f"  {line}", red=True)
