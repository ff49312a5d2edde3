"""A private OpenDHT network inside the lab, for the tests of the DHT rendezvous.

DhtNetwork runs `count` OpenDHT nodes (the real library, through its Python bindings) as separate processes
in the lab's pub namespace, on 203.0.113.10 and 203.0.113.11 in turn, ports 4222, 4223, ...; node i
bootstraps to every node before it (the first among them) and pings each, so each routing table holds all
the others at once instead of after OpenDHT's first maintenance search, seconds later. start() returns when
every node runs and every node's routing table holds every other node:

    with DhtNetwork(lab) as network:                 # 3 nodes
        network.bootstrap                             # ["203.0.113.10:4222", "203.0.113.11:4223", ...]
        network.probe("b", "put", key, value)         # the probe's JSON report; LabError if it fails
        network.probe("a", "get", key)["value"]       # == value
        listener = lab.popen("a", network.probe_argv("listen", key, ready=path), cwd=ROOT, stdout=PIPE)

Both are this module run as a program:

    python -m tests.lab.dht node --bind IP --port PORT [--bootstrap IP:PORT ...] [--ready FILE]
                                 [--dht-log FILE] [--network ID]
    python -m tests.lab.dht probe put|get|listen --bootstrap IP:PORT [...] --key TEXT [--value TEXT]
                                  [--port N] [--timeout S] [--ready FILE] [--json] [--network ID]

A node rewrites its ready file (JSON: its pid, address, node id, the addresses and node ids in its IPv4
routing table) whenever its routing table changes, until it is stopped (SIGTERM). A probe starts a DhtRunner
on 0.0.0.0 (in a host's namespace: behind its NAT), bootstraps, waits for a node to answer, then puts, gets
(until it finds a value, or the --value), or listens (for a value stored or pushed later, or the --value)
under InfoHash.get(KEY); it prints what it put or got as one line (--json: a JSON object with its timings,
wall clock stamps comparable between processes on this machine) and exits 0, or 1 on timeout. A listen probe
writes --ready once its listen is in place on the network: after a get of the same key has completed, which
shares the listen's search.

A trap of the bindings, which both sides here avoid: opendht keeps the GIL while a DhtRunner method waits
for the runner's internal lock (dht_mtx: getRoutingTablesLog, getBound, getNodeMessageStats, getStorageLog,
join, ...), and the runner's thread calls the Python callbacks (put/get done, get/listen values, ping,
shutdown) holding that lock. Such a method called while a callback fires deadlocks both threads for good.
put, get, listen, bootstrap, ping and shutdown only queue an operation (under another lock, never held
during callbacks) and are safe at any time.

Why no test traffic leaves the lab:

- Nothing here names a node outside the lab. OpenDHT's library (DhtRunner) has no default bootstrap: only
  the `dhtnode` tool and Jami bootstrap to bootstrap.jami.net, and no code here uses either. Every node and
  probe bootstraps only to the addresses it is given, which DhtNetwork takes from the lab's pub namespace.
- Peer discovery (multicast on the local link) and peer publishing are off in every DhtConfig here; they are
  off by default too. No proxy server is configured. Nodes and probes bind IPv4 only.
- The lab cannot route outside itself. Every lab namespace is new and empty; its only links are its loopback
  and veth pairs (or delay-wire taps) whose both ends are in lab namespaces, never in the root namespace. The
  routers' default routes end at inet, which has no default route: a datagram to any address outside
  198.51.100.0/24 and 203.0.113.0/24 draws "network unreachable" at inet. There is no IPv6 address beyond
  link-local ones. test_dht_lab.py checks this on the running lab.
- The DHT nodes use OpenDHT's public network id (0) unless given another (DhtNetwork(network=...), plexus's
  --dht-network): plexus's nodes join them with its defaults. Containment comes from the routes above, not
  from the network id.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, get_args

if TYPE_CHECKING:
    from tests.lab.lab import Lab

# The lab module is imported where it is needed: the node and probe processes skip its imports (aioice,
# plexus), which take longer than OpenDHT's own.

ProbeOp = Literal["put", "get", "listen"]
ROOT = Path(__file__).resolve().parents[2]  # where `-m tests.lab.dht` resolves
BASE_PORT = 4222
FORM_WAIT_S = 20.0  # for the nodes to start and their routing tables to fill
STOP_GRACE_S = 3.0
PROBE_TIMEOUT_S = 10.0
PING_WAIT_S = 10.0  # OpenDHT gives up on a ping after a few seconds, and calls back either way
_NODE_LINE = re.compile(r"^\s*Node ([0-9a-f]{40}) (\S+)(.*)$", re.MULTILINE)


def _config(network: int) -> Any:
    """A DhtConfig on that network id that finds no peer by itself: no multicast peer discovery, no
    publishing, no proxy."""
    import opendht

    config = opendht.DhtConfig()
    config.setPeerDiscovery(False, False)
    config.setNetwork(network)
    return config


def _split(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected IP:PORT, got {address!r}")
    return host, port


def routing_table(runner: Any) -> list[tuple[str, str, bool]]:
    """(node id, address, good) for every node in the runner's IPv4 routing table."""
    text = runner.getRoutingTablesLog(socket.AF_INET)
    return [(m[1], m[2], "[good]" in m[3]) for m in _NODE_LINE.finditer(text)]


def _write_atomic(path: Path, text: str) -> None:
    # Whole or absent to the lab side, which polls for it
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    partial.replace(path)


# ---- the lab side ---------------------------------------------------------------------------------------


@dataclass
class DhtNode:
    """One node of a DhtNetwork: where it listens, its process, its files."""

    index: int
    ip: str
    port: int
    ready: Path
    log: Path
    dht_log: Path
    popen: subprocess.Popen[bytes] | None = None
    pid: int | None = None  # as the node itself reported it
    node_id: str | None = None
    table: tuple[str, ...] = ()  # addresses in its routing table, as last reported
    table_ids: tuple[str, ...] = ()  # and the node ids there (hex)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def not_ready(self) -> list[str]:
        return [] if self.read_ready() else [f"node {self.address} not ready"]

    def read_ready(self) -> bool:
        """Update pid, node_id and table from the ready file; False while there is none."""
        try:
            status = json.loads(self.ready.read_text())
        except FileNotFoundError:
            return False
        self.pid, self.node_id = int(status["pid"]), str(status["id"])
        self.table = tuple(str(address) for address in status["table"])
        self.table_ids = tuple(str(node_id) for node_id in status["ids"])
        return True


class DhtNetwork:
    """`count` OpenDHT nodes in the lab's pub namespace, each a process of its own; see the module docstring.

    bootstrap lists the nodes as "IP:PORT", what a plexus host passes as --dht-bootstrap (and network, its
    --dht-network). Logs and ready
    files live in a folder of this network's own inside the lab's (self.dir), removed by stop().
    """

    def __init__(self, lab: Lab, count: int = 3, base_port: int = BASE_PORT, network: int = 0) -> None:
        if count < 1:
            raise ValueError(f"a DHT network needs at least one node, not {count}")
        self.lab, self.count, self.base_port = lab, count, base_port
        self.network = network  # OpenDHT's network id: plexus's --dht-network
        self.nodes: list[DhtNode] = []
        self._dir: Path | None = None
        self.startup_s = 0.0

    def __str__(self) -> str:
        return f"DHT network of {self.count} nodes in {self.lab.netns('pub')}"

    # ---- addresses ---------------------------------------------------------------------------------------
    def addresses(self) -> list[str]:
        """The lab's server addresses that pub really has, in the lab's order."""
        from tests.lab.lab import LabError, run

        out = run(["ip", "-n", self.lab.netns("pub"), "-4", "-o", "addr", "show"]).stdout
        present = set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out))
        ips = [ip for ip in self.lab.PUB_IPS if ip in present]
        if not ips:
            raise LabError(f"none of {', '.join(self.lab.PUB_IPS)} is an address of pub:\n{out}")
        return ips

    @property
    def bootstrap(self) -> list[str]:
        return [node.address for node in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [node.popen.pid for node in self.nodes if node.popen is not None]

    @property
    def dir(self) -> Path:
        from tests.lab.lab import LabError

        if self._dir is None:
            raise LabError(f"{self} is not started")
        return self._dir

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the nodes; returns once each runs and each routing table holds all the other nodes."""
        from tests.lab.lab import LabError

        if self._dir is not None:
            raise LabError(f"{self} is already started")
        if self.lab.tmp is None:
            raise LabError("the lab is not up")
        started = time.monotonic()
        self._dir = Path(tempfile.mkdtemp(prefix="dht-", dir=self.lab.tmp))
        try:
            ips = self.addresses()
            for index in range(self.count):
                node = DhtNode(
                    index,
                    ips[index % len(ips)],
                    self.base_port + index,
                    self.dir / f"node-{index}.ready",
                    self.dir / f"node-{index}.log",
                    self.dir / f"node-{index}.opendht.log",
                )
                self._launch(node, [earlier.address for earlier in self.nodes])
                self.nodes.append(node)
                # The next node's bootstrap pings would be lost on a port not bound yet, and repeated only
                # seconds later: one node at a time.
                self._wait(started + FORM_WAIT_S, node.not_ready)
            self._wait(started + FORM_WAIT_S, self.missing)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started

    def _launch(self, node: DhtNode, bootstrap: list[str]) -> None:
        argv = [sys.executable, "-m", "tests.lab.dht", "node", "--bind", node.ip, "--port", str(node.port),
                "--ready", str(node.ready), "--dht-log", str(node.dht_log),
                "--network", str(self.network)]  # fmt: skip
        for address in bootstrap:
            argv += ["--bootstrap", address]
        with node.log.open("ab") as log:
            node.popen = self.lab.popen(
                "pub",
                argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: Ctrl-C in a terminal reaches only the test, which stops the nodes.
                start_new_session=True,
            )

    def _wait(self, deadline: float, gaps: Callable[[], list[str]]) -> None:
        from tests.lab.lab import LabError

        while True:
            self.check_running()
            missing = gaps()
            if not missing:
                return
            if time.monotonic() > deadline:
                raise LabError(f"{self} did not form in time: {'; '.join(missing)}\n{self.log_tail()}")
            time.sleep(0.01)

    def missing(self) -> list[str]:
        """What keeps the network from being formed: nodes not ready, or not knowing some other node."""
        from tests.lab.lab import LabError

        gaps: list[str] = []
        for node in self.nodes:
            if not_ready := node.not_ready():
                gaps += not_ready
                continue
            if node.popen is not None and node.pid != node.popen.pid:
                raise LabError(f"node {node.address} reports pid {node.pid}, started as {node.popen.pid}")
            unknown = [
                other.address for other in self.nodes if other is not node and other.address not in node.table
            ]
            if unknown:
                gaps.append(f"node {node.address} does not know {', '.join(unknown)}")
        return gaps

    def stop(self) -> None:
        """Stop every node (SIGTERM, SIGKILL after a grace) and anything else started with this network's
        files; remove its folder. Safe to call twice."""
        from tests.lab.lab import stop_process

        for node in self.nodes:
            if node.popen is not None:
                stop_process(node.popen, STOP_GRACE_S)
        if self._dir is not None:
            for pid in self.leftovers():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.nodes.clear()

    def leftovers(self) -> list[int]:
        """Processes still alive whose command line names this network's folder: none once stopped."""
        if self._dir is None:
            return []
        mark = str(self._dir).encode()
        found: list[int] = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if mark in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
        return found

    @property
    def running(self) -> bool:
        return bool(self.nodes) and all(node.running for node in self.nodes)

    def check_running(self) -> None:
        from tests.lab.lab import LabError

        for node in self.nodes:
            if not node.running:
                code = None if node.popen is None else node.popen.returncode
                raise LabError(
                    f"DHT node {node.address} is not running (exit code {code}).\n{self.log_tail()}"
                )

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of every node's log and OpenDHT log, for assertion messages."""
        parts: list[str] = []
        for node in self.nodes:
            for path in (node.log, node.dht_log):
                try:
                    text = path.read_text(errors="replace").splitlines()
                except OSError:
                    parts.append(f"(no log at {path})")
                    continue
                parts.append(f"--- last lines of {path} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) or f"(no logs of {self})"

    def probe(
        self,
        host: str,
        op: ProbeOp,
        key: str,
        value: str | None = None,
        *,
        port: int = 0,
        timeout: float = PROBE_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Run a probe in the host's namespace until it ends; its JSON report (value, timings: see run_probe),
        plus wall_s, the probe process's whole run. LabError if it fails."""
        from tests.lab.lab import LabError

        argv = self.probe_argv(op, key, value, port=port, timeout=timeout)
        started = time.monotonic()
        try:
            done = self.lab.exec(host, argv, cwd=ROOT, timeout=timeout + 10)
        except subprocess.TimeoutExpired as error:
            raise LabError(f"probe {op} {key!r} on {host} hung.\n{self.log_tail()}") from error
        if done.returncode != 0:
            raise LabError(
                f"probe {op} {key!r} on {host} exited {done.returncode}: {done.stdout}{done.stderr}\n"
                f"{self.log_tail()}"
            )
        report: dict[str, Any] = json.loads(done.stdout)
        report["wall_s"] = time.monotonic() - started
        return report

    def probe_argv(
        self,
        op: ProbeOp,
        key: str,
        value: str | None = None,
        *,
        port: int = 0,
        timeout: float = PROBE_TIMEOUT_S,
        ready: Path | None = None,
        json_output: bool = True,
    ) -> list[str]:
        """The command line of a probe against this network, for lab.exec / lab.popen in a host."""
        return probe_argv(self.bootstrap, op, key, value, port=port, timeout=timeout, ready=ready,
                          json_output=json_output, network=self.network)  # fmt: skip


def probe_argv(
    bootstrap: Sequence[str],
    op: ProbeOp,
    key: str,
    value: str | None = None,
    *,
    port: int = 0,
    timeout: float = PROBE_TIMEOUT_S,
    ready: Path | None = None,
    json_output: bool = True,
    network: int = 0,
) -> list[str]:
    if op not in get_args(ProbeOp):
        raise ValueError(f"unknown probe operation {op!r}; expected one of {', '.join(get_args(ProbeOp))}")
    argv = [sys.executable, "-m", "tests.lab.dht", "probe", op, "--key", key, "--port", str(port),
            "--timeout", str(timeout), "--network", str(network)]  # fmt: skip
    for address in bootstrap:
        argv += ["--bootstrap", address]
    if value is not None:
        argv += ["--value", value]
    if ready is not None:
        argv += ["--ready", str(ready)]
    if json_output:
        argv.append("--json")
    return argv


# ---- the node -------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)
    return stop


def run_node(
    bind: str, port: int, bootstrap: Sequence[str], ready: Path | None, dht_log: Path | None, network: int
) -> int:
    """Run a node until SIGTERM. Every call into the runner that takes its internal lock (getRoutingTablesLog,
    getBound, join, ...) happens while no Python callback can run: see the module docstring."""
    import opendht

    stop = _stop_event()
    runner = opendht.DhtRunner()
    runner.run(port=port, ipv4=bind, config=_config(network))
    if dht_log is not None:
        runner.enableFileLogging(str(dht_log))
    bound = f"{bind}:{runner.getBound(socket.AF_INET).getPort()}"
    node_id = str(runner.getNodeId())
    _log(f"node {node_id} on {bound}, pid {os.getpid()}, bootstrap {' '.join(bootstrap) or '(none)'}")
    pending = len(bootstrap)
    answered = threading.Condition()

    def pinged(address: str, ok: bool) -> None:
        nonlocal pending
        _log(f"ping to {address}: {'answered' if ok else 'no answer'}")
        with answered:
            pending -= 1
            answered.notify_all()

    for address in bootstrap:
        host, service = _split(address)
        runner.bootstrap(host, service)  # kept as a bootstrap node, to reconnect through
        # ... but addBootstrap pings only until one node answers; a ping to each makes each earlier node
        # learn this one now rather than at its first maintenance search, seconds later.
        runner.ping(opendht.SockAddr.resolve(host, service)[0], functools.partial(pinged, address))
    with answered:  # waiting here releases the GIL: the callbacks can run
        if not answered.wait_for(lambda: pending == 0, timeout=PING_WAIT_S):
            _log(f"{pending} of the pings did not end within {PING_WAIT_S:g} s")
            os._exit(3)  # polling the routing table now could deadlock with a late callback
    last: tuple[list[str], list[str]] | None = None
    while not stop.is_set():
        table = routing_table(runner)
        addresses, ids = sorted(address for _, address, _ in table), sorted(found for found, _, _ in table)
        if (addresses, ids) != last:
            status = {"pid": os.getpid(), "address": bound, "id": node_id, "table": addresses, "ids": ids}
            if ready is not None:
                _write_atomic(ready, json.dumps(status) + "\n")
            _log(
                "routing table: " + (", ".join(f"{a}{' good' if g else ''}" for _, a, g in table) or "empty")
            )
            last = addresses, ids
        stop.wait(0.05)
    _log("stopping")
    done = threading.Event()
    runner.shutdown(done.set)
    # Not join(): it would wait for the runner's lock holding the GIL, which the shutdown callback needs.
    _log("stopped" if done.wait(STOP_GRACE_S / 2) else "shutdown did not complete; exiting anyway")
    sys.stdout.flush()
    os._exit(0)


# ---- the probe ------------------------------------------------------------------------------------------


class _ProbeFailed(Exception):
    pass


def run_probe(
    op: ProbeOp,
    bootstrap: Sequence[str],
    key: str,
    value: str | None,
    port: int,
    timeout: float,
    ready: Path | None,
    json_output: bool,
    network: int = 0,
) -> int:
    """Put, get or listen once from this namespace; exits the process (0, 1 on timeout or failure, 2 on an
    unexpected error). The JSON report: op, key, ok, value, port (local UDP port), connected_s (from start
    until a node answered), listening_s (listen: until the listen was in place), elapsed_s (the operation
    itself: put until confirmed, get until the value came, listen from in place until the value came),
    total_s, and wall clock stamps started_at, op_started_at, at (when the put was confirmed or the value
    came); on failure, error instead of value."""
    import opendht

    started, started_at = time.monotonic(), time.time()
    deadline = started + timeout
    report: dict[str, Any] = {"op": op, "key": key, "ok": False}

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _ProbeFailed(f"timed out after {timeout:g} s")
        return left

    runner = opendht.DhtRunner()
    try:
        if op == "put" and value is None:
            raise _ProbeFailed("put needs --value")
        runner.run(port=port, ipv4="0.0.0.0", config=_config(network))
        report["port"] = runner.getBound(socket.AF_INET).getPort()
        for address in bootstrap:
            runner.bootstrap(*_split(address))
        while not any(good for _, _, good in routing_table(runner)):
            remaining()
            time.sleep(0.005)
        report["connected_s"] = round(time.monotonic() - started, 4)
        if op != "listen" and ready is not None:
            _write_atomic(ready, f"{report['port']}\n")
        infohash = opendht.InfoHash.get(key)
        found: queue.Queue[tuple[str, float]] = queue.Queue()

        def matches(text: str) -> bool:
            return value is None or text == value

        def on_value(v: Any, expired: bool = False) -> bool:
            text = bytes(v.data).decode(errors="replace")
            if not expired and matches(text):
                found.put((text, time.time()))
            return True

        op_started = time.monotonic()
        report["op_started_at"] = time.time()
        if op == "put":
            done: queue.Queue[bool] = queue.Queue()
            assert value is not None
            runner.put(infohash, opendht.Value(value.encode()), lambda ok, nodes: done.put(bool(ok)))
            try:
                if not done.get(timeout=remaining()):
                    raise _ProbeFailed("the put failed")
            except queue.Empty:
                raise _ProbeFailed(f"the put was not confirmed within {timeout:g} s") from None
            result, at = value, time.time()
        elif op == "get":
            result, at = _get_until_found(runner, infohash, on_value, found, remaining)
        else:
            runner.listen(infohash, on_value)
            # A get on the same key shares the listen's search: when it completes, the listen requests
            # have gone to the nodes that store the key.
            _sync(runner, infohash, remaining)
            report["listening_s"] = round(time.monotonic() - started, 4)
            if ready is not None:
                _write_atomic(ready, f"{report['port']}\n")
            op_started = time.monotonic()
            report["op_started_at"] = time.time()
            try:
                result, at = found.get(timeout=remaining())
            except queue.Empty:
                raise _ProbeFailed(f"no value within {timeout:g} s") from None
        report.update(ok=True, value=result, at=at, elapsed_s=round(time.monotonic() - op_started, 4))
        report["total_s"] = round(time.monotonic() - started, 4)
        report["started_at"] = started_at
        print(json.dumps(report) if json_output else result, flush=True)
        code = 0
    except _ProbeFailed as failure:
        report["error"] = str(failure)
        # Not the routing table: getRoutingTablesLog could deadlock with a late callback (module docstring)
        print(f"probe {op} {key!r}: {failure}", file=sys.stderr, flush=True)
        if json_output:
            print(json.dumps(report), flush=True)
        code = 1
    except Exception:
        traceback.print_exc()
        code = 2
    # No goodbye in Kademlia: the process just ends, the DHT forgets its node when it stops answering.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _sync(runner: Any, infohash: Any, remaining: Callable[[], float]) -> None:
    done: queue.Queue[bool] = queue.Queue()
    runner.get(infohash, lambda v: True, lambda ok, nodes: done.put(bool(ok)))
    try:
        done.get(timeout=remaining())
    except queue.Empty:
        raise _ProbeFailed("the search for the key did not complete") from None


def _get_once(runner: Any, infohash: Any, on_value: Callable[[Any], bool]) -> threading.Event:
    """Start a get; the event is set when it completes."""
    done = threading.Event()
    runner.get(infohash, on_value, lambda ok, nodes: done.set())
    return done


def _get_until_found(
    runner: Any,
    infohash: Any,
    on_value: Callable[[Any], bool],
    found: queue.Queue[tuple[str, float]],
    remaining: Callable[[], float],
) -> tuple[str, float]:
    """Get again and again until a matching value arrives."""
    while True:
        done = _get_once(runner, infohash, on_value)
        while True:
            with contextlib.suppress(queue.Empty):
                return found.get(timeout=min(0.05, remaining()))
            if done.is_set():
                break
        with contextlib.suppress(queue.Empty):
            return found.get(timeout=min(0.2, remaining()))


# ---- command line ---------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.lab.dht", description=(__doc__ or "").splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    node = commands.add_parser("node", help="run an OpenDHT node until SIGTERM")
    node.add_argument("--bind", required=True, help="IPv4 address to bind")
    node.add_argument("--port", type=int, default=BASE_PORT)
    node.add_argument("--bootstrap", action="append", default=[], metavar="IP:PORT")
    node.add_argument("--ready", type=Path, help="status file (JSON), rewritten on each change")
    node.add_argument("--dht-log", type=Path, help="OpenDHT's own log")
    node.add_argument("--network", type=int, default=0, help="OpenDHT network id (default 0)")
    probe = commands.add_parser("probe", help="put, get or listen for one value, then exit")
    probe.add_argument("op", choices=get_args(ProbeOp))
    probe.add_argument("--bootstrap", action="append", required=True, metavar="IP:PORT")
    probe.add_argument("--key", required=True, help="text; the DHT key is InfoHash.get(TEXT)")
    probe.add_argument("--value", help="the value to put; for get and listen, the value to wait for")
    probe.add_argument("--port", type=int, default=0, help="local UDP port (default: any)")
    probe.add_argument("--timeout", type=float, default=PROBE_TIMEOUT_S)
    probe.add_argument("--ready", type=Path, help="written once connected (listen: once listening)")
    probe.add_argument("--json", action="store_true", help="print a JSON object with timings")
    probe.add_argument("--network", type=int, default=0, help="OpenDHT network id (default 0)")
    args = parser.parse_args(argv)
    for address in args.bootstrap:
        try:
            _split(address)
        except ValueError as error:
            parser.error(str(error))
    if args.command == "node":
        return run_node(args.bind, args.port, args.bootstrap, args.ready, args.dht_log, args.network)
    return run_probe(
        args.op,
        args.bootstrap,
        args.key,
        args.value,
        args.port,
        args.timeout,
        args.ready,
        args.json,
        args.network,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
