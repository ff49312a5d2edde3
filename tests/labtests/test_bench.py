"""The benchmark command itself runs (in a lab of its own), so docs/performance.md can always be renewed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.lab.lab import lab_available

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[2]


def bench(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """`python -m bench` with these arguments, which must pass: its report and its results."""
    reason = lab_available()
    if reason is not None:
        pytest.skip(reason)
    figures = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "bench", *args, "--json", str(figures)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(figures.read_text())


def test_bench_runs_and_reports(tmp_path: Path) -> None:
    report, results = bench(
        tmp_path, "--runs", "3", "--delays", "0", "--idle", "1", "--sections", "connect,footprint"
    )
    assert "total" in report and "== Footprint" in report
    (connect,) = results["connect"]
    assert connect["total"]["n"] == 3 and connect["floor"] > 0
    assert results["footprint"]["inviter"]["code"] == 0


def test_bench_measures_the_streams_through_each_relay_transport(tmp_path: Path) -> None:
    report, results = bench(tmp_path, "--sections", "relay-streams", "--relay-mib", "1", "--tries", "1")
    assert "== Streams through a TURN relay" in report and "relay, TURN over TLS  down" in report
    found = results["relay_streams"]
    for name, way in [("udp", "relay"), ("tcp", "relay"), ("tls", "relay"), ("direct", "direct")]:
        (session,) = found["paths"][name]["sessions"]
        assert session["way"] == way and session["up"]["ok"] and session["down"]["ok"], session
        assert session["up"]["bytes"] == session["down"]["bytes"] == 1 << 20
    assert set(found["over_udp"]["up"]) == {"tcp", "tls", "direct"}


def test_bench_measures_a_stream_across_the_inviters_moves_by_mail_and_on_the_dht(tmp_path: Path) -> None:
    report, results = bench(tmp_path, "--sections", "resume", "--moves", "2", "--resume-mib", "1")
    assert "== Resume" in report and "target DHT: a stream resumes within 2 s" in report
    for way in ("mail", "dht"):
        entry = results["resume"]["ways"][way]
        assert entry["error"] is None and entry["intact"] and entry["records"] > 0, entry
        moves = [(move["mover"], move["change"]) for move in entry["moves"]]
        assert moves == [("a", "remap"), ("a", "renumber")]
        for move in entry["moves"]:
            assert move["resumed"] is not None and move["migrated"] is not None, move
            assert move["bulk_before"]["ok"] and move["bulk_after"]["ok"], move
