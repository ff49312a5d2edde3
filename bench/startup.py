"""Start-up: how long `plexus --version` and `plexus --help` take beside a bare interpreter.

Both print and exit before any network library is needed, so they should cost little more than Python
itself; a module that imports the mail clients, OpenDHT or aioquic at the top shows here. Each command runs
`runs` times, interleaved so a busy moment hits all three alike; the median is reported. No lab needed.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

# The same interpreter and flags for all three: the difference is what plexus imports.
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "plexus --version": [sys.executable, "-m", "plexus", "--version"],
    "plexus --help": [sys.executable, "-m", "plexus", "--help"],
}
BARE = "python -c pass"
TARGET = 3.0  # --version within this many times the bare interpreter (issue 17)
# What the target holds for. --help is shown beside it: it needs typer, whose own import is about 1.5x a bare
# interpreter; that --help loads no network library is a unit test's (tests/unit/test_cli.py).
TARGETED = ("plexus --version",)


def _once(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure(runs: int) -> dict[str, Any]:
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for command in COMMANDS.values():
        _once(command)  # warm the page cache and the .pyc files first
    for _ in range(runs):
        for name, command in COMMANDS.items():
            seconds[name].append(_once(command))
    medians = {name: round(statistics.median(found), 4) for name, found in seconds.items()}
    return {"runs": runs, "target": TARGET, "median_seconds": medians}


def render(found: dict[str, Any]) -> list[str]:
    medians = found["median_seconds"]
    bare = medians[BARE]
    lines = ["", f"Start-up: median of {found['runs']} runs each, in seconds (target: --version within "
                 f"{found['target']:g}x of the bare interpreter)."]  # fmt: skip
    lines += [f"{name:<19}{seconds:>9.3f}{seconds / bare:>8.1f}x" for name, seconds in medians.items()]
    return lines


def check(found: dict[str, Any]) -> list[str]:
    medians = found["median_seconds"]
    bare = medians[BARE]
    return [
        f"start-up: {name} took {seconds:.3f} s, over {found['target']:g} x the bare interpreter's "
        f"{bare:.3f} s"
        for name, seconds in medians.items()
        if name in TARGETED and seconds > found["target"] * bare
    ]
