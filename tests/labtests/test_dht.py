"""The DHT rendezvous end to end: a private OpenDHT network in the lab's public namespace, the two hosts
joining it through their NATs, real plexus processes meeting there instead of by mail."""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import opendht
import pytest

from plexus.endpoint import Endpoint
from plexus.errors import ExitCode
from plexus.identity import Identity
from plexus.mediator import dht
from plexus.rendezvous import CLOCK_TOLERANCE, Offer, Reach
from tests.lab import sessions
from tests.lab.dht import DhtNetwork
from tests.lab.lab import Lab
from tests.lab.services import BYE, TcpTarget
from tests.lab.sessions import Plexus, Side

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def network(_lab_instance: Lab) -> Iterator[DhtNetwork]:
    with DhtNetwork(_lab_instance) as started:
        yield started


class Hosts:
    """Identity files for an inviter on a and an acceptor on b."""

    def __init__(self, directory: Path) -> None:
        self.inviter_file, self.acceptor_file = directory / "laptop.key", directory / "home.key"
        self.inviter = Identity.load(self.inviter_file)
        self.acceptor = Identity.load(self.acceptor_file)


@pytest.fixture
def hosts(tmp_path: Path) -> Hosts:
    return Hosts(tmp_path / "ids")


def dht_options(network: DhtNetwork, me: Path, peer: Identity) -> dict[str, str | None]:
    """A side's options in DHT mode: no mail at all."""
    gone = ("host-id", "peer-id", "email-smtps", "email-imaps", "email-login", "email-passwd", "email-from")
    return dict.fromkeys((*gone, "email-to", "email-ca")) | {
        "dht-bootstrap": ",".join(network.bootstrap),
        "identity": str(me),
        "peer-identity": peer.id,
    }


def start(
    lab: Lab,
    tmp_path: Path,
    running: list[Plexus],
    network: DhtNetwork,
    hosts: Hosts,
    *,
    accept: bool,
    on: str | None = None,
    extra: dict[str, str | None] | None = None,
) -> Plexus:
    """The acceptor (on b) or the inviter (on a, or the host `on`), with `extra` options."""
    host = on or ("b" if accept else "a")
    me, peer = (hosts.acceptor_file, hosts.inviter) if accept else (hosts.inviter_file, hosts.acceptor)
    side = Side(host, sessions.pair(lab)[0].account, f"{host}-dht")
    process = sessions.start(
        lab, side, side, tmp_path, accept=accept, overrides=dht_options(network, me, peer) | (extra or {})
    )
    running.append(process)
    return process


def test_a_session_meets_on_the_dht_and_connects(
    lab: Lab, tmp_path: Path, running: list[Plexus], network: DhtNetwork, hosts: Hosts
) -> None:
    acceptor = start(lab, tmp_path, running, network, hosts, accept=True)
    sessions.wait_until_listening(acceptor)
    started = time.monotonic()
    invite = start(lab, tmp_path, running, network, hosts, accept=False)
    code = invite.wait(60)
    elapsed = time.monotonic() - started
    assert code == 0, f"{invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    mine, theirs = invite.wait_hello()[0], acceptor.wait_hello()[0]
    assert mine["args"]["secret"] == theirs["args"]["secret"]
    assert mine["received"] and theirs["received"]
    print(f"DHT session: inviter exited 0 after {elapsed:.2f} s")


def test_the_ipv6_endpoint_travels_in_the_sealed_letters(
    lab: Lab, tmp_path: Path, running: list[Plexus], network: DhtNetwork, hosts: Hosts
) -> None:
    """Issue 18 on the DHT: both IPv4 NATs symmetric, no relay, the STUN server by its dual-stack name: each
    side's v6 endpoint is in its Reach inside the signed, sealed letter, and the session goes over IPv6."""
    for host in ("a", "b"):
        lab.set_nat(host, "symmetric")
    dual = {"stun-server": Lab.STUN_NAME}
    acceptor = start(lab, tmp_path, running, network, hosts, accept=True, extra=dual)
    sessions.wait_until_listening(acceptor)
    invite = start(lab, tmp_path, running, network, hosts, accept=False, extra=dual)
    code = invite.wait(60)
    assert code == 0, f"{invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    mine, theirs = invite.wait_hello()[0], acceptor.wait_hello()[0]
    assert mine["received"] and theirs["received"]
    assert (mine["args"]["peerip"], theirs["args"]["peerip"]) == (lab.inner_ip6("b"), lab.inner_ip6("a"))
    for side in (invite, acceptor):
        assert [event["way"] for event in side.events("connected")] == ["ipv6"]


def test_hosts_on_one_lan_meet_on_the_dht_and_connect_over_it(
    lab: Lab, tmp_path: Path, running: list[Plexus], network: DhtNetwork, hosts: Hosts
) -> None:
    """c and b behind nat-b, which does not hairpin (issue 18): on the DHT each side knows the other is
    plexus, so both name their host candidates, and the path is the LAN."""
    acceptor = start(lab, tmp_path, running, network, hosts, accept=True)
    sessions.wait_until_listening(acceptor)
    invite = start(lab, tmp_path, running, network, hosts, accept=False, on="c")
    code = invite.wait(60)
    assert code == 0, f"{invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    mine, theirs = invite.wait_hello()[0], acceptor.wait_hello()[0]
    assert mine["received"] and theirs["received"]
    assert (mine["args"]["peerip"], theirs["args"]["peerip"]) == (lab.inner_ip("b"), lab.inner_ip("c"))
    for side, peer in ((invite, "b"), (acceptor, "c")):
        assert [event["way"] for event in side.events("chosen")] == ["lan"]
        assert lab.inner_ip(peer) in side.events("chosen")[0]["why"]  # the peer named its host candidate
        assert [event["way"] for event in side.events("connected")] == ["lan"]


def test_a_peer_that_is_not_running_is_not_found(
    lab: Lab, tmp_path: Path, running: list[Plexus], network: DhtNetwork, hosts: Hosts
) -> None:
    stranger = Identity.load(tmp_path / "stranger.key")
    overrides = dht_options(network, hosts.inviter_file, stranger) | {"response-timeout": "5"}
    side = Side("a", lab.accounts["local"], "a-dht")
    invite = sessions.start(lab, side, side, tmp_path, accept=False, overrides=overrides)
    running.append(invite)
    assert invite.wait(30) == ExitCode.PEER_NOT_FOUND
    message = invite.stderr()
    assert message.count("\n") == 1 and stranger.id in message, message


def test_an_unreachable_dht_has_its_exit_code(
    lab: Lab, tmp_path: Path, running: list[Plexus], network: DhtNetwork, hosts: Hosts
) -> None:
    nobody = {"dht-bootstrap": "203.0.113.10:4999"}
    overrides = dht_options(network, hosts.inviter_file, hosts.acceptor) | nobody
    side = Side("a", lab.accounts["local"], "a-dht")
    invite = sessions.start(lab, side, side, tmp_path, accept=False, overrides=overrides)
    running.append(invite)
    assert invite.wait(40) == ExitCode.DHT_UNREACHABLE, invite.stderr()
    assert invite.stderr().count("\n") == 1


def put_values(lab: Lab, network: DhtNetwork, key: str, values: list[bytes]) -> None:
    """Put raw values under a key text from host a, as anyone on the DHT could, in order."""

    def run() -> None:
        runner = opendht.DhtRunner()
        runner.run(port=0)
        try:
            for node in network.bootstrap:
                runner.bootstrap(*node.rsplit(":", 1))
            for value in values:
                stored = threading.Event()
                runner.put(opendht.InfoHash.get(key), opendht.Value(value), lambda _ok, _nodes: stored.set())  # noqa: B023 (waited for in this turn)
                stored.wait(5)
        finally:
            runner.join()

    lab.run_sync("a", run)


def test_forged_unsigned_replayed_or_misdirected_values_start_nothing(
    lab: Lab, tmp_path: Path, running: list[Plexus], network: DhtNetwork, hosts: Hosts
) -> None:
    acceptor = start(lab, tmp_path, running, network, hosts, accept=True)
    sessions.wait_until_listening(acceptor)
    now = datetime.datetime.now(datetime.UTC)
    key = dht.key_text("request", hosts.acceptor.id, dht.day_of(now))
    stranger = Identity.load(tmp_path / "stranger.key")
    home = hosts.acceptor.certificate.public_key()

    def request(sender: Identity, puzzle: int, issued: datetime.datetime = now) -> dht.Letter:
        offer = Offer(Endpoint("198.51.100.2", 40000), puzzle, Reach("independent"))
        return dht.Letter("request", sender.id, hosts.acceptor.id, key, issued, puzzle, offer)

    genuine = dht.seal(request(hosts.inviter, 1), hosts.inviter, home)
    bad = {
        "unsigned garbage": b"PXD3" + bytes(200),
        "forged (a stranger's)": dht.seal(request(stranger, 2), stranger, home),
        "sealed to another host": dht.seal(
            dataclasses.replace(request(hosts.inviter, 3), recipient=stranger.id),
            hosts.inviter,
            stranger.certificate.public_key(),
        ),
        "stale": dht.seal(request(hosts.inviter, 4, now - 2 * CLOCK_TOLERANCE), hosts.inviter, home),
    }
    put_values(lab, network, key, [*bad.values(), genuine, genuine])  # the second genuine: a replay
    acceptor.wait_events("requested")
    time.sleep(1.0)  # time for every value to arrive
    assert len(acceptor.events("requested")) == 1, acceptor.events()  # only the genuine request, once
    for reason in ("not encrypted to this host", "is not a peer of this host", "from now", "replay"):
        acceptor.wait_rejected(reason)
    assert {event["source"] for event in acceptor.events("rejected")} == {"dht"}


def test_streams_run_over_a_session_met_on_the_dht(
    lab: Lab, tmp_path: Path, running: list[Plexus], network: DhtNetwork, hosts: Hosts
) -> None:
    """The same identities serve the DHT and the streams: ssh-style --stdio to an echo target on b."""
    with TcpTarget(lab, "b", "echo", port=7007):
        allow = {"exec-command": None, "forward-allow": "127.0.0.1:7007"}
        overrides = dht_options(network, hosts.acceptor_file, hosts.inviter) | allow
        me, peer = Side("a", lab.accounts["local"], "a-dht"), Side("b", lab.accounts["remote"], "b-dht")
        acceptor = sessions.start(lab, peer, me, tmp_path, accept=True, overrides=overrides)
        running.append(acceptor)
        sessions.wait_until_listening(acceptor)
        inviter = dht_options(network, hosts.inviter_file, hosts.acceptor) | {
            "exec-command": None,
            "stdio": "127.0.0.1:7007",
        }
        invite = sessions.start(
            lab, me, peer, tmp_path, accept=False, overrides=inviter, stdin=subprocess.PIPE, text=False
        )
        running.append(invite)
        out, err = invite.process.communicate(b"over the DHT\n", timeout=60)
    assert (invite.process.returncode, out) == (0, b"over the DHT\n" + BYE), err.decode()


def test_a_restarted_acceptor_does_not_answer_the_requests_already_on_the_dht(
    lab: Lab, tmp_path: Path, running: list[Plexus], network: DhtNetwork, hosts: Hosts
) -> None:
    first = start(lab, tmp_path, running, network, hosts, accept=True)
    sessions.wait_until_listening(first)
    invite = start(lab, tmp_path, running, network, hosts, accept=False)
    assert invite.wait(60) == 0, invite.stderr()
    first.stop()
    again = start(lab, tmp_path, running, network, hosts, accept=True)
    sessions.wait_until_listening(again)  # the requests already on the DHT passed over by then
    started = time.monotonic()
    invite = start(lab, tmp_path, running, network, hosts, accept=False)
    assert invite.wait(60) == 0, f"{invite.stderr()}\n{again.log()}"
    assert time.monotonic() - started < 15, again.log()
    assert len(again.events("requested")) == 1, again.events()  # the new one only


def test_a_hosts_node_id_is_the_secret_one_of_the_day(
    lab: Lab, tmp_path: Path, running: list[Plexus], network: DhtNetwork, hosts: Hosts
) -> None:
    """The DHT knows the acceptor's node by the id only its private key gives (dht.node_id): not one that
    its public id would lead to."""
    acceptor = start(lab, tmp_path, running, network, hosts, accept=True)
    sessions.wait_until_listening(acceptor)
    secret = dht.node_id(hosts.acceptor, dht.day_of(datetime.datetime.now(datetime.UTC))).hex()
    deadline = time.monotonic() + 20
    while not any(node.read_ready() and secret in node.table_ids for node in network.nodes):
        assert time.monotonic() < deadline, (secret, [node.table_ids for node in network.nodes])
        time.sleep(0.1)
