#!/usr/bin/env python3
"""A launched command that holds its inner endpoint until stopped, as OpenVPN does.

plexus runs it with its default seven arguments; it binds innerip:innerport, prints one JSON line with its
arguments and pid, and sleeps until a signal ends it. The reconnect tests count these processes per host.
"""

import json
import os
import socket
import sys
import time


def main() -> int:
    names = ("innerip", "innerport", "outerip", "outerport", "peerip", "peerport", "secret")
    args = dict(zip(names, sys.argv[1:], strict=True))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args["innerip"], int(args["innerport"])))
    print(json.dumps({"args": args, "pid": os.getpid()}), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
