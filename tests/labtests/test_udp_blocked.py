"""A network that lets no UDP out (tests/lab's block_udp: the host's router drops every UDP packet from its
LAN; TCP, so mail and TURN over TCP or TLS, passes): with a TURN relay over TCP or TLS the side goes
relay-only, in both roles, and its command still gets its datagrams; without one it exits UDP_BLOCKED, naming
the fix; a STUN server that is down is told apart (exit 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from plexus.errors import ExitCode
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus, turn

pytestmark = pytest.mark.lab


def connects(invite: Plexus, code: int, acceptor: Plexus) -> None:
    assert code == 0, f"inviter exited {code}: {invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    a, b = invite.wait_hello()[0], acceptor.wait_hello()[0]
    assert a["received"] and b["received"], f"{a}\n{b}"


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_an_inviter_that_no_udp_leaves_connects_through_its_relay(
    lab: Lab, tmp_path: Path, running: list[Plexus], transport: str
) -> None:
    lab.block_udp("a")
    acceptor, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running)  # no relay of its own
    invite, code, took = sessions.invite_once(
        lab, inviter, acceptor_side, tmp_path, running, overrides=turn(lab, transport=transport)
    )
    connects(invite, code, acceptor)
    assert [e["mapping"] for e in invite.events("discovered")] == ["blocked"]
    assert [e["way"] for e in invite.events("connected")] == ["relay"]
    # the acceptor sent to the relay the request named, not toward a's NAT
    assert [e["why"] for e in acceptor.events("chosen")][-1].endswith("the peer's network lets no UDP out)")
    print(f"no UDP out of a: connected through TURN over {transport.upper()} in {took:.1f} s")
    assert took < 9.5  # the relay-only verdict came once TCP answered, not after STUN's whole 9.5 s


def test_an_acceptor_that_no_udp_leaves_serves_through_its_relay(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    lab.block_udp("b")
    acceptor, inviter, acceptor_side = sessions.accepting(
        lab, tmp_path, running, overrides=turn(lab, transport="tls")
    )
    invite, code, took = sessions.invite_once(lab, inviter, acceptor_side, tmp_path, running)
    connects(invite, code, acceptor)
    assert [e["way"] for e in acceptor.events("connected")] == ["relay"]
    assert [e["why"] for e in invite.events("chosen")][-1].endswith("the peer's network lets no UDP out)")
    print(f"no UDP out of b: served through TURN over TLS in {took:.1f} s")


def test_no_udp_out_and_no_relay_is_its_own_exit_code_and_names_the_fix(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    lab.block_udp("a")
    _, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running)
    invite, code, took = sessions.invite_once(lab, inviter, acceptor_side, tmp_path, running)
    message = invite.stderr()
    print(f"exit {code} in {took:.1f} s: {message.strip()}")
    assert code == ExitCode.UDP_BLOCKED, message
    assert message.count("\n") == 1 and "answers over TCP but not over UDP" in message
    assert "--turn-server turns:" in message
    assert not invite.events("sent")  # found before any mail left


def test_a_stun_server_that_is_down_is_not_taken_for_blocked_udp(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    _, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running)
    lab.stop_stun()
    invite, code, _ = sessions.invite_once(lab, inviter, acceptor_side, tmp_path, running)
    message = invite.stderr()
    print(f"exit {code}: {message.strip()}")
    assert code == ExitCode.STUN_FAILED, message
    assert message.count("\n") == 1 and "nor over TCP: is the server down?" in message


def test_two_networks_that_let_no_udp_out_meet_relay_to_relay(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    """Each side talks through its own allocation toward the other's relayed endpoint (the outer endpoint each
    offered); each forwarder carries its command's datagrams."""
    lab.block_udp("a")
    lab.block_udp("b")
    acceptor, inviter, acceptor_side = sessions.accepting(
        lab, tmp_path, running, overrides=turn(lab, transport="tls")
    )
    invite, code, took = sessions.invite_once(
        lab, inviter, acceptor_side, tmp_path, running, overrides=turn(lab, transport="tcp")
    )
    connects(invite, code, acceptor)
    for side in (invite, acceptor):
        assert [e["way"] for e in side.events("connected")] == ["relay"]
        assert [e["why"] for e in side.events("chosen")][-1].endswith("this network lets no UDP out)")
    print(f"no UDP out of either: relay to relay in {took:.1f} s")
