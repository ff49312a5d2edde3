"""Which way the packets go, decided from both sides' NAT mappings: the decision table of docs/nat.md.

Pure: the session flow asks `choose` once it knows both sides' Reach, and acts on the Plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from plexus.endpoint import Endpoint
from plexus.rendezvous import Reach


class Method(StrEnum):
    """How this side punches. The peer's side of the same pair is the mirror image (fan-out <-> spray)."""

    DIRECT = "direct"  # both map endpoint-independently: each aims at the other's STUN endpoint
    FANOUT = "fan-out"  # this side maps per destination: many sockets, each opening a mapping toward the peer
    SPRAY = "spray"  # the peer maps per destination: probe random ports of its address (birthday paradox)
    RELAY = "relay"  # both map per destination, or one lets no UDP out: through a TURN relay one allocated
    LAN = "lan"  # both behind one NAT: the peer's host candidates (its LAN endpoints), raced with DIRECT
    IPV6 = "ipv6"  # both have IPv6 (stateful firewalls, no NAT): each aims at the other's IPv6 endpoint


@dataclass(frozen=True)
class Plan:
    method: Method
    # RELAY: the relay's address when the peer allocated it (send there from the punching socket), None when
    # this side allocated it (the handshake runs over its own allocation).
    relay: Endpoint | None = None
    # Accept the peer from another port of its address once a handshake packet authenticates (ICE's
    # peer-reflexive candidate). Off for a plexus 2.2 peer, which sends from exactly the endpoint it mailed.
    peer_reflexive: bool = True
    # LAN: the peer's host candidates, raced with its outer endpoint on one socket. A handshake packet from
    # one of them, or (the peer may not have named them) from any non-global address, makes it the peer.
    hosts: tuple[Endpoint, ...] = ()
    # RELAY: which side lets no UDP out ("here", "peer"), if one does; both NATs map per destination otherwise
    blocked: Literal["here", "peer"] | None = None
    # Both sides have IPv6: the peer's IPv6 endpoint. DIRECT and LAN race it on their one handshake machine
    # (the IPv6 socket beside the IPv4 one); before any other method it is a way of its own, tried first.
    ipv6: Endpoint | None = None

    @property
    def races_lan(self) -> bool:
        """The handshake takes the peer from a LAN address too (any non-global one, as the peer may have
        named none): both sides aim at each other's endpoint as it is, between two plexus peers."""
        return self.method is Method.LAN or (self.method is Method.DIRECT and self.peer_reflexive)

    @property
    def races_ipv6(self) -> bool:
        """The IPv6 candidate runs in this method's own handshake rather than as a way before it: the
        peer's plan is DIRECT or LAN too, both race the same candidates and the acceptor's choice settles
        it."""
        return self.ipv6 is not None and self.method in (Method.DIRECT, Method.LAN)

    def describe(self) -> str:
        """The method first (as PLEXUS_PATH names it), then why."""
        if self.blocked is not None:
            where = "this network" if self.blocked == "here" else "the peer's network"
            relay = self.relay or "(own allocation)"
            return f"{self.method} (through TURN relay {relay}; {where} lets no UDP out)"
        why = {
            Method.DIRECT: "both NATs map endpoint-independently",
            Method.FANOUT: "birthday punching; this NAT maps per destination, so many sockets each open a "
            "mapping toward the peer",
            Method.SPRAY: "birthday punching; the peer's NAT maps per destination, so random ports of its "
            "address are probed",
            Method.RELAY: f"through TURN relay {self.relay or '(own allocation)'}; both NATs map per "
            "destination",
            Method.IPV6: f"both sides have IPv6, which needs no NAT traversal: the peer at {self.ipv6}",
            Method.LAN: "both sides share a public address, and a NAT that does not hairpin drops what is "
            f"sent there: the peer's LAN endpoints ({', '.join(map(str, self.hosts)) or 'none named'}) are "
            "raced with the direct path",
        }[self.method]
        if self.hosts and self.method is not Method.LAN:
            why += f"; the peer's LAN endpoints ({', '.join(map(str, self.hosts))}) are raced with it"
        if self.ipv6 is not None and self.method is not Method.IPV6:
            when = "raced with it" if self.races_ipv6 else "tried first"
            why += f"; the peer's IPv6 endpoint {self.ipv6} is {when}"
        return f"{self.method} ({why})"


class NoPath(Exception):
    """No way through: str() says why, for a refusal or an exit code."""


def choose(mine: Reach, theirs: Reach | None, *, own_relay: bool, shared_address: bool = False) -> Plan:
    """The plan for this side (`_choose4`'s for IPv4), with the peer's IPv6 endpoint where both sides have
    IPv6: raced, tried first, or (no way through IPv4 without a relay) the only way."""
    ipv6 = theirs.v6 if theirs is not None and mine.v6 is not None else None
    try:
        plan = _choose4(mine, theirs, own_relay=own_relay, shared_address=shared_address)
    except NoPath:
        if ipv6 is None:
            raise
        return Plan(Method.IPV6, ipv6=ipv6)
    return plan if ipv6 is None else dataclasses.replace(plan, ipv6=ipv6)


def _choose4(mine: Reach, theirs: Reach | None, *, own_relay: bool, shared_address: bool) -> Plan:
    """The plan for this side. `theirs` is None for a plexus 2.2 peer (no X-Plexus-Reach header), whose NAT
    is endpoint-independent (2.2 refuses any other); `own_relay`: this side has allocated a relay (mine.relay)
    or can allocate one now; `shared_address`: both outer endpoints have the same address (one NAT, or one
    carrier NAT, in front of both), whatever their NATs' mappings.

    A side that lets no UDP out ("blocked") is reached only through the relay it allocated (over TCP or TLS):
    it talks through its own allocation, the peer sends to that relay, never directly. Two such sides each
    talk through their own, each toward the other's relayed endpoint (the outer endpoint each offered)."""
    if mine.mapping == "blocked":
        if theirs is None:
            raise NoPath("no UDP gets out here and the peer (plexus 2.2) can only punch directly")
        if not own_relay:
            raise NoPath(
                "no UDP gets out here and this side has no TURN relay over TCP or TLS (--turn-server)"
            )
        return Plan(Method.RELAY, blocked="here")
    if theirs is not None and theirs.mapping == "blocked":
        if theirs.relay is None:  # Reach.parse refuses it: a programming error, not the peer's
            raise NoPath("the peer lets no UDP out and names no relay")
        return Plan(Method.RELAY, relay=theirs.relay, blocked="peer")
    if theirs is None:
        if mine.mapping == "dependent":
            raise NoPath("this NAT maps per destination and the peer (plexus 2.2) can only punch directly")
        return Plan(Method.DIRECT, peer_reflexive=False)
    if shared_address:
        return Plan(Method.LAN, hosts=theirs.hosts)
    if mine.mapping == "independent" and theirs.mapping == "independent":
        return Plan(Method.DIRECT, hosts=theirs.hosts)  # a LAN between them may be shorter: raced
    if mine.mapping == "dependent" and theirs.mapping == "independent":
        return Plan(Method.FANOUT)
    if mine.mapping == "independent":
        return Plan(Method.SPRAY)
    if theirs.relay is not None:
        return Plan(Method.RELAY, relay=theirs.relay)
    if own_relay:
        return Plan(Method.RELAY)
    raise NoPath(
        "both NATs map per destination (symmetric) and neither side has a TURN relay (--turn-server)"
    )
