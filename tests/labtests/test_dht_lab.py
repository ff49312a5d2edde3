"""A private OpenDHT network in the lab's pub namespace (tests/lab/dht.py), for the DHT rendezvous: it forms,
stops without leftovers, and hosts behind NATs store, find and get pushed values through it. Each test
prints how long its DHT operations took (visible with -s)."""

from __future__ import annotations

import errno
import functools
import json
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.dht import ROOT, DhtNetwork, probe_argv
from tests.lab.lab import NAMESPACES, Lab, run, stop_process

pytestmark = pytest.mark.lab

PROBE_TIMEOUT_S = 10.0
PUSH_LIMIT_S = 2.0
IP_RECVERR, IPV6_RECVERR = 11, 25  # linux/in.h, linux/in6.h; not in Python's socket module
UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH)
OUTSIDE = ("8.8.8.8", "1.1.1.1", "192.0.2.1")  # public resolvers; TEST-NET-1, often a gateway of test VMs
OUTSIDE6 = "2001:4860:4860::8888"  # the lab's hosts have global IPv6 addresses and default routes too


@pytest.fixture
def network(lab: Lab) -> Iterator[DhtNetwork]:
    """A fresh 3-node network per test: no stale probe nodes from an earlier test in its routing tables."""
    with DhtNetwork(lab) as started:
        yield started


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def nodes_saw(network: DhtNetwork, ip: str, wait_s: float = 2.0) -> list[str]:
    """Addresses with this IP in the nodes' routing tables (as the nodes report them), once there are any."""
    deadline = time.monotonic() + wait_s
    while True:
        seen = [
            a for node in network.nodes if node.read_ready() for a in node.table if a.startswith(f"{ip}:")
        ]
        if seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_the_lab_has_no_way_out(lab: Lab) -> None:
    """What keeps the DHT's traffic inside: every link of every lab namespace ends in another lab namespace,
    inet (where every route ends) has no route beyond the lab, and datagrams to outside addresses from the
    servers' and the hosts' namespaces come back as unreachable."""
    for name in NAMESPACES:
        links = run(["ip", "-n", lab.netns(name), "-o", "-d", "link"]).stdout.splitlines()
        for link in links:
            # A bridge (nat-b's LAN, for b and c) reaches only its ports, which are links themselves.
            if ": lo:" in link or re.search(r"\sbridge\s", link):
                continue
            assert re.search(rf"link-netns {re.escape(lab.prefix)}\S+", link), f"{name}: {link}"
    for target in (*OUTSIDE, OUTSIDE6):
        route = run(["ip", "-n", lab.netns("inet"), "route", "get", target], check=False)
        assert route.returncode != 0 and "unreachable" in route.stderr, (
            f"inet routes {target}: {route.stdout}"
        )

    def send_out(target: str) -> int:
        v6 = ":" in target
        with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            # Net unreachable is a soft ICMP error: a connected UDP socket reports it only with IP_RECVERR
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            sock.settimeout(1)
            sock.connect((target, 4222))
            for _ in range(3):  # inet rate-limits its ICMP errors per destination
                sock.send(b"x")
                try:
                    sock.recv(64)
                except TimeoutError:
                    continue
                except OSError as error:  # inet's ICMP error, translated back by the NAT routers
                    return error.errno or 0
            return 0

    for host in ("pub", "a", "b"):
        for target in (OUTSIDE[0], OUTSIDE6):  # IPv6's comes back through the home routers' firewalls
            code = lab.run_sync(host, functools.partial(send_out, target))
            assert code in UNREACHABLE, f"{host} -> {target}: {errno.errorcode.get(code, code)}"


def test_the_network_forms_and_stops_without_leftovers(lab: Lab) -> None:
    network = DhtNetwork(lab)
    network.start()
    try:
        print(f"\n3 DHT nodes up and formed in {ms(network.startup_s)}: {' '.join(network.bootstrap)}")
        assert network.bootstrap == ["203.0.113.10:4222", "203.0.113.11:4223", "203.0.113.10:4224"]
        assert network.addresses() == list(Lab.PUB_IPS)
        pids = network.pids
        in_pub = {int(p) for p in run(["ip", "netns", "pids", lab.netns("pub")]).stdout.split()}
        assert set(pids) <= in_pub
        for node in network.nodes:
            assert node.popen is not None and node.pid == node.popen.pid
            others = {n.address for n in network.nodes} - {node.address}
            assert others <= set(node.table), f"{node.address} knows {node.table}\n{network.log_tail()}"
            cmdline = Path(f"/proc/{node.pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[1:4] == [b"-m", b"tests.lab.dht", b"node"]
        folder = network.dir
        assert set(network.leftovers()) == set(pids)
    finally:
        stopping = time.monotonic()
        network.stop()
        print(f"stopped in {ms(time.monotonic() - stopping)}")
    in_pub = {int(p) for p in run(["ip", "netns", "pids", lab.netns("pub")]).stdout.split()}
    assert not set(pids) & in_pub
    assert not folder.exists()
    assert network.nodes == [] and network.leftovers() == []
    # The ports are free again: a second network starts on them
    with DhtNetwork(lab, count=2) as again:
        assert again.bootstrap == ["203.0.113.10:4222", "203.0.113.11:4223"]


@pytest.mark.parametrize("nat", ["cone", "symmetric"])
def test_b_puts_and_a_gets_through_the_private_dht(lab: Lab, network: DhtNetwork, nat: str) -> None:
    lab.set_nat("a", nat)
    lab.set_nat("b", nat)
    key, value = f"rendezvous-{secrets.token_hex(4)}", f"b-offer-{secrets.token_hex(4)}"
    put = network.probe("b", "put", key, value, timeout=PROBE_TIMEOUT_S)
    got = network.probe("a", "get", key, timeout=PROBE_TIMEOUT_S)
    assert got["value"] == value
    print(
        f"\n[{nat}] put from b: {ms(put['elapsed_s'])} (connected {ms(put['connected_s'])}, process "
        f"{ms(put['wall_s'])}); get on a: {ms(got['elapsed_s'])} (connected {ms(got['connected_s'])}, "
        f"process {ms(got['wall_s'])})"
    )
    # Both went through their NATs: the nodes know them by their routers' public addresses
    assert nodes_saw(network, lab.public_ip("a")), network.log_tail()
    assert nodes_saw(network, lab.public_ip("b")), network.log_tail()


@pytest.mark.parametrize("nat", ["cone", "symmetric"])
def test_a_listen_gets_what_b_puts_afterwards_pushed(
    lab: Lab, network: DhtNetwork, nat: str, tmp_path: Path
) -> None:
    lab.set_nat("a", nat)
    lab.set_nat("b", nat)
    key, value = f"rendezvous-{secrets.token_hex(4)}", f"b-offer-{secrets.token_hex(4)}"
    ready = tmp_path / "listening"
    argv = network.probe_argv("listen", key, value, timeout=PROBE_TIMEOUT_S, ready=ready)
    listener = lab.popen("a", argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while not ready.exists():
            assert listener.poll() is None, f"listen probe ended: {listener.communicate()}"
            assert time.monotonic() < deadline, "the listen probe did not get ready"
            time.sleep(0.01)
        put = network.probe("b", "put", key, value, timeout=PROBE_TIMEOUT_S)
        out, err = listener.communicate(timeout=PROBE_TIMEOUT_S + 5)
    finally:
        stop_process(listener)
    assert listener.returncode == 0, f"listen on a: {out}{err}\n{network.log_tail()}"
    heard = json.loads(out)
    assert heard["value"] == value
    # It was listening before b put: the value came as a push, not as the answer to a get
    assert heard["op_started_at"] < put["op_started_at"]
    push = heard["at"] - put["op_started_at"]
    print(
        f"\n[{nat}] listen on a in place after {ms(heard['listening_s'])}; b's put confirmed after "
        f"{ms(put['elapsed_s'])}; pushed to a {ms(push)} after b's put began "
        f"({ms(heard['at'] - put['at'])} after its confirmation)"
    )
    assert push < PUSH_LIMIT_S


def test_a_get_of_a_key_nobody_put_times_out(lab: Lab, network: DhtNetwork) -> None:
    argv = network.probe_argv("get", f"nobody-{secrets.token_hex(4)}", timeout=1.0)
    started = time.monotonic()
    done = lab.exec("a", argv, cwd=ROOT, timeout=15)
    assert done.returncode == 1, f"{done.stdout}{done.stderr}"
    assert json.loads(done.stdout)["ok"] is False and "timed out" in done.stderr
    assert time.monotonic() - started < 5


def test_a_network_id_of_its_own_keeps_other_nodes_out(lab: Lab) -> None:
    """plexus's --dht-network: nodes on another network id ignore a probe on the default one."""
    with DhtNetwork(lab, count=2, network=7) as private:
        key, value = f"rendezvous-{secrets.token_hex(4)}", "on network 7"
        private.probe("b", "put", key, value, timeout=PROBE_TIMEOUT_S)
        assert private.probe("a", "get", key, timeout=PROBE_TIMEOUT_S)["value"] == value
        outsider = probe_argv(private.bootstrap, "get", key, timeout=1.5)  # network 0
        done = lab.exec("a", outsider, cwd=ROOT, timeout=15)
        assert done.returncode == 1, f"{done.stdout}{done.stderr}"
