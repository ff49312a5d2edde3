"""The benchmark's reconnect soak, small: a killed and a stale OpenVPN tunnel, each brought back by the cron
recipe, and nothing left over (the benchmark runs it 20 times: docs/performance.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report, soak
from tests.lab.lab import Lab

pytestmark = pytest.mark.lab


def test_the_reconnect_soak_restores_every_cycle_and_leaves_nothing(lab: Lab, tmp_path: Path) -> None:
    found = soak.soak(lab, tmp_path, cycles=2).to_json()
    print(json.dumps(found, indent=1))
    assert [cycle["broken"] for cycle in found["per_cycle"]] == ["killed", "stale"]
    assert report.check({"soak": found}) == []
