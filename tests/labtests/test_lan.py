"""Issue 18: two hosts on one LAN behind one router that does not hairpin (b and c behind nat-b). Aimed at
each other's public endpoint, the shared WAN address, their packets end at the router; each side's host
candidate (its LAN address, in its Reach) is raced with that direct path and gets through."""

from __future__ import annotations

from pathlib import Path

import pytest

from plexus.identity import Identity
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus

pytestmark = pytest.mark.lab

TIMEOUT = {"handshake-timeout": "20"}  # the cron job: a failure must not hold the test up for 60 s


def _at_home(
    lab: Lab, tmp_path: Path, running: list[Plexus], invited: dict[str, str], inviting: dict[str, str]
) -> tuple[Plexus, Plexus, float]:
    """b accepts, c (on b's LAN) invites once: both commands launched and each heard the other."""
    return sessions.hello_session(lab, tmp_path, running, invited, inviting, host="c")


@pytest.mark.parametrize("pinned", [False, True], ids=["anonymous-mail", "pinned-mail"])
def test_same_lan_without_hairpin_connects_over_the_lan(
    lab: Lab, tmp_path: Path, running: list[Plexus], pinned: bool
) -> None:
    invited, inviting = TIMEOUT, TIMEOUT
    if pinned:
        home, laptop = Identity.load(tmp_path / "b.key"), Identity.load(tmp_path / "c.key")
        invited = TIMEOUT | {"identity": str(tmp_path / "b.key"), "peer-identity": laptop.id}
        inviting = TIMEOUT | {"identity": str(tmp_path / "c.key"), "peer-identity": home.id}
    acceptor, invite, took = _at_home(lab, tmp_path, running, invited, inviting)
    mine, theirs = invite.wait_hello()[0], acceptor.wait_hello()[0]
    assert (mine["args"]["peerip"], theirs["args"]["peerip"]) == (lab.inner_ip("b"), lab.inner_ip("c"))
    assert mine["args"]["peerport"] == theirs["args"]["innerport"]
    for side in (invite, acceptor):
        assert [event["way"] for event in side.events("chosen")] == ["lan"], side.events()
        assert [event["way"] for event in side.events("connected")] == ["lan"], side.events()
    # The response always names the acceptor's host candidate. The request names the inviter's only when the
    # mail is pinned: anonymous, the inviter cannot know its peer is not plexus 2.2, and the acceptor takes
    # the inviter's LAN source once its handshake packet authenticates.
    assert lab.inner_ip("b") in invite.events("chosen")[0]["why"]
    assert (lab.inner_ip("c") in acceptor.events("chosen")[0]["why"]) == pinned
    print(f"same LAN, no hairpin, {'pinned' if pinned else 'anonymous'} mail: over the LAN in {took:.1f} s")


def test_same_lan_behind_a_symmetric_nat_needs_no_relay(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    """Behind a NAT that maps per destination, two hosts of one LAN had only a relay (none here: the acceptor
    refused, exit 11); the LAN candidate is tried before any birthday or relay."""
    lab.set_nat("b", "symmetric")
    acceptor, invite, took = _at_home(lab, tmp_path, running, TIMEOUT, TIMEOUT)
    for side in (invite, acceptor):
        assert [event["way"] for event in side.events("connected")] == ["lan"], side.events()
    print(f"same LAN behind a symmetric NAT: over the LAN in {took:.1f} s")
