"""What a running acceptor serves, for `plexus --status`: its peers and, for each, its latest session (its
state, the way it took and since when, the peer's endpoint, the command's pid), in a file only the
acceptor's user can read.

The acceptor's sink, `Status`, keeps that from the session events (plexus/events.py) and writes the file anew
at each change: a temporary file beside it (0600, in a 0700 folder), then renamed over it, so a reader never
sees half of one. `show` reads the files back. It trusts them no more than any file: each value is checked
(a file that does not read is said so, nothing else escapes), and only printable text reaches the terminal.

Events name the peer of their session, not the session: per peer the latest event wins, except that the end
of an older session does not hide a newer one still running (`sessions` counts those not ended yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from plexus import events, files, launcher
from plexus.errors import NoAcceptorError

if TYPE_CHECKING:
    from plexus.peers import Roster

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT = 1  # the file's "plexus_status": a reader refuses another
MAX_FILE = 1 << 20  # 1000 peers (peers.MAX_PEERS) at a few hundred bytes each, and room to spare
STATES = ("idle", "connecting", "connected", "running", "failed", "ended")
_MAX_TEXT = 300  # an error is one_line's 200 characters; ids, names and endpoints are shorter
_MAX_PID = 1 << 22  # the kernel's highest pid_max
_LATEST = 1 << 34  # a time past 2514 is no time this file could hold


@dataclass(frozen=True)
class Session:
    """A peer's latest session, as its events told it."""

    state: str = "idle"
    since: float | None = None  # when it connected, was rerouted, failed or ended; else was requested
    way: str | None = None  # plexus/path.py's method, or a streams session's "direct" or "relay"
    endpoint: str | None = None  # where its packets go: the peer's outer endpoint, or where it moved
    launched: bool = False
    pid: int | None = None  # the command's; None once launched: streams
    error: str | None = None
    silent_since: float | None = None  # its path looks dead since then (PathDead), until PathBack
    sessions: int = 0  # not ended yet: several run side by side with streams or --keep-sessions


@dataclass(frozen=True)
class Snapshot:
    """What a status file holds."""

    host_id: str
    pid: int
    started: int  # the acceptor's start in clock ticks after boot: a later process with its pid is not it
    up_since: float
    listening_since: float | None
    written: float
    peers: tuple[tuple[str, bool, Session], ...]  # name, listed in the roster now, latest session


def status_path(host_id: str) -> Path:
    return launcher.state_dir() / f"status-{launcher.safe_name(host_id)}.json"


class Status:
    """An acceptor's sink (events.Sink) that keeps its status file; `close` removes it when the acceptor ends.
    After the roster is read again (SIGHUP), `write` shows its peers as they are now."""

    def __init__(self, host_id: str, roster: Roster) -> None:
        self.host_id = host_id
        self.roster = roster
        self.path = status_path(host_id)
        me = launcher.Running.of(os.getpid())
        assert me is not None, "/proc shows this very process"
        self._started = me.started
        self._up_since = time.time()
        self._listening_since: float | None = None
        self._sessions: dict[str, Session] = {}
        self._failing = False
        self.write()

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.Listening):
            self._listening_since = event.at
        elif event.peer_name is not None:
            before = self._sessions.get(event.peer_name, Session())
            after = _next(before, event)
            if after == before:
                return
            self._sessions[event.peer_name] = after
        elif not isinstance(event, events.Reloaded):  # a reload changed the roster's peers: shown below
            return
        self.write()

    def snapshot(self) -> Snapshot:
        names = self.roster.peers.names
        # A peer the roster no longer lists is shown while a session of its runs on (a reload ends none).
        gone = [name for name, s in self._sessions.items() if name not in names and s.sessions > 0]
        return Snapshot(
            host_id=self.host_id,
            pid=os.getpid(),
            started=self._started,
            up_since=self._up_since,
            listening_since=self._listening_since,
            written=time.time(),
            peers=tuple(
                (name, name in names, self._sessions.get(name, Session())) for name in (*names, *gone)
            ),
        )

    def write(self) -> None:
        """Replace the file with the state now; a failure (a full disk) is one warning until a write works."""
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            files.make_folders(self.path.parent)
            descriptor = os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, files.PRIVATE
            )
            with os.fdopen(descriptor, "w") as file:
                os.fchmod(descriptor, files.PRIVATE)  # a temporary file left by a crash keeps its own mode
                file.write(json.dumps(_to_json(self.snapshot()), separators=(",", ":")))
            temporary.replace(self.path)
        except OSError as error:
            if not self._failing:
                log.warning("cannot write the status file %s: %s", self.path, error.strerror or error)
            self._failing = True
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            return
        self._failing = False

    def close(self) -> None:
        """The acceptor ends: its file goes. One left behind (it could not go, the acceptor was killed) says
        so itself: its pid runs no more."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


def _next(session: Session, event: events.Event) -> Session:
    """The peer's session after `event`."""
    replace = dataclasses.replace
    match event:
        case events.Requested():
            return Session("connecting", event.at, endpoint=str(event.peer), sessions=session.sessions + 1)
        case events.Connected():
            return replace(
                session, state="connected", since=event.at, way=event.way, endpoint=str(event.peer)
            )
        case events.Launched():
            return replace(session, state="running", launched=True, pid=event.pid)  # since it connected
        case events.Failed() | events.Ended():
            left = max(session.sessions - 1, 0)
            if left:  # an older session's end: the newer one is still what the peer has
                return replace(session, sessions=left)
            state = "failed" if isinstance(event, events.Failed) else "ended"
            error = events.one_line(event.error) if event.error is not None else None
            return replace(session, state=state, since=event.at, error=error, silent_since=None, sessions=0)
        case events.Rerouted():
            return replace(session, since=event.at, way=event.way, endpoint=str(event.peer))
        case events.Rebound():
            return replace(session, endpoint=str(event.outer))
        case events.Migrated():
            return replace(session, endpoint=str(event.after))
        case events.PathDead():
            return replace(session, silent_since=event.at - event.silent)
        case events.PathBack():
            return replace(session, silent_since=None)
    return session


def _to_json(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "plexus_status": FORMAT,
        "host_id": snapshot.host_id,
        "pid": snapshot.pid,
        "started": snapshot.started,
        "up_since": snapshot.up_since,
        "listening_since": snapshot.listening_since,
        "written": snapshot.written,
        "peers": [
            {"name": name, "listed": listed, **dataclasses.asdict(session)}
            for name, listed, session in snapshot.peers
        ],
    }


class Unreadable(ValueError):
    """A status file that is not one this plexus wrote (another version's, cut short, or made up)."""


def parse(data: bytes) -> Snapshot:
    """A status file's content; Unreadable for anything else."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as error:  # not UTF-8 or not JSON; nested deeper than Python goes
        raise Unreadable(f"not JSON ({type(error).__name__})") from None
    top = _Object(value, "the file")
    if top.value.get("plexus_status") != FORMAT:
        raise Unreadable(f"not format {FORMAT}")
    listed = top.value.get("peers")
    if not isinstance(listed, list):  # as long as MAX_FILE lets it be
        raise Unreadable("peers is not a list")
    return Snapshot(
        host_id=top.text("host_id"),
        pid=top.pid("pid"),
        started=top.whole("started"),
        up_since=top.time("up_since"),
        listening_since=top.maybe("listening_since", top.time),
        written=top.time("written"),
        peers=tuple(_peer(_Object(item, "a peer")) for item in listed),
    )


def _peer(item: _Object) -> tuple[str, bool, Session]:
    state = item.text("state")
    if state not in STATES:
        raise Unreadable(f"no state {state[:20]!r}")
    session = Session(
        state=state,
        since=item.maybe("since", item.time),
        way=item.maybe("way", item.text),
        endpoint=item.maybe("endpoint", item.text),
        launched=item.flag("launched"),
        pid=item.maybe("pid", item.pid),
        error=item.maybe("error", item.text),
        silent_since=item.maybe("silent_since", item.time),
        sessions=item.whole("sessions"),
    )
    return item.text("name"), item.flag("listed"), session


class _Object:
    """A JSON object whose values are checked as they are taken: Unreadable names the first that is wrong."""

    def __init__(self, value: object, what: str) -> None:
        if not isinstance(value, dict):
            raise Unreadable(f"{what} is not an object")
        self.value: dict[str, object] = value

    def _take(self, key: str, kind: type[T]) -> T:
        value = self.value.get(key)
        # True is an int to Python, not to this file
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise Unreadable(f"{key} is not {kind.__name__}")
        return value

    def maybe(self, key: str, take: Callable[[str], T]) -> T | None:
        return None if self.value.get(key) is None else take(key)

    def flag(self, key: str) -> bool:
        return self._take(key, bool)

    def text(self, key: str) -> str:
        value = self._take(key, str)
        if len(value) > _MAX_TEXT:
            raise Unreadable(f"{key} is too long")
        return value

    def whole(self, key: str) -> int:
        value = self._take(key, int)
        if not 0 <= value < 1 << 63:
            raise Unreadable(f"{key} is out of range")
        return value

    def pid(self, key: str) -> int:
        value = self._take(key, int)
        if not 0 < value <= _MAX_PID:
            raise Unreadable(f"{key} is no pid")
        return value

    def time(self, key: str) -> float:
        value = self.value.get(key)
        # NaN and infinity fail the range too; an int is compared before float() would overflow on it
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < _LATEST:
            raise Unreadable(f"{key} is no time")
        return float(value)


def show(host_id: str | None) -> str:
    """What `plexus --status` prints: the acceptor of `host_id`, or every one this user's status files name;
    NoAcceptorError when there is none."""
    folder = launcher.state_dir()
    found = [status_path(host_id)] if host_id is not None else sorted(folder.glob("status-*.json"))
    shown = []
    for path in found:
        try:
            data = _read(path)
        except (FileNotFoundError, PermissionError):  # gone meanwhile; another user's
            continue
        except OSError as error:
            shown.append(f"{_printable(str(path))}: cannot read: {error.strerror or error}")
            continue
        try:
            shown.append(describe(parse(data), time.time()))
        except Unreadable as error:
            shown.append(_printable(f"{path}: not a status file of this plexus ({error})"))
    if not shown:
        which = "no acceptor" if host_id is None else f"no acceptor with host id {_printable(host_id)!r}"
        who = "root" if os.geteuid() == 0 else "this user (one that runs as root: sudo plexus --status)"
        raise NoAcceptorError(f"{which} runs here as {who}: no status file in {folder}")
    return "\n\n".join(shown)


def _read(path: Path) -> bytes:
    """The file's first MAX_FILE + 1 bytes: not a FIFO's endless wait, a link's target, nor a device's."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(0, "not a regular file")
        data = file.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise OSError(0, f"over {MAX_FILE} bytes")
    return data


def describe(snapshot: Snapshot, now: float) -> str:
    """A header line for the acceptor, then one line a peer."""
    who = f"{_printable(snapshot.host_id)}: acceptor pid {snapshot.pid}"
    if launcher.Running.of(snapshot.pid) != launcher.Running(snapshot.pid, snapshot.started):
        header = f"{who} is not running; its last state, as of {_at(snapshot.written, now)}:"
    else:
        listening = "listening" if snapshot.listening_since is not None else "not listening yet"
        count = f"{len(snapshot.peers)} peer{'' if len(snapshot.peers) == 1 else 's'}"
        header = f"{who}, up since {_since(snapshot.up_since, now)}, {listening}, {count}"
    rows = [_row(name, listed, session, now) for name, listed, session in snapshot.peers]
    widths = [max((len(row[column]) for row in rows), default=0) for column in range(5)]
    lines = [
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True)) + row[5]
        for row in rows
    ]
    return "\n".join([header, *(line.rstrip() for line in lines)])


def _row(name: str, listed: bool, session: Session, now: float) -> list[str]:
    """The cells of a peer's line: name, state, way, since, endpoint, then the command and its notes."""
    notes = []
    if session.launched:
        notes.append("streams" if session.pid is None else f"command pid {session.pid}")
    if session.sessions > 1:
        notes.append(f"{session.sessions} sessions")
    if session.silent_since is not None:
        notes.append(f"no answer since {_since(session.silent_since, now)}")
    if session.error is not None:
        notes.append(f"error: {session.error}")
    if not listed:
        notes.append("no longer in the peers")
    return [
        _printable(name),
        session.state,
        _printable(session.way or "-"),
        "-" if session.since is None else f"since {_since(session.since, now)}",
        _printable(session.endpoint or "-"),
        "".join(f"  {_printable(note)}" for note in notes),
    ]


def _printable(text: str) -> str:
    """What a file may say, fit for a terminal: no control character (an escape sequence) gets through."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _clock(at: float, now: float) -> str:
    when = datetime.datetime.fromtimestamp(at, datetime.UTC)
    today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    return when.strftime("%H:%M:%S UTC" if when.date() == today else "%Y-%m-%d %H:%M UTC")


def _since(at: float, now: float) -> str:
    return f"{_clock(at, now)} (for {_span(now - at)})"


def _at(at: float, now: float) -> str:
    return f"{_clock(at, now)} ({_span(now - at)} ago)"


def _span(seconds: float) -> str:
    """A duration as a person says it: 40 s, 3 min, 2 h 5 min, 3 days."""
    seconds = max(seconds, 0.0)  # a clock set back, or a time from a file
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 90:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes // (24 * 60)} days"
