"""One session's timeline, read from the two plexus debug logs, the inviter's session events
(plexus/events.py: when its flow started) and the launched commands' start times.

Both processes run on one machine, so their wall clocks agree: log timestamps (milliseconds), event times and
exec/hello.py's `started` (time.time()) go on one axis, starting at the moment the inviter was
started.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")

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
    """A log that lacks a line the timeline needs (the session failed or the log format changed)."""


@dataclass(frozen=True)
class Event:
    at: float  # seconds since the epoch
    logger: str
    message: str


def parse_log(text: str) -> list[Event]:
    """The log's lines with their times; continuation lines (tracebacks) are skipped."""
    events = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        stamp, _level, logger, message = match.groups()
        # logging's asctime is local time, as is a naive datetime's timestamp()
        at = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        events.append(Event(at, logger, message))
    return events


def find(events: Sequence[Event], prefix: str, *, after: float = 0.0, contains: str = "") -> Event:
    """The first event at or after `after` whose message starts with `prefix` (and contains `contains`)."""
    for event in events:
        if event.at >= after and event.message.startswith(prefix) and contains in event.message:
            return event
    raise TimelineError(f"no log line {prefix!r}{f' with {contains!r}' if contains else ''}")


_OUTER = re.compile(r"outer endpoint (\S+)$")


@dataclass(frozen=True)
class Timeline:
    total: float  # inviter start until both launched commands run
    phases: dict[str, float]


def inviter_stun(inviter: Sequence[Event]) -> tuple[Event, str]:
    """The inviter's STUN line and its outer endpoint, as the acceptor reads it from the request."""
    stun = find(inviter, "inner endpoint")
    match = _OUTER.search(stun.message)
    if match is None:
        raise TimelineError(f"no outer endpoint in {stun.message!r}")
    return stun, match.group(1)


def flow_started(events: Sequence[dict[str, Any]]) -> float:
    """When the inviter's session started: its `started` event (plexus/events.py)."""
    for event in events:
        if event["event"] == "started":
            return float(event["at"])
    raise TimelineError("no started event")


def timeline(
    started: float,
    inviter_log: str,
    acceptor_log: str,
    launched: tuple[float, float],
    inviter_events: Sequence[dict[str, Any]],
) -> Timeline:
    """Phase durations of one session; `launched` = the two hello.py start times (inviter's, acceptor's)."""
    inviter, acceptor = parse_log(inviter_log), parse_log(acceptor_log)
    loop_runs = flow_started(inviter_events)
    stun, outer = inviter_stun(inviter)
    request_sent = find(inviter, "request sent")
    # The acceptor has served earlier sessions: everything from here on belongs to this one.
    request_in = find(acceptor, "request from", after=request_sent.at - 1, contains=f"endpoint {outer}")
    acceptor_stun = find(acceptor, "inner endpoint", after=request_in.at)
    response_sent = find(acceptor, "response sent", after=acceptor_stun.at)
    punching = find(inviter, "peer endpoint")
    done = max(
        find(inviter, "handshake with", after=punching.at).at,
        find(acceptor, "handshake with", after=response_sent.at, contains=outer).at,
    )
    end = max(launched)
    marks = [started, loop_runs, stun.at, request_sent.at, request_in.at, acceptor_stun.at,
             response_sent.at, punching.at, done, end]  # fmt: skip
    phases = {
        name: later - earlier for (name, _), (earlier, later) in zip(PHASES, pairwise(marks), strict=True)
    }
    return Timeline(total=end - started, phases=phases)
