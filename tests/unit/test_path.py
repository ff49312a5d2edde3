"""The decision table: this side's NAT mapping x the peer's (and the relays) -> how to punch."""

from __future__ import annotations

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
