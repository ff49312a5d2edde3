"""The benchmark's pure parts: the session timeline from both sides' events, the summaries, the floor."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from typing import Any

import pytest

from bench import dht, floor, peers, relay_streams, report, resume, startup, streams
from bench.stats import quantile, summarize
from bench.timeline import PHASES, Timeline, TimelineError, timeline


def at(text: str) -> float:
    return datetime.datetime.strptime(text, "%H:%M:%S.%f").replace(year=2026, month=11, day=22).timestamp()


def on_the_23rd(text: str) -> float:
    return datetime.datetime.strptime(text, "%H:%M:%S.%f").replace(year=2026, month=11, day=23).timestamp()


def events(
    role: str, day: Callable[[str], float], *lines: tuple[str, str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Session events as a side's PLEXUS_EVENTS file holds them."""
    return [{"event": name, "role": role, "at": day(when), **fields} for when, name, fields in lines]


INVITER = events(
    "invite",
    at,
    ("04:17:06.770", "started", {}),
    ("04:17:06.772", "discovered", {"inner": "10.0.1.2:60551", "outer": "198.51.100.2:60551"}),
    ("04:17:06.841", "sent", {"kind": "request"}),
    ("04:17:07.887", "answered", {"peer": "198.51.100.6:35384"}),
    ("04:17:07.887", "chosen", {"way": "direct"}),
    ("04:17:07.891", "connected", {"peer": "198.51.100.6:35384", "way": "direct"}),
)
ACCEPTOR = events(
    "accept",
    at,
    ("04:17:00.300", "discovered", {"inner": "10.0.2.2:2222", "outer": "198.51.100.6:2222"}),
    ("04:17:00.364", "listening", {}),
    # an earlier session
    ("04:17:01.000", "requested", {"peer": "198.51.100.2:1111"}),
    ("04:17:01.010", "discovered", {"inner": "10.0.2.2:2222", "outer": "198.51.100.6:2222"}),
    ("04:17:01.020", "sent", {"kind": "response"}),
    ("04:17:01.030", "connected", {"peer": "198.51.100.2:1111", "way": "direct"}),
    # this one
    ("04:17:07.349", "requested", {"peer": "198.51.100.2:60551"}),
    ("04:17:07.352", "discovered", {"inner": "10.0.2.2:35384", "outer": "198.51.100.6:35384"}),
    ("04:17:07.374", "sent", {"kind": "response"}),
    ("04:17:07.890", "connected", {"peer": "198.51.100.2:60551", "way": "direct"}),
)


def test_timeline_splits_the_session_into_phases_that_add_up() -> None:
    started = at("04:17:06.400")
    result = timeline(started, INVITER, ACCEPTOR, (at("04:17:07.950"), at("04:17:07.960")))
    assert list(result.phases) == [name for name, _ in PHASES]
    expected = {
        "start": 0.370, "stun": 0.002, "mail_out": 0.069, "mail_in": 0.508, "stun_acceptor": 0.003,
        "mail_out_response": 0.022, "mail_in_response": 0.513, "handshake": 0.004, "launch": 0.069,
    }  # fmt: skip
    assert result.phases == pytest.approx(expected, abs=1e-3)
    assert result.total == pytest.approx(1.560, abs=1e-3)
    assert sum(result.phases.values()) == pytest.approx(result.total)


def test_a_session_that_never_got_its_response_has_no_timeline() -> None:
    cut = [event for event in INVITER if event["event"] not in ("answered", "chosen", "connected")]
    with pytest.raises(TimelineError, match="no answered event"):
        timeline(at("04:17:06.400"), cut, ACCEPTOR, (0.0, 0.0))


def test_the_acceptors_session_is_the_one_with_the_inviters_outer_endpoint() -> None:
    other = [event for event in ACCEPTOR if event["at"] < at("04:17:07.000")]
    with pytest.raises(TimelineError, match=r"no requested event peer=198\.51\.100\.2:60551"):
        timeline(at("04:17:06.400"), INVITER, other, (0.0, 0.0))


def test_summaries() -> None:
    assert quantile([1.0], 0.9) == 1.0
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)
    summary = summarize([3.0, 1.0, 2.0, 10.0])
    assert (summary.n, summary.median, summary.min, summary.max) == (4, 2.5, 1.0, 10.0)
    assert summary.iqr == pytest.approx(4.75 - 1.75)
    with pytest.raises(ValueError):
        summarize([])


def test_floor_counts_round_trips_on_each_path() -> None:
    paths = floor.Paths(rtt_inviter=0.05, rtt_acceptor=0.05, delivery=0.5)
    bound = floor.floor(paths)
    assert list(bound) == [name for name, _ in PHASES]
    # 2 x (STUN 2 + the SMTP left after STUN 6.5 + IMAP in 1.5) host-server round trips, 1.5 host-host,
    # two deliveries
    assert sum(bound.values()) == pytest.approx(20 * 0.05 + 1.5 * 0.1 + 2 * 0.5)
    assert floor.floor(floor.Paths(0, 0, 0.5))["mail_in"] == 0.5


def _streams() -> dict[str, Any]:
    mbit = {"tcp": 5000.0, "plexus": 180.0, "openvpn": 500.0, "openvpn-carried": 300.0}
    rtt = {"tcp": 0.05, "plexus": 0.5, "openvpn": 0.1, "openvpn-carried": 0.2}
    sides = {"inviter": 0.05, "acceptor": 0.04}
    return {
        "mib": 200, "round_trips": 1000, "ssh_runs": 2,
        "bulk": {name: {"bytes": 200 * report.MIB, "seconds": 1.0, "mbit_s": value, "ok": True,
                        "reply": "209715200 ab", "expected": "209715200 ab"} for name, value in mbit.items()},
        "rtt": {name: {"n": 1000, "median_ms": ms, "p95_ms": 2 * ms, "min_ms": ms, "max_ms": 3 * ms,
                       "wrong": 0} for name, ms in rtt.items()},
        "udp": {"datagram_bytes": 1400, "sent_datagrams": 100, "received_datagrams": 90, "loss_pct": 10.0,
                "receive_buffer_drops": 10,
                "send_seconds": 1.0, "send_mbit_s": 2000.0, "receive_seconds": 1.0, "mbit_s": 1800.0},
        "ssh": {"plexus": {"seconds": [1.5, 1.7], "median_seconds": 1.6, "wrong": []},
                "pipe": {"seconds": [0.4, 0.4], "median_seconds": 0.4, "wrong": []}},
        "added_rtt_ms": {name: {"median_ms": rtt[name] - 0.05, "p95_ms": 2 * rtt[name] - 0.1}
                         for name in ("plexus", "openvpn", "openvpn-carried")},
        "carried": {"mbit_s_ratio": 0.6, "added_rtt_ms": {"median_ms": 0.1, "p95_ms": 0.2}},
        "cpu_seconds": {"plexus": sides, "openvpn": sides, "openvpn-carried": sides},
        "carrier_cpu_seconds": {"openvpn-carried": {"inviter": 4.0, "acceptor": 3.0}},
        "receive_buffer_drops": {"openvpn": {"a": 0, "b": 900}, "openvpn-carried": {"a": 700, "b": 300}},
        "cpu_seconds_per_mib": {"plexus": sides, "openvpn": sides, "openvpn-carried": sides},
        "cpu_share": {"plexus": {"inviter": 1.0, "acceptor": 0.9}, "openvpn": sides,
                      "openvpn-carried": sides},
        "targets": {"one_stream_mbit_s": 200.0, "added_rtt_ms": 1.0, "throughput_met": False,
                    "rtt_met": True},
    }  # fmt: skip


def test_report_shows_each_section() -> None:
    summary = summarize([1.0, 2.0]).to_json()
    results = {
        "machine": {"date": "today", "cores": 2, "cpu": "cpu", "kernel": "6", "python": "3.11"},
        "bench_seconds": 1.0,
        "delivery_seconds": 0.5,
        "connect": [{
            "delay_ms": 25.0, "rtt_inviter": 0.05, "rtt_acceptor": 0.05, "rtt_peers": 0.1, "total": summary,
            "floor": 1.0, "phases": {name: {"measured": summary, "floor": 0.0} for name, _ in PHASES},
        }],
        "matrix_timeout": 15.0,
        "matrix_tries": 3,
        "matrix": [{"inviter": "symmetric", "acceptor": "cone", "codes": [0, 0, 0], "outcome": "ok",
                    "method": "fan-out", "successes": 3, "seconds": [1.4, 1.6, 2.0]},
                   {"inviter": "cone", "acceptor": "symmetric", "codes": [0, 8, 0],
                    "outcome": "HANDSHAKE_TIMEOUT", "method": "spray", "successes": 2,
                    "seconds": [1.5, 15.2, 1.7]}],
        "footprint": {
            "idle_seconds": 60.0, "idle_cpu_seconds": 0.0, "clock_tick_seconds": 0.01,
            "idle_rss_bytes": 1 << 20, "idle_peak_rss_bytes": 1 << 20,
            "acceptor_session_cpu_seconds": 0.01, "acceptor_rss_after_bytes": 0,
            "inviter": {"code": 0, "seconds": 2.0, "cpu_seconds": 0.5, "max_rss_bytes": 1 << 20},
        },
        "streams": _streams(),
    }  # fmt: skip
    text = report.render(results)
    assert "25 ms one-way delay" in text
    assert "total" in text and "1.5x" in text  # median 1.5 s against a 1.0 s floor
    assert "fan-out 3/3 1.6 s" in text and "1 of 2 pairs connect every time" in text
    assert "spray 2/3 1.7 s (HANDSHAKE_TIMEOUT)" in text
    assert "RSS 1.0 MiB" in text and "Checks: all passed" in text
    assert (
        "plexus streams           180    0.500    1.000   +0.450   +0.900   0.0500   0.0400       ok" in text
    )
    assert "through plexus --stdio median 1.60 s of 2 (1.50-1.70)" in text
    assert "200 Mbit/s: NOT met (180)" in text and "1 ms: met (0.450 ms median)" in text
    assert (
        "OpenVPN, --carry         300    0.200    0.400   +0.150   +0.300   0.0500   0.0400       ok" in text
    )
    assert "OpenVPN 0 / 900; OpenVPN, --carry 700 / 300" in text
    assert "60 % of its throughput" in text and "+0.100 ms median" in text and "0.0200 / 0.0150 CPU s" in text


def test_check_asserts_what_the_figures_must_show() -> None:
    connect = {"delay_ms": 0.0, "total": summarize([1.5]).to_json(), "floor": 1.0}
    cells = [
        {"inviter": "cone", "acceptor": "fullcone", "codes": [0], "outcome": "ok", "method": "direct",
         "successes": 1, "seconds": [1.3]},
        {"inviter": "symmetric", "acceptor": "symmetric", "codes": [0], "outcome": "ok", "method": "relay",
         "successes": 1, "seconds": [1.4]},
    ]  # fmt: skip
    footprint = {"idle_seconds": 60.0, "idle_cpu_seconds": 0.01}
    assert report.check({"connect": [connect], "matrix": cells, "footprint": footprint}) == []
    slow = connect | {"total": summarize([2.5]).to_json()}
    failed = [cells[0], cells[1] | {"codes": [11], "outcome": "PEER_REFUSED", "successes": 0}]
    busy = footprint | {"idle_cpu_seconds": 1.2}
    failures = report.check({"connect": [slow], "matrix": failed, "footprint": busy})
    assert len(failures) == 3
    assert "over 2 x its floor" in failures[0] and "expected relay every time" in failures[1]
    assert "2.00 % of a core" in failures[2]


def test_check_fails_the_streams_only_on_wrong_bytes() -> None:
    slow = _streams()  # misses both targets: reported, not failed
    slow["bulk"]["plexus"]["mbit_s"], slow["targets"]["throughput_met"] = 10.0, False
    assert report.check({"streams": slow}) == []
    wrong = _streams()
    wrong["bulk"]["openvpn"]["reply"] = "209715199 cd"
    wrong["bulk"]["openvpn"]["ok"] = False
    wrong["rtt"]["plexus"]["wrong"] = 3
    wrong["ssh"]["plexus"] = {"seconds": [1.5], "median_seconds": 1.5, "wrong": ["exit 255: refused"]}
    failures = report.check({"streams": wrong})
    assert len(failures) == 3
    assert "streams openvpn: the sink answered '209715199 cd'" in failures[0]
    assert "3 echo round trips" in failures[1] and "exit 255: refused" in failures[2]
    collapsed = _streams()
    collapsed["carried"] = {"mbit_s_ratio": 0.2, "added_rtt_ms": {"median_ms": 1.5, "p95_ms": 3.0}}
    failures = report.check({"streams": collapsed})
    assert len(failures) == 2
    assert "carried by plexus kept 20 % of its plain throughput (300 of 500 Mbit/s)" in failures[0]
    assert "added 1.500 ms to its median round trip" in failures[1]
    host = {"date": "d", "cores": 2, "cpu": "c", "kernel": "6", "python": "3"}
    assert "WRONG" in report.render({"machine": host, "bench_seconds": 1.0, "streams": wrong})


# ---- the dht section (bench/dht.py) ----------------------------------------------------------------------

DHT_INVITER = events(
    "invite",
    on_the_23rd,
    ("12:45:15.180", "started", {}),
    ("12:45:15.288", "discovered", {"inner": "10.0.1.2:51352", "outer": "198.51.100.2:51352"}),
    ("12:45:15.395", "sent", {"kind": "request"}),
    ("12:45:15.661", "answered", {"peer": "198.51.100.6:40000"}),
    ("12:45:15.763", "connected", {"peer": "198.51.100.6:40000", "way": "direct"}),
)
DHT_ACCEPTOR = events(
    "accept",
    on_the_23rd,
    ("12:45:10.000", "requested", {"peer": "198.51.100.2:1111"}),
    ("12:45:10.003", "discovered", {"inner": "10.0.2.2:40000", "outer": "198.51.100.6:40000"}),
    ("12:45:10.004", "sent", {"kind": "response"}),
    ("12:45:10.010", "connected", {"peer": "198.51.100.2:1111", "way": "direct"}),
    ("12:45:15.498", "requested", {"peer": "198.51.100.2:51352"}),
    ("12:45:15.605", "discovered", {"inner": "10.0.2.2:40000", "outer": "198.51.100.6:40000"}),
    ("12:45:15.606", "sent", {"kind": "response"}),
    ("12:45:15.762", "connected", {"peer": "198.51.100.2:51352", "way": "direct"}),
)


def test_dht_timeline() -> None:
    launched = (on_the_23rd("12:45:15.790"), on_the_23rd("12:45:15.800"))
    two = dht.dht_timeline(on_the_23rd("12:45:14.850"), DHT_INVITER, DHT_ACCEPTOR, launched)
    assert list(two.phases) == [name for name, _ in dht.DHT_PHASES]
    expected = {"start": 0.330, "stun": 0.108, "card": 0.107, "request_in": 0.103, "stun_acceptor": 0.107,
                "response_in": 0.056, "handshake": 0.102, "launch": 0.037}  # fmt: skip
    assert two.phases == pytest.approx(expected, abs=1e-3)
    assert sum(two.phases.values()) == pytest.approx(two.total) == pytest.approx(0.950, abs=1e-3)
    # one cut for every way: the mail's four phases between the request and the punch are its rendezvous
    assert dht.common("dht", two.phases)["rendezvous"] == pytest.approx(0.103 + 0.107 + 0.056, abs=1e-3)
    mail = timeline(at("04:17:06.400"), INVITER, ACCEPTOR, (at("04:17:07.950"), at("04:17:07.960")))
    cut = dht.common("mail", mail.phases)
    assert list(cut) == [name for name, _ in dht.COMMON]
    assert sum(cut.values()) == pytest.approx(mail.total)
    assert cut["rendezvous"] == pytest.approx(0.508 + 0.003 + 0.022 + 0.513, abs=1e-3)


def test_a_dht_session_without_its_request_has_no_timeline() -> None:
    cut = [event for event in DHT_ACCEPTOR if event["at"] < on_the_23rd("12:45:15.000")]
    with pytest.raises(TimelineError, match="no requested event"):
        dht.dht_timeline(0.0, DHT_INVITER, cut, (0.0, 0.0))


def _dht() -> dict[str, Any]:
    paths = floor.Paths(rtt_inviter=0.05, rtt_acceptor=0.05, delivery=0.5)
    hops = dht.hops_entry(dht.Round(1.2, 1.1, 0.1), [dht.Round(0.153, 0.072, 0.051), "no value in 10 s"])
    two = Timeline(0.85, {name: 0.85 / 8 for name, _ in dht.DHT_PHASES})
    mail = Timeline(2.7, {name: 0.3 for name, _ in PHASES})

    def session(kind: str, timeline: Timeline | None, total: float) -> dht.Session:
        return dht.Session(0, kind, total, timeline, total + 1.0)

    return {
        "nodes": 3, "runs": 2, "floor_rounds": 1, "target_seconds": 0.9, "failures": [],
        "delays": [{
            "delay_ms": 0.0, "rtt_inviter": 0.05, "rtt_acceptor": 0.05, "rtt_peers": 0.1, "hops": hops,
            "mail": dht.way_entry("mail", [mail, mail], [2.7, 2.7], floor.floor(paths)),
            "dht": dht.dht_entry("dht", session("ok", two, 1.9),
                                 [session("ok", two, 0.85), session("failed", None, 3.4)],
                                 dht.floors(paths, hops)),
        }],
        "idle": {
            "seconds": 60.0, "settle_seconds": 5.0, "cpu_seconds": 0.12, "clock_tick_seconds": 0.01,
            "rss_bytes": 64 << 20, "peak_rss_bytes": 64 << 20,
            "udp": {name: {"packets": 30, "bytes": 3000} for name in ("dht_in", "dht_out", "other_in",
                                                                     "other_out")},
            "udp_per_minute": {name: {"packets": 30.0, "bytes": 3000.0}
                               for name in ("dht_in", "dht_out", "other_in", "other_out")},
        },
    }  # fmt: skip


def test_report_shows_the_dht_section() -> None:
    found = _dht()
    entry = found["delays"][0]
    assert entry["dht"]["kinds"] == {"ok": 1, "failed": 1}
    assert entry["dht"]["total"]["median"] == pytest.approx(2.125)  # every session that connected
    assert entry["dht"]["own_total"]["median"] == 0.85  # those with a timeline
    assert entry["hops"]["failed"] == ["no value in 10 s"] and entry["hops"]["request"]["min"] == 0.072
    # the card's lookup starts while STUN runs: its floor is the plain nodes' less one round trip
    assert entry["dht"]["phases"]["card"]["floor"] == pytest.approx(0.103)
    assert entry["dht"]["phases"]["handshake"]["floor"] == pytest.approx(0.15)
    host = {"date": "d", "cores": 2, "cpu": "c", "kernel": "6", "python": "3"}
    text = report.render({"machine": host, "bench_seconds": 1.0, "dht": found})
    assert "mail                        DHT" in text
    assert "total                  2.700    2.700" in text
    assert "DHT 1 ok, 1 failed (warm-up 1.90 s" in text
    assert "DHT NOT met (2.125 s)" in text
    assert "request put until pushed 72.0 / 72.0 ms" in text and "1 failed" in text
    assert "CPU 0.12 s" in text and "0.200 % of one core" in text
    assert "DHT node (port 4222) in 30 packets / 3000 bytes" in text
    assert "Checks: all passed" in text


def test_check_fails_the_dht_section_only_on_what_went_wrong() -> None:
    slow = _dht()  # the target missed, a session without a timeline: reported, not failed
    assert report.check({"dht": slow}) == []
    slow["failures"] = ["0 ms, DHT, two hops, run 2: inviter exited 18: no response"]
    assert report.check({"dht": slow}) == ["dht: 0 ms, DHT, two hops, run 2: inviter exited 18: no response"]


def test_startup_section_reports_each_command_against_the_bare_interpreter() -> None:
    found = {
        "runs": 9,
        "target": startup.TARGET,
        "median_seconds": {"python -c pass": 0.025, "plexus --version": 0.07, "plexus --help": 0.11},
    }
    lines = startup.render(found)
    assert any(line.startswith("plexus --version") and line.endswith("2.8x") for line in lines)
    assert startup.check(found) == []  # the target is --version's; --help is shown beside it
    slow = found | {"median_seconds": found["median_seconds"] | {"plexus --version": 0.08}}
    assert startup.check(slow) == [
        "start-up: plexus --version took 0.080 s, over 3 x the bare interpreter's 0.025 s"
    ]
    results = {"machine": {"date": "d", "cores": 2, "cpu": "c", "kernel": "k", "python": "3.11"},
               "bench_seconds": 1.0, "startup": found}  # fmt: skip
    assert "Start-up: median of 9 runs" in report.render(results)
    assert report.check(results) == startup.check(found)


def test_the_relays_section_reads_and_checks_each_transport() -> None:
    cells = [
        {"case": report.SYMMETRIC, "transport": "tls", "codes": [0, 0], "outcome": "ok", "method": "relay",
         "successes": 2, "seconds": [1.7, 1.8]},
        {"case": report.NO_UDP, "transport": "tcp", "codes": [0, 20], "outcome": "UDP_BLOCKED",
         "method": "relay", "successes": 1, "seconds": [3.2, 9.8]},
    ]  # fmt: skip
    host = {"date": "d", "cores": 2, "cpu": "c", "kernel": "6", "python": "3"}
    text = report.render({"machine": host, "bench_seconds": 1.0, "relays": cells, "relays_timeout": 15.0})
    assert f"{'both NATs symmetric, TURN over TLS':<40}relay 2/2 1.8 s" in text
    assert "no UDP out of a, TURN over TCP          relay 1/2 6.5 s (UDP_BLOCKED)" in text
    (failure,) = report.check({"relays": cells})
    assert (
        failure.startswith("relays, no UDP out of a, TURN over TCP: ")
        and "expected relay every time" in failure
    )


def _cell(seconds: list[float], method: str, codes: list[int] | None = None) -> dict[str, Any]:
    codes = codes or [0] * len(seconds)
    outcome = "ok" if not any(codes) else "HANDSHAKE_TIMEOUT"
    return {"codes": codes, "outcome": outcome, "method": method, "successes": codes.count(0),
            "seconds": seconds}  # fmt: skip


def test_the_networks_rows_stand_beside_the_direct_session_and_fail_only_on_a_failed_session() -> None:
    direct = {"inviter": "cone", "acceptor": "cone"} | _cell([0.40, 0.42, 0.44], "direct")
    cells = [
        {"network": report.SAME_LAN, "acceptor": "cone"} | _cell([0.45, 0.47, 0.50], "lan"),
        {"network": report.SAME_LAN, "acceptor": "symmetric"} | _cell([0.50, 0.60, 0.70], "lan"),
        {"network": report.DOUBLE_NAT, "acceptor": "cone"} | _cell([0.41, 0.43, 15.1], "direct", [0, 0, 8]),
    ]
    host = {"date": "d", "cores": 2, "cpu": "c", "kernel": "6", "python": "3"}
    results = {"machine": host, "bench_seconds": 1.0, "matrix": [direct], "matrix_timeout": 15.0,
               "matrix_tries": 3, "networks": cells}  # fmt: skip
    text = report.render(results)
    assert f"{'same LAN, no hairpin (c)':<40}{'cone':<11}{'lan 3/3 0.47 s':<30}+0.05 s" in text
    assert f"{'direct IPv4 (a -> b)':<40}{'cone':<11}{'direct 3/3 0.42 s':<30}+0.00 s" in text
    assert "direct 2/3 0.43 s (HANDSHAKE_TIMEOUT)" in text
    # the slower same-LAN row, symmetric: 0.60 s against 0.42 s
    assert "target same LAN within 0.1 s of a direct session: NOT met (+0.18 s at most)" in text
    (failure,) = report.check(results)
    assert failure.startswith("double NAT (a: cone, carrier NAT) -> b cone: direct 2/3")
    assert report.check(results | {"networks": cells[:2]}) == []


def test_the_relays_section_reports_the_stream_transports_against_udp() -> None:
    cells = [
        {"case": report.SYMMETRIC, "transport": "udp"} | _cell([1.0, 1.0], "relay"),
        {"case": report.SYMMETRIC, "transport": "tcp"} | _cell([1.5, 1.5], "relay"),
        {"case": report.NO_UDP, "transport": "tls"} | _cell([2.4, 2.4], "relay"),
    ]
    host = {"date": "d", "cores": 2, "cpu": "c", "kernel": "6", "python": "3"}
    text = report.render({"machine": host, "bench_seconds": 1.0, "relays": cells, "relays_timeout": 15.0})
    assert (
        "target TCP and TLS within 2x a relay over UDP between symmetric NATs: NOT met (both NATs symmetric "
        "1.50x, no UDP out of a 2.40x)" in text
    )


# ---- the relay-streams section (bench/relay_streams.py) --------------------------------------------------


def _session(way: str, up: float, down: float, *, reply: str = "8388608 ab", error: str | None = None) -> Any:
    """A session moving 8 MiB each way, at `up` and `down` MB/s (0: that direction never ran)."""

    def moved(rate: float, drops: int) -> relay_streams.Moved:
        bulk = streams.Bulk(8 * report.MIB, 8 * report.MIB / rate / 1e6, reply, "8388608 ab")
        return relay_streams.Moved(
            bulk, {"inviter": 0.4, "acceptor": 0.2, "server": 0.08}, {"a": drops, "b": 0, "server": 2 * drops}
        )

    done = {"up": up, "down": down}
    return relay_streams.Session(
        way, {d: moved(rate, i + 1) for i, (d, rate) in enumerate(done.items()) if rate}, error
    )


def _relay_streams() -> dict[str, Any]:
    found = {
        "udp": [_session("relay", 20.0, 16.0), _session("relay", 24.0, 14.0), _session("relay", 22.0, 15.0)],
        "tcp": [_session("relay", 11.0, 8.0), _session("relay", 12.0, 7.0), _session("relay", 10.0, 9.0)],
        "tls": [_session("relay", 22.0, 15.0)] * 3,
        "direct": [_session("direct", 33.0, 30.0)] * 3,
    }
    return relay_streams.summary(8, 3, found)


def test_the_relay_streams_stand_beside_the_relay_over_udp_each_way() -> None:
    found = _relay_streams()
    assert found["paths"]["udp"]["up"] == {"median_mb_s": 22.0, "min_mb_s": 20.0, "max_mb_s": 24.0}
    assert found["over_udp"]["up"] == {"tcp": 0.5, "tls": 1.0, "direct": 1.5}
    assert found["over_udp"]["down"]["tcp"] == pytest.approx(0.53)
    assert found["paths"]["tcp"]["sessions"][0]["down"]["receive_buffer_drops"] == {
        "a": 2,
        "b": 0,
        "server": 4,
    }
    host = {"date": "d", "cores": 2, "cpu": "c", "kernel": "6", "python": "3"}
    text = report.render({"machine": host, "bench_seconds": 1.0, "relay_streams": found})
    assert "8 MiB each way per session" in text and "3 sessions per path" in text
    # medians, the ratio to UDP, CPU seconds per MiB on a, b and the server, the drops over 3 sessions
    assert (
        "relay, TURN over TCP  up         11.0     10.0     12.0    0.50x   0.0500   0.0250   0.0100"
        "           3/0/6   3/3" in text
    )
    assert "relay, TURN over UDP  down       15.0     14.0     16.0        -" in text
    assert "direct (cone NATs)    down       30.0" in text and "Checks: all passed" in text
    assert report.check({"relay_streams": found}) == []


def test_the_relay_streams_fail_only_on_wrong_bytes_a_wrong_way_or_a_failed_session() -> None:
    found = {
        "udp": [_session("relay", 5.0, 5.0)],  # slow: reported, not failed
        "tcp": [_session("relay", 20.0, 0.0, error="--forward inviter exited 14: TURN error")],
        "tls": [_session("relay", 20.0, 15.0, reply="8388600 cd")],
        "direct": [_session("relay", 20.0, 15.0)],
    }
    failures = report.check({"relay_streams": relay_streams.summary(8, 1, found)})
    assert failures == [
        "relay streams, relay, TURN over TCP, session 1: --forward inviter exited 14: TURN error",
        "relay streams, relay, TURN over TLS, session 1: up: '8388600 cd' arrived, expected '8388608 ab'; "
        "down: '8388600 cd' arrived, expected '8388608 ab'",
        "relay streams, direct (cone NATs), session 1: connected by relay, expected direct",
    ]
    host = {"date": "d", "cores": 2, "cpu": "c", "kernel": "6", "python": "3"}
    text = report.render(
        {"machine": host, "bench_seconds": 1.0, "relay_streams": relay_streams.summary(8, 1, found)}
    )
    assert (
        "relay, TURN over TCP  down          -        -        -        -        -        -        -"
        "           0/0/0   0/1" in text
    )


# ---- the resume section (bench/resume.py) ------------------------------------------------------------------


def _moves(
    mover: str, *resumed: float | None, before: float = 20.0, after: float = 15.0, reply: str = "ab"
) -> list[resume.Move]:
    """The mover's moves in the section's order (remap, renumber, remap, renumber back, ...), each resumed as
    given, migrated then, remapped 0.4 s and rebound 0.1 s before, its bulk transfers of 16 MiB at `before`
    and `after` MiB/s, one more each move (none after a move that never resumed)."""

    def bulk(rate: float) -> streams.Bulk:
        return streams.Bulk(16 * report.MIB, 16 / rate, reply, "ab")

    changes = ["remap", "renumber", "remap", "renumber back"]
    return [
        resume.Move(mover, changes[number % 4], "198.51.100.2", took, took, 0.4, took and took - 0.1, took,
                    bulk(before + number), None if took is None else bulk(after + number))
        for number, took in enumerate(resumed)
    ]  # fmt: skip


HOST = {"date": "d", "cores": 2, "cpu": "c", "kernel": "6", "python": "3"}


def test_the_resume_section_reports_each_way_by_kind_of_move_and_the_bulk_rates_beside() -> None:
    # back on an endpoint b's NAT still had open: no rebind, resumed at once; not counted
    let_in = dataclasses.replace(_moves("a", 0.01)[0], remapped=None, rebound=None)
    found = resume.summary(resume.Plan(4, ("a",), 16), {
        "mail": resume.Session(_moves("a", 0.9, 1.0, 0.8, 1.2), True, 1500),
        "dht": resume.Session([*_moves("a", 1.4, 0.5, 0.4, 0.6), let_in], True, 1400),
    })  # fmt: skip
    mail = found["ways"]["mail"]["movers"]["a"]
    assert mail["summary"]["all"]["resumed"]["median"] == pytest.approx(0.95)
    assert mail["summary"]["renumber"]["resumed"]["n"] == 2  # "renumber" and "renumber back"
    assert mail["summary"]["remap"]["migrated"]["max"] == pytest.approx(0.9)
    assert mail["bulk"]["before"]["median"] == pytest.approx(21.5)
    assert mail["bulk"]["after_over_before"]["min"] == pytest.approx(15 / 20)
    assert found["ways"]["mail"]["moves"][1]["bulk_after"]["mib_s"] == 16.0
    assert found["ways"]["mail"]["wrong_bulk"] == 0
    text = report.render({"machine": HOST, "bench_seconds": 1.0, "resume": found})
    assert "while the NAT of a moves it 4 times per rendezvous (remap" in text
    assert (
        "mail  a      all         4     0.95 / 1.20     0.95 / 1.20     0.40 / 0.40     0.85 / 1.10" in text
    )
    assert "DHT   a      remap       2     0.90 / 1.40" in text
    assert (
        "  DHT, a's moves: before 21.5 (20.0-23.0), after 16.5 (15.0-18.0), after / before 0.77 (0.75-0.78)"
        in text
    )
    assert "  DHT: the echoed stream (1400 records) whole" in text
    assert "had open), not counted above: DHT a 1" in text
    assert found["ways"]["dht"]["movers"]["a"]["summary"]["all"]["resumed"]["n"] == 4
    assert "target DHT: a stream resumes within 2 s of a move (median): a's met (0.55 s)" in text
    assert report.check({"resume": found}) == []


def test_the_resume_section_fails_on_a_slow_median_a_failed_session_or_a_wrong_transfer() -> None:
    stuck = "b's move 1 (remap) never resumed"
    found = resume.summary(resume.Plan(2, ("a", "b"), 16), {
        "mail": resume.Session(_moves("a", 0.9, 1.1) + _moves("b", 3.5, 3.1, reply="cd"), True, 1500),
        "dht": resume.Session(_moves("a", 0.5) + _moves("b", None), False, 0, stuck),
    })  # fmt: skip
    assert report.check({"resume": found}) == [
        "resume, mail: the stream resumed 3.30 s after b's moves (median), over the target 3 s",
        "resume, mail: 4 bulk transfers did not arrive whole",
        "resume, DHT: b's move 1 (remap) never resumed",
    ]
    text = report.render({"machine": HOST, "bench_seconds": 1.0, "resume": found})
    assert "while the NAT of a and of b moves it 2 times per rendezvous, in turn" in text
    assert (
        "DHT   b      all         0               -               -     0.40 / 0.40               -" in text
    )
    assert "  mail: the echoed stream (1500 records) whole; 4 bulk transfers WRONG" in text
    assert "  DHT: the echoed stream (0 records) NOT whole; FAILED: b's move 1 (remap) never resumed" in text
    assert "  DHT, b's moves: before 20.0 (20.0-20.0), after -, after / before -" in text
    assert (
        "target mail: a stream resumes within 3 s of a move (median): a's met (1.00 s), b's NOT met (3.30 s)"
        in text
    )


# ---- the peers section (bench/peers.py) --------------------------------------------------------------------


def _peers(rss_many: int, cpu_one: float = 0.0, failures: tuple[str, ...] = ()) -> dict[str, Any]:
    """The section's results: the 1-peer acceptor at 40 MiB, the 20-peer one at `rss_many` MiB."""
    return {
        "peers": 20, "idle_seconds": 10.0, "clock_tick_seconds": 0.01,
        "idle": {"20": {"cpu_seconds": 0.01, "cpu_share": 0.001, "rss_bytes": rss_many * report.MIB},
                 "1": {"cpu_seconds": 10 * cpu_one, "cpu_share": cpu_one, "rss_bytes": 40 * report.MIB}},
        "holding": {"cpu_seconds": 0.02, "cpu_share": 0.002, "rss_bytes": 46 * report.MIB, "sessions": 19},
        "connect": {"20": {"total": peers._spread([1.2, 1.0, 1.4]), "answer": peers._spread([0.01, 0.02])},
                    "1": {"total": peers._spread([]), "answer": peers._spread([])}},
        "failures": list(failures),
    }  # fmt: skip


def test_the_peers_section_shows_both_acceptors_side_by_side() -> None:
    text = report.render({"machine": HOST, "bench_seconds": 1.0, "peers": _peers(43)})
    assert (
        "  20 peers, listening                          CPU 0.01 s = 0.100 % of one core, RSS 43.0 MiB"
        in text
    )
    assert "  20 peers, 19 sessions held" in text
    assert "  RSS of 20 peers over 1: +3.0 MiB (target: within +10 MiB)" in text
    assert "to the 20-peer acceptor, 19 others held    median 1.20 s (min 1.00, max 1.40; n 3)" in text
    assert "  the acceptor, request to response        median 0.015 s (min 0.010, max 0.020; n 2)" in text
    assert "to the 1-peer acceptor" in text and text.rstrip().endswith("== Checks: all passed")
    assert report.check({"peers": _peers(43)}) == []


def test_the_peers_section_fails_on_memory_cpu_or_a_failed_session() -> None:
    found = _peers(51, cpu_one=0.05, failures=("1 peer(s): inviter exited 18: no response",))
    assert report.check({"peers": found}) == [
        "peers: 1 peer(s): inviter exited 18: no response",
        "peers: the idle 1-peer acceptor used 5.00 % of a core, over 1 %",
        "peers: the 20-peer acceptor's RSS is 11.0 MiB over the 1-peer one's (target: within +10 MiB)",
    ]
    assert "  FAILED: 1 peer(s): inviter exited 18: no response" in report.render(
        {"machine": HOST, "bench_seconds": 1.0, "peers": found}
    )
