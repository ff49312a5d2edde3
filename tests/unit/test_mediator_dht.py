"""The DHT rendezvous, sans I/O: key texts, cards, sealed letters, screening."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import math
import os
import struct
import sys
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus.endpoint import Endpoint
from plexus.identity import Identity, id_of
from plexus.mediator import dht, dhtnode
from plexus.mediator.dht import (
    CARD_LIFETIME,
    DhtMessageError,
    Kind,
    Letter,
    Screen,
    day_of,
    key_text,
    make_card,
    node_id,
    read_card,
    seal,
    sending_days,
    unseal,
)
from plexus.mediator.dhtnode import DhtConfig
from plexus.mediator.email import Invitation
from plexus.peers import Peer, Roster
from plexus.rendezvous import CLOCK_TOLERANCE, NO_REASON, Offer, Reach, RebindError, RebindKey, Rebinds
from tests.fuzz import FUZZ

NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)
ECDSA = ec.ECDSA(hashes.SHA256())


def new_identity() -> Identity:
    return Identity.of_key(ec.generate_private_key(ec.SECP256R1()))


ALICE = new_identity()  # the inviter
BOB = new_identity()  # the acceptor
EVE = new_identity()
OFFER = Offer(Endpoint("198.51.100.2", 40000), 7, Reach("independent"))


def ec_key(identity: Identity) -> ec.EllipticCurvePrivateKey:
    assert isinstance(identity.key, ec.EllipticCurvePrivateKey)
    return identity.key


def public(identity: Identity) -> ec.EllipticCurvePublicKey:
    return ec_key(identity).public_key()


def spki(identity: Identity) -> bytes:
    return public(identity).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# Who sends each kind to whom, and under whose id it lives.
ROUTES: dict[Kind, tuple[Identity, Identity, str]] = {
    "request": (ALICE, BOB, key_text("request", BOB.id, NOW.date())),
    "response": (BOB, ALICE, key_text("response", ALICE.id, NOW.date())),
    "refusal": (BOB, ALICE, key_text("response", ALICE.id, NOW.date())),
    "rebind": (ALICE, BOB, key_text("request", BOB.id, NOW.date())),
}
REBIND_KEY = RebindKey.derive(7, 8)
REBIND = REBIND_KEY.seal(1, Endpoint("198.51.100.2", 40001), Reach("independent"), NOW)


def letter(kind: Kind = "request", puzzle: int = 7, **changes: Any) -> Letter:
    sender, recipient, key = ROUTES[kind]
    if kind == "rebind":  # its time is its rebind's, and it has no puzzle
        rebind: dict[str, Any] = {"issued": NOW, "puzzle": None, "rebind": REBIND}
        return Letter(kind, sender.id, recipient.id, key, **rebind | changes)
    fields: dict[str, Any] = {
        "kind": kind,
        "sender": sender.id,
        "recipient": recipient.id,
        "key": key,
        "issued": NOW,
        "puzzle": puzzle,
        "offer": None if kind == "refusal" else replace(OFFER, puzzle=puzzle),
        "answers": 3 if kind == "response" else puzzle if kind == "refusal" else None,
        "reason": "busy" if kind == "refusal" else None,
    }
    fields.update(changes)
    return Letter(**fields)


def sealed(kind: Kind = "request", **changes: Any) -> bytes:
    sender, recipient, _ = ROUTES[kind]
    return seal(letter(kind, **changes), sender, public(recipient))


def content_of(base: Kind = "request", /, **changes: Any) -> bytes:
    """A letter's JSON with fields replaced (None: removed), past what Letter itself would allow."""
    content = json.loads(letter(base).encode())
    content.update(changes)
    return json.dumps({k: v for k, v in content.items() if v is not None}, sort_keys=True).encode()


SUITE = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def seal_plaintext(plaintext: bytes, key: str, recipient: Identity) -> bytes:
    """The sealed layout around a plaintext, written from the module docstring, independently of seal()."""
    return b"PXD3" + SUITE.encrypt(plaintext, public(recipient), key.encode())


def seal_by_hand(
    content: bytes, key: str, signer: Identity, recipient: Identity, signed: bytes | None = None
) -> bytes:
    signature = ec_key(signer).sign(b"plexus dht v3\0" + key.encode() + b"\0" + (signed or content), ECDSA)
    plaintext = (
        struct.pack("!H", len(spki(signer)))
        + spki(signer)
        + struct.pack("!H", len(signature))
        + signature
        + content
    )
    return seal_plaintext(plaintext, key, recipient)


def open_by_hand(value: bytes, key: str, recipient: Identity) -> bytes:
    assert value[:4] == b"PXD3"
    return SUITE.decrypt(value[4:], ec_key(recipient), key.encode())


# Keys


def test_key_text() -> None:
    assert key_text("card", "a" * 32, datetime.date(2026, 1, 2)) == f"plexus/3/card/{'a' * 32}/2026-01-02"


def test_day_is_utc() -> None:
    tokyo = datetime.timezone(datetime.timedelta(hours=9))
    assert day_of(datetime.datetime(2026, 1, 2, 8, 0, tzinfo=tokyo)) == datetime.date(2026, 1, 1)


def test_sending_days_cover_a_listener_across_midnight() -> None:
    noon = datetime.datetime(2026, 12, 31, 12, 0, tzinfo=datetime.UTC)
    before = datetime.datetime(2026, 12, 31, 23, 58, 0, tzinfo=datetime.UTC)
    after = before + datetime.timedelta(minutes=4)
    assert sending_days(noon) == (datetime.date(2026, 12, 31),)
    assert sending_days(before) == (datetime.date(2026, 12, 31), datetime.date(2027, 1, 1))
    assert sending_days(after) == (datetime.date(2026, 12, 31), datetime.date(2027, 1, 1))
    # A listener whose clock is up to the tolerance away watches a day the sender puts under.
    for skew in (-4, -1, 0, 1, 4):
        listener = day_of(before + datetime.timedelta(minutes=skew))
        assert listener in sending_days(before)


# Cards

CARD_KEY = key_text("card", BOB.id, NOW.date())


def card_cipher(host_id: str, key: str) -> AESGCM:
    info = b"plexus card v3\0" + key.encode()
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(host_id.encode()))


def seal_card_by_hand(inner: bytes, host_id: str = BOB.id, key: str = CARD_KEY) -> bytes:
    """A card around an inner card, written from the module docstring, independently of make_card()."""
    nonce = os.urandom(12)
    return b"PXC3" + nonce + card_cipher(host_id, key).encrypt(nonce, inner, b"PXC3")


def open_card_by_hand(card: bytes, host_id: str = BOB.id, key: str = CARD_KEY) -> bytes:
    assert card[:4] == b"PXC3"
    return card_cipher(host_id, key).decrypt(card[4:16], card[16:], b"PXC3")


def inner_card_by_hand(private: ec.EllipticCurvePrivateKey, issued: float, key: str = CARD_KEY) -> bytes:
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = struct.pack("!H", len(der)) + der + struct.pack("!d", issued)
    signature = private.sign(b"plexus card v3\0" + key.encode() + b"\0" + body, ECDSA)
    return body + struct.pack("!H", len(signature)) + signature


def card_by_hand(private: ec.EllipticCurvePrivateKey, issued: float) -> bytes:
    host_id = id_of(private.public_key())
    key = key_text("card", host_id, NOW.date())
    return seal_card_by_hand(inner_card_by_hand(private, issued, key), host_id, key)


def test_card_round_trip() -> None:
    key = read_card(make_card(BOB, CARD_KEY, NOW), BOB.id, CARD_KEY, NOW + CARD_LIFETIME)
    assert id_of(key) == BOB.id


def test_card_layout() -> None:
    card = make_card(BOB, CARD_KEY, NOW)
    inner = open_card_by_hand(card)
    n = len(spki(BOB))
    assert struct.unpack_from("!H", inner, 0) == (n,)
    assert inner[2 : 2 + n] == spki(BOB)
    assert struct.unpack_from("!d", inner, 2 + n) == (NOW.timestamp(),)
    (m,) = struct.unpack_from("!H", inner, 10 + n)
    assert len(inner) == 12 + n + m
    public(BOB).verify(
        inner[12 + n :], b"plexus card v3\0" + CARD_KEY.encode() + b"\0" + inner[: 10 + n], ECDSA
    )


def test_a_card_tells_nothing_to_whoever_does_not_know_the_id() -> None:
    """No key, no id, nothing in common between two cards (of two days or the same) but the magic."""
    tomorrow = key_text("card", BOB.id, NOW.date() + datetime.timedelta(days=1))
    cards = [make_card(BOB, CARD_KEY, NOW), make_card(BOB, CARD_KEY, NOW), make_card(BOB, tomorrow, NOW)]
    for card in cards:
        assert spki(BOB) not in card and BOB.id.encode() not in card
        assert public(BOB).public_numbers().x.to_bytes(32, "big") not in card
    bodies = [card[4:] for card in cards]
    for one, other in itertools.pairwise(bodies):
        assert sum(a == b for a, b in zip(one, other, strict=False)) < len(one) // 8  # as random bytes


def test_card_of_another_id_or_day() -> None:
    card = make_card(BOB, CARD_KEY, NOW)
    alice_key = key_text("card", ALICE.id, NOW.date())
    tomorrow = key_text("card", BOB.id, NOW.date() + datetime.timedelta(days=1))
    for host_id, key in ((ALICE.id, alice_key), (ALICE.id, CARD_KEY), (BOB.id, tomorrow)):
        with pytest.raises(DhtMessageError, match=f"not {host_id}'s card"):
            read_card(card, host_id, key, NOW)


def test_a_card_sealed_for_an_id_that_carries_another_key() -> None:
    """Whoever knows an id can seal a card for it, but not with a key of that id inside."""
    card = seal_card_by_hand(inner_card_by_hand(ec_key(EVE), NOW.timestamp()))
    with pytest.raises(DhtMessageError, match=f"card of {EVE.id}, not of {BOB.id}"):
        read_card(card, BOB.id, CARD_KEY, NOW)


def test_card_signed_for_another_day() -> None:
    tomorrow = key_text("card", BOB.id, NOW.date() + datetime.timedelta(days=1))
    card = seal_card_by_hand(inner_card_by_hand(ec_key(BOB), NOW.timestamp(), tomorrow))
    with pytest.raises(DhtMessageError, match="bad card signature"):
        read_card(card, BOB.id, CARD_KEY, NOW)


def test_card_tampered_anywhere() -> None:
    card = make_card(BOB, CARD_KEY, NOW)
    for at in range(len(card)):
        tampered = card[:at] + bytes([card[at] ^ 0x01]) + card[at + 1 :]
        with pytest.raises(DhtMessageError):
            read_card(tampered, BOB.id, CARD_KEY, NOW)


def test_card_cut_or_extended() -> None:
    card = make_card(BOB, CARD_KEY, NOW)
    for end in range(len(card)):
        with pytest.raises(DhtMessageError):
            read_card(card[:end], BOB.id, CARD_KEY, NOW)
    with pytest.raises(DhtMessageError, match="altered"):
        read_card(card + b"\0", BOB.id, CARD_KEY, NOW)
    inner = inner_card_by_hand(ec_key(BOB), NOW.timestamp())
    with pytest.raises(DhtMessageError, match="bytes after"):
        read_card(seal_card_by_hand(inner + b"\0"), BOB.id, CARD_KEY, NOW)
    for end in range(len(inner)):
        with pytest.raises(DhtMessageError, match="cut short"):
            read_card(seal_card_by_hand(inner[:end]), BOB.id, CARD_KEY, NOW)


@pytest.mark.parametrize("offset", [CARD_LIFETIME, -CARD_LIFETIME])
def test_stale_card(offset: datetime.timedelta) -> None:
    card = make_card(BOB, CARD_KEY, NOW)
    read_card(card, BOB.id, CARD_KEY, NOW + offset)
    with pytest.raises(DhtMessageError, match="card issued"):
        read_card(card, BOB.id, CARD_KEY, NOW + offset * 1.001)


def test_card_by_hand_is_read() -> None:
    assert id_of(read_card(card_by_hand(ec_key(BOB), NOW.timestamp()), BOB.id, CARD_KEY, NOW)) == BOB.id


def test_card_issued_nan() -> None:
    with pytest.raises(DhtMessageError, match="card issued"):
        read_card(card_by_hand(ec_key(BOB), math.nan), BOB.id, CARD_KEY, NOW)


def test_card_of_another_curve() -> None:
    private = ec.generate_private_key(ec.SECP384R1())
    host_id = id_of(private.public_key())
    with pytest.raises(DhtMessageError, match="not P-256"):
        read_card(card_by_hand(private, NOW.timestamp()), host_id, key_text("card", host_id, NOW.date()), NOW)


def test_card_needs_a_p256_identity() -> None:
    rsa_identity = Identity(rsa.generate_private_key(65537, 2048), BOB.certificate)
    with pytest.raises(ValueError, match="P-256"):
        make_card(rsa_identity, CARD_KEY, NOW)


# Node ids


def test_node_id_follows_from_the_private_key_and_the_day() -> None:
    day = NOW.date()
    assert len(node_id(BOB, day)) == 20
    assert node_id(Identity.of_key(ec_key(BOB)), day) == node_id(BOB, day)  # the next run takes its place
    assert node_id(BOB, day + datetime.timedelta(days=1)) != node_id(BOB, day)
    assert node_id(ALICE, day) != node_id(BOB, day)
    secret = ec_key(BOB).private_numbers().private_value.to_bytes(32, "big")
    info = b"plexus node v3\0" + day.isoformat().encode()
    assert node_id(BOB, day) == HKDF(algorithm=hashes.SHA256(), length=20, salt=None, info=info).derive(
        secret
    )


# Sealing


@pytest.mark.parametrize("kind", ["request", "response", "refusal", "rebind"])
def test_seal_round_trip(kind: Kind) -> None:
    sender, recipient, key = ROUTES[kind]
    original = letter(kind)
    got, sender_key = unseal(
        seal(original, sender, public(recipient)), recipient, key, frozenset({sender.id})
    )
    assert got == original
    assert id_of(sender_key) == sender.id


def test_sealed_layout() -> None:
    """Open seal()'s output by hand, following the module docstring."""
    original = letter("request")
    value = seal(original, ALICE, public(BOB))
    plaintext = open_by_hand(value, original.key, BOB)
    (n,) = struct.unpack_from("!H", plaintext, 0)
    assert plaintext[2 : 2 + n] == spki(ALICE)
    (m,) = struct.unpack_from("!H", plaintext, 2 + n)
    signature, content = plaintext[4 + n : 4 + n + m], plaintext[4 + n + m :]
    public(ALICE).verify(signature, b"plexus dht v3\0" + original.key.encode() + b"\0" + content, ECDSA)
    assert content == original.encode()
    assert len(value) == 4 + 65 + len(plaintext) + 16  # the magic, HPKE's enc, the AES-GCM ciphertext


def test_a_sealed_value_tells_nothing_of_its_sender() -> None:
    value = sealed()
    for secret in (
        spki(ALICE),
        ALICE.id.encode(),
        BOB.id.encode(),
        public(ALICE).public_numbers().x.to_bytes(32, "big"),
    ):
        assert secret not in value


def test_sealed_by_hand_is_read() -> None:
    key = ROUTES["request"][2]
    got, _ = unseal(seal_by_hand(content_of(), key, ALICE, BOB), BOB, key, frozenset({ALICE.id}))
    assert got == letter()


def test_sealed_to_another_host() -> None:
    key = ROUTES["request"][2]
    value = seal(letter(recipient=EVE.id), ALICE, public(EVE))
    with pytest.raises(DhtMessageError, match="not encrypted to this host"):
        unseal(value, BOB, key, frozenset({ALICE.id}))


def test_tampered_anywhere() -> None:
    key = ROUTES["request"][2]
    value = sealed()
    for at in range(len(value)):
        tampered = value[:at] + bytes([value[at] ^ 0x01]) + value[at + 1 :]
        with pytest.raises(DhtMessageError) as caught:
            unseal(tampered, BOB, key, frozenset({ALICE.id}))
        if at >= 4:  # past the magic, HPKE refuses it
            assert "not encrypted to this host" in str(caught.value)


def test_moved_to_another_key() -> None:
    value = sealed()
    moved = key_text("request", BOB.id, NOW.date() + datetime.timedelta(days=1))
    with pytest.raises(DhtMessageError, match="not encrypted to this host"):
        unseal(value, BOB, moved, frozenset({ALICE.id}))


@pytest.mark.parametrize(
    "value", [b"", b"PXD3", b"PXD3" + bytes(92), b"PXD3" + b"\x04" + bytes(200), b"PXC3" + bytes(200)]
)
def test_not_a_sealed_value(value: bytes) -> None:
    with pytest.raises(DhtMessageError):
        unseal(value, BOB, ROUTES["request"][2], frozenset({ALICE.id}))


def test_forged_by_another_identity() -> None:
    key = ROUTES["request"][2]
    signed_by_eve = seal(letter(sender=EVE.id), EVE, public(BOB))
    claims_alice = seal_by_hand(content_of(), key, EVE, BOB)
    for value in (signed_by_eve, claims_alice):
        with pytest.raises(DhtMessageError, match=f"from {EVE.id}, not a peer of this host"):
            unseal(value, BOB, key, frozenset({ALICE.id}))


def test_bad_signature() -> None:
    key = ROUTES["request"][2]
    value = seal_by_hand(content_of(), key, ALICE, BOB, signed=content_of(puzzle=8))
    with pytest.raises(DhtMessageError, match="bad signature"):
        unseal(value, BOB, key, frozenset({ALICE.id}))


def test_addressed_to_someone_else() -> None:
    key = ROUTES["request"][2]
    value = seal_by_hand(content_of(to=EVE.id), key, ALICE, BOB)
    with pytest.raises(DhtMessageError, match=f"to {EVE.id}, not this host"):
        unseal(value, BOB, key, frozenset({ALICE.id}))


def test_from_someone_else_than_its_signer() -> None:
    key = ROUTES["request"][2]
    value = seal_by_hand(content_of(**{"from": EVE.id}), key, ALICE, BOB)
    with pytest.raises(DhtMessageError, match=f"says it is from {EVE.id}"):
        unseal(value, BOB, key, frozenset({ALICE.id}))


def test_written_for_another_key() -> None:
    key = ROUTES["request"][2]
    other = key_text("request", BOB.id, NOW.date() - datetime.timedelta(days=1))
    value = seal_by_hand(content_of(key=other), key, ALICE, BOB)
    with pytest.raises(DhtMessageError, match="written for"):
        unseal(value, BOB, key, frozenset({ALICE.id}))


def test_unreadable_content_inside() -> None:
    key = ROUTES["request"][2]
    with pytest.raises(DhtMessageError, match="not JSON"):
        unseal(seal_by_hand(b"{", key, ALICE, BOB), BOB, key, frozenset({ALICE.id}))


def test_seal_checks_its_keys() -> None:
    with pytest.raises(ValueError, match="not for these keys"):
        seal(letter(), EVE, public(BOB))
    with pytest.raises(ValueError, match="not for these keys"):
        seal(letter(), ALICE, public(EVE))
    with pytest.raises(ValueError, match="P-256"):
        seal(letter(), ALICE, ec.generate_private_key(ec.SECP384R1()).public_key())
    rsa_identity = Identity(rsa.generate_private_key(65537, 2048), ALICE.certificate)
    with pytest.raises(ValueError, match="P-256"):
        seal(letter(), rsa_identity, public(BOB))


# Letters


def test_encoding_is_compact_and_sorted() -> None:
    encoded = letter("response", puzzle=9).encode()
    assert (
        encoded
        == (
            f'{{"answers":3,"from":"{BOB.id}","issued":{NOW.timestamp()},"key":"{ROUTES["response"][2]}",'
            f'"kind":"response","outer":"198.51.100.2:40000","puzzle":9,"reach":"mapping=independent",'
            f'"to":"{ALICE.id}","v":1}}'
        ).encode()
    )


def test_refusal_encoding_has_no_offer() -> None:
    content = json.loads(letter("refusal").encode())
    assert content["reason"] == "busy"
    assert "outer" not in content and "reach" not in content


def test_reason_is_sanitized() -> None:
    assert letter("refusal", reason="no\r\ncommand\x00 here").reason == "no command? here"
    assert letter("refusal", reason=" ").reason == NO_REASON


def test_ipv6_relay_and_streams_round_trip() -> None:
    offer = Offer(Endpoint("2001:db8::1", 5), 7, Reach("dependent", Endpoint("2001:db8::2", 6), True))
    original = letter("request", offer=offer)
    assert Letter.decode(original.encode()) == original


@pytest.mark.parametrize(
    ("kind", "changes"),
    [
        ("refusal", {"offer": OFFER}),
        ("request", {"offer": None}),
        ("request", {"offer": replace(OFFER, reach=None)}),
        ("request", {"offer": replace(OFFER, puzzle=8)}),
        ("request", {"answers": 1}),
        ("request", {"reason": "why"}),
        ("response", {"answers": None}),
        ("refusal", {"answers": 8}),
        ("refusal", {"reason": None}),
        ("request", {"puzzle": -1, "offer": replace(OFFER, puzzle=-1)}),
        ("request", {"puzzle": 2**64, "offer": replace(OFFER, puzzle=2**64)}),
        ("response", {"answers": -1}),
    ],
)
def test_letter_must_fit_its_kind(kind: Kind, changes: dict[str, Any]) -> None:
    with pytest.raises(DhtMessageError):
        letter(kind, **changes)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        "{}".encode("utf-16"),
        b"[]",
        b"null",
        b"[" * 100_000,
        content_of(v=2),
        content_of(v=True),
        content_of(v=1.0),
        content_of(v="1"),
        content_of(kind="invite"),
        content_of(kind=1),
        content_of(puzzle=-1),
        content_of(puzzle=2**64),
        content_of(puzzle="7"),
        content_of(puzzle=True),
        content_of(puzzle=7.0),
        content_of(puzzle=None),
        content_of(outer="host.example:5"),
        content_of(outer="198.51.100.2:0"),
        content_of(outer="198.51.100.2:65536"),
        content_of(outer="198.51.100.2"),
        content_of(outer="198.51.100.2:\u00b2"),
        content_of(outer=None),
        content_of(reach=None),
        content_of(reach="mapping=sometimes"),
        content_of(reach="mapping=independent; relay=nowhere"),
        content_of(reach=1),
        content_of(to="A" * 32),
        content_of(to=None),
        content_of(**{"from": "a" * 31}),
        content_of(key=None),
        content_of(issued=None),
        content_of(issued="now"),
        content_of(issued=True),
        content_of(issued=1e300),
        content_of(issued=-1e300),
        content_of(issued=10**400),
        content_of("request", answers=1),
        content_of("response", answers=None),
        content_of("refusal", answers=8),
        content_of("refusal", reason=None),
        content_of("refusal", reason=5),
        b'{"issued":NaN}',
        content_of().replace(str(NOW.timestamp()).encode(), b"NaN"),
        content_of().replace(str(NOW.timestamp()).encode(), b"Infinity"),
    ],
)
def test_malformed_content(data: bytes) -> None:
    with pytest.raises(DhtMessageError):
        Letter.decode(data)


def test_unknown_fields_are_ignored() -> None:
    assert Letter.decode(content_of(later="field")) == letter()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "v",
    "kind",
    "from",
    "to",
    "key",
    "issued",
    "puzzle",
    "outer",
    "reach",
    "answers",
    "reason",
    "session",
    "sequence",
    "tag",
]


@settings(deadline=None)
@given(
    st.sampled_from(["request", "response", "refusal"]),
    st.integers(0, 2**64 - 1),
    st.datetimes(
        datetime.datetime(2000, 1, 1), datetime.datetime(2200, 1, 1), timezones=st.just(datetime.UTC)
    ),
    st.text(max_size=300),
)
def test_encode_decode_round_trip(kind: Kind, puzzle: int, issued: datetime.datetime, reason: str) -> None:
    changes: dict[str, Any] = {"issued": issued}
    if kind == "refusal":
        changes["reason"] = reason
    original = letter(kind, puzzle, **changes)
    assert Letter.decode(original.encode()) == original


# Screening


def test_screen_admits_once() -> None:
    screen = Screen()
    screen.admit(letter("request"), "request", NOW)
    with pytest.raises(DhtMessageError, match="replay"):
        screen.admit(letter("request", issued=NOW + datetime.timedelta(seconds=1)), "request", NOW)
    screen.admit(letter("request", 8), "request", NOW)


def test_screen_wrong_kind() -> None:
    with pytest.raises(DhtMessageError, match="expected a request, got a response"):
        Screen().admit(letter("response"), "request", NOW)
    with pytest.raises(DhtMessageError, match="expected a request, got a refusal"):
        Screen().admit(letter("refusal", 3), "request", NOW, request=3)


@pytest.mark.parametrize("sign", [1, -1])
def test_screen_stale(sign: int) -> None:
    screen = Screen()
    late = CLOCK_TOLERANCE + datetime.timedelta(seconds=1)
    with pytest.raises(DhtMessageError, match="from now"):
        screen.admit(letter("request"), "request", NOW + sign * late)
    screen.admit(letter("request"), "request", NOW + sign * CLOCK_TOLERANCE)


def test_screen_response_to_our_request_only() -> None:
    screen = Screen()
    with pytest.raises(DhtMessageError, match="answers the request 3, not ours"):
        screen.admit(letter("response"), "response", NOW, request=4)
    with pytest.raises(DhtMessageError, match="not ours"):
        screen.admit(letter("response"), "response", NOW)
    screen.admit(letter("response"), "response", NOW, request=3)


def test_screen_refusal_answers_our_request() -> None:
    screen = Screen()
    with pytest.raises(DhtMessageError, match="answers the request 5, not ours"):
        screen.admit(letter("refusal", 5), "response", NOW, request=4)
    with pytest.raises(DhtMessageError, match="expected a response"):
        screen.admit(letter("refusal", 4), "response", NOW)
    screen.admit(letter("refusal", 4), "response", NOW, request=4)
    with pytest.raises(DhtMessageError, match="replay"):
        screen.admit(letter("refusal", 4), "response", NOW, request=4)


# Fuzzing: every parser of a value from the DHT, fed random bytes, genuine values mutated or cut short, and
# genuine layers around mutated insides (the outer layer right, so the parsers behind it are reached). Only
# DhtMessageError may escape.

CARD = make_card(BOB, CARD_KEY, NOW)
SEALED = {kind: sealed(kind) for kind in ROUTES}
PLAINTEXTS = {kind: open_by_hand(SEALED[kind], ROUTES[kind][2], ROUTES[kind][1]) for kind in ROUTES}
# A field's value replaced: of any JSON type, shallow (deep JSON comes whole: contents()).
FIELD_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def per_kind(values: Callable[[Kind], st.SearchStrategy[bytes]]) -> st.SearchStrategy[tuple[Kind, bytes]]:
    return st.one_of(*(st.tuples(st.just(kind), values(kind)) for kind in ROUTES))


@st.composite
def mutated(draw: st.DrawFn, genuine: bytes) -> bytes:
    """A genuine value with a few bits flipped, bytes inserted or deleted, or its tail cut off."""
    value = bytearray(genuine)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(value)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip" and at < len(value):
            value[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            value[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del value[at : at + draw(st.integers(1, 8))]
        elif action == "cut":
            del value[at:]
    return bytes(value)


def hostile(genuine: bytes, magic: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=400).map(lambda tail: magic + tail),
        st.integers(0, len(genuine)).map(lambda end: genuine[:end]),
        mutated(genuine),
    )


def read_or_refuse(parse: Callable[[], object]) -> None:
    with contextlib.suppress(DhtMessageError, RebindError):
        parse()


# Each test below mixes several generators, each with its share of the FUZZ inputs: Hypothesis's own cost
# per input is most of the time taken, so fewer tests with more kinds of input each.


@FUZZ
@given(
    st.one_of(
        hostile(CARD, b"PXC3"),
        hostile(open_card_by_hand(CARD), b"").map(seal_card_by_hand),
        st.floats().map(lambda issued: seal_card_by_hand(inner_card_by_hand(ec_key(BOB), issued))),
    )
)
def test_fuzz_card(value: bytes) -> None:
    """A card, mutated or cut as a whole, or a genuine sealing around a mutated inner card."""
    read_or_refuse(lambda: read_card(value, BOB.id, CARD_KEY, NOW))


@FUZZ
@given(
    per_kind(
        lambda kind: (
            hostile(SEALED[kind], b"PXD3")
            | hostile(PLAINTEXTS[kind], b"").map(
                lambda plain: seal_plaintext(plain, ROUTES[kind][2], ROUTES[kind][1])
            )
        )
    )
)
def test_fuzz_sealed(case: tuple[Kind, bytes]) -> None:
    """A sealed value, mutated or cut as a whole, or genuine HPKE around a mutated plaintext."""
    kind, value = case
    sender, recipient, key = ROUTES[kind]
    read_or_refuse(lambda: unseal(value, recipient, key, frozenset({sender.id})))


def edited(genuine: bytes, replaced: dict[str, object], removed: set[str]) -> bytes:
    content = json.loads(genuine) | replaced
    return json.dumps({name: value for name, value in content.items() if name not in removed}).encode()


def contents(kind: Kind) -> st.SearchStrategy[bytes]:
    """A letter's content, mutated as bytes or with fields replaced and removed; or any JSON at all."""
    genuine = letter(kind).encode()
    edits = st.tuples(
        st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUE, max_size=3),
        st.sets(st.sampled_from(FIELDS), max_size=2),
    )
    anything = JSON.map(lambda value: json.dumps(value).encode())
    return hostile(genuine, b"{") | edits.map(lambda edit: edited(genuine, *edit)) | anything


@FUZZ
@given(per_kind(contents), st.sampled_from(list(ROUTES)))
def test_fuzz_signed_content_through_the_screen(case: tuple[Kind, bytes], expected: Kind) -> None:
    """Content the pinned peer signed, however odd: unsealed and screened as the mediator does."""
    kind, content = case
    sender, recipient, key = ROUTES[kind]

    def take() -> None:
        got, _ = unseal(seal_by_hand(content, key, sender, recipient), recipient, key, frozenset({sender.id}))
        if got.rebind is None:
            Screen().admit(got, expected, NOW, 3)
            return
        rebinds = Rebinds()  # as the mediator hands a rebind over: to the session it names
        with rebinds.expect(REBIND_KEY):
            rebinds.admit(got.rebind, NOW)

    read_or_refuse(take)


# The mediator's listen loop


class FakeNode:
    """A _Node that delivers given values under whatever key is listened to, and finds nothing earlier."""

    def __init__(self, values: list[bytes]) -> None:
        self.values = values

    def listen(self, key: str, into: asyncio.Queue[tuple[str, bytes]]) -> None:
        for value in self.values:
            into.put_nowait((key, value))

    def forget(self, key: str) -> None:
        pass

    def get(self, key: str) -> dhtnode._Search:
        search = dhtnode._Search(asyncio.Queue())
        search.values.put_nowait(None)
        return search


def joined(me: Identity, peer: Identity, values: list[bytes]) -> dhtnode.DhtMediator:
    """A mediator on a FakeNode, as if it had joined the DHT."""
    mediator = dhtnode.DhtMediator(DhtConfig(me, Roster.of(Peer(peer.id, identity=peer.id)), ()))
    mediator._node = FakeNode(values)  # type: ignore[assignment]
    mediator._joined = asyncio.get_running_loop().create_future()
    mediator._joined.set_result(None)
    return mediator


def ignored(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """The values logged as ignored: (level, message); and none was logged with a traceback."""
    assert all(record.exc_info is None for record in caplog.records)
    return [(r.levelname, r.getMessage()) for r in caplog.records if "ignoring a value" in r.getMessage()]


async def test_no_value_stops_the_acceptors_listen(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A value whose checking raises anything, a bug included, costs one log line; the next one is served."""
    now = datetime.datetime.now(datetime.UTC)
    key = key_text("request", BOB.id, day_of(now))
    genuine = seal(letter("request", 9, key=key, issued=now), ALICE, public(BOB))

    def buggy(value: bytes, *args: Any) -> tuple[Letter, ec.EllipticCurvePublicKey]:
        if value == b"PXD3 boom":
            raise IndexError("a bug\nover two lines")
        return unseal(value, *args)

    monkeypatch.setattr(dht, "unseal", buggy)
    mediator = joined(BOB, ALICE, [b"garbage", b"PXD3 boom", genuine])
    with caplog.at_level("DEBUG", logger="plexus.mediator.dhtnode"):
        requests = cast(AsyncGenerator[Invitation], mediator.requests())
        invitation = await asyncio.wait_for(anext(requests), 5)
        await requests.aclose()
    assert invitation.offer.puzzle == 9
    assert invitation.offer.signer is not None and id_of(invitation.offer.signer) == ALICE.id  # binds the key
    (first, _), (second, message) = ignored(caplog)
    assert (first, second) == ("DEBUG", "WARNING")
    assert "IndexError 'a bug\\nover two lines'" in message


async def test_no_card_stops_the_look_for_the_peers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    key = key_text("card", ALICE.id, day_of(now))

    def buggy(value: bytes, *args: Any) -> ec.EllipticCurvePublicKey:
        if value == b"PXC3 boom":
            raise OverflowError("a bug")
        return read_card(value, *args)

    monkeypatch.setattr(dht, "read_card", buggy)
    mediator = joined(BOB, ALICE, [make_card(EVE, key, now), b"PXC3 boom", make_card(ALICE, key, now)])
    with caplog.at_level("DEBUG", logger="plexus.mediator.dhtnode"):
        found = await mediator._peer_card(asyncio.get_running_loop().time() + 5)
    assert id_of(found) == ALICE.id
    assert [level for level, _ in ignored(caplog)] == ["DEBUG", "WARNING"]


# The node's listens and opendht's binding


async def test_cancelling_a_listen_releases_its_own_callbacks_and_no_other() -> None:
    """opendht's cancelListen drops a reference to the newest listen's callbacks, not the cancelled one's
    (a dict shared by every token); _Node.forget puts the right one there first. A real runner, bound to a
    port of its own and joined to no one, so nothing leaves this host."""
    node = dhtnode._Node(cast(dhtnode.DhtConfig, None))
    node._runner.run(port=0)
    try:
        into: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        node.listen("a", into)
        node.listen("b", into)
        first, second = node._tokens["a"][1], node._tokens["b"][1]
        held = sys.getrefcount(first), sys.getrefcount(second)
        node.forget("a")
        node.listen("c", into)  # takes the shared dict's place from the second
        # The first lost the binding's own reference and its token's; the second only the shared dict's.
        assert (sys.getrefcount(first), sys.getrefcount(second)) == (held[0] - 2, held[1] - 1)
    finally:
        await node.stop()


# One acceptor, many peers


class StoringNode(FakeNode):
    """A FakeNode that also keeps what is put."""

    def __init__(self, values: list[bytes]) -> None:
        super().__init__(values)
        self.stored: list[tuple[str, bytes]] = []

    async def put(self, key: str, data: bytes, *, permanent: bool = False) -> bool:
        self.stored.append((key, data))
        return True


async def test_an_acceptor_serves_each_of_its_peers_and_answers_each_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    carol = new_identity()
    now = datetime.datetime.now(datetime.UTC)
    key = key_text("request", BOB.id, day_of(now))

    def request(sender: Identity, puzzle: int) -> bytes:
        return seal(letter("request", puzzle, key=key, issued=now, sender=sender.id), sender, public(BOB))

    node = StoringNode([request(ALICE, 9), request(EVE, 10), request(carol, 11)])
    roster = Roster.of(Peer("alice", identity=ALICE.id), Peer("carol", identity=carol.id))
    mediator = dhtnode.DhtMediator(DhtConfig(BOB, roster, ()))
    mediator._node = node  # type: ignore[assignment]
    mediator._joined = asyncio.get_running_loop().create_future()
    mediator._joined.set_result(None)
    with caplog.at_level("DEBUG", logger="plexus.mediator.dhtnode"):
        requests = cast(AsyncGenerator[Invitation], mediator.requests())
        first = await asyncio.wait_for(anext(requests), 5)
        second = await asyncio.wait_for(anext(requests), 5)
        await requests.aclose()
    assert [(i.peer.name, i.offer.puzzle) for i in (first, second)] == [("alice", 9), ("carol", 11)]
    assert first.offer.signer is not None and id_of(first.offer.signer) == ALICE.id
    assert second.offer.signer is not None and id_of(second.offer.signer) == carol.id
    assert ignored(caplog) == [] and f"from {EVE.id}: not a peer of this host" in caplog.text

    await mediator.answer(second, replace(OFFER, puzzle=21))
    await mediator.answer(first, replace(OFFER, puzzle=20))
    await asyncio.gather(*mediator._puts)
    answered: dict[str, set[tuple[str, int | None]]] = {}
    for stored_key, value in node.stored:
        for peer in (ALICE, carol):
            with contextlib.suppress(dht.DhtMessageError):
                response, _ = unseal(value, peer, stored_key, frozenset({BOB.id}))
                answered.setdefault(peer.id, set()).add((stored_key, response.answers))
    # Each response under its own peer's key (each sending day's), readable by that peer alone.
    assert answered == {
        peer.id: {(key_text("response", peer.id, day), puzzle) for day in sending_days(dhtnode._now())}
        for peer, puzzle in ((ALICE, 9), (carol, 11))
    }
    assert len(node.stored) == sum(len(found) for found in answered.values())
