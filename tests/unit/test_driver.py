"""plexus/driver.py: the one driver of the sans-I/O UDP machines, on loopback sockets and on a fake relay."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from plexus import driver, puncher
from plexus.driver import Datagram, Driver, Sockets
from plexus.endpoint import Endpoint
from plexus.errors import TurnError
from plexus.relay import punch as relay_punch
from tests.unit.test_relay import PEER, channel_data, fake_relay


class Echo:
    """Sends `count` pings to `to`, one per `interval`, and is finished at the first datagram back."""

    def __init__(self, to: Endpoint, now: float, *, count: int = 3, interval: float = 0.05) -> None:
        self.to, self.count, self.interval = to, count, interval
        self.next = now
        self.outbox: list[Datagram] = []
        self.heard: list[tuple[bytes, Endpoint, int]] = []
        self.handle_timer(now)

    def datagram_received(self, data: bytes, addr: Endpoint, now: float, sock: int = 0) -> None:
        self.heard.append((data, addr, sock))

    def handle_timer(self, now: float) -> None:
        if self.count and now >= self.next:
            self.count -= 1
            self.outbox.append(Datagram(b"ping", self.to))
            self.next = now + self.interval

    def get_timer(self) -> float | None:
        return None if self.heard or not self.count else self.next

    def datagrams_to_send(self) -> list[Datagram]:
        outbox, self.outbox = self.outbox, []
        return outbox


@contextmanager
def udp(count: int = 1) -> Iterator[list[socket.socket]]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def test_the_first_datagrams_leave_before_the_first_await_and_an_answer_finishes() -> None:
    loop = asyncio.get_running_loop()
    with udp(2) as (mine, peer):
        machine = Echo(Endpoint(*peer.getsockname()), loop.time())
        running = Driver(machine, Sockets([mine]))
        running.start()
        assert peer.recvfrom(100)[0] == b"ping"  # no await in between
        peer.sendto(b"pong", mine.getsockname())
        peer.sendto(b"the next owner's", mine.getsockname())
        async with asyncio.timeout(2):
            await running.done
        running.stop()
        assert machine.heard == [(b"pong", Endpoint(*peer.getsockname()), 0)]
        assert mine.recvfrom(100)[0] == b"the next owner's"  # left in the socket, not read and dropped
        loop.add_reader(mine.fileno(), lambda: None)  # the driver's reader is gone: another may take over
        loop.remove_reader(mine.fileno())


async def test_each_socket_is_numbered_and_a_machine_finishes_by_its_timer() -> None:
    loop = asyncio.get_running_loop()
    with udp(3) as (first, second, peer):
        machine = Echo(Endpoint(*peer.getsockname()), loop.time(), count=2, interval=0.01)
        second.sendto(b"early", first.getsockname())  # before the start: still heard, on socket 0
        await driver.drive(machine, Sockets([first, second]))
        assert machine.heard == [(b"early", Endpoint(*second.getsockname()), 0)]
        silent = Echo(Endpoint(*peer.getsockname()), loop.time(), count=2, interval=0.01)
        started = loop.time()
        await driver.drive(silent, Sockets([second, first]))
        assert silent.heard == [] and 0.005 <= loop.time() - started < 1


async def test_a_machine_that_raises_ends_the_driver_with_its_error() -> None:
    loop = asyncio.get_running_loop()

    class Broken(Echo):
        def handle_timer(self, now: float) -> None:
            if self.count < 3:  # the first timer after the start
                raise RuntimeError("a bug")
            super().handle_timer(now)

    with udp(2) as (mine, peer), pytest.raises(RuntimeError, match="a bug"):
        async with asyncio.timeout(2):
            await driver.drive(Broken(Endpoint(*peer.getsockname()), loop.time()), Sockets([mine]))


async def test_a_failed_send_is_a_lost_datagram_unless_refused() -> None:
    loop = asyncio.get_running_loop()
    nowhere = Endpoint("127.0.0.1", 0)  # port 0: sendto fails at once
    with udp() as (mine,):
        await driver.drive(Echo(nowhere, loop.time(), count=2, interval=0.01), Sockets([mine]))

        def refuse(to: Endpoint, error: OSError) -> Exception:
            return ValueError(f"cannot send to {to}")

        with pytest.raises(ValueError, match=r"cannot send to 127\.0\.0\.1:0"):
            await driver.drive(Echo(nowhere, loop.time()), Sockets([mine], refuse=refuse))


async def test_the_ttl_is_set_for_one_datagram_only() -> None:
    with udp(2) as (mine, peer):
        normal = mine.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
        transport = Sockets([mine])
        transport.send(Datagram(b"low", Endpoint(*peer.getsockname()), ttl=3))
        assert mine.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == normal
        assert peer.recvfrom(100)[0] == b"low"


async def test_resolve_takes_an_ip_as_it_is_and_looks_a_name_up() -> None:
    assert await driver.resolve(Endpoint("192.0.2.1", 3478)) == Endpoint("192.0.2.1", 3478)
    assert await driver.resolve(Endpoint("localhost", 3478)) == Endpoint("127.0.0.1", 3478)
    with pytest.raises(OSError):
        await driver.resolve(Endpoint("nowhere.invalid", 1))


# ---- the relay as a transport ------------------------------------------------------------------------------

SECRET = 0x1234
MASKED = puncher.Masked(SECRET)


def flags(sent: list[bytes]) -> list[puncher.Flag | None]:
    return [puncher.decode(channel_data(message)[1], SECRET) for message in sent]


async def test_relay_punch_answers_through_the_relay_and_hears_what_came_before() -> None:
    relay, client = fake_relay()
    client.peer_to_channel = {tuple(PEER): 0x4000}  # type: ignore[dict-item]
    relay._sink(MASKED.seal(puncher.Flag.HELLO, bytes), PEER)  # in the inbox before the handshake starts
    task = asyncio.create_task(relay_punch(relay, PEER, MASKED, accept=True, timeout=2))
    async with asyncio.timeout(2):
        while len(client.sent) < 2:
            await asyncio.sleep(0.01)
        assert flags(client.sent)[:2] == [puncher.Flag.HELLO, puncher.Flag.READY]  # the punch, the answer
        relay._sink(MASKED.seal(puncher.Flag.READY, bytes), PEER)
        assert await task == PEER
    assert relay._sink == relay._enqueue  # the relay's inbox takes datagrams again


async def test_relay_punch_leaves_what_came_after_its_end_in_the_inbox() -> None:
    relay, client = fake_relay()
    client.peer_to_channel = {tuple(PEER): 0x4000}  # type: ignore[dict-item]
    relay._sink(MASKED.seal(puncher.Flag.READY, bytes), PEER)  # the inviter's ready: the acceptor is done
    relay._sink(b"the command's first datagram", PEER)
    async with asyncio.timeout(2):
        assert await relay_punch(relay, PEER, MASKED, accept=True, timeout=2) == PEER
        assert await relay.recvfrom() == (b"the command's first datagram", PEER)


async def test_relay_punch_ends_with_the_relay() -> None:
    relay, client = fake_relay()
    client.peer_to_channel = {tuple(PEER): 0x4000}  # type: ignore[dict-item]
    task = asyncio.create_task(relay_punch(relay, PEER, MASKED, accept=False, timeout=5))
    await asyncio.sleep(0.05)
    relay._ended(TurnError("the relay was lost"))
    with pytest.raises(TurnError, match="was lost"):
        async with asyncio.timeout(1):
            await task
