"""The command's datagrams carried by plexus (--carry), so that its tunnel outlives a network change.

Without --carry the launched command owns the punched path: it binds the inner endpoint itself, and when
either side's NAT maps it anew the tunnel is dead until the next run of plexus (cron) makes a new one. With
it, plexus keeps the path's socket and stays between the command and the path, as it does on a relay it
allocated: the command is given loopback endpoints (%innerip%:%innerport% its own, %peerip%:%peerport%
plexus's), and each datagram passes through here (`Carrier`). A move of either side is then followed as the
streams follow it (plexus/resume.py): the carrier notices what the command sent go unanswered, asks STUN
from the path's socket, and a rebind over the rendezvous tells the peer, whose carrier punches and sends to
the new endpoint. The cost is a pass through Python per datagram (docs/performance.md, "Carried").

The carrier tells the peer's datagrams from its own by their first bytes: PING and PONG (resume's probe and
its answer) and PUNCH never reach the command; anything else from the peer is the command's peer's. Only an
authenticated rebind changes where the carrier sends, and which source it takes datagrams from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field

from plexus import events, stun
from plexus.endpoint import Endpoint
from plexus.launcher import Tunnel
from plexus.paths import Established, bind, free_port, path_socket
from plexus.resume import PUNCH, Resume, heard

log = logging.getLogger(__name__)

PING = b"\0plexus ping"  # resume's probe: the peer's carrier answers PONG to a source it takes datagrams from
PONG = b"\0plexus pong"
# What the command sent unanswered this long: ask STUN whether this side moved. Longer than the streams'
# 0.4 s, which QUIC's ACKs answer at once: a command's protocol answers at its own pace (OpenVPN's data is
# answered by the other side's traffic, its pings every --ping seconds).
SUSPECT_AFTER = 1.0
RECEIVE_SIZE = 65536


class Carrier:
    """The command's datagrams between its loopback endpoint and the peer, through the path's socket."""

    def __init__(self, path: socket.socket, local: socket.socket, command: Endpoint, peer: Endpoint) -> None:
        self._path, self._local = path, local
        self._command = (command.host, command.port)
        self._peer = peer.canonical()
        self._known = {(self._peer.host, self._peer.port)}  # the sources taken: the punched one, rebinds'
        self._loop = asyncio.get_running_loop()
        self._question = stun.Question()
        self._heard = asyncio.Event()
        self._asked_at: float | None = None  # the first datagram sent since the peer was last heard
        self._check: asyncio.TimerHandle | None = None
        self.heard_at = -math.inf
        self.suspect = asyncio.Event()
        self.to_peer = self.to_command = 0

    def start(self) -> None:
        for sock in (self._path, self._local):
            sock.setblocking(False)
        self._loop.add_reader(self._local.fileno(), self._from_command)
        self._loop.add_reader(self._path.fileno(), self._from_path)
        log.info("carrying the command's datagrams between %s and %s", Endpoint(*self._command), self._peer)

    def stop(self) -> None:
        for sock in (self._path, self._local):
            self._loop.remove_reader(sock.fileno())
            sock.close()
        if self._check is not None:
            self._check.cancel()
        log.info("carrier ends: %d datagrams to the peer, %d to the command", self.to_peer, self.to_command)

    def _from_command(self) -> None:
        for data, source in _received(self._local, "the command"):
            if source[:2] != self._command:
                continue
            self._send(data, self._peer)
            self.to_peer += 1
            if self._asked_at is None:
                self._asked_at = self._loop.time()
                self._check = self._loop.call_later(SUSPECT_AFTER, self._suspect)

    def _from_path(self) -> None:
        for data, source in _received(self._path, "the path"):
            now = self._loop.time()
            if self._question.answer(data, source, now) or source[:2] not in self._known:
                continue
            self._answered(now)
            if data == PING:
                self._path.sendto(PONG, source[:2])
            elif data not in (PONG, PUNCH):
                self._local.sendto(data, self._command)
                self.to_command += 1

    def _answered(self, now: float) -> None:
        self.heard_at, self._asked_at = now, None
        if self._check is not None:
            self._check.cancel()
            self._check = None
        self.suspect.clear()
        self._heard.set()

    def _suspect(self) -> None:
        self._check = None
        if self._asked_at is not None:
            self.suspect.set()

    def _send(self, data: bytes, toward: Endpoint) -> None:
        try:
            self._path.sendto(data, (toward.host, toward.port))
        except OSError as error:  # a network that is down for a moment: the command's protocol resends
            log.debug("carrier: to %s: %s", toward, error)

    # plexus.resume.Movable

    async def mapped(self, server: Endpoint) -> Endpoint | None:
        return (await self._question.ask(server, self._send)).mapped

    async def heard_within(self, timeout: float) -> bool:
        return await heard(self._heard, lambda: self.heard_at, timeout)

    def probe(self) -> None:
        self._send(PING, self._peer)

    def punch(self, toward: Endpoint) -> None:
        self._send(PUNCH, toward)

    def moved(self, peer: Endpoint) -> None:
        after = peer.canonical()
        if after == self._peer:
            return
        before, self._peer = self._peer, after
        self._known.add((after.host, after.port))
        log.info("carrier: the peer moved from %s to %s", before, after)
        events.emit(events.Migrated, before=before, after=after)


def _received(sock: socket.socket, what: str) -> Iterator[tuple[bytes, tuple[str, int]]]:
    """The datagrams waiting on a readable socket; an error (ICMP port unreachable from a command not yet
    listening, say) is logged and passed over."""
    while True:
        try:
            yield sock.recvfrom(RECEIVE_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            log.debug("carrier: from %s: %s", what, error)


@dataclass
class Carried:
    """A path whose datagrams pass through plexus's carrier: the command talks to it on loopback."""

    tunnel: Tunnel
    carrier: Carrier
    inner: Established = field(repr=False)  # the path as punched
    through_here = True

    async def carry(self, work: Awaitable[None], resume: Resume | None = None) -> None:
        self.carrier.start()
        following = asyncio.ensure_future(resume(self.carrier)) if resume is not None else None
        working = asyncio.ensure_future(work)
        try:
            waiting = {working} if following is None else {working, following}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if following is not None and following.done():
                following.result()  # PeerLostError: the command's path is gone for good
            await working
        finally:
            for task in (working, following):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (working, following) if t is not None), return_exceptions=True)
            self.carrier.stop()

    async def release_unused(self, allocations: contextlib.AsyncExitStack) -> None:
        await self.inner.release_unused(allocations)


def carried(established: Established, inner: Endpoint, inner6: Endpoint | None) -> Established:
    """The path, carried (Carried), where the command would own it; a path through plexus already (a relay
    this side allocated) as it is. `inner`, `inner6`: --stun-client's (paths.path_socket)."""
    if established.through_here:
        return established
    punched = established.tunnel
    path = path_socket(punched, inner, inner6)  # the punch's socket is closed by now: its port is free
    local = bind(Endpoint("127.0.0.1", 0))
    command = Endpoint("127.0.0.1", free_port())
    forwarder = Endpoint("127.0.0.1", local.getsockname()[1])
    tunnel = Tunnel(command, punched.outer, forwarder, punched.secret, punched.path, far=punched.peer)
    return Carried(tunnel, Carrier(path, local, command, punched.peer), established)
