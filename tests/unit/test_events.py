"""Typed session events and their JSON lines."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from plexus import events
from plexus.endpoint import Endpoint


def test_an_event_is_one_json_object_with_its_name(tmp_path: Path) -> None:
    sink = events.JsonLines(tmp_path / "events.jsonl")
    sink(events.Started(role="invite", at=1.5))
    sink(
        events.Connected(
            role="accept",
            at=2.0,
            inner=Endpoint("10.0.0.2", 40000),
            outer=Endpoint("198.51.100.2", 40000),
            peer=Endpoint("198.51.100.1", 5000),
            way="direct",
        )
    )
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"event": "started", "role": "invite", "at": 1.5}
    assert events.read(tmp_path / "events.jsonl")[1] == {
        "event": "connected",
        "role": "accept",
        "at": 2.0,
        "inner": "10.0.0.2:40000",
        "outer": "198.51.100.2:40000",
        "peer": "198.51.100.1:5000",
        "way": "direct",
    }
    assert stat.S_IMODE((tmp_path / "events.jsonl").stat().st_mode) == 0o600


def test_the_environment_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(events.ENVIRONMENT, raising=False)
    assert events.JsonLines.from_environment() is None
    monkeypatch.setenv(events.ENVIRONMENT, str(tmp_path / "e"))
    sink = events.JsonLines.from_environment()
    assert sink is not None and sink.path == tmp_path / "e"


def test_no_events_yet(tmp_path: Path) -> None:
    assert events.read(tmp_path / "missing") == []
