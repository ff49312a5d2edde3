"""The benchmark command itself runs (in a lab of its own), so docs/performance.md can always be renewed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.lab import lab_available

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[2]


def test_bench_runs_and_reports(tmp_path: Path) -> None:
    reason = lab_available()
    if reason is not None:
        pytest.skip(reason)
    figures = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "bench", "--runs", "3", "--delays", "0", "--idle", "1",
            "--sections", "connect,footprint", "--json", str(figures)]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "total" in done.stdout and "== Footprint" in done.stdout
    results = json.loads(figures.read_text())
    (connect,) = results["connect"]
    assert connect["total"]["n"] == 3 and connect["floor"] > 0
    assert results["footprint"]["inviter"]["code"] == 0
