"""One session's timeline, read from the two sides' session events (plexus/events.py, the JSON lines each
plexus writes to PLEXUS_EVENTS) and the launched commands' start times.

Both processes run on one machine, so their wall clocks agree: event times and exec/hello.py's `started`
(time.time()) go on one axis, starting at the moment the inviter was started.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

Events = Sequence[dict[str, Any]]  # as plexus.events.read gives them, oldest first

# The phases in order; each ends where the next begins, so they add up to the time to connect.
PHASES = (
    ("start", "inviter: process start, Python and imports, until its session starts (its `started` event)"),
    ("stun", "inviter: STUN binding + mapping test"),
    ("mail_out", "inviter: the request by SMTP (its session and the IMAP login opened during STUN)"),
    ("mail_in", "request: mail server delivery, acceptor's IDLE wakes, fetch, consume"),
    ("stun_acceptor", "acceptor: STUN binding + mapping test"),
    ("mail_out_response", "acceptor: the response by SMTP (its session opened during STUN)"),
    ("mail_in_response", "response: delivery, inviter's IDLE wakes, fetch, consume"),
    ("handshake", "hello/ready between the peers, until both sides are done"),
    ("launch", "until both launched commands run (exec/hello.py started)"),
)


class TimelineError(ValueError):
    """The events lack one the timeline needs (the session failed, or it went another way)."""


def event(events: Events, name: str, *, after: float = 0.0, **fields: Any) -> dict[str, Any]:
    """The first event called `name` at or after `after` whose fields have the given values."""
    for one in events:
        if one["event"] == name and one["at"] >= after and all(one.get(k) == v for k, v in fields.items()):
            return one
    wanted = "".join(f" {key}={value}" for key, value in fields.items())
    raise TimelineError(f"no {name} event{wanted}")


def at(events: Events, name: str, *, after: float = 0.0, **fields: Any) -> float:
    """When that event happened."""
    return float(event(events, name, after=after, **fields)["at"])


@dataclass(frozen=True)
class Timeline:
    total: float  # inviter start until both launched commands run
    phases: dict[str, float]


@dataclass(frozen=True)
class Marks:
    """The moments both rendezvous have in common, from both sides' events."""

    flow: float  # the inviter's session started
    stun: float  # the inviter's STUN answered
    request_out: float  # the request sent (mail) or put (DHT)
    request_in: float  # the acceptor has it
    acceptor_stun: float  # the acceptor's STUN answered
    response_out: float  # the acceptor's response sent or put
    response_in: float  # the inviter has it: the punch begins
    done: float  # both handshakes are done

    @classmethod
    def of(cls, inviter: Events, acceptor: Events) -> Marks:
        stun = event(inviter, "discovered")
        outer = stun["outer"]  # as the acceptor reads it from the request
        request_out = at(inviter, "sent", after=stun["at"], kind="request")
        # The acceptor has served earlier sessions: everything from here on belongs to this one.
        request_in = at(acceptor, "requested", after=request_out - 1, peer=outer)
        acceptor_stun = at(acceptor, "discovered", after=request_in)
        response_out = at(acceptor, "sent", after=acceptor_stun, kind="response")
        response_in = at(inviter, "answered", after=request_out)
        done = max(at(inviter, "connected", after=response_in), at(acceptor, "connected", after=response_out))
        flow = at(inviter, "started")
        return cls(flow, stun["at"], request_out, request_in, acceptor_stun, response_out, response_in, done)


def phases(names: Sequence[tuple[str, str]], marks: Sequence[float]) -> Timeline:
    """The named durations between consecutive marks (the first mark the start, the last the end)."""
    durations = {
        name: later - earlier for (name, _), (earlier, later) in zip(names, pairwise(marks), strict=True)
    }
    return Timeline(total=marks[-1] - marks[0], phases=durations)


def timeline(started: float, inviter: Events, acceptor: Events, launched: tuple[float, float]) -> Timeline:
    """Phase durations of one mail session (PHASES); `launched` = the two hello.py start times (inviter's,
    acceptor's)."""
    m = Marks.of(inviter, acceptor)
    marks = [started, m.flow, m.stun, m.request_out, m.request_in, m.acceptor_stun, m.response_out,
             m.response_in, m.done, max(launched)]  # fmt: skip
    return phases(PHASES, marks)
