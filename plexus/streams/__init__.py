"""Streams: TCP carried over the punched path in QUIC, instead of (or beside) launching a command.

quic.py drives the QUIC connection, wire.py is what starts each stream, forward.py moves the bytes. `carry`
is what a session runs on its tunnel, as it would launch a command on it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plexus.identity import Identity, PeerCheck
from plexus.launcher import Tunnel
from plexus.path import Method
from plexus.targets import Allowed, Target

# aioquic loads with the first stream session, not with every session that might have one.
if TYPE_CHECKING:
    from plexus.resume import Resume
    from plexus.streams.forward import Forward

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamsConfig:
    """Who this host is and whom it accepts, and what it forwards: the acceptor its --forward-allow list,
    the inviter --stdio or --forward."""

    identity: Identity
    # What the peer must prove. An acceptor's: what a peer with no identity pinned must prove (S/MIME's
    # certificate, or nothing with --anonymous), or None: then each peer its own identity, and a peer
    # without one gets no streams (SessionConfig.serving puts the peer's in place).
    check: PeerCheck | None
    allowed: Allowed | None = None  # acceptor: None serves no streams at all
    stdio: Target | None = None  # inviter
    forwards: tuple[Forward, ...] = ()  # inviter

    @property
    def inviting(self) -> bool:
        return self.stdio is not None or bool(self.forwards)


def _direct_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)
    return sock


async def carry(
    sock: socket.socket, tunnel: Tunnel, config: StreamsConfig, *, accept: bool, resume: Resume | None = None
) -> None:
    """The session's streams over the tunnel, from `sock` (bound to the tunnel's inner endpoint; taken
    over), until they are done or the peer goes; `resume` beside them, whose failure (PeerLostError) ends
    them.

    The inviter ends after --stdio's stream ends, or with the link (--forward runs until interrupted); the
    acceptor serves whatever streams the inviter opens until the inviter closes or falls silent. Both ping
    while the link lives, which keeps both NAT mappings open and shows a dead path within seconds
    (`link.dead`; quic.py's docstring)."""
    from plexus import paths
    from plexus.streams import forward, quic

    relayed = tunnel.path == Method.RELAY
    size = quic.RELAYED_DATAGRAM_SIZE if relayed else quic.DATAGRAM_SIZE
    # On a relay this side allocated, the streams socket faces the forwarder (on loopback): a direct path
    # found later needs a socket of its own (plexus/streams/direct.py).
    direct = _direct_socket() if relayed and resume is not None and paths.forwarded(tunnel) else None
    start = quic.serve if accept else quic.connect
    assert config.check is not None  # the session refused the request otherwise
    link = await start(sock, tunnel.peer, config.identity, config.check, datagram_size=size, direct=direct)
    log.info("streams: QUIC connected with %s (peer id %s)", tunnel.peer, link.peer_id)
    beside: list[asyncio.Future[Any]] = [asyncio.ensure_future(link.keepalive())]
    if resume is not None:
        beside.append(asyncio.ensure_future(resume(link)))
    work: asyncio.Future[Any]
    if accept:
        assert config.allowed is not None
        work = asyncio.ensure_future(forward.serve(link, config.allowed))
    elif config.stdio is not None:
        work = asyncio.ensure_future(forward.stdio(link, config.stdio))
    else:
        work = asyncio.ensure_future(
            asyncio.gather(*(forward.listen(link, each) for each in config.forwards))
        )
    try:
        await asyncio.wait([work, *beside], return_when=asyncio.FIRST_COMPLETED)
        for task in beside:
            if task.done():
                task.result()  # PeerLostError: the session cannot go on
        await work
    finally:
        for task in (work, *beside):
            task.cancel()
        await asyncio.gather(work, *beside, return_exceptions=True)
        await link.close()
