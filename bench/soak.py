"""The reconnect soak: the loop plexus exists for, many times over, with real OpenVPN through exec.sh.

Host b runs `plexus --accept` with a fixed inner port; host a is the laptop, whose cron runs plexus-reconnect.
Each cycle breaks a's tunnel, in turn by killing its openvpn (the tunnel is gone) or by freezing it with
SIGSTOP (a stale tunnel: the process lives on and holds the inner port), then runs the cron recipe once and
times until a ping crosses the new tunnel. At the end it counts what is left: plexus's mail in each mailbox,
tun devices and openvpn processes on each host, and the acceptor's memory before and after.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab import sessions, tunnel
from tests.lab.lab import Lab
from tests.lab.mailbox import Mailbox

INNER_PORT = "40000"
RESTORE_TIMEOUT = 60.0
BREAKS = ("killed", "stale")


@dataclass(frozen=True)
class Cycle:
    broken: str  # how a's tunnel was broken: killed or stale
    code: int  # plexus-reconnect's exit code
    restore_seconds: float | None  # from running the recipe until a ping crossed; None: not restored


@dataclass
class Soak:
    cycles: list[Cycle] = field(default_factory=list)
    messages_left: dict[str, int] = field(default_factory=dict)  # plexus mail of this pair, per mailbox
    tun_devices: dict[str, int] = field(default_factory=dict)
    openvpn_processes: dict[str, int] = field(default_factory=dict)
    acceptor_rss_before: int = 0
    acceptor_rss_after: int = 0

    @property
    def restored(self) -> list[float]:
        return [cycle.restore_seconds for cycle in self.cycles if cycle.restore_seconds is not None]

    def to_json(self) -> dict[str, Any]:
        restored = self.restored
        return {
            "cycles": len(self.cycles),
            "restored": len(restored),
            "restore_median_seconds": round(statistics.median(restored), 3) if restored else None,
            "restore_max_seconds": round(max(restored), 3) if restored else None,
            "per_cycle": [
                {
                    "broken": c.broken,
                    "code": c.code,
                    "seconds": None if c.restore_seconds is None else round(c.restore_seconds, 3),
                }
                for c in self.cycles
            ],
            "messages_left": self.messages_left,
            "tun_devices": self.tun_devices,
            "openvpn_processes": self.openvpn_processes,
            "acceptor_rss_before_bytes": self.acceptor_rss_before,
            "acceptor_rss_after_bytes": self.acceptor_rss_after,
        }


def soak(lab: Lab, workdir: Path, cycles: int, on_cycle: Callable[[int, Cycle], None] | None = None) -> Soak:
    folders = tunnel.pinned_pair(workdir)
    inviter, acceptor_side = sessions.pair(lab)
    options = {"stun-client": f"0.0.0.0:{INNER_PORT}", "exec-command": str(tunnel.EXEC_SH),
               "exec-args": tunnel.SIX_ARGS}  # fmt: skip
    acceptor = sessions.start(lab, acceptor_side, inviter, workdir, accept=True, overrides=options,
                              env={"PLEXUS_OPENVPN_DIR": str(folders[1])})  # fmt: skip
    laptop = tunnel.Laptop(lab, workdir, inviter, acceptor_side, folders[0], options)
    result = Soak()
    try:
        sessions.wait_until_listening(acceptor)
        first = laptop.reconnect()
        if first != 0 or tunnel.first_ping(lab, time.monotonic() + RESTORE_TIMEOUT) is None:
            raise RuntimeError(f"soak: the first session did not give a tunnel (exit {first})")
        result.acceptor_rss_before = rss(acceptor.process.pid)
        for number in range(cycles):
            broken = BREAKS[number % len(BREAKS)]
            for pid in sessions.pids_of(lab, "a", "openvpn"):
                os.kill(pid, signal.SIGKILL if broken == "killed" else signal.SIGSTOP)
            started = time.monotonic()
            code = laptop.reconnect()
            crossed = tunnel.first_ping(lab, started + RESTORE_TIMEOUT) if code == 0 else None
            cycle = Cycle(broken, code, time.monotonic() - started if crossed else None)
            result.cycles.append(cycle)
            if on_cycle is not None:
                on_cycle(number + 1, cycle)
        result.acceptor_rss_after = rss(acceptor.process.pid)
        time.sleep(1.0)  # the last inviter's mailbox clean-up runs after its exit code is known
        subjects = (inviter.host_id, acceptor_side.host_id)
        for account in {inviter.account, acceptor_side.account}:
            box = Mailbox(lab, account)
            result.messages_left[account.login] = sum(len(box.with_subject(subject)) for subject in subjects)
        for host in ("a", "b"):
            result.tun_devices[host] = len(lab.exec(host, ["ip", "-o", "link", "show", "type", "tun"]).stdout
                                           .splitlines())  # fmt: skip
            result.openvpn_processes[host] = len(sessions.pids_of(lab, host, "openvpn"))
    finally:
        acceptor.stop()
        for pid in sessions.pids_of(lab, "a", "openvpn"):
            os.kill(pid, signal.SIGKILL)
    return result


def rss(pid: int) -> int:
    """Resident memory in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
