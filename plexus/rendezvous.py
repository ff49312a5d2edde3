"""How two peers meet, whatever carries it: the protocol a rendezvous implements (by mail,
plexus/mediator/email.py; on OpenDHT, plexus/mediator/dhtnode.py) and the values both sides exchange.

The inviter sends an Offer (its outer endpoint, its puzzle, its Reach) and waits for the acceptor's; the
acceptor waits for Invitations and answers or refuses each. Later, when a side has moved (a new network,
a NAT that mapped anew), it sends a Rebind: its new endpoint and Reach, for the session it continues,
authenticated by that side's key of that session (RebindKeys); the peer admits it (Rebinds) and hands it to
that session alone. Both implementations judge what arrives by the same rules, kept here: how
far the peer's clock may be off, what a refusal's reason may hold, what a rebind must prove. A session
(plexus/session.py) sees only this module: it opens a rendezvous from its config (`RendezvousConfig.open`),
which imports its implementation then, so that a mail session never loads OpenDHT and a DHT session never
loads the mail clients (nor the mail parser: plexus/mediator/dht.py takes those rules from here).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hmac
import ipaddress
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from plexus import events, keys
from plexus.endpoint import Endpoint

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from plexus.identity import Identity
    from plexus.peers import Peer, Roster

log = logging.getLogger(__name__)

# "blocked": no UDP gets out of this side's network; it is reached only through the relay it names.
Mapping = Literal["independent", "dependent", "blocked"]
MAPPINGS: dict[str, Mapping] = {"independent": "independent", "dependent": "dependent", "blocked": "blocked"}
REACH_HEADER = "X-Plexus-Reach"
# Host candidates one Reach may name: a host has its punching socket's LAN address, and maybe a few more; a
# hostile peer must not make this side send hellos to a long list of addresses.
MAX_HOST_CANDIDATES = 4
# How far a message's time (a mail's Date or signingTime, a DHT value's) may be from our clock: skew between
# the hosts plus delivery delay. A request this old is useless anyway (inviters wait 60 s); a replay older
# than this is refused even after a restart.
CLOCK_TOLERANCE = datetime.timedelta(minutes=5)
# What a rendezvous message is, by mail and on the DHT alike. A refusal and a rebind are plexus's own: plexus
# 2.2 knows requests and responses only, and is never sent a rebind (a session with 2.2 has no RebindKey).
Kind = Literal["request", "response", "refusal", "rebind"]
KINDS: dict[str, Kind] = {
    "request": "request",
    "response": "response",
    "refusal": "refusal",
    "rebind": "rebind",
}
REASON_LIMIT = 200  # characters of a refusal's reason, after sanitizing
NO_REASON = "no reason given"


def sanitize_reason(text: str) -> str:
    """Printable ASCII on one line, at most REASON_LIMIT characters: whitespace runs become one space, any
    other character outside 0x21-0x7E a '?'. Applied when sending and again on receipt."""
    cleaned = "".join(" " if c.isspace() else c if "!" <= c <= "~" else "?" for c in text)
    cleaned = " ".join(cleaned.split())[:REASON_LIMIT].rstrip()
    return cleaned or NO_REASON


class ReachError(ValueError):
    """A Reach text that does not parse: str() says why (each rendezvous wraps it in its own rejection)."""


@dataclass(frozen=True)
class Reach:
    """What a side says about how it can be reached, beyond plexus 2.2's line: its NAT's mapping as STUN saw
    it (endpoint-independent or not; "blocked" when no UDP gets out, so that the relay it names, which it
    reaches over TCP or TLS, is its only way in), and a TURN relay address it allocated, if any. It travels in
    the X-Plexus-Reach header, which plexus 2.2 ignores; a 2.2 peer's mail has none. An inviter also says here
    whether it wants streams (QUIC, plexus/streams/) rather than the acceptor's command. `hosts` are its host
    candidates: the punching socket's own (LAN) endpoints, for a peer behind the same NAT when that NAT does
    not hairpin. `v6` is its IPv6 endpoint as a STUN server saw it (its global address and the port of its
    IPv6 punching socket, behind a stateful firewall and no NAT66 as a rule), where it has one."""

    mapping: Mapping
    relay: Endpoint | None = None
    streams: bool = False
    hosts: tuple[Endpoint, ...] = ()
    v6: Endpoint | None = None

    def header(self) -> str:
        relay = f"; relay={self.relay}" if self.relay else ""
        hosts = f"; hosts={','.join(map(str, self.hosts))}" if self.hosts else ""
        v6 = f"; v6={self.v6}" if self.v6 else ""
        return f"mapping={self.mapping}{relay}" + ("; streams=1" if self.streams else "") + hosts + v6

    @classmethod
    def parse(cls, text: str) -> Reach:
        fields = dict(item.strip().partition("=")[::2] for item in text.split(";") if item.strip())
        mapping = MAPPINGS.get(fields.get("mapping", ""))
        if mapping is None:
            raise ReachError(f"{REACH_HEADER}: unknown mapping {fields.get('mapping', '')[:30]!r}")
        relay = _address(fields["relay"], "relay") if "relay" in fields else None
        if mapping == "blocked" and relay is None:
            raise ReachError(f"{REACH_HEADER}: mapping=blocked names no relay")
        hosts = fields.get("hosts", "").split(",") if fields.get("hosts") else []
        if len(hosts) > MAX_HOST_CANDIDATES:
            raise ReachError(f"{REACH_HEADER}: more than {MAX_HOST_CANDIDATES} host candidates")
        v6 = _ipv6(fields["v6"]) if "v6" in fields else None
        streams = fields.get("streams") == "1"
        return cls(mapping, relay, streams, tuple(_address(h, "host") for h in hosts), v6)


def _address(text: str, name: str, where: str = REACH_HEADER) -> Endpoint:
    """An IP address and a port that is not 0: what a Reach's relay or host candidate must be (a rebind's
    outer endpoint too: `where` names what it is part of)."""
    try:
        endpoint = Endpoint.parse(text)
        ipaddress.ip_address(endpoint.host)
    except ValueError as error:
        raise ReachError(f"{where}: bad {name} {text[:60]!r}") from error
    if not endpoint.port:
        raise ReachError(f"{where}: {name} port 0")
    return endpoint.canonical()


def _ipv6(text: str) -> Endpoint:
    """A Reach's IPv6 candidate: a unicast IPv6 address that can be routed to (hellos go there)."""
    endpoint = _address(text, "v6")
    address = ipaddress.ip_address(endpoint.host)
    special = address.is_loopback or address.is_unspecified or address.is_multicast or address.is_link_local
    if not isinstance(address, ipaddress.IPv6Address) or address.ipv4_mapped is not None or special:
        raise ReachError(f"{REACH_HEADER}: v6 {endpoint.host[:60]!r} is not a routable IPv6 address")
    return endpoint


@dataclass(frozen=True)
class Offer:
    """What each side tells the other: its outer endpoint and its puzzle, and (plexus 2.2 says nothing of it)
    how it can be reached. `signer` is the peer's identity key when the offer came signed by the pinned peer
    (mail with --peer-identity, every DHT value): the handshake's key is then bound to it (puncher.py)."""

    outer: Endpoint
    puzzle: int
    reach: Reach | None = None
    signer: ec.EllipticCurvePublicKey | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Invitation:
    """A fresh request, and what answering (or refusing) it needs."""

    offer: Offer
    message_id: str | None  # mail: the request's, for the response's In-Reply-To
    peer: Peer  # who sent it: a peer of the acceptor's (plexus/peers.py), found by its mail id or signer
    # The request carried no Date header, as plexus 2.2's never do (ours always do): its sender cannot read a
    # refusal, so none is sent.
    legacy: bool = False


# The rebind (docs/protocol.md, "Rebind"). Its key and the session's id are one output of keys.derive under
# this label: the id tells nothing of the key, and neither can be made without the handshake's material.
REBIND_LABEL = b"plexus rebind 1"
# The acceptor's rebinds to the inviter (its own move): a key and a session id of their own, so that a rebind
# one side sent cannot be sent back to it as the other's.
REBIND_BACK_LABEL = b"plexus rebind back 1"
REBIND_KEY_BYTES = 32
SESSION_ID_BYTES = 16
REBIND_TAG_BYTES = 32  # HMAC-SHA256, whole
U64_LIMIT = 1 << 64  # a sequence and an issued time are unsigned 64-bit numbers on the wire
_REBIND_SIGNED = REBIND_LABEL + b"\0"  # the tag's input begins with it


class RebindError(ValueError):
    """A rebind that is not taken, malformed or refused (Rebinds.admit): str() says why."""


@dataclass(frozen=True)
class Rebind:
    """The inviter's word that the session `session` goes on from a new place: its outer endpoint and Reach
    now (candidates, as an offer carries them). `sequence` counts the session's rebinds from 1: a later one
    supersedes an earlier one, and one not after the last taken is a replay. `issued`: unix seconds. `tag`:
    HMAC-SHA256 under the session's rebind key over every other field (`signed`). Made by RebindKey.seal, read
    from either encoding by `read`, judged by Rebinds.admit."""

    session: bytes
    sequence: int
    issued: int
    outer: Endpoint
    reach: Reach
    tag: bytes = field(repr=False)

    def __post_init__(self) -> None:
        """RebindError unless each field is in its range: the readers rely on it."""
        if len(self.session) != SESSION_ID_BYTES:
            raise RebindError(f"rebind: a session id of {len(self.session)} bytes, not {SESSION_ID_BYTES}")
        if not 0 < self.sequence < U64_LIMIT:
            raise RebindError(f"rebind: sequence {str(self.sequence)[:30]} out of range")
        if not 0 <= self.issued < U64_LIMIT:
            raise RebindError(f"rebind: issued {str(self.issued)[:30]} out of range")
        if len(self.tag) != REBIND_TAG_BYTES:
            raise RebindError(f"rebind: a tag of {len(self.tag)} bytes, not {REBIND_TAG_BYTES}")

    def signed(self) -> bytes:
        """What the tag covers: the label and a NUL, the session id, sequence and issued (u64 big-endian
        each), then the outer endpoint's and the Reach's texts as `read` parses them back, each after its
        length (u16 big-endian). A field's spelling on the wire is not covered, only what it means."""
        texts = (str(self.outer).encode(), self.reach.header().encode())
        return (
            _REBIND_SIGNED
            + self.session
            + struct.pack("!QQ", self.sequence, self.issued)
            + b"".join(struct.pack("!H", len(text)) + text for text in texts)
        )

    @classmethod
    def read(cls, session: str, sequence: int, issued: int, outer: str, reach: str, tag: str) -> Rebind:
        """The rebind from an encoding's fields: session id and tag in lowercase hex, the outer endpoint as
        `ip:port` (IPv6 in brackets), the Reach as X-Plexus-Reach's text. RebindError says what is wrong."""
        try:
            endpoint = _address(outer, "outer endpoint", "rebind")
            parsed = Reach.parse(reach)
        except ReachError as error:
            raise RebindError(str(error)) from None
        return cls(_hex(session, "session id"), sequence, issued, endpoint, parsed, _hex(tag, "tag"))


def _hex(text: str, name: str) -> bytes:
    if len(text) % 2 or text.strip("0123456789abcdef"):
        raise RebindError(f"rebind: {name} {text[:70]!r} is not lowercase hex")
    return bytes.fromhex(text)


@dataclass(frozen=True)
class RebindKey:
    """A session's rebind secret, the same on both sides: the session's id, which a rebind names, and the key
    of its tag. Both follow from the handshake's material (keys.derive): the puzzles and, where the identities
    are pinned, their ECDH secret; neither ever travels. Only between plexus peers: a session with plexus 2.2
    has none, so a 2.2 peer is never sent a rebind."""

    session: bytes
    key: bytes = field(repr=False)

    @classmethod
    def derive(
        cls, inviter_puzzle: int, acceptor_puzzle: int, bound: bytes = b"", *, back: bool = False
    ) -> RebindKey:
        """`bound` as for the handshake's key (keys.derive): the same session binds both or neither. `back`:
        the key of the acceptor's rebinds (REBIND_BACK_LABEL), not the inviter's."""
        label = REBIND_BACK_LABEL if back else REBIND_LABEL
        made = keys.derive(label, inviter_puzzle, acceptor_puzzle, bound, REBIND_KEY_BYTES + SESSION_ID_BYTES)
        return cls(made[REBIND_KEY_BYTES:], made[:REBIND_KEY_BYTES])

    def seal(self, sequence: int, outer: Endpoint, reach: Reach, now: datetime.datetime) -> Rebind:
        """The session's `sequence`th rebind, issued now. The endpoints are put in the one spelling a reader
        parses them back to (the tag covers that spelling)."""
        unsigned = Rebind(
            self.session,
            sequence,
            int(now.timestamp()),
            outer.canonical(),
            Reach.parse(reach.header()),
            bytes(REBIND_TAG_BYTES),
        )
        return dataclasses.replace(unsigned, tag=self._tag(unsigned))

    def verifies(self, rebind: Rebind) -> bool:
        """Whether the rebind's tag is this key's, compared in constant time."""
        return hmac.compare_digest(self._tag(rebind), rebind.tag)

    def _tag(self, rebind: Rebind) -> bytes:
        return hmac.digest(self.key, rebind.signed(), "sha256")


@dataclass(frozen=True)
class RebindKeys:
    """A session's two rebind keys: `forth` seals the inviter's rebinds, `back` the acceptor's."""

    forth: RebindKey
    back: RebindKey

    @classmethod
    def derive(cls, inviter_puzzle: int, acceptor_puzzle: int, bound: bytes = b"") -> RebindKeys:
        return cls(
            RebindKey.derive(inviter_puzzle, acceptor_puzzle, bound),
            RebindKey.derive(inviter_puzzle, acceptor_puzzle, bound, back=True),
        )

    def mine(self, *, accept: bool) -> RebindKey:
        """The key this side seals its rebinds with."""
        return self.back if accept else self.forth

    def theirs(self, *, accept: bool) -> RebindKey:
        """The key of the rebinds this side takes."""
        return self.forth if accept else self.back


class Rebound:
    """The rebinds admitted for one session: an async iterator that yields, each time, the newest admitted
    since the last one taken (a later rebind supersedes one not taken yet). Rebinds.expect makes it."""

    def __init__(self, key: RebindKey) -> None:
        self.key = key
        self.last = 0  # the sequence of the last rebind admitted: the next must be after it
        self._newest: Rebind | None = None
        self._arrived = asyncio.Event()

    def admit(self, rebind: Rebind, now: datetime.datetime, tolerance: datetime.timedelta) -> None:
        """Take the rebind, or raise RebindError: a tag not this session's, a sequence not after the last
        admitted (a replay, or one overtaken), an issued time beyond the tolerance of our clock."""
        if not self.key.verifies(rebind):
            raise RebindError("rebind with a bad tag: not made with this session's key")
        if rebind.sequence <= self.last:
            raise RebindError(f"rebind {rebind.sequence} of a session already at {self.last}: a replay")
        age = now.timestamp() - rebind.issued
        if abs(age) > tolerance.total_seconds():
            when = f"{abs(age):.0f} s {'ago' if age > 0 else 'ahead'}"
            raise RebindError(
                f"rebind issued {when}, beyond the {tolerance.total_seconds():g} s our clock allows"
            )
        self.last = rebind.sequence
        self._newest = rebind
        self._arrived.set()

    def __aiter__(self) -> Rebound:
        return self

    async def __anext__(self) -> Rebind:
        while self._newest is None:
            self._arrived.clear()
            await self._arrived.wait()
        newest, self._newest = self._newest, None
        return newest


@dataclass
class Rebinds:
    """The acceptor's sessions that a rebind may continue, by session id. Each rendezvous keeps one: its
    listening loop hands every rebind it reads to `admit`, and a session watches its own with `expect`."""

    tolerance: datetime.timedelta = CLOCK_TOLERANCE
    _sessions: dict[bytes, Rebound] = field(default_factory=dict)

    @contextlib.contextmanager
    def expect(
        self, key: RebindKey, reading: Callable[[], Awaitable[None]] | None = None
    ) -> Iterator[Rebound]:
        """Within it, the session's rebinds are admitted and yielded by the Rebound; outside it, refused.
        `reading`: what reads them meanwhile where no listening loop does (an inviter's), run as a task."""
        rebound = Rebound(key)
        self._sessions[key.session] = rebound
        task = asyncio.ensure_future(reading()) if reading is not None else None
        if task is not None:
            task.add_done_callback(_reading_ended)
        try:
            yield rebound
        finally:
            if task is not None:
                task.cancel()
            if self._sessions.get(key.session) is rebound:
                del self._sessions[key.session]

    def admit(self, rebind: Rebind, now: datetime.datetime) -> None:
        """Hand the rebind to its session, or raise RebindError (Rebound.admit; a session not expected)."""
        rebound = self._sessions.get(rebind.session)
        if rebound is None:
            raise RebindError(f"rebind of no session here ({rebind.session.hex()[:8]}...)")
        rebound.admit(rebind, now, self.tolerance)
        log.info("rebind %d admitted: the peer says it is now at %s", rebind.sequence, rebind.outer)


def _reading_ended(task: asyncio.Future[None]) -> None:
    """An inviter's reading of its rendezvous that failed: one line (its own rebinds still go out)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("no longer reading the rendezvous for the peer's rebinds: %s", events.one_line(error))


class Strangers:
    """Who knocked without being a peer (a mail's Subject, a DHT value's signer that no peer has): logged
    once each at INFO with its id, then at DEBUG, since anyone can write to the mailbox or put under the key
    as often as they like; each knock is a Rejected event."""

    LIMIT = 1024  # ids remembered; past it, the oldest is forgotten (and would be logged at INFO again)

    def __init__(self) -> None:
        self._seen: dict[str, None] = {}

    def knock(self, who: str, source: Literal["mail", "dht"], what: str) -> None:
        """`who` (already one printable line) knocked with `what` (a message, a value)."""
        first = who not in self._seen
        self._seen.pop(who, None)
        self._seen[who] = None
        if len(self._seen) > self.LIMIT:
            del self._seen[next(iter(self._seen))]
        log.log(logging.INFO if first else logging.DEBUG, "%s from %s: not a peer of this host", what, who)
        events.emit(events.Rejected, source=source, reason=f"{who} is not a peer of this host")


class Rendezvous(Protocol):
    """One side's end of a rendezvous, used inside `async with` (entering starts what can run ahead: the IMAP
    login, the DHT join; leaving cleans up).

    `submission(peer)` opens what a message to `peer` needs ahead of it (the mail's SMTP session up to DATA,
    toward that peer's address; nothing on the DHT), so that it runs while STUN does; what it yields is
    passed back, opaque, to the call that sends.
    """

    async def __aenter__(self) -> Rendezvous: ...

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None: ...

    def submission(self, peer: Peer) -> contextlib.AbstractAsyncContextManager[Any]: ...

    async def invite(self, offer: Offer, timeout: float, submission: Any) -> Offer:
        """Send the request and return the acceptor's response; PlexusError subclasses on a refusal, a
        timeout, a peer or server that is not there."""
        ...

    async def listen(self) -> None:
        """Get ready for requests: from its return on, a request the peer sends is served (what was there
        before is passed over). requests() calls it if the caller did not."""
        ...

    def requests(self) -> AsyncIterator[Invitation]:
        """Each fresh request from one of the peers, forever, naming which; a hostile one, or one from
        a stranger, is dropped inside."""
        ...

    async def answer(self, invitation: Invitation, offer: Offer, submission: Any) -> None: ...

    async def refuse(self, invitation: Invitation, reason: str, submission: Any) -> None: ...

    async def rebind(self, rebind: Rebind, peer: Peer, submission: Any) -> None:
        """Send this side's rebind (RebindKey.seal) to `peer`, whose session it continues; returns once it
        has left (its SMTP DATA accepted, its DHT put handed to the node)."""
        ...

    def moved(self) -> None:
        """This side's network changed under a running session (its STUN server sees it elsewhere): remake
        what went through the old NAT mapping and will not say it died (an IMAP connection, DHT listens)."""
        ...

    def rebinds(self, key: RebindKey) -> contextlib.AbstractContextManager[Rebound]:
        """Within it, each rebind of the peer's under `key` that this side reads and admits comes out of the
        Rebound (the acceptor's requests() loop reads them; an inviter reads its mailbox or listens on the
        DHT meanwhile); any other is dropped, with a Rejected event and one log line."""
        ...


class RendezvousConfig(Protocol):
    """A rendezvous's settings (MailConfig, DhtConfig): who meets whom, and how to open it."""

    @property
    def host_id(self) -> str: ...

    @property
    def peers(self) -> Roster:
        """Whom it meets: an inviter its one peer, an acceptor those it serves (one roster for all of its
        rendezvous, read again on SIGHUP)."""
        ...

    @property
    def identity(self) -> Identity | None: ...

    def open(self) -> Rendezvous:
        """The rendezvous, its implementation imported now."""
        ...
