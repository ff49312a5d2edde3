"""Issue 18, IPv6: every lab host has a global IPv6 address behind its router's stateful firewall (no NAT66),
and coturn answers on IPv6 too. Given the STUN server by a name with A and AAAA records (Lab.STUN_NAME, in the
hosts' /etc/netns files), each side learns its IPv6 endpoint beside its IPv4 one and offers it (`v6=` in its
Reach); where both have one, IPv6 is raced with a direct path, tried before the birthday or a relay, and is
the only way between two symmetric IPv4 NATs without a relay. The command then gets plain IPv6 addresses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus

pytestmark = pytest.mark.lab

TIMEOUT = {"handshake-timeout": "20", "response-timeout": "15"}
DUAL_STACK = {"stun-server": Lab.STUN_NAME} | TIMEOUT


def _session(
    lab: Lab, tmp_path: Path, running: list[Plexus], options: dict[str, str]
) -> tuple[Plexus, Plexus, float]:
    return sessions.hello_session(lab, tmp_path, running, options, options)


def _ways(plexus: Plexus) -> list[str]:
    return [event["way"] for event in plexus.events("connected")]


def test_two_symmetric_nats_with_ipv6_beside_connect_over_ipv6(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    """The issue's case: both IPv4 NATs symmetric and no relay, which IPv4 alone refuses; IPv6 needs none.
    The command gets the IPv6 endpoints, plain (no brackets), in its arguments and PLEXUS_* alike."""
    for host in ("a", "b"):
        lab.set_nat(host, "symmetric")
    acceptor, invite, took = _session(lab, tmp_path, running, DUAL_STACK)
    assert [event["way"] for event in invite.events("chosen")] == ["ipv6"]
    assert _ways(invite) == _ways(acceptor) == ["ipv6"]
    mine, theirs = invite.wait_hello()[0]["args"], acceptor.wait_hello()[0]["args"]
    a6, b6 = lab.inner_ip6("a"), lab.inner_ip6("b")
    assert (mine["innerip"], mine["outerip"], mine["peerip"]) == (a6, a6, b6), mine
    assert (theirs["innerip"], theirs["outerip"], theirs["peerip"]) == (b6, b6, a6), theirs
    assert mine["peerport"] == theirs["outerport"] and theirs["peerport"] == mine["outerport"]
    discovered = invite.events("discovered")[0]
    assert discovered["outer6"] == f"[{a6}]:{mine['innerport']}", discovered
    print(f"symmetric x symmetric over IPv6: {took:.2f} s")


def test_without_ipv6_the_same_pair_is_refused_as_before(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    """The same two NATs, the STUN server given by its IPv4 address: no IPv6 candidate, and IPv4 alone has
    no way without a relay (exit 11 at the inviter, the acceptor's refusal)."""
    for host in ("a", "b"):
        lab.set_nat(host, "symmetric")
    _acceptor, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running, overrides=TIMEOUT)
    invite, code, _ = sessions.invite_once(lab, inviter, acceptor_side, tmp_path, running, overrides=TIMEOUT)
    assert code == 11, f"inviter exited {code}: {invite.stderr()}"
    assert "both NATs map per destination" in invite.stderr()


def test_cone_nats_race_ipv6_with_the_direct_path_and_both_sides_agree(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    """Both ways work: one handshake races them and the acceptor's choice settles both sides on one pair."""
    acceptor, invite, took = _session(lab, tmp_path, running, DUAL_STACK)
    (chosen,) = invite.events("chosen")
    assert chosen["way"] == "direct" and "IPv6 endpoint" in chosen["why"] and "raced" in chosen["why"]
    assert _ways(invite) == _ways(acceptor)
    assert _ways(invite)[0] in ("direct", "ipv6")
    mine, theirs = invite.wait_hello()[0]["args"], acceptor.wait_hello()[0]["args"]
    assert (":" in mine["peerip"]) == (_ways(invite)[0] == "ipv6") == (":" in theirs["peerip"])
    print(f"cone x cone, dual stack: {_ways(invite)[0]} in {took:.2f} s")


def test_ipv6_goes_before_the_birthday_and_the_relay(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    """A symmetric inviter against a cone acceptor would take the birthday; with IPv6 on both, IPv6 is tried
    first and wins, and the relay (both have one) is never needed."""
    lab.set_nat("a", "symmetric")
    options = DUAL_STACK | sessions.turn(lab)
    acceptor, invite, _ = _session(lab, tmp_path, running, options)
    assert [event["way"] for event in invite.events("chosen")] == ["fan-out"]
    assert _ways(invite) == _ways(acceptor) == ["ipv6"]
    assert not invite.events("fell_back") and not acceptor.events("fell_back")


def test_a_firewall_that_drops_ipv6_falls_back_to_ipv4(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    """UDP between the sites dropped (both families) and both NATs symmetric with a relay: IPv6 gets
    IPV6_BOUND, then the relay carries the session."""
    for host in ("a", "b"):
        lab.set_nat(host, "symmetric")
    lab.separate()
    started = time.monotonic()
    acceptor, invite, took = _session(lab, tmp_path, running, DUAL_STACK | sessions.turn(lab))
    assert _ways(invite) == _ways(acceptor) == ["relay"]
    assert [event["way"] for event in invite.events("fell_back")] == ["ipv6"]
    assert time.monotonic() - started < 20
    print(f"IPv6 dropped, then the relay: {took:.2f} s")


def test_one_side_without_ipv6_connects_over_ipv4_as_before(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    lab.set_ipv6("a", False)
    acceptor, invite, _ = _session(lab, tmp_path, running, DUAL_STACK)
    (chosen,) = invite.events("chosen")
    assert chosen["way"] == "direct" and "IPv6" not in chosen["why"]
    assert _ways(invite) == _ways(acceptor) == ["direct"]
    assert invite.events("discovered")[0]["outer6"] is None


def test_a_port_alone_binds_both_families_on_it(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    """--stun-client PORT: both punching sockets on that port, so the command's port is the same whichever
    family wins; here IPv6 does (both NATs symmetric)."""
    for host in ("a", "b"):
        lab.set_nat(host, "symmetric")
    _acceptor, invite, _ = _session(lab, tmp_path, running, DUAL_STACK | {"stun-client": "41234"})
    mine = invite.wait_hello()[0]["args"]
    assert (mine["innerip"], mine["innerport"]) == (lab.inner_ip6("a"), "41234")
