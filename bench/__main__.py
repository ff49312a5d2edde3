"""The plexus benchmark: `python3 -m bench` (as root; scripts/bench installs what it needs first).

In its own NAT lab it measures the time to connect (with its phases, beside the floor the same path could not
beat), which NAT pairs connect and how the others fail (and issue 18's networks: a LAN without hairpin, a
double NAT, no UDP out), what an idle acceptor and one session cost, and the reconnect loop with real
OpenVPN (bench/soak.py), streams: TCP through plexus's QUIC beside plain TCP,
OpenVPN and the raw UDP path (bench/streams.py), the same streams through a TURN relay over UDP, TCP and TLS
beside the direct path (bench/relay_streams.py), the DHT rendezvous beside the mail (bench/dht.py), a
stream across a side's moves behind filtering NATs, by mail and on the DHT (bench/resume.py), a relayed
session's move to a direct path and back (bench/upgrade.py), an acceptor serving 20 peers beside one serving 1
(bench/peers.py), and
`plexus --version` and `--help` beside a bare interpreter (bench/startup.py, the one section without a lab).
Progress goes to stderr, the report to stdout (a plain-text table), and with --json FILE also to that file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import dht, floor, peers, relay_streams, report, resume, runs, soak, startup, streams, upgrade
from bench.stats import summarize
from bench.timeline import PHASES, Timeline, TimelineError
from tests.lab.lab import Lab, LabError, lab_available

SECTIONS = (
    "connect", "matrix", "relays", "footprint", "soak", "streams", "relay-streams", "dht", "resume",
    "relay-direct", "peers", "startup",
)  # fmt: skip
T = TypeVar("T")


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=_positive(int), default=10, help="sessions per delay (default 10)")
    parser.add_argument(
        "--delays", type=_delays, default=(0.0, 25.0), help="one-way delays per link in ms (default 0,25)"
    )
    parser.add_argument(
        "--idle", type=_positive(float), default=60.0, help="seconds of idle acceptor to measure (default 60)"
    )
    parser.add_argument(
        "--fail-timeout", type=_positive(float), default=15.0,
        help="--response-timeout and --handshake-timeout in the matrix (default 15)",
    )  # fmt: skip
    parser.add_argument(
        "--sections", type=_sections, default=SECTIONS, help=f"what to run (default {','.join(SECTIONS)})"
    )
    parser.add_argument(
        "--tries",
        type=_positive(int),
        default=3,
        help="sessions per pair of NAT modes, per relay transport, per path in relay-streams, in"
        " relay-direct, per acceptor in peers (default 3)",
    )
    parser.add_argument(
        "--cycles", type=_positive(int), default=20, help="reconnect cycles in the soak (default 20)"
    )
    parser.add_argument(
        "--stream-mib",
        type=_positive(int),
        default=200,
        help="MiB of the streams' bulk transfer (default 200)",
    )
    parser.add_argument(
        "--round-trips", type=_positive(int), default=1000,
        help="1-byte round trips per path in the streams section (default 1000)",
    )  # fmt: skip
    parser.add_argument(
        "--ssh-runs",
        type=_positive(int),
        default=5,
        help="ssh logins timed in the streams section (default 5)",
    )
    parser.add_argument(
        "--relay-mib", type=_positive(int), default=16,
        help="MiB each way per session in the relay-streams and relay-direct sections (default 16)",
    )  # fmt: skip
    parser.add_argument(
        "--moves", type=_positive(int), default=10,
        help="moves of each moving side's NAT per rendezvous in the resume section (default 10)",
    )  # fmt: skip
    parser.add_argument(
        "--movers", type=_movers, default=("a",),
        help="whose NAT moves in the resume section: a (the inviter), b (the acceptor), a,b (in turn; "
             "default a)",
    )  # fmt: skip
    parser.add_argument(
        "--resume-mib", type=_positive(int), default=16,
        help="MiB of the bulk transfers before and after each move in the resume section (default 16)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON here")
    return parser.parse_args(argv)


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def convert(text: str) -> T:
        value = kind(text)
        if not value > 0:  # type: ignore[operator]
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its error message
    return convert


def _delays(text: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(item) for item in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected milliseconds like 0,25, not {text!r}") from error
    if any(delay < 0 for delay in delays):
        raise argparse.ArgumentTypeError("delays cannot be negative")
    return delays


def _movers(text: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(item.strip() for item in text.split(",")))
    if not chosen or not set(chosen) <= set(resume.MOVERS):
        raise argparse.ArgumentTypeError(f"expected a, b or a,b, not {text!r}")
    return chosen


def _sections(text: str) -> tuple[str, ...]:
    chosen = tuple(item.strip() for item in text.split(","))
    unknown = [item for item in chosen if item not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section {unknown[0]!r}; choose from {','.join(SECTIONS)}")
    return chosen


def machine() -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def set_delay(lab: Lab, delay_ms: float) -> None:
    for host in ("a", "b"):
        lab.set_link(host, delay_ms=delay_ms)


def bench_connect(
    lab: Lab,
    workdir: Path,
    args: argparse.Namespace,
    delivery: float,
    keep: dict[float, list[Timeline]] | None = None,
) -> list[dict[str, Any]]:
    """The mail sessions at each delay; their timelines also go to `keep` (for the dht section)."""
    results = []
    for delay in args.delays:
        set_delay(lab, delay)
        paths = floor.Paths(floor.ping_rtt(lab, "a"), floor.ping_rtt(lab, "b"), delivery)
        progress(f"{delay:g} ms links: RTT to the servers {paths.rtt_inviter * 1000:.1f} ms (a), "
                 f"{paths.rtt_acceptor * 1000:.1f} ms (b); {args.runs} sessions")  # fmt: skip
        timelines = runs.connect(lab, workdir, args.runs, on_run=lambda i, t: progress(
            f"  run {i}: {t.total:.2f} s"))  # fmt: skip
        if keep is not None:
            keep[delay] = timelines
        bound = floor.floor(paths)
        results.append({
            "delay_ms": delay,
            "rtt_inviter": paths.rtt_inviter,
            "rtt_acceptor": paths.rtt_acceptor,
            "rtt_peers": paths.rtt_peers,
            "total": summarize([t.total for t in timelines]).to_json(),
            "floor": round(sum(bound.values()), 4),
            "phases": {
                name: {"measured": summarize([t.phases[name] for t in timelines]).to_json(),
                       "floor": round(bound[name], 4)}
                for name, _ in PHASES
            },
            "runs": [round(t.total, 4) for t in timelines],
        })  # fmt: skip
    set_delay(lab, 0)
    return results


def bench_matrix(lab: Lab, workdir: Path, timeout: float, tries: int) -> list[dict[str, Any]]:
    cells = []
    for inviter_mode in report.MODES:
        for acceptor_mode in report.MODES:
            cell = runs.matrix_cell(lab, workdir, inviter_mode, acceptor_mode, timeout, tries)
            progress(
                f"matrix {inviter_mode} -> {acceptor_mode}: {cell.method}, {cell.successes}/{tries} ok, "
                f"{statistics.median(cell.seconds):.1f} s"
            )
            cells.append({"inviter": inviter_mode, "acceptor": acceptor_mode} | _figures(cell))
    for host in ("a", "b"):
        lab.set_nat(host, "cone")
    return cells


def bench_networks(lab: Lab, workdir: Path, timeout: float, tries: int) -> list[dict[str, Any]]:
    """Issue 18's networks, like the matrix's cells: c on b's LAN (its NAT does not hairpin) inviting b, and
    a's cone router behind the carrier NAT inviting b, b's NAT cone, then symmetric; a and b with IPv6 beside
    IPv4, both NATs symmetric and no relay (IPv6 is the only way), and both cone (IPv6 raced)."""
    cells = []
    for network, acceptor_mode in report.NETWORKS:
        lab.double_nat(network == report.DOUBLE_NAT)
        inviting = "c" if network == report.SAME_LAN else "a"
        ipv6 = network in (report.IPV6_ONLY_WAY, report.DUAL_STACK)
        cell = runs.matrix_cell(
            lab, workdir, "symmetric" if network == report.IPV6_ONLY_WAY else "cone", acceptor_mode, timeout,
            tries, inviting=inviting, turn=network != report.IPV6_ONLY_WAY,
            options={"stun-server": lab.STUN_NAME} if ipv6 else {},
        )  # fmt: skip
        progress(
            f"{network}, b {acceptor_mode}: {cell.method}, {cell.successes}/{tries} ok, "
            f"{statistics.median(cell.seconds):.2f} s"
        )
        cells.append({"network": network, "acceptor": acceptor_mode} | _figures(cell))
    lab.double_nat(False)
    for host in ("a", "b"):
        lab.set_nat(host, "cone")
    return cells


def _figures(cell: runs.Cell) -> dict[str, Any]:
    return {"codes": list(cell.codes), "outcome": cell.outcome, "method": cell.method,
            "successes": cell.successes, "seconds": [round(s, 3) for s in cell.seconds]}  # fmt: skip


def bench_relays(lab: Lab, workdir: Path, timeout: float, tries: int) -> list[dict[str, Any]]:
    """Sessions through the relay over each transport to the TURN server: both NATs symmetric, then a's
    network letting no UDP out (relay-only, once STUN over UDP went unanswered for 2 s)."""
    cells = []
    for case, transport in report.RELAY_CASES:
        lab.block_udp("a", case == report.NO_UDP)
        modes = ("symmetric", "symmetric") if case == report.SYMMETRIC else ("cone", "cone")
        cell = runs.matrix_cell(lab, workdir, *modes, timeout, tries, transport=transport)
        progress(
            f"relays, {case}, TURN over {transport.upper()}: {cell.method}, {cell.successes}/{tries} ok, "
            f"{statistics.median(cell.seconds):.1f} s"
        )
        cells.append({"case": case, "transport": transport} | _figures(cell))
    lab.block_udp("a", False)
    for host in ("a", "b"):
        lab.set_nat(host, "cone")
    return cells


def bench_footprint(lab: Lab, workdir: Path, idle: float) -> dict[str, Any]:
    progress(f"footprint: an idle acceptor for {idle:g} s, then one session")
    found = runs.footprint(lab, workdir, idle)
    return {
        "idle_seconds": found.idle_seconds,
        "idle_cpu_seconds": round(found.idle_cpu, 3),
        "clock_tick_seconds": 1 / runs.CLOCK_TICKS,
        "idle_rss_bytes": found.idle_rss,
        "idle_peak_rss_bytes": found.idle_peak_rss,
        "inviter": {
            "code": found.session.code,
            "seconds": round(found.session.seconds, 3),
            "cpu_seconds": round(found.session.cpu, 3),
            "max_rss_bytes": found.session.max_rss,
        },
        "acceptor_session_cpu_seconds": round(found.acceptor_session_cpu, 3),
        "acceptor_rss_after_bytes": found.acceptor_rss_after,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "runs": args.runs}
    started = time.monotonic()
    if "startup" in args.sections:  # first, on a machine the lab does not load yet
        progress(f"start-up: plexus --version and --help beside python -c pass, {args.runs} runs each")
        results["startup"] = startup.measure(args.runs)
    if not set(args.sections) - {"startup"}:
        results["bench_seconds"] = round(time.monotonic() - started, 1)
        return results
    with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp, Lab() as lab:
        workdir = Path(tmp)
        progress(f"lab up in {lab.startup_s:.1f} s")
        mail: dict[float, list[Timeline]] = {}  # the connect section's sessions, for the dht section
        if "connect" in args.sections or "dht" in args.sections:
            delivery = floor.measure_delivery(lab, "a")
            progress(f"mail server delivery (DATA until the IDLE push): {delivery * 1000:.0f} ms")
            results["delivery_seconds"] = round(delivery, 4)
        if "connect" in args.sections:
            results["connect"] = bench_connect(lab, workdir, args, delivery, keep=mail)
        if "dht" in args.sections:
            results["dht"] = dht.measure(
                lab, workdir / "dht", args.runs, args.delays, args.idle, delivery, mail, progress
            )
        if "matrix" in args.sections:
            results["matrix_timeout"] = args.fail_timeout
            results["matrix_tries"] = args.tries
            results["matrix"] = bench_matrix(lab, workdir, args.fail_timeout, args.tries)
            results["networks"] = bench_networks(lab, workdir, args.fail_timeout, args.tries)
        if "relays" in args.sections:
            results["relays_timeout"] = args.fail_timeout
            results["relays"] = bench_relays(lab, workdir, args.fail_timeout, args.tries)
        if "footprint" in args.sections:
            results["footprint"] = bench_footprint(lab, workdir, args.idle)
        if "soak" in args.sections:
            progress(f"soak: {args.cycles} reconnect cycles through plexus-reconnect and exec.sh (OpenVPN)")
            found = soak.soak(
                lab,
                workdir / "soak",
                args.cycles,
                on_cycle=lambda i, c: progress(
                    f"  cycle {i} ({c.broken}): exit {c.code}, "
                    + (
                        "not restored"
                        if c.restore_seconds is None
                        else f"ping after {c.restore_seconds:.2f} s"
                    )
                ),
            )
            results["soak"] = found.to_json()
        if "streams" in args.sections:
            results["streams"] = streams.measure(
                lab, workdir / "streams", args.stream_mib, args.round_trips, args.ssh_runs, progress
            )
        if "relay-streams" in args.sections:
            results["relay_streams"] = relay_streams.measure(
                lab, workdir / "relay-streams", args.relay_mib, args.tries, progress
            )
        if "resume" in args.sections:
            plan = resume.Plan(args.moves, args.movers, args.resume_mib)
            results["resume"] = resume.measure(lab, workdir / "resume", plan, progress)
        if "relay-direct" in args.sections:
            results["relay_direct"] = upgrade.measure(
                lab, workdir / "relay-direct", args.relay_mib, args.tries, progress
            )
        if "peers" in args.sections:
            results["peers"] = peers.measure(lab, workdir / "peers", args.tries, progress)
    results["bench_seconds"] = round(time.monotonic() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so the lab's context manager tears it down on either.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = parse_args(argv)
    if args.json is not None and not args.json.parent.is_dir():
        print(f"bench: --json {args.json}: no such directory {args.json.parent}", file=sys.stderr)
        return 2
    reason = None if set(args.sections) == {"startup"} else lab_available()
    if reason is not None:
        print(f"bench: {reason}", file=sys.stderr)
        return 2
    try:
        results = run(args)
    except (LabError, TimelineError, RuntimeError, TimeoutError, OSError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    failures = report.check(results)
    results["failures"] = failures
    print(report.render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    for failure in failures:
        print(f"bench: FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
