"""Thin asyncio drivers around message.py: SMTP out (aiosmtplib), IMAP in (aioimaplib), and the Mediator.

The IMAP side keeps one connection open for the Mediator's life. It finds new mail by UID: the wait starts
at the UIDNEXT seen when it began, so mail that arrived earlier is never taken and mail that arrived while the
connection was down is still found after reconnecting. It sleeps in IDLE (renewed every 24 min, before the
29 min servers allow) and polls with NOOP only on a server without IDLE.

It keeps the mailbox bounded: every message from the peer's route that it judged, taken or ignored, is
consumed (flagged \\Deleted, then expunged by UID with UIDPLUS); so is the route's mail that arrived before a
wait began (the acceptor clears it as it starts, the inviter as it leaves), and the inviter's own request when
it lands in a mailbox the inviter reads. An inviter leaves alone a fresh answer to another request: another
session from the same account waits for it. Nothing else is touched.

No message stops the loop: each is judged on its own (route, size, then message.read and the Screen, or for
a rebind the Rebinds of the running sessions, which it is handed to), and whatever judging it raises is
logged once, with its UID, and the message is consumed if it is the peer's route (a message whose headers
cannot be read is not) or else left. A message over message.MAX_MESSAGE (its RFC822.SIZE, fetched with the
headers) is consumed unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import logging
import re
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aioimaplib
import aiosmtplib
from cryptography.hazmat.primitives.asymmetric import ec

from plexus import events
from plexus import identity as identities  # a module: plexus.identity imports this package
from plexus.endpoint import Endpoint
from plexus.errors import (
    MailAuthError,
    MailConnectionError,
    MailTimeoutError,
    PeerRefusedError,
    PlexusError,
    UsageError,
)
from plexus.mediator import message, smime
from plexus.mediator.message import Content, Kind, Letter, Refusal, Route, Screen
from plexus.peers import Peer, Peers, Roster
from plexus.rendezvous import (
    CLOCK_TOLERANCE,
    Offer,
    Rebind,
    RebindError,
    RebindKey,
    Rebinds,
    Rebound,
    Strangers,
)
from plexus.rendezvous import Invitation as Invitation  # re-exported: it lived here

log = logging.getLogger(__name__)

# Ports where the server expects plain text then STARTTLS (submission, relay); any other port gets implicit
# TLS, which is what plexus 2.2's --email-smtps always meant.
STARTTLS_PORTS = frozenset({25, 587})
COMMAND_TIMEOUT = 30.0
IDLE_RENEW = 24 * 60.0
POLL_INTERVAL = 5.0  # only for servers without IDLE
RECONNECT_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
# Leaving the Mediator: how long the mailbox clean-up (and LOGOUT) may take before it is given up (warning).
CLEANUP_TIMEOUT = 3.0
# The same when leaving by cancellation (SIGTERM, Ctrl-C): an acceptor must be gone within 1 s of SIGTERM.
CANCELLED_CLEANUP_TIMEOUT = 0.5
UID_CHUNK = 200  # UIDs per FETCH, STORE or EXPUNGE command: keeps command lines short
# Partial fetches (<0.n>): a crafted header or body costs at most the size limit, never the whole message.
_HEADER_FIELDS = f"BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT IN-REPLY-TO)]<0.{message.MAX_MESSAGE}>"
_ID_FIELDS = (
    f"INTERNALDATE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT MESSAGE-ID IN-REPLY-TO)]<0.{message.MAX_MESSAGE}>"
)
_SEARCH = re.compile(rb"^(?:\* )?SEARCH\b(.*)$", re.IGNORECASE)
_ATOM_SAFE = re.compile(r"[ -~]*")  # what goes into a quoted IMAP string as is
_FETCH_START = re.compile(rb"^\d+ FETCH \(")
_LOST = [b"plexus: connection lost"]
T = TypeVar("T")


@dataclass(frozen=True)
class MailConfig:
    smtp: Endpoint
    imap: Endpoint
    login: str
    password: str = field(repr=False)  # a config printed or logged must not show it
    address: str  # --email-from: this host's address
    peer_address: str  # --email-to: the peers' address, where a peer names no other (email= in --peers)
    host_id: str
    # The peers met by mail: those with an id (--peer-id, --peers); an inviter has one. A peer with an
    # identity signs its mail with it, and is sent mail signed with --identity.
    peers: Roster
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    smime: smime.SmimeConfig | None = None
    identity: identities.Identity | None = None  # --identity: signs the mail to a peer that has one

    def __post_init__(self) -> None:
        for option, value in (
            ("--email-from", self.address),
            ("--email-to", self.peer_address),
            ("--host-id", self.host_id),
            ("--email-login", self.login),
        ):
            if not value.strip() or any(c in value for c in "\r\n\0"):
                raise UsageError(f"{option} must be a non-empty single line")
        self.peers.check(functools.partial(check_peers, self))

    def open(self) -> Mediator:
        """The rendezvous by mail (plexus.rendezvous.Rendezvous)."""
        return Mediator(self)

    def signer(self, peer: Peer) -> ec.EllipticCurvePrivateKey | None:
        """What signs the mail to `peer`: --identity, toward a peer pinned by identity."""
        key = self.identity.key if self.identity is not None and peer.identity is not None else None
        return key if isinstance(key, ec.EllipticCurvePrivateKey) else None

    def outgoing(self, peer: Peer) -> Route:
        return Route(self.address, peer.email or self.peer_address, self.host_id)

    def incoming(self, peer: Peer) -> Route:
        assert peer.id is not None, "a peer met by mail has an id"
        return Route(peer.email or self.peer_address, self.address, peer.id)


def check_peers(config: MailConfig, peers: Peers) -> None:
    """UsageError for peers this mailbox cannot serve: an id that is not one line, this host's own route, or
    a peer pinned by identity without --identity to sign the mail to it. At start, and for each reload."""
    for peer in peers.known:
        if peer.id is None:
            continue
        if not peer.id.strip() or any(c in peer.id for c in "\r\n\0"):
            raise UsageError(f"the peer id {peer.id[:60]!r} must be a non-empty single line")
        if peer.id == config.host_id and config.incoming(peer).sender.lower() == config.address.lower():
            raise UsageError("--host-id and --peer-id must differ when both sides share one mailbox")
        if peer.identity is not None and not isinstance(
            config.identity.key if config.identity else None, ec.EllipticCurvePrivateKey
        ):
            raise UsageError(
                f"peer {peer.name} is pinned by identity: mail signing needs this host's --identity too "
                "(a P-256 key)"
            )


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
    """One SMTP session toward a peer's address (`recipient`), opened ahead of its message.

    Entering starts the connection, TLS, AUTH, MAIL FROM and RCPT TO in a task, so that they run while STUN
    finds what the message will say; deliver() waits for them, then sends DATA. QUIT goes out in the
    background: once DATA is accepted the message is the server's, and nobody need wait for the goodbye.
    """

    def __init__(self, config: MailConfig, context: ssl.SSLContext, recipient: str) -> None:
        self._config = config
        self._recipient = recipient
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
        await self._client.rcpt(self._recipient)

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


async def send(config: MailConfig, context: ssl.SSLContext, data: bytes, recipient: str) -> None:
    """Deliver one message to `recipient` on its own SMTP session."""
    async with Submission(config, context, recipient) as submission:
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


class _Moved(_Dropped):
    """The IMAP connection was dropped on purpose: this side's network changed (Inbox.drop)."""


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
    size: int | None = None  # RFC822.SIZE, when fetched


class Inbox:
    """One IMAP connection to INBOX over TLS."""

    def __init__(self, config: MailConfig, context: ssl.SSLContext) -> None:
        self._config = config
        self._context = context
        self._imap: aioimaplib.IMAP4 | None = None
        self._dropped = asyncio.Event()
        self._idling = False  # an IDLE was started and its DONE not yet sent
        self._moved = False  # the connection was dropped because this side moved (drop)
        # The server reported new mail (an untagged EXISTS) since the scan began: look again before sleeping
        self.arrived = False

    async def open(self) -> Cursor:
        """Connect, log in, select INBOX; the returned cursor points past everything already there."""
        server = self._config.imap
        self._dropped = asyncio.Event()
        self._idling = False
        self._moved = False
        dropped = self._dropped
        imap: aioimaplib.IMAP4 = aioimaplib.IMAP4(
            host=server.host,
            port=server.port,
            timeout=COMMAND_TIMEOUT,
            conn_lost_cb=lambda _: self._lose(imap, dropped),
            ssl_context=self._context,
        )
        _note_arrivals(imap, self)
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
            self._client().uid(
                "fetch", f"{cursor.next}:*", f"(UID FLAGS INTERNALDATE RFC822.SIZE {_HEADER_FIELDS})"
            )
        )
        # "n:*" always includes the last message, even below n.
        found = [item for item in _parse_fetch(response.lines) if item.uid >= cursor.next]
        return sorted(found, key=lambda item: item.uid)

    async def body(self, uid: int) -> bytes | None:
        """The whole message, fetched with PEEK so it stays unseen; past the size limit, only enough of it to
        tell that it is too large."""
        section = f"BODY.PEEK[]<0.{message.MAX_MESSAGE + 1}>"
        response = await self._command(self._client().uid("fetch", str(uid), f"(UID {section})"))
        return next((item.data for item in _parse_fetch(response.lines) if item.uid == uid), None)

    async def consume(self, *uids: int) -> None:
        """Flag these messages \\Deleted and, with UIDPLUS, expunge just these UIDs (a plain EXPUNGE would
        also remove whatever other clients flagged \\Deleted and meant to keep for now). Without UIDPLUS they
        stay flagged until some client expunges. UID EXPUNGE removes only flagged messages of the set, so a
        failed STORE leaves its messages in place."""
        imap = self._client()
        for chunk in _chunks(uids):
            uid_set = _uid_set(chunk)
            await self._command(imap.uid("store", uid_set, "+FLAGS.SILENT", "(\\Deleted)"))
            if imap.has_capability("UIDPLUS"):
                await self._command(imap.uid("expunge", uid_set))

    async def search(self, *criteria: str) -> list[int]:
        """UID SEARCH with ASCII criteria (no CHARSET); a server's NO or BAD is logged and finds nothing."""
        response = await self._command(self._client().uid_search(*criteria, charset=None))
        if response.result != "OK":
            log.warning("IMAP server %s refused UID SEARCH: %s", self._config.imap, _text(response.lines))
            return []
        return _parse_search(response.lines)

    async def headers(self, uids: Iterable[int]) -> list[Fetched]:
        """Flags, arrival and From, To, Subject, Message-ID and In-Reply-To of these messages (PEEK: they stay
        unseen)."""
        found: list[Fetched] = []
        for chunk in _chunks(uids):
            response = await self._command(
                self._client().uid("fetch", _uid_set(chunk), f"(UID FLAGS {_ID_FIELDS})")
            )
            found += [item for item in _parse_fetch(response.lines) if item.uid in chunk]
        return found

    async def wait(self, timeout: float) -> None:
        """Sleep until the server reports a change (IDLE) or, without IDLE, for one poll interval."""
        imap = self._client()
        if not imap.has_capability("IDLE"):
            await asyncio.sleep(min(timeout, POLL_INTERVAL))
            await self._command(imap.noop())
            return
        period = min(timeout, IDLE_RENEW)
        self._idling = True
        try:
            idle = await self._command(imap.idle_start(timeout=period))
            try:
                pushed = await self._command(
                    imap.wait_server_push(timeout=period + COMMAND_TIMEOUT), timeout=None
                )
                if pushed is _LOST:
                    raise self._lost()
                self.end_idle()
                await self._command(idle)
            finally:
                idle.cancel()
        finally:
            self.end_idle()  # left mid-IDLE (cancelled): end it, or the clean-up's commands would wait on it

    def end_idle(self) -> None:
        """Send DONE, once, for an IDLE still running; commands issued next run once the server ends it."""
        if not self._idling:
            return
        self._idling = False
        imap = self._imap
        if imap is not None and not self._dropped.is_set() and imap.has_pending_idle():
            with contextlib.suppress(Exception):
                imap.idle_done()

    def _client(self) -> aioimaplib.IMAP4:
        if self._imap is None or self._dropped.is_set():
            raise self._lost()
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

    def drop(self) -> None:
        """Count the connection as lost now (its TCP connection went through a NAT that has just mapped this
        side anew, so nothing will ever come on it, and nothing says so): the wait reconnects."""
        if self._imap is not None and not self._dropped.is_set():
            self._moved = True
            self._lose(self._imap, self._dropped)

    def _lost(self) -> _Dropped:
        if self._moved:
            return _Moved("this side's network changed")
        return _Dropped("connection lost")

    @staticmethod
    def _lose(imap: aioimaplib.IMAP4, dropped: asyncio.Event) -> None:
        dropped.set()
        imap.protocol.idle_queue.put_nowait(_LOST)


class Mediator:
    """The mail rendezvous. Entering it starts opening the IMAP connection; `ready()` waits until it is open,
    which is when the wait for mail begins: what arrived before does not count.

    Leaving it cleans the mailbox up (see the module's docstring), within CLEANUP_TIMEOUT (when leaving by
    cancellation, CANCELLED_CLEANUP_TIMEOUT), then logs out."""

    def __init__(self, config: MailConfig) -> None:
        self._config = config
        self._keys = smime.Keys.load(config.smime) if config.smime else None
        self._context = tls_context(config)
        self._inbox = Inbox(config, self._context)
        self._screen = Screen()
        self._rebinds = Rebinds()
        self._strangers = Strangers()
        self._opening: asyncio.Future[Cursor] | None = None
        self._cursor: Cursor | None = None
        self._start: Cursor | None = None  # the cursor as the wait began: below it, mail that arrived earlier
        self._pending: list[int] = []  # UIDs of judged messages (taken or ignored) not yet consumed
        self._inviting = False
        self._listening = False  # listen() has put the watch for requests in place
        self._request_id: str | None = None  # our request's Message-ID, once invite() sends it
        self._ignored: str | None = None  # why the last route message was ignored: a timeout tells it
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
        elif self._opening is not None and not self._opening.cancelled():
            failure = self._opening.exception()  # retrieved here, or asyncio prints it with a traceback
            if failure is not None and failure is not error:
                # The session ended for another reason first (STUN, say): this one is told too, on one line.
                imap = self._config.imap
                log.error(
                    "%s", failure if isinstance(failure, PlexusError) else _unreachable("IMAP", imap, failure)
                )
        cancelled = kind is not None and issubclass(kind, asyncio.CancelledError)
        budget = CANCELLED_CLEANUP_TIMEOUT if cancelled else CLEANUP_TIMEOUT
        try:
            await asyncio.wait_for(self._leave(), budget)
        except TimeoutError:
            log.warning(
                "mailbox clean-up not done within %g s, given up: plexus mail may be left in %s's INBOX",
                budget,
                self._config.login,
            )
        finally:
            self._inbox.close()

    async def ready(self) -> None:
        """Wait until the mailbox watch is in place; raises the login's or the connection's failure."""
        if self._cursor is None:
            assert self._opening is not None, "Mediator used outside `async with`"
            cursor = await self._opening
            self._start = dataclasses.replace(cursor)
            self._cursor = cursor

    def submission(self, peer: Peer) -> Submission:
        """An SMTP session to open ahead of the message to `peer` (see Submission)."""
        return Submission(self._config, self._context, self._config.outgoing(peer).recipient)

    async def invite(
        self, offer: Offer, timeout: float = 60.0, submission: Submission | None = None
    ) -> Offer:
        """Send the request and wait for the response that answers it.

        Raises PeerRefusedError when the peer refuses this request (a refusal echoing its puzzle), and
        MailTimeoutError when nothing answers it in time."""
        deadline = asyncio.get_running_loop().time() + timeout
        # Only a response that arrives after the request counts: the watch is in place before DATA.
        await self.ready()
        self._inviting = True
        message_id = message.new_message_id(self._config.address)
        self._request_id = message_id  # before DATA: a send that fails after delivery leaves it too
        await self._send("request", offer, self._only, message_id, submission=submission)
        log.info("request sent to %s (%s), waiting for the response", self._only, message_id)
        events.emit(events.Sent, kind="request")
        async with contextlib.aclosing(
            self._letters("response", deadline, reply_to=message_id, request=offer.puzzle)
        ) as letters:
            async for letter, _ in letters:
                if letter.refusal is not None:
                    raise PeerRefusedError(f"{self._only} cannot serve this request: {letter.refusal.reason}")
                assert letter.offer is not None  # the Screen admitted a response
                return letter.offer
        # A response ignored on the way (signed by another identity, say) is what the user needs to hear of.
        ignored = f"; ignored {self._ignored}" if self._ignored else ""
        raise MailTimeoutError(f"no response from {self._only} within {timeout:g} s{ignored}")

    async def listen(self) -> None:
        """Put the watch for requests in place. The peer's mail already there is consumed unanswered: its
        inviters have given up by now, or will within their timeout."""
        if self._listening:
            return
        await self.ready()
        anonymous = [peer.name for peer in self._mail_peers() if peer.identity is None]
        if self._keys is None and anonymous:
            log.warning(
                "mail from %s is anonymous (no S/MIME, no identity pinned): whoever can write to this "
                "mailbox can stop that peer's command with a forged request, and whoever reads it sees the "
                "endpoints (docs/protocol.md, Trust model)",
                ", ".join(anonymous),
            )
        await self._clear_earlier_mail()
        log.info("waiting for requests from %s", ", ".join(peer.name for peer in self._mail_peers()))
        self._listening = True

    async def requests(self) -> AsyncIterator[Invitation]:
        """Each fresh request from the peer, forever (from listen() on)."""
        await self.listen()
        async for letter, peer in self._letters("request", None):
            assert letter.offer is not None  # the Screen admitted a request
            yield Invitation(letter.offer, letter.message_id, peer, legacy=letter.date is None)

    async def answer(
        self, invitation: Invitation, offer: Offer, submission: Submission | None = None
    ) -> None:
        await self._send(
            "response",
            offer,
            invitation.peer,
            message.new_message_id(self._config.address),
            invitation.message_id,
            submission=submission,
        )
        log.info("response sent to %s", invitation.peer)
        events.emit(events.Sent, kind="response")

    async def refuse(self, invitation: Invitation, reason: str, submission: Submission | None = None) -> None:
        """Tell the inviter this request cannot be served, and why (sanitized: one line of printable ASCII,
        at most 200 characters). A plexus 2.2 inviter (its request had no Date) would not understand it: it
        gets nothing, as before."""
        refusal = Refusal(invitation.offer.puzzle, reason)
        if invitation.legacy:
            log.info(
                "no refusal mailed to %s: plexus 2.2 would not read it (%s)", invitation.peer, refusal.reason
            )
            return
        await self._send(
            "refusal",
            refusal,
            invitation.peer,
            message.new_message_id(self._config.address),
            invitation.message_id,
            submission=submission,
        )
        log.info("refusal sent to %s: %s", invitation.peer, refusal.reason)
        events.emit(events.Sent, kind="refusal")

    async def rebind(self, rebind: Rebind, peer: Peer, submission: Submission | None = None) -> None:
        """Mail the rebind to the peer: SMTP alone, so a Mediator that never logged in to IMAP (or whose
        connection is down) sends it as well."""
        await self._send(
            "rebind", rebind, peer, message.new_message_id(self._config.address), submission=submission
        )
        log.info("rebind %d sent to %s: outer endpoint %s", rebind.sequence, peer, rebind.outer)
        events.emit(events.Sent, kind="rebind")

    def moved(self) -> None:
        """This side's network changed under a running session: the IMAP connection is dropped and made
        anew, or the peer's rebinds would wait on a dead one (IDLE renews only every 24 min)."""
        self._inbox.drop()

    @contextlib.contextmanager
    def rebinds(self, key: RebindKey) -> Iterator[Rebound]:
        """This session's rebinds from the peer (plexus.rendezvous.Rendezvous.rebinds): the acceptor's
        requests() loop reads them; an inviter reads its mailbox for them meanwhile (IMAP IDLE)."""
        with self._rebinds.expect(key, self._watch if self._inviting else None) as rebound:
            yield rebound

    async def _watch(self) -> None:
        """The inviter's reading of its mailbox for the acceptor's rebinds (_take admits them), for as long
        as its session runs; whatever else is there is judged and consumed as the acceptor's loop would."""
        try:
            async for _ in self._letters("rebind", None):  # admitted on the way, in _take
                pass
        except PlexusError as error:  # the mailbox is out of reach: this side's own rebinds still go out
            log.warning("no longer reading %s's mailbox for rebinds: %s", self._config.login, error)

    async def _send(
        self,
        kind: Kind,
        content: Content,
        peer: Peer,
        message_id: str,
        in_reply_to: str | None = None,
        *,
        submission: Submission | None,
    ) -> None:
        route = self._config.outgoing(peer)
        data = message.build(
            kind,
            content,
            route,
            message_id=message_id,
            date=datetime.datetime.now(datetime.UTC),
            in_reply_to=in_reply_to,
            keys=self._keys,
            signer=self._config.signer(peer),
        )
        if submission is None:
            await send(self._config, self._context, data, route.recipient)
        else:
            await submission.deliver(data)

    async def _letters(
        self, kind: Kind, deadline: float | None, reply_to: str | None = None, request: int | None = None
    ) -> AsyncGenerator[tuple[Letter, Peer]]:
        """Admitted letters of this kind, each with the peer who sent it, from past the cursor; ends at the
        deadline.

        Every message of the peer's route that is judged is consumed: a taken one after its hand-over, an
        ignored one before the acceptor next sleeps, or (the inviter, whose wait is short) as it leaves."""
        loop = asyncio.get_running_loop()
        while deadline is None or loop.time() < deadline:
            try:
                self._inbox.arrived = False
                async for letter in self._scan(kind, reply_to, request):
                    yield letter
                if deadline is None:
                    await self._consume_pending()
                if self._inbox.arrived:
                    # Reported while the scan's commands ran, it may be past what they saw: the IDLE that
                    # follows would not report it again.
                    continue
                remaining = IDLE_RENEW if deadline is None else deadline - loop.time()
                if remaining > 0:
                    await self._inbox.wait(remaining)
            except _Moved:
                log.info("IMAP connection to %s made anew: this side's network changed", self._config.imap)
                await self._reopen(deadline)
            except _Dropped as error:
                log.warning("IMAP connection to %s lost (%s): reconnecting", self._config.imap, error)
                await self._reopen(deadline)

    async def _scan(
        self, kind: Kind, reply_to: str | None, request: int | None
    ) -> AsyncGenerator[tuple[Letter, Peer]]:
        cursor = self._cursor
        assert cursor is not None, "Mediator used outside `async with`"
        for item in await self._inbox.new_mail(cursor):
            letter = None
            # Mail already flagged \Deleted is someone's (maybe another client's) to expunge: never touched.
            peer = self._route(item, strangers=not self._inviting) if "\\deleted" not in item.flags else None
            if peer is not None:
                if not cursor.counts(item):
                    log.info("message UID %d from %s arrived before the wait began", item.uid, peer)
                elif item.size is not None and item.size > message.MAX_MESSAGE:
                    log.warning(
                        "ignoring message UID %d from %s: %d octets, over the %d-octet limit (not read)",
                        item.uid,
                        peer,
                        item.size,
                        message.MAX_MESSAGE,
                    )
                    events.emit(
                        events.Rejected, source="mail", reason=f"over the {message.MAX_MESSAGE}-octet limit"
                    )
                else:
                    letter = await self._take(item, peer, kind, reply_to, request)
                self._pending.append(item.uid)  # judged: taken or ignored, it is consumed
            cursor.next = item.uid + 1  # only once handled: after a drop mid-way this message is seen again
            if letter is not None and peer is not None:
                yield letter, peer
                await self._consume_pending()  # only the acceptor resumes here: its session goes on meanwhile

    async def _take(
        self, item: Fetched, peer: Peer, kind: Kind, reply_to: str | None, request: int | None
    ) -> Letter | None:
        data = await self._inbox.body(item.uid)
        if data is None:  # expunged meanwhile by someone else
            return None
        try:
            letter = message.read(data, self._keys, peer.identity)
            now = datetime.datetime.now(datetime.UTC)
            if letter.rebind is not None:  # for a running session, not for this wait: handed over here
                self._rebinds.admit(letter.rebind, now)
                return None
            self._screen.admit(letter, kind, now, reply_to, request)
        except (message.MessageError, smime.SmimeError, RebindError) as error:
            log.warning("ignoring message UID %d from %s: %s", item.uid, peer, error)
            self._ignored = f"message UID {item.uid}: {error}"
            events.emit(events.Rejected, source="mail", reason=events.one_line(error))
            return None
        except Exception as error:  # the last guard: a reader's bug costs this message, never the loop
            name = type(error).__name__
            log.error("ignoring message UID %d from %s: unreadable (%s: %s)", item.uid, peer, name, error)
            events.emit(
                events.Rejected, source="mail", reason=events.one_line(f"unreadable ({name}: {error})")
            )
            return None
        if letter.offer is not None:
            log.info("%s from %s: outer endpoint %s", letter.kind, peer, letter.offer.outer)
        return letter

    def _route(self, item: Fetched, *, strangers: bool = False) -> Peer | None:
        """The peer whose route mail this is, for this side to judge (see _answers_another): its Subject
        names a peer met by mail, and its From and To are that peer's route. Never raises: headers that
        cannot be parsed are not a route's, and are logged once (one scan sees each UID once). `strangers`:
        mail to this host whose Subject names no peer is logged too, once, with that name (it is left
        alone: in a shared mailbox it may be another host's)."""
        try:
            headers = message.parse_headers(item.data)
            subject = message.subject_of(headers)
            peer = self._config.peers.peers.by_id(subject) if subject is not None else None
            if peer is None:
                if strangers and subject not in (None, self._config.host_id) and self._to_me(headers):
                    # Its id as it came (digits too: an id is not a puzzle), on one line, escaped by repr.
                    name = repr(" ".join(subject.split())[:70])
                    self._strangers.knock(name, "mail", f"message UID {item.uid} (passed over)")
                return None
            if self._config.incoming(peer).matches(headers) and not self._answers_another(item, headers):
                return peer
            return None
        except Exception as error:  # MessageError; anything else is a parser's bug: it must not stop the loop
            log.warning("passing over message UID %d: unreadable headers (%s)", item.uid, error)
            events.emit(
                events.Rejected, source="mail", reason=events.one_line(f"unreadable headers ({error})")
            )
            return None

    def _to_me(self, headers: Message) -> bool:
        """Mail addressed to this host's address (any sender, any subject)."""
        return Route("", self._config.address, "").addressed(headers)

    def _answers_another(self, item: Fetched, headers: Message) -> bool:
        """For an inviter: whether this is a fresh answer to a request not its own. Another session from the
        same account waits for it (two invites at once), so it is that session's to take and consume; once
        older than any wait (the clock tolerance), it is anyone's to clear."""
        if not self._inviting:
            return False
        answers = message.in_reply_to_of(headers)
        if answers is None or answers == self._request_id:
            return False
        age = datetime.datetime.now(datetime.UTC) - item.arrived if item.arrived is not None else None
        return age is None or age <= CLOCK_TOLERANCE

    @property
    def _only(self) -> Peer:
        """An inviter's one peer."""
        return self._config.peers.peers.only

    def _mail_peers(self) -> list[Peer]:
        return [peer for peer in self._config.peers.peers.known if peer.id is not None]

    async def _consume_pending(self) -> None:
        """Consume the judged messages: after the hand-over, so that the session goes on meanwhile (the
        acceptor's, as its loop turns; the inviter's, when it leaves the Mediator after the launch)."""
        uids, self._pending = self._pending, []
        if not uids:
            return
        try:
            await self._inbox.consume(*uids)
        except _Dropped as error:  # tried again after the reconnection, or when leaving
            log.warning("could not consume messages UID %s yet: %s", _uid_set(uids), error)
            self._pending[:0] = uids

    async def _clear_earlier_mail(self) -> None:
        """The acceptor's start: consume the peer's mail that arrived before the wait began, unanswered."""
        try:
            found = await self._earlier_mail(request_id=None)
            if found:
                await self._inbox.consume(*found)
        except _Dropped as error:
            log.warning("could not clear the peers' mail found at the start: %s", error)
            return
        log.log(
            logging.INFO if found else logging.DEBUG,
            "%d message(s) from peers arrived before the start: consumed, not answered",
            len(found),
        )

    async def _earlier_mail(self, request_id: str | None) -> list[int]:
        """UIDs of the peer's route mail below the start cursor and, with request_id, of our own request:
        found by UID SEARCH on the server, then checked header by header (exact route, exact Message-ID)."""
        start, cursor = self._start, self._cursor
        queries: list[str] = []
        # After a UIDVALIDITY change the start's UIDs mean nothing: the scan judged that mail by arrival.
        same = start is not None and cursor is not None and start.validity == cursor.validity
        first = start.next if same and start is not None else 1
        if first > 1:
            queries.append(f"UID 1:{first - 1} {_recipient_criteria(self._config.address)}".strip())
        if request_id is not None and _ATOM_SAFE.fullmatch(request_id):
            queries.append(f"HEADER Message-ID {_quoted(request_id)}")
        if not queries:
            return []
        criteria = queries[0] if len(queries) == 1 else f"OR ({queries[0]}) ({queries[1]})"
        candidates = await self._inbox.search("NOT DELETED", criteria)
        found = []
        for item in await self._inbox.headers(candidates):
            if "\\deleted" in item.flags:
                continue
            earlier = item.uid < first and self._route(item) is not None
            if earlier or (request_id is not None and self._is_own_request(item, request_id)):
                found.append(item.uid)
        return sorted(set(found))

    def _is_own_request(self, item: Fetched, request_id: str) -> bool:
        try:
            headers = message.parse_headers(item.data)
        except message.MessageError:
            return False
        return (
            self._config.outgoing(self._only).matches(headers)
            and message.message_id_of(headers) == request_id
        )

    async def _leave(self) -> None:
        """Consume what was judged; the inviter also its own request (shared mailbox) and the peer's mail that
        arrived before it began; then LOGOUT."""
        self._inbox.end_idle()
        if self._cursor is not None:
            try:
                uids = list(self._pending)
                if self._inviting:
                    to = self._config.outgoing(self._only).recipient
                    shared = self._config.address.lower() == to.lower()
                    uids += await self._earlier_mail(self._request_id if shared else None)
                if uids:
                    await self._inbox.consume(*uids)
                    self._pending.clear()
                    log.debug("consumed messages UID %s", _uid_set(uids))
            except _Dropped as error:
                log.warning("mailbox clean-up failed, plexus mail may be left: %s", error)
        await self._inbox.logout()

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
                        f"no response from {self._only}: IMAP server unreachable ({error})"
                    ) from error
                log.warning("IMAP reconnect failed (%s), retrying in %g s", error, delay)
                await asyncio.sleep(delay)
                attempt += 1
        if self._cursor is not None and self._cursor.validity != fresh.validity:
            log.warning("INBOX UIDVALIDITY changed: rescanning mail that arrived since %s", self._started)
            self._cursor = Cursor(fresh.validity, 1, arrived_after=self._started)
            self._pending.clear()  # their UIDs now name other messages, or none: the rescan judges them again
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
        size = re.search(rb"\bRFC822\.SIZE (\d+)", record.meta)
        found.append(
            Fetched(
                uid=int(uid.group(1)),
                flags=frozenset(flags.group(1).decode("ascii", "replace").lower().split() if flags else ()),
                arrived=_internaldate(arrived.group(1).decode("ascii", "replace")) if arrived else None,
                data=record.data,
                size=int(size.group(1)) if size else None,
            )
        )
    return found


_EXISTS = re.compile(rb"\* \d+ EXISTS\b")


def _note_arrivals(imap: aioimaplib.IMAP4, inbox: Inbox) -> None:
    """Have `inbox.arrived` set by every untagged EXISTS. aioimaplib hands an untagged response to the pending
    command it names and drops the EXISTS a server sends while a FETCH, STORE, SEARCH or EXPUNGE runs; the
    server reports each new message once, so the IDLE that follows would sleep past a request that arrived
    during the scan (until the IDLE's renewal, 24 min later). aioimaplib has no hook for it: its protocol's
    one entry for untagged lines is wrapped (tests/unit/test_mediator_email.py fails if it goes)."""
    protocol = imap.protocol
    handle = protocol._untagged_response

    def noting(line: bytes) -> Any:
        if _EXISTS.match(line):
            inbox.arrived = True
        return handle(line)

    protocol._untagged_response = noting


def _parse_search(lines: list[Any]) -> list[int]:
    """The UIDs of a SEARCH response. aioimaplib hands over the untagged `* SEARCH 3 5 8` as `3 5 8` (the
    name stripped), then the tagged status text as the last line."""
    found: list[int] = []
    for line in lines[:-1]:
        match = _SEARCH.match(bytes(line))
        words = (match.group(1) if match else bytes(line)).split()
        if all(word.isdigit() for word in words):
            found += [int(word) for word in words]
    return sorted(set(found))


def _chunks(uids: Iterable[int]) -> list[list[int]]:
    ordered = sorted(set(uids))
    return [ordered[i : i + UID_CHUNK] for i in range(0, len(ordered), UID_CHUNK)]


def _uid_set(uids: Sequence[int]) -> str:
    """An IMAP sequence set naming exactly these UIDs: runs of consecutive UIDs as ranges (3:5 is 3, 4, 5)."""
    runs: list[list[int]] = []
    for uid in sorted(set(uids)):
        if runs and uid == runs[-1][1] + 1:
            runs[-1][1] = uid
        else:
            runs.append([uid, uid])
    return ",".join(str(first) if first == last else f"{first}:{last}" for first, last in runs)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _recipient_criteria(address: str) -> str:
    """SEARCH criteria that every peer's route mail meets: its To (substring, case-insensitive: a superset
    that each peer's Route then narrows). An address that is not printable ASCII is left out: a quoted IMAP
    string is 7-bit, and the check of the headers covers it."""
    return f"TO {_quoted(address)}" if _ATOM_SAFE.fullmatch(address) else ""


def _internaldate(text: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return None


def _text(lines: list[Any]) -> str:
    return " ".join(bytes(line).decode("utf-8", "replace") for line in lines)
