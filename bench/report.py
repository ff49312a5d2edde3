"""The benchmark's results as plain-text tables (the JSON form is the results dict itself)."""

from __future__ import annotations

import statistics
from typing import Any

from bench.timeline import PHASES
from plexus import path
from plexus.mediator.message import Reach

MIB = 1024 * 1024
# What the benchmark asserts (check()): loose enough for a loaded 2-core machine, tight enough to catch a
# return of 2.2's habits (seconds of STUN tests, mail polling) or a busy-waiting acceptor.
TOTAL_OVER_FLOOR = 2.0  # median time to connect at most this many times its floor
IDLE_CPU_SHARE = 0.01  # an idle acceptor uses at most this share of one core
SOAK_RSS_GROWTH = 8 * 1024 * 1024  # the acceptor's memory may grow this much over the soak, no more
CORNER = "inviter \\ acceptor"
# The order: from no NAT to the one that defeats punching
MODES = ("none", "cone", "fullcone", "symmetric")
CELL = 34


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
    if "footprint" in results:
        lines += _footprint(results["footprint"])
    if "soak" in results:
        lines += _soak(results["soak"])
    if "streams" in results:
        lines += _streams(results["streams"])
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


def _cell(cell: dict[str, Any]) -> str:
    spread = f"{statistics.median(cell['seconds']):.1f} s"
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


STREAM_PATHS = {"tcp": "plain TCP, no NAT", "plexus": "plexus streams", "openvpn": "OpenVPN"}


def _streams(found: dict[str, Any]) -> list[str]:
    udp, targets, ssh = found["udp"], found["targets"], found["ssh"]
    lines = [
        "",
        f"== Streams: one TCP connection from a to b (cone NATs, 0 ms links): {found['mib']} MiB into a sink "
        f"on b, then {found['round_trips']} 1-byte round trips to an echo on b",
        "Mbit/s of the bulk transfer; round-trip times in ms (median, p95, and what each path adds to plain "
        "TCP's); CPU seconds per MiB of the bulk transfer, user + system, of the process on a and on b "
        "(plexus: inviter, acceptor; OpenVPN: each host's openvpn); the sink's answer checked",
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
        f"ssh until the remote command's first output (a fresh session each time): through plexus --stdio "
        f"{_ssh(ssh['plexus'])}; through a plain relay without plexus {_ssh(ssh['pipe'])}",
        f"target one stream >= {targets['one_stream_mbit_s']:g} Mbit/s: "
        f"{'met' if targets['throughput_met'] else 'NOT met'} ({found['bulk']['plexus']['mbit_s']:.0f}); "
        f"target added RTT < {targets['added_rtt_ms']:g} ms: {'met' if targets['rtt_met'] else 'NOT met'} "
        f"({found['added_rtt_ms']['plexus']['median_ms']:.3f} ms median)",
    ]
    return lines


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
    """Only what must be right whatever the machine: every byte delivered. The speed targets are reported."""
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
    return failures
