"""Hostile mail in the lab's real Dovecot, read by real plexus processes: messages that once stopped the
acceptor (a broken RFC 2047 word, MIME nested 1000 deep, a message over the size limit, S/MIME with ciphers
cryptography cannot decrypt) are judged one by one while the acceptor goes on serving, also after a restart
with them still there; and with --identity/--peer-identity, a forged request never stops the running command.
"""

from __future__ import annotations

import base64
import datetime
import time
from pathlib import Path

import pytest

from plexus.endpoint import Endpoint
from plexus.identity import Identity
from plexus.mediator import Offer, message
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.mailbox import Mailbox
from tests.lab.sessions import Plexus, Side
from tests.labtests.test_reconnect import HOLD, holders, wait_for
from tests.unit.test_smime import FOREIGN_ENVELOPES, make_identity, openssl_envelope, sign
from tests.unit.test_smime import Identity as SmimeIdentity

pytestmark = pytest.mark.lab
LAUNCHED = (HOLD.name,)  # stopped after each test by the `running` fixture (tests/conftest.py)
DEAD_END = Offer(Endpoint("198.51.100.9", 9), 4242)  # a request toward nowhere


def route_head(sender: Side, recipient: Side, subject: str | None = None) -> bytes:
    """From, To and Subject as sender's plexus writes them to recipient (Subject: sender's host id)."""
    subject = sender.host_id if subject is None else subject
    addresses = f"From: {sender.account.address}\r\nTo: {recipient.account.address}\r\n"
    return f"{addresses}Subject: {subject}\r\n".encode()


def hostile(sender: Side, recipient: Side) -> dict[str, bytes]:
    """What an attacker mails recipient, by name: from a stranger, and with sender's (the peer's) route."""
    to = recipient.account.address.encode()
    nesting = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (level, level)
        for level in range(1000)
    )
    return {
        "stranger, broken word": b"From: x@example.net\r\nTo: "
        + to
        + b"\r\nSubject: =?utf-8?b?a?=\r\n\r\nhi\r\n",
        "route, broken subject": route_head(sender, recipient, "=?utf-8?b?a?=") + b"\r\nhi\r\n",
        "route, broken name": (
            f"From: =?utf-8?b?a?= <{sender.account.address}>\r\n".encode()
            + route_head(sender, recipient).split(b"\r\n", 1)[1]
            + b"\r\nnot a request\r\n"
        ),
        "route, 1000 deep": route_head(sender, recipient)
        + nesting
        + b"\r\nPLEXUS 2.1 request 1.2.3.4 5 6\r\n",
        "route, 1 MiB": route_head(sender, recipient)
        + b"\r\n"
        + b"PLEXUS 2.1 request 1.2.3.4 5 6\r\n" * 32768,
    }


def forged(sender: Side, recipient: Side, offer: Offer = DEAD_END, **options: object) -> bytes:
    """A request with sender's route, fresh and well formed, written by someone else."""
    return message.build(
        "request",
        offer,
        message.Route(sender.account.address, recipient.account.address, sender.host_id),
        message_id=message.new_message_id(sender.account.address),
        date=datetime.datetime.now(datetime.UTC),
        **options,  # type: ignore[arg-type]
    )


def invite(
    lab: Lab, inviter: Side, acceptor_side: Side, tmp_path: Path, running: list[Plexus], **kw: object
) -> Plexus:
    invite = sessions.start(lab, inviter, acceptor_side, tmp_path, accept=False, **kw)  # type: ignore[arg-type]
    running.append(invite)
    code = invite.wait(90)
    assert code == 0, f"inviter exited {code}: {invite.stderr()}\n{invite.log()}"
    return invite


def assert_calm(process: Plexus, serving: bool = True) -> None:
    """Every hostile message cost one log line (what a person reads: nothing escaped, no traceback); an
    acceptor still serves."""
    text = process.log()
    assert "Traceback" not in text and "unexpected error" not in text and "never retrieved" not in text, text
    assert not serving or process.process.poll() is None, f"exited: {process.stderr()}"


def test_hostile_mail_never_stops_the_acceptor_nor_its_restart(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    inviter, acceptor_side = sessions.pair(lab)
    box, inviter_box = Mailbox(lab, acceptor_side.account), Mailbox(lab, inviter.account)
    messages = hostile(inviter, acceptor_side)
    for raw in messages.values():  # there before the start: the start-up clean-up judges them
        box.append(raw)
    for raw in hostile(acceptor_side, inviter).values():  # the inviter's clean-up as it leaves judges these
        inviter_box.append(raw)
    acceptor = sessions.start(lab, acceptor_side, inviter, tmp_path, accept=True)
    running.append(acceptor)
    sessions.wait_until_listening(acceptor)
    first = invite(lab, inviter, acceptor_side, tmp_path, running)
    acceptor.wait_hello(1)
    assert_calm(first, serving=False)

    for raw in messages.values():  # while it waits: the scan of new mail judges them
        box.append(raw)
    acceptor.wait_rejected("over the 65536-octet limit")
    acceptor.wait_rejected("1000 multipart or message entities")
    assert {event["source"] for event in acceptor.events("rejected")} == {"mail"}
    invite(lab, inviter, acceptor_side, tmp_path, running)
    acceptor.wait_hello(2)
    assert_calm(acceptor)
    assert "is anonymous (no S/MIME" in acceptor.log()

    acceptor.stop()
    for raw in messages.values():
        box.append(raw)
    restarted = sessions.start(lab, acceptor_side, inviter, tmp_path, accept=True)
    running.append(restarted)
    sessions.wait_until_listening(restarted)
    invite(lab, inviter, acceptor_side, tmp_path, running)
    restarted.wait_hello(1)
    assert_calm(restarted)
    # The route's mail is consumed; what is not the route's (a broken Subject) stays as it was, unread.
    left = {raw for _, raw in box.contents().values()}
    assert messages["stranger, broken word"] in left and messages["route, broken subject"] in left
    assert not left & {messages["route, 1000 deep"], messages["route, 1 MiB"], messages["route, broken name"]}
    box.purge(list(box.contents()))
    inviter_box.purge(list(inviter_box.contents()))


def test_a_forged_request_does_not_hold_the_genuine_one_back(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    """Anonymous mail: a forged request toward an endpoint nobody punches from starts a session that would
    wait out its 60 s handshake; the genuine request after it wins at once (session.Turn), not a minute
    later."""
    inviter, acceptor_side = sessions.pair(lab)
    acceptor = sessions.start(lab, acceptor_side, inviter, tmp_path, accept=True)
    running.append(acceptor)
    sessions.wait_until_listening(acceptor)
    Mailbox(lab, acceptor_side.account).append(forged(inviter, acceptor_side))
    acceptor.wait_events("requested", peer=str(DEAD_END.outer))
    started = time.monotonic()
    invite(lab, inviter, acceptor_side, tmp_path, running)
    took = time.monotonic() - started
    acceptor.wait_hello(1)
    assert took < 20, f"the genuine inviter took {took:.1f} s"
    (given_up,) = acceptor.wait_events("failed")
    assert "a newer request arrived" in given_up["error"]
    assert_calm(acceptor)


def test_smime_with_foreign_ciphers_never_stops_the_acceptor(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    inviter, acceptor_side = sessions.pair(lab)
    ca = make_identity(tmp_path, "ca", ca=True)
    alice, bob = make_identity(tmp_path, "alice", ca), make_identity(tmp_path, "bob", ca)

    def smime(me: SmimeIdentity, peer: SmimeIdentity) -> dict[str, str | None]:
        return {
            "smime-cert": str(me.cert_path),
            "smime-key": str(me.key_path),
            "smime-peer": str(peer.cert_path),
        }

    box = Mailbox(lab, acceptor_side.account)
    body = b"PLEXUS 2.1 request 198.51.100.9 9 4242\r\n"
    head = forged(inviter, acceptor_side).split(b"Content-Type")[0]
    acceptor = sessions.start(lab, acceptor_side, inviter, tmp_path, accept=True, overrides=smime(bob, alice))
    running.append(acceptor)
    sessions.wait_until_listening(acceptor)
    for options, _ in FOREIGN_ENVELOPES.values():
        # Signed by the peer's own key: only the envelope's algorithms are foreign.
        enveloped = openssl_envelope(sign(body, alice), bob.cert_path, *options)
        box.append(
            head + b"MIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(enveloped).replace(b"\n", b"\r\n")
        )
    for _, reason in FOREIGN_ENVELOPES.values():
        acceptor.wait_rejected(reason)
    invite(lab, inviter, acceptor_side, tmp_path, running, overrides=smime(alice, bob))
    acceptor.wait_hello(1)
    assert_calm(acceptor)
    assert "is anonymous (no S/MIME" not in acceptor.log()


def test_a_forged_request_leaves_the_running_command_running(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    inviter, acceptor_side = sessions.pair(lab)
    a, b = Identity.load(tmp_path / "a.key"), Identity.load(tmp_path / "b.key")
    stranger = Identity.load(tmp_path / "stranger.key")
    holding: dict[str, str | None] = {"stun-client": "0.0.0.0:40000", "exec-command": str(HOLD)}
    acceptor = sessions.start(
        lab,
        acceptor_side,
        inviter,
        tmp_path,
        accept=True,
        overrides=holding | {"identity": str(tmp_path / "b.key"), "peer-identity": a.id},
    )
    running.append(acceptor)
    sessions.wait_until_listening(acceptor)
    as_inviter = holding | {"identity": str(tmp_path / "a.key"), "peer-identity": b.id}
    invite(lab, inviter, acceptor_side, tmp_path, running, overrides=as_inviter)
    wait_for(lambda: len(holders(lab, "b")) == 1)
    command = holders(lab, "b")
    assert "is anonymous (no S/MIME" not in acceptor.log()

    box = Mailbox(lab, acceptor_side.account)
    box.append(forged(inviter, acceptor_side))  # unsigned
    box.append(forged(inviter, acceptor_side, signer=stranger.key))  # signed by another key
    acceptor.wait_rejected("no X-Plexus-Identity signature")
    acceptor.wait_rejected(f"signed by {stranger.id}, not the pinned peer {a.id}")
    time.sleep(1.0)  # had either been taken, its session would be stopping the command by now
    assert holders(lab, "b") == command, "a forged request must not touch the running command"
    assert not acceptor.events("stopped")

    invite(lab, inviter, acceptor_side, tmp_path, running, overrides=as_inviter)
    wait_for(lambda: len(holders(lab, "b")) == 1 and holders(lab, "b") != command)
    assert acceptor.events("stopped")[0]["pid"] in command  # the command the request replaced
    assert_calm(acceptor)
