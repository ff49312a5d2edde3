"""Relay to direct: a relayed streams session's move to a direct path once one works, and back to the relay
when that path dies (issue 19; plexus/streams/direct.py), with the bulk throughput before and after.

Host a's network lets no UDP out (tests/lab's block_udp), so its `--forward` inviter goes relay-only
through its TURN allocation over TCP; b's acceptor forwards to a sink target. Each session, `runs` times:

- a bulk transfer of `mib` MiB up into the sink on the relay (bench/streams.py's `bulk`, checked);
- a's network lets UDP out again: the time until the inviter's `rerouted` event (way "direct"), counted from
  that moment and from the session's start (the first check of each side's NAT is `direct.CHECK_FIRST`
  into the session, so a way that opens earlier waits for it);
- the same bulk transfer on the direct path;
- a's network blocks UDP again: the time until `rerouted` (way "relay").

Both NATs are port-restricted cone (they filter per endpoint) throughout.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import streams
from plexus.events import one_line
from plexus.streams import direct, quic
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.services import TcpTarget
from tests.lab.sessions import Plexus

LOCAL_SINK = 17021  # --forward's listening port on a
# The move must come with the first check after the way opens; the way back within the dead bound and a bit.
MOVE_BOUND = direct.CHECK_FIRST + 2.0
BACK_BOUND = quic.DEAD_AFTER + 1.5
FIGURES = ("relayed", "direct", "moved", "moved_in_session", "back")  # Run's, in its order


@dataclass(frozen=True)
class Run:
    """One session: MB/s on the relay and on the direct path, the move's and the fall back's times."""

    relayed: float | None  # MiB/s
    direct: float | None
    moved: float | None  # seconds after the way opened
    moved_in_session: float | None  # seconds after the session's launch
    back: float | None  # seconds after the direct path was cut
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            key: (round(value, 3) if isinstance(value, float) else value)
            for key, value in self.__dict__.items()
        }


def one(lab: Lab, workdir: Path, ids: streams.Ids, acceptor: tuple[Any, Any], sink: int, mib: int) -> Run:
    me, peer = acceptor
    block, expected = streams.block_and_expected(mib)
    figures: dict[str, float | None] = dict.fromkeys(FIGURES)

    def transfer() -> float:
        done = lab.run_sync("a", lambda: streams.bulk("127.0.0.1", LOCAL_SINK, block, mib, expected))
        if not done.ok:
            raise RuntimeError(f"the sink got something else: {done.reply!r}")
        return done.sent / streams.MIB / done.seconds

    lab.block_udp("a")
    try:
        turn = sessions.turn(lab, transport="tcp")
        with streams.forwarding(
            lab, workdir, ids, me, peer, [f"{LOCAL_SINK}:127.0.0.1:{sink}"], turn
        ) as invite:
            way = invite.events("connected")[-1]["way"]
            if way != "relay":
                raise RuntimeError(f"connected by {way}, not through the relay")
            started = invite.events("launched")[0]["at"]
            figures["relayed"] = transfer()
            lab.block_udp("a", False)
            opened = time.time()
            moved = _wait(invite, "direct", started + direct.CHECK_FIRST + 20)
            figures["moved"], figures["moved_in_session"] = moved - opened, moved - started
            figures["direct"] = transfer()
            lab.block_udp("a")
            cut = time.time()
            figures["back"] = _wait(invite, "relay", cut + 15) - cut
    except (RuntimeError, OSError, TimeoutError) as error:
        return _run(figures, one_line(error))
    finally:
        lab.block_udp("a", False)
    return _run(figures, None)


def _run(figures: dict[str, float | None], error: str | None) -> Run:
    relayed, direct_path, moved, in_session, back = (figures[name] for name in FIGURES)
    return Run(relayed, direct_path, moved, in_session, back, error)


def _wait(invite: Plexus, way: str, deadline: float) -> float:
    """When the inviter's `rerouted` event with this way came (its time), waiting until the deadline."""
    while time.time() < deadline:
        found = invite.matching("rerouted", way=way)
        if found:
            return float(found[-1]["at"])
        time.sleep(0.05)
    raise TimeoutError(f"no move to the {way} path")


def measure(
    lab: Lab, workdir: Path, mib: int, runs: int, progress: Callable[[str], None] = streams.progress_none
) -> dict[str, Any]:
    """Everything the section reports, as the results' `relay_direct` entry."""
    workdir.mkdir(parents=True, exist_ok=True)
    ids = streams.Ids.make(workdir / "ids")
    found: list[Run] = []
    progress(f"relay to direct: {runs} sessions relayed over TCP (a lets no UDP out), {mib} MiB each way")
    with (
        TcpTarget(lab, "b", "sink") as sink,
        streams.streams_acceptor(lab, workdir, ids, f"127.0.0.1:{sink.port}") as (_, me, peer),
    ):
        for _ in range(runs):
            done = one(lab, workdir, ids, (me, peer), sink.port, mib)
            found.append(done)
            progress(
                "  "
                + (f"FAILED: {done.error}" if done.error else "")
                + f" relay {_f(done.relayed)} MiB/s, direct {_f(done.direct)} MiB/s; moved"
                f" {_f(done.moved)} s after the way opened, back {_f(done.back)} s after the cut"
            )
    return summary(mib, found)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary(mib: int, found: list[Run]) -> dict[str, Any]:
    whole = [run for run in found if run.error is None]

    def figures(name: str) -> dict[str, float] | None:
        values = [getattr(run, name) for run in whole]
        if not values:
            return None
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {"mib": mib, "runs": [run.to_json() for run in found]} | {name: figures(name) for name in FIGURES}


def render(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Relay to direct ({len(results['runs'])} sessions relayed over TCP, {results['mib']} MiB up each way"
        " of the path):",
    ]
    rows = (
        ("on the relay, MiB/s", "relayed"),
        ("on the direct path, MiB/s", "direct"),
        ("moved, s after the way opened", "moved"),
        ("moved, s after the session started", "moved_in_session"),
        ("back on the relay, s after the cut", "back"),
    )
    for title, name in rows:
        found = results[name]
        shown = (
            "-"
            if found is None
            else f"{found['median']:.2f} (min {found['min']:.2f}, max {found['max']:.2f})"
        )
        lines.append(f"  {title:<38} median {shown}")
    failed = [run["error"] for run in results["runs"] if run["error"]]
    lines += [f"  FAILED: {error}" for error in failed]
    return lines


def check(results: dict[str, Any]) -> list[str]:
    """Each session moved to the direct path within the first check after the way opened and back within
    the dead bound, every transfer whole. The throughputs are reported, not bound: the lab's relay runs on
    the same machine as both hosts, so its path is no slower than the direct one here."""
    failures = [f"relay-direct: a session failed: {run['error']}" for run in results["runs"] if run["error"]]
    for run in results["runs"]:
        if run["moved"] is not None and run["moved"] > MOVE_BOUND:
            failures.append(
                f"relay-direct: moved {run['moved']:.2f} s after the way opened (> {MOVE_BOUND:g})"
            )
        if run["back"] is not None and run["back"] > BACK_BOUND:
            failures.append(f"relay-direct: back on the relay after {run['back']:.2f} s (> {BACK_BOUND:g})")
    return failures
