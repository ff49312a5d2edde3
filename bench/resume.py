"""Resume: a streams session across either side's moves behind NATs that filter per endpoint (issue 19).

Both NATs are cone (port-restricted: each drops what comes from an endpoint its host has not sent to), so when
one side's NAT maps it anew, the peer's NAT drops its packets from the new endpoint until the peer punches
toward it, which it does on the rebind the side that moved sends over the rendezvous
(plexus/streams/resume.py). One acceptor on b (`--forward-allow` to an echo and a sink target) and one
`--forward` inviter on a, per rendezvous: by mail (the lab's SMTP and Dovecot) and on the DHT (a private
network in the lab's public namespace, as bench/dht.py's).

Through each session, one TCP connection carries a steady stream to the echo target and back: a RECORD-byte
record every INTERVAL (its sequence number and the time it was written), so bytes flow both ways all the
time, as an interactive ssh's do. Then `moves` changes of the outer endpoint of each side in `movers` (a,
the inviter, by default; with b, the acceptor, too: in turn, in the same session), each side's alternating
Lab.remap (new ports: a NAT that forgot its mappings) and Lab.renumber (a new outer address, as a new lease
gives; then back to the old one, and so on). Each change comes between two bulk transfers of `mib` MiB into
the sink on another connection of the same session (bench/streams.py `bulk`, checked by the sink's answer):
the first ends QUIET before the change, so the change meets a line that carries the steady stream only, the
second starts once the stream resumed; the next transfer comes SETTLE after it. Each move's pair, side by
side, is the throughput before and after it, a moment apart on this shared machine. For each change:

- resumed: from the change (the lab's NAT rules replaced and its conntrack table flushed) until the first
  record written after it came back from the echo;
- silence: the longest time between two arrivals of the echoed stream from a second before the change until
  then;
- remapped, rebound, migrated: until the sides' events (plexus/events.py): the STUN server of the side that
  moved saw its new endpoint; the peer took its rebind and punched; the peer sends to the new endpoint (the
  acceptor once its QUIC validated it, the inviter on the rebind).

At the end the writer half-closes and everything echoed must equal everything written, then the echo's BYE:
nothing lost, repeated or reordered.

The targets (TARGETS), checked for each side's moves: a stream resumes within 2 s of a change on the DHT and
within 3 s by mail (median), every change resumed, and nothing lost.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import dht, streams
from bench.stats import summarize
from plexus.events import one_line
from tests.lab.dht import DhtNetwork
from tests.lab.lab import Lab
from tests.lab.services import BYE, CHUNK, Duplex, TcpTarget
from tests.lab.sessions import Plexus

WAYS = {"mail": "mail", "dht": "DHT"}
TARGETS = {"mail": 3.0, "dht": 2.0}  # median seconds from a change until the stream flows again
CHANGES = ("remap", "renumber")
MOVERS = ("a", "b")  # the hosts whose NAT may move: the inviter's, the acceptor's
# Each side's punching socket, on a port outside Lab's REMAP_RANGES: the NAT keeps a source port that is in
# its range, so an ephemeral port there would bring a side back to the very endpoint it had before a remap,
# which its peer's NAT still lets in (no move to tell)
INNER_PORTS = {"a": 45017, "b": 45018}
LOCAL_ECHO, LOCAL_SINK = 17027, 17029  # --forward's listening ports on a
RECORD = struct.Struct("!Qd16x")  # sequence number, time.time() when written; 32 bytes
INTERVAL = 0.01  # seconds between two records: 3.2 kB/s each way
SETTLE = 1.0  # seconds from the transfer after a change until the one before the next
WAIT = 30.0  # seconds a change may take to resume (or an event to come) before it counts as failed
QUIET = 1.0  # seconds between a bulk transfer's end and the change: the line carries the steady stream only
MIB = streams.MIB


class Ticker(Duplex):
    """The steady stream: one thread writes a record every INTERVAL into the echo through a's --forward
    listener, another reads the echo and notes when each record came back."""

    def __init__(self, lab: Lab, port: int) -> None:
        self.written = bytearray()
        self.received = bytearray()
        self.arrivals: list[tuple[float, float]] = []  # per record echoed: (written at, arrived at)
        self._stop = threading.Event()
        self._arrived = threading.Condition()
        super().__init__(lab, "a", port, timeout=WAIT + 30)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.start()

    def _failed(self) -> None:  # finish() reports it; resumed() stops waiting
        with self._arrived:
            self._arrived.notify_all()

    def _write(self) -> None:
        began, sequence = time.monotonic(), 0
        while not self._stop.wait(max(began + sequence * INTERVAL - time.monotonic(), 0)):
            record = RECORD.pack(sequence, time.time())
            self.written += record  # before it can come back
            self._sock.sendall(record)
            sequence += 1
        self._sock.shutdown(socket.SHUT_WR)

    def _read(self) -> None:
        while chunk := self._sock.recv(CHUNK):
            now = time.time()
            self.received += chunk
            with self._arrived:  # the echo's BYE, shorter than a record, completes none
                for index in range(len(self.arrivals), len(self.received) // RECORD.size):
                    (_, written_at) = RECORD.unpack_from(self.received, index * RECORD.size)
                    self.arrivals.append((written_at, now))
                self._arrived.notify_all()

    def resumed(self, since: float, timeout: float) -> float | None:
        """When the first record written at or after `since` came back (time.time()); None if none did
        within the timeout."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                # the echo keeps the order: the records arrived sorted by when they were written
                first = bisect.bisect_left(self.arrivals, since, key=lambda arrival: arrival[0])
                if first < len(self.arrivals):
                    return self.arrivals[first][1]
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None:
                    return None
                self._arrived.wait(left)

    def silence(self, start: float, end: float) -> float:
        """The longest time without an arrival from `start` until `end` (time.time())."""
        with self._arrived:
            times = [start] + [at for _, at in self.arrivals if start < at <= end] + [end]
        return max(later - earlier for earlier, later in itertools.pairwise(times))

    def finish(self, timeout: float) -> bool:
        """Stop writing, half-close, read the rest: True if the echo gave back exactly what was written, then
        its BYE."""
        self._stop.set()
        self.join(timeout)
        return self.error is None and bytes(self.received) == bytes(self.written) + BYE


@dataclass(frozen=True)
class Plan:
    """What each session does: `moves` changes of each side in `movers` (of MOVERS), in turn, each
    between two bulk transfers of `mib` MiB."""

    moves: int
    movers: tuple[str, ...]
    mib: int


@dataclass(frozen=True)
class Move:
    """One change of a's outer endpoint: seconds from it until each thing happened (None: not within WAIT)."""

    mover: str  # the host whose NAT changed: "a" or "b"
    change: str  # "remap", "renumber" (to the other address) or "renumber back"
    outer: str  # its public address after it
    resumed: float | None
    silence: float | None
    remapped: float | None
    rebound: float | None
    migrated: float | None
    before: streams.Bulk  # the bulk transfer right before the change
    after: streams.Bulk | None  # and right after the stream resumed (None: it did not)

    @property
    def let_in(self) -> bool:
        """The stream went on with no rebind: the side's new endpoint was one its peer's NAT still let in
        (a NAT that maps onto an endpoint it had before), so this was no move to measure."""
        return self.resumed is not None and self.remapped is None

    def to_json(self) -> dict[str, Any]:
        return {"mover": self.mover, "change": self.change, "outer": self.outer, "let_in": self.let_in} | {
            name: None if value is None else round(value, 4)
            for name, value in (("resumed", self.resumed), ("silence", self.silence),
                                ("remapped", self.remapped), ("rebound", self.rebound),
                                ("migrated", self.migrated))
        } | {"bulk_before": _bulk_json(self.before), "bulk_after": _bulk_json(self.after)}  # fmt: skip


def _bulk_json(bulk: streams.Bulk | None) -> dict[str, Any] | None:
    return None if bulk is None else bulk.to_json() | {"mib_s": round(mib_s(bulk), 2)}


@dataclass(frozen=True)
class Session:
    """One rendezvous's session: its moves, whether the steady stream came back whole (`records` written),
    or why it failed."""

    moves: list[Move]
    intact: bool
    records: int
    error: str | None = None


def _since(process: Plexus, name: str, after: float, when: float, timeout: float) -> float | None:
    """Seconds from `when` until the process's first event `name` after `after` (both time.time()); None if
    none came within the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        found = [event["at"] for event in process.events(name) if event["at"] >= after]
        if found:
            return float(min(found)) - when
        if time.monotonic() > deadline or process.process.poll() is not None:
            return None
        time.sleep(0.02)


def _change(lab: Lab, host: str, number: int) -> str:
    """The host's `number`th change (from 0): remap and renumber alternate, each renumber toggling its
    address."""
    if number % 2 == 0:
        lab.remap(host)
        return "remap"
    back = host in lab.outer
    lab.renumber(host, not back)
    return "renumber back" if back else "renumber"


def move(
    lab: Lab,
    sides: dict[str, Plexus],
    ticker: Ticker,
    mover: str,
    number: int,
    transfer: Callable[[], streams.Bulk],
) -> Move:
    """A bulk transfer, QUIET, the mover's `number`th change of its outer endpoint, what follows timed, and
    once the stream resumed, a bulk transfer. `sides`: the plexus processes by host."""
    moving, other = sides[mover], sides["b" if mover == "a" else "a"]
    first = transfer()
    time.sleep(QUIET)
    before = time.time()
    change = _change(lab, mover, number)
    changed = time.time()  # the new NAT rules and the flushed conntrack table are in place
    arrived = ticker.resumed(changed, WAIT)
    resumed = None if arrived is None else arrived - changed
    silence = None if arrived is None else ticker.silence(before - 1.0, arrived)
    migrated = _since(other, "migrated", before, changed, 0 if arrived is None else WAIT)
    remapped = _since(moving, "remapped", before, changed, 0)
    rebound = _since(other, "rebound", before, changed, 0)
    after = None if arrived is None else transfer()
    return Move(
        mover, change, lab.public_ip(mover), resumed, silence, remapped, rebound, migrated, first, after
    )


def mib_s(bulk: streams.Bulk) -> float:
    return bulk.sent / bulk.seconds / MIB


def session(
    lab: Lab,
    workdir: Path,
    way: str,
    options: Callable[[bool], Mapping[str, str | None]],
    plan: Plan,
    progress: Callable[[str], None],
) -> Session:
    """One acceptor and one --forward inviter with the rendezvous's `options` (by accept), the steady stream
    through them, the plan's moves."""
    ids = streams.Ids.make(workdir / "ids")
    block, expected = streams.block_and_expected(plan.mib)
    transfer = functools.partial(
        lab.run_sync, "a", functools.partial(streams.bulk, "127.0.0.1", LOCAL_SINK, block, plan.mib, expected)
    )
    done: list[Move] = []
    ticker: Ticker | None = None
    try:
        with contextlib.ExitStack() as stack:
            echo = stack.enter_context(TcpTarget(lab, "b", "echo"))
            sink = stack.enter_context(TcpTarget(lab, "b", "sink"))
            allowed = (f"127.0.0.1:{echo.port}", f"127.0.0.1:{sink.port}")
            acceptor, me, peer = stack.enter_context(
                streams.streams_acceptor(lab, workdir, ids, *allowed, extra=_inner(options(True), "b"))
            )
            forwards = [f"{LOCAL_ECHO}:{allowed[0]}", f"{LOCAL_SINK}:{allowed[1]}"]
            invite = stack.enter_context(
                streams.forwarding(lab, workdir, ids, me, peer, forwards, _inner(options(False), "a"))
            )
            ticker = Ticker(lab, LOCAL_ECHO)
            for number, mover in itertools.product(range(plan.moves), plan.movers):
                found = move(lab, {"a": invite, "b": acceptor}, ticker, mover, number, transfer)
                done.append(found)
                progress(f"  {WAYS[way]}, {mover}'s move {number + 1} ({found.change}, to {found.outer}): "
                         + _move_line(found))  # fmt: skip
                if found.resumed is None:  # the logs' tails to stderr, for whoever reads the failure
                    progress(
                        f"inviter's log:\n{invite.log()[-3000:]}\nacceptor's log:\n{acceptor.log()[-3000:]}"
                    )
                    raise RuntimeError(f"{mover}'s move {number + 1} ({found.change}) never resumed")
                time.sleep(SETTLE)
            intact = ticker.finish(WAIT)
            records = len(ticker.written) // RECORD.size
            error = None if intact else "the echoed stream is not what was written"
    except (RuntimeError, OSError, AssertionError) as failure:
        records = 0
        if ticker is not None:
            ticker.finish(1.0)
            records = len(ticker.written) // RECORD.size
        intact, error = False, one_line(failure)
    finally:
        lab.reset()  # both NATs back on their own ports and addresses
    return Session(done, intact, records, error)


def _inner(options: Mapping[str, str | None], host: str) -> dict[str, str | None]:
    return {**options, "stun-client": str(INNER_PORTS[host])}


def _move_line(found: Move) -> str:
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    def rate(bulk: streams.Bulk | None) -> str:
        return "-" if bulk is None else f"{mib_s(bulk):.1f}" + ("" if bulk.ok else " (WRONG)")

    return (f"resumed {s(found.resumed)} (silence {s(found.silence)}); remapped {s(found.remapped)}, "
            f"rebound {s(found.rebound)}, migrated {s(found.migrated)}; bulk {rate(found.before)} MiB/s "
            f"before, {rate(found.after)} after")  # fmt: skip


def measure(
    lab: Lab, workdir: Path, plan: Plan, progress: Callable[[str], None] = streams.progress_none
) -> dict[str, Any]:
    """Everything the section reports, as the results' `resume` entry."""
    workdir.mkdir(parents=True, exist_ok=True)
    lab.reset()
    found: dict[str, Session] = {}
    moving = f"{plan.moves} moves of {' and of '.join(plan.movers)} (remap and renumber in turn)"
    progress(f"resume: a --forward session by mail, {moving}")
    found["mail"] = session(lab, workdir, "mail", lambda accept: {}, plan, progress)
    keys = dht.Ids.make(workdir / "ids")
    with DhtNetwork(lab) as network:
        progress(f"resume: a --forward session on the DHT ({network.count} nodes, up in "
                 f"{network.startup_s:.1f} s), {moving}")  # fmt: skip
        found["dht"] = session(
            lab, workdir, "dht", lambda accept: keys.options(network, accept=accept), plan, progress
        )
    return summary(plan, found)


def _figures(values: list[float]) -> dict[str, float] | None:
    return summarize(values).to_json() if values else None


def summary(plan: Plan, found: dict[str, Session]) -> dict[str, Any]:
    """Per way: its moves; per side that moved, each measure's summary over its moves and per kind of change,
    its bulk transfers' MiB/s before and after the moves and each move's ratio of the two; the transfers that
    did not arrive whole, and whether the stream came back whole."""
    ways: dict[str, Any] = {}
    for way, done in found.items():
        movers = {}
        for mover in plan.movers:
            own = [m for m in done.moves if m.mover == mover and not m.let_in]
            kinds = {"all": own} | {kind: [m for m in own if m.change.startswith(kind)] for kind in CHANGES}
            pairs = [(mib_s(m.before), mib_s(m.after)) for m in own if m.after]
            movers[mover] = {
                "let_in": sum(m.let_in for m in done.moves if m.mover == mover),
                "summary": {
                    kind: {name: _figures([v for m in chosen if (v := getattr(m, name)) is not None])
                           for name in COLUMNS}
                    for kind, chosen in kinds.items()
                },
                "bulk": {
                    "before": _figures([mib_s(m.before) for m in own]),
                    "after": _figures([after for _, after in pairs]),
                    "after_over_before": _figures([after / before for before, after in pairs]),
                },
            }  # fmt: skip
        ways[way] = {
            "moves": [m.to_json() for m in done.moves],
            "movers": movers,
            "wrong_bulk": sum(not b.ok for m in done.moves for b in (m.before, m.after) if b),
            "intact": done.intact,
            "records": done.records,
            "error": done.error,
        }
    return {"moves": plan.moves, "movers": list(plan.movers), "mib": plan.mib, "quiet": QUIET,
            "interval": INTERVAL, "record_bytes": RECORD.size, "settle": SETTLE, "targets": TARGETS,
            "ways": ways}  # fmt: skip


COLUMNS = ("resumed", "silence", "remapped", "rebound", "migrated")


def render(found: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"== Resume: a --forward session between a and b, both NATs cone (they filter per endpoint), while "
        f"the NAT of {' and of '.join(found['movers'])} moves it {found['moves']} times per rendezvous"
        f"{', in turn' if len(found['movers']) > 1 else ''} (remap: new ports; renumber: a new outer "
        f"address, then back; in turn); through it a {found['record_bytes']}-byte "
        f"record every {found['interval'] * 1000:g} ms to an echo on b and back; before each move and once "
        f"it resumed, {found['mib']} MiB into a sink on b on another connection of the session (the move "
        f"{found['quiet']:g} s after the transfer, the next transfer {found['settle']:g} s after the move's)",
        "seconds from each move (median / max): resumed, until the first record written after it came back; "
        "silence, the longest gap in the echoed stream around it; until the STUN server of the side that "
        "moved saw it (remapped), the peer took its rebind (rebound), the peer sends to its new endpoint "
        "(migrated)",
        "moved: a, the inviter; b, the acceptor",
        f"{'way':<6}{'moved':<7}{'change':<10}{'n':>3}" + "".join(f"{name:>16}" for name in COLUMNS),
    ]
    entries = [(title, found["ways"][way]) for way, title in WAYS.items() if way in found["ways"]]
    for title, entry in entries:
        for mover, moved in entry["movers"].items():
            for kind, figures in moved["summary"].items():
                n = figures["resumed"]["n"] if figures["resumed"] else 0
                lines.append(f"{title:<6}{mover:<7}{kind:<10}{n:>3}" + "".join(
                    f"{_pair(figures[name]):>16}" for name in COLUMNS))  # fmt: skip
    let_in = [f"{title} {mover} {moved['let_in']}" for title, entry in entries
              for mover, moved in entry["movers"].items() if moved["let_in"]]  # fmt: skip
    if let_in:
        lines.append("moves the peer's NAT let in at once, with no rebind (the new endpoint was one it still "
                     f"had open), not counted above: {', '.join(let_in)}")  # fmt: skip
    lines.append("the bulk transfers, MiB/s, median (min-max): right before each move, right after it "
                 "resumed, and each move's after / before; the echoed stream at the end")  # fmt: skip
    for title, entry in entries:
        for mover, moved in entry["movers"].items():
            bulk = moved["bulk"]
            rates = [_spread(bulk[when], ".1f") for when in ("before", "after")]
            lines.append(f"  {title}, {mover}'s moves: before {rates[0]}, after {rates[1]}, after / before "
                         f"{_spread(bulk['after_over_before'], '.2f')}")  # fmt: skip
        wrong = f"; {entry['wrong_bulk']} bulk transfers WRONG" if entry["wrong_bulk"] else ""
        whole = "whole" if entry["intact"] else "NOT whole"
        lines.append(f"  {title}: the echoed stream ({entry['records']} records) {whole}{wrong}"
                     + (f"; FAILED: {entry['error']}" if entry["error"] else ""))  # fmt: skip
    for way, target in found["targets"].items():
        movers = found["ways"].get(way, {}).get("movers", {})
        verdicts = [f"{mover}'s {_verdict(moved['summary']['all']['resumed'], target)}"
                    for mover, moved in movers.items()]  # fmt: skip
        lines.append(f"target {WAYS[way]}: a stream resumes within {target:g} s of a move (median): "
                     + (", ".join(verdicts) or "-"))  # fmt: skip
    return lines


def _verdict(resumed: dict[str, float] | None, target: float) -> str:
    if resumed is None:
        return "-"
    return f"{'met' if resumed['median'] <= target else 'NOT met'} ({resumed['median']:.2f} s)"


def _pair(figures: dict[str, float] | None) -> str:
    return "-" if figures is None else f"{figures['median']:.2f} / {figures['max']:.2f}"


def _spread(figures: dict[str, float] | None, form: str) -> str:
    if figures is None:
        return "-"
    return f"{figures['median']:{form}} ({figures['min']:{form}}-{figures['max']:{form}})"


def check(found: dict[str, Any]) -> list[str]:
    """Each way's session without a failure (every move resumed within WAIT, the echoed stream whole), each
    side's median time to resume within the way's target, the bulk transfers whole."""
    failures = []
    for way, target in found["targets"].items():
        entry, label = found["ways"][way], f"resume, {WAYS[way]}"
        if entry["error"]:
            failures.append(f"{label}: {entry['error']}")
        for mover, moved in entry["movers"].items():
            resumed = moved["summary"]["all"]["resumed"]
            if resumed is not None and resumed["median"] > target:
                failures.append(f"{label}: the stream resumed {resumed['median']:.2f} s after {mover}'s "
                                f"moves (median), over the target {target:g} s")  # fmt: skip
        if entry["wrong_bulk"]:
            failures.append(f"{label}: {entry['wrong_bulk']} bulk transfers did not arrive whole")
    return failures
