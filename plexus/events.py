"""Typed session events: what a session did and when, for programs (the library's callers, the lab tests,
bench/) rather than people, who read the log.

Each event is a frozen dataclass with the wall-clock time it happened (`at`, time.time()) and the side's
role. The library hands them to a callback; the CLI writes them as JSON lines to the file named by the
environment variable PLEXUS_EVENTS (`JsonLines`), one object per event with its `event` name. Nothing secret
is in an event: the secret stays in the command's environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from plexus.endpoint import Endpoint

Role = Literal["invite", "accept"]
ENVIRONMENT = "PLEXUS_EVENTS"


def _now() -> float:
    return time.time()


@dataclass(frozen=True, kw_only=True)
class Event:
    name: ClassVar[str]
    role: Role
    at: float = field(default_factory=_now)

    def to_json(self) -> dict[str, Any]:
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        plain = {name: str(value) if isinstance(value, Endpoint) else value for name, value in values.items()}
        return {"event": self.name, **plain}


@dataclass(frozen=True, kw_only=True)
class Started(Event):
    """The session's flow runs: the process has started, imported and entered its event loop."""

    name: ClassVar[str] = "started"


@dataclass(frozen=True, kw_only=True)
class Listening(Event):
    """The acceptor watches for requests: one sent from now on is served."""

    name: ClassVar[str] = "listening"
    peer_id: str


@dataclass(frozen=True, kw_only=True)
class Discovered(Event):
    """STUN answered: this side's endpoints and its NAT's mapping."""

    name: ClassVar[str] = "discovered"
    inner: Endpoint
    outer: Endpoint
    mapping: str


@dataclass(frozen=True, kw_only=True)
class Requested(Event):
    """The acceptor has a request (`peer`: the inviter's outer endpoint)."""

    name: ClassVar[str] = "requested"
    peer: Endpoint


@dataclass(frozen=True, kw_only=True)
class Answered(Event):
    """The inviter has the acceptor's response (`peer`: its outer endpoint)."""

    name: ClassVar[str] = "answered"
    peer: Endpoint


@dataclass(frozen=True, kw_only=True)
class Chosen(Event):
    """The way through both sides' NATs allow (plexus/path.py's method), before the punch."""

    name: ClassVar[str] = "chosen"
    way: str
    why: str


@dataclass(frozen=True, kw_only=True)
class Connected(Event):
    """The handshake is done: the path the command is given."""

    name: ClassVar[str] = "connected"
    inner: Endpoint
    outer: Endpoint
    peer: Endpoint
    way: str


@dataclass(frozen=True, kw_only=True)
class Launched(Event):
    """The command runs on the path (pid), or the streams do (pid None)."""

    name: ClassVar[str] = "launched"
    pid: int | None


@dataclass(frozen=True, kw_only=True)
class Failed(Event):
    """A session ended in an error (on the acceptor: that session only; it serves the next)."""

    name: ClassVar[str] = "failed"
    error: str


Sink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The sink of a session nobody listens to."""


class JsonLines:
    """A sink that appends each event to a file as one JSON line (created 0600: it names endpoints)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, event: Event) -> None:
        line = json.dumps(event.to_json(), separators=(",", ":")) + "\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "a") as file:
            file.write(line)

    @classmethod
    def from_environment(cls) -> JsonLines | None:
        """The sink PLEXUS_EVENTS names, if it is set."""
        named = os.environ.get(ENVIRONMENT)
        return cls(Path(named)) if named else None


def read(path: Path) -> list[dict[str, Any]]:
    """The events a JsonLines sink wrote, oldest first (none while the file does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
