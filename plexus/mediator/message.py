"""The rendezvous mail, sans I/O: build a request, response or refusal, read a received one, judge it.

docs/protocol.md ("## Mail") describes the format; this module is its reference.

Every received message is hostile input (anyone can mail the mailbox, and forge the peer's From):
parse_headers, Route.matches and read take any bytes, and nothing but a MessageError or a smime.SmimeError
comes out of them (Route.matches: nothing at all). tests/unit/test_mediator_message.py fuzzes them.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import email
import email.errors
import email.header
import email.policy
import email.utils
import ipaddress
import re
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage, Message

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from plexus import identity
from plexus.endpoint import Endpoint
from plexus.mediator import smime

# Re-exported (they lived here): cli.py and older callers import them from this module.
from plexus.rendezvous import CLOCK_TOLERANCE as CLOCK_TOLERANCE
from plexus.rendezvous import KINDS as KINDS
from plexus.rendezvous import MAPPINGS as MAPPINGS
from plexus.rendezvous import NO_REASON as NO_REASON
from plexus.rendezvous import REACH_HEADER, ReachError, Rebind, RebindError
from plexus.rendezvous import REASON_LIMIT as REASON_LIMIT
from plexus.rendezvous import Kind as Kind
from plexus.rendezvous import Mapping as Mapping
from plexus.rendezvous import Offer as Offer
from plexus.rendezvous import Reach as Reach
from plexus.rendezvous import sanitize_reason as sanitize_reason

PROTOCOL = "PLEXUS"
VERSION = "2.1"  # plexus 2.2 speaks "2.1" on the wire
# plexus 2.2 matches its mail against `PLEXUS 2.1 response <ip> <port> <puzzle>`: it passes over a refusal
# or a rebind (Kind) like any other mail.
_NUMBER = re.compile(r"[0-9]{1,20}")
_HEADER_LINE = re.compile(rb"[!-9;-~]+:")
# The largest message read, in octets. plexus's own mail weighs under 1 KiB plain and about 5 KiB with S/MIME
# (a 4096-bit RSA signer certificate included); the rest is room for an MTA's additions and longer chains.
MAX_MESSAGE = 64 * 1024
# With --identity and --peer-identity: the sender's public key and its signature over what the message says.
IDENTITY_HEADER = "X-Plexus-Identity"
_SIGNED_PREFIX = b"plexus mail identity 1\0"
_ABSENT = b"\xff\xff\xff\xff"  # a length no field can have (a message is far shorter): the header is missing


class MessageError(ValueError):
    """Why a received message is not taken: str(error) is logged."""


@dataclass(frozen=True)
class Refusal:
    """What an acceptor that cannot serve a request mails back: the request's puzzle, echoed, and why."""

    puzzle: int
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", sanitize_reason(self.reason))


@dataclass(frozen=True)
class Route:
    """Who a message is from and to, and the subject (the sender's host id) it carries."""

    sender: str
    recipient: str
    subject: str

    def matches(self, headers: Message) -> bool:
        """Exact subject; addresses compared case-insensitively (From: one address; To: among them).

        Never raises: headers that cannot be read (a broken RFC 2047 word in the Subject, say) are not the
        route's, so such a message is never read nor consumed."""
        try:
            senders = _addresses(headers, "From")
            subject = _subject(headers)
        except (ValueError, TypeError, IndexError, AttributeError, LookupError, email.errors.MessageError):
            return False
        return subject == self.subject and senders == [self.sender.lower()] and self.addressed(headers)

    def addressed(self, headers: Message) -> bool:
        """Whether the recipient is among the To addresses (case-insensitively); never raises."""
        try:
            return self.recipient.lower() in _addresses(headers, "To")
        except (ValueError, TypeError, IndexError, AttributeError, LookupError, email.errors.MessageError):
            return False


@dataclass(frozen=True)
class Letter:
    """A received PLEXUS message, read and (with S/MIME) decrypted and verified."""

    kind: Kind
    offer: Offer | None  # a request's or response's; None in a refusal or a rebind
    message_id: str | None
    in_reply_to: str | None
    date: datetime.datetime | None
    signing_time: datetime.datetime | None = None
    refusal: Refusal | None = None  # a refusal's; None otherwise
    rebind: Rebind | None = None  # a rebind's; None otherwise

    @property
    def puzzle(self) -> int:
        """The offer's puzzle; in a refusal, the refused request's."""
        if self.refusal is not None:
            return self.refusal.puzzle
        assert self.offer is not None
        return self.offer.puzzle


Content = Offer | Refusal | Rebind


def format_body(kind: Kind, content: Content) -> str:
    if kind == "refusal":
        if not isinstance(content, Refusal):
            raise TypeError("a refusal carries a Refusal")
        return f"{PROTOCOL} {VERSION} refusal {content.puzzle} {sanitize_reason(content.reason)}"
    if kind == "rebind":
        if not isinstance(content, Rebind):
            raise TypeError("a rebind carries a Rebind")
        fields = (content.session.hex(), content.sequence, content.issued, content.outer, content.tag.hex())
        return f"{PROTOCOL} {VERSION} rebind {' '.join(map(str, fields))} {content.reach.header()}"
    if not isinstance(content, Offer):
        raise TypeError(f"a {kind} carries an Offer")
    return f"{PROTOCOL} {VERSION} {kind} {content.outer.host} {content.outer.port} {content.puzzle}"


def parse_body(text: str) -> tuple[Kind, Content]:
    """The first non-empty line must be the PLEXUS line; anything after it (an MTA's footer) is ignored."""
    line = _first_line(text)
    head = line.split(maxsplit=3)
    if len(head) < 3 or head[0] != PROTOCOL:
        raise MessageError(f"not a PLEXUS line: {line[:80]!r}")
    version, kind = head[1], head[2]
    if version != VERSION:
        raise MessageError(f"unsupported PLEXUS version {version[:20]!r}")
    if kind not in KINDS:
        raise MessageError(f"unknown PLEXUS message kind {kind[:20]!r}")
    if kind == "refusal":
        return "refusal", _parse_refusal(line)
    if kind == "rebind":
        return "rebind", _parse_rebind(line)
    words = line.split()
    if len(words) != 6:
        raise MessageError(f"not a PLEXUS line: {line[:80]!r}")
    host, port, puzzle = words[3:]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise MessageError(f"bad IP address {host[:50]!r}") from None
    if not _NUMBER.fullmatch(port) or not 0 < int(port) < 65536:
        raise MessageError(f"bad port {port[:20]!r}")
    return KINDS[kind], Offer(Endpoint(str(address), int(port)), _puzzle(puzzle))


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _parse_refusal(line: str) -> Refusal:
    """`PLEXUS 2.1 refusal <puzzle> <reason>`: the reason is the rest of the line (may be missing)."""
    words = line.split(maxsplit=4)
    if len(words) < 4:
        raise MessageError(f"refusal without a puzzle: {line[:80]!r}")
    return Refusal(_puzzle(words[3]), words[4] if len(words) > 4 else "")


def _parse_rebind(line: str) -> Rebind:
    """`PLEXUS 2.1 rebind <session> <sequence> <issued> <outer> <tag> <reach>`: the Reach is the rest of the
    line."""
    words = line.split(maxsplit=8)
    if len(words) < 9:
        raise MessageError(f"rebind cut short: {line[:80]!r}")
    session, sequence, issued, outer, tag, reach = words[3:]
    for name, number in (("sequence", sequence), ("issued", issued)):
        if not _NUMBER.fullmatch(number):
            raise MessageError(f"rebind: bad {name} {number[:30]!r}")
    try:
        return Rebind.read(session, int(sequence), int(issued), outer, reach, tag)
    except RebindError as error:
        raise MessageError(str(error)) from None


def _puzzle(text: str) -> int:
    if not _NUMBER.fullmatch(text) or int(text) >= 2**64:
        raise MessageError(f"bad puzzle {text[:30]!r}")
    return int(text)


def new_message_id(sender: str) -> str:
    domain = sender.rpartition("@")[2] or "plexus.invalid"
    return f"<{uuid.uuid4().hex}@{domain}>"


def build(
    kind: Kind,
    content: Content,
    route: Route,
    *,
    message_id: str,
    date: datetime.datetime,
    in_reply_to: str | None = None,
    keys: smime.Keys | None = None,
    signer: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """The whole message, CRLF line ends, every line under 1000 octets (headers folded, base64 at 76).

    content: an Offer, for a refusal a Refusal, for a rebind a Rebind (whose Reach is in its line). A response
    or refusal names its request in In-Reply-To.
    signer: the --identity key, which signs what the message says in the X-Plexus-Identity header."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = route.sender
    message["To"] = route.recipient
    message["Subject"] = route.subject
    message["Date"] = email.utils.format_datetime(date)
    message["Message-ID"] = message_id
    if in_reply_to is not None:
        message["In-Reply-To"] = in_reply_to
    if isinstance(content, Offer) and content.reach is not None:
        message[REACH_HEADER] = content.reach.header()
    body = format_body(kind, content) + "\r\n"
    if keys is None:
        message.set_content(body, charset="us-ascii", cte="7bit")
    else:
        # plexus 2.2 sends the encrypted part inside multipart/mixed; add_attachment builds just that.
        message["MIME-Version"] = "1.0"
        message.add_attachment(
            smime.seal(body.encode("ascii"), keys),
            maintype="application",
            subtype="pkcs7-mime",
            filename="smime.p7m",
            params={"smime-type": "enveloped-data"},
        )
    if signer is not None:
        # Signed as the receiver will read it back: the headers as written, parsed again.
        signed = _signed_content(parse_headers(message.as_bytes(policy=email.policy.SMTP)), body.strip())
        spki = signer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signature = signer.sign(signed, ec.ECDSA(hashes.SHA256()))
        message[IDENTITY_HEADER] = f"{_b64(spki)}; sig={_b64(signature)}"
    return message.as_bytes(policy=email.policy.SMTP)


def parse_headers(raw: bytes) -> Message:
    """Parse a message or its headers; one too large or too nested to parse safely is a MessageError."""
    if len(raw) > MAX_MESSAGE:
        raise MessageError(f"{len(raw)} octets, over the {MAX_MESSAGE}-octet limit")
    excess = smime.mime_excess(raw)
    if excess is not None:
        raise MessageError(excess)
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def read(raw: bytes, keys: smime.Keys | None, pinned: str | None = None) -> Letter:
    """Read a message already matched by route. Raises MessageError or smime.SmimeError with the reason.

    pinned: the peer's --peer-identity; then the message must carry that identity's signature."""
    message = parse_headers(raw)
    signing_time = None
    enveloped = _find_part(message, smime.PKCS7_MIME)
    if keys is not None:
        if enveloped is None:
            raise MessageError("message is not S/MIME encrypted, but --smime-* options require it")
        payload = enveloped.get_payload(decode=True)
        if not isinstance(payload, bytes) or not payload:
            raise MessageError("empty S/MIME part")
        entity, signing_time = smime.unseal(payload, keys)
        text = _text_of_entity(entity)
    elif enveloped is not None:
        raise MessageError("message is S/MIME encrypted, but no --smime-* options are given")
    else:
        text = _text_of(message)
    line = _first_line(text)
    kind, content = parse_body(line)
    signer = _check_identity(message, line, pinned) if pinned is not None else None
    reach = message.get(REACH_HEADER)
    if isinstance(content, Offer) and reach is not None:
        try:
            parsed = Reach.parse(str(reach))
        except ReachError as error:
            raise MessageError(str(error)) from None
        content = dataclasses.replace(content, reach=parsed)
    if isinstance(content, Offer) and signer is not None:
        content = dataclasses.replace(content, signer=signer)
    return Letter(
        kind=kind,
        offer=content if isinstance(content, Offer) else None,
        message_id=_message_id(message, "Message-ID"),
        in_reply_to=_message_id(message, "In-Reply-To"),
        date=_date(message),
        signing_time=signing_time,
        refusal=content if isinstance(content, Refusal) else None,
        rebind=content if isinstance(content, Rebind) else None,
    )


@dataclass
class Screen:
    """Decides which letters start a session: the right kind, fresh, never seen before.

    Arrival after the wait began is the driver's part (IMAP UIDs); this checks what the letter itself says.
    """

    tolerance: datetime.timedelta = CLOCK_TOLERANCE
    seen: set[tuple[Kind, int]] = field(default_factory=set)

    def admit(
        self,
        letter: Letter,
        kind: Kind,
        now: datetime.datetime,
        reply_to: str | None = None,
        request: int | None = None,
    ) -> None:
        """Raise MessageError if the letter must be ignored; otherwise remember its puzzle.

        Waiting for a response to our request (reply_to: its Message-ID; request: its puzzle), a refusal that
        echoes that puzzle answers it too; a refusal of any other puzzle is ignored. A refusal is never taken
        without `request`: nothing else binds it to a request of ours."""
        answers = kind == "response" and request is not None and letter.kind == "refusal"
        if letter.kind != kind and not answers:
            raise MessageError(f"expected a {kind}, got a {letter.kind}")
        if letter.kind == "refusal" and letter.puzzle != request:
            raise MessageError(f"refuses another request (puzzle {letter.puzzle}), not ours")
        if (letter.kind, letter.puzzle) in self.seen:
            raise MessageError(f"puzzle {letter.puzzle} already seen: a replay")
        # plexus 2.2 sends no In-Reply-To: then arrival after our request (the driver's UID cursor) has to do.
        if reply_to is not None and letter.in_reply_to not in (None, reply_to):
            raise MessageError(f"answers {letter.in_reply_to}, not our request {reply_to}")
        for name, when in (("Date", letter.date), ("signingTime", letter.signing_time)):
            if when is not None and abs(when - now) > self.tolerance:
                raise MessageError(
                    f"{name} {when:%Y-%m-%d %H:%M:%S} UTC is more than "
                    f"{self.tolerance.total_seconds():g} s from now"
                )
        self.seen.add((letter.kind, letter.puzzle))


def _check_identity(message: Message, line: str, pinned: str) -> ec.EllipticCurvePublicKey:
    """The pinned id's key, from the X-Plexus-Identity header, once its signature over the message checks."""
    value = message.get(IDENTITY_HEADER)
    if value is None:
        raise MessageError(f"no {IDENTITY_HEADER} signature, but --peer-identity requires one")
    key_text, _, signature_text = "".join(str(value).split()).partition(";sig=")
    try:
        key = serialization.load_der_public_key(base64.b64decode(key_text, validate=True))
        signature = base64.b64decode(signature_text, validate=True)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise MessageError(f"unreadable {IDENTITY_HEADER} header") from error
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise MessageError(f"{IDENTITY_HEADER} holds no P-256 key")
    found = identity.id_of(key)
    if found != pinned:
        raise MessageError(f"signed by {found}, not the pinned peer {pinned}")
    try:
        key.verify(signature, _signed_content(message, line), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise MessageError(f"{IDENTITY_HEADER} signature does not verify: the message was altered") from None
    return key


def _signed_content(message: Message, line: str) -> bytes:
    """What the identity signs: every field read() or the Screen uses, as they read it, each length-prefixed
    (a missing header is not an empty one). S/MIME signs only the line: this covers the headers too."""
    fields = [
        line,
        _unfolded(message, REACH_HEADER),
        ",".join(_addresses(message, "From")),
        ",".join(_addresses(message, "To")),
        _subject(message),
        _unfolded(message, "Date"),
        _message_id(message, "Message-ID"),
        _message_id(message, "In-Reply-To"),
    ]
    signed = bytearray(_SIGNED_PREFIX)
    for text in fields:
        if text is None:
            signed += _ABSENT
        else:
            data = text.encode("utf-8", "surrogatepass")
            signed += len(data).to_bytes(4, "big") + data
    return bytes(signed)


def _unfolded(message: Message, name: str) -> str | None:
    """A header's value with whitespace runs made one space: folding on the way changes nothing signed."""
    value = message.get(name)
    return None if value is None else " ".join(str(value).split())


def _b64(data: bytes) -> str:
    """Base64 in words of 64 characters: a header folds between them, where a longer word would be sent as
    RFC 2047 words. The reader drops all whitespace."""
    text = base64.b64encode(data).decode("ascii")
    return " ".join(text[i : i + 64] for i in range(0, len(text), 64))


def _addresses(headers: Message, name: str) -> list[str]:
    values = [str(value) for value in headers.get_all(name, [])]
    return [address.lower() for _, address in email.utils.getaddresses(values) if address]


def _subject(headers: Message) -> str:
    raw = re.sub(r"\r?\n(?=[ \t])", "", str(headers.get("Subject", "")))
    try:
        return str(email.header.make_header(email.header.decode_header(raw))).strip()
    except (ValueError, LookupError, email.errors.MessageError) as error:
        raise MessageError(f"unreadable Subject {raw[:60]!r}") from error


def subject_of(headers: Message) -> str | None:
    """The Subject as Route.matches reads it (a sender's id); None if it cannot be read."""
    try:
        return _subject(headers)
    except MessageError:
        return None


def message_id_of(headers: Message) -> str | None:
    """The Message-ID, angle brackets included, as read() reports it."""
    return _message_id(headers, "Message-ID")


def in_reply_to_of(headers: Message) -> str | None:
    """The request a response or refusal answers (plexus 2.2 names none)."""
    return _message_id(headers, "In-Reply-To")


def _message_id(message: Message, name: str) -> str | None:
    value = message.get(name)
    if value is None:
        return None
    match = re.search(r"<[^<>\s]+>", str(value))
    return match.group(0) if match else None


def _date(message: Message) -> datetime.datetime | None:
    value = message.get("Date")
    if value is None:  # plexus 2.2 sends none
        return None
    try:
        date = email.utils.parsedate_to_datetime(str(value))
    except (ValueError, TypeError, IndexError) as error:
        raise MessageError(f"unreadable Date header {str(value)[:60]!r}") from error
    return date if date.tzinfo else date.replace(tzinfo=datetime.UTC)


def _find_part(message: Message, types: set[str]) -> Message | None:
    return next((part for part in message.walk() if part.get_content_type() in types), None)


def _text_of(message: Message) -> str:
    part = _find_part(message, {"text/plain"})
    if part is None:
        raise MessageError(f"no text/plain part (message is {message.get_content_type()})")
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise MessageError("unreadable text part")
    return payload.decode("ascii", "replace")


def _text_of_entity(content: bytes) -> str:
    """Signed content is a MIME entity (openssl -text) or, as plexus signs it, the bare line."""
    if _HEADER_LINE.match(content):
        return _text_of(parse_headers(content))
    return content.decode("ascii", "replace")
