"""Sessions that outlive a network change (issue 19; docs/streams.md, "What survives what"): the streams'
QUIC link (plexus/streams/quic.py) and a command's datagrams that plexus carries (--carry, plexus/carry.py)
follow either side's move the same way, through the `Movable` face each offers.

When one side's NAT maps it anew (a new network, a NAT that forgot an idle mapping, a new address from the
ISP), its packets reach the peer from a new endpoint, and the peer's NAT, which filters per endpoint, drops
them. So the side that moved finds out where it is now and says so over the rendezvous; both sides do the
same (`resume` runs both halves on each):

- `follow`: once what this side sent has gone unanswered for a while (Movable.suspect), it asks its STUN
  server from the path's socket where it is now (Movable.mapped). The same place: nothing to tell (a lossy
  moment, a dead network, or the peer moved: its rebind will say). A new place: it sends a rebind naming it
  (`send`: sealed with this side's rebind key, by mail or on the DHT) and probes every HURRY until the peer
  answers; unanswered for REBIND_WAIT, it sends the next, REBIND_TRIES in all, then ends the session
  (PeerLostError).
- `answer`: each rebind of the peer's that the rendezvous admits (authenticated, not a replay;
  plexus.rendezvous.Rebinds) makes it punch toward the new endpoint from the path's socket (PUNCH, on
  PUNCH_SCHEDULE), so that its NAT lets the peer's packets in, and tells the path (Movable.moved). The
  acceptor's QUIC then validates the inviter's new endpoint and moves there (quic.py's docstring); the
  inviter's QUIC client, which never moves by itself, and a carrier on either side send to the endpoint the
  rebind names. Nothing is lost or repeated that the streams (or the command's own protocol) carry.

A rebind only names an endpoint, and takes the session's key to make.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from plexus import events, netwatch
from plexus.driver import wait_event
from plexus.endpoint import Endpoint
from plexus.errors import PeerLostError, PlexusError
from plexus.rendezvous import Rebind

log = logging.getLogger(__name__)

# The punch toward an endpoint the peer named (a rebind's, a candidate's): neither QUIC (first byte 0, where
# every QUIC packet has the fixed bit 0x40 set) nor STUN (no magic cookie), nor anything a command is given.
PUNCH = b"\0plexus punch"


class Movable(Protocol):
    """A path that can follow a move: the streams' QUIC link (plexus/streams/quic.py), the carrier of a
    command's datagrams (plexus/carry.py)."""

    @property
    def suspect(self) -> asyncio.Event:
        """Set while what this side sent has gone unanswered for a while (cleared when answered)."""
        ...

    async def mapped(self, server: Endpoint) -> Endpoint | None:
        """The path socket's outer endpoint as the STUN server at `server` sees it now, or None."""
        ...

    async def heard_within(self, timeout: float) -> bool:
        """Whether the peer is heard within `timeout`."""
        ...

    def probe(self) -> None:
        """Send something the peer answers."""
        ...

    def punch(self, toward: Endpoint) -> None:
        """PUNCH toward `toward` from the path socket."""
        ...

    def moved(self, peer: Endpoint) -> None:
        """The peer says, authenticated, that it is at `peer` now."""
        ...


# What keeps a session going across a move, run beside its work: `resume` bound to what a session has.
Resume = Callable[[Movable], Awaitable[None]]

# A rebind unanswered this long (no packet from the acceptor) is sent again: mail takes about a second in
# the lab (SMTP, then the acceptor's IMAP IDLE and fetch), the DHT a few tens of ms; a real mail server
# can take several.
REBIND_WAIT = 10.0
REBIND_TRIES = 3
HURRY = 0.2  # the inviter's probes while it waits for the acceptor's punch (beside the punch's own poke)
SETTLE = 0.1  # after an address of this host came or went, before asking STUN: the rest of the change
RECHECK = 2.0  # after a STUN answer that shows no move: look again once the peer is heard, or this long on
PUNCH_SCHEDULE = (0.0, 0.1, 0.3, 0.7)  # the acceptor's punches after a rebind, from its arrival


async def resume(
    link: Movable,
    server: Endpoint,
    outer: Endpoint,
    send: Callable[[Endpoint], Awaitable[None]],
    rebound: AsyncIterator[Rebind],
    moved: Callable[[], None] = lambda: None,
) -> None:
    """Both halves, until cancelled or `follow` gives up (PeerLostError); `moved` is told of each move of
    this side (the rendezvous's, Rendezvous.moved)."""
    answering = asyncio.ensure_future(answer(link, rebound))
    try:
        await follow(link, server, outer, send, moved)
    finally:
        answering.cancel()
        await asyncio.gather(answering, return_exceptions=True)


async def follow(
    link: Movable,
    server: Endpoint,
    outer: Endpoint,
    send: Callable[[Endpoint], Awaitable[None]],
    moved: Callable[[], None] = lambda: None,
) -> None:
    """This side's moves, until cancelled: `server` is its STUN server (a name or an address), `outer` the
    endpoint the peer knows, `send` sends the next rebind naming an endpoint. PeerLostError once
    REBIND_TRIES rebinds went unanswered."""
    address = await resolve(server)
    changed = asyncio.Event()  # an address of this host came or went (netwatch)
    with netwatch.watching(changed.set):
        while True:
            await _first(link.suspect.wait(), changed.wait())
            if changed.is_set():
                await asyncio.sleep(SETTLE)  # an address comes and the old one goes: ask once both did
                changed.clear()
            mapped = await link.mapped(address)
            if mapped is not None and mapped != outer:
                outer = await _tell(link, outer, mapped, send, moved)
                continue
            log.debug("unanswered, and STUN says %s: no move to tell", mapped or "nothing")
            await _first(link.heard_within(RECHECK), changed.wait())


async def _first(*waits: Awaitable[object]) -> None:
    """Until the first of these is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _tell(
    link: Movable,
    outer: Endpoint,
    mapped: Endpoint,
    send: Callable[[Endpoint], Awaitable[None]],
    moved: Callable[[], None],
) -> Endpoint:
    """This side is at `mapped` now, not `outer`: the rebinds, until the peer answers (PeerLostError after
    REBIND_TRIES); the endpoint the peer knows, after."""
    log.warning("this side is now at %s, not %s: telling the peer (a rebind)", mapped, outer)
    events.emit(events.Remapped, before=outer, after=mapped)
    moved()
    for _ in range(REBIND_TRIES):
        try:
            await send(mapped)
        except PlexusError as error:  # the rendezvous is out of reach for now: wait, then try again
            log.warning("the rebind was not sent: %s", error)
        if await _hurry(link, REBIND_WAIT):
            return mapped
    raise PeerLostError(f"this side moved to {mapped} and the peer answered none of {REBIND_TRIES} rebinds")


async def heard(signal: asyncio.Event, last: Callable[[], float], timeout: float) -> bool:
    """Whether `last()` (when the peer was last heard) moves on within `timeout` from now; `signal` is set
    whenever it does (a Movable's heard_within)."""
    loop = asyncio.get_running_loop()
    mark, deadline = last(), loop.time() + timeout
    while last() <= mark:
        signal.clear()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await wait_event(signal, remaining)
    return True


async def _hurry(link: Movable, wait: float) -> bool:
    """Probe every HURRY until the peer is heard (True) or `wait` has passed (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while (remaining := deadline - loop.time()) > 0:
        link.probe()
        if await link.heard_within(min(HURRY, remaining)):
            return True
    return False


async def answer(link: Movable, rebound: AsyncIterator[Rebind]) -> None:
    """The peer's moves, until cancelled: toward each admitted rebind's endpoint."""
    async for rebind in rebound:
        log.info("rebind %d: punching toward %s", rebind.sequence, rebind.outer)
        events.emit(events.Rebound, outer=rebind.outer, sequence=rebind.sequence)
        link.moved(rebind.outer)
        await punches(link, rebind.outer)


async def punches(link: Movable, toward: Endpoint) -> None:
    """PUNCH toward an endpoint the peer named, on PUNCH_SCHEDULE."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for offset in PUNCH_SCHEDULE:
        await asyncio.sleep(max(start + offset - loop.time(), 0.0))
        link.punch(toward)


async def resolve(server: Endpoint) -> Endpoint:
    """The STUN server's IPv4 address (the streams socket's family), resolved once at the start."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        server.host, server.port, family=socket.AF_INET, type=socket.SOCK_DGRAM
    )
    host, port = infos[0][4][:2]
    return Endpoint(str(host), int(port))
