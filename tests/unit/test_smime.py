"""S/MIME: our own round trip, every way a message must be refused, and interoperation with openssl."""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus.endpoint import Endpoint
from plexus.errors import UsageError
from plexus.mediator import message, smime
from plexus.mediator.message import MessageError, Offer, Route
from tests.fuzz import FUZZ

NOW = datetime.datetime.now(datetime.UTC)
OFFER = Offer(Endpoint("198.51.100.2", 40000), 12345678901234567890)
ROUTE = Route("alice@example.org", "bob@example.org", "host-a")
BODY = b"PLEXUS 2.1 request 198.51.100.2 40000 12345678901234567890\r\n"

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Identity:
    cert: x509.Certificate
    key: Key
    cert_path: Path
    key_path: Path


def make_identity(
    directory: Path, name: str, issuer: Identity | None = None, *, ca: bool = False, curve: bool = False
) -> Identity:
    """A certificate (issued by `issuer`, or self-signed) and its key, also written as PEM files."""
    key: Key = ec.generate_private_key(ec.SECP256R1()) if curve else rsa.generate_private_key(65537, 2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(f"{name}@example.org")]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)  # plexus refuses a private key others can read, as ssh does
    return Identity(cert, key, cert_path, key_path)


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Identity
    alice: Identity
    bob: Identity
    carol: Identity  # a stranger with a certificate from the same CA

    def config(self, me: Identity, peer: Identity, ca: bool = True) -> smime.SmimeConfig:
        return smime.SmimeConfig(me.cert_path, me.key_path, peer.cert_path, self.ca.cert_path if ca else None)

    def keys(self, me: Identity, peer: Identity) -> smime.Keys:
        return smime.Keys.load(self.config(me, peer))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_identity(directory, "ca", ca=True)
    return Pki(
        directory,
        ca,
        make_identity(directory, "alice", ca),
        make_identity(directory, "bob", ca),
        make_identity(directory, "carol", ca),
    )


def sign(content: bytes, signer: Identity, cert: x509.Certificate | None = None) -> bytes:
    """A multipart/signed entity, as plexus and `openssl smime -sign` make it."""
    builder = pkcs7.PKCS7SignatureBuilder().set_data(content)
    builder = builder.add_signer(cert or signer.cert, signer.key, hashes.SHA256())
    return builder.sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature])


# Built once: the fuzz tests below wrap thousands of envelopes.
MAIL_HEAD = message.build("request", OFFER, ROUTE, message_id="<1@x>", date=NOW).split(b"Content-Type")[0]


def mail(enveloped: bytes) -> bytes:
    """A message from alice to bob around an EnvelopedData, with the headers plexus writes."""
    return MAIL_HEAD + (
        b"MIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(enveloped).replace(b"\n", b"\r\n")
    )


def openssl(*args: str, data: bytes) -> bytes:
    result = subprocess.run(["openssl", *args], input=data, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def test_round_trip(pki: Pki) -> None:
    # signingTime is the moment of signing (whole seconds), not the Date given: NOW dates from the import.
    signed = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    raw = message.build(
        "request", OFFER, ROUTE, message_id="<1@x>", date=NOW, keys=pki.keys(pki.alice, pki.bob)
    )
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert b"PLEXUS" not in raw
    letter = message.read(raw, pki.keys(pki.bob, pki.alice))
    assert (letter.kind, letter.offer, letter.message_id) == ("request", OFFER, "<1@x>")
    assert letter.signing_time is not None
    assert signed <= letter.signing_time <= datetime.datetime.now(datetime.UTC)


def test_tampered_content_is_rejected(pki: Pki) -> None:
    signed = sign(BODY, pki.alice)
    assert signed.count(b"40000") == 1
    tampered = signed.replace(b"40000", b"40001")
    with pytest.raises(smime.SmimeError, match="messageDigest"):
        message.read(mail(smime.encrypt(tampered, pki.bob.cert)), pki.keys(pki.bob, pki.alice))


def test_tampered_signature_is_rejected(pki: Pki) -> None:
    content, signed_data = smime.split_signed(sign(BODY, pki.alice))
    assert content is not None
    broken = signed_data[:-10] + bytes([signed_data[-10] ^ 1]) + signed_data[-9:]
    with pytest.raises(smime.SmimeError, match="does not verify"):
        smime.verify(broken, content, pki.keys(pki.bob, pki.alice))


def test_other_signer_is_rejected(pki: Pki) -> None:
    sealed = smime.encrypt(sign(BODY, pki.carol), pki.bob.cert)
    with pytest.raises(smime.SmimeError, match="someone other"):
        message.read(mail(sealed), pki.keys(pki.bob, pki.alice))


def test_signer_claiming_the_peer_certificate_is_rejected(pki: Pki) -> None:
    forged = sign(BODY, pki.carol, cert=pki.alice.cert)  # alice's name, carol's key
    with pytest.raises(smime.SmimeError, match="does not verify"):
        message.read(mail(smime.encrypt(forged, pki.bob.cert)), pki.keys(pki.bob, pki.alice))


def test_unsigned_is_rejected(pki: Pki) -> None:
    unsigned = b"Content-Type: text/plain\r\n\r\n" + BODY
    with pytest.raises(smime.SmimeError, match="not signed"):
        message.read(mail(smime.encrypt(unsigned, pki.bob.cert)), pki.keys(pki.bob, pki.alice))


def test_undecryptable_is_rejected(pki: Pki) -> None:
    sealed = smime.encrypt(sign(BODY, pki.alice), pki.carol.cert)
    with pytest.raises(smime.SmimeError, match="cannot decrypt"):
        message.read(mail(sealed), pki.keys(pki.bob, pki.alice))


def test_plain_mail_is_rejected_when_smime_is_on(pki: Pki) -> None:
    raw = message.build("request", OFFER, ROUTE, message_id="<1@x>", date=NOW)
    with pytest.raises(MessageError, match="not S/MIME"):
        message.read(raw, pki.keys(pki.bob, pki.alice))


def test_peer_outside_the_ca_is_a_usage_error(pki: Pki, tmp_path: Path) -> None:
    stranger = make_identity(tmp_path, "stranger")
    with pytest.raises(UsageError, match="--smime-peer"):
        smime.Keys.load(pki.config(pki.bob, stranger))
    smime.Keys.load(pki.config(pki.bob, stranger, ca=False))


def test_missing_file_is_a_usage_error(pki: Pki, tmp_path: Path) -> None:
    config = smime.SmimeConfig(tmp_path / "none.pem", pki.bob.key_path, pki.alice.cert_path)
    with pytest.raises(UsageError, match="--smime-cert"):
        smime.Keys.load(config)


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


@needs_openssl
def test_openssl_reads_our_mail(pki: Pki) -> None:
    raw = message.build(
        "request", OFFER, ROUTE, message_id="<1@x>", date=NOW, keys=pki.keys(pki.alice, pki.bob)
    )
    part = next(
        p
        for p in email.message_from_bytes(raw, policy=email.policy.SMTP).walk()
        if p.get_content_type() == "application/pkcs7-mime"
    )
    signed = openssl(
        "smime",
        "-decrypt",
        "-recip",
        str(pki.bob.cert_path),
        "-inkey",
        str(pki.bob.key_path),
        data=part.as_bytes(),
    )
    content = openssl("cms", "-verify", "-CAfile", str(pki.ca.cert_path), "-purpose", "any", data=signed)
    assert content == BODY


@needs_openssl
@pytest.mark.parametrize("opaque", [False, True], ids=["detached", "opaque"])
def test_we_read_openssl_mail(pki: Pki, opaque: bool) -> None:
    signed = openssl(
        "cms", "-sign", "-signer", str(pki.alice.cert_path), "-inkey", str(pki.alice.key_path),
        *(["-nodetach"] if opaque else []), data=BODY,
    )  # fmt: skip
    raw = openssl(
        "cms", "-encrypt", "-aes256", "-from", ROUTE.sender, "-to", ROUTE.recipient,
        "-subject", ROUTE.subject, str(pki.bob.cert_path), data=signed,
    )  # fmt: skip
    letter = message.read(raw, pki.keys(pki.bob, pki.alice))
    assert (letter.kind, letter.offer) == ("request", OFFER)
    assert letter.date is None and letter.signing_time is not None


@needs_openssl
def test_ecdsa_signature_verifies(pki: Pki) -> None:
    dave = make_identity(pki.directory, "dave", pki.ca, curve=True)
    signed = openssl("cms", "-sign", "-signer", str(dave.cert_path), "-inkey", str(dave.key_path), data=BODY)
    content, signed_data = smime.split_signed(signed)
    assert content is not None
    keys = smime.Keys(pki.bob.cert, pki.bob.key, dave.cert, (pki.ca.cert,))  # type: ignore[arg-type]
    assert smime.verify(signed_data, content, keys)[0] == BODY
    with pytest.raises(smime.SmimeError, match="messageDigest"):
        smime.verify(signed_data, content.replace(b"40000", b"40001"), keys)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_in_the_smime_part_is_rejected_cleanly(pki: Pki, data: bytes) -> None:
    with pytest.raises((MessageError, smime.SmimeError)):
        message.read(mail(data), pki.keys(pki.bob, pki.alice))


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_signed_data_is_rejected_cleanly(pki: Pki, data: bytes) -> None:
    with pytest.raises(smime.SmimeError):
        smime.verify(data, BODY, pki.keys(pki.bob, pki.alice))


# ---- what anyone can encrypt to the acceptor's public certificate ------------------------------------------

# The EnvelopedData options of `openssl cms -encrypt` that plexus refuses, and why (docs/protocol.md, S/MIME).
FOREIGN_ENVELOPES = {
    "3des": (["-des3"], "unsupported content cipher 3DES-CBC"),
    "aes192": (["-aes192"], "unsupported content cipher AES-192-CBC"),
    "oaep": (["-aes256", "-keyopt", "rsa_padding_mode:oaep"], "unsupported key transport RSA-OAEP"),
}


def openssl_envelope(entity: bytes, recipient: Path, *options: str) -> bytes:
    """An EnvelopedData (DER) around entity, made by `openssl cms -encrypt` with these options."""
    command = ["cms", "-encrypt", "-binary", "-outform", "DER", "-recip", str(recipient), *options]
    return openssl(*command, data=entity)


@needs_openssl
@pytest.mark.parametrize("name", FOREIGN_ENVELOPES)
def test_foreign_algorithms_are_a_rejected_message(pki: Pki, name: str) -> None:
    """3DES (what plexus 2.2 sends), AES-192 and RSA-OAEP: cryptography would raise UnsupportedAlgorithm."""
    options, reason = FOREIGN_ENVELOPES[name]
    enveloped = openssl_envelope(sign(BODY, pki.alice), pki.bob.cert_path, *options)
    with pytest.raises(smime.SmimeError, match=f"^{reason}"):  # named, not "malformed"
        message.read(mail(enveloped), pki.keys(pki.bob, pki.alice))


@needs_openssl
def test_openssl_aes128_is_read(pki: Pki) -> None:
    enveloped = openssl_envelope(sign(BODY, pki.alice), pki.bob.cert_path, "-aes128")
    assert message.read(mail(enveloped), pki.keys(pki.bob, pki.alice)).offer == OFFER


AES256_OID = bytes.fromhex("060960864801650304012a")
AES192_OID = bytes.fromhex("0609608648016503040116")


def test_the_cipher_is_checked_before_decrypting(pki: Pki) -> None:
    sealed = smime.seal(BODY, pki.keys(pki.alice, pki.bob))
    assert sealed.count(AES256_OID) == 1
    with pytest.raises(smime.SmimeError, match="AES-192-CBC"):
        smime.unseal(sealed.replace(AES256_OID, AES192_OID), pki.keys(pki.bob, pki.alice))


# Leaves and tags of CMS (see test_mediator_message.py on why inputs are composed from one drawn byte string).
DER_LEAVES = [
    bytes.fromhex("06092a864886f70d010703"),  # envelopedData
    bytes.fromhex("06092a864886f70d010702"),  # signedData
    bytes.fromhex("06092a864886f70d010101"),  # rsaEncryption
    bytes.fromhex("06092a864886f70d010107"),  # RSA-OAEP
    AES256_OID,
    AES192_OID,
    bytes.fromhex("06082a864886f70d0307"),  # 3DES
    bytes.fromhex("020100"),
    bytes.fromhex("0410" + "00" * 16),
    b"\x06\x00",
    b"\x06\x01\x80",
    b"\x05\x00",
]
DER_TAGS = [0x30, 0x31, 0xA0, 0xA1, 0x80, 0x04, 0x02, 0x17, 0x18, 0x3F]


def compose_der(seed: bytes) -> bytes:
    """DER-looking bytes from a byte string, as a stack machine: a byte below 0x40 pushes a leaf; any other
    wraps the top 0-3 elements in a tag, its length right or (sometimes) off by one or indefinite."""
    stack: list[bytes] = []
    for byte in seed:
        if byte < 0x40:
            stack.append(DER_LEAVES[byte % len(DER_LEAVES)])
            continue
        count = min(byte & 3, len(stack))
        content = b"".join(stack[len(stack) - count :])
        del stack[len(stack) - count :]
        skew = (0, 0, 0, 1, -1)[(byte >> 2) % 5]
        stack.append(bytes([DER_TAGS[(byte >> 4) % len(DER_TAGS)]]) + _length(len(content) + skew) + content)
    return b"".join(stack)


def _length(length: int) -> bytes:
    if length < 0:
        return b"\x80"
    if length < 0x80:
        return bytes([length])
    data = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(data)]) + data


def mutate(raw: bytes, program: bytes, insertions: list[bytes]) -> bytes:
    """raw changed as each 4 bytes of program say: what (set a byte, insert one of insertions, delete a run,
    insert a byte), where (2 bytes) and with what."""
    data = bytearray(raw)
    for at in range(0, len(program) - 3, 4):
        action, where, value = program[at], int.from_bytes(program[at + 1 : at + 3], "big"), program[at + 3]
        where %= len(data) + 1
        if action % 4 == 0 and where < len(data):
            data[where] = value
        elif action % 4 == 1:
            data[where:where] = insertions[value % len(insertions)]
        elif action % 4 == 2:
            del data[where : where + value % 16 + 1]
        else:
            data[where:where] = bytes([value])
    return bytes(data)


@pytest.fixture(scope="module")
def bob(pki: Pki) -> smime.Keys:
    """bob's keys, loaded once: loading checks the RSA key, which takes longer than a fuzzed message."""
    return pki.keys(pki.bob, pki.alice)


@FUZZ
@given(st.binary(max_size=60))
def test_fuzz_random_der_is_a_rejected_message(bob: smime.Keys, seed: bytes) -> None:
    with pytest.raises((MessageError, smime.SmimeError)):
        message.read(mail(compose_der(seed)), bob)


@pytest.fixture(scope="module")
def sealed(pki: Pki) -> bytes:
    """One real message from alice to bob for the whole module (Hypothesis wants the same input every run)."""
    return smime.seal(BODY, pki.keys(pki.alice, pki.bob))


@FUZZ
@given(st.binary(min_size=4, max_size=16))
def test_fuzz_mutated_sealed_mail_is_the_original_or_rejected(
    bob: smime.Keys, sealed: bytes, program: bytes
) -> None:
    try:
        letter = message.read(mail(mutate(sealed, program, DER_LEAVES)), bob)
    except (MessageError, smime.SmimeError):
        return
    assert letter.offer == OFFER  # a change that still reads (in the padding, say) changes nothing said
