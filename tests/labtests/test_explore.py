"""`plexus --explore --json` behind each lab NAT mode: the command a user runs to judge a network."""

from __future__ import annotations

import json
import sys

import pytest

from plexus.errors import ExitCode
from tests.lab import sessions
from tests.lab.lab import Lab

pytestmark = pytest.mark.lab

EASY = {"independent": "direct", "dependent": "spray"}  # the ways to each kind of peer (docs/nat.md)
HARD = {"independent": "fan-out", "dependent": "none (a TURN relay would: --turn-server)"}
EXPECTED = {
    "cone": {"nat": True, "mapping": "independent", "filtering": "address-and-port-dependent", "paths": EASY},
    "fullcone": {"nat": True, "mapping": "independent", "filtering": "independent", "paths": EASY},
    "symmetric": {
        "nat": True,
        "mapping": "address-and-port-dependent",
        "filtering": "address-and-port-dependent",
        "paths": HARD,
    },
    "none": {"nat": False, "mapping": "independent", "filtering": "independent", "paths": EASY},
}


def explore(lab: Lab, *args: str) -> tuple[int, str, str]:
    done = lab.exec(
        "a", [sys.executable, "-m", "plexus", "--explore", f"--stun-server={Lab.STUN_PRIMARY.host}", *args]
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_explore_json_reports_the_mode(lab: Lab, mode: str) -> None:
    lab.set_nat("a", mode)
    code, out, err = explore(lab, "--json", "--stun-client=0.0.0.0:41000")
    assert code == 0, err
    report = json.loads(out)
    assert {key: report[key] for key in EXPECTED[mode]} == EXPECTED[mode]
    assert report["inner"] == f"{lab.inner_ip('a')}:41000"
    assert report["outer"].split(":")[0] == lab.public_ip("a")
    if mode in ("cone", "fullcone", "none"):
        assert report["outer"] == f"{lab.public_ip('a')}:41000"


def test_explore_text_report(lab: Lab) -> None:
    code, out, _ = explore(lab)
    assert code == 0
    assert lab.public_ip("a") in out and "independent" in out


def test_explore_without_stun_answer_fails_with_one_line(lab: Lab) -> None:
    lab.stop_stun()
    try:
        code, out, err = explore(lab, "--json")
    finally:
        lab.start_stun()
    assert (code, out) == (ExitCode.STUN_FAILED, "")
    assert err.count("\n") == 1 and "no answer from STUN server 203.0.113.10:3478" in err


def test_explore_with_a_relay_reaches_every_peer(lab: Lab) -> None:
    lab.set_nat("a", "symmetric")
    turn = lab.turn
    code, out, err = explore(
        lab, f"--turn-server={turn.server}", f"--turn-user={turn.user}", f"--turn-passwd={turn.password}"
    )
    assert code == 0, err
    assert "per destination" in out and out.rstrip().endswith("relay"), out


def test_explore_says_whether_udp_gets_out_and_which_relay_transports_work(lab: Lab) -> None:
    options = [f"--{key}={value}" for key, value in sessions.turn(lab, transport="tls").items()]
    code, out, err = explore(lab, "--json", *options)
    assert code == 0, err
    report = json.loads(out)
    assert (report["udp"], report["relays"]) == (True, {"udp": "works", "tcp": "works", "tls": "works"}), out
    lab.block_udp("a")
    code, out, err = explore(lab, "--json", *options)
    assert code == 0, err
    report = json.loads(out)
    print(out)
    assert report["udp"] is False and "mapping" not in report
    assert report["relays"]["udp"].startswith("no: no answer from TURN server 203.0.113.10:3478")
    assert (report["relays"]["tcp"], report["relays"]["tls"]) == ("works", "works")
    assert report["paths"] == {"independent": "relay", "dependent": "relay"}
    code, out, _ = explore(lab)  # no relay to try
    assert code == 0
    assert "blocked: the STUN server answers over TCP only" in out and "turns:HOST" in out, out
