"""The hole punch and flag handshake that confirm the path between two hosts (docs/protocol.md, "Handshake").

The protocol is a pair of sans-I/O state machines, `Inviter` and `Acceptor`: datagrams and time go in;
datagrams to send, a timer and an outcome come out. `punch` is the thin asyncio driver around one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

from plexus.endpoint import Endpoint
from plexus.errors import HandshakeTimeoutError

log = logging.getLogger(__name__)

PACKET_SIZE = 8  # the meaningful head of every handshake datagram
DATAGRAM_SIZE = 60  # what plexus 2.2 sends; the rest after the packet is random padding
HELLO_INTERVAL = 0.25  # the inviter's hello period; short because the first lost hello costs connect time
QUIET_PERIOD = 4.0  # acceptor: silence after its ready meaning the inviter got one (2.2 retries every 1.6 s)
PUNCH_REFRESH = 1.0  # acceptor: re-punch until the first hello, in case the punch was lost before its NAT
READY_COPIES = 2  # the inviter's last word goes out twice: no retransmission once the socket is closed
DEFAULT_HOPS = 7
DEFAULT_TIMEOUT = 60.0

Random = Callable[[int], bytes]


class Flag(IntEnum):
    """Bit 0 of byte 0 of the unmasked packet."""

    HELLO = 0
    READY = 1


def _mask(secret: int) -> bytes:
    if not 0 <= secret < 1 << 64:
        raise ValueError(f"secret {secret} is not an unsigned 64-bit number")
    return secret.to_bytes(8, "little")


def _xor(data: bytes, mask: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, mask, strict=True))


def _checksum(data: bytes) -> int:
    total = 0
    for byte in data:
        total ^= byte
    return total


def encode(flag: Flag, secret: int, nonce: bytes, padding: bytes = b"") -> bytes:
    """The datagram carrying `flag`: the 8-byte packet built from 7 random `nonce` bytes, then `padding`."""
    if len(nonce) != PACKET_SIZE - 1:
        raise ValueError(f"nonce must be {PACKET_SIZE - 1} bytes, not {len(nonce)}")
    head = bytes([(nonce[0] & 0xFE) | flag]) + nonce[1:]
    return _xor(head + bytes([_checksum(head)]), _mask(secret)) + padding


def decode(data: bytes, secret: int) -> Flag | None:
    """The flag of a handshake datagram, or None when it is not one for this secret."""
    if len(data) < PACKET_SIZE:
        return None
    packet = _xor(data[:PACKET_SIZE], _mask(secret))
    if _checksum(packet) != 0:
        return None
    return Flag(packet[0] & 1)


@dataclass(frozen=True, slots=True)
class Datagram:
    """A datagram for the peer; `ttl` None means the socket's normal TTL."""

    data: bytes
    ttl: int | None = None


class Outcome(Enum):
    COMPLETED = "completed"  # a ready arrived (acceptor) or was sent (inviter)
    PRESUMED = "presumed"  # acceptor: the inviter stopped saying hello after our ready, so it has one
    TIMED_OUT = "timed out"


class Handshake(ABC):
    """What both roles share: the peer filter, the deadline, the outbox."""

    def __init__(
        self, peer: Endpoint, secret: int, now: float, *, timeout: float, random: Random = os.urandom
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"handshake timeout must be positive, not {timeout}")
        _mask(secret)  # reject a bad secret now, not at the first datagram
        self.peer = peer
        self.secret = secret
        self.deadline = now + timeout
        self.outcome: Outcome | None = None
        self._random = random
        self._outbox: list[Datagram] = []

    def datagram_received(self, data: bytes, source: Endpoint, now: float) -> None:
        if self.outcome is not None:
            return
        if source != self.peer:
            log.debug("ignoring %d bytes from %s: not the peer %s", len(data), source, self.peer)
            return
        flag = decode(data, self.secret)
        if flag is None:
            log.debug("ignoring %d bytes from %s: not a handshake packet for this secret", len(data), source)
            return
        log.debug("%s from %s", flag.name.lower(), source)
        self._on_packet(flag, now)

    def handle_timer(self, now: float) -> None:
        if self.outcome is None:
            self._on_timer(now)
        if self.outcome is None and now >= self.deadline:
            self.outcome = Outcome.TIMED_OUT

    def get_timer(self) -> float | None:
        """When `handle_timer` wants to run next; None once there is an outcome."""
        return None if self.outcome is not None else min(self._next_timer(), self.deadline)

    def datagrams_to_send(self) -> list[Datagram]:
        outbox, self._outbox = self._outbox, []
        return outbox

    def _send(self, flag: Flag, ttl: int | None = None) -> None:
        entropy = self._random(DATAGRAM_SIZE - 1)
        self._outbox.append(Datagram(encode(flag, self.secret, entropy[:7], entropy[7:]), ttl))

    @abstractmethod
    def _on_packet(self, flag: Flag, now: float) -> None: ...

    @abstractmethod
    def _on_timer(self, now: float) -> None: ...

    @abstractmethod
    def _next_timer(self) -> float: ...


class Inviter(Handshake):
    """Says hello every HELLO_INTERVAL until a ready arrives, then answers it with ready and is done."""

    def __init__(
        self,
        peer: Endpoint,
        secret: int,
        now: float,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        random: Random = os.urandom,
    ) -> None:
        super().__init__(peer, secret, now, timeout=timeout, random=random)
        self._next_hello = now
        self._on_timer(now)

    def _on_packet(self, flag: Flag, now: float) -> None:
        # A hello can only be the acceptor's TTL punch outliving its hops: 2.2 ignores it too.
        if flag is Flag.READY:
            for _ in range(READY_COPIES):
                self._send(Flag.READY)
            self.outcome = Outcome.COMPLETED

    def _on_timer(self, now: float) -> None:
        if now >= self._next_hello:
            self._send(Flag.HELLO)
            # From now, not from the missed slot: a late timer must not fire a burst of hellos.
            self._next_hello = now + HELLO_INTERVAL

    def _next_timer(self) -> float:
        return self._next_hello


class Acceptor(Handshake):
    """Punches its own NAT with a TTL-limited hello, answers every hello with ready, is done on a ready."""

    def __init__(
        self,
        peer: Endpoint,
        secret: int,
        now: float,
        *,
        hops: int = DEFAULT_HOPS,
        timeout: float = DEFAULT_TIMEOUT,
        random: Random = os.urandom,
    ) -> None:
        if not 1 <= hops <= 255:
            raise ValueError(f"punch hops must be 1-255, not {hops}")
        super().__init__(peer, secret, now, timeout=timeout, random=random)
        self._hops = hops
        self._next_punch = now
        self._last_hello: float | None = None
        self._on_timer(now)

    def _on_packet(self, flag: Flag, now: float) -> None:
        if flag is Flag.READY:
            self.outcome = Outcome.COMPLETED
        else:
            self._last_hello = now
            self._send(Flag.READY)

    def _on_timer(self, now: float) -> None:
        if self._last_hello is None:
            if now >= self._next_punch:
                self._send(Flag.HELLO, ttl=self._hops)
                self._next_punch = now + PUNCH_REFRESH
        elif now >= self._last_hello + QUIET_PERIOD and self._last_hello + QUIET_PERIOD <= self.deadline:
            self.outcome = Outcome.PRESUMED

    def _next_timer(self) -> float:
        return self._next_punch if self._last_hello is None else self._last_hello + QUIET_PERIOD


def _canonical(address: tuple[Any, ...]) -> Endpoint:
    """One spelling per address (IPv6 has many), so a source can be compared with the peer."""
    host, port = address[0], address[1]
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    return Endpoint(host, port)


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


class _Driver:
    """Feeds one state machine from a socket and the event loop's clock until it has an outcome."""

    def __init__(self, sock: socket.socket, peer: Endpoint, machine: Handshake) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._peer = peer
        self._machine = machine
        self._timer: asyncio.TimerHandle | None = None
        self.outcome: asyncio.Future[Outcome] = self._loop.create_future()

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        self._step()

    def stop(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        if self._timer is not None:
            self._timer.cancel()

    def _on_readable(self) -> None:
        self._run(self._receive)

    def _on_timer(self) -> None:
        self._run(lambda: self._machine.handle_timer(self._loop.time()))

    def _run(self, action: Callable[[], None]) -> None:
        try:
            action()
            self._step()
        except Exception as error:  # a bug must end `punch` with its traceback, not leave it waiting forever
            if not self.outcome.done():
                self.outcome.set_exception(error)

    def _receive(self) -> None:
        while self._machine.outcome is None:
            try:
                data, address = self._sock.recvfrom(2048)
            except BlockingIOError:
                break
            except OSError as error:  # an ICMP error queued on the socket: the next try may well get through
                log.debug("receive failed: %s", error)
                break
            self._machine.datagram_received(data, _canonical(address), self._loop.time())

    def _step(self) -> None:
        for datagram in self._machine.datagrams_to_send():
            self._transmit(datagram)
        if self._timer is not None:
            self._timer.cancel()
        when = self._machine.get_timer()
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)
        elif self._machine.outcome is not None and not self.outcome.done():
            self.outcome.set_result(self._machine.outcome)

    def _transmit(self, datagram: Datagram) -> None:
        hops = contextlib.nullcontext() if datagram.ttl is None else _hop_limit(self._sock, datagram.ttl)
        try:
            with hops:
                self._sock.sendto(datagram.data, self._peer)
        except OSError as error:  # a full buffer or a route hiccup is one lost datagram: retries cover it
            log.debug("sending to %s failed: %s", self._peer, error)


async def punch(
    sock: socket.socket,
    peer: Endpoint,
    secret: int,
    *,
    accept: bool,
    hops: int = DEFAULT_HOPS,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Open the NATs between `sock` and `peer` and confirm the path; close `sock` on every path.

    The acceptor's TTL-limited hello leaves before the first await, so a caller may start this as a task and
    rely on its NAT being open once the task has run one step.
    """
    with contextlib.closing(sock):
        sock.setblocking(False)
        now = asyncio.get_running_loop().time()
        key = _canonical(peer)
        machine: Handshake
        if accept:
            machine = Acceptor(key, secret, now, hops=hops, timeout=timeout)
        else:
            machine = Inviter(key, secret, now, timeout=timeout)
        driver = _Driver(sock, peer, machine)
        try:
            driver.start()
            outcome = await driver.outcome
        finally:
            driver.stop()
    if outcome is Outcome.TIMED_OUT:
        raise HandshakeTimeoutError(f"no handshake with {peer} within {timeout:g} s")
    if outcome is Outcome.PRESUMED:
        log.warning("no ready from %s, but its hellos stopped after our ready: taking it as done", peer)
    log.info("handshake with %s done", peer)
