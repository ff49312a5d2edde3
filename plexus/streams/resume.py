"""Streams that outlive a network change (issue 19; docs/streams.md, "What survives what").

When one side's NAT maps it anew (a new network, a NAT that forgot an idle mapping, a new address from the
ISP), its packets reach the peer from a new endpoint, and the peer's NAT, which filters per endpoint, drops
them. So the side that moved finds out where it is now and says so over the rendezvous; both sides do the
same (`resume` runs both halves on each):

- `follow`: once this side's packets have gone unanswered for SUSPECT_AFTER (quic.Link.suspect), it asks its
  STUN server from the streams socket where it is now (quic.Link.mapped). The same place: nothing to tell
  (a lossy moment, a dead network, or the peer moved: its rebind will say). A new place: it sends a rebind
  naming it (`send`: sealed with this side's rebind key, by mail or on the DHT) and probes every HURRY until
  the peer answers; unanswered for REBIND_WAIT, it sends the next, REBIND_TRIES in all, then ends the
  session (PeerLostError).
- `answer`: each rebind of the peer's that the rendezvous admits (authenticated, not a replay;
  plexus.rendezvous.Rebinds) makes it punch toward the new endpoint from the streams socket (quic.PUNCH, on
  PUNCH_SCHEDULE), so that its NAT lets the peer's packets in (quic.Link.moved). The acceptor's QUIC then
  validates the inviter's new endpoint and moves there (quic.py's docstring); the inviter, whose QUIC client
  never moves by itself, sends to the acceptor's new endpoint. Every stream goes on, nothing lost or
  repeated.

A rebind only names an endpoint. What moves the acceptor's sending is QUIC path validation, and a forger's
endpoint answers no PATH_CHALLENGE; what moves the inviter's is the acceptor's rebind, which takes the
session's key.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from plexus import events
from plexus.endpoint import Endpoint
from plexus.errors import PeerLostError, PlexusError
from plexus.rendezvous import Rebind
from plexus.streams.quic import Link

log = logging.getLogger(__name__)

# A rebind unanswered this long (no packet from the acceptor) is sent again: mail takes about a second in
# the lab (SMTP, then the acceptor's IMAP IDLE and fetch), the DHT a few tens of ms; a real mail server
# can take several.
REBIND_WAIT = 10.0
REBIND_TRIES = 3
HURRY = 0.2  # the inviter's probes while it waits for the acceptor's punch (beside the punch's own poke)
RECHECK = 2.0  # after a STUN answer that shows no move: look again once the peer is heard, or this long on
PUNCH_SCHEDULE = (0.0, 0.1, 0.3, 0.7)  # the acceptor's punches after a rebind, from its arrival


async def resume(
    link: Link,
    server: Endpoint,
    outer: Endpoint,
    send: Callable[[Endpoint], Awaitable[None]],
    rebound: AsyncIterator[Rebind],
) -> None:
    """Both halves, until cancelled or `follow` gives up (PeerLostError)."""
    answering = asyncio.ensure_future(answer(link, rebound))
    try:
        await follow(link, server, outer, send)
    finally:
        answering.cancel()
        await asyncio.gather(answering, return_exceptions=True)


async def follow(
    link: Link, server: Endpoint, outer: Endpoint, send: Callable[[Endpoint], Awaitable[None]]
) -> None:
    """This side's moves, until cancelled: `server` is its STUN server (a name or an address), `outer` the
    endpoint the peer knows, `send` sends the next rebind naming an endpoint. PeerLostError once
    REBIND_TRIES rebinds went unanswered."""
    address = await resolve(server)
    while True:
        await link.suspect.wait()
        mapped = await link.mapped(address)
        if mapped is None or mapped == outer:
            log.debug("streams: unanswered, and STUN says %s: no move to tell", mapped or "nothing")
            await link.heard_within(RECHECK)
            continue
        log.warning("streams: this side is now at %s, not %s: telling the peer (a rebind)", mapped, outer)
        events.emit(events.Remapped, before=outer, after=mapped)
        outer = mapped
        for _ in range(REBIND_TRIES):
            try:
                await send(outer)
            except PlexusError as error:  # the rendezvous is out of reach for now: wait, then try again
                log.warning("streams: the rebind was not sent: %s", error)
            if await _hurry(link, REBIND_WAIT):
                break
        else:
            raise PeerLostError(
                f"this side moved to {outer} and the peer answered none of {REBIND_TRIES} rebinds"
            )


async def _hurry(link: Link, wait: float) -> bool:
    """Probe every HURRY until the peer is heard (True) or `wait` has passed (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while (remaining := deadline - loop.time()) > 0:
        link.probe()
        if await link.heard_within(min(HURRY, remaining)):
            return True
    return False


async def answer(link: Link, rebound: AsyncIterator[Rebind]) -> None:
    """The peer's moves, until cancelled: toward each admitted rebind's endpoint."""
    async for rebind in rebound:
        log.info("streams: rebind %d: punching toward %s", rebind.sequence, rebind.outer)
        events.emit(events.Rebound, outer=rebind.outer, sequence=rebind.sequence)
        link.moved(rebind.outer)
        start = asyncio.get_running_loop().time()
        for offset in PUNCH_SCHEDULE:
            await asyncio.sleep(max(start + offset - asyncio.get_running_loop().time(), 0.0))
            link.punch(rebind.outer)


async def resolve(server: Endpoint) -> Endpoint:
    """The STUN server's IPv4 address (the streams socket's family), resolved once at the start."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        server.host, server.port, family=socket.AF_INET, type=socket.SOCK_DGRAM
    )
    host, port = infos[0][4][:2]
    return Endpoint(str(host), int(port))
