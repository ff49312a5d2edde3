"""One plexus session from each side: STUN on the punching socket, the mail rendezvous, the punch, the launch.

Inviter (once): stop its previous session's command -> STUN (with its NAT's mapping) -> request by mail ->
wait for the response -> the way through (plexus/path.py) -> handshake -> launch -> watch the command for a
moment (on a relay it allocated: carry the command's datagrams until it exits).
Acceptor: STUN once, then forever: wait for a request -> stop the previous session's command -> STUN -> the
way through -> the punch (TTL-limited hello, fan-out, spray or relay) -> response by mail -> handshake ->
launch. A request it cannot serve (the inner port held, STUN failing, no way through) gets a refusal by mail,
so the inviter stops waiting at once.
The acceptor serves each request in its own task, so a slow or failing session never stops the loop. Stopped
(cancelled), it stops the commands it launched: their lifetime is the acceptor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from plexus import launcher, path, puncher, stun
from plexus.endpoint import Endpoint
from plexus.errors import (
    CommandFailedError,
    HandshakeTimeoutError,
    NatUnsuitableError,
    NotServedError,
    PeerRefusedError,
    PlexusError,
    UsageError,
)
from plexus.launcher import Command, Running, Slot, Tunnel
from plexus.path import Method
from plexus.relay import Relay
from plexus.relay import forward as relay_forward
from plexus.relay import punch as relay_punch
from plexus.rendezvous import Invitation, Mapping, Offer, Reach, Rendezvous, RendezvousConfig
from plexus.streams import StreamsConfig, carry

log = logging.getLogger(__name__)

# How long the inviter watches the launched command before exiting: long enough to report a command that
# fails at once (bad arguments), short enough not to hold up a cron job.
INVITER_WATCH_SECONDS = 1.0
# A stopped acceptor gives its commands this long to end after SIGTERM: a service stops within a second.
SHUTDOWN_GRACE = 0.5
ARRIVING_HOPS = 64  # a first hello that must arrive (toward a relay)
# With a relay to fall back on, how long a direct attempt may take: a birthday needs up to about 7 s.
FALLBACK_BOUND = 10.0


@dataclass(frozen=True)
class TurnConfig:
    """--turn-server, --turn-user, --turn-passwd: the relay for when both NATs map per destination."""

    server: Endpoint
    user: str
    password: str


@dataclass(frozen=True)
class SessionConfig:
    inner: Endpoint  # --stun-client; port 0 lets the system choose
    stun_server: Endpoint
    rendezvous: RendezvousConfig  # how the peers meet: by mail (MailConfig, the default) or on OpenDHT
    command: Command | None  # None: streams only (an acceptor with --forward-allow, an inviter's --stdio)
    punch_hops: int = 7
    response_timeout: float = 60.0
    handshake_timeout: float = 60.0
    keep_sessions: bool = False  # True: sessions run side by side; False: a new one replaces the last
    turn: TurnConfig | None = None
    streams: StreamsConfig | None = None

    def slot(self, role: str) -> Slot | None:
        """Where the last session's command is remembered, unless sessions are kept side by side (streams
        sessions always are: a new ssh must not end the last one)."""
        if self.keep_sessions or self.command is None:
            return None
        return Slot.for_session(role, self.rendezvous.host_id, self.rendezvous.peer_id)


def bind(inner: Endpoint) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(inner)
    except OSError as error:
        sock.close()
        raise UsageError(f"cannot bind --stun-client {inner}: {error.strerror}") from error
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class Found:
    """What STUN told this side: its endpoints, and whether its NAT maps endpoint-independently."""

    inner: Endpoint
    outer: Endpoint
    mapping: Mapping


async def discover(sock: socket.socket, server: Endpoint) -> Found:
    """Learn the inner and outer endpoints and whether the outer one holds for every destination."""
    log.debug("asking STUN server %s for the outer endpoint", server)
    report = await stun.probe_mapping(sock, server)
    if report.mapping is None:
        log.warning("STUN server %s has no alternate address: NAT mapping not tested", server)
    log.info("inner endpoint %s, outer endpoint %s", report.inner, report.outer)
    if report.punchable is False:
        log.info("NAT mapping is %s: the outer port changes per destination", report.mapping)
        return Found(report.inner, report.outer, "dependent")
    return Found(report.inner, report.outer, "independent")


@dataclass(frozen=True)
class Punched:
    """A confirmed path. On a relay this side allocated, the command talks to plexus's forwarder (`local`,
    the command's peer endpoint), which carries its datagrams to `peer` through `relay`."""

    tunnel: Tunnel
    relay: Relay | None = None
    local: socket.socket | None = None
    peer: Endpoint | None = None


def plan(mine: Reach, theirs: Reach | None, *, own_relay: bool) -> path.Plan:
    try:
        chosen = path.choose(mine, theirs, own_relay=own_relay)
    except path.NoPath as error:
        raise NatUnsuitableError(f"no path to the peer: {error}") from error
    log.info("path: %s", chosen.describe())
    return chosen


async def _allocate(config: SessionConfig, relays: contextlib.AsyncExitStack) -> Relay:
    assert config.turn is not None
    turn = config.turn
    allocated = await relays.enter_async_context(Relay(turn.server, turn.user, turn.password))
    log.info("TURN relay allocated: %s", allocated)
    return allocated


async def invite(config: SessionConfig) -> Tunnel:
    """The inviter's whole session; returns once the command is launched and has survived the watch window
    (on a relay it allocated itself: once the command has exited, since its datagrams pass through here).

    Everything that does not depend on STUN runs while STUN does: the IMAP login and the SMTP session up to
    DATA. The mailbox clean-up (flag the response consumed, LOGOUT) runs while the command is watched.
    """
    slot = config.slot("invite")
    async with contextlib.AsyncExitStack() as relays:
        async with config.rendezvous.open() as rendezvous:
            if slot is not None:
                await slot.stop_previous()  # a stale tunnel holds the inner port and would double the new one
            punched = await _meet(config, rendezvous, relays)
            if config.command is None:
                assert config.streams is not None
                if punched.relay is None:
                    await relays.aclose()
                await _relay_while(punched, _streams(punched, config.streams, accept=False))
                return punched.tunnel
            process = launcher.start(config.command, punched.tunnel)
            if slot is not None:
                slot.save(process.pid)
            watching = asyncio.ensure_future(launcher.watch(process, grace=INVITER_WATCH_SECONDS))
            if punched.relay is None:
                await relays.aclose()  # an allocation kept for a fallback that was not needed
        status = await watching
        if status:
            raise CommandFailedError(
                f"{config.command.path} exited with status {status} within {INVITER_WATCH_SECONDS:g} s of "
                "its launch (its output is in --exec-log-file)"
            )
        if punched.relay is not None:
            await _relay_while(punched, _command(process, set()))
    return punched.tunnel


async def _meet(config: SessionConfig, rendezvous: Rendezvous, relays: contextlib.AsyncExitStack) -> Punched:
    """STUN, the request, the response, the punch."""
    with contextlib.closing(bind(config.inner)) as sock:
        async with rendezvous.submission() as submission:
            found = await discover(sock, config.stun_server)
            # Behind a NAT that maps per destination only a relay may do: allocate before the request, so
            # that it can name the relay. An acceptor with its own relay, or an easier NAT, will make it
            # unneeded.
            own = None
            if found.mapping == "dependent" and config.turn is not None:
                own = await _allocate(config, relays)
            streams = config.streams is not None and config.streams.inviting
            mine = Reach(found.mapping, own.relayed if own else None, streams)
            puzzle = secrets.randbits(64)
            offer = Offer(found.outer, puzzle, mine)
            response = await rendezvous.invite(offer, config.response_timeout, submission)
        theirs = response.reach
        if streams and (theirs is None or not theirs.streams):
            raise PeerRefusedError(
                f"{config.rendezvous.peer_id} does not serve streams (a plexus without them, or 2.2)"
            )
        chosen = plan(mine, theirs, own_relay=own is not None)
        log.info("peer endpoint %s, punching", response.outer)
        return await _punch(
            chosen,
            config,
            found,
            sock,
            response.outer,
            puzzle ^ response.puzzle,
            handshake_codec(config, puzzle, response.puzzle, response, accept=False),
            accept=False,
            relay=own,
            fallback=theirs.relay if theirs is not None else None,
        )


def handshake_codec(
    config: SessionConfig, inviter_puzzle: int, acceptor_puzzle: int, theirs: Offer, *, accept: bool
) -> puncher.Codec:
    """The handshake's datagrams: authenticated between plexus peers (the peer's offer has a Reach), plexus
    2.2's masked checksum toward a 2.2 peer, which knows no other. The key is bound to both identities when
    the peer's offer came signed by its pinned key: then each side signs with its own (mail signing takes both
    --identity and --peer-identity; the DHT always has both), so both sides bind or neither does."""
    if theirs.reach is None:
        return puncher.Masked(inviter_puzzle ^ acceptor_puzzle)
    mine = config.rendezvous.identity
    bound = mine.agree(theirs.signer) if mine is not None and theirs.signer is not None else None
    return puncher.Authenticated.derive(inviter_puzzle, acceptor_puzzle, accept=accept, bound=bound or b"")


async def _punch(
    chosen: path.Plan,
    config: SessionConfig,
    found: Found,
    sock: socket.socket,
    peer: Endpoint,
    secret: int,
    codec: puncher.Codec,
    *,
    accept: bool,
    relay: Relay | None,
    fallback: Endpoint | None = None,
) -> Punched:
    """Confirm the path the plan names; `sock`, the socket STUN ran on, is closed on every path.

    With a relay at hand (`relay`, this side's allocation, or `fallback`, the peer's relayed endpoint) a
    direct attempt is bounded by FALLBACK_BOUND, and the relay is taken when it fails: a firewall, or a
    birthday that found no pair of ports."""
    if chosen.method is Method.RELAY:
        if chosen.relay is None:
            assert relay is not None
            sock.close()
            return await _over_own_relay(relay, peer, secret, codec, config, accept=accept)
        return await _toward_relay(sock, chosen.relay, found, secret, codec, config, accept=accept)
    can_fall_back = relay is not None or fallback is not None
    bound = FALLBACK_BOUND if can_fall_back else config.handshake_timeout
    try:
        return await _direct(chosen, sock, found, peer, secret, codec, config, accept=accept, timeout=bound)
    except HandshakeTimeoutError:
        if not can_fall_back:
            raise
    log.warning("no direct path (%s) within %g s: falling back to the relay", chosen.method, bound)
    if relay is not None:
        return await _over_own_relay(relay, peer, secret, codec, config, accept=accept)
    assert fallback is not None
    return await _toward_relay(bind(config.inner), fallback, found, secret, codec, config, accept=accept)


async def _direct(
    chosen: path.Plan,
    sock: socket.socket,
    found: Found,
    peer: Endpoint,
    secret: int,
    codec: puncher.Codec,
    config: SessionConfig,
    *,
    accept: bool,
    timeout: float,
) -> Punched:
    if chosen.method is Method.FANOUT:
        extra = [bind(Endpoint(found.inner.host, 0)) for _ in range(puncher.FANOUT_SOCKETS - 1)]
        winner, peer = await puncher.punch_fanout([sock, *extra], peer, codec, accept=accept, timeout=timeout)
        with contextlib.closing(winner):
            inner = Endpoint(found.inner.host, winner.getsockname()[1])
        return Punched(Tunnel(inner, found.outer, peer, secret, chosen.method))
    peer = await puncher.punch(
        sock,
        peer,
        codec,
        accept=accept,
        hops=config.punch_hops,
        timeout=timeout,
        peer_reflexive=chosen.peer_reflexive,
        spray=puncher.Spray() if chosen.method is Method.SPRAY else None,
    )
    return Punched(Tunnel(found.inner, found.outer, peer, secret, chosen.method))


async def _over_own_relay(
    relay: Relay, peer: Endpoint, secret: int, codec: puncher.Codec, config: SessionConfig, *, accept: bool
) -> Punched:
    """The handshake through this side's allocation; the command will talk to a local forwarder."""
    await relay.permit(peer.host)  # its port toward the relay is not the one STUN saw: any port of its IP
    timeout = config.handshake_timeout
    peer = await relay_punch(relay, peer, codec, accept=accept, timeout=timeout, peer_reflexive=True)
    local = bind(Endpoint("127.0.0.1", 0))
    command = Endpoint("127.0.0.1", _free_port())
    forwarder = Endpoint("127.0.0.1", local.getsockname()[1])
    return Punched(Tunnel(command, relay.relayed, forwarder, secret, Method.RELAY), relay, local, peer)


async def _toward_relay(
    sock: socket.socket,
    relayed: Endpoint,
    found: Found,
    secret: int,
    codec: puncher.Codec,
    config: SessionConfig,
    *,
    accept: bool,
) -> Punched:
    """The handshake with the peer's relayed endpoint, from an ordinary socket."""
    inner = Endpoint(found.inner.host, sock.getsockname()[1])
    # The TTL-limited punch must die between the NATs; toward a relay it must arrive, so the relay learns
    # where this side's NAT maps it.
    timeout = config.handshake_timeout
    peer = await puncher.punch(sock, relayed, codec, accept=accept, hops=ARRIVING_HOPS, timeout=timeout)
    return Punched(Tunnel(inner, found.outer, peer, secret, Method.RELAY))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _relay_while(punched: Punched, work: Awaitable[None]) -> None:
    """Run the work (the command's life, or the streams) and, on a relay this side allocated, carry its
    datagrams through the relay meanwhile; a lost relay ends the work."""
    if punched.relay is None:
        await work
        return
    assert punched.local is not None and punched.peer is not None
    with contextlib.closing(punched.local):
        forwarding = asyncio.ensure_future(
            relay_forward(punched.relay, punched.local, punched.tunnel.inner, punched.peer)
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


async def _command(process: subprocess.Popen[bytes], running: set[Running]) -> None:
    """The launched command's life; cancelled, it stops the command."""
    try:
        await _watch(process, running)
    except asyncio.CancelledError:
        command = Running.of(process.pid)
        if command is not None:
            await command.stop(SHUTDOWN_GRACE)
        raise


async def _streams(punched: Punched, config: StreamsConfig, *, accept: bool) -> None:
    """The streams on the tunnel's inner endpoint (on a relay this side allocated: the loopback endpoint
    facing plexus's forwarder), bound now that the punch has let the port go."""
    await carry(bind(punched.tunnel.inner), punched.tunnel, config, accept=accept)


async def accept(config: SessionConfig) -> None:
    """Serve requests forever, each in a task; a request that no path can serve gets a refusal by mail.

    The NAT is checked once at the start (a STUN server that does not answer ends the acceptor, exit 4);
    behind a NAT that maps per destination the acceptor still serves peers behind easier NATs (birthday
    punching) and, with --turn-server, any peer. Each session checks again (networks change).
    """
    sessions: set[asyncio.Task[None]] = set()
    running: set[Running] = set()
    slot = config.slot("accept")
    # Replacing sessions take turns, so the newest request wins; kept ones each have their own inner port.
    turn = None if config.keep_sessions else asyncio.Lock()
    try:
        # Entering starts the IMAP login (the DHT join), which runs while STUN does.
        async with config.rendezvous.open() as rendezvous:
            if slot is not None:
                await slot.stop_previous()  # left by an acceptor that was killed: it holds the inner port
            with contextlib.closing(bind(config.inner)) as sock:
                found = await discover(sock, config.stun_server)
            if found.mapping == "dependent":
                log.warning(
                    "this NAT maps per destination: peers behind endpoint-independent NATs get through by "
                    "birthday punching; peers behind such NATs too need a TURN relay (%s)",
                    f"--turn-server {config.turn.server}" if config.turn else "no --turn-server given",
                )
            async for invitation in rendezvous.requests():
                task = asyncio.create_task(_serve(config, rendezvous, invitation, turn, slot, running))
                sessions.add(task)
                task.add_done_callback(sessions.discard)
    finally:
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        await asyncio.gather(*(command.stop(SHUTDOWN_GRACE) for command in running))
        if slot is not None:
            slot.forget()


async def _serve(
    config: SessionConfig,
    rendezvous: Rendezvous,
    invitation: Invitation,
    turn: asyncio.Lock | None,
    slot: Slot | None,
    running: set[Running],
) -> None:
    peer = invitation.offer.outer
    if _wants_streams(invitation):  # streams sessions run side by side: no command of another is stopped
        turn = slot = None
    async with contextlib.AsyncExitStack() as relays:
        try:
            async with _maybe(turn):
                if slot is not None:
                    await slot.stop_previous()
                punched = await _answer(config, rendezvous, invitation, relays)
                if _wants_streams(invitation):
                    process = None
                else:
                    assert config.command is not None  # _answer refused the request otherwise
                    process = launcher.start(config.command, punched.tunnel)
                    if slot is not None:
                        slot.save(process.pid)
        except PlexusError as error:
            log.error("session with %s failed: %s", peer, error)
            return
        if punched.relay is None:
            await relays.aclose()  # a standby allocation: not held for as long as the session runs
        try:
            if process is None:
                assert config.streams is not None
                await _relay_while(punched, _streams(punched, config.streams, accept=True))
            else:
                await _relay_while(punched, _command(process, running))
        except PlexusError as error:
            log.error("session with %s ended: %s", peer, error)
            return
        log.info("session with %s ended", peer)


def _wants_streams(invitation: Invitation) -> bool:
    return invitation.offer.reach is not None and invitation.offer.reach.streams


def _servable(config: SessionConfig, invitation: Invitation) -> None:
    """An acceptor serves what it was configured for: its command, its streams, or both."""
    if _wants_streams(invitation):
        if config.streams is None or config.streams.allowed is None:
            raise NotServedError("this acceptor forwards no streams (it has no --forward-allow)")
    elif config.command is None:
        raise NotServedError("this acceptor runs no command, it only forwards streams (--stdio, --forward)")


async def _watch(process: subprocess.Popen[bytes], running: set[Running]) -> None:
    command = Running.of(process.pid)
    if command is None:  # ended already
        await launcher.watch(process)
        return
    running.add(command)
    await launcher.watch(process)
    running.discard(command)  # only once it ended: cancelled (the acceptor stopping), it is still to stop


async def _answer(
    config: SessionConfig,
    rendezvous: Rendezvous,
    invitation: Invitation,
    relays: contextlib.AsyncExitStack,
) -> Punched:
    """STUN, the plan, the punch, the response, the handshake; the SMTP session opens while STUN runs."""
    handshake: asyncio.Future[Punched] | None = None
    with contextlib.ExitStack() as closing:
        try:
            async with rendezvous.submission() as submission:
                async with _refusing(rendezvous, invitation, submission):
                    _servable(config, invitation)
                    sock = closing.enter_context(contextlib.closing(bind(config.inner)))
                    found = await discover(sock, config.stun_server)
                    theirs = invitation.offer.reach
                    own = None
                    # A relay for the path when both NATs map per destination, and to fall back on when a
                    # direct attempt fails; unless the inviter brought one (a 2.2 inviter knows of none).
                    if config.turn is not None and theirs is not None and theirs.relay is None:
                        own = await _allocate(config, relays)
                    mine = Reach(found.mapping, own.relayed if own else None, _wants_streams(invitation))
                    chosen = plan(mine, theirs, own_relay=own is not None)
                puzzle = secrets.randbits(64)
                secret = puzzle ^ invitation.offer.puzzle
                # The punch starts before the response leaves: the TTL-limited hello (or the fan-out, the
                # spray, the relay's permission) has opened the way when the inviter's hellos arrive.
                fallback = theirs.relay if theirs is not None else None
                handshake = asyncio.ensure_future(
                    _punch(
                        chosen,
                        config,
                        found,
                        sock,
                        invitation.offer.outer,
                        secret,
                        handshake_codec(
                            config, invitation.offer.puzzle, puzzle, invitation.offer, accept=True
                        ),
                        accept=True,
                        relay=own,
                        fallback=fallback,
                    )
                )
                await asyncio.sleep(0)
                await rendezvous.answer(invitation, Offer(found.outer, puzzle, mine), submission)
            return await handshake
        finally:
            if handshake is not None:
                handshake.cancel()


@contextlib.asynccontextmanager
async def _refusing(
    rendezvous: Rendezvous, invitation: Invitation, submission: object
) -> AsyncIterator[None]:
    """A failure before the response is the inviter's to know at once: it gets the reason in a refusal."""
    try:
        yield
    except PlexusError as error:
        try:
            await rendezvous.refuse(invitation, str(error), submission)
        except PlexusError as failure:
            log.warning("could not send the refusal: %s", failure)
        raise


@contextlib.asynccontextmanager
async def _maybe(lock: asyncio.Lock | None) -> AsyncIterator[None]:
    if lock is None:
        yield
    else:
        async with lock:
            yield
