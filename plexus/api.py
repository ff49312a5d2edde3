"""plexus as a library, in the spirit of C++ plexus's plexus.h (docs/library.md): explore; invite and accept,
which hand each established path to the caller; connect and serve, which run the configured command or
streams on it as the command line does (plexus/cli.py is a thin layer over those two).

`import plexus` stays cheap: plexus/__init__.py imports this module on first use of one of its names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from plexus import path, paths, session, stun
from plexus.endpoint import ANY6, Endpoint
from plexus.errors import StunError, StunSilentError, TurnError
from plexus.launcher import Tunnel
from plexus.options import STUN_PORT, TURNS_PORT
from plexus.paths import TurnConfig
from plexus.rendezvous import MAPPINGS, Reach
from plexus.session import SessionConfig

PEER_MAPPINGS = {"independent": "endpoint-independently", "dependent": "per destination"}
NO_PATH = "none (a TURN relay would: --turn-server)"
NO_PATH_WITHOUT_UDP = "none (a TURN relay over TCP or TLS would: --turn-server turns:HOST)"
RELAY_WORKS = "works"


@dataclass(frozen=True)
class Exploration:
    """What `explore` found: the NAT in front of the socket (`nat`; None when no UDP gets out: the STUN server
    answered over TCP only), whether a TURN relay works over each transport (`relays`: "udp", "tcp", "tls" ->
    RELAY_WORKS or why not; empty without one to try) and, for each kind of peer NAT, the way through
    (plexus/path.py's method, or NO_PATH). str() is what `plexus --explore` prints; to_json() what
    `plexus --explore --json` prints."""

    nat: stun.NatReport | None
    paths: dict[str, str]  # the peer's mapping ("independent", "dependent") -> the way
    relays: dict[str, str] = dataclasses.field(default_factory=dict)
    ipv6: Endpoint | None = None  # the IPv6 endpoint a STUN server saw; None: IPv6 does not get out
    ipv6_inner: Endpoint | None = None  # the IPv6 socket's own endpoint (another address: a NAT66)
    no_ipv6: str = "not asked"  # why `ipv6` is None

    @property
    def udp(self) -> bool:
        """UDP gets out of this network."""
        return self.nat is not None

    def __str__(self) -> str:
        lines = [
            self.nat.render() if self.nat else f"{'UDP':<16}blocked: the STUN server answers over TCP only"
        ]
        lines.append(f"{'IPv6':<16}{self._ipv6()}")
        lines += [f"{'TURN over ' + kind.upper():<16}{found}" for kind, found in self.relays.items()]
        lines += [
            f"{'to a peer whose NAT maps ' + PEER_MAPPINGS[peer]:<52}{way}"
            for peer, way in self.paths.items()
        ]
        if self.ipv6 is not None:
            lines.append(f"{'to a peer with IPv6 too, whatever its NAT':<52}{path.Method.IPV6}")
        return "\n".join(lines)

    def _ipv6(self) -> str:
        if self.ipv6 is None:
            return f"no: {self.no_ipv6}"
        if self.ipv6_inner is not None and self.ipv6_inner.host != self.ipv6.host:
            return f"{self.ipv6} (translated from {self.ipv6_inner}: a NAT66 or prefix translation)"
        return f"{self.ipv6} (the host's own address: no NAT, a stateful firewall punches like a cone NAT)"

    def to_json(self) -> dict[str, Any]:
        nat = self.nat.to_json() if self.nat else {}
        ipv6 = str(self.ipv6) if self.ipv6 else None
        return nat | {"udp": self.udp, "ipv6": ipv6, "relays": self.relays, "paths": self.paths}

    def json(self) -> str:
        return json.dumps(self.to_json())


def ways_through(report: stun.NatReport | None, *, relay: bool) -> dict[str, str]:
    """What this network can do with each kind of peer: the decision table (plexus/path.py) for this NAT
    (`report` None: no UDP gets out, and `relay` says whether one over TCP or TLS is at hand)."""
    if report is None:
        mine = Reach("blocked")
    else:
        mine = Reach("independent" if report.punchable is not False else "dependent")
    found = {}
    for peer in PEER_MAPPINGS:
        try:
            found[peer] = str(path.choose(mine, Reach(MAPPINGS[peer]), own_relay=relay).method)
        except path.NoPath:
            found[peer] = NO_PATH if report is not None else NO_PATH_WITHOUT_UDP
    return found


async def explore(
    stun_server: Endpoint | str,
    *,
    stun_client: Endpoint | str = "0.0.0.0:0",
    relay: bool = False,
    turn: TurnConfig | None = None,
    stun_client6: Endpoint | None = ANY6,
    stun_server6: Endpoint | None = None,
) -> Exploration:
    """Ask the STUN server (RFC 5780 tests where it has an alternate address) what the NAT in front of
    `stun_client` does, whether UDP gets out at all (no answer over UDP, one over TCP: it does not), and
    which way through it leaves to each kind of peer (`relay`: a TURN relay is at hand). With `turn`, an
    allocation is tried on its host over UDP, TCP and TLS (the URI's port for its own transport, 3478 and
    5349 for the others), and the ways count with the transports that work. Beside it, from `stun_client6`
    (None: not asked), whether IPv6 gets out: `stun_server6`, or `stun_server`'s AAAA record, answers.
    Raises plexus.errors.PlexusError subclasses: StunError when the server answers neither over UDP nor over
    TCP, UsageError when `stun_client` cannot be bound."""
    server = _endpoint(stun_server, STUN_PORT)
    report: stun.NatReport | None
    with paths.punching(_endpoint(stun_client, 0), stun_client6) as socks:
        ipv6 = asyncio.ensure_future(paths.discover6(socks.v6, server, stun_server6))
        try:
            try:
                report = await stun.explore(socks.v4, server)
            except StunSilentError as error:
                if await stun.query_over_tcp(server) is None:
                    raise StunError(f"{error}, nor over TCP: is the server down?") from error
                report = None
            found6 = await ipv6
        finally:
            ipv6.cancel()
    relays = await try_relays(turn) if turn is not None else {}
    usable = [kind for kind, found in relays.items() if found == RELAY_WORKS and (report or kind != "udp")]
    ways = ways_through(report, relay=relay or bool(usable))
    if isinstance(found6, str):
        return Exploration(report, ways, relays, no_ipv6=found6)
    return Exploration(report, ways, relays, found6[1], found6[0])


async def try_relays(turn: TurnConfig) -> dict[str, str]:
    """An allocation on `turn`'s host over each transport, at once: RELAY_WORKS, or the one-line reason."""
    from plexus.relay import Relay, Transport

    def server(kind: Transport) -> Endpoint:
        if (kind == "tls") == (turn.transport == "tls"):
            return turn.server
        return Endpoint(turn.server.host, TURNS_PORT if kind == "tls" else STUN_PORT)

    async def attempt(kind: Transport) -> str:
        ca = turn.ca if kind == "tls" else None
        try:
            async with Relay(server(kind), turn.user, turn.password, transport=kind, ca=ca):
                return RELAY_WORKS
        except TurnError as error:
            return f"no: {error}"

    kinds: list[Transport] = ["udp", "tcp", "tls"]
    return dict(zip(kinds, await asyncio.gather(*(attempt(kind) for kind in kinds)), strict=True))


@contextlib.asynccontextmanager
async def invite(config: SessionConfig) -> AsyncIterator[Tunnel]:
    """Meet the acceptor (config.rendezvous: mail or the DHT), punch through both NATs and yield the
    established path: `inner` (bind it), `outer`, `peer` (send there), `secret` and `path` (the way it took:
    direct, lan, fan-out, spray or relay). On a relay this side allocated, plexus carries the datagrams
    between `inner` and the relay for as long as the block runs. config.command and config.streams are not
    used: the block is the session (it may launch a command with `Tunnel.environment()`, or carry streams
    with plexus.streams.carry). Raises plexus.errors.PlexusError subclasses as the CLI's exit codes name
    them."""
    established: asyncio.Future[Tunnel] = asyncio.get_running_loop().create_future()
    finished = asyncio.Event()

    async def hand_over(tunnel: Tunnel) -> None:
        established.set_result(tunnel)
        await finished.wait()

    handing = dataclasses.replace(config, command=None, streams=None, hand_over=hand_over)
    running = asyncio.ensure_future(session.invite(handing))
    try:
        await asyncio.wait({established, running}, return_when=asyncio.FIRST_COMPLETED)
        if not established.done():
            running.result()  # the session's failure
        yield established.result()
    finally:
        finished.set()
        if not running.done():
            running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def accept(config: SessionConfig) -> AsyncIterator[Tunnel]:
    """Serve requests from the peers (config.rendezvous.peers) forever and yield each established path (as
    `invite` yields it, its `peer_name` set), in the order they are established. A session that fails is
    logged and the next one is served. The path lasts until the consumer asks for the next one, or leaves
    the loop."""
    arrived: asyncio.Queue[tuple[Tunnel, asyncio.Event]] = asyncio.Queue()

    async def hand_over(tunnel: Tunnel) -> None:
        done = asyncio.Event()
        await arrived.put((tunnel, done))
        await done.wait()

    handing = dataclasses.replace(config, command=None, streams=None, hand_over=hand_over, keep_sessions=True)
    serving = asyncio.ensure_future(session.accept(handing))
    try:
        while True:
            getting = asyncio.ensure_future(arrived.get())
            await asyncio.wait({getting, serving}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                serving.result()  # the acceptor's failure (STUN, the rendezvous)
            tunnel, done = getting.result()
            try:
                yield tunnel
            finally:
                done.set()
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def connect(config: SessionConfig) -> Tunnel:
    """The inviter's session as `plexus` runs it: meet the acceptor, punch, then launch config.command with
    the path's endpoints (returning once the command has survived its first second; on a relay this side
    allocated, once it has exited, since its datagrams pass through here) or carry config.streams until
    they end. Stops the command of this host's previous session first (unless config.keep_sessions).
    Returns the path taken. Raises plexus.errors.PlexusError subclasses as the CLI's exit codes name them."""
    return await session.invite(config)


async def serve(config: SessionConfig) -> None:
    """The acceptor as `plexus --accept` runs it, until cancelled: each request from one of its peers gets
    the path, and config.command (or the peer's own) is launched on it (a newer request from that peer
    replaces its session before, unless config.keep_sessions) or its streams are served (config.streams'
    allow-list, or the peer's). A request this acceptor cannot serve is refused; a session that fails is
    reported (config.on_event) and the next one served.
    Cancelled, it stops the commands it launched. Raises PlexusError subclasses only for its own start: a
    STUN server that does not answer, a rendezvous that cannot be reached."""
    await session.accept(config)


def _endpoint(value: Endpoint | str, port: int) -> Endpoint:
    return value if isinstance(value, Endpoint) else Endpoint.parse(value, default_port=port)
