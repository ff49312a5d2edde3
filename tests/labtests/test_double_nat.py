"""Issue 18: a's home router (cone) behind a carrier NAT (Lab.double_nat), which maps endpoint-independently
like most CGNATs. Two endpoint-independent NATs in a row still map endpoint-independently, so a learns the
carrier's address from STUN and connects as from behind one NAT: directly to a cone peer, by birthday
punching (a spray over the symmetric NAT's ports) to a symmetric one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus

pytestmark = pytest.mark.lab

TIMEOUT = {"handshake-timeout": "20"}


@pytest.mark.parametrize(
    ("peer_nat", "ways"), [("cone", ("direct", "direct")), ("symmetric", ("spray", "fan-out"))]
)
def test_behind_a_carrier_nat_connects_without_a_relay(
    lab: Lab, tmp_path: Path, running: list[Plexus], peer_nat: str, ways: tuple[str, str]
) -> None:
    lab.double_nat()
    lab.set_nat("b", peer_nat)
    acceptor, invite, took = sessions.hello_session(lab, tmp_path, running, TIMEOUT, TIMEOUT)
    theirs = acceptor.wait_hello()[0]
    # b sees the carrier's address, not nat-a's: the session really crossed both NATs
    assert theirs["args"]["peerip"] == lab.public_ip("a") == "198.51.100.10"
    for side, way in zip((invite, acceptor), ways, strict=True):
        assert [event["way"] for event in side.events("connected")] == [way], side.events()
    print(f"double NAT -> {peer_nat}: {ways[0]} in {took:.1f} s")
