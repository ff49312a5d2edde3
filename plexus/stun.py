"""STUN client: the outer endpoint of a socket (RFC 5389), the behaviour of the NAT in front of it (RFC 5780).

The protocol logic is sans-I/O: the message codec (`Message`, `decode`; plexus's own, see "Codec" below),
`Transaction` (one binding request with its retransmission schedule), `Exchange` (transactions on numbered
sockets) and `Discovery` (the RFC 5780 test sequence) are machines in plexus/driver.py's vocabulary, fed
datagrams and the time. `query_outer()`, `probe_mapping()` and `explore()` run them on the caller's socket
with plexus/driver.py and leave it open and free of readers, so the puncher goes on with the very same socket
and the very same NAT mapping.
"""

from __future__ import annotations

import asyncio
import binascii
import enum
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from plexus import driver
from plexus.driver import Datagram
from plexus.endpoint import Endpoint
from plexus.errors import StunError, StunSilentError

log = logging.getLogger(__name__)

Behaviour = Literal["independent", "address-dependent", "address-and-port-dependent"]

# CHANGE-REQUEST flags (RFC 5780 section 7.2).
CHANGE_IP = 0x04
CHANGE_PORT = 0x02


class StunParseError(ValueError):
    """A datagram that is not a well-formed STUN message."""


@dataclass(frozen=True)
class Schedule:
    """When a request is (re)sent and when its transaction gives up, relative to its start.

    RFC 5389 section 7.2.1: RTO doubles after each send, at most `attempts` (Rc) sends. The RTO is capped
    (as RFC 5389 allows) so that the last sends are not all crowded at the start, and `timeout` bounds the
    whole transaction.
    """

    rto: float = 0.2
    max_rto: float = 1.6
    attempts: int = 7
    timeout: float = 9.5

    def send_offsets(self) -> list[float]:
        offsets: list[float] = []
        offset, rto = 0.0, self.rto
        while len(offsets) < self.attempts and offset < self.timeout:
            offsets.append(offset)
            offset += rto
            rto = min(2 * rto, self.max_rto)
        return offsets


# First request to a server: sends at 0, 0.2, 0.6, 1.4, 3.0, 4.6, 6.2 s, gives up at 9.5 s.
DEFAULT_SCHEDULE = Schedule()

# Follow-up tests (alternate address, filtering, hairpin) talk to a server that has just answered, so a
# missing answer means a filter, not a slow path: sends at 0, 0.1, 0.3, 0.7 s, verdict at 1.2 s. On a slow
# path the figures grow with the round-trip time measured by the first request (see probe_schedule).
PROBE_SCHEDULE = Schedule(rto=0.1, max_rto=0.4, attempts=4, timeout=1.2)
# A binding request over TCP, the connection included: asked only once UDP got no answer, to say why.
TCP_TIMEOUT = 3.0


def probe_schedule(rtt: float, base: Schedule = PROBE_SCHEDULE) -> Schedule:
    """The follow-up tests' schedule, stretched so that a long round trip still gets its answers in time."""
    rto = max(base.rto, 1.5 * rtt)
    return Schedule(
        rto=rto,
        max_rto=max(base.max_rto, 4 * rto),
        attempts=base.attempts,
        timeout=max(base.timeout, 5 * rtt),
    )


# Codec -----------------------------------------------------------------------------------------------------
#
# RFC 8489 (formerly 5389), sans I/O: a message is a 20-byte header (type, body length, the magic cookie, a
# 96-bit transaction id) and attributes, each a type, a length, the value and zero padding to 4 bytes. plexus
# reads the address attributes of a binding response (IPv4 and IPv6: MAPPED-ADDRESS, XOR-MAPPED-ADDRESS,
# RFC 5780's OTHER-ADDRESS and RESPONSE-ORIGIN, RFC 3489's CHANGED-ADDRESS), ERROR-CODE and CHANGE-REQUEST; it
# skips any other attribute, checks FINGERPRINT when there is one, and ignores what follows MESSAGE-INTEGRITY,
# which it has no key to check. Values are Endpoints, an int (CHANGE-REQUEST) and (code, reason) (ERROR-CODE).
# plexus/relay.py's TURN keeps aioice's own codec: importing aioice costs a session 30 ms (its package loads
# its ICE agent and dnspython), for a codec this small.

MAGIC_COOKIE = 0x2112A442
HEADER_LENGTH = 20
BINDING = 0x001  # the method plexus speaks; a message's method is its type without the class bits
_METHOD_BITS = 0x3EEF
_CLASS_BITS = 0x0110
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_FINGERPRINT_XOR = 0x5354554E


class Class(enum.IntEnum):
    """A message's class: its type's bits 0x0110."""

    REQUEST = 0x000
    INDICATION = 0x010
    RESPONSE = 0x100
    ERROR = 0x110


Attribute = Endpoint | int | tuple[int, str]

MAPPED_ADDRESS = 0x0001
CHANGE_REQUEST = 0x0003
CHANGED_ADDRESS = 0x0005
ERROR_CODE = 0x0009
XOR_MAPPED_ADDRESS = 0x0020
RESPONSE_ORIGIN = 0x802B
OTHER_ADDRESS = 0x802C
MESSAGE_INTEGRITY = 0x0008
MESSAGE_INTEGRITY_SHA256 = 0x001C
FINGERPRINT = 0x8028
# The attributes read and written, by the names aioice and the RFCs give them.
NAMES = {
    MAPPED_ADDRESS: "MAPPED-ADDRESS",
    CHANGE_REQUEST: "CHANGE-REQUEST",
    CHANGED_ADDRESS: "CHANGED-ADDRESS",
    ERROR_CODE: "ERROR-CODE",
    XOR_MAPPED_ADDRESS: "XOR-MAPPED-ADDRESS",
    RESPONSE_ORIGIN: "RESPONSE-ORIGIN",
    OTHER_ADDRESS: "OTHER-ADDRESS",
}
_TYPES = {name: kind for kind, name in NAMES.items()}
_FAMILIES = {1: 4, 2: 16}  # an address family's address length


class Message:
    """A STUN message: `bytes(message)` is its encoding, `decode` reads one. `attributes` maps the names of
    NAMES to their values; a new message gets a random transaction id."""

    __slots__ = ("attributes", "message_class", "message_method", "transaction_id")

    def __init__(
        self,
        message_method: int,
        message_class: Class,
        transaction_id: bytes | None = None,
        attributes: dict[str, Attribute] | None = None,
    ) -> None:
        self.message_method = message_method
        self.message_class = message_class
        self.transaction_id = os.urandom(12) if transaction_id is None else transaction_id
        self.attributes: dict[str, Attribute] = {} if attributes is None else attributes

    def __bytes__(self) -> bytes:
        if self.message_method & ~_METHOD_BITS or len(self.transaction_id) != 12:
            raise ValueError("a STUN message needs a method without class bits and a 12-byte transaction id")
        body = b"".join(
            _attribute(_TYPES[name], _encode(_TYPES[name], value, self.transaction_id))
            for name, value in self.attributes.items()
        )
        kind = self.message_method | self.message_class
        return struct.pack("!HH", kind, len(body)) + _COOKIE + self.transaction_id + body

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        mine = (self.message_method, self.message_class, self.transaction_id, self.attributes)
        return mine == (other.message_method, other.message_class, other.transaction_id, other.attributes)

    __hash__ = None  # type: ignore[assignment]  # mutable, as its attributes are

    def __repr__(self) -> str:
        return (
            f"Message(0x{self.message_method:03x}, Class.{self.message_class.name}, "
            f"{self.transaction_id.hex()}, {self.attributes!r})"
        )


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + bytes(-len(value) % 4)


def _xor(data: bytes, transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS's port, or its address: each XORed with the cookie and the transaction id, from the
    start."""
    mask = int.from_bytes((_COOKIE + transaction_id)[: len(data)], "big")
    return (int.from_bytes(data, "big") ^ mask).to_bytes(len(data), "big")


def _encode(kind: int, value: Attribute, transaction_id: bytes) -> bytes:
    if kind == CHANGE_REQUEST:
        if not isinstance(value, int) or not 0 <= value < 2**32:
            raise ValueError(f"CHANGE-REQUEST is a 32-bit number, not {value!r}")
        return struct.pack("!I", value)
    if kind == ERROR_CODE:
        if not isinstance(value, tuple) or isinstance(value, Endpoint) or not 300 <= value[0] <= 699:
            raise ValueError(f"ERROR-CODE is (300-699, reason), not {value!r}")
        code, reason = value
        return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()
    if not isinstance(value, tuple) or isinstance(value[0], int) or not 0 <= value[1] <= 0xFFFF:
        raise ValueError(f"{NAMES[kind]} is an endpoint, not {value!r}")
    host, port = value
    packed, address = struct.pack("!H", port), ipaddress.ip_address(host).packed
    family = 1 if len(address) == 4 else 2
    if kind == XOR_MAPPED_ADDRESS:
        packed, address = _xor(packed, transaction_id), _xor(address, transaction_id)
    return struct.pack("!BB", 0, family) + packed + address


def _decode(kind: int, value: bytes, transaction_id: bytes) -> Attribute:
    if kind == CHANGE_REQUEST:
        if len(value) != 4:
            raise StunParseError(f"CHANGE-REQUEST of {len(value)} bytes")
        return int.from_bytes(value, "big")
    if kind == ERROR_CODE:
        if len(value) < 4:
            raise StunParseError(f"ERROR-CODE of {len(value)} bytes")
        return (value[2] & 0x07) * 100 + value[3], value[4:].decode("utf-8", "replace")
    if len(value) < 4 or _FAMILIES.get(value[1]) != len(value) - 4:
        raise StunParseError(f"{NAMES[kind]} of {len(value)} bytes, family {value[1:2].hex() or 'none'}")
    port, address = value[2:4], value[4:]
    if kind == XOR_MAPPED_ADDRESS:
        port, address = _xor(port, transaction_id), _xor(address, transaction_id)
    host = ipaddress.IPv4Address(address) if len(address) == 4 else ipaddress.IPv6Address(address)
    return Endpoint(str(host), int.from_bytes(port, "big"))


def decode(data: bytes) -> Message:
    """Parse a datagram as a STUN message; raises StunParseError and nothing else.

    Of repeated attributes the first counts (RFC 8489 section 14); an attribute whose padding the datagram's
    end cuts off is read all the same."""
    if len(data) < HEADER_LENGTH or data[0] & 0xC0 or data[4:8] != _COOKIE:
        raise StunParseError("not a STUN message")
    kind, length = struct.unpack_from("!HH", data)
    if length != len(data) - HEADER_LENGTH:
        raise StunParseError(f"STUN length {length} for a body of {len(data) - HEADER_LENGTH} bytes")
    transaction_id = data[8:HEADER_LENGTH]
    attributes: dict[str, Attribute] = {}
    position, protected = HEADER_LENGTH, False
    while position < len(data):
        if len(data) - position < 4:
            raise StunParseError("a truncated STUN attribute")
        attribute, size = struct.unpack_from("!HH", data, position)
        end = position + 4 + size
        if end > len(data):
            raise StunParseError(f"STUN attribute 0x{attribute:04x} of {size} bytes overruns the message")
        value = data[position + 4 : end]
        if attribute == FINGERPRINT:  # the last attribute: a wrong one says this is no STUN message
            _check_fingerprint(data[:position], value)
            break
        if attribute in (MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256):
            protected = True  # what follows is covered by neither (RFC 8489 section 14.5): ignored
        elif not protected and (name := NAMES.get(attribute)) is not None and name not in attributes:
            attributes[name] = _decode(attribute, value, transaction_id)
        position = end + (-size % 4)
    return Message(kind & _METHOD_BITS, Class(kind & _CLASS_BITS), transaction_id, attributes)


def _check_fingerprint(before: bytes, value: bytes) -> None:
    # The CRC covers the message up to FINGERPRINT, with a length that ends after it.
    header = before[:2] + struct.pack("!H", len(before) - HEADER_LENGTH + 8) + before[4:]
    if len(value) != 4 or int.from_bytes(value, "big") != binascii.crc32(header) ^ _FINGERPRINT_XOR:
        raise StunParseError("not a STUN message: wrong FINGERPRINT")


def binding_request(change: int = 0, transaction_id: bytes | None = None) -> Message:
    attributes: dict[str, Attribute] = {"CHANGE-REQUEST": change} if change else {}
    return Message(BINDING, Class.REQUEST, transaction_id, attributes)


def _address(message: Message, *names: str) -> Endpoint | None:
    for name in names:
        value = message.attributes.get(name)
        if isinstance(value, Endpoint):
            return value
    return None


def mapped_address(message: Message) -> Endpoint | None:
    """XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from servers that predate it."""
    return _address(message, "XOR-MAPPED-ADDRESS", "MAPPED-ADDRESS")


def other_address(message: Message) -> Endpoint | None:
    """The server's alternate address: OTHER-ADDRESS, or CHANGED-ADDRESS from RFC 3489 servers."""
    return _address(message, "OTHER-ADDRESS", "CHANGED-ADDRESS")


def error_code(message: Message) -> tuple[int, str] | None:
    """ERROR-CODE: the code and the reason phrase."""
    value = message.attributes.get("ERROR-CODE")
    return value if isinstance(value, tuple) and not isinstance(value, Endpoint) else None


# Transactions --------------------------------------------------------------------------------------------


class Outcome(enum.StrEnum):
    PENDING = "pending"
    ANSWERED = "answered"
    REFUSED = "refused"  # an error response
    TIMED_OUT = "timed out"
    CANCELLED = "cancelled"


class Transaction:
    """One request to `destination`, retransmitted on a schedule until its answer arrives or time runs out.

    A request is answered by a response or error response with its transaction id. An indication has no
    response: it counts as answered when the indication itself comes back, which is how the hairpin test
    sees its datagram return through the NAT.
    """

    def __init__(
        self, destination: Endpoint, message: Message, now: float, schedule: Schedule = DEFAULT_SCHEDULE
    ) -> None:
        self.destination = destination
        self.message = message
        self.schedule = schedule
        self.started = now
        self.deadline = now + schedule.timeout
        self.outcome = Outcome.PENDING
        self.response: Message | None = None
        self.source: Endpoint | None = None
        self.answered_at: float | None = None
        self.sent = 0
        self._send_times = [now + offset for offset in schedule.send_offsets()]
        self._data = bytes(message)
        if message.message_class == Class.INDICATION:
            self._answers: tuple[Class, ...] = (Class.INDICATION,)
        else:
            self._answers = (Class.RESPONSE, Class.ERROR)

    @property
    def transaction_id(self) -> bytes:
        return self.message.transaction_id

    @property
    def pending(self) -> bool:
        return self.outcome is Outcome.PENDING

    @property
    def rtt(self) -> float | None:
        """Round-trip time, known only when the first send was answered (Karn: retransmits are ambiguous)."""
        if self.answered_at is None or self.sent != 1:
            return None
        return self.answered_at - self.started

    @property
    def mapped(self) -> Endpoint | None:
        if self.outcome is not Outcome.ANSWERED or self.response is None:
            return None
        return mapped_address(self.response)

    def next_time(self) -> float | None:
        """When poll() next has something to do; None once the transaction is over."""
        if not self.pending:
            return None
        return self._send_times[0] if self._send_times else self.deadline

    def poll(self, now: float) -> bytes | None:
        """The datagram due at `now`, if any; gives up at the deadline."""
        if not self.pending:
            return None
        if now >= self.deadline:
            self.outcome = Outcome.TIMED_OUT
            return None
        due = [t for t in self._send_times if t <= now]
        if not due:
            return None
        # Sends that fell due together (a late wake-up) go out once: a burst would not help.
        del self._send_times[: len(due)]
        self.sent += 1
        return self._data

    def receive(self, message: Message, source: Endpoint, now: float) -> bool:
        """Take `message` if it answers this transaction; returns whether it did."""
        if (
            not self.pending
            or message.transaction_id != self.transaction_id
            or message.message_method != self.message.message_method
            or message.message_class not in self._answers
        ):
            return False
        self.response, self.source, self.answered_at = message, source, now
        self.outcome = Outcome.REFUSED if message.message_class == Class.ERROR else Outcome.ANSWERED
        return True

    def cancel(self) -> None:
        if self.pending:
            self.outcome = Outcome.CANCELLED

    def describe_failure(self) -> str:
        """Why the transaction gave no usable answer, for the user."""
        if self.outcome is Outcome.REFUSED and self.response is not None:
            code, reason = error_code(self.response) or ("?", "")
            return f"error {code} {reason}".rstrip()
        if self.outcome is Outcome.ANSWERED and self.mapped is None:
            return "an answer without a mapped address"
        return str(self.outcome)


class Exchange:
    """Transactions running at once on a few sockets, numbered as the driver numbers them: a machine of
    plexus/driver.py, finished when every transaction is."""

    def __init__(self) -> None:
        self._transactions: list[tuple[int, Transaction]] = []
        self._outbox: list[Datagram] = []

    def start(self, sock: int, transaction: Transaction) -> Transaction:
        """Run `transaction` from socket `sock`; its first send is due at once."""
        self._transactions.append((sock, transaction))
        self._poll(sock, transaction, transaction.started)
        return transaction

    def _poll(self, sock: int, transaction: Transaction, now: float) -> None:
        data = transaction.poll(now)
        if data is not None:
            self._outbox.append(Datagram(data, transaction.destination, sock=sock))

    def handle_timer(self, now: float) -> None:
        for sock, transaction in self._transactions:
            self._poll(sock, transaction, now)

    def datagrams_to_send(self) -> list[Datagram]:
        outbox, self._outbox = self._outbox, []
        return outbox

    def datagram_received(self, data: bytes, addr: Endpoint, now: float, sock: int = 0) -> None:
        """Hand a datagram to the transaction it answers; anything else (not STUN, foreign ids) is dropped."""
        try:
            message = decode(data)
        except StunParseError:
            return
        for owner, transaction in self._transactions:
            if owner == sock and transaction.receive(message, addr, now):
                return

    def get_timer(self) -> float | None:
        times = [t for _, tx in self._transactions if (t := tx.next_time()) is not None]
        return min(times, default=None)


# A question from a running session's socket to a STUN server that answered at its start: sends at 0, 0.1,
# 0.3 s, an answer by 0.8 s (a slower one gets asked again at the next suspicion).
QUESTION_SCHEDULE = Schedule(rto=0.1, max_rto=0.4, attempts=3, timeout=0.8)


class Question:
    """One binding request at a time from a socket that carries other traffic too (the streams' QUIC, a
    command's datagrams): its owner sends what `ask` gives it and hands every datagram from the server being
    asked to `answer`. `independent` asks twice (RFC 5780's test I and a second to the OTHER-ADDRESS)."""

    def __init__(self, schedule: Schedule = QUESTION_SCHEDULE) -> None:
        self._schedule = schedule
        self._asking: Transaction | None = None
        self._answered = asyncio.Event()

    def answer(self, data: bytes, source: tuple[str, int], now: float) -> bool:
        """Whether the datagram (from `source`, as a socket gives it) is from the server being asked: taken,
        whatever it holds. Cheap when nothing is asked: its owner hands it every datagram of the path."""
        asking = self._asking
        if asking is None or source[:2] != (asking.destination.host, asking.destination.port):
            return False
        try:
            message = decode(data)
        except StunParseError:
            return True
        if asking.receive(message, asking.destination, now):
            self._answered.set()
        return True

    async def ask(self, server: Endpoint, send: Callable[[bytes, Endpoint], None]) -> Transaction:
        """The transaction, answered or timed out by the schedule."""
        assert self._asking is None, "one STUN question at a time"
        loop = asyncio.get_running_loop()
        asking = self._asking = Transaction(server, binding_request(), loop.time(), self._schedule)
        self._answered.clear()
        try:
            while (when := asking.next_time()) is not None:
                data = asking.poll(loop.time())
                if data is not None:
                    send(data, server)
                if not asking.pending:
                    break
                wait = max((asking.next_time() or when) - loop.time(), 0.0)
                await driver.wait_event(self._answered, wait)
        finally:
            self._asking = None
        return asking

    async def independent(self, server: Endpoint, send: Callable[[bytes, Endpoint], None]) -> Endpoint | None:
        """The outer endpoint where the NAT maps it endpoint-independently now: `server` and its other
        address (OTHER-ADDRESS) see the same; else None (no answer, no other address, or two different
        endpoints: a NAT that maps per destination)."""
        first = await self.ask(server, send)
        other = other_address(first.response) if first.response is not None else None
        if first.mapped is None or other is None:
            return None
        second = await self.ask(other, send)
        return first.mapped if second.mapped == first.mapped else None


# NAT behaviour discovery ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NatReport:
    """What the STUN tests found out about the NAT in front of the punching socket."""

    inner: Endpoint
    outer: Endpoint
    nat: bool
    mapping: Behaviour | None
    filtering: Behaviour | None
    hairpin: bool | None

    @property
    def port_preserved(self) -> bool:
        return self.outer.port == self.inner.port

    @property
    def punchable(self) -> bool | None:
        """Whether the outer endpoint holds for the peer: None when the server could not test the mapping."""
        if not self.nat:
            return True
        return None if self.mapping is None else self.mapping == "independent"

    def to_json(self) -> dict[str, str | bool | None]:
        """The report as a JSON object (json.dumps it): the form `plexus --explore --json` prints."""
        return {
            "inner": str(self.inner),
            "outer": str(self.outer),
            "nat": self.nat,
            "mapping": self.mapping,
            "filtering": self.filtering,
            "hairpin": self.hairpin,
        }

    def render(self) -> str:
        """The report for people, one finding a line."""

        def behaviour(value: Behaviour | None) -> str:
            return (
                "untested (the STUN server offers no working alternate address)"
                if value is None
                else f"endpoint-{value}"
                if value == "independent"
                else value
            )

        verdict = {
            True: "yes",
            False: "not directly: the mapping changes per destination (see below)",
            None: "unknown: the mapping could not be tested",
        }[self.punchable]
        preserved = "port preserved" if self.port_preserved else "port changed"
        hairpin = "untested" if self.hairpin is None else "yes" if self.hairpin else "no"
        lines = [
            f"inner endpoint  {self.inner}",
            f"outer endpoint  {self.outer}" + (f" ({preserved})" if self.nat else ""),
            f"NAT             {'yes' if self.nat else 'no'}",
            f"mapping         {behaviour(self.mapping)}",
            f"filtering       {behaviour(self.filtering)}",
            f"hairpin         {hairpin}",
            f"hole punching   {verdict}",
        ]
        return "\n".join(lines)


PUNCH, PROBE = 0, 1  # the caller's socket, and the second socket that alone takes unsolicited answers


class Discovery(Exchange):
    """RFC 5780 behaviour discovery as a state machine over two sockets.

    Order matters: the punching socket only ever hears from addresses it has sent to first (primary, then
    alternate address; a datagram from an address it never contacted, arriving first, can make a Linux NAT
    pick a new port for it). The filtering tests, whose answers come from addresses never contacted, use the
    PROBE socket; they run at once, together with the hairpin test, after the mapping tests.
    """

    def __init__(
        self,
        server: Endpoint,
        now: float,
        schedule: Schedule = DEFAULT_SCHEDULE,
        probe: Schedule = PROBE_SCHEDULE,
        *,
        mapping_only: bool = False,
        on_outer: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.server = server
        self.mapping_only = mapping_only
        self._on_outer = on_outer  # called once, when the first answer names the outer endpoint
        self._probe_base = probe
        self._probe = probe
        self.primary = self.start(PUNCH, Transaction(server, binding_request(), now, schedule))
        self.other: Endpoint | None = None
        self.mapping: Behaviour | None = None
        self.filtering: Behaviour | None = None
        self.hairpin: bool | None = None
        self._mapping_tests: tuple[Transaction, Transaction] | None = None
        self._filtering_tests: list[Transaction] = []
        self._hairpin_test: Transaction | None = None
        self.done = False

    @property
    def outer(self) -> Endpoint | None:
        return self.primary.mapped

    def handle_timer(self, now: float) -> None:
        # Polling expires transactions, which may start the next tests (their first sends go out at once).
        super().handle_timer(now)
        self._advance(now)

    def datagram_received(self, data: bytes, addr: Endpoint, now: float, sock: int = 0) -> None:
        super().datagram_received(data, addr, now, sock)
        self._advance(now)

    def get_timer(self) -> float | None:
        return None if self.done else super().get_timer()

    def _advance(self, now: float) -> None:
        if self.done or self.primary.pending:
            return
        if self.outer is None:
            self.done = True
            return
        if self._on_outer is not None:
            self._on_outer()
            self._on_outer = None
        if self._hairpin_test is None:
            if self._mapping_tests is None:
                self._start_mapping_tests(now)
            else:
                self._conclude_mapping(now)
        if self.done or self._hairpin_test is None:
            return
        self._conclude_filtering()
        if not self._hairpin_test.pending:
            self.hairpin = self._hairpin_test.outcome is Outcome.ANSWERED
        self.done = self.hairpin is not None and not any(t.pending for t in self._filtering_tests)

    def _start_mapping_tests(self, now: float) -> None:
        assert self.primary.response is not None
        rtt = self.primary.rtt if self.primary.rtt is not None else now - self.primary.started
        self._probe = probe_schedule(rtt, self._probe_base)
        other = other_address(self.primary.response)
        if other is None or other.host == self.server.host:
            # Without a second address the server can test neither mapping nor filtering.
            self._mapping_concluded(now, filtering=False)
            return
        self.other = other
        self._mapping_tests = (
            self.start(PUNCH, Transaction(other, binding_request(), now, self._probe)),
            self.start(
                PUNCH,
                Transaction(Endpoint(other.host, self.server.port), binding_request(), now, self._probe),
            ),
        )

    def _conclude_mapping(self, now: float) -> None:
        assert self._mapping_tests is not None
        to_alternate, to_alternate_ip = self._mapping_tests
        if to_alternate.pending:
            return
        if to_alternate.mapped == self.outer:
            to_alternate_ip.cancel()
            self.mapping = "independent"
        elif to_alternate_ip.pending:
            return
        elif to_alternate.mapped is not None and to_alternate_ip.mapped is not None:
            self.mapping = (
                "address-dependent"
                if to_alternate_ip.mapped == to_alternate.mapped
                else "address-and-port-dependent"
            )
        # An alternate address that does not answer leaves mapping and filtering untested.
        self._mapping_concluded(now, filtering=to_alternate.mapped is not None)

    def _mapping_concluded(self, now: float, filtering: bool) -> None:
        """Start the filtering and hairpin tests, which run at once, unless only the mapping was asked for."""
        assert self.outer is not None
        if self.mapping_only:
            self.done = True
            return
        if filtering:
            self._filtering_tests = [
                self.start(PROBE, Transaction(self.server, binding_request(change), now, self._probe))
                for change in (0, CHANGE_PORT, CHANGE_IP | CHANGE_PORT)
            ]
        hairpin = Message(BINDING, Class.INDICATION)
        self._hairpin_test = self.start(PUNCH, Transaction(self.outer, hairpin, now, self._probe))

    def _conclude_filtering(self) -> None:
        if not self._filtering_tests or self.filtering is not None or self.other is None:
            return
        control, port_changed, both_changed = self._filtering_tests
        if both_changed.mapped is not None and both_changed.source == self.other:
            port_changed.cancel()
            control.cancel()
            self.filtering = "independent"
            return
        if any(t.pending for t in self._filtering_tests):
            return
        if both_changed.mapped is not None or (
            port_changed.mapped is not None
            and port_changed.source != Endpoint(self.server.host, self.other.port)
        ):
            return  # the server answered but ignored CHANGE-REQUEST: filtering untested
        if port_changed.mapped is not None:
            self.filtering = "address-dependent"
        elif control.mapped is not None:
            self.filtering = "address-and-port-dependent"

    def report(self, inner: Endpoint) -> NatReport:
        """The findings; only once the primary server has given the outer endpoint."""
        outer = self.outer
        assert outer is not None
        return NatReport(
            inner=inner,
            outer=outer,
            nat=outer != inner,
            mapping=self.mapping,
            filtering=self.filtering,
            hairpin=self.hairpin,
        )


# asyncio ---------------------------------------------------------------------------------------------------


async def _drive(machine: Exchange, socks: Sequence[socket.socket]) -> None:
    """Run `machine` on `socks`, which stay open; a send that cannot leave (no route) is a StunError."""
    await driver.drive(machine, driver.Sockets(socks, refuse=_unsendable))


def _unsendable(destination: Endpoint, exc: OSError) -> StunError:
    return StunError(f"cannot send to {destination}: {exc.strerror or exc}")


async def resolve(server: Endpoint, family: socket.AddressFamily = socket.AF_INET) -> Endpoint:
    """The server's endpoint in `family` (a hostname is looked up)."""
    try:
        return await driver.resolve(server, family)
    except OSError as exc:
        raise StunError(f"cannot resolve STUN server {server.host}: {exc.strerror or exc}") from exc


async def resolve6(server: Endpoint) -> Endpoint | None:
    """The server's IPv6 endpoint: an IPv6 address as it is, a name's AAAA record; None where there is none
    (an IPv4 address, a name without AAAA, a host without IPv6): this side then offers no IPv6 candidate."""
    try:
        return await driver.resolve(server, socket.AF_INET6)
    except (OSError, UnicodeError) as exc:
        log.debug("no IPv6 address for STUN server %s: %s", server.host, exc)
        return None


def _check_socket(sock: socket.socket) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_DGRAM:
        raise ValueError("the STUN client needs an IP UDP socket")
    if sock.getblocking():
        raise ValueError("the STUN client needs a non-blocking socket")
    if sock.getsockname()[1] == 0:
        raise ValueError("the STUN client needs a bound socket")


def inner_endpoint(sock: socket.socket, toward: Endpoint) -> Endpoint:
    """The socket's own endpoint; for a wildcard bind, the local address the system uses toward `toward`."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        # Connecting a UDP socket sends nothing: it only picks the route and so the source address.
        with socket.socket(sock.family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((toward.host, toward.port))
            except OSError as exc:
                raise StunError(f"no route to STUN server {toward}: {exc.strerror or exc}") from exc
            host = probe.getsockname()[0]
    return Endpoint(host, port)


async def query_outer(
    sock: socket.socket, server: Endpoint, *, schedule: Schedule = DEFAULT_SCHEDULE
) -> Endpoint:
    """The outer endpoint of `sock` as `server` sees it: one binding request on the caller's socket."""
    _check_socket(sock)
    address = await resolve(server, sock.family)
    exchange = Exchange()
    transaction = exchange.start(
        0, Transaction(address, binding_request(), asyncio.get_running_loop().time(), schedule)
    )
    await _drive(exchange, [sock])
    if transaction.mapped is None:
        raise StunError(_failure(server, address, transaction))
    return transaction.mapped


async def query_over_tcp(server: Endpoint, *, timeout: float = TCP_TIMEOUT) -> Endpoint | None:
    """One binding request to `server` over TCP (RFC 8489 section 6.2.2): the connection's outer endpoint, or
    None when nothing answers within `timeout`, the connection included. It tells a network that lets no UDP
    out (TCP answers) from a STUN server that is down (neither does)."""
    address = await resolve(server)
    request = binding_request()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            try:
                writer.write(bytes(request))
                header = await reader.readexactly(20)
                body = await reader.readexactly(struct.unpack("!H", header[2:4])[0])
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        log.debug("no STUN answer over TCP from %s: %s", server, exc or "timeout")
        return None
    return tcp_answer(request, header + body)


def tcp_answer(request: Message, data: bytes) -> Endpoint | None:
    """The mapped endpoint in `data` if it is a success response to `request`; None for anything else."""
    try:
        message = decode(data)
    except StunParseError:
        return None
    if message.message_class is not Class.RESPONSE or message.transaction_id != request.transaction_id:
        return None
    return mapped_address(message)


def _failure(server: Endpoint, address: Endpoint, transaction: Transaction) -> str:
    name = str(server) if server == address else f"{server} ({address.host})"
    if transaction.outcome is Outcome.TIMED_OUT:
        return f"no answer from STUN server {name} after {transaction.schedule.timeout:g} s"
    return f"STUN server {name} gave {transaction.describe_failure()}"


async def explore(
    sock: socket.socket,
    server: Endpoint,
    *,
    schedule: Schedule = DEFAULT_SCHEDULE,
    probe: Schedule = PROBE_SCHEDULE,
) -> NatReport:
    """RFC 5780 discovery for the punching socket `sock`, which stays open and keeps its mapping.

    The filtering tests run on a second socket bound to the same address, created and closed here.
    """
    return await _discover(sock, server, schedule, probe, mapping_only=False)


async def probe_mapping(
    sock: socket.socket,
    server: Endpoint,
    *,
    schedule: Schedule = DEFAULT_SCHEDULE,
    probe: Schedule = PROBE_SCHEDULE,
    answered: asyncio.Event | None = None,
) -> NatReport:
    """The outer endpoint and the mapping behaviour only (filtering and hairpin None): what a session needs.

    Its answers all come from addresses `sock` has sent to, so it takes about two round trips. `answered` is
    set at the first of them: UDP gets out.
    """
    return await _discover(sock, server, schedule, probe, mapping_only=True, answered=answered)


async def _discover(
    sock: socket.socket,
    server: Endpoint,
    schedule: Schedule,
    probe: Schedule,
    *,
    mapping_only: bool,
    answered: asyncio.Event | None = None,
) -> NatReport:
    _check_socket(sock)
    address = await resolve(server, sock.family)
    inner = inner_endpoint(sock, address)
    now = asyncio.get_running_loop().time()
    on_outer = answered.set if answered is not None else None
    discovery = Discovery(address, now, schedule, probe, mapping_only=mapping_only, on_outer=on_outer)
    if mapping_only:
        await _drive(discovery, [sock])
    else:
        with socket.socket(sock.family, socket.SOCK_DGRAM) as second:
            second.setblocking(False)
            second.bind((sock.getsockname()[0], 0))
            await _drive(discovery, [sock, second])
    if discovery.outer is None:
        silent = discovery.primary.outcome is Outcome.TIMED_OUT
        raise (StunSilentError if silent else StunError)(_failure(server, address, discovery.primary))
    return discovery.report(inner)
