"""S/MIME for the rendezvous mail: sign with the host key, encrypt to the peer; decrypt, then verify.

Sending: the PLEXUS line is signed (detached, multipart/signed, as `openssl smime -sign` writes it), and that
MIME entity is encrypted to the peer certificate (CMS EnvelopedData, AES-256-CBC).
Receiving: decrypt with the host key; the signature must be a CMS SignedData whose signer is the configured
peer certificate (certificates a message carries are never trusted), whose messageDigest matches the content,
whose signature over the signed attributes checks with the peer's key (RSA PKCS#1 v1.5 or ECDSA), and which
carries a signingTime for the freshness check. cryptography cannot verify CMS, so that is done here.
Encryption in cryptography is RSA-only, so both certificates must hold RSA keys.

Anyone can encrypt to the host's certificate, so everything before the signature checks is hostile input: the
EnvelopedData must use what plexus sends (RSA PKCS#1 v1.5 key transport, AES-128/256-CBC) before it is
decrypted, and MIME is bounded before it is parsed (mime_excess). Every failure is a SmimeError.

cryptography's x509 and pkcs7 are imported by the functions that use them, all of which need --smime-*: mail
without S/MIME reads through this module too (the bounds, the MIME parts), and they cost it 14 ms of start-up.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import algorithms

from plexus.errors import UsageError
from plexus.identity import Identity, PeerCheck, id_of
from plexus.mediator import der

if TYPE_CHECKING:
    from cryptography import x509

OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"  # key transport with PKCS#1 v1.5 padding, as seal() sends it
# What cryptography decrypts, and what seal() sends (AES-256). plexus 2.2 encrypts with 3DES, which
# cryptography cannot decrypt: its S/MIME mail is refused with that reason (docs/protocol.md, "S/MIME").
CONTENT_CIPHERS = {"2.16.840.1.101.3.4.1.2": "AES-128-CBC", "2.16.840.1.101.3.4.1.42": "AES-256-CBC"}
# Names for the log line of a refused message.
KNOWN_CIPHERS = {
    "1.2.840.113549.3.7": "3DES-CBC",
    "2.16.840.1.101.3.4.1.22": "AES-192-CBC",
    "1.2.840.113549.3.2": "RC2-CBC",
    "1.3.14.3.2.7": "DES-CBC",
}
KNOWN_KEY_TRANSPORTS = {"1.2.840.113549.1.1.7": "RSA-OAEP"}
# A plexus message has one multipart (S/MIME's multipart/mixed outside the envelope, multipart/signed inside)
# and two parts. Python's email parser nests a generator per MIME level, so a crafted nesting would recurse
# without end: the raw bytes are bounded before any parsing (mime_excess), with room for an MTA's wrapping.
MAX_CONTAINERS = 8  # "multipart/" or "message/" anywhere in the bytes: a bound on nesting and on multiparts
MAX_DELIMITERS = 64  # lines starting with "--": a bound on the number of parts
_CONTAINER = re.compile(rb"(?i)(?:multipart|message)/")
_DELIMITER = re.compile(rb"(?m)^--")
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
# SHA-1 is left out on purpose: a forged collision would pass as the peer's signature.
DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
    "2.16.840.1.101.3.4.2.4": hashes.SHA224,
}
RSA_SIGNATURES = {
    "1.2.840.113549.1.1.1",  # rsaEncryption: the hash is the digestAlgorithm
    "1.2.840.113549.1.1.11",
    "1.2.840.113549.1.1.12",
    "1.2.840.113549.1.1.13",
    "1.2.840.113549.1.1.14",
}
ECDSA_SIGNATURES = {
    "1.2.840.10045.2.1",  # id-ecPublicKey, as some signers write it
    "1.2.840.10045.4.3.1",
    "1.2.840.10045.4.3.2",
    "1.2.840.10045.4.3.3",
    "1.2.840.10045.4.3.4",
}
PKCS7_MIME = {"application/pkcs7-mime", "application/x-pkcs7-mime"}
PKCS7_SIGNATURE = {"application/pkcs7-signature", "application/x-pkcs7-signature"}


class SmimeError(ValueError):
    """Why a received message is rejected: str(error) is logged."""


@dataclass(frozen=True)
class SmimeConfig:
    cert: Path  # --smime-cert: this host's certificate (PEM)
    key: Path  # --smime-key: its private key (PEM, unencrypted)
    peer: Path  # --smime-peer: the peer's certificate (PEM)
    ca: Path | None = None  # --smime-ca: trust anchors the peer certificate must chain to


@dataclass(frozen=True)
class Keys:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey
    peer: x509.Certificate
    anchors: tuple[x509.Certificate, ...]

    @classmethod
    def load(cls, config: SmimeConfig) -> Keys:
        """Read the files; a missing or unusable one is a usage error, found before any mail is sent."""
        cert = _load_cert(config.cert, "--smime-cert")
        peer = _load_cert(config.peer, "--smime-peer")
        key = _load_key(config.key)
        anchors = tuple(_load_certs(config.ca, "--smime-ca")) if config.ca else ()
        if not isinstance(peer.public_key(), rsa.RSAPublicKey):
            raise UsageError("--smime-peer must hold an RSA certificate: mail is encrypted to its key")
        keys = cls(cert, key, peer, anchors)
        try:
            keys.check_peer(datetime.datetime.now(datetime.UTC))
        except SmimeError as error:
            raise UsageError(f"--smime-peer: {error}") from error
        return keys

    def identity(self) -> Identity:
        """This host's certificate and key as its identity (streams, the handshake key)."""
        return Identity(self.key, self.cert)

    def peer_check(self) -> PeerCheck:
        """The peer must prove the key of --smime-peer."""
        return PeerCheck(id_of(self.peer.public_key()))

    def check_peer(self, when: datetime.datetime) -> None:
        """The peer certificate is valid at `when` and, with --smime-ca, issued by a certificate there."""
        if not self.peer.not_valid_before_utc <= when <= self.peer.not_valid_after_utc:
            raise SmimeError(f"peer certificate not valid at {when:%Y-%m-%d %H:%M:%S} UTC")
        if not self.anchors or self.peer in self.anchors:
            return
        for anchor in self.anchors:
            if anchor.subject != self.peer.issuer:
                continue
            try:
                self.peer.verify_directly_issued_by(anchor)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return
        raise SmimeError("peer certificate is not issued by a certificate in --smime-ca")


def seal(content: bytes, keys: Keys) -> bytes:
    """Sign content with the host key, encrypt the signed entity to the peer: DER EnvelopedData."""
    from cryptography.hazmat.primitives.serialization import pkcs7

    signed = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(content)
        .add_signer(keys.cert, keys.key, hashes.SHA256())
        .sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature])
    )
    return encrypt(signed, keys.peer)


def encrypt(entity: bytes, peer: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import pkcs7

    return (
        pkcs7.PKCS7EnvelopeBuilder()
        .set_data(entity)
        .add_recipient(peer)
        .set_content_encryption_algorithm(algorithms.AES256)
        .encrypt(serialization.Encoding.DER, [])
    )


def unseal(enveloped: bytes, keys: Keys) -> tuple[bytes, datetime.datetime]:
    """Decrypt and verify; return the signed content and its signingTime, or raise SmimeError."""
    from cryptography.hazmat.primitives.serialization import pkcs7

    check_enveloped(enveloped)
    try:
        entity = pkcs7.pkcs7_decrypt_der(enveloped, keys.cert, keys.key, [])
    except (ValueError, UnsupportedAlgorithm) as error:
        raise SmimeError(f"cannot decrypt: {error}") from error
    content, signed_data = split_signed(entity)
    return verify(signed_data, content, keys)


def check_enveloped(enveloped: bytes) -> None:
    """A CMS EnvelopedData whose every recipient uses RSA PKCS#1 v1.5 and whose content cipher is one of
    CONTENT_CIPHERS; anything else is refused before the decryption is tried."""
    try:
        content_info = der.read_one(enveloped).expect(der.SEQUENCE).children()
        if len(content_info) != 2 or der.oid(content_info[0]) != OID_ENVELOPED_DATA:
            raise SmimeError("not a CMS EnvelopedData")
        fields = content_info[1].expect(0xA0).children()[0].expect(der.SEQUENCE).children()
        rest = fields[2:] if fields[1].tag == 0xA0 else fields[1:]  # past version and originatorInfo
        recipients = rest[0].expect(der.SET).children()
        for recipient in recipients:
            if recipient.tag != der.SEQUENCE:
                raise SmimeError("a recipient uses other than key transport (RSA PKCS#1 v1.5)")
            algorithm = der.oid(recipient.children()[2].expect(der.SEQUENCE).children()[0])
            if algorithm != OID_RSA_ENCRYPTION:
                name = KNOWN_KEY_TRANSPORTS.get(algorithm, algorithm)
                raise SmimeError(f"unsupported key transport {name} (only RSA PKCS#1 v1.5)")
        cipher = der.oid(rest[1].expect(der.SEQUENCE).children()[1].expect(der.SEQUENCE).children()[0])
    except SmimeError:
        raise
    except (ValueError, IndexError) as error:
        raise SmimeError(f"malformed EnvelopedData: {error}") from error
    if not recipients:
        raise SmimeError("EnvelopedData without recipients")
    if cipher not in CONTENT_CIPHERS:
        name = KNOWN_CIPHERS.get(cipher, cipher)
        raise SmimeError(f"unsupported content cipher {name} (only {', '.join(CONTENT_CIPHERS.values())})")


def mime_excess(data: bytes) -> str | None:
    """Why data is too nested or has too many parts to parse as MIME safely; None if it is within bounds."""
    containers = len(_CONTAINER.findall(data))
    if containers > MAX_CONTAINERS:
        return f"{containers} multipart or message entities, at most {MAX_CONTAINERS} are read"
    delimiters = len(_DELIMITER.findall(data))
    if delimiters > MAX_DELIMITERS:
        return f"{delimiters} MIME boundary lines, at most {MAX_DELIMITERS} are read"
    return None


def _parse_mime(data: bytes) -> Message:
    excess = mime_excess(data)
    if excess is not None:
        raise SmimeError(f"decrypted content: {excess}")
    return email.message_from_bytes(data, policy=email.policy.compat32)


def split_signed(entity: bytes) -> tuple[bytes | None, bytes]:
    """The content and the SignedData of a decrypted entity: multipart/signed, or opaque signed-data."""
    head, body = _split_head(entity)
    message = _parse_mime(head + b"\r\n")
    kind = message.get_content_type()
    if kind == "multipart/signed":
        boundary = message.get_param("boundary")
        if not isinstance(boundary, str):
            raise SmimeError("multipart/signed without a boundary")
        parts = _mime_parts(body, boundary.encode())
        if len(parts) != 2:
            raise SmimeError(f"multipart/signed with {len(parts)} parts, expected 2")
        signature = _decoded_part(parts[1], PKCS7_SIGNATURE)
        return parts[0], signature
    if kind in PKCS7_MIME:
        return None, _decoded_part(entity, PKCS7_MIME)
    raise SmimeError(f"message is not signed (decrypted content is {kind})")


def verify(signed_data: bytes, content: bytes | None, keys: Keys) -> tuple[bytes, datetime.datetime]:
    """Check a CMS SignedData made by the peer over content (None: over its encapsulated content).

    A detached content is tried in canonical form (CRLF line ends, as RFC 8551 signs it) and as received.
    Returns the content in the form that was signed, and the signingTime.
    """
    try:
        info = _signer_info(signed_data)
    except SmimeError:
        raise
    except (ValueError, IndexError) as error:
        raise SmimeError(f"malformed signature: {error}") from error
    if content is None:
        content = info.encapsulated
        if content is None:
            raise SmimeError("signature carries no content")
    _check_signer(info, keys.peer)
    matching = [c for c in (_canonical(content), content) if info.digest(c) == info.message_digest]
    if not matching:
        raise SmimeError("content does not match its signature (messageDigest differs)")
    _check_signature(info, keys.peer)
    keys.check_peer(info.signing_time)
    return matching[0], info.signing_time


@dataclass(frozen=True)
class _SignerInfo:
    digest_oid: str
    signature_oid: str
    issuer: bytes | None  # DER Name of issuerAndSerialNumber
    serial: int | None
    key_id: bytes | None  # subjectKeyIdentifier form of sid
    signed_attrs: bytes  # DER re-tagged as SET OF: what the signature covers
    message_digest: bytes
    signing_time: datetime.datetime
    signature: bytes
    encapsulated: bytes | None

    def hash(self) -> hashes.HashAlgorithm:
        algorithm = DIGESTS.get(self.digest_oid)
        if algorithm is None:
            raise SmimeError(f"unsupported digest algorithm {self.digest_oid}")
        return algorithm()

    def digest(self, data: bytes) -> bytes:
        hasher = hashes.Hash(self.hash())
        hasher.update(data)
        return hasher.finalize()


def _signer_info(signed_data: bytes) -> _SignerInfo:
    content_info = der.read_one(signed_data).expect(der.SEQUENCE).children()
    if len(content_info) < 2 or der.oid(content_info[0]) != OID_SIGNED_DATA:
        raise SmimeError("not a CMS SignedData")
    fields = content_info[1].expect(0xA0).children()[0].expect(der.SEQUENCE).children()
    encap = fields[2].expect(der.SEQUENCE).children()
    content_type = der.oid(encap[0])
    encapsulated = None
    if len(encap) > 1:
        encapsulated = encap[1].expect(0xA0).children()[0].expect(der.OCTET_STRING).value
    signer_infos = fields[-1].expect(der.SET).children()
    if len(signer_infos) != 1:
        raise SmimeError(f"{len(signer_infos)} signers, expected exactly the peer")
    signer = signer_infos[0].expect(der.SEQUENCE).children()
    sid, digest_algorithm = signer[1], signer[2]
    issuer = serial = key_id = None
    if sid.tag == der.SEQUENCE:
        issuer_tlv, serial_tlv = sid.children()
        issuer, serial = issuer_tlv.encoded, der.integer(serial_tlv)
    elif sid.tag == 0x80:
        key_id = sid.value
    else:
        raise SmimeError("unknown signer identifier")
    if signer[3].tag != 0xA0:
        raise SmimeError("signature has no signed attributes (no messageDigest, no signingTime)")
    attrs = _attributes(signer[3])
    if attrs.get(OID_CONTENT_TYPE) is None or der.oid(attrs[OID_CONTENT_TYPE]) != content_type:
        raise SmimeError("contentType attribute missing or different from the content")
    if OID_MESSAGE_DIGEST not in attrs or OID_SIGNING_TIME not in attrs:
        raise SmimeError("messageDigest or signingTime attribute missing")
    return _SignerInfo(
        digest_oid=der.oid(digest_algorithm.children()[0]),
        signature_oid=der.oid(signer[4].children()[0]),
        issuer=issuer,
        serial=serial,
        key_id=key_id,
        # The signature covers the attributes encoded as SET OF (tag 0x31), not as the [0] they travel in.
        signed_attrs=bytes([der.SET]) + signer[3].encoded[1:],
        message_digest=attrs[OID_MESSAGE_DIGEST].expect(der.OCTET_STRING).value,
        signing_time=der.time(attrs[OID_SIGNING_TIME]),
        signature=signer[5].expect(der.OCTET_STRING).value,
        encapsulated=encapsulated,
    )


def _attributes(signed_attrs: der.Tlv) -> dict[str, der.Tlv]:
    """Single-valued attributes by OID; a repeated attribute or value is refused as ambiguous."""
    found: dict[str, der.Tlv] = {}
    for attribute in signed_attrs.children():
        attr_type, attr_values = attribute.expect(der.SEQUENCE).children()
        name = der.oid(attr_type)
        values = attr_values.expect(der.SET).children()
        if name in found or len(values) != 1:
            raise SmimeError(f"attribute {name} is repeated")
        found[name] = values[0]
    return found


def _check_signer(info: _SignerInfo, peer: x509.Certificate) -> None:
    from cryptography import x509

    if info.key_id is not None:
        try:
            ski = peer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            ski = None
        if ski == info.key_id:
            return
    elif info.issuer == peer.issuer.public_bytes() and info.serial == peer.serial_number:
        return
    raise SmimeError("signed by someone other than the peer certificate")


def _check_signature(info: _SignerInfo, peer: x509.Certificate) -> None:
    public_key = peer.public_key()
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and info.signature_oid in RSA_SIGNATURES:
            public_key.verify(info.signature, info.signed_attrs, padding.PKCS1v15(), info.hash())
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and info.signature_oid in ECDSA_SIGNATURES:
            public_key.verify(info.signature, info.signed_attrs, ec.ECDSA(info.hash()))
        else:
            raise SmimeError(f"unsupported signature algorithm {info.signature_oid} for the peer key")
    except InvalidSignature as error:
        raise SmimeError("signature does not verify with the peer certificate") from error


def _canonical(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def _split_head(entity: bytes) -> tuple[bytes, bytes]:
    match = re.search(rb"\r?\n\r?\n", entity)
    if match is None:
        raise SmimeError("decrypted content is not a MIME entity")
    return entity[: match.start()], entity[match.end() :]


def _mime_parts(body: bytes, boundary: bytes) -> list[bytes]:
    """Raw bytes of each part, exactly as sent: the signature covers them byte for byte."""
    delimiter = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|$)")
    parts: list[bytes] = []
    start = None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):
            return parts
        start = match.end()
    raise SmimeError("multipart/signed without its closing boundary")


def _decoded_part(part: bytes, types: set[str]) -> bytes:
    message = _parse_mime(part)
    if message.get_content_type() not in types:
        raise SmimeError(f"unexpected part {message.get_content_type()}")
    payload = message.get_payload(decode=True)
    if not isinstance(payload, bytes) or not payload:
        raise SmimeError("empty signature part")
    return payload


def _load_cert(path: Path, option: str) -> x509.Certificate:
    certs = _load_certs(path, option)
    if len(certs) != 1:
        raise UsageError(f"{option} {path}: expected one certificate, found {len(certs)}")
    return certs[0]


def _load_certs(path: Path, option: str) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        data = path.read_bytes()
        return x509.load_pem_x509_certificates(data)
    except OSError as error:
        raise UsageError(f"{option} {path}: {error.strerror}") from error
    except ValueError as error:
        raise UsageError(f"{option} {path}: not a PEM certificate") from error


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as error:
        raise UsageError(f"--smime-key {path}: {error.strerror}") from error
    except (ValueError, TypeError) as error:
        raise UsageError(f"--smime-key {path}: not an unencrypted PEM private key") from error
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UsageError(f"--smime-key {path}: must be an RSA key (mail to this host is encrypted to it)")
    return key
