"""The reconnect loop across the lab's real NATs and servers: a new session replaces the command the last one
left holding the fixed inner port, an acceptor that cannot serve refuses at once, and exit codes and signals
tell a script the truth."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from plexus.endpoint import Endpoint
from plexus.errors import ExitCode
from plexus.mediator import Mediator, Offer
from plexus.options import Options, mail_config
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus, Side

pytestmark = pytest.mark.lab

HOLD = sessions.HOLD
FIXED_PORT = "40000"
LAUNCHED = (HOLD.name,)  # stopped after each test by the `running` fixture (tests/conftest.py)


def holders(lab: Lab, host: str) -> list[int]:
    """The hold.py processes running in that host's namespace."""
    return sessions.pids_of(lab, host, HOLD.name)


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def hold_options(port: str = FIXED_PORT) -> dict[str, str]:
    return {"stun-client": f"0.0.0.0:{port}", "exec-command": str(HOLD)}


def test_a_reconnect_replaces_the_commands_still_holding_the_fixed_ports(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    acceptor, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running, overrides=hold_options())
    took, first = [], None
    for _ in range(3):
        started = time.monotonic()
        invite = sessions.start(lab, inviter, acceptor_side, tmp_path, accept=False, overrides=hold_options())
        running.append(invite)
        code = invite.wait(60)
        assert code == 0, f"inviter exited {code}: {invite.stderr()}\n{invite.log()}\n{acceptor.log()}"
        took.append(time.monotonic() - started)
        wait_for(lambda: len(holders(lab, "b")) == 1 and len(holders(lab, "a")) == 1)
        now = (holders(lab, "a"), holders(lab, "b"))
        assert now != first, "each session's commands replace the last ones"
        first = now
    assert invite.events("stopped") and acceptor.events("stopped")
    # "Normal time": the replacing sessions take no longer than the first, which found both ports free.
    assert max(took[1:]) < took[0] + 2.0, took


def test_an_acceptor_that_cannot_bind_refuses_at_once(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    acceptor, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running, overrides=hold_options())
    # Another program (not a plexus session's command) takes the acceptor's inner port.
    squatter = lab.popen(
        "b",
        [sys.executable, str(HOLD), "0.0.0.0", FIXED_PORT, "-", "0", "-", "0", "0"],
        stdout=subprocess.PIPE,
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline()
        invite, code, took = sessions.invite_once(lab, inviter, acceptor_side, tmp_path, running)
        assert (code, took < 10) == (ExitCode.PEER_REFUSED, True), took
        message = invite.stderr()
        assert message.count("\n") == 1 and "cannot serve" in message and "cannot bind" in message, message
        assert acceptor.process.poll() is None
    finally:
        squatter.kill()
        squatter.wait()


def test_a_command_that_fails_at_once_fails_the_inviter(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    _, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running)
    invite = sessions.start(
        lab, inviter, acceptor_side, tmp_path, accept=False, overrides={"exec-command": "false"}
    )
    running.append(invite)
    assert invite.wait(60) == ExitCode.COMMAND_FAILED
    message = invite.stderr()
    assert message.count("\n") == 1 and "exited with status 1" in message, message


@pytest.mark.parametrize(
    ("signum", "code", "line"),
    [
        (signal.SIGINT, ExitCode.INTERRUPTED, "interrupted"),
        (signal.SIGTERM, ExitCode.TERMINATED, "terminated"),
    ],
    ids=["sigint", "sigterm"],
)
@pytest.mark.parametrize("phase", ["stun", "mail", "handshake"])
async def test_a_signal_in_each_waiting_phase_of_the_inviter(
    lab: Lab, tmp_path: Path, running: list[Plexus], phase: str, signum: int, code: ExitCode, line: str
) -> None:
    inviter, acceptor_side = sessions.pair(lab)
    acceptor: asyncio.Future[None] | None = None
    # A STUN server that does not answer: STUN waits out its retransmissions (about 10 s).
    silent_stun = {"stun-server": f"{Lab.STUN_PRIMARY.host}:9"} if phase == "stun" else {}
    if phase == "handshake":  # the response names an endpoint where nobody answers: the handshake waits
        listening = threading.Event()
        dead_end = Endpoint(lab.public_ip("b"), 9)
        acceptor = asyncio.ensure_future(
            lab.call("b", lambda: answer_once(lab, acceptor_side, inviter, dead_end, listening))
        )
        await asyncio.to_thread(wait_for, listening.is_set)
    try:
        invite = sessions.start(lab, inviter, acceptor_side, tmp_path, accept=False, overrides=silent_stun)
        running.append(invite)
        # The event that ends the phase before: the session is in `phase` from then on.
        name, fields = {
            "stun": ("started", {}),
            "mail": ("sent", {"kind": "request"}),
            "handshake": ("chosen", {}),
        }[phase]
        await asyncio.to_thread(invite.wait_events, name, **fields)
        if phase == "stun":
            await asyncio.sleep(0.5)
            assert not invite.events("discovered")  # still waiting for STUN
        invite.process.send_signal(signum)
        assert invite.wait(5) == code
        assert invite.stderr() == f"plexus: {line}\n"
    finally:
        if acceptor is not None:
            await acceptor


async def answer_once(lab: Lab, me: Side, peer: Side, outer: Endpoint, listening: threading.Event) -> None:
    """Play the acceptor for one request, answering with `outer` as its endpoint."""
    given = sessions.options(lab, me, peer)
    async with Mediator(mail_config(Options(given, {}))) as mediator:
        await mediator.ready()
        listening.set()
        async for invitation in mediator.requests():
            await mediator.answer(invitation, Offer(outer, 1))
            return


@pytest.mark.parametrize("phase", ["waiting", "serving"])
def test_sigterm_stops_the_acceptor_within_a_second(
    lab: Lab, tmp_path: Path, running: list[Plexus], phase: str
) -> None:
    acceptor, inviter, acceptor_side = sessions.accepting(lab, tmp_path, running, overrides=hold_options())
    if phase == "serving":  # a session's command runs: the acceptor stops it too
        invite = sessions.start(
            lab, inviter, acceptor_side, tmp_path, accept=False, overrides=hold_options("0")
        )
        running.append(invite)
        assert invite.wait(60) == 0, invite.stderr()
        wait_for(lambda: len(holders(lab, "b")) == 1)
    started = time.monotonic()
    acceptor.process.send_signal(signal.SIGTERM)
    assert acceptor.wait(5) == 0
    assert time.monotonic() - started < 1.0
    assert acceptor.stderr() == ""
    assert "Traceback" not in acceptor.log()
    assert holders(lab, "b") == []


def test_sigint_interrupts_the_acceptor(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    acceptor, _, _ = sessions.accepting(lab, tmp_path, running)
    acceptor.process.send_signal(signal.SIGINT)
    assert acceptor.wait(5) == ExitCode.INTERRUPTED
    assert acceptor.stderr() == "plexus: interrupted\n"


def test_as_pid_1_sigterm_still_stops_the_acceptor(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    """In a container plexus is PID 1, which the kernel spares every signal it has no handler for."""
    container = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
    acceptor, _, _ = sessions.accepting(lab, tmp_path, running, wrapper=container)
    [plexus] = Path(f"/proc/{acceptor.process.pid}/task/{acceptor.process.pid}/children").read_text().split()
    status = Path(f"/proc/{plexus}/status").read_text()
    assert re.search(r"^NSpid:\s+\d+\s+1$", status, re.MULTILINE), status
    os.kill(int(plexus), signal.SIGTERM)
    assert acceptor.wait(5) == 0  # unshare exits with plexus's status
    assert acceptor.stderr() == ""
