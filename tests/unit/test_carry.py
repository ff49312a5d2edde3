"""The carrier of a command's datagrams (--carry, plexus/carry.py) on loopback: what the command sends goes
to the peer and back; the peer's PING is answered and never reaches the command; a stranger's datagrams are
dropped; only `moved` (an authenticated rebind) changes where it sends; unanswered datagrams make it suspect;
its STUN question shares the path's socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from plexus import carry, events
from plexus.endpoint import Endpoint
from plexus.resume import PUNCH
from tests.unit.test_streams import udp_socket
from tests.unit.test_streams_resume import MAPPED, stun_server


def endpoint(sock: socket.socket) -> Endpoint:
    return Endpoint(*sock.getsockname())


async def received(sock: socket.socket, timeout: float = 1.0) -> tuple[bytes, Endpoint]:
    loop = asyncio.get_running_loop()
    data, source = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), timeout)
    return data, Endpoint(*source)


async def nothing(sock: socket.socket, wait: float = 0.2) -> bool:
    with contextlib.suppress(TimeoutError):
        await received(sock, wait)
        return False
    return True


@dataclass
class Setup:
    carrier: carry.Carrier
    command: socket.socket  # the command's own socket
    peer: socket.socket  # the peer, beyond the path
    path: Endpoint  # the carrier's path socket
    local: Endpoint  # the carrier's socket facing the command


@contextlib.asynccontextmanager
async def carrying() -> AsyncIterator[Setup]:
    path, local, command, peer = (udp_socket() for _ in range(4))
    carrier = carry.Carrier(path, local, endpoint(command), endpoint(peer))
    setup = Setup(carrier, command, peer, endpoint(path), endpoint(local))
    carrier.start()
    try:
        yield setup
    finally:
        carrier.stop()
        command.close()
        peer.close()


async def test_the_commands_datagrams_go_to_the_peer_and_back() -> None:
    async with carrying() as s:
        s.command.sendto(b"from the command", s.local)
        assert await received(s.peer) == (b"from the command", s.path)
        s.peer.sendto(b"from the peer", s.path)
        assert await received(s.command) == (b"from the peer", s.local)
        assert (s.carrier.to_peer, s.carrier.to_command) == (1, 1)


async def test_a_ping_is_answered_and_neither_it_nor_a_punch_reaches_the_command() -> None:
    async with carrying() as s:
        for data in (carry.PING, PUNCH, carry.PONG):
            s.peer.sendto(data, s.path)
        assert await received(s.peer) == (carry.PONG, s.path)
        assert await nothing(s.command)


async def test_a_stranger_is_not_heard_and_only_moved_changes_the_peer() -> None:
    seen: list[events.Event] = []
    async with carrying() as s:
        stranger = udp_socket()
        before, after = endpoint(s.peer).canonical(), endpoint(stranger).canonical()
        stranger.sendto(b"forged", s.path)
        stranger.sendto(carry.PING, s.path)
        assert await nothing(s.command) and await nothing(stranger)
        with events.reporting(seen.append, "accept"):
            s.carrier.moved(endpoint(stranger))  # as an admitted rebind would say
        s.command.sendto(b"to the new place", s.local)
        assert await received(stranger) == (b"to the new place", s.path)
        stranger.sendto(b"from the new place", s.path)
        assert await received(s.command) == (b"from the new place", s.local)
        stranger.close()
    assert [(e.before, e.after) for e in seen if isinstance(e, events.Migrated)] == [(before, after)]


async def test_unanswered_datagrams_make_it_suspect_and_an_answer_clears_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(carry, "SUSPECT_AFTER", 0.1)
    async with carrying() as s:
        s.command.sendto(b"unanswered", s.local)
        assert await received(s.peer) == (b"unanswered", s.path)
        await asyncio.wait_for(s.carrier.suspect.wait(), 1.0)
        s.carrier.probe()
        assert await received(s.peer) == (carry.PING, s.path)
        s.peer.sendto(carry.PONG, s.path)
        assert await s.carrier.heard_within(1.0)
        assert not s.carrier.suspect.is_set()


async def test_its_stun_question_goes_out_of_the_path_socket() -> None:
    async with carrying() as s, stun_server() as (server, heard):
        assert await s.carrier.mapped(server) == MAPPED
        assert heard == [s.path]
        assert await nothing(s.command)  # the answer is the carrier's, not the command's
