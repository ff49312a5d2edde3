"""One plexus session from each side: STUN on the punching socket, the mail rendezvous, the punch, the launch.

Inviter (once): STUN -> request by mail -> wait for the response -> handshake -> launch.
Acceptor: STUN once (an unsuitable NAT is refused at the start), then forever: wait for a request -> STUN ->
TTL punch -> response by mail -> handshake -> launch.
The acceptor serves each request in its own task, so a slow or failing session never stops the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from plexus import launcher, puncher, stun
from plexus.endpoint import Endpoint
from plexus.errors import NatUnsuitableError, PlexusError, UsageError
from plexus.launcher import Command, Tunnel
from plexus.mediator import Invitation, MailConfig, Mediator, Offer

log = logging.getLogger(__name__)

# How long the inviter watches the launched command before exiting: long enough to report a command that
# fails at once (bad arguments), short enough not to hold up a cron job.
INVITER_WATCH_SECONDS = 1.0


@dataclass(frozen=True)
class SessionConfig:
    inner: Endpoint  # --stun-client; port 0 lets the system choose
    stun_server: Endpoint
    mail: MailConfig
    command: Command
    punch_hops: int = 7
    response_timeout: float = 60.0
    handshake_timeout: float = 60.0


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
    """The inviter's whole session; returns once the command is launched.

    Everything that does not depend on STUN runs while STUN does: the IMAP login and the SMTP session up to
    DATA. The mailbox clean-up (flag the response consumed, LOGOUT) waits until the command is launched.
    """
    sock = bind(config.inner)
    with contextlib.closing(sock):
        async with Mediator(config.mail) as mediator:
            async with mediator.submission() as submission:
                inner, outer = await discover(sock, config.stun_server)
                puzzle = secrets.randbits(64)
                response = await mediator.invite(Offer(outer, puzzle), config.response_timeout, submission)
            tunnel = Tunnel(inner, outer, response.outer, puzzle ^ response.puzzle)
            log.info("peer endpoint %s, punching", tunnel.peer)
            timeout = config.handshake_timeout
            await puncher.punch(sock, tunnel.peer, tunnel.secret, accept=False, timeout=timeout)
            process = launcher.start(config.command, tunnel)
    await launcher.watch(process, grace=INVITER_WATCH_SECONDS)
    return tunnel


async def accept(config: SessionConfig) -> None:
    """Refuse an unsuitable NAT at once, as plexus 2.2 does; then serve requests forever, each in a task.

    Refusing at the start, not per request, is what saves the inviters: an acceptor that never answers leaves
    each of them waiting out its whole response timeout. Each session still checks again (networks change).
    """
    sessions: set[asyncio.Task[None]] = set()
    # Sessions on a fixed inner port take turns: two sockets cannot hold one endpoint.
    turn = asyncio.Lock() if config.inner.port else None
    async with Mediator(config.mail) as mediator:  # the IMAP login runs while STUN does
        with contextlib.closing(bind(config.inner)) as sock:
            await discover(sock, config.stun_server)
        async for invitation in mediator.requests():
            task = asyncio.create_task(_serve(config, mediator, invitation, turn))
            sessions.add(task)
            task.add_done_callback(sessions.discard)


async def _serve(
    config: SessionConfig, mediator: Mediator, invitation: Invitation, turn: asyncio.Lock | None
) -> None:
    peer = invitation.offer.outer
    try:
        async with _maybe(turn):
            tunnel = await _answer(config, mediator, invitation)
        process = launcher.start(config.command, tunnel)
    except PlexusError as error:
        log.error("session with %s failed: %s", peer, error)
        return
    await launcher.watch(process)


async def _answer(config: SessionConfig, mediator: Mediator, invitation: Invitation) -> Tunnel:
    """STUN, the TTL punch, the response, the handshake; the SMTP session opens while STUN runs."""
    sock = bind(config.inner)
    handshake: asyncio.Future[None] | None = None
    with contextlib.closing(sock):
        try:
            async with mediator.submission() as submission:
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
async def _maybe(lock: asyncio.Lock | None) -> AsyncIterator[None]:
    if lock is None:
        yield
    else:
        async with lock:
            yield
