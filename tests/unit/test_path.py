"""The decision table: this side's NAT mapping x the peer's (and the relays) -> how to punch."""

from __future__ import annotations

import re

import pytest

from plexus import path
from plexus.endpoint import Endpoint
from plexus.path import Method, Plan
from plexus.rendezvous import Reach

EIM, EDM = Reach("independent"), Reach("dependent")
RELAY = Endpoint("203.0.113.10", 49152)


@pytest.mark.parametrize(
    ("mine", "theirs", "own_relay", "plan"),
    [
        (EIM, EIM, False, Plan(Method.DIRECT)),
        (EIM, None, False, Plan(Method.DIRECT, peer_reflexive=False)),  # a plexus 2.2 peer
        (EDM, EIM, False, Plan(Method.FANOUT)),
        (EIM, EDM, False, Plan(Method.SPRAY)),
        (EIM, Reach("dependent", RELAY), False, Plan(Method.SPRAY)),  # a relay is only for when it must
        (EDM, Reach("dependent", RELAY), False, Plan(Method.RELAY, relay=RELAY)),
        (EDM, Reach("dependent", RELAY), True, Plan(Method.RELAY, relay=RELAY)),  # the peer's, already there
        (EDM, EDM, True, Plan(Method.RELAY)),
    ],
)
def test_the_decision_table(mine: Reach, theirs: Reach | None, own_relay: bool, plan: Plan) -> None:
    assert path.choose(mine, theirs, own_relay=own_relay) == plan


LAN = (Endpoint("10.0.2.2", 41002),)


@pytest.mark.parametrize("mine", [EIM, EDM])
@pytest.mark.parametrize(
    "theirs", [EIM, EDM, Reach("independent", hosts=LAN), Reach("dependent", RELAY, hosts=LAN)]
)
def test_a_shared_public_address_races_the_lan(mine: Reach, theirs: Reach) -> None:
    """Whatever the mappings: a NAT that does not hairpin defeats them all, the LAN does not."""
    plan = path.choose(mine, theirs, own_relay=False, shared_address=True)
    assert plan == Plan(Method.LAN, hosts=theirs.hosts)
    assert plan.describe().startswith("lan (both sides share a public address")
    assert (str(LAN[0]) in plan.describe()) == bool(theirs.hosts)


def test_a_2_2_peer_never_gets_the_lan() -> None:
    assert path.choose(EIM, None, own_relay=False, shared_address=True) == Plan(
        Method.DIRECT, peer_reflexive=False
    )


@pytest.mark.parametrize(("mine", "theirs"), [(EDM, EDM), (EDM, None)])
def test_no_path(mine: Reach, theirs: Reach | None) -> None:
    with pytest.raises(path.NoPath):
        path.choose(mine, theirs, own_relay=False)


def test_the_two_sides_agree() -> None:
    """Each pair of mappings gives mirror-image plans: fan-out meets spray, relay meets relay."""
    mirror = {Method.DIRECT: Method.DIRECT, Method.FANOUT: Method.SPRAY, Method.SPRAY: Method.FANOUT}
    for a in (EIM, EDM):
        for b in (EIM, EDM):
            if a is EDM and b is EDM:
                continue
            assert (
                path.choose(b, a, own_relay=False).method == mirror[path.choose(a, b, own_relay=False).method]
            )


BLOCKED = Reach("blocked", RELAY)


@pytest.mark.parametrize(
    ("mine", "theirs", "plan"),
    [
        # no UDP gets out here: through this side's own relay, whatever the peer's NAT, even toward a peer
        # that brought a relay of its own (this side could not reach it but through its own)
        (Reach("blocked"), EIM, Plan(Method.RELAY, blocked="here")),
        (Reach("blocked"), Reach("dependent", RELAY), Plan(Method.RELAY, blocked="here")),
        (Reach("blocked"), BLOCKED, Plan(Method.RELAY, blocked="here")),
        # the peer's network lets no UDP out: to its relay, never a direct or birthday path
        (EIM, BLOCKED, Plan(Method.RELAY, relay=RELAY, blocked="peer")),
        (EDM, BLOCKED, Plan(Method.RELAY, relay=RELAY, blocked="peer")),
    ],
)
def test_a_side_that_lets_no_udp_out_is_reached_through_its_relay(
    mine: Reach, theirs: Reach, plan: Plan
) -> None:
    assert path.choose(mine, theirs, own_relay=True) == plan
    if plan.relay is not None:  # the peer's relay is taken whether or not this side has one
        assert path.choose(mine, theirs, own_relay=False) == plan
    assert "lets no UDP out" in plan.describe()


@pytest.mark.parametrize(
    ("theirs", "own_relay", "why"),
    [
        (None, True, "the peer (plexus 2.2) can only punch directly"),
        (EIM, False, "no TURN relay over TCP or TLS"),
    ],
)
def test_no_udp_out_and_no_way(theirs: Reach | None, own_relay: bool, why: str) -> None:
    with pytest.raises(path.NoPath, match=re.escape(why)):
        path.choose(Reach("blocked"), theirs, own_relay=own_relay)


MY6, THEIR6 = Endpoint("2001:db8:a::2", 5000), Endpoint("2001:db8:b::2", 5000)


@pytest.mark.parametrize(
    ("mine", "theirs", "own_relay", "method", "races"),
    [
        (EIM, EIM, False, Method.DIRECT, True),  # raced in the direct handshake
        (EDM, EIM, False, Method.FANOUT, False),  # tried first, then the birthday
        (EIM, EDM, False, Method.SPRAY, False),
        (EDM, EDM, True, Method.RELAY, False),  # tried first, then the relay
        (EDM, EDM, False, Method.IPV6, False),  # the only way: IPv4 has none without a relay
    ],
)
def test_both_sides_with_ipv6_add_it_to_every_plan(
    mine: Reach, theirs: Reach, own_relay: bool, method: Method, races: bool
) -> None:
    plan = path.choose(Reach(mine.mapping, v6=MY6), Reach(theirs.mapping, v6=THEIR6), own_relay=own_relay)
    assert (plan.method, plan.ipv6, plan.races_ipv6) == (method, THEIR6, races)
    assert str(THEIR6) in plan.describe()
    # the mirror image: the peer's plan races or goes first exactly as this side's
    back = path.choose(Reach(theirs.mapping, v6=THEIR6), Reach(mine.mapping, v6=MY6), own_relay=own_relay)
    assert back.races_ipv6 == races


@pytest.mark.parametrize(
    ("mine", "theirs"),
    [
        (Reach("independent", v6=MY6), EIM),  # the peer has no IPv6
        (EIM, Reach("independent", v6=THEIR6)),  # this side has none
        (Reach("independent", v6=MY6), None),  # plexus 2.2: never anything new
    ],
)
def test_ipv6_needs_both_sides(mine: Reach, theirs: Reach | None) -> None:
    assert path.choose(mine, theirs, own_relay=False).ipv6 is None


def test_lan_and_ipv6_race_in_one_handshake() -> None:
    plan = path.choose(
        Reach("dependent", v6=MY6),
        Reach("dependent", hosts=LAN, v6=THEIR6),
        own_relay=False,
        shared_address=True,
    )
    assert (plan.method, plan.hosts, plan.ipv6, plan.races_ipv6) == (Method.LAN, LAN, THEIR6, True)


def test_a_direct_plan_races_the_peers_lan_endpoints_too() -> None:
    """Two hosts on one LAN need not share an outer address (two uplinks, a VPN): the LAN is raced anyway."""
    plan = path.choose(EIM, Reach("independent", hosts=LAN), own_relay=False)
    assert (plan.method, plan.hosts, plan.races_lan) == (Method.DIRECT, LAN, True)
    assert str(LAN[0]) in plan.describe()
    assert not path.choose(EIM, None, own_relay=False).races_lan  # never toward plexus 2.2
