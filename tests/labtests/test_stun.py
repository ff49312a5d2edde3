"""STUN discovery from host a through each lab NAT mode, against the lab's coturn (RFC 5780)."""

from __future__ import annotations

import socket
import time

import pytest

from plexus.endpoint import Endpoint
from plexus.errors import StunError
from plexus.stun import DEFAULT_SCHEDULE, NatReport, explore, probe_mapping, query_outer
from tests.lab.lab import Lab

pytestmark = pytest.mark.lab


def udp_socket() -> socket.socket:
    """Created inside the namespace thread, so inside the host's namespace; bound like plexus binds it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)
    return sock


async def explore_from(lab: Lab, host: str = "a") -> tuple[NatReport, float, Endpoint]:
    """The report, its duration, and the outer endpoint the same socket has afterwards."""

    async def factory() -> tuple[NatReport, float, Endpoint]:
        with udp_socket() as sock:
            start = time.monotonic()
            report = await explore(sock, Lab.STUN_PRIMARY)
            elapsed = time.monotonic() - start
            return report, elapsed, await query_outer(sock, Lab.STUN_PRIMARY)

    return await lab.call(host, factory)


async def test_cone_maps_independently_and_preserves_the_port(lab: Lab) -> None:
    report, elapsed, outer_after = await explore_from(lab)
    print(f"cone: {report.to_json()} in {elapsed:.2f} s")
    assert report.inner.host == lab.inner_ip("a")
    assert report.nat and report.outer.host == lab.public_ip("a")
    assert report.port_preserved
    assert report.mapping == "independent"
    assert report.filtering == "address-and-port-dependent"
    assert report.hairpin is False
    assert outer_after == report.outer  # the punching socket kept its mapping through the tests


async def test_fullcone_filters_independently(lab: Lab) -> None:
    lab.set_nat("a", "fullcone")
    report, elapsed, outer_after = await explore_from(lab)
    print(f"fullcone: {report.to_json()} in {elapsed:.2f} s")
    assert (report.mapping, report.filtering) == ("independent", "independent")
    assert outer_after == report.outer


async def test_symmetric_maps_per_destination(lab: Lab) -> None:
    lab.set_nat("a", "symmetric")
    report, elapsed, _ = await explore_from(lab)
    print(f"symmetric: {report.to_json()} in {elapsed:.2f} s")
    assert report.nat and report.outer.host == lab.public_ip("a")
    assert report.mapping == "address-and-port-dependent"
    assert report.punchable is False


async def test_public_host_has_no_nat(lab: Lab) -> None:
    lab.set_nat("a", "none")
    report, _, _ = await explore_from(lab)
    assert not report.nat
    assert report.outer == report.inner and report.inner.host == lab.inner_ip("a")
    assert (report.mapping, report.filtering) == ("independent", "independent")
    assert report.hairpin is True  # a datagram to its own address simply arrives


async def test_session_mapping_probe_on_cone(lab: Lab) -> None:
    async def factory() -> NatReport:
        with udp_socket() as sock:
            return await probe_mapping(sock, Lab.STUN_PRIMARY)

    start = time.monotonic()
    report = await lab.call("a", factory)
    print(f"probe_mapping on cone: {time.monotonic() - start:.3f} s")
    assert (report.mapping, report.filtering, report.hairpin) == ("independent", None, None)
    assert report.outer == Endpoint(lab.public_ip("a"), report.inner.port)


async def test_silent_stun_server_gives_stun_error_within_the_bound(lab: Lab) -> None:
    async def factory() -> float:
        with udp_socket() as sock:
            start = time.monotonic()
            expected = r"^no answer from STUN server 203\.0\.113\.10:3478 after 9\.5 s$"
            with pytest.raises(StunError, match=expected):
                await explore(sock, Lab.STUN_PRIMARY)
            return time.monotonic() - start

    lab.stop_stun()
    try:
        elapsed = await lab.call("a", factory)
    finally:
        lab.start_stun()
    assert DEFAULT_SCHEDULE.timeout - 0.1 < elapsed < DEFAULT_SCHEDULE.timeout + 1
