"""The rendezvous mail, sans I/O: body format, headers, reading, freshness."""

from __future__ import annotations

import datetime
import email
import email.policy
import re
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from plexus.endpoint import Endpoint
from plexus.identity import id_of
from plexus.mediator import smime
from plexus.mediator.message import (
    CLOCK_TOLERANCE,
    IDENTITY_HEADER,
    MAX_MESSAGE,
    NO_REASON,
    REASON_LIMIT,
    Letter,
    MessageError,
    Offer,
    Reach,
    Refusal,
    Route,
    Screen,
    build,
    format_body,
    in_reply_to_of,
    message_id_of,
    parse_body,
    parse_headers,
    read,
    sanitize_reason,
)
from plexus.rendezvous import ReachError, RebindError, RebindKey, Rebinds
from tests.fuzz import FUZZ
from tests.unit.test_smime import Pki, mutate, pki  # noqa: F401 (pki: the fixture)

NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)
ALICE = Route("Alice@Example.org", "bob@example.org", "host-a")
OFFER = Offer(Endpoint("198.51.100.2", 40000), 2**64 - 1)


def letter(kind: str = "request", puzzle: int = 1, **changes: Any) -> Letter:
    fields: dict[str, object] = {
        "kind": kind,
        "offer": None if kind == "refusal" else Offer(Endpoint("198.51.100.2", 40000), puzzle),
        "refusal": Refusal(puzzle, "busy") if kind == "refusal" else None,
        "message_id": "<r@example.org>",
        "in_reply_to": None,
        "date": NOW,
    }
    fields.update(changes)
    return Letter(**fields)  # type: ignore[arg-type]


def test_body_is_the_2_2_line() -> None:
    assert format_body("request", OFFER) == "PLEXUS 2.1 request 198.51.100.2 40000 18446744073709551615"
    assert parse_body("PLEXUS 2.1 response 203.0.113.5 1 0\r\n") == (
        "response",
        Offer(Endpoint("203.0.113.5", 1), 0),
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "PLEXUS 2.1 request 1.2.3.4 5",
        "PLEXUS 2.2 request 1.2.3.4 5 6",
        "PLEXUS 2.1 invite 1.2.3.4 5 6",
        "PLEXUS 2.1 request host.example 5 6",
        "PLEXUS 2.1 request 1.2.3.4 0 6",
        "PLEXUS 2.1 request 1.2.3.4 65536 6",
        "PLEXUS 2.1 request 1.2.3.4 5 18446744073709551616",
        "PLEXUS 2.1 request 1.2.3.4 5 -1",
        "PLEXUS 2.1 request 1.2.3.4 \u0665 6",
        "plexus 2.1 request 1.2.3.4 5 6",
        "PLEXUS 2.1 request 1.2.3.4 5 6 7",
        "PLEXUS 2.1 refusal",
        "PLEXUS 2.1 refusal 18446744073709551616 too big",
        "PLEXUS 2.1 refusal -1 negative",
        "PLEXUS 2.1 refusal busy",
        "PLEXUS 2.1 Refusal 1 busy",
    ],
)
def test_bad_bodies_are_rejected(text: str) -> None:
    with pytest.raises(MessageError):
        parse_body(text)


@given(st.text())
def test_any_text_gives_an_offer_or_a_clean_rejection(text: str) -> None:
    try:
        kind, content = parse_body(text)
    except MessageError:
        return
    if isinstance(content, Refusal):
        assert kind == "refusal" and 0 <= content.puzzle < 2**64
        assert content.reason == sanitize_reason(content.reason)
        return
    assert kind in ("request", "response")
    assert 0 < content.outer.port < 65536 and 0 <= content.puzzle < 2**64


@given(
    st.sampled_from(["request", "response"]),
    st.ip_addresses(v=4).map(str),
    st.integers(1, 65535),
    st.integers(0, 2**64 - 1),
)
def test_body_round_trip(kind: str, host: str, port: int, puzzle: int) -> None:
    offer = Offer(Endpoint(host, port), puzzle)
    assert parse_body(format_body(kind, offer)) == (kind, offer)  # type: ignore[arg-type]


def test_request_headers_and_round_trip() -> None:
    raw = build("request", OFFER, ALICE, message_id="<1@example.org>", date=NOW)
    headers = parse_headers(raw)
    assert headers["From"] == "Alice@Example.org"
    assert headers["To"] == "bob@example.org"
    assert headers["Subject"] == "host-a"
    assert headers["Message-ID"] == "<1@example.org>"
    assert headers["In-Reply-To"] is None
    assert email.utils.parsedate_to_datetime(headers["Date"]) == NOW
    assert read(raw, None) == Letter("request", OFFER, "<1@example.org>", None, NOW)


def test_response_names_the_request() -> None:
    raw = build("response", OFFER, ALICE, message_id="<2@x>", date=NOW, in_reply_to="<1@example.org>")
    assert read(raw, None).in_reply_to == "<1@example.org>"


def test_every_line_fits_smtp() -> None:
    route = Route("a@example.org", "b@example.org", "h" * 1500)
    raw = build("request", OFFER, route, message_id="<1@x>", date=NOW)
    assert raw.endswith(b"\r\n") and b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert route.matches(parse_headers(raw))


def test_mail_from_plexus_2_2_is_read() -> None:
    raw = b"From: a@x\r\nTo: b@x\r\nSubject: host-a\r\n\r\nPLEXUS 2.1 request 198.51.100.2 40000 7\r\n"
    assert read(raw, None) == Letter("request", Offer(Endpoint("198.51.100.2", 40000), 7), None, None, None)


def test_route_matching() -> None:
    def headers(sender: str, recipient: str, subject: str) -> email.message.Message:
        return email.message_from_string(f"From: {sender}\nTo: {recipient}\nSubject: {subject}\n\n")

    incoming = Route("peer@example.org", "me@example.org", "peer-host")
    assert incoming.matches(headers("Peer <PEER@example.org>", "me@Example.org", "peer-host"))
    assert incoming.matches(headers("peer@example.org", "x@y, me@example.org", "peer-host"))
    assert not incoming.matches(headers("peer@example.org", "me@example.org", "peer-host2"))
    assert not incoming.matches(headers("peer@example.org", "me@example.org", "Peer-host"))
    assert not incoming.matches(headers("evil@example.org", "me@example.org", "peer-host"))
    assert not incoming.matches(headers("peer@example.org, evil@x", "me@example.org", "peer-host"))
    assert not incoming.matches(headers("peer@example.org", "other@example.org", "peer-host"))
    assert not incoming.matches(email.message_from_string("Subject: peer-host\n\n"))
    assert not incoming.matches(headers("peer@example.org", "me@example.org", "=?x-unknown?q?peer-host?="))
    assert incoming.matches(headers("peer@example.org", "me@example.org", "=?utf-8?q?peer-host?="))


def test_non_ascii_subject_round_trips() -> None:
    route = Route("a@example.org", "b@example.org", "hôte-ä")
    raw = build("request", OFFER, route, message_id="<1@x>", date=NOW)
    raw.decode("ascii")
    assert route.matches(parse_headers(raw))


def test_screen_admits_fresh_letters_once() -> None:
    screen = Screen()
    screen.admit(letter(), "request", NOW)
    with pytest.raises(MessageError, match="replay"):
        screen.admit(letter(), "request", NOW)
    screen.admit(letter(puzzle=2, date=None), "request", NOW)  # plexus 2.2 sends no Date


def test_screen_rejects_wrong_kind() -> None:
    with pytest.raises(MessageError, match="expected a request"):
        Screen().admit(letter("response"), "request", NOW)


@pytest.mark.parametrize("field", ["date", "signing_time"])
@pytest.mark.parametrize("offset", [-CLOCK_TOLERANCE * 2, CLOCK_TOLERANCE * 2])
def test_screen_rejects_old_and_future_times(field: str, offset: datetime.timedelta) -> None:
    with pytest.raises(MessageError, match="from now"):
        changes: dict[str, Any] = {field: NOW + offset}
        Screen().admit(letter(**changes), "request", NOW)


def test_screen_ties_a_response_to_its_request() -> None:
    screen = Screen()
    with pytest.raises(MessageError, match="not our request"):
        screen.admit(letter("response", in_reply_to="<old@x>"), "response", NOW, reply_to="<new@x>")
    screen.admit(letter("response", in_reply_to="<new@x>"), "response", NOW, reply_to="<new@x>")
    screen.admit(letter("response", puzzle=3), "response", NOW, reply_to="<new@x>")  # 2.2: no In-Reply-To


def test_unreadable_date_is_rejected() -> None:
    raw = b"From: a@x\r\nTo: b@x\r\nSubject: s\r\nDate: yesterday\r\n\r\nPLEXUS 2.1 request 1.2.3.4 5 6\r\n"
    with pytest.raises(MessageError, match="Date"):
        read(raw, None)


def test_smime_mail_without_keys_is_rejected() -> None:
    raw = (
        b"From: a@x\r\nTo: b@x\r\nSubject: s\r\nContent-Type: application/pkcs7-mime\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n"
    )
    with pytest.raises(MessageError, match="no --smime"):
        read(raw, None)


# ---- hostile mail ------------------------------------------------------------------------------------------

PEER = Route("peer@example.org", "me@example.org", "peer-host")  # the incoming route of the fuzzed acceptor
REBIND_KEY = RebindKey.derive(7, 8)  # the session the fuzzed acceptor expects rebinds of
REBIND = REBIND_KEY.seal(1, Endpoint("198.51.100.2", 40001), Reach("independent"), NOW)
PEER_KEY = ec.generate_private_key(ec.SECP256R1())
PEER_ID = id_of(PEER_KEY.public_key())


def receive(raw: bytes, keys: smime.Keys | None = None, pinned: str | None = None) -> Letter | None:
    """What the Mediator does with a fetched message, without I/O: headers, route, read, screen. Only the
    modules' own rejections may come out (the caller lets MessageError and SmimeError through)."""
    headers = parse_headers(raw)
    message_id_of(headers), in_reply_to_of(headers)
    PEER.matches(headers)  # read regardless: a forged route is anyone's to write
    letter = read(raw, keys, pinned)
    if letter.rebind is not None:  # handed to the session it names
        rebinds = Rebinds()
        with rebinds.expect(REBIND_KEY):
            rebinds.admit(letter.rebind, NOW)
        return letter
    Screen().admit(
        letter, letter.kind if letter.kind != "refusal" else "response", NOW, request=letter.puzzle
    )
    return letter


def receive_or_reject(raw: bytes, keys: smime.Keys | None = None, pinned: str | None = None) -> Letter | None:
    try:
        return receive(raw, keys, pinned)
    except (MessageError, smime.SmimeError, RebindError):
        return None


def headers_of(subject: bytes, sender: bytes = b"peer@example.org") -> bytes:
    return b"From: " + sender + b"\r\nTo: me@example.org\r\nSubject: " + subject + b"\r\n"


def nested(depth: int, head: bytes = headers_of(b"peer-host")) -> bytes:
    """A message of `depth` multiparts, each the only part of the one around it."""
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (level, level)
        for level in range(depth)
    )
    return head + opening + b"Content-Type: text/plain\r\n\r\nPLEXUS 2.1 request 1.2.3.4 5 6\r\n"


@pytest.mark.parametrize(
    "subject", [b"=?utf-8?b?a?=", b"peer-host =?utf-8?b?a?=", b"=?utf-8?q?=ZZ?=", b"=?utf-8?b?"]
)
@pytest.mark.parametrize("sender", [b"peer@example.org", b"stranger@example.net"])
def test_a_broken_encoded_word_is_not_the_route(subject: bytes, sender: bytes) -> None:
    """Route matching never raises: a Subject that cannot be decoded is not the peer's (docs: Trust model)."""
    raw = headers_of(subject, sender) + b"\r\nPLEXUS 2.1 request 1.2.3.4 5 6\r\n"
    assert not PEER.matches(parse_headers(raw))


def test_a_broken_encoded_word_in_the_sender_s_name_leaves_the_route() -> None:
    raw = (
        headers_of(b"peer-host", b"=?utf-8?b?a?= <peer@example.org>")
        + b"\r\nPLEXUS 2.1 request 1.2.3.4 5 6\r\n"
    )
    assert PEER.matches(parse_headers(raw))
    assert receive(raw) is not None


@pytest.mark.parametrize("depth", [9, 100, 1000])
def test_deep_mime_nesting_is_rejected_before_parsing(depth: int) -> None:
    raw = nested(depth)
    with pytest.raises(MessageError, match="multipart or message entities"):
        receive(raw)


def test_mime_within_bounds_is_read() -> None:
    assert receive(nested(3)) is not None


def test_many_parts_are_rejected_before_parsing() -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(200))
    raw = (
        headers_of(b"peer-host") + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"
    )
    with pytest.raises(MessageError, match="boundary lines"):
        receive(raw)


def test_a_message_over_the_size_limit_is_rejected_unparsed() -> None:
    raw = headers_of(b"peer-host") + b"\r\nPLEXUS 2.1 request 1.2.3.4 5 6\r\n"
    assert receive(raw + b"x" * (MAX_MESSAGE - len(raw))) is not None
    with pytest.raises(MessageError, match="over the 65536-octet limit"):
        receive(raw + b"x" * (MAX_MESSAGE - len(raw) + 1))


# ---- the identity signature (--identity, --peer-identity) --------------------------------------------------

SIGNED_OFFER = Offer(
    Endpoint("2001:db8::1", 40000), 2**64 - 1, Reach("dependent", Endpoint("203.0.113.9", 3479))
)


def signed(kind: str = "request", **changes: Any) -> bytes:
    content: Offer | Refusal = Refusal(9, "busy") if kind == "refusal" else SIGNED_OFFER
    fields: dict[str, Any] = {"message_id": "<1@example.org>", "date": NOW, "signer": PEER_KEY}
    fields.update(changes)
    return build(kind, content, ALICE, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["request", "response", "refusal"])
def test_signed_mail_is_read_with_the_pin(kind: str) -> None:
    raw = signed(kind, in_reply_to=None if kind == "request" else "<0@example.org>")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78  # folded between words, no RFC 2047
    assert read(raw, None, PEER_ID) == read(raw, None)  # the signature changes nothing that is read
    offer = read(raw, None, PEER_ID).offer
    if offer is not None:  # the handshake's key is bound to the signer's key (puncher.Authenticated.derive)
        assert offer.signer is not None
        assert offer.signer.public_numbers() == PEER_KEY.public_key().public_numbers()
        assert read(raw, None).offer.signer is None  # type: ignore[union-attr]


def test_signed_mail_with_smime(pki: Pki) -> None:  # noqa: F811 (the fixture)
    raw = signed("response", keys=pki.keys(pki.alice, pki.bob), in_reply_to="<0@x>")
    letter = read(raw, pki.keys(pki.bob, pki.alice), PEER_ID)
    assert (letter.offer, letter.in_reply_to) == (SIGNED_OFFER, "<0@x>")


def test_unsigned_mail_is_refused_with_a_pin() -> None:
    raw = signed(signer=None)
    assert read(raw, None).offer == SIGNED_OFFER
    with pytest.raises(MessageError, match="no X-Plexus-Identity signature"):
        read(raw, None, PEER_ID)


def test_another_key_is_refused() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(MessageError, match=f"signed by {id_of(other.public_key())}, not the pinned peer"):
        read(signed(signer=other), None, PEER_ID)


def replace_header(raw: bytes, name: bytes, value: bytes) -> bytes:
    """The raw message with one header's (folded) value replaced, or the header added if missing."""
    pattern = re.compile(rb"^" + re.escape(name) + rb":.*?\r\n(?![ \t])", re.M | re.S | re.I)
    if pattern.search(raw):
        return pattern.sub(lambda _: name + b": " + value + b"\r\n", raw, count=1)
    return name + b": " + value + b"\r\n" + raw


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"From", b"Alice@Example.org, mallory@example.net"),
        (b"To", b"mallory@example.net"),
        (b"Subject", b"host-b"),
        (b"Date", b"Sun, 22 Nov 2026 12:01:00 +0000"),
        (b"Message-ID", b"<2@example.org>"),
        (b"In-Reply-To", b"<0@example.org>"),
        (b"X-Plexus-Reach", b"mapping=independent"),
    ],
)
def test_every_signed_header_is_covered(name: bytes, value: bytes) -> None:
    raw = signed()
    forged = replace_header(raw, name, value)
    assert forged != raw
    with pytest.raises(MessageError, match="does not verify"):
        read(forged, None, PEER_ID)


def test_the_line_is_covered() -> None:
    forged = signed().replace(b"2001:db8::1 40000", b"2001:db8::1 40001")
    with pytest.raises(MessageError, match="does not verify"):
        read(forged, None, PEER_ID)


def test_refolding_keeps_the_signature() -> None:
    raw = signed()
    refolded = raw.replace(b"\r\n ", b"\r\n\t  ").replace(b"Subject: host-a", b"Subject:   host-a")
    assert read(refolded, None, PEER_ID).offer == SIGNED_OFFER


@pytest.mark.parametrize(
    "value",
    [b"", b"garbage", b"AAAA; sig=AAAA", b"MFkw; sig=", "é".encode(), b"=?utf-8?b?a?="],
)
def test_an_unreadable_identity_header_is_refused(value: bytes) -> None:
    with pytest.raises(MessageError):
        read(replace_header(signed(), IDENTITY_HEADER.encode(), value), None, PEER_ID)


# ---- fuzzing the receiving path ---------------------------------------------------------------------------
# Hypothesis spends milliseconds drawing each structured value on this machine, so the structured inputs are
# composed from one drawn byte string instead (as libFuzzer's FuzzedDataProvider does): 10 000 of them fit
# in seconds, and shrinking still works on the bytes.

ENCODED_WORDS = [
    b"=?utf-8?b?a?=",
    b"=?utf-8?b?cGVlci1ob3N0?=",
    b"=?utf-8?q?peer-host?=",
    b"=?utf-8?q?=ZZ?=",
    b"=?x-unknown?q?a?=",
    b"=?unknown-8bit?b?/w==?=",
    b"=?utf-8*en?b?YQ==?=",
    b"=?utf-8?x?a?=",
    b"=??b??=",
    b"=?utf-8?b?",
]
# Lines (CRLF added) and pieces a message is made of: headers plexus reads, MIME structure, bodies.
FRAGMENTS = [
    b"From: peer@example.org\r\n",
    b"From: Peer <PEER@example.org>, x@y\r\n",
    b"To: me@example.org\r\n",
    b"Subject: peer-host\r\n",
    b"Subject: ",
    b"Date: Sun, 22 Nov 2026 12:00:00 +0000\r\n",
    b"Date: Mon, 99 Foo 99999 99:99:99 +9999\r\n",
    b"Message-ID: <1@example.org>\r\n",
    b"In-Reply-To: <0@example.org>\r\n",
    b"X-Plexus-Reach: mapping=dependent; relay=[2001:db8::1]:3478; streams=1\r\n",
    b"X-Plexus-Reach: mapping=independent; relay=999.1.1.1:0\r\n",
    b"X-Plexus-Identity: AAAA; sig=AAAA\r\n",
    b"MIME-Version: 1.0\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b'Content-Type: multipart/signed; boundary=c; protocol="application/pkcs7-signature"\r\n',
    b'Content-Type: multipart/digest; boundary="b"\r\n',
    b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/plain; charset=utf-8\r\n",
    b"Content-Type: text/plain; charset=x-unknown\r\n",
    b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n",
    b"Content-Type: application/pkcs7-signature\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n",
    b"--b\r\n",
    b"--b--\r\n",
    b"--c\r\n",
    b"--c--\r\n",
    b"\r\n",
    b"\r\n ",
    b" ",
    b"PLEXUS 2.1 request 198.51.100.2 40000 7\r\n",
    b"PLEXUS 2.1 response 2001:db8::1 1 18446744073709551615\r\n",
    b"PLEXUS 2.1 refusal 7 busy\r\n",
    format_body("rebind", REBIND).encode() + b"\r\n",
    format_body("rebind", REBIND).encode()[:60],
    b"UExFWFVTIDIuMSByZXF1ZXN0IDEuMi4zLjQgNSA2DQo=\r\n",
    b"PLEXUS=202.1 request 1.2.3.4 5 6=\r\n",
    b"begin 644 x\r\n",
    *ENCODED_WORDS,
]


def compose(seed: bytes) -> bytes:
    """A message from a byte string: a byte below 0xC0 picks a fragment, any other is itself (raw bytes).
    An odd first byte puts the peer's From and To first, so that half the messages can be the route's."""
    route = b"From: peer@example.org\r\nTo: me@example.org\r\n" if seed[:1] and seed[0] & 1 else b""
    return route + b"".join(FRAGMENTS[b % len(FRAGMENTS)] if b < 0xC0 else bytes([b]) for b in seed)


@FUZZ
@given(st.binary(max_size=4000))
def test_fuzz_any_bytes_are_judged_cleanly(data: bytes) -> None:
    receive_or_reject(data)


@FUZZ
@given(st.binary(max_size=120))
def test_fuzz_structured_messages_are_judged_cleanly(seed: bytes) -> None:
    """Random headers (encoded words too), random MIME trees, random bodies; with and without the pin."""
    raw = compose(seed)
    receive_or_reject(raw)
    receive_or_reject(raw, pinned=PEER_ID)


# One message for the run: ECDSA signatures vary in length, and Hypothesis wants the same input each time.
SIGNED_RESPONSE = signed("response", in_reply_to="<0@example.org>")


SIGNED_REBIND = build("rebind", REBIND, ALICE, message_id="<2@example.org>", date=NOW, signer=PEER_KEY)


@FUZZ
@given(st.sampled_from([SIGNED_RESPONSE, SIGNED_REBIND]), st.binary(min_size=4, max_size=24))
def test_fuzz_mutated_signed_mail_is_the_original_or_refused(original: bytes, program: bytes) -> None:
    """Whatever is changed in a signed message, with the pin it reads as the original said, or not at all."""
    letter = receive_or_reject(mutate(original, program, FRAGMENTS), pinned=PEER_ID)
    assert letter is None or letter == read(original, None, PEER_ID)


# ---- refusal -----------------------------------------------------------------------------------------------

# plexus 2.2 looks for its response with this pattern (its email mediator): a refusal must never match it.
RESPONSE_2_2 = re.compile(r"^PLEXUS\s+2.1\s+response\s+(\S+)\s+(\d+)\s+(\d+)$")


def test_refusal_body() -> None:
    line = format_body("refusal", Refusal(2**64 - 1, "inner port 5000 is in use"))
    assert line == "PLEXUS 2.1 refusal 18446744073709551615 inner port 5000 is in use"
    assert parse_body(line + "\r\n-- \r\nfooter\r\n") == (
        "refusal",
        Refusal(2**64 - 1, "inner port 5000 is in use"),
    )
    assert not RESPONSE_2_2.search(line)


def test_refusal_without_reason_is_read() -> None:
    assert parse_body("PLEXUS 2.1 refusal 7") == ("refusal", Refusal(7, NO_REASON))
    assert parse_body("PLEXUS  2.1\trefusal  7 \t  spaced   out  ") == ("refusal", Refusal(7, "spaced out"))


def test_kind_and_content_must_agree() -> None:
    with pytest.raises(TypeError):
        format_body("refusal", OFFER)
    with pytest.raises(TypeError):
        format_body("response", Refusal(1, "x"))


@pytest.mark.parametrize(
    ("reason", "sanitized"),
    [
        ("", NO_REASON),
        ("  \r\n\t ", NO_REASON),
        ("NAT turned\r\nsymmetric", "NAT turned symmetric"),
        ("caf\u00e9 \x1b[31mred\x00", "caf? ?[31mred?"),
        ("x" * 500, "x" * REASON_LIMIT),
        ("a" * 199 + " b", "a" * 199),  # cut at 200, then trimmed
        ("\ufffd", "?"),  # what a non-ASCII byte decodes to on receipt
    ],
)
def test_reason_is_sanitized(reason: str, sanitized: str) -> None:
    assert sanitize_reason(reason) == sanitized
    assert Refusal(1, reason).reason == sanitized


@given(st.text())
def test_any_reason_gives_one_short_printable_line(reason: str) -> None:
    clean = sanitize_reason(reason)
    assert 0 < len(clean) <= REASON_LIMIT
    assert all(" " <= c <= "~" for c in clean) and clean == clean.strip()
    assert sanitize_reason(clean) == clean
    line = format_body("refusal", Refusal(5, reason))
    assert parse_body(line) == ("refusal", Refusal(5, clean))


@given(
    st.integers(0, 2**64 - 1), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
)
def test_refusal_round_trip(puzzle: int, reason: str) -> None:
    assert parse_body(format_body("refusal", Refusal(puzzle, reason))) == ("refusal", Refusal(puzzle, reason))


@given(st.text(max_size=400).map(lambda text: "PLEXUS 2.1 refusal 9 " + text))
def test_received_reasons_are_sanitized(line: str) -> None:
    try:
        kind, content = parse_body(line)
    except MessageError:  # a line break in the text can leave the PLEXUS line without its reason: fine too
        return
    assert kind == "refusal" and isinstance(content, Refusal) and content.puzzle == 9
    assert content.reason == sanitize_reason(content.reason) and len(content.reason) <= REASON_LIMIT


def test_refusal_headers_are_a_response_s() -> None:
    raw = build(
        "refusal", Refusal(42, "busy"), ALICE, message_id="<2@example.org>", date=NOW, in_reply_to="<1@x>"
    )
    headers = parse_headers(raw)
    assert (headers["From"], headers["To"], headers["Subject"]) == (
        "Alice@Example.org",
        "bob@example.org",
        "host-a",
    )
    assert (message_id_of(headers), headers["In-Reply-To"]) == ("<2@example.org>", "<1@x>")
    assert read(raw, None) == Letter(
        "refusal", None, "<2@example.org>", "<1@x>", NOW, refusal=Refusal(42, "busy")
    )
    assert read(raw, None).puzzle == 42


def test_refusal_with_smime(pki: Pki) -> None:  # noqa: F811 (the fixture)
    raw = build(
        "refusal",
        Refusal(42, "busy"),
        ALICE,
        message_id="<2@x>",
        date=NOW,
        in_reply_to="<1@x>",
        keys=pki.keys(pki.alice, pki.bob),
    )
    assert b"PLEXUS" not in raw and b"busy" not in raw
    received = read(raw, pki.keys(pki.bob, pki.alice))
    assert (received.kind, received.refusal, received.in_reply_to) == (
        "refusal",
        Refusal(42, "busy"),
        "<1@x>",
    )
    assert received.signing_time is not None


def test_refusal_answers_our_request_only() -> None:
    screen = Screen()
    with pytest.raises(MessageError, match="another request"):
        screen.admit(letter("refusal", puzzle=8), "response", NOW, "<r@x>", request=7)
    with pytest.raises(MessageError, match="not our request"):
        screen.admit(letter("refusal", puzzle=7, in_reply_to="<old@x>"), "response", NOW, "<r@x>", request=7)
    with pytest.raises(MessageError, match="from now"):
        screen.admit(letter("refusal", puzzle=7, date=NOW - CLOCK_TOLERANCE * 2), "response", NOW, "<r@x>", 7)
    with pytest.raises(MessageError, match="from now"):
        screen.admit(
            letter("refusal", puzzle=7, signing_time=NOW + CLOCK_TOLERANCE * 2), "response", NOW, None, 7
        )
    screen.admit(letter("refusal", puzzle=7, in_reply_to="<r@x>"), "response", NOW, "<r@x>", request=7)
    with pytest.raises(MessageError, match="replay"):
        screen.admit(letter("refusal", puzzle=7), "response", NOW, "<r@x>", request=7)


def test_refusal_without_in_reply_to_is_bound_by_its_puzzle() -> None:
    Screen().admit(letter("refusal", puzzle=7, message_id=None), "response", NOW, "<r@x>", request=7)


def test_refusal_is_never_taken_unasked() -> None:
    with pytest.raises(MessageError, match="expected a request"):
        Screen().admit(letter("refusal", puzzle=7), "request", NOW)
    with pytest.raises(MessageError, match="expected a response"):
        Screen().admit(letter("refusal", puzzle=7), "response", NOW, "<r@x>")  # no puzzle to bind it
    with pytest.raises(MessageError):
        Screen().admit(letter("refusal", puzzle=7), "refusal", NOW)


def test_a_refusal_and_a_response_with_one_puzzle_are_both_admitted() -> None:
    """Replay is per kind: our request's puzzle echoed in a refusal does not block a response's puzzle."""
    screen = Screen()
    screen.admit(letter("response", puzzle=7), "response", NOW, None, request=1)
    screen.admit(letter("refusal", puzzle=7), "response", NOW, None, request=7)


@pytest.mark.parametrize(
    "reach",
    [
        Reach("independent"),
        Reach("dependent", Endpoint("203.0.113.10", 49152)),
        Reach("dependent", Endpoint("2001:db8::1", 3479)),
        Reach("independent", streams=True),
        Reach("dependent", Endpoint("203.0.113.10", 49152), streams=True),
    ],
)
def test_reach_travels_in_a_header_plexus_2_2_ignores(reach: Reach) -> None:
    offer = Offer(Endpoint("198.51.100.2", 5000), 42, reach)
    route = Route("a@example.org", "b@example.org", "home")
    raw = build("request", offer, route, message_id="<1@example.org>", date=NOW)
    assert f"X-Plexus-Reach: {reach.header()}".encode() in raw
    assert b"\r\n\r\nPLEXUS 2.1 request 198.51.100.2 5000 42\r\n" in raw  # the line 2.2 reads, unchanged
    assert read(raw, None).offer == offer


def test_a_plexus_2_2_message_has_no_reach() -> None:
    offer = Offer(Endpoint("198.51.100.2", 5000), 42)
    route = Route("a@example.org", "b@example.org", "home")
    raw = build("request", offer, route, message_id="<1@example.org>", date=NOW)
    assert b"X-Plexus-Reach" not in raw
    letter = read(raw, None)
    assert letter.offer is not None and letter.offer.reach is None


@pytest.mark.parametrize(
    "header", ["mapping=sideways", "mapping=dependent; relay=nowhere", "relay=1.2.3.4:5"]
)
def test_a_bad_reach_header_is_a_reach_error(header: str) -> None:
    with pytest.raises(ReachError, match="X-Plexus-Reach"):
        Reach.parse(header)
