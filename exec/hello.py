#!/usr/bin/env python3
"""Prove that traffic crosses the punched path: bind the inner endpoint, greet the peer, hear its greeting.

plexus runs it as `hello.py innerip innerport outerip outerport peerip peerport secret`. It prints one JSON
line: its arguments and what it heard from the peer; exit 0 when the peer was heard, 1 when not in time.
Both sides keep greeting a little after hearing the peer, so the peer hears them too.
"""

import json
import socket
import sys
import time

DEADLINE = 15.0
INTERVAL = 0.1
LINGER = 1.0


def main() -> int:
    started = time.time()
    names = ("innerip", "innerport", "outerip", "outerport", "peerip", "peerport", "secret")
    if len(sys.argv) != len(names) + 1:
        print(f"usage: {sys.argv[0]} {' '.join(names)}", file=sys.stderr)
        return 2
    args = dict(zip(names, sys.argv[1:], strict=True))
    peer = (args["peerip"], int(args["peerport"]))
    sock = socket.socket(socket.AF_INET6 if ":" in args["innerip"] else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args["innerip"], int(args["innerport"])))
    sock.settimeout(INTERVAL)
    greeting = f"hello from {args['outerip']}:{args['outerport']} secret {args['secret']}".encode()
    received: str | None = None
    heard_at = 0.0
    start = time.monotonic()
    while time.monotonic() - start < DEADLINE and (received is None or time.monotonic() - heard_at < LINGER):
        sock.sendto(greeting, peer)
        try:
            data, source = sock.recvfrom(2048)
        except TimeoutError:
            continue
        if source[:2] == peer and received is None:  # an IPv6 source has flow info and scope too
            received, heard_at = data.decode(errors="replace"), time.monotonic()
    print(json.dumps({"args": args, "received": received, "started": started}), flush=True)
    return 0 if received else 1


if __name__ == "__main__":
    sys.exit(main())
