"""plexus end to end: real processes on two NATed lab hosts, real mail and STUN servers, launched commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from plexus.endpoint import Endpoint
from plexus.errors import ExitCode
from plexus.mediator import Mediator, Offer
from plexus.options import Options, mail_config
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus, Side

pytestmark = pytest.mark.lab


def connect(
    lab: Lab, tmp_path: Path, running: list[Plexus], inviter: Side, acceptor_side: Side, **overrides: str
) -> tuple[Plexus, Plexus]:
    acceptor = sessions.start(lab, acceptor_side, inviter, tmp_path, accept=True, overrides=overrides)
    running.append(acceptor)
    sessions.wait_until_listening(acceptor)
    invite = sessions.start(lab, inviter, acceptor_side, tmp_path, accept=False, overrides=overrides)
    running.append(invite)
    code = invite.wait(90)
    assert code == 0, f"inviter exited {code}: {invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    return invite, acceptor


def assert_connected(lab: Lab, inviter: dict[str, Any], acceptor: dict[str, Any]) -> None:
    """Outer = the own NAT's public endpoint, peer = the other's, one secret, and each heard the other."""
    a, b = inviter["args"], acceptor["args"]
    assert (a["innerip"], a["outerip"]) == (lab.inner_ip("a"), lab.public_ip("a"))
    assert (b["innerip"], b["outerip"]) == (lab.inner_ip("b"), lab.public_ip("b"))
    assert (a["peerip"], a["peerport"]) == (b["outerip"], b["outerport"])
    assert (b["peerip"], b["peerport"]) == (a["outerip"], a["outerport"])
    assert a["secret"] == b["secret"]
    assert inviter["received"] == f"hello from {b['outerip']}:{b['outerport']} secret {b['secret']}"
    assert acceptor["received"] == f"hello from {a['outerip']}:{a['outerport']} secret {a['secret']}"


@pytest.mark.parametrize("shared", [False, True], ids=["two-accounts", "shared-mailbox"])
def test_inviter_and_acceptor_connect_and_launch(
    lab: Lab, tmp_path: Path, running: list[Plexus], shared: bool
) -> None:
    inviter, acceptor_side = sessions.pair(lab, shared=shared)
    invite, acceptor = connect(
        lab, tmp_path, running, inviter, acceptor_side, **{"stun-client": "0.0.0.0:40000"}
    )
    assert_connected(lab, invite.wait_hello()[0], acceptor.wait_hello()[0])
    assert invite.hello_results()[0]["args"]["innerport"] == "40000"


def test_a_session_reports_typed_events(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    """The events each side writes to PLEXUS_EVENTS (plexus/events.py): its phases in order, the path taken
    and its endpoints, and never the secret."""
    inviter, acceptor_side = sessions.pair(lab)
    invite, acceptor = connect(lab, tmp_path, running, inviter, acceptor_side)
    mine, theirs = invite.wait_hello()[0]["args"], acceptor.wait_hello()[0]["args"]
    names = ["started", "discovered", "sent", "answered", "chosen", "connected", "launched", "ended"]
    assert [event["event"] for event in invite.events()] == names
    served = [
        "started",
        "discovered",
        "listening",
        "requested",
        "discovered",
        "chosen",
        "sent",
        "connected",
        "launched",
    ]
    # The acceptor's session ends when its command does (hello.py exits on its own, any moment now).
    assert [event["event"] for event in acceptor.events() if event["event"] != "ended"] == served
    assert [event["kind"] for event in invite.events("sent") + acceptor.events("sent")] == [
        "request",
        "response",
    ]
    connected = invite.events("connected")[0]
    assert (connected["way"], connected["role"]) == ("direct", "invite")
    assert connected["peer"] == f"{theirs['outerip']}:{theirs['outerport']}"
    assert acceptor.events("requested")[0]["peer"] == f"{mine['outerip']}:{mine['outerport']}"
    assert acceptor.events("launched")[0]["pid"] > 0
    times = [event["at"] for event in invite.events()]
    assert times == sorted(times)
    written = invite.events_file.read_text() + acceptor.events_file.read_text()
    assert mine["secret"] not in written
    assert inviter.account.password not in written and acceptor_side.account.password not in written


def test_one_acceptor_serves_invites_in_a_row_and_at_once(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    inviter, acceptor_side = sessions.pair(lab)
    # Side by side: with the default (replace), the second session at once would end the first's command.
    keep = {"keep-sessions": ""}
    acceptor = sessions.start(lab, acceptor_side, inviter, tmp_path, accept=True, overrides=keep)
    running.append(acceptor)
    sessions.wait_until_listening(acceptor)
    for round_ in range(2):
        invite = sessions.start(lab, inviter, acceptor_side, tmp_path, accept=False)
        running.append(invite)
        assert invite.wait(90) == 0, invite.stderr()
        assert_connected(lab, invite.wait_hello()[0], acceptor.wait_hello(round_ + 1)[round_])
    together = [
        sessions.start(lab, inviter, acceptor_side, tmp_path, accept=False, overrides=keep) for _ in range(2)
    ]
    running.extend(together)
    assert [invite.wait(90) for invite in together] == [0, 0], [invite.stderr() for invite in together]
    results = acceptor.wait_hello(4)
    ports = {result["args"]["peerport"] for result in results[2:]}
    assert ports == {invite.wait_hello()[0]["args"]["outerport"] for invite in together}
    assert all(result["received"] for result in results)
    assert acceptor.process.poll() is None, "the acceptor loop must go on"


def test_wrong_mail_password_has_its_exit_code(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    inviter, acceptor_side = sessions.pair(lab)
    invite = sessions.start(
        lab, inviter, acceptor_side, tmp_path, accept=False, overrides={"email-passwd": "wrong"}
    )
    running.append(invite)
    assert invite.wait(60) == ExitCode.MAIL_AUTH
    assert invite.stderr().count("\n") == 1


def test_no_acceptor_means_mail_timeout(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    inviter, acceptor_side = sessions.pair(lab)
    invite = sessions.start(
        lab, inviter, acceptor_side, tmp_path, accept=False, overrides={"response-timeout": "3"}
    )
    running.append(invite)
    assert invite.wait(60) == ExitCode.MAIL_TIMEOUT
    assert "response" in invite.stderr()


def test_config_file_replaces_the_command_line(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    inviter, acceptor_side = sessions.pair(lab)
    config = tmp_path / "acceptor.conf"
    values = sessions.options(lab, acceptor_side, inviter) | {
        "exec-log-file": str(tmp_path / "config.exec.log"),
        "log-file": str(tmp_path / "config.log"),
    }
    config.write_text(
        "# the acceptor, all from a file\naccept = true\n"
        + "".join(f"{name} = {value}\n" for name, value in values.items())
    )
    config.chmod(0o600)
    acceptor = sessions.start(lab, acceptor_side, inviter, tmp_path, accept=True, argv=[f"--config={config}"])
    acceptor.log_file, acceptor.exec_log = tmp_path / "config.log", tmp_path / "config.exec.log"
    running.append(acceptor)
    sessions.wait_until_listening(acceptor)
    invite = sessions.start(lab, inviter, acceptor_side, tmp_path, accept=False)
    running.append(invite)
    assert invite.wait(90) == 0, invite.stderr()
    assert_connected(lab, invite.wait_hello()[0], acceptor.wait_hello()[0])


async def test_a_failing_session_never_stops_the_acceptor(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    inviter, acceptor_side = sessions.pair(lab)
    acceptor = sessions.start(
        lab, acceptor_side, inviter, tmp_path, accept=True, overrides={"handshake-timeout": "2"}
    )
    running.append(acceptor)
    sessions.wait_until_listening(acceptor)
    # A request naming an endpoint where nobody answers: the acceptor responds, then its handshake times out.
    given = sessions.options(lab, inviter, acceptor_side)
    mail = mail_config(Options(given, {}))
    dead_end = Endpoint(lab.public_ip("a"), 9)

    async def forged_invite() -> Offer:
        async with Mediator(mail) as mediator:
            return await mediator.invite(Offer(dead_end, 1234), timeout=30)

    await lab.call("a", forged_invite)
    (failed,) = acceptor.wait_events("failed", timeout=15)
    assert failed["error"].startswith("no handshake"), failed
    assert [event["peer"] for event in acceptor.events("requested")] == [str(dead_end)]
    invite = sessions.start(lab, inviter, acceptor_side, tmp_path, accept=False)
    running.append(invite)
    assert invite.wait(90) == 0, invite.stderr()
    assert_connected(lab, invite.wait_hello()[0], acceptor.wait_hello()[0])
