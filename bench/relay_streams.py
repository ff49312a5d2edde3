"""Relay streams: the streams' bulk transfers (bench/streams.py's) when the path is a TURN relay, with the
relay's leg to the lab's coturn over UDP, TCP and TLS side by side, and the direct path's for reference.

Both NATs are symmetric, so no punch can work; only the inviter (a) is given the TURN server (its leg over
UDP, `turn:HOST?transport=tcp` or `turns:HOST:5349` with the lab's CA), so it allocates and every datagram of
the QUIC connection passes its relay forwarder (plexus/relay.py `forward`) and that leg; b sends to the
relayed endpoint over plain UDP. One acceptor on b (`--forward-allow` to a sink and an HTTP target) serves
every session; each session is a fresh `--forward` inviter on a that moves `mib` MiB each way on one TCP
connection: up into the sink (bench/streams.py `bulk`, timed until the sink's checked answer), then down, a
GET from the HTTP target (timed until the whole body, checked). The transports take turns (UDP, TCP, TLS,
UDP, ...) so a busy moment of the shared machine hits them alike. Then, for reference, as many sessions over
the direct path (both NATs cone, nobody with a TURN server).
"""

from __future__ import annotations

import functools
import hashlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import streams
from plexus.events import one_line
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.services import TcpTarget, http_get, pattern
from tests.lab.sessions import Plexus, Side

TRANSPORTS = ("udp", "tcp", "tls")
DIRECT = "direct"
# Both ways over one session: up (a -> b), a's relay leg carries the data toward the server; down (b -> a),
# from it
DIRECTIONS = ("up", "down")
LOCAL_SINK, LOCAL_HTTP = 17019, 17080  # --forward's listening ports on a
DROPS = {"a": "a", "b": "b", "server": "pub"}  # where receive-buffer drops are counted: name, namespace
CPUS = ("inviter", "acceptor", "server")  # whose CPU time each transfer reads
MB = 1e6  # figures in MB/s, as the relay's own bulk tests quote them (tests/labtests/test_relay.py)


@dataclass(frozen=True)
class Moved:
    """One direction's transfer in a session; the CPU seconds over it of the plexus inviter (a, the relay's
    end), the plexus acceptor (b) and coturn (the server, any session's); and the datagrams each namespace's
    kernel dropped meanwhile because a receiving socket's buffer was full (on a and b: plexus's sockets; on
    the server: coturn's)."""

    bulk: streams.Bulk
    cpu: dict[str, float]  # by CPUS' names
    drops: dict[str, int]

    @property
    def mb_s(self) -> float:
        return self.bulk.sent / self.bulk.seconds / MB

    def to_json(self) -> dict[str, Any]:
        return self.bulk.to_json() | {"mb_s": round(self.mb_s, 2), "cpu_seconds": {
            name: round(seconds, 3) for name, seconds in self.cpu.items()},
            "receive_buffer_drops": self.drops}  # fmt: skip


@dataclass(frozen=True)
class Session:
    """One --forward session: the way its inviter connected, each direction's transfer, or why it failed."""

    way: str
    moved: dict[str, Moved]
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"way": self.way, "error": self.error} | {d: m.to_json() for d, m in self.moved.items()}


@dataclass(frozen=True)
class Targets:
    """b's sink and HTTP targets, and what a's transfers must get back from them."""

    sink: int
    http: int
    block: bytes  # what the upload sends, `mib` times
    mib: int
    expected: dict[str, str]  # per direction, `<length> <sha256>` of what must arrive

    @classmethod
    def make(cls, sink: int, http: int, mib: int) -> Targets:
        block, up = streams.block_and_expected(mib)
        body = pattern(mib * streams.MIB)
        return cls(
            sink, http, block, mib, {"up": up, "down": f"{len(body)} {hashlib.sha256(body).hexdigest()}"}
        )

    @property
    def forwards(self) -> list[str]:
        return [f"{LOCAL_SINK}:127.0.0.1:{self.sink}", f"{LOCAL_HTTP}:127.0.0.1:{self.http}"]

    def run(self, direction: str) -> streams.Bulk:
        """One direction's transfer, in a's namespace through the --forward listeners."""
        if direction == "up":
            return streams.bulk("127.0.0.1", LOCAL_SINK, self.block, self.mib, self.expected["up"])
        size = self.mib * streams.MIB
        started = time.monotonic()
        body = http_get("127.0.0.1", LOCAL_HTTP, size, timeout=streams.TIMEOUT)
        seconds = time.monotonic() - started
        return streams.Bulk(
            size, seconds, f"{len(body)} {hashlib.sha256(body).hexdigest()}", self.expected["down"]
        )


def session(
    lab: Lab,
    workdir: Path,
    ids: streams.Ids,
    sides: tuple[Side, Side, Plexus],
    targets: Targets,
    turn: dict[str, str],
) -> Session:
    """A --forward inviter on a with these TURN options (none: no relay), a transfer each way through it."""
    me, peer, acceptor = sides
    way, moved = "-", {}
    try:
        with streams.forwarding(lab, workdir, ids, me, peer, targets.forwards, turn) as invite:
            way = invite.events("connected")[-1]["way"]
            pids = {"inviter": [streams.plexus_pid(invite)], "acceptor": [streams.plexus_pid(acceptor)],
                    "server": sessions.pids_of(lab, "pub", "turnserver")}  # fmt: skip
            for direction in DIRECTIONS:
                dropped = {name: streams.rcvbuf_errors(lab, host) for name, host in DROPS.items()}
                cpu = {name: streams.cpu(found) for name, found in pids.items()}
                bulk = lab.run_sync("a", functools.partial(targets.run, direction))
                cpu = {name: streams.cpu(found) - cpu[name] for name, found in pids.items()}
                dropped = {
                    name: streams.rcvbuf_errors(lab, host) - dropped[name] for name, host in DROPS.items()
                }
                moved[direction] = Moved(bulk, cpu, dropped)
    except (RuntimeError, OSError) as error:  # a session or a connection that failed: reported, then the next
        return Session(way, moved, one_line(error))
    return Session(way, moved)


def measure(
    lab: Lab,
    workdir: Path,
    mib: int,
    runs: int,
    progress: Callable[[str], None] = streams.progress_none,
) -> dict[str, Any]:
    """Everything the section reports, as the results' `relay_streams` entry."""
    workdir.mkdir(parents=True, exist_ok=True)
    ids = streams.Ids.make(workdir / "ids")
    found: dict[str, list[Session]] = {name: [] for name in TITLES}

    def one(name: str, sides: tuple[Side, Side, Plexus], turn: dict[str, str]) -> None:
        done = session(lab, workdir, ids, sides, targets, turn)
        found[name].append(done)
        figures = ", ".join(
            f"{direction} {moved.mb_s:.1f} MB/s"
            + ("" if moved.bulk.ok else f" (WRONG: {moved.bulk.reply!r})")
            for direction, moved in done.moved.items()
        )
        progress(f"  {name}: {done.way}, {figures}" + (f"; FAILED: {done.error}" if done.error else ""))

    with TcpTarget(lab, "b", "sink") as sink, TcpTarget(lab, "b", "http") as http:
        targets = Targets.make(sink.port, http.port, mib)
        allowed = (f"127.0.0.1:{sink.port}", f"127.0.0.1:{http.port}")
        progress(
            f"relay streams: {mib} MiB each way through a TURN relay over UDP, TCP and TLS, {runs} runs each"
        )
        for host in ("a", "b"):
            lab.set_nat(host, "symmetric")
        try:
            with streams.streams_acceptor(lab, workdir, ids, *allowed) as (acceptor, me, peer):
                for _ in range(runs):
                    for transport in TRANSPORTS:
                        one(transport, (me, peer, acceptor), sessions.turn(lab, transport=transport))
        finally:
            for host in ("a", "b"):
                lab.set_nat(host, "cone")
        progress(f"relay streams: {mib} MiB each way over the direct path (cone NATs), {runs} runs")
        with streams.streams_acceptor(lab, workdir, ids, *allowed) as (acceptor, me, peer):
            for _ in range(runs):
                one(DIRECT, (me, peer, acceptor), {})
    return summary(mib, runs, found)


def summary(mib: int, runs: int, found: dict[str, list[Session]]) -> dict[str, Any]:
    """Per path its sessions, and per direction the MB/s of the transfers that arrived whole (median, min,
    max); per direction each path's median against the relay over UDP's."""
    paths: dict[str, dict[str, Any]] = {}
    medians: dict[str, dict[str, float | None]] = {direction: {} for direction in DIRECTIONS}
    for name, done in found.items():
        paths[name] = {"sessions": [one.to_json() for one in done]}
        for direction in DIRECTIONS:
            rates = [one.moved[direction].mb_s for one in done
                     if direction in one.moved and one.moved[direction].bulk.ok]  # fmt: skip
            medians[direction][name] = statistics.median(rates) if rates else None
            paths[name][direction] = {
                "median_mb_s": round(statistics.median(rates), 2) if rates else None,
                "min_mb_s": round(min(rates), 2) if rates else None,
                "max_mb_s": round(max(rates), 2) if rates else None,
            }
    over_udp = {
        direction: {name: round(rate / rates["udp"], 2) if rates["udp"] and rate else None
                    for name, rate in rates.items() if name != "udp"}
        for direction, rates in medians.items()
    }  # fmt: skip
    return {"mib": mib, "runs": runs, "paths": paths, "over_udp": over_udp}


TITLES = {"udp": "relay, TURN over UDP", "tcp": "relay, TURN over TCP", "tls": "relay, TURN over TLS",
          DIRECT: "direct (cone NATs)"}  # fmt: skip
EXPECTED_WAY = {"udp": "relay", "tcp": "relay", "tls": "relay", DIRECT: "direct"}


def render(found: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"== Streams through a TURN relay: plexus --forward between a and b, one TCP connection of "
        f"{found['mib']} MiB each way per session (up: a into a sink on b; down: a GETs from an HTTP "
        f"target on b), {found['runs']} sessions per path, the transports taking turns; both NATs symmetric "
        "and only a with the TURN server (a allocates: its leg carries up toward the server, down from it), "
        "then the direct path (cone NATs) for reference",
        "MB/s (median, min, max of the sessions), the median against the relay over UDP's the same way, CPU "
        "seconds per MiB (median) of the plexus process on a (the inviter, with the relay forwarder), on b, "
        "and of coturn; "
        "datagrams the kernel dropped over all the sessions' transfers because a receiving socket's buffer "
        "was full, on a / b / the TURN server; sessions whose bytes arrived whole by the expected way",
        f"{'path':<22}{'way':<6}"
        + "".join(f"{h:>9}" for h in ("median", "min", "max", "vs UDP", "CPU a", "CPU b", "CPU srv"))
        + f"{'drops':>16}{'ok':>6}",
    ]
    for name, title in TITLES.items():
        entry = found["paths"][name]
        for direction in DIRECTIONS:
            moved = [one[direction] for one in entry["sessions"] if direction in one]
            per_mib = [
                f"{statistics.median(m['cpu_seconds'][side] for m in moved) / found['mib']:.4f}"
                if moved
                else "-"
                for side in CPUS
            ]
            ratio = found["over_udp"][direction].get(name)
            figures = [entry[direction][key] for key in ("median_mb_s", "min_mb_s", "max_mb_s")]
            drops = "/".join(str(sum(m["receive_buffer_drops"][where] for m in moved)) for where in DROPS)
            good = sum(_good(name, one, direction) for one in entry["sessions"])
            lines.append(f"{title:<22}{direction:<6}" + "".join(f"{v:>9}" for v in [
                *(f"{f:.1f}" if f is not None else "-" for f in figures),
                f"{ratio:.2f}x" if ratio is not None else "-", *per_mib,
            ]) + f"{drops:>16}{good:>4}/{len(entry['sessions'])}")  # fmt: skip
    return lines


def _good(name: str, session: dict[str, Any], direction: str) -> bool:
    return session["way"] == EXPECTED_WAY[name] and bool(session.get(direction, {}).get("ok"))


def check(found: dict[str, Any]) -> list[str]:
    """Only what must hold whatever the machine: every session connected by the expected way and every
    transfer arrived whole. The speeds are reported."""
    failures = []
    for name, entry in found["paths"].items():
        for number, session in enumerate(entry["sessions"], 1):
            problems = [] if session["way"] in (EXPECTED_WAY[name], "-") else [
                f"connected by {session['way']}, expected {EXPECTED_WAY[name]}"]  # fmt: skip
            problems += [
                f"{direction}: {moved['reply']!r} arrived, expected {moved['expected']!r}"
                for direction, moved in session.items()
                if direction in DIRECTIONS and not moved["ok"]
            ]
            problems += [session["error"]] if session["error"] else []
            if problems:
                failures.append(f"relay streams, {TITLES[name]}, session {number}: {'; '.join(problems)}")
    return failures
