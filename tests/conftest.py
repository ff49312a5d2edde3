"""Shared fixtures: the NAT lab (one per session), reset to cone NATs and clean links before each test,
and the plexus processes a test runs in it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.lab import sessions
from tests.lab.lab import Lab, clean_stale, lab_available
from tests.lab.sessions import Plexus

LAB_REQUIRED = os.environ.get("PLEXUS_LAB_REQUIRED") == "1"
LABTESTS = Path(__file__).parent / "labtests"


def _unavailable(reason: str) -> None:
    if LAB_REQUIRED:
        pytest.fail(f"PLEXUS_LAB_REQUIRED=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def _lab_instance() -> Iterator[Lab]:
    reason = lab_available()
    if reason is not None:
        _unavailable(reason)
    clean_stale()  # leftovers of labs whose test run was killed
    with Lab() as lab:
        yield lab


@pytest.fixture
def lab(_lab_instance: Lab) -> Lab:
    """The session's lab, with both NATs back to cone, no netem, and STUN running."""
    _lab_instance.reset()
    return _lab_instance


@pytest.fixture
def running(request: pytest.FixtureRequest, lab: Lab) -> Iterator[list[Plexus]]:
    """Every plexus a test starts (appended here) is stopped at its end, whatever happens; then so is every
    launched command the test module names in LAUNCHED (SIGTERM, SIGKILL after 15 s), on both hosts."""
    started: list[Plexus] = []
    yield started
    for plexus in started:
        plexus.stop()
    names: tuple[str, ...] = getattr(request.module, "LAUNCHED", ())
    deadline = time.monotonic() + 15
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for name in names:
            for host in ("a", "b", "c"):
                sessions.signal_launched(lab, host, name, sig)
        while time.monotonic() < deadline and any(
            sessions.pids_of(lab, h, n) for h in ("a", "b", "c") for n in names
        ):
            time.sleep(0.1)
        deadline = time.monotonic() + 5


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, object, object]:
    report = yield
    # In CI the lab must really run: a skipped lab test would hide that nothing was tested.
    if (
        LAB_REQUIRED
        and isinstance(report, pytest.TestReport)
        and report.skipped
        and Path(str(item.path)).is_relative_to(LABTESTS)
    ):
        report.outcome = "failed"
        report.longrepr = f"skipped lab test with PLEXUS_LAB_REQUIRED=1: {report.longrepr}"
    return report
