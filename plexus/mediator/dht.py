r"""The OpenDHT rendezvous, sans I/O: where values live, cards, sealed letters, and which letters to take.

Keys. A value lives under the InfoHash of a key text `plexus/2/<family>/<host id>/<YYYY-MM-DD>` (UTC day; the
driver hashes it). The card, advent and requests live under the acceptor's id, responses and refusals under
the inviter's (family "response"). A listener watches its own today; a sender puts under its today and,
within the clock tolerance of midnight, under the day on the other side too, so skew loses nothing. Keys
roll daily so that presence cannot be followed under one fixed key by anyone who does not know the id.

Card: a host's public key, so that a peer that knows only the id can encrypt to it. Republished daily.
    b"PXC1" | u16 n | SPKI DER (n) | f64 issued (unix seconds) | u16 m | signature DER (m)
    signature: ECDSA-SHA256 by that key over b"plexus card v1\0" + every byte before the u16 m

Letter (request, response, refusal, advent): signed by its sender, encrypted to its recipient, so that only
the recipient learns who sent it. An advent is an acceptor's standing offer to a pinned inviter, renewed
every ADVENT_REFRESH seconds: a request may name its puzzle to take the fast path.
    b"PXD1" | ephemeral P-256 point (65, uncompressed) | nonce (12) | AES-256-GCM ciphertext and tag
    AES key: HKDF-SHA256(ECDH(ephemeral, recipient's identity key), salt=None, info=b"plexus dht v1", 32)
    AAD: b"PXD1" + ephemeral point + key text (UTF-8): a value copied under another key does not decrypt
    plaintext: u16 n | sender's SPKI DER (n) | u16 m | signature DER (m) | content
    signature: ECDSA-SHA256 by the sender's identity over b"plexus dht v1\0" + key text + b"\0" + content
    content: compact UTF-8 JSON, keys sorted: v (1), kind, from and to (ids), key (the key text), issued
      (unix seconds), puzzle (a refusal's: the refused request's); outer ("ip:port") and reach
      (X-Plexus-Reach text) except in a refusal; answers (response and refusal: the request's puzzle);
      advent (a request, optional: the advent's puzzle); reason (refusal)
Numbers are big-endian.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Literal

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from plexus.endpoint import Endpoint
from plexus.identity import ID_LENGTH, Identity, id_of
from plexus.mediator.message import CLOCK_TOLERANCE, MessageError, Offer, Reach, sanitize_reason

DEFAULT_PORT = 4222  # OpenDHT's usual port (dhtnode's default)
# Seconds between an acceptor's advent puts. Its STUN keepalive (every 20 s, more often than NAT mappings
# expire) is what keeps the advertised endpoint open; the advent only has to say now and then that the
# acceptor still listens there, which does not need a DHT put as often.
ADVENT_REFRESH = 60.0
# Seconds after which an advent is stale: two refreshes, so one lost or late put does not make a live
# acceptor look gone.
ADVENT_LIFETIME = 120.0
# A card is republished daily; two days also covers the clocks of both hosts straddling midnight.
CARD_LIFETIME = datetime.timedelta(days=2)

Family = Literal["card", "advent", "request", "response", "node"]  # "node": the host's DHT node id
Kind = Literal["request", "response", "refusal", "advent"]
KINDS: dict[str, Kind] = {
    "request": "request",
    "response": "response",
    "refusal": "refusal",
    "advent": "advent",
}

CARD_MAGIC = b"PXC1"
CARD_CONTEXT = b"plexus card v1\0"
SEALED_MAGIC = b"PXD1"
LETTER_CONTEXT = b"plexus dht v1\0"
HKDF_INFO = b"plexus dht v1"
VERSION = 1
POINT_BYTES = 65
NONCE_BYTES = 12
TAG_BYTES = 16
PUZZLE_LIMIT = 2**64
_ECDSA = ec.ECDSA(hashes.SHA256())
_ID = re.compile(rf"[a-z2-7]{{{ID_LENGTH}}}")


class DhtMessageError(ValueError):
    """Why a value read from the DHT is not taken: str(error) is logged."""


def key_text(family: Family, host_id: str, day: datetime.date) -> str:
    return f"plexus/2/{family}/{host_id}/{day.isoformat()}"


def day_of(now: datetime.datetime) -> datetime.date:
    return now.astimezone(datetime.UTC).date()


def sending_days(now: datetime.datetime) -> tuple[datetime.date, ...]:
    """The days (UTC) a value is put under: today, and within CLOCK_TOLERANCE of midnight the day on the
    other side too, since the listener's clock may already (or still) be there. A listener watches only its
    own today: an OpenDHT node that also listened on yesterday's and tomorrow's keys was not pushed values put
    under today's (seen with opendht 4.4.2 in the lab)."""
    today = day_of(now)
    days = [today]
    if day_of(now + CLOCK_TOLERANCE) != today:
        days.append(day_of(now + CLOCK_TOLERANCE))
    if day_of(now - CLOCK_TOLERANCE) != today:
        days.insert(0, day_of(now - CLOCK_TOLERANCE))
    return tuple(days)


def make_card(identity: Identity, now: datetime.datetime) -> bytes:
    key = _p256_key(identity)
    body = CARD_MAGIC + _prefixed(_spki(key.public_key())) + struct.pack("!d", now.timestamp())
    return body + _prefixed(key.sign(CARD_CONTEXT + body, _ECDSA))


def read_card(value: bytes, expected_id: str, now: datetime.datetime) -> ec.EllipticCurvePublicKey:
    """The public key of `expected_id` from its card; DhtMessageError if the card does not prove it."""
    if not value.startswith(CARD_MAGIC):
        raise DhtMessageError("not a plexus card")
    spki, at = _field(value, len(CARD_MAGIC), "card key")
    if len(value) < at + 8:
        raise DhtMessageError("card cut short")
    (issued,) = struct.unpack_from("!d", value, at)
    signature, end = _field(value, at + 8, "card signature")
    if end != len(value):
        raise DhtMessageError("bytes after the card's signature")
    key = _public_key(spki, "card")
    found = id_of(key)
    if found != expected_id:
        raise DhtMessageError(f"card of {found}, not of {expected_id}")
    try:
        key.verify(signature, CARD_CONTEXT + value[: at + 8], _ECDSA)
    except InvalidSignature:
        raise DhtMessageError("bad card signature") from None
    age = now.timestamp() - issued
    if not abs(age) <= CARD_LIFETIME.total_seconds():  # `not <=`: a NaN is refused too
        raise DhtMessageError(f"card issued {age / 3600:.1f} h ago, beyond {CARD_LIFETIME.days} days")
    return key


@dataclass(frozen=True)
class Letter:
    """What one host puts on the DHT for another: its content, before sealing or after unsealing."""

    kind: Kind
    sender: str  # ids
    recipient: str
    key: str  # the key text it is put under
    issued: datetime.datetime
    puzzle: int  # the sender's; a refusal's is the refused request's
    offer: Offer | None = None  # None in a refusal only; its puzzle is `puzzle`, its reach is required
    answers: int | None = None  # response and refusal: the puzzle of the request they answer
    advent: int | None = None  # request: the puzzle of the advent it takes the fast path with
    reason: str | None = None  # refusal only

    def __post_init__(self) -> None:
        """Raise DhtMessageError unless the fields fit the kind: decode() relies on this."""
        for name, number in (("puzzle", self.puzzle), ("answers", self.answers), ("advent", self.advent)):
            if number is not None and not 0 <= number < PUZZLE_LIMIT:
                raise DhtMessageError(f"{name} {str(number)[:30]} out of range")
        refusal = self.kind == "refusal"
        if (self.offer is None) != refusal:
            raise DhtMessageError(f"a {self.kind} {'carries no' if refusal else 'needs an'} offer")
        if self.offer is not None:
            if self.offer.puzzle != self.puzzle:
                raise DhtMessageError(f"offer puzzle {self.offer.puzzle} is not the puzzle {self.puzzle}")
            if self.offer.reach is None:
                raise DhtMessageError(f"a {self.kind} without reach")
        if (self.answers is None) == (self.kind in ("response", "refusal")):
            raise DhtMessageError(f"a {self.kind} {'without' if self.answers is None else 'with'} answers")
        if refusal and self.answers != self.puzzle:
            raise DhtMessageError(f"a refusal of {self.answers} with the puzzle {self.puzzle}")
        if self.advent is not None and self.kind != "request":
            raise DhtMessageError(f"a {self.kind} with advent")
        if (self.reason is None) == refusal:
            raise DhtMessageError(f"a {self.kind} {'without' if refusal else 'with'} reason")
        if self.reason is not None:
            object.__setattr__(self, "reason", sanitize_reason(self.reason))

    def encode(self) -> bytes:
        content: dict[str, object] = {
            "v": VERSION,
            "kind": self.kind,
            "from": self.sender,
            "to": self.recipient,
            "key": self.key,
            "issued": self.issued.timestamp(),
            "puzzle": self.puzzle,
        }
        if self.offer is not None:
            assert self.offer.reach is not None  # __post_init__
            content["outer"] = str(self.offer.outer)
            content["reach"] = self.offer.reach.header()
        optional = {"answers": self.answers, "advent": self.advent, "reason": self.reason}
        content.update((name, value) for name, value in optional.items() if value is not None)
        return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, data: bytes) -> Letter:
        try:  # UnicodeDecodeError and JSONDecodeError are ValueErrors; deep nesting is a RecursionError
            content = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as error:
            raise DhtMessageError(f"content is not JSON: {error}"[:120]) from None
        if not isinstance(content, dict):
            raise DhtMessageError("content is not a JSON object")
        version = content.get("v")
        if type(version) is not int or version != VERSION:  # neither True nor 1.0
            raise DhtMessageError(f"unsupported content version {str(version)[:20]!r}")
        kind_text = _text(content, "kind")
        kind = KINDS.get(kind_text)
        if kind is None:
            raise DhtMessageError(f"unknown kind {kind_text[:20]!r}")
        puzzle = _number(content, "puzzle")
        offer = None
        if kind != "refusal":
            offer = Offer(_endpoint(_text(content, "outer")), puzzle, _reach(_text(content, "reach")))
        return cls(
            kind=kind,
            sender=_id(content, "from"),
            recipient=_id(content, "to"),
            key=_text(content, "key"),
            issued=_time(content.get("issued")),
            puzzle=puzzle,
            offer=offer,
            answers=_number(content, "answers") if "answers" in content else None,
            advent=_number(content, "advent") if "advent" in content else None,
            reason=_text(content, "reason") if "reason" in content else None,
        )


def seal(letter: Letter, sender: Identity, recipient: ec.EllipticCurvePublicKey) -> bytes:
    """The value to put under letter.key. ValueError if the keys do not fit the letter."""
    key = _p256_key(sender)
    if not isinstance(recipient.curve, ec.SECP256R1):
        raise ValueError("the recipient's key is not P-256")
    # The recipient checks both: a letter sealed otherwise would only be dropped there.
    if letter.sender != sender.id or letter.recipient != id_of(recipient):
        raise ValueError(f"the letter from {letter.sender} to {letter.recipient} is not for these keys")
    content = letter.encode()
    signature = key.sign(_letter_signed(letter.key, content), _ECDSA)
    plaintext = _prefixed(_spki(key.public_key())) + _prefixed(signature) + content
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    nonce = os.urandom(NONCE_BYTES)
    cipher = AESGCM(_aes_key(ephemeral.exchange(ec.ECDH(), recipient)))
    return SEALED_MAGIC + point + nonce + cipher.encrypt(nonce, plaintext, _aad(point, letter.key))


def unseal(
    value: bytes, me: Identity, key_text: str, peer_id: str
) -> tuple[Letter, ec.EllipticCurvePublicKey]:
    """The letter found under key_text, from the pinned peer_id to me, and its sender's key (to answer it).

    Raises DhtMessageError with the reason; ValueError if my identity is not a P-256 key."""
    key = _p256_key(me)
    head = len(SEALED_MAGIC) + POINT_BYTES + NONCE_BYTES
    if not value.startswith(SEALED_MAGIC):
        raise DhtMessageError("not a sealed plexus value")
    if len(value) < head + TAG_BYTES:
        raise DhtMessageError(f"sealed value of {len(value)} bytes is too short")
    point = value[len(SEALED_MAGIC) : len(SEALED_MAGIC) + POINT_BYTES]
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise DhtMessageError("bad ephemeral key") from None
    cipher = AESGCM(_aes_key(key.exchange(ec.ECDH(), ephemeral)))
    try:
        plaintext = cipher.decrypt(value[head - NONCE_BYTES : head], value[head:], _aad(point, key_text))
    except InvalidTag:
        raise DhtMessageError("not encrypted to this host (or altered, or moved from another key)") from None
    spki, at = _field(plaintext, 0, "sender key")
    signature, at = _field(plaintext, at, "signature")
    content = plaintext[at:]
    sender_key = _public_key(spki, "sender")
    sender = id_of(sender_key)
    if sender != peer_id:
        raise DhtMessageError(f"from {sender}, not the pinned peer")
    try:
        sender_key.verify(signature, _letter_signed(key_text, content), _ECDSA)
    except InvalidSignature:
        raise DhtMessageError("bad signature") from None
    letter = Letter.decode(content)
    if letter.recipient != me.id:
        raise DhtMessageError(f"to {letter.recipient}, not this host")
    if letter.sender != sender:
        raise DhtMessageError(f"says it is from {letter.sender}, but {sender} signed it")
    if letter.key != key_text:
        raise DhtMessageError(f"written for {letter.key[:100]!r}, found under {key_text!r}")
    return letter, sender_key


def fresh_advent(letter: Letter, now: datetime.datetime) -> bool:
    """An advent its acceptor still renews: issued at most ADVENT_LIFETIME ago. One from a clock ahead of ours
    passes: Screen.admit bounds that by its tolerance."""
    return letter.kind == "advent" and now - letter.issued <= datetime.timedelta(seconds=ADVENT_LIFETIME)


@dataclass
class Screen:
    """Decides which letters start a session: the right kind, fresh, never seen before."""

    tolerance: datetime.timedelta = CLOCK_TOLERANCE
    seen: set[tuple[Kind, int]] = field(default_factory=set)

    def admit(self, letter: Letter, kind: Kind, now: datetime.datetime, request: int | None = None) -> None:
        """Raise DhtMessageError if the letter must be ignored; otherwise remember its puzzle.

        Waiting for a response to our request (request: its puzzle), a refusal of that puzzle answers it too.
        A response or refusal is taken only for `request`: nothing else binds it to a request of ours."""
        answers = kind == "response" and request is not None and letter.kind == "refusal"
        if letter.kind != kind and not answers:
            raise DhtMessageError(f"expected a {kind}, got a {letter.kind}")
        if letter.kind in ("response", "refusal") and letter.answers != request:
            raise DhtMessageError(f"answers the request {letter.answers}, not ours ({request})")
        if (letter.kind, letter.puzzle) in self.seen:
            raise DhtMessageError(f"puzzle {letter.puzzle} already seen: a replay")
        if abs(letter.issued - now) > self.tolerance:
            raise DhtMessageError(
                f"issued {letter.issued:%Y-%m-%d %H:%M:%S} UTC, more than "
                f"{self.tolerance.total_seconds():g} s from now"
            )
        if letter.kind == "advent" and not fresh_advent(letter, now):
            raise DhtMessageError(
                f"advent issued {(now - letter.issued).total_seconds():.0f} s ago: stale after "
                f"{ADVENT_LIFETIME:g} s"
            )
        self.seen.add((letter.kind, letter.puzzle))


def _p256_key(identity: Identity) -> ec.EllipticCurvePrivateKey:
    key = identity.key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the DHT rendezvous needs a P-256 identity key (an RSA S/MIME key cannot do ECDH)")
    return key


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _public_key(spki: bytes, whose: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm):
        raise DhtMessageError(f"unreadable {whose} key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise DhtMessageError(f"the {whose} key is not P-256")
    return key


def _prefixed(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _field(data: bytes, at: int, what: str) -> tuple[bytes, int]:
    """The u16-length-prefixed field at `at`, and where the next one starts."""
    if len(data) < at + 2:
        raise DhtMessageError(f"{what} cut short")
    (length,) = struct.unpack_from("!H", data, at)
    end = at + 2 + length
    if len(data) < end:
        raise DhtMessageError(f"{what} cut short")
    return data[at + 2 : end], end


def _aes_key(shared: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(shared)


def _aad(point: bytes, key: str) -> bytes:
    return SEALED_MAGIC + point + key.encode()


def _letter_signed(key: str, content: bytes) -> bytes:
    return LETTER_CONTEXT + key.encode() + b"\0" + content


def _text(content: dict[str, object], name: str) -> str:
    value = content.get(name)
    if not isinstance(value, str):
        raise DhtMessageError(f"{name} missing or not a string")
    return value


def _id(content: dict[str, object], name: str) -> str:
    value = _text(content, name)
    if not _ID.fullmatch(value):
        raise DhtMessageError(f"{name} {value[:40]!r} is not a plexus id")
    return value


def _number(content: dict[str, object], name: str) -> int:
    value = content.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DhtMessageError(f"{name} missing or not an integer")
    return value  # its range is Letter's to check


def _time(value: object) -> datetime.datetime:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DhtMessageError("issued missing or not a number of seconds")
    try:
        return datetime.datetime.fromtimestamp(value, datetime.UTC)
    except (OverflowError, OSError, ValueError):  # NaN is a ValueError; infinities and huge ints overflow
        raise DhtMessageError(f"issued {str(value)[:30]} out of range") from None


def _endpoint(text: str) -> Endpoint:
    try:
        outer = Endpoint.parse(text)
        address = ipaddress.ip_address(outer.host)
    except ValueError:
        raise DhtMessageError(f"bad outer endpoint {text[:60]!r}") from None
    if not outer.port:
        raise DhtMessageError("outer port 0")
    return Endpoint(str(address), outer.port)


def _reach(text: str) -> Reach:
    try:
        return Reach.parse(text)
    except MessageError as error:
        raise DhtMessageError(str(error)) from None
