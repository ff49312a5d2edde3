"""Streams: one TCP connection carried by plexus's QUIC over the punched path, side by side with what the same
lab path gives without plexus.

Hosts a and b are behind cone NATs with clean 0 ms links throughout, except for the plain-TCP ceiling.
Each path gets the same tests:

- bulk: one TCP connection from a sends `mib` MiB (a random MiB, repeated) into a sink target on b, which
  answers `<length> <sha256>` after the EOF; timed from the connect until that answer, which is checked;
- round trips: one TCP connection to an echo target on b, `round_trips` times one byte there and back (after
  a few not counted), each timed on its own; every byte must come back, and the echo's last line after EOF.

The paths:

- tcp: plain TCP between the hosts with both NATs in mode "none" (public addresses, the routers only route):
  the same links and routers, nothing in between, the ceiling;
- plexus: `--accept --forward-allow` on b, `--forward` on a (the targets on b's 127.0.0.1); the CPU time of
  both plexus processes (/proc/PID/stat) is read before and after the bulk transfer;
- openvpn: exec/exec.sh launched by a plexus session, as the reconnect soak runs it; the targets
  listen on b's tunnel address, and the CPU time of each host's openvpn is read like plexus's;
- openvpn-carried: the same with `--carry` on both sides: each openvpn talks to its plexus on loopback and
  plexus passes every datagram between it and the punched path (plexus/carry.py), so the CPU time read is
  each host's openvpn and plexus together, and plexus's alone beside it (`carrier_cpu_seconds`): what
  carrying costs; for both, the datagrams each host's kernel dropped over the transfer because a
  receiving socket's buffer was full (`receive_buffer_drops`);
- udp: the raw path, no encryption and no congestion control: a Python sender on a punches its own hole
  through both NATs to a Python receiver on b (each side sends to the other's public address from a fixed
  port, which Linux masquerade keeps) and sends `mib` MiB in 1400-byte datagrams (plexus's QUIC datagram
  size) as fast as one send loop goes; the receiver counts what arrives, and b's kernel what it dropped
  because the receiving socket's buffer was full.

Then the time from starting `ssh` with plexus as its ProxyCommand (`--stdio=127.0.0.1:22`, a fresh session
every time) until the remote command's first output, `ssh_runs` times, beside ssh through a plain relay
(tests/lab/services.py's `pipe`, no plexus) to the same sshd.

Run as a program, this module is the raw-path sender and receiver (in the lab's namespaces):

    python -m bench.streams udp-receive --bind IP:PORT --peer IP:PORT --ready FILE
    python -m bench.streams udp-send --bind IP:PORT --peer IP:PORT --bytes N
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.runs import sample
from bench.stats import quantile
from plexus import identity
from tests.lab import sessions, tunnel
from tests.lab.lab import Lab, stop_process
from tests.lab.services import BYE, Sshd, TcpTarget, proxy_command
from tests.lab.sessions import Plexus, Side

MIB = 1024 * 1024
DATAGRAM = 1400  # bytes of UDP payload, as plexus's QUIC datagrams (docs/streams.md)
UDP_PORTS = {"a": 41001, "b": 41002}  # the raw path's fixed ports on each host
LOCAL_SINK, LOCAL_ECHO = 17009, 17007  # --forward's listening ports on a
WARM_UP = 20  # round trips before the counted ones (the stream's opening, the first allocations)
TIMEOUT = 120.0
SSH_TIMEOUT = 90.0
# The targets of the issue: reported beside the figures, never a failure of the benchmark
TARGET_MBIT = 200.0
TARGET_ADDED_RTT_MS = 1.0


def progress_none(message: str) -> None:
    pass


# ---- measurements of one path, run in a's namespace (lab.run_sync) -----------------------------------------


@dataclass(frozen=True)
class Bulk:
    sent: int  # bytes
    seconds: float  # from the connect until the sink's answer
    reply: str  # what the sink answered
    expected: str  # `<length> <sha256>` of what was sent

    @property
    def ok(self) -> bool:
        return self.reply == self.expected

    @property
    def mbit_s(self) -> float:
        return self.sent * 8 / self.seconds / 1e6

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.sent, "seconds": round(self.seconds, 4), "mbit_s": round(self.mbit_s, 1),
                "ok": self.ok, "reply": self.reply, "expected": self.expected}  # fmt: skip


def block_and_expected(mib: int) -> tuple[bytes, str]:
    """A random MiB (no path compresses it) and the sink's answer to `mib` of them."""
    block = os.urandom(MIB)
    digest = hashlib.sha256()
    for _ in range(mib):
        digest.update(block)
    return block, f"{mib * MIB} {digest.hexdigest()}"


def bulk(address: str, port: int, block: bytes, mib: int, expected: str) -> Bulk:
    """One connection: `mib` times `block` into the sink, EOF, its answer."""
    started = time.monotonic()
    with socket.create_connection((address, port), timeout=TIMEOUT) as sock:
        for _ in range(mib):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        answer = bytearray()
        while chunk := sock.recv(4096):
            answer += chunk
    seconds = time.monotonic() - started
    return Bulk(mib * MIB, seconds, answer.decode(errors="replace").strip(), expected)


@dataclass(frozen=True)
class RoundTrips:
    seconds: list[float]  # each counted round trip
    wrong: int  # round trips whose byte did not come back as sent, plus 1 if the echo's last line was wrong

    def to_json(self) -> dict[str, Any]:
        ms = [s * 1000 for s in self.seconds]
        return {"n": len(ms), "median_ms": round(statistics.median(ms), 4),
                "p95_ms": round(quantile(ms, 0.95), 4), "min_ms": round(min(ms), 4),
                "max_ms": round(max(ms), 4), "wrong": self.wrong}  # fmt: skip


def round_trips(address: str, port: int, count: int) -> RoundTrips:
    """`count` one-byte round trips through the echo target, after WARM_UP not counted."""
    seconds, wrong = [], 0
    with socket.create_connection((address, port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for number in range(WARM_UP + count):
            byte = bytes([number % 256])
            started = time.perf_counter()
            sock.sendall(byte)
            back = sock.recv(1)
            elapsed = time.perf_counter() - started
            if back != byte:
                wrong += 1
            if number >= WARM_UP:
                seconds.append(elapsed)
        sock.shutdown(socket.SHUT_WR)
        rest = bytearray()
        while chunk := sock.recv(4096):
            rest += chunk
    return RoundTrips(seconds, wrong + (bytes(rest) != BYE))


# ---- CPU time ----------------------------------------------------------------------------------------------


def plexus_pid(plexus: Plexus) -> int:
    """The process's pid, checked to be plexus itself: `ip netns exec` execs, so the Popen's pid runs
    `python -m plexus` rather than ip."""
    pid = plexus.process.pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if argv[1:3] != [b"-m", b"plexus"]:
        raise RuntimeError(f"pid {pid} is not plexus itself: {argv!r}")
    return pid


def cpu(pids: list[int]) -> float:
    """User + system seconds of these processes so far (not their children)."""
    return sum(sample(pid).cpu for pid in pids)


# ---- plexus: an acceptor on b with --forward-allow, an inviter on a ----------------------------------------


@dataclass(frozen=True)
class Ids:
    """Both hosts' identity files and ids (made on first use)."""

    inviter_file: Path
    acceptor_file: Path

    @classmethod
    def make(cls, directory: Path) -> Ids:
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory / "laptop.key", directory / "home.key")

    @property
    def inviter(self) -> str:
        return identity.Identity.load(self.inviter_file).id

    @property
    def acceptor(self) -> str:
        return identity.Identity.load(self.acceptor_file).id

    def acceptor_options(self, *allowed: str) -> dict[str, str | None]:
        return {"exec-command": None, "forward-allow": ",".join(allowed), "identity": str(self.acceptor_file),
                "peer-identity": self.inviter, "log-level": "info"}  # fmt: skip

    def inviter_options(self, **extra: str | None) -> dict[str, str | None]:
        return {"exec-command": None, "identity": str(self.inviter_file), "peer-identity": self.acceptor,
                "log-level": "info", **extra}  # fmt: skip


@contextlib.contextmanager
def streams_acceptor(
    lab: Lab, workdir: Path, ids: Ids, *allowed: str, extra: Mapping[str, str | None] | None = None
) -> Iterator[tuple[Plexus, Side, Side]]:
    """A listening acceptor on b allowing those targets, with `extra` options (another rendezvous, say)."""
    inviter_side, acceptor_side = sessions.pair(lab)
    overrides = ids.acceptor_options(*allowed) | dict(extra or {})
    acceptor = sessions.start(lab, acceptor_side, inviter_side, workdir, accept=True, overrides=overrides)
    try:
        sessions.wait_until_listening(acceptor)
        yield acceptor, inviter_side, acceptor_side
    finally:
        acceptor.stop()


@contextlib.contextmanager
def forwarding(
    lab: Lab,
    workdir: Path,
    ids: Ids,
    me: Side,
    peer: Side,
    forwards: list[str],
    extra: Mapping[str, str | None] | None = None,
) -> Iterator[Plexus]:
    """A --forward inviter on a (with `extra` options: a TURN server, say), once it listens on every port;
    stopped with SIGINT (as a user would)."""
    overrides = ids.inviter_options(forward=",".join(forwards), **(extra or {}))
    invite = sessions.start(lab, me, peer, workdir, accept=False, overrides=overrides)
    try:
        deadline = time.monotonic() + 60
        while len(invite.events("forwarding")) < len(forwards):
            if invite.process.poll() is not None:
                raise RuntimeError(f"--forward inviter exited {invite.process.returncode}: {invite.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"--forward inviter not listening after 60 s\n{invite.log()}")
            time.sleep(0.05)
        yield invite
    finally:
        if invite.process.poll() is None:
            invite.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                invite.process.wait(10)
        invite.stop()


def laptop_config(lab: Lab, workdir: Path, me: Side, peer: Side, ids: Ids) -> Path:
    """The inviter's options in a --config file, as ~/.ssh/config's ProxyCommand names it."""
    values = sessions.options(lab, me, peer) | ids.inviter_options() | {"log-file": str(workdir / "ssh.log")}
    path = workdir / "laptop.conf"
    path.write_text("".join(f"{key} = {value}\n" for key, value in values.items() if value is not None))
    path.chmod(0o600)
    return path


def first_output(lab: Lab, argv: list[str]) -> tuple[float, str]:
    """Start ssh on a: seconds until its first line of output, and all its output (stdout, or stderr and
    the exit code when it failed)."""
    started = time.monotonic()
    ssh = lab.popen("a", argv, cwd=sessions.ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)  # fmt: skip
    watchdog = threading.Timer(SSH_TIMEOUT, ssh.kill)
    watchdog.start()
    try:
        assert ssh.stdout is not None
        line = ssh.stdout.readline()
        seconds = time.monotonic() - started
        rest, errors = ssh.communicate()
    finally:
        watchdog.cancel()
        stop_process(ssh)
    if ssh.returncode != 0:
        return seconds, f"exit {ssh.returncode}: {errors.strip()}"
    return seconds, line + rest


# ---- the raw path: a UDP sender and receiver, each its own process -----------------------------------------


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def udp_receive(
    bind: tuple[str, int], peer: tuple[str, int], ready: Path, quiet: float = 3.0
) -> dict[str, Any]:
    """Punch toward the peer, answering each of its punches, then count datagrams until its END (or `quiet`
    seconds without any once they flow)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(bind)
        sock.connect(peer)  # the kernel drops anyone else's
        ready.write_text("ready\n")
        sock.settimeout(0.02)
        buffer = bytearray(65536)
        count = total = 0
        first = last = 0.0
        deadline = time.monotonic() + 30
        sent_by_peer = None
        while True:
            try:
                size = sock.recv_into(buffer)
            except (TimeoutError, ConnectionRefusedError):  # refused: ICMP for a punch that found no hole
                now = time.monotonic()
                if count and now - last > quiet:
                    break
                if not count and now > deadline:
                    raise TimeoutError("udp-receive: no datagram from the peer in 30 s") from None
                if not count:
                    with contextlib.suppress(ConnectionRefusedError):
                        sock.send(b"PUNCH")
                continue
            if size == DATAGRAM:
                last = time.monotonic()
                if not count:
                    first = last
                    sock.settimeout(quiet)
                count += 1
                total += size
            elif buffer[:size] == b"PUNCH":
                with contextlib.suppress(ConnectionRefusedError):
                    sock.send(b"PUNCH")  # the sender starts once it hears one: both NATs hold the mapping
            elif buffer[:4] == b"END ":
                sent_by_peer = int(buffer[4:size])
                break
    return {"datagrams": count, "bytes": total, "seconds": last - first, "sent_by_peer": sent_by_peer}


def udp_send(bind: tuple[str, int], peer: tuple[str, int], size: int) -> dict[str, Any]:
    """Punch until the peer's punch arrives (both NATs then hold the mapping), then send `size` bytes in
    DATAGRAM-byte datagrams as fast as the loop goes, then END with the count."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(bind)
        sock.connect(peer)
        sock.settimeout(0.02)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(ConnectionRefusedError):
                sock.send(b"PUNCH")
            try:
                if sock.recv(64) == b"PUNCH":
                    break
            except (TimeoutError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise TimeoutError("udp-send: the peer was never heard") from None
        sock.setblocking(True)
        payload = bytes(DATAGRAM)
        datagrams = -(-size // DATAGRAM)
        errors = 0
        send = sock.send
        started = time.monotonic()
        for _ in range(datagrams):
            try:
                send(payload)
            except (ConnectionRefusedError, BlockingIOError):
                errors += 1
        seconds = time.monotonic() - started
        time.sleep(0.2)  # let the last ones arrive before the END
        for _ in range(20):
            with contextlib.suppress(ConnectionRefusedError):  # the receiver closes after the first
                sock.send(f"END {datagrams - errors}".encode())
            time.sleep(0.01)
    return {"datagrams": datagrams - errors, "bytes": (datagrams - errors) * DATAGRAM, "seconds": seconds}


def rcvbuf_errors(lab: Lab, host: str) -> int:
    """Datagrams the host's kernel dropped so far because a socket's receive buffer was full."""
    rows = [line.split() for line in lab.exec(host, ["cat", "/proc/net/snmp"]).stdout.splitlines()
            if line.startswith("Udp:")]  # fmt: skip
    return int(dict(zip(rows[0], rows[1], strict=True))["RcvbufErrors"])


def raw_udp(lab: Lab, workdir: Path, mib: int) -> dict[str, Any]:
    ports = UDP_PORTS
    ready = workdir / "udp-ready"
    ready.unlink(missing_ok=True)
    python = [sys.executable, "-m", "bench.streams"]
    overflowed = rcvbuf_errors(lab, "b")
    receive = [*python, "udp-receive", "--bind", f"{lab.inner_ip('b')}:{ports['b']}",
               "--peer", f"{lab.public_ip('a')}:{ports['a']}", "--ready", str(ready)]  # fmt: skip
    receiver = lab.popen("b", receive, cwd=sessions.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            if receiver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"udp-receive did not start: {receiver.communicate()[1]}")
            time.sleep(0.02)
        sender = lab.exec("a", [*python, "udp-send", "--bind", f"{lab.inner_ip('a')}:{ports['a']}",
                                "--peer", f"{lab.public_ip('b')}:{ports['b']}", "--bytes", str(mib * MIB)],
                          cwd=sessions.ROOT, timeout=TIMEOUT)  # fmt: skip
        if sender.returncode != 0:
            raise RuntimeError(f"udp-send failed: {sender.stderr.strip()}")
        out, err = receiver.communicate(timeout=30)
        if receiver.returncode != 0:
            raise RuntimeError(f"udp-receive failed: {err.strip()}")
        overflowed = rcvbuf_errors(lab, "b") - overflowed
    finally:
        stop_process(receiver)
    sent, received = json.loads(sender.stdout), json.loads(out)
    seconds = received["seconds"] or float("inf")
    return {
        "datagram_bytes": DATAGRAM,
        "sent_datagrams": sent["datagrams"],
        "received_datagrams": received["datagrams"],
        "loss_pct": round(100 * (1 - received["datagrams"] / sent["datagrams"]), 2),
        "receive_buffer_drops": overflowed,  # of the lost: the receiver did not read them in time
        "send_seconds": round(sent["seconds"], 4),
        "send_mbit_s": round(sent["bytes"] * 8 / sent["seconds"] / 1e6, 1),
        "receive_seconds": round(received["seconds"], 4),
        "mbit_s": round(received["bytes"] * 8 / seconds / 1e6, 1),
    }


# ---- the section -------------------------------------------------------------------------------------------


def measure(
    lab: Lab,
    workdir: Path,
    mib: int,
    count: int,
    ssh_runs: int,
    progress: Callable[[str], None] = progress_none,
) -> dict[str, Any]:
    """Everything the section reports, as the results' `streams` entry."""
    workdir.mkdir(parents=True, exist_ok=True)
    block, expected = block_and_expected(mib)
    results: dict[str, Any] = {"mib": mib, "round_trips": count, "ssh_runs": ssh_runs,
                               "bulk": {}, "rtt": {}, "cpu_seconds": {}}  # fmt: skip

    def transfer(name: str, address: str, sink: int) -> None:
        done = lab.run_sync("a", lambda: bulk(address, sink, block, mib, expected))
        results["bulk"][name] = done.to_json()
        wrong = "" if done.ok else f" (WRONG ANSWER {done.reply!r})"
        progress(f"  {name}: {done.mbit_s:.0f} Mbit/s{wrong}")

    def trips(name: str, address: str, echo: int) -> None:
        results["rtt"][name] = lab.run_sync("a", lambda: round_trips(address, echo, count)).to_json()
        progress(f"  {name}: RTT median {results['rtt'][name]['median_ms']:.3f} ms")

    @contextlib.contextmanager
    def costs(name: str, pids: tuple[list[int], list[int]], into: str = "cpu_seconds") -> Iterator[None]:
        """The CPU seconds of the processes on a and on b over the block (the bulk transfer)."""
        before = [cpu(side) for side in pids]
        yield
        after = [cpu(side) for side in pids]
        results.setdefault(into, {})[name] = {"inviter": round(after[0] - before[0], 3),
                                              "acceptor": round(after[1] - before[1], 3)}  # fmt: skip

    # One sink and one echo on b for every path: on 0.0.0.0 they are b's loopback targets for plexus, its
    # public address while its NAT is "none", and its tunnel address under OpenVPN.
    with TcpTarget(lab, "b", "sink", address="0.0.0.0") as sink, \
            TcpTarget(lab, "b", "echo", address="0.0.0.0") as echo:  # fmt: skip
        progress(f"streams: plain TCP a -> b without NAT, {mib} MiB and {count} round trips")
        for host in ("a", "b"):
            lab.set_nat(host, "none")
        try:
            transfer("tcp", lab.inner_ip("b"), sink.port)
            trips("tcp", lab.inner_ip("b"), echo.port)
        finally:
            for host in ("a", "b"):
                lab.set_nat(host, "cone")

        progress(f"streams: raw UDP through the punched NATs, {mib} MiB in {DATAGRAM}-byte datagrams")
        results["udp"] = raw_udp(lab, workdir, mib)
        udp = results["udp"]
        progress(f"  udp: {udp['mbit_s']:.0f} Mbit/s received of {udp['send_mbit_s']:.0f} Mbit/s sent, "
                 f"loss {udp['loss_pct']:.1f} %")  # fmt: skip

        progress("streams: plexus --forward a -> b")
        ids = Ids.make(workdir / "ids")
        with Sshd(lab, "b") as sshd:
            allowed = [f"127.0.0.1:{port}" for port in (sink.port, echo.port, sshd.port)]
            with streams_acceptor(lab, workdir, ids, *allowed) as (acceptor, me, peer):
                forwards = [f"{LOCAL_SINK}:127.0.0.1:{sink.port}", f"{LOCAL_ECHO}:127.0.0.1:{echo.port}"]
                with forwarding(lab, workdir, ids, me, peer, forwards) as invite:
                    with costs("plexus", ([plexus_pid(invite)], [plexus_pid(acceptor)])):
                        transfer("plexus", "127.0.0.1", LOCAL_SINK)
                    trips("plexus", "127.0.0.1", LOCAL_ECHO)
                progress(f"streams: ssh through plexus --stdio, {ssh_runs} runs")
                config = laptop_config(lab, workdir, me, peer, ids)
                through = f"{sys.executable} -m plexus --config {config} --stdio=127.0.0.1:{sshd.port}"
                results["ssh"] = {"plexus": ssh_times(lab, sshd, through, ssh_runs, progress)}
            direct = proxy_command(lab, "b", "127.0.0.1", sshd.port)
            results["ssh"]["pipe"] = ssh_times(lab, sshd, direct, ssh_runs, progress)

        for name, carry in (("openvpn", False), ("openvpn-carried", True)):
            progress(f"streams: OpenVPN (exec.sh) through a plexus session{' with --carry' if carry else ''}")
            with openvpn(lab, workdir, carry) as (far, carriers):
                per_host = {host: sessions.pids_of(lab, host, "openvpn") for host in ("a", "b")}
                if any(len(found) != 1 for found in per_host.values()):
                    raise RuntimeError(f"expected one openvpn per host, found {per_host}")
                carrying = [[plexus_pid(carrier)] for carrier in carriers] or [[], []]
                with contextlib.ExitStack() as costing:
                    costing.enter_context(
                        costs(name, (per_host["a"] + carrying[0], per_host["b"] + carrying[1]))
                    )
                    if carriers:
                        costing.enter_context(costs(name, (carrying[0], carrying[1]), "carrier_cpu_seconds"))
                    overflowed = {host: rcvbuf_errors(lab, host) for host in ("a", "b")}
                    transfer(name, far, sink.port)
                # Neither tunnel paces its datagrams: what a full socket buffer drops, the TCP inside resends
                # and slows down for
                results.setdefault("receive_buffer_drops", {})[name] = {
                    host: rcvbuf_errors(lab, host) - before for host, before in overflowed.items()
                }
                trips(name, far, echo.port)
    results["added_rtt_ms"] = {
        name: {key: round(results["rtt"][name][key] - results["rtt"]["tcp"][key], 4)
               for key in ("median_ms", "p95_ms")}
        for name in ("plexus", "openvpn", "openvpn-carried")
    }  # fmt: skip
    # What carrying costs beside the plain tunnel: throughput kept, round-trip time added
    plain, carried = results["bulk"]["openvpn"], results["bulk"]["openvpn-carried"]
    results["carried"] = {
        "mbit_s_ratio": round(carried["mbit_s"] / plain["mbit_s"], 3),
        "added_rtt_ms": {key: round(results["added_rtt_ms"]["openvpn-carried"][key]
                                    - results["added_rtt_ms"]["openvpn"][key], 4)
                         for key in ("median_ms", "p95_ms")},
    }  # fmt: skip
    results["cpu_seconds_per_mib"] = {
        name: {side: round(seconds / mib, 5) for side, seconds in sides.items()}
        for name, sides in results["cpu_seconds"].items()
    }
    # Busy share of one core during the transfer: near 1, that side is what limits the stream
    results["cpu_share"] = {
        name: {side: round(seconds / results["bulk"][name]["seconds"], 3) for side, seconds in sides.items()}
        for name, sides in results["cpu_seconds"].items()
    }
    results["targets"] = {
        "one_stream_mbit_s": TARGET_MBIT,
        "added_rtt_ms": TARGET_ADDED_RTT_MS,
        "throughput_met": results["bulk"]["plexus"]["mbit_s"] >= TARGET_MBIT,
        "rtt_met": results["added_rtt_ms"]["plexus"]["median_ms"] < TARGET_ADDED_RTT_MS,
    }
    return results


def ssh_times(lab: Lab, sshd: Sshd, proxy: str, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    seconds, wrong = [], []
    for _ in range(runs):
        took, output = first_output(lab, sshd.client_argv(proxy, ["echo", "hello from b"]))
        if output != "hello from b\n":
            wrong.append(output.strip()[-300:])
        else:
            seconds.append(took)
        progress(f"  ssh: {took:.2f} s" + ("" if output == "hello from b\n" else f" ({output.strip()})"))
    return {
        "seconds": [round(s, 3) for s in seconds],
        "median_seconds": round(statistics.median(seconds), 3) if seconds else None,
        "wrong": wrong,
    }


@contextlib.contextmanager
def openvpn(lab: Lab, workdir: Path, carry: bool = False) -> Iterator[tuple[str, list[Plexus]]]:
    """A tunnel as the soak has it (exec.sh on both hosts, launched by one plexus session); yields b's tunnel
    address once a ping crosses, and with `carry` both plexus processes carrying it (a's, then b's; without,
    none: the inviter has exited once it launched exec.sh). Every openvpn is stopped on leaving."""
    # A folder per path: exec.sh init refuses one that holds keys
    folders = tunnel.pinned_pair(workdir / ("openvpn-carried" if carry else "openvpn"))
    inviter_side, acceptor_side = sessions.pair(lab)
    # info as a user runs it: a carrying plexus is in the data path, and its CPU is measured
    options: dict[str, str | None] = {"exec-command": str(tunnel.EXEC_SH), "exec-args": tunnel.SIX_ARGS,
                                      "log-level": "info"}  # fmt: skip
    if carry:
        options["carry"] = ""

    def start(me: Side, peer: Side, folder: Path, accept: bool) -> Plexus:
        return sessions.start(lab, me, peer, workdir, accept=accept, overrides=options,
                              env={"PLEXUS_OPENVPN_DIR": str(folder)})  # fmt: skip

    acceptor = start(acceptor_side, inviter_side, folders[1], True)
    invite: Plexus | None = None
    try:
        sessions.wait_until_listening(acceptor)
        invite = start(inviter_side, acceptor_side, folders[0], False)
        if not carry:  # the inviter exits once it launched exec.sh; a carrier stays with the command
            code = invite.wait(90)
            if code != 0:
                raise RuntimeError(f"the OpenVPN session's inviter exited {code}: {invite.stderr()}")
        addresses = tunnel.first_ping(lab, time.monotonic() + 90)
        far = tunnel.tun_addresses(lab, "b")
        if addresses is None or far is None:
            raise RuntimeError(f"no ping crossed the OpenVPN tunnel within 90 s\n{invite.log()[-3000:]}")
        carriers = [invite, acceptor] if carry else []
        for plexus in carriers:
            if plexus.process.poll() is not None:
                raise RuntimeError(f"a carrying plexus exited {plexus.process.returncode}: {plexus.stderr()}")
        yield far[0], carriers
    finally:
        if invite is not None:
            invite.stop()
        acceptor.stop()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for host in ("a", "b"):
                sessions.signal_launched(lab, host, "openvpn", sig)
            deadline = time.monotonic() + 10
            while (
                any(sessions.pids_of(lab, h, "openvpn") for h in ("a", "b")) and time.monotonic() < deadline
            ):
                time.sleep(0.1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description="the raw path's two ends")
    commands = parser.add_subparsers(dest="command", required=True)
    receive = commands.add_parser("udp-receive")
    receive.add_argument("--bind", type=_endpoint, required=True)
    receive.add_argument("--peer", type=_endpoint, required=True)
    receive.add_argument("--ready", type=Path, required=True)
    send = commands.add_parser("udp-send")
    send.add_argument("--bind", type=_endpoint, required=True)
    send.add_argument("--peer", type=_endpoint, required=True)
    send.add_argument("--bytes", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "udp-receive":
        found = udp_receive(args.bind, args.peer, args.ready)
    else:
        found = udp_send(args.bind, args.peer, args.bytes)
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
