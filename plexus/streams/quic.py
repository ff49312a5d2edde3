"""QUIC over the punched path: a thin asyncio driver around aioquic's sans-I/O QuicConnection.

The acceptor serves and the inviter connects, on a UDP socket bound to the session's inner endpoint. Both
sides prove an identity in TLS 1.3 and check the peer's (identity.PeerCheck) when the handshake completes,
before any stream's bytes are handed on. Each TCP connection is one bidirectional stream (streams/forward.py).

The inviter takes datagrams from the acceptor's endpoint alone (and, while it asks, its STUN server's answer:
`mapped`, which a rebind needs, plexus/resume.py); its socket is not connected, so that it can ask.
The acceptor's is not either: its peer's NAT may map the inviter's socket anew (an idle mapping forgotten,
conntrack flushed) and the inviter's packets then come from another endpoint, which a connected socket would
never hear. Until the handshake completes the acceptor takes datagrams from the punched endpoint alone, as a
connected socket would. A datagram from that endpoint still proves nothing (a UDP source is easy to forge), so
the acceptor keeps a candidate connection per client Initial (by its destination connection id, up to
MAX_CANDIDATES) and keeps the one whose TLS handshake completes; a stray or forged Initial only makes a
candidate that never does. After the handshake every datagram goes to the connection, and only what decrypts
under its keys counts: a new packet (a packet number above any seen, so not a replay) from a new endpoint
makes aioquic send there, within the anti-amplification limit (three times what came from it), and challenge
it (PATH_CHALLENGE, RFC 9000 section 9); the answer validates it and the acceptor has migrated (`Migrated`),
an unanswered challenge puts it back on the old path. Garbage, a replay or a packet altered on the way changes
nothing. Each datagram goes to the address aioquic gives it.

A dead path shows within seconds, not at the idle timeout: an inviter that has heard nothing from the
acceptor for KEEPALIVE_INTERVAL pings it (the acceptor, which hears those pings, only after twice that), and
a side whose ack-eliciting packets (data or pings) have had no answer for DEAD_AFTER reports the path dead
(`Link.dead`, `PathDead`) without ending anything: the path may come back (a Wi-Fi hiccup, the peer's NAT
mapping anew; `PathBack`, and a PING at once so that what went into the silence is resent), and only the
idle timeout ends the session. These PINGs are probes: they may go beyond the congestion window, which a
silence leaves full of what went unanswered, and so once the path is back the next one ends the silence,
however far aioquic's probe timeout has backed off.

Beside QUIC, on the same socket: STUN (its first byte has the top two bits clear, RFC 7983; every QUIC
packet has the fixed bit 0x40 set) and the acceptor's punch (`punch`: PUNCH, toward a rebind's endpoint),
which makes the inviter probe at once instead of at its next keepalive. Neither moves anything: the
inviter sends only to the acceptor's endpoint whatever arrives, and the STUN answer only counts for what
the inviter tells the acceptor in a rebind, which carries its own authentication.

Throughput is bound by Python's work per datagram and per pass through aioquic's send path, so the driver
sends once per batch of received datagrams (a flush scheduled with call_soon, not one per datagram), lets
the pacer release 64 datagrams per wake-up instead of 16, and the CLI runs it on uvloop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import socket
import ssl
from typing import Any, cast

from aioquic._buffer import Buffer, BufferReadError
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection, QuicReceiveContext
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header
from aioquic.quic.recovery import K_MICRO_SECOND, QuicPacketPacer
from cryptography import x509

from plexus import events as plexus_events
from plexus import stun
from plexus.driver import wait_event
from plexus.endpoint import Endpoint
from plexus.errors import PeerIdentityError, PlexusError, StreamsLostError
from plexus.identity import Identity, PeerCheck, id_of
from plexus.resume import PUNCH, heard
from plexus.streams import wire
from plexus.streams.wire import ALPN

log = logging.getLogger(__name__)

# A peer silent this long is gone (QUIC's idle timeout, RFC 9000 10.1): the session ends.
IDLE_TIMEOUT = 60.0
# An inviter that has heard nothing from the acceptor for this long pings it, and again each interval while
# the silence lasts: the answers keep both NAT mappings alive (they expire after 30 s or more of silence), an
# idle line's death shows within KEEPALIVE_INTERVAL + DEAD_AFTER, and an inviter whose NAT forgot its mapping
# makes a new one with the next ping. The acceptor pings after twice this: while the inviter's pings come it
# need not, and pings crossing would cost each direction a second datagram. An idle line costs a PING one
# way and its ACK the other (about 60 bytes each with the IP and UDP headers) per interval; docs/streams.md.
KEEPALIVE_INTERVAL = 1.0
# Ack-eliciting packets (data, pings) unanswered this long: the path looks dead. Above the time a live path
# needs to answer after a lost packet (an RTT and a probe timeout: under 1 s at 300 ms RTT; about 1.8 s
# after two in a row), below the 2-3 s a rebind over the rendezvous has to resume a stream in.
DEAD_AFTER = 2.0
# Ack-eliciting packets unanswered this long: the inviter asks its STUN server whether its NAT mapped it anew
# (the path's death is certain then, and a rebind need not wait for DEAD_AFTER). Well above a live path's
# answer time at 0 ms links (a few ms), so a lossy moment costs at most one STUN round trip.
SUSPECT_AFTER = 0.4
# The acceptor hears the inviter at least every KEEPALIVE_INTERVAL (its data, ACKs or pings); silent for
# longer by SUSPECT_AFTER, it asks its STUN server whether its own NAT moved.
ACCEPTOR_SILENCE = KEEPALIVE_INTERVAL + SUSPECT_AFTER
QUIC_FIXED_BIT = 0x40  # set in every QUIC packet's first byte (RFC 9000 17); STUN's has it clear
POKE_INTERVAL = 0.05  # the inviter probes at most this often on punches
HANDSHAKE_TIMEOUT = 10.0
# The acceptor's connections made from client Initials before one completes its handshake: the real one and a
# few forged or stray ones; a new Initial beyond that replaces the oldest.
MAX_CANDIDATES = 8
INITIAL_SIZE = 1200  # a client's Initial comes in a datagram this large at least (RFC 9000 14.1)
CLOSE_TIMEOUT = 0.5  # how long a closing side waits for its CONNECTION_CLOSE to leave and the peer to ack
# A direct path's datagrams: 1400 bytes of UDP payload fit every common path MTU (1500, PPPoE's 1492, IPv6
# and tunnel overheads). Through a TURN relay the relay's own framing (up to 36 bytes) must fit as well.
DATAGRAM_SIZE = 1400
RELAYED_DATAGRAM_SIZE = 1200
# Unacknowledged bytes a stream's writer may have in flight before it waits: above the bandwidth-delay product
# of a fast path (200 Mbit/s x 25 ms = 625 KB), small enough to bound memory per stream.
SEND_BUFFER = 1 << 20
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
# Datagrams sent per pacing wake-up: 64 rather than aioquic's 16 took one stream in the lab from 176 to
# 234 Mbit/s (sender CPU per MiB 0.043 -> 0.031 s); docs/performance.md.
PACING_BURST = 64
CLOSE_IDENTITY = 0x100  # application close codes: the peer's identity is not the pinned one
CLOSE_DONE = 0x0  # the session is over


class _Pacer(QuicPacketPacer):
    """aioquic's pacer, letting up to PACING_BURST datagrams leave per wake-up instead of 16.

    Every wake-up is one pass through the connection's send path, whose fixed cost in Python is what bounds
    a stream's throughput; the burst stays at most a quarter of the congestion window."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        rate = congestion_window / max(smoothed_rtt, K_MICRO_SECOND)
        burst = min(congestion_window // 4, PACING_BURST * self._max_datagram_size)
        self.bucket_max = max(self.bucket_max, burst / rate)


class _Connection(QuicConnection):
    """aioquic's QuicConnection and the things plexus needs beyond its public API, kept here alone (no
    public way exists in aioquic 1.7): the pacer's burst, the server's client-certificate request, the peer's
    certificate, a stream's unacknowledged bytes, when the peer was last heard and whether it was asked
    since, a probe beyond the congestion window, and whether the address datagrams go to is validated.
    tests/unit/test_streams.py checks each against the pinned aioquic, so a version that moves one fails
    there by name."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._loss._pacer = _Pacer(max_datagram_size=self._max_datagram_size)
        self.heard_at = -math.inf  # when the last packet that decrypted under this connection's keys came
        self.asked_at: float | None = None  # the first ack-eliciting packet sent since the last new ACK

    def _payload_received(
        self, context: QuicReceiveContext, plain: bytes, crypto_frame_required: bool = False
    ) -> tuple[bool, bool]:
        # Reached only by a packet that decrypted and is no duplicate: forged or replayed datagrams never are.
        received = super()._payload_received(context, plain, crypto_frame_required=crypto_frame_required)
        self.heard_at = context.time
        return received

    def _handle_ack_frame(self, context: QuicReceiveContext, frame_type: int, buf: Buffer) -> None:
        # What this side sent is answered only by an ACK of something newer: a path that carries the peer's
        # packets and loses this side's (a network that lets nothing out) is as dead as one that carries none.
        space = self._spaces[context.epoch]
        before = space.largest_acked_packet
        super()._handle_ack_frame(context, frame_type, buf)
        if space.largest_acked_packet > before:
            self.asked_at = None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        datagrams = super().datagrams_to_send(now)
        if self.asked_at is None and self._ack_eliciting_sent_since_receipt:
            self.asked_at = now
        return datagrams

    def probe(self) -> None:
        """A PING that may go beyond the congestion window, as the probe timeout's own do (RFC 9002 section
        7): into a silence the window is full of what went unanswered, and a plain PING would wait behind
        it."""
        self._send_probe()

    @property
    def takes_datagrams(self) -> bool:
        """Whether the peer said it takes DATAGRAM frames (a plexus from before them closes the connection
        on one)."""
        return self._remote_max_datagram_frame_size is not None

    def repoint(self, addr: NetworkAddress) -> None:
        """The client's: the server is at `addr` now (its NAT mapped it anew, and an authenticated rebind
        said so). A QUIC client never moves to a new server address by itself (RFC 9000 section 9): the
        active path is given the new address, its connection ids and validation kept."""
        self._network_paths[0].addr = addr

    @property
    def validated_peer(self) -> NetworkAddress | None:
        """Where datagrams go, once that address is validated (a server whose client moved sends to the new
        address, within the anti-amplification limit, while it validates it); None before."""
        path = self._network_paths[0] if self._network_paths else None
        return path.addr if path is not None and path.is_validated else None

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # aioquic's server asks for the client's certificate only when told so on its TLS context.
            self.tls._request_client_certificate = True

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self.tls._peer_certificate

    def unacknowledged(self, stream_id: int) -> int:
        """Bytes written to the stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return stream.sender._buffer_stop - stream.sender._buffer_start


def configuration(identity: Identity, *, client: bool, datagram_size: int) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=client,
        alpn_protocols=[ALPN],
        idle_timeout=IDLE_TIMEOUT,
        max_datagram_size=datagram_size,
        max_stream_data=STREAM_WINDOW,
        max_data=CONNECTION_WINDOW,
        # The certificate is checked against the pinned identity (PeerCheck), not against a CA or a name.
        verify_mode=ssl.CERT_NONE,
        max_datagram_frame_size=wire.CONTROL_LIMIT,  # control datagrams (Link.send_candidate)
    )
    config.certificate = identity.certificate
    config.private_key = identity.key
    return config


class Stream:
    """One bidirectional QUIC stream, read and written like a TCP connection (EOF is a FIN)."""

    def __init__(self, link: Link, stream_id: int) -> None:
        self.id = stream_id
        self._link = link
        self._chunks: collections.deque[bytes] = collections.deque()
        self._eof = False
        self._error: PlexusError | None = None
        self._readable = asyncio.Event()

    async def read(self) -> bytes:
        """The next bytes that arrived, b"" once the peer has finished its side."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        return self._chunks.popleft()

    async def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._link.send(self.id, data, end=False)
        await self._link.drained(self)

    def write_eof(self) -> None:
        if self._error is None:
            self._link.send(self.id, b"", end=True)

    def reset(self) -> None:
        """Abandon the stream both ways (the TCP side broke): the peer sees a reset, not a FIN."""
        if self._error is None:
            self._link.reset(self.id)

    def _receive(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
        self._eof = self._eof or end
        self._readable.set()

    def _fail(self, error: PlexusError) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()


class Link(asyncio.DatagramProtocol):
    """One QUIC connection on one UDP socket: the inviter's connected to the acceptor, the acceptor's open to
    the inviter's new endpoints once the handshake is done."""

    def __init__(
        self,
        quic: _Connection | None,
        check: PeerCheck,
        config: QuicConfiguration,
        peer: Endpoint,
    ) -> None:
        self._quic = quic  # the acceptor's is the candidate whose handshake completes first
        self._candidates: dict[bytes, _Connection] = {}  # acceptor, until then: by their connection ids
        self._punched = peer.canonical()  # the only source the acceptor hears before the handshake completes
        self._peer: NetworkAddress = peer  # where datagrams go, validated
        self._refusal: PlexusError | None = None  # why the last candidate that ended did
        self._check = check
        self._config = config
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flush_pending = False
        self._streams: dict[int, Stream] = {}
        self._progress = self._loop.create_future()  # resolved (and replaced) whenever ACKs may have arrived
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.accepted: asyncio.Queue[Stream | None] = asyncio.Queue()  # None: the link closed
        # Set while the path looks dead (DEAD_AFTER without an answer), cleared when the peer is heard again:
        # what the session can await to find the peer another way. The link goes on either way.
        self.dead = asyncio.Event()
        self._silent_since = -math.inf  # while the path looks dead: when the peer was last heard
        self._reprobed = False  # while dead: a probe went once the peer was heard again
        # Set while this side's packets have gone unanswered for SUSPECT_AFTER, cleared when the peer is heard
        # again: when the inviter asks whether it moved (plexus/resume.py).
        self.suspect = asyncio.Event()
        self._heard = asyncio.Event()  # set as the peer is heard; a waiter clears it (heard_within)
        self._asked = asyncio.Event()  # set as something this side sent awaits an answer (keepalive's wake)
        self._question = stun.Question()  # to this side's STUN server (mapped, independent)
        self._poked_at = -math.inf
        # Where the inviter takes datagrams from: the punched endpoint, and those an authenticated message
        # named since (a rebind, a candidate).
        self._known = {(self._punched.host, self._punched.port)}
        # On a relay this side allocated, the socket faces plexus's forwarder (`peer`) and a second one
        # (set_direct) is for a direct path: datagrams go out of the one whose peer they are for.
        self._relayed: NetworkAddress | None = None
        self._direct: asyncio.DatagramTransport | None = None
        self.heard_from: NetworkAddress | None = None  # where the last packet that decrypted came from
        self.peer_candidate: Endpoint | None = None  # the peer's latest CANDIDATE (plexus/streams/direct.py)
        self.candidate_arrived = asyncio.Event()

    # asyncio.DatagramProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data or not data[0] & QUIC_FIXED_BIT:
            self._beside_quic(data, addr)
            return
        quic = self._quic
        if quic is None:  # the acceptor, before the handshake completes
            if Endpoint(*addr[:2]).canonical() != self._punched:
                return
            quic = self._candidate(data)
            if quic is None:
                return
        elif quic.configuration.is_client and not self._from_peer(addr):
            return  # only an authenticated message moves the acceptor: anything else is noise or forged
        heard = quic.heard_at
        # IPv6 sources come with flow info and scope: the same path as the (host, port) QUIC was given
        quic.receive_datagram(data, addr[:2], self._loop.time())
        if quic.heard_at != heard:
            self.heard_from = addr[:2]
        self._dispatch(quic)
        if quic is self._quic and self.ready.done():
            self._watch(quic)
        self._schedule_flush()

    def _from_peer(self, addr: tuple[str, int]) -> bool:
        return addr[:2] in self._known

    def _beside_quic(self, data: bytes, addr: tuple[str, int]) -> None:
        """A datagram that is not QUIC: the STUN server's answer to `mapped`, or the acceptor's punch (or a
        late handshake datagram, or noise: dropped)."""
        now = self._loop.time()
        if self._question.answer(data, addr, now):
            return
        quic = self._quic
        # The acceptor's punch toward this side's new endpoint: its NAT now lets the next packet in.
        client = quic is not None and quic.configuration.is_client
        if client and self._from_peer(addr) and now - self._poked_at >= POKE_INTERVAL:
            self._poked_at = now
            self.probe()

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error on the streams socket: %s", exc)  # ICMP unreachable: QUIC retransmits anyway

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(StreamsLostError("the streams socket closed"))

    # driving

    def _candidate(self, data: bytes) -> _Connection | None:
        """The acceptor's candidate connection a datagram is for, by its destination connection id, as
        aioquic's own server routes: a new one for a client's first Initial; None for anything else (the
        punch's late hellos, noise)."""
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self._config.connection_id_length)
        except (ValueError, BufferReadError):
            return None
        quic = self._candidates.get(header.destination_cid)
        if quic is not None or header.packet_type != QuicPacketType.INITIAL or len(data) < INITIAL_SIZE:
            return quic
        live = self._live()
        if len(live) >= MAX_CANDIDATES:
            self._forget(live[0])
            log.debug(
                "streams: more than %d client Initials: the oldest candidate is dropped", MAX_CANDIDATES
            )
        quic = _Connection(
            configuration=self._config, original_destination_connection_id=header.destination_cid
        )
        self._candidates[header.destination_cid] = self._candidates[quic.host_cid] = quic
        return quic

    def _forget(self, candidate: _Connection) -> None:
        for cid in [cid for cid, quic in self._candidates.items() if quic is candidate]:
            del self._candidates[cid]

    def _live(self) -> list[_Connection]:
        """The connection; on the acceptor until one completes its handshake, the candidates, oldest first."""
        if self._quic is not None:
            return [self._quic]
        return list(dict.fromkeys(self._candidates.values()))

    def _dispatch(self, quic: _Connection) -> None:
        if quic is self._quic:
            self._events()
            return
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                self._quic = quic  # the others never will, or came second: they go
                self._candidates.clear()
                self._handshake_completed()
                self._events()  # what came with it
                return
            if isinstance(event, events.ConnectionTerminated):
                # Not the link's end: a forged Initial can end its own candidate, so the reason waits for
                # the handshake timeout, in case no other candidate completes (_ready).
                self._forget(quic)
                self._refusal = self._termination(event)
                log.debug("streams: a candidate connection ended: %s", self._refusal)
                return

    def _events(self) -> None:
        assert self._quic is not None
        while (event := self._quic.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                self._handshake_completed()
            elif isinstance(event, events.StreamDataReceived):
                if self.ready.done() and self.ready.exception() is None:
                    self._stream(event.stream_id)._receive(event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._fail(StreamsLostError("the peer reset the stream"))
            elif isinstance(event, events.DatagramFrameReceived):
                self._control(event.data)
            elif isinstance(event, events.ConnectionTerminated):
                self._end(self._termination(event))
        self._wake_writers()

    def _control(self, data: bytes) -> None:
        try:
            candidate = wire.read_candidate(data)
        except wire.FrameError as error:
            log.debug("streams: a control datagram dropped: %s", error)
            return
        if candidate != self.peer_candidate:
            log.info("streams: the peer can be reached directly at %s", candidate)
        self.peer_candidate = candidate
        self.candidate_arrived.set()

    def _handshake_completed(self) -> None:
        assert self._quic is not None
        self._peer = self._quic.validated_peer or self._peer
        try:
            self._check.check(self._quic.peer_certificate)
        except PeerIdentityError as error:
            log.error("streams: %s", error)
            self._quic.close(error_code=CLOSE_IDENTITY, reason_phrase="identity not pinned")
            self._end(error)
            return
        self.ready.set_result(None)

    def _termination(self, event: events.ConnectionTerminated) -> PlexusError:
        reason = event.reason_phrase or f"code {event.error_code:#x}"
        # A peer that refuses us before our handshake completed can only say so in Handshake packets, where
        # RFC 9000 turns its application close into a transport APPLICATION_ERROR.
        refused_early = event.error_code == QuicErrorCode.APPLICATION_ERROR and not self.ready.done()
        if event.error_code == CLOSE_IDENTITY or refused_early:
            error: PlexusError = PeerIdentityError(
                "the peer refused this host's identity (it pins another id)"
            )
        elif event.error_code == CLOSE_DONE and event.frame_type is None:
            error = StreamsLostError("the peer closed the session")
        else:
            error = StreamsLostError(f"the streams connection failed: {reason}")
        return error

    def _end(self, error: PlexusError) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # whoever waits for it sees it; nobody waiting is fine too
        for stream in self._streams.values():
            stream._fail(error)
        if not self.closed.done():
            self.closed.set_result(None)
            self.accepted.put_nowait(None)
        if self._timer is not None:
            self._timer.cancel()
        self._wake_writers()

    def _stream(self, stream_id: int) -> Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = Stream(self, stream_id)
            self.accepted.put_nowait(stream)
        return stream

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._transport is None or self._transport.is_closing():
            return
        live = self._live()
        for quic in live:
            asked = quic.asked_at
            for data, addr in quic.datagrams_to_send(self._loop.time()):
                self._out(addr).sendto(data, addr)
            if asked is None and quic.asked_at is not None:
                self._asked.set()  # the keepalive's clock for suspect and dead starts now
        if self._timer is not None:
            self._timer.cancel()
        when = min((t for quic in live if (t := quic.get_timer()) is not None), default=None)
        self._timer = None if when is None else self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for quic in self._live():
            if self._quic is None or quic is self._quic:  # not a candidate another has just beaten
                quic.handle_timer(self._loop.time())
                self._dispatch(quic)
        self._flush()

    def _wake_writers(self) -> None:
        if not self._progress.done():
            self._progress.set_result(None)
        self._progress = self._loop.create_future()

    # used by Stream and the forwarding

    def send(self, stream_id: int, data: bytes, *, end: bool) -> None:
        assert self._quic is not None
        self._quic.send_stream_data(stream_id, data, end_stream=end)
        self._schedule_flush()

    async def drained(self, stream: Stream) -> None:
        """Wait while the stream has more than SEND_BUFFER bytes unacknowledged."""
        assert self._quic is not None
        while self._quic.unacknowledged(stream.id) > SEND_BUFFER and not self.closed.done():
            await asyncio.shield(self._progress)
        if stream._error is not None:
            raise stream._error

    def reset(self, stream_id: int) -> None:
        assert self._quic is not None
        with contextlib.suppress(ValueError):  # already finished
            self._quic.reset_stream(stream_id, error_code=1)
        self._streams.pop(stream_id, None)
        self._schedule_flush()

    def open(self) -> Stream:
        assert self._quic is not None
        if self.closed.done():
            raise StreamsLostError("the streams connection to the peer has ended")
        stream_id = self._quic.get_next_available_stream_id()
        stream = self._streams[stream_id] = Stream(self, stream_id)
        return stream

    def forget(self, stream: Stream) -> None:
        self._streams.pop(stream.id, None)

    @property
    def peer_id(self) -> str | None:
        certificate = None if self._quic is None else self._quic.peer_certificate
        return None if certificate is None else id_of(certificate.public_key())

    async def keepalive(self) -> None:
        """Until cancelled or closed: ping whenever the peer has been silent for KEEPALIVE_INTERVAL (twice
        that on the acceptor), suspect a move when what this side sent has had no answer for SUSPECT_AFTER
        (or, on the acceptor, the inviter's pings stopped: ACCEPTOR_SILENCE), and mark the path dead when it
        has had none for DEAD_AFTER (module docstring)."""
        assert self._quic is not None
        quic = self._quic
        client = quic.configuration.is_client
        interval = KEEPALIVE_INTERVAL * (1 if client else 2)
        pinged = -math.inf
        while not self.closed.done():
            now = self._loop.time()
            if now - max(quic.heard_at, pinged) >= interval:
                # Each interval into a silence, whatever aioquic's probe timeout has backed off to: the first
                # to get through once the path is back ends the silence (the peer's ACK of it declares what
                # went unanswered lost, and it goes again at once).
                quic.probe()
                self._flush()
                pinged = now
            wake = max(quic.heard_at, pinged) + interval
            if not self.suspect.is_set():
                # An acceptor that only answers (an echo, a download's ACKs) sends nothing once its own NAT
                # has moved; the inviter's pings, at most KEEPALIVE_INTERVAL apart, stop reaching it.
                since = [quic.asked_at + SUSPECT_AFTER] if quic.asked_at is not None else []
                since += [] if client else [quic.heard_at + ACCEPTOR_SILENCE]
                if since and now >= min(since):
                    self.suspect.set()
                elif since:
                    wake = min(wake, *since)
            if quic.asked_at is not None and not self.dead.is_set():
                if now - quic.asked_at >= DEAD_AFTER:
                    self._path_dead(quic, now)
                else:
                    wake = min(wake, quic.asked_at + DEAD_AFTER)
            self._asked.clear()
            await wait_event(self._asked, wake - now)

    def _watch(self, quic: _Connection) -> None:
        """After each datagram: has the peer moved (to a validated address), or come back?"""
        if not self._heard.is_set():
            self._heard.set()
        if self.suspect.is_set() and quic.asked_at is None:
            self.suspect.clear()
        peer = quic.validated_peer
        if peer is not None and peer != self._peer:
            before, self._peer = Endpoint(*self._peer[:2]), peer
            after = Endpoint(*peer[:2])
            log.info("streams: peer moved from %s to %s", before, after)
            plexus_events.emit(plexus_events.Migrated, before=before, after=after)
        if self.dead.is_set() and quic.asked_at is not None:
            if quic.heard_at > self._silent_since and not self._reprobed:
                # The peer is heard again; an ACK of this side's probe shows this side is heard too.
                self._reprobed = True
                quic.probe()
        elif self.dead.is_set():  # an ACK of something newer: answered again
            silent = quic.heard_at - self._silent_since
            self.dead.clear()
            # What this side sent into the silence waits for its probe timeout, which has backed off to
            # seconds by now; the peer's ACK of a probe declares it lost and it goes again at once.
            quic.probe()
            log.info("streams: the peer answers again after %.1f s of silence", silent)
            plexus_events.emit(plexus_events.PathBack, silent=round(silent, 3))

    def _path_dead(self, quic: _Connection, now: float) -> None:
        self.dead.set()
        self._reprobed = False
        self._silent_since = quic.heard_at
        silent = now - quic.heard_at
        log.warning(
            "streams: nothing from the peer for %.1f s (sent data or pings unanswered): the path looks dead;"
            " the session waits for it until the %g s idle timeout",
            silent,
            IDLE_TIMEOUT,
        )
        plexus_events.emit(plexus_events.PathDead, silent=round(silent, 3))

    def probe(self) -> None:
        """A PING now (beyond the congestion window, as the keepalive's)."""
        if self._quic is not None:
            self._quic.probe()
            self._flush()

    def _out(self, addr: NetworkAddress) -> asyncio.DatagramTransport:
        """The transport toward `addr`: the direct socket's, for anyone but the forwarder it has beside."""
        assert self._transport is not None
        if self._direct is None or addr[:2] == self._relayed:
            return self._transport
        return self._direct

    def set_direct(self, transport: asyncio.DatagramTransport) -> None:
        """The direct socket's transport, beside the one facing the forwarder (the punched `peer`)."""
        self._relayed = (self._punched.host, self._punched.port)
        self._direct = transport

    def punch(self, toward: Endpoint) -> None:
        """A PUNCH toward an endpoint the peer named (a rebind, a candidate): this side's NAT lets that
        endpoint's packets in then."""
        self._send(PUNCH, toward)

    def moved(self, peer: Endpoint) -> None:
        """The peer says, in an authenticated rebind, that it is at `peer` now. The acceptor needs nothing
        more than its punches (QUIC validates the new endpoint when its packets come, and moves); the
        inviter sends there from now on."""
        if self.client:
            self.reroute(peer)

    @property
    def client(self) -> bool:
        return self._quic is not None and self._quic.configuration.is_client

    @property
    def peer(self) -> Endpoint:
        """Where this side's datagrams go now."""
        return Endpoint(*self._peer[:2])

    def reroute(self, peer: Endpoint) -> None:
        """The inviter's: send to `peer` from now on (an endpoint an authenticated message named), and take
        datagrams from it. A QUIC client never moves to a new server address by itself (RFC 9000 section
        9); the acceptor's QUIC follows the inviter's new path by validating it."""
        assert self._quic is not None and self.client
        after = peer.canonical()
        if (after.host, after.port) == self._peer[:2]:
            return
        before = self.peer
        self._known.add((after.host, after.port))
        self._punched, self._peer = after, (after.host, after.port)
        self._quic.repoint(self._peer)
        log.info("streams: peer moved from %s to %s", before, after)
        plexus_events.emit(plexus_events.Migrated, before=before, after=after)

    def send_candidate(self, endpoint: Endpoint) -> None:
        """Tell the peer this side's endpoint for a direct path (a CANDIDATE control datagram), where the
        peer takes control datagrams."""
        if self._quic is not None and self._quic.takes_datagrams and not self.closed.done():
            self._quic.send_datagram_frame(wire.candidate_frame(endpoint))
            self._flush()

    async def heard_within(self, timeout: float) -> bool:
        """Whether a packet from the peer decrypts within `timeout` from now."""
        quic = self._quic
        assert quic is not None
        return await heard(self._heard, lambda: quic.heard_at, timeout)

    async def mapped(self, server: Endpoint) -> Endpoint | None:
        """This socket's outer endpoint as the STUN server at `server` (an IP address) sees it now, or None
        without an answer in time (stun.QUESTION_SCHEDULE). One question at a time. On a relay this side
        allocated, the direct socket's."""
        return (await self._question.ask(server, self._send)).mapped

    async def independent(self, server: Endpoint) -> Endpoint | None:
        """As `mapped`, where the NAT maps endpoint-independently now (stun.Question); else None."""
        return await self._question.independent(server, self._send)

    def _send(self, data: bytes, toward: Endpoint) -> None:
        transport = self._out((toward.host, toward.port))
        if not transport.is_closing():
            transport.sendto(data, (toward.host, toward.port))

    async def close(self) -> None:
        """Close cleanly: CONNECTION_CLOSE sent, then the socket, after at most CLOSE_TIMEOUT."""
        if self._quic is not None and not self.closed.done():
            self._quic.close(error_code=CLOSE_DONE, reason_phrase="session over")
            self._flush()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_TIMEOUT)
        self._end(StreamsLostError("the session is over"))
        for transport in (self._transport, self._direct):
            if transport is not None:
                transport.close()


class _Beside(asyncio.DatagramProtocol):
    """The direct socket beside a relay's forwarder: what arrives there is the link's as well."""

    def __init__(self, link: Link) -> None:
        self._link = link

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._link.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error on the direct socket: %s", exc)


async def _link(
    sock: socket.socket,
    quic: _Connection | None,
    check: PeerCheck,
    config: QuicConfiguration,
    peer: Endpoint,
    direct: socket.socket | None,
) -> Link:
    loop = asyncio.get_running_loop()
    link = Link(quic, check, config, peer)
    await loop.create_datagram_endpoint(lambda: link, sock=sock)
    if direct is not None:
        transport, _ = await loop.create_datagram_endpoint(lambda: _Beside(link), sock=direct)
        link.set_direct(transport)
    return link


async def connect(
    sock: socket.socket,
    peer: Endpoint,
    identity: Identity,
    check: PeerCheck,
    *,
    datagram_size: int,
    direct: socket.socket | None = None,
) -> Link:
    """The inviter's side: the handshake with the acceptor at `peer`, checked; `sock` is taken over (and
    `direct`, on a relay this side allocated: a socket for a direct path later, plexus/streams/direct.py)."""
    config = configuration(identity, client=True, datagram_size=datagram_size)
    quic = _Connection(configuration=config)
    link = await _link(sock, quic, check, config, peer, direct)
    quic.connect(peer, now=asyncio.get_running_loop().time())
    link._flush()
    return await _ready(link)


async def serve(
    sock: socket.socket,
    peer: Endpoint,
    identity: Identity,
    check: PeerCheck,
    *,
    datagram_size: int,
    direct: socket.socket | None = None,
) -> Link:
    """The acceptor's side: wait for the inviter's handshake from `peer`, checked; `sock` is taken over (and
    left unconnected: the inviter's packets may come from a new endpoint later, module docstring; `direct`
    as for connect)."""
    config = configuration(identity, client=False, datagram_size=datagram_size)
    link = await _link(sock, None, check, config, peer, direct)
    return await _ready(link)


async def _ready(link: Link) -> Link:
    try:
        await asyncio.wait_for(asyncio.shield(link.ready), HANDSHAKE_TIMEOUT)
    except TimeoutError:
        await link.close()
        if link._refusal is not None:  # no candidate completed, and one ended saying why (a peer refusing us)
            raise link._refusal from None
        raise StreamsLostError(f"no QUIC handshake with the peer within {HANDSHAKE_TIMEOUT:g} s") from None
    except PlexusError:
        await link.close()
        raise
    return link
