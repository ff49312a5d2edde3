"""The mail drivers' pure parts: configuration checks, FETCH parsing, error classification."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest

from plexus.endpoint import Endpoint
from plexus.errors import UsageError
from plexus.mediator.email import Cursor, Fetched, MailConfig, _parse_fetch, _unreachable, tls_context

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
