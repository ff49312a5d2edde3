"""The DHT rendezvous's driver: one OpenDHT node (opendht's DhtRunner, which runs in threads of its own) and
the DhtMediator, which gives a session what the email Mediator gives it: invite, requests, answer, refuse.

Values are built and checked by plexus/mediator/dht.py (sans-I/O); this module only puts them, listens for
them and hands over what passes. A listen delivers the values already stored and then each new one as the
storing nodes push it, so a response arrives one DHT hop after it is put.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import opendht

from plexus.endpoint import Endpoint
from plexus.errors import DhtUnreachableError, PeerNotFoundError, PeerRefusedError, UsageError
from plexus.identity import Identity
from plexus.mediator import dht
from plexus.mediator.email import Invitation
from plexus.mediator.message import Offer

log = logging.getLogger(__name__)

# How long the first put may take before the DHT counts as unreachable: a bootstrap node answers in
# milliseconds; a put that has found no node by then never will.
JOIN_TIMEOUT = 10.0
DAY_CHECK = 600.0  # how often a long-lived listener looks whether the UTC day (and so the keys) rolled on


@dataclass(frozen=True)
class DhtConfig:
    """--dht-bootstrap, --dht-port, --dht-network, and the identities (--identity, --peer-identity)."""

    identity: Identity
    peer_id: str
    bootstrap: tuple[Endpoint, ...]
    port: int = 0
    network: int = 0

    @property
    def host_id(self) -> str:
        return self.identity.id


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class _Node:
    """One DhtRunner with asyncio faces: puts awaited, listens as queues of (key text, value bytes)."""

    def __init__(self, config: DhtConfig) -> None:
        self._config = config
        self._runner = opendht.DhtRunner()
        self._loop = asyncio.get_running_loop()
        self._tokens: dict[str, Any] = {}

    def start(self) -> None:
        settings = opendht.DhtConfig()
        settings.setNetwork(self._config.network)
        try:
            self._runner.run(port=self._config.port, config=settings)
        except Exception as error:  # opendht raises plain RuntimeErrors from C++
            raise UsageError(
                f"cannot start the DHT node on --dht-port {self._config.port}: {error}"
            ) from error
        for node in self._config.bootstrap:
            self._runner.bootstrap(node.host, str(node.port))

    async def stop(self) -> None:
        for token in self._tokens.values():
            self._runner.cancelListen(token)
        self._tokens.clear()
        done = self._loop.create_future()
        self._runner.shutdown(lambda: self._loop.call_soon_threadsafe(_resolve, done))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, 2.0)
        await asyncio.to_thread(self._runner.join)

    async def put(self, key_text: str, data: bytes, *, permanent: bool = False) -> bool:
        done: asyncio.Future[bool] = self._loop.create_future()

        def finished(ok: bool, _nodes: Any) -> None:
            self._loop.call_soon_threadsafe(_resolve, done, bool(ok))

        self._runner.put(opendht.InfoHash.get(key_text), opendht.Value(data), finished, permanent)
        return await done

    def listen(self, key_text: str, into: asyncio.Queue[tuple[str, bytes]]) -> None:
        if key_text in self._tokens:
            return

        def arrived(value: Any, expired: bool) -> bool:
            if not expired:
                self._loop.call_soon_threadsafe(into.put_nowait, (key_text, bytes(value.data)))
            return True

        self._tokens[key_text] = self._runner.listen(opendht.InfoHash.get(key_text), arrived)

    def forget(self, key_text: str) -> None:
        token = self._tokens.pop(key_text, None)
        if token is not None:
            self._runner.cancelListen(token)


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
        self._peer_keys: dict[int, Any] = {}  # request puzzle -> the inviter's public key, to answer it

    async def __aenter__(self) -> DhtMediator:
        self._node = _Node(self._config)
        self._node.start()
        self._joined = asyncio.ensure_future(self._publish_card())  # while STUN runs
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._joined is not None:
            self._joined.cancel()
            await asyncio.gather(self._joined, return_exceptions=True)
        if self._node is not None:
            await self._node.stop()

    @property
    def peer_id(self) -> str:
        return self._config.peer_id

    def submission(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Nothing to open ahead of a message: a put needs no session."""
        return contextlib.nullcontext()

    async def _publish_card(self) -> None:
        """This host's card under today's key, kept by the node while it runs; the first put proves the
        DHT reachable."""
        node = self._require()
        text = dht.key_text("card", self._me.id, dht.day_of(_now()))
        try:
            async with asyncio.timeout(JOIN_TIMEOUT):
                stored = await node.put(text, dht.make_card(self._me, _now()), permanent=True)
        except TimeoutError:
            stored = False
        if not stored:
            where = ", ".join(str(node) for node in self._config.bootstrap) or "no --dht-bootstrap given"
            raise DhtUnreachableError(f"no DHT node answered within {JOIN_TIMEOUT:g} s ({where})")
        log.info("on the DHT as %s", self._me.id)

    def _require(self) -> _Node:
        assert self._node is not None, "DhtMediator used outside `async with`"
        return self._node

    async def _ready(self) -> None:
        assert self._joined is not None, "DhtMediator used outside `async with`"
        await asyncio.shield(self._joined)

    @contextlib.contextmanager
    def _listening(self, family: dht.Family, host_id: str) -> Iterator[asyncio.Queue[tuple[str, bytes]]]:
        """Values under the host's keys of yesterday, today and tomorrow (clock skew at midnight)."""
        node = self._require()
        arrived: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        texts = [dht.key_text(family, host_id, day) for day in dht.listening_days(_now())]
        for text in texts:
            node.listen(text, arrived)
        try:
            yield arrived
        finally:
            for text in texts:
                node.forget(text)

    async def _peer_card(self, deadline: float) -> Any:
        loop = asyncio.get_running_loop()
        with self._listening("card", self.peer_id) as cards:
            while (remaining := deadline - loop.time()) > 0:
                try:
                    _, value = await asyncio.wait_for(cards.get(), remaining)
                except TimeoutError:
                    break
                try:
                    return dht.read_card(value, self.peer_id, _now())
                except dht.DhtMessageError as error:
                    log.debug("ignoring a card under %s's key: %s", self.peer_id, error)
        raise PeerNotFoundError(
            f"{self.peer_id} is not on the DHT (no card found): is its plexus running there?"
        )

    async def invite(self, offer: Offer, timeout: float = 60.0, submission: object = None) -> Offer:
        """Put the request (sealed to the acceptor) and wait for the response that answers it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._ready()
        peer_key = await self._peer_card(deadline)
        node = self._require()
        text = dht.key_text("request", self.peer_id, dht.day_of(_now()))
        request = dht.Letter(
            kind="request",
            sender=self._me.id,
            recipient=self.peer_id,
            key=text,
            issued=_now(),
            puzzle=offer.puzzle,
            offer=offer,
        )
        with self._listening("response", self._me.id) as answers:  # before the put: no answer is missed
            await node.put(text, dht.seal(request, self._me, peer_key))
            log.info("request put for %s, waiting for the response", self.peer_id)
            while (remaining := deadline - loop.time()) > 0:
                try:
                    key, value = await asyncio.wait_for(answers.get(), remaining)
                except TimeoutError:
                    break
                letter = self._open(key, value, "response", offer.puzzle)
                if letter is None:
                    continue
                if letter.kind == "refusal":
                    raise PeerRefusedError(f"{self.peer_id} cannot serve this request: {letter.reason}")
                assert letter.offer is not None
                log.info("response from %s: outer endpoint %s", self.peer_id, letter.offer.outer)
                return letter.offer
        raise PeerNotFoundError(f"no response from {self.peer_id} on the DHT within {timeout:g} s")

    def _open(self, key: str, value: bytes, kind: dht.Kind, request: int | None = None) -> dht.Letter | None:
        try:
            letter, sender = dht.unseal(value, self._me, key, self.peer_id)
            self._screen.admit(letter, kind, _now(), request)
        except dht.DhtMessageError as error:
            log.debug("ignoring a value under %s: %s", key, error)
            return None
        if kind == "request":
            self._peer_keys[letter.puzzle] = sender
        return letter

    async def requests(self) -> AsyncIterator[Invitation]:
        """Each fresh request from the peer, forever; the listened keys follow the UTC day."""
        await self._ready()
        while True:
            day = dht.day_of(_now())
            with self._listening("request", self._me.id) as arrived:
                log.info("waiting for requests from %s", self.peer_id)
                while dht.day_of(_now()) == day:
                    try:
                        key, value = await asyncio.wait_for(arrived.get(), DAY_CHECK)
                    except TimeoutError:
                        continue
                    letter = self._open(key, value, "request")
                    if letter is not None and letter.offer is not None:
                        log.info("request from %s: outer endpoint %s", self.peer_id, letter.offer.outer)
                        yield Invitation(letter.offer, None)
            await self._publish_card()  # under the new day's key

    async def answer(self, invitation: Invitation, offer: Offer, submission: object = None) -> None:
        await self._reply(invitation, "response", offer=offer)

    async def refuse(self, invitation: Invitation, reason: str, submission: object = None) -> None:
        await self._reply(invitation, "refusal", reason=reason)

    async def _reply(
        self, invitation: Invitation, kind: dht.Kind, offer: Offer | None = None, reason: str | None = None
    ) -> None:
        request = invitation.offer.puzzle
        text = dht.key_text("response", self.peer_id, dht.day_of(_now()))
        letter = dht.Letter(
            kind=kind,
            sender=self._me.id,
            recipient=self.peer_id,
            key=text,
            issued=_now(),
            puzzle=offer.puzzle if offer is not None else request,
            offer=offer,
            answers=request,
            reason=reason,
        )
        await self._require().put(text, dht.seal(letter, self._me, self._peer_keys.pop(request)))
