"""The mail rendezvous against the lab's real SMTP and Dovecot: inviter on host a, acceptor on host b."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aioimaplib
import pytest

from plexus.endpoint import Endpoint
from plexus.errors import MailAuthError, MailConnectionError, MailTimeoutError, PeerRefusedError
from plexus.mediator import Invitation, MailConfig, Mediator, Offer, SmimeConfig, message, smime
from plexus.mediator import email as mail
from plexus.peers import Peer, Roster
from tests.lab.lab import Account, Lab
from tests.lab.mailbox import Mailbox
from tests.unit.test_smime import make_identity, sign

pytestmark = pytest.mark.lab
T = TypeVar("T")
INVITER_OFFER = Offer(Endpoint("198.51.100.2", 40001), 1111)
ACCEPTOR_OFFER = Offer(Endpoint("198.51.100.6", 40002), 2222)


def mail_config(
    lab: Lab,
    me: Account,
    peer: Account,
    host_id: str,
    peer_id: str,
    *,
    smtp_port: int = Lab.SMTPS_PORT,
    password: str | None = None,
    ca: Path | None = None,
    smime_config: SmimeConfig | None = None,
) -> MailConfig:
    return MailConfig(
        smtp=Endpoint(Lab.MAIL_HOST, smtp_port),
        imap=Endpoint(Lab.MAIL_HOST, Lab.IMAPS_PORT),
        login=me.login,
        password=me.password if password is None else password,
        address=me.address,
        peer_address=peer.address,
        host_id=host_id,
        peers=Roster.of(Peer(peer_id, id=peer_id)),
        ca=ca or lab.ca_file,
        smime=smime_config,
    )


@dataclass
class Pair:
    """The two sides' configurations for one test, with host ids no other test uses."""

    inviter: MailConfig
    acceptor: MailConfig
    tag: str

    @classmethod
    def make(cls, lab: Lab, shared: bool, **options: Any) -> Pair:
        tag = uuid.uuid4().hex[:10]
        a_id, b_id = f"a-{tag}", f"b-{tag}"
        a, b = (lab.accounts["shared"],) * 2 if shared else (lab.accounts["local"], lab.accounts["remote"])
        return cls(
            mail_config(lab, a, b, a_id, b_id, **options), mail_config(lab, b, a, b_id, a_id, **options), tag
        )


@dataclass
class Acceptor:
    """Mediator.requests() on host b, answering each request, until stop() (no cross-thread cancel)."""

    config: MailConfig
    offer: Offer = ACCEPTOR_OFFER
    refusal: str | None = None  # refuse every request with this reason instead of answering it
    invitations: list[Invitation] = field(default_factory=list)
    answered: int = 0  # responses (or refusals) handed to the SMTP server: stopping earlier would cancel one
    answered_at: list[float] = field(default_factory=list)  # time.monotonic() as each was accepted
    ready: threading.Event = field(default_factory=threading.Event)
    stop: Callable[[], object] = lambda: None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        self.stop = lambda: loop.call_soon_threadsafe(stopped.set)
        async with Mediator(self.config) as mediator:
            await mediator.ready()
            serving = asyncio.ensure_future(self._serve(mediator))
            self.ready.set()
            stopping = asyncio.ensure_future(stopped.wait())
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                serving.result()  # the acceptor failed: let the test see why
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving

    async def _serve(self, mediator: Mediator) -> None:
        async for invitation in mediator.requests():
            self.invitations.append(invitation)
            if self.refusal is None:
                await mediator.answer(invitation, self.offer)
            else:
                await mediator.refuse(invitation, self.refusal)
            self.answered_at.append(time.monotonic())
            self.answered += 1


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def accepting(lab: Lab, config: MailConfig, refusal: str | None = None) -> AsyncIterator[Acceptor]:
    acceptor = Acceptor(config, refusal=refusal)
    task = asyncio.ensure_future(lab.call("b", acceptor.run))
    try:
        await until(lambda: acceptor.ready.is_set() or task.done())
        if task.done():
            task.result()
        yield acceptor
    finally:
        acceptor.stop()
        await task


async def invite(lab: Lab, config: MailConfig, timeout: float = 30.0) -> Offer:
    async def run() -> Offer:
        async with Mediator(config) as mediator:
            return await mediator.invite(INVITER_OFFER, timeout=timeout)

    return await lab.call("a", run)


@pytest.fixture
def mailboxes(lab: Lab) -> dict[str, Mailbox]:
    return {name: Mailbox(lab, account) for name, account in lab.accounts.items()}


async def purge_responses(box: Mailbox, tag: str, count: int) -> None:
    """Remove the responses an acceptor sent where no inviter consumed them, once they are delivered."""
    await until(lambda: len(box.with_subject(tag)) >= count, timeout=10)
    box.purge(box.with_subject(tag))


def letter(
    config: MailConfig,
    kind: message.Kind = "request",
    puzzle: int = 7,
    *,
    date: datetime.datetime | None = None,
    in_reply_to: str | None = None,
    keys: smime.Keys | None = None,
) -> bytes:
    """A message as `config`'s host would send it."""
    return message.build(
        kind,
        message.Refusal(puzzle, "busy") if kind == "refusal" else Offer(INVITER_OFFER.outer, puzzle),
        config.outgoing(config.peers.peers.only),
        message_id=message.new_message_id(config.address),
        date=date or datetime.datetime.now(datetime.UTC),
        in_reply_to=in_reply_to,
        keys=keys,
    )


@pytest.mark.parametrize("shared", [False, True], ids=["two-accounts", "shared-mailbox"])
@pytest.mark.parametrize("smtp_port", [Lab.SMTPS_PORT, Lab.SUBMISSION_PORT], ids=["smtps", "starttls"])
async def test_round_trip(lab: Lab, mailboxes: dict[str, Mailbox], shared: bool, smtp_port: int) -> None:
    pair = Pair.make(lab, shared, smtp_port=smtp_port)
    async with accepting(lab, pair.acceptor) as acceptor:
        assert await invite(lab, pair.inviter) == ACCEPTOR_OFFER
        assert [invitation.offer for invitation in acceptor.invitations] == [INVITER_OFFER]
    for box in mailboxes.values():  # both messages consumed and expunged
        assert box.with_subject(pair.tag) == []


async def test_empty_mailbox_times_out_cleanly(lab: Lab, mailboxes: dict[str, Mailbox]) -> None:
    pair = Pair.make(lab, shared=False)
    with pytest.raises(MailTimeoutError, match=pair.inviter.peers.peers.only.name):
        await invite(lab, pair.inviter, timeout=3)
    mailboxes["remote"].purge(mailboxes["remote"].with_subject(pair.tag))


async def test_foreign_mail_stays_as_it_was(lab: Lab, mailboxes: dict[str, Mailbox]) -> None:
    """Mail off the route, and route mail another client flagged \\Deleted, keep their bytes and flags while
    both sides clean up around them (the acceptor as it starts, the inviter as it leaves)."""
    pair = Pair.make(lab, shared=True)
    box = mailboxes["shared"]
    foreign = f"foreign-{pair.tag}"
    raw = f"From: x@lab.test\r\nTo: shared@lab.test\r\nSubject: {foreign}\r\n\r\nhello\r\n".encode()
    near_misses = [
        letter(pair.inviter).replace(pair.inviter.host_id.encode(), foreign.encode()),  # another subject
        letter(pair.inviter).replace(b"From: shared@", b"From: other@"),  # another sender
        letter(pair.inviter).replace(b"To: shared@", b"To: other@"),  # to someone else
        letter(pair.acceptor, "response").replace(b"To: shared@", b"To: other@"),
    ]
    # plexus mail of both routes that "another client" flagged \Deleted: not ours to expunge
    deleted_by_another = [letter(pair.inviter), letter(pair.acceptor, "response")]
    before_start = [box.append(raw, r"\Flagged"), box.append(raw, r"\Deleted"), box.append(raw, r"\Seen")]
    before_start += [box.append(data) for data in near_misses]
    before_start += [box.append(data, r"\Deleted") for data in deleted_by_another]
    async with accepting(lab, pair.acceptor) as acceptor:
        during = [box.append(raw), box.append(raw, r"\Seen \Answered"), box.append(raw, r"\Deleted")]
        during += [box.append(data) for data in near_misses]
        during += [box.append(data, r"\Deleted") for data in deleted_by_another]
        kept = before_start + during
        before = box.contents()
        assert await invite(lab, pair.inviter) == ACCEPTOR_OFFER
        assert len(acceptor.invitations) == 1
    after = box.contents()
    for uid in kept:
        assert after[uid] == before[uid], uid
    assert box.with_subject(pair.tag) == sorted(kept)  # the session's own mail is gone
    box.purge(kept)


async def test_replayed_stale_and_forged_requests_are_ignored(
    lab: Lab, mailboxes: dict[str, Mailbox]
) -> None:
    pair = Pair.make(lab, shared=False)
    box = mailboxes["remote"]
    inviter, stranger = (
        pair.inviter,
        mail_config(lab, lab.accounts["shared"], lab.accounts["remote"], pair.inviter.host_id, "x"),
    )
    first = letter(inviter, puzzle=1)
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    box.append(letter(inviter, puzzle=99))  # before the acceptor started: consumed, never answered
    async with accepting(lab, pair.acceptor) as acceptor:
        box.append(first)
        await until(lambda: len(acceptor.invitations) == 1)
        forged = box.append(letter(stranger, puzzle=4))  # right subject, wrong sender: not plexus's, stays
        ignored = [
            box.append(first),  # the same message again
            box.append(letter(inviter, puzzle=1)),  # a new message with a used puzzle
            box.append(letter(inviter, puzzle=2, date=old)),
            box.append(letter(inviter, puzzle=3, date=future)),
            box.append(letter(inviter, "response", puzzle=5)),
            box.append(letter(inviter, "refusal", puzzle=8)),
        ]
        box.append(letter(inviter, puzzle=6))
        await until(lambda: acceptor.answered == 2)
        await until(lambda: box.with_subject(pair.tag) == [forged])  # each ignored one consumed, as judged
    assert [invitation.offer.puzzle for invitation in acceptor.invitations] == [1, 6]
    assert not set(ignored) & set(box.flags())
    box.purge([forged])
    await purge_responses(mailboxes["local"], pair.tag, 2)


async def test_response_to_another_request_is_ignored_and_left_to_its_inviter(
    lab: Lab, mailboxes: dict[str, Mailbox]
) -> None:
    """Two invites at once from one account: each leaves the other's fresh response where it is. A response
    older than any wait is cleared like other stale mail."""
    pair = Pair.make(lab, shared=False)
    inviter_box = mailboxes["local"]
    before = inviter_box.append(letter(pair.acceptor, "response", puzzle=1))  # arrived before the request
    long_ago = datetime.datetime.now(datetime.UTC) - 2 * message.CLOCK_TOLERANCE
    forgotten = inviter_box.append(
        letter(pair.acceptor, "response", puzzle=3, in_reply_to="<gone@lab.test>"), arrived=long_ago
    )
    task = asyncio.ensure_future(invite(lab, pair.inviter, timeout=8))
    await until(lambda: bool(mailboxes["remote"].with_subject(pair.inviter.host_id)))
    others = inviter_box.append(letter(pair.acceptor, "response", puzzle=2, in_reply_to="<other@lab.test>"))
    with pytest.raises(MailTimeoutError):
        await task
    flags = inviter_box.flags()
    assert "\\Deleted" not in flags[others]  # untouched: the other inviter takes and consumes it
    assert before not in flags and forgotten not in flags
    inviter_box.purge([others])
    mailboxes["remote"].purge(mailboxes["remote"].with_subject(pair.tag))


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("smime")
    ca = make_identity(directory, "ca", ca=True)
    return {"ca": ca, "a": make_identity(directory, "a", ca), "b": make_identity(directory, "b", ca)}


def smime_pair(lab: Lab, identities: dict[str, Any]) -> Pair:
    pair = Pair.make(lab, shared=False)
    ca = identities["ca"].cert_path
    a, b = identities["a"], identities["b"]
    return Pair(
        dataclasses.replace(pair.inviter, smime=SmimeConfig(a.cert_path, a.key_path, b.cert_path, ca)),
        dataclasses.replace(pair.acceptor, smime=SmimeConfig(b.cert_path, b.key_path, a.cert_path, ca)),
        pair.tag,
    )


async def test_smime_round_trip_and_tampering(
    lab: Lab, mailboxes: dict[str, Mailbox], identities: dict[str, Any]
) -> None:
    pair = smime_pair(lab, identities)
    box = mailboxes["remote"]
    assert pair.inviter.smime is not None
    body = message.format_body("request", Offer(INVITER_OFFER.outer, 5)).encode() + b"\r\n"
    tampered_entity = sign(body, identities["a"]).replace(b" 5\r\n", b" 6\r\n")
    sealed = smime.encrypt(tampered_entity, identities["b"].cert)
    plain = letter(pair.inviter, puzzle=9)
    tampered = plain.split(b"Content-Type")[0] + (
        b"MIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + mail_base64(sealed)
    )
    async with accepting(lab, pair.acceptor) as acceptor:
        rejected = [box.append(tampered), box.append(plain)]
        assert await invite(lab, pair.inviter) == ACCEPTOR_OFFER
        assert [invitation.offer for invitation in acceptor.invitations] == [INVITER_OFFER]
    assert not set(rejected) & set(box.flags())  # judged and ignored: consumed all the same
    assert box.with_subject(pair.tag) == []


def mail_base64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


async def send(lab: Lab, config: MailConfig, data: bytes) -> None:
    """Mail data from host a the way plexus does."""
    await lab.call("a", lambda: mail.send(config, mail.tls_context(config), data, config.peer_address))


async def test_dropped_imap_connection_is_survived(lab: Lab, mailboxes: dict[str, Mailbox]) -> None:
    pair = Pair.make(lab, shared=False)
    block = "table inet plexus_test {\n chain out {\n  type filter hook output priority 0;\n"
    block += "  tcp dport 993 reject with tcp reset\n }\n}\n"
    async with accepting(lab, pair.acceptor) as acceptor:
        await asyncio.sleep(1)  # in IDLE by now
        lab.exec("b", ["nft", "-f", "-"], input=block, check=True)
        try:
            killed = lab.exec("b", ["ss", "-K", "-n", "dst", Lab.MAIL_HOST, "dport", "=", "993"])
            assert "993" in killed.stdout
            await send(lab, pair.inviter, letter(pair.inviter))  # arrives while the acceptor is cut off
            await asyncio.sleep(1.5)
        finally:
            lab.exec("b", ["nft", "delete", "table", "inet", "plexus_test"], check=True)
        await until(lambda: acceptor.answered == 1, timeout=40)
    await purge_responses(mailboxes["local"], pair.tag, 1)


async def test_a_submission_left_before_data_sends_nothing(lab: Lab, mailboxes: dict[str, Mailbox]) -> None:
    """What a failed STUN check leaves: an SMTP session opened ahead of its message, never given one."""
    pair = Pair.make(lab, shared=False)
    before = set(mailboxes["remote"].flags())

    async def abandon() -> None:
        async with mail.Submission(pair.inviter, mail.tls_context(pair.inviter), pair.inviter.peer_address):
            await asyncio.sleep(1)  # connected, logged in, MAIL FROM and RCPT TO done: only DATA is missing

    await lab.call("a", abandon)
    await asyncio.sleep(1)
    assert set(mailboxes["remote"].flags()) == before


async def test_wrong_password(lab: Lab) -> None:
    pair = Pair.make(lab, shared=False, password="wrong")
    with pytest.raises(MailAuthError, match="IMAP server"):
        await invite(lab, pair.inviter)
    with pytest.raises(MailAuthError, match="SMTP server"):
        await send(lab, pair.inviter, b"x")


async def test_untrusted_server_certificate(lab: Lab, identities: dict[str, Any]) -> None:
    pair = Pair.make(lab, shared=False, ca=identities["ca"].cert_path)
    with pytest.raises(MailConnectionError, match="TLS"):
        await invite(lab, pair.inviter)
    with pytest.raises(MailConnectionError, match="TLS"):
        await send(lab, pair.inviter, b"x")


async def test_unreachable_server(lab: Lab) -> None:
    pair = Pair.make(lab, shared=False)
    config = dataclasses.replace(pair.inviter, imap=Endpoint(Lab.MAIL_HOST, 1))
    with pytest.raises(MailConnectionError, match="cannot reach IMAP"):
        await invite(lab, config)


async def test_waiting_sleeps_in_idle(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    """No polling while the server offers IDLE: a quiet mailbox costs (almost) no commands after IDLE starts.

    Another test's mail or clean-up in the same mailbox may wake the IDLE once (DONE, UID FETCH, IDLE)."""
    pair = Pair.make(lab, shared=False)
    with caplog.at_level(logging.DEBUG, logger="aioimaplib.aioimaplib"):
        async with accepting(lab, pair.acceptor):
            await asyncio.sleep(1)
            sent_before = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Sending")]
            await asyncio.sleep(4)
            sent_after = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Sending")]
    assert any(" IDLE" in line for line in sent_before), sent_before
    assert len(sent_after) - len(sent_before) <= 6, sent_after[len(sent_before) :]


async def test_server_without_idle_is_polled(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    has_capability = aioimaplib.IMAP4.has_capability
    monkeypatch.setattr(
        aioimaplib.IMAP4, "has_capability", lambda imap, name: name != "IDLE" and has_capability(imap, name)
    )
    monkeypatch.setattr(mail, "POLL_INTERVAL", 0.5)
    pair = Pair.make(lab, shared=True)
    async with accepting(lab, pair.acceptor) as acceptor:
        assert await invite(lab, pair.inviter) == ACCEPTOR_OFFER
        assert len(acceptor.invitations) == 1


# ---- refusal, and a bounded mailbox ------------------------------------------------------------------------


@dataclass
class Outcome:
    """How an invite ended: its error (if any), when mediator.invite() returned or raised, when it was left
    (time.monotonic())."""

    error: BaseException | None
    answered_at: float
    left_at: float


async def invite_outcome(lab: Lab, config: MailConfig, timeout: float = 30.0) -> Outcome:
    async def run() -> Outcome:
        error: BaseException | None = None
        async with Mediator(config) as mediator:
            try:
                await mediator.invite(INVITER_OFFER, timeout=timeout)
            except Exception as caught:  # raised again below, once the clean-up on leaving is measured
                error = caught
            answered_at = time.monotonic()
        return Outcome(error, answered_at, time.monotonic())

    return await lab.call("a", run)


async def assert_session_left_nothing(pair: Pair, mailboxes: dict[str, Mailbox], timeout: float = 10) -> None:
    """No message of this session's two routes in any mailbox (expunged, not just flagged)."""
    for box in mailboxes.values():
        await until(lambda box=box: box.with_subject(pair.tag) == [], timeout=timeout)  # type: ignore[misc]


REASON = "inner port 5000 is held by another program"


@pytest.mark.parametrize("shared", [False, True], ids=["two-accounts", "shared-mailbox"])
async def test_refusal_ends_the_wait_at_once(lab: Lab, mailboxes: dict[str, Mailbox], shared: bool) -> None:
    pair = Pair.make(lab, shared=shared)
    async with accepting(lab, pair.acceptor, refusal=REASON) as acceptor:
        outcome = await invite_outcome(lab, pair.inviter)
        assert [invitation.offer for invitation in acceptor.invitations] == [INVITER_OFFER]
    assert isinstance(outcome.error, PeerRefusedError), outcome.error
    assert str(outcome.error) == f"{pair.acceptor.host_id} cannot serve this request: {REASON}"
    delay = outcome.answered_at - acceptor.answered_at[0]
    cleanup = outcome.left_at - outcome.answered_at
    print(f"refusal accepted by SMTP -> PeerRefusedError: {delay:.3f} s; clean-up on leaving {cleanup:.3f} s")
    assert delay < 5
    await assert_session_left_nothing(pair, mailboxes)


async def test_refusal_with_smime(
    lab: Lab, mailboxes: dict[str, Mailbox], identities: dict[str, Any]
) -> None:
    pair = smime_pair(lab, identities)
    reason = "NAT\tturned \u00absymmetric\u00bb\r\nsince start " + "x" * 300
    async with accepting(lab, pair.acceptor, refusal=reason) as acceptor:
        outcome = await invite_outcome(lab, pair.inviter)
    assert isinstance(outcome.error, PeerRefusedError), outcome.error
    told = str(outcome.error).split(": ", 1)[1]
    assert told == message.sanitize_reason(reason) and told.startswith(
        "NAT turned ?symmetric? since start xx"
    )
    assert len(told) == 200
    print(f"S/MIME refusal -> PeerRefusedError: {outcome.answered_at - acceptor.answered_at[0]:.3f} s")
    assert outcome.answered_at - acceptor.answered_at[0] < 5
    await assert_session_left_nothing(pair, mailboxes)


async def test_refusal_of_another_request_does_not_end_the_wait(
    lab: Lab, mailboxes: dict[str, Mailbox], identities: dict[str, Any]
) -> None:
    """Refusals that do not answer this request are ignored: another puzzle (an old refusal replayed) and our
    puzzle but stale are consumed; one naming another request is left to that request's inviter."""
    pair = Pair.make(lab, shared=False)
    inviter_box = mailboxes["local"]
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    task = asyncio.ensure_future(invite_outcome(lab, pair.inviter, timeout=6))
    await until(lambda: bool(mailboxes["remote"].with_subject(pair.inviter.host_id)))
    ignored = [
        inviter_box.append(letter(pair.acceptor, "refusal", puzzle=9999)),
        inviter_box.append(letter(pair.acceptor, "refusal", puzzle=1111, date=old)),
    ]
    others = inviter_box.append(letter(pair.acceptor, "refusal", puzzle=1111, in_reply_to="<other@lab.test>"))
    outcome = await task
    assert isinstance(outcome.error, MailTimeoutError), outcome.error
    flags = inviter_box.flags()
    assert not set(ignored) & set(flags)  # consumed as the inviter left
    assert "\\Deleted" not in flags[others]
    inviter_box.purge([others])
    async with accepting(lab, pair.acceptor) as acceptor:  # finds the timed-out request at its start
        await assert_session_left_nothing(pair, mailboxes)
    assert acceptor.invitations == []


@pytest.mark.parametrize("shared", [False, True], ids=["two-accounts", "shared-mailbox"])
async def test_timed_out_invite_leaves_nothing(lab: Lab, mailboxes: dict[str, Mailbox], shared: bool) -> None:
    """The inviter removes its own request from a mailbox it reads; in the peer's mailbox the acceptor,
    started later, consumes it without answering."""
    pair = Pair.make(lab, shared=shared)
    outcome = await invite_outcome(lab, pair.inviter, timeout=3)
    assert isinstance(outcome.error, MailTimeoutError), outcome.error
    if shared:
        assert mailboxes["shared"].with_subject(pair.tag) == []
    else:
        assert len(mailboxes["remote"].with_subject(pair.tag)) == 1
        async with accepting(lab, pair.acceptor) as acceptor:
            await assert_session_left_nothing(pair, mailboxes)
            await asyncio.sleep(1)
        assert acceptor.invitations == [] and acceptor.answered == 0
    await assert_session_left_nothing(pair, mailboxes)


async def cancelled_within(task: asyncio.Future[Any]) -> float:
    """Cancel the task; the seconds until it has unwound (its clean-up included)."""
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - cancelled_at


async def test_interrupted_invite_leaves_nothing(lab: Lab, mailboxes: dict[str, Mailbox]) -> None:
    pair = Pair.make(lab, shared=True)
    box = mailboxes["shared"]
    # plexus mail from the acceptor's route that was there before: the inviter consumes it as it leaves
    earlier = [
        box.append(letter(pair.acceptor, "response", puzzle=5)),
        box.append(letter(pair.acceptor, "refusal")),
    ]
    task = asyncio.ensure_future(invite(lab, pair.inviter, timeout=30))
    await until(lambda: len(box.with_subject(pair.tag)) == 3)  # the request is in
    await asyncio.sleep(0.5)  # in IDLE by now
    stopped = await cancelled_within(task)
    print(f"interrupted inviter stopped (clean-up included) in {stopped:.3f} s")
    assert stopped < 1
    assert box.with_subject(pair.tag) == []
    assert not set(earlier) & set(box.flags())


async def test_cancelled_acceptor_stops_within_a_second(lab: Lab, mailboxes: dict[str, Mailbox]) -> None:
    """The lead cancels the acceptor's main task on SIGTERM; leaving the Mediator (clean-up included) must
    take well under 1 s, here with a request taken but not yet consumed."""
    pair = Pair.make(lab, shared=False)
    box = mailboxes["remote"]
    got = threading.Event()

    async def serve() -> None:
        async with Mediator(pair.acceptor) as mediator:
            async for _ in mediator.requests():
                got.set()
                await asyncio.Event().wait()  # a session that holds the loop here until cancelled

    async def idle() -> None:
        async with Mediator(pair.acceptor) as mediator:
            async for _ in mediator.requests():
                pass

    for work, request in ((idle, None), (serve, letter(pair.inviter))):
        got.clear()
        task = asyncio.ensure_future(lab.call("b", work))
        await asyncio.sleep(1.5)  # logged in, in IDLE
        if request is not None:
            box.append(request)
            await until(got.is_set, timeout=10)
        stopped = await cancelled_within(task)
        print(f"acceptor ({work.__name__}) stopped in {stopped:.3f} s")
        assert stopped < 1
    assert box.with_subject(pair.tag) == []  # the taken request was consumed while stopping


async def test_without_uidplus_messages_are_only_flagged(
    lab: Lab, mailboxes: dict[str, Mailbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab's Dovecot always offers UIDPLUS: hide it from plexus. Then what plexus consumes is flagged
    \\Deleted and nothing is expunged, not even by a plain EXPUNGE."""
    has_capability = aioimaplib.IMAP4.has_capability
    monkeypatch.setattr(
        aioimaplib.IMAP4,
        "has_capability",
        lambda imap, name: name != "UIDPLUS" and has_capability(imap, name),
    )
    pair = Pair.make(lab, shared=False)
    before = {name: box.flags() for name, box in mailboxes.items()}
    async with accepting(lab, pair.acceptor) as acceptor:
        assert await invite(lab, pair.inviter) == ACCEPTOR_OFFER
        assert len(acceptor.invitations) == 1
    for name, box in mailboxes.items():
        after = box.flags()
        ours = box.with_subject(pair.tag)
        assert len(ours) == (1 if name in ("local", "remote") else 0)
        for uid in ours:
            assert "\\Deleted" in after[uid]
        for uid, flags in before[name].items():
            assert after.get(uid) == flags  # nothing else changed, nothing expunged
        box.purge(ours)
