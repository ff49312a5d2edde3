"""An acceptor's sessions, one peer's at a time: what SessionConfig.serving puts in place for a peer, what
_servable refuses it, and how _requests merges the requests of several rendezvous."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from plexus import events
from plexus.endpoint import Endpoint
from plexus.errors import NotServedError, PlexusError
from plexus.identity import Identity, PeerCheck
from plexus.launcher import Command
from plexus.mediator.email import MailConfig
from plexus.peers import Peer, Roster
from plexus.rendezvous import Invitation, Offer, Reach
from plexus.session import SessionConfig, _requests, _servable
from plexus.streams import StreamsConfig
from plexus.targets import Allowed, Target

PINNED = "a" * 32
OWN = Command("/usr/local/bin/phone.sh", ("%peer%",))
PHONE = Peer("phone", id="phone", identity=PINNED, allowed=Allowed.of([Target.parse("127.0.0.1:22", "")]))
LAPTOP = Peer("laptop", id="laptop", command=OWN)
ACCEPTORS = Command("/usr/bin/true", ("%innerport%",), pwd=Path("/srv"), log_file=Path("/var/log/x"))
FORWARDED = Allowed.of([Target.parse("127.0.0.1:8080", "")])


def acceptor(command: Command | None = ACCEPTORS, **changes: Any) -> SessionConfig:
    mail = MailConfig(
        smtp=Endpoint("203.0.113.10", 465),
        imap=Endpoint("203.0.113.10", 993),
        login="me",
        password="secret",
        address="me@example.org",
        peer_address="peer@example.org",
        host_id="me",
        peers=Roster.of(PHONE, LAPTOP),
        identity=Identity.ephemeral(),
    )
    return SessionConfig(Endpoint("0.0.0.0", 0), Endpoint("203.0.113.1", 3478), mail, command, **changes)


def streams(check: PeerCheck | None = None) -> StreamsConfig:
    return StreamsConfig(Identity.ephemeral(), check, FORWARDED)


def test_a_peers_command_takes_the_acceptors_place_where_it_runs_and_logs() -> None:
    config = acceptor()
    assert config.serving(LAPTOP).command == Command(OWN.path, OWN.words, ACCEPTORS.pwd, ACCEPTORS.log_file)
    assert config.serving(PHONE).command == ACCEPTORS
    assert acceptor(None).serving(LAPTOP).command == OWN  # streams only, but this peer's command runs


def test_a_peers_allow_list_and_identity_take_the_acceptors_place() -> None:
    anonymous = PeerCheck(None)
    config = acceptor(streams=streams(anonymous))
    phone = config.serving(PHONE).streams
    laptop = config.serving(LAPTOP).streams
    assert phone is not None and laptop is not None
    assert (phone.check, phone.allowed) == (PeerCheck(PINNED), PHONE.allowed)
    assert (laptop.check, laptop.allowed) == (anonymous, FORWARDED)
    assert acceptor().serving(PHONE).streams is None  # no streams for anyone: none for a peer either


def test_each_event_of_a_peers_session_is_named_by_it() -> None:
    seen: list[events.Event] = []
    config = acceptor().reporting(seen.append)
    requested = events.Requested(role="accept", peer=Endpoint("198.51.100.2", 40000))
    config.serving(PHONE).on_event(requested)
    config.serving(LAPTOP).on_event(requested)
    config.on_event(requested)
    assert [event.peer_name for event in seen] == ["phone", "laptop", None]


def invitation(peer: Peer, wants_streams: bool) -> Invitation:
    reach = Reach("independent", streams=wants_streams)
    return Invitation(Offer(Endpoint("198.51.100.2", 40000), 7, reach), None, peer)


@pytest.mark.parametrize(
    ("config", "peer", "wants_streams", "refusal"),
    [
        (acceptor(streams=streams()), PHONE, True, None),
        (acceptor(streams=streams()), LAPTOP, True, "laptop has no identity pinned here"),
        (acceptor(streams=streams(PeerCheck(None))), LAPTOP, True, None),  # --anonymous: whoever it is
        (acceptor(), PHONE, True, "this acceptor forwards no streams for phone"),
        # No --forward-allow: a peer's allow= is all that it may reach, and without one it reaches nothing
        (acceptor(streams=StreamsConfig(Identity.ephemeral(), PeerCheck(None))), PHONE, True, None),
        (acceptor(streams=StreamsConfig(Identity.ephemeral(), PeerCheck(None))), LAPTOP, True, "no allow="),
        (acceptor(None, streams=streams()), PHONE, False, "this acceptor runs no command for phone"),
        (acceptor(None, streams=streams()), LAPTOP, False, None),  # its own command
        (acceptor(), PHONE, False, None),
    ],
)
def test_what_a_peer_is_not_served(
    config: SessionConfig, peer: Peer, wants_streams: bool, refusal: str | None
) -> None:
    serving = config.serving(peer)
    if refusal is None:
        _servable(serving, invitation(peer, wants_streams))
    else:
        with pytest.raises(NotServedError, match=refusal):
            _servable(serving, invitation(peer, wants_streams))


class FakeRendezvous:
    """requests() gives these invitations, one each time `go` is set, then fails with `error` or waits."""

    def __init__(self, invitations: list[Invitation], error: PlexusError | None = None) -> None:
        self.invitations = invitations
        self.error = error
        self.go = asyncio.Event()
        self.cancelled = False

    async def requests(self) -> AsyncIterator[Invitation]:
        try:
            for each in self.invitations:
                await self.go.wait()
                self.go.clear()
                yield each
            await self.go.wait()
            if self.error is not None:
                raise self.error
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_requests_of_two_rendezvous_are_merged_until_one_fails() -> None:
    by_mail = FakeRendezvous([invitation(LAPTOP, False), invitation(PHONE, False)], PlexusError("IMAP gone"))
    on_dht = FakeRendezvous([invitation(PHONE, True)])
    merged = _requests([by_mail, on_dht])  # type: ignore[list-item]
    for place, name in ((on_dht, "phone"), (by_mail, "laptop"), (by_mail, "phone")):
        place.go.set()
        found, invited = await asyncio.wait_for(anext(merged), 5)
        assert found is place and invited.peer.name == name  # type: ignore[comparison-overlap]
    by_mail.go.set()
    with pytest.raises(PlexusError, match="IMAP gone"):
        await asyncio.wait_for(anext(merged), 5)
    assert on_dht.cancelled  # the other rendezvous is left with the acceptor
