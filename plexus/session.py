"""One plexus session from each side: STUN on the punching socket, the rendezvous (plexus/rendezvous.py: by
mail or on the DHT), the way through (plexus/paths.py), the launch.

Inviter (once): stop its previous session's command -> STUN (with its NAT's mapping) -> request ->
wait for the response -> the ways through (plexus/path.py decides) -> handshake -> launch -> watch the command
for a moment (on a relay it allocated: carry the command's datagrams until it exits).
Acceptor: STUN once, then forever: wait for a request -> stop the previous session's command -> STUN -> the
ways through -> the punch (TTL-limited hello, fan-out, spray or relay) -> response -> handshake -> launch.
A request it cannot serve (the inner port held, STUN failing, no way through) gets a refusal, so the inviter
stops waiting at once. Each phase is reported as a typed event (plexus/events.py).
The acceptor serves each request in its own task, so a slow or failing session never stops the loop; it
serves many peers (plexus/peers.py), on one or more rendezvous at once, and a new session replaces only the
same peer's last one. Stopped (cancelled), it stops the commands it launched: their lifetime is the
acceptor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import itertools
import logging
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from plexus import events, launcher, paths, puncher
from plexus.endpoint import ANY6, Endpoint
from plexus.errors import (
    CommandFailedError,
    NotServedError,
    PeerRefusedError,
    PlexusError,
    SupersededError,
)
from plexus.identity import PeerCheck
from plexus.launcher import Command, Running, Slot, Tunnel
from plexus.path import Method
from plexus.paths import TurnConfig
from plexus.peers import Peer
from plexus.rendezvous import Invitation, Offer, RebindKeys, Rendezvous, RendezvousConfig

# Streams (and with them aioquic) load with the first streams session, not with every session.
if TYPE_CHECKING:
    from plexus.resume import Resume
    from plexus.streams import StreamsConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a session enters around its streams to survive a move (_resuming)
Resuming = contextlib.AbstractContextManager["Resume | None"]

# How long the inviter watches the launched command before exiting: long enough to report a command that
# fails at once (bad arguments), short enough not to hold up a cron job.
INVITER_WATCH_SECONDS = 1.0
# A stopped acceptor gives its commands this long to end after SIGTERM: a service stops within a second.
SHUTDOWN_GRACE = 0.5


@dataclass(frozen=True)
class SessionConfig:
    inner: Endpoint  # --stun-client's IPv4 endpoint; port 0 lets the system choose
    stun_server: Endpoint  # a name with an AAAA record gives the IPv6 STUN server too
    rendezvous: RendezvousConfig  # how the peers meet: by mail (MailConfig, the default) or on OpenDHT
    command: Command | None  # None: streams only (an acceptor with --forward-allow, an inviter's --stdio)
    punch_hops: int = 7
    response_timeout: float = 60.0
    handshake_timeout: float = 60.0
    keep_sessions: bool = False  # True: sessions run side by side; False: a new one replaces the last
    turn: TurnConfig | None = None
    streams: StreamsConfig | None = None
    # The library's (plexus/api.py): the session's work is the caller's, on the tunnel, instead of a command
    hand_over: Callable[[Tunnel], Awaitable[None]] | None = None
    on_event: events.Sink = events.ignore  # each session event as it happens (plexus/events.py)
    # --stun-client's IPv6 endpoint (port 0: the IPv4 socket's port where it is free); None: no IPv6
    inner6: Endpoint | None = ANY6
    stun_server6: Endpoint | None = None  # the IPv6 STUN server where stun_server's name gives none
    # --carry: the command's datagrams pass through plexus, which follows a move (plexus/carry.py)
    carry: bool = False
    # An acceptor's other ways to meet its peers (--rendezvous=email,dht): served at once, one roster
    rendezvous_also: tuple[RendezvousConfig, ...] = ()

    def reporting(self, sink: events.Sink) -> SessionConfig:
        return dataclasses.replace(self, on_event=sink)

    def slot(self, role: str, peer: Peer) -> Slot | None:
        """Where the command of the last session with `peer` is remembered, unless sessions are kept side by
        side (streams sessions always are: a new ssh must not end the last one)."""
        if self.keep_sessions or (self.command is None and peer.command is None):
            return None
        return Slot.for_session(role, self.rendezvous.host_id, peer.name)

    @property
    def peer(self) -> Peer:
        """An inviter's one peer."""
        return self.rendezvous.peers.peers.only

    def serving(self, peer: Peer) -> SessionConfig:
        """An acceptor's config for one peer's session: the peer's command and streams targets over the
        acceptor's, its streams checked against its identity, each event named by it."""
        streams = self.streams
        if streams is not None:
            check = PeerCheck(peer.identity) if peer.identity is not None else streams.check
            allowed = peer.allowed if peer.allowed is not None else streams.allowed
            streams = dataclasses.replace(streams, check=check, allowed=allowed)
        command = self.command
        if peer.command is not None:  # where it runs and logs to stay the acceptor's (--exec-pwd, -log-file)
            own = peer.command
            command = own if command is None else dataclasses.replace(command, path=own.path, words=own.words)
        named = functools.partial(_named, self.on_event, peer.name)
        return dataclasses.replace(self, command=command, streams=streams, on_event=named)


def _named(sink: events.Sink, name: str, event: events.Event) -> None:
    sink(dataclasses.replace(event, peer_name=name))


def _connected(config: SessionConfig, role: events.Role, established: paths.Established) -> paths.Established:
    tunnel = established.tunnel
    connected = events.Connected(
        role=role, inner=tunnel.inner, outer=tunnel.outer, peer=tunnel.peer, way=tunnel.path
    )
    config.on_event(connected)
    return established


def _attempt(
    config: SessionConfig,
    socks: paths.Punching,
    mine: paths.Gathered,
    theirs: Offer,
    puzzle: int,
    *,
    accept: bool,
) -> paths.Attempt:
    """What the ways need once both offers are known: this side's (its candidates, its `puzzle`) and the
    peer's; the secret and the handshake's codec follow from both puzzles."""
    inviter, acceptor = (theirs.puzzle, puzzle) if accept else (puzzle, theirs.puzzle)
    codec = handshake_codec(config, inviter, acceptor, theirs, accept=accept)
    return paths.Attempt(
        socks, config.inner, mine.found, theirs.outer, inviter ^ acceptor, codec, accept, config.punch_hops
    )


async def invite(config: SessionConfig) -> Tunnel:
    """The inviter's whole session; returns once the command is launched and has survived the watch window
    (on a relay it allocated itself: once the command has exited, since its datagrams pass through here).

    Everything that does not depend on STUN runs while STUN does: the IMAP login and the SMTP session up to
    DATA. The mailbox clean-up (flag the response consumed, LOGOUT) runs while the command is watched.
    """
    config.on_event(events.Started(role="invite"))
    with events.reporting(config.on_event, "invite"):
        try:
            tunnel = await _invite(config)
        except PlexusError as error:
            config.on_event(events.Failed(role="invite", error=str(error)))
            raise
    config.on_event(events.Ended(role="invite"))
    return tunnel


async def _invite(config: SessionConfig) -> Tunnel:
    slot = config.slot("invite", config.peer)
    async with contextlib.AsyncExitStack() as relays:
        async with config.rendezvous.open() as rendezvous:
            if slot is not None:
                await slot.stop_previous()  # a stale tunnel holds the inner port and would double the new one
            established, resuming = await _meet(config, rendezvous, relays)
            if config.command is None:
                await established.release_unused(relays)
                config.on_event(events.Launched(role="invite", pid=None))
                with resuming as resume:
                    work = _work(config, established.tunnel, config.peer, accept=False, resume=resume)
                    await established.carry(work)
                return established.tunnel
            if config.carry:  # plexus stays, and so does the rendezvous: a move is told over it
                from plexus.carry import carried

                established = carried(established, config.inner, config.inner6)
                process = _launch(config, config.command, established.tunnel, slot)
                await established.release_unused(relays)
                with resuming as resume:
                    await established.carry(_watched(config.command, process), resume)
                return established.tunnel
            process = _launch(config, config.command, established.tunnel, slot)
            watching = asyncio.ensure_future(launcher.watch(process, grace=INVITER_WATCH_SECONDS))
            await established.release_unused(relays)  # an allocation kept for a fallback that was not needed
        _launched(config.command, await watching)
        if established.through_here:
            await established.carry(_command(process, set()))
    return established.tunnel


def _launch(
    config: SessionConfig, command: Command, tunnel: Tunnel, slot: Slot | None
) -> subprocess.Popen[bytes]:
    process = launcher.start(command, dataclasses.replace(tunnel, peer_name=config.peer.name))
    config.on_event(events.Launched(role="invite", pid=process.pid))
    if slot is not None:
        slot.save(process.pid)
    return process


def _launched(command: Command, status: int | None) -> None:
    """CommandFailedError for a command that exited non-zero within the watch window."""
    if status:
        raise CommandFailedError(
            f"{command.path} exited with status {status} within {INVITER_WATCH_SECONDS:g} s of its launch "
            "(its output is in --exec-log-file)"
        )


async def _watched(command: Command, process: subprocess.Popen[bytes]) -> None:
    """A carried command's life on the inviter: the watch window, then until it exits."""
    _launched(command, await launcher.watch(process, grace=INVITER_WATCH_SECONDS))
    await _command(process, set())


async def _meet(
    config: SessionConfig, rendezvous: Rendezvous, relays: contextlib.AsyncExitStack
) -> tuple[paths.Established, Resuming]:
    """STUN, the request, the response, the punch; and how the streams, if any, survive a move."""
    with paths.punching(config.inner, config.inner6) as socks:
        async with rendezvous.submission(config.peer) as submission:
            found = await _discover(config, socks)
            mine = await paths.gather(found, config.turn, relays, accept=False)
            streams = config.streams is not None and config.streams.inviting
            puzzle = secrets.randbits(64)
            # Host candidates only where the peer is known to be plexus: pinned, its letters signed.
            known = config.rendezvous.identity is not None
            offer = Offer(mine.outer, puzzle, mine.reach(streams, hosts=known))
            response = await rendezvous.invite(offer, config.response_timeout, submission)
        config.on_event(events.Answered(role="invite", peer=response.outer))
        theirs = response.reach
        if streams and (theirs is None or not theirs.streams):
            raise PeerRefusedError(f"{config.peer} does not serve streams (a plexus without them, or 2.2)")
        candidates = paths.choose(mine, response)
        log.info("peer endpoint %s, punching", response.outer)
        attempt = _attempt(config, socks, mine, response, puzzle, accept=False)
        established = await paths.establish(candidates, attempt, config.handshake_timeout)
    keys = rebind_keys(config, puzzle, response.puzzle, response)
    resuming = _resuming(
        config, rendezvous, config.peer, keys, offer, established.tunnel, accept=False, streams=streams
    )
    return _connected(config, "invite", established), resuming


@contextlib.contextmanager
def _resuming(
    config: SessionConfig,
    rendezvous: Rendezvous,
    peer: Peer,
    keys: RebindKeys | None,
    mine: Offer,
    tunnel: Tunnel,
    *,
    accept: bool,
    streams: bool,
) -> Iterator[Resume | None]:
    """How a streams session survives either side's move (plexus/resume.py): within it, the peer's
    rebinds are taken, and this side's are sent, sealed with its key. On a direct IPv4 path between plexus
    peers, where a move is a new outer endpoint that STUN shows; on a relay, the search for a direct path
    (plexus/streams/direct.py); elsewhere None: a move is not followed (docs/streams.md, "What survives
    what"), nor for the library's caller. A command's path follows a move where plexus carries it (--carry,
    plexus/carry.py), on a direct path too."""
    plexus = keys is not None and mine.reach is not None and config.hand_over is None
    ways = (Method.DIRECT, Method.RELAY) if streams else (Method.DIRECT,) if config.carry else ()
    if not plexus or tunnel.family != socket.AF_INET or tunnel.path not in ways:
        yield None
        return
    if tunnel.path == Method.RELAY:
        from plexus.streams import direct

        yield functools.partial(direct.upgrade, server=config.stun_server)
        return
    assert keys is not None and mine.reach is not None
    from plexus import resume

    key, reach, sequence = keys.mine(accept=accept), mine.reach, itertools.count(1)

    async def send(outer: Endpoint) -> None:
        rebind = key.seal(next(sequence), outer, reach, datetime.datetime.now(datetime.UTC))
        async with rendezvous.submission(peer) as submission:
            await rendezvous.rebind(rebind, peer, submission)

    with rendezvous.rebinds(keys.theirs(accept=accept)) as rebound:
        yield functools.partial(
            resume.resume,
            server=config.stun_server,
            outer=tunnel.outer,
            send=send,
            rebound=rebound,
            moved=rendezvous.moved,
        )


async def _discover(config: SessionConfig, socks: paths.Punching) -> paths.Found:
    return await paths.discover(socks, config.stun_server, config.turn, config.stun_server6)


def handshake_codec(
    config: SessionConfig, inviter_puzzle: int, acceptor_puzzle: int, theirs: Offer, *, accept: bool
) -> puncher.Codec:
    """The handshake's datagrams: authenticated between plexus peers (the peer's offer has a Reach), plexus
    2.2's masked checksum toward a 2.2 peer, which knows no other. The key is bound to both identities when
    the peer's offer came signed by its pinned key: then each side signs with its own (mail signing takes both
    --identity and --peer-identity; the DHT always has both), so both sides bind or neither does."""
    if theirs.reach is None:
        return puncher.Masked(inviter_puzzle ^ acceptor_puzzle)
    bound = _bound(config, theirs)
    return puncher.Authenticated.derive(inviter_puzzle, acceptor_puzzle, accept=accept, bound=bound)


def rebind_keys(
    config: SessionConfig, inviter_puzzle: int, acceptor_puzzle: int, theirs: Offer
) -> RebindKeys | None:
    """The session's rebind keys (plexus.rendezvous.RebindKeys), from the handshake's material and bound as
    its key is; None toward plexus 2.2 (the peer's offer has no Reach), which is never sent a rebind."""
    if theirs.reach is None:
        return None
    return RebindKeys.derive(inviter_puzzle, acceptor_puzzle, _bound(config, theirs))


def _bound(config: SessionConfig, theirs: Offer) -> bytes:
    """The ECDH secret of both pinned identities, where the peer's offer came signed by its pinned key."""
    mine = config.rendezvous.identity
    bound = mine.agree(theirs.signer) if mine is not None and theirs.signer is not None else None
    return bound or b""


async def _command(process: subprocess.Popen[bytes], running: set[Running]) -> None:
    """The launched command's life; cancelled, it stops the command."""
    try:
        await _watch(process, running)
    except asyncio.CancelledError:
        command = Running.of(process.pid)
        if command is not None:
            await command.stop(SHUTDOWN_GRACE)
        raise


def _work(
    config: SessionConfig, tunnel: Tunnel, peer: Peer, *, accept: bool, resume: Resume | None = None
) -> Awaitable[None]:
    """The session's work when it launches no command: the library caller's, or the streams (with what
    keeps them going across a move, `resume`)."""
    if config.hand_over is not None:
        return config.hand_over(dataclasses.replace(tunnel, peer_name=peer.name))
    assert config.streams is not None
    return _streams(config, tunnel, config.streams, accept=accept, resume=resume)


async def _streams(
    session: SessionConfig, tunnel: Tunnel, config: StreamsConfig, *, accept: bool, resume: Resume | None
) -> None:
    """The streams on the tunnel's inner port (on a relay this side allocated: the loopback endpoint facing
    plexus's forwarder), bound now that the punch has let the port go."""
    from plexus.streams import carry

    sock = paths.path_socket(tunnel, session.inner, session.inner6)
    await carry(sock, tunnel, config, accept=accept, resume=resume)


async def accept(config: SessionConfig) -> None:
    """Serve requests forever, each in a task; a request that no path can serve gets a refusal by mail.

    The NAT is checked once at the start (a STUN server that does not answer ends the acceptor, exit 4);
    behind a NAT that maps per destination the acceptor still serves peers behind easier NATs (birthday
    punching) and, with --turn-server, any peer. Each session checks again (networks change).
    """
    config.on_event(events.Started(role="accept"))
    with events.reporting(config.on_event, "accept"):
        await _accept(config)


async def _accept(config: SessionConfig) -> None:
    sessions: set[asyncio.Task[None]] = set()
    running: set[Running] = set()
    roster = config.rendezvous.peers
    # Replacing sessions take turns, each peer's apart (Turn: the newest request wins); kept ones each have
    # their own inner port. A peer's new session replaces that peer's last one only.
    turns: dict[str, Turn] = {}
    slots: dict[str, Slot] = {}  # the peers' whose commands this acceptor launched: forgotten as it ends
    try:
        async with contextlib.AsyncExitStack() as meeting:
            # Entering starts the IMAP login (the DHT join), which runs while STUN does.
            places = [
                await meeting.enter_async_context(each.open())
                for each in (config.rendezvous, *config.rendezvous_also)
            ]
            for peer in roster.peers.known:  # left by an acceptor that was killed: they hold the inner port
                if (slot := config.slot("accept", peer)) is not None:
                    await slot.stop_previous()
            with paths.punching(config.inner, config.inner6) as socks:
                paths.note_limits(await _discover(config, socks), config.turn)
            for place in places:
                await place.listen()
            config.on_event(events.Listening(role="accept", peers=roster.peers.names))
            async for place, invitation in _requests(places):
                peer = invitation.peer
                turn = None if config.keep_sessions else turns.setdefault(peer.name, Turn())
                if (slot := config.slot("accept", peer)) is not None:
                    slots[peer.name] = slot
                serving = config.serving(peer)
                task = asyncio.create_task(_serve(serving, place, invitation, turn, slot, running))
                sessions.add(task)
                task.add_done_callback(sessions.discard)
    finally:
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        await asyncio.gather(*(command.stop(SHUTDOWN_GRACE) for command in running))
        for slot in slots.values():
            slot.forget()


async def _requests(places: list[Rendezvous]) -> AsyncIterator[tuple[Rendezvous, Invitation]]:
    """Each request from any of the acceptor's rendezvous as it comes, with the one to answer it through;
    a rendezvous that fails (its server gone for good) ends the acceptor."""
    arrived: asyncio.Queue[tuple[Rendezvous, Invitation]] = asyncio.Queue()

    async def read(place: Rendezvous) -> None:
        async for invitation in place.requests():
            arrived.put_nowait((place, invitation))

    readers = [asyncio.ensure_future(read(place)) for place in places]
    getting: asyncio.Future[tuple[Rendezvous, Invitation]] | None = None
    try:
        while True:
            getting = asyncio.ensure_future(arrived.get())
            await asyncio.wait([getting, *readers], return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                for reader in readers:
                    if reader.done():
                        reader.result()  # its failure
                        raise AssertionError("a rendezvous's requests() ended")  # they run forever
            yield getting.result()
    finally:
        waiting: list[asyncio.Future[Any]] = [*readers, *([getting] if getting is not None else [])]
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def _serve(
    config: SessionConfig,
    rendezvous: Rendezvous,
    invitation: Invitation,
    turn: Turn | None,
    slot: Slot | None,
    running: set[Running],
) -> None:
    """One request's session, its events named by the peer it serves (`config` is SessionConfig.serving's,
    and what the rendezvous and the ways through report within it goes to the same sink)."""
    with events.reporting(config.on_event, "accept"):
        peer = invitation.peer
        config.on_event(events.Requested(role="accept", peer=invitation.offer.outer))
        if _wants_streams(invitation):  # streams sessions run side by side: no command of another is stopped
            turn = slot = None
        async with contextlib.AsyncExitStack() as relays:

            async def establish() -> tuple[paths.Established, Resuming, subprocess.Popen[bytes] | None]:
                if slot is not None:
                    await slot.stop_previous()
                established, resuming = await _answer(config, rendezvous, invitation, relays)
                if config.hand_over is not None or _wants_streams(invitation):
                    return established, resuming, None
                assert config.command is not None  # _answer refused the request otherwise
                if config.carry:
                    from plexus.carry import carried

                    established = carried(established, config.inner, config.inner6)
                tunnel = dataclasses.replace(established.tunnel, peer_name=peer.name)
                process = launcher.start(config.command, tunnel)
                if slot is not None:
                    slot.save(process.pid)
                return established, resuming, process

            try:
                established, resuming, process = await (establish() if turn is None else turn.run(establish))
                config.on_event(events.Launched(role="accept", pid=process.pid if process else None))
            except PlexusError as error:
                log.error("session with %s failed: %s", peer, error)
                config.on_event(events.Failed(role="accept", error=str(error)))
                return
            await established.release_unused(relays)  # a standby: not held for as long as the session runs
            try:
                with resuming as resume:
                    if process is None:
                        work = _work(config, established.tunnel, peer, accept=True, resume=resume)
                        await established.carry(work)
                    else:
                        await established.carry(_command(process, running), resume)
            except PlexusError as error:
                log.error("session with %s ended: %s", peer, error)
                config.on_event(events.Ended(role="accept", error=str(error)))
                return
            log.info("session with %s ended", peer)
            config.on_event(events.Ended(role="accept"))


def _wants_streams(invitation: Invitation) -> bool:
    return invitation.offer.reach is not None and invitation.offer.reach.streams


def _servable(config: SessionConfig, invitation: Invitation) -> None:
    """An acceptor serves what it was configured for: its command, its streams, or both (or, in the library,
    whatever its caller does with the path)."""
    if config.hand_over is not None:
        return
    peer = invitation.peer
    if _wants_streams(invitation):
        if config.streams is None or config.streams.allowed is None:
            raise NotServedError(
                f"this acceptor forwards no streams for {peer} (no --forward-allow, no allow=)"
            )
        if config.streams.check is None:
            raise NotServedError(f"{peer} has no identity pinned here (identity= in --peers): no streams")
    elif config.command is None:
        raise NotServedError(f"this acceptor runs no command for {peer}, it only forwards streams")


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
) -> tuple[paths.Established, Resuming]:
    """STUN, the plan, the punch, the response, the handshake; the SMTP session opens while STUN runs. With
    the path, how its streams survive a move (_resuming)."""
    handshake: asyncio.Future[paths.Established] | None = None
    with contextlib.ExitStack() as closing:
        try:
            async with rendezvous.submission(invitation.peer) as submission:
                async with _refusing(rendezvous, invitation, submission):
                    _servable(config, invitation)
                    socks = closing.enter_context(paths.punching(config.inner, config.inner6))
                    found = await _discover(config, socks)
                    theirs = invitation.offer.reach
                    mine = await paths.gather(found, config.turn, relays, accept=True, peer=theirs)
                    candidates = paths.choose(mine, invitation.offer)
                puzzle = secrets.randbits(64)
                attempt = _attempt(config, socks, mine, invitation.offer, puzzle, accept=True)
                # The punch starts before the response leaves: the TTL-limited hello (or the fan-out, the
                # spray, the relay's permission) has opened the way when the inviter's hellos arrive.
                handshake = asyncio.ensure_future(
                    paths.establish(candidates, attempt, config.handshake_timeout)
                )
                await asyncio.sleep(0)
                plexus = theirs is not None  # 2.2 is never sent anything new
                reach = mine.reach(_wants_streams(invitation), hosts=plexus, ipv6=plexus)
                offer = Offer(mine.outer, puzzle, reach)
                await rendezvous.answer(invitation, offer, submission)
            established = await handshake
            keys = rebind_keys(config, invitation.offer.puzzle, puzzle, invitation.offer)
            resuming = _resuming(
                config,
                rendezvous,
                invitation.peer,
                keys,
                offer,
                established.tunnel,
                accept=True,
                streams=_wants_streams(invitation),
            )
            return _connected(config, "accept", established), resuming
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


class Turn:
    """Replacing sessions take turns, and the newest request wins: a session still being established (stopping
    the last command, answering, punching) when a newer request arrives is given up, and so is one still
    waiting for its turn. Its inviter has asked again or gone, or never was (a forged anonymous request toward
    an endpoint nobody punches from): it must not hold the newer one back for its whole handshake timeout."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._newest = 0
        self._current: asyncio.Task[Any] | None = None

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """`work()` in turn; SupersededError when a newer request comes before it is done."""
        self._newest += 1
        mine = self._newest
        if self._current is not None:
            self._current.cancel()
        async with self._lock:
            if mine != self._newest:
                raise SupersededError("a newer request arrived while this one waited its turn")
            task = asyncio.ensure_future(work())
            self._current = task
            try:
                return await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the acceptor itself is stopping
                raise SupersededError("a newer request arrived before this one was established") from None
            finally:
                self._current = None
