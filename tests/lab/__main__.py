"""Run the NAT lab by hand.

python -m tests.lab up [A [B]] [--double-nat]
                                bring the lab up with host a's and host b's NAT modes (one mode: both hosts;
                                default cone), a's router behind the carrier NAT with --double-nat, print its
                                namespaces, addresses and accounts, wait for Ctrl-C
python -m tests.lab clean       remove namespaces, servers and files of labs whose owner process died
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from tests.lab.lab import NAT_MODES, Lab, LabError, clean_stale, lab_available


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through Lab's context manager, so teardown runs for SIGTERM/SIGHUP as for Ctrl-C
    raise SystemExit(128 + signum)


def up(nat_a: str = "cone", nat_b: str = "cone", double_nat: bool = False) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored; Ctrl-C must still work
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Lab() as lab:
        lab.set_nat("a", nat_a)
        lab.set_nat("b", nat_b)
        lab.double_nat(double_nat)
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
    modes = ", ".join(NAT_MODES)
    parser.add_argument("nat_a", nargs="?", choices=NAT_MODES, metavar="A", help=f"host a's NAT: {modes}")
    parser.add_argument("nat_b", nargs="?", choices=NAT_MODES, metavar="B", help="host b's NAT (default: A)")
    parser.add_argument(
        "--double-nat", action="store_true", help="host a's router behind a carrier NAT (up only)"
    )
    args = parser.parse_args()
    if args.command == "clean" and (args.nat_a is not None or args.double_nat):
        parser.error("clean takes no NAT modes")
    nat_a: str = args.nat_a or "cone"
    nat_b: str = args.nat_b or nat_a
    reason = lab_available()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    try:
        return up(nat_a, nat_b, args.double_nat) if args.command == "up" else clean()
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
