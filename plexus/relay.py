"""A TURN relay (RFC 8656) for when no direct path can work: both NATs map per destination, or UDP is blocked.

A thin asyncio driver around aioice's TURN client (`aioice.turn.TurnClientUdpProtocol`, or over TCP and TLS,
RFC 6062/7065, `TurnClientTcpProtocol`: the protocols `create_turn_endpoint` runs): aioice allocates with
long-term credentials, refreshes the allocation, binds a channel per peer address and deletes the allocation
on close. Over TCP and TLS only the leg to the server is a stream: the relayed endpoint is UDP, so the peer
sees no difference; each message on the stream is padded to 4 bytes (aioice frames and pads them). `Relay`
adds what a long-lived relay for one peer needs:

- channel bindings (hence permissions) refreshed every REFRESH_INTERVAL for as long as the relay lives, even
  when only the peer sends (aioice refreshes a channel only lazily, on a later send);
- `permit(ip)`: a permission for every port of an IP before any data (CreatePermission), for a peer behind a
  NAT that maps per destination, whose port nobody knows until its first datagram arrives;
- a datagram interface (`sendto`, `recvfrom`) with no task per datagram: once a peer's channel is bound,
  `sendto` writes the ChannelData message straight to the socket;
- `forward()`, the data plane between the launched command's local socket and the peer, and `punch()`, the
  flag handshake of plexus/puncher.py run by plexus/driver.py over the relay.

aioice keeps its channel table in attributes it does not document (`peer_to_channel`, `channel_refresh_at`),
and its framing for the transport in `_send`: `_Plexus` alone reads and writes them, and
tests/unit/test_relay.py fails if aioice stops having them.

Errors are plexus errors with one-line messages: TurnAuthError (exit 12), TurnUnreachableError (13),
TurnError (14).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from aioice import stun, turn

from plexus import driver
from plexus.endpoint import Endpoint, canonical_ip
from plexus.errors import HandshakeTimeoutError, TurnAuthError, TurnError, TurnUnreachableError
from plexus.puncher import DEFAULT_TIMEOUT, Codec, Outcome, handshake, report

log = logging.getLogger(__name__)

ALLOCATE_TIMEOUT = 10.0  # the allocation, nonce round included; also bounds each later request
CLOSE_TIMEOUT = 2.0  # the deletion (a Refresh with LIFETIME 0); the server frees it on expiry otherwise
LIFETIME = 600  # requested allocation lifetime; aioice refreshes the allocation at 5/6 of what it got
REFRESH_INTERVAL = 240.0  # channels and permissions: permissions last 300 s, channels 600 s (RFC 8656)
INBOX_SIZE = 4096  # datagrams waiting for recvfrom; later ones are dropped, as a full socket buffer would
PENDING_SIZE = 64  # datagrams held for a peer while its channel is being bound
RECEIVE_BUFFER = 1 << 20  # SO_RCVBUF of the socket toward the server (the kernel caps it at rmem_max)
FORWARD_BATCH = 64  # datagrams read from the command's socket per wake-up, so the relay side gets its turn

_CHANNEL_HEADER = struct.Struct("!HH")
_DATA_INDICATION = struct.pack("!H", 0x0017)  # method DATA (0x007), class indication

Sink = Callable[[bytes, Endpoint], None]
Address = tuple[str, int]
# How this side reaches the TURN server (RFC 7065's transport; "tls" is its turns: scheme). The relayed
# endpoint itself is UDP whatever this is.
Transport = Literal["udp", "tcp", "tls"]


class _Plexus(turn.TurnClientMixin):
    """What plexus adds to aioice's TURN client, over either transport: Data indications from IPs with a
    CreatePermission only (aioice delivers them only for IPs that have a channel), the last socket error, for
    the unreachable message, and the adapter to aioice's channel table (`channel`, `channels`, `rebound`) and
    framing (`write`), read nowhere else."""

    def __init__(self, server: tuple[str, int], username: str, password: str, lifetime: int) -> None:
        super().__init__(
            server,
            username=username,
            password=password,
            lifetime=lifetime,
            channel_refresh_time=turn.DEFAULT_CHANNEL_REFRESH_TIME,
        )
        self.permitted: set[str] = set()
        self.last_error: OSError | None = None

    def datagram_received(self, data: bytes | str, addr: tuple[str, int]) -> None:
        if not isinstance(data, bytes):
            return
        if not (len(data) >= 4 and turn.is_channel_data(data)):
            # aioice's parser raises struct.error too on some malformed messages, and aioice catches only
            # ValueError: one spoofed datagram from the server's address would escape into the event loop.
            try:
                message = stun.parse_message(data)
            except (ValueError, struct.error) as error:
                log.debug("ignoring %d bytes from the TURN server's address: %s", len(data), error)
                return
            if self.permitted and data[:2] == _DATA_INDICATION:
                peer = message.attributes.get("XOR-PEER-ADDRESS")
                if peer is not None and "DATA" in message.attributes and peer[0] in self.permitted:
                    if self.receiver is not None:
                        self.receiver.datagram_received(message.attributes["DATA"], peer)
                    return
        super().datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self.last_error = exc
        log.debug("TURN socket error: %s", exc)

    def write(self, message: bytes) -> None:
        """Send a ChannelData message, framed for the transport (padded to 4 bytes on a stream)."""
        self._send(message)

    def channel(self, peer: Address) -> int | None:
        """The channel bound to `peer`, if any."""
        return self.peer_to_channel.get(peer)

    def channels(self) -> list[tuple[Address, int]]:
        """Every bound channel and its peer."""
        return list(self.peer_to_channel.items())

    def rebound(self, channel: int) -> None:
        """`channel` has just been bound again: aioice need not re-bind it before its next send."""
        self.channel_refresh_at[channel] = time.time() + self.channel_refresh_time


class _Client(_Plexus, turn.TurnClientUdpProtocol):
    """The client over UDP."""


class _StreamClient(_Plexus, turn.TurnClientTcpProtocol):
    """The client over TCP or TLS: aioice splits the stream into messages and hands each to
    `datagram_received`, so the checks there hold for both."""


C = TypeVar("C", _Client, _StreamClient)


class _Receiver(asyncio.DatagramProtocol):
    """What aioice hands the relayed datagrams to."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._relay._sink(data, Endpoint(addr[0], addr[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay._ended(None)


def refusal(server: str, what: str, error: stun.TransactionError) -> TurnError:
    """The plexus error for a failed TURN request: `what` failed at `server`."""
    response = error.response
    if isinstance(error, stun.TransactionTimeout) or response is None:
        return TurnUnreachableError(f"no answer from TURN server {server} to the {what}")
    code, reason = response.attributes.get("ERROR-CODE", (response.error_code, ""))
    detail = f"{code} {reason}".strip() if reason else str(code)
    if code == 401:
        return TurnAuthError(f"TURN server {server} refused the user name or password ({detail})")
    return TurnError(f"TURN server {server} refused the {what} ({detail})")


class _RefreshClient(Protocol):
    """What the refresher needs of the TURN client (`_Client`, or a fake in the unit tests)."""

    permitted: set[str]

    def channels(self) -> list[tuple[Address, int]]: ...

    def rebound(self, channel: int) -> None: ...

    async def channel_bind(self, channel_number: int, addr: Address) -> None: ...

    async def request_with_retry(self, request: stun.Message) -> tuple[stun.Message, tuple[str, int]]: ...


async def create_permission(client: _RefreshClient, ip: str) -> None:
    request = stun.Message(message_method=stun.Method.CREATE_PERMISSION, message_class=stun.Class.REQUEST)
    request.attributes["XOR-PEER-ADDRESS"] = (ip, 0)  # the port is ignored: a permission is per IP
    await client.request_with_retry(request)


class Refresher:
    """Re-binds every channel and re-creates every permission without a channel, every `interval` seconds.

    A ChannelBind refreshes the channel (600 s) and the permission for its IP (300 s); a CreatePermission the
    permission alone. Each request is bounded by `timeout`; a failed one is logged and retried next round.
    """

    def __init__(self, client: _RefreshClient, server: str, *, interval: float, timeout: float) -> None:
        if interval <= 0:
            raise ValueError(f"refresh interval must be positive, not {interval}")
        self.client = client
        self.server = server
        self.interval = interval
        self.timeout = timeout
        self.rounds = 0
        self.failures = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh()

    async def refresh(self) -> None:
        client = self.client
        covered: set[str] = set()
        for addr, channel in client.channels():
            covered.add(addr[0])
            if await self._attempt(
                f"channel {channel:#06x} to {Endpoint(*addr)}", client.channel_bind(channel, addr)
            ):
                client.rebound(channel)
        for ip in sorted(client.permitted - covered):
            await self._attempt(f"permission for {ip}", create_permission(client, ip))
        self.rounds += 1

    async def _attempt(self, what: str, request: Awaitable[object]) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                await request
        except (TimeoutError, stun.TransactionError, OSError) as exc:
            self.failures += 1
            log.warning("refreshing the TURN %s on %s failed: %s", what, self.server, str(exc) or "no answer")
            return False
        log.debug("TURN %s refreshed", what)
        return True


class Relay:
    """A TURN allocation on `server` for as long as the context lasts: `async with Relay(...) as relay`.

    `relayed` is the allocation's public endpoint (XOR-RELAYED-ADDRESS), the peer's target; `mapped` is this
    host's endpoint as the server sees it (XOR-MAPPED-ADDRESS; over TCP or TLS, that of the connection).
    `transport` is how the server is reached; over TLS its certificate is verified against `ca` (the system's
    store when None) for the name in `server`.
    """

    def __init__(
        self,
        server: Endpoint,
        user: str,
        password: str,
        *,
        allocate_timeout: float = ALLOCATE_TIMEOUT,
        close_timeout: float = CLOSE_TIMEOUT,
        refresh_interval: float = REFRESH_INTERVAL,
        lifetime: int = LIFETIME,
        transport: Transport = "udp",
        ca: Path | None = None,
    ) -> None:
        if allocate_timeout <= 0 or close_timeout <= 0:
            raise ValueError("TURN timeouts must be positive")
        if ca is not None and transport != "tls":
            raise ValueError("a CA is for a TURN server over TLS only")
        self.server = server
        self.transport = transport
        self.ca = ca
        self.user = user
        self.password = password
        self.allocate_timeout = allocate_timeout
        self.close_timeout = close_timeout
        self.refresh_interval = refresh_interval
        self.lifetime = lifetime
        self.relayed = Endpoint("0.0.0.0", 0)
        self.mapped = Endpoint("0.0.0.0", 0)
        self.allocation_s = 0.0
        self.dropped = 0  # datagrams dropped: the inbox full, or waiting too long for a channel
        self._client: _Plexus | None = None
        self._refresher: Refresher | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._inbox: collections.deque[tuple[bytes, Endpoint]] = collections.deque()
        self._readable = asyncio.Event()
        self._closed = False
        self._failure: TurnError | None = None
        self._sink: Sink = self._enqueue

    def __str__(self) -> str:
        return f"TURN relay {self.relayed} on {self._over(str(self.server))}"

    def _over(self, name: str) -> str:
        """The server's name in messages; the transport named unless it is UDP, as it always was."""
        return name if self.transport == "udp" else f"{name} over {self.transport.upper()}"

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def __aenter__(self) -> Relay:
        if self._client is None:  # not opened by an explicit open()
            await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Allocate: within `allocate_timeout`, or a TurnError."""
        if self._client is not None:
            raise RuntimeError("this relay is already open")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            address = await driver.resolve(self.server)
        except OSError as exc:
            reason = exc.strerror or exc
            raise TurnUnreachableError(f"cannot resolve TURN server {self.server.host}: {reason}") from exc
        name = self._over(str(self.server) if self.server == address else f"{self.server} ({address.host})")
        client: _Plexus | None = None
        try:
            async with asyncio.timeout(self.allocate_timeout):
                client = await self._connect(address)
                await client.connect()
        except BaseException as exc:
            if client is not None:
                if client.refresh_task is not None:
                    client.refresh_task.cancel()
                client.transport.close()
            error = self._allocation_error(name, exc, client)
            if error is None:
                raise  # cancellation, a bug: as it is
            raise error from exc
        assert client.relayed_address is not None and client.mapped_address is not None
        self._client = client
        self.relayed = Endpoint(*client.relayed_address)
        self.mapped = Endpoint(*client.mapped_address)
        self.allocation_s = loop.time() - started
        client.receiver = _Receiver(self)
        self._refresher = Refresher(
            client, name, interval=self.refresh_interval, timeout=self.allocate_timeout
        )
        self._spawn(self._refresher.run())
        log.info(
            "TURN allocation %s on %s (mapped %s) in %.3f s",
            self.relayed,
            name,
            self.mapped,
            self.allocation_s,
        )

    async def _connect(self, address: Endpoint) -> _Plexus:
        """The client, connected to the server at `address` over this relay's transport."""
        loop = asyncio.get_running_loop()
        server = (address.host, address.port)

        def client(kind: type[C]) -> C:
            return kind(server, self.user, self.password, self.lifetime)

        if self.transport == "udp":
            transport, udp = await loop.create_datagram_endpoint(lambda: client(_Client), remote_addr=server)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            return udp
        context = None
        if self.transport == "tls":
            context = ssl.create_default_context(cafile=self.ca)
        _, stream = await loop.create_connection(
            lambda: client(_StreamClient),
            address.host,
            address.port,
            ssl=context,
            # the certificate names the server as the user gave it, not the address it resolved to
            server_hostname=self.server.host if context is not None else None,
        )
        return stream

    def _allocation_error(self, name: str, exc: BaseException, client: _Plexus | None) -> TurnError | None:
        if isinstance(exc, TimeoutError):
            cause = client.last_error if client is not None else None
            reason = f" ({cause.strerror or cause})" if cause is not None else ""
            return TurnUnreachableError(
                f"no answer from TURN server {name} within {self.allocate_timeout:g} s{reason}"
            )
        if isinstance(exc, stun.TransactionError):
            return refusal(name, "allocation", exc)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return TurnUnreachableError(
                f"TURN server {name}: its certificate did not verify ({exc.verify_message}; --turn-ca names "
                "a private CA)"
            )
        if isinstance(exc, ssl.SSLError):
            return TurnUnreachableError(f"TLS with TURN server {name} failed: {exc.reason or exc}")
        if isinstance(exc, OSError) and exc.errno is None:  # aioice: a response without a needed attribute
            return TurnError(f"TURN server {name} gave a bad allocation response: {exc}")
        if isinstance(exc, OSError):
            return TurnUnreachableError(f"cannot reach TURN server {name}: {exc.strerror or exc}")
        return None

    async def close(self) -> None:
        """Delete the allocation (within `close_timeout`; the server frees it on expiry otherwise)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        client = self._client
        if client is None:
            return
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self.close_timeout):
                await client.delete()
        except TimeoutError:
            log.info(
                "TURN server %s did not confirm the deletion within %g s: the allocation expires on its own",
                self.server,
                self.close_timeout,
            )
        finally:
            client.transport.close()
            self._ended(None)
        log.debug(
            "TURN allocation %s closed in %.3f s", self.relayed, asyncio.get_running_loop().time() - started
        )

    def _ended(self, failure: TurnError | None) -> None:
        """The allocation is gone: closed here, or lost (its refresh failed, or its stream to the server
        closed)."""
        if self._failure is None:
            # Over a stream the connection's end is the allocation's too, whoever ended it.
            lost = (
                "the TURN server stopped refreshing it"
                if self.transport == "udp"
                else "its connection closed"
            )
            self._failure = failure or (
                TurnError(f"{self} is closed") if self._closed else TurnError(f"{self} was lost: {lost}")
            )
            if not self._closed:
                log.warning("%s", self._failure)
        self._readable.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def client(self) -> _Plexus:
        if self._client is None:
            raise RuntimeError("the relay is not open")
        return self._client

    @property
    def refresher(self) -> Refresher:
        if self._refresher is None:
            raise RuntimeError("the relay is not open")
        return self._refresher

    # ---- permissions -----------------------------------------------------------------------------------
    async def permit(self, peer_ip: str) -> None:
        """Let datagrams from any port of `peer_ip` in (CreatePermission), refreshed while the relay lives."""
        client = self.client
        ip = canonical_ip(peer_ip)
        client.permitted.add(ip)
        try:
            async with asyncio.timeout(self.allocate_timeout):
                await create_permission(client, ip)
        except TimeoutError as exc:
            client.permitted.discard(ip)
            what = f"the permission for {ip}"
            raise TurnUnreachableError(f"no answer from TURN server {self.server} to {what}") from exc
        except stun.TransactionError as exc:
            client.permitted.discard(ip)
            raise refusal(str(self.server), f"permission for {ip}", exc) from exc
        log.debug("TURN permission for %s on %s", ip, self.relayed)

    # ---- datagrams -----------------------------------------------------------------------------------------
    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send `data` to the peer `addr` through the relay; like a UDP socket's, it may be lost.

        The first datagram to an address binds a channel to it (one task per new address); later ones are
        ChannelData written straight to the socket. Raises TurnError once the allocation is closed or lost.
        """
        client = self.client
        if self._failure is None and client.transport.is_closing():
            self._ended(None)
        if self._failure is not None:
            raise self._failure
        key = (addr[0], addr[1])
        channel = client.channel(key)
        if channel is not None:
            client.write(_CHANNEL_HEADER.pack(channel, len(data)) + data)
            return
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = []
            self._spawn(self._bind(key, data))
        elif len(pending) < PENDING_SIZE:
            pending.append(data)
        else:
            self.dropped += 1

    async def _bind(self, key: Address, first: bytes) -> None:
        client = self.client
        try:
            async with asyncio.timeout(self.allocate_timeout):
                await client.send_data(first, key)  # binds the channel, then sends
        except (TimeoutError, stun.TransactionError, OSError) as exc:
            dropped = self._pending.pop(key, [])
            self.dropped += 1 + len(dropped)
            log.warning(
                "cannot bind a TURN channel to %s on %s: %s",
                Endpoint(*key),
                self.server,
                refusal(str(self.server), "channel", exc)
                if isinstance(exc, stun.TransactionError)
                else str(exc) or "no answer",
            )
            return
        log.debug("TURN channel %#06x to %s", client.channel(key), Endpoint(*key))
        with contextlib.suppress(TurnError):  # closed meanwhile
            for data in self._pending.pop(key, []):
                self.sendto(data, key)

    def _enqueue(self, data: bytes, source: Endpoint) -> None:
        if len(self._inbox) >= INBOX_SIZE:
            self.dropped += 1
            return
        self._inbox.append((data, source))
        self._readable.set()

    async def recvfrom(self) -> tuple[bytes, Endpoint]:
        """The next datagram from a peer and its source as the TURN server reports it (XOR-PEER-ADDRESS or
        the channel's peer); TurnError once the allocation is closed or lost and nothing is left."""
        while not self._inbox:
            if self._failure is not None:
                raise self._failure
            self._readable.clear()
            await self._readable.wait()
        return self._inbox.popleft()

    async def wait_ended(self) -> TurnError:
        """Wait until the allocation is closed or lost; the error that says which."""
        while self._failure is None:
            self._readable.clear()
            await self._readable.wait()
        return self._failure


# ---- the data plane for the launched command --------------------------------------------------------------


class _Forwarder:
    """The command's datagrams to `peer` and back. Only `peer`, the endpoint the handshake authenticated, is
    heard: the command's own datagrams carry no proof of their sender, so a new source, even on the peer's
    IP, may be anyone there (behind the same carrier NAT, or spoofing) and is never followed."""

    def __init__(self, relay: Relay, local: socket.socket, command: Endpoint, peer: Endpoint) -> None:
        self.relay = relay
        self.local = local
        self.command = (command.host, command.port)
        self.peer = peer.canonical()
        self.to_peer = 0
        self.to_command = 0
        self.dropped = 0

    def on_local_readable(self) -> None:
        for _ in range(FORWARD_BATCH):
            try:
                data, source = self.local.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier datagram to the command
                log.debug("forwarder: %s", exc)
                continue
            if source[:2] != self.command:
                self.dropped += 1
                log.debug("forwarder: ignoring %d bytes from %s, not the command", len(data), source)
                continue
            try:
                self.relay.sendto(data, self.peer)
            except TurnError:  # the allocation is gone: forward() raises it
                return
            self.to_peer += 1

    def on_relayed(self, data: bytes, source: Endpoint) -> None:
        if source.canonical() != self.peer:
            self.dropped += 1
            log.debug("forwarder: ignoring %d bytes from %s, not the peer %s", len(data), source, self.peer)
            return
        try:
            self.local.sendto(data, self.command)
        except OSError as exc:  # a full buffer, or the command's port closed: a lost datagram
            self.dropped += 1
            log.debug("forwarder: to the command %s: %s", Endpoint(*self.command), exc)
            return
        self.to_command += 1


async def forward(relay: Relay, local: socket.socket, command: Endpoint, peer: Endpoint) -> None:
    """Carry datagrams between the command and `peer` through `relay` until cancelled.

    `local` is plexus's UDP socket on 127.0.0.1, the "peer" endpoint the command was given; `command` is the
    command's own endpoint. Datagrams from `command` to `local` go to `peer` through the relay; datagrams from
    `peer` (the endpoint the handshake ended with; any other source is dropped) come out of `local` to
    `command`. Raises TurnError when
    the allocation is lost. Datagrams that reached the relay before the call are delivered first.
    """
    if relay._sink != relay._enqueue:
        raise RuntimeError(f"{relay} already has a forwarder")
    loop = asyncio.get_running_loop()
    local.setblocking(False)
    forwarder = _Forwarder(relay, local, command, peer)
    while relay._inbox:
        forwarder.on_relayed(*relay._inbox.popleft())
    relay._sink = forwarder.on_relayed
    loop.add_reader(local.fileno(), forwarder.on_local_readable)
    log.info("forwarding %s <-> %s through %s", Endpoint(*local.getsockname()[:2]), peer, relay)
    try:
        raise await relay.wait_ended()
    finally:
        loop.remove_reader(local.fileno())
        relay._sink = relay._enqueue
        log.info(
            "forwarder ends: %d datagrams to the peer, %d to the command, %d dropped",
            forwarder.to_peer,
            forwarder.to_command,
            forwarder.dropped,
        )


# ---- the flag handshake over the relay ---------------------------------------------------------------------


async def punch(
    relay: Relay,
    peer: Endpoint,
    codec: Codec,
    *,
    accept: bool,
    timeout: float = DEFAULT_TIMEOUT,
    peer_reflexive: bool = False,
) -> Endpoint:
    """plexus/puncher.py's flag handshake with `peer` through the relay; the peer endpoint at its end.

    The same state machines as `puncher.punch`, driven by `relay.recvfrom` and `relay.sendto` instead of a
    socket: TTLs are ignored (there is no NAT of ours to open), and datagrams go where the machine says (its
    current `peer`), so with `peer_reflexive` a peer whose NAT maps per destination is found at the source its
    first authenticated packet comes from.
    """
    key = peer.canonical()
    machine = handshake(
        key, codec, asyncio.get_running_loop().time(), accept=accept, timeout=timeout,
        peer_reflexive=peer_reflexive,
    )  # fmt: skip
    await driver.drive(machine, _Through(relay))
    if machine.outcome is Outcome.TIMED_OUT:
        raise HandshakeTimeoutError(f"no handshake with {peer} through {relay} within {timeout:g} s")
    assert machine.outcome is not None  # a machine is finished only with an outcome
    report(machine.outcome, machine.peer, via=relay)
    return machine.peer


class _Through:
    """The relay as a plexus/driver.py transport: datagrams from peers (those that reached the relay before
    included) go to the driver, its datagrams to `sendto`; TTLs are ignored, and the relay's end ends the
    driver with the TurnError that says why."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._watch: asyncio.Task[None] | None = None

    def start(self, deliver: driver.Deliver, fail: driver.Fail) -> None:
        relay = self._relay
        if relay._sink != relay._enqueue:
            raise RuntimeError(f"{relay} already has a reader")

        def sink(data: bytes, source: Endpoint) -> None:
            deliver(0, data, source.canonical())

        relay._sink = sink
        while relay._inbox and relay._sink is sink:  # what came before, until the handshake is done
            sink(*relay._inbox.popleft())

        async def watch() -> None:
            fail(await relay.wait_ended())

        self._watch = asyncio.ensure_future(watch())

    def stop(self) -> None:
        self._relay._sink = self._relay._enqueue
        if self._watch is not None:
            self._watch.cancel()

    def send(self, datagram: driver.Datagram) -> None:
        self._relay.sendto(datagram.data, datagram.to)
