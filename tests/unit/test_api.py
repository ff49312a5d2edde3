"""The library's face: cheap to import, and explore's report as the CLI prints it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import plexus
from plexus import api, stun
from plexus.endpoint import Endpoint


def _report(mapping: stun.Behaviour | None) -> stun.NatReport:
    return stun.NatReport(
        Endpoint("10.0.0.2", 40000),
        Endpoint("198.51.100.2", 40000),
        True,
        mapping,
        "address-dependent",
        False,
    )


def test_import_plexus_loads_nothing_else() -> None:
    code = "import sys, plexus; print(' '.join(m for m in sys.modules if m.startswith('plexus')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["plexus"]


def test_the_library_names_come_from_api() -> None:
    assert (plexus.explore, plexus.invite, plexus.accept) == (api.explore, api.invite, api.accept)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = plexus.nothing  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("mapping", "relay", "expected"),
    [
        ("independent", False, {"independent": "direct", "dependent": "spray"}),
        ("dependent", False, {"independent": "fan-out", "dependent": api.NO_PATH}),
        ("dependent", True, {"independent": "fan-out", "dependent": "relay"}),
        (None, False, {"independent": "direct", "dependent": "spray"}),  # not tested: taken as punchable
    ],
)
def test_ways_through_follow_the_decision_table(
    mapping: stun.Behaviour | None, relay: bool, expected: dict[str, str]
) -> None:
    assert api.ways_through(_report(mapping), relay=relay) == expected


def test_the_exploration_reads_as_explore_prints_it() -> None:
    report = _report("independent")
    found = api.Exploration(report, api.ways_through(report, relay=False))
    lines = str(found).splitlines()
    assert "\n".join(lines[:-2]) == report.render()
    assert lines[-2] == f"{'to a peer whose NAT maps endpoint-independently':<52}direct"
    assert found.to_json() == report.to_json() | {"paths": {"independent": "direct", "dependent": "spray"}}
