"""The mail drivers' pure parts: configuration checks, FETCH and SEARCH parsing, error classification; and,
against fake IMAP clients, what consuming sends and how long leaving may take."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plexus.endpoint import Endpoint
from plexus.errors import UsageError
from plexus.mediator import email as mail
from plexus.mediator.email import (
    Cursor,
    Fetched,
    Inbox,
    MailConfig,
    Mediator,
    _parse_fetch,
    _parse_search,
    _route_criteria,
    _uid_set,
    _unreachable,
    tls_context,
)
from plexus.mediator.message import Route

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
        "peer_id": "peer",
    }
    fields.update(changes)
    return MailConfig(**fields)  # type: ignore[arg-type]


def test_routes_point_at_each_other() -> None:
    mail = config()
    assert (mail.outgoing.sender, mail.outgoing.recipient, mail.outgoing.subject) == (
        "me@example.org",
        "peer@example.org",
        "me",
    )
    assert (mail.incoming.sender, mail.incoming.recipient, mail.incoming.subject) == (
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
    assert _route_criteria(Route("a@x.org", "b@x.org", 'host "1"\\')) == (
        'FROM "a@x.org" TO "b@x.org" SUBJECT "host \\"1\\"\\\\"'
    )
    assert _route_criteria(Route("a@x.org", "b@x.org", "hôte")) == 'FROM "a@x.org" TO "b@x.org"'


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
        'OR (UID 1:9 FROM "ME@example.org" TO "me@example.org" SUBJECT "peer") '
        '(HEADER Message-ID "<abc@example.org>")',
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
    assert imap.sent == [
        ("UID", "SEARCH", "NOT DELETED", 'UID 1:9 FROM "peer@example.org" TO "me@example.org" SUBJECT "peer"')
    ]
    assert "0 message(s) from peer arrived before the start" in caplog.text
