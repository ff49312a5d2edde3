"""Streams that outlive the inviter's new endpoint, and a dead path noticed in seconds (issue 19), on
loopback: a tiny NAT between the two ends maps the inviter anew (a new outside port) mid-stream, forgets
everything for a while, or lets a forger's datagrams reach the acceptor from another port."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from plexus import events
from plexus.endpoint import Endpoint
from plexus.identity import PeerCheck
from plexus.streams import forward, quic
from plexus.targets import Allowed, Target
from tests.unit.test_streams import Address, echo_server, new_identity, serving, udp_socket


@dataclass
class Traffic:
    datagrams: int = 0
    bytes: int = 0


class Nat:
    """A UDP NAT on loopback in front of the inviter: what the inviter sends to `inside` leaves from
    `outside` toward the acceptor, and what comes back to `outside` goes to the inviter. `remap` gives the
    inviter a new outside port (the old one is closed: what the acceptor sends there is lost), `dropping`
    loses everything both ways, and the last datagrams from the inviter are kept for replays."""

    def __init__(self, acceptor: Address) -> None:
        self._loop = asyncio.get_running_loop()
        self._acceptor = acceptor
        self._inviter: Address | None = None
        self.inside = udp_socket()
        self.outside = udp_socket()
        self.dropping = False
        self.recent: collections.deque[bytes] = collections.deque(maxlen=16)
        self.outward, self.inward = Traffic(), Traffic()
        self._loop.add_reader(self.inside.fileno(), self._from_inviter)
        self._loop.add_reader(self.outside.fileno(), self._from_acceptor, self.outside)

    @property
    def outer(self) -> Endpoint:
        return Endpoint(*self.outside.getsockname())

    def _from_inviter(self) -> None:
        while True:
            try:
                data, self._inviter = self.inside.recvfrom(65536)
            except BlockingIOError:
                return
            self.recent.append(data)
            if not self.dropping:
                self.outward.datagrams += 1
                self.outward.bytes += len(data)
                self.outside.sendto(data, self._acceptor)

    def _from_acceptor(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            if not self.dropping and self._inviter is not None:
                self.inward.datagrams += 1
                self.inward.bytes += len(data)
                self.inside.sendto(data, self._inviter)

    def remap(self) -> None:
        self._loop.remove_reader(self.outside.fileno())
        self.outside.close()
        self.outside = udp_socket()
        self._loop.add_reader(self.outside.fileno(), self._from_acceptor, self.outside)

    def close(self) -> None:
        for sock in (self.inside, self.outside):
            self._loop.remove_reader(sock.fileno())
            sock.close()


@dataclass
class Ends:
    nat: Nat
    address: Address  # the acceptor's
    acceptor: quic.Link
    inviter: quic.Link
    accepted: list[events.Event] = field(default_factory=list)  # the acceptor's events
    invited: list[events.Event] = field(default_factory=list)

    def seen(self, kind: type[events.Event]) -> list[events.Event]:
        return [event for event in self.accepted + self.invited if isinstance(event, kind)]


@contextlib.asynccontextmanager
async def through_nat(*, keepalive: bool = True) -> AsyncIterator[Ends]:
    """A streams link whose inviter is behind a Nat, each side reporting to its own list of events, both
    pinging (as streams.carry has them) unless told not to."""
    acceptor_id, inviter_id = new_identity(), new_identity()
    acceptor_socket, inviter_socket = udp_socket(), udp_socket()
    nat = Nat(acceptor_socket.getsockname())
    accepted: list[events.Event] = []
    invited: list[events.Event] = []
    with events.reporting(accepted.append, "accept"):
        serving_ = asyncio.ensure_future(
            quic.serve(acceptor_socket, nat.outer, acceptor_id, PeerCheck(inviter_id.id), datagram_size=1400)
        )
    with events.reporting(invited.append, "invite"):
        connecting = asyncio.ensure_future(
            quic.connect(
                inviter_socket,
                Endpoint(*nat.inside.getsockname()),
                inviter_id,
                PeerCheck(acceptor_id.id),
                datagram_size=1400,
            )
        )
    links: list[quic.Link] = []
    pinging: list[asyncio.Task[None]] = []
    try:
        acceptor, inviter = await asyncio.wait_for(asyncio.gather(serving_, connecting), 5)
        links = [acceptor, inviter]
        if keepalive:
            for link, sink, role in ((acceptor, accepted, "accept"), (inviter, invited, "invite")):
                with events.reporting(sink.append, role):  # type: ignore[arg-type]
                    pinging.append(asyncio.create_task(link.keepalive()))
        yield Ends(nat, acceptor_socket.getsockname(), acceptor, inviter, accepted, invited)
    finally:
        for task in (serving_, connecting, *pinging):
            task.cancel()
        await asyncio.gather(serving_, connecting, *pinging, return_exceptions=True)
        for link in links:
            await link.close()
        nat.close()
        acceptor_socket.close()
        inviter_socket.close()


class Transfer:
    """A bulk transfer through the echo target, both ways at once: every byte written comes back, in order,
    then b"bye\\n". It notes the longest time between two reads of the echo (the longest silence)."""

    def __init__(self, stream: quic.Stream, payload: bytes, received: bytes) -> None:
        self.stream = stream
        self.payload = payload
        self.received = bytearray(received)
        self.longest_silence = 0.0
        self.grew = asyncio.Event()

    async def run(self) -> bytes:
        writing = asyncio.ensure_future(self._write())
        last = time.monotonic()
        while data := await self.stream.read():
            now = time.monotonic()
            self.longest_silence = max(self.longest_silence, now - last)
            last = now
            self.received += data
            self.grew.set()
        await writing
        return bytes(self.received)

    async def _write(self) -> None:
        view = memoryview(self.payload)
        for start in range(0, len(view), 64 << 10):
            await self.stream.write(bytes(view[start : start + (64 << 10)]))
        self.stream.write_eof()

    async def past(self, size: int) -> None:
        while len(self.received) < size:
            self.grew.clear()
            await self.grew.wait()


@contextlib.asynccontextmanager
async def source_server(payload: bytes) -> AsyncIterator[Target]:
    """A TCP target that sends `payload` to each client, then closes: a download (ssh's `cat big-file`)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield Target("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("download", [False, True], ids=["both-ways", "download"])
async def test_the_acceptor_follows_the_inviter_to_its_new_outside_port_and_every_byte_arrives(
    download: bool,
) -> None:
    """Both ways (through the echo) the inviter's data shows the acceptor the new port at once; in a download
    the inviter sends only ACKs, which stop when the acceptor's data goes to the old port: its keepalive, at
    the latest, shows the new one."""
    payload = os.urandom(8 << 20)
    async with echo_server() as echo, source_server(payload) as source, through_nat() as ends:
        before = ends.nat.outer
        async with serving(ends.acceptor, Allowed.of([echo.target, source])):
            stream, received = await forward.open_target(ends.inviter, source if download else echo.target)
            transfer = Transfer(stream, b"" if download else payload, received)
            running = asyncio.ensure_future(transfer.run())
            await asyncio.wait_for(transfer.past(len(payload) // 3), 20)
            ends.nat.remap()
            after = ends.nat.outer
            assert await asyncio.wait_for(running, 30) == payload + (b"" if download else b"bye\n")
        assert ends.seen(events.Migrated) == [
            events.Migrated(role="accept", before=before, after=after, at=ends.seen(events.Migrated)[0].at)
        ]
        assert ends.acceptor._peer == after
        assert ends.seen(events.PathDead) == []
        assert transfer.longest_silence < quic.KEEPALIVE_INTERVAL + 0.5
        # and the link goes on there: a second connection after the move
        async with serving(ends.acceptor, Allowed.of([echo.target])):
            stream, received = await forward.open_target(ends.inviter, echo.target)
            assert await Transfer(stream, b"again", received).run() == b"againbye\n"


def altered(datagram: bytes) -> bytes:
    """The datagram with one byte of its encrypted payload changed: its header still names the connection,
    but it no longer decrypts."""
    return datagram[:-5] + bytes([datagram[-5] ^ 0x01]) + datagram[-4:]


async def test_forged_replayed_or_altered_datagrams_from_another_port_move_nothing() -> None:
    async with (
        echo_server() as echo,
        through_nat() as ends,
        serving(ends.acceptor, Allowed.of([echo.target])),
    ):
        stream, received = await forward.open_target(ends.inviter, echo.target)
        transfer = Transfer(stream, os.urandom(1 << 20), received)
        running = asyncio.ensure_future(transfer.run())
        await asyncio.wait_for(transfer.past(1 << 19), 10)
        old = list(ends.nat.recent)  # packets of the established connection, all delivered already
        assert await asyncio.wait_for(running, 10) == transfer.payload + b"bye\n"
        fresh = ends.nat.recent[-1]
        forger = udp_socket()
        try:
            for datagram in [
                os.urandom(1200),  # noise
                fresh[:9] + os.urandom(40),  # the connection's id over random bytes
                altered(fresh),
                *old,  # replays
                fresh,  # a replay of the newest
            ]:
                forger.sendto(datagram, ends.address)
            await asyncio.sleep(0.3)
            with pytest.raises(BlockingIOError):
                forger.recv(65536)  # not even a path challenge went to the forger
        finally:
            forger.close()
        assert ends.seen(events.Migrated) == []
        assert ends.acceptor._peer == ends.nat.outer
        assert ends.acceptor._quic is not None
        assert ends.acceptor._quic.get_peer_address() == ends.nat.outer
        stream, received = await forward.open_target(ends.inviter, echo.target)
        assert await Transfer(stream, b"still here", received).run() == b"still herebye\n"


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keepalive and the dead bound four times shorter, so that a silence of a few of them is short."""
    monkeypatch.setattr(quic, "KEEPALIVE_INTERVAL", quic.KEEPALIVE_INTERVAL / 4)
    monkeypatch.setattr(quic, "DEAD_AFTER", quic.DEAD_AFTER / 4)


async def dead(link: quic.Link, within: float) -> float:
    started = time.monotonic()
    await asyncio.wait_for(link.dead.wait(), within)
    return time.monotonic() - started


@pytest.mark.parametrize("flowing", [False, True], ids=["idle", "data-flowing"])
async def test_a_silent_peer_is_a_dead_path_within_the_bound_and_the_streams_live_on(
    quick: None, flowing: bool
) -> None:
    async with (
        echo_server() as echo,
        through_nat() as ends,
        serving(ends.acceptor, Allowed.of([echo.target])),
    ):
        stream, received = await forward.open_target(ends.inviter, echo.target)
        transfer = Transfer(stream, os.urandom(16 << 20 if flowing else 0), received)
        running = asyncio.ensure_future(transfer.run())
        if flowing:
            await asyncio.wait_for(transfer.past(1 << 20), 10)
        else:
            await asyncio.sleep(quic.KEEPALIVE_INTERVAL * 2)  # idle, pinging
        ends.nat.dropping = True
        # data, or else the keepalive after an interval's silence (two on the acceptor), unanswered for
        # DEAD_AFTER
        bounds = [quic.DEAD_AFTER + (0 if flowing else n * quic.KEEPALIVE_INTERVAL) + 0.3 for n in (2, 1)]
        noticed = await asyncio.gather(
            *(dead(link, bound) for link, bound in zip((ends.acceptor, ends.inviter), bounds, strict=True))
        )
        assert all(
            quic.DEAD_AFTER * 0.9 < took < bound for took, bound in zip(noticed, bounds, strict=True)
        ), noticed
        assert [event.role for event in ends.seen(events.PathDead)] in (
            ["accept", "invite"],
            ["invite", "accept"],
        )
        await asyncio.sleep(quic.DEAD_AFTER)  # silent on: still no end, and one event each
        assert len(ends.seen(events.PathDead)) == 2
        assert not ends.acceptor.closed.done() and not ends.inviter.closed.done()
        ends.nat.dropping = False
        async with asyncio.timeout(quic.KEEPALIVE_INTERVAL + 0.3):  # the inviter's next probe ends it
            while ends.acceptor.dead.is_set() or ends.inviter.dead.is_set():
                await asyncio.sleep(0.01)
        back = [event.silent for event in ends.seen(events.PathBack) if isinstance(event, events.PathBack)]
        assert len(back) == 2 and min(back) > quic.DEAD_AFTER, back
        assert await asyncio.wait_for(running, 30) == transfer.payload + b"bye\n"


async def test_an_idle_line_with_keepalives_is_no_dead_path_and_costs_little() -> None:
    """At the real KEEPALIVE_INTERVAL and DEAD_AFTER: twice the dead bound of silence between the streams,
    and nothing looks dead; what the pings and their acks cost each way, with 28 bytes of IPv4 and UDP headers
    per datagram, stays near 60 bytes/s (a PING one way, its ACK the other, each second)."""
    async with (
        echo_server() as echo,
        through_nat() as ends,
        serving(ends.acceptor, Allowed.of([echo.target])),
    ):
        stream, received = await forward.open_target(ends.inviter, echo.target)
        await stream.write(b"hello")
        while len(received) < 5:
            received += await stream.read()
        await asyncio.sleep(quic.KEEPALIVE_INTERVAL)  # the last acks of the hello
        outward, inward = Traffic(**vars(ends.nat.outward)), Traffic(**vars(ends.nat.inward))
        idle = 2 * (quic.DEAD_AFTER + quic.KEEPALIVE_INTERVAL)
        await asyncio.sleep(idle)
        assert not ends.acceptor.dead.is_set() and not ends.inviter.dead.is_set()
        assert ends.seen(events.PathDead) == []
        for now, then in ((ends.nat.outward, outward), (ends.nat.inward, inward)):
            datagrams = now.datagrams - then.datagrams
            cost = (now.bytes - then.bytes + 28 * datagrams) / idle
            assert datagrams >= idle / quic.KEEPALIVE_INTERVAL - 1  # the pings and acks do flow
            assert cost < 70, cost
        stream.write_eof()
        assert await stream.read() == b"bye\n"
