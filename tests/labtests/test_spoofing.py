"""A blind attacker during a real session: forged handshake datagrams from the inviter's NAT address (other
ports and its very endpoint), sent from the lab's internet at a public acceptor's punched port, never make the
attacker the acceptor's peer, and the real session completes (docs/protocol.md, "Authenticated packet")."""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from plexus import puncher
from plexus.endpoint import Endpoint
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.sessions import Plexus

pytestmark = pytest.mark.lab

PORT = 40000  # both sides' --stun-client port: the acceptor's punched port, and the inviter's outer one
BURST, PAUSE = 40, 0.02  # about 2000 forged datagrams a second


def udp_packet(source: Endpoint, target: Endpoint, payload: bytes) -> bytes:
    """An IPv4 UDP datagram with any source: the kernel fills the IP checksum; a UDP checksum 0 is none."""
    udp = struct.pack("!HHHH", source.port, target.port, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(source.host), socket.inet_aton(target.host),
    )  # fmt: skip
    return ip + udp


def forged(rng: random.Random) -> bytes:
    """What a blind attacker can make: 2.2's packet for a guessed secret (it passes 2.2's check one time in
    256), plexus's authenticated header with a guessed tag, or noise."""
    kind = rng.randrange(3)
    if kind == 0:
        return puncher.encode(puncher.Flag(rng.getrandbits(1)), rng.getrandbits(64), rng.randbytes(7))
    if kind == 1:
        body = bytes([puncher.AUTH_VERSION, rng.getrandbits(1)]) + rng.randbytes(puncher.DATAGRAM_SIZE - 2)
        return body
    return rng.randbytes(puncher.DATAGRAM_SIZE)


class Attacker:
    """Floods `target` from the lab's internet (the pub namespace) with forged datagrams whose source is
    `spoofed`'s address: its very endpoint every other time, another port of it otherwise."""

    def __init__(self, lab: Lab, spoofed: Endpoint, target: Endpoint) -> None:
        self.raw = lab.run_sync(
            "pub", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        )
        self.spoofed, self.target = spoofed, target
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flood, daemon=True)

    def __enter__(self) -> Attacker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.raw.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _flood(self) -> None:
        rng = random.Random(16)
        while not self._stop.is_set():
            for _ in range(BURST):
                if self._stop.is_set():
                    return
                port = self.spoofed.port if self.sent % 2 else rng.randrange(1024, 65536)
                source = Endpoint(self.spoofed.host, port)
                self.raw.sendto(udp_packet(source, self.target, forged(rng)), (self.target.host, 0))
                self.sent += 1
            time.sleep(PAUSE)


def test_forged_datagrams_from_the_inviters_nat_never_take_over_a_public_acceptor(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    lab.set_nat("b", "none")  # public: whatever reaches its address reaches plexus, no NAT filters it
    # A slower path to the inviter keeps the acceptor's handshake open longer: more forged datagrams hit it.
    lab.set_link("a", delay_ms=150)
    inviter_side, acceptor_side = sessions.pair(lab)
    fixed = {"stun-client": f"0.0.0.0:{PORT}"}
    acceptor = sessions.start(lab, acceptor_side, inviter_side, tmp_path, accept=True, overrides=fixed)
    running.append(acceptor)
    sessions.wait_until_listening(acceptor)
    inviter_outer = Endpoint(lab.public_ip("a"), PORT)  # a's cone NAT keeps the port
    acceptor_outer = Endpoint(lab.public_ip("b"), PORT)
    with Attacker(lab, inviter_outer, acceptor_outer) as attacker:
        invite = sessions.start(lab, inviter_side, acceptor_side, tmp_path, accept=False, overrides=fixed)
        running.append(invite)
        # Until the acceptor's handshake is over; then its command binds the port, and greets only its peer.
        acceptor.wait_events("connected", timeout=60)
        attacker.stop()
    code = invite.wait(90)
    assert code == 0, f"inviter exited {code}: {invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    # Refused datagrams are counted in the debug log, the one place that names each: an event per datagram
    # would let a flood grow the events file.
    log = acceptor.log()
    ignored = len(re.findall(rf"ignoring \d+ bytes from {re.escape(lab.public_ip('a'))}:\d+", log))
    print(
        f"{attacker.sent} forged datagrams sent, {ignored} reached the acceptor's handshake and were refused"
    )
    # 2.2's check would have let the median attacker in after 374 (tests/unit/test_puncher.py)
    assert ignored >= 400
    assert not acceptor.events("moved")
    assert [event["peer"] for event in acceptor.events("connected")] == [str(inviter_outer)]
    (result,) = acceptor.wait_hello()
    assert (result["args"]["peerip"], int(result["args"]["peerport"])) == tuple(inviter_outer)
    # What hello.py then hears is the command's own traffic, which plexus does not authenticate (OpenVPN's
    # tls-auth does that for its own): forged datagrams still in flight when the flood stops may reach it.
    (theirs,) = invite.wait_hello()
    assert (theirs["args"]["peerip"], int(theirs["args"]["peerport"])) == tuple(acceptor_outer)
