#!/usr/bin/env python3
"""A launched command that holds its inner endpoint until stopped, as OpenVPN does.

plexus runs it with its default seven arguments and, where --exec-args gives one, an eighth word (the peers
test's %peer%); it binds innerip:innerport, prints one JSON line with its arguments, the eighth word, its pid
and PLEXUS_PEER, and sleeps until a signal ends it. The reconnect tests count these processes per host.
"""

import json
import os
import socket
import sys
import time


def main() -> int:
    names = ("innerip", "innerport", "outerip", "outerport", "peerip", "peerport", "secret")
    args = dict(zip(names, sys.argv[1:8], strict=True))
    word = sys.argv[8] if len(sys.argv) > 8 else None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args["innerip"], int(args["innerport"])))
    peer = os.environ.get("PLEXUS_PEER")
    print(json.dumps({"args": args, "word": word, "pid": os.getpid(), "peer": peer}), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
