"""Every pair of the lab's NAT modes connects, in both roles: directly where both map endpoint-independently,
by birthday punching where one maps per destination, through the lab's TURN relay where both do; and the
launched commands exchange datagrams on every path (docs/nat.md, the decision table)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from plexus import path
from plexus.errors import ExitCode
from plexus.rendezvous import Reach
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus, turn

pytestmark = pytest.mark.lab

MODES = ("none", "cone", "fullcone", "symmetric")


def mapping(mode: str) -> Reach:
    return Reach("dependent" if mode == "symmetric" else "independent")


@pytest.mark.parametrize("acceptor_mode", MODES)
@pytest.mark.parametrize("inviter_mode", MODES)
def test_every_pair_of_nats_connects(
    lab: Lab, tmp_path: Path, running: list[Plexus], inviter_mode: str, acceptor_mode: str
) -> None:
    lab.set_nat("a", inviter_mode)
    lab.set_nat("b", acceptor_mode)
    acceptor, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running, overrides=turn(lab))
    started = time.monotonic()
    invite = sessions.start(lab, inviter, acceptor_side, tmp_path, accept=False, overrides=turn(lab))
    running.append(invite)
    code = invite.wait(90)
    took = time.monotonic() - started
    assert code == 0, f"inviter exited {code}: {invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    a, b = invite.wait_hello()[0], acceptor.wait_hello()[0]
    assert a["received"] and b["received"], f"{a}\n{b}"
    expected = path.choose(mapping(inviter_mode), mapping(acceptor_mode), own_relay=True)
    chosen = [(event["way"], event["why"]) for event in invite.events("chosen")]
    # the acceptor names its LAN endpoint, which a direct plan races: the why says so after the table's
    assert [way for way, _ in chosen] == [expected.method], chosen
    assert chosen[0][1].startswith(expected.describe().rstrip(")")), chosen
    print(f"{inviter_mode} -> {acceptor_mode}: {expected.method} in {took:.1f} s")


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_two_symmetric_nats_connect_through_a_relay_over_tcp_and_tls(
    lab: Lab, tmp_path: Path, running: list[Plexus], transport: str
) -> None:
    """Only the inviter's leg to the relay is a stream: its allocation carries the handshake and then the
    command's datagrams, both ways."""
    for host in ("a", "b"):
        lab.set_nat(host, "symmetric")
    acceptor, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running, overrides=turn(lab))
    options = turn(lab, transport=transport)
    invite, code, took = sessions.invite_once(
        lab, inviter, acceptor_side, tmp_path, running, overrides=options
    )
    assert code == 0, f"inviter exited {code}: {invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    a, b = invite.wait_hello()[0], acceptor.wait_hello()[0]
    assert a["received"] and b["received"], f"{a}\n{b}"
    assert [event["way"] for event in invite.events("connected")] == ["relay"], invite.events()
    assert f"over {transport.upper()}" in invite.log()
    print(f"symmetric -> symmetric through TURN over {transport.upper()} in {took:.1f} s")


def test_two_symmetric_nats_without_a_relay_are_refused_at_once(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    for host in ("a", "b"):
        lab.set_nat(host, "symmetric")
    _, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running)
    invite, code, took = sessions.invite_once(lab, inviter, acceptor_side, tmp_path, running)
    assert (code, took < 10) == (ExitCode.PEER_REFUSED, True), took
    message = invite.stderr()
    assert message.count("\n") == 1 and "--turn-server" in message, message


def test_a_wrong_turn_password_has_its_exit_code(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    lab.set_nat("a", "symmetric")
    _, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running)
    invite = sessions.start(
        lab, inviter, acceptor_side, tmp_path, accept=False, overrides=turn(lab, password="wrong")
    )
    running.append(invite)
    assert invite.wait(60) == ExitCode.TURN_AUTH
    message = invite.stderr()
    assert message.count("\n") == 1 and "password" in message, message
    assert not invite.events("sent")  # found before any mail left


@pytest.mark.parametrize("modes", [("cone", "cone"), ("symmetric", "cone"), ("cone", "symmetric")])
def test_a_failed_direct_attempt_falls_back_to_the_relay(
    lab: Lab, tmp_path: Path, running: list[Plexus], modes: tuple[str, str]
) -> None:
    """A firewall between the sites defeats every direct path; the relay one side allocated carries it."""
    for host, mode in zip(("a", "b"), modes, strict=True):
        lab.set_nat(host, mode)
    lab.separate()
    acceptor, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running, overrides=turn(lab))
    invite = sessions.start(lab, inviter, acceptor_side, tmp_path, accept=False, overrides=turn(lab))
    running.append(invite)
    code = invite.wait(90)
    assert code == 0, f"inviter exited {code}: {invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    a, b = invite.wait_hello()[0], acceptor.wait_hello()[0]
    assert a["received"] and b["received"], f"{a}\n{b}"
    assert invite.events("fell_back") and acceptor.events("fell_back")
    assert [event["way"] for event in invite.events("connected")] == ["relay"], invite.events()
