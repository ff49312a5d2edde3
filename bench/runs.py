"""Real plexus sessions in the lab (tests/lab/sessions.py): timed connects, the NAT matrix, the footprint."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.timeline import Timeline, TimelineError, at, event, timeline
from plexus.errors import ExitCode
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus, Side

SESSION_TIMEOUT = 120.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IDLE_CPU_SHARE = 0.01  # an idle acceptor uses at most this share of one core (the footprint's, the peers')


@dataclass(frozen=True)
class Ended:
    """How an inviter ended, with what the kernel counted for it (os.wait4: the benchmark is its parent)."""

    code: int
    seconds: float  # from its start until it exited
    max_rss: int  # bytes
    cpu: float  # user + system seconds


@contextlib.contextmanager
def acceptor(lab: Lab, workdir: Path, **overrides: str) -> Iterator[tuple[Plexus, Side, Side]]:
    """A listening acceptor on host b for a fresh pair of ids; stopped on leaving."""
    inviter_side, acceptor_side = sessions.pair(lab)
    process = sessions.start(lab, acceptor_side, inviter_side, workdir, accept=True, overrides=overrides)
    try:
        sessions.wait_until_listening(process)
        yield process, inviter_side, acceptor_side
    finally:
        process.stop()


def invite(
    lab: Lab, workdir: Path, inviter_side: Side, acceptor_side: Side, **overrides: str
) -> tuple[Plexus, float, Ended]:
    """Run one inviter to its end; returns it, its wall-clock start and how it ended."""
    started = time.time()
    inviter = sessions.start(lab, inviter_side, acceptor_side, workdir, accept=False, overrides=overrides)
    return inviter, started, reap(inviter, started)


def reap(plexus: Plexus, started: float, timeout: float = SESSION_TIMEOUT) -> Ended:
    """Wait for the process with wait4 (ip netns exec execs, so its pid is plexus's own) for its rusage."""
    pid = plexus.process.pid
    deadline = time.monotonic() + timeout
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done == pid:
            break
        if time.monotonic() > deadline:
            plexus.stop()
            raise TimeoutError(f"plexus (pid {pid}) still running after {timeout:g} s\n{plexus.log()}")
        time.sleep(0.01)
    ended = time.time()
    code = os.waitstatus_to_exitcode(status)
    plexus.process.returncode = code  # reaped here: Popen must not wait for it again
    return Ended(code, ended - started, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


def connect(
    lab: Lab, workdir: Path, runs: int, on_run: Callable[[int, Timeline], None] = lambda i, t: None
) -> list[Timeline]:
    """`runs` sessions in a row against one acceptor, each one's timeline."""
    timelines = []
    with acceptor(lab, workdir) as (listening, inviter_side, acceptor_side):
        for run in range(1, runs + 1):
            inviter, started, ended = invite(lab, workdir, inviter_side, acceptor_side)
            if ended.code != 0:
                raise RuntimeError(f"inviter exited {ended.code}: {inviter.stderr()}\n{inviter.log()}")
            timelines.append(session_timeline(inviter, listening, started))
            on_run(run, timelines[-1])
    return timelines


def session_timeline(inviter: Plexus, listening: Plexus, started: float) -> Timeline:
    mine = inviter.wait_hello()[0]
    secret = mine["args"]["secret"]
    deadline = time.monotonic() + 30
    theirs: dict[str, Any] | None = None
    while theirs is None:
        theirs = next((r for r in listening.hello_results() if r["args"]["secret"] == secret), None)
        if theirs is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the acceptor's command never reported\n{listening.log()}")
            time.sleep(0.05)
    launched = (mine["started"], theirs["started"])
    return timeline(started, inviter.events(), listening.events(), launched)


@dataclass(frozen=True)
class Cell:
    """One pair of NAT modes, `tries` sessions in a row against one acceptor (both with the lab's TURN)."""

    inviter_mode: str
    acceptor_mode: str
    codes: tuple[int, ...]  # the inviter's exit code per try
    seconds: tuple[float, ...]  # per try: from its start until it launched its command (ok) or exited
    method: str  # the way the inviter chose (its `chosen` event)

    @property
    def successes(self) -> int:
        return self.codes.count(0)

    @property
    def outcome(self) -> str:
        failed = sorted({ExitCode(code).name for code in self.codes if code})
        return "ok" if not failed else "/".join(failed)


def matrix_cell(
    lab: Lab,
    workdir: Path,
    inviter_mode: str,
    acceptor_mode: str,
    timeout: float,
    tries: int,
    *,
    transport: str = "udp",
    inviting: str = "a",
    turn: bool = True,
    options: dict[str, str] | None = None,
) -> Cell:
    """`tries` sessions between those NAT modes, both sides with the lab's TURN server over `transport`
    (unless not `turn`) and `options`; `inviting` is the inviting host (c: on b's LAN, behind b's NAT, where
    a's mode does not matter)."""
    lab.set_nat("a", inviter_mode)
    lab.set_nat("b", acceptor_mode)
    options = (
        {
            "response-timeout": f"{timeout:g}",
            "handshake-timeout": f"{timeout:g}",
        }
        | (sessions.turn(lab, transport=transport) if turn else {})
        | (options or {})
    )
    codes, seconds, method = [], [], "-"
    with acceptor(lab, workdir, **options) as (_, inviter_side, acceptor_side):
        inviter_side = dataclasses.replace(inviter_side, host=inviting)
        for _ in range(tries):
            inviter, started, ended = invite(lab, workdir, inviter_side, acceptor_side, **options)
            codes.append(ended.code)
            events = inviter.events()
            with contextlib.suppress(TimelineError):
                method = event(events, "chosen")["way"]
            if ended.code != 0:
                seconds.append(ended.seconds)
                continue
            inviter.wait_hello()
            # The inviter lingers a moment after the launch to watch its command: the launch is the end here.
            seconds.append(at(inviter.events(), "launched") - started)
    return Cell(inviter_mode, acceptor_mode, tuple(codes), tuple(seconds), method)


@dataclass(frozen=True)
class Sample:
    cpu: float  # user + system seconds so far
    rss: int  # bytes now
    peak_rss: int  # bytes, VmHWM


def sample(pid: int) -> Sample:
    with open(f"/proc/{pid}/stat") as stat:
        # after the command name in parentheses (which may hold spaces): field 14 utime, 15 stime
        fields = stat.read().rsplit(")", 1)[1].split()
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return Sample(
        cpu=(int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
        rss=int(status["VmRSS"].split()[0]) * 1024,
        peak_rss=int(status["VmHWM"].split()[0]) * 1024,
    )


@dataclass(frozen=True)
class Footprint:
    idle_seconds: float
    idle_cpu: float  # seconds of CPU the acceptor used while idle
    idle_rss: int
    idle_peak_rss: int
    session: Ended  # the inviter of one session
    acceptor_session_cpu: float  # what serving that session cost the acceptor
    acceptor_rss_after: int


def footprint(lab: Lab, workdir: Path, idle_seconds: float) -> Footprint:
    with acceptor(lab, workdir) as (listening, inviter_side, acceptor_side):
        pid = listening.process.pid
        time.sleep(1.0)  # past its start-up
        before = sample(pid)
        time.sleep(idle_seconds)
        idle = sample(pid)
        _, _, ended = invite(lab, workdir, inviter_side, acceptor_side)
        if ended.code != 0:
            raise RuntimeError(f"the footprint session failed with exit code {ended.code}")
        listening.wait_hello()
        after = sample(pid)
    return Footprint(
        idle_seconds=idle_seconds,
        idle_cpu=idle.cpu - before.cpu,
        idle_rss=idle.rss,
        idle_peak_rss=idle.peak_rss,
        session=ended,
        acceptor_session_cpu=after.cpu - idle.cpu,
        acceptor_rss_after=after.rss,
    )
