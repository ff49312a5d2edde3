"""The handshake through the lab's Linux NATs: roles, the TTL punch, a symmetric NAT, reuse of the endpoint;
the fan-out of a host behind the symmetric NAT against a peer-reflexive, spraying easy side.

The lab's cone NATs keep the host's port, so a host's outer endpoint is (its public address, its inner port)
and no STUN is needed for it; the symmetric side's mailed endpoint comes from STUN.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import statistics
import subprocess
import sys
import time

import pytest

from plexus import puncher
from plexus.endpoint import Endpoint
from plexus.errors import HandshakeTimeoutError
from plexus.stun import query_outer
from tests.lab.lab import Lab

pytestmark = pytest.mark.lab

SECRET = 0x0123456789ABCDEF
MASKED = puncher.Masked(SECRET)
INVITER_PUZZLE, ACCEPTOR_PUZZLE = 0x0123456789ABCDEF, 0xFEDCBA9876543210


def sealing(accept: bool) -> puncher.Codec:
    """The codec between two plexus peers (birthday punching is plexus's only), one per side."""
    return puncher.Authenticated.derive(INVITER_PUZZLE, ACCEPTOR_PUZZLE, accept=accept)


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
        lambda: puncher.punch(side.sock, peer.outer, MASKED, accept=accept, hops=hops, timeout=timeout),
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


# --- a host behind the symmetric NAT (the hard side), one behind an endpoint-independent NAT (easy) -------

BIRTHDAY_RUNS = int(os.environ.get("PLEXUS_BIRTHDAY_RUNS", "40"))


class Fan:
    """The hard side: `count` sockets on fresh ports of the host's inner address; `mailed` is the first one's
    outer endpoint as the STUN server saw it, the endpoint a session would mail."""

    def __init__(self, lab: Lab, host: str, count: int = puncher.FANOUT_SOCKETS) -> None:
        self.host = host

        def open_sockets() -> list[socket.socket]:
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
            for sock in socks:
                sock.bind((lab.inner_ip(host), 0))
                sock.setblocking(False)
            return socks

        self.socks = lab.run_sync(host, open_sockets)
        self.mailed = Endpoint("0.0.0.0", 0)

    async def query(self, lab: Lab) -> None:
        self.mailed = await lab.call(self.host, lambda: query_outer(self.socks[0], Lab.STUN_PRIMARY))


async def birthday(
    lab: Lab, easy: Side, hard: Fan, *, easy_accepts: bool, timeout: float = 10
) -> tuple[float, Endpoint, socket.socket, Endpoint]:
    """Both sides at about the same time, the acceptor first; (seconds, easy's final peer, hard's winner and
    peer). The winner is left open."""
    await hard.query(lab)

    def easy_punch() -> asyncio.Future[Endpoint]:
        return asyncio.ensure_future(
            lab.call(
                easy.host,
                lambda: puncher.punch(
                    easy.sock, hard.mailed, sealing(easy_accepts), accept=easy_accepts, timeout=timeout,
                    peer_reflexive=True, spray=puncher.Spray(),
                ),
            )
        )  # fmt: skip

    def hard_punch() -> asyncio.Future[tuple[socket.socket, Endpoint]]:
        return asyncio.ensure_future(
            lab.call(
                hard.host,
                lambda: puncher.punch_fanout(
                    hard.socks,
                    easy.outer,
                    sealing(not easy_accepts),
                    accept=not easy_accepts,
                    timeout=timeout,
                ),
            )
        )

    started = time.monotonic()
    if easy_accepts:
        easy_task = easy_punch()
        await asyncio.sleep(0.2)
        hard_task = hard_punch()
    else:
        hard_task = hard_punch()
        await asyncio.sleep(0.2)
        easy_task = easy_punch()
    await asyncio.wait([easy_task, hard_task])  # type: ignore[type-var]
    elapsed = time.monotonic() - started
    if hard_task.exception() is None and easy_task.exception() is not None:
        hard_task.result()[0].close()
    final = easy_task.result()  # raises the easy side's error first, then the hard side's
    winner, peer = hard_task.result()
    return elapsed, final, winner, peer


async def test_the_symmetric_nat_allocates_ports_at_random(lab: Lab) -> None:
    # With sequential ports the birthday would be trivial: a probe next to the mailed port would hit.
    lab.set_nat("b", "symmetric")
    hard = Fan(lab, "b", 64)

    async def outer_ports() -> list[int]:
        return [(await query_outer(sock, Lab.STUN_PRIMARY)).port for sock in hard.socks]

    try:
        ports = await lab.call("b", outer_ports)
    finally:
        for sock in hard.socks:
            sock.close()
    ordered = sorted(ports)
    steps = [b - a for a, b in itertools.pairwise(ordered)]
    print(f"64 mappings: ports {ordered[0]}-{ordered[-1]}, median step {statistics.median(steps)}")
    assert len(set(ports)) == 64
    assert ordered[0] >= 1024
    assert ordered[-1] - ordered[0] > 40000  # uniform over 64512 ports spans ~63000
    assert sum(step <= 4 for step in steps) < 8  # sequential allocation would make nearly all steps 1
    quarters = [sum(1024 + q * 16128 <= p < 1024 + (q + 1) * 16128 for p in ports) for q in range(4)]
    assert min(quarters) >= 4, quarters


@pytest.mark.parametrize("easy_accepts", [True, False], ids=["hard-inviter", "hard-acceptor"])
async def test_cone_and_symmetric_connect_in_either_role(lab: Lab, easy_accepts: bool) -> None:
    lab.set_nat("b", "symmetric")
    easy, hard = Side(lab, "a"), Fan(lab, "b")
    elapsed, final, winner, peer = await birthday(lab, easy, hard, easy_accepts=easy_accepts)
    with winner:
        print(f"cone x symmetric: {elapsed:.2f} s, easy side's peer {final} (mailed {hard.mailed})")
        assert final.host == lab.public_ip("b")
        assert final != hard.mailed
        assert peer == easy.outer
        assert sum(sock.fileno() != -1 for sock in hard.socks) == 1
        # the path stays: a new socket on the easy side's inner endpoint reaches the winner through it
        again = lab.socket("a")
        with again:
            again.bind(tuple(easy.inner))
            again.sendto(b"plexus-lab a", tuple(final))
            winner.settimeout(2)
            while (received := winner.recvfrom(100))[0] != b"plexus-lab a":
                assert len(received[0]) == puncher.DATAGRAM_SIZE  # a handshake packet still queued
            assert received[1] == tuple(easy.outer)


@pytest.mark.parametrize("easy_accepts", [True, False], ids=["hard-inviter", "hard-acceptor"])
@pytest.mark.parametrize("easy_mode", ["fullcone", "none"])
async def test_an_unfiltered_easy_side_connects_peer_reflexively_at_once(
    lab: Lab, easy_mode: str, easy_accepts: bool
) -> None:
    lab.set_nat("a", easy_mode)
    lab.set_nat("b", "symmetric")
    easy, hard = Side(lab, "a"), Fan(lab, "b")
    elapsed, final, winner, _ = await birthday(lab, easy, hard, easy_accepts=easy_accepts)
    with winner:
        print(f"{easy_mode} x symmetric: {elapsed:.2f} s (0.2 s of it the acceptor's head start)")
        assert final.host == lab.public_ip("b")
        assert elapsed < 1.0  # no probe needed: the fan-out's first hellos get through


async def test_cone_and_symmetric_succeed_as_often_as_the_arithmetic_says(lab: Lab) -> None:
    """PLEXUS_BIRTHDAY_RUNS runs (40 by default), the roles alternating; with the defaults the chance of a
    success is 1 - (1 - 256/64512)^1024 = 98.3 %."""
    times: list[float] = []
    for run in range(BIRTHDAY_RUNS):
        lab.set_nat("a", "cone")  # a fresh conntrack on both routers for every run
        lab.set_nat("b", "symmetric")
        easy, hard = Side(lab, "a"), Fan(lab, "b")
        try:
            elapsed, _, winner, _ = await birthday(lab, easy, hard, easy_accepts=run % 2 == 0)
        except HandshakeTimeoutError:
            continue
        winner.close()
        times.append(elapsed)
    rate = len(times) / BIRTHDAY_RUNS
    median, longest = (statistics.median(times), max(times)) if times else (float("nan"), float("nan"))
    print(f"cone x symmetric: {len(times)}/{BIRTHDAY_RUNS}, median {median:.2f} s, max {longest:.2f} s")
    assert rate >= 0.9
