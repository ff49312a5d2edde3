"""A delay wire for kernels without sch_netem: two TAP devices and a relay that copies frames late.

Lab.set_link replaces the veth between a NAT router's `wan` and inet's `nat-X` by a TAP device of the same
name on each side. One relay process, started inside inet's namespace (the lab's teardown kills every
process in its namespaces, so it ends this one too), creates both taps and copies every Ethernet frame from
one to the other `delay_ms` after reading it, in order. A tap lives in the namespace of whoever opened
/dev/net/tun, so the far one is opened from a thread joined to the router's namespace. The relay holds the
only file descriptors: the taps vanish with it. With no delay the lab puts the plain veth back (a frame
through the relay costs about 0.1 ms more than through a veth).

    relay = start(router_ns, "wan", inet_ns, "nat-a", delay_ms)  # the taps exist and are up, no addresses
    stop_process(relay)                                         # (tests.lab.lab) the taps are gone
    python3 -m tests.lab.wire NETNS_A DEV_A NETNS_B DEV_B DELAY_MS   # the relay itself: prints "ready"
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

from tests.lab import netns

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
FRAME_MAX = 65536
READY = "ready"
START_TIMEOUT_S = 10.0
ROOT = Path(__file__).resolve().parents[2]  # where `-m tests.lab.wire` resolves


def open_tap(name: str) -> int:
    """A non-blocking fd of a new TAP device `name` in the calling thread's network namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class Direction:
    """Frames read from one tap, written to the other once their time has come, oldest first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, source: int, sink: int, delay: float) -> None:
        self._loop, self._source, self._sink, self._delay = loop, source, sink, delay
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        loop.add_reader(source, self._read)

    def _read(self) -> None:
        due = self._loop.time() + self._delay
        while True:
            try:
                frame = os.read(self._source, FRAME_MAX)
            except BlockingIOError:
                return
            # One timer per queue, not per frame: timers that fall due together have no defined order.
            if not self._queue:
                self._loop.call_at(due, self._flush)
            self._queue.append((due, frame))

    def _flush(self) -> None:
        now = self._loop.time()
        while self._queue and self._queue[0][0] <= now:
            frame = self._queue.popleft()[1]
            with contextlib.suppress(OSError):  # the far tap is down or full: a wire drops the frame
                os.write(self._sink, frame)
        if self._queue:
            self._loop.call_at(self._queue[0][0], self._flush)


def relay(ns_a: str, dev_a: str, ns_b: str, dev_b: str, delay_ms: float) -> None:
    """Create both taps, say ready on stdout, then copy frames both ways until SIGTERM."""
    fds: dict[str, int] = {}

    def create(ns: str, dev: str) -> None:
        netns.join_netns(ns)
        fds[dev] = open_tap(dev)

    for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
        thread = threading.Thread(target=create, args=(ns, dev))
        thread.start()
        thread.join()
        if dev not in fds:
            raise SystemExit(f"wire: cannot create tap {dev} in {ns}")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        delay = delay_ms / 1000
        Direction(loop, fds[dev_a], fds[dev_b], delay)
        Direction(loop, fds[dev_b], fds[dev_a], delay)
        print(READY, flush=True)
        await stop

    asyncio.run(run())


# ---- the lab side ----------------------------------------------------------------------------------------


def start(ns_a: str, dev_a: str, ns_b: str, dev_b: str, delay_ms: float) -> subprocess.Popen[str]:
    """Start the relay inside ns_b; returns it once both taps exist and are up (they still need addresses).

    The taps exist exactly as long as the relay runs: stop it (lab.stop_process) to remove them.
    """
    process = subprocess.Popen(
        ["ip", "netns", "exec", ns_b, sys.executable, "-m", "tests.lab.wire", ns_a, dev_a, ns_b, dev_b,
         f"{delay_ms:g}"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    line = _readline(process, START_TIMEOUT_S)
    if line.strip() != READY:
        _abandon(process)
        error = process.stderr.read() if process.stderr else ""
        raise OSError(
            f"the delay wire {ns_a}/{dev_a} - {ns_b}/{dev_b} did not start: {error.strip() or line}"
        )
    for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
        up = subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], capture_output=True, text=True)
        if up.returncode != 0:
            _abandon(process)
            raise OSError(f"cannot set {ns}/{dev} up: {up.stderr.strip()}")
    return process


def _abandon(process: subprocess.Popen[str]) -> None:
    """A relay that failed to start is of no use: no grace period."""
    process.kill()
    process.wait()


def _readline(process: subprocess.Popen[str], timeout: float) -> str:
    """The relay's first line, or "" if it says nothing in time (a thread: pipes have no read timeout)."""
    stdout = process.stdout
    assert stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    ns_a, dev_a, ns_b, dev_b, delay = argv
    relay(ns_a, dev_a, ns_b, dev_b, float(delay))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
