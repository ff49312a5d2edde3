"""The lab itself, measured with plain sockets: NAT behaviour per mode, TTL reach, STUN, mail, teardown."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import os
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from email.message import EmailMessage

import pytest
from aioice import stun

from plexus.endpoint import Endpoint
from tests.lab.lab import Lab

pytestmark = pytest.mark.lab

REFLECTORS = (("203.0.113.10", 40000), ("203.0.113.11", 40001))
HOST_PORT = 41000
TIMEOUT = 1.0


@contextmanager
def pub_sockets(
    lab: Lab, addresses: tuple[tuple[str, int], ...] = REFLECTORS
) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        socks = []
        for address in addresses:
            sock = stack.enter_context(lab.socket("pub"))
            sock.bind(address)
            sock.settimeout(TIMEOUT)
            socks.append(sock)
        yield socks


def host_socket(lab: Lab, host: str, port: int = HOST_PORT, family: int = socket.AF_INET) -> socket.socket:
    sock = lab.socket(host, family)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    sock.settimeout(TIMEOUT)
    return sock


def seen_sources(lab: Lab, host: str) -> list[tuple[str, int]]:
    """The host's source address as each of two pub addresses sees it, from one host socket."""
    with pub_sockets(lab) as reflectors, host_socket(lab, host) as sock:
        seen = []
        for reflector in reflectors:
            sock.sendto(b"where am I", reflector.getsockname())
            data, source = reflector.recvfrom(100)
            assert data == b"where am I"
            seen.append(source)
        return seen


def unsolicited_arrives(lab: Lab, host: str) -> bool:
    """After the host talked to one pub address, does a datagram from another one reach it?"""
    with pub_sockets(lab) as (contacted, stranger), host_socket(lab, host) as sock:
        sock.sendto(b"hello", contacted.getsockname())
        _, public = contacted.recvfrom(100)
        stranger.sendto(b"unsolicited", public)
        try:
            return sock.recvfrom(100)[0] == b"unsolicited"
        except TimeoutError:
            return False


def test_socket_lives_in_namespace(lab: Lab) -> None:
    with pub_sockets(lab, REFLECTORS[:1]) as (reflector,), lab.socket("a") as sock:
        sock.sendto(b"x", REFLECTORS[0])
        _, source = reflector.recvfrom(10)
    assert source[0] == lab.public_ip("a")


async def test_call_runs_in_namespace(lab: Lab) -> None:
    async def inner_address() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(REFLECTORS[0])
            return str(sock.getsockname()[0])

    assert await lab.call("a", inner_address) == "10.0.1.2"
    assert await lab.call("b", inner_address) == "10.0.2.2"


async def test_call_cancellation_reaches_namespace_thread(lab: Lab) -> None:
    cancelled = threading.Event()

    async def sleeper() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lab.call("a", sleeper), 0.2)
    assert cancelled.is_set()


async def test_call_propagates_errors(lab: Lab) -> None:
    async def fail() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        await lab.call("b", fail)


@pytest.mark.parametrize("mode", ["cone", "fullcone"])
def test_cone_maps_endpoint_independently_and_keeps_port(lab: Lab, mode: str) -> None:
    lab.set_nat("a", mode)
    assert seen_sources(lab, "a") == [(lab.public_ip("a"), HOST_PORT)] * 2


def test_symmetric_maps_per_destination(lab: Lab) -> None:
    lab.set_nat("a", "symmetric")
    first, second = seen_sources(lab, "a")
    assert first[0] == second[0] == lab.public_ip("a")
    assert first[1] != second[1]


@pytest.mark.parametrize(("mode", "arrives"), [("cone", False), ("symmetric", False), ("fullcone", True)])
def test_unsolicited_inbound(lab: Lab, mode: str, arrives: bool) -> None:
    lab.set_nat("b", mode)
    assert unsolicited_arrives(lab, "b") is arrives


def test_none_makes_host_public(lab: Lab) -> None:
    lab.set_nat("a", "none")
    assert lab.inner_ip("a") == lab.public_ip("a") == "198.51.100.66"
    assert seen_sources(lab, "a") == [("198.51.100.66", HOST_PORT)] * 2
    assert unsolicited_arrives(lab, "a")
    lab.set_nat("a", "cone")
    assert seen_sources(lab, "a") == [("198.51.100.2", HOST_PORT)] * 2


def test_nat_modes_are_independent(lab: Lab) -> None:
    lab.set_nat("a", "symmetric")
    assert seen_sources(lab, "b") == [(lab.public_ip("b"), HOST_PORT)] * 2


def test_ttl_reaches_peer_nat_at_three_hops(lab: Lab) -> None:
    target = (lab.public_ip("b"), 42000)

    def arrivals(ttl: int) -> int:
        before = lab.wan_udp_count("b")
        with host_socket(lab, "a") as sock:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            sock.sendto(b"punch", target)
        time.sleep(0.2)
        return lab.wan_udp_count("b") - before

    assert arrivals(Lab.HOPS_TO_PEER_NAT - 1) == 0
    assert arrivals(Lab.HOPS_TO_PEER_NAT) == 1


def stun_request(
    sock: socket.socket, server: tuple[str, int], change: int = 0
) -> tuple[stun.Message, tuple[str, int]] | None:
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    if change:
        request.attributes["CHANGE-REQUEST"] = change
    sock.sendto(bytes(request), server)
    try:
        data, source = sock.recvfrom(2048)
    except TimeoutError:
        return None
    reply = stun.parse_message(data)
    assert reply.transaction_id == request.transaction_id
    return reply, source[:2]  # IPv6's source has flow info and scope id too


@pytest.mark.parametrize("server", [Lab.STUN_PRIMARY, Lab.STUN_ALTERNATE])
def test_stun_answers_with_other_address(lab: Lab, server: tuple[str, int]) -> None:
    with host_socket(lab, "a") as sock:
        answer = stun_request(sock, server)
    assert answer is not None
    reply, source = answer
    assert source == tuple(server)
    assert reply.attributes["XOR-MAPPED-ADDRESS"] == (lab.public_ip("a"), HOST_PORT)
    if server == Lab.STUN_PRIMARY:
        assert reply.attributes["OTHER-ADDRESS"] == tuple(Lab.STUN_ALTERNATE)
    else:
        # coturn 4.6.1 quirk: asked at (A2, P2) it names (A2, P1), not (A1, P1) as RFC 5780 says.
        assert reply.attributes["OTHER-ADDRESS"] == (Lab.STUN_ALTERNATE.host, Lab.STUN_PRIMARY.port)


CHANGE_IP, CHANGE_PORT = 0x04, 0x02


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (CHANGE_IP | CHANGE_PORT, Lab.STUN_ALTERNATE),
        (CHANGE_PORT, (Lab.STUN_PRIMARY.host, Lab.STUN_ALTERNATE.port)),
        (CHANGE_IP, (Lab.STUN_ALTERNATE.host, Lab.STUN_PRIMARY.port)),
    ],
)
def test_stun_change_request_answers_from_changed_address(
    lab: Lab, change: int, expected: tuple[str, int]
) -> None:
    lab.set_nat("a", "fullcone")
    with host_socket(lab, "a") as sock:
        answer = stun_request(sock, Lab.STUN_PRIMARY, change)
    assert answer is not None
    assert answer[1] == tuple(expected)


def test_stun_change_request_filtered_by_cone(lab: Lab) -> None:
    with host_socket(lab, "a") as sock:
        assert stun_request(sock, Lab.STUN_PRIMARY) is not None
        assert stun_request(sock, Lab.STUN_PRIMARY, CHANGE_IP | CHANGE_PORT) is None


def test_stop_and_start_stun(lab: Lab) -> None:
    lab.stop_stun()
    with host_socket(lab, "a") as sock:
        assert stun_request(sock, Lab.STUN_PRIMARY) is None
    lab.start_stun()
    with host_socket(lab, "a") as sock:
        assert stun_request(sock, Lab.STUN_PRIMARY) is not None


@pytest.mark.parametrize("server", [Lab.STUN_PRIMARY, Lab.STUN6_PRIMARY])
def test_set_link_loses_packets(lab: Lab, server: Endpoint) -> None:
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET

    def answered(count: int) -> int:
        with host_socket(lab, "a", family=family) as sock:
            sock.settimeout(0.05)
            return sum(stun_request(sock, server) is not None for _ in range(count))

    lab.set_link("a", loss_pct=100)
    assert answered(5) == 0
    lab.set_link("a", loss_pct=50)
    assert 0 < answered(60) < 60
    lab.set_link("a")
    assert answered(5) == 5


def _tls(lab: Lab) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(lab.ca_file))


def _send(lab: Lab, port: int, subject: str, body: str) -> None:
    local, shared = lab.accounts["local"], lab.accounts["shared"]
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = local.address, shared.address, subject
    message.set_content(body)

    def send() -> None:
        client: smtplib.SMTP
        if port == Lab.SMTPS_PORT:
            client = smtplib.SMTP_SSL(Lab.MAIL_HOST, port, context=_tls(lab), timeout=10)
        else:
            client = smtplib.SMTP(Lab.MAIL_HOST, port, timeout=10)
            client.starttls(context=_tls(lab))
        with client:
            client.login(local.login, local.password)
            client.send_message(message)

    lab.run_sync("a", send)


def _fetch(lab: Lab, subject: str) -> list[bytes]:
    shared = lab.accounts["shared"]

    def fetch() -> list[bytes]:
        with imaplib.IMAP4_SSL(Lab.MAIL_HOST, Lab.IMAPS_PORT, ssl_context=_tls(lab), timeout=10) as imap:
            imap.login(shared.login, shared.password)
            assert "IDLE" in imap.capabilities
            imap.select("INBOX")
            _, found = imap.uid("SEARCH", "SUBJECT", f'"{subject}"')
            bodies = []
            for uid in found[0].split():
                _, data = imap.uid("FETCH", uid, "(BODY.PEEK[TEXT])")
                bodies.append(data[0][1])
            return bodies

    return lab.run_sync("b", fetch)


@pytest.mark.parametrize("port", [Lab.SMTPS_PORT, Lab.SUBMISSION_PORT])
def test_mail_from_a_reaches_b(lab: Lab, port: int) -> None:
    subject = f"lab-{port}-{os.urandom(4).hex()}"
    _send(lab, port, subject, "PLEXUS 2.1 request 198.51.100.2 41000 12345")
    bodies = _fetch(lab, subject)
    assert len(bodies) == 1
    assert b"PLEXUS 2.1 request 198.51.100.2 41000 12345" in bodies[0]


def test_smtp_requires_auth_and_refuses_long_lines(lab: Lab) -> None:
    def attempt() -> tuple[int, int]:
        with smtplib.SMTP_SSL(Lab.MAIL_HOST, Lab.SMTPS_PORT, context=_tls(lab), timeout=10) as client:
            client.ehlo()
            unauthenticated = client.mail("local@lab.test")[0]
            client.rset()
            local = lab.accounts["local"]
            client.login(local.login, local.password)
            client.mail(local.address)
            client.rcpt(lab.accounts["shared"].address)
            return unauthenticated, client.data(b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\n")[0]

    unauthenticated, long_line = lab.run_sync("a", attempt)
    assert unauthenticated == 530
    assert long_line == 500


def test_smtp_accepts_auth_after_helo(lab: Lab) -> None:
    """plexus 2.2 says HELO, then AUTH LOGIN; many real servers allow that, so the lab does too."""
    local = lab.accounts["local"]

    def attempt() -> int:
        with smtplib.SMTP_SSL(Lab.MAIL_HOST, Lab.SMTPS_PORT, context=_tls(lab), timeout=10) as client:
            client.helo("plexus")
            client.docmd("AUTH", "LOGIN")
            client.docmd(base64.b64encode(local.login.encode()).decode())
            return client.docmd(base64.b64encode(local.password.encode()).decode())[0]

    assert lab.run_sync("a", attempt) == 235


def test_smtp_refuses_wrong_password(lab: Lab) -> None:
    def attempt() -> None:
        with smtplib.SMTP_SSL(Lab.MAIL_HOST, Lab.SMTPS_PORT, context=_tls(lab), timeout=10) as client:
            client.login(lab.accounts["local"].login, "wrong")

    with pytest.raises(smtplib.SMTPAuthenticationError):
        lab.run_sync("a", attempt)


def test_second_lab_leaves_nothing_behind(lab: Lab) -> None:
    with Lab() as other:
        assert other.prefix != lab.prefix
        namespaces = {other.netns(name) for name in ("a", "nat-a", "inet", "nat-b", "b", "pub")}
        pids = [server.popen.pid for server in other._servers.values() if server.popen is not None]
        tmp = other.tmp
        assert len(pids) == 3
    listed = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not namespaces & listed
    assert tmp is not None and not tmp.exists()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
    assert lab.netns("a") in listed  # the session's lab is untouched
