"""The handshake packet, both machines over a simulated lossy channel, and the asyncio driver on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import hmac
import itertools
import os
import random
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus import events, puncher, session
from plexus.endpoint import Endpoint
from plexus.errors import HandshakeTimeoutError
from plexus.identity import Identity
from plexus.mediator.dhtnode import DhtConfig
from plexus.puncher import Acceptor, Flag, Handshake, Inviter, Outcome, decode, encode
from plexus.rendezvous import Offer, Reach
from tests.fuzz import FUZZ

SECRET = 0x0123456789ABCDEF
MASKED = puncher.Masked(SECRET)  # the 2.2 codec: no state, so one serves every test
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
        Acceptor(INVITER, MASKED, 0.0, hops=0)
    with pytest.raises(ValueError, match="timeout"):
        Inviter(ACCEPTOR, MASKED, 0.0, timeout=0)


# --- the authenticated packet (two plexus peers) -----------------------------------------------------------

INVITER_PUZZLE, ACCEPTOR_PUZZLE = 0x0123456789ABCDEF, 0xFEDCBA9876543210
puzzles = st.tuples(secrets_64, secrets_64)


def counting(size: int) -> bytes:
    return bytes(range(size))


def sealed(*, accept: bool) -> puncher.Authenticated:
    return puncher.Authenticated.derive(INVITER_PUZZLE, ACCEPTOR_PUZZLE, accept=accept)


def hkdf_sha256(material: bytes, info: bytes) -> bytes:
    """RFC 5869 by hand, no salt, 32 bytes: one block of expansion."""
    prk = hmac.digest(bytes(32), material, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


def test_authenticated_known_answer() -> None:
    """The bytes docs/protocol.md shows, "Authenticated packet"."""
    material = bytes.fromhex("0123456789abcdeffedcba9876543210")  # inviter's puzzle, then the acceptor's
    key = hkdf_sha256(material, b"plexus handshake 1")
    assert key.hex() == "3858ba92c916d5f4caa3b48b70cc018cb16159bf4cb76b98dd2b3361845f0ebe"
    assert sealed(accept=False)._key == key
    hello = sealed(accept=False).seal(Flag.HELLO, counting)
    body = bytes([0xA1, 0x00]) + bytes(range(42))
    assert hello == body + hmac.digest(key, body, "sha256")[:16]
    assert hello[-16:].hex() == "71cf52d2f5a87ee333b696606802a977"
    ready = sealed(accept=True).seal(Flag.READY, counting)
    assert ready[:2] == bytes([0xA1, 0x03])  # ready (bit 0) from the acceptor (bit 1)
    assert ready[-16:].hex() == "a5e9b5ff36e56400310175cd88b9ee79"
    assert len(hello) == len(ready) == puncher.DATAGRAM_SIZE


@given(flags, puzzles)
def test_authenticated_round_trip_both_ways(flag: Flag, pair: tuple[int, int]) -> None:
    inviter = puncher.Authenticated.derive(*pair, accept=False)
    acceptor = puncher.Authenticated.derive(*pair, accept=True)
    assert acceptor.open(inviter.seal(flag, os.urandom)) is flag
    assert inviter.open(acceptor.seal(flag, os.urandom)) is flag


@given(flags, puzzles, puzzles)
def test_another_sessions_datagram_is_refused(
    flag: Flag, pair: tuple[int, int], other: tuple[int, int]
) -> None:
    if pair != other:
        sent = puncher.Authenticated.derive(*other, accept=False).seal(flag, os.urandom)
        assert puncher.Authenticated.derive(*pair, accept=True).open(sent) is None


def test_the_puzzles_order_matters() -> None:
    swapped = puncher.Authenticated.derive(ACCEPTOR_PUZZLE, INVITER_PUZZLE, accept=True)
    assert swapped.open(sealed(accept=False).seal(Flag.HELLO, os.urandom)) is None


@pytest.mark.parametrize("flag", list(Flag))
def test_every_single_bit_flip_is_refused(flag: Flag) -> None:
    datagram = sealed(accept=False).seal(flag, os.urandom)
    for bit in range(8 * len(datagram)):
        flipped = bytearray(datagram)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert sealed(accept=True).open(bytes(flipped)) is None, bit  # a fresh codec: no replay involved
    assert sealed(accept=True).open(datagram) is flag


def test_a_replay_and_a_reflection_are_refused() -> None:
    inviter, acceptor = sealed(accept=False), sealed(accept=True)
    hello = inviter.seal(Flag.HELLO, os.urandom)
    assert inviter.open(hello) is None  # our own hello reflected back: the sender's role is ours
    assert acceptor.open(hello) is Flag.HELLO
    assert acceptor.open(hello) is None  # the same nonce again
    assert acceptor.open(hello[:-1]) is None and acceptor.open(hello + b"\0") is None


@FUZZ
@given(st.binary(max_size=200))
def test_any_input_opens_or_is_refused(data: bytes) -> None:
    assert sealed(accept=True).open(data) is None  # a forger has no key: nothing random passes


@FUZZ
@given(st.binary(min_size=puncher.AUTH_BODY - 2, max_size=puncher.AUTH_BODY - 2), st.integers(0, 255))
def test_a_forged_datagram_with_the_right_header_is_refused(body: bytes, kind: int) -> None:
    forged = bytes([puncher.AUTH_VERSION, kind]) + body + os.urandom(puncher.TAG_SIZE)
    assert sealed(accept=True).open(forged) is None


def test_bad_keys_and_puzzles_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        puncher.Authenticated(bytes(16), accept=True)
    with pytest.raises(ValueError, match="64-bit"):
        puncher.Authenticated.derive(1 << 64, 0, accept=True)
    with pytest.raises(ValueError, match="64-bit"):
        puncher.Masked(-1)


def session_config(me: Identity | None = None, peer: Identity | None = None) -> session.SessionConfig:
    """A DHT session's config: its rendezvous holds this side's identity (so does mail's, with --identity)."""
    me = me or Identity.ephemeral()
    peer_id = (peer or Identity.ephemeral()).id
    rendezvous = DhtConfig(me, peer_id, (Endpoint("127.0.0.1", 4222),))
    return session.SessionConfig(Endpoint("0.0.0.0", 0), Endpoint("127.0.0.1", 3478), rendezvous, None)


def public_key(identity: Identity) -> ec.EllipticCurvePublicKey:
    key = identity.certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_the_2_2_codec_makes_2_2_datagrams_byte_for_byte() -> None:
    # a 2.2 peer (no Reach in its offer) gets the masked checksum, with secret = the XOR of the puzzles
    theirs = Offer(INVITER, INVITER_PUZZLE)
    codec = session.handshake_codec(session_config(), INVITER_PUZZLE, ACCEPTOR_PUZZLE, theirs, accept=True)
    assert isinstance(codec, puncher.Masked) and codec.secret == INVITER_PUZZLE ^ ACCEPTOR_PUZZLE
    entropy = bytes(range(1, puncher.DATAGRAM_SIZE))
    datagram = codec.seal(Flag.READY, lambda size: entropy[:size])
    assert datagram == encode(Flag.READY, INVITER_PUZZLE ^ ACCEPTOR_PUZZLE, entropy[:7], entropy[7:])
    assert decode(datagram, INVITER_PUZZLE ^ ACCEPTOR_PUZZLE) is Flag.READY
    assert codec.open(datagram) is codec.open(datagram) is Flag.READY  # 2.2 knows no replays
    plexus_peer = Offer(INVITER, 1, Reach("independent"))
    codec = session.handshake_codec(session_config(), 1, 2, plexus_peer, accept=True)
    assert isinstance(codec, puncher.Authenticated)


def test_the_key_is_bound_to_both_identities_when_the_peers_offer_came_signed() -> None:
    inviter, acceptor = Identity.ephemeral(), Identity.ephemeral()
    reach = Reach("independent")
    request = Offer(INVITER, INVITER_PUZZLE, reach, signer=public_key(inviter))
    response = Offer(ACCEPTOR, ACCEPTOR_PUZZLE, reach, signer=public_key(acceptor))
    at_acceptor = session.handshake_codec(
        session_config(acceptor, inviter), INVITER_PUZZLE, ACCEPTOR_PUZZLE, request, accept=True
    )
    at_inviter = session.handshake_codec(
        session_config(inviter, acceptor), INVITER_PUZZLE, ACCEPTOR_PUZZLE, response, accept=False
    )
    hello = at_inviter.seal(Flag.HELLO, os.urandom)
    assert at_acceptor.open(hello) is Flag.HELLO
    assert at_inviter.open(at_acceptor.seal(Flag.READY, os.urandom)) is Flag.READY
    # Whoever read both puzzles (a mailbox reader without S/MIME) makes the unbound key: refused both ways.
    reader = puncher.Authenticated.derive(INVITER_PUZZLE, ACCEPTOR_PUZZLE, accept=False)
    assert at_acceptor.open(reader.seal(Flag.HELLO, os.urandom)) is None
    assert reader.open(at_acceptor.seal(Flag.READY, os.urandom)) is None
    # and a third identity's key agreement with either side makes another key again
    elsewhere = session_config(Identity.ephemeral(), acceptor)
    stranger = session.handshake_codec(elsewhere, INVITER_PUZZLE, ACCEPTOR_PUZZLE, response, accept=False)
    assert at_acceptor.open(stranger.seal(Flag.HELLO, os.urandom)) is None


# --- each machine alone ------------------------------------------------------------------------------------


def flags_of(machine: Handshake) -> list[tuple[Flag | None, int | None]]:
    return [(decode(d.data, SECRET), d.ttl) for d in machine.datagrams_to_send()]


def test_datagrams_are_60_bytes_like_2_2() -> None:
    datagrams = Inviter(ACCEPTOR, MASKED, 0.0).datagrams_to_send()
    assert [len(d.data) for d in datagrams] == [puncher.DATAGRAM_SIZE]


def test_inviter_says_hello_until_ready() -> None:
    inviter = Inviter(ACCEPTOR, MASKED, 100.0, timeout=60, random=zeros)
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
    acceptor = Acceptor(INVITER, MASKED, 0.0, hops=2, random=zeros)
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
    acceptor = Acceptor(INVITER, MASKED, 0.0)
    acceptor.datagrams_to_send()
    acceptor.datagram_received(encode(Flag.HELLO, SECRET, bytes(7)), INVITER, 10.0)
    acceptor.handle_timer(10.0 + puncher.QUIET_PERIOD - 0.01)
    assert acceptor.outcome is None
    acceptor.handle_timer(10.0 + puncher.QUIET_PERIOD)
    assert acceptor.outcome is Outcome.PRESUMED


def test_acceptor_times_out_when_the_quiet_period_outlasts_the_deadline() -> None:
    acceptor = Acceptor(INVITER, MASKED, 0.0, timeout=60)
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
    for machine in (Inviter(ACCEPTOR, MASKED, 0.0), Acceptor(INVITER, MASKED, 0.0)):
        machine.datagrams_to_send()
        machine.datagram_received(data, machine.peer, 0.1)
        assert machine.outcome is None
        assert machine.datagrams_to_send() == []


def test_packets_from_a_wrong_endpoint_are_ignored() -> None:
    ready = encode(Flag.READY, SECRET, bytes(7))
    hello = encode(Flag.HELLO, SECRET, bytes(7))
    inviter = Inviter(ACCEPTOR, MASKED, 0.0)
    acceptor = Acceptor(INVITER, MASKED, 0.0)
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
    inviter = Inviter(ACCEPTOR, MASKED, 0.0, timeout=1.1)
    while inviter.outcome is None:
        when = inviter.get_timer()
        assert when is not None
        inviter.handle_timer(when)
    assert when == 1.1
    assert inviter.outcome is Outcome.TIMED_OUT


# --- both machines over a simulated channel ----------------------------------------------------------------


class Channel:
    """A channel that loses, duplicates and reorders; the TTL punch dies before the peer's NAT."""

    def __init__(
        self, rng: random.Random, loss: float, duplicate: float, jitter: float, authenticated: bool = False
    ) -> None:
        self.rng, self.loss, self.duplicate, self.jitter = rng, loss, duplicate, jitter
        self.authenticated = authenticated
        self.in_flight: list[tuple[float, int, Endpoint, Endpoint, bytes]] = []
        self.sequence = 0
        self.drop: set[tuple[Endpoint, Flag]] = set()  # scripted: all that `source` sends with `flag`

    def flush(self, source: Endpoint, machine: Handshake, now: float) -> None:
        for datagram in machine.datagrams_to_send():
            if datagram.ttl is not None or (source, self.flag(datagram.data)) in self.drop:
                continue
            for _ in range(2 if self.rng.random() < self.duplicate else 1):
                if self.rng.random() >= self.loss:
                    self.sequence += 1
                    arrival = now + 0.02 + self.rng.uniform(0, self.jitter)
                    packet = (arrival, self.sequence, source, machine.peer, datagram.data)
                    heapq.heappush(self.in_flight, packet)

    def flag(self, data: bytes) -> Flag | None:
        return Flag(data[1] & 1) if self.authenticated else decode(data, SECRET)


def simulate(
    channel: Channel, invite_at: float, timeout: float = 60.0
) -> Iterator[tuple[str, Handshake, float]]:
    """Run both sides in fake time to their outcomes; yields (role, machine, time of the outcome)."""
    codecs = (sealed(accept=False), sealed(accept=True)) if channel.authenticated else (MASKED, MASKED)
    acceptor = Acceptor(INVITER, codecs[1], 0.0, timeout=timeout)
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
            machines[endpoint] = Inviter(ACCEPTOR, codecs[0], now, timeout=timeout)
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
    authenticated=st.booleans(),
)
def test_both_sides_complete_despite_loss_duplication_and_reordering(
    seed: int, loss: float, duplicate: float, jitter: float, invite_at: float, authenticated: bool
) -> None:
    channel = Channel(random.Random(seed), loss, duplicate, jitter, authenticated)
    outcomes = {role: (machine.outcome, when) for role, machine, when in simulate(channel, invite_at)}
    assert outcomes["inviter"][0] is Outcome.COMPLETED
    assert outcomes["acceptor"][0] in (Outcome.COMPLETED, Outcome.PRESUMED)
    # the inviter is done the moment it answers a ready; the acceptor at most a quiet period later
    assert outcomes["acceptor"][1] <= outcomes["inviter"][1] + puncher.QUIET_PERIOD + 1.1


@pytest.mark.parametrize("authenticated", [False, True])
def test_lost_final_ready_ends_in_a_presumed_success(authenticated: bool) -> None:
    channel = Channel(random.Random(1), 0, 0, 0, authenticated)
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
@pytest.mark.parametrize("authenticated", [False, True], ids=["2.2-packet", "authenticated"])
async def test_punch_on_loopback(acceptor_first: bool, authenticated: bool) -> None:
    a, b = udp_socket(), udp_socket()
    codecs = (sealed(accept=True), sealed(accept=False)) if authenticated else (MASKED, MASKED)
    accept = puncher.punch(a, endpoint_of(b), codecs[0], accept=True, hops=1, timeout=10)
    invite = puncher.punch(b, endpoint_of(a), codecs[1], accept=False, timeout=10)
    await asyncio.gather(*((accept, invite) if acceptor_first else (invite, accept)))
    assert a.fileno() == -1
    assert b.fileno() == -1


async def test_punch_on_ipv6_loopback_with_the_peer_spelled_out() -> None:
    a, b = (socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) for _ in range(2))
    for sock in (a, b):
        sock.bind(("::1", 0))
    long_form = "0:0:0:0:0:0:0:1"
    await asyncio.gather(
        puncher.punch(a, Endpoint(long_form, b.getsockname()[1]), MASKED, accept=True, hops=2, timeout=10),
        puncher.punch(b, Endpoint(long_form, a.getsockname()[1]), MASKED, accept=False, timeout=10),
    )


async def test_punch_ignores_strangers() -> None:
    a, b, stranger = udp_socket(), udp_socket(), udp_socket()
    with stranger:
        stranger.sendto(b"noise", endpoint_of(b))
        stranger.sendto(encode(Flag.READY, SECRET, bytes(7)), endpoint_of(b))
        invite = asyncio.create_task(puncher.punch(b, endpoint_of(a), MASKED, accept=False, timeout=10))
        await asyncio.sleep(0.1)
        assert not invite.done()
        await asyncio.gather(invite, puncher.punch(a, endpoint_of(b), MASKED, accept=True, timeout=10))


async def test_punch_times_out_when_the_peer_is_silent() -> None:
    sock, silent = udp_socket(), udp_socket()
    with silent:
        peer = endpoint_of(silent)
        with pytest.raises(HandshakeTimeoutError, match=rf"^no handshake with {peer} within 0\.3 s$"):
            await puncher.punch(sock, peer, MASKED, accept=False, timeout=0.3)
        assert silent.recv(100)  # it did say hello
    assert sock.fileno() == -1


async def test_wrong_secret_times_out() -> None:
    a, b = udp_socket(), udp_socket()
    results = await asyncio.gather(
        puncher.punch(a, endpoint_of(b), MASKED, accept=True, timeout=0.5),
        puncher.punch(b, endpoint_of(a), puncher.Masked(SECRET ^ 1), accept=False, timeout=0.5),
        return_exceptions=True,
    )
    assert all(isinstance(result, HandshakeTimeoutError) for result in results)


async def test_cancel_closes_the_socket() -> None:
    sock, silent = udp_socket(), udp_socket()
    with silent:
        task = asyncio.create_task(puncher.punch(sock, endpoint_of(silent), MASKED, accept=True))
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
        punch = puncher.punch(spy, endpoint_of(peer), MASKED, accept=True, hops=3, timeout=5)
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
        task = asyncio.create_task(puncher.punch(sock, endpoint_of(peer), MASKED, accept=True))
        await asyncio.sleep(0)
        peer.sendto(b"anything", endpoint_of(sock))
        with pytest.raises(RuntimeError, match="bug"):
            await asyncio.wait_for(task, 5)
    assert sock.fileno() == -1


# --- peer-reflexive endpoints, the spray, the fan-out (for a peer whose NAT maps per destination) -----------

HARD_IP = "203.0.113.50"
EASY = Endpoint("198.51.100.2", 40000)
READY = encode(Flag.READY, SECRET, bytes(7))
HELLO = encode(Flag.HELLO, SECRET, bytes(7))


def sent(machine: Handshake) -> list[tuple[Flag | None, Endpoint | None]]:
    """The flags sent and where: None for the machine's current peer."""
    return [
        (decode(d.data, SECRET), None if d.to == machine.peer else d.to) for d in machine.datagrams_to_send()
    ]


def test_peer_reflexive_switch_happens_once_and_only_for_authenticated_packets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mailed = Endpoint(HARD_IP, 5000)
    machine = Acceptor(mailed, MASKED, 0.0, peer_reflexive=True, random=zeros)
    machine.datagrams_to_send()
    for data, source in (
        (b"\x01" + bytes(7), mailed._replace(port=6000)),  # unauthenticated, from a new port
        (encode(Flag.HELLO, SECRET ^ 1, bytes(7)), mailed._replace(port=6000)),
        (HELLO, Endpoint("203.0.113.51", 6000)),  # authenticated, but another address
    ):
        machine.datagram_received(data, source, 0.1)
    assert machine.peer == mailed
    assert not machine.settled
    assert machine.datagrams_to_send() == []
    reported: list[events.Event] = []
    with caplog.at_level("INFO", logger="plexus.puncher"), events.reporting(reported.append, "invite"):
        machine.datagram_received(HELLO, mailed._replace(port=6000), 0.2)
    assert machine.peer == Endpoint(HARD_IP, 6000)
    assert [r.getMessage() for r in caplog.records if "peer-reflexive" in r.getMessage()] == [
        f"peer-reflexive endpoint {HARD_IP}:6000: the peer's packets come from there, not {mailed}"
    ]
    assert [(e.before, e.after) for e in reported if isinstance(e, events.Moved)] == [(mailed, machine.peer)]
    assert sent(machine) == [(Flag.READY, None)]  # the ready goes to the new peer (to=None)
    # from now on only the new peer counts: neither the mailed endpoint nor a third port
    for source in (mailed, mailed._replace(port=7000)):
        machine.datagram_received(READY, source, 0.3)
    assert machine.outcome is None
    assert machine.peer == Endpoint(HARD_IP, 6000)
    machine.datagram_received(READY, Endpoint(HARD_IP, 6000), 0.4)
    assert machine.outcome is Outcome.COMPLETED


def test_the_racing_inviter_answers_a_hello_where_it_came_from_and_settles_on_the_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The acceptor chooses the pair: a peer-reflexive hello gets a hello back at once, there, and only the
    acceptor's ready settles the inviter's peer."""
    mailed = Endpoint(HARD_IP, 5000)
    moved = mailed._replace(port=6000)
    inviter = Inviter(mailed, MASKED, 0.0, peer_reflexive=True, random=zeros)
    inviter.datagrams_to_send()
    inviter.datagram_received(HELLO, Endpoint("203.0.113.51", 6000), 0.1)  # another address: ignored
    inviter.datagram_received(HELLO, moved, 0.2)
    assert (inviter.peer, inviter.settled) == (mailed, False)
    assert sent(inviter) == [(Flag.HELLO, moved)]
    inviter.datagram_received(HELLO, moved, 0.3)  # within HELLO_INTERVAL of the last answer there
    assert sent(inviter) == []
    reported: list[events.Event] = []
    with caplog.at_level("INFO", logger="plexus.puncher"), events.reporting(reported.append, "invite"):
        inviter.datagram_received(READY, moved, 0.4)
    assert (inviter.peer, inviter.outcome) == (moved, Outcome.COMPLETED)
    assert [(e.before, e.after) for e in reported if isinstance(e, events.Moved)] == [(mailed, moved)]
    assert sent(inviter) == [(Flag.READY, None)] * puncher.READY_COPIES


def test_a_ready_from_the_mailed_endpoint_settles_the_peer() -> None:
    inviter = Inviter(ACCEPTOR, MASKED, 0.0, peer_reflexive=True)
    inviter.datagram_received(HELLO, ACCEPTOR, 0.1)
    assert not inviter.settled
    inviter.datagram_received(READY, ACCEPTOR, 0.2)
    inviter.datagram_received(READY, ACCEPTOR._replace(port=1), 0.3)
    assert (inviter.peer, inviter.outcome) == (ACCEPTOR, Outcome.COMPLETED)


def test_an_inviter_answers_hellos_early_at_most_once_per_hello_interval() -> None:
    inviter = Inviter(ACCEPTOR, MASKED, 0.0, fanout=puncher.Fanout(interval=1.5, offset=0.5), random=zeros)
    assert sent(inviter) == []
    assert inviter.get_timer() == 0.5
    inviter.handle_timer(0.5)
    assert sent(inviter) == [(Flag.HELLO, None)]
    inviter.datagram_received(HELLO, ACCEPTOR, 0.6)  # 0.1 s after the last hello: no early one
    assert sent(inviter) == []
    inviter.datagram_received(HELLO, ACCEPTOR, 0.8)
    assert sent(inviter) == [(Flag.HELLO, None)]
    assert inviter.get_timer() == pytest.approx(2.3)
    # a plain inviter ignores hellos, as 2.2 does
    plain = Inviter(ACCEPTOR, MASKED, 0.0)
    plain.datagrams_to_send()
    plain.datagram_received(HELLO, ACCEPTOR, 1.0)
    assert plain.datagrams_to_send() == []


def test_a_fanout_acceptor_says_hello_with_full_ttl_until_done() -> None:
    acceptor = Acceptor(INVITER, MASKED, 0.0, fanout=puncher.Fanout(interval=1.5, offset=0.3), random=zeros)
    assert flags_of(acceptor) == []
    times = []
    while (when := acceptor.get_timer()) is not None and when < 5:
        acceptor.handle_timer(when)
        times += [when] * len(flags_of(acceptor))
    assert times == pytest.approx([0.3, 1.8, 3.3, 4.8])
    acceptor.datagram_received(HELLO, INVITER, 5.0)
    assert flags_of(acceptor) == [(Flag.READY, None)]
    acceptor.handle_timer(6.3)
    assert flags_of(acceptor) == [(Flag.HELLO, None)]  # keeps its mapping open
    acceptor.handle_timer(5.0 + puncher.QUIET_PERIOD)
    assert acceptor.outcome is Outcome.PRESUMED


def test_fan_out_staggers_the_hellos_within_the_rate() -> None:
    machines = puncher.fan_out(8, EASY, MASKED, 0.0, accept=False, interval=2.0, random=zeros)
    first = [m.get_timer() if not m.datagrams_to_send() else 0.0 for m in machines]
    assert first == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    with pytest.raises(ValueError, match="at least one"):
        puncher.fan_out(0, EASY, MASKED, 0.0, accept=True)


def spray_run(machine: Handshake, until: float) -> list[tuple[float, Endpoint]]:
    """The probes (datagrams with an explicit destination) a machine sends by `until`, with their times."""
    probes = [(0.0, d.to) for d in machine.datagrams_to_send() if d.to != machine.peer]
    while (when := machine.get_timer()) is not None and when <= until:
        machine.handle_timer(when)
        probes += [(when, d.to) for d in machine.datagrams_to_send() if d.to != machine.peer]
    return probes


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(), count=st.integers(0, 300), rate=st.floats(10, 1000), role=st.sampled_from([0, 1]))
def test_spray_sends_count_distinct_probes_at_the_rate(seed: int, count: int, rate: float, role: int) -> None:
    peer = Endpoint(HARD_IP, 4000)
    spray = puncher.Spray(count, rate, random.Random(seed))
    machine: Handshake = (Inviter, Acceptor)[role](peer, MASKED, 0.0, spray=spray, timeout=600, random=zeros)
    probes = spray_run(machine, 600)
    ports = [to.port for _, to in probes]
    assert len(ports) == count
    assert len(set(ports)) == count
    assert all(to.host == HARD_IP and 1024 <= to.port <= 65535 and to.port != 4000 for _, to in probes)
    times = [when for when, _ in probes]
    assert times[:1] == [0.0][:count]  # the first at once
    assert all(b - a >= 1 / rate - 1e-9 for a, b in itertools.pairwise(times))
    if count:
        assert times[-1] == pytest.approx((count - 1) / rate)


def test_spray_stops_at_the_first_authenticated_packet_only() -> None:
    acceptor = Acceptor(
        Endpoint(HARD_IP, 4000), MASKED, 0.0, spray=puncher.Spray(100, 100.0), peer_reflexive=True
    )
    assert len(spray_run(acceptor, 0.095)) == 10
    acceptor.datagram_received(b"noise" * 4, Endpoint(HARD_IP, 5555), 0.1)
    assert acceptor.probes_left == 90
    acceptor.datagram_received(HELLO, Endpoint(HARD_IP, 5555), 0.1)
    assert acceptor.probes_left == 0
    assert spray_run(acceptor, 10) == []
    with pytest.raises(ValueError, match="count"):
        puncher.Spray(count=len(puncher.PORTS))
    with pytest.raises(ValueError, match="rate"):
        puncher.Spray(rate=0)


# A model of the NATs: "symmetric" maps each (inner, destination) to a random free port and lets in only that
# destination; "cone" keeps the inner port for every destination and lets in what it has sent to
# (port-restricted); "fullcone" lets in anything; "none" is no NAT at all.


class Nat:
    def __init__(self, public: str, kind: str, rng: random.Random, ports: range = puncher.PORTS) -> None:
        self.public, self.kind, self.rng, self.ports = public, kind, rng, ports
        self.by_key: dict[tuple[Endpoint, ...], int] = {}
        self.by_port: dict[int, tuple[Endpoint, set[Endpoint]]] = {}

    def outbound(self, inner: Endpoint, to: Endpoint) -> Endpoint:
        key = (inner, to) if self.kind == "symmetric" else (inner,)
        port = self.by_key.get(key)
        if port is None:
            port = inner.port
            while self.kind == "symmetric" and (port == inner.port or port in self.by_port):
                port = self.rng.choice(self.ports)
            self.by_key[key] = port
            self.by_port[port] = (inner, set())
        self.by_port[port][1].add(to)
        return Endpoint(self.public, port)

    def inbound(self, source: Endpoint, port: int) -> Endpoint | None:
        inner, allowed = self.by_port.get(port, (None, set()))
        return inner if self.kind in ("fullcone", "none") or source in allowed else None


class World:
    """Machines behind NATs in fake time: 20 ms one way, TTL-limited datagrams die between the NATs."""

    LATENCY = 0.02

    def __init__(self) -> None:
        self.nats: dict[str, Nat] = {}
        self.sockets: dict[Endpoint, tuple[Nat, Handshake]] = {}
        self.events: list[tuple[float, int, Any]] = []
        self.sequence = 0
        self.delivered = 0

    def add(self, inner: Endpoint, nat: Nat, machine: Handshake, now: float) -> None:
        self.nats[nat.public] = nat
        self.sockets[inner] = (nat, machine)
        self.flush(inner, now)

    def push(self, when: float, item: Any) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (when, self.sequence, item))

    def flush(self, inner: Endpoint, now: float) -> None:
        nat, machine = self.sockets[inner]
        for datagram in machine.datagrams_to_send():
            to = datagram.to
            source = nat.outbound(inner, to)
            if datagram.ttl is None:
                self.push(now + self.LATENCY, (source, to, datagram.data))
        if (when := machine.get_timer()) is not None:
            self.push(when, inner)

    def run(self, done: Any, until: float) -> float:
        now = 0.0
        while self.events and not done():
            now, _, item = heapq.heappop(self.events)
            assert now <= until + 1, "the simulation does not end"
            if isinstance(item, Endpoint):  # a timer; stale ones are skipped
                machine = self.sockets[item][1]
                if machine.get_timer() == now:
                    machine.handle_timer(now)
                    self.flush(item, now)
                continue
            source, to, data = item
            nat = self.nats.get(to.host)
            inner = None if nat is None else nat.inbound(source, to.port)
            if inner is not None:
                self.delivered += 1
                machine = self.sockets[inner][1]
                machine.datagram_received(data, source, now)
                self.flush(inner, now)
        return now


def finished(machine: Handshake) -> bool:
    return machine.outcome in (Outcome.COMPLETED, Outcome.PRESUMED)


def birthday(
    seed: int,
    easy_kind: str,
    *,
    easy_accepts: bool,
    sockets: int = puncher.FANOUT_SOCKETS,
    spray: int = puncher.SPRAY_COUNT,
    ports: range = puncher.PORTS,
    hard_starts: float = 0.0,
    timeout: float = 15.0,
) -> tuple[Handshake, list[Handshake], float]:
    """One handshake between an easy side and a fanned-out hard side behind a symmetric NAT."""
    rng = random.Random(seed)
    world = World()
    easy_inner = Endpoint("10.0.1.2", 40000) if easy_kind != "none" else EASY
    easy_nat = Nat(EASY.host, easy_kind, rng, ports)
    hard_nat = Nat(HARD_IP, "symmetric", rng, ports)
    hard_inners = [Endpoint("10.0.2.2", 50000 + i) for i in range(sockets)]
    stun = hard_nat.outbound(hard_inners[0], Endpoint("203.0.113.10", 3478))  # the endpoint it mails
    easy_outer = easy_nat.outbound(easy_inner, Endpoint("203.0.113.10", 3478))
    role = Acceptor if easy_accepts else Inviter
    options = puncher.Spray(spray, rng=rng, ports=ports)
    easy = role(stun, MASKED, 0.0, timeout=timeout, random=zeros, peer_reflexive=True, spray=options)
    hard = puncher.fan_out(
        sockets, easy_outer, MASKED, hard_starts, accept=not easy_accepts, timeout=timeout, random=zeros
    )
    world.add(easy_inner, easy_nat, easy, 0.0)
    for inner, machine in zip(hard_inners, hard, strict=True):
        world.add(inner, hard_nat, machine, hard_starts)
    when = world.run(
        lambda: easy.outcome is not None and any(map(finished, hard)), until=hard_starts + timeout
    )
    return easy, hard, when


@pytest.mark.parametrize("easy_accepts", [True, False], ids=["hard-inviter", "hard-acceptor"])
@pytest.mark.parametrize("easy_kind", ["fullcone", "none"])
def test_an_unfiltered_easy_side_completes_in_about_one_round_trip(
    easy_kind: str, easy_accepts: bool
) -> None:
    easy, hard, when = birthday(1, easy_kind, easy_accepts=easy_accepts, spray=0)
    winners = [i for i, machine in enumerate(hard) if finished(machine)]
    assert winners == [0]  # the first hello of the fan-out got through
    assert easy.outcome is Outcome.COMPLETED
    assert easy.peer.host == HARD_IP
    # hard inviter: hello, ready, ready = 1.5 round trips; hard acceptor: hello, hello, ready, ready: 2
    assert when == pytest.approx(0.06 if easy_accepts else 0.08)


@pytest.mark.parametrize("easy_accepts", [True, False], ids=["hard-inviter", "hard-acceptor"])
def test_a_port_restricted_easy_side_completes_through_a_probe(easy_accepts: bool) -> None:
    for seed in range(3):
        easy, hard, when = birthday(seed, "cone", easy_accepts=easy_accepts)
        winners = [i for i, machine in enumerate(hard) if finished(machine)]
        assert len(winners) == 1, seed
        assert easy.outcome in (Outcome.COMPLETED, Outcome.PRESUMED)
        assert easy.peer.host == HARD_IP
        assert easy.probes_left < puncher.SPRAY_COUNT
        assert when < 1024 / puncher.SPRAY_RATE + puncher.FANOUT_INTERVAL + 0.5


def test_a_port_restricted_easy_side_without_spray_never_completes() -> None:
    easy, hard, _ = birthday(1, "cone", easy_accepts=True, spray=0, timeout=5)
    assert easy.outcome is Outcome.TIMED_OUT
    assert not any(map(finished, hard))


def test_probes_sprayed_long_before_the_hard_side_starts_still_open_the_way() -> None:
    # the easy acceptor sprays at once; the hard inviter starts 10 s later, when the mail has arrived
    easy, _, when = birthday(2, "cone", easy_accepts=True, hard_starts=10.0, timeout=30)
    assert easy.outcome is Outcome.COMPLETED
    assert 10 < when < 10 + puncher.FANOUT_INTERVAL + 0.5


def hit_probability(sockets: int, probes: int, space: int) -> tuple[float, float]:
    """The formula (probes drawn with replacement) and the exact chance for distinct probes."""
    miss = 1.0
    for j in range(probes):
        miss *= 1 - sockets / (space - j)
    return 1 - (1 - sockets / space) ** probes, 1 - miss


@pytest.mark.parametrize("easy_accepts", [True, False], ids=["hard-inviter", "hard-acceptor"])
def test_the_success_rate_matches_the_birthday_arithmetic(easy_accepts: bool) -> None:
    # A small port space keeps the runs fast and the chance near one half, where a rate is measured best:
    # 16 mappings among 2048 ports, 128 probes (the hard side's mailed STUN port is never probed).
    runs, ports = 600, range(1024, 1024 + 2048)
    successes = sum(
        finished(birthday(seed, "cone", easy_accepts=easy_accepts, sockets=16, spray=128, ports=ports)[0])
        for seed in range(runs)
    )
    formula, exact = hit_probability(16, 128, len(ports) - 1)
    assert formula == pytest.approx(exact, abs=0.02)
    sigma = (exact * (1 - exact) / runs) ** 0.5
    print(f"{successes}/{runs} = {successes / runs:.3f}; formula {formula:.3f}, exact {exact:.3f}")
    assert successes / runs == pytest.approx(exact, abs=4 * sigma)


def test_the_defaults_succeed_as_the_arithmetic_says() -> None:
    runs = 200
    formula, _ = hit_probability(puncher.FANOUT_SOCKETS, puncher.SPRAY_COUNT, len(puncher.PORTS))
    assert formula > 0.98
    results = [birthday(seed, "cone", easy_accepts=seed % 2 == 0) for seed in range(runs)]
    successes = sum(finished(easy) for easy, _, _ in results)
    times = sorted(when for easy, _, when in results if finished(easy))
    median = times[len(times) // 2]
    print(f"{successes}/{runs}, formula {formula:.3f}, median {median:.2f} s, max {times[-1]:.2f} s")
    assert successes / runs == pytest.approx(formula, abs=4 * (formula * (1 - formula) / runs) ** 0.5)
    assert times[-1] < 1024 / puncher.SPRAY_RATE + puncher.FANOUT_INTERVAL + 0.5


# --- the fan-out's asyncio driver on loopback -------------------------------------------------------------


async def test_punch_fanout_returns_the_socket_that_got_through_and_closes_the_others() -> None:
    socks = [udp_socket() for _ in range(8)]
    lucky = socks[5]
    with udp_socket() as easy:  # answers only the lucky socket, as a port-restricted NAT would let only it in
        task = asyncio.create_task(
            puncher.punch_fanout(socks, endpoint_of(easy), MASKED, accept=False, interval=0.4)
        )
        while True:
            data, source = await asyncio.get_running_loop().sock_recvfrom(easy, 100)
            if source == lucky.getsockname() and decode(data, SECRET) is Flag.HELLO:
                break
        easy.sendto(READY, source)
        winner, peer = await asyncio.wait_for(task, 5)
        assert peer == endpoint_of(easy)
    assert winner is lucky
    assert lucky.fileno() != -1
    assert [sock.fileno() == -1 for sock in socks] == [sock is not lucky for sock in socks]
    lucky.close()


async def test_punch_fanout_against_an_easy_peer_reflexive_punch_on_loopback() -> None:
    # loopback filters nothing, like a full-cone NAT: the first hello of the fan-out is enough
    socks = [udp_socket() for _ in range(16)]
    easy, elsewhere = udp_socket(), udp_socket()
    easy_endpoint = endpoint_of(easy)
    with elsewhere:  # the endpoint the hard side's STUN server saw: never used toward the easy side
        started = asyncio.get_running_loop().time()
        (winner, peer), final = await asyncio.gather(
            puncher.punch_fanout(socks, endpoint_of(easy), sealed(accept=True), accept=True, timeout=5),
            puncher.punch(
                easy,
                endpoint_of(elsewhere),
                sealed(accept=False),
                accept=False,
                peer_reflexive=True,
                timeout=5,
            ),
        )
        assert asyncio.get_running_loop().time() - started < 0.5
    with winner:
        assert final == endpoint_of(winner)
        assert winner is socks[0]
        assert peer == easy_endpoint
    assert easy.fileno() == -1
    assert all(sock.fileno() == -1 for sock in socks[1:])


async def test_punch_fanout_times_out_and_closes_every_socket() -> None:
    socks = [udp_socket() for _ in range(4)]
    with udp_socket() as silent:
        peer = endpoint_of(silent)
        with pytest.raises(HandshakeTimeoutError, match=rf"^no handshake with {peer} within 0\.3 s$"):
            await puncher.punch_fanout(socks, peer, MASKED, accept=True, timeout=0.3, interval=0.1)
        hellos = 0
        with contextlib.suppress(BlockingIOError):
            while decode(silent.recv(100), SECRET) is Flag.HELLO:
                hellos += 1
    assert 8 <= hellos <= 16  # 4 sockets, each every 0.1 s, for 0.3 s: 12 (the stagger trims the edges)
    assert all(sock.fileno() == -1 for sock in socks)


async def test_cancelling_punch_fanout_closes_every_socket() -> None:
    socks = [udp_socket() for _ in range(4)]
    with udp_socket() as silent:
        task = asyncio.create_task(puncher.punch_fanout(socks, endpoint_of(silent), MASKED, accept=False))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert all(sock.fileno() == -1 for sock in socks)


async def test_punch_returns_the_peer_endpoint_as_given() -> None:
    a, b = udp_socket(), udp_socket()
    peers = await asyncio.gather(
        puncher.punch(a, endpoint_of(b), MASKED, accept=True, hops=1, timeout=10),
        puncher.punch(b, endpoint_of(a), MASKED, accept=False, timeout=10),
    )
    assert list(peers) == [Endpoint("127.0.0.1", p.port) for p in peers]


# --- a blind attacker against an acceptor between two plexus peers ------------------------------------------

FORGERIES = 100_000


def forgeries(rng: random.Random, count: int) -> Iterator[tuple[bytes, Endpoint]]:
    """What a blind attacker can send: noise, datagrams with the authenticated header and a guessed tag, 2.2
    datagrams for guessed secrets; from the inviter's exact endpoint or another port of its address."""
    for n in range(count):
        kind = n % 4
        if kind == 0:
            data = rng.randbytes(rng.choice((8, 34, 59, 60, 61, 200)))
        elif kind in (1, 2):  # a hello or ready claiming the inviter's role, with a random tag
            data = bytes([puncher.AUTH_VERSION, kind - 1]) + rng.randbytes(puncher.DATAGRAM_SIZE - 2)
        else:
            data = encode(Flag(n & 1), rng.getrandbits(64), rng.randbytes(7), rng.randbytes(52))
        port = INVITER.port if n % 2 else rng.randrange(1024, 65536)
        yield data, INVITER._replace(port=port)


def test_a_blind_attacker_never_completes_the_handshake_nor_moves_the_peer() -> None:
    rng = random.Random(16)
    inviter_codec = sealed(accept=False)
    acceptor = Acceptor(INVITER, sealed(accept=True), 0.0, peer_reflexive=True, timeout=600)
    assert [d.ttl for d in acceptor.datagrams_to_send()] == [puncher.DEFAULT_HOPS]
    attack = forgeries(rng, FORGERIES)
    for now, (data, source) in enumerate(itertools.islice(attack, FORGERIES // 2)):
        acceptor.datagram_received(data, source, now / 1000)
    assert acceptor.outcome is None and acceptor.peer == INVITER and not acceptor.settled
    assert acceptor.datagrams_to_send() == []  # not one ready: the command would start on a ready's answer
    # the real inviter's hello, then the rest of the attack while the handshake goes on
    acceptor.datagram_received(inviter_codec.seal(Flag.HELLO, os.urandom), INVITER, 50.0)
    assert [d.to for d in acceptor.datagrams_to_send()] == [INVITER]  # a ready, to the peer
    for now, (data, source) in enumerate(attack):
        acceptor.datagram_received(data, source, 50.0 + now / 1e6)
    assert acceptor.outcome is None and acceptor.peer == INVITER
    assert acceptor.datagrams_to_send() == []
    acceptor.datagram_received(inviter_codec.seal(Flag.READY, os.urandom), INVITER, 50.2)
    assert acceptor.outcome is Outcome.COMPLETED and acceptor.peer == INVITER


def test_the_2_2_check_falls_to_a_few_hundred_blind_datagrams() -> None:
    """Why plexus peers authenticate: 2.2's check passes one random datagram in 256, so a blind attacker
    completes a 2.2 acceptor's handshake (a hello, then a ready) in about 512 datagrams."""
    rng = random.Random(16)
    acceptor = Acceptor(INVITER, MASKED, 0.0, timeout=600)
    sent = 0
    while acceptor.outcome is None:
        sent += 1
        acceptor.datagram_received(rng.randbytes(puncher.DATAGRAM_SIZE), INVITER, sent / 1000)
    assert acceptor.outcome is Outcome.COMPLETED
    assert sent < 5000


def test_a_replayed_hello_is_refused_from_another_port_and_from_the_same_source() -> None:
    inviter_codec, codec = sealed(accept=False), sealed(accept=True)
    hello = inviter_codec.seal(Flag.HELLO, os.urandom)
    # one codec for the machines of a fan-out: the hello that reached socket 1 is a replay at socket 2
    first = Acceptor(INVITER, codec, 0.0, peer_reflexive=True)
    second = Acceptor(INVITER, codec, 0.0, peer_reflexive=True)
    for machine in (first, second):
        machine.datagrams_to_send()
    first.datagram_received(hello, INVITER, 0.1)
    assert len(first.datagrams_to_send()) == 1
    first.datagram_received(hello, INVITER, 0.2)  # the same bytes again: no second ready
    assert first.datagrams_to_send() == []
    second.datagram_received(hello, INVITER._replace(port=INVITER.port + 1), 0.2)
    assert second.peer == INVITER and not second.settled
    assert second.datagrams_to_send() == []


def test_a_reflected_datagram_is_refused() -> None:
    """Our own datagram sent back at us (a NAT hairpin, a mirror) is refused: it names our role."""
    acceptor = Acceptor(INVITER, sealed(accept=True), 0.0, peer_reflexive=True)
    (punch,) = acceptor.datagrams_to_send()
    acceptor.datagram_received(punch.data, INVITER, 0.1)
    acceptor.datagram_received(punch.data, INVITER._replace(port=1), 0.1)
    assert acceptor.datagrams_to_send() == [] and not acceptor.settled
    inviter = Inviter(ACCEPTOR, sealed(accept=False), 0.0, peer_reflexive=True)
    (hello,) = inviter.datagrams_to_send()
    ready = sealed(accept=False).seal(Flag.READY, os.urandom)  # the inviter's own ready, not the acceptor's
    for data in (hello.data, ready):
        inviter.datagram_received(data, ACCEPTOR, 0.1)
    assert inviter.outcome is None and not inviter.settled


# --- host candidates: one machine, several destinations (issue 18) ------------------------------------------

SHARED_IP = "198.51.100.6"  # one NAT in front of both, which does not hairpin
INVITER_OUTER, ACCEPTOR_OUTER = Endpoint(SHARED_IP, 40000), Endpoint(SHARED_IP, 40001)
INVITER_LAN, ACCEPTOR_LAN = Endpoint("10.0.2.3", 40000), Endpoint("10.0.2.2", 40001)


def destinations(machine: Handshake) -> list[tuple[Endpoint, int | None]]:
    return [(d.to, d.ttl) for d in machine.datagrams_to_send()]


def test_host_candidates_need_the_authenticated_handshake() -> None:
    with pytest.raises(ValueError, match="authenticated"):
        Inviter(ACCEPTOR_OUTER, MASKED, 0.0, hosts=[ACCEPTOR_LAN])
    with pytest.raises(ValueError, match="authenticated"):
        Acceptor(INVITER_OUTER, MASKED, 0.0, lan=True)


def test_hellos_go_to_the_outer_endpoint_and_every_host_candidate() -> None:
    inviter = Inviter(ACCEPTOR_OUTER, sealed(accept=False), 0.0, hosts=[ACCEPTOR_LAN, ACCEPTOR_OUTER])
    assert destinations(inviter) == [(ACCEPTOR_OUTER, None), (ACCEPTOR_LAN, None)]  # the outer one once
    inviter.handle_timer(puncher.HELLO_INTERVAL)
    assert destinations(inviter) == [(ACCEPTOR_OUTER, None), (ACCEPTOR_LAN, None)]
    # the acceptor's punch toward the outer endpoint stays TTL-limited; toward a host candidate it must arrive
    acceptor = Acceptor(INVITER_OUTER, sealed(accept=True), 0.0, hops=3, hosts=[INVITER_LAN])
    assert destinations(acceptor) == [(INVITER_OUTER, 3), (INVITER_LAN, None)]
    acceptor.handle_timer(puncher.PUNCH_REFRESH)
    assert destinations(acceptor) == [(INVITER_OUTER, 3), (INVITER_LAN, None)]


def test_the_acceptors_ready_settles_the_race_and_the_rest_stop() -> None:
    inviter = Inviter(ACCEPTOR_OUTER, sealed(accept=False), 0.0, hosts=[ACCEPTOR_LAN], random=counting)
    inviter.datagrams_to_send()
    acceptor = sealed(accept=True)
    # not authenticated, or from a host that is no candidate: nothing changes
    inviter.datagram_received(bytes(puncher.DATAGRAM_SIZE), ACCEPTOR_LAN, 0.1)
    inviter.datagram_received(acceptor.seal(Flag.HELLO, os.urandom), Endpoint("10.0.2.9", 40001), 0.1)
    assert (inviter.peer, inviter.settled) == (ACCEPTOR_OUTER, False)
    assert destinations(inviter) == []
    # a candidate's hello is answered at once, there only, and settles nothing: the acceptor chooses
    inviter.datagram_received(acceptor.seal(Flag.HELLO, os.urandom), ACCEPTOR_LAN, 0.2)
    assert (inviter.peer, inviter.settled) == (ACCEPTOR_OUTER, False)
    assert destinations(inviter) == [(ACCEPTOR_LAN, None)]
    inviter.handle_timer(puncher.HELLO_INTERVAL)
    assert destinations(inviter) == [(ACCEPTOR_OUTER, None), (ACCEPTOR_LAN, None)]
    inviter.datagram_received(acceptor.seal(Flag.READY, os.urandom), ACCEPTOR_LAN, 0.5)
    assert (inviter.peer, inviter.outcome) == (ACCEPTOR_LAN, Outcome.COMPLETED)
    assert destinations(inviter) == [(ACCEPTOR_LAN, None)] * puncher.READY_COPIES


def test_the_outer_endpoint_may_win_the_race_too() -> None:
    """A NAT that hairpins: the acceptor readied on the direct path, and the host candidate drops out."""
    inviter = Inviter(ACCEPTOR_OUTER, sealed(accept=False), 0.0, hosts=[ACCEPTOR_LAN])
    inviter.datagrams_to_send()
    acceptor = sealed(accept=True)
    inviter.datagram_received(acceptor.seal(Flag.HELLO, os.urandom), ACCEPTOR_LAN, 0.1)
    inviter.datagram_received(acceptor.seal(Flag.READY, os.urandom), ACCEPTOR_OUTER, 0.2)
    assert (inviter.peer, inviter.outcome) == (ACCEPTOR_OUTER, Outcome.COMPLETED)
    inviter.datagram_received(acceptor.seal(Flag.READY, os.urandom), ACCEPTOR_LAN, 0.3)
    assert inviter.peer == ACCEPTOR_OUTER


def test_both_sides_settle_on_the_acceptors_pair_when_each_hears_another_first() -> None:
    """Two pairs that both work (IPv6 and the LAN): the inviter hears the acceptor on one first, the
    acceptor hears the inviter on the other. Settling on what each heard first, each would ignore the
    other's packets until the timeout; the acceptor's choice settles both."""
    inviter_v6, acceptor_v6 = Endpoint("2001:db8:b::3", 40000), Endpoint("2001:db8:b::2", 40001)
    inviter = Inviter(ACCEPTOR_OUTER, sealed(accept=False), 0.0, hosts=[ACCEPTOR_LAN, acceptor_v6])
    acceptor = Acceptor(INVITER_OUTER, sealed(accept=True), 0.0, hosts=[INVITER_LAN, inviter_v6])
    hello_v6 = next(d for d in acceptor.datagrams_to_send() if d.to == inviter_v6)
    hello_lan = next(d for d in inviter.datagrams_to_send() if d.to == ACCEPTOR_LAN)
    inviter.datagram_received(hello_v6.data, acceptor_v6, 0.01)  # the inviter hears IPv6 first
    acceptor.datagram_received(hello_lan.data, INVITER_LAN, 0.01)  # the acceptor the LAN
    assert acceptor.peer == INVITER_LAN and acceptor.settled and not inviter.settled
    (ready,) = acceptor.datagrams_to_send()
    assert ready.to == INVITER_LAN
    inviter.datagram_received(ready.data, ACCEPTOR_LAN, 0.02)
    assert (inviter.peer, inviter.outcome) == (ACCEPTOR_LAN, Outcome.COMPLETED)
    # the inviter's answer to the IPv6 hello reaches a settled acceptor, which ignores it
    for datagram in inviter.datagrams_to_send():
        source = inviter_v6 if ":" in datagram.to.host else INVITER_LAN
        acceptor.datagram_received(datagram.data, source, 0.03)
    assert (acceptor.peer, acceptor.outcome) == (INVITER_LAN, Outcome.COMPLETED)


@pytest.mark.parametrize(
    ("source", "moves"),
    [
        (INVITER_LAN, True),
        (Endpoint("192.168.1.20", 5), True),
        (Endpoint("fe80::1", 5), True),
        (Endpoint("8.8.8.8", 40000), False),  # a global address is no LAN: only a named candidate could be
        (Endpoint("2001:4860::1", 5), False),
    ],
)
def test_lan_takes_an_unnamed_peer_only_from_a_non_global_address(source: Endpoint, moves: bool) -> None:
    """The inviter behind the same NAT may not have named its host candidates (anonymous mail)."""
    acceptor = Acceptor(INVITER_OUTER, sealed(accept=True), 0.0, lan=True)
    acceptor.datagrams_to_send()
    acceptor.datagram_received(sealed(accept=False).seal(Flag.HELLO, os.urandom), source, 0.1)
    assert acceptor.peer == (source if moves else INVITER_OUTER)
    # without `lan` the same packet is ignored
    plain = Acceptor(INVITER_OUTER, sealed(accept=True), 0.0, peer_reflexive=True)
    plain.datagram_received(sealed(accept=False).seal(Flag.HELLO, os.urandom), source, 0.1)
    assert plain.peer == INVITER_OUTER


@pytest.mark.parametrize("named", [False, True], ids=["anonymous-mail", "pinned"])
def test_one_lan_without_hairpin_completes_over_the_host_candidates(named: bool) -> None:
    """Fake time and a NAT that drops what is sent to its own address: both sides complete, each with the
    other's LAN endpoint, in about one hello."""
    inviter = Inviter(
        ACCEPTOR_OUTER, sealed(accept=False), 0.0, hosts=[ACCEPTOR_LAN], lan=True, peer_reflexive=True
    )
    acceptor = Acceptor(
        INVITER_OUTER, sealed(accept=True), 0.0, hosts=[INVITER_LAN] if named else [], lan=True
    )
    lan: dict[Endpoint, Handshake] = {INVITER_LAN: inviter, ACCEPTOR_LAN: acceptor}
    sender = {id(inviter): INVITER_LAN, id(acceptor): ACCEPTOR_LAN}
    in_flight: list[tuple[float, int, Handshake, bytes, Endpoint]] = []
    order = itertools.count()

    def flush(machine: Handshake, now: float) -> None:
        for datagram in machine.datagrams_to_send():
            if datagram.to in lan:  # the outer endpoints: dropped at the NAT
                arrival = (now + 0.001, next(order), lan[datagram.to], datagram.data, sender[id(machine)])
                heapq.heappush(in_flight, arrival)

    now = 0.0
    for machine in (inviter, acceptor):
        flush(machine, now)
    while inviter.outcome is None or acceptor.outcome is None:
        timers = [(when, next(order), m) for m in (inviter, acceptor) if (when := m.get_timer()) is not None]
        if in_flight and (not timers or in_flight[0][0] <= min(timers)[0]):
            now, _, target, data, source = heapq.heappop(in_flight)
            target.datagram_received(data, source, now)
        else:
            now, _, target = min(timers)
            target.handle_timer(now)
        flush(target, now)
        assert now < 10
    assert (inviter.outcome, acceptor.outcome) == (Outcome.COMPLETED, Outcome.COMPLETED)
    assert (inviter.peer, acceptor.peer) == (ACCEPTOR_LAN, INVITER_LAN)
    assert now < 0.1
