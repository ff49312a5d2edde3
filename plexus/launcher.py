"""Start the user's command once the hole is open.

The argument template is pure (expand_args); start() is the thin process driver. The command runs detached in
its own session so that it outlives an inviter that exits right after launching it (cron use), and the
punching socket is already closed so the command can bind the same inner endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from plexus.endpoint import Endpoint
from plexus.errors import LaunchError, UsageError

log = logging.getLogger(__name__)

# Without --exec-args the command gets the endpoints in this order, as plexus 2.2 passes them.
DEFAULT_ARGS = "%innerip% %innerport% %outerip% %outerport% %peerip% %peerport% %secret%"


@dataclass(frozen=True)
class Tunnel:
    """What a finished session knows: the endpoints the command needs and the shared secret."""

    inner: Endpoint
    outer: Endpoint
    peer: Endpoint
    secret: int

    def wildcards(self) -> dict[str, str]:
        return {
            "%innerip%": self.inner.host,
            "%innerport%": str(self.inner.port),
            "%outerip%": self.outer.host,
            "%outerport%": str(self.outer.port),
            "%peerip%": self.peer.host,
            "%peerport%": str(self.peer.port),
            "%secret%": str(self.secret),
        }


@dataclass(frozen=True)
class Command:
    path: str
    args: str | None = None  # shell-split template with %wildcards%
    pwd: Path | None = None
    log_file: Path | None = None


def expand_args(template: str | None, tunnel: Tunnel) -> list[str]:
    """Split the template with shell rules, then replace wildcards inside each word."""
    try:
        words = shlex.split(DEFAULT_ARGS if template is None else template)
    except ValueError as error:
        raise LaunchError(f"cannot split --exec-args: {error}") from error
    values = tunnel.wildcards()
    expanded = []
    for word in words:
        for wildcard, value in values.items():
            word = word.replace(wildcard, value)
        expanded.append(word)
    return expanded


def start(command: Command, tunnel: Tunnel) -> subprocess.Popen[bytes]:
    """Start the command detached; raises LaunchError when it cannot be started at all."""
    argv = [command.path, *expand_args(command.args, tunnel)]
    try:
        output = open(command.log_file, "ab") if command.log_file else subprocess.DEVNULL  # noqa: SIM115
    except OSError as error:
        raise LaunchError(f"cannot open --exec-log-file {command.log_file}: {error.strerror}") from error
    try:
        process = subprocess.Popen(
            argv,
            cwd=command.pwd,
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
    log.info("launched %s (pid %d) for peer %s", shlex.join(argv), process.pid, tunnel.peer)
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
    pidfd = os.pidfd_open(process.pid)
    ended = loop.create_future()
    loop.add_reader(pidfd, lambda: None if ended.done() else ended.set_result(None))
    try:
        await ended
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def check_executable(path: str) -> None:
    """Refuse early, before any mail is sent, when the command cannot be run."""
    if os.sep in path:
        if not os.path.isfile(path):
            raise UsageError(f"--exec-command {path} does not exist")
        if not os.access(path, os.X_OK):
            raise UsageError(f"--exec-command {path} is not executable")
    elif not any(
        os.access(os.path.join(folder, path), os.X_OK)
        for folder in os.environ.get("PATH", "").split(os.pathsep)
    ):
        raise UsageError(f"--exec-command {path} is not found in PATH")
