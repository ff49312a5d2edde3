"""The pieces of a session that follows the inviter's move (plexus/resume.py), on loopback: the
inviter's STUN question from its streams socket, what it takes from whom beside QUIC, the acceptor's punch,
and `follow`'s decisions (tell the peer only of a real move; give up after REBIND_TRIES)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from plexus import events, resume, stun
from plexus.endpoint import Endpoint
from plexus.errors import PeerLostError
from plexus.identity import PeerCheck
from plexus.streams import quic
from tests.unit.test_streams import Pair, pair, udp_socket

MAPPED = Endpoint("198.51.100.7", 40123)


@contextlib.asynccontextmanager
async def stun_server(answer: Endpoint = MAPPED) -> AsyncIterator[tuple[Endpoint, list[Endpoint]]]:
    """A STUN server on loopback that answers every binding request with `answer` as the mapped address;
    yields its endpoint and the sources it heard."""
    sock = udp_socket()
    loop = asyncio.get_running_loop()
    heard: list[Endpoint] = []

    def readable() -> None:
        data, source = sock.recvfrom(2048)
        heard.append(Endpoint(*source))
        request = stun.decode(data)
        response = stun.Message(
            stun.BINDING, stun.Class.RESPONSE, request.transaction_id, {"XOR-MAPPED-ADDRESS": answer}
        )
        sock.sendto(bytes(response), source)

    loop.add_reader(sock.fileno(), readable)
    try:
        yield Endpoint(*sock.getsockname()), heard
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


async def links(made: Pair) -> tuple[quic.Link, quic.Link]:
    return await made.both(PeerCheck(made.inviter.id), PeerCheck(made.acceptor.id))


async def test_the_inviter_asks_its_stun_server_from_the_streams_socket_and_the_link_goes_on() -> None:
    async with pair() as made, stun_server() as (server, heard):
        _, inviter = await links(made)
        assert await inviter.mapped(server) == MAPPED
        assert heard == [Endpoint(*made.inviter_socket.getsockname())]
        inviter.probe()
        assert await inviter.heard_within(2.0)  # QUIC still runs on the socket


async def test_a_stun_server_that_does_not_answer_gives_none_within_the_schedule() -> None:
    silent = udp_socket()
    async with pair() as made:
        _, inviter = await links(made)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await inviter.mapped(Endpoint(*silent.getsockname())) is None
        assert loop.time() - start < stun.QUESTION_SCHEDULE.timeout + 0.3
    silent.close()


async def test_the_inviter_takes_nothing_from_another_endpoint_but_its_stun_answer() -> None:
    """A STUN answer from someone else, or QUIC from someone else, changes nothing."""
    async with pair() as made:
        _, inviter = await links(made)
        forger = udp_socket()
        target = made.inviter_socket.getsockname()
        answered = asyncio.ensure_future(inviter.mapped(Endpoint("127.0.0.1", 9)))  # nobody there
        await asyncio.sleep(0.05)
        asking = inviter._question._asking
        assert asking is not None
        forged = stun.Message(
            stun.BINDING,
            stun.Class.RESPONSE,
            asking.transaction_id,
            {"XOR-MAPPED-ADDRESS": Endpoint("203.0.113.9", 1)},
        )
        forger.sendto(bytes(forged), target)
        forger.sendto(b"\xc0" + bytes(1300), target)  # a long header from a stranger
        assert await answered is None
        forger.close()


async def test_a_punch_from_the_acceptor_makes_the_inviter_ping_at_once() -> None:
    async with pair() as made:
        acceptor, _ = await links(made)
        await asyncio.sleep(0.1)
        assert await acceptor.heard_within(0.0) is False
        acceptor.punch(Endpoint(*made.inviter_socket.getsockname()))
        assert await acceptor.heard_within(0.5)  # the inviter's PING, well before its 1 s keepalive


class FakeLink:
    """What follow() uses of a Link: a suspicion at once, STUN answers from a list, the peer heard or not."""

    def __init__(self, answers: list[Endpoint | None], answering: bool) -> None:
        self.suspect = asyncio.Event()
        self.suspect.set()
        self.answers = answers
        self.answering = answering
        self.probes = 0

    async def mapped(self, server: Endpoint) -> Endpoint | None:
        return self.answers.pop(0) if self.answers else None

    async def heard_within(self, timeout: float) -> bool:
        if not self.answers and not self.answering:
            await asyncio.sleep(timeout)
            return False
        await asyncio.sleep(0)
        if self.answering:
            raise asyncio.CancelledError  # the test is over: the peer was found
        return False

    def probe(self) -> None:
        self.probes += 1


async def run_follow(link: FakeLink, sent: list[Endpoint]) -> None:
    async def send(outer: Endpoint) -> None:
        sent.append(outer)

    await resume.follow(link, Endpoint("127.0.0.1", 3478), Endpoint("198.51.100.7", 1000), send)  # type: ignore[arg-type]


async def test_no_move_no_rebind_and_a_move_unanswered_ends_the_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resume, "REBIND_WAIT", 0.05)
    monkeypatch.setattr(resume, "RECHECK", 0.01)
    sent: list[Endpoint] = []
    seen: list[events.Event] = []
    link = FakeLink([None, Endpoint("198.51.100.7", 1000), MAPPED], answering=False)
    with events.reporting(seen.append, "invite"), pytest.raises(PeerLostError, match="none of 3 rebinds"):
        await run_follow(link, sent)
    assert sent == [MAPPED] * resume.REBIND_TRIES  # the unanswered and the unchanged told nothing
    assert [(e.before, e.after) for e in seen if isinstance(e, events.Remapped)] == [
        (Endpoint("198.51.100.7", 1000), MAPPED)
    ]
    assert link.probes > 0


async def test_an_answered_rebind_is_sent_once() -> None:
    sent: list[Endpoint] = []
    link = FakeLink([MAPPED], answering=True)
    with pytest.raises(asyncio.CancelledError):
        await run_follow(link, sent)
    assert sent == [MAPPED]
