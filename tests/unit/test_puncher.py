"""The handshake packet, both machines over a simulated lossy channel, and the asyncio driver on loopback."""

from __future__ import annotations

import asyncio
import heapq
import random
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus import puncher
from plexus.endpoint import Endpoint
from plexus.errors import HandshakeTimeoutError
from plexus.puncher import Acceptor, Flag, Handshake, Inviter, Outcome, decode, encode

SECRET = 0x0123456789ABCDEF
INVITER = Endpoint("198.51.100.2", 40000)
ACCEPTOR = Endpoint("198.51.100.6", 40001)
STRANGER = Endpoint("203.0.113.10", 40000)

secrets_64 = st.integers(0, (1 << 64) - 1)
flags = st.sampled_from(Flag)
nonces = st.binary(min_size=7, max_size=7)


def zeros(size: int) -> bytes:
    return bytes(size)


# --- the packet --------------------------------------------------------------------------------------------


def test_known_answer() -> None:
    # secret little-endian: EF CD AB 89 67 45 23 01; nonce 5A 3C 96 11 22 33 44, its XOR (the checksum) is B4.
    nonce = bytes.fromhex("5a3c9611223344")
    assert encode(Flag.HELLO, SECRET, nonce) == bytes.fromhex("b5f13d98457667b5")
    # ready sets bit 0 of byte 0, which flips bit 0 of the checksum as well
    assert encode(Flag.READY, SECRET, nonce) == bytes.fromhex("b4f13d98457667b4")
    # the flag overrides bit 0 of the random byte
    assert encode(Flag.HELLO, SECRET, bytes.fromhex("5b3c9611223344")) == bytes.fromhex("b5f13d98457667b5")
    assert decode(bytes.fromhex("b5f13d98457667b5"), SECRET) is Flag.HELLO
    assert decode(bytes.fromhex("b4f13d98457667b4") + bytes(52), SECRET) is Flag.READY


def test_secret_zero_leaves_the_packet_plain() -> None:
    assert encode(Flag.READY, 0, bytes(7)) == bytes.fromhex("0100000000000001")


@given(flags, secrets_64, nonces, st.binary(max_size=52))
def test_round_trip(flag: Flag, secret: int, nonce: bytes, padding: bytes) -> None:
    datagram = encode(flag, secret, nonce, padding)
    assert len(datagram) == 8 + len(padding)
    assert datagram[8:] == padding
    assert decode(datagram, secret) is flag


@given(st.binary(max_size=200), secrets_64)
def test_any_input_decodes_or_is_rejected(data: bytes, secret: int) -> None:
    assert decode(data, secret) in (None, Flag.HELLO, Flag.READY)


@given(flags, secrets_64, nonces, st.integers(0, 63))
def test_a_flipped_bit_is_rejected(flag: Flag, secret: int, nonce: bytes, bit: int) -> None:
    datagram = bytearray(encode(flag, secret, nonce))
    datagram[bit // 8] ^= 1 << (bit % 8)
    assert decode(bytes(datagram), secret) is None


@given(st.binary(max_size=7), secrets_64)
def test_short_input_is_rejected(data: bytes, secret: int) -> None:
    assert decode(data, secret) is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="nonce"):
        encode(Flag.HELLO, SECRET, bytes(6))
    with pytest.raises(ValueError, match="64-bit"):
        encode(Flag.HELLO, 1 << 64, bytes(7))
    with pytest.raises(ValueError, match="hops"):
        Acceptor(INVITER, SECRET, 0.0, hops=0)
    with pytest.raises(ValueError, match="timeout"):
        Inviter(ACCEPTOR, SECRET, 0.0, timeout=0)


# --- each machine alone ------------------------------------------------------------------------------------


def flags_of(machine: Handshake) -> list[tuple[Flag | None, int | None]]:
    return [(decode(d.data, SECRET), d.ttl) for d in machine.datagrams_to_send()]


def test_datagrams_are_60_bytes_like_2_2() -> None:
    datagrams = Inviter(ACCEPTOR, SECRET, 0.0).datagrams_to_send()
    assert [len(d.data) for d in datagrams] == [puncher.DATAGRAM_SIZE]


def test_inviter_says_hello_until_ready() -> None:
    inviter = Inviter(ACCEPTOR, SECRET, 100.0, timeout=60, random=zeros)
    assert flags_of(inviter) == [(Flag.HELLO, None)]
    assert inviter.get_timer() == 100.25
    inviter.handle_timer(100.25)
    assert flags_of(inviter) == [(Flag.HELLO, None)]
    # a late timer sends one hello, not a burst
    inviter.handle_timer(101.3)
    assert flags_of(inviter) == [(Flag.HELLO, None)]
    assert inviter.get_timer() == 101.55
    inviter.datagram_received(encode(Flag.HELLO, SECRET, bytes(7)), ACCEPTOR, 101.4)
    assert flags_of(inviter) == []
    inviter.datagram_received(encode(Flag.READY, SECRET, bytes(7)), ACCEPTOR, 101.5)
    assert flags_of(inviter) == [(Flag.READY, None)] * puncher.READY_COPIES
    assert inviter.outcome is Outcome.COMPLETED
    assert inviter.get_timer() is None


def test_acceptor_punches_answers_and_completes() -> None:
    acceptor = Acceptor(INVITER, SECRET, 0.0, hops=2, random=zeros)
    assert flags_of(acceptor) == [(Flag.HELLO, 2)]
    assert acceptor.get_timer() == puncher.PUNCH_REFRESH
    acceptor.handle_timer(puncher.PUNCH_REFRESH)
    assert flags_of(acceptor) == [(Flag.HELLO, 2)]
    hello = encode(Flag.HELLO, SECRET, bytes(7))
    for now in (20.0, 20.0, 20.1):  # a duplicate gets its own answer: the first ready may be lost
        acceptor.datagram_received(hello, INVITER, now)
        assert flags_of(acceptor) == [(Flag.READY, None)]
    assert acceptor.get_timer() == 20.1 + puncher.QUIET_PERIOD
    acceptor.datagram_received(encode(Flag.READY, SECRET, bytes(7)), INVITER, 20.2)
    assert acceptor.outcome is Outcome.COMPLETED
    assert flags_of(acceptor) == []


def test_acceptor_presumes_success_when_hellos_stop_after_its_ready() -> None:
    acceptor = Acceptor(INVITER, SECRET, 0.0)
    acceptor.datagrams_to_send()
    acceptor.datagram_received(encode(Flag.HELLO, SECRET, bytes(7)), INVITER, 10.0)
    acceptor.handle_timer(10.0 + puncher.QUIET_PERIOD - 0.01)
    assert acceptor.outcome is None
    acceptor.handle_timer(10.0 + puncher.QUIET_PERIOD)
    assert acceptor.outcome is Outcome.PRESUMED


def test_acceptor_times_out_when_the_quiet_period_outlasts_the_deadline() -> None:
    acceptor = Acceptor(INVITER, SECRET, 0.0, timeout=60)
    acceptor.datagram_received(encode(Flag.HELLO, SECRET, bytes(7)), INVITER, 58.0)
    assert acceptor.get_timer() == 60.0
    acceptor.handle_timer(60.0)
    assert acceptor.outcome is Outcome.TIMED_OUT


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\x01" + bytes(7),  # the 8 bytes of SECRET XOR to 0, so this one's checksum is off by one bit
        encode(Flag.READY, SECRET ^ 1, bytes(7)),
        encode(Flag.READY, SECRET, bytes(7))[:7],
    ],
)
def test_garbage_is_ignored(data: bytes) -> None:
    for machine in (Inviter(ACCEPTOR, SECRET, 0.0), Acceptor(INVITER, SECRET, 0.0)):
        machine.datagrams_to_send()
        machine.datagram_received(data, machine.peer, 0.1)
        assert machine.outcome is None
        assert machine.datagrams_to_send() == []


def test_packets_from_a_wrong_endpoint_are_ignored() -> None:
    ready = encode(Flag.READY, SECRET, bytes(7))
    hello = encode(Flag.HELLO, SECRET, bytes(7))
    inviter = Inviter(ACCEPTOR, SECRET, 0.0)
    acceptor = Acceptor(INVITER, SECRET, 0.0)
    for machine in (inviter, acceptor):
        machine.datagrams_to_send()
        for source in (STRANGER, machine.peer._replace(port=machine.peer.port + 1)):
            machine.datagram_received(ready, source, 0.1)
            machine.datagram_received(hello, source, 0.1)
        assert machine.outcome is None
        assert machine.datagrams_to_send() == []
    inviter.datagram_received(ready, ACCEPTOR, 0.2)
    assert inviter.outcome is Outcome.COMPLETED


def test_inviter_times_out_exactly_at_the_deadline() -> None:
    inviter = Inviter(ACCEPTOR, SECRET, 0.0, timeout=1.1)
    while inviter.outcome is None:
        when = inviter.get_timer()
        assert when is not None
        inviter.handle_timer(when)
    assert when == 1.1
    assert inviter.outcome is Outcome.TIMED_OUT


# --- both machines over a simulated channel ----------------------------------------------------------------


class Channel:
    """A channel that loses, duplicates and reorders; the TTL punch dies before the peer's NAT."""

    def __init__(self, rng: random.Random, loss: float, duplicate: float, jitter: float) -> None:
        self.rng, self.loss, self.duplicate, self.jitter = rng, loss, duplicate, jitter
        self.in_flight: list[tuple[float, int, Endpoint, Endpoint, bytes]] = []
        self.sequence = 0
        self.drop: set[tuple[Endpoint, Flag]] = set()  # scripted: all that `source` sends with `flag`

    def flush(self, source: Endpoint, machine: Handshake, now: float) -> None:
        for datagram in machine.datagrams_to_send():
            if datagram.ttl is not None or (source, decode(datagram.data, SECRET)) in self.drop:
                continue
            for _ in range(2 if self.rng.random() < self.duplicate else 1):
                if self.rng.random() >= self.loss:
                    self.sequence += 1
                    arrival = now + 0.02 + self.rng.uniform(0, self.jitter)
                    packet = (arrival, self.sequence, source, machine.peer, datagram.data)
                    heapq.heappush(self.in_flight, packet)


def simulate(
    channel: Channel, invite_at: float, timeout: float = 60.0
) -> Iterator[tuple[str, Handshake, float]]:
    """Run both sides in fake time to their outcomes; yields (role, machine, time of the outcome)."""
    acceptor = Acceptor(INVITER, SECRET, 0.0, timeout=timeout)
    machines: dict[Endpoint, Handshake] = {ACCEPTOR: acceptor}
    finished: dict[Endpoint, float] = {}
    channel.flush(ACCEPTOR, acceptor, 0.0)
    while True:
        timers = [(when, ep) for ep, m in machines.items() if (when := m.get_timer()) is not None]
        starts = [] if INVITER in machines else [(invite_at, INVITER)]
        arrivals = [(channel.in_flight[0][0], STRANGER)] if channel.in_flight else []
        if not timers and not starts:
            break
        now, endpoint = min(timers + starts + arrivals)
        assert now < 1000, "the simulation does not end"
        if arrivals and now == arrivals[0][0]:
            _, _, source, endpoint, data = heapq.heappop(channel.in_flight)
            if endpoint not in machines:
                continue
            machines[endpoint].datagram_received(data, source, now)
        elif endpoint not in machines:
            machines[endpoint] = Inviter(ACCEPTOR, SECRET, now, timeout=timeout)
        else:
            machines[endpoint].handle_timer(now)
        channel.flush(endpoint, machines[endpoint], now)
        if machines[endpoint].outcome is not None:
            finished.setdefault(endpoint, now)
    yield "acceptor", acceptor, finished[ACCEPTOR]
    yield "inviter", machines[INVITER], finished[INVITER]


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(),
    loss=st.floats(0, 0.3),
    duplicate=st.floats(0, 0.5),
    jitter=st.floats(0, 1.0),
    invite_at=st.floats(0, 20),
)
def test_both_sides_complete_despite_loss_duplication_and_reordering(
    seed: int, loss: float, duplicate: float, jitter: float, invite_at: float
) -> None:
    channel = Channel(random.Random(seed), loss, duplicate, jitter)
    outcomes = {role: (machine.outcome, when) for role, machine, when in simulate(channel, invite_at)}
    assert outcomes["inviter"][0] is Outcome.COMPLETED
    assert outcomes["acceptor"][0] in (Outcome.COMPLETED, Outcome.PRESUMED)
    # the inviter is done the moment it answers a ready; the acceptor at most a quiet period later
    assert outcomes["acceptor"][1] <= outcomes["inviter"][1] + puncher.QUIET_PERIOD + 1.1


def test_lost_final_ready_ends_in_a_presumed_success() -> None:
    channel = Channel(random.Random(1), 0, 0, 0)
    channel.drop.add((INVITER, Flag.READY))
    outcomes = {role: (machine.outcome, when) for role, machine, when in simulate(channel, 5.0)}
    # hello at 5.0 reaches the acceptor at 5.02, its ready the inviter at 5.04
    assert outcomes["inviter"][0] is Outcome.COMPLETED
    assert outcomes["inviter"][1] == pytest.approx(5.04)
    assert outcomes["acceptor"][0] is Outcome.PRESUMED
    assert outcomes["acceptor"][1] == pytest.approx(5.02 + puncher.QUIET_PERIOD)


@pytest.mark.parametrize("silent", [INVITER, ACCEPTOR])
def test_silence_in_one_direction_ends_both_exactly_at_their_deadlines(silent: Endpoint) -> None:
    channel = Channel(random.Random(1), 0, 0, 0)
    channel.drop |= {(silent, Flag.HELLO), (silent, Flag.READY)}
    results = list(simulate(channel, invite_at=3.0, timeout=30.0))
    for _, machine, when in results:
        assert machine.outcome is Outcome.TIMED_OUT
        assert when == machine.deadline
    assert [when for _, _, when in results] == [30.0, 33.0]


# --- the asyncio driver on loopback ------------------------------------------------------------------------


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def endpoint_of(sock: socket.socket) -> Endpoint:
    return Endpoint(*sock.getsockname())


@pytest.mark.parametrize("acceptor_first", [True, False])
async def test_punch_on_loopback(acceptor_first: bool) -> None:
    a, b = udp_socket(), udp_socket()
    accept = puncher.punch(a, endpoint_of(b), SECRET, accept=True, hops=1, timeout=10)
    invite = puncher.punch(b, endpoint_of(a), SECRET, accept=False, timeout=10)
    await asyncio.gather(*((accept, invite) if acceptor_first else (invite, accept)))
    assert a.fileno() == -1
    assert b.fileno() == -1


async def test_punch_on_ipv6_loopback_with_the_peer_spelled_out() -> None:
    a, b = (socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) for _ in range(2))
    for sock in (a, b):
        sock.bind(("::1", 0))
    long_form = "0:0:0:0:0:0:0:1"
    await asyncio.gather(
        puncher.punch(a, Endpoint(long_form, b.getsockname()[1]), SECRET, accept=True, hops=2, timeout=10),
        puncher.punch(b, Endpoint(long_form, a.getsockname()[1]), SECRET, accept=False, timeout=10),
    )


async def test_punch_ignores_strangers() -> None:
    a, b, stranger = udp_socket(), udp_socket(), udp_socket()
    with stranger:
        stranger.sendto(b"noise", endpoint_of(b))
        stranger.sendto(encode(Flag.READY, SECRET, bytes(7)), endpoint_of(b))
        invite = asyncio.create_task(puncher.punch(b, endpoint_of(a), SECRET, accept=False, timeout=10))
        await asyncio.sleep(0.1)
        assert not invite.done()
        await asyncio.gather(invite, puncher.punch(a, endpoint_of(b), SECRET, accept=True, timeout=10))


async def test_punch_times_out_when_the_peer_is_silent() -> None:
    sock, silent = udp_socket(), udp_socket()
    with silent:
        peer = endpoint_of(silent)
        with pytest.raises(HandshakeTimeoutError, match=rf"^no handshake with {peer} within 0\.3 s$"):
            await puncher.punch(sock, peer, SECRET, accept=False, timeout=0.3)
        assert silent.recv(100)  # it did say hello
    assert sock.fileno() == -1


async def test_wrong_secret_times_out() -> None:
    a, b = udp_socket(), udp_socket()
    results = await asyncio.gather(
        puncher.punch(a, endpoint_of(b), SECRET, accept=True, timeout=0.5),
        puncher.punch(b, endpoint_of(a), SECRET ^ 1, accept=False, timeout=0.5),
        return_exceptions=True,
    )
    assert all(isinstance(result, HandshakeTimeoutError) for result in results)


async def test_cancel_closes_the_socket() -> None:
    sock, silent = udp_socket(), udp_socket()
    with silent:
        task = asyncio.create_task(puncher.punch(sock, endpoint_of(silent), SECRET, accept=True))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sock.fileno() == -1


async def test_acceptor_punches_with_hops_before_its_first_await_and_restores_the_ttl() -> None:
    sock, peer = udp_socket(), udp_socket()
    seen: list[int] = []
    normal = sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)

    class Spy(socket.socket):
        def sendto(self, *args: Any) -> int:
            seen.append(self.getsockopt(socket.IPPROTO_IP, socket.IP_TTL))
            return super().sendto(*args)

    spy = Spy(socket.AF_INET, socket.SOCK_DGRAM, fileno=sock.detach())
    with peer:
        punch = puncher.punch(spy, endpoint_of(peer), SECRET, accept=True, hops=3, timeout=5)
        task = asyncio.create_task(punch)
        await asyncio.sleep(0)  # one step, as the session does before it mails the response
        assert seen == [3]
        assert spy.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == normal
        data, source = peer.recvfrom(100)
        assert decode(data, SECRET) is Flag.HELLO
        peer.sendto(encode(Flag.HELLO, SECRET, bytes(7)), source)
        await asyncio.sleep(0.05)
        assert seen == [3, normal]
        peer.sendto(encode(Flag.READY, SECRET, bytes(7)), source)
        await task


async def test_a_bug_in_a_callback_ends_punch_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: bytes, secret: int) -> Flag | None:
        raise RuntimeError("bug")

    monkeypatch.setattr(puncher, "decode", broken)
    sock, peer = udp_socket(), udp_socket()
    with peer:
        task = asyncio.create_task(puncher.punch(sock, endpoint_of(peer), SECRET, accept=True))
        await asyncio.sleep(0)
        peer.sendto(b"anything", endpoint_of(sock))
        with pytest.raises(RuntimeError, match="bug"):
            await asyncio.wait_for(task, 5)
    assert sock.fileno() == -1
