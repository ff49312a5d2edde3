"""The ways through, as values: this side's candidates, and each kind of path, which knows how it is set up,
reported and torn down.

`discover` learns this side's server-reflexive candidate (STUN: its outer endpoint and its NAT's mapping),
its host candidate (the inner endpoint) and, on the IPv6 socket (`punching` binds both), its IPv6 endpoint;
`gather` adds a relayed one where a relay may be needed; `Gathered.reach` is what the offer tells the peer.
plexus/path.py decides which kind of path the two NATs allow (a pure decision table); `choose` turns that
decision and the relays at hand into an ordered list of Way values, and `establish` tries them in turn, each
but the last bounded by its `bound` (IPv6 tried first: IPV6_BOUND; a direct way before a relay:
FALLBACK_BOUND). Candidates of one plan that can run in one handshake (the outer endpoint, LAN endpoints, the
IPv6 endpoint) race there, and the acceptor's choice settles it. A Way's `establish` confirms the path with
the handshake and returns an Established path, which carries the session's work (the command's life, the
streams) and, on a relay this side allocated, the datagrams between the command and the relay.

A new kind of path (IPv6 and TURN over TCP came so; a port mapping would) is one more candidate in
`discover` or `gather`, one more Way and its place in `ways`; the session's flow does not change. The shape
follows aioice's candidates (values tried in order) and aioquic's QuicConnection (the transport's state kept
out of the caller's flow).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from plexus import events, path, puncher, stun
from plexus.endpoint import Endpoint
from plexus.errors import (
    HandshakeTimeoutError,
    NatUnsuitableError,
    StunError,
    StunSilentError,
    UdpBlockedError,
    UsageError,
)
from plexus.launcher import Tunnel
from plexus.path import Method, Plan
from plexus.rendezvous import Mapping, Offer, Reach

# The TURN client (aioice's) loads with the first relay a session allocates or uses, not with every session.
if TYPE_CHECKING:
    from plexus.relay import Relay, Transport
    from plexus.resume import Resume

log = logging.getLogger(__name__)

NOWHERE = Endpoint("0.0.0.0", 0)  # the outer endpoint of a side that no UDP leaves
# With a relay over TCP or TLS at hand, a binding over TCP is asked beside STUN over UDP. An answer over TCP
# within UDP_PATIENCE and then none over UDP for as long again, at least UDP_GRACE (STUN's sends at 0 and
# 0.2 s, and their round trip), means that no UDP gets out. On a lossy link a later send might still have
# been answered; the session then goes through the relay, which works anyway.
UDP_PATIENCE = 2.0
UDP_GRACE = 0.5
ARRIVING_HOPS = 64  # a first hello that must arrive (toward a relay)
# With a relay to fall back on, how long a direct attempt may take: a birthday needs up to about 7 s.
FALLBACK_BOUND = 10.0
# How long IPv6 may take as a way of its own before the IPv4 way: through stateful firewalls it is one round
# trip after both sides' first hellos, which go out every HELLO_INTERVAL.
IPV6_BOUND = 3.0
# The IPv6 STUN binding runs beside IPv4's discovery, which takes two round trips or more; its sends at 0,
# 0.2, 0.6 and 1.4 s. A host whose IPv6 gets no answer by then offers none.
IPV6_SCHEDULE = stun.Schedule(attempts=4, timeout=1.5)


def bind(inner: Endpoint) -> socket.socket:
    """A non-blocking UDP socket on `inner` (--stun-client, IPv4 or IPv6); a port that cannot be bound is a
    usage error."""
    family = socket.AF_INET6 if ":" in inner.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own socket
        sock.bind(inner)
    except OSError as error:
        sock.close()
        raise UsageError(f"cannot bind --stun-client {inner}: {error.strerror}") from error
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class Punching:
    """The punching sockets: IPv4's (always: plexus 2.2's endpoint is IPv4) and IPv6's where the host can
    bind one. Each way closes what it uses; closing this closes the rest."""

    v4: socket.socket
    v6: socket.socket | None = None

    def close(self) -> None:
        self.v4.close()
        if self.v6 is not None:
            self.v6.close()


def punching(inner: Endpoint, inner6: Endpoint | None) -> contextlib.closing[Punching]:
    """Bind --stun-client's sockets. IPv6's takes IPv4's port where `inner6` names none (and it is free), so
    the command's port is the same whichever family wins; a host without IPv6 has no IPv6 socket, unless
    --stun-client named an IPv6 address (then failing to bind it is a usage error)."""
    v4 = bind(inner)
    v6 = None
    if inner6 is not None:
        try:
            if inner6.port:
                v6 = bind(inner6)
            else:
                try:
                    v6 = bind(Endpoint(inner6.host, v4.getsockname()[1]))
                except UsageError:
                    v6 = bind(inner6)
        except UsageError as error:
            if inner6.host != "::":
                v4.close()
                raise
            log.debug("no IPv6 socket: %s", error)
    return contextlib.closing(Punching(v4, v6))


def forwarded(tunnel: Tunnel) -> bool:
    """Whether the tunnel faces plexus's relay forwarder (a relay this side allocated): its inner endpoint
    is a loopback one."""
    return ipaddress.ip_address(tunnel.inner.host).is_loopback


def path_socket(tunnel: Tunnel, inner: Endpoint, inner6: Endpoint | None) -> socket.socket:
    """A socket for plexus's own use of the path (the streams, a carried command), once the punch has let its
    port go: facing the forwarder, the tunnel's loopback endpoint; else the tunnel's port on the address
    --stun-client named (`inner`, `inner6`), as the punch's socket was, so that where that is every address
    (the default) a new address of this host (Wi-Fi to tethering) still sends and receives."""
    if forwarded(tunnel):
        return bind(tunnel.inner)
    named = inner6 if tunnel.family == socket.AF_INET6 and inner6 is not None else inner
    return bind(Endpoint(named.host, tunnel.inner.port))


@dataclass(frozen=True)
class TurnConfig:
    """--turn-server, --turn-user, --turn-passwd, --turn-ca: the relay for when both NATs map per destination
    (or no UDP gets out: over TCP or TLS)."""

    server: Endpoint
    user: str
    password: str = field(repr=False)  # a config printed or logged must not show it
    transport: Transport = "udp"
    ca: Path | None = None  # over TLS: the CA its certificate is verified against; None: the system's

    def __str__(self) -> str:
        """As --turn-server takes it (RFC 7065)."""
        if self.transport == "tls":
            return f"turns:{self.server}"
        return f"turn:{self.server}?transport=tcp" if self.transport == "tcp" else str(self.server)


@dataclass(frozen=True)
class Found:
    """What STUN told this side: its endpoints, and whether its NAT maps endpoint-independently."""

    inner: Endpoint
    outer: Endpoint
    mapping: Mapping
    # IPv6: the IPv6 socket's endpoint, and the same as the STUN server saw it (no NAT66: the same, as a rule)
    inner6: Endpoint | None = None
    outer6: Endpoint | None = None


async def discover(
    socks: Punching, server: Endpoint, turn: TurnConfig | None = None, server6: Endpoint | None = None
) -> Found:
    """Learn the inner and outer endpoints and whether the outer one holds for every destination; or, when
    STUN gets no answer over UDP and `turn` reaches its server over TCP or TLS, that this side can only be
    reached through that relay (mapping "blocked"). Beside it, on the IPv6 socket, the IPv6 endpoint: from
    `server6`, or the AAAA record of `server`'s name."""
    ipv6 = asyncio.ensure_future(discover6(socks.v6, server, server6))
    try:
        found = await _discover4(socks.v4, server, turn)
        found6 = await ipv6 if found.mapping != "blocked" else "no UDP gets out"
    finally:
        ipv6.cancel()
    if isinstance(found6, str):
        log.info("no IPv6: %s", found6)
    else:
        inner6, outer6 = found6
        translated = outer6.canonical().host != inner6.canonical().host
        log.info(
            "IPv6 endpoint %s%s", outer6, " (behind a NAT66 or prefix translation)" if translated else ""
        )
        found = dataclasses.replace(found, inner6=inner6, outer6=outer6)
    events.emit(
        events.Discovered, inner=found.inner, outer=found.outer, mapping=found.mapping, outer6=found.outer6
    )
    return found


async def discover6(
    sock: socket.socket | None, server: Endpoint, server6: Endpoint | None
) -> tuple[Endpoint, Endpoint] | str:
    """The IPv6 socket's endpoints, inner and outer; or why there are none (no IPv6 socket, no IPv6 STUN
    server, no IPv6 route, a firewall that lets no IPv6 UDP out): this side then offers no IPv6 candidate."""
    if sock is None:
        return "no IPv6 socket (--stun-client names IPv4 only, or this host has no IPv6)"
    address = server6 or await stun.resolve6(server)
    if address is None and server.is_ip:
        return f"STUN server {server.host} is an IPv4 address (its name, with an AAAA record, gives IPv6 too)"
    if address is None:
        return f"STUN server {server.host} has no IPv6 address (no AAAA record)"
    try:
        outer = await stun.query_outer(sock, address, schedule=IPV6_SCHEDULE)
        return stun.inner_endpoint(sock, address), outer
    except StunError as error:
        return str(error)


async def _discover4(sock: socket.socket, server: Endpoint, turn: TurnConfig | None) -> Found:
    log.debug("asking STUN server %s for the outer endpoint", server)
    answered = asyncio.Event()
    probing = asyncio.ensure_future(stun.probe_mapping(sock, server, answered=answered))
    over_tcp: asyncio.Future[Endpoint | None] | None = None
    try:
        if turn is not None and turn.transport != "udp":
            over_tcp = asyncio.ensure_future(stun.query_over_tcp(server))
            silent = await _udp_silent(answered, over_tcp)
            if silent is not None:
                # STUN's 9.5 s waited out would only delay the relay that carries the session either way.
                why = f"STUN server {server} answers over TCP, {silent}"
                return await _relay_only(sock, server, turn, why)
        report = await probing
    except StunSilentError as error:
        return await _without_udp(sock, server, turn, error, over_tcp)
    finally:
        probing.cancel()
        if over_tcp is not None:
            over_tcp.cancel()
    if report.mapping is None:
        log.warning("STUN server %s has no alternate address: NAT mapping not tested", server)
    log.info("inner endpoint %s, outer endpoint %s", report.inner, report.outer)
    if report.punchable is False:
        log.info("NAT mapping is %s: the outer port changes per destination", report.mapping)
    return Found(report.inner, report.outer, "dependent" if report.punchable is False else "independent")


async def _udp_silent(answered: asyncio.Event, over_tcp: asyncio.Future[Endpoint | None]) -> str | None:
    """With a relay over TCP or TLS at hand, STUN over TCP is asked beside STUN over UDP: an answer over TCP
    and none over UDP for as long again (at least UDP_GRACE) means that no UDP gets out, and says so; None
    when UDP answered, or TCP did not within UDP_PATIENCE (then STUN over UDP runs its course)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    heard = asyncio.ensure_future(answered.wait())
    try:
        either: set[asyncio.Future[Any]] = {heard, over_tcp}
        await asyncio.wait(either, timeout=UDP_PATIENCE, return_when=asyncio.FIRST_COMPLETED)
        if answered.is_set() or not over_tcp.done() or over_tcp.result() is None:
            return None
        took = loop.time() - start
        grace = max(UDP_GRACE, took)
        await asyncio.wait({heard}, timeout=grace)
        return None if answered.is_set() else f"over UDP not within {took + grace:.1f} s"
    finally:
        heard.cancel()


async def _without_udp(
    sock: socket.socket,
    server: Endpoint,
    turn: TurnConfig | None,
    error: StunSilentError,
    asked: asyncio.Future[Endpoint | None] | None = None,
) -> Found:
    """STUN got no answer over UDP: a binding request over TCP to the same server (`asked` already, or now)
    tells a network that lets no UDP out (TCP answers) from a server that is down. A relay over TCP or TLS
    carries the session either way; without one, the failure says which it seems to be."""
    over_tcp = await (asked if asked is not None else stun.query_over_tcp(server))
    if over_tcp is not None:
        why = f"STUN server {server} answers over TCP but not over UDP: no UDP gets out here"
    else:
        why = f"{error}, nor over TCP: is the server down?"
    if turn is None or turn.transport == "udp":
        if over_tcp is None:
            raise StunError(why) from error
        given = f"; --turn-server {turn} is over UDP" if turn is not None else ""
        raise UdpBlockedError(
            f"{why}; a TURN relay over TCP or TLS would carry the session (--turn-server turns:HOST{given})"
        ) from error
    return await _relay_only(sock, server, turn, why)


async def _relay_only(sock: socket.socket, server: Endpoint, turn: TurnConfig, why: str) -> Found:
    log.warning("%s; this session goes through TURN relay %s only", why, turn)
    return Found(stun.inner_endpoint(sock, await stun.resolve(server)), NOWHERE, "blocked")


def note_limits(found: Found, turn: TurnConfig | None) -> None:
    """An acceptor behind a NAT that maps per destination says at its start which peers it cannot serve."""
    if found.mapping == "blocked":
        log.warning("no UDP gets out here: serving plexus peers only, through TURN relay %s", turn)
    elif found.mapping == "dependent":
        log.warning(
            "this NAT maps per destination: peers behind endpoint-independent NATs get through by birthday "
            "punching; peers behind such NATs too need %sa TURN relay (%s)",
            "IPv6 on their side (this side has it) or " if found.outer6 else "",
            f"--turn-server {turn}" if turn else "no --turn-server given",
        )


@dataclass(frozen=True)
class Gathered:
    """This side's candidates: STUN's (`found`), and the relay it allocated (`relay`) where one may be
    needed."""

    found: Found
    relay: Relay | None = None

    @property
    def outer(self) -> Endpoint:
        """The outer endpoint the offer names: STUN's, or the relayed one where no UDP gets out."""
        if self.found.mapping == "blocked":
            assert self.relay is not None, "no UDP gets out and no relay"
            return self.relay.relayed
        return self.found.outer

    def reach(self, streams: bool, *, hosts: bool, ipv6: bool = True) -> Reach:
        """What this side's offer tells the peer of its ways through: its IPv6 endpoint (`ipv6`: not toward
        a peer known to be plexus 2.2, which is never sent anything new); with `hosts` (only toward a peer
        known to be plexus) its host candidate too, the punching socket's LAN endpoint, where it is not the
        outer one."""
        lan = (self.found.inner,) if hosts and self.found.inner != self.found.outer else ()
        relay = self.relay.relayed if self.relay else None
        return Reach(self.found.mapping, relay, streams, lan, self.found.outer6 if ipv6 else None)


async def gather(
    found: Found,
    turn: TurnConfig | None,
    allocations: contextlib.AsyncExitStack,
    *,
    accept: bool,
    peer: Reach | None = None,
) -> Gathered:
    """This side's candidates. A relay is allocated (into `allocations`, which releases it) where it may be
    needed: by the inviter before its request, so that the request can name it, when its NAT maps per
    destination (an acceptor with its own relay, or an easier NAT, may make it unneeded); by the acceptor for
    a `peer` that brought none (a 2.2 inviter, `peer` None, knows of none), for the path when both NATs map
    per destination and to fall back on when a direct attempt fails. Where no UDP gets out, always: the relay
    is this side's only way."""
    needed = (peer is not None and peer.relay is None) if accept else found.mapping == "dependent"
    needed |= found.mapping == "blocked"
    if turn is None or not needed:
        return Gathered(found)
    from plexus.relay import Relay

    relay = await allocations.enter_async_context(
        Relay(turn.server, turn.user, turn.password, transport=turn.transport, ca=turn.ca)
    )
    log.info("TURN relay allocated: %s", relay)
    return Gathered(found, relay)


@dataclass(frozen=True)
class Attempt:
    """What every way needs. `socks` are the sockets STUN ran on (their mappings are the ones the peer was
    told of); the first way to use one closes it. `stun_client` is --stun-client, for a way that needs a
    socket of its own; `found` is this side's endpoints as STUN saw them."""

    socks: Punching
    stun_client: Endpoint
    found: Found
    peer: Endpoint  # the peer's outer endpoint, from its offer
    secret: int = field(repr=False)
    codec: puncher.Codec
    accept: bool
    hops: int  # --punch-hops: the TTL of the first hellos on a direct path

    @property
    def sock(self) -> socket.socket:
        return self.socks.v4

    @property
    def inner(self) -> Endpoint:
        return self.found.inner

    @property
    def outer(self) -> Endpoint:
        return self.found.outer

    def tunnel(self, peer: Endpoint, method: Method, inner: Endpoint | None = None) -> Tunnel:
        """The tunnel to `peer` (an IPv6 one from the IPv6 socket's endpoints), from `inner` (a socket of a
        way's own) or the punching socket's endpoint."""
        if ":" in peer.host:
            assert self.found.inner6 is not None and self.found.outer6 is not None, "IPv6 without endpoints"
            return Tunnel(self.found.inner6, self.found.outer6, peer, self.secret, method)
        return Tunnel(inner or self.inner, self.outer, peer, self.secret, method)


class Established(Protocol):
    """A confirmed path: what the command is told (`tunnel`), and how the session's work runs on it."""

    @property
    def tunnel(self) -> Tunnel: ...

    async def carry(self, work: Awaitable[None], resume: Resume | None = None) -> None:
        """Run the work (the command's life, the streams) for as long as the path lives; `resume` beside it
        where this path follows a move itself (plexus/carry.py's; the streams follow theirs)."""
        ...

    @property
    def through_here(self) -> bool:
        """The path's datagrams pass through this process: it must stay for as long as the command runs."""
        ...

    async def release_unused(self, allocations: contextlib.AsyncExitStack) -> None:
        """Let go of the relay allocations this path does not use (a standby kept for a fallback), now
        rather than when the session ends."""
        ...


@dataclass(frozen=True)
class Punched:
    """A path through both NATs or toward the peer's relay: the packets need nothing from plexus."""

    tunnel: Tunnel
    through_here = False

    async def carry(self, work: Awaitable[None], resume: Resume | None = None) -> None:
        await work

    async def release_unused(self, allocations: contextlib.AsyncExitStack) -> None:
        await allocations.aclose()


@dataclass(frozen=True)
class Forwarded:
    """A path through the relay this side allocated: the command talks to plexus's forwarder (`local`, the
    command's peer endpoint), which carries its datagrams to `peer` through `relay` while the work runs; a
    lost relay ends the work."""

    tunnel: Tunnel
    relay: Relay
    local: socket.socket
    peer: Endpoint
    through_here = True

    async def carry(self, work: Awaitable[None], resume: Resume | None = None) -> None:
        from plexus.relay import forward as relay_forward

        with contextlib.closing(self.local):
            forwarding = asyncio.ensure_future(
                relay_forward(self.relay, self.local, self.tunnel.inner, self.peer)
            )
            working = asyncio.ensure_future(work)
            try:
                await asyncio.wait({forwarding, working}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                forwarding.cancel()
                working.cancel()  # the relay is gone or plexus is stopping: the work has no path left
                await asyncio.gather(working, return_exceptions=True)
            lost = forwarding.exception() if forwarding.done() and not forwarding.cancelled() else None
            if lost is not None:
                raise lost
            working.result()

    async def release_unused(self, allocations: contextlib.AsyncExitStack) -> None:
        pass  # the allocation is this path: it goes when the session ends


class Way(Protocol):
    """One kind of path: how it is reported (`method`, `describe`) and set up (`establish`); `bound`: how
    long it may take where another way comes after it."""

    @property
    def method(self) -> Method: ...

    @property
    def bound(self) -> float: ...

    def describe(self) -> str: ...

    async def establish(self, attempt: Attempt, timeout: float) -> Established: ...


@dataclass(frozen=True)
class Direct:
    """Both NATs map endpoint-independently: a TTL-limited hello, then the handshake. `peer_reflexive`
    accepts the peer from another port of its address once a handshake packet authenticates. A LAN plan
    races the peer's host candidates with its outer endpoint on the one socket, and a plan with the peer's
    IPv6 endpoint races it from the IPv6 socket, in the same handshake: the tunnel says which won."""

    plan: Plan
    bound = FALLBACK_BOUND

    @property
    def method(self) -> Method:
        return self.plan.method

    def describe(self) -> str:
        return self.plan.describe()

    async def establish(self, attempt: Attempt, timeout: float) -> Established:
        spray = puncher.Spray() if self.plan.method is Method.SPRAY else None
        lan = self.plan.races_lan
        ipv6 = self.plan.ipv6 if self.plan.races_ipv6 else None
        peer = await puncher.punch(
            attempt.sock,
            attempt.peer,
            attempt.codec,
            accept=attempt.accept,
            hops=attempt.hops,
            timeout=timeout,
            peer_reflexive=self.plan.peer_reflexive,
            spray=spray,
            hosts=self.plan.hosts + ((ipv6,) if ipv6 else ()),
            lan=lan,
            also=attempt.socks.v6 if ipv6 else None,
        )
        if ":" in peer.host:
            won = Method.IPV6
        else:  # another address than the outer one's is the LAN (a peer-reflexive port keeps the address)
            moved = peer.canonical().host != attempt.peer.canonical().host
            won = Method.LAN if moved else Method.DIRECT if lan else self.method
        if won is not self.method:
            log.info("path: %s won the race (the peer at %s)", won, peer)
        return Punched(attempt.tunnel(peer, won))


@dataclass(frozen=True)
class Ipv6:
    """Both sides have IPv6, which crosses stateful firewalls with the same punch and needs no NAT traversal:
    the handshake on the IPv6 socket alone, toward the peer's IPv6 endpoint. It comes before the IPv4 ways
    that open many mappings or a relay (fan-out, spray, relay), bounded by IPV6_BOUND, and is the only way
    where IPv4 has none."""

    plan: Plan
    method = Method.IPV6
    bound = IPV6_BOUND

    def describe(self) -> str:
        return Plan(Method.IPV6, ipv6=self.plan.ipv6).describe()

    async def establish(self, attempt: Attempt, timeout: float) -> Established:
        assert attempt.socks.v6 is not None and self.plan.ipv6 is not None, "an IPv6 way without IPv6"
        peer = await puncher.punch(
            attempt.socks.v6, self.plan.ipv6, attempt.codec, accept=attempt.accept, hops=attempt.hops,
            timeout=timeout,
        )  # fmt: skip
        return Punched(attempt.tunnel(peer, self.method))


@dataclass(frozen=True)
class FanOut:
    """This side maps per destination (birthday punching): many sockets, each opening a mapping toward the
    peer; the first to complete the handshake is the path."""

    plan: Plan
    method = Method.FANOUT
    bound = FALLBACK_BOUND

    def describe(self) -> str:
        return self.plan.describe()

    async def establish(self, attempt: Attempt, timeout: float) -> Established:
        host = attempt.inner.host
        extra = [bind(Endpoint(host, 0)) for _ in range(puncher.FANOUT_SOCKETS - 1)]
        winner, peer = await puncher.punch_fanout(
            [attempt.sock, *extra], attempt.peer, attempt.codec, accept=attempt.accept, timeout=timeout
        )
        with contextlib.closing(winner):
            inner = Endpoint(host, winner.getsockname()[1])
        return Punched(attempt.tunnel(peer, self.method, inner))


@dataclass(frozen=True)
class TowardRelay:
    """The handshake with the peer's relayed endpoint, from an ordinary socket: STUN's, or (as a fallback,
    after a direct attempt closed it) a new one on --stun-client."""

    relayed: Endpoint
    fresh_socket: bool = False
    method = Method.RELAY
    bound = FALLBACK_BOUND

    def describe(self) -> str:
        return Plan(Method.RELAY, relay=self.relayed).describe()

    async def establish(self, attempt: Attempt, timeout: float) -> Established:
        sock = bind(attempt.stun_client) if self.fresh_socket else attempt.sock
        inner = Endpoint(attempt.inner.host, sock.getsockname()[1])
        # The TTL-limited punch must die between the NATs; toward a relay it must arrive, so the relay learns
        # where this side's NAT maps it.
        peer = await puncher.punch(
            sock, self.relayed, attempt.codec, accept=attempt.accept, hops=ARRIVING_HOPS, timeout=timeout
        )
        return Punched(attempt.tunnel(peer, self.method, inner))


@dataclass(frozen=True)
class OwnRelay:
    """The handshake through this side's TURN allocation; the command will talk to a local forwarder."""

    relay: Relay
    method = Method.RELAY
    bound = FALLBACK_BOUND

    def describe(self) -> str:
        return Plan(Method.RELAY).describe()

    async def establish(self, attempt: Attempt, timeout: float) -> Established:
        from plexus.relay import punch as relay_punch

        attempt.sock.close()  # STUN's mapping is not used: the peer is told of the relayed endpoint
        # its port toward the relay is not the one STUN saw: any port of its IP
        await self.relay.permit(attempt.peer.host)
        peer = await relay_punch(
            self.relay,
            attempt.peer,
            attempt.codec,
            accept=attempt.accept,
            timeout=timeout,
            peer_reflexive=True,
        )
        local = bind(Endpoint("127.0.0.1", 0))
        command = Endpoint("127.0.0.1", free_port())
        forwarder = Endpoint("127.0.0.1", local.getsockname()[1])
        return Forwarded(
            Tunnel(command, self.relay.relayed, forwarder, attempt.secret, self.method),
            self.relay,
            local,
            peer,
        )


def choose(mine: Gathered, theirs: Offer) -> list[Way]:
    """The ways to try, in order (`theirs.reach` is None for a plexus 2.2 peer): the one both NATs allow
    (plexus/path.py), then a relay to fall back on."""
    shared = mine.found.outer.canonical().host == theirs.outer.canonical().host
    try:
        chosen = path.choose(
            Reach(mine.found.mapping, v6=mine.found.outer6),
            theirs.reach,
            own_relay=mine.relay is not None,
            shared_address=shared,
        )
    except path.NoPath as error:
        raise NatUnsuitableError(f"no path to the peer: {error}") from error
    log.info("path: %s", chosen.describe())
    events.emit(events.Chosen, way=str(chosen.method), why=chosen.describe())
    return ways(chosen, mine.relay, theirs.reach.relay if theirs.reach is not None else None)


def ways(plan: Plan, own: Relay | None, theirs: Endpoint | None) -> list[Way]:
    """The ways to try, in order: IPv6 first where it is not raced (an IPV6 plan is only that), the plan's,
    then a relay to fall back on (this side's allocation, or the peer's relayed endpoint) when the plan's is
    a direct one."""
    first: list[Way] = [Ipv6(plan)] if plan.ipv6 is not None and not plan.races_ipv6 else []
    if plan.method is Method.IPV6:
        return first
    if plan.method is Method.RELAY:
        if plan.relay is not None:
            return [*first, TowardRelay(plan.relay)]
        assert own is not None, "a relay plan without a relay of either side"
        return [*first, OwnRelay(own)]
    first.append(FanOut(plan) if plan.method is Method.FANOUT else Direct(plan))
    if own is not None:
        return [*first, OwnRelay(own)]
    if theirs is not None:
        return [*first, TowardRelay(theirs, fresh_socket=True)]
    return first


async def establish(candidates: list[Way], attempt: Attempt, handshake_timeout: float) -> Established:
    """Try each way in turn; all but the last are bounded by their `bound` (a firewall, or a birthday that
    found no pair of ports, ends them)."""
    *before, last = candidates
    for way, after in zip(before, candidates[1:], strict=True):
        try:
            return await way.establish(attempt, way.bound)
        except HandshakeTimeoutError:
            log.warning("no path (%s) within %g s: trying %s", way.method, way.bound, after.method)
            events.emit(events.FellBack, way=str(way.method))
    return await last.establish(attempt, handshake_timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
