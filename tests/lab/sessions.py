"""Real plexus processes on the lab's hosts: the demo, the end-to-end tests and the benchmark share this.

Each side is a `python -m plexus` process in its host's namespace, talking to the lab's coturn, SMTP server
and Dovecot; the launched command is exec/hello.py unless a test says otherwise, and its one
JSON line of output (the arguments it got, what it heard from the peer) is the proof that traffic crossed both
NATs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plexus import events
from tests.lab.lab import Account, Lab, stop_process

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "exec"
HELLO = EXAMPLES / "hello.py"
HOLD = Path(__file__).resolve().parent / "hold.py"  # a command that holds its inner port until stopped
EXEC_SH = EXAMPLES / "exec.sh"


@dataclass(frozen=True)
class Side:
    host: str  # "a" or "b"
    account: Account
    host_id: str


@dataclass
class Plexus:
    """A running plexus process and the files it writes."""

    side: Side
    process: subprocess.Popen[str]
    log_file: Path
    exec_log: Path
    events_file: Path
    started: float = field(default_factory=time.monotonic)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        stop_process(self.process)

    def stderr(self) -> str:
        assert self.process.stderr is not None
        return self.process.stderr.read() if self.process.poll() is not None else ""

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The session events it wrote (plexus/events.py), oldest first; those called `name`, if given."""
        return [event for event in events.read(self.events_file) if name is None or event["event"] == name]

    def matching(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        """Its events called `name` whose fields have the given values."""
        return [event for event in self.events(name) if all(event.get(k) == v for k, v in fields.items())]

    def wait_events(
        self, name: str, count: int = 1, timeout: float = 20.0, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait until it has written `count` events called `name` with those fields; returns them all. A
        process that exits first fails the wait (an inviter's events are all written by then)."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.process.poll() is not None  # before the read: what it wrote before exiting counts
            found = self.matching(name, **fields)
            if len(found) >= count:
                return found
            if exited or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.side.host}: {len(found)} of {count} {name} events {fields or ''} "
                    f"{'before it exited' if exited else f'within {timeout} s'}\nevents: {self.events()}"
                )
            time.sleep(0.05)

    def rejected(self, containing: str = "") -> list[str]:
        """Why it rejected messages (mail or DHT values): each reason, or those containing the text."""
        return [event["reason"] for event in self.events("rejected") if containing in event["reason"]]

    def wait_rejected(self, containing: str, count: int = 1, timeout: float = 20.0) -> list[str]:
        """Wait until it has rejected `count` messages for a reason containing the text."""
        deadline = time.monotonic() + timeout
        while len(self.rejected(containing)) < count:
            assert time.monotonic() < deadline, (
                f"{self.side.host}: not {count} rejections for {containing!r} within {timeout} s: "
                f"{self.rejected()}"
            )
            time.sleep(0.05)
        return self.rejected(containing)

    def hello_results(self) -> list[dict[str, Any]]:
        """The JSON lines exec/hello.py printed, one per launched command that has finished."""
        if not self.exec_log.exists():
            return []
        return [json.loads(line) for line in self.exec_log.read_text().splitlines() if line.startswith("{")]

    def wait_hello(self, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            results = self.hello_results()
            if len(results) >= count:
                return results
            time.sleep(0.05)
        raise AssertionError(
            f"{self.side.host}: {len(self.hello_results())} of {count} launched commands reported within "
            f"{timeout} s\nplexus log:\n{self.log()}"
        )


def turn(lab: Lab, password: str | None = None, transport: str = "udp") -> dict[str, str]:
    """The options for the lab's coturn, reached over `transport` (as --turn-server's URI says)."""
    account = lab.turn
    uri = {
        "udp": str(account.server),
        "tcp": f"turn:{account.server}?transport=tcp",
        "tls": f"turns:{account.server.host}:{Lab.TURNS_PORT}",
    }[transport]
    return {
        "turn-server": uri,
        "turn-user": account.user,
        "turn-passwd": password or account.password,
    } | ({"turn-ca": str(lab.ca_file)} if transport == "tls" else {})


def pair(lab: Lab, *, shared: bool = False) -> tuple[Side, Side]:
    """An inviter on host a and an acceptor on host b, with ids unique to this call (mail of other runs is
    never mistaken for ours): two accounts, or one shared mailbox."""
    tag = uuid.uuid4().hex[:8]
    accounts = (lab.accounts["shared"],) * 2 if shared else (lab.accounts["local"], lab.accounts["remote"])
    return Side("a", accounts[0], f"local-{tag}"), Side("b", accounts[1], f"remote-{tag}")


def options(lab: Lab, me: Side, peer: Side) -> dict[str, str]:
    """The options of one side, by plexus 2.2's names."""
    return {
        "host-id": me.host_id,
        "peer-id": peer.host_id,
        "stun-server": str(Lab.STUN_PRIMARY),
        "email-smtps": f"{Lab.MAIL_HOST}:{Lab.SMTPS_PORT}",
        "email-imaps": f"{Lab.MAIL_HOST}:{Lab.IMAPS_PORT}",
        "email-login": me.account.login,
        "email-passwd": me.account.password,
        "email-from": me.account.address,
        "email-to": peer.account.address,
        "email-ca": str(lab.ca_file),
        "exec-command": str(HELLO),
    }


def start(
    lab: Lab,
    me: Side,
    peer: Side,
    workdir: Path,
    *,
    accept: bool,
    overrides: Mapping[str, str | None] | None = None,
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
    wrapper: tuple[str, ...] = (),
    stdin: Any = subprocess.DEVNULL,
    text: bool = True,
) -> Plexus:
    """Start plexus on me.host. An override with an empty value is a bare flag, with None it removes the
    option; `argv` replaces the generated options entirely (for --config tests); `env` adds variables to
    its environment, which the launched command inherits; `wrapper` runs plexus under another command
    (unshare, say); `stdin` and `text` are for --stdio."""
    name = f"{me.host}-{'acceptor' if accept else 'inviter'}-{uuid.uuid4().hex[:4]}"
    log_file, exec_log = workdir / f"{name}.log", workdir / f"{name}.exec.log"
    events_file = workdir / f"{name}.events.jsonl"
    if argv is None:
        values: dict[str, str | None] = {**options(lab, me, peer), "log-level": "debug"}
        values |= {"log-file": str(log_file), "exec-log-file": str(exec_log)} | dict(overrides or {})
        argv = [
            f"--{key}={value}" if value else f"--{key}" for key, value in values.items() if value is not None
        ]
        argv += ["--accept"] if accept else []
    process = lab.popen(
        me.host,
        [*wrapper, sys.executable, "-m", "plexus", *argv],
        cwd=ROOT,
        # A crash in native code (OpenDHT's threads call back into Python) leaves every thread's Python stack
        # on stderr, which a failing test shows.
        env=os.environ | (env or {}) | {events.ENVIRONMENT: str(events_file), "PYTHONFAULTHANDLER": "1"},
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=text,
    )
    return Plexus(me, process, log_file, exec_log, events_file)


def accepting(lab: Lab, workdir: Path, running: list[Plexus], **kwargs: Any) -> tuple[Plexus, Side, Side]:
    """A fresh pair of ids and, for it, a listening acceptor on host b (in `running`, to be stopped):
    returns it, the inviter's side and the acceptor's. kwargs go to start()."""
    inviter, acceptor_side = pair(lab)
    acceptor = start(lab, acceptor_side, inviter, workdir, accept=True, **kwargs)
    running.append(acceptor)
    wait_until_listening(acceptor)
    return acceptor, inviter, acceptor_side


def invite_once(
    lab: Lab, me: Side, peer: Side, workdir: Path, running: list[Plexus], **kwargs: Any
) -> tuple[Plexus, int, float]:
    """Run an inviter on host a to its end (in `running`): it, its exit code and how long it took."""
    started = time.monotonic()
    invite = start(lab, me, peer, workdir, accept=False, **kwargs)
    running.append(invite)
    code = invite.wait(90)
    return invite, code, time.monotonic() - started


def hello_session(
    lab: Lab,
    workdir: Path,
    running: list[Plexus],
    acceptor_options: Mapping[str, str | None] | None = None,
    inviter_options: Mapping[str, str | None] | None = None,
    *,
    host: str = "a",
) -> tuple[Plexus, Plexus, float]:
    """b accepts, `host` invites once, each with its options; asserts that the inviter exited 0 and that both
    commands (hello.py) heard the other. Returns the acceptor, the inviter and how long the inviter took."""
    acceptor, inviter, acceptor_side = accepting(lab, workdir, running, overrides=acceptor_options)
    invite, code, took = invite_once(
        lab,
        dataclasses.replace(inviter, host=host),
        acceptor_side,
        workdir,
        running,
        overrides=inviter_options,
    )
    assert code == 0, f"inviter exited {code}: {invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    mine, theirs = invite.wait_hello()[0], acceptor.wait_hello()[0]
    assert mine["received"] and theirs["received"], f"{mine}\n{theirs}"
    return acceptor, invite, took


def pids_of(lab: Lab, host: str, name: str) -> list[int]:
    """The processes in that host's namespace only (pkill would see every namespace's) that run the program or
    script called `name` (argv[0], or the script an interpreter runs)."""
    found = []
    for pid in lab.exec(host, ["ip", "netns", "pids", lab.netns(host)]).stdout.split():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]
        except OSError:
            continue  # gone meanwhile
        if any(os.path.basename(word.decode(errors="replace")) == name for word in argv):
            found.append(int(pid))
    return found


def signal_launched(lab: Lab, host: str, name: str, sig: int = signal.SIGTERM) -> None:
    for pid in pids_of(lab, host, name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def started(acceptor: Plexus, timeout: float = 20.0) -> int | None:
    """None once the acceptor listens (its `listening` event), or its exit code if it quit first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if acceptor.events("listening"):
            return None
        if acceptor.process.poll() is not None:
            return acceptor.process.returncode
        time.sleep(0.05)
    raise AssertionError(f"acceptor not listening within {timeout} s\n{acceptor.log()}")


def wait_until_listening(acceptor: Plexus, timeout: float = 20.0) -> None:
    code = started(acceptor, timeout)
    if code is not None:
        raise AssertionError(f"acceptor exited {code}: {acceptor.stderr()}")
