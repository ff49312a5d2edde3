"""Typed session events and their JSON lines."""

from __future__ import annotations

import dataclasses
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
    assert json.loads(lines[0]) == {"event": "started", "role": "invite", "at": 1.5, "peer_name": None}
    assert events.read(tmp_path / "events.jsonl")[1] == {
        "event": "connected",
        "role": "accept",
        "at": 2.0,
        "peer_name": None,
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


def test_emit_reports_to_the_session_in_place_and_nowhere_without_one() -> None:
    seen: list[events.Event] = []
    events.emit(events.Sent, kind="request")  # no session reporting: dropped
    with events.reporting(seen.append, "accept"):
        events.emit(events.Sent, kind="response")
    events.emit(events.Sent, kind="refusal")
    assert [(event.role, event.kind) for event in seen if isinstance(event, events.Sent)] == [
        ("accept", "response")
    ]


def test_a_reason_is_one_line_with_its_puzzles_masked() -> None:
    puzzle = 0xFEDC_BA98_7654_3210
    reason = events.one_line(f"puzzle {puzzle} already seen:\n a replay from 198.51.100.1:40000, UID 12")
    assert reason == "puzzle … already seen: a replay from 198.51.100.1:40000, UID 12"
    assert len(events.one_line("x" * 1000)) == 200


def test_no_event_has_a_field_for_a_secret() -> None:
    def every(kind: type[events.Event]) -> list[type[events.Event]]:
        return [kind, *(sub for child in kind.__subclasses__() for sub in every(child))]

    names = {item.name for kind in every(events.Event) for item in dataclasses.fields(kind)}
    assert not names & {"puzzle", "secret", "password", "passwd", "key"}
    assert {"sent", "rejected", "moved", "fell_back", "ended"} <= {
        kind.name for kind in every(events.Event)[1:]
    }


def test_a_failing_sink_costs_the_event_not_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    def full(event: events.Event) -> None:
        raise OSError(28, "No space left on device")

    with events.reporting(full, "accept"):
        events.emit(events.Rejected, source="mail", reason="stale")
    assert "the rejected event was not reported" in caplog.text


SAMPLES: dict[str, tuple[object, object]] = {
    "Role": ("invite", "accept"),
    "float": (1.5, 2.5),
    "str": ("a", "b"),
    "int": (7, 8),
    "int | None": (None, 8),
    "str | None": (None, "b"),
    "tuple[str, ...]": (("a",), ("a", "b")),
    "Endpoint": (Endpoint("192.0.2.1", 1), Endpoint("192.0.2.2", 2)),
    "Endpoint | None": (None, Endpoint("2001:db8::1", 2)),
}
EVENTS = [kind for kind in vars(events).values() if isinstance(kind, type) and issubclass(kind, events.Event)]


@pytest.mark.parametrize("kind", EVENTS, ids=lambda kind: kind.__name__)
def test_eq_hash_and_repr_are_what_dataclasses_would_make(kind: type[events.Event]) -> None:
    """Event's shared __eq__, __hash__ and __repr__ against a dataclass that makes its own for each class."""
    fields = dataclasses.fields(kind)
    reference = dataclasses.make_dataclass(
        kind.__name__, [(item.name, item.type) for item in fields], frozen=True, kw_only=True
    )
    first = {item.name: SAMPLES[str(item.type)][0] for item in fields}
    ours, theirs = kind(**first), reference(**first)  # type: ignore[arg-type]
    assert repr(ours) == repr(theirs) and hash(ours) == hash(theirs)
    assert ours == kind(**first) and ours != theirs  # type: ignore[arg-type]
    for item in fields:
        other = {**first, item.name: SAMPLES[str(item.type)][1]}
        assert (ours == kind(**other)) == (theirs == reference(**other))  # type: ignore[arg-type]
    assert kind.__eq__ is events.Event.__eq__ and kind.__repr__ is events.Event.__repr__
