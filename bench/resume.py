"""Resume: a streams session across the inviter's moves behind NATs that filter per endpoint (issue 19).

Both NATs are cone (port-restricted: each drops what comes from an endpoint its host has not sent to), so when
a's NAT maps it anew, b's NAT drops a's packets from the new endpoint until b punches toward it, which it
does on the rebind a sends over the rendezvous (plexus/streams/resume.py). One acceptor on b
(`--forward-allow` to an echo and a sink target) and one `--forward` inviter on a, per rendezvous: by mail
(the lab's SMTP and Dovecot) and on the DHT (a private network in the lab's public namespace, as
bench/dht.py's).

Through each session, one TCP connection carries a steady stream to the echo target and back: a RECORD-byte
record every INTERVAL (its sequence number and the time it was written), so bytes flow both ways all the
time, as an interactive ssh's do. Then `moves` changes of a's outer endpoint, SETTLE seconds after the
previous one resumed, alternating Lab.remap (new ports: a NAT that forgot its mappings) and Lab.renumber
(a new outer address, as a new lease gives; then back to the old one, and so on). For each:

- resumed: from the change (the lab's NAT rules replaced and its conntrack table flushed) until the first
  record written after it came back from the echo;
- silence: the longest time between two arrivals of the echoed stream from a second before the change until
  then;
- remapped, rebound, migrated: until the sides' events (plexus/events.py): a's STUN server saw the new
  endpoint; b took the rebind and punched; b's QUIC validated the new path and sends there.

At the end the writer half-closes and everything echoed must equal everything written, then the echo's BYE:
nothing lost, repeated or reordered. Before the first move and after the last one, `bulk_runs` bulk
transfers of `mib` MiB into the sink on another connection of the same session (bench/streams.py `bulk`,
checked by the sink's answer), their MiB/s side by side.

The targets (TARGETS), checked: a stream resumes within 2 s of a change on the DHT and within 3 s by mail
(median), every change resumed, and nothing lost.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import socket
import statistics
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
from tests.lab.services import BYE, CHUNK, TcpTarget
from tests.lab.sessions import Plexus

WAYS = {"mail": "mail", "dht": "DHT"}
TARGETS = {"mail": 3.0, "dht": 2.0}  # median seconds from a change until the stream flows again
CHANGES = ("remap", "renumber")
LOCAL_ECHO, LOCAL_SINK = 17027, 17029  # --forward's listening ports on a
RECORD = struct.Struct("!Qd16x")  # sequence number, time.time() when written; 32 bytes
INTERVAL = 0.01  # seconds between two records: 3.2 kB/s each way
SETTLE = 2.0  # seconds after a change resumed (and b migrated) until the next
WAIT = 30.0  # seconds a change may take to resume (or an event to come) before it counts as failed
BULK_RUNS = 3  # bulk transfers before the first move and after the last
MIB = streams.MIB


class Ticker:
    """The steady stream: one thread writes a record every INTERVAL into the echo through a's --forward
    listener, another reads the echo and notes when each record came back."""

    def __init__(self, lab: Lab, port: int) -> None:
        self.written = bytearray()
        self.received = bytearray()
        self.arrivals: list[tuple[float, float]] = []  # per record echoed: (written at, arrived at)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._arrived = threading.Condition()
        self._sock = lab.socket("a", socket.AF_INET, socket.SOCK_STREAM)
        self._sock.settimeout(WAIT + 30)
        self._sock.connect(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._threads = [threading.Thread(target=self._guard, args=(f,)) for f in (self._write, self._read)]
        for thread in self._threads:
            thread.start()

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except OSError as error:  # finish() reports it
            self.error = error
            with self._arrived:
                self._arrived.notify_all()

    def _write(self) -> None:
        began, sequence = time.monotonic(), 0
        while not self._stop.wait(max(began + sequence * INTERVAL - time.monotonic(), 0)):
            record = RECORD.pack(sequence, time.time())
            self._sock.sendall(record)
            self.written += record
            sequence += 1
        self._sock.shutdown(socket.SHUT_WR)

    def _read(self) -> None:
        while chunk := self._sock.recv(CHUNK):
            now = time.time()
            complete = len(self.received) // RECORD.size
            self.received += chunk
            whole = min(len(self.received), len(self.written)) // RECORD.size  # BYE is no record
            with self._arrived:
                for index in range(complete, whole):
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
        for thread in self._threads:
            thread.join(timeout)
        self._sock.close()
        return self.error is None and bytes(self.received) == bytes(self.written) + BYE


@dataclass(frozen=True)
class Move:
    """One change of a's outer endpoint: seconds from it until each thing happened (None: not within WAIT)."""

    change: str  # "remap", "renumber" (to the other address) or "renumber back"
    outer: str  # a's public address after it
    resumed: float | None
    silence: float | None
    remapped: float | None
    rebound: float | None
    migrated: float | None

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "outer": self.outer} | {
            name: None if value is None else round(value, 4)
            for name, value in (("resumed", self.resumed), ("silence", self.silence),
                                ("remapped", self.remapped), ("rebound", self.rebound),
                                ("migrated", self.migrated))
        }  # fmt: skip


@dataclass(frozen=True)
class Session:
    """One rendezvous's session: its moves, the bulk transfers before and after them, whether the steady
    stream came back whole (`records` written), or why it failed."""

    moves: list[Move]
    bulk: dict[str, list[streams.Bulk]]  # "before", "after"
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


def _change(lab: Lab, number: int) -> str:
    """The `number`th change (from 0): remap and renumber alternate, each renumber toggling a's address."""
    if number % 2 == 0:
        lab.remap("a")
        return "remap"
    back = "a" in lab.outer
    lab.renumber("a", not back)
    return "renumber back" if back else "renumber"


def move(lab: Lab, acceptor: Plexus, invite: Plexus, ticker: Ticker, number: int) -> Move:
    """Change a's outer endpoint and time what follows."""
    before = time.time()
    change = _change(lab, number)
    changed = time.time()  # the new NAT rules and the flushed conntrack table are in place
    arrived = ticker.resumed(changed, WAIT)
    resumed = None if arrived is None else arrived - changed
    silence = None if arrived is None else ticker.silence(before - 1.0, arrived)
    migrated = _since(acceptor, "migrated", before, changed, WAIT)
    return Move(change, lab.public_ip("a"), resumed, silence, _since(invite, "remapped", before, changed, 0),
                _since(acceptor, "rebound", before, changed, 0), migrated)  # fmt: skip


def bulks(lab: Lab, block: bytes, mib: int, expected: str) -> list[streams.Bulk]:
    """BULK_RUNS transfers into the sink, one after another, each on a connection of its own."""
    transfer = functools.partial(streams.bulk, "127.0.0.1", LOCAL_SINK, block, mib, expected)
    return [lab.run_sync("a", transfer) for _ in range(BULK_RUNS)]


def mib_s(bulk: streams.Bulk) -> float:
    return bulk.sent / bulk.seconds / MIB


def session(
    lab: Lab,
    workdir: Path,
    way: str,
    options: Callable[[bool], Mapping[str, str | None]],
    moves: int,
    mib: int,
    progress: Callable[[str], None],
) -> Session:
    """One acceptor and one --forward inviter with the rendezvous's `options` (by accept), the steady stream
    through them, bulk transfers, `moves` changes, bulk transfers."""
    ids = streams.Ids.make(workdir / "ids")
    block, expected = streams.block_and_expected(mib)
    done: list[Move] = []
    bulk: dict[str, list[streams.Bulk]] = {}
    ticker: Ticker | None = None
    try:
        with contextlib.ExitStack() as stack:
            echo = stack.enter_context(TcpTarget(lab, "b", "echo"))
            sink = stack.enter_context(TcpTarget(lab, "b", "sink"))
            allowed = (f"127.0.0.1:{echo.port}", f"127.0.0.1:{sink.port}")
            acceptor, me, peer = stack.enter_context(
                streams.streams_acceptor(lab, workdir, ids, *allowed, extra=options(True))
            )
            forwards = [f"{LOCAL_ECHO}:{allowed[0]}", f"{LOCAL_SINK}:{allowed[1]}"]
            invite = stack.enter_context(
                streams.forwarding(lab, workdir, ids, me, peer, forwards, options(False))
            )
            ticker = Ticker(lab, LOCAL_ECHO)
            bulk["before"] = bulks(lab, block, mib, expected)
            progress(f"  {WAYS[way]}: bulk before the moves {_rates(bulk['before'])}")
            for number in range(moves):
                found = move(lab, acceptor, invite, ticker, number)
                done.append(found)
                progress(f"  {WAYS[way]} move {number + 1} ({found.change}, a now at {found.outer}): "
                         + _move_line(found))  # fmt: skip
                if found.resumed is None:  # the logs' tails to stderr, for whoever reads the failure
                    progress(
                        f"inviter's log:\n{invite.log()[-3000:]}\nacceptor's log:\n{acceptor.log()[-3000:]}"
                    )
                    raise RuntimeError(f"move {number + 1} ({found.change}) never resumed")
                time.sleep(SETTLE)
            bulk["after"] = bulks(lab, block, mib, expected)
            progress(f"  {WAYS[way]}: bulk after the moves {_rates(bulk['after'])}")
            intact = ticker.finish(WAIT)
            records = len(ticker.written) // RECORD.size
            error = None if intact else "the echoed stream is not what was written"
    except (RuntimeError, OSError, AssertionError) as failure:
        if ticker is not None:
            ticker.finish(1.0)
        intact, records, error = False, 0, one_line(failure)
    finally:
        lab.reset()  # a's NAT back on its own ports and address
    return Session(done, bulk, intact, records, error)


def _rates(found: list[streams.Bulk]) -> str:
    return ", ".join(f"{mib_s(b):.1f}" + ("" if b.ok else " (WRONG)") for b in found) + " MiB/s"


def _move_line(found: Move) -> str:
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    return (f"resumed {s(found.resumed)} (silence {s(found.silence)}); remapped {s(found.remapped)}, "
            f"rebound {s(found.rebound)}, migrated {s(found.migrated)}")  # fmt: skip


def measure(
    lab: Lab, workdir: Path, moves: int, mib: int, progress: Callable[[str], None] = streams.progress_none
) -> dict[str, Any]:
    """Everything the section reports, as the results' `resume` entry."""
    workdir.mkdir(parents=True, exist_ok=True)
    lab.reset()
    found: dict[str, Session] = {}
    progress(f"resume: a --forward session by mail, {moves} moves of a (remap and renumber in turn)")
    found["mail"] = session(lab, workdir, "mail", lambda accept: {}, moves, mib, progress)
    keys = dht.Ids.make(workdir / "ids")
    with DhtNetwork(lab) as network:
        progress(f"resume: a --forward session on the DHT ({network.count} nodes, up in "
                 f"{network.startup_s:.1f} s), {moves} moves of a")  # fmt: skip
        found["dht"] = session(
            lab, workdir, "dht", lambda accept: keys.options(network, accept=accept), moves, mib, progress
        )
    return summary(moves, mib, found)


def _figures(values: list[float]) -> dict[str, float] | None:
    return summarize(values).to_json() if values else None


def summary(moves: int, mib: int, found: dict[str, Session]) -> dict[str, Any]:
    """Per way: its moves, each measure's summary over all of them and per kind of change, the bulk MiB/s
    before and after, and whether the stream came back whole."""
    ways: dict[str, Any] = {}
    for way, done in found.items():
        kinds = {"all": done.moves} | {
            kind: [m for m in done.moves if m.change.startswith(kind)] for kind in CHANGES
        }
        ways[way] = {
            "moves": [m.to_json() for m in done.moves],
            "summary": {
                kind: {name: _figures([v for m in chosen if (v := getattr(m, name)) is not None])
                       for name in ("resumed", "silence", "remapped", "rebound", "migrated")}
                for kind, chosen in kinds.items()
            },
            "bulk": {
                when: {"mib_s": [round(mib_s(b), 2) for b in runs], "ok": all(b.ok for b in runs),
                       "median_mib_s": round(statistics.median(mib_s(b) for b in runs), 2) if runs else None}
                for when, runs in done.bulk.items()
            },
            "intact": done.intact,
            "records": done.records,
            "error": done.error,
        }  # fmt: skip
    return {"moves": moves, "mib": mib, "bulk_runs": BULK_RUNS, "interval": INTERVAL,
            "record_bytes": RECORD.size, "settle": SETTLE, "targets": TARGETS, "ways": ways}  # fmt: skip


COLUMNS = ("resumed", "silence", "remapped", "rebound", "migrated")


def render(found: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"== Resume: a --forward session between a and b, both NATs cone (they filter per endpoint), while "
        f"a's NAT moves it {found['moves']} times per rendezvous (remap: new ports; renumber: a new outer "
        f"address, then back; in turn, {found['settle']:g} s after the previous move resumed); through it a "
        f"{found['record_bytes']}-byte record every {found['interval'] * 1000:g} ms to an echo on b and back",
        "seconds from each move (median / max): resumed, until the first record written after it came back; "
        "silence, the longest gap in the echoed stream around it; until a's STUN server saw the move "
        "(remapped), b took the rebind (rebound), b's QUIC moved to the new path (migrated)",
        f"{'way':<6}{'moves':<10}{'n':>3}" + "".join(f"{name:>16}" for name in COLUMNS),
    ]
    for way, title in WAYS.items():
        entry = found["ways"].get(way)
        if entry is None:
            continue
        for kind, figures in entry["summary"].items():
            n = figures["resumed"]["n"] if figures["resumed"] else 0
            lines.append(f"{title:<6}{kind:<10}{n:>3}" + "".join(
                f"{_pair(figures[name]):>16}" for name in COLUMNS))  # fmt: skip
    lines.append(f"bulk transfer into a sink on b on the same session, {found['mib']} MiB, MiB/s (median of "
                 f"{found['bulk_runs']}) before the first move and after the last:")  # fmt: skip
    for way, title in WAYS.items():
        entry = found["ways"].get(way)
        if entry is None:
            continue
        rates = {when: entry["bulk"].get(when) for when in ("before", "after")}
        cells = [f"{when} " + (f"{r['median_mib_s']:.1f} ({', '.join(f'{v:.1f}' for v in r['mib_s'])})"
                               + ("" if r["ok"] else " WRONG") if r else "-")
                 for when, r in rates.items()]  # fmt: skip
        whole = "whole" if entry["intact"] else "NOT whole"
        lines.append(f"  {title}: {'; '.join(cells)}; the echoed stream ({entry['records']} records) {whole}"
                     + (f"; FAILED: {entry['error']}" if entry["error"] else ""))  # fmt: skip
    for way, target in found["targets"].items():
        resumed = found["ways"].get(way, {}).get("summary", {}).get("all", {}).get("resumed")
        verdict = "-" if resumed is None else (
            f"{'met' if resumed['median'] <= target else 'NOT met'} ({resumed['median']:.2f} s)")  # fmt: skip
        lines.append(
            f"target {WAYS[way]}: a stream resumes within {target:g} s of a move (median): {verdict}"
        )
    return lines


def _pair(figures: dict[str, float] | None) -> str:
    return "-" if figures is None else f"{figures['median']:.2f} / {figures['max']:.2f}"


def check(found: dict[str, Any]) -> list[str]:
    """Every move resumed within WAIT, the median within the way's target, the echoed stream and the bulk
    transfers whole, no session failed."""
    failures = []
    for way, target in found["targets"].items():
        entry = found["ways"][way]
        label = f"resume, {WAYS[way]}"
        if entry["error"]:
            failures.append(f"{label}: {entry['error']}")
        elif not entry["intact"]:
            failures.append(f"{label}: the echoed stream is not what was written")
        stuck = [number for number, m in enumerate(entry["moves"], 1) if m["resumed"] is None]
        if stuck:
            failures.append(f"{label}: moves {stuck} never resumed")
        resumed = entry["summary"]["all"]["resumed"]
        if resumed is None or len(entry["moves"]) < found["moves"]:
            failures.append(f"{label}: {len(entry['moves'])} of {found['moves']} moves made")
        if resumed is not None and resumed["median"] > target:
            failures.append(f"{label}: the stream resumed {resumed['median']:.2f} s after a move (median), "
                            f"over the target {target:g} s")  # fmt: skip
        failures += [f"{label}: a bulk transfer {when} the moves did not arrive whole"
                     for when, rates in entry["bulk"].items() if not rates["ok"]]  # fmt: skip
    return failures
