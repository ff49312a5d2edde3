"""The delay wire (tests/lab/wire.py): Lab.set_link's delay on kernels without netem."""

from __future__ import annotations

import contextlib
import re
import subprocess
from pathlib import Path

import pytest

from tests.lab import sessions
from tests.lab.lab import Lab

pytestmark = pytest.mark.lab

DELAY_MS = 25


def min_rtt_ms(lab: Lab, host: str) -> float:
    ping = lab.exec(host, ["ping", "-n", "-q", "-c", "5", "-i", "0.2", "-W", "2", Lab.MAIL_HOST])
    assert ping.returncode == 0, ping.stdout + ping.stderr
    match = re.search(r"= ([\d.]+)/", ping.stdout)
    assert match, ping.stdout
    return float(match.group(1))


def relays(lab: Lab) -> list[int]:
    """The delay wires' relay processes: they run in inet's namespace."""
    pids = subprocess.run(["ip", "netns", "pids", lab.netns("inet")], capture_output=True, text=True).stdout
    found = []
    for pid in pids.split():
        with contextlib.suppress(OSError):
            if b"tests.lab.wire" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
    return found


def test_a_delayed_link_delays_both_ways_and_comes_back(lab: Lab) -> None:
    lab.set_link("a", delay_ms=DELAY_MS)
    rtt = min_rtt_ms(lab, "a")
    assert 2 * DELAY_MS <= rtt < 2 * DELAY_MS + 10
    assert min_rtt_ms(lab, "b") < 5, "only host a's link is delayed"
    assert len(relays(lab)) == (0 if lab.netem_available else 1)
    lab.set_link("a", delay_ms=5)  # a new delay replaces the wire
    assert 10 <= min_rtt_ms(lab, "a") < 20
    lab.set_link("a")
    assert relays(lab) == []
    assert min_rtt_ms(lab, "a") < 5


def test_plexus_connects_across_two_delayed_links(lab: Lab, tmp_path: Path) -> None:
    for host in ("a", "b"):
        lab.set_link(host, delay_ms=DELAY_MS)
    inviter_side, acceptor_side = sessions.pair(lab)
    acceptor = sessions.start(lab, acceptor_side, inviter_side, tmp_path, accept=True)
    try:
        sessions.wait_until_listening(acceptor)
        invite = sessions.start(lab, inviter_side, acceptor_side, tmp_path, accept=False)
        code = invite.wait(90)
        assert code == 0, f"{invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
        heard = invite.wait_hello()[0]["received"], acceptor.wait_hello()[0]["received"]
        assert all(heard), heard
    finally:
        acceptor.stop()
