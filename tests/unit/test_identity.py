"""Host identities: the key file made once and kept, the id's format, and what PeerCheck lets through."""

from __future__ import annotations

import multiprocessing
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from plexus import identity
from plexus.errors import PeerIdentityError, UsageError
from plexus.identity import Identity, PeerCheck, id_of, parse_id
from plexus.mediator import smime
from tests.unit.owners import owned_by_another
from tests.unit.test_smime import make_identity

ID = re.compile(r"[a-z2-7]{32}")


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def test_the_key_file_is_made_on_first_use_private_and_loaded_again(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "host.pem"  # its folder is made too
    made = Identity.load(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ID.fullmatch(made.id)
    again = Identity.load(path)
    assert again.id == made.id
    assert again.certificate.public_key() == made.key.public_key()
    assert [p.name for p in path.parent.iterdir()] == ["host.pem"]  # no draft left behind


def test_a_new_key_s_folders_are_private(tmp_path: Path) -> None:
    Identity.load(tmp_path / "config" / "plexus" / "host.pem")
    for folder in (tmp_path / "config", tmp_path / "config" / "plexus"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (0o644, "holds a private key and is readable by group or others (mode 0644)"),
        (0o640, "holds a private key and is readable by group or others (mode 0640)"),
        (0o604, "holds a private key and is readable by group or others (mode 0604)"),
        (0o620, "is writable by group or others (mode 0620)"),
    ],
)
def test_a_key_others_can_read_or_change_is_refused_as_ssh_does(
    tmp_path: Path, mode: int, message: str
) -> None:
    # Even for root, who reads it anyway (tests run as root in CI): the others still can.
    path = tmp_path / "host.pem"
    made = Identity.load(path)
    path.chmod(mode)
    with pytest.raises(UsageError) as error:
        Identity.load(path)
    assert str(error.value) == f"--identity {path} {message}: chmod 600 {path}"
    path.chmod(0o400)
    assert Identity.load(path).id == made.id


def test_a_key_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "host.pem"
    Identity.load(path)
    owner = owned_by_another(path, monkeypatch)
    with pytest.raises(UsageError, match=rf"^--identity {path} belongs to another user \(uid {owner}\)"):
        Identity.load(path)


def test_the_id_is_32_base32_characters_of_the_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    me = Identity.of_key(key)
    assert len(me.id) == identity.ID_LENGTH == 32
    assert ID.fullmatch(me.id)
    assert me.id == id_of(key.public_key()) == id_of(me.certificate.public_key())
    assert Identity.of_key(key).id == me.id  # a new certificate, the same id
    assert Identity.ephemeral().id != me.id


def test_the_certificate_is_made_when_tls_first_asks_and_kept() -> None:
    """A session that only signs and agrees keys (the DHT's values, the handshake) never loads x509."""
    code = (
        "import sys; from plexus.identity import Identity; me = Identity.ephemeral(); me.id; "
        "print(any(name.startswith('cryptography.x509') for name in sys.modules)); me.certificate; "
        "print('cryptography.x509' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]
    me = Identity.ephemeral()
    assert me.certificate is me.certificate
    assert id_of(me.certificate.public_key()) == me.id


def test_parse_id_accepts_what_a_user_pastes() -> None:
    value = Identity.ephemeral().id
    assert parse_id(value) == value
    assert parse_id(f"  {value.upper()}\n") == value


@pytest.mark.parametrize(
    "text",
    ["", "abc", "a" * 31, "a" * 33, "0" * 32, "1" * 32, "8" * 32, "a" * 16 + " " + "a" * 15, "a" * 31 + "="],
)
def test_parse_id_rejects_anything_else_naming_the_option(text: str) -> None:
    with pytest.raises(UsageError) as error:
        parse_id(text, "--peer-identity (plexus.conf:3)")
    message = str(error.value)
    assert message.startswith("--peer-identity (plexus.conf:3) ")
    assert "not a plexus id" in message and "\n" not in message
    with pytest.raises(UsageError, match=r"^--peer-identity "):
        parse_id(text)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: pem(ec.generate_private_key(ec.SECP384R1())), "is not a P-256 key"),
        (lambda: pem(rsa.generate_private_key(65537, 1024)), "is not a P-256 key"),
        (lambda: b"garbage\x00\xff not a key at all\n", "is not an unencrypted PEM private key"),
        (lambda: b"", "is not an unencrypted PEM private key"),
        (lambda: pem(ec.generate_private_key(ec.SECP256R1()), b"secret"), "not an unencrypted PEM"),
    ],
)
def test_an_unusable_key_file_is_a_one_line_usage_error(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "host.pem"
    data = content()
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(UsageError) as error:
        Identity.load(path)
    text = str(error.value)
    assert text.startswith(f"--identity {path} ") and message in text
    assert "\n" not in text
    assert path.read_bytes() == data  # left alone, never replaced


def test_an_unreadable_key_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^cannot read --identity .*: Is a directory$"):
        Identity.load(tmp_path)


def test_a_key_file_that_cannot_be_made_is_a_usage_error(tmp_path: Path) -> None:
    # Under a regular file: no folder can be made there, not even by root (tests run as root in CI).
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(UsageError, match=r"^cannot (read|create) --identity .*: Not a directory$"):
        Identity.load(blocker / "keys" / "host.pem")


def _load_in_process(path: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    results.put(Identity.load(Path(path)).id)


def test_two_processes_making_the_key_at_once_end_with_one(tmp_path: Path) -> None:
    """Two first runs at once (the documented case): each either makes the file or reads the other's."""
    context = multiprocessing.get_context("fork")
    for round_ in range(3):
        path = tmp_path / f"host{round_}.pem"
        barrier = context.Barrier(3)
        results = context.Queue()
        workers = [
            context.Process(target=_load_in_process, args=(str(path), barrier, results)) for _ in range(3)
        ]
        for worker in workers:
            worker.start()
        ids = [results.get(timeout=10) for _ in workers]
        for worker in workers:
            worker.join(timeout=10)
            assert worker.exitcode == 0
        assert set(ids) == {Identity.load(path).id}
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".host{round_}")] == []


def test_two_threads_making_the_key_at_once_end_with_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made deterministic: both threads write their draft before either links it, and the first to write
    links first."""
    path = tmp_path / "host.pem"
    real_open, real_link = os.open, os.link
    writers: list[int] = []
    both_written = threading.Barrier(2, timeout=5)
    first_linked = threading.Event()

    def draft_open(name: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if str(name).endswith(".new"):
            writers.append(threading.get_ident())
        return real_open(name, flags, mode, **kwargs)

    def ordered_link(source: Any, destination: Any, **kwargs: Any) -> None:
        both_written.wait()
        if threading.get_ident() != writers[0]:
            first_linked.wait(5)
        try:
            real_link(source, destination, **kwargs)
        finally:
            if threading.get_ident() == writers[0]:
                first_linked.set()

    monkeypatch.setattr(os, "open", draft_open)
    monkeypatch.setattr(os, "link", ordered_link)
    results: list[str] = []

    def load() -> None:
        try:
            results.append(Identity.load(path).id)
        except UsageError as error:
            results.append(str(error))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    monkeypatch.undo()
    assert results == [Identity.load(path).id] * 2


def test_peer_check_passes_the_pinned_key_only() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    peer, stranger = Identity.of_key(key), Identity.ephemeral()
    check = PeerCheck(peer.id)
    assert not check.anonymous
    check.check(peer.certificate)
    check.check(Identity.of_key(key).certificate)  # another certificate around the same key
    with pytest.raises(PeerIdentityError) as error:
        check.check(stranger.certificate)
    assert str(error.value) == f"the peer is {stranger.id}, not the pinned {peer.id}"
    with pytest.raises(PeerIdentityError, match="proved no identity"):
        check.check(None)


def test_an_anonymous_peer_check_accepts_anything() -> None:
    check = PeerCheck(None)
    assert check.anonymous
    check.check(Identity.ephemeral().certificate)
    check.check(None)


def test_with_smime_the_certificates_are_the_identities(tmp_path: Path) -> None:
    alice = make_identity(tmp_path, "alice")
    bob = make_identity(tmp_path, "bob")
    keys = smime.Keys.load(smime.SmimeConfig(alice.cert_path, alice.key_path, bob.cert_path))
    me = keys.identity()
    assert me.certificate == alice.cert
    assert me.key.public_key() == alice.key.public_key()
    assert me.id == id_of(alice.cert.public_key())
    check = keys.peer_check()
    assert check.pinned_id == id_of(bob.cert.public_key())
    check.check(bob.cert)
    with pytest.raises(PeerIdentityError, match=f"the peer is {me.id}, not the pinned {check.pinned_id}"):
        check.check(alice.cert)
