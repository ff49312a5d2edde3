"""The benchmark's results as plain-text tables (the JSON form is the results dict itself)."""

from __future__ import annotations

import statistics
from typing import Any

from bench import dht, peers, relay_streams, resume, startup, upgrade
from bench.runs import IDLE_CPU_SHARE
from bench.timeline import PHASES
from plexus import path
from plexus.rendezvous import Reach

MIB = 1024 * 1024
# What the benchmark asserts (check()): loose enough for a loaded 2-core machine, tight enough to catch a
# return of 2.2's habits (seconds of STUN tests, mail polling) or a busy-waiting acceptor.
TOTAL_OVER_FLOOR = 2.0  # median time to connect at most this many times its floor
SOAK_RSS_GROWTH = 8 * 1024 * 1024  # the acceptor's memory may grow this much over the soak, no more
CORNER = "inviter \\ acceptor"
# The order: from no NAT to the one that defeats punching
MODES = ("none", "cone", "fullcone", "symmetric")
CELL = 34
SYMMETRIC, NO_UDP = "both NATs symmetric", "no UDP out of a"
SAME_LAN, DOUBLE_NAT = "same LAN, no hairpin (c)", "double NAT (a: cone, carrier NAT)"
# IPv6 beside IPv4 (the STUN server by its name, A and AAAA): a's NAT symmetric too, and no TURN server,
# where IPv4 alone has no way; and both cone, where IPv6 races the direct path
IPV6_ONLY_WAY, DUAL_STACK = "IPv6 (a symmetric, no relay)", "IPv6 and IPv4 (a cone)"
NETWORKS = [(network, mode) for network in (SAME_LAN, DOUBLE_NAT) for mode in ("cone", "symmetric")] + [
    (IPV6_ONLY_WAY, "symmetric"),
    (DUAL_STACK, "cone"),
]
LAN_OVER_DIRECT = 0.1  # issue 18's target: same-LAN and IPv6 sessions within this many seconds of direct
STREAM_OVER_UDP_RELAY = 2.0  # and a relay over TCP or TLS within this many times a relay over UDP
# OpenVPN carried by plexus (--carry) beside the plain tunnel, one run of each: at least this share of its
# throughput (0.45-0.94 over eleven runs on the shared 2-core machine, plain OpenVPN alone varying 372-684
# Mbit/s; a carrier that stalls or drops falls far below), and at most this much added to its median round
# trip (0.03 to 0.24 ms seen; a carrier that holds datagrams back, for a timer say, goes over it)
CARRIED_OVER_PLAIN = 0.25
CARRIED_ADDED_RTT_MS = 1.0
RELAY_CASES = [(SYMMETRIC, transport) for transport in ("udp", "tcp", "tls")] + [
    (NO_UDP, transport) for transport in ("tcp", "tls")
]


def render(results: dict[str, Any]) -> str:
    host = results["machine"]
    lines = [
        f"plexus benchmark, {host['date']}: {host['cores']} cores ({host['cpu']}), "
        f"Linux {host['kernel']}, Python {host['python']}; took {results['bench_seconds']:.0f} s",
    ]
    if "connect" in results:
        lines += _connect(results)
    if "matrix" in results:
        lines += _matrix(results["matrix"], results["matrix_timeout"], results["matrix_tries"])
    if "networks" in results:
        lines += _networks(results["networks"], results["matrix"])
    if "relays" in results:
        lines += _relays(results["relays"], results["relays_timeout"])
    if "footprint" in results:
        lines += _footprint(results["footprint"])
    if "soak" in results:
        lines += _soak(results["soak"])
    if "streams" in results:
        lines += _streams(results["streams"])
    if "relay_streams" in results:
        lines += relay_streams.render(results["relay_streams"])
    if "dht" in results:
        lines += _dht(results["dht"])
    if "resume" in results:
        lines += resume.render(results["resume"])
    if "relay_direct" in results:
        lines += upgrade.render(results["relay_direct"])
    if "peers" in results:
        lines += peers.render(results["peers"])
    if "startup" in results:
        lines += startup.render(results["startup"])
    failures = results.get("failures", [])
    lines += ["", f"== Checks: {len(failures)} failed" if failures else "== Checks: all passed"]
    lines += [f"FAILED: {failure}" for failure in failures]
    return "\n".join(lines)


def _row(name: str, values: list[str]) -> str:
    return f"{name:<19}" + "".join(f"{value:>9}" for value in values)


def _ratio(measured: float, bound: float) -> str:
    return f"{measured / bound:.1f}x" if bound >= 0.0005 else "-"


def _connect(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Time to connect: from the inviter's start until both launched commands run, in seconds.",
        f"Floor: the round trips the path must make plus the mail server's own delivery time "
        f"({results['delivery_seconds'] * 1000:.0f} ms, DATA until the IDLE push; docs/performance.md).",
    ]
    for entry in results["connect"]:
        lines += [
            "",
            f"== {entry['delay_ms']:g} ms one-way delay per link: RTT host-servers "
            f"{entry['rtt_inviter'] * 1000:.1f} ms (a) / {entry['rtt_acceptor'] * 1000:.1f} ms (b), "
            f"host-host {entry['rtt_peers'] * 1000:.1f} ms; {entry['total']['n']} runs",
            _row("phase", ["median", "min", "p90", "max", "IQR", "floor", "ratio"]),
        ]
        for name, _ in PHASES:
            phase = entry["phases"][name]
            lines.append(_row(name, [*_spread(phase["measured"]), f"{phase['floor']:.3f}",
                                     _ratio(phase["measured"]["median"], phase["floor"])]))  # fmt: skip
        total = entry["total"]
        lines.append(_row("total", [*_spread(total), f"{entry['floor']:.3f}",
                                    _ratio(total["median"], entry["floor"])]))  # fmt: skip
    lines += ["", "phases:"] + [f"  {name:<18} {meaning}" for name, meaning in PHASES]
    return lines


def _spread(summary: dict[str, float]) -> list[str]:
    return [f"{summary[key]:.3f}" for key in ("median", "min", "p90", "max", "iqr")]


def _matrix(cells: list[dict[str, Any]], timeout: float, tries: int) -> list[str]:
    lines = [
        "",
        f"== Success matrix, NAT mode of the inviter's host by the acceptor's (0 ms links; both sides with "
        f"the lab TURN server; --response-timeout {timeout:g} --handshake-timeout {timeout:g})",
        f"path taken, sessions that connected of {tries}, median seconds from the inviter's start until it "
        "launched its command",
        (f"{CORNER:<20}" + "".join(f"{mode:<{CELL}}" for mode in MODES)).rstrip(),
    ]
    by_pair = {(cell["inviter"], cell["acceptor"]): cell for cell in cells}
    for inviter in MODES:
        row = f"{inviter:<20}"
        for acceptor in MODES:
            cell = by_pair.get((inviter, acceptor))
            text = "-" if cell is None else _cell(cell)
            row += f"{text:<{CELL}}"
        lines.append(row.rstrip())
    ok = sum(cell["successes"] == len(cell["codes"]) for cell in cells)
    lines.append(f"{ok} of {len(cells)} pairs connect every time")
    return lines


def _median(cell: dict[str, Any]) -> float:
    return float(statistics.median(cell["seconds"]))


def _target(met: bool) -> str:
    return "met" if met else "NOT met"


def _networks(cells: list[dict[str, Any]], matrix: list[dict[str, Any]]) -> list[str]:
    direct = next(cell for cell in matrix if (cell["inviter"], cell["acceptor"]) == ("cone", "cone"))
    lines = [
        "",
        "== Issue 18's networks, inviting b (same options as the matrix): c on b's LAN behind b's NAT, which "
        "does not hairpin; a's cone router behind a carrier NAT; IPv6 beside IPv4 (global addresses behind "
        "stateful firewalls, the STUN server by its name)",
        "path taken, sessions that connected, median seconds until the inviter launched its command, and the "
        "difference to the direct IPv4 session (matrix cone -> cone)",
        f"{'network':<40}{'b NAT':<11}{'result':<30}vs direct",
    ]
    for cell in [*cells, direct | {"network": "direct IPv4 (a -> b)"}]:
        lines.append(f"{cell['network']:<40}{cell['acceptor']:<11}{_cell(cell, 2):<30}"
                     f"{round(_median(cell) - _median(direct), 2) + 0.0:+.2f} s")  # fmt: skip
    for name, kinds in (("same LAN", (SAME_LAN,)), ("IPv6", (IPV6_ONLY_WAY, DUAL_STACK))):
        found = [cell for cell in cells if cell["network"] in kinds]
        if found:
            slowest = max(_median(cell) for cell in found) - _median(direct)
            lines.append(f"target {name} within {LAN_OVER_DIRECT:g} s of a direct session: "
                         f"{_target(slowest <= LAN_OVER_DIRECT)} ({slowest:+.2f} s at most)")  # fmt: skip
    return lines


def _relays(cells: list[dict[str, Any]], timeout: float) -> list[str]:
    lines = [
        "",
        f"== Relay transports: the inviter's leg to the lab's TURN server over UDP, TCP or TLS (0 ms links; "
        f"--response-timeout {timeout:g} --handshake-timeout {timeout:g})",
        "path taken, sessions that connected, median seconds from the inviter's start until it launched its "
        "command",
    ]
    lines += [
        f"{cell['case'] + ', TURN over ' + cell['transport'].upper():<40}{_cell(cell)}" for cell in cells
    ]
    udp = next((cell for cell in cells if (cell["case"], cell["transport"]) == (SYMMETRIC, "udp")), None)
    ratios = {}
    for case in (SYMMETRIC, NO_UDP):
        streams = [cell for cell in cells if cell["case"] == case and cell["transport"] != "udp"]
        if udp is not None and streams:
            ratios[case] = max(_median(cell) for cell in streams) / _median(udp)
    if ratios:
        each = ", ".join(f"{case} {ratio:.2f}x" for case, ratio in ratios.items())
        met = _target(max(ratios.values()) <= STREAM_OVER_UDP_RELAY)
        lines.append(f"target TCP and TLS within {STREAM_OVER_UDP_RELAY:g}x a relay over UDP between "
                     f"symmetric NATs: {met} ({each})")  # fmt: skip
    return lines


def _cell(cell: dict[str, Any], digits: int = 1) -> str:
    spread = f"{statistics.median(cell['seconds']):.{digits}f} s"
    failed = "" if cell["outcome"] == "ok" else f" ({cell['outcome']})"
    return f"{cell['method']} {cell['successes']}/{len(cell['codes'])} {spread}{failed}"


def _footprint(found: dict[str, Any]) -> list[str]:
    idle, inviter = found["idle_seconds"], found["inviter"]
    share = 100 * found["idle_cpu_seconds"] / idle
    return [
        "",
        "== Footprint",
        f"idle acceptor (waiting in IMAP IDLE) over {idle:g} s: CPU {found['idle_cpu_seconds']:.2f} s "
        f"(counted in {found['clock_tick_seconds']:g} s ticks) "
        f"= {share:.3f} % of one core, RSS {found['idle_rss_bytes'] / MIB:.1f} MiB "
        f"(peak {found['idle_peak_rss_bytes'] / MIB:.1f} MiB)",
        f"one session, inviter process: {inviter['seconds']:.2f} s wall, CPU {inviter['cpu_seconds']:.2f} s "
        f"(user + system), max RSS {inviter['max_rss_bytes'] / MIB:.1f} MiB",
        f"one session, the acceptor's share: CPU {found['acceptor_session_cpu_seconds']:.2f} s, "
        f"RSS afterwards {found['acceptor_rss_after_bytes'] / MIB:.1f} MiB",
    ]


def _soak(found: dict[str, Any]) -> list[str]:
    def per(counts: dict[str, int]) -> str:
        return ", ".join(f"{name} {count}" for name, count in counts.items())

    spread = (
        f"median {found['restore_median_seconds']:.2f} s, max {found['restore_max_seconds']:.2f} s"
        if found["restored"]
        else "none restored"
    )
    return [
        "",
        "== Reconnect soak: the laptop's tunnel killed or left stale, then plexus-reconnect (cron's recipe), "
        "until a ping crosses the new OpenVPN tunnel",
        f"cycles restored: {found['restored']} / {found['cycles']}; time to restore: {spread}",
        f"left at the end (the live tunnel counts one each): plexus messages {per(found['messages_left'])}; "
        f"tun devices {per(found['tun_devices'])}; openvpn processes {per(found['openvpn_processes'])}",
        f"acceptor RSS {found['acceptor_rss_before_bytes'] / MIB:.1f} MiB before, "
        f"{found['acceptor_rss_after_bytes'] / MIB:.1f} MiB after",
    ]


STREAM_PATHS = {"tcp": "plain TCP, no NAT", "plexus": "plexus streams", "openvpn": "OpenVPN",
                "openvpn-carried": "OpenVPN, --carry"}  # fmt: skip


def _streams(found: dict[str, Any]) -> list[str]:
    udp, targets, ssh = found["udp"], found["targets"], found["ssh"]
    lines = [
        "",
        f"== Streams: one TCP connection from a to b (cone NATs, 0 ms links): {found['mib']} MiB into a sink "
        f"on b, then {found['round_trips']} 1-byte round trips to an echo on b",
        "Mbit/s of the bulk transfer; round-trip times in ms (median, p95, and what each path adds to plain "
        "TCP's); CPU seconds per MiB of the bulk transfer, user + system, of the process on a and on b "
        "(plexus: inviter, acceptor; OpenVPN: each host's openvpn; carried: its openvpn and plexus); the "
        "sink's answer checked",
        _row("path", ["Mbit/s", "med ms", "p95 ms", "+med ms", "+p95 ms", "CPU a", "CPU b", "answer"]),
    ]
    for name, title in STREAM_PATHS.items():
        bulk, rtt = found["bulk"][name], found["rtt"][name]
        added = found["added_rtt_ms"].get(name)
        per_mib = found["cpu_seconds_per_mib"].get(name)
        lines.append(_row(title, [
            f"{bulk['mbit_s']:.0f}", f"{rtt['median_ms']:.3f}", f"{rtt['p95_ms']:.3f}",
            f"{added['median_ms']:+.3f}" if added else "-", f"{added['p95_ms']:+.3f}" if added else "-",
            f"{per_mib['inviter']:.4f}" if per_mib else "-", f"{per_mib['acceptor']:.4f}" if per_mib else "-",
            "ok" if bulk["ok"] and not rtt["wrong"] else "WRONG",
        ]))  # fmt: skip
    busy = "; ".join(
        f"{STREAM_PATHS[name]} {100 * share['inviter']:.0f} % / {100 * share['acceptor']:.0f} %"
        for name, share in found["cpu_share"].items()
    )
    lines.append(_row("raw UDP, punched", [f"{udp['mbit_s']:.0f}"] + ["-"] * 6 + [f"{udp['loss_pct']:.1f}%"]))
    lines += [
        f"raw UDP: one Python sender, {udp['datagram_bytes']}-byte datagrams, no encryption: sent at "
        f"{udp['send_mbit_s']:.0f} Mbit/s, received {udp['mbit_s']:.0f} Mbit/s, "
        f"{udp['received_datagrams']} of {udp['sent_datagrams']} datagrams (loss {udp['loss_pct']:.1f} %; "
        f"{udp['receive_buffer_drops']} dropped by b's kernel with the receiver's socket buffer full)",
        f"busy share of one core during the transfer, a / b: {busy}",
        _carried(found),
        "datagrams dropped by a full socket buffer during the transfer, a / b: "
        + "; ".join(
            f"{STREAM_PATHS[name]} {drops['a']} / {drops['b']}"
            for name, drops in found["receive_buffer_drops"].items()
        ),
        f"ssh until the remote command's first output (a fresh session each time): through plexus --stdio "
        f"{_ssh(ssh['plexus'])}; through a plain relay without plexus {_ssh(ssh['pipe'])}",
        f"target one stream >= {targets['one_stream_mbit_s']:g} Mbit/s: "
        f"{'met' if targets['throughput_met'] else 'NOT met'} ({found['bulk']['plexus']['mbit_s']:.0f}); "
        f"target added RTT < {targets['added_rtt_ms']:g} ms: {'met' if targets['rtt_met'] else 'NOT met'} "
        f"({found['added_rtt_ms']['plexus']['median_ms']:.3f} ms median)",
    ]
    return lines


def _carried(found: dict[str, Any]) -> str:
    carried, carrier = found["carried"], found["carrier_cpu_seconds"]["openvpn-carried"]
    return (
        f"carried OpenVPN beside plain: {100 * carried['mbit_s_ratio']:.0f} % of its throughput (check >= "
        f"{100 * CARRIED_OVER_PLAIN:g} %), {carried['added_rtt_ms']['median_ms']:+.3f} ms median round trip "
        f"(check <= +{CARRIED_ADDED_RTT_MS:g} ms); "
        f"the carrier (plexus) used {carrier['inviter'] / found['mib']:.4f} / "
        f"{carrier['acceptor'] / found['mib']:.4f} CPU s per MiB on a / b"
    )


def _ssh(found: dict[str, Any]) -> str:
    times = found["seconds"]
    if not times:
        return f"never ({len(found['wrong'])} failed)"
    failed = f", {len(found['wrong'])} failed" if found["wrong"] else ""
    return (
        f"median {found['median_seconds']:.2f} s of {len(times)} ({min(times):.2f}-{max(times):.2f}){failed}"
    )


def _reach(mode: str) -> Reach:
    return Reach("dependent" if mode == "symmetric" else "independent")


def check(results: dict[str, Any]) -> list[str]:
    """What the figures must show; each failure as one line (none: the benchmark passes)."""
    failures = []
    for entry in results.get("connect", []):
        total, bound = entry["total"]["median"], entry["floor"]
        if total > TOTAL_OVER_FLOOR * bound:
            failures.append(f"{entry['delay_ms']:g} ms: time to connect {total:.3f} s is over "
                            f"{TOTAL_OVER_FLOOR:g} x its floor {bound:.3f} s")  # fmt: skip
    for cell in results.get("matrix", []):
        expected = path.choose(_reach(cell["inviter"]), _reach(cell["acceptor"]), own_relay=True).method
        if cell["successes"] != len(cell["codes"]) or cell["method"] != expected:
            failures.append(f"matrix {cell['inviter']} -> {cell['acceptor']}: {_cell(cell)}, "
                            f"expected {expected} every time")  # fmt: skip
    for cell in results.get("networks", []):
        if cell["successes"] != len(cell["codes"]):
            failures.append(f"{cell['network']} -> b {cell['acceptor']}: {_cell(cell)}, expected every "
                            "session to connect")  # fmt: skip
    for cell in results.get("relays", []):
        if cell["successes"] != len(cell["codes"]) or cell["method"] != "relay":
            failures.append(f"relays, {cell['case']}, TURN over {cell['transport'].upper()}: {_cell(cell)}, "
                            "expected relay every time")  # fmt: skip
    if "footprint" in results:
        found = results["footprint"]
        share = found["idle_cpu_seconds"] / found["idle_seconds"]
        if share > IDLE_CPU_SHARE:
            failures.append(
                f"idle acceptor used {100 * share:.2f} % of a core, over {100 * IDLE_CPU_SHARE:g} %"
            )
    if "soak" in results:
        failures += _check_soak(results["soak"])
    if "streams" in results:
        failures += _check_streams(results["streams"])
    if "relay_streams" in results:
        failures += relay_streams.check(results["relay_streams"])
    if "dht" in results:
        # Only what went wrong: a session that failed, a measurement that could not be made. The times and the
        # target are reported.
        failures += [f"dht: {failure}" for failure in results["dht"]["failures"]]
    if "resume" in results:
        failures += resume.check(results["resume"])
    if "relay_direct" in results:
        failures += upgrade.check(results["relay_direct"])
    if "peers" in results:
        failures += peers.check(results["peers"])
    if "startup" in results:
        failures += startup.check(results["startup"])
    return failures


def _check_soak(found: dict[str, Any]) -> list[str]:
    failures = []
    if found["restored"] != found["cycles"]:
        failures.append(f"soak: {found['restored']} of {found['cycles']} cycles restored the tunnel")
    if any(found["messages_left"].values()):
        failures.append(f"soak: plexus messages left in the mailboxes: {found['messages_left']}")
    for what in ("tun_devices", "openvpn_processes"):
        if any(count != 1 for count in found[what].values()):
            failures.append(f"soak: {what.replace('_', ' ')} at the end {found[what]}, expected 1 per host")
    growth = found["acceptor_rss_after_bytes"] - found["acceptor_rss_before_bytes"]
    if growth > SOAK_RSS_GROWTH:
        failures.append(f"soak: the acceptor's RSS grew by {growth / MIB:.1f} MiB")
    return failures


def _check_streams(found: dict[str, Any]) -> list[str]:
    """What must be right whatever the machine: every byte delivered, and carrying no collapse of the
    tunnel (a ratio of two paths on the same machine: a slow machine slows both). The speed targets are
    reported."""
    failures = []
    for name, bulk in found["bulk"].items():
        if not bulk["ok"]:
            failures.append(
                f"streams {name}: the sink answered {bulk['reply']!r}, expected {bulk['expected']!r}"
            )
    for name, rtt in found["rtt"].items():
        if rtt["wrong"]:
            failures.append(f"streams {name}: {rtt['wrong']} echo round trips came back wrong")
    for name, ssh in found["ssh"].items():
        if ssh["wrong"]:
            failures.append(
                f"streams: ssh through {name} failed {len(ssh['wrong'])} times: {ssh['wrong'][0]}"
            )
    if not found["udp"]["received_datagrams"]:
        failures.append("streams: no raw UDP datagram crossed the punched NATs")
    carried = found["carried"]
    if carried["mbit_s_ratio"] < CARRIED_OVER_PLAIN:
        failures.append(
            f"streams: OpenVPN carried by plexus kept {100 * carried['mbit_s_ratio']:.0f} % of its plain "
            f"throughput ({found['bulk']['openvpn-carried']['mbit_s']:.0f} of "
            f"{found['bulk']['openvpn']['mbit_s']:.0f} Mbit/s), under {100 * CARRIED_OVER_PLAIN:g} %"
        )
    if carried["added_rtt_ms"]["median_ms"] > CARRIED_ADDED_RTT_MS:
        failures.append(
            f"streams: carrying OpenVPN added {carried['added_rtt_ms']['median_ms']:.3f} ms to its median "
            f"round trip, over {CARRIED_ADDED_RTT_MS:g} ms"
        )
    return failures


def _dht(found: dict[str, Any]) -> list[str]:
    ways = [(way, title) for way, title in dht.WAYS.items()]
    lines = [
        "",
        f"== DHT rendezvous: time to connect over OpenDHT ({found['nodes']} nodes in the lab's public "
        "namespace) beside the mail, in seconds",
        f"{found['runs']} sessions per way and delay, each a fresh inviter (--dht-port 4222, the day's "
        "node id, as from cron) against one long-running acceptor; each DHT acceptor's first session is a "
        "warm-up, not counted.",
        f"Floors: STUN and the handshake in round trips (docs/performance.md); the DHT's steps the least of "
        f"{found['floor_rounds']} rounds of two plain OpenDHT nodes in the plexus nodes' places.",
    ]
    for entry in found["delays"]:
        hops = entry["hops"]
        lines += [
            "",
            f"== DHT {entry['delay_ms']:g} ms one-way delay per link: RTT host-servers "
            f"{entry['rtt_inviter'] * 1000:.1f} ms (a) / {entry['rtt_acceptor'] * 1000:.1f} ms (b), "
            f"host-host {entry['rtt_peers'] * 1000:.1f} ms",
            f"{'':<19}" + "".join(f"{title:>27}" for _, title in ways),
            _row("phase", ["median", "p90", "floor"] * len(ways)),
        ]
        for name, _ in dht.COMMON:
            cells = []
            for way, _ in ways:
                phase = entry[way].get("common", {}).get(name)
                cells += (
                    ["-"] * 3
                    if phase is None
                    else [f"{phase['measured']['median']:.3f}", f"{phase['measured']['p90']:.3f}",
                          f"{phase['floor']:.3f}"]
                )  # fmt: skip
            lines.append(_row(name, cells))
        cells = []
        for way, _ in ways:
            total = entry[way]["total"]
            cells += ["-", "-"] if total is None else [f"{total['median']:.3f}", f"{total['p90']:.3f}"]
            cells.append(f"{entry[way]['floor']:.3f}")
        lines.append(_row("total", cells))
        lines.append("sessions: " + "; ".join(_dht_sessions(title, entry[way], way)
                                               for way, title in ways))  # fmt: skip
        lines += _dht_phases(dht.WAYS["dht"], entry["dht"], dht.phases_of("dht"))
        lines.append(_dht_hops(hops))
    zero = next((entry for entry in found["delays"] if entry["delay_ms"] == 0), None)
    if zero is not None:
        lines.append(_dht_target(zero, found["target_seconds"]))
    lines += _dht_idle(found["idle"])
    lines += ["", "phases (DHT):"] + [f"  {name:<18} {meaning}" for name, meaning in dht.DHT_PHASES]
    lines += ["side by side:"] + [f"  {name:<18} {meaning}" for name, meaning in dht.COMMON]
    return lines


def _dht_target(zero: dict[str, Any], target: float) -> str:
    total = zero["dht"]["total"]
    verdict = (
        "-"
        if total is None
        else f"{'met' if total['median'] <= target else 'NOT met'} ({total['median']:.3f} s)"
    )
    return f"target, median time to connect at most {target:g} s at 0 ms links: {dht.WAYS['dht']} {verdict}"


def _dht_sessions(title: str, entry: dict[str, Any], way: str) -> str:
    if way == "mail":
        return f"{title} {len(entry['runs'])} ok"
    kinds = ", ".join(f"{count} {kind}" for kind, count in entry["kinds"].items())
    warm = entry["warm_up"]
    first = "failed" if warm["total"] is None else f"{warm['total']:.2f} s"
    exits = entry["inviter_seconds"]
    ended = "" if exits is None else f", inviter exits after {exits['median']:.2f} s"
    return f"{title} {kinds} (warm-up {first}{ended})"


def _dht_phases(title: str, entry: dict[str, Any], phases: tuple[tuple[str, str], ...]) -> list[str]:
    if "phases" not in entry:
        return [f"{title}: no session met this way"]
    lines = [f"{title}, {entry['phases']['start']['measured']['n']} sessions:",
             _row("phase", ["median", "min", "p90", "max", "IQR", "floor", "ratio"])]  # fmt: skip
    for name, _ in phases:
        phase = entry["phases"][name]
        lines.append(_row(name, [*_spread(phase["measured"]), f"{phase['floor']:.3f}",
                                 _ratio(phase["measured"]["median"], phase["floor"])]))  # fmt: skip
    meet = entry["common"]["rendezvous"]
    lines.append(_row("(rendezvous)", [*_spread(meet["measured"]), f"{meet['floor']:.3f}",
                                       _ratio(meet["measured"]["median"], meet["floor"])]))  # fmt: skip
    total = entry["own_total"]
    lines.append(_row("total", [*_spread(total), f"{entry['floor']:.3f}",
                                _ratio(total["median"], entry["floor"])]))  # fmt: skip
    return lines


def _dht_hops(hops: dict[str, Any]) -> str:
    def ms(name: str) -> str:
        found = hops[name]
        return "-" if found is None else f"{found['min'] * 1000:.1f} / {found['median'] * 1000:.1f} ms"

    warm = hops["warm_up_round_trip"]
    failed = f", {len(hops['failed'])} failed" if hops["failed"] else ""
    return (
        f"plain OpenDHT nodes, min / median of {hops['rounds']}{failed}: card lookup {ms('card')}, "
        f"request put until pushed {ms('request')}, response {ms('response')}, round trip {ms('round_trip')}"
        + ("" if warm is None else f"; warm-up round trip {warm * 1000:.1f} ms")
    )


def _dht_idle(idle: dict[str, Any]) -> list[str]:
    seconds, udp, per = idle["seconds"], idle["udp"], idle["udp_per_minute"]
    share = 100 * idle["cpu_seconds"] / seconds

    def traffic(name: str) -> str:
        return (
            f"in {udp[name + '_in']['packets']} packets / {udp[name + '_in']['bytes']} bytes, "
            f"out {udp[name + '_out']['packets']} / {udp[name + '_out']['bytes']} "
            f"(per minute {per[name + '_in']['packets']:g} / {per[name + '_in']['bytes']:g} in, "
            f"{per[name + '_out']['packets']:g} / {per[name + '_out']['bytes']:g} out)"
        )

    return [
        "",
        f"== Idle acceptor in DHT mode over {seconds:g} s ({idle['settle_seconds']:g} s after one session)",
        f"CPU {idle['cpu_seconds']:.2f} s (counted in {idle['clock_tick_seconds']:g} s ticks) = "
        f"{share:.3f} % of one core, RSS {idle['rss_bytes'] / MIB:.1f} MiB "
        f"(peak {idle['peak_rss_bytes'] / MIB:.1f} MiB)",
        f"UDP on b's NAT router's WAN side, IP bytes: DHT node (port 4222) {traffic('dht')}",
        f"other UDP {traffic('other')}",
    ]
