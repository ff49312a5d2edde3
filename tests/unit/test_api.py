"""The library's face: cheap to import, and explore's report as the CLI prints it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import plexus
from plexus import api, stun
from plexus.endpoint import Endpoint


def _report(mapping: stun.Behaviour | None) -> stun.NatReport:
    return stun.NatReport(
        Endpoint("10.0.0.2", 40000),
        Endpoint("198.51.100.2", 40000),
        True,
        mapping,
        "address-dependent",
        False,
    )


def test_import_plexus_loads_nothing_else() -> None:
    code = "import sys, plexus; print(' '.join(m for m in sys.modules if m.startswith('plexus')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["plexus"]


def test_the_library_names_come_from_api() -> None:
    assert (plexus.explore, plexus.invite, plexus.accept) == (api.explore, api.invite, api.accept)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = plexus.nothing  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("mapping", "relay", "expected"),
    [
        ("independent", False, {"independent": "direct", "dependent": "spray"}),
        ("dependent", False, {"independent": "fan-out", "dependent": api.NO_PATH}),
        ("dependent", True, {"independent": "fan-out", "dependent": "relay"}),
        (None, False, {"independent": "direct", "dependent": "spray"}),  # not tested: taken as punchable
    ],
)
def test_ways_through_follow_the_decision_table(
    mapping: stun.Behaviour | None, relay: bool, expected: dict[str, str]
) -> None:
    assert api.ways_through(_report(mapping), relay=relay) == expected


def test_the_exploration_reads_as_explore_prints_it() -> None:
    report = _report("independent")
    found = api.Exploration(report, api.ways_through(report, relay=False))
    lines = str(found).splitlines()
    assert "\n".join(lines[:-3]) == report.render()
    assert lines[-3] == "IPv6            no: not asked"
    assert lines[-2] == f"{'to a peer whose NAT maps endpoint-independently':<52}direct"
    paths = {"independent": "direct", "dependent": "spray"}
    assert found.to_json() == report.to_json() | {"udp": True, "ipv6": None, "relays": {}, "paths": paths}


def test_an_exploration_with_ipv6_says_so_and_how_it_reaches_any_peer_with_ipv6() -> None:
    report = _report("address-and-port-dependent")
    own = Endpoint("2001:db8:a::2", 5000)
    found = api.Exploration(report, api.ways_through(report, relay=False), ipv6=own, ipv6_inner=own)
    lines = str(found).splitlines()
    assert lines[-4] == f"{'IPv6':<16}[2001:db8:a::2]:5000 (the host's own address: no NAT, a stateful " + (
        "firewall punches like a cone NAT)"
    )
    assert lines[-1] == f"{'to a peer with IPv6 too, whatever its NAT':<52}ipv6"
    assert found.to_json()["ipv6"] == "[2001:db8:a::2]:5000"
    translated = api.Exploration(report, {}, ipv6=own, ipv6_inner=Endpoint("fd00::2", 5000))
    assert "translated from [fd00::2]:5000" in str(translated)


def test_an_exploration_where_no_udp_gets_out_names_the_relays_that_work() -> None:
    relays = {
        "udp": "no: no answer from TURN server 192.0.2.1:3478 within 10 s",
        "tcp": "works",
        "tls": "works",
    }
    found = api.Exploration(None, api.ways_through(None, relay=True), relays)
    assert str(found).splitlines() == [
        "UDP             blocked: the STUN server answers over TCP only",
        "IPv6            no: not asked",
        "TURN over UDP   no: no answer from TURN server 192.0.2.1:3478 within 10 s",
        "TURN over TCP   works",
        "TURN over TLS   works",
        f"{'to a peer whose NAT maps endpoint-independently':<52}relay",
        f"{'to a peer whose NAT maps per destination':<52}relay",
    ]
    assert found.to_json() == {"udp": False, "ipv6": None, "relays": relays, "paths": found.paths}
    nowhere = api.ways_through(None, relay=False)
    assert set(nowhere.values()) == {"none (a TURN relay over TCP or TLS would: --turn-server turns:HOST)"}
