"""The DHT rendezvous beside the mail: time to connect, its phases and their floors, and an idle acceptor.

A private OpenDHT network of three nodes runs in the lab's pub namespace (tests/lab/dht.py); hosts a and b
join it through their cone NATs, as plexus does with `--dht-bootstrap`. At each delay, two ways to meet:

- mail: the connect section's sessions (run here when that section is not);
- DHT: the request and the response, two DHT hops.

Each DHT way at each delay is one long-running acceptor on b and `runs` inviters on a, one after another,
each a fresh process with the default `--dht-port` 4222 and the day's node id, as from cron. The first
session after an acceptor starts is a warm-up: not counted, shown apart. It pays for routing tables that do
not know the pair's nodes yet.

Every acceptor, the idle one and the plain nodes (below) get a DHT network of their own, freshly formed
(it takes a fraction of a second), with the same pair of identities throughout, as deployed. In one network,
an acceptor started again would take its predecessor's requests, still stored on the DHT and fresh for
5 minutes, for new ones (its memory of the puzzles it has seen does not outlive its process), and would
start a session toward each of those long-gone inviters while a real request waits. And a pair with new
identities would leave its old node ids at the same addresses, which every search in a network this small
waits about a second for.

The timeline comes from both sides' session events, as bench/timeline.py reads the mail's (DHT_PHASES).
For the side-by-side table every way is cut the same (COMMON): start, stun, request_out (until the request
is sent or put), rendezvous (from there until the inviter has the response), handshake, launch.

Floors: STUN and the handshake count round trips as bench/floor.py does. The DHT's own steps are measured
with two plain OpenDHT nodes in the plexus nodes' places (the same ports and node ids), after the sessions:
a long-running one on b and a fresh one on a each round, which joins (ping), looks up a card (a listen until
the stored value arrives), listens for the response, and puts the request; b's node, pushed the request,
puts the response at once. The minimum over the rounds of each step is its floor; the card's less one round
trip, since plexus joins and starts the lookup while its STUN runs.

The idle acceptor: one in DHT mode as deployed, after one session, `idle` seconds: its CPU (/proc/PID/stat)
and the UDP crossing b's NAT router (nftables counters on its WAN side): the DHT node's (port 4222) and the
rest (none expected).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import opendht

from bench import floor, runs
from bench.stats import summarize
from bench.timeline import PHASES, Events, Marks, Timeline, TimelineError, phases
from plexus.identity import Identity
from plexus.mediator import dht
from tests.lab import sessions
from tests.lab.dht import DhtNetwork
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus, Side

# A target for the DHT's time to connect at 0 ms links (issue 17), reported beside the figures, never a
# failure of the benchmark
TARGET_SECONDS = 0.2
FLOOR_ROUNDS = 5  # counted rounds of the plain nodes per delay, after one warm-up round
FLOOR_WAIT = 10.0  # seconds any step of a plain node may take
IDLE_SETTLE = 5.0  # seconds between the idle acceptor's session and the start of the measurement
NFT_TABLE = "bench_dht"

WAYS = {"mail": "mail", "dht": "DHT"}
DHT_PHASES = (
    ("start", "inviter: process start, Python and imports, until its session starts"),
    ("stun", "inviter: STUN binding + mapping test (the DHT join, a ping, runs meanwhile)"),
    ("card", "inviter: the acceptor's card looked up, the request put"),
    ("request_in", "request: the put's search and store, the push to the acceptor's listen, open, screen"),
    ("stun_acceptor", "acceptor: STUN binding + mapping test"),
    ("response_in", "response: sealed and put by the acceptor, pushed to the inviter's listen, opened"),
    ("handshake", "hello/ready between the peers, until both sides are done"),
    ("launch", "until both launched commands run (exec/hello.py started)"),
)
COMMON = (
    ("start", "inviter: process start until its event loop runs"),
    ("stun", "inviter: STUN"),
    ("request_out", "inviter: until the request is sent (mail: the SMTP session's rest and DATA) or put "
                    "(DHT: the acceptor's card looked up)"),
    ("rendezvous", "from there until both sides know where to punch: the inviter has the response"),
    ("handshake", "hello/ready between the peers, until both sides are done"),
    ("launch", "until both launched commands run"),
)  # fmt: skip
_PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "mail": {"request_out": ("mail_out",),
             "rendezvous": ("mail_in", "stun_acceptor", "mail_out_response", "mail_in_response")},
    "dht": {"request_out": ("card",), "rendezvous": ("request_in", "stun_acceptor", "response_in")},
}  # fmt: skip


def phases_of(way: str) -> tuple[tuple[str, str], ...]:
    return {"mail": PHASES, "dht": DHT_PHASES}[way]


def common(way: str, phases: dict[str, float]) -> dict[str, float]:
    """A way's phases (or their floors) cut the same for every way: COMMON."""
    parts = _PARTS[way]
    return {name: sum(phases[part] for part in parts.get(name, (name,))) for name, _ in COMMON}


# ---- the timeline of a DHT session -------------------------------------------------------------------------


def dht_timeline(
    started: float,
    inviter: Events,
    acceptor: Events,
    launched: tuple[float, float],
) -> Timeline:
    """Phase durations of one DHT session (DHT_PHASES), from both sides' events: the response's put is not
    a phase of its own (the acceptor puts it the moment its punch starts)."""
    m = Marks.of(inviter, acceptor)
    marks = [started, m.flow, m.stun, m.request_out, m.request_in, m.acceptor_stun, m.response_in, m.done,
             max(launched)]  # fmt: skip
    return phases(DHT_PHASES, marks)


# ---- plexus in DHT mode ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ids:
    """The two hosts' identity files (made on first use) and identities."""

    inviter_file: Path
    acceptor_file: Path
    inviter: Identity
    acceptor: Identity

    @classmethod
    def make(cls, directory: Path) -> Ids:
        directory.mkdir(parents=True, exist_ok=True)
        inviter_file, acceptor_file = directory / "laptop.key", directory / "home.key"
        return cls(inviter_file, acceptor_file, Identity.load(inviter_file), Identity.load(acceptor_file))

    def options(self, network: DhtNetwork, *, accept: bool) -> dict[str, str | None]:
        """A side's options in DHT mode (as tests/labtests/test_dht.py's): no mail at all."""
        me, peer = (self.acceptor_file, self.inviter) if accept else (self.inviter_file, self.acceptor)
        gone = ("host-id", "peer-id", "email-smtps", "email-imaps", "email-login", "email-passwd",
                "email-from", "email-to", "email-ca")  # fmt: skip
        return dict.fromkeys(gone) | {
            "dht-bootstrap": ",".join(network.bootstrap),
            "identity": str(me),
            "peer-identity": peer.id,
        }

    def node_id(self, *, accept: bool) -> bytes:
        """The day's node id that the side's plexus takes (dhtnode.py's _Node.start)."""
        me = self.acceptor if accept else self.inviter
        return dht.node_id(me, dht.day_of(datetime.datetime.now(datetime.UTC)))


def _side(lab: Lab, host: str) -> Side:
    return Side(host, lab.accounts["local" if host == "a" else "remote"], f"{host}-dht")


@contextlib.contextmanager
def dht_acceptor(lab: Lab, workdir: Path, network: DhtNetwork, ids: Ids) -> Iterator[Plexus]:
    """A listening acceptor on host b in DHT mode; stopped on leaving."""
    side = _side(lab, "b")
    overrides = ids.options(network, accept=True)
    process = sessions.start(lab, side, side, workdir, accept=True, overrides=overrides)
    try:
        sessions.wait_until_listening(process)
        yield process
    finally:
        process.stop()


@dataclass(frozen=True)
class Session:
    code: int  # the inviter's exit code
    kind: str  # "ok" or "failed"
    total: float | None  # from the inviter's start until both launched commands run
    timeline: Timeline | None  # None for a session that failed
    inviter_seconds: float  # the inviter process's whole run (it watches its command 1 s before it exits)
    error: str = ""


def launched(inviter: Plexus, listening: Plexus, timeout: float = 30.0) -> tuple[float, float]:
    """The two hello.py start times (the inviter's, the acceptor's) of one session, matched by its secret."""
    mine = inviter.wait_hello()[0]
    secret = mine["args"]["secret"]
    deadline = time.monotonic() + timeout
    while True:
        theirs = next((r for r in listening.hello_results() if r["args"]["secret"] == secret), None)
        if theirs is not None:
            return mine["started"], theirs["started"]
        if time.monotonic() > deadline:
            raise RuntimeError(f"the acceptor's command never reported\n{listening.log()}")
        time.sleep(0.05)


def dht_session(lab: Lab, workdir: Path, network: DhtNetwork, ids: Ids, listening: Plexus) -> Session:
    """One inviter on host a, run to its end, against the listening acceptor."""
    side = _side(lab, "a")
    started = time.time()
    inviter = sessions.start(
        lab, side, side, workdir, accept=False, overrides=ids.options(network, accept=False)
    )
    ended = runs.reap(inviter, started)
    if ended.code != 0:
        last = (inviter.stderr().strip().splitlines() or ["(no message)"])[-1]
        return Session(
            ended.code, "failed", None, None, ended.seconds, f"inviter exited {ended.code}: {last}"
        )
    try:
        times = launched(inviter, listening)
    except (RuntimeError, AssertionError) as missing:
        return Session(ended.code, "failed", None, None, ended.seconds, str(missing).splitlines()[0])
    kind, timeline, problem = "ok", None, ""
    try:
        timeline = dht_timeline(started, inviter.events(), listening.events(), times)
    except TimelineError as failure:
        kind, problem = "failed", f"no timeline: {failure}"
    return Session(ended.code, kind, max(times) - started, timeline, ended.seconds, problem)


def dht_sessions(
    lab: Lab,
    workdir: Path,
    network: DhtNetwork,
    ids: Ids,
    count: int,
    on_session: Callable[[int, Session], None],
) -> tuple[Session, list[Session]]:
    """A warm-up session and `count` counted ones against one acceptor."""
    with dht_acceptor(lab, workdir, network, ids) as listening:
        warm_up = dht_session(lab, workdir, network, ids, listening)
        on_session(0, warm_up)
        counted: list[Session] = []
        for run in range(1, count + 1):
            found = dht_session(lab, workdir, network, ids, listening)
            counted.append(found)
            on_session(run, found)
    return warm_up, counted


# ---- floors of the DHT's own steps: plain OpenDHT nodes in the plexus nodes' places ------------------------


class _Arrivals:
    """What a listen brought, each value with when it first came (time.monotonic)."""

    def __init__(self) -> None:
        self._seen: dict[bytes, float] = {}
        self._changed = threading.Condition()

    def __call__(self, value: Any, expired: bool = False) -> bool:
        if not expired:
            with self._changed:
                self._seen.setdefault(bytes(value.data), time.monotonic())
                self._changed.notify_all()
        return True

    def wait(self, wanted: bytes | None, timeout: float = FLOOR_WAIT) -> float:
        """When `wanted` came (or any value, for None); TimeoutError if it did not within the timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                times = [at for data, at in self._seen.items() if wanted is None or data == wanted]
                if times:
                    return min(times)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no value {wanted!r} within {timeout:g} s")
                self._changed.wait(left)


def _node(lab: Lab, host: str, node_id: bytes, bootstrap: Sequence[str]) -> Any:
    """A DhtRunner in the host's namespace on plexus's port, with the node id plexus would take there."""

    def start() -> Any:
        runner = opendht.DhtRunner()
        config = opendht.DhtConfig()
        config.setPeerDiscovery(False, False)
        config.setNodeId(opendht.InfoHash(node_id.hex().encode()))
        runner.run(port=dht.DEFAULT_PORT, config=config)  # its threads and socket stay in the namespace
        return runner

    runner = lab.run_sync(host, start)
    for address in bootstrap:
        runner.bootstrap(*address.rsplit(":", 1))
    return runner


def _join(runner: Any, bootstrap: Sequence[str]) -> None:
    """As plexus joins: ping the bootstrap nodes, go on at the first answer."""
    answered = threading.Event()
    for address in bootstrap:
        node = opendht.SockAddr.resolve(*address.rsplit(":", 1))[0]
        runner.ping(node, lambda ok: answered.set() if ok else None)
    if not answered.wait(FLOOR_WAIT):
        raise TimeoutError("no bootstrap node answered a ping")


def _stop(runner: Any) -> None:
    """As plexus stops its node: shutdown, then join once it is done. join() holds the GIL while it waits for
    the node's threads, so a callback into Python still due then would never return."""
    done = threading.Event()
    runner.shutdown(done.set)
    done.wait(FLOOR_WAIT)
    runner.join()


@dataclass(frozen=True)
class Round:
    card: float  # joined until the card's value arrived
    request: float  # the request put on a until pushed to b
    response: float  # the response put on b until pushed to a

    @property
    def round_trip(self) -> float:
        return self.request + self.response


def dht_hops(lab: Lab, network: DhtNetwork, ids: Ids, rounds: int) -> tuple[Round | str, list[Round | str]]:
    """A warm-up round and `rounds` counted ones (a round that failed: why, as text)."""
    tag = uuid.uuid4().hex[:8]
    card_key, request_key, response_key = (
        opendht.InfoHash.get(f"bench/{tag}/{what}") for what in ("card", "request", "response")
    )
    home = _node(lab, "b", ids.node_id(accept=True), network.bootstrap)
    try:
        _join(home, network.bootstrap)
        requests = _Arrivals()
        home.listen(request_key, requests)
        home.put(card_key, opendht.Value(b"card"), lambda ok, nodes: None, True)

        def one(number: int) -> Round | str:
            laptop = _node(lab, "a", ids.node_id(accept=False), network.bootstrap)
            try:
                _join(laptop, network.bootstrap)
                joined = time.monotonic()
                cards, responses = _Arrivals(), _Arrivals()
                laptop.listen(card_key, cards)
                card = cards.wait(None) - joined
                laptop.listen(response_key, responses)
                request, response = f"request {tag} {number}".encode(), f"response {tag} {number}".encode()
                put = time.monotonic()
                laptop.put(request_key, opendht.Value(request), lambda ok, nodes: None, False)
                pushed = requests.wait(request)
                answered = time.monotonic()
                home.put(response_key, opendht.Value(response), lambda ok, nodes: None, False)
                return Round(card, pushed - put, responses.wait(response) - answered)
            except TimeoutError as error:
                return str(error)
            finally:
                _stop(laptop)

        return one(0), [one(number) for number in range(1, rounds + 1)]
    finally:
        _stop(home)


# ---- the idle acceptor's UDP, counted on b's NAT router ----------------------------------------------------

_NFT_COUNTERS = f"""\
table ip {NFT_TABLE}
delete table ip {NFT_TABLE}
table ip {NFT_TABLE} {{
    counter dht_in {{ }}
    counter dht_out {{ }}
    counter other_in {{ }}
    counter other_out {{ }}
    chain inbound {{
        type filter hook prerouting priority raw - 5;
        iifname "wan" udp dport {dht.DEFAULT_PORT} counter name "dht_in" accept
        iifname "wan" meta l4proto udp counter name "other_in"
    }}
    chain outbound {{
        type filter hook postrouting priority srcnat + 5;
        oifname "wan" udp sport {dht.DEFAULT_PORT} counter name "dht_out" accept
        oifname "wan" meta l4proto udp counter name "other_out"
    }}
}}
"""


def _nft(lab: Lab, *argv: str, text: str | None = None) -> str:
    done = lab.exec("nat-b", ["nft", *argv], input=text)
    if done.returncode != 0:
        raise RuntimeError(f"nft {' '.join(argv)} on b's NAT router: {done.stderr.strip()}")
    return str(done.stdout)


def udp_counters(lab: Lab) -> dict[str, dict[str, int]]:
    """Packets and bytes (IP) so far, per counter of _NFT_COUNTERS."""
    found = json.loads(_nft(lab, "-j", "list", "table", "ip", NFT_TABLE))
    return {
        item["counter"]["name"]: {"packets": item["counter"]["packets"], "bytes": item["counter"]["bytes"]}
        for item in found["nftables"]
        if "counter" in item
    }


def idle_acceptor(
    lab: Lab, workdir: Path, network: DhtNetwork, ids: Ids, seconds: float
) -> tuple[dict[str, Any], list[str]]:
    """An acceptor in DHT mode as deployed, idle for `seconds` after one session; and what went wrong."""
    failures = []
    _nft(lab, "-f", "-", text=_NFT_COUNTERS)
    try:
        with dht_acceptor(lab, workdir, network, ids) as listening:
            first = dht_session(lab, workdir, network, ids, listening)
            if first.code != 0 or first.kind == "failed":
                failures.append(f"idle acceptor's session: {first.error}")
            time.sleep(IDLE_SETTLE)
            pid = listening.process.pid
            before, counted = runs.sample(pid), udp_counters(lab)
            time.sleep(seconds)
            after, now = runs.sample(pid), udp_counters(lab)
            if listening.process.poll() is not None:
                failures.append(f"the idle acceptor exited {listening.process.returncode}")
    finally:
        _nft(lab, "delete", "table", "ip", NFT_TABLE)
    udp = {
        name: {what: now[name][what] - counted[name][what] for what in ("packets", "bytes")} for name in now
    }
    return {
        "seconds": seconds,
        "settle_seconds": IDLE_SETTLE,
        "cpu_seconds": round(after.cpu - before.cpu, 3),
        "clock_tick_seconds": 1 / runs.CLOCK_TICKS,
        "rss_bytes": after.rss,
        "peak_rss_bytes": after.peak_rss,
        "udp": udp,
        "udp_per_minute": {
            name: {what: round(count * 60 / seconds, 1) for what, count in values.items()}
            for name, values in udp.items()
        },
    }, failures


# ---- the section -------------------------------------------------------------------------------------------


def _session_line(way: str, number: int, found: Session) -> str:
    label = "warm-up" if number == 0 else f"run {number}"
    if found.total is None:
        return f"  {WAYS[way]} {label}: FAILED ({found.error})"
    return f"  {WAYS[way]} {label}: {found.total:.2f} s"


def way_entry(
    way: str, timelines: list[Timeline], totals: list[float], bound: dict[str, float]
) -> dict[str, Any]:
    """A way's figures at one delay: totals (every counted session that connected), phases (the sessions
    that met the way's own way), each beside its floor."""
    entry: dict[str, Any] = {
        "total": summarize(totals).to_json() if totals else None,
        "floor": round(sum(bound.values()), 4),
        "runs": [round(total, 4) for total in totals],
    }
    if timelines:
        entry["phases"] = {
            name: {"measured": summarize([t.phases[name] for t in timelines]).to_json(),
                   "floor": round(bound[name], 4)}
            for name, _ in phases_of(way)
        }  # fmt: skip
        cut = [common(way, t.phases) for t in timelines]
        floors = common(way, bound)
        entry["common"] = {
            name: {"measured": summarize([c[name] for c in cut]).to_json(), "floor": round(floors[name], 4)}
            for name, _ in COMMON
        }
    return entry


def dht_entry(way: str, warm_up: Session, counted: list[Session], bound: dict[str, float]) -> dict[str, Any]:
    """A DHT way's figures at one delay (way_entry's), with how its sessions met and its warm-up."""
    ok = [s for s in counted if s.total is not None]
    own = [s for s in ok if s.kind == "ok" and s.timeline is not None]
    entry = way_entry(way, [s.timeline for s in own if s.timeline], [s.total for s in ok if s.total], bound)
    # the sessions that met the way's own way: their totals beside their phases
    entry["own_total"] = summarize([s.total for s in own if s.total]).to_json() if own else None
    kinds: dict[str, int] = {}
    for found in counted:
        kinds[found.kind] = kinds.get(found.kind, 0) + 1
    entry |= {
        "sessions": len(counted),
        "kinds": kinds,
        "warm_up": {
            "kind": warm_up.kind,
            "total": None if warm_up.total is None else round(warm_up.total, 4),
        },
        "inviter_seconds": summarize([s.inviter_seconds for s in ok]).to_json() if ok else None,
    }
    return entry


def hops_entry(warm_up: Round | str, counted: list[Round | str]) -> dict[str, Any]:
    """The plain nodes' rounds at one delay: each step's summary, the failed rounds, the warm-up's."""
    done = [r for r in counted if isinstance(r, Round)]
    entry: dict[str, Any] = {
        "rounds": len(counted),
        "failed": [r for r in counted if isinstance(r, str)],
        "warm_up_round_trip": round(warm_up.round_trip, 4) if isinstance(warm_up, Round) else None,
    }
    for name in ("card", "request", "response", "round_trip"):
        entry[name] = summarize([getattr(r, name) for r in done]).to_json() if done else None
    return entry


def floors(paths: floor.Paths, hops: dict[str, Any]) -> dict[str, float]:
    """The floor of each phase of a DHT session: round trips counted as bench/floor.py does, the DHT's own
    steps the plain nodes' minimum (zero when they could not be measured)."""
    a, b = paths.rtt_inviter, paths.rtt_acceptor

    def least(name: str) -> float:
        return float(hops[name]["min"]) if hops.get(name) else 0.0

    return {
        "start": 0.0,
        "stun": floor.STUN_RTT * a,
        # the join (a ping: one round trip) and the card's lookup start while STUN (two) runs
        "card": max(0.0, least("card") - a),
        "request_in": least("request"),
        "stun_acceptor": floor.STUN_RTT * b,
        "response_in": least("response"),
        "handshake": floor.HANDSHAKE_RTT * paths.rtt_peers,
        "launch": 0.0,
    }


def measure(
    lab: Lab,
    workdir: Path,
    count: int,
    delays: Sequence[float],
    idle: float,
    delivery: float,
    mail: dict[float, list[Timeline]],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """The section: `mail` holds the connect section's timelines per delay (those missing are run here)."""
    workdir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    rtts: dict[float, floor.Paths] = {}
    found: dict[tuple[str, float], tuple[Session, list[Session]]] = {}

    def note(way: str, delay: float) -> Callable[[int, Session], None]:
        def on_session(number: int, session: Session) -> None:
            progress(_session_line(way, number, session))
            if session.total is None or session.error:
                label = "warm-up" if number == 0 else f"run {number}"
                failures.append(f"{delay:g} ms, {WAYS[way]}, {label}: {session.error}")

        return on_session

    ids = Ids.make(workdir / "ids")
    nodes = 0

    @contextlib.contextmanager
    def fresh(what: str) -> Iterator[DhtNetwork]:
        nonlocal nodes
        with DhtNetwork(lab) as network:
            nodes = network.count
            progress(f"DHT: {what}: a fresh network of {nodes} nodes, up in {network.startup_s:.1f} s")
            yield network

    for delay in delays:
        set_delay(lab, delay)
        rtts[delay] = floor.Paths(floor.ping_rtt(lab, "a"), floor.ping_rtt(lab, "b"), delivery)
        if delay not in mail:
            progress(f"DHT: {delay:g} ms links: {count} mail sessions to compare with")
            mail[delay] = runs.connect(lab, workdir, count, on_run=lambda i, t: progress(
                f"  mail run {i}: {t.total:.2f} s"))  # fmt: skip
        with fresh(f"{delay:g} ms links") as network:
            found["dht", delay] = dht_sessions(lab, workdir, network, ids, count, note("dht", delay))
    set_delay(lab, 0)
    with fresh(f"an idle acceptor for {idle:g} s (after one session and {IDLE_SETTLE:g} s)") as network:
        idle_found, idle_failures = idle_acceptor(lab, workdir, network, ids, idle)
    failures += idle_failures
    hops: dict[float, dict[str, Any]] = {}
    for delay in delays:
        set_delay(lab, delay)
        with fresh(f"{delay:g} ms links, plain nodes") as network:
            hops[delay] = hops_entry(*dht_hops(lab, network, ids, FLOOR_ROUNDS))
        trip = hops[delay]["round_trip"]
        progress("  round trip "
                 + (f"min {trip['min'] * 1000:.1f} ms, median {trip['median'] * 1000:.1f} ms" if trip
                    else "not measured"))  # fmt: skip
    set_delay(lab, 0)
    entries = []
    for delay in delays:
        paths = rtts[delay]
        if not hops[delay]["round_trip"]:
            failures.append(
                f"{delay:g} ms: no round of the plain DHT nodes completed: {hops[delay]['failed']}"
            )
        entry: dict[str, Any] = {
            "delay_ms": delay,
            "rtt_inviter": paths.rtt_inviter,
            "rtt_acceptor": paths.rtt_acceptor,
            "rtt_peers": paths.rtt_peers,
            "hops": hops[delay],
            "mail": way_entry("mail", mail[delay], [t.total for t in mail[delay]], floor.floor(paths)),
        }
        entry["dht"] = dht_entry("dht", *found["dht", delay], floors(paths, hops[delay]))
        entries.append(entry)
    return {
        "nodes": nodes,
        "runs": count,
        "floor_rounds": FLOOR_ROUNDS,
        "target_seconds": TARGET_SECONDS,
        "delays": entries,
        "idle": idle_found,
        "failures": failures,
    }


def set_delay(lab: Lab, delay_ms: float) -> None:
    for host in ("a", "b"):
        lab.set_link(host, delay_ms=delay_ms)
