"""Run the NAT lab by hand.

python -m tests.lab up      bring the lab up, print its namespaces, addresses and accounts, wait for Ctrl-C
python -m tests.lab clean   remove namespaces, servers and files of labs whose owner process died
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from tests.lab.lab import Lab, LabError, clean_stale, lab_available


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through Lab's context manager, so teardown runs for SIGTERM/SIGHUP as for Ctrl-C
    raise SystemExit(128 + signum)


def up() -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored; Ctrl-C must still work
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Lab() as lab:
        print(lab.describe())
        print(f"lab up in {lab.startup_s:.1f} s; Ctrl-C tears it down", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            print("\ntearing the lab down", flush=True)
    return 0


def clean() -> int:
    removed = clean_stale()
    print("\n".join(f"removed {item}" for item in removed) or "nothing to clean")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab", description="plexus NAT lab")
    parser.add_argument("command", choices=["up", "clean"])
    command = parser.parse_args().command
    reason = lab_available()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    try:
        return up() if command == "up" else clean()
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
