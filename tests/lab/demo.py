"""The README's demo: one real plexus session between two hosts behind two NATs, then everything torn down.

Run as root: `python3 -m tests.lab.demo` (scripts/demo installs what it needs first).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.lab import sessions
from tests.lab.lab import Lab, lab_available


def show(title: str, text: str) -> None:
    print(f"\n== {title}")
    for line in text.strip().splitlines():
        print(f"   {line}")


def session(lab: Lab, workdir: Path, nat: str) -> bool:
    for host in ("a", "b"):
        lab.set_nat(host, nat)
    inviter, acceptor_side = sessions.pair(lab)
    show("the lab", lab.describe())
    acceptor = sessions.start(lab, acceptor_side, inviter, workdir, accept=True)
    try:
        sessions.wait_until_listening(acceptor)
        where = f"{lab.inner_ip('b')} behind {nat} NAT {lab.public_ip('b')}"
        print(f"\n== host b ({where}): plexus --accept is waiting")
        started = time.monotonic()
        invite = sessions.start(lab, inviter, acceptor_side, workdir, accept=False)
        code = invite.wait(120)
        print(
            f"== host a ({lab.inner_ip('a')} behind {nat} NAT {lab.public_ip('a')}): plexus exited {code} "
            f"after {time.monotonic() - started:.2f} s"
        )
        show("host a: plexus log", _info(invite.log()))
        show("host b: plexus log", _info(acceptor.log()))
        if code != 0:
            show("host a: plexus stderr", invite.stderr())
            return False
        a, b = invite.wait_hello()[0], acceptor.wait_hello()[0]
        show("host a: the launched command (hello.py)", f"got {a['args']}\nheard: {a['received']}")
        show("host b: the launched command (hello.py)", f"got {b['args']}\nheard: {b['received']}")
        return bool(a["received"] and b["received"])
    finally:
        acceptor.stop()


def _info(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if " DEBUG " not in line and " TRACE " not in line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nat", default="cone", choices=["cone", "fullcone", "none"], help="both NATs' mode")
    args = parser.parse_args()
    reason = lab_available()
    if reason is not None:
        print(f"demo: {reason}", file=sys.stderr)
        return 2
    print("== bringing the lab up (network namespaces, nftables NATs, coturn, Dovecot, SMTP server)")
    with tempfile.TemporaryDirectory(prefix="plexus-demo-") as workdir, Lab() as lab:
        print(f"   up in {lab.startup_s:.1f} s")
        ok = session(lab, Path(workdir), args.nat)
        print("\n== taking the lab down")
    print("\nOK: the launched commands exchanged datagrams through both NATs." if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
