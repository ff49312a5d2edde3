"""Who a host is, beyond the mailbox: a key pair whose public half names the host.

A plexus identity is one P-256 key, kept in a PEM file (--identity, made on first use, mode 0600). Its id is
the first 20 bytes of SHA-256 over the public key's SubjectPublicKeyInfo (DER), in lowercase base32: 32
characters, printed by `plexus --identity=FILE --show-id` and pinned by the peer with --peer-identity, as an
ssh host key is. 20 bytes is an OpenDHT InfoHash, so the same id can name a host on the DHT. P-256 rather
than Ed25519: the one key both signs (TLS 1.3, DHT values) and agrees keys (ECDH, encrypting to a host).

With S/MIME configured the S/MIME certificate and key are the identity instead, and the peer must prove the
key of --smime-peer: one trust decision for mail and streams.

Only TLS (streams) needs a certificate: x509 is imported, and the certificate made, when TLS first asks for
it, never in a session that only signs and agrees keys (the DHT's values, the handshake); both cost 20 ms.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from plexus import files
from plexus.errors import PeerIdentityError, UsageError

if TYPE_CHECKING:
    from cryptography import x509

ID_BYTES = 20
ID_LENGTH = 32  # base32 characters of ID_BYTES
_ID = re.compile(r"[a-z2-7]{32}")
# The certificate only carries the key through TLS: its dates just have to hold for the session.
CERTIFICATE_LIFETIME = datetime.timedelta(days=2)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def id_of(public_key: CertificatePublicKeyTypes) -> str:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(spki).digest()[:ID_BYTES]
    return base64.b32encode(digest).decode("ascii").lower()


def parse_id(text: str, option: str = "--peer-identity") -> str:
    """An id as a user may paste it: case and surrounding space do not matter, anything else does."""
    value = text.strip().lower()
    if not _ID.fullmatch(value):
        raise UsageError(
            f"{option} {text!r} is not a plexus id ({ID_LENGTH} characters a-z and 2-7, as "
            "`plexus --identity=FILE --show-id` prints it)"
        )
    return value


@dataclass(frozen=True)
class Identity:
    """This host's key, and `issued`, the certificate issued for it (S/MIME's) or None (a plexus identity)."""

    key: PrivateKey
    issued: x509.Certificate | None = None

    @property
    def id(self) -> str:
        return id_of(self.key.public_key() if self.issued is None else self.issued.public_key())

    @functools.cached_property
    def certificate(self) -> x509.Certificate:
        """What TLS presents: `issued`, or a certificate around `key`, self-signed when first asked for."""
        return self.issued if self.issued is not None else _self_signed(self.key)

    def agree(self, peer: ec.EllipticCurvePublicKey) -> bytes | None:
        """The ECDH secret of this key and the peer's (both P-256), or None when this key is not one (an
        S/MIME identity's RSA key)."""
        key = self.key
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            return None
        return key.exchange(ec.ECDH(), peer)

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read the key file, or make it when there is none (a usage error when it cannot be either)."""
        try:
            with path.open("rb") as file:
                info, data = os.fstat(file.fileno()), file.read()
        except FileNotFoundError:
            return cls.of_key(_create(path))
        except OSError as error:
            raise UsageError(f"cannot read --identity {path}: {error.strerror}") from error
        files.check(info, f"--identity {path}", path, holds="a private key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as error:
            raise UsageError(f"--identity {path} is not an unencrypted PEM private key") from error
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise UsageError(
                f"--identity {path} is not a P-256 key (plexus makes one when the file is missing)"
            )
        return cls.of_key(key)

    @classmethod
    def of_key(cls, key: ec.EllipticCurvePrivateKey) -> Identity:
        return cls(key)

    @classmethod
    def ephemeral(cls) -> Identity:
        """A key for this run only (--anonymous): TLS still encrypts, but proves nothing."""
        return cls.of_key(ec.generate_private_key(ec.SECP256R1()))


def _self_signed(key: PrivateKey) -> x509.Certificate:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"plexus {id_of(key.public_key())}")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERTIFICATE_LIFETIME / 2)
        .not_valid_after(now + CERTIFICATE_LIFETIME / 2)
        .sign(key, hashes.SHA256())
    )


def _create(path: Path) -> ec.EllipticCurvePrivateKey:
    """A new key, written whole before it appears under its name: two first runs at once end up with one."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        files.make_folders(path.parent)
        descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)  # 0600
    except OSError as error:
        raise UsageError(f"cannot create --identity {path}: {error.strerror}") from error
    draft = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
        os.link(draft, path)  # fails if the name exists, unlike a rename
    except FileExistsError:
        existing = Identity.load(path).key
        assert isinstance(existing, ec.EllipticCurvePrivateKey)
        return existing
    except OSError as error:
        raise UsageError(f"cannot create --identity {path}: {error.strerror}") from error
    finally:
        draft.unlink(missing_ok=True)
    return key


@dataclass(frozen=True)
class PeerCheck:
    """What the peer must prove in the TLS handshake: the key with a pinned id, or the --smime-peer key; or
    nothing, in the anonymous mode the user asked for by name."""

    pinned_id: str | None  # None: anonymous

    @property
    def anonymous(self) -> bool:
        return self.pinned_id is None

    def check(self, certificate: x509.Certificate | None) -> None:
        if self.pinned_id is None:
            return
        if certificate is None:
            raise PeerIdentityError("the peer proved no identity")
        found = id_of(certificate.public_key())
        if found != self.pinned_id:
            raise PeerIdentityError(f"the peer is {found}, not the pinned {self.pinned_id}")
