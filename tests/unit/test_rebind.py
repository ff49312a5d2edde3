"""The rebind (issue 19): its key, its value, its two encodings, and the acceptor's loops that judge it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import re
from collections.abc import AsyncGenerator, Iterator
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from plexus import events, puncher, session
from plexus.endpoint import Endpoint
from plexus.identity import Identity
from plexus.mediator import dht, message
from plexus.mediator.dhtnode import DhtConfig
from plexus.mediator.email import Mediator
from plexus.peers import Peer, Roster
from plexus.rendezvous import (
    CLOCK_TOLERANCE,
    Invitation,
    Offer,
    Reach,
    Rebind,
    RebindError,
    RebindKey,
    RebindKeys,
    Rebinds,
    Rebound,
)
from tests.fuzz import FUZZ
from tests.unit import test_mediator_dht as dht_tests
from tests.unit import test_mediator_email as mail_tests

NOW = datetime.datetime(2026, 12, 2, 12, 0, tzinfo=datetime.UTC)
INVITER_PUZZLE, ACCEPTOR_PUZZLE = 0x0123456789ABCDEF, 0xFEDCBA9876543210
KEY = RebindKey.derive(INVITER_PUZZLE, ACCEPTOR_PUZZLE)
OUTER = Endpoint("198.51.100.7", 40123)
REACH = Reach("independent", hosts=(Endpoint("10.0.1.2", 40123),))


def rebind(sequence: int = 1, key: RebindKey = KEY, now: datetime.datetime = NOW, **changes: Any) -> Rebind:
    return dataclasses.replace(key.seal(sequence, OUTER, REACH, now), **changes)


# ---- the key -----------------------------------------------------------------------------------------------


def test_known_answer() -> None:
    """docs/protocol.md's worked example, from HKDF and HMAC called directly."""
    ikm = bytes.fromhex("0123456789abcdeffedcba9876543210")
    made = HKDF(algorithm=hashes.SHA256(), length=48, salt=None, info=b"plexus rebind 1").derive(ikm)
    assert (KEY.key, KEY.session) == (made[:32], made[32:])
    assert KEY.key.hex() == "aa5dcffacb876147d287bc537d069d08ae9c0d017507e2fd27fce62a4d121231"
    assert KEY.session.hex() == "e7bfa3e117bdd166237797b8e521140c"
    first = rebind()
    signed = (
        b"plexus rebind 1\0"
        + KEY.session
        + (1).to_bytes(8, "big")
        + int(NOW.timestamp()).to_bytes(8, "big")
        + b"\x00\x12198.51.100.7:40123"
        + b"\x00\x29mapping=independent; hosts=10.0.1.2:40123"
    )
    assert first.signed() == signed
    assert first.tag == hmac.digest(KEY.key, signed, hashlib.sha256)
    assert first.tag.hex() == "c5bba55d7932a96d1827590ced82f143a93af8769f3f08819d6adf1028f1eedd"


def test_the_handshake_key_is_unchanged_and_apart_from_the_rebind_key() -> None:
    """keys.derive is the handshake's schedule too: docs/protocol.md's handshake key, bound or not."""
    ikm = bytes.fromhex("0123456789abcdeffedcba9876543210")
    for bound, info in ((b"", b"plexus handshake 1"), (b"\x07" * 32, b"plexus handshake 1 bound")):
        expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm + bound)
        codec = puncher.Authenticated.derive(INVITER_PUZZLE, ACCEPTOR_PUZZLE, accept=False, bound=bound)
        assert codec._key == expected
        rebind_key = RebindKey.derive(INVITER_PUZZLE, ACCEPTOR_PUZZLE, bound)
        assert expected not in (rebind_key.key, rebind_key.session)


def test_the_key_is_bound_to_the_identities_when_they_are_pinned() -> None:
    bound = RebindKey.derive(INVITER_PUZZLE, ACCEPTOR_PUZZLE, b"\x07" * 32)
    made = HKDF(algorithm=hashes.SHA256(), length=48, salt=None, info=b"plexus rebind 1 bound").derive(
        bytes.fromhex("0123456789abcdeffedcba9876543210") + b"\x07" * 32
    )
    assert (bound.key, bound.session) == (made[:32], made[32:])
    assert bound.session != KEY.session  # a reader who knows the puzzles cannot even name the session


@pytest.mark.parametrize("puzzles", [(-1, 1), (1, 2**64)])
def test_puzzles_are_unsigned_64_bit(puzzles: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        RebindKey.derive(*puzzles)


def test_the_key_never_shows() -> None:
    assert KEY.key.hex() not in repr(KEY) and rebind().tag.hex() not in repr(rebind())


@dataclasses.dataclass
class _Config:
    """What session.rebind_keys reads of a SessionConfig: the rendezvous's identity."""

    rendezvous: Any


def test_the_session_derives_it_as_its_handshake_key_and_never_for_plexus_2_2() -> None:
    mine, theirs = dht_tests.new_identity(), dht_tests.new_identity()
    config = cast(
        session.SessionConfig, _Config(DhtConfig(mine, Roster.of(Peer(theirs.id, identity=theirs.id)), ()))
    )
    plexus_2_2 = Offer(OUTER, ACCEPTOR_PUZZLE)
    assert session.rebind_keys(config, INVITER_PUZZLE, ACCEPTOR_PUZZLE, plexus_2_2) is None
    anonymous = Offer(OUTER, ACCEPTOR_PUZZLE, REACH)
    both = session.rebind_keys(config, INVITER_PUZZLE, ACCEPTOR_PUZZLE, anonymous)
    assert both is not None and both.forth == KEY and both.back not in (KEY,)
    assert both.mine(accept=False) == both.theirs(accept=True) == KEY
    assert both.back.session != KEY.session and both.back.key != KEY.key
    signed = dataclasses.replace(anonymous, signer=dht_tests.public(theirs))
    bound = mine.agree(dht_tests.public(theirs))
    assert bound is not None
    expected = RebindKeys.derive(INVITER_PUZZLE, ACCEPTOR_PUZZLE, bound)
    assert session.rebind_keys(config, INVITER_PUZZLE, ACCEPTOR_PUZZLE, signed) == expected
    # The other side derives the same from its own key and the offer it got.
    mirrored = cast(
        session.SessionConfig, _Config(DhtConfig(theirs, Roster.of(Peer(mine.id, identity=mine.id)), ()))
    )
    theirs_got = dataclasses.replace(anonymous, signer=dht_tests.public(mine))
    assert session.rebind_keys(mirrored, INVITER_PUZZLE, ACCEPTOR_PUZZLE, theirs_got) == expected


# ---- the value ---------------------------------------------------------------------------------------------


def test_seal_puts_endpoints_in_the_spelling_a_reader_parses() -> None:
    v6 = Endpoint("2001:DB8:0::7", 40123)
    sealed = KEY.seal(2, v6, Reach("independent", v6=v6), NOW)
    assert str(sealed.outer) == "[2001:db8::7]:40123" and sealed.reach.v6 == v6.canonical()
    texts = ("[2001:db8::7]:40123", "mapping=independent; v6=[2001:db8::7]:40123")
    read = Rebind.read(sealed.session.hex(), 2, sealed.issued, *texts, sealed.tag.hex())
    assert read == sealed and KEY.verifies(read)


@pytest.mark.parametrize(
    "fields",
    [
        {"session": "e7bf"},
        {"session": "E7BFA3E117BDD166237797B8E521140C"},
        {"session": "g7bfa3e117bdd166237797b8e521140c"},
        {"session": " 7bfa3e117bdd166237797b8e521140c"},
        {"tag": "00" * 31},
        {"tag": "0" * 63},
        {"sequence": 0},
        {"sequence": 2**64},
        {"issued": -1},
        {"issued": 2**64},
        {"outer": "host.example:5"},
        {"outer": "198.51.100.7:0"},
        {"outer": "198.51.100.7"},
        {"reach": "mapping=sideways"},
        {"reach": "mapping=blocked"},
        {"reach": ""},
    ],
)
def test_a_malformed_rebind_is_a_rebind_error(fields: dict[str, Any]) -> None:
    good: dict[str, Any] = {
        "session": KEY.session.hex(),
        "sequence": 1,
        "issued": 1,
        "outer": str(OUTER),
        "reach": REACH.header(),
        "tag": "00" * 32,
    }
    Rebind.read(**good)
    with pytest.raises(RebindError, match=r"^(rebind|X-Plexus-Reach)"):
        Rebind.read(**good | fields)


@FUZZ
@given(
    st.text(max_size=70),
    st.integers(),
    st.integers(),
    st.text(max_size=60),
    st.text(max_size=120),
    st.text(max_size=70),
)
def test_fuzz_rebind_fields(
    session: str, sequence: int, issued: int, outer: str, reach: str, tag: str
) -> None:
    """Whatever an encoding hands over, Rebind.read gives a rebind or a RebindError, nothing else."""
    with contextlib.suppress(RebindError):
        read = Rebind.read(session, sequence, issued, outer, reach, tag)
        assert not KEY.verifies(read)


# ---- judging: Rebinds --------------------------------------------------------------------------------------


@contextlib.contextmanager
def expecting(key: RebindKey = KEY) -> Iterator[tuple[Rebinds, Rebound]]:
    rebinds = Rebinds()
    with rebinds.expect(key) as rebound:
        yield rebinds, rebound


def test_a_rebind_of_the_session_is_admitted_and_handed_over() -> None:
    with expecting() as (rebinds, rebound):
        rebinds.admit(rebind(), NOW)
        assert rebound.last == 1
        assert asyncio.run(anext(rebound)) == rebind()


def test_a_later_rebind_supersedes_one_not_taken_yet() -> None:
    async def run() -> None:
        with expecting() as (rebinds, rebound):
            rebinds.admit(rebind(1), NOW)
            rebinds.admit(rebind(3), NOW)  # 2 was lost on the way: any later one counts
            assert await anext(rebound) == rebind(3)
            waiting = asyncio.ensure_future(anext(rebound))
            await asyncio.sleep(0)
            assert not waiting.done()  # nothing newer yet
            rebinds.admit(rebind(4), NOW)
            assert await asyncio.wait_for(waiting, 1) == rebind(4)

    asyncio.run(run())


OTHER = RebindKey.derive(INVITER_PUZZLE, ACCEPTOR_PUZZLE + 1)


@pytest.mark.parametrize(
    ("forged", "reason"),
    [
        (rebind(key=OTHER), "of no session here"),  # another session's (or a guessed id)
        (rebind(key=dataclasses.replace(OTHER, session=KEY.session)), "bad tag"),  # the id, not the key
        (rebind(tag=bytes(32)), "bad tag"),
        (rebind(outer=Endpoint("203.0.113.66", 40123)), "bad tag"),  # hijacked: another endpoint
        (rebind(reach=Reach("dependent", Endpoint("203.0.113.66", 3478))), "bad tag"),
        (dataclasses.replace(rebind(), sequence=2), "bad tag"),  # a replay's sequence moved on
        (rebind(issued=int(NOW.timestamp()) + 1), "bad tag"),  # a stale one made fresh
        (rebind(now=NOW - CLOCK_TOLERANCE - datetime.timedelta(seconds=2)), "302 s ago, beyond the 300 s"),
        (rebind(now=NOW + CLOCK_TOLERANCE + datetime.timedelta(seconds=2)), "302 s ahead, beyond the 300 s"),
    ],
)
def test_forged_wrong_session_altered_or_stale_is_refused(forged: Rebind, reason: str) -> None:
    with expecting() as (rebinds, rebound), pytest.raises(RebindError, match=reason):
        rebinds.admit(forged, NOW)
    assert rebound.last == 0


def test_a_replay_or_an_overtaken_rebind_is_refused() -> None:
    with expecting() as (rebinds, rebound):
        rebinds.admit(rebind(2), NOW)
        for old in (rebind(2), rebind(1), rebind(2, now=NOW + datetime.timedelta(seconds=10))):
            with pytest.raises(RebindError, match="already at 2: a replay"):
                rebinds.admit(old, NOW + datetime.timedelta(seconds=20))
        assert rebound.last == 2


def test_a_session_no_longer_expected_takes_nothing() -> None:
    rebinds = Rebinds()
    with rebinds.expect(KEY):
        pass
    with pytest.raises(RebindError, match="of no session here"):
        rebinds.admit(rebind(), NOW)


# ---- on mail -----------------------------------------------------------------------------------------------

# plexus 2.2 looks for its response with this pattern (its email mediator).
RESPONSE_2_2 = re.compile(r"^PLEXUS\s+2.1\s+response\s+(\S+)\s+(\d+)\s+(\d+)$")

ROUTE = message.Route("inviter@example.org", "acceptor@example.org", "inviter")
PINNED = Identity.ephemeral()


def mail(item: Rebind, **changes: Any) -> bytes:
    fields: dict[str, Any] = {"message_id": "<9@example.org>", "date": NOW} | changes
    return message.build("rebind", item, ROUTE, **fields)


def test_the_mail_line() -> None:
    line = message.format_body("rebind", rebind())
    assert line == (
        "PLEXUS 2.1 rebind e7bfa3e117bdd166237797b8e521140c 1 1796212800 198.51.100.7:40123 "
        "c5bba55d7932a96d1827590ced82f143a93af8769f3f08819d6adf1028f1eedd mapping=independent; "
        "hosts=10.0.1.2:40123"
    )
    assert not RESPONSE_2_2.match(line)  # were a 2.2 peer ever to see one, it would pass it over
    assert message.parse_body(line) == ("rebind", rebind())


def test_mail_round_trip_anonymous_and_signed() -> None:
    raw = mail(rebind())
    assert b"X-Plexus-Reach" not in raw and b"In-Reply-To" not in raw  # the Reach is in the line
    assert message.read(raw, None).rebind == rebind()
    signed = mail(rebind(), signer=PINNED.key)
    letter = message.read(signed, None, PINNED.id)
    assert (letter.kind, letter.rebind, letter.offer) == ("rebind", rebind(), None)
    other = Identity.ephemeral()
    with pytest.raises(message.MessageError, match="not the pinned peer"):
        message.read(mail(rebind(), signer=other.key), None, PINNED.id)


def test_every_line_of_a_rebind_mail_fits_smtp() -> None:
    hosts = tuple(Endpoint(f"fd00:ffff:ffff:ffff:ffff:ffff:ffff:{i}", 65535) for i in range(4))
    v6 = Endpoint("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    longest = Reach("dependent", Endpoint("2001:db8:ffff:ffff:ffff:ffff:ffff:fffe", 65535), True, hosts, v6)
    largest = KEY.seal(2**64 - 1, Endpoint("255.255.255.255", 65535), longest, NOW)
    raw = mail(largest, signer=PINNED.key)
    assert max(len(line) for line in raw.split(b"\r\n")) < 998
    assert message.read(raw, None, PINNED.id).rebind == largest


@pytest.mark.parametrize(
    "line",
    [
        "PLEXUS 2.1 rebind",
        "PLEXUS 2.1 rebind e7bfa3e117bdd166237797b8e521140c 1 1796212800 198.51.100.7:40123 " + "00" * 32,
        "PLEXUS 2.1 rebind e7bfa3e117bdd166237797b8e521140c +1 1796212800 198.51.100.7:40123 "
        + "00" * 32
        + " mapping=independent",
        "PLEXUS 2.1 rebind e7bfa3e117bdd166237797b8e521140c 1 -5 198.51.100.7:40123 "
        + "00" * 32
        + " mapping=independent",
        "PLEXUS 2.1 rebind e7bfa3e117bdd166237797b8e521140c 1 \u0661 198.51.100.7:40123 "
        + "00" * 32
        + " mapping=independent",
        "PLEXUS 2.1 rebind e7bfa3e117bdd166237797b8e521140c 1 1 198.51.100.7:40123 "
        + "00" * 32
        + " mapping=nowhere",
    ],
)
def test_a_bad_rebind_line_is_a_message_error(line: str) -> None:
    with pytest.raises(message.MessageError, match=r"^(rebind|X-Plexus-Reach)"):
        message.parse_body(line)


GENUINE_LINE = message.format_body("rebind", rebind())


@FUZZ
@given(
    st.one_of(
        st.text(max_size=300).map(lambda tail: "PLEXUS 2.1 rebind " + tail),
        st.tuples(st.integers(0, len(GENUINE_LINE)), st.text(max_size=8), st.integers(0, 8)).map(
            lambda edit: GENUINE_LINE[: edit[0]] + edit[1] + GENUINE_LINE[edit[0] + edit[2] :]
        ),
    )
)
def test_fuzz_rebind_lines(line: str) -> None:
    """A rebind line cut, spliced or made up: a rebind that only the genuine key verifies, or MessageError."""
    with contextlib.suppress(message.MessageError):
        kind, content = message.parse_body(line)
        if kind == "rebind":
            assert isinstance(content, Rebind)
            assert not KEY.verifies(content) or content == rebind()


def rejections(sink: list[events.Event]) -> list[str]:
    return [event.reason for event in sink if isinstance(event, events.Rejected)]


def junk_rebinds(now: datetime.datetime) -> list[Rebind]:
    """What a forger or a replayer can send: everything but the genuine rebinds that follow."""
    return [
        rebind(1, OTHER, now),
        rebind(1, now=now, tag=bytes(32)),
        rebind(1, now=now, outer=Endpoint("203.0.113.66", 1)),
        rebind(1, now=now - 2 * CLOCK_TOLERANCE),
    ]


async def test_the_mail_acceptor_loop_takes_the_genuine_rebind_among_junk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    headers = mail_tests.ROUTE_HEADERS + b"Date: " + now.strftime("%a, %d %b %Y %H:%M:%S +0000").encode()
    lines = [message.format_body("rebind", item) for item in junk_rebinds(now)]
    lines += ["PLEXUS 2.1 rebind " + "x" * 50, message.format_body("rebind", rebind(1, now=now))] * 2
    bodies = [headers + b"\r\n\r\n" + line.encode() + b"\r\n" for line in lines]
    inbox = mail_tests.FakeInbox(
        [mail_tests.arrived(10 + i, body) for i, body in enumerate(bodies)]
        + [mail_tests.arrived(30, mail_tests.request_mail(7))]
    )
    mediator: Mediator = mail_tests.scanning(inbox)
    sink: list[events.Event] = []
    with events.reporting(sink.append, "accept"), mediator.rebinds(KEY) as rebound:
        requests = cast(AsyncGenerator[Invitation], mediator.requests())
        invitation = await asyncio.wait_for(anext(requests), 5)
        assert invitation.offer.puzzle == 7  # the loop went on past every rebind
        assert await asyncio.wait_for(anext(rebound), 1) == rebind(1, now=now)
        await requests.aclose()
    judged = sorted(inbox.consumed + mediator._pending)  # consumed, or to be once the session has the request
    assert judged == [*range(10, 10 + len(bodies)), 30]
    reasons = rejections(sink)
    assert len(reasons) == len(bodies) - 1, reasons
    assert reasons[:3] == [
        f"rebind of no session here ({OTHER.session.hex()[:8]}...)",
        "rebind with a bad tag: not made with this session's key",
        "rebind with a bad tag: not made with this session's key",
    ]
    assert re.fullmatch(r"rebind issued 60[01] s ago, beyond the 300 s our clock allows", reasons[3])
    assert "already at 1: a replay" in reasons[-1]
    ignored = [r for r in caplog.records if "ignoring message UID" in r.getMessage()]
    assert len(ignored) == len(reasons) and not any(r.exc_info for r in caplog.records)


# ---- on the DHT --------------------------------------------------------------------------------------------

ALICE, BOB = dht_tests.ALICE, dht_tests.BOB  # the inviter, the acceptor


def dht_letter(item: Rebind, key: str) -> dht.Letter:
    issued = datetime.datetime.fromtimestamp(item.issued, datetime.UTC)
    return dht.Letter("rebind", ALICE.id, BOB.id, key, issued, None, rebind=item)


def test_dht_round_trip_and_layout() -> None:
    key = dht.key_text("request", BOB.id, NOW.date())
    original = dht_letter(rebind(), key)
    assert (
        original.encode()
        == (
            f'{{"from":"{ALICE.id}","issued":1796212800,"key":"{key}","kind":"rebind",'
            f'"outer":"198.51.100.7:40123","reach":"mapping=independent; hosts=10.0.1.2:40123",'
            f'"sequence":1,"session":"e7bfa3e117bdd166237797b8e521140c",'
            f'"tag":"c5bba55d7932a96d1827590ced82f143a93af8769f3f08819d6adf1028f1eedd",'
            f'"to":"{BOB.id}","v":1}}'
        ).encode()
    )
    letter, _ = dht.unseal(dht.seal(original, ALICE, dht_tests.public(BOB)), BOB, key, frozenset({ALICE.id}))
    assert letter == original and letter.rebind == rebind()


@pytest.mark.parametrize(
    "changes",
    [
        {"puzzle": 7},
        {"offer": dht_tests.OFFER},
        {"answers": 3},
        {"reason": "why"},
        {"rebind": None},
        {"kind": "request"},
        {"issued": NOW + datetime.timedelta(seconds=1)},
    ],
)
def test_a_rebind_letter_must_fit_its_kind(changes: dict[str, Any]) -> None:
    with pytest.raises(dht.DhtMessageError):
        dataclasses.replace(dht_letter(rebind(), "k"), **changes)


def rebind_content(**changes: object) -> bytes:
    return dht_tests.edited(dht_letter(rebind(), "k").encode(), changes, set())


@pytest.mark.parametrize(
    "data",
    [
        rebind_content(issued=1796212800.5),
        rebind_content(issued="1796212800"),
        rebind_content(issued=10**400),
        rebind_content(sequence="1"),
        rebind_content(sequence=0),
        rebind_content(sequence=True),
        rebind_content(session=1),
        rebind_content(session="E7BFA3E117BDD166237797B8E521140C"),
        rebind_content(tag="00"),
        rebind_content(outer="198.51.100.7"),
        rebind_content(reach="mapping=blocked"),
        dht_tests.edited(dht_letter(rebind(), "k").encode(), {}, {"tag"}),
    ],
)
def test_malformed_rebind_content(data: bytes) -> None:
    with pytest.raises(dht.DhtMessageError):
        dht.Letter.decode(data)


def test_a_rebind_is_never_screened_as_an_offer() -> None:
    with pytest.raises(dht.DhtMessageError):
        dht.Screen().admit(dht_letter(rebind(), "k"), "request", NOW)
    with pytest.raises(dht.DhtMessageError, match="no puzzle"):
        dht.Screen().admit(dht_letter(rebind(), "k"), "rebind", NOW)


async def test_the_dht_acceptor_loop_takes_the_genuine_rebind_among_junk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    key = dht.key_text("request", BOB.id, dht.day_of(now))

    def sealed(item: Rebind) -> bytes:
        return dht.seal(dht_letter(item, key), ALICE, dht_tests.public(BOB))

    genuine = sealed(rebind(1, now=now))
    forged_by_eve = dht.seal(
        dataclasses.replace(dht_letter(rebind(1, now=now), key), sender=dht_tests.EVE.id),
        dht_tests.EVE,
        dht_tests.public(BOB),
    )
    values = [sealed(item) for item in junk_rebinds(now)] + [b"PXD3 junk", forged_by_eve, genuine, genuine]
    request = dht.seal(dht_tests.letter("request", 9, key=key, issued=now), ALICE, dht_tests.public(BOB))
    mediator = dht_tests.joined(BOB, ALICE, [*values, request])
    sink: list[events.Event] = []
    with events.reporting(sink.append, "accept"), mediator.rebinds(KEY) as rebound:
        requests = cast(AsyncGenerator[Invitation], mediator.requests())
        invitation = await asyncio.wait_for(anext(requests), 5)
        assert invitation.offer.puzzle == 9
        assert await asyncio.wait_for(anext(rebound), 1) == rebind(1, now=now)
        await requests.aclose()
    reasons = rejections(sink)
    assert len(reasons) == len(values) - 1, reasons
    assert "already at 1: a replay" in reasons[-1]
    assert not any(record.exc_info for record in caplog.records)


async def test_the_dht_inviter_puts_it_where_requests_go() -> None:
    put: list[tuple[str, bytes]] = []

    class Node(dht_tests.FakeNode):
        async def put(self, key: str, data: bytes, *, permanent: bool = False) -> bool:
            put.append((key, data))
            return True

    now = datetime.datetime.now(datetime.UTC)
    card = dht.make_card(BOB, dht.key_text("card", BOB.id, dht.day_of(now)), now)
    mediator = dht_tests.joined(ALICE, BOB, [card])
    mediator._node = Node([card])  # type: ignore[assignment]
    sink: list[events.Event] = []
    with events.reporting(sink.append, "invite"):
        await mediator.rebind(rebind(1, now=now), mediator._config.peers.peers.only)
        await asyncio.gather(*mediator._puts)
    key = dht.key_text("request", BOB.id, dht.day_of(now))
    assert put[0][0] == key
    letter, _ = dht.unseal(put[0][1], BOB, key, frozenset({ALICE.id}))
    assert letter.rebind == rebind(1, now=now)
    assert [event.kind for event in sink if isinstance(event, events.Sent)] == ["rebind"]


def test_a_rebind_sent_back_to_its_sender_names_no_session_there() -> None:
    """Each direction has its own key and session id: the inviter's rebind, turned back on the inviter as if
    the acceptor's, is refused, and the other way round."""
    both = RebindKeys.derive(INVITER_PUZZLE, ACCEPTOR_PUZZLE)
    now = datetime.datetime.now(datetime.UTC)
    for accept in (False, True):
        sent = both.mine(accept=accept).seal(1, OUTER, REACH, now)
        judging = Rebinds()
        # the sender's own expectation of its peer's rebinds: not this one
        with judging.expect(both.theirs(accept=accept)), pytest.raises(RebindError, match="no session here"):
            judging.admit(sent, now)
        with judging.expect(both.theirs(accept=not accept)):  # the peer's: taken
            judging.admit(sent, now)
