"""One plexus session from each side: STUN on the punching socket, the mail rendezvous, the punch, the launch.

Inviter (once): stop its previous session's command -> STUN -> request by mail -> wait for the response ->
handshake -> launch -> watch the command for a moment.
Acceptor: STUN once (an unsuitable NAT is refused at the start), then forever: wait for a request -> stop
the previous session's command -> STUN -> TTL punch -> response by mail -> handshake -> launch. A request it
cannot serve (the inner port held, STUN failing, the NAT turned unsuitable) gets a refusal by mail, so the
inviter stops waiting at once.
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
from collections.abc import AsyncIterator
from dataclasses import dataclass

from plexus import launcher, puncher, stun
from plexus.endpoint import Endpoint
from plexus.errors import CommandFailedError, NatUnsuitableError, PlexusError, UsageError
from plexus.launcher import Command, Running, Slot, Tunnel
from plexus.mediator import Invitation, MailConfig, Mediator, Offer
from plexus.mediator.email import Submission

log = logging.getLogger(__name__)

# How long the inviter watches the launched command before exiting: long enough to report a command that
# fails at once (bad arguments), short enough not to hold up a cron job.
INVITER_WATCH_SECONDS = 1.0
# A stopped acceptor gives its commands this long to end after SIGTERM: a service stops within a second.
SHUTDOWN_GRACE = 0.5


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
    mail: MailConfig
    command: Command
    punch_hops: int = 7
    response_timeout: float = 60.0
    handshake_timeout: float = 60.0
    keep_sessions: bool = False  # True: sessions run side by side; False: a new one replaces the last
    turn: TurnConfig | None = None

    def slot(self, role: str) -> Slot | None:
        """Where the last session's command is remembered, unless sessions are kept side by side."""
        return None if self.keep_sessions else Slot.for_session(role, self.mail.host_id, self.mail.peer_id)


def bind(inner: Endpoint) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(inner)
    except OSError as error:
        sock.close()
        raise UsageError(f"cannot bind --stun-client {inner}: {error.strerror}") from error
    sock.setblocking(False)
    return sock


async def discover(sock: socket.socket, server: Endpoint) -> tuple[Endpoint, Endpoint]:
    """Learn the inner and outer endpoints; refuse a NAT whose mapping depends on the destination."""
    log.debug("asking STUN server %s for the outer endpoint", server)
    report = await stun.probe_mapping(sock, server)
    if report.mapping is None:
        log.warning("STUN server %s has no alternate address: NAT mapping not tested", server)
    elif report.mapping != "independent":
        raise NatUnsuitableError(
            f"NAT mapping is {report.mapping} (the outer port changes per destination): "
            "hole punching cannot work from this network"
        )
    log.info("inner endpoint %s, outer endpoint %s", report.inner, report.outer)
    return report.inner, report.outer


async def invite(config: SessionConfig) -> Tunnel:
    """The inviter's whole session; returns once the command is launched and has survived the watch window.

    Everything that does not depend on STUN runs while STUN does: the IMAP login and the SMTP session up to
    DATA. The mailbox clean-up (flag the response consumed, LOGOUT) runs while the command is watched.
    """
    slot = config.slot("invite")
    async with Mediator(config.mail) as mediator:
        if slot is not None:
            await slot.stop_previous()  # a stale tunnel holds the inner port and would double the new one
        with contextlib.closing(bind(config.inner)) as sock:
            async with mediator.submission() as submission:
                inner, outer = await discover(sock, config.stun_server)
                puzzle = secrets.randbits(64)
                response = await mediator.invite(Offer(outer, puzzle), config.response_timeout, submission)
            tunnel = Tunnel(inner, outer, response.outer, puzzle ^ response.puzzle)
            log.info("peer endpoint %s, punching", tunnel.peer)
            timeout = config.handshake_timeout
            await puncher.punch(sock, tunnel.peer, tunnel.secret, accept=False, timeout=timeout)
        process = launcher.start(config.command, tunnel)
        if slot is not None:
            slot.save(process.pid)
        watching = asyncio.ensure_future(launcher.watch(process, grace=INVITER_WATCH_SECONDS))
    status = await watching
    if status:
        raise CommandFailedError(
            f"{config.command.path} exited with status {status} within {INVITER_WATCH_SECONDS:g} s of its "
            "launch (its output is in --exec-log-file)"
        )
    return tunnel


async def accept(config: SessionConfig) -> None:
    """Refuse an unsuitable NAT at once, as plexus 2.2 does; then serve requests forever, each in a task.

    Refusing at the start, not per request, is what saves the inviters: an acceptor that never answers leaves
    each of them waiting out its whole response timeout. Each session still checks again (networks change).
    """
    sessions: set[asyncio.Task[None]] = set()
    running: set[Running] = set()
    slot = config.slot("accept")
    # Replacing sessions take turns, so the newest request wins; kept ones each have their own inner port.
    turn = None if config.keep_sessions else asyncio.Lock()
    try:
        async with Mediator(config.mail) as mediator:  # the IMAP login runs while STUN does
            if slot is not None:
                await slot.stop_previous()  # left by an acceptor that was killed: it holds the inner port
            with contextlib.closing(bind(config.inner)) as sock:
                await discover(sock, config.stun_server)
            async for invitation in mediator.requests():
                task = asyncio.create_task(_serve(config, mediator, invitation, turn, slot, running))
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
    mediator: Mediator,
    invitation: Invitation,
    turn: asyncio.Lock | None,
    slot: Slot | None,
    running: set[Running],
) -> None:
    peer = invitation.offer.outer
    try:
        async with _maybe(turn):
            if slot is not None:
                await slot.stop_previous()
            tunnel = await _answer(config, mediator, invitation)
            process = launcher.start(config.command, tunnel)
            if slot is not None:
                slot.save(process.pid)
    except PlexusError as error:
        log.error("session with %s failed: %s", peer, error)
        return
    await _watch(process, running)


async def _watch(process: subprocess.Popen[bytes], running: set[Running]) -> None:
    command = Running.of(process.pid)
    if command is None:  # ended already
        await launcher.watch(process)
        return
    running.add(command)
    await launcher.watch(process)
    running.discard(command)  # only once it ended: cancelled (the acceptor stopping), it is still to stop


async def _answer(config: SessionConfig, mediator: Mediator, invitation: Invitation) -> Tunnel:
    """STUN, the TTL punch, the response, the handshake; the SMTP session opens while STUN runs."""
    handshake: asyncio.Future[None] | None = None
    with contextlib.ExitStack() as closing:
        try:
            async with mediator.submission() as submission:
                async with _refusing(mediator, invitation, submission):
                    sock = closing.enter_context(contextlib.closing(bind(config.inner)))
                    inner, outer = await discover(sock, config.stun_server)
                puzzle = secrets.randbits(64)
                tunnel = Tunnel(inner, outer, invitation.offer.outer, puzzle ^ invitation.offer.puzzle)
                # The TTL-limited hello leaves before the response: our NAT is open when the inviter's
                # hellos arrive.
                handshake = asyncio.ensure_future(
                    puncher.punch(
                        sock,
                        tunnel.peer,
                        tunnel.secret,
                        accept=True,
                        hops=config.punch_hops,
                        timeout=config.handshake_timeout,
                    )
                )
                await asyncio.sleep(0)
                await mediator.answer(invitation, Offer(outer, puzzle), submission)
            await handshake
        finally:
            if handshake is not None:
                handshake.cancel()
    return tunnel


@contextlib.asynccontextmanager
async def _refusing(
    mediator: Mediator, invitation: Invitation, submission: Submission
) -> AsyncIterator[None]:
    """A failure before the response is the inviter's to know at once: it gets the reason in a refusal."""
    try:
        yield
    except PlexusError as error:
        try:
            await mediator.refuse(invitation, str(error), submission)
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
