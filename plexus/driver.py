"""The one asyncio driver of plexus's sans-I/O UDP machines (STUN, the flag handshake, the handshake through a
TURN relay).

A machine speaks aioquic's vocabulary (`QuicConnection`): `datagram_received(data, addr, now, sock)` and
`handle_timer(now)` feed it, `datagrams_to_send()` and `get_timer()` say what it wants; a `get_timer()` of
None means it is finished. A transport carries its datagrams: `Sockets` (UDP sockets read by loop readers)
or a relay (plexus/relay.py). `Driver` joins the two with callbacks and no task, so a caller's first datagrams
leave before its first await, and a fan-out of hundreds of machines costs no task apiece.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

from plexus.endpoint import Endpoint

log = logging.getLogger(__name__)

RECEIVE_SIZE = 2048  # larger than any datagram the machines take (STUN, handshake)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Whether `event` is set within `timeout`. A cancellation always gets through: Python 3.11's
    asyncio.wait_for can swallow one that meets its own timeout, and a loop around it then runs on (a
    streams link's keepalive held an ssh ProxyCommand's exit for minutes)."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
        return bool(done)
    finally:
        waiter.cancel()


class Datagram(NamedTuple):
    """A datagram to send to `to`, from the transport's socket number `sock`; `ttl` None: the normal TTL."""

    data: bytes
    to: Endpoint
    ttl: int | None = None
    sock: int = 0


class Machine(Protocol):
    def datagram_received(self, data: bytes, addr: Endpoint, now: float, sock: int = 0) -> None:
        """A datagram from `addr` (canonical spelling) arrived on the transport's socket `sock`."""

    def handle_timer(self, now: float) -> None:
        """The time `get_timer()` gave has come."""

    def get_timer(self) -> float | None:
        """When `handle_timer` wants to run next; None once the machine is finished."""

    def datagrams_to_send(self) -> list[Datagram]:
        """What to send now; each datagram once."""


Deliver = Callable[[int, bytes, Endpoint], None]  # socket number, data, source
Fail = Callable[[BaseException], None]
Refuse = Callable[[Endpoint, OSError], Exception]  # the error a failed send is, where it is one


class Transport(Protocol):
    def start(self, deliver: Deliver, fail: Fail) -> None:
        """Hand each datagram that arrives to `deliver` from now on; `fail` ends the driver (a lost relay)."""

    def stop(self) -> None:
        """Deliver nothing more, not even the rest of a batch; the transport stays open, for its owner."""

    def send(self, datagram: Datagram) -> None:
        """Send, or drop like a lost datagram; an OSError that is not a passing one propagates."""


@contextlib.contextmanager
def _hop_limit(sock: socket.socket, hops: int) -> Iterator[None]:
    if sock.family == socket.AF_INET6:
        level, option = socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS
    else:
        level, option = socket.IPPROTO_IP, socket.IP_TTL
    normal = sock.getsockopt(level, option)
    sock.setsockopt(level, option, hops)
    try:
        yield
    finally:
        sock.setsockopt(level, option, normal)


class Sockets:
    """Non-blocking UDP sockets read by loop readers (any event loop has them; uvloop has no sock_recvfrom),
    all removed on stop, so the caller can hand a socket straight to another reader.

    A send that fails for lack of buffer space is a lost datagram (the machines resend); any other failure
    is one too, unless `refuse` makes it the error that ends the driver (STUN: a route that does not exist
    will not appear).
    """

    def __init__(self, socks: Sequence[socket.socket], *, refuse: Refuse | None = None) -> None:
        self.socks = list(socks)
        self._refuse = refuse
        self._loop = asyncio.get_running_loop()
        self._deliver: Deliver | None = None

    def start(self, deliver: Deliver, fail: Fail) -> None:
        self._deliver = deliver
        for index, sock in enumerate(self.socks):
            self._loop.add_reader(sock.fileno(), self._readable, index)

    def stop(self) -> None:
        self._deliver = None
        for sock in self.socks:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())

    def _readable(self, index: int) -> None:
        sock = self.socks[index]
        while self._deliver is not None:
            try:
                data, address = sock.recvfrom(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # an ICMP error queued on the socket: the next try may well get through
                log.debug("receive failed: %s", error)
                return
            self._deliver(index, data, Endpoint(address[0], address[1]).canonical())

    def send(self, datagram: Datagram) -> None:
        sock = self.socks[datagram.sock]
        family = socket.AF_INET6 if ":" in datagram.to.host else socket.AF_INET
        if sock.family != family:
            # A machine names its destinations, not its sockets: an IPv6 candidate goes out of the IPv6 one.
            found = next((other for other in self.socks if other.family == family), None)
            if found is None:
                log.debug("no %s socket for %s: not sent", family.name, datagram.to)
                return
            sock = found
        hops = contextlib.nullcontext() if datagram.ttl is None else _hop_limit(sock, datagram.ttl)
        try:
            with hops:
                sock.sendto(datagram.data, datagram.to)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as error:
            if self._refuse is not None:
                raise self._refuse(datagram.to, error) from error
            log.debug("sending to %s failed: %s", datagram.to, error)


class Driver:
    """Feeds `machine` from `transport` and the event loop's clock until it is finished (`done`).

    `done` is set when `get_timer()` turns None, and holds the exception when the machine, the transport or
    the sending raised one: a bug must end the caller with its traceback, not leave it waiting forever.
    """

    def __init__(self, machine: Machine, transport: Transport) -> None:
        self.machine = machine
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[None] = self._loop.create_future()

    def start(self) -> None:
        """Start delivering; the machine's first datagrams leave now."""
        self.transport.start(self._received, self._fail)
        self._run(lambda: None)

    def stop(self) -> None:
        self.transport.stop()
        if self._timer is not None:
            self._timer.cancel()
        if not self.done.done():
            self.done.cancel()

    def _received(self, sock: int, data: bytes, source: Endpoint) -> None:
        if self.done.done() or self.machine.get_timer() is None:
            return
        self._run(lambda: self.machine.datagram_received(data, source, self._loop.time(), sock))

    def _on_timer(self) -> None:
        self._timer = None
        self._run(lambda: self.machine.handle_timer(self._loop.time()))

    def _fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        self.stop()

    def _run(self, action: Callable[[], None]) -> None:
        try:
            action()
            for datagram in self.machine.datagrams_to_send():
                self.transport.send(datagram)
        except Exception as error:
            self._fail(error)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.machine.get_timer()
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)
        elif not self.done.done():
            # Read no further: what arrives next (the peer's first QUIC packet, say) is the next owner's.
            self.transport.stop()
            self.done.set_result(None)


async def drive(machine: Machine, transport: Transport) -> None:
    """Run `machine` on `transport` until it is finished; the transport stays open."""
    driver = Driver(machine, transport)
    try:
        driver.start()
        await driver.done
    finally:
        driver.stop()


async def resolve(server: Endpoint, family: socket.AddressFamily = socket.AF_INET) -> Endpoint:
    """The server's endpoint in `family` (a hostname is looked up); OSError when the lookup fails (an IP
    address of the other family included)."""
    if server.is_ip:
        if (":" in server.host) != (family == socket.AF_INET6):
            kind = "IPv6" if family == socket.AF_INET6 else "IPv4"
            raise OSError(f"{server.host} is not an {kind} address")
        return server
    infos = await asyncio.get_running_loop().getaddrinfo(
        server.host, server.port, family=family, type=socket.SOCK_DGRAM
    )
    host, port = infos[0][4][:2]
    return Endpoint(str(host), int(port))
