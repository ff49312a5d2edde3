"""How two peers meet, whatever carries it: the protocol a rendezvous implements (by mail,
plexus/mediator/email.py; on OpenDHT, plexus/mediator/dhtnode.py) and the values both sides exchange.

The inviter sends an Offer (its outer endpoint, its puzzle, its Reach) and waits for the acceptor's; the
acceptor waits for Invitations and answers or refuses each. Both implementations judge what arrives by the
same rules, kept here: how far the peer's clock may be off, and what a refusal's reason may hold. A session
(plexus/session.py) sees only this module: it opens a rendezvous from its config (`RendezvousConfig.open`),
which imports its implementation then, so that a mail session never loads OpenDHT and a DHT session never
loads the mail clients (nor the mail parser: plexus/mediator/dht.py takes those rules from here).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from plexus.endpoint import Endpoint

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from plexus.identity import Identity

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


def _address(text: str, name: str) -> Endpoint:
    """An IP address and a port that is not 0: what a Reach's relay or host candidate must be."""
    try:
        endpoint = Endpoint.parse(text)
        ipaddress.ip_address(endpoint.host)
    except ValueError as error:
        raise ReachError(f"{REACH_HEADER}: bad {name} {text[:60]!r}") from error
    if not endpoint.port:
        raise ReachError(f"{REACH_HEADER}: {name} port 0")
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
    # The request carried no Date header, as plexus 2.2's never do (ours always do): its sender cannot read a
    # refusal, so none is sent.
    legacy: bool = False


class Rendezvous(Protocol):
    """One side's end of a rendezvous, used inside `async with` (entering starts what can run ahead: the IMAP
    login, the DHT join; leaving cleans up).

    `submission()` opens what a message needs ahead of it (the mail's SMTP session up to DATA; nothing on
    the DHT), so that it runs while STUN does; what it yields is passed back, opaque, to the call that sends.
    """

    async def __aenter__(self) -> Rendezvous: ...

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None: ...

    def submission(self) -> contextlib.AbstractAsyncContextManager[Any]: ...

    async def invite(self, offer: Offer, timeout: float, submission: Any) -> Offer:
        """Send the request and return the acceptor's response; PlexusError subclasses on a refusal, a
        timeout, a peer or server that is not there."""
        ...

    async def listen(self) -> None:
        """Get ready for requests: from its return on, a request the peer sends is served (what was there
        before is passed over). requests() calls it if the caller did not."""
        ...

    def requests(self) -> AsyncIterator[Invitation]:
        """Each fresh request from the pinned peer, forever; a hostile one is dropped inside."""
        ...

    async def answer(self, invitation: Invitation, offer: Offer, submission: Any) -> None: ...

    async def refuse(self, invitation: Invitation, reason: str, submission: Any) -> None: ...


class RendezvousConfig(Protocol):
    """A rendezvous's settings (MailConfig, DhtConfig): who meets whom, and how to open it."""

    @property
    def host_id(self) -> str: ...

    @property
    def peer_id(self) -> str: ...

    @property
    def identity(self) -> Identity | None: ...

    def open(self) -> Rendezvous:
        """The rendezvous, its implementation imported now."""
        ...
