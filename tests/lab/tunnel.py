"""OpenVPN through exec/exec.sh in the lab: pinned key folders, the tunnel's addresses, a ping
across it, and the cron recipe (plexus-reconnect) run on the inviter's host as cron runs it. The OpenVPN tests
and the benchmark's reconnect soak share these."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.lab import sessions
from tests.lab.lab import Lab, LabError
from tests.lab.sessions import Side

EXEC_SH = sessions.EXEC_SH
RECONNECT = sessions.EXAMPLES / "plexus-reconnect"
DEV = "plexus0"  # exec.sh's default tun device
SIX_ARGS = "%innerip% %innerport% %outerip% %outerport% %peerip% %peerport%"  # the recommended --exec-args


def exec_sh(
    *args: str, directory: Path | None = None, as_nobody: bool = False, path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The script run here; `path` goes first on PATH (a stand-in openvpn)."""
    env = os.environ | ({"PLEXUS_OPENVPN_DIR": str(directory)} if directory else {})
    if path is not None:
        env["PATH"] = f"{path}:{env['PATH']}"
    if not as_nobody:
        return subprocess.run([str(EXEC_SH), *args], env=env, capture_output=True, text=True, timeout=30)
    # As nobody the script comes on stdin: the clone may sit in a folder only root can enter (mktemp -d).
    nobody = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    argv = [*prefix, "bash", "-s", "--", *args]
    return subprocess.run(
        argv, env=env, input=EXEC_SH.read_text(), capture_output=True, text=True, timeout=30
    )


def init(directory: Path) -> str:
    """This host's fingerprint, from `exec.sh init DIR`."""
    done = exec_sh("init", str(directory))
    if done.returncode != 0:
        raise LabError(f"exec.sh init {directory} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def pinned_pair(workdir: Path) -> tuple[Path, Path]:
    """Two hosts' key folders after `exec.sh init` on each and the fingerprints swapped."""
    folders = workdir / "openvpn-a", workdir / "openvpn-b"
    fingerprints = [init(folder) for folder in folders]
    (folders[0] / "peer-fingerprint").write_text(f"# b's, copied by hand\n{fingerprints[1].lower()}\n")
    (folders[1] / "peer-fingerprint").write_text(fingerprints[0] + "\n")
    return folders


def launch(lab: Lab, host: str, folder: Path, log: Path, *endpoints: str) -> subprocess.Popen[bytes]:
    """exec.sh on the host as plexus launches it with the six recommended arguments (SIX_ARGS), without
    plexus: what it would pass, given by hand."""
    with log.open("ab") as out:
        return lab.popen(
            host,
            [str(EXEC_SH), *endpoints],
            env=os.environ | {"PLEXUS_OPENVPN_DIR": str(folder)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def tun_addresses(lab: Lab, host: str) -> tuple[str, str] | None:
    """(own, far) once openvpn has configured the device: `inet 10.255.0.1 peer 10.255.0.2/32`."""
    shown = lab.exec(host, ["ip", "-4", "-o", "addr", "show", "dev", DEV]).stdout
    match = re.search(r"inet (\S+) peer (\S+)/", shown)
    return (match.group(1), match.group(2)) if match else None


def first_ping(lab: Lab, deadline: float) -> tuple[str, str] | None:
    """a's tunnel addresses (own, far) once a ping from a crosses the tunnel, or None at the deadline."""
    while time.monotonic() < deadline:
        addresses = tun_addresses(lab, "a")
        if addresses and tun_addresses(lab, "b"):
            if lab.exec("a", ["ping", "-n", "-c", "1", "-W", "1", addresses[1]]).returncode == 0:
                return addresses
        else:
            time.sleep(0.1)
    return None


class Laptop:
    """Host a as the README's cron setup has it: a config file, and plexus-reconnect run with it. The logger
    the script calls writes to a file here, and `plexus` is this checkout as the lab runs it."""

    def __init__(self, lab: Lab, workdir: Path, me: Side, peer: Side, folder: Path, options: dict[str, str]):
        self.lab, self.workdir = lab, workdir
        self.config = workdir / "laptop.conf"
        self.log_file, self.exec_log = workdir / "laptop.log", workdir / "laptop.exec.log"
        values = sessions.options(lab, me, peer) | options
        values |= {"log-level": "debug", "log-file": str(self.log_file), "exec-log-file": str(self.exec_log)}
        self.config.write_text("".join(f"{name} = {value}\n" for name, value in values.items()))
        self.config.chmod(0o600)
        tools = workdir / "bin"
        tools.mkdir()
        self._logged = workdir / "logged"
        (tools / "logger").write_text(f'#!/bin/sh\necho "$*" >> {self._logged}\n')
        (tools / "plexus").write_text(
            f'#!/bin/sh\ncd {sessions.ROOT} && exec {sys.executable} -m plexus "$@"\n'
        )
        for tool in tools.iterdir():
            tool.chmod(0o755)
        self.env = os.environ | {"PATH": f"{tools}:{os.environ['PATH']}", "PLEXUS_OPENVPN_DIR": str(folder)}

    def reconnect(self, **extra: str) -> int:
        """Run the cron recipe once; its exit code (plexus's, or 0 for a healthy tunnel)."""
        done = self.lab.exec("a", [str(RECONNECT), str(self.config)], env=self.env | extra, timeout=120)
        return done.returncode

    def logged(self) -> list[str]:
        return self._logged.read_text().splitlines() if self._logged.exists() else []
