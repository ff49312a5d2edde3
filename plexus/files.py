"""Files that hold secrets or decide what runs: checked as ssh checks a private key, made private.

A config file names the command plexus runs (as root, under the systemd unit) and may hold the mail and TURN
passwords; an identity, S/MIME or mail client key proves who this host is. plexus refuses such a file when
another user could change it (owned by someone other than this user or root, or writable by group or others),
and a file holding a secret when group or others can read it, as ssh refuses an "UNPROTECTED PRIVATE KEY
FILE". Logs (--log-file, --exec-log-file) are made 0600, since a log at trace level may carry what the mail
servers were told; folders plexus makes are 0700.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

from plexus.errors import UsageError

PRIVATE = 0o600
PRIVATE_FOLDER = 0o700
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
_OTHERS_READ = stat.S_IRGRP | stat.S_IROTH


def check(info: os.stat_result, what: str, path: Path, *, holds: str | None) -> None:
    """Refuse the file another user could change or, when it `holds` a secret (named so), read.

    `what` names it in the message (`--config FILE`). Root reading a file others can read is no exception:
    the others still can read it.
    """
    if info.st_uid not in (os.geteuid(), 0):
        raise UsageError(
            f"{what} belongs to another user (uid {info.st_uid}), who could change it: it must be this "
            f"user's or root's (chown {os.geteuid()} {shlex.quote(str(path))})"
        )
    mode = stat.S_IMODE(info.st_mode)
    fix = f"chmod 600 {shlex.quote(str(path))}"
    if mode & _OTHERS_WRITE:
        raise UsageError(f"{what} is writable by group or others (mode {mode:04o}): {fix}")
    if holds is not None and mode & _OTHERS_READ:
        raise UsageError(f"{what} holds {holds} and is readable by group or others (mode {mode:04o}): {fix}")


def readable_by_others(path: Path) -> str | None:
    """A warning for an existing file others can read (a log kept where it was), else None."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if mode & _OTHERS_READ:
        return f"{path} is readable by group or others (mode {mode:04o}): chmod 600 {shlex.quote(str(path))}"
    return None


def create_private(path: Path) -> None:
    """Make the file 0600 if it is missing (an existing one keeps its mode), for a writer that opens it by
    name afterwards (logging.FileHandler, the command's output). OSError when it cannot be written."""
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PRIVATE))


def make_folders(folder: Path) -> None:
    """mkdir -p with every folder made 0700 (Path.mkdir(parents=True) gives the parents the default mode)."""
    missing = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    for parent in reversed(missing):
        try:
            parent.mkdir(mode=PRIVATE_FOLDER)
        except FileExistsError:  # made meanwhile (two first runs at once)
            if not parent.is_dir():
                raise
