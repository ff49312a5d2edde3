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
