"""Fixtures shared by every distribution's tests.

Each module in ``testsupport/`` provides the fixtures of one real service
(PostgreSQL with logical replication, RabbitMQ, a search server, Chromium,
...). They are loaded for every test under the repository.

Under CI (``CI=true``) a skipped test is a failure: a green run that skipped
the real database proves nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = sorted(
    f"testsupport.{path.stem}"
    for path in (Path(__file__).parent / "testsupport").glob("*.py")
    if not path.stem.startswith("_")
)

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and os.environ.get("CI"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and os.environ.get("CI"):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"CI=true: {len(_skipped)} skipped tests count as failures:", red=True
            )
            for nodeid in _skipped:
                reporter.write_line(f"  {nodeid}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
