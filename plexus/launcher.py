"""Start the user's command once the hole is open, and stop the one a previous session started.

The argument template is pure (parse_args, expand_args); start() is the thin process driver. The command runs
detached in its own session and process group so that it outlives an inviter that exits right after launching
it (cron use), and so that stopping it reaches everything it started (exec.sh and its openvpn). The punching
socket is already closed so the command can bind the same inner endpoint.

A session replaces the previous one by default: a Slot file remembers the command's process (pid and start
time, so a later process that got the same pid is never taken for it), and the next session stops that
process group before it binds the inner port. This survives the inviter's exit and an acceptor's restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from plexus import events, files
from plexus.endpoint import Endpoint
from plexus.errors import LaunchError, UsageError

log = logging.getLogger(__name__)

# Without --exec-args the command gets the endpoints in this order, as plexus 2.2 passes them.
DEFAULT_ARGS = "%innerip% %innerport% %outerip% %outerport% %peerip% %peerport% %secret%"
SECRET = "%secret%"
# How long a previous session's command gets to end after SIGTERM before SIGKILL.
STOP_GRACE = 3.0
KILL_WAIT = 2.0
_POLL = 0.02


@dataclass(frozen=True)
class Tunnel:
    """What a finished session knows: the endpoints the command needs and the shared secret."""

    inner: Endpoint
    outer: Endpoint
    peer: Endpoint
    secret: int = field(repr=False)  # a tunnel printed or logged must not show it (the wildcard %secret%)
    path: str = "direct"  # how the packets go (plexus/path.py's Method): direct, lan, ipv6, fan-out, ...
    # Carried (--carry): the command talks to plexus on loopback (`peer`); the peer's endpoint beyond it
    far: Endpoint | None = None
    # The peer's name (plexus/peers.py): which peer an acceptor's command serves, %peer% and PLEXUS_PEER
    peer_name: str = ""

    @property
    def family(self) -> socket.AddressFamily:
        """The address family of a socket on `inner`: IPv6 where the IPv6 way won."""
        return socket.AF_INET6 if ":" in self.inner.host else socket.AF_INET

    def wildcards(self) -> dict[str, str]:
        return {
            "%innerip%": self.inner.host,
            "%innerport%": str(self.inner.port),
            "%outerip%": self.outer.host,
            "%outerport%": str(self.outer.port),
            "%peerip%": self.peer.host,
            "%peerport%": str(self.peer.port),
            SECRET: str(self.secret),
            "%peer%": self.peer_name,
        }

    def environment(self) -> dict[str, str]:
        """The same values as PLEXUS_INNERIP ... PLEXUS_SECRET (unlike arguments, not visible in `ps`), the
        path as PLEXUS_PATH, and where plexus carries the datagrams (--carry) the peer's endpoint beyond it
        as PLEXUS_FARIP and PLEXUS_FARPORT (a command that decides a role by the endpoints, as exec.sh
        does, compares its outer endpoint with that, which is what the peer's command sees as its own)."""
        values = {f"PLEXUS_{name.strip('%').upper()}": value for name, value in self.wildcards().items()}
        far = (
            {} if self.far is None else {"PLEXUS_FARIP": self.far.host, "PLEXUS_FARPORT": str(self.far.port)}
        )
        return values | {"PLEXUS_PATH": self.path} | far


@dataclass(frozen=True)
class Command:
    path: str
    words: tuple[str, ...] = tuple(shlex.split(DEFAULT_ARGS))  # --exec-args, split, wildcards unexpanded
    pwd: Path | None = None
    log_file: Path | None = None


def parse_args(template: str | None) -> tuple[str, ...]:
    """Split --exec-args with shell rules, at start: a bad template is found before any mail leaves."""
    try:
        return tuple(shlex.split(DEFAULT_ARGS if template is None else template))
    except ValueError as error:
        raise UsageError(f"cannot split --exec-args: {error}") from error


def expand_args(words: tuple[str, ...], tunnel: Tunnel, *, redact: bool = False) -> list[str]:
    """Replace wildcards inside each word; `redact` keeps the secret's wildcard, for the log."""
    values = tunnel.wildcards()
    if redact:
        values[SECRET] = SECRET
    expanded = []
    for word in words:
        for wildcard, value in values.items():
            word = word.replace(wildcard, value)
        expanded.append(word)
    return expanded


def start(command: Command, tunnel: Tunnel) -> subprocess.Popen[bytes]:
    """Start the command detached; raises LaunchError when it cannot be started at all."""
    argv = [command.path, *expand_args(command.words, tunnel)]
    try:
        if command.log_file is not None:
            files.create_private(command.log_file)  # removed since the check at start: made private again
        output = open(command.log_file, "ab") if command.log_file else subprocess.DEVNULL  # noqa: SIM115
    except OSError as error:
        raise LaunchError(f"cannot open --exec-log-file {command.log_file}: {error.strerror}") from error
    try:
        process = subprocess.Popen(
            argv,
            cwd=command.pwd,
            env=os.environ | tunnel.environment(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    except OSError as error:
        raise LaunchError(f"cannot start {command.path}: {error.strerror or error}") from error
    finally:
        if not isinstance(output, int):
            output.close()
    shown = shlex.join([command.path, *expand_args(command.words, tunnel, redact=True)])
    whom = f"{tunnel.peer_name} at {tunnel.peer}" if tunnel.peer_name else str(tunnel.peer)
    log.info("launched %s (pid %d) for %s", shown, process.pid, whom)
    return process


async def watch(process: subprocess.Popen[bytes], grace: float | None = None) -> int | None:
    """Log the command's exit status; with a grace period, stop watching after it (the command lives on)."""
    try:
        await asyncio.wait_for(_exited(process), grace)
    except TimeoutError:
        log.info("command (pid %d) is running", process.pid)
        return None
    status = process.wait()
    level = logging.INFO if status == 0 else logging.WARNING
    log.log(level, "command (pid %d) exited with status %d", process.pid, status)
    return status


async def _exited(process: subprocess.Popen[bytes]) -> None:
    # A pidfd turns readable when the process ends: the loop waits on it, no thread is left blocking in wait()
    # (a thread would keep asyncio.run from returning while the detached command runs on).
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:  # already reaped (stopped by this process meanwhile)
        return
    ended = loop.create_future()
    loop.add_reader(pidfd, lambda: None if ended.done() else ended.set_result(None))
    try:
        await ended
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


@dataclass(frozen=True)
class Running:
    """A launched command's process group, named by its leader's pid and start time."""

    pid: int
    started: int  # clock ticks after boot (/proc/PID/stat field 22): tells this process from a later one

    @classmethod
    def of(cls, pid: int) -> Running | None:
        started = _start_time(pid)
        return None if started is None else cls(pid, started)

    def alive(self) -> bool:
        """Whether the group still has a running member (it may outlive its leader). A pid cannot be reused
        while a group of that number exists, so a leader with another start time means the group is gone."""
        started = _start_time(self.pid)
        if started is not None and started != self.started:
            return False
        return bool(group_members(self.pid))

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM to the whole group, SIGKILL to what is left after the grace period; returns once gone."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
            if not self.alive():
                return
            log.info("stopping the previous command (pid %d) with %s", self.pid, sig.name)
            events.emit(events.Stopped, pid=self.pid, signal=sig.name)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
                os.killpg(self.pid, signal.SIGCONT)  # a stopped (frozen) process acts on SIGTERM only then
            until = time.monotonic() + wait
            while time.monotonic() < until:
                # Our own child stays a zombie, still counted in its group, until it is reaped here.
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, os.WNOHANG)
                if not self.alive():
                    return
                await asyncio.sleep(_POLL)
        log.warning("the previous command (pid %d) did not end after SIGKILL", self.pid)


def _stat(entry: Path) -> list[str] | None:
    """/proc/PID/stat's fields after the command name: state, ppid, pgrp, ... (proc(5) field 3 onwards)."""
    try:
        return (entry / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time; None when it is gone or a zombie (ended, whoever has yet to reap it)."""
    fields = _stat(Path(f"/proc/{pid}"))
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def group_members(pgid: int) -> list[int]:
    """The running (not zombie) processes of a process group. Zombies count as gone: an init that is slow to
    reap orphans would otherwise hold up every stop."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry)
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


class Slot:
    """The file that names the command of the last session between one host id and one peer id."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_session(cls, role: str, host_id: str, peer_id: str) -> Slot:
        return cls(state_dir() / f"{role}-{safe_name(host_id)}-{safe_name(peer_id)}.json")

    def load(self) -> Running | None:
        try:
            data = json.loads(self.path.read_text())
            return Running(int(data["pid"]), int(data["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, pid: int) -> None:
        running = Running.of(pid)
        if running is None:
            return  # ended at once: nothing to stop next time
        files.make_folders(self.path.parent)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"pid": running.pid, "started": running.started}))
        temporary.replace(self.path)

    async def stop_previous(self, grace: float = STOP_GRACE) -> None:
        """Stop the command the last session left running, if it still runs; then forget it."""
        previous = self.load()
        if previous is not None:
            await previous.stop(grace)
        self.forget()

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)


def safe_name(name: str) -> str:
    """A host or peer id as part of a file name in state_dir(): nothing that could leave the folder."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def state_dir() -> Path:
    """Where Slot files live: /run/plexus for root, the user's runtime (or state) directory otherwise."""
    if os.geteuid() == 0:
        return Path("/run/plexus")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "plexus"
    return Path.home() / ".local" / "state" / "plexus"


def check_executable(path: str) -> None:
    """Refuse early, before any mail is sent, when the command cannot be run."""
    if os.sep in path:
        if os.path.isdir(path):
            raise UsageError(f"--exec-command {path} is a directory, not a program")
        if not os.path.isfile(path):
            raise UsageError(f"--exec-command {path} does not exist")
        if not os.access(path, os.X_OK):
            raise UsageError(f"--exec-command {path} is not executable")
    elif shutil.which(path) is None:  # which() skips folders and files without the x bit, as exec would
        raise UsageError(f"--exec-command {path} is not found in PATH")


def check_log_file(path: Path) -> None:
    """The command's log file must be writable (made 0600 if missing: the command may print its secret)
    before any mail is sent."""
    try:
        files.create_private(path)
    except OSError as error:
        raise UsageError(f"cannot write --exec-log-file {path}: {error.strerror}") from error
    if (warning := files.readable_by_others(path)) is not None:
        log.warning("--exec-log-file %s", warning)
