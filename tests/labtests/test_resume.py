"""Streams that outlive either side's move behind NATs that filter per endpoint (issue 19): an ssh-style
--stdio stream from a to the echo target on b, both behind port-restricted cone NATs, while one side's NAT
forgets every mapping and maps it onto new outer ports (Lab.remap) or a new outer address (Lab.renumber)
mid-transfer. The peer's NAT drops the packets from the new endpoint until the peer punches toward it, which
it does on the rebind the side that moved sends over the rendezvous: by mail (the lab's SMTP and Dovecot)
and on the DHT (a private network in the lab's public namespace). Every byte arrives, in order, once; the
longest silence of the stream is measured and printed."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plexus.endpoint import Endpoint
from tests.lab import sessions
from tests.lab.dht import DhtNetwork
from tests.lab.lab import Lab
from tests.lab.services import BYE, CHUNK, TcpTarget, pattern
from tests.lab.sessions import Plexus, Side
from tests.labtests.test_dht import Hosts, dht_options, hosts
from tests.labtests.test_streams import Ids, acceptor_options, ids, inviter_options

__all__ = ["hosts", "ids"]  # the fixtures, used by name

pytestmark = pytest.mark.lab

TARGET = "127.0.0.1:7007"
SIZE = 16 << 20  # each way, written at RATE: the move lands mid-stream, with seconds of it to go
PAST = {"remap": "remapped", "renumber": "renumbered", "readdress": "readdressed"}
RATE = 4 << 20  # bytes per second: what ssh carrying a large file over a modest line might


@pytest.fixture(scope="module")
def network(_lab_instance: Lab) -> Iterator[DhtNetwork]:
    with DhtNetwork(_lab_instance) as started:
        yield started


class StdioTransfer:
    """`data` written to a --stdio inviter's stdin at `rate` bytes a second by one thread (then EOF, once
    `may_end` is set: a busy machine must not let the stream end before a move the test makes), its stdout
    read by another, which notes the longest time between two reads."""

    def __init__(self, invite: Plexus, data: bytes, rate: float = RATE) -> None:
        self.invite, self.data, self.rate = invite, data, rate
        self.received = bytearray()
        self.longest_silence = 0.0
        self.error: BaseException | None = None
        self.may_end = threading.Event()
        self._threads = [threading.Thread(target=self._guard, args=(f,)) for f in (self._write, self._read)]
        for thread in self._threads:
            thread.start()

    def _guard(self, work: object) -> None:
        try:
            work()  # type: ignore[operator]
        except (OSError, ValueError) as error:
            self.error = error

    def _write(self) -> None:
        stdin = self.invite.process.stdin
        assert stdin is not None
        view = memoryview(self.data)
        began = time.monotonic()
        for start in range(0, len(view), CHUNK):
            time.sleep(max(began + start / self.rate - time.monotonic(), 0))
            stdin.write(view[start : start + CHUNK])  # type: ignore[call-overload]
            stdin.flush()
        self.may_end.wait(120)
        stdin.close()

    def _read(self) -> None:
        stdout = self.invite.process.stdout
        assert stdout is not None
        last = time.monotonic()
        while chunk := stdout.read1(CHUNK):  # type: ignore[attr-defined]
            now = time.monotonic()
            if self.received:  # from the first byte: the session's setup is not a silence
                self.longest_silence = max(self.longest_silence, now - last)
            last = now
            self.received += chunk

    def wait_past(self, size: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < size:
            assert self.error is None and time.monotonic() < deadline, (
                self.error,
                len(self.received),
                self.invite.log()[-3000:],
            )
            time.sleep(0.01)

    def finish(self, timeout: float) -> None:
        """Every byte written came back, in order, then the echo's BYE; the inviter exits 0."""
        self.may_end.set()
        for thread in self._threads:
            thread.join(timeout)
        assert self.error is None, self.error
        expected = self.data + BYE
        assert bytes(self.received) == expected, (
            f"{len(self.received)} of {len(expected)} bytes\n{self.invite.log()[-3000:]}"
        )
        assert self.invite.process.wait(timeout) == 0, self.invite.log()[-3000:]


def _survives(lab: Lab, acceptor: Plexus, invite: Plexus, how: str, mover: str, change: str) -> None:
    """Change the outer endpoint of `mover` (a, the inviter, or b, the acceptor) mid-transfer (`change`:
    Lab.remap, a new port; Lab.renumber, a new address too) and check what each side did; print the
    figures."""
    moving, other = (invite, acceptor) if mover == "a" else (acceptor, invite)
    transfer = StdioTransfer(invite, pattern(SIZE))
    transfer.wait_past(SIZE // 8, timeout=60)
    changed_at = time.time()
    getattr(lab, change)(mover)
    try:
        (remapped,) = moving.wait_events("remapped", timeout=10)
        (rebound,) = other.wait_events("rebound", timeout=15)
        (moved,) = other.wait_events("migrated", timeout=15)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{invite.log()[-4000:]}\n{acceptor.log()[-4000:]}") from None
    transfer.finish(timeout=120)
    after = Endpoint.parse(remapped["after"])
    assert Endpoint.parse(rebound["outer"]) == after == Endpoint.parse(moved["after"]), (rebound, moved)
    assert Endpoint.parse(remapped["before"]) == Endpoint.parse(moved["before"]) != after
    assert after.host == lab.public_ip(mover)
    print(
        f"{how}: {SIZE >> 20} MiB each way through --stdio, {mover} {PAST[change]} mid-transfer: STUN saw"
        f" the move {remapped['at'] - changed_at:.2f} s after, the peer took the rebind at"
        f" {rebound['at'] - changed_at:.2f} s and moved at {moved['at'] - changed_at:.2f} s; longest"
        f" silence {transfer.longest_silence * 1000:.0f} ms"
    )
    assert [event["error"] for event in acceptor.wait_events("ended", timeout=10)] == [None]


MOVES = [("a", "remap"), ("a", "renumber"), ("b", "remap"), ("b", "renumber"), ("a", "readdress")]


@pytest.mark.parametrize(("mover", "change"), [*MOVES[:3], MOVES[4]])
def test_a_stdio_stream_survives_either_sides_move_behind_filtering_nats_by_mail(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids, mover: str, change: str
) -> None:
    """A new outer port (the NAT forgot its mappings), a new outer address (a new lease, a new network),
    on the inviter's side and on the acceptor's; and the inviter's own address changing (Wi-Fi to
    tethering: its streams socket, bound to every address, sends from the new one)."""
    lab.set_nat("a", "cone")
    lab.set_nat("b", "cone")
    with TcpTarget(lab, "b", "echo", port=7007):
        acceptor, me, peer = sessions.accepting(
            lab, tmp_path, running, overrides=acceptor_options(ids, TARGET)
        )
        invite = sessions.start(
            lab,
            me,
            peer,
            tmp_path,
            accept=False,
            overrides=inviter_options(ids, stdio=TARGET),
            stdin=subprocess.PIPE,
            text=False,
        )
        running.append(invite)
        _survives(lab, acceptor, invite, "mail", mover, change)


@pytest.mark.parametrize(("mover", "change"), [MOVES[0], MOVES[3]])
def test_a_stdio_stream_survives_either_sides_move_behind_filtering_nats_on_the_dht(
    lab: Lab,
    tmp_path: Path,
    running: list[Plexus],
    network: DhtNetwork,
    hosts: Hosts,
    mover: str,
    change: str,
) -> None:
    lab.set_nat("a", "cone")
    lab.set_nat("b", "cone")
    with TcpTarget(lab, "b", "echo", port=7007):
        allow = {"exec-command": None, "forward-allow": TARGET}
        me, peer = Side("a", lab.accounts["local"], "a-dht"), Side("b", lab.accounts["remote"], "b-dht")
        overrides = dht_options(network, hosts.acceptor_file, hosts.inviter) | allow
        acceptor = sessions.start(lab, peer, me, tmp_path, accept=True, overrides=overrides)
        running.append(acceptor)
        sessions.wait_until_listening(acceptor)
        inviter = dht_options(network, hosts.inviter_file, hosts.acceptor) | {
            "exec-command": None,
            "stdio": TARGET,
        }
        invite = sessions.start(
            lab, me, peer, tmp_path, accept=False, overrides=inviter, stdin=subprocess.PIPE, text=False
        )
        running.append(invite)
        _survives(lab, acceptor, invite, "DHT", mover, change)
