"""The handshake through the lab's Linux NATs: roles, the TTL punch, a symmetric NAT, reuse of the endpoint.

The lab's cone NATs keep the host's port, so a host's outer endpoint is (its public address, its inner port)
and no STUN is needed here.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from plexus import puncher
from plexus.endpoint import Endpoint
from plexus.errors import HandshakeTimeoutError
from tests.lab.lab import Lab

pytestmark = pytest.mark.lab

SECRET = 0x0123456789ABCDEF

# A stand-in for the launched command: binds the inner endpoint plexus just closed and talks to the peer.
TALK = """
import socket, sys, time
inner, peer = (sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4]))
word = ("plexus-lab " + sys.argv[5]).encode()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(inner)
sock.settimeout(0.1)
heard, deadline = None, time.monotonic() + 10
while time.monotonic() < deadline:
    sock.sendto(word, peer)
    try:
        data, source = sock.recvfrom(100)
    except TimeoutError:
        continue
    if source == peer and data.startswith(b"plexus-lab ") and heard is None:
        heard = data.decode()
        deadline = time.monotonic() + 1  # keep talking a little, so the peer hears us too
print(heard)
"""


class Side:
    """A host's punching socket, bound to a fresh port on its inner address."""

    def __init__(self, lab: Lab, host: str) -> None:
        self.host = host
        self.sock = lab.socket(host)
        self.sock.bind((lab.inner_ip(host), 0))
        self.inner = Endpoint(*self.sock.getsockname())
        self.outer = Endpoint(lab.public_ip(host), self.inner.port)


async def punch(
    lab: Lab, side: Side, peer: Side, *, accept: bool, hops: int = 7, timeout: float = 10
) -> None:
    await lab.call(
        side.host,
        lambda: puncher.punch(side.sock, peer.outer, SECRET, accept=accept, hops=hops, timeout=timeout),
    )


async def handshake(lab: Lab, acceptor: Side, inviter: Side, *, hops: int = 7) -> None:
    """The acceptor punches first, as in a session, where its response mail follows the punch."""
    accepting = asyncio.create_task(punch(lab, acceptor, inviter, accept=True, hops=hops))
    await asyncio.sleep(0.2)
    await asyncio.gather(accepting, punch(lab, inviter, acceptor, accept=False))


@pytest.mark.parametrize("acceptor_host", ["a", "b"])
async def test_cone_cone_completes_in_either_role(lab: Lab, acceptor_host: str) -> None:
    acceptor = Side(lab, acceptor_host)
    inviter = Side(lab, "b" if acceptor_host == "a" else "a")
    await handshake(lab, acceptor, inviter)
    assert acceptor.sock.fileno() == -1
    assert inviter.sock.fileno() == -1


async def test_started_together_it_still_completes(lab: Lab) -> None:
    a, b = Side(lab, "a"), Side(lab, "b")
    await asyncio.gather(punch(lab, b, a, accept=False), punch(lab, a, b, accept=True))


@pytest.mark.parametrize(("hops", "reaches_peer_nat"), [(2, False), (Lab.HOPS_TO_PEER_NAT, True)])
async def test_ttl_punch_opens_own_nat_and_reaches_the_peer_nat_only_with_enough_hops(
    lab: Lab, hops: int, reaches_peer_nat: bool
) -> None:
    acceptor, inviter = Side(lab, "a"), Side(lab, "b")
    before = lab.wan_udp_count("b")
    accepting = asyncio.create_task(punch(lab, acceptor, inviter, accept=True, hops=hops))
    await asyncio.sleep(0.5)
    assert (lab.wan_udp_count("b") > before) is reaches_peer_nat
    await asyncio.gather(accepting, punch(lab, inviter, acceptor, accept=False))


async def test_lossy_links_still_complete(lab: Lab) -> None:
    lab.set_link("a", loss_pct=30)
    lab.set_link("b", loss_pct=30)
    await handshake(lab, Side(lab, "a"), Side(lab, "b"))


async def test_symmetric_nat_ends_in_a_timeout_error(lab: Lab) -> None:
    lab.set_nat("b", "symmetric")
    acceptor, inviter = Side(lab, "a"), Side(lab, "b")
    started = time.monotonic()
    results = await asyncio.gather(
        punch(lab, acceptor, inviter, accept=True, timeout=5),
        punch(lab, inviter, acceptor, accept=False, timeout=5),
        return_exceptions=True,
    )
    assert time.monotonic() - started < 10
    for result, peer in zip(results, (inviter, acceptor), strict=True):
        assert isinstance(result, HandshakeTimeoutError)
        assert str(result) == f"no handshake with {peer.outer} within 5 s"
    assert acceptor.sock.fileno() == -1


async def test_a_new_process_on_the_inner_endpoint_talks_to_the_peer(lab: Lab) -> None:
    acceptor, inviter = Side(lab, "a"), Side(lab, "b")
    await handshake(lab, acceptor, inviter)

    def talk(side: Side, peer: Side) -> subprocess.Popen[str]:
        argv = [*side.inner, *peer.outer, side.host]
        return lab.popen(
            side.host, [sys.executable, "-c", TALK, *map(str, argv)], stdout=subprocess.PIPE, text=True
        )

    processes = [talk(acceptor, inviter), talk(inviter, acceptor)]
    outputs = await asyncio.gather(*(asyncio.to_thread(p.communicate, timeout=20) for p in processes))
    assert [out.strip() for out, _ in outputs] == ["plexus-lab b", "plexus-lab a"]
    assert all(p.returncode == 0 for p in processes)
