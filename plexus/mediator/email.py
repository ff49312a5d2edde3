"""Thin asyncio drivers around message.py: SMTP out (aiosmtplib), IMAP in (aioimaplib), and the Mediator.

The IMAP side keeps one connection open for the Mediator's life. It finds new mail by UID: the wait starts
at the UIDNEXT seen when it began, so mail that arrived earlier is never taken and mail that arrived while the
connection was down is still found after reconnecting. It sleeps in IDLE (renewed every 24 min, before the
29 min servers allow) and polls with NOOP only on a server without IDLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aioimaplib
import aiosmtplib

from plexus.endpoint import Endpoint
from plexus.errors import MailAuthError, MailConnectionError, MailTimeoutError, PlexusError, UsageError
from plexus.mediator import message, smime
from plexus.mediator.message import Kind, Letter, Offer, Route, Screen

log = logging.getLogger(__name__)

# Ports where the server expects plain text then STARTTLS (submission, relay); any other port gets implicit
# TLS, which is what plexus 2.2's --email-smtps always meant.
STARTTLS_PORTS = frozenset({25, 587})
COMMAND_TIMEOUT = 30.0
IDLE_RENEW = 24 * 60.0
POLL_INTERVAL = 5.0  # only for servers without IDLE
RECONNECT_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
_HEADER_FIELDS = "BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT)]"
_FETCH_START = re.compile(rb"^\d+ FETCH \(")
_LOST = [b"plexus: connection lost"]
T = TypeVar("T")


@dataclass(frozen=True)
class MailConfig:
    smtp: Endpoint
    imap: Endpoint
    login: str
    password: str
    address: str  # --email-from: this host's address
    peer_address: str  # --email-to: the peer's address
    host_id: str
    peer_id: str
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    smime: smime.SmimeConfig | None = None

    def __post_init__(self) -> None:
        for option, value in (
            ("--email-from", self.address),
            ("--email-to", self.peer_address),
            ("--host-id", self.host_id),
            ("--peer-id", self.peer_id),
            ("--email-login", self.login),
        ):
            if not value.strip() or any(c in value for c in "\r\n\0"):
                raise UsageError(f"{option} must be a non-empty single line")
        if self.host_id == self.peer_id and self.address.lower() == self.peer_address.lower():
            raise UsageError("--host-id and --peer-id must differ when both sides share one mailbox")

    @property
    def outgoing(self) -> Route:
        return Route(self.address, self.peer_address, self.host_id)

    @property
    def incoming(self) -> Route:
        return Route(self.peer_address, self.address, self.peer_id)


@dataclass(frozen=True)
class Invitation:
    """A fresh request, and what answering it needs."""

    offer: Offer
    message_id: str | None  # the request's, for the response's In-Reply-To


def tls_context(config: MailConfig) -> ssl.SSLContext:
    """Server certificates checked against --email-ca or the system store; --email-cert/--email-key sent."""
    try:
        context = ssl.create_default_context(cafile=str(config.ca) if config.ca else None)
        if config.cert is not None:
            context.load_cert_chain(config.cert, config.key)
    except (OSError, ssl.SSLError) as error:
        raise UsageError(f"cannot load the mail TLS files: {error}") from error
    return context


class Submission:
    """One SMTP session toward the peer, opened ahead of its message.

    Entering starts the connection, TLS, AUTH, MAIL FROM and RCPT TO in a task, so that they run while STUN
    finds what the message will say; deliver() waits for them, then sends DATA. QUIT goes out in the
    background: once DATA is accepted the message is the server's, and nobody need wait for the goodbye.
    """

    def __init__(self, config: MailConfig, context: ssl.SSLContext) -> None:
        self._config = config
        starttls = config.smtp.port in STARTTLS_PORTS
        self._client = aiosmtplib.SMTP(
            hostname=config.smtp.host,
            port=config.smtp.port,
            use_tls=not starttls,
            start_tls=starttls,  # True: STARTTLS required, the password never goes out in the clear
            tls_context=context,
            username=config.login,
            password=config.password,
            timeout=COMMAND_TIMEOUT,
        )
        self._opening: asyncio.Future[None] | None = None
        self._quitting: asyncio.Future[Any] | None = None

    async def __aenter__(self) -> Submission:
        self._opening = asyncio.ensure_future(self._smtp(self._open()))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()  # a session never used for DATA is dropped: nothing was sent
        for task in (self._opening, self._quitting):
            if task is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(task, COMMAND_TIMEOUT)
        self._client.close()

    async def _open(self) -> None:
        await self._client.connect()
        await self._client.mail(self._config.address)
        await self._client.rcpt(self._config.peer_address)

    async def deliver(self, data: bytes) -> None:
        """Send the message once the session is ready; returns when the server has accepted it."""
        assert self._opening is not None, "Submission used outside `async with`"
        await self._opening
        await self._smtp(self._client.data(data))
        self._quitting = asyncio.ensure_future(self._client.quit())

    async def _smtp(self, call: Awaitable[T]) -> T:
        """aiosmtplib's failures as plexus's: auth, refusal, or the server out of reach."""
        server, login = self._config.smtp, self._config.login
        try:
            return await call
        except aiosmtplib.SMTPAuthenticationError as error:
            raise MailAuthError(
                f"SMTP server {server} refused the login {login!r}: {error.message}"
            ) from error
        except aiosmtplib.SMTPResponseException as error:
            raise PlexusError(f"SMTP server {server} refused the message: {error}") from error
        except (aiosmtplib.SMTPException, OSError) as error:
            raise _unreachable("SMTP", server, error) from error


async def send(config: MailConfig, context: ssl.SSLContext, data: bytes) -> None:
    """Deliver one message on its own SMTP session."""
    async with Submission(config, context) as submission:
        await submission.deliver(data)


def _unreachable(protocol: str, server: Endpoint, error: BaseException) -> MailConnectionError:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or cause
            return MailConnectionError(f"TLS with {protocol} server {server} failed: {reason}")
        cause = cause.__cause__ or cause.__context__
    return MailConnectionError(f"cannot reach {protocol} server {server}: {error or type(error).__name__}")


class _Dropped(Exception):
    """The IMAP connection is gone or confused: reconnect."""


@dataclass
class Cursor:
    """Where the wait begins: the first UID that counts, under one UIDVALIDITY."""

    validity: int
    next: int
    # Set after UIDVALIDITY changed: UIDs no longer tell old mail from new, the arrival time must.
    arrived_after: datetime.datetime | None = None

    def counts(self, item: Fetched) -> bool:
        """Whether a message past the cursor is for this wait: not consumed (\\Deleted), arrived in time."""
        if "\\deleted" in item.flags:
            return False
        return self.arrived_after is None or item.arrived is None or item.arrived >= self.arrived_after


@dataclass(frozen=True)
class Fetched:
    uid: int
    flags: frozenset[str]
    arrived: datetime.datetime | None
    data: bytes


class Inbox:
    """One IMAP connection to INBOX over TLS."""

    def __init__(self, config: MailConfig, context: ssl.SSLContext) -> None:
        self._config = config
        self._context = context
        self._imap: aioimaplib.IMAP4 | None = None
        self._dropped = asyncio.Event()

    async def open(self) -> Cursor:
        """Connect, log in, select INBOX; the returned cursor points past everything already there."""
        server = self._config.imap
        self._dropped = asyncio.Event()
        dropped = self._dropped
        imap: aioimaplib.IMAP4 = aioimaplib.IMAP4(
            host=server.host,
            port=server.port,
            timeout=COMMAND_TIMEOUT,
            conn_lost_cb=lambda _: self._lose(imap, dropped),
            ssl_context=self._context,
        )
        self._imap = imap
        try:
            try:
                await imap.wait_hello_from_server()
                response = await imap.login(self._config.login, self._config.password)
            except (aioimaplib.AioImapException, OSError, TimeoutError) as error:
                raise _unreachable("IMAP", server, error) from error
            if response.result != "OK":
                text = _text(response.lines)
                raise MailAuthError(f"IMAP server {server} refused the login {self._config.login!r}: {text}")
            return await self.select()
        except BaseException:  # cancelled too: the Mediator may be left before its connection is up
            self.close()
            raise

    async def select(self) -> Cursor:
        """(Re)select INBOX: a fresh UIDNEXT marks the start of a wait."""
        response = await self._command(self._client().select("INBOX"))
        lines = _text(response.lines)
        validity = re.search(r"\[UIDVALIDITY (\d+)\]", lines)
        uidnext = re.search(r"\[UIDNEXT (\d+)\]", lines)
        if response.result != "OK" or validity is None or uidnext is None:
            raise MailConnectionError(f"IMAP server {self._config.imap} cannot open INBOX: {lines}")
        return Cursor(int(validity.group(1)), int(uidnext.group(1)))

    def close(self) -> None:
        """Drop the connection without a goodbye: used on errors and when done."""
        imap, self._imap = self._imap, None
        transport = imap.protocol.transport if imap is not None else None
        if transport is not None:
            transport.close()

    async def logout(self) -> None:
        """Say goodbye if the connection is idle; an interrupted IDLE or a dead connection is just closed."""
        with contextlib.suppress(_Dropped):
            imap = self._client()
            if not imap.has_pending_idle():
                await self._command(imap.logout(), timeout=5.0)
        self.close()

    async def new_mail(self, cursor: Cursor) -> list[Fetched]:
        """Headers, flags and arrival of the messages at or past the cursor, oldest first."""
        response = await self._command(
            self._client().uid("fetch", f"{cursor.next}:*", f"(UID FLAGS INTERNALDATE {_HEADER_FIELDS})")
        )
        # "n:*" always includes the last message, even below n.
        found = [item for item in _parse_fetch(response.lines) if item.uid >= cursor.next]
        return sorted(found, key=lambda item: item.uid)

    async def body(self, uid: int) -> bytes | None:
        """The whole message, fetched with PEEK so it stays unseen."""
        response = await self._command(self._client().uid("fetch", str(uid), "(UID BODY.PEEK[])"))
        return next((item.data for item in _parse_fetch(response.lines) if item.uid == uid), None)

    async def consume(self, uid: int) -> None:
        """Flag one message \\Deleted and, with UIDPLUS, expunge just that UID (a plain EXPUNGE would also
        remove whatever other clients flagged \\Deleted and meant to keep for now)."""
        imap = self._client()
        await self._command(imap.uid("store", str(uid), "+FLAGS.SILENT", "(\\Deleted)"))
        if imap.has_capability("UIDPLUS"):
            await self._command(imap.uid("expunge", str(uid)))

    async def wait(self, timeout: float) -> None:
        """Sleep until the server reports a change (IDLE) or, without IDLE, for one poll interval."""
        imap = self._client()
        if not imap.has_capability("IDLE"):
            await asyncio.sleep(min(timeout, POLL_INTERVAL))
            await self._command(imap.noop())
            return
        period = min(timeout, IDLE_RENEW)
        idle = await self._command(imap.idle_start(timeout=period))
        try:
            pushed = await self._command(
                imap.wait_server_push(timeout=period + COMMAND_TIMEOUT), timeout=None
            )
            if pushed is _LOST:
                raise _Dropped("connection lost")
            imap.idle_done()
            await self._command(idle)
        finally:
            idle.cancel()

    def _client(self) -> aioimaplib.IMAP4:
        if self._imap is None or self._dropped.is_set():
            raise _Dropped("connection lost")
        return self._imap

    async def _command(self, call: Awaitable[T], timeout: float | None = COMMAND_TIMEOUT) -> T:
        """Run one IMAP call; a lost connection, a timeout or a protocol error all mean: reconnect."""
        task = asyncio.ensure_future(call)
        lost = asyncio.ensure_future(self._dropped.wait())
        try:
            done, _ = await asyncio.wait({task, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                raise _Dropped("connection lost" if lost in done else "no answer in time")
            return task.result()
        except (aioimaplib.AioImapException, OSError, TimeoutError) as error:
            raise _Dropped(str(error) or type(error).__name__) from error
        finally:
            task.cancel()
            lost.cancel()

    @staticmethod
    def _lose(imap: aioimaplib.IMAP4, dropped: asyncio.Event) -> None:
        dropped.set()
        imap.protocol.idle_queue.put_nowait(_LOST)


class Mediator:
    """The mail rendezvous. Entering it starts opening the IMAP connection; `ready()` waits until it is open,
    which is when the wait for mail begins: what arrived before does not count."""

    def __init__(self, config: MailConfig) -> None:
        self._config = config
        self._keys = smime.Keys.load(config.smime) if config.smime else None
        self._context = tls_context(config)
        self._inbox = Inbox(config, self._context)
        self._screen = Screen()
        self._opening: asyncio.Future[Cursor] | None = None
        self._cursor: Cursor | None = None
        self._taken: list[int] = []  # UIDs of letters handed out but not yet flagged as consumed
        self._started = datetime.datetime.now(datetime.UTC)

    async def __aenter__(self) -> Mediator:
        self._started = datetime.datetime.now(datetime.UTC)
        self._opening = asyncio.ensure_future(self._inbox.open())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._opening
        await self._consume_taken()
        await self._inbox.logout()

    async def ready(self) -> None:
        """Wait until the mailbox watch is in place; raises the login's or the connection's failure."""
        if self._cursor is None:
            assert self._opening is not None, "Mediator used outside `async with`"
            self._cursor = await self._opening

    def submission(self) -> Submission:
        """An SMTP session to open ahead of the message (see Submission)."""
        return Submission(self._config, self._context)

    async def invite(
        self, offer: Offer, timeout: float = 60.0, submission: Submission | None = None
    ) -> Offer:
        """Send the request and wait for the response that answers it."""
        deadline = asyncio.get_running_loop().time() + timeout
        # Only a response that arrives after the request counts: the watch is in place before DATA.
        await self.ready()
        message_id = message.new_message_id(self._config.address)
        await self._send("request", offer, message_id, submission=submission)
        log.info("request sent to %s (%s), waiting for the response", self._config.peer_id, message_id)
        async with contextlib.aclosing(self._letters("response", deadline, reply_to=message_id)) as letters:
            async for letter in letters:
                return letter.offer
        raise MailTimeoutError(f"no response from {self._config.peer_id} within {timeout:g} s")

    async def requests(self) -> AsyncIterator[Invitation]:
        """Each fresh request from the peer, forever."""
        await self.ready()
        log.info("waiting for requests from %s", self._config.peer_id)
        async for letter in self._letters("request", None):
            yield Invitation(letter.offer, letter.message_id)

    async def answer(
        self, invitation: Invitation, offer: Offer, submission: Submission | None = None
    ) -> None:
        await self._send(
            "response",
            offer,
            message.new_message_id(self._config.address),
            invitation.message_id,
            submission=submission,
        )
        log.info("response sent to %s", self._config.peer_id)

    async def _send(
        self,
        kind: Kind,
        offer: Offer,
        message_id: str,
        in_reply_to: str | None = None,
        *,
        submission: Submission | None,
    ) -> None:
        data = message.build(
            kind,
            offer,
            self._config.outgoing,
            message_id=message_id,
            date=datetime.datetime.now(datetime.UTC),
            in_reply_to=in_reply_to,
            keys=self._keys,
        )
        if submission is None:
            await send(self._config, self._context, data)
        else:
            await submission.deliver(data)

    async def _letters(
        self, kind: Kind, deadline: float | None, reply_to: str | None = None
    ) -> AsyncGenerator[Letter]:
        """Admitted letters of this kind from past the cursor, each consumed; ends at the deadline."""
        loop = asyncio.get_running_loop()
        while deadline is None or loop.time() < deadline:
            try:
                async for letter in self._scan(kind, reply_to):
                    yield letter
                remaining = IDLE_RENEW if deadline is None else deadline - loop.time()
                if remaining > 0:
                    await self._inbox.wait(remaining)
            except _Dropped as error:
                log.warning("IMAP connection to %s lost (%s): reconnecting", self._config.imap, error)
                await self._reopen(deadline)

    async def _scan(self, kind: Kind, reply_to: str | None) -> AsyncGenerator[Letter]:
        cursor = self._cursor
        assert cursor is not None, "Mediator used outside `async with`"
        for item in await self._inbox.new_mail(cursor):
            letter = await self._take(item, kind, reply_to) if cursor.counts(item) else None
            cursor.next = item.uid + 1  # only once handled: after a drop mid-way this message is seen again
            if letter is not None:
                self._taken.append(item.uid)
                yield letter
                await self._consume_taken()

    async def _take(self, item: Fetched, kind: Kind, reply_to: str | None) -> Letter | None:
        if not self._config.incoming.matches(message.parse_headers(item.data)):
            return None
        data = await self._inbox.body(item.uid)
        if data is None:  # expunged meanwhile by someone else
            return None
        try:
            letter = message.read(data, self._keys)
            self._screen.admit(letter, kind, datetime.datetime.now(datetime.UTC), reply_to)
        except (message.MessageError, smime.SmimeError) as error:
            log.warning("ignoring message UID %d from %s: %s", item.uid, self._config.peer_id, error)
            return None
        log.info("%s from %s: outer endpoint %s", kind, self._config.peer_id, letter.offer.outer)
        return letter

    async def _consume_taken(self) -> None:
        """Flag the letters handed out as consumed: after the hand-over, so that the session goes on meanwhile
        (the acceptor's, as its loop turns; the inviter's, when it leaves the Mediator after the launch)."""
        while self._taken:
            uid = self._taken.pop(0)
            try:
                await self._inbox.consume(uid)
            except _Dropped as error:  # the letter is taken all the same; its puzzle is remembered
                log.warning("could not flag message UID %d as consumed: %s", uid, error)

    async def _reopen(self, deadline: float | None) -> Cursor:
        """Reconnect until it works or the deadline passes; return the new connection's cursor.

        The wait's own cursor stays, so mail that arrived meanwhile is found, unless UIDVALIDITY changed."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            self._inbox.close()
            try:
                fresh = await self._inbox.open()
                break
            except (MailConnectionError, _Dropped) as error:
                delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                if deadline is not None and loop.time() + delay >= deadline:
                    raise MailTimeoutError(
                        f"no response from {self._config.peer_id}: IMAP server unreachable ({error})"
                    ) from error
                log.warning("IMAP reconnect failed (%s), retrying in %g s", error, delay)
                await asyncio.sleep(delay)
                attempt += 1
        if self._cursor is not None and self._cursor.validity != fresh.validity:
            log.warning("INBOX UIDVALIDITY changed: rescanning mail that arrived since %s", self._started)
            self._cursor = Cursor(fresh.validity, 1, arrived_after=self._started)
        return fresh


@dataclass(frozen=True)
class _Record:
    meta: bytes
    data: bytes


def _parse_fetch(lines: list[Any]) -> list[Fetched]:
    """FETCH responses as aioimaplib hands them over: a line, maybe a literal, then the line closing it."""
    records: list[_Record] = []
    meta = b""
    literal = b""
    for line in lines:
        if isinstance(line, bytearray):
            literal = bytes(line)
        elif _FETCH_START.match(line):
            if meta:
                records.append(_Record(meta, literal))
            meta, literal = line, b""
        elif meta:
            meta += b" " + line
    if meta:
        records.append(_Record(meta, literal))
    found = []
    for record in records:
        uid = re.search(rb"\bUID (\d+)", record.meta)
        if uid is None:
            continue
        flags = re.search(rb"\bFLAGS \(([^)]*)\)", record.meta)
        arrived = re.search(rb'\bINTERNALDATE "([^"]+)"', record.meta)
        found.append(
            Fetched(
                uid=int(uid.group(1)),
                flags=frozenset(flags.group(1).decode("ascii", "replace").lower().split() if flags else ()),
                arrived=_internaldate(arrived.group(1).decode("ascii", "replace")) if arrived else None,
                data=record.data,
            )
        )
    return found


def _internaldate(text: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return None


def _text(lines: list[Any]) -> str:
    return " ".join(bytes(line).decode("utf-8", "replace") for line in lines)
