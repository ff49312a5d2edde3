"""The hole punch and flag handshake that confirm the path between two hosts (docs/protocol.md, "Handshake").

The protocol is a pair of sans-I/O state machines, `Inviter` and `Acceptor`: datagrams and time go in;
datagrams to send, a timer and an outcome come out (plexus/driver.py's vocabulary). `punch` runs one of them
on a socket, `punch_fanout` one machine per socket (`fan_out`) for a host whose NAT maps per destination.
What a datagram looks like is the session's `Codec`: plexus 2.2's masked checksum (`Masked`) toward a 2.2
peer, an HMAC keyed from both puzzles (`Authenticated`) between two plexus peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import os
import random as _random
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from plexus import events, keys
from plexus.driver import Datagram, Driver, Sockets, drive
from plexus.endpoint import Endpoint
from plexus.errors import HandshakeTimeoutError

log = logging.getLogger(__name__)

PACKET_SIZE = 8  # the meaningful head of a plexus 2.2 handshake datagram
DATAGRAM_SIZE = 60  # what plexus 2.2 sends; the rest after the packet is random padding
# The authenticated datagram, DATAGRAM_SIZE bytes (docs/protocol.md, "Authenticated packet"): version, kind
# (flag and sender's role), nonce, random padding, then the HMAC-SHA256 of all that truncated to TAG_SIZE.
AUTH_VERSION = 0xA1
NONCE_SIZE = 16  # random: a repeat within one handshake is a replay, and 128 bits never repeat by chance
TAG_SIZE = 16
AUTH_BODY = DATAGRAM_SIZE - TAG_SIZE  # what the tag covers: every byte before it
KEY_SIZE = 32  # HMAC-SHA256's own size
KEY_INFO = b"plexus handshake 1"  # HKDF info: a new datagram format or key schedule gets a new label
HELLO_INTERVAL = 0.25  # the inviter's hello period; short because the first lost hello costs connect time
QUIET_PERIOD = 4.0  # acceptor: silence after its ready meaning the inviter got one (2.2 retries every 1.6 s)
PUNCH_REFRESH = 1.0  # acceptor: re-punch until the first hello, in case the punch was lost before its NAT
READY_COPIES = 2  # the inviter's last word goes out twice: no retransmission once the socket is closed
DEFAULT_HOPS = 7
DEFAULT_TIMEOUT = 60.0

# Between an endpoint-dependent ("symmetric") NAT, the hard side, and an endpoint-independent one, the easy
# side: the hard side opens FANOUT_SOCKETS mappings toward the easy endpoint, each on a port its NAT picks at
# random among the 64512 of PORTS; the easy side sends SPRAY_COUNT hellos to distinct random ports of the hard
# side's address. One probe on one mapping is enough, so with N mappings and K probes
#     P(hit) = 1 - (1 - N/64512)^K ~ 1 - exp(-N*K/64512):  N=256, K=1024: 98.3 %
# (N*K is what counts: 128 x 1024 or 256 x 512 87 %, 512 x 1024 99.97 %).
# 256 x 1024 is Tailscale's choice too. Each side stays below 200 packets/s: the hard side sends each
# mapping's hello once per FANOUT_INTERVAL (256 / 1.5 s = 171/s, staggered evenly), the easy side SPRAY_RATE
# probes/s on top of its 4 hellos/s, so the spray lasts 1024 / 190 = 5.4 s; with a port-restricted easy NAT
# the hard side's next hello (<= 1.5 s later) completes it: a success takes at most ~7 s after both sides
# have started (10 s with slack). Sprayed probes also open the easy NAT's filter toward those ports (Linux
# keeps an unanswered UDP flow for 30 s), so a hard side starting up to ~30 s after the spray still gets in.
PORTS = range(1024, 65536)  # where NATs put mappings (Linux: 1024-65535 for a source port >= 1024)
FANOUT_SOCKETS = 256
FANOUT_INTERVAL = 1.5
SPRAY_COUNT = 1024
SPRAY_RATE = 190.0

Random = Callable[[int], bytes]


class Flag(IntEnum):
    """Bit 0 of byte 0 of the unmasked packet."""

    HELLO = 0
    READY = 1


def _mask(secret: int) -> bytes:
    if not 0 <= secret < 1 << 64:
        raise ValueError(f"secret {secret} is not an unsigned 64-bit number")
    return secret.to_bytes(8, "little")


def _xor(data: bytes, mask: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, mask, strict=True))


def _checksum(data: bytes) -> int:
    total = 0
    for byte in data:
        total ^= byte
    return total


def encode(flag: Flag, secret: int, nonce: bytes, padding: bytes = b"") -> bytes:
    """The datagram carrying `flag`: the 8-byte packet built from 7 random `nonce` bytes, then `padding`."""
    if len(nonce) != PACKET_SIZE - 1:
        raise ValueError(f"nonce must be {PACKET_SIZE - 1} bytes, not {len(nonce)}")
    head = bytes([(nonce[0] & 0xFE) | flag]) + nonce[1:]
    return _xor(head + bytes([_checksum(head)]), _mask(secret)) + padding


def decode(data: bytes, secret: int) -> Flag | None:
    """The flag of a handshake datagram, or None when it is not one for this secret."""
    if len(data) < PACKET_SIZE:
        return None
    packet = _xor(data[:PACKET_SIZE], _mask(secret))
    if _checksum(packet) != 0:
        return None
    return Flag(packet[0] & 1)


class Codec(ABC):
    """How one session's handshake datagrams are made and checked."""

    @abstractmethod
    def seal(self, flag: Flag, random: Random) -> bytes:
        """The DATAGRAM_SIZE-byte datagram carrying `flag`, its randomness drawn from `random`."""

    @abstractmethod
    def open(self, data: bytes) -> Flag | None:
        """The flag of a datagram from the peer, or None when it is not one of this session's."""


class Masked(Codec):
    """plexus 2.2's datagram (`encode`, `decode`), for a 2.2 peer: 8 bits of check, so it filters stray
    traffic but authenticates nothing (docs/protocol.md)."""

    def __init__(self, secret: int) -> None:
        _mask(secret)  # reject a bad secret now, not at the first datagram
        self.secret = secret

    def seal(self, flag: Flag, random: Random) -> bytes:
        entropy = random(DATAGRAM_SIZE - 1)
        return encode(flag, self.secret, entropy[: PACKET_SIZE - 1], entropy[PACKET_SIZE - 1 :])

    def open(self, data: bytes) -> Flag | None:
        return decode(data, self.secret)


class Authenticated(Codec):
    """Between two plexus peers: each datagram carries its flag, its sender's role and a fresh nonce under a
    truncated HMAC-SHA256 keyed from both puzzles (`derive`). A datagram is refused unless its tag checks
    (in constant time), it comes from the other role (not our own reflected back), and its nonce is new in
    this handshake (not a replay). One codec serves one session's machines (a fan-out's share it, so a
    datagram replayed to another socket is refused too)."""

    def __init__(self, key: bytes, *, accept: bool) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"the handshake key must be {KEY_SIZE} bytes, not {len(key)}")
        self._key = key
        self._mine = int(accept) << 1  # bit 1 of the kind byte: the sender is the acceptor
        self._theirs = int(not accept) << 1
        self._seen: set[bytes] = set()  # nonces of datagrams that passed: only the peer's, so bounded

    @classmethod
    def derive(
        cls, inviter_puzzle: int, acceptor_puzzle: int, *, accept: bool, bound: bytes = b""
    ) -> Authenticated:
        """The codec of a session with these puzzles, for the acceptor's side or the inviter's; `bound` as
        keys.derive takes it."""
        return cls(keys.derive(KEY_INFO, inviter_puzzle, acceptor_puzzle, bound, KEY_SIZE), accept=accept)

    def _tag(self, body: bytes) -> bytes:
        return hmac.digest(self._key, body, "sha256")[:TAG_SIZE]

    def seal(self, flag: Flag, random: Random) -> bytes:
        body = bytes([AUTH_VERSION, flag | self._mine]) + random(AUTH_BODY - 2)
        return body + self._tag(body)

    def open(self, data: bytes) -> Flag | None:
        if len(data) != DATAGRAM_SIZE or data[0] != AUTH_VERSION or data[1] & 0xFE != self._theirs:
            return None
        body = data[:AUTH_BODY]
        if not hmac.compare_digest(self._tag(body), data[AUTH_BODY:]):
            return None
        nonce = body[2 : 2 + NONCE_SIZE]
        if nonce in self._seen:
            log.debug("a replayed handshake datagram: its nonce was seen before")
            return None
        self._seen.add(nonce)
        return Flag(data[1] & 1)


@dataclass(frozen=True, slots=True)
class Spray:
    """The easy side's probes: `count` hellos to distinct random ports of `ports` on the peer's address (never
    the peer's own port), `rate` at most per second, the first at once; they stop at the first authenticated
    packet. `rng` picks the ports (injectable for tests)."""

    count: int = SPRAY_COUNT
    rate: float = SPRAY_RATE
    rng: _random.Random = field(default_factory=_random.SystemRandom, compare=False, repr=False)
    ports: range = PORTS

    def __post_init__(self) -> None:
        if not 0 <= self.count < len(self.ports):
            raise ValueError(f"spray count must be 0-{len(self.ports) - 1}, not {self.count}")
        if not self.rate > 0:
            raise ValueError(f"spray rate must be positive, not {self.rate}")


@dataclass(frozen=True, slots=True)
class Fanout:
    """A machine of a fan-out (the hard side): it says hello, full TTL, at `offset` after its start and then
    every `interval`, until it has an outcome, so its NAT mapping exists and stays open for the easy side."""

    interval: float = FANOUT_INTERVAL
    offset: float = 0.0

    def __post_init__(self) -> None:
        if not self.interval > 0 or not self.offset >= 0:
            raise ValueError(f"fan-out interval must be positive and offset not negative, not {self}")


class Outcome(Enum):
    COMPLETED = "completed"  # a ready arrived (acceptor) or was sent (inviter)
    PRESUMED = "presumed"  # acceptor: the inviter stopped saying hello after our ready, so it has one
    TIMED_OUT = "timed out"


class Handshake(ABC):
    """What both roles share: the peer filter (and its peer-reflexive switch), the spray, the deadline, the
    outbox.

    With `peer_reflexive`, the first authenticated packet (one the codec opens) from the peer's
    address but another port makes that source the peer, once: the peer's NAT maps per destination, so its
    packets to us leave from another port than the one its STUN server saw. Before any authenticated packet
    the machine listens to both; after, only to its peer. Without it (the default, as plexus 2.2), only the
    exact peer endpoint counts.

    `hosts` are more destinations raced with `peer` on the one socket (the peer's host candidates: its LAN
    endpoints): hellos go to each of them too, at full TTL since they must arrive, until an authenticated
    packet settles which one the peer is; from then on only it counts. With `lan`, an authenticated packet
    from any non-global address may settle it too (the peer, behind the same NAT, may not have named its
    host candidates: a mail peer that is not pinned). Both only with the Authenticated codec: plexus 2.2's
    masked checksum authenticates nothing, so a 2.2 peer is never looked for anywhere but where it said."""

    def __init__(
        self,
        peer: Endpoint,
        codec: Codec,
        now: float,
        *,
        timeout: float,
        random: Random = os.urandom,
        peer_reflexive: bool = False,
        spray: Spray | None = None,
        hosts: Sequence[Endpoint] = (),
        lan: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"handshake timeout must be positive, not {timeout}")
        if (hosts or lan) and not isinstance(codec, Authenticated):
            raise ValueError("host candidates need the authenticated handshake")
        self.hosts = tuple(host.canonical() for host in hosts if host.canonical() != peer)
        self._lan = lan
        self.peer = peer
        self.codec = codec
        self.deadline = now + timeout
        self.outcome: Outcome | None = None
        self.settled = False  # an authenticated packet has arrived: the peer is what it is
        self._random = random
        self._outbox: list[Datagram] = []
        self._peer_reflexive = peer_reflexive
        self._spray_rate = 1.0 if spray is None else spray.rate
        self._spray_ports: list[int] = []
        if spray is not None and spray.count:
            ports = spray.rng.sample(spray.ports, spray.count + 1)
            self._spray_ports = [port for port in ports if port != peer.port][: spray.count]
            self._spray_ports.reverse()  # popped from the end: in the order drawn
        self._next_probe = now

    def datagram_received(self, data: bytes, source: Endpoint, now: float, sock: int = 0) -> None:
        if self.outcome is not None:
            return
        reflexive = source != self.peer
        if reflexive and (self.settled or not self._may_come_from(source)):
            log.debug("ignoring %d bytes from %s: not the peer %s", len(data), source, self.peer)
            return
        flag = self.codec.open(data)
        if flag is None:
            log.debug("ignoring %d bytes from %s: not a handshake packet of this session", len(data), source)
            return
        if not self.settled and not self._settles(flag):
            self._on_candidate(source, now)
            return
        if reflexive:
            log.info(
                "%s endpoint %s: the peer's packets come from there, not %s",
                "peer-reflexive" if source.host == self.peer.host else "LAN",
                source,
                self.peer,
            )
            events.emit(events.Moved, before=self.peer, after=source)
            self.peer = source
            self._on_switch(now)
        elif self.hosts:
            log.info("peer at %s: its outer endpoint won the race with its host candidates", source)
        self.hosts = ()
        self.settled = True
        self._spray_ports.clear()
        log.debug("%s from %s", flag.name.lower(), source)
        self._on_packet(flag, now)

    def _settles(self, flag: Flag) -> bool:
        """Whether an authenticated `flag` settles which candidate the peer is. The acceptor decides: it
        settles on the first hello to arrive, and readies only there. Where candidates race (`hosts`, `lan`,
        peer-reflexive), the inviter settles only on that ready: settling on a hello of its own choosing, it
        could pick another pair than the acceptor did, and each would then ignore the other's packets."""
        return True

    def _on_candidate(self, source: Endpoint, now: float) -> None:  # noqa: B027 (only the inviter races)
        """An authenticated packet from `source` that does not settle the race (`_settles`)."""

    def _may_come_from(self, source: Endpoint) -> bool:
        """Whether an authenticated packet from `source`, not the peer's endpoint, may make it the peer."""
        if source in self.hosts or (self._peer_reflexive and source.host == self.peer.host):
            return True
        return self._lan and not ipaddress.ip_address(source.host).is_global

    def handle_timer(self, now: float) -> None:
        if self.outcome is None:
            self._on_timer(now)
            if self._spray_ports and now >= self._next_probe:
                port = self._spray_ports.pop()
                self._send(Flag.HELLO, to=Endpoint(self.peer.host, port))
                # From now, like the hellos: a late timer sends one probe, not a burst, so the rate holds.
                self._next_probe = now + 1 / self._spray_rate
        if self.outcome is None and now >= self.deadline:
            self.outcome = Outcome.TIMED_OUT

    def get_timer(self) -> float | None:
        """When `handle_timer` wants to run next; None once there is an outcome."""
        if self.outcome is not None:
            return None
        when = min(self._next_timer(), self.deadline)
        return min(when, self._next_probe) if self._spray_ports else when

    @property
    def probes_left(self) -> int:
        return len(self._spray_ports)

    def datagrams_to_send(self) -> list[Datagram]:
        outbox, self._outbox = self._outbox, []
        return outbox

    def _send(self, flag: Flag, ttl: int | None = None, to: Endpoint | None = None) -> None:
        self._outbox.append(Datagram(self.codec.seal(flag, self._random), to or self.peer, ttl))

    def _hello_hosts(self) -> None:
        """A hello to each host candidate still in the race, at full TTL: on the LAN it must arrive."""
        for host in self.hosts:
            self._send(Flag.HELLO, to=host)

    @abstractmethod
    def _on_switch(self, now: float) -> None:
        """The peer has just moved to a peer-reflexive endpoint."""

    @abstractmethod
    def _on_packet(self, flag: Flag, now: float) -> None: ...

    @abstractmethod
    def _on_timer(self, now: float) -> None: ...

    @abstractmethod
    def _next_timer(self) -> float: ...


class Inviter(Handshake):
    """Says hello every HELLO_INTERVAL until a ready arrives, then answers it with ready and is done.

    In a fan-out it says hello every `fanout.interval` from `fanout.offset`. With `peer_reflexive` or in a
    fan-out, a hello from the peer is answered with a hello at once (at most one early hello per
    HELLO_INTERVAL): the peer's packets get in, so its NAT may well have just opened for ours, and waiting for
    the next slot would cost up to a whole interval."""

    def __init__(
        self,
        peer: Endpoint,
        codec: Codec,
        now: float,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        random: Random = os.urandom,
        peer_reflexive: bool = False,
        spray: Spray | None = None,
        fanout: Fanout | None = None,
        hosts: Sequence[Endpoint] = (),
        lan: bool = False,
    ) -> None:
        super().__init__(
            peer, codec, now, timeout=timeout, random=random, peer_reflexive=peer_reflexive, spray=spray,
            hosts=hosts, lan=lan,
        )  # fmt: skip
        self._interval = HELLO_INTERVAL if fanout is None else fanout.interval
        self._next_hello = now if fanout is None else now + fanout.offset
        self._last_hello: float | None = None
        self._racing = peer_reflexive or bool(self.hosts) or lan
        self._answered: dict[Endpoint, float] = {}  # racing candidates' hellos answered: when, last
        self._answer_hellos = self._racing or fanout is not None
        self.handle_timer(now)

    def _settles(self, flag: Flag) -> bool:
        return flag is Flag.READY or not self._racing

    def _on_candidate(self, source: Endpoint, now: float) -> None:
        # A hello from one of the racing candidates: the way from there is open, so a hello back at once
        # (not at the next slot) lets the acceptor settle on it and ready. At most one per HELLO_INTERVAL to
        # each: a fan-out's hundreds of sockets each get theirs. Only authenticated packets get here, so the
        # table is as bounded as the codec's nonces.
        if now >= self._answered.get(source, now - HELLO_INTERVAL) + HELLO_INTERVAL:
            self._send(Flag.HELLO, to=source)
            self._answered[source] = now

    def _on_packet(self, flag: Flag, now: float) -> None:
        if flag is Flag.READY:
            for _ in range(READY_COPIES):
                self._send(Flag.READY)
            self.outcome = Outcome.COMPLETED
        # Otherwise a plain inviter ignores the hello, as 2.2 does: it can only be the acceptor's TTL punch
        # outliving its hops.
        elif self._answer_hellos and (self._last_hello is None or now >= self._last_hello + HELLO_INTERVAL):
            self._hello(now)

    def _on_switch(self, now: float) -> None:
        self._last_hello = None  # every hello so far went to the old endpoint

    def _on_timer(self, now: float) -> None:
        if now >= self._next_hello:
            self._hello(now)

    def _hello(self, now: float) -> None:
        self._send(Flag.HELLO)
        self._hello_hosts()
        self._last_hello = now
        # From now, not from the missed slot: a late timer must not fire a burst of hellos.
        self._next_hello = now + self._interval

    def _next_timer(self) -> float:
        return self._next_hello


class Acceptor(Handshake):
    """Punches its own NAT with a TTL-limited hello, answers every hello with ready, is done on a ready.

    In a fan-out it sends no TTL punch but full-TTL hellos, at `fanout.offset` and then every
    `fanout.interval` until it is done: its NAT's mapping toward the peer must exist, and stay, for the
    peer's probes to find it, and against a peer whose NAT filters nothing the first hello completes it."""

    def __init__(
        self,
        peer: Endpoint,
        codec: Codec,
        now: float,
        *,
        hops: int = DEFAULT_HOPS,
        timeout: float = DEFAULT_TIMEOUT,
        random: Random = os.urandom,
        peer_reflexive: bool = False,
        spray: Spray | None = None,
        fanout: Fanout | None = None,
        hosts: Sequence[Endpoint] = (),
        lan: bool = False,
    ) -> None:
        if not 1 <= hops <= 255:
            raise ValueError(f"punch hops must be 1-255, not {hops}")
        super().__init__(
            peer, codec, now, timeout=timeout, random=random, peer_reflexive=peer_reflexive, spray=spray,
            hosts=hosts, lan=lan,
        )  # fmt: skip
        self._hops = hops
        self._fanout = fanout
        self._next_punch = now if fanout is None else now + fanout.offset
        self._last_hello: float | None = None
        self.handle_timer(now)

    def _on_packet(self, flag: Flag, now: float) -> None:
        if flag is Flag.READY:
            self.outcome = Outcome.COMPLETED
        else:
            self._last_hello = now
            self._send(Flag.READY)

    def _on_switch(self, now: float) -> None:
        pass  # the TTL punch stops with the first hello anyway, and readies go to the current peer

    def _on_timer(self, now: float) -> None:
        if self._fanout is not None:
            if now >= self._next_punch:
                self._send(Flag.HELLO)
                self._next_punch = now + self._fanout.interval
        elif self._last_hello is None and now >= self._next_punch:
            self._send(Flag.HELLO, ttl=self._hops)
            self._hello_hosts()
            self._next_punch = now + PUNCH_REFRESH
        if (
            self._last_hello is not None
            and now >= self._last_hello + QUIET_PERIOD
            and self._last_hello + QUIET_PERIOD <= self.deadline
        ):
            self.outcome = Outcome.PRESUMED

    def _next_timer(self) -> float:
        if self._last_hello is None:
            return self._next_punch
        quiet = self._last_hello + QUIET_PERIOD
        return quiet if self._fanout is None else min(quiet, self._next_punch)


def handshake(
    peer: Endpoint,
    codec: Codec,
    now: float,
    *,
    accept: bool,
    hops: int = DEFAULT_HOPS,
    timeout: float = DEFAULT_TIMEOUT,
    random: Random = os.urandom,
    peer_reflexive: bool = False,
    spray: Spray | None = None,
    fanout: Fanout | None = None,
    hosts: Sequence[Endpoint] = (),
    lan: bool = False,
) -> Handshake:
    """The role's machine: the acceptor's (with its TTL punch, `hops`) or the inviter's."""
    if accept:
        return Acceptor(
            peer, codec, now, hops=hops, timeout=timeout, random=random, peer_reflexive=peer_reflexive,
            spray=spray, fanout=fanout, hosts=hosts, lan=lan,
        )  # fmt: skip
    return Inviter(
        peer, codec, now, timeout=timeout, random=random, peer_reflexive=peer_reflexive, spray=spray,
        fanout=fanout, hosts=hosts, lan=lan,
    )  # fmt: skip


def fan_out(
    count: int,
    peer: Endpoint,
    codec: Codec,
    now: float,
    *,
    accept: bool,
    interval: float = FANOUT_INTERVAL,
    timeout: float = DEFAULT_TIMEOUT,
    random: Random = os.urandom,
) -> list[Handshake]:
    """The hard side's machines, one per socket, all toward `peer`; their hellos are staggered evenly over
    `interval`, so the whole fan-out sends `count / interval` hellos per second."""
    if count < 1:
        raise ValueError(f"a fan-out needs at least one socket, not {count}")
    return [
        handshake(
            peer,
            codec,
            now,
            accept=accept,
            timeout=timeout,
            random=random,
            fanout=Fanout(interval, i * interval / count),
        )
        for i in range(count)
    ]


async def punch(
    sock: socket.socket,
    peer: Endpoint,
    codec: Codec,
    *,
    accept: bool,
    hops: int = DEFAULT_HOPS,
    timeout: float = DEFAULT_TIMEOUT,
    peer_reflexive: bool = False,
    spray: Spray | None = None,
    hosts: Sequence[Endpoint] = (),
    lan: bool = False,
    also: socket.socket | None = None,
) -> Endpoint:
    """Open the NATs between `sock` and `peer` and confirm the path; close `sock` (and `also`) on every path.
    Return the peer endpoint the handshake completed with: `peer` itself, or with `peer_reflexive` maybe
    another port of its address, or with `hosts` or `lan` the peer's candidate that won the race
    (`Handshake`). `also` is a socket of the other family, for the candidates of that family among `hosts`
    (the peer's IPv6 endpoint): one machine races them all, so both sides settle on the same pair.

    `peer_reflexive` and `spray` are for the easy side of a peer whose NAT maps per destination (which runs
    `punch_fanout`); the defaults behave exactly as plexus 2.2.

    The acceptor's TTL-limited hello leaves before the first await, so a caller may start this as a task and
    rely on its NAT being open once the task has run one step.
    """
    socks = [sock] if also is None else [sock, also]
    with contextlib.ExitStack() as closing:
        for each in socks:
            closing.callback(each.close)
            each.setblocking(False)
        now = asyncio.get_running_loop().time()
        key = peer.canonical()
        machine = handshake(
            key,
            codec,
            now,
            accept=accept,
            hops=hops,
            timeout=timeout,
            peer_reflexive=peer_reflexive,
            spray=spray,
            hosts=hosts,
            lan=lan,
        )
        await drive(machine, Sockets(socks))
    outcome = machine.outcome
    assert outcome is not None  # a machine is finished only with an outcome
    if outcome is Outcome.TIMED_OUT:
        raise HandshakeTimeoutError(f"no handshake with {peer} within {timeout:g} s")
    final = peer if machine.peer == key else machine.peer
    report(outcome, final)
    return final


def report(outcome: Outcome, peer: Endpoint, via: object = None) -> None:
    """Log how a handshake ended (`via`: the relay it ran through, if any)."""
    through = f" through {via}" if via is not None else ""
    if outcome is Outcome.PRESUMED:
        log.warning(
            "no ready from %s%s, but its hellos stopped after our ready: taking it as done", peer, through
        )
    log.info("handshake with %s%s done", peer, through)


async def punch_fanout(
    socks: Sequence[socket.socket],
    peer: Endpoint,
    codec: Codec,
    *,
    accept: bool,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = FANOUT_INTERVAL,
) -> tuple[socket.socket, Endpoint]:
    """The hard side's handshake: one machine per socket (`fan_out`), each saying hello to the easy side's
    `peer`, staggered so that the whole fan-out sends `len(socks) / interval` hellos per second.

    Return the socket whose machine completed first and the peer endpoint; every other socket is closed, on
    every path, and so is the winner when there is none (HandshakeTimeoutError at `timeout`, cancellation, a
    bug). The winner stays open, non-blocking: the caller closes it before its command binds the endpoint.
    The first hello leaves before the first await.
    """
    winner: int | None = None
    try:
        loop = asyncio.get_running_loop()
        for sock in socks:
            sock.setblocking(False)
        key = peer.canonical()
        machines = fan_out(
            len(socks), key, codec, loop.time(), accept=accept, interval=interval, timeout=timeout
        )
        drivers = [Driver(machine, Sockets([sock])) for sock, machine in zip(socks, machines, strict=True)]
        first: asyncio.Future[int] = loop.create_future()
        pending = set(range(len(drivers)))

        def settled(index: int, done: asyncio.Future[None]) -> None:
            pending.discard(index)
            if first.done() or done.cancelled():
                return
            if (error := done.exception()) is not None:
                first.set_exception(error)
            elif machines[index].outcome is not Outcome.TIMED_OUT:
                first.set_result(index)
            elif not pending:
                first.set_exception(HandshakeTimeoutError(f"no handshake with {peer} within {timeout:g} s"))

        try:
            for index, driver in enumerate(drivers):
                driver.done.add_done_callback(functools.partial(settled, index))
                driver.start()
            winner = await first
        finally:
            first.cancel()
            for driver in drivers:
                driver.stop()
    finally:
        for index, sock in enumerate(socks):
            if index != winner:
                sock.close()
    machine = machines[winner]
    log.info("fan-out: socket %d of %d (%s) got through", winner + 1, len(socks), socks[winner].getsockname())
    final = peer if machine.peer == key else machine.peer
    report(machine.outcome or Outcome.COMPLETED, final)
    return socks[winner], final
