"""The mail drivers' pure parts: configuration checks, FETCH and SEARCH parsing, error classification; and,
against fake IMAP clients, what consuming sends and how long leaving may take."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import gc
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plexus import events
from plexus.endpoint import Endpoint
from plexus.errors import UsageError
from plexus.identity import Identity
from plexus.mediator import email as mail
from plexus.mediator import message
from plexus.mediator.email import (
    Cursor,
    Fetched,
    Inbox,
    MailConfig,
    Mediator,
    _parse_fetch,
    _parse_search,
    _recipient_criteria,
    _uid_set,
    _unreachable,
    tls_context,
)
from plexus.mediator.message import Route
from plexus.peers import Peer, Roster
from plexus.rendezvous import Invitation, Offer

SERVER = Endpoint("203.0.113.10", 993)


def config(**changes: object) -> MailConfig:
    fields: dict[str, object] = {
        "smtp": Endpoint("203.0.113.10", 465),
        "imap": SERVER,
        "login": "me",
        "password": "secret",
        "address": "me@example.org",
        "peer_address": "peer@example.org",
        "host_id": "me",
    }
    fields.update(changes)
    peer_id = str(fields.pop("peer_id", "peer"))
    pinned = fields.pop("peer_identity", None)
    fields["peers"] = Roster.of(Peer(peer_id or "unnamed", id=peer_id, identity=pinned))  # type: ignore[arg-type]
    return MailConfig(**fields)  # type: ignore[arg-type]


def test_routes_point_at_each_other() -> None:
    mail = config()
    peer = mail.peers.peers.only
    assert (mail.outgoing(peer).sender, mail.outgoing(peer).recipient, mail.outgoing(peer).subject) == (
        "me@example.org",
        "peer@example.org",
        "me",
    )
    incoming = mail.incoming(peer)
    assert (incoming.sender, incoming.recipient, incoming.subject) == (
        "peer@example.org",
        "me@example.org",
        "peer",
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"host_id": "me\r\nBcc: x@y"},
        {"peer_id": ""},
        {"address": "me@x\n"},
        {"address": "a@x", "peer_address": "A@x", "peer_id": "me"},  # shared mailbox needs two ids
    ],
)
def test_bad_config_is_a_usage_error(changes: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        config(**changes)


def test_missing_ca_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="TLS files"):
        tls_context(config(ca=tmp_path / "missing.pem"))


def test_fetch_responses_as_aioimaplib_gives_them() -> None:
    lines = [
        b'1 FETCH (UID 7 FLAGS (\\Seen \\Flagged) INTERNALDATE "22-Nov-2026 04:00:00 +0000" '
        b"BODY[HEADER.FIELDS (FROM TO SUBJECT)] {12}",
        bytearray(b"Subject: x\r\n"),
        b")",
        b"2 FETCH (FLAGS () BODY[] {3}",
        bytearray(b"abc"),
        b" UID 9)",
        b"3 EXISTS",
        b"4 FETCH (FLAGS (\\Deleted))",  # unsolicited, no UID: not ours
        b"Fetch completed (0.001 + 0.000 secs).",
    ]
    first, second = _parse_fetch(lines)
    assert (first.uid, first.flags, first.data) == (7, frozenset({"\\seen", "\\flagged"}), b"Subject: x\r\n")
    assert first.arrived == datetime.datetime(2026, 11, 22, 4, 0, tzinfo=datetime.UTC)
    assert (second.uid, second.flags, second.arrived, second.data) == (9, frozenset(), None, b"abc")


def test_tls_failures_say_tls() -> None:
    try:
        raise OSError("connect failed") from ssl.SSLCertVerificationError(1, "certificate verify failed")
    except OSError as error:
        assert "TLS" in str(_unreachable("IMAP", SERVER, error))
    assert "cannot reach IMAP server 203.0.113.10:993" in str(
        _unreachable("IMAP", SERVER, ConnectionRefusedError(111, "Connection refused"))
    )


def test_cursor_skips_consumed_mail_and_after_a_rescan_old_mail() -> None:
    start = datetime.datetime(2026, 11, 22, 4, 0, tzinfo=datetime.UTC)
    before, after = start - datetime.timedelta(seconds=1), start + datetime.timedelta(seconds=1)
    cursor = Cursor(validity=1, next=5)
    assert cursor.counts(Fetched(5, frozenset({"\\seen"}), before, b""))
    assert not cursor.counts(Fetched(5, frozenset({"\\deleted"}), after, b""))
    rescan = Cursor(validity=2, next=1, arrived_after=start)
    assert rescan.counts(Fetched(1, frozenset(), after, b""))
    assert not rescan.counts(Fetched(1, frozenset(), before, b""))


def test_search_results_as_aioimaplib_gives_them() -> None:
    assert _parse_search([b"3 5 8", b"Search completed (0.001 + 0.000 secs)."]) == [3, 5, 8]
    assert _parse_search([b"", b"Search completed."]) == []
    assert _parse_search([b"SEARCH 9 2", b"OK"]) == [2, 9]
    assert _parse_search([b"Search completed (0.001 + 0.000 secs)."]) == []


@pytest.mark.parametrize(
    ("uids", "text"),
    [([7], "7"), ([3, 4, 5], "3:5"), ([9, 1, 2, 3, 7, 2], "1:3,7,9"), ([10, 12], "10,12")],
)
def test_uid_sets_name_exactly_the_uids(uids: list[int], text: str) -> None:
    assert _uid_set(uids) == text


@given(st.sets(st.integers(1, 500), min_size=1))
def test_uid_set_round_trip(uids: set[int]) -> None:
    named: set[int] = set()
    for part in _uid_set(sorted(uids)).split(","):
        first, _, last = part.partition(":")
        named |= set(range(int(first), int(last or first) + 1))
    assert named == uids


def test_search_criteria_quote_and_leave_out_what_imap_cannot_carry() -> None:
    assert _recipient_criteria('b"@x.org\\') == 'TO "b\\"@x.org\\\\"'
    assert _recipient_criteria("hôte@x.org") == ""


class FakeImap:
    """Just enough of aioimaplib.IMAP4 for Inbox: records commands, answers OK (or hangs, if told)."""

    def __init__(self, capabilities: set[str], hang: bool = False) -> None:
        self.protocol = type("Protocol", (), {"transport": None})()
        self.capabilities = capabilities
        self.sent: list[tuple[str, ...]] = []
        self.hang = hang

    def has_capability(self, name: str) -> bool:
        return name in self.capabilities

    def has_pending_idle(self) -> bool:
        return False

    async def uid(self, command: str, *args: str) -> Any:
        return await self._answer("UID", command.upper(), *args)

    async def uid_search(self, *criteria: str, charset: str | None = "utf-8") -> Any:
        return await self._answer("UID", "SEARCH", *criteria)

    async def logout(self) -> Any:
        return await self._answer("LOGOUT")

    async def _answer(self, *command: str) -> Any:
        self.sent.append(command)
        if self.hang:
            await asyncio.Event().wait()
        return type("Response", (), {"result": "OK", "lines": [b"OK"]})()


def inbox_with(imap: FakeImap) -> Inbox:
    inbox = Inbox(config(), ssl.create_default_context())
    inbox._imap = imap  # type: ignore[assignment]
    return inbox


@pytest.mark.parametrize("uidplus", [True, False])
async def test_consume_expunges_only_its_uids_and_only_with_uidplus(uidplus: bool) -> None:
    imap = FakeImap({"IMAP4rev1", "IDLE"} | ({"UIDPLUS"} if uidplus else set()))
    await inbox_with(imap).consume(4, 5, 6, 9)
    store = ("UID", "STORE", "4:6,9", "+FLAGS.SILENT", "(\\Deleted)")
    assert imap.sent == ([store, ("UID", "EXPUNGE", "4:6,9")] if uidplus else [store])
    assert all(command[1] != "EXPUNGE" or len(command) == 3 for command in imap.sent)  # never a plain EXPUNGE


async def test_consume_goes_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mail, "UID_CHUNK", 2)
    imap = FakeImap({"UIDPLUS"})
    await inbox_with(imap).consume(1, 2, 3, 5, 6)
    assert [command[2] for command in imap.sent] == ["1:2", "1:2", "3,5", "3,5", "6", "6"]


def mediator_with(imap: FakeImap, **changes: object) -> Mediator:
    """A Mediator whose IMAP connection is the fake, open, with the wait begun at UID 10."""
    mediator = Mediator(config(**changes))
    mediator._inbox = inbox_with(imap)
    mediator._cursor = Cursor(1, 10)
    mediator._start = Cursor(1, 10)
    return mediator


async def test_leaving_consumes_what_was_judged() -> None:
    imap = FakeImap({"UIDPLUS"})
    mediator = mediator_with(imap)
    mediator._pending = [12, 11]
    await mediator.__aexit__(None, None, None)
    assert imap.sent[:2] == [
        ("UID", "STORE", "11:12", "+FLAGS.SILENT", "(\\Deleted)"),
        ("UID", "EXPUNGE", "11:12"),
    ]


async def test_the_inviter_searches_the_earlier_mail_and_in_a_shared_mailbox_its_request() -> None:
    imap = FakeImap({"UIDPLUS"})
    mediator = mediator_with(imap, peer_address="ME@example.org")  # shared mailbox
    mediator._inviting, mediator._request_id = True, "<abc@example.org>"
    await mediator.__aexit__(None, None, None)
    assert imap.sent[0] == (
        "UID",
        "SEARCH",
        "NOT DELETED",
        'OR (UID 1:9 TO "me@example.org") (HEADER Message-ID "<abc@example.org>")',
    )


@pytest.mark.parametrize("cancelled", [False, True])
async def test_leaving_is_bounded_in_time(
    cancelled: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that never answers costs at most the budget, then a warning; never a hang."""
    assert mail.CANCELLED_CLEANUP_TIMEOUT <= 0.5 < mail.CLEANUP_TIMEOUT
    monkeypatch.setattr(mail, "CLEANUP_TIMEOUT", 0.3)
    monkeypatch.setattr(mail, "CANCELLED_CLEANUP_TIMEOUT", 0.1)
    budget = 0.1 if cancelled else 0.3
    imap = FakeImap({"UIDPLUS"}, hang=True)
    mediator = mediator_with(imap)
    mediator._pending = [11]
    started = time.monotonic()
    kind = asyncio.CancelledError if cancelled else None
    await mediator.__aexit__(kind, kind() if kind else None, None)
    assert budget <= time.monotonic() - started < budget + 1.0
    assert "clean-up not done" in caplog.text
    assert mediator._inbox._imap is None  # closed


async def test_leaving_cancelled_again_stops_at_once(caplog: pytest.LogCaptureFixture) -> None:
    imap = FakeImap({"UIDPLUS"}, hang=True)
    mediator = mediator_with(imap)
    mediator._pending = [11]
    task = asyncio.ensure_future(mediator.__aexit__(None, None, None))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert mediator._inbox._imap is None


async def test_the_acceptor_clears_earlier_mail_at_its_start(caplog: pytest.LogCaptureFixture) -> None:
    imap = FakeImap({"UIDPLUS"})
    mediator = mediator_with(imap)
    with caplog.at_level(logging.DEBUG):
        await mediator._clear_earlier_mail()
    assert imap.sent == [("UID", "SEARCH", "NOT DELETED", 'UID 1:9 TO "me@example.org"')]
    assert "0 message(s) from peers arrived before the start" in caplog.text


# ---- no message stops the loop -----------------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.UTC)
ROUTE_HEADERS = b"From: peer@example.org\r\nTo: me@example.org\r\nSubject: peer\r\n"


class FakeInbox:
    """Inbox as the Mediator's scan uses it: fixed new mail, bodies by UID, consumed UIDs recorded."""

    def __init__(self, items: list[tuple[Fetched, bytes]], earlier: list[Fetched] | None = None) -> None:
        self.items = items
        self.earlier = earlier or []  # what the start-up clean-up finds
        self.bodies = {item.uid: body for item, body in items}
        self.fetched: list[int] = []
        self.consumed: list[int] = []

    async def new_mail(self, cursor: Cursor) -> list[Fetched]:
        return [item for item, _ in self.items if item.uid >= cursor.next]

    async def body(self, uid: int) -> bytes | None:
        self.fetched.append(uid)
        return self.bodies.get(uid)

    async def consume(self, *uids: int) -> None:
        self.consumed += uids

    async def search(self, *criteria: str) -> list[int]:
        return [item.uid for item in self.earlier]

    async def headers(self, uids: Any) -> list[Fetched]:
        return [item for item in self.earlier if item.uid in uids]

    async def wait(self, timeout: float) -> None:
        await asyncio.Event().wait()


def arrived(uid: int, data: bytes, size: int | None = None) -> tuple[Fetched, bytes]:
    headers = data.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    return Fetched(uid, frozenset(), NOW, headers, len(data) if size is None else size), data


def request_mail(puzzle: int) -> bytes:
    # The time of the call, not of the import: in a whole run, the lab tests take minutes before this one.
    date = datetime.datetime.now(datetime.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000").encode()
    return ROUTE_HEADERS + b"Date: " + date + b"\r\n\r\nPLEXUS 2.1 request 198.51.100.2 40000 %d\r\n" % puzzle


def scanning(inbox: FakeInbox, **changes: object) -> Mediator:
    mediator = Mediator(config(**changes))
    mediator._inbox = inbox  # type: ignore[assignment]
    mediator._cursor = Cursor(1, 10)
    mediator._start = Cursor(1, 10)
    return mediator


async def test_each_message_is_judged_on_its_own(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = ROUTE_HEADERS + b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (level, level)
        for level in range(1000)
    )
    buggy = request_mail(99)
    inbox = FakeInbox(
        [
            arrived(10, b"From: x@y\r\nTo: me@example.org\r\nSubject: =?utf-8?b?a?=\r\n\r\nhi\r\n"),
            arrived(
                11, b"From: peer@example.org\r\nTo: me@example.org\r\nSubject: =?utf-8?b?a?=\r\n\r\nx\r\n"
            ),
            arrived(12, ROUTE_HEADERS + b"\r\n" + b"x" * 100, size=50_000_000),
            arrived(13, deep),
            arrived(14, buggy),
            arrived(15, request_mail(7)),
        ]
    )
    read = mail.message.read

    def reader_with_a_bug(raw: bytes, *args: Any) -> Any:
        if raw == buggy:
            raise RuntimeError("a bug in a parser")
        return read(raw, *args)

    monkeypatch.setattr(mail.message, "read", reader_with_a_bug)
    mediator = scanning(inbox)
    letters = [letter async for letter in mediator._scan("request", None, None)]
    assert [letter.puzzle for letter, _ in letters] == [7]
    assert sorted(inbox.consumed) == [12, 13, 14, 15]  # the route's, judged; 10 and 11 are not the route's
    assert 12 not in inbox.fetched  # over the size limit: consumed unread
    lines = [record.getMessage() for record in caplog.records if "UID" in record.getMessage()]
    assert len(lines) == 3 and not any(record.exc_info for record in caplog.records), lines
    assert "UID 12 from peer: 50000000 octets, over the 65536-octet limit" in lines[0]
    assert "UID 13 from peer: 1000 multipart or message entities" in lines[1]
    assert "UID 14 from peer: unreadable (RuntimeError: a bug in a parser)" in lines[2]


async def test_the_start_up_clean_up_passes_over_unreadable_headers(caplog: pytest.LogCaptureFixture) -> None:
    broken = Fetched(3, frozenset(), NOW, b"From: peer@example.org\r\nSubject: =?utf-8?b?a?=\r\n\r\n")
    nested = Fetched(4, frozenset(), NOW, ROUTE_HEADERS + b"multipart/" * 20 + b"\r\n\r\n")
    earlier = Fetched(5, frozenset(), NOW, ROUTE_HEADERS + b"\r\n")
    mediator = scanning(FakeInbox([], [broken, nested, earlier]))
    assert await mediator._earlier_mail(request_id=None) == [5]
    assert "passing over message UID 4: unreadable headers (20 multipart" in caplog.text


async def test_an_anonymous_acceptor_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    mediator = scanning(FakeInbox([]))
    requests = mediator.requests()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(requests), 0.2)
    assert caplog.text.count("mail from peer is anonymous") == 1


async def test_a_failed_imap_login_is_told_in_one_line_when_another_failure_ends_the_session(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STUN fails while the IMAP connection has failed too: both are told, neither with a traceback."""
    from plexus.errors import MailConnectionError, StunError

    async def unreachable(self: Inbox) -> Cursor:
        raise MailConnectionError("cannot reach IMAP server 203.0.113.10:993: refused")

    monkeypatch.setattr(Inbox, "open", unreachable)
    unretrieved: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: unretrieved.append(context))
    mediator = Mediator(config())
    with pytest.raises(StunError):
        async with mediator:
            await asyncio.sleep(0.05)  # the opening fails meanwhile
            raise StunError("no answer from the STUN server")
    del mediator
    gc.collect()
    assert unretrieved == []
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == [
        "cannot reach IMAP server 203.0.113.10:993: refused"
    ]


def test_mail_signing_needs_the_identity_and_the_pin() -> None:
    from plexus.identity import Identity

    me = Identity.ephemeral()
    pinned = config(identity=me, peer_identity="a" * 32)
    assert pinned.signer(pinned.peers.peers.only) is me.key
    unpinned = config(identity=me)  # a peer with no identity (plexus 2.2, say) is sent unsigned mail
    assert unpinned.signer(unpinned.peers.peers.only) is None
    with pytest.raises(UsageError, match="needs this host's --identity"):
        config(peer_identity="a" * 32)


async def test_an_exists_during_a_fetch_is_noted() -> None:
    """aioimaplib drops an untagged EXISTS that comes while a FETCH runs (it goes to the pending command it
    names); the wrapped entry for untagged lines notes it first, so the scan runs again before IDLE. Fails if
    aioimaplib stops reading untagged lines through `_untagged_response`."""
    import aioimaplib

    protocol = aioimaplib.IMAP4ClientProtocol(asyncio.get_running_loop(), None)
    protocol.state = aioimaplib.SELECTED
    fetch = aioimaplib.FetchCommand("A1", "1:*", "(UID)", loop=asyncio.get_running_loop())
    protocol.pending_async_commands[fetch.untagged_resp_name] = fetch
    inbox = Inbox(config(), ssl.create_default_context())
    mail._note_arrivals(type("Client", (), {"protocol": protocol})(), inbox)  # type: ignore[arg-type]
    protocol._handle_line(b"* 1 FETCH (UID 7)", None)
    assert not inbox.arrived
    protocol._handle_line(b"* 8 EXISTS", None)
    assert inbox.arrived
    assert not any(b"EXISTS" in bytes(line) for line in fetch.response.lines)  # what aioimaplib drops


# One acceptor, many peers

ME = Identity.ephemeral()
PHONE = Identity.ephemeral()
LAPTOP = Peer("laptop", id="laptop", email="laptop@example.org")  # unsigned mail, at its own address


def mail_from(subject: str, sender: str, puzzle: int, signer: Identity | None = None) -> bytes:
    return message.build(
        "request",
        Offer(Endpoint("198.51.100.2", 40000), puzzle),
        Route(sender, "me@example.org", subject),
        message_id=message.new_message_id(sender),
        date=datetime.datetime.now(datetime.UTC),
        signer=None if signer is None else signer.key,  # type: ignore[arg-type]
    )


def serving(inbox: FakeInbox, roster: Roster) -> Mediator:
    mediator = scanning(inbox, identity=ME)
    mediator._config = dataclasses.replace(mediator._config, peers=roster)
    return mediator


async def taken(mediator: Mediator, count: int) -> list[Invitation]:
    """The first `count` invitations, then one more scan of the mailbox, which finds nothing more."""
    requests = mediator.requests()
    invitations = [await asyncio.wait_for(anext(requests), 5) for _ in range(count)]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(requests), 0.2)
    return invitations


class FakeSmtp:
    """aiosmtplib.SMTP as a Submission uses it: each message's envelope recipient and data, in `delivered`."""

    delivered: list[tuple[str, bytes]]

    def __init__(self, **options: object) -> None:
        self.recipient = ""

    async def connect(self) -> None:
        pass

    async def mail(self, sender: str) -> None:
        pass

    async def rcpt(self, recipient: str) -> None:
        self.recipient = recipient

    async def data(self, data: bytes) -> None:
        self.delivered.append((self.recipient, data))

    async def quit(self) -> None:
        pass

    def close(self) -> None:
        pass


async def test_an_acceptor_serves_each_peer_by_mail_and_answers_each_at_its_address(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    phone = Peer("phone", id="phone", identity=PHONE.id)
    inbox = FakeInbox(
        [
            arrived(10, mail_from("laptop", "laptop@example.org", 9)),
            arrived(11, mail_from("phone", "peer@example.org", 10, signer=PHONE)),
            arrived(12, mail_from("tablet-1234567", "tablet@example.org", 11)),
        ]
    )
    mediator = serving(inbox, Roster.of(LAPTOP, phone))
    seen: list[events.Event] = []
    with events.reporting(seen.append, "accept"):
        from_laptop, from_phone = await taken(mediator, 2)
        assert [letter async for letter in mediator._scan("request", None, None)] == []
    assert (from_laptop.peer, from_laptop.offer.puzzle) == (LAPTOP, 9)
    assert (from_phone.peer, from_phone.offer.puzzle) == (phone, 10)
    assert from_phone.offer.signer is not None and from_laptop.offer.signer is None

    # A stranger's mail is another host's, maybe: left in the mailbox, logged once, its id whole.
    assert sorted(inbox.consumed) == [10, 11]
    logged = "message UID 12 (passed over) from 'tablet-1234567': not a peer of this host"
    assert caplog.text.count(logged) == 1
    assert [(e.source, e.reason) for e in seen if isinstance(e, events.Rejected)] == [
        ("mail", "'tablet-1234567' is not a peer of this host")
    ]

    monkeypatch.setattr(FakeSmtp, "delivered", [], raising=False)
    monkeypatch.setattr("aiosmtplib.SMTP", FakeSmtp)
    async with mediator.submission(LAPTOP) as submission:  # opened ahead, toward that peer's address
        await mediator.answer(from_laptop, Offer(Endpoint("203.0.113.5", 50000), 20), submission)
    await mediator.answer(from_phone, Offer(Endpoint("203.0.113.5", 50001), 21))
    (to_laptop, laptop_data), (to_phone, phone_data) = FakeSmtp.delivered
    assert (to_laptop, to_phone) == ("laptop@example.org", "peer@example.org")
    laptop_mail, phone_mail = message.parse_headers(laptop_data), message.parse_headers(phone_data)
    assert (laptop_mail["To"], laptop_mail["Subject"], phone_mail["To"]) == (
        "laptop@example.org",
        "me",
        "peer@example.org",
    )
    # Signed only toward the peer pinned by identity: the laptop may be plexus 2.2, which reads no signature.
    assert message.IDENTITY_HEADER not in laptop_mail
    response = message.read(phone_data, None, ME.id)
    assert response.offer is not None and response.offer.puzzle == 21 and response.in_reply_to is not None


async def test_a_peer_removed_by_a_reload_is_a_stranger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    file = tmp_path / "peers"
    file.write_text("laptop laptop email=laptop@example.org\nphone phone\n")
    roster = Roster((), file)
    first = FakeInbox([arrived(10, mail_from("laptop", "laptop@example.org", 9))])
    (invitation,) = await taken(serving(first, roster), 1)
    assert invitation.peer.name == "laptop" and first.consumed == [10]

    file.write_text("phone phone\n")
    roster.reload()
    later = FakeInbox([arrived(10, mail_from("laptop", "laptop@example.org", 9))])
    seen: list[events.Event] = []
    with events.reporting(seen.append, "accept"):
        await taken(serving(later, roster), 0)
    assert later.consumed == [] and later.fetched == []
    assert "message UID 10 (passed over) from 'laptop': not a peer of this host" in caplog.text
    assert [e.reason for e in seen if isinstance(e, events.Rejected)] == [
        "'laptop' is not a peer of this host"
    ]
