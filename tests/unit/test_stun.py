"""STUN client: codec, transaction schedule, RFC 5780 classification, and the asyncio driver on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import struct
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus.endpoint import Endpoint
from plexus.errors import StunError
from plexus.stun import (
    BINDING,
    CHANGE_IP,
    CHANGE_PORT,
    DEFAULT_SCHEDULE,
    FINGERPRINT,
    HEADER_LENGTH,
    MAGIC_COOKIE,
    MESSAGE_INTEGRITY,
    MESSAGE_INTEGRITY_SHA256,
    NAMES,
    PROBE_SCHEDULE,
    Attribute,
    Behaviour,
    Class,
    Discovery,
    Message,
    NatReport,
    Outcome,
    Schedule,
    StunParseError,
    Transaction,
    binding_request,
    decode,
    error_code,
    explore,
    mapped_address,
    other_address,
    probe_mapping,
    probe_schedule,
    query_outer,
    query_over_tcp,
    tcp_answer,
)
from tests.fuzz import FUZZ

BEHAVIOURS: list[Behaviour] = ["independent", "address-dependent", "address-and-port-dependent"]


def change_request(message: Message) -> int:
    value = message.attributes.get("CHANGE-REQUEST", 0)
    assert isinstance(value, int)
    return value


def response(request: Message, **attributes: Attribute) -> Message:
    return Message(
        BINDING,
        Class.RESPONSE,
        request.transaction_id,
        {name.replace("_", "-"): value for name, value in attributes.items()},
    )


# Codec ---------------------------------------------------------------------------------------------------


def test_binding_request_round_trip_with_change_request() -> None:
    request = binding_request(CHANGE_IP | CHANGE_PORT)
    parsed = decode(bytes(request))
    assert parsed.message_method == BINDING
    assert parsed.message_class == Class.REQUEST
    assert parsed.transaction_id == request.transaction_id
    assert parsed.attributes == {"CHANGE-REQUEST": 0x06}
    assert parsed == request


def test_plain_binding_request_carries_no_attribute() -> None:
    assert len(bytes(binding_request())) == HEADER_LENGTH


def test_binding_request_bytes() -> None:
    transaction_id = bytes.fromhex("b7e7a701bc34d686fa87dfae")
    assert bytes(binding_request(CHANGE_PORT, transaction_id)) == bytes.fromhex(
        "0001 0008 2112a442 b7e7a701bc34d686fa87dfae 0003 0004 00000002"
    )


def test_rfc_5769_sample_ipv4_and_ipv6_responses() -> None:
    """RFC 5769's sample responses (2.2, 2.3): XOR-MAPPED-ADDRESS in both families, read past SOFTWARE,
    MESSAGE-INTEGRITY and FINGERPRINT (checked)."""
    ipv4 = bytes.fromhex(
        "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000080001a147e112a643"
        "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96"
    )
    parsed = decode(ipv4)
    assert (parsed.message_method, parsed.message_class) == (BINDING, Class.RESPONSE)
    assert parsed.attributes == {"XOR-MAPPED-ADDRESS": Endpoint("192.0.2.1", 32853)}
    ipv6 = bytes.fromhex(
        "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000140002a1470113a9fa"
        "a5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c8292c275bfe3ed4180280004c8fb0b4c"
    )
    assert mapped_address(decode(ipv6)) == Endpoint("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    with pytest.raises(StunParseError, match="FINGERPRINT"):
        decode(ipv4[:-1] + bytes([ipv4[-1] ^ 1]))


def test_response_round_trip_reads_rfc5780_attributes() -> None:
    message = response(
        binding_request(),
        XOR_MAPPED_ADDRESS=Endpoint("198.51.100.2", 40000),
        OTHER_ADDRESS=Endpoint("203.0.113.11", 3479),
        RESPONSE_ORIGIN=Endpoint("203.0.113.10", 3478),
    )
    parsed = decode(bytes(message))
    assert mapped_address(parsed) == Endpoint("198.51.100.2", 40000)
    assert other_address(parsed) == Endpoint("203.0.113.11", 3479)
    assert parsed.attributes["RESPONSE-ORIGIN"] == ("203.0.113.10", 3478)


def test_ipv6_addresses_in_every_address_attribute() -> None:
    attributes: dict[str, Attribute] = {
        name: Endpoint(f"2001:db8::{index + 1}", 1000 + index)
        for index, name in enumerate(
            ["XOR-MAPPED-ADDRESS", "MAPPED-ADDRESS", "OTHER-ADDRESS", "CHANGED-ADDRESS", "RESPONSE-ORIGIN"]
        )
    }
    message = Message(BINDING, Class.RESPONSE, None, attributes)
    assert decode(bytes(message)) == message
    assert mapped_address(message) == Endpoint("2001:db8::1", 1000)


def test_rfc3489_attributes_are_the_fallback() -> None:
    message = response(
        binding_request(),
        MAPPED_ADDRESS=Endpoint("198.51.100.2", 1),
        CHANGED_ADDRESS=Endpoint("203.0.113.11", 2),
    )
    parsed = decode(bytes(message))
    assert mapped_address(parsed) == Endpoint("198.51.100.2", 1)
    assert other_address(parsed) == Endpoint("203.0.113.11", 2)


def test_xor_mapped_address_wins_over_mapped_address() -> None:
    message = response(
        binding_request(),
        MAPPED_ADDRESS=Endpoint("10.0.0.1", 1),
        XOR_MAPPED_ADDRESS=Endpoint("198.51.100.2", 2),
    )
    assert mapped_address(decode(bytes(message))) == Endpoint("198.51.100.2", 2)


def test_an_error_response_carries_its_code_and_reason() -> None:
    error = Message(BINDING, Class.ERROR, None, {"ERROR-CODE": (420, "Unknown Attribute")})
    parsed = decode(bytes(error))
    assert parsed.message_class is Class.ERROR
    assert error_code(parsed) == (420, "Unknown Attribute")
    assert error_code(binding_request()) is None


def attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + bytes(-len(value) % 4)


def message_bytes(*attributes: bytes, kind: int = 0x0101, transaction_id: bytes = bytes(12)) -> bytes:
    body = b"".join(attributes)
    return struct.pack("!HHI", kind, len(body), MAGIC_COOKIE) + transaction_id + body


MAPPED = attribute(0x0001, bytes.fromhex("0001 1388 c0000201"))  # MAPPED-ADDRESS 192.0.2.1:5000


def test_unknown_attributes_are_skipped_and_the_first_of_two_counts() -> None:
    other = attribute(0x0001, bytes.fromhex("0001 0001 0a000001"))
    data = message_bytes(attribute(0x7777, b"odd"), attribute(0xC001, b""), MAPPED, other)
    assert decode(data).attributes == {"MAPPED-ADDRESS": Endpoint("192.0.2.1", 5000)}


def test_what_follows_message_integrity_is_ignored() -> None:
    data = message_bytes(attribute(0x0008, bytes(20)), MAPPED)
    assert decode(data).attributes == {}


def test_an_unpadded_last_attribute_is_read() -> None:
    data = message_bytes(MAPPED, attribute(0x8022, b"abc")[:-1])  # SOFTWARE "abc", its padding cut off
    assert decode(data).attributes == {"MAPPED-ADDRESS": Endpoint("192.0.2.1", 5000)}


def test_a_method_plexus_does_not_speak_still_decodes() -> None:
    parsed = decode(message_bytes(MAPPED, kind=0x0113))  # an Allocate error response
    assert (parsed.message_method, parsed.message_class) == (0x003, Class.ERROR)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        bytes(19),
        b"\xc0" + bytes(19),
        bytes(20),
        b"\x00\x01\x00\x04\x21\x12\xa4\x42" + bytes(12),
        message_bytes(MAPPED) + b"\x00",  # longer than its length says
        message_bytes(MAPPED)[:-4],
        message_bytes(attribute(0x0020, bytes.fromhex("0003 1388 c0000201"))),  # no such family
        message_bytes(attribute(0x0001, bytes.fromhex("0001 1388 c00002"))),  # short IPv4
        message_bytes(attribute(0x0001, bytes.fromhex("0002 1388 c0000201"))),  # short IPv6
        message_bytes(attribute(0x0001, b"")),
        message_bytes(attribute(0x0003, b"\x00\x00\x06")),  # CHANGE-REQUEST of 3 bytes
        message_bytes(attribute(0x0009, b"\x00\x04")),  # short ERROR-CODE
        message_bytes(attribute(0x8028, b"\x00\x00\x00\x00")),  # a wrong FINGERPRINT
        message_bytes(b"\x00\x01\x00"),  # an attribute header cut short
        message_bytes(b"\x00\x01\x00\x10" + bytes(8)),  # a value overrunning the message
    ],
)
def test_non_stun_datagrams_are_a_parse_error(data: bytes) -> None:
    with pytest.raises(StunParseError):
        decode(data)


@pytest.mark.parametrize(
    "message",
    [
        Message(0x4000, Class.REQUEST),  # a method with class bits
        Message(BINDING, Class.REQUEST, b"short"),
        Message(BINDING, Class.REQUEST, None, {"CHANGE-REQUEST": -1}),
        Message(BINDING, Class.ERROR, None, {"ERROR-CODE": (99, "no such class")}),
        Message(BINDING, Class.RESPONSE, None, {"MAPPED-ADDRESS": Endpoint("stun.example.net", 1)}),
        Message(BINDING, Class.RESPONSE, None, {"MAPPED-ADDRESS": Endpoint("192.0.2.1", 70000)}),
        Message(BINDING, Class.RESPONSE, None, {"MAPPED-ADDRESS": 5}),
    ],
)
def test_what_cannot_be_encoded_is_a_value_error(message: Message) -> None:
    with pytest.raises(ValueError):
        bytes(message)


# The codec's properties, and aioice's codec (what plexus used before, and what its TURN client still speaks)
# as the reference: each decodes what the other encodes.

# The round trips check the codec, not hostile input: as many examples in CI (the decoder's fuzzing, below,
# runs under FUZZ).
ROUND_TRIPS = settings(max_examples=300, deadline=None)
ADDRESS_NAMES = [
    "MAPPED-ADDRESS",
    "XOR-MAPPED-ADDRESS",
    "OTHER-ADDRESS",
    "CHANGED-ADDRESS",
    "RESPONSE-ORIGIN",
]
endpoints = st.builds(lambda ip, port: Endpoint(str(ip), port), st.ip_addresses(), st.integers(0, 0xFFFF))


@st.composite
def messages(draw: st.DrawFn, method: st.SearchStrategy[int] | None = None) -> Message:
    """Any message the codec can encode."""
    attributes: dict[str, Attribute] = {}
    for name in draw(st.lists(st.sampled_from(ADDRESS_NAMES), unique=True)):
        attributes[name] = draw(endpoints)
    if draw(st.booleans()):
        attributes["CHANGE-REQUEST"] = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        attributes["ERROR-CODE"] = (draw(st.integers(300, 699)), draw(st.text(max_size=40)))
    return Message(
        draw(st.integers(0, 0x3FFF).map(lambda kind: kind & 0x3EEF) if method is None else method),
        draw(st.sampled_from(Class)),
        draw(st.binary(min_size=12, max_size=12)),
        draw(st.permutations(list(attributes.items())).map(dict)),
    )


@ROUND_TRIPS
@given(messages())
def test_every_message_round_trips(message: Message) -> None:
    data = bytes(message)
    assert len(data) % 4 == 0 and len(data) == HEADER_LENGTH + int.from_bytes(data[2:4], "big")
    assert decode(data) == message


@ROUND_TRIPS
@given(messages(method=st.just(BINDING)))
def test_aioice_decodes_what_plexus_encodes(message: Message) -> None:
    theirs = aioice_stun.parse_message(bytes(message))
    assert theirs.message_method == message.message_method
    assert int(theirs.message_class) == message.message_class
    assert theirs.transaction_id == message.transaction_id
    assert theirs.attributes == message.attributes


@ROUND_TRIPS
@given(messages(method=st.sampled_from(aioice_stun.Method)), st.booleans())
def test_plexus_decodes_what_aioice_encodes(message: Message, fingerprint: bool) -> None:
    theirs = aioice_stun.Message(
        aioice_stun.Method(message.message_method),
        aioice_stun.Class(message.message_class),
        message.transaction_id,
        dict(message.attributes),
    )
    if fingerprint:
        theirs.add_fingerprint()
    assert decode(bytes(theirs)) == message


# Fuzzing: whatever arrives on the punching socket, decode returns a Message or raises StunParseError.


@FUZZ
@given(st.binary(max_size=120))
def test_any_bytes_parse_or_raise_stun_parse_error(data: bytes) -> None:
    with suppress(StunParseError):
        decode(data)


known_types = st.sampled_from(
    [*NAMES, MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256, FINGERPRINT, 0x8022, 0x7777]
)


@st.composite
def stun_like(draw: st.DrawFn) -> bytes:
    """A valid header over random attributes, so the fuzzing reaches the attribute decoders."""
    body = b""
    for attr_type, value in draw(st.lists(st.tuples(known_types, st.binary(max_size=24)), max_size=5)):
        body += struct.pack("!HH", attr_type, len(value)) + value + bytes(-len(value) % 4)
    message_type = draw(st.integers(0, 0x3FFF))
    transaction_id = draw(st.binary(min_size=12, max_size=12))
    return struct.pack("!HHI", message_type, len(body), MAGIC_COOKIE) + transaction_id + body


@FUZZ
@given(stun_like())
def test_structured_garbage_parses_or_raises_stun_parse_error(data: bytes) -> None:
    with suppress(StunParseError):
        decode(data)


@FUZZ
@given(messages(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_messages_parse_or_raise_stun_parse_error(
    message: Message, changes: list[tuple[int, int]]
) -> None:
    """A valid message with a few bytes changed (its header's length among them, at times)."""
    data = bytearray(bytes(message))
    for offset, value in changes:
        data[offset % len(data)] = value
    with suppress(StunParseError):
        decode(bytes(data))


# Transaction schedule ------------------------------------------------------------------------------------


def run_until_done(transaction: Transaction) -> list[float]:
    sends = []
    while (now := transaction.next_time()) is not None:
        if transaction.poll(now) is not None:
            sends.append(now)
    return sends


def test_default_schedule_doubles_rto_from_200ms_with_a_cap_and_gives_up_at_9_5_s() -> None:
    transaction = Transaction(Endpoint("192.0.2.1", 3478), binding_request(), 100.0)
    sends = run_until_done(transaction)
    assert [round(t - 100, 3) for t in sends] == [0, 0.2, 0.6, 1.4, 3.0, 4.6, 6.2]
    assert transaction.outcome is Outcome.TIMED_OUT
    assert transaction.deadline == 100 + DEFAULT_SCHEDULE.timeout == 109.5


def test_probe_schedule_stays_short_and_grows_with_the_round_trip() -> None:
    assert PROBE_SCHEDULE.send_offsets() == pytest.approx([0, 0.1, 0.3, 0.7])
    assert PROBE_SCHEDULE.timeout == 1.2
    assert probe_schedule(0.001) == PROBE_SCHEDULE
    slow = probe_schedule(0.5)
    assert slow.timeout == 2.5 and slow.send_offsets()[1] == 0.75


def test_schedule_never_sends_after_the_timeout() -> None:
    assert Schedule(rto=1, max_rto=1, attempts=10, timeout=3).send_offsets() == [0, 1, 2]


def test_late_wakeup_sends_once_not_a_burst() -> None:
    transaction = Transaction(Endpoint("192.0.2.1", 3478), binding_request(), 0.0)
    assert transaction.poll(0.0) is not None
    assert transaction.poll(1.5) is not None  # 0.2, 0.6 and 1.4 were all due
    assert transaction.poll(1.5) is None
    assert transaction.next_time() == pytest.approx(3.0)


def test_answer_stops_retransmission_and_foreign_ids_are_ignored() -> None:
    request = binding_request()
    transaction = Transaction(Endpoint("192.0.2.1", 3478), request, 0.0)
    transaction.poll(0.0)
    stranger = response(binding_request(), XOR_MAPPED_ADDRESS=Endpoint("192.0.2.99", 9))
    source = Endpoint("192.0.2.1", 3478)
    assert not transaction.receive(decode(bytes(stranger)), source, 0.05)
    assert not transaction.receive(request, source, 0.05)  # a request is not an answer
    answer = response(request, XOR_MAPPED_ADDRESS=Endpoint("198.51.100.2", 4000))
    assert transaction.receive(decode(bytes(answer)), source, 0.05)
    assert transaction.mapped == Endpoint("198.51.100.2", 4000)
    assert transaction.rtt == pytest.approx(0.05)
    assert transaction.next_time() is None and transaction.poll(0.2) is None


def test_rtt_is_unknown_after_a_retransmission() -> None:
    request = binding_request()
    transaction = Transaction(Endpoint("192.0.2.1", 3478), request, 0.0)
    transaction.poll(0.0)
    transaction.poll(0.2)
    answer = response(request, XOR_MAPPED_ADDRESS=Endpoint("198.51.100.2", 1))
    transaction.receive(answer, Endpoint("192.0.2.1", 3478), 0.3)
    assert transaction.rtt is None


def test_error_response_refuses_the_transaction() -> None:
    request = binding_request()
    transaction = Transaction(Endpoint("192.0.2.1", 3478), request, 0.0)
    error = Message(
        BINDING,
        Class.ERROR,
        request.transaction_id,
        {"ERROR-CODE": (420, "Unknown Attribute")},
    )
    assert transaction.receive(decode(bytes(error)), Endpoint("192.0.2.1", 3478), 0.1)
    assert transaction.outcome is Outcome.REFUSED
    assert transaction.describe_failure() == "error 420 Unknown Attribute"


# Discovery against a simulated NAT and RFC 5780 server ---------------------------------------------------

PRIMARY = Endpoint("203.0.113.10", 3478)
ALTERNATE = Endpoint("203.0.113.11", 3479)
PUBLIC_IP = "198.51.100.2"
INNER = [Endpoint("10.0.1.2", 5000), Endpoint("10.0.1.2", 5001)]


class SimulatedNetwork:
    """A NAT of the given behaviours in front of two sockets, and an RFC 5780 server beyond it."""

    def __init__(
        self,
        mapping: Behaviour | None,
        filtering: Behaviour = "independent",
        hairpin: bool = False,
        *,
        alternate: bool = True,
        alternate_answers: bool = True,
        honours_change: bool = True,
    ) -> None:
        self.mapping, self.filtering, self.hairpin = mapping, filtering, hairpin
        self.alternate, self.alternate_answers = alternate, alternate_answers
        self.honours_change = honours_change
        self.ports: dict[tuple[Any, ...], int] = {}
        self.owner: dict[Endpoint, int] = {}
        self.contacted: dict[Endpoint, set[Endpoint]] = defaultdict(set)

    def outbound(self, sock: int, destination: Endpoint) -> Endpoint:
        inner = INNER[sock]
        if self.mapping is None:
            public = inner
        else:
            key: tuple[Any, ...] = {
                "independent": (inner,),
                "address-dependent": (inner, destination.host),
                "address-and-port-dependent": (inner, destination),
            }[self.mapping]
            # The first mapping keeps the inner port, as Linux does when it is free.
            port = self.ports.setdefault(key, inner.port if not self.ports else 40000 + len(self.ports))
            public = Endpoint(PUBLIC_IP, port)
        self.owner[public] = sock
        self.contacted[public].add(destination)
        return public

    def inbound(self, source: Endpoint, public: Endpoint) -> int | None:
        if public not in self.owner:
            return None
        contacted = self.contacted[public]
        same_host = any(c.host == source.host for c in contacted)
        allowed = (
            self.mapping is None
            or self.filtering == "independent"
            or (self.filtering == "address-dependent" and same_host)
            or source in contacted
        )
        return self.owner[public] if allowed else None

    def server(self, request: Message, public: Endpoint, destination: Endpoint) -> tuple[Endpoint, bytes]:
        change = change_request(request) if self.honours_change else 0
        host = destination.host
        if change & CHANGE_IP:
            host = ALTERNATE.host if host == PRIMARY.host else PRIMARY.host
        port = destination.port
        if change & CHANGE_PORT:
            port = ALTERNATE.port if port == PRIMARY.port else PRIMARY.port
        attributes: dict[str, Attribute] = {"XOR-MAPPED-ADDRESS": public}
        if self.alternate:
            attributes["OTHER-ADDRESS"] = ALTERNATE
        answer = Message(BINDING, Class.RESPONSE, request.transaction_id, attributes)
        return Endpoint(host, port), bytes(answer)

    def deliver(self, sock: int, data: bytes, destination: Endpoint) -> list[tuple[int, bytes, Endpoint]]:
        public = self.outbound(sock, destination)
        if destination.host in (PUBLIC_IP, INNER[0].host):
            target = self.owner.get(destination) if self.hairpin or self.mapping is None else None
            return [] if target is None else [(target, data, public)]
        if destination.host != PRIMARY.host and not (self.alternate and self.alternate_answers):
            return []
        source, answer = self.server(decode(data), public, destination)
        target = self.inbound(source, public)
        return [] if target is None else [(target, answer, source)]


def discover(network: SimulatedNetwork, mapping_only: bool = False) -> tuple[NatReport, float]:
    """Run Discovery to its end against the network (20 ms round trip); returns the report and the time."""
    now = 0.0
    discovery = Discovery(PRIMARY, now, mapping_only=mapping_only)
    in_flight: list[tuple[float, int, bytes, Endpoint]] = []
    while True:
        for out in discovery.datagrams_to_send():
            arrivals = network.deliver(out.sock, out.data, out.to)
            in_flight += [(now + 0.02, *arrival) for arrival in arrivals]
        timer = discovery.get_timer()
        if timer is None:
            break
        in_flight.sort(key=lambda item: item[0])
        if in_flight and in_flight[0][0] <= timer:
            now, sock, data, source = in_flight.pop(0)
            discovery.datagram_received(data, source, now, sock)
        else:
            now = timer
            discovery.handle_timer(now)
    return discovery.report(INNER[0]), now


@pytest.mark.parametrize(
    ("mapping", "filtering", "hairpin"), list(itertools.product(BEHAVIOURS, BEHAVIOURS, [False, True]))
)
def test_every_nat_behaviour_is_classified(mapping: Behaviour, filtering: Behaviour, hairpin: bool) -> None:
    report, elapsed = discover(SimulatedNetwork(mapping, filtering, hairpin))
    assert (report.mapping, report.filtering, report.hairpin) == (mapping, filtering, hairpin)
    assert report.nat and report.outer == Endpoint(PUBLIC_IP, INNER[0].port)
    assert report.punchable is (mapping == "independent")
    assert elapsed < 0.05 + PROBE_SCHEDULE.timeout + 0.05  # the probes of the last stage run at once


@pytest.mark.parametrize("mapping", BEHAVIOURS)
def test_mapping_only_takes_two_round_trips(mapping: Behaviour) -> None:
    report, elapsed = discover(SimulatedNetwork(mapping, "address-and-port-dependent"), mapping_only=True)
    assert (report.mapping, report.filtering, report.hairpin) == (mapping, None, None)
    assert elapsed == pytest.approx(0.04)


def test_no_nat() -> None:
    report, _ = discover(SimulatedNetwork(None))
    assert report == NatReport(
        INNER[0], INNER[0], nat=False, mapping="independent", filtering="independent", hairpin=True
    )
    assert report.punchable


def test_server_without_alternate_address_still_gives_the_outer_endpoint() -> None:
    report, _ = discover(SimulatedNetwork("independent", alternate=False, hairpin=True))
    assert report.outer == Endpoint(PUBLIC_IP, INNER[0].port)
    assert (report.mapping, report.filtering, report.hairpin) == (None, None, True)
    assert report.punchable is None


def test_silent_alternate_address_leaves_behaviour_untested() -> None:
    report, elapsed = discover(SimulatedNetwork("independent", alternate_answers=False))
    assert (report.mapping, report.filtering) == (None, None)
    assert elapsed < 2 * PROBE_SCHEDULE.timeout + 0.1


def test_server_ignoring_change_request_leaves_filtering_untested() -> None:
    report, _ = discover(SimulatedNetwork("independent", "address-and-port-dependent", honours_change=False))
    assert (report.mapping, report.filtering) == ("independent", None)


def test_filtering_tests_never_run_on_the_punching_socket() -> None:
    network = SimulatedNetwork("independent", "independent")
    sent: list[tuple[int, Endpoint, int]] = []
    original = network.deliver

    def spy(sock: int, data: bytes, destination: Endpoint) -> list[tuple[int, bytes, Endpoint]]:
        sent.append((sock, destination, change_request(decode(data))))
        return original(sock, data, destination)

    network.deliver = spy  # type: ignore[method-assign]
    discover(network)
    assert all(change == 0 for sock, _, change in sent if sock == 0)
    assert {change for sock, _, change in sent if sock == 1} == {0, CHANGE_PORT, CHANGE_IP | CHANGE_PORT}
    assert [d for s, d, _ in sent if s == 0][:2] == [PRIMARY, ALTERNATE]


def test_silent_primary_fails_at_the_bound() -> None:
    discovery = Discovery(PRIMARY, 0.0)
    now = 0.0
    while (timer := discovery.get_timer()) is not None:
        discovery.datagrams_to_send()
        now = timer
        discovery.handle_timer(now)
    assert discovery.outer is None and discovery.primary.outcome is Outcome.TIMED_OUT and now == 9.5


def test_report_json_and_text() -> None:
    report = NatReport(
        Endpoint("10.0.1.2", 5000),
        Endpoint("198.51.100.2", 5000),
        True,
        "independent",
        "address-and-port-dependent",
        False,
    )
    assert json.dumps(report.to_json()) == (
        '{"inner": "10.0.1.2:5000", "outer": "198.51.100.2:5000", "nat": true, "mapping": "independent", '
        '"filtering": "address-and-port-dependent", "hairpin": false}'
    )
    text = report.render()
    assert "198.51.100.2:5000 (port preserved)" in text and "endpoint-independent" in text
    untested = NatReport(Endpoint("10.0.1.2", 5000), Endpoint("198.51.100.2", 1), True, None, None, None)
    assert untested.to_json()["mapping"] is None
    assert "untested" in untested.render() and "unknown" in untested.render()


# asyncio driver against a fake server on loopback --------------------------------------------------------


class FakeStunServer:
    """An RFC 5780 server on 127.0.0.1 and 127.0.0.2, each at a primary and an alternate port."""

    def __init__(
        self,
        *,
        alternate: bool = True,
        silent: bool = False,
        noise: bool = False,
        error: tuple[int, str] | None = None,
    ) -> None:
        self.alternate, self.silent, self.noise, self.error = alternate, silent, noise, error
        self.socks: dict[Endpoint, socket.socket] = {}
        self.requests = 0

    @property
    def primary(self) -> Endpoint:
        return next(iter(self.socks))

    @property
    def other(self) -> Endpoint:
        return list(self.socks)[3]

    def bind(self) -> None:
        while not self.socks:
            ports = []
            for _ in range(2):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.bind(("127.0.0.1", 0))
                    ports.append(probe.getsockname()[1])
            try:
                for host, port in itertools.product(["127.0.0.1", "127.0.0.2"], ports):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    self.socks[Endpoint(host, port)] = sock
                    sock.bind((host, port))
                    sock.setblocking(False)
            except OSError:
                self.close()

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()

    def answer(self, local: Endpoint) -> None:
        data, address = self.socks[local].recvfrom(2048)
        client = Endpoint(*address)
        request = decode(data)
        self.requests += 1
        if self.silent or request.message_class != Class.REQUEST:
            return
        hosts, ports = sorted({e.host for e in self.socks}), sorted({e.port for e in self.socks})
        change = change_request(request)
        host = hosts[1 - hosts.index(local.host)] if change & CHANGE_IP else local.host
        port = ports[1 - ports.index(local.port)] if change & CHANGE_PORT else local.port
        attributes: dict[str, Attribute] = {"XOR-MAPPED-ADDRESS": client}
        if self.alternate:
            attributes["OTHER-ADDRESS"] = self.other
        klass = Class.RESPONSE
        if self.error:
            klass, attributes = Class.ERROR, {"ERROR-CODE": self.error}
        sender = self.socks[Endpoint(host, port)]
        if self.noise:
            sender.sendto(b"\x00\x01not stun at all", address)
            stranger = Message(
                BINDING, Class.RESPONSE, None, {"XOR-MAPPED-ADDRESS": Endpoint("192.0.2.66", 6666)}
            )
            sender.sendto(bytes(stranger), address)
        sender.sendto(bytes(Message(BINDING, klass, request.transaction_id, attributes)), address)


@asynccontextmanager
async def fake_server(**options: Any) -> AsyncIterator[FakeStunServer]:
    server = FakeStunServer(**options)
    server.bind()
    loop = asyncio.get_running_loop()
    for local, sock in server.socks.items():
        loop.add_reader(sock.fileno(), server.answer, local)
    try:
        yield server
    finally:
        for sock in server.socks.values():
            loop.remove_reader(sock.fileno())
        server.close()


@contextmanager
def client_socket(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.setblocking(False)
        yield sock


async def test_query_outer_on_the_callers_socket_leaves_it_open_and_free() -> None:
    async with fake_server() as server:
        with client_socket() as sock:
            assert await query_outer(sock, server.primary) == Endpoint(*sock.getsockname())
            loop = asyncio.get_running_loop()
            assert not loop.remove_reader(sock.fileno())  # no reader left behind
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                peer.sendto(b"punch", sock.getsockname())
                data, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 100), 2)
            assert data == b"punch"


async def test_query_outer_skips_garbage_and_foreign_transactions() -> None:
    async with fake_server(noise=True) as server:
        with client_socket() as sock:
            assert await query_outer(sock, server.primary) == Endpoint(*sock.getsockname())


async def test_query_outer_resolves_a_hostname() -> None:
    async with fake_server() as server:
        with client_socket() as sock:
            outer = await query_outer(sock, Endpoint("localhost", server.primary.port))
            assert outer == Endpoint(*sock.getsockname())


async def test_silent_server_gives_stun_error_within_the_bound() -> None:
    schedule = Schedule(rto=0.05, max_rto=0.2, attempts=7, timeout=0.6)
    async with fake_server(silent=True) as server:
        with client_socket() as sock:
            start = time.monotonic()
            with pytest.raises(StunError) as raised:
                await query_outer(sock, server.primary, schedule=schedule)
            elapsed = time.monotonic() - start
            assert str(raised.value) == f"no answer from STUN server {server.primary} after 0.6 s"
            assert 0.55 < elapsed < 1.5
            assert server.requests == len(schedule.send_offsets())
            with pytest.raises(StunError, match=r"after 0\.6 s"):
                await explore(sock, server.primary, schedule=schedule)
            assert sock.fileno() != -1


async def test_error_response_is_a_stun_error() -> None:
    async with fake_server(error=(400, "Bad Request")) as server:
        expected = r"STUN server 127\.0\.0\.1:\d+ gave error 400 Bad Request"
        with client_socket() as sock, pytest.raises(StunError, match=expected):
            await query_outer(sock, server.primary)


async def test_unresolvable_server_is_a_stun_error() -> None:
    with client_socket() as sock, pytest.raises(StunError, match="cannot resolve STUN server"):
        await query_outer(sock, Endpoint("no-such-host.invalid", 3478))


async def test_explore_on_loopback_sees_no_nat() -> None:
    async with fake_server(noise=True) as server:
        with client_socket() as sock:
            report = await explore(sock, server.primary)
            own = Endpoint(*sock.getsockname())
            assert report == NatReport(
                own, own, nat=False, mapping="independent", filtering="independent", hairpin=True
            )
            assert sock.fileno() != -1


async def test_explore_on_a_wildcard_socket_finds_the_inner_address() -> None:
    async with fake_server() as server:
        with client_socket("0.0.0.0") as sock:
            report = await explore(sock, server.primary)
            assert report.inner == Endpoint("127.0.0.1", sock.getsockname()[1])
            assert not report.nat


async def test_probe_mapping_uses_only_the_callers_socket() -> None:
    async with fake_server() as server:
        with client_socket() as sock:
            report = await probe_mapping(sock, server.primary)
            assert (report.nat, report.mapping, report.filtering, report.hairpin) == (
                False,
                "independent",
                None,
                None,
            )
            assert server.requests == 3


async def test_explore_without_alternate_address() -> None:
    async with fake_server(alternate=False) as server:
        with client_socket() as sock:
            report = await explore(sock, server.primary)
            assert (report.nat, report.mapping, report.filtering) == (False, None, None)


async def test_blocking_socket_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match="non-blocking"):
            await query_outer(sock, Endpoint("127.0.0.1", 3478))


# Binding over TCP ------------------------------------------------------------------------------------------


def test_a_tcp_answer_is_the_response_to_the_request_or_nothing() -> None:
    request = binding_request()
    answer = response(request, **{"XOR-MAPPED-ADDRESS": ("198.51.100.2", 40000)})
    assert tcp_answer(request, bytes(answer)) == Endpoint("198.51.100.2", 40000)
    assert tcp_answer(binding_request(), bytes(answer)) is None  # another transaction's
    assert tcp_answer(request, bytes(request)) is None  # not a response


@FUZZ
@given(st.one_of(st.binary(max_size=120), stun_like()))
def test_any_tcp_answer_is_an_endpoint_or_none(data: bytes) -> None:
    request = binding_request()
    answer = tcp_answer(request, data[:8] + request.transaction_id + data[20:] if len(data) >= 20 else data)
    assert answer is None or isinstance(answer, Endpoint)


async def test_a_server_that_takes_no_tcp_is_none_within_the_bound() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = Endpoint(*probe.getsockname())
    assert await query_over_tcp(closed, timeout=1) is None
