"""The lab's IPv6 (issue 18), measured with plain sockets: global addresses with no NAT66, the home routers'
stateful firewalls (unsolicited inbound dropped, a simultaneous open let through) while IPv4 is behind
symmetric NATs, coturn's STUN (RFC 5780) and TURN on IPv6, block_udp and separate on IPv6, a host without
IPv6, and the STUN name with both families in the hosts' /etc/netns hosts files."""

from __future__ import annotations

import asyncio
import errno
import itertools
import secrets
import socket
import ssl
import subprocess

import pytest
from aioice import turn

from tests.lab.lab import HOSTS, NETNS_ETC, Lab, clean_stale
from tests.labtests.test_lab import host_socket, stun_request

pytestmark = pytest.mark.lab

PORT_A, PORT_B = 41600, 41601
# Each open between the hosts on ports of its own: the firewalls' conntrack remembers a flow for 30 s or more
OPEN_PORTS = itertools.count(41700, 2)
CHANGE_IP, CHANGE_PORT = 0x04, 0x02


def socket6(lab: Lab, host: str, port: int) -> socket.socket:
    return host_socket(lab, host, port, socket.AF_INET6)


def received(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(100)
    except TimeoutError:
        return None


def open_between(
    lab: Lab, first: str = "b", second: str = "a"
) -> tuple[bytes | None, bytes | None, bytes | None]:
    """What arrives of: first's datagram to second (unsolicited), then second's to first and first's again
    (the simultaneous open), each over IPv6 between the hosts' global addresses."""
    port_one = next(OPEN_PORTS)
    port_two = port_one + 1
    with socket6(lab, first, port_one) as one, socket6(lab, second, port_two) as two:
        one.sendto(b"unsolicited", (lab.inner_ip6(second), port_two))
        unsolicited = received(two)
        two.sendto(b"open", (lab.inner_ip6(first), port_one))
        answer = received(one)
        one.sendto(b"through", (lab.inner_ip6(second), port_two))
        return unsolicited, answer, received(two)


@pytest.mark.parametrize("host", ["a", "b", "c"])
def test_each_host_reaches_pub_and_stun_sees_its_own_address(lab: Lab, host: str) -> None:
    lab.set_nat("a", "symmetric")
    lab.set_nat("b", "symmetric")
    ping = lab.exec(host, ["ping", "-6", "-n", "-c", "1", "-W", "2", Lab.PUB_IPS6[0]])
    assert ping.returncode == 0, ping.stdout + ping.stderr
    with socket6(lab, host, PORT_A) as sock:
        answer = stun_request(sock, Lab.STUN6_PRIMARY)
    assert answer is not None
    reply, source = answer
    assert source == tuple(Lab.STUN6_PRIMARY)
    assert reply.attributes["XOR-MAPPED-ADDRESS"] == (lab.inner_ip6(host), PORT_A)  # no NAT66


@pytest.mark.parametrize("mode", ["symmetric", "none"])
def test_firewall_drops_unsolicited_and_lets_a_simultaneous_open_through(lab: Lab, mode: str) -> None:
    """Whatever the IPv4 NAT mode: in mode "none" a host is public on IPv4, its IPv6 behind the firewall."""
    lab.set_nat("a", mode)
    lab.set_nat("b", mode)
    assert open_between(lab, "b", "a") == (None, b"open", b"through")
    assert open_between(lab, "a", "b") == (None, b"open", b"through")


def test_firewall_keeps_its_state_per_address_and_port(lab: Lab) -> None:
    """STUN's answer from the alternate address (CHANGE-REQUEST) is a new flow to the firewall: dropped, as
    an address- and port-dependent filter does; a fullcone IPv4 NAT changes nothing on IPv6."""
    lab.set_nat("a", "fullcone")
    with socket6(lab, "a", PORT_A) as sock:
        assert stun_request(sock, Lab.STUN6_PRIMARY) is not None
        assert stun_request(sock, Lab.STUN6_PRIMARY, CHANGE_IP | CHANGE_PORT) is None
        assert stun_request(sock, Lab.STUN6_PRIMARY, CHANGE_PORT) is None


def test_stun_on_ipv6_names_the_ipv6_alternate(lab: Lab) -> None:
    """RFC 5780 on IPv6: coturn pairs its two IPv6 addresses, and answers a change request from the other."""
    with socket6(lab, "a", PORT_A) as sock:
        answer = stun_request(sock, Lab.STUN6_PRIMARY)
    assert answer is not None
    assert answer[0].attributes["OTHER-ADDRESS"] == tuple(Lab.STUN6_ALTERNATE)
    with socket6(lab, "pub", PORT_A) as sock:  # pub has no firewall in the way of the changed address
        changed = stun_request(sock, Lab.STUN6_PRIMARY, CHANGE_IP | CHANGE_PORT)
    assert changed is not None and changed[1] == tuple(Lab.STUN6_ALTERNATE)


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_turn_allocates_over_ipv6_and_relays_to_ipv4(lab: Lab, transport: str) -> None:
    """An allocation over an IPv6 transport gets an IPv4 relayed address on the primary, which relays."""
    context = ssl.create_default_context(cafile=str(lab.ca_file)) if transport == "tls" else None
    port = Lab.TURNS_PORT if transport == "tls" else Lab.STUN6_PRIMARY.port
    peer = lab.socket("pub")
    peer.bind((Lab.PUB_IPS[1], 40000))
    peer.setblocking(False)

    async def relay() -> tuple[tuple[str, int], bytes, tuple[str, int]]:
        """The relayed address, and what the peer received from where, while the allocation lasts."""
        relayed, _ = await turn.create_turn_endpoint(
            asyncio.DatagramProtocol,
            (Lab.STUN6_PRIMARY.host, port),
            lab.turn.user,
            lab.turn.password,
            ssl=context,
            transport="udp" if transport == "udp" else "tcp",
        )
        try:
            assert relayed.get_extra_info("related_address")[0] == lab.inner_ip6("a")
            relayed.sendto(b"relayed", peer.getsockname())
            received = asyncio.get_running_loop().sock_recvfrom(peer, 100)
            data, source = await asyncio.wait_for(received, 5)
            return tuple(relayed.get_extra_info("sockname")), data, source
        finally:
            relayed.close()

    with peer:
        address, data, source = await lab.call("a", relay)
    assert address[0] == Lab.PUB_IPS[0] and Lab.TURN_RELAY_PORTS[0] <= address[1] <= Lab.TURN_RELAY_PORTS[1]
    assert (data, source) == (b"relayed", address)


def test_block_udp_and_separate_cover_ipv6(lab: Lab) -> None:
    lab.block_udp("a")
    with socket6(lab, "a", PORT_A) as sock:
        assert stun_request(sock, Lab.STUN6_PRIMARY) is None
    assert open_between(lab, "b", "a") == (None, None, None)
    lab.block_udp("a", False)
    lab.separate()
    assert open_between(lab, "b", "a") == (None, None, None)
    for host in ("a", "b"):
        with socket6(lab, host, PORT_A) as sock:
            assert stun_request(sock, Lab.STUN6_PRIMARY) is not None, f"{host} lost pub"
    lab.separate(False)
    assert open_between(lab, "b", "a") == (None, b"open", b"through")


def test_a_host_without_ipv6_has_no_global_route(lab: Lab) -> None:
    lab.set_ipv6("a", False)
    route = lab.exec("a", ["ip", "-6", "route", "get", Lab.PUB_IPS6[0]])
    assert route.returncode != 0 and "unreachable" in route.stderr, route.stdout + route.stderr
    shown = lab.exec("a", ["ip", "-6", "-o", "addr", "show", "scope", "global"]).stdout
    assert shown == "", shown
    with lab.socket("a", socket.AF_INET6) as sock, pytest.raises(OSError) as raised:
        sock.connect((Lab.PUB_IPS6[0], Lab.STUN6_PRIMARY.port))
    assert raised.value.errno == errno.ENETUNREACH
    with socket6(lab, "b", PORT_B) as sock:  # b keeps its IPv6 and finds a gone
        sock.sendto(b"anyone?", (lab.inner_ip6("a"), PORT_A))
        assert received(sock) is None
        assert stun_request(sock, Lab.STUN6_PRIMARY) is not None
    lab.set_ipv6("a")  # waits until a reaches pub again
    with socket6(lab, "a", PORT_A) as sock:
        assert stun_request(sock, Lab.STUN6_PRIMARY) is not None


def test_double_nat_routes_ipv6_through_the_carrier(lab: Lab) -> None:
    """The carrier NAT only routes IPv6: a keeps its global address and its home router's firewall."""
    lab.double_nat()
    with socket6(lab, "a", PORT_A) as sock:
        answer = stun_request(sock, Lab.STUN6_PRIMARY)
    assert answer is not None and answer[0].attributes["XOR-MAPPED-ADDRESS"] == (lab.inner_ip6("a"), PORT_A)
    assert open_between(lab, "b", "a") == (None, b"open", b"through")


@pytest.mark.parametrize("host", ["a", "b", "c"])
def test_stun_name_has_both_families_in_each_host_namespace(lab: Lab, host: str) -> None:
    stun_name = lab.exec(host, ["getent", "ahosts", Lab.STUN_NAME])
    assert stun_name.returncode == 0, stun_name.stderr
    assert {line.split()[0] for line in stun_name.stdout.splitlines()} == {Lab.PUB_IPS[0], Lab.PUB_IPS6[0]}
    mail = lab.exec(host, ["getent", "ahosts", Lab.MAIL_NAME]).stdout  # its servers listen on IPv4 only
    assert {line.split()[0] for line in mail.splitlines()} == {Lab.MAIL_HOST}
    for name in ("localhost", socket.gethostname()):  # the machine's own lines stay
        assert (
            lab.exec(host, ["getent", "hosts", name]).stdout
            == subprocess.run(["getent", "hosts", name], capture_output=True, text=True).stdout
        )


def test_hosts_files_go_with_the_lab(lab: Lab) -> None:
    with Lab() as other:
        folders = [NETNS_ETC / other.netns(host) for host in HOSTS]
        assert all((folder / "hosts").is_file() for folder in folders)
    assert not any(folder.exists() for folder in folders)
    crashed = NETNS_ETC / f"px{secrets.token_hex(3)}-a"  # a lab whose owner died before its down()
    (crashed / "hosts").parent.mkdir()
    (crashed / "hosts").write_text("")
    assert str(crashed) in clean_stale()
    assert not crashed.exists()
    assert (NETNS_ETC / lab.netns("a") / "hosts").is_file()  # the session's lab keeps its own
