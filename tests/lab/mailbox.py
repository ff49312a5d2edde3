"""Direct IMAP access to a lab account, beside plexus: the mediator tests set the scene with it, and the tests
and the benchmark's soak count what plexus left in a mailbox."""

from __future__ import annotations

import datetime
import imaplib
import re
import ssl
from collections.abc import Callable
from typing import TypeVar

from tests.lab.lab import Account, Lab

T = TypeVar("T")


class Mailbox:
    """Direct IMAP access to one account, for setting the scene and checking what plexus left."""

    def __init__(self, lab: Lab, account: Account) -> None:
        self.lab = lab
        self.account = account

    def _session(self, work: Callable[[imaplib.IMAP4_SSL], T]) -> T:
        def run() -> T:
            context = ssl.create_default_context(cafile=str(self.lab.ca_file))
            with imaplib.IMAP4_SSL(Lab.MAIL_HOST, Lab.IMAPS_PORT, ssl_context=context, timeout=10) as imap:
                imap.login(self.account.login, self.account.password)
                imap.select("INBOX")
                return work(imap)

        return self.lab.run_sync("a", run)

    def append(self, raw: bytes, flags: str = "", arrived: datetime.datetime | None = None) -> int:
        """Put a message in INBOX as if delivered (at `arrived`: its INTERNALDATE); return its UID."""

        def work(imap: imaplib.IMAP4_SSL) -> int:
            when = imaplib.Time2Internaldate(arrived) if arrived is not None else None
            _, data = imap.append("INBOX", f"({flags})" if flags else None, when, raw)
            match = re.search(rb"APPENDUID \d+ (\d+)", data[0])
            assert match is not None, data
            return int(match.group(1))

        return self._session(work)

    def flags(self) -> dict[int, set[str]]:
        def work(imap: imaplib.IMAP4_SSL) -> dict[int, set[str]]:
            _, data = imap.uid("FETCH", "1:*", "(FLAGS)")
            found = {}
            for item in data:
                match = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)|FLAGS \(([^)]*)\) UID (\d+)", item or b"")
                if match:
                    uid = match.group(1) or match.group(4)
                    flags = match.group(2) if match.group(2) is not None else match.group(3)
                    found[int(uid)] = set(flags.decode().split())
            return found

        return self._session(work)

    def contents(self) -> dict[int, tuple[set[str], bytes]]:
        """Every message's flags and exact bytes, by UID."""

        def work(imap: imaplib.IMAP4_SSL) -> dict[int, tuple[set[str], bytes]]:
            _, data = imap.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
            found = {}
            for item in data:
                if not isinstance(item, tuple):
                    continue
                meta, raw = item
                uid = re.search(rb"UID (\d+)", meta)
                flags = re.search(rb"FLAGS \(([^)]*)\)", meta)
                assert uid is not None and flags is not None, meta
                found[int(uid.group(1))] = (set(flags.group(1).decode().split()), raw)
            return found

        return self._session(work)

    def with_subject(self, text: str) -> list[int]:
        def work(imap: imaplib.IMAP4_SSL) -> list[int]:
            _, data = imap.uid("SEARCH", "SUBJECT", f'"{text}"')
            return [int(uid) for uid in data[0].split()]

        return self._session(work)

    def purge(self, uids: list[int]) -> None:
        if not uids:
            return

        def work(imap: imaplib.IMAP4_SSL) -> None:
            uid_set = ",".join(map(str, uids))
            imap.uid("STORE", uid_set, "+FLAGS.SILENT", r"(\Deleted)")
            imap.uid("EXPUNGE", uid_set)

        self._session(work)
