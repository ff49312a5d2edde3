r"""The OpenDHT rendezvous, sans I/O: where values live, cards, sealed letters, and which letters to take.

Keys. A value lives under the InfoHash of a key text `plexus/3/<family>/<host id>/<YYYY-MM-DD>` (UTC day; the
driver hashes it). The card and requests live under the acceptor's id, responses and refusals under
the inviter's (family "response"). A listener watches its own today; a sender puts under its today and,
within the clock tolerance of midnight, under the day on the other side too, so skew loses nothing. Keys
roll daily so that presence cannot be followed under one fixed key by anyone who does not know the id.
docs/dht.md says what an observer of the DHT learns and what it does not. The 3 of the key texts is in every
magic and context below: values of an older layout neither decrypt nor verify.

Card: a host's public key, so that a peer that knows the id can encrypt to it; sealed under a key that
follows from the id and the key text, so that only those who know the id can read it (or tell whose it is).
Republished daily.
    b"PXC3" | nonce (12) | AES-256-GCM ciphertext and tag of the inner card, AAD b"PXC3"
    AES key: HKDF-SHA256(the host id (ASCII), salt=None, info=b"plexus card v3\0" + key text (UTF-8), 32)
    inner card: u16 n | SPKI DER (n) | f64 issued (unix seconds) | u16 m | signature DER (m)
    signature: ECDSA-SHA256 by that key over b"plexus card v3\0" + key text + b"\0" + the inner card's bytes
      before the u16 m

Letter (request, response, refusal, rebind): signed by its sender, encrypted to its recipient, so that only
the recipient learns who sent it.
    b"PXD3" | HPKE (RFC 9180) base mode single-shot encryption: enc (65) | ciphertext and tag
    suite: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM; the recipient's identity key is the KEM key,
      the key text (UTF-8) the info: a value copied under another key does not decrypt
    plaintext: u16 n | sender's SPKI DER (n) | u16 m | signature DER (m) | content
    signature: ECDSA-SHA256 by the sender's identity over b"plexus dht v3\0" + key text + b"\0" + content
    content: compact UTF-8 JSON, keys sorted: v (1), kind, from and to (ids), key (the key text), issued
      (unix seconds), puzzle (a refusal's: the refused request's); outer ("ip:port") and reach
      (X-Plexus-Reach text) except in a refusal; answers (response and refusal: the request's puzzle);
      reason (refusal). A rebind (put where requests are) has v, kind, from, to, key, issued (the rebind's,
      whole seconds), outer and reach, and no puzzle: session and tag (lowercase hex), sequence
      (plexus.rendezvous.Rebind; its tag is checked by the session it names, Rebinds.admit)

Node id: a host's DHT node id for the day, 20 bytes of HKDF-SHA256(the identity's private scalar (32 bytes),
salt=None, info=b"plexus node v3\0" + YYYY-MM-DD). The same all day, so that a run from cron takes its
predecessor's place (plexus/mediator/dhtnode.py); secret, so that an id does not lead to the host's node.
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
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from plexus.endpoint import Endpoint
from plexus.identity import ID_LENGTH, Identity, id_of
from plexus.rendezvous import (
    CLOCK_TOLERANCE,
    Offer,
    Reach,
    ReachError,
    Rebind,
    RebindError,
    sanitize_reason,
)
from plexus.rendezvous import KINDS as KINDS
from plexus.rendezvous import Kind as Kind

DEFAULT_PORT = 4222  # OpenDHT's usual port (dhtnode's default)
# A card is republished daily; two days also covers the clocks of both hosts straddling midnight.
CARD_LIFETIME = datetime.timedelta(days=2)

Family = Literal["card", "request", "response"]

KEY_VERSION = 3
CARD_MAGIC = b"PXC3"
CARD_CONTEXT = b"plexus card v3\0"
SEALED_MAGIC = b"PXD3"
LETTER_CONTEXT = b"plexus dht v3\0"
NODE_CONTEXT = b"plexus node v3\0"
VERSION = 1  # of the content JSON
NONCE_BYTES = 12
TAG_BYTES = 16
NODE_ID_BYTES = 20  # an OpenDHT InfoHash
PUZZLE_LIMIT = 2**64
HPKE = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_ECDSA = ec.ECDSA(hashes.SHA256())
_ID = re.compile(rf"[a-z2-7]{{{ID_LENGTH}}}")


class DhtMessageError(ValueError):
    """Why a value read from the DHT is not taken: str(error) is logged."""


class NotAPeerError(DhtMessageError):
    """A value sealed by a key that is no peer's: `sender` is its id (the Strangers log it)."""

    def __init__(self, sender: str) -> None:
        super().__init__(f"from {sender}, not a peer of this host")
        self.sender = sender


def key_text(family: Family, host_id: str, day: datetime.date) -> str:
    return f"plexus/{KEY_VERSION}/{family}/{host_id}/{day.isoformat()}"


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


def node_id(identity: Identity, day: datetime.date) -> bytes:
    """The host's DHT node id for the day: only its private key leads to it (the module docstring)."""
    secret = _p256_key(identity).private_numbers().private_value.to_bytes(32, "big")
    info = NODE_CONTEXT + day.isoformat().encode()
    return HKDF(algorithm=hashes.SHA256(), length=NODE_ID_BYTES, salt=None, info=info).derive(secret)


def make_card(identity: Identity, key: str, now: datetime.datetime) -> bytes:
    """The card to put under the key text `key` (the identity's card key of a day)."""
    private = _p256_key(identity)
    body = _prefixed(_spki(private.public_key())) + struct.pack("!d", now.timestamp())
    inner = body + _prefixed(private.sign(_card_signed(key, body), _ECDSA))
    nonce = os.urandom(NONCE_BYTES)
    return CARD_MAGIC + nonce + _card_cipher(identity.id, key).encrypt(nonce, inner, CARD_MAGIC)


def read_card(value: bytes, expected_id: str, key: str, now: datetime.datetime) -> ec.EllipticCurvePublicKey:
    """The public key of `expected_id` from its card found under the key text `key`; DhtMessageError if the
    card does not prove it."""
    if not value.startswith(CARD_MAGIC):
        raise DhtMessageError("not a plexus card")
    head = len(CARD_MAGIC) + NONCE_BYTES
    if len(value) < head + TAG_BYTES:
        raise DhtMessageError(f"card of {len(value)} bytes is too short")
    cipher = _card_cipher(expected_id, key)
    try:
        inner = cipher.decrypt(value[len(CARD_MAGIC) : head], value[head:], CARD_MAGIC)
    except InvalidTag:
        raise DhtMessageError(f"not {expected_id}'s card (or altered, or moved from another key)") from None
    spki, at = _field(inner, 0, "card key")
    if len(inner) < at + 8:
        raise DhtMessageError("card cut short")
    (issued,) = struct.unpack_from("!d", inner, at)
    signature, end = _field(inner, at + 8, "card signature")
    if end != len(inner):
        raise DhtMessageError("bytes after the card's signature")
    public = _public_key(spki, "card")
    found = id_of(public)
    if found != expected_id:
        raise DhtMessageError(f"card of {found}, not of {expected_id}")
    try:
        public.verify(signature, _card_signed(key, inner[: at + 8]), _ECDSA)
    except InvalidSignature:
        raise DhtMessageError("bad card signature") from None
    age = now.timestamp() - issued
    if not abs(age) <= CARD_LIFETIME.total_seconds():  # `not <=`: a NaN is refused too
        raise DhtMessageError(f"card issued {age / 3600:.1f} h ago, beyond {CARD_LIFETIME.days} days")
    return public


@dataclass(frozen=True)
class Letter:
    """What one host puts on the DHT for another: its content, before sealing or after unsealing."""

    kind: Kind
    sender: str  # ids
    recipient: str
    key: str  # the key text it is put under
    issued: datetime.datetime
    puzzle: int | None  # the sender's; a refusal's is the refused request's; None in a rebind only
    offer: Offer | None = None  # None in a refusal and a rebind; its puzzle is `puzzle`, its reach required
    answers: int | None = None  # response and refusal: the puzzle of the request they answer
    reason: str | None = None  # refusal only
    rebind: Rebind | None = None  # rebind only; its issued is the letter's

    def __post_init__(self) -> None:
        """Raise DhtMessageError unless the fields fit the kind: decode() relies on this."""
        if self.kind == "rebind" or self.rebind is not None:
            self._check_rebind()
            return
        if self.puzzle is None:
            raise DhtMessageError(f"a {self.kind} without puzzle")
        for name, number in (("puzzle", self.puzzle), ("answers", self.answers)):
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
        if (self.reason is None) == refusal:
            raise DhtMessageError(f"a {self.kind} {'without' if refusal else 'with'} reason")
        if self.reason is not None:
            object.__setattr__(self, "reason", sanitize_reason(self.reason))

    def _check_rebind(self) -> None:
        if self.kind != "rebind" or self.rebind is None:
            raise DhtMessageError(f"a {self.kind} {'without' if self.rebind is None else 'with'} a rebind")
        extra = [name for name in ("puzzle", "offer", "answers", "reason") if getattr(self, name) is not None]
        if extra:
            raise DhtMessageError(f"a rebind with {', '.join(extra)}")
        if self.issued.timestamp() != self.rebind.issued:
            raise DhtMessageError("a rebind issued at another time than its letter")

    def encode(self) -> bytes:
        content: dict[str, object] = {
            "v": VERSION,
            "kind": self.kind,
            "from": self.sender,
            "to": self.recipient,
            "key": self.key,
        }
        if self.rebind is not None:
            rebind = self.rebind
            content.update(
                issued=rebind.issued,
                session=rebind.session.hex(),
                sequence=rebind.sequence,
                outer=str(rebind.outer),
                reach=rebind.reach.header(),
                tag=rebind.tag.hex(),
            )
            return _json(content)
        content.update(issued=self.issued.timestamp(), puzzle=self.puzzle)
        if self.offer is not None:
            assert self.offer.reach is not None  # __post_init__
            content["outer"] = str(self.offer.outer)
            content["reach"] = self.offer.reach.header()
        optional = {"answers": self.answers, "reason": self.reason}
        content.update((name, value) for name, value in optional.items() if value is not None)
        return _json(content)

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
        sender, recipient, key = _id(content, "from"), _id(content, "to"), _text(content, "key")
        if kind == "rebind":
            issued = _number(content, "issued")  # whole seconds: the rebind's tag covers them
            rebind = _rebind(content, issued)
            return cls(kind, sender, recipient, key, _time(issued), None, rebind=rebind)
        puzzle = _number(content, "puzzle")
        offer = None
        if kind != "refusal":
            offer = Offer(_endpoint(_text(content, "outer")), puzzle, _reach(_text(content, "reach")))
        return cls(
            kind=kind,
            sender=sender,
            recipient=recipient,
            key=key,
            issued=_time(content.get("issued")),
            puzzle=puzzle,
            offer=offer,
            answers=_number(content, "answers") if "answers" in content else None,
            reason=_text(content, "reason") if "reason" in content else None,
        )


def _json(content: dict[str, object]) -> bytes:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _rebind(content: dict[str, object], issued: int) -> Rebind:
    try:
        return Rebind.read(
            _text(content, "session"),
            _number(content, "sequence"),
            issued,
            _text(content, "outer"),
            _text(content, "reach"),
            _text(content, "tag"),
        )
    except RebindError as error:
        raise DhtMessageError(str(error)) from None


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
    return SEALED_MAGIC + HPKE.encrypt(plaintext, recipient, letter.key.encode())


def unseal(
    value: bytes, me: Identity, key_text: str, peers: frozenset[str]
) -> tuple[Letter, ec.EllipticCurvePublicKey]:
    """The letter found under key_text, from one of the pinned `peers` (their ids) to me, and its sender's
    key (to answer it).

    Raises DhtMessageError with the reason; ValueError if my identity is not a P-256 key."""
    key = _p256_key(me)
    if not value.startswith(SEALED_MAGIC):
        raise DhtMessageError("not a sealed plexus value")
    try:  # HPKE refuses everything it cannot open, a bad or missing enc included, with InvalidTag
        plaintext = HPKE.decrypt(value[len(SEALED_MAGIC) :], key, key_text.encode())
    except InvalidTag:
        raise DhtMessageError("not encrypted to this host (or altered, or moved from another key)") from None
    spki, at = _field(plaintext, 0, "sender key")
    signature, at = _field(plaintext, at, "signature")
    content = plaintext[at:]
    sender_key = _public_key(spki, "sender")
    sender = id_of(sender_key)
    if sender not in peers:
        raise NotAPeerError(sender)
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
        if letter.puzzle is None:  # a rebind, which is Rebinds.admit's to judge
            raise DhtMessageError(f"a {letter.kind} has no puzzle to screen")
        if (letter.kind, letter.puzzle) in self.seen:
            raise DhtMessageError(f"puzzle {letter.puzzle} already seen: a replay")
        if abs(letter.issued - now) > self.tolerance:
            raise DhtMessageError(
                f"issued {letter.issued:%Y-%m-%d %H:%M:%S} UTC, more than "
                f"{self.tolerance.total_seconds():g} s from now"
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


def _card_cipher(host_id: str, key: str) -> AESGCM:
    info = CARD_CONTEXT + key.encode()
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(host_id.encode()))


def _card_signed(key: str, body: bytes) -> bytes:
    return CARD_CONTEXT + key.encode() + b"\0" + body


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
    except ReachError as error:
        raise DhtMessageError(str(error)) from None
