"""Streams that outlive the inviter's NAT mapping it anew (issue 19): a --forward stream between a (behind a
cone or symmetric NAT) and b (public, or behind a full-cone NAT: neither filters per endpoint) while a's NAT
forgets every mapping and maps a onto new outer ports mid-transfer (Lab.remap). The acceptor hears the
inviter's packets from the new endpoint, validates it and sends there (QUIC migration, streams/quic.py).
Behind a NAT that filters per endpoint, b drops them: that takes a rebind over the rendezvous (not here)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from plexus.endpoint import Endpoint
from plexus.streams import quic
from tests.lab.lab import REMAP_RANGES, Lab
from tests.lab.services import BYE, CHUNK, Duplex, TcpTarget, exchange, pattern
from tests.lab.sessions import Plexus
from tests.labtests.test_streams import Ids, forwarding, ids, start_acceptor

__all__ = ["ids"]  # the fixture, used by name

pytestmark = pytest.mark.lab


class Transfer(Duplex):
    """A bulk transfer through the echo target from inside a's namespace: one thread writes `data` and
    half-closes, another reads everything back, noting the longest time between two reads."""

    def __init__(self, lab: Lab, port: int, data: bytes) -> None:
        self.data = data
        self.received = bytearray()
        self.longest_silence = 0.0
        super().__init__(lab, "a", port, timeout=90)
        self.start()

    def _write(self) -> None:
        view = memoryview(self.data)
        for start in range(0, len(view), CHUNK):
            self._sock.sendall(view[start : start + CHUNK])
        self._sock.shutdown(socket.SHUT_WR)

    def _read(self) -> None:
        last = time.monotonic()
        while chunk := self._sock.recv(CHUNK):
            now = time.monotonic()
            self.longest_silence = max(self.longest_silence, now - last)
            last = now
            self.received += chunk

    def wait_past(self, size: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < size:
            assert self.error is None and time.monotonic() < deadline, (self.error, len(self.received))
            time.sleep(0.01)

    def finish(self, timeout: float) -> bytes:
        self.join(timeout)
        assert self.error is None, self.error
        return bytes(self.received)


@dataclass
class Running:
    """A --forward session carrying a bulk transfer through the echo target on b."""

    acceptor: Plexus
    invite: Plexus
    transfer: Transfer

    def finish(self) -> None:
        """Every byte written came back, in order, and then the echo's BYE."""
        received = self.transfer.finish(timeout=120)
        expected = self.transfer.data + BYE
        assert received == expected, (
            f"{len(received)} of {len(expected)} bytes\n{self.acceptor.log()[-3000:]}"
        )


@contextlib.contextmanager
def mid_transfer(lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids) -> Iterator[Running]:
    """The echo target on b, an acceptor allowing it, a --forward inviter on a, and 48 MiB each way through
    them, a quarter of it through already."""
    with TcpTarget(lab, "b", "echo", port=7007) as echo:
        acceptor, me, peer = start_acceptor(lab, tmp_path, running, ids, f"127.0.0.1:{echo.port}")
        invite = forwarding(lab, tmp_path, running, (me, peer), ids, f"17007:127.0.0.1:{echo.port}")
        transfer = Transfer(lab, 17007, pattern(48 << 20))
        transfer.wait_past(len(transfer.data) // 4, timeout=60)
        yield Running(acceptor, invite, transfer)


@pytest.mark.parametrize(("nat_a", "nat_b"), [("cone", "none"), ("cone", "fullcone"), ("symmetric", "none")])
def test_a_stream_survives_the_inviters_nat_mapping_it_anew_mid_transfer(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids, nat_a: str, nat_b: str
) -> None:
    """Mid-transfer, then again on an idle line (where the inviter's next keepalive makes the new mapping)."""
    lab.set_nat("a", nat_a)
    lab.set_nat("b", nat_b)
    with mid_transfer(lab, tmp_path, running, ids) as session:
        ports = lab.remap("a")
        session.finish()
        (moved,) = session.acceptor.wait_events("migrated", timeout=5)
        idle_since = time.time()
        lab.remap("a")
        again = session.acceptor.wait_events("migrated", count=2, timeout=10)[1]
        after_idle = lab.run_sync("a", lambda: exchange("127.0.0.1", 17007, b"after\n", timeout=10))
    assert after_idle == b"after\n" + BYE
    before, after = Endpoint.parse(moved["before"]), Endpoint.parse(moved["after"])
    low, high = (int(port) for port in ports.split("-"))
    assert before.host == after.host == lab.public_ip("a") and low <= after.port <= high, moved
    assert ports == REMAP_RANGES[0] and before.port != after.port
    assert Endpoint.parse(again["before"]) == after and Endpoint.parse(again["after"]).port != after.port
    idle_move = again["at"] - idle_since
    dead = session.acceptor.events("path_dead") + session.invite.events("path_dead")
    silence = session.transfer.longest_silence
    print(
        f"a {nat_a}, b {nat_b}: 48 MiB each way, a remapped {before} -> {after} mid-transfer: longest"
        f" silence {silence * 1000:.0f} ms; remapped on an idle line: moved after {idle_move:.2f} s;"
        f" path_dead events: {dead}"
    )
    assert silence < 2.0 and idle_move < quic.KEEPALIVE_INTERVAL + 1.0 and not dead
    assert session.invite.process.poll() is None and not session.acceptor.events("ended")  # it goes on


def test_a_path_cut_for_seconds_is_reported_dead_on_both_sides_and_the_stream_goes_on(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids
) -> None:
    """The internet router drops the sites' UDP for 4.5 s mid-transfer (a Wi-Fi hiccup, both endpoints
    unchanged): each side reports the path dead DEAD_AFTER into the cut, nothing ends, and once the path is
    back the inviter's next keepalive probe ends the silence on both sides, and every byte arrives."""
    cut_s = 4.5  # not a whole number of keepalive intervals: the inviter's probes do not meet its end
    with mid_transfer(lab, tmp_path, running, ids) as session:
        sides = (session.acceptor, session.invite)
        cut = time.time()
        lab.separate(True)
        try:
            noticed = [side.wait_events("path_dead", timeout=cut_s)[0]["at"] - cut for side in sides]
        finally:
            time.sleep(max(cut + cut_s - time.time(), 0))
            lab.separate(False)
        uncut = time.time()
        session.finish()
        back = [side.wait_events("path_back", timeout=5)[0]["at"] - uncut for side in sides]
    print(
        f"cut {cut_s:g} s mid-transfer: path_dead after {noticed[0]:.2f} s (acceptor), {noticed[1]:.2f} s"
        f" (inviter); path_back {back[0]:.2f} s, {back[1]:.2f} s after the cut ended; longest silence"
        f" {session.transfer.longest_silence:.2f} s"
    )
    assert all(quic.DEAD_AFTER - 0.2 < took < quic.DEAD_AFTER + 0.5 for took in noticed), noticed
    assert all(took < quic.KEEPALIVE_INTERVAL + 0.5 for took in back), back  # the inviter's next probe
    assert session.invite.process.poll() is None and not session.acceptor.events("ended")
