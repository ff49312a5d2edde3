"""The rendezvous protocol: what a session sees of mail and the DHT, and what importing it costs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plexus.endpoint import Endpoint
from plexus.identity import Identity
from plexus.mediator.dhtnode import DhtConfig, DhtMediator
from plexus.mediator.email import MailConfig, Mediator
from plexus.peers import Peer, Roster
from plexus.rendezvous import MAX_HOST_CANDIDATES, Reach, ReachError, RendezvousConfig
from tests.fuzz import FUZZ


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_the_protocol_and_the_way_through_load_no_network_library() -> None:
    loaded = _loaded_after("import plexus.rendezvous, plexus.path")
    assert not loaded & {"opendht", "aiosmtplib", "aioimaplib", "aioquic", "aioice", "plexus.mediator"}


def test_a_session_loads_no_rendezvous_implementation_itself() -> None:
    # The DHT's node comes with its config's open(), never with the session; aioquic with the first streams.
    assert not _loaded_after("import plexus.session") & {"opendht", "aiosmtplib", "aioimaplib", "aioquic"}


def test_a_mail_session_loads_no_dht_and_a_dht_session_no_mail() -> None:
    mail = _loaded_after("import plexus.session, plexus.mediator.email")
    assert not mail & {"opendht", "aioquic"}
    assert {"aiosmtplib", "aioimaplib"} <= mail
    dht = _loaded_after("import plexus.session, plexus.mediator.dhtnode")
    assert not dht & {"aiosmtplib", "aioimaplib", "aioquic"}
    assert "opendht" in dht


def test_a_dht_inviter_loads_no_mail_parser_no_x509_and_no_aioice() -> None:
    """What a DHT session loads (issue 17: start-up): the session without its relay (aioice) or streams
    (aioquic); the DHT's values take the rendezvous rules from plexus.rendezvous, an identity makes its
    certificate only for TLS, STUN has its own codec."""
    loaded = _loaded_after("import plexus.session, plexus.mediator.dhtnode, plexus.identity, plexus.events")
    unwanted = {
        "plexus.mediator.message",
        "plexus.mediator.smime",
        "cryptography.x509",
        "aioice",
        "aioquic",
        "dns",
        "email",
    }
    assert not loaded & unwanted


def test_mail_without_s_mime_loads_no_x509() -> None:
    """S/MIME's certificates and CMS (x509, pkcs7) load with --smime-* only."""
    loaded = _loaded_after("import plexus.session, plexus.mediator.email, plexus.identity")
    assert not loaded & {"cryptography.x509", "cryptography.hazmat.primitives.serialization.pkcs7", "aioice"}


async def test_each_config_opens_its_own_rendezvous() -> None:
    mail: RendezvousConfig = MailConfig(
        Endpoint("127.0.0.1", 465),
        Endpoint("127.0.0.1", 993),
        "me",
        "secret",
        "a@x",
        "b@x",
        "a",
        Roster.of(Peer("b", "b")),
    )
    assert isinstance(mail.open(), Mediator)
    me = Identity.ephemeral()
    peers = Roster.of(Peer("peer", identity="a" * 32))
    dht: RendezvousConfig = DhtConfig(me, peers, ())
    assert isinstance(dht.open(), DhtMediator)
    assert (dht.host_id, dht.peers, dht.identity) == (me.id, peers, me)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "mapping=sideways",
        "mapping=dependent; relay=nowhere",
        "relay=1.2.3.4:5",
        "mapping=blocked",
        "mapping=independent; hosts=10.0.2.2",
        "mapping=independent; hosts=10.0.2.2:0",
        "mapping=independent; hosts=lan.example:5",
        "mapping=independent; hosts=10.0.2.2:5,",
        "mapping=independent; hosts=10.0.2.2:70000",
        "mapping=independent; hosts=" + ",".join(f"10.0.2.{i}:5" for i in range(MAX_HOST_CANDIDATES + 1)),
        "mapping=independent; v6=198.51.100.2:5",  # not IPv6
        "mapping=independent; v6=[::ffff:198.51.100.2]:5",  # IPv4 in IPv6's clothes
        "mapping=independent; v6=[::1]:5",
        "mapping=independent; v6=[fe80::1]:5",
        "mapping=independent; v6=[ff02::1]:5",
        "mapping=independent; v6=[::]:5",
        "mapping=independent; v6=[2001:db8::1]:0",
        "mapping=independent; v6=[2001:db8::1]",
        "mapping=independent; v6=host.example:5",
    ],
)
def test_a_bad_reach_is_a_reach_error(text: str) -> None:
    with pytest.raises(ReachError, match="X-Plexus-Reach"):
        Reach.parse(text)


def test_reach_round_trip() -> None:
    reach = Reach("dependent", Endpoint("203.0.113.9", 3479), streams=True)
    assert Reach.parse(reach.header()) == reach
    blocked = Reach("blocked", Endpoint("203.0.113.9", 49152))
    assert blocked.header() == "mapping=blocked; relay=203.0.113.9:49152"
    assert Reach.parse(blocked.header()) == blocked


def test_reach_round_trip_with_host_candidates() -> None:
    hosts = (Endpoint("10.0.2.2", 41002), Endpoint("fd00::2", 41002))
    reach = Reach("independent", streams=True, hosts=hosts)
    assert reach.header() == "mapping=independent; streams=1; hosts=10.0.2.2:41002,[fd00::2]:41002"
    assert Reach.parse(reach.header()) == reach
    assert Reach.parse("mapping=independent; hosts=[fd00:0::2]:7").hosts == (Endpoint("fd00::2", 7),)
    # without host candidates the header is what it was: a peer that knows none of them reads it as before
    assert Reach("dependent").header() == "mapping=dependent"


def test_reach_round_trip_with_an_ipv6_endpoint() -> None:
    reach = Reach("dependent", v6=Endpoint("2001:db8:a::2", 5000))
    assert reach.header() == "mapping=dependent; v6=[2001:db8:a::2]:5000"
    assert Reach.parse(reach.header()) == reach
    assert Reach.parse("mapping=dependent; v6=[2001:DB8:A:0::2]:5000") == reach  # one spelling


@FUZZ
@given(st.text(max_size=300), st.lists(st.text(max_size=60), max_size=MAX_HOST_CANDIDATES + 2))
def test_any_reach_text_parses_or_is_a_reach_error(text: str, hosts: list[str]) -> None:
    for candidate in (text, f"mapping=independent; hosts={','.join(hosts)}", f"mapping=dependent; v6={text}"):
        try:
            reach = Reach.parse(candidate)
        except ReachError:
            continue
        assert len(reach.hosts) <= MAX_HOST_CANDIDATES
        assert all(host.port and host.is_ip for host in reach.hosts)
        assert reach.v6 is None or (":" in reach.v6.host and reach.v6.port and reach.v6.is_ip)
        assert Reach.parse(reach.header()) == reach
