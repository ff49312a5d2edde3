"""The DHT rendezvous's driver: one OpenDHT node (opendht's DhtRunner, which runs in threads of its own) and
the DhtMediator, which gives a session what the email Mediator gives it: invite, requests, answer, refuse,
and a running session's rebind (put where requests go, so the acceptor's one listen takes both).

Values are built and checked by plexus/mediator/dht.py (sans-I/O); this module only puts them, listens for
them and hands over what passes. A listen delivers the values already stored and then each new one as the
storing nodes push it, so a response arrives one DHT hop after it is put.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import opendht

from plexus import events
from plexus.endpoint import Endpoint
from plexus.errors import DhtUnreachableError, PeerNotFoundError, PeerRefusedError, UsageError
from plexus.identity import Identity, id_of
from plexus.mediator import dht
from plexus.peers import Peer, Roster
from plexus.rendezvous import (
    Invitation,
    Offer,
    Rebind,
    RebindError,
    RebindKey,
    Rebinds,
    Rebound,
    Strangers,
)

log = logging.getLogger(__name__)

# How long the bootstrap nodes may take to answer a ping before the DHT counts as unreachable: they answer
# in milliseconds; OpenDHT itself gives up on a ping after about 9 s.
JOIN_TIMEOUT = 10.0
# A put's confirmation waits for every node it targets, unreachable ones (behind NATs) until they time out,
# about a second; the nodes that store it push it to listeners at once. So letters are sent without waiting
# for the confirmation, and a leaving mediator gives the last ones this long.
PUT_GRACE = 2.0
DAY_CHECK = 600.0  # how often a long-lived listener looks whether the UTC day (and so the keys) rolled on
STOP_TIMEOUT = 2.0  # for the node's shutdown to say it is done
# The most an acceptor waits at the start for the search of the requests already stored to end.
EARLIER_SEARCH = 3.0
# The most a rebind waits for the acceptor's card, when no request of this mediator has fetched it.
CARD_TIMEOUT = 10.0


@dataclass(frozen=True)
class DhtConfig:
    """--dht-bootstrap, --dht-port, --dht-network, and the identities (--identity, --peer-identity)."""

    identity: Identity
    # The peers met on the DHT: those with an identity (--peer-identity, --peers); an inviter has one.
    peers: Roster
    bootstrap: tuple[Endpoint, ...]
    # A fixed port by default: with the day's node id (see _Node.start) a run from cron takes over its last
    # run's place in the DHT, so searches are not held up by a dead node at its old address.
    port: int = dht.DEFAULT_PORT
    network: int = 0

    @property
    def host_id(self) -> str:
        return self.identity.id

    def open(self) -> DhtMediator:
        """The rendezvous on OpenDHT (plexus.rendezvous.Rendezvous)."""
        return DhtMediator(self)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class _Node:
    """One DhtRunner with asyncio faces: puts awaited, listens as queues of (key text, value bytes)."""

    def __init__(self, config: DhtConfig) -> None:
        self._config = config
        self._runner = opendht.DhtRunner()
        self._loop = asyncio.get_running_loop()
        # Each listen's token, the callbacks object opendht's binding made for it (see forget), its queue.
        self._tokens: dict[str, tuple[Any, Any, asyncio.Queue[tuple[str, bytes]]]] = {}
        self._callbacks: list[Any] = []

    def start(self) -> None:
        settings = opendht.DhtConfig()
        settings.setNetwork(self._config.network)
        settings.setPeerDiscovery(False, False)  # no multicast on the LAN: only --dht-bootstrap is joined
        # The same node id for a host all day (a rolling one, like the keys): a run from cron then takes over
        # its last run's place in the other nodes' routing tables instead of leaving a dead node there, which
        # every search near it would wait a second for. It follows from the private key, not from the id, so
        # that knowing a host's id does not lead to its node's address.
        node_id = dht.node_id(self._config.identity, dht.day_of(_now()))
        settings.setNodeId(opendht.InfoHash(node_id.hex().encode()))
        try:
            self._runner.run(port=self._config.port, config=settings)
        except Exception as error:  # opendht raises plain RuntimeErrors from C++
            raise UsageError(
                f"cannot start the DHT node on --dht-port {self._config.port}: {error}"
            ) from error
        for node in self._config.bootstrap:
            self._runner.bootstrap(node.host, str(node.port))

    async def stop(self) -> None:
        """Shut the node down, without join(): opendht's bindings hold the GIL while join() waits for the
        runner's lock, which the runner holds while it calls back into Python, so a pending callback would
        hang both threads (reproduced in the lab). Only calls that queue an operation are made here."""
        for key_text in list(self._tokens):
            self.forget(key_text)
        done = self._loop.create_future()
        self._runner.shutdown(lambda: self._loop.call_soon_threadsafe(_resolve, done))
        try:
            await asyncio.wait_for(done, STOP_TIMEOUT)
        except TimeoutError:
            _UNSETTLED.extend(self._callbacks)  # the runner may still call them: they must outlive us

    async def put(self, key_text: str, data: bytes, *, permanent: bool = False) -> bool:
        done: asyncio.Future[bool] = self._loop.create_future()

        def finished(ok: bool, _nodes: Any) -> None:
            self._loop.call_soon_threadsafe(_resolve, done, bool(ok))

        self._runner.put(opendht.InfoHash.get(key_text), opendht.Value(data), finished, permanent)
        return await done

    async def ping(self, node: Endpoint) -> bool:
        try:
            addresses = await asyncio.to_thread(opendht.SockAddr.resolve, node.host, str(node.port))
        except Exception:  # opendht raises plain RuntimeErrors from C++ for a name that does not resolve
            return False
        answered: asyncio.Future[bool] = self._loop.create_future()
        for address in addresses[:1]:
            self._runner.ping(
                address, lambda ok: self._loop.call_soon_threadsafe(_resolve, answered, bool(ok))
            )
            return await answered
        return False

    def get(self, key_text: str) -> _Search:
        """The values under the key as the search finds them, then None once it has ended."""
        search = _Search(asyncio.Queue())

        def arrived(value: Any) -> bool:
            self._loop.call_soon_threadsafe(search.values.put_nowait, (key_text, bytes(value.data)))
            return not search.cancelled

        def finished(_ok: bool, _nodes: Any) -> None:
            self._loop.call_soon_threadsafe(search.values.put_nowait, None)

        self._runner.get(opendht.InfoHash.get(key_text), arrived, finished)
        return search

    def listen(self, key_text: str, into: asyncio.Queue[tuple[str, bytes]]) -> None:
        if key_text in self._tokens:
            return

        def arrived(value: Any, expired: bool) -> bool:
            log.debug(
                "value under %s (%d bytes%s)", key_text, len(value.data), ", expired" if expired else ""
            )
            if not expired:
                self._loop.call_soon_threadsafe(into.put_nowait, (key_text, bytes(value.data)))
            return True

        token = self._runner.listen(opendht.InfoHash.get(key_text), arrived)
        callbacks = opendht.ListenToken._cb["cb"]
        self._callbacks.append(callbacks)
        self._tokens[key_text] = (token, callbacks, into)

    def relisten(self) -> None:
        """Every listen made anew: the nodes that store the values push them to the address a listen came
        from, which a NAT that mapped this host anew has just changed."""
        for key_text, (_, _, into) in list(self._tokens.items()):
            self.forget(key_text)
            self.listen(key_text, into)

    def forget(self, key_text: str) -> None:
        """Cancel a listen. opendht's binding (4.x) keeps a listen's callbacks object in a dict shared by
        every ListenToken, and cancelListen drops a reference to whatever is there now, i.e. the newest
        listen's, not the cancelled one's. So the cancelled one's is put back there first; and each stays
        referenced from here until the runner has shut down, because a cancel is only queued and a value
        may still be delivered to it. Without both, a value under a key listened to earlier reached freed
        memory: an inviter's SIGSEGV in an OpenDHT thread, in CI."""
        entry = self._tokens.pop(key_text, None)
        if entry is not None:
            token, callbacks, _ = entry
            opendht.ListenToken._cb["cb"] = callbacks
            self._runner.cancelListen(token)


@dataclass
class _Search:
    values: asyncio.Queue[tuple[str, bytes] | None]  # None: the search has ended
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


def _ignore(key: str, error: Exception) -> None:
    """Log a value that is not taken, in one line. Whatever checking it raised, it never ends a listen: the
    value's refusal (DhtMessageError) at DEBUG, anything else (a bug, which one crafted value must not turn
    into a way to stop an acceptor) at WARNING, without its traceback."""
    if isinstance(error, dht.DhtMessageError | RebindError):
        log.debug("ignoring a value under %s: %s", key, error)
        events.emit(events.Rejected, source="dht", reason=events.one_line(error))
    else:
        text = str(error)[:200]
        log.warning(
            "ignoring a value under %s that could not be checked: %s %r", key, type(error).__name__, text
        )
        events.emit(
            events.Rejected,
            source="dht",
            reason=events.one_line(f"unchecked ({type(error).__name__}: {text})"),
        )


# The callbacks of nodes whose runner did not confirm its shutdown (_Node.stop): kept for the process's life.
_UNSETTLED: list[Any] = []


def _resolve(future: asyncio.Future[Any], value: Any = None) -> None:
    if not future.done():
        future.set_result(value)


class DhtMediator:
    """The session's rendezvous over OpenDHT (docs/dht.md): the same contract as the email Mediator."""

    def __init__(self, config: DhtConfig) -> None:
        self._config = config
        self._me = config.identity
        self._screen = dht.Screen()
        self._node: _Node | None = None
        self._joined: asyncio.Future[None] | None = None
        self._puts: set[asyncio.Task[None]] = (
            set()
        )  # letters on their way: a put confirms long after the push
        self._peer_keys: dict[int, Any] = {}  # request puzzle -> the inviter's public key, to answer it
        self._peer_card_key: Any = None  # the acceptor's public key from its card, once invite() read it
        self._inviter_keys: dict[str, Any] = {}  # a peer's identity -> its public key, from its last request
        self._inviting = False  # invite() was called: this side is the inviter
        self._rebinds = Rebinds()
        self._strangers = Strangers()
        self._listened = False

    async def __aenter__(self) -> DhtMediator:
        self._node = _Node(self._config)
        self._node.start()
        self._joined = asyncio.ensure_future(self._join())  # while STUN runs
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._joined is not None:
            self._joined.cancel()
            await asyncio.gather(self._joined, return_exceptions=True)
        if self._puts:  # stored by now, or never: the node is about to go
            await asyncio.wait(self._puts, timeout=PUT_GRACE)
        if self._node is not None:
            await self._node.stop()

    @property
    def peer_id(self) -> str:
        """An inviter's one peer's identity."""
        pinned = self._config.peers.peers.only.identity
        assert pinned is not None, "a peer met on the DHT has an identity"
        return pinned

    def _known(self) -> frozenset[str]:
        return frozenset(p.identity for p in self._config.peers.peers.known if p.identity is not None)

    def submission(self, peer: Peer) -> contextlib.AbstractAsyncContextManager[None]:
        """Nothing to open ahead of a message: a put needs no session."""
        return contextlib.nullcontext()

    async def _join(self) -> None:
        """Ping the bootstrap nodes: the first answer proves the DHT reachable. Then the card goes out, under
        today's key (near midnight the next or last day's too), kept put by the node while it runs."""
        node = self._require()
        pings = [asyncio.ensure_future(node.ping(each)) for each in self._config.bootstrap]
        try:
            async with asyncio.timeout(JOIN_TIMEOUT):
                for answered in asyncio.as_completed(pings):
                    if await answered:
                        break
                else:
                    raise TimeoutError
        except TimeoutError:
            where = ", ".join(map(str, self._config.bootstrap)) or "no --dht-bootstrap given"
            raise DhtUnreachableError(f"no DHT node answered within {JOIN_TIMEOUT:g} s ({where})") from None
        finally:
            for ping in pings:
                ping.cancel()
        log.info("on the DHT as %s", self._me.id)
        self._publish_card()

    def _publish_card(self) -> None:
        now = _now()
        texts = [dht.key_text("card", self._me.id, day) for day in dht.sending_days(now)]
        cards = [(text, dht.make_card(self._me, text, now)) for text in texts]
        self._background(self._put_all(cards, "card", permanent=True))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    async def _put_all(self, values: list[tuple[str, bytes]], what: str, *, permanent: bool = False) -> None:
        results = [await self._require().put(text, value, permanent=permanent) for text, value in values]
        if not any(results):
            log.warning("no DHT node stored the %s", what)

    def _require(self) -> _Node:
        assert self._node is not None, "DhtMediator used outside `async with`"
        return self._node

    async def _ready(self) -> None:
        assert self._joined is not None, "DhtMediator used outside `async with`"
        await asyncio.shield(self._joined)

    @contextlib.contextmanager
    def _listening(self, family: dht.Family, host_id: str) -> Iterator[asyncio.Queue[tuple[str, bytes]]]:
        """Values under the host's key of today (UTC); senders cover clock skew around midnight."""
        node = self._require()
        arrived: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        text = dht.key_text(family, host_id, dht.day_of(_now()))
        node.listen(text, arrived)
        try:
            yield arrived
        finally:
            node.forget(text)

    def _send(
        self,
        family: dht.Family,
        host_id: str,
        recipient: Any,
        issued: datetime.datetime | None = None,
        **fields: Any,
    ) -> None:
        """Put a letter sealed to the recipient under each sending day's key, without waiting for the
        confirmation (PUT_GRACE). `issued`: now, unless the letter carries a time of its own (a rebind's)."""
        now = _now()
        values = []
        for day in dht.sending_days(now):
            text = dht.key_text(family, host_id, day)
            letter = dht.Letter(
                sender=self._me.id, recipient=id_of(recipient), key=text, issued=issued or now, **fields
            )
            values.append((text, dht.seal(letter, self._me, recipient)))
        self._background(self._put_all(values, fields["kind"]))

    async def _peer_card(self, deadline: float) -> Any:
        loop = asyncio.get_running_loop()
        with self._listening("card", self.peer_id) as cards:
            while (remaining := deadline - loop.time()) > 0:
                try:
                    key, value = await asyncio.wait_for(cards.get(), remaining)
                except TimeoutError:
                    break
                try:
                    return dht.read_card(value, self.peer_id, key, _now())  # the inviter's one peer
                except Exception as error:
                    _ignore(key, error)
        raise PeerNotFoundError(
            f"{self.peer_id} is not on the DHT (no card found): is its plexus running there?"
        )

    async def invite(self, offer: Offer, timeout: float = 60.0, submission: object = None) -> Offer:
        """Put the request (sealed to the acceptor) and wait for the response that answers it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._ready()
        self._inviting = True
        peer_key = self._peer_card_key = await self._peer_card(deadline)
        with self._listening("response", self._me.id) as answers:  # before the put: no answer is missed
            self._send("request", self.peer_id, peer_key, kind="request", puzzle=offer.puzzle, offer=offer)
            log.info("request put for %s, waiting for the response", self.peer_id)
            events.emit(events.Sent, kind="request")
            while (remaining := deadline - loop.time()) > 0:
                try:
                    key, value = await asyncio.wait_for(answers.get(), remaining)
                except TimeoutError:
                    break
                opened = self._open(key, value, "response", offer.puzzle)
                if opened is None:
                    continue
                letter, _ = opened
                if letter.kind == "refusal":
                    raise PeerRefusedError(f"{self.peer_id} cannot serve this request: {letter.reason}")
                assert letter.offer is not None
                log.info("response from %s: outer endpoint %s", self.peer_id, letter.offer.outer)
                return letter.offer
        raise PeerNotFoundError(f"no response from {self.peer_id} on the DHT within {timeout:g} s")

    def _open(
        self, key: str, value: bytes, kind: dht.Kind, request: int | None = None
    ) -> tuple[dht.Letter, Peer] | None:
        """The letter if it is the kind waited for and passes the Screen, and the peer who sealed it; a
        rebind goes to its session."""
        try:
            letter, sender = dht.unseal(value, self._me, key, self._known())
        except dht.NotAPeerError as stranger:
            self._strangers.knock(stranger.sender, "dht", f"a value under {key}")
            return None
        except Exception as error:
            _ignore(key, error)
            return None
        try:
            peer = self._config.peers.peers.by_identity(letter.sender)
            assert peer is not None  # unseal took it from one of them
            if letter.rebind is not None:  # for a running session, not for this wait: handed over here
                self._rebinds.admit(letter.rebind, _now())
                return None
            self._screen.admit(letter, kind, _now(), request)
        except Exception as error:
            _ignore(key, error)
            return None
        if letter.offer is None:
            return letter, peer
        if kind == "request":
            self._peer_keys[letter.offer.puzzle] = self._inviter_keys[letter.sender] = sender
        # Signed by the pinned peer: the handshake's key is bound to it.
        return dataclasses.replace(letter, offer=dataclasses.replace(letter.offer, signer=sender)), peer

    async def listen(self) -> None:
        """Get ready for requests: joined, and the requests already stored passed over (the listen that
        requests() puts in place delivers what is stored too, so nothing put from now on is missed)."""
        if not self._listened:
            await self._ready()
            await self._pass_over_earlier_requests()
            self._listened = True

    async def requests(self) -> AsyncIterator[Invitation]:
        """Each fresh request from the peer, forever; the listened keys follow the UTC day."""
        await self.listen()
        while True:
            day = dht.day_of(_now())
            with self._listening("request", self._me.id) as arrived:
                names = (peer.name for peer in self._config.peers.peers.known if peer.identity is not None)
                log.info("waiting for requests from %s", ", ".join(names))
                while dht.day_of(_now()) == day:
                    try:
                        key, value = await asyncio.wait_for(arrived.get(), DAY_CHECK)
                    except TimeoutError:
                        continue
                    opened = self._open(key, value, "request")
                    letter, peer = opened or (None, None)
                    if letter is not None and peer is not None and letter.offer is not None:
                        log.info("request from %s: outer endpoint %s", peer, letter.offer.outer)
                        yield Invitation(letter.offer, None, peer)
            self._publish_card()  # under the new day's key

    async def _pass_over_earlier_requests(self) -> None:
        """The requests already on the DHT at the start are not answered (their inviters have given up, or
        will): they are screened now, so that the listen that follows sees each as a replay. Otherwise a
        restarted acceptor would start a session toward every inviter of the last minutes."""
        search = self._require().get(dht.key_text("request", self._me.id, dht.day_of(_now())))
        earlier = 0
        try:
            async with asyncio.timeout(EARLIER_SEARCH):
                while (item := await search.values.get()) is not None:
                    earlier += self._open(*item, "request") is not None
        except TimeoutError:
            search.cancel()
        log.log(
            logging.INFO if earlier else logging.DEBUG,
            "%d request(s) from peers already on the DHT at the start: not answered",
            earlier,
        )

    async def answer(self, invitation: Invitation, offer: Offer, submission: object = None) -> None:
        self._reply(invitation, "response", offer=offer)

    async def refuse(self, invitation: Invitation, reason: str, submission: object = None) -> None:
        self._reply(invitation, "refusal", reason=reason)

    async def rebind(self, rebind: Rebind, peer: Peer, submission: object = None) -> None:
        """Put the rebind, sealed to the peer, where its listen takes it: the acceptor's where its requests
        go, the inviter's where its responses go. The acceptor's card is the one invite() read, or is looked
        up now (PeerNotFoundError after CARD_TIMEOUT); the inviter's key is the one its requests were
        signed with."""
        await self._ready()
        family: dht.Family = "request"
        recipient = self._peer_card_key
        assert peer.identity is not None, "a peer met on the DHT has an identity"
        if not self._inviting and peer.identity in self._inviter_keys:  # the acceptor's, to the inviter
            family, recipient = "response", self._inviter_keys[peer.identity]
        elif recipient is None:
            recipient = self._peer_card_key = await self._peer_card(
                asyncio.get_running_loop().time() + CARD_TIMEOUT
            )
        issued = datetime.datetime.fromtimestamp(rebind.issued, datetime.UTC)
        self._send(
            family,
            peer.identity,
            recipient,
            kind="rebind",
            puzzle=None,
            rebind=rebind,
            issued=issued,
        )
        log.info("rebind %d put for %s: outer endpoint %s", rebind.sequence, peer, rebind.outer)
        events.emit(events.Sent, kind="rebind")

    def moved(self) -> None:
        """This side's network changed under a running session: the listens are made anew from it."""
        if self._node is not None:
            self._node.relisten()

    @contextlib.contextmanager
    def rebinds(self, key: RebindKey) -> Iterator[Rebound]:
        """This session's rebinds from the peer (plexus.rendezvous.Rendezvous.rebinds): the acceptor's
        requests() loop reads them; an inviter listens where its responses go meanwhile."""
        with self._rebinds.expect(key, self._watch if self._inviting else None) as rebound:
            yield rebound

    async def _watch(self) -> None:
        """The inviter's listen for the acceptor's rebinds (_open admits them) while its session runs; the
        listened key follows the UTC day."""
        while True:
            day = dht.day_of(_now())
            with self._listening("response", self._me.id) as arrived:
                while dht.day_of(_now()) == day:
                    try:
                        key, value = await asyncio.wait_for(arrived.get(), DAY_CHECK)
                    except TimeoutError:
                        continue
                    self._open(key, value, "response")

    def _reply(
        self, invitation: Invitation, kind: dht.Kind, offer: Offer | None = None, reason: str | None = None
    ) -> None:
        request = invitation.offer.puzzle
        assert invitation.peer.identity is not None, "a peer met on the DHT has an identity"
        self._send(
            "response",
            invitation.peer.identity,
            self._peer_keys.pop(request),
            kind=kind,
            puzzle=offer.puzzle if offer is not None else request,
            offer=offer,
            answers=request,
            reason=reason,
        )
        events.emit(events.Sent, kind=kind)
