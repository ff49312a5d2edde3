"""Many peers (issue 20): an acceptor serving 20 peers beside one serving 1, side by side on host b, both met
on the DHT (a private network in the lab's public namespace) by peers known by identity, each acceptor's from
one --peers file. What they cost and how fast they answer:

- idle, once both listen (and `SETTLE` seconds more): over `IDLE` seconds, each one's CPU time (utime +
  stime, /proc/PID/stat) and its VmRSS at the end;
- 19 of the 20 peers then connect, `BATCH` inviters at a time from host a, each session holding its command
  (tests/lab/hold.py, which sleeps until stopped) on b; the 20-peer acceptor idle again over `IDLE` seconds
  with those 19 sessions running;
- time to connect, `tries` times each, in turn: the 20th peer to the 20-peer acceptor (its 19 others still
  holding their sessions), and the one peer to the other acceptor: from the inviter's start until both
  commands run (the inviter's `launched` event and the acceptor's for that peer), and the acceptor's answer
  within it: from the request's arrival (`requested`) until its response leaves (`sent`: the roster's
  look-up, STUN, the plan, the put).

The inviters exit once their sessions run (their command is /bin/true), as a phone's or laptop's plexus
does: their DHT nodes go, and every search in a network this small waits for the gone ones (docs/
performance.md, DHT rendezvous), which lengthens both acceptors' sessions alike.

Targets: each acceptor idle after listening at most `runs.IDLE_CPU_SHARE` of a core, and the 20-peer one's
RSS within `RSS_OVER_ONE` of the one-peer one's. The connect times and the held sessions' figures are
reported beside them, not bound.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import runs
from bench.timeline import TimelineError, at
from plexus.identity import Identity
from tests.lab import sessions
from tests.lab.dht import DhtNetwork
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus, Side

MIB = 1024 * 1024
MANY = 20
IDLE = 10.0  # seconds of each idle measurement
SETTLE = 2.0  # seconds after listening before the idle measurement starts
BATCH = 3  # inviters started at once (the machine has 2 cores, shared with both acceptors)
RSS_OVER_ONE = 10 * MIB  # the 20-peer acceptor's RSS may exceed the one-peer acceptor's by this much
DHT_PORTS = {MANY: 4230, 1: 4231}  # the acceptors' DHT nodes on b; the inviters' on a from INVITER_PORTS
INVITER_PORTS = 4240


class Household:
    """The acceptors' identities and their peers': the one peer of the small acceptor, `MANY` of the big."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.acceptor = {count: directory / f"home-{count}.key" for count in (MANY, 1)}
        self.peers = {
            count: [directory / f"peer-{count}-{n:02}.key" for n in range(count)] for count in (MANY, 1)
        }
        keys = [*self.acceptor.values(), *(key for peers in self.peers.values() for key in peers)]
        self.ids = {key: Identity.load(key).id for key in keys}

    def peers_file(self, count: int) -> Path:
        path = self.directory / f"peers-{count}"
        path.write_text("".join(f"{self.ids[key]} {key.stem}\n" for key in self.peers[count]))
        return path


def _mailless() -> dict[str, str | None]:
    gone = ("host-id", "peer-id", "email-smtps", "email-imaps", "email-login", "email-passwd", "email-from")
    return dict.fromkeys((*gone, "email-to", "email-ca"))


def _side(lab: Lab, host: str, name: str) -> Side:
    return Side(host, lab.accounts["local" if host == "a" else "remote"], name)


@contextlib.contextmanager
def acceptors(
    lab: Lab, workdir: Path, network: DhtNetwork, household: Household
) -> Iterator[dict[int, Plexus]]:
    """Both acceptors on b, listening; stopped on leaving (and with them the commands they launched)."""
    started: dict[int, Plexus] = {}
    try:
        for count in (MANY, 1):
            side = _side(lab, "b", f"home-{count}")
            overrides = _mailless() | {
                "dht-bootstrap": ",".join(network.bootstrap),
                "dht-port": str(DHT_PORTS[count]),
                "identity": str(household.acceptor[count]),
                "peers": str(household.peers_file(count)),
                "exec-command": str(sessions.HOLD),
                "log-level": "info",
            }
            started[count] = sessions.start(lab, side, side, workdir, accept=True, overrides=overrides)
        for acceptor in started.values():
            sessions.wait_until_listening(acceptor, timeout=30)
        yield started
    finally:
        for acceptor in started.values():
            acceptor.stop()


def inviter(
    lab: Lab, workdir: Path, network: DhtNetwork, household: Household, count: int, number: int
) -> tuple[Plexus, float]:
    """Peer `number` of the `count`-peer acceptor, inviting it from host a (its command exits at once: the
    acceptor's holds the session); returns it and its wall-clock start."""
    key = household.peers[count][number]
    side = _side(lab, "a", key.stem)
    overrides = _mailless() | {
        "dht-bootstrap": ",".join(network.bootstrap),
        "dht-port": str(INVITER_PORTS + number + (MANY if count == 1 else 0)),  # a few run at once
        "identity": str(key),
        "peer-identity": household.ids[household.acceptor[count]],
        "exec-command": "/bin/true",
        "log-level": "info",
    }
    started = time.time()
    return sessions.start(lab, side, side, workdir, accept=False, overrides=overrides), started


def idle(acceptors: dict[int, Plexus], seconds: float) -> dict[int, dict[str, float]]:
    """Each acceptor's CPU seconds over `seconds` and its RSS at the end."""
    before = {count: runs.sample(acceptor.process.pid) for count, acceptor in acceptors.items()}
    time.sleep(seconds)
    after = {count: runs.sample(acceptor.process.pid) for count, acceptor in acceptors.items()}
    return {
        count: {
            "cpu_seconds": round(after[count].cpu - before[count].cpu, 3),
            "cpu_share": round((after[count].cpu - before[count].cpu) / seconds, 5),
            "rss_bytes": after[count].rss,
        }
        for count in acceptors
    }


def hold_sessions(
    lab: Lab,
    workdir: Path,
    network: DhtNetwork,
    household: Household,
    acceptor: Plexus,
    progress: Callable[[str], None],
) -> list[str]:
    """Peers 0 .. MANY-2 connect to the big acceptor, `BATCH` inviters at a time, each session holding its
    command (hold.py) there; what went wrong."""
    failures = []
    for first in range(0, MANY - 1, BATCH):
        batch = range(first, min(first + BATCH, MANY - 1))
        started = [inviter(lab, workdir, network, household, MANY, number)[0] for number in batch]
        for number, invite in zip(batch, started, strict=True):
            ended = runs.reap(invite, time.time())
            name = household.peers[MANY][number].stem
            if ended.code != 0:
                failures.append(f"{name}: inviter exited {ended.code}: {_last_line(invite)}")
                continue
            try:
                acceptor.wait_events("launched", peer_name=name, timeout=15)
            except AssertionError:
                failures.append(f"{name}: the acceptor launched no command for it")
        progress(f"  {batch[-1] + 1} of {MANY - 1} sessions held")
    return failures


def _last_line(invite: Plexus) -> str:
    return (invite.stderr().strip().splitlines() or ["(no message)"])[-1]


@dataclass(frozen=True)
class Connect:
    """One session's times, seconds: from the inviter's start until both commands run, and the acceptor's
    answer (from the request's arrival until its response left)."""

    total: float
    answer: float


def connect_time(
    lab: Lab, workdir: Path, network: DhtNetwork, household: Household, acceptor: Plexus, count: int
) -> Connect | str:
    """The last peer of the `count`-peer acceptor connects once: its times, or why it did not."""
    number = count - 1
    invite, started = inviter(lab, workdir, network, household, count, number)
    ended = runs.reap(invite, started)
    if ended.code != 0:
        return f"{count} peer(s): inviter exited {ended.code}: {_last_line(invite)}"
    name = household.peers[count][number].stem
    try:
        launched = acceptor.wait_events("launched", peer_name=name, timeout=15)[-1]["at"]
        requested = at(acceptor.events(), "requested", after=started, peer_name=name)
        answered = at(acceptor.events(), "sent", after=requested, peer_name=name, kind="response")
        mine = at(invite.events(), "launched")
    except (AssertionError, TimelineError) as missing:
        return f"{count} peer(s): {str(missing).splitlines()[0]}"
    if launched < started:
        return f"{count} peer(s): the acceptor launched nothing for this session"
    return Connect(max(mine, launched) - started, answered - requested)


def measure(lab: Lab, workdir: Path, tries: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Everything the section reports, as the results' `peers` entry."""
    workdir.mkdir(parents=True, exist_ok=True)
    household = Household(workdir / "ids")
    found: dict[int, list[Connect]] = {MANY: [], 1: []}
    with DhtNetwork(lab) as network, acceptors(lab, workdir, network, household) as listening:
        progress(f"peers: an acceptor of {MANY} peers and one of 1 listen; idle {IDLE:g} s")
        time.sleep(SETTLE)
        quiet = idle(listening, IDLE)
        progress(f"peers: {MANY - 1} sessions with the {MANY}-peer acceptor, {BATCH} inviters at a time")
        failures = hold_sessions(lab, workdir, network, household, listening[MANY], progress)
        holding = idle({MANY: listening[MANY]}, IDLE)[MANY]
        for attempt in range(tries):
            for count in (MANY, 1):
                done = connect_time(lab, workdir, network, household, listening[count], count)
                if isinstance(done, str):
                    failures.append(done)
                    progress(f"  try {attempt + 1}, {count} peer(s): {done}")
                    continue
                found[count].append(done)
                progress(
                    f"  try {attempt + 1}, {count} peer(s): {done.total:.2f} s, the acceptor's answer"
                    f" {done.answer:.3f} s"
                )
        for count, acceptor in listening.items():
            if acceptor.process.poll() is not None:
                failures.append(f"the {count}-peer acceptor exited {acceptor.process.returncode}")
    return {
        "peers": MANY,
        "idle_seconds": IDLE,
        "clock_tick_seconds": 1 / runs.CLOCK_TICKS,
        "idle": {str(count): figures for count, figures in quiet.items()},
        "holding": holding | {"sessions": MANY - 1},
        "connect": {
            str(count): {
                "total": _spread([one.total for one in done]),
                "answer": _spread([one.answer for one in done]),
            }
            for count, done in found.items()
        },
        "failures": failures,
    }


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "seconds": []}
    return {
        "n": len(values),
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "seconds": [round(value, 3) for value in values],
    }


def render(results: dict[str, Any]) -> list[str]:
    many, one = results["idle"][str(MANY)], results["idle"]["1"]
    holding = results["holding"]

    def idle_line(title: str, found: dict[str, Any]) -> str:
        return (
            f"  {title:<44} CPU {found['cpu_seconds']:.2f} s = {100 * found['cpu_share']:.3f} % of one core,"
            f" RSS {found['rss_bytes'] / MIB:.1f} MiB"
        )

    def spread(found: dict[str, Any], digits: int) -> str:
        if not found["n"]:
            return "-"
        return (
            f"median {found['median']:.{digits}f} s (min {found['min']:.{digits}f}, max"
            f" {found['max']:.{digits}f}; n {found['n']})"
        )

    def connect_lines(title: str, found: dict[str, Any]) -> list[str]:
        return [
            f"    {title:<42} {spread(found['total'], 2)}",
            f"    {'  the acceptor, request to response':<42} {spread(found['answer'], 3)}",
        ]

    lines = [
        "",
        f"== Many peers: an acceptor serving {MANY} peers beside one serving 1, both on the DHT, side by"
        f" side; idle over {results['idle_seconds']:g} s (CPU counted in {results['clock_tick_seconds']:g} s"
        " ticks)",
        idle_line(f"{MANY} peers, listening", many),
        idle_line("1 peer, listening", one),
        idle_line(f"{MANY} peers, {holding['sessions']} sessions held", holding),
        f"  RSS of {MANY} peers over 1: {(many['rss_bytes'] - one['rss_bytes']) / MIB:+.1f} MiB"
        f" (target: within +{RSS_OVER_ONE / MIB:g} MiB)",
        "  time to connect, from the inviter's start until both commands run:",
        *connect_lines(f"to the {MANY}-peer acceptor, {MANY - 1} others held", results["connect"][str(MANY)]),
        *connect_lines("to the 1-peer acceptor", results["connect"]["1"]),
    ]
    lines += [f"  FAILED: {failure}" for failure in results["failures"]]
    return lines


def check(results: dict[str, Any]) -> list[str]:
    """Each acceptor idle within the footprint's CPU target, the 20-peer one's RSS within +10 MiB of the
    one's, every session connected."""
    failures = [f"peers: {failure}" for failure in results["failures"]]
    for count, found in results["idle"].items():
        if found["cpu_share"] > runs.IDLE_CPU_SHARE:
            failures.append(
                f"peers: the idle {count}-peer acceptor used {100 * found['cpu_share']:.2f} % of a core,"
                f" over {100 * runs.IDLE_CPU_SHARE:g} %"
            )
    over = results["idle"][str(MANY)]["rss_bytes"] - results["idle"]["1"]["rss_bytes"]
    if over > RSS_OVER_ONE:
        failures.append(
            f"peers: the {MANY}-peer acceptor's RSS is {over / MIB:.1f} MiB over the 1-peer one's"
            f" (target: within +{RSS_OVER_ONE / MIB:g} MiB)"
        )
    return failures
