"""Typed session events: what a session did and when, for programs (the library's callers, the lab tests,
bench/) rather than people, who read the log.

Each event is a frozen dataclass with the wall-clock time it happened (`at`, time.time()) and the side's
role. The library hands them to a callback; the CLI writes them as JSON lines to the file named by the
environment variable PLEXUS_EVENTS (`JsonLines`), one object per event with its `event` name. Nothing secret
is in an event: the secret stays in the command's environment, and a rejection's reason has its long numbers
(the puzzles a refused message named) masked. Their __eq__, __hash__ and __repr__ are Event's, one for all
and the same as dataclasses would make: made for each class (eq=True, repr=True), they cost 2 ms of every
start, a third of this module's import.

The code that sees an event deep in the session (a mediator judging a message, the puncher's switch to a
peer-reflexive endpoint, the fall back to a relay) reports it with `emit`, to the sink the session put in
place with `reporting`: a context variable, so that the rendezvous and the ways through need no sink passed
down, and each task of an acceptor reports to the session that started it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from plexus.endpoint import Endpoint

log = logging.getLogger(__name__)

Role = Literal["invite", "accept"]
ENVIRONMENT = "PLEXUS_EVENTS"


def _now() -> float:
    return time.time()


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Event:
    """What every event has: the side's role and when it happened."""

    name: ClassVar[str]
    role: Role
    at: float = field(default_factory=_now)
    # An acceptor's session: the name of the peer it serves (plexus/peers.py); None elsewhere.
    peer_name: str | None = None

    def _values(self, hashed: bool = False) -> tuple[Any, ...]:
        """The values dataclasses' __eq__ (or __hash__) would compare (hash), in the fields' order."""
        return tuple(
            getattr(self, item.name)
            for item in dataclasses.fields(self)
            if (item.hash if hashed and item.hash is not None else item.compare)
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__ or not isinstance(other, Event):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values(hashed=True))

    def __repr__(self) -> str:
        shown = (
            f"{item.name}={getattr(self, item.name)!r}" for item in dataclasses.fields(self) if item.repr
        )
        return f"{self.__class__.__qualname__}({', '.join(shown)})"

    def to_json(self) -> dict[str, Any]:
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        plain = {name: str(value) if isinstance(value, Endpoint) else value for name, value in values.items()}
        return {"event": self.name, **plain}


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Started(Event):
    """The session's flow runs: the process has started, imported and entered its event loop."""

    name: ClassVar[str] = "started"


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Listening(Event):
    """The acceptor watches for requests: one sent from now on is served."""

    name: ClassVar[str] = "listening"
    peers: tuple[str, ...]  # the names of the peers it serves


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Reloaded(Event):
    """The acceptor read its --peers again (SIGHUP): the peers it serves from now on. Sessions already
    running go on, whoever they serve. With `error`, the file was not taken: the peers before it are served
    still."""

    name: ClassVar[str] = "reloaded"
    peers: tuple[str, ...]
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Discovered(Event):
    """STUN answered: this side's endpoints and its NAT's mapping; or no UDP gets out (mapping "blocked",
    outer 0.0.0.0:0) and a relay over TCP or TLS will carry the session."""

    name: ClassVar[str] = "discovered"
    inner: Endpoint
    outer: Endpoint
    mapping: str
    outer6: Endpoint | None = None  # the IPv6 endpoint, where this side has one


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Requested(Event):
    """The acceptor has a request (`peer`: the inviter's outer endpoint)."""

    name: ClassVar[str] = "requested"
    peer: Endpoint


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Answered(Event):
    """The inviter has the acceptor's response (`peer`: its outer endpoint)."""

    name: ClassVar[str] = "answered"
    peer: Endpoint


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Chosen(Event):
    """The way through both sides' NATs allow (plexus/path.py's method), before the punch."""

    name: ClassVar[str] = "chosen"
    way: str
    why: str


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Connected(Event):
    """The handshake is done: the path the command is given."""

    name: ClassVar[str] = "connected"
    inner: Endpoint
    outer: Endpoint
    peer: Endpoint
    way: str


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Launched(Event):
    """The command runs on the path (pid), or the streams do (pid None)."""

    name: ClassVar[str] = "launched"
    pid: int | None


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Failed(Event):
    """A session ended in an error (on the acceptor: that session only; it serves the next)."""

    name: ClassVar[str] = "failed"
    error: str


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Sent(Event):
    """A rendezvous message left this side (`kind`: request, response, refusal or rebind): its SMTP DATA
    was accepted, or its DHT put was handed to the node."""

    name: ClassVar[str] = "sent"
    kind: str


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Rejected(Event):
    """What the peer's side sent was judged and refused (`source`: a mail, a DHT value, or a stream's
    request to the acceptor; `reason`: one line)."""

    name: ClassVar[str] = "rejected"
    source: str
    reason: str


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Moved(Event):
    """The peer's authenticated packets come from another port of its host (a peer-reflexive endpoint), or
    from its LAN endpoint (a host candidate, behind the same NAT): the handshake follows them there."""

    name: ClassVar[str] = "moved"
    before: Endpoint
    after: Endpoint


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Migrated(Event):
    """The streams' peer is at another endpoint (its NAT mapped it anew), and this side sends there from now
    on. The acceptor: packets that decrypted under the connection's keys came from `after` and it answered
    there (QUIC path validation). The inviter: the acceptor's rebind named `after`."""

    name: ClassVar[str] = "migrated"
    before: Endpoint
    after: Endpoint


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Remapped(Event):
    """This side's streams packets went unanswered and its STUN server now sees it at `after`, not `before`
    (a new network, a NAT that mapped anew): a rebind naming `after` follows (plexus/resume.py)."""

    name: ClassVar[str] = "remapped"
    before: Endpoint
    after: Endpoint


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Rebound(Event):
    """This side took the peer's rebind (`sequence`, authenticated by the session's key) and punched toward
    `outer`, the peer's new endpoint, from its streams socket."""

    name: ClassVar[str] = "rebound"
    outer: Endpoint
    sequence: int


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Rerouted(Event):
    """A relayed streams session's inviter moved it to a direct path (`way` "direct": `peer` answered
    there), or back to the relay when that path died (`way` "relay"; plexus/streams/direct.py)."""

    name: ClassVar[str] = "rerouted"
    way: str
    peer: Endpoint


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class PathDead(Event):
    """The streams' path looks dead: this side's data or pings have had no answer for a while, and the peer
    has been `silent` seconds. The session goes on: the path may come back (`PathBack`) until the idle
    timeout ends it."""

    name: ClassVar[str] = "path_dead"
    silent: float


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class PathBack(Event):
    """The peer of a path that looked dead is heard again, after `silent` seconds without it."""

    name: ClassVar[str] = "path_back"
    silent: float


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class FellBack(Event):
    """A way through failed within its bound (`way`): the session tries the next (IPv6 tried first, then
    the plan's; a direct way, then a relay)."""

    name: ClassVar[str] = "fell_back"
    way: str


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Forwarding(Event):
    """--forward: connections to `listen` are carried to `target` on the peer from now on."""

    name: ClassVar[str] = "forwarding"
    listen: Endpoint
    target: str


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Stopped(Event):
    """A command this side launched is sent `signal` to end it: a new session replaces it, or plexus stops."""

    name: ClassVar[str] = "stopped"
    pid: int
    signal: str


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Ended(Event):
    """The session is over: its command exited or its streams closed (`error`: why, if it failed)."""

    name: ClassVar[str] = "ended"
    error: str | None = None


Sink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The sink of a session nobody listens to."""


def tee(*sinks: Sink) -> Sink:
    """One sink that hands each event to each of `sinks` in turn (a status file, PLEXUS_EVENTS)."""

    def each(event: Event) -> None:
        for sink in sinks:
            sink(event)

    return each


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


# A 64-bit puzzle is up to 20 digits; ports and message UIDs, which a reason may name, are fewer than 6.
_LONG_NUMBER = re.compile(r"\b\d{6,}\b")


def one_line(reason: object) -> str:
    """A reason fit for an event: one line, at most 200 characters, long numbers (puzzles) masked."""
    return _LONG_NUMBER.sub("…", " ".join(str(reason).split()))[:200]


_current: contextvars.ContextVar[tuple[Sink, Role] | None] = contextvars.ContextVar(
    "plexus_events", default=None
)


@contextlib.contextmanager
def reporting(sink: Sink, role: Role) -> Iterator[None]:
    """Within it (and in the tasks started within it), `emit` reports to `sink` as `role`."""
    token = _current.set((sink, role))
    try:
        yield
    finally:
        _current.reset(token)


def emit(event: type[Event], /, **fields: Any) -> None:
    """Report an event to the session's sink, if a session is reporting (the unit tests of a mediator or the
    puncher run without one)."""
    current = _current.get()
    if current is None:
        return
    sink, role = current
    try:
        sink(event(role=role, **fields))
    except Exception as error:  # a full disk, a caller's bug: it costs the event, never the session
        log.warning("the %s event was not reported: %s", event.name, error)
