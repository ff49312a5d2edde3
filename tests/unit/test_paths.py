"""The ways through as values: which are tried, in which order, and the fallback between them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, cast

import pytest

from plexus import events, paths, puncher
from plexus.endpoint import Endpoint
from plexus.errors import HandshakeTimeoutError
from plexus.launcher import Tunnel
from plexus.path import Method, Plan
from plexus.relay import Relay

THEIRS = Endpoint("203.0.113.9", 3479)
OWN = cast(Relay, object())  # ways() only holds it


@pytest.mark.parametrize(
    ("plan", "own", "theirs", "expected"),
    [
        (Plan(Method.DIRECT), None, None, [paths.Direct(Plan(Method.DIRECT))]),
        (Plan(Method.SPRAY), None, None, [paths.Direct(Plan(Method.SPRAY))]),
        (Plan(Method.FANOUT), None, None, [paths.FanOut(Plan(Method.FANOUT))]),
        (Plan(Method.DIRECT), OWN, None, [paths.Direct(Plan(Method.DIRECT)), paths.OwnRelay(OWN)]),
        (
            Plan(Method.FANOUT),
            None,
            THEIRS,
            [paths.FanOut(Plan(Method.FANOUT)), paths.TowardRelay(THEIRS, fresh_socket=True)],
        ),
        (Plan(Method.RELAY, relay=THEIRS), None, THEIRS, [paths.TowardRelay(THEIRS)]),
        (Plan(Method.RELAY), OWN, None, [paths.OwnRelay(OWN)]),
        (Plan(Method.LAN), OWN, None, [paths.Direct(Plan(Method.LAN)), paths.OwnRelay(OWN)]),
        (
            Plan(Method.LAN),
            None,
            THEIRS,
            [paths.Direct(Plan(Method.LAN)), paths.TowardRelay(THEIRS, fresh_socket=True)],
        ),
    ],
)
def test_ways_follow_the_plan_then_a_relay(
    plan: Plan, own: Relay | None, theirs: Endpoint | None, expected: list[paths.Way]
) -> None:
    assert paths.ways(plan, own, theirs) == expected


def test_every_way_reports_its_method() -> None:
    methods = [way.method for way in paths.ways(Plan(Method.DIRECT), OWN, None)]
    assert methods == [Method.DIRECT, Method.RELAY]
    assert paths.TowardRelay(THEIRS).describe().startswith("relay (through TURN relay 203.0.113.9:3479")


@pytest.mark.parametrize("known", [False, True])
def test_the_host_candidate_goes_only_toward_a_known_plexus_and_only_behind_a_nat(known: bool) -> None:
    inner, outer = Endpoint("10.0.2.2", 41002), Endpoint("198.51.100.6", 41002)
    behind = paths.Gathered(paths.Found(inner, outer, "independent"))
    assert behind.reach(False, hosts=known).hosts == ((inner,) if known else ())
    public = paths.Gathered(paths.Found(outer, outer, "independent"))
    assert public.reach(False, hosts=known).hosts == ()


async def test_a_lan_plan_reports_lan_when_a_host_candidate_wins() -> None:
    """Loopback as the LAN, TEST-NET as the shared outer address nobody answers at (a NAT that does not
    hairpin): the inviter names the acceptor's host candidate, the acceptor takes the inviter's LAN source."""
    shared = Endpoint("192.0.2.1", 9)
    socks = [paths.bind(Endpoint("127.0.0.1", 0)) for _ in range(2)]
    inviter_lan, acceptor_lan = (Endpoint("127.0.0.1", sock.getsockname()[1]) for sock in socks)

    def attempt(sock: socket.socket, inner: Endpoint, *, accept: bool) -> paths.Attempt:
        codec = puncher.Authenticated.derive(1, 2, accept=accept)
        found = paths.Found(inner, shared, "independent")
        return paths.Attempt(paths.Punching(sock), inner, found, shared, 3, codec, accept, 7)

    inviting = paths.Direct(Plan(Method.LAN, hosts=(acceptor_lan,)))
    accepting = paths.Direct(Plan(Method.LAN))
    got = await asyncio.gather(
        accepting.establish(attempt(socks[1], acceptor_lan, accept=True), 5.0),
        inviting.establish(attempt(socks[0], inviter_lan, accept=False), 5.0),
    )
    assert [(g.tunnel.path, g.tunnel.peer) for g in got] == [
        (Method.LAN, inviter_lan),
        (Method.LAN, acceptor_lan),
    ]


def _ipv6_attempt(*, accept: bool, v6: socket.socket) -> paths.Attempt:
    """Loopback's ::1 as each side's IPv6 endpoint; IPv4 toward TEST-NET, where nobody answers."""
    nowhere = Endpoint("192.0.2.1", 9)
    v4 = paths.bind(Endpoint("127.0.0.1", 0))
    inner = Endpoint("127.0.0.1", v4.getsockname()[1])
    inner6 = Endpoint("::1", v6.getsockname()[1])
    found = paths.Found(inner, nowhere, "independent", inner6, inner6)
    codec = puncher.Authenticated.derive(1, 2, accept=accept)
    return paths.Attempt(paths.Punching(v4, v6), inner, found, nowhere, 3, codec, accept, 7)


@pytest.mark.parametrize("method", [Method.DIRECT, Method.LAN, Method.SPRAY, Method.IPV6])
async def test_ipv6_wins_the_race_or_goes_first_and_the_tunnel_is_ipv6(method: Method) -> None:
    """IPv4 gets nowhere (TEST-NET), IPv6 (loopback) does: raced in the plan's own handshake (direct,
    LAN), or as the way before it (spray, and an IPV6 plan alone); the tunnel has IPv6 endpoints, plain."""
    v6 = [paths.bind(Endpoint("::1", 0)) for _ in range(2)]
    ends = [Endpoint("::1", sock.getsockname()[1]) for sock in v6]
    attempts = [_ipv6_attempt(accept=accept, v6=sock) for accept, sock in zip((True, False), v6, strict=True)]
    plans = [Plan(method, ipv6=ends[1]), Plan(method, ipv6=ends[0])]
    ways = [paths.ways(plan, None, None) for plan in plans]
    assert [type(way).__name__ for way in ways[0]] == (
        ["Direct"] if plans[0].races_ipv6 else ["Ipv6"] if method is Method.IPV6 else ["Ipv6", "Direct"]
    )
    got = await asyncio.gather(
        *(way[0].establish(attempt, 5.0) for way, attempt in zip(ways, attempts, strict=True))
    )
    assert [(g.tunnel.path, g.tunnel.peer, g.tunnel.inner) for g in got] == [
        (Method.IPV6, ends[1], ends[0]),
        (Method.IPV6, ends[0], ends[1]),
    ]
    assert got[0].tunnel.environment()["PLEXUS_PEERIP"] == "::1"


def test_an_ipv6_way_is_bounded_by_its_own_bound() -> None:
    plan = Plan(Method.FANOUT, ipv6=Endpoint("2001:db8::1", 5))
    assert [(way.method, way.bound) for way in paths.ways(plan, None, None)] == [
        (Method.IPV6, paths.IPV6_BOUND),
        (Method.FANOUT, paths.FALLBACK_BOUND),
    ]


class _Way:
    def __init__(self, method: Method, outcome: paths.Established | None) -> None:
        self.method, self.outcome, self.timeouts = method, outcome, list[float]()
        self.bound = paths.FALLBACK_BOUND

    def describe(self) -> str:
        return str(self.method)

    async def establish(self, attempt: paths.Attempt, timeout: float) -> paths.Established:
        self.timeouts.append(timeout)
        if self.outcome is None:
            raise HandshakeTimeoutError("no")
        return self.outcome


def _attempt() -> Any:
    return None  # the fakes do not read it


async def test_establish_falls_back_and_bounds_all_but_the_last() -> None:
    tunnel = Tunnel(Endpoint("10.0.0.1", 1), Endpoint("198.51.100.1", 1), THEIRS, 7, "relay")
    direct, relay = _Way(Method.DIRECT, None), _Way(Method.RELAY, paths.Punched(tunnel))
    reported: list[events.Event] = []
    with events.reporting(reported.append, "accept"):
        got = await paths.establish([direct, relay], _attempt(), handshake_timeout=60.0)
    assert got == paths.Punched(tunnel)
    assert (direct.timeouts, relay.timeouts) == ([paths.FALLBACK_BOUND], [60.0])
    assert [e.way for e in reported if isinstance(e, events.FellBack)] == ["direct"]


async def test_the_last_ways_failure_is_the_sessions() -> None:
    with pytest.raises(HandshakeTimeoutError):
        await paths.establish([_Way(Method.DIRECT, None)], _attempt(), handshake_timeout=1.0)


async def test_a_punched_path_lets_a_standby_allocation_go_at_once() -> None:
    tunnel = Tunnel(Endpoint("10.0.0.1", 1), Endpoint("198.51.100.1", 1), THEIRS, 7)
    released = []
    async with contextlib.AsyncExitStack() as allocations:
        allocations.callback(released.append, "relay")
        punched = paths.Punched(tunnel)
        assert not punched.through_here
        await punched.release_unused(allocations)
        assert released == ["relay"]
        ran = []

        async def work() -> None:
            ran.append(True)

        await punched.carry(work())
        assert ran == [True]


def test_bind_names_the_option() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(Exception, match=f"cannot bind --stun-client 127.0.0.1:{port}"):
            paths.bind(Endpoint("127.0.0.1", port))
