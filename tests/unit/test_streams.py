"""Streams: the frames at the start of each stream, targets and --forward specs, QUIC between two loopback
sockets (forwarding, refusals, identities, closing), and the command line's checks of the streams options."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aioquic._buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header
from cryptography.hazmat.primitives.asymmetric import ec

from plexus.endpoint import Endpoint
from plexus.errors import ExitCode, PeerIdentityError, StreamsLostError, TargetRefusedError, UsageError
from plexus.identity import Identity, PeerCheck
from plexus.mediator import smime
from plexus.options import Options, command_config, read_config, streams_config
from plexus.peers import Peer, Roster
from plexus.streams import forward, quic, wire
from plexus.streams.forward import Forward
from plexus.streams.wire import Code, FrameError
from plexus.targets import Allowed, Target
from tests.unit.test_cli import full_options, run
from tests.unit.test_smime import make_identity

Address = tuple[str, int]

# wire: the frames


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (Code.OPEN, "127.0.0.1:22"),
        (Code.CONNECTED, ""),
        (Code.NOT_ALLOWED, "x:1 is not in the acceptor's --forward-allow"),
        (Code.UNREACHABLE, "é ü 日本"),
        (Code.BAD_REQUEST, "a" * wire.MAX_TEXT),
    ],
)
def test_a_frame_reads_back_as_written_with_the_bytes_after_it(code: Code, text: str) -> None:
    data = wire.frame(code, text)
    assert wire.read_frame(data) == (code, text, b"")
    assert wire.read_frame(data + b"\x00payload") == (code, text, b"\x00payload")


def test_a_longer_text_is_cut_to_max_text() -> None:
    found = wire.read_frame(wire.frame(Code.UNREACHABLE, "b" * (wire.MAX_TEXT + 500)))
    assert found == (Code.UNREACHABLE, "b" * wire.MAX_TEXT, b"")


def test_a_long_text_cut_inside_a_character_still_reads_back() -> None:
    found = wire.read_frame(wire.frame(Code.NOT_ALLOWED, "x" + "é" * wire.MAX_TEXT))
    assert found is not None and found[1].startswith("xé")


def test_an_incomplete_frame_is_none() -> None:
    data = wire.frame(Code.OPEN, "example.net:443")
    for end in range(len(data)):
        assert wire.read_frame(data[:end]) is None
        assert wire.read_open(data[:end]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"\x01" + (wire.MAX_TEXT + 1).to_bytes(2, "big"),  # too long, rejected before it all arrives
        b"\x01\xff\xff",
        b"\x00\x00\x00",  # no such code
        b"\x7f\x00\x01a",
        b"\x10\x00\x02\xff\xfe",  # not UTF-8
    ],
)
def test_an_oversized_or_unknown_frame_is_a_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        wire.read_frame(data)


def test_read_open_returns_the_target_and_the_bytes_after_it() -> None:
    target = Target("::1", 22)
    assert wire.read_open(wire.open_frame(target) + b"SSH-2.0") == (target, b"SSH-2.0")


@pytest.mark.parametrize(
    "data",
    [wire.frame(Code.CONNECTED), wire.frame(Code.NOT_ALLOWED, "x:1"), wire.frame(Code.OPEN, "no port")],
)
def test_read_open_rejects_anything_but_an_open_frame_with_a_target(data: bytes) -> None:
    with pytest.raises(FrameError):
        wire.read_open(data)


# Targets, --forward-allow and --forward


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("localhost:22", "localhost", 22, "localhost:22"),
        (" Home.Example.NET:443 ", "home.example.net", 443, "home.example.net:443"),
        ("192.0.2.7:65535", "192.0.2.7", 65535, "192.0.2.7:65535"),
        ("[::1]:22", "::1", 22, "[::1]:22"),
        ("[2001:DB8:0:0:0:0:0:1]:8080", "2001:db8::1", 8080, "[2001:db8::1]:8080"),
        ("[0:0:0:0:0:0:0:1]:1", "::1", 1, "[::1]:1"),
    ],
)
def test_target_parses_names_ipv4_and_bracketed_ipv6(text: str, host: str, port: int, shown: str) -> None:
    target = Target.parse(text, "--stdio")
    assert target == Target(host, port)
    assert str(target) == shown
    assert Target.parse(shown, "--stdio") == target


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost", "expected HOST:PORT"),
        ("localhost:", "expected HOST:PORT"),
        (":22", "expected HOST:PORT"),
        ("::1:22", "expected HOST:PORT"),
        ("[::1]", "expected HOST:PORT"),
        ("host:ssh", "expected HOST:PORT"),
        ("host:-1", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
        ("host:0", "port 0 is not 1-65535"),
        ("host:65536", "port 65536 is not 1-65535"),
        ("[::1]:99999", "port 99999 is not 1-65535"),
        ("[not-v6]:22", "'not-v6' is not an IPv6 address"),
    ],
)
def test_a_bad_target_is_a_usage_error_naming_the_option(text: str, message: str) -> None:
    with pytest.raises(UsageError) as error:
        Target.parse(text, "--forward-allow")
    assert str(error.value).startswith(f"--forward-allow {text!r}: ")
    assert message in str(error.value)


def test_allowed_permits_exactly_the_targets_listed() -> None:
    allowed = Allowed.of(Target.parse(text, "--forward-allow") for text in ["127.0.0.1:22", "[::1]:80"])
    assert allowed.permits(Target("127.0.0.1", 22))
    assert allowed.permits(Target.parse("[0::1]:80", "target"))  # the same address, written otherwise
    for other in ["127.0.0.1:23", "localhost:22", "127.0.0.2:22", "[::1]:22", "127.0.0.1:80"]:
        assert not allowed.permits(Target.parse(other, "target")), other
    assert not Allowed.of([]).permits(Target("127.0.0.1", 22))


@pytest.mark.parametrize(
    ("text", "listen", "target"),
    [
        ("8022:127.0.0.1:22", Endpoint("127.0.0.1", 8022), Target("127.0.0.1", 22)),
        ("8022:home.example.net:22", Endpoint("127.0.0.1", 8022), Target("home.example.net", 22)),
        ("0.0.0.0:8080:10.0.0.1:80", Endpoint("0.0.0.0", 8080), Target("10.0.0.1", 80)),
        ("localhost:8080:web:80", Endpoint("localhost", 8080), Target("web", 80)),
        ("[::1]:8022:[::1]:22", Endpoint("::1", 8022), Target("::1", 22)),
        ("8022:[::1]:22", Endpoint("127.0.0.1", 8022), Target("::1", 22)),
    ],
)
def test_forward_parses_port_host_port_with_an_optional_bind(
    text: str, listen: Endpoint, target: Target
) -> None:
    assert Forward.parse(text) == Forward(listen, target)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected [BIND:]PORT:HOST:PORT"),
        ("8022", "expected [BIND:]PORT:HOST:PORT"),
        ("http:host:22", "expected [BIND:]PORT:HOST:PORT"),
        ("8022:host", "expected HOST:PORT"),
        ("0:host:22", "local port 0 is not 1-65535"),
        ("70000:host:22", "local port 70000 is not 1-65535"),
        ("8022:host:0", "port 0 is not 1-65535"),
        ("8022:host:99999", "port 99999 is not 1-65535"),
    ],
)
def test_a_bad_forward_is_a_usage_error_naming_the_option(text: str, message: str) -> None:
    with pytest.raises(UsageError) as error:
        Forward.parse(text)
    assert str(error.value).startswith("--forward ")
    assert message in str(error.value)


# QUIC between two loopback sockets


def new_identity() -> Identity:
    return Identity.of_key(ec.generate_private_key(ec.SECP256R1()))


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


@dataclass
class Pair:
    """Both ends of one QUIC connection: the acceptor serves, the inviter connects."""

    acceptor: Identity = field(default_factory=new_identity)
    inviter: Identity = field(default_factory=new_identity)
    acceptor_socket: socket.socket = field(default_factory=udp_socket)
    inviter_socket: socket.socket = field(default_factory=udp_socket)
    links: list[quic.Link] = field(default_factory=list)
    serving: list[asyncio.Task[quic.Link]] = field(default_factory=list)

    def serve(self, check: PeerCheck) -> asyncio.Task[quic.Link]:
        peer = Endpoint(*self.inviter_socket.getsockname())
        task = asyncio.ensure_future(
            self._kept(quic.serve(self.acceptor_socket, peer, self.acceptor, check, datagram_size=1400))
        )
        self.serving.append(task)
        return task

    async def connect(self, check: PeerCheck) -> quic.Link:
        peer = Endpoint(*self.acceptor_socket.getsockname())
        return await self._kept(
            quic.connect(self.inviter_socket, peer, self.inviter, check, datagram_size=1400)
        )

    async def _kept(self, making: Awaitable[quic.Link]) -> quic.Link:
        link = await making
        self.links.append(link)
        return link

    async def both(self, acceptor_check: PeerCheck, inviter_check: PeerCheck) -> tuple[quic.Link, quic.Link]:
        serving = self.serve(acceptor_check)
        inviter = await self.connect(inviter_check)
        return await serving, inviter


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[Pair]:
    """The links made are closed at the end, and the sockets whether a link took them over or not."""
    made = Pair()
    try:
        yield made
    finally:
        for task in made.serving:
            task.cancel()
        await asyncio.gather(*made.serving, return_exceptions=True)
        for link in made.links:
            await link.close()
        made.acceptor_socket.close()
        made.inviter_socket.close()


@contextlib.asynccontextmanager
async def serving(link: quic.Link, allowed: Allowed) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.ensure_future(forward.serve(link, allowed))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class Echo:
    """A TCP target: echoes what it reads, and after the client's EOF writes b"bye\\n" and shuts its side."""

    target: Target
    connections: int = 0


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[Echo]:
    echo = Echo(Target("127.0.0.1", 0))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        echo.connections += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write(b"bye\n")
            writer.write_eof()
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    echo.target = Target("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        yield echo
    finally:
        server.close()
        await server.wait_closed()


async def round_trip(link: quic.Link, target: Target, payload: bytes) -> bytes:
    stream, received = await forward.open_target(link, target)
    await stream.write(payload)
    stream.write_eof()
    while data := await stream.read():
        received += data
    return received


async def test_fifty_streams_at_once_carry_each_connection_both_ways_through_half_closes() -> None:
    async with echo_server() as echo, pair() as ends:
        acceptor, inviter = await ends.both(PeerCheck(ends.inviter.id), PeerCheck(ends.acceptor.id))
        assert (acceptor.peer_id, inviter.peer_id) == (ends.inviter.id, ends.acceptor.id)
        # sizes from nothing to well above a stream's SEND_BUFFER, so that writers wait for acks too
        payloads = [os.urandom(n * 211) for n in range(49)] + [os.urandom(quic.SEND_BUFFER + (256 << 10))]
        async with serving(acceptor, Allowed.of([echo.target])):
            received = await asyncio.wait_for(
                asyncio.gather(*(round_trip(inviter, echo.target, payload) for payload in payloads)), 20
            )
        assert [len(r) for r in received] == [len(p) + 4 for p in payloads]
        assert received == [payload + b"bye\n" for payload in payloads]
        assert echo.connections == 50


async def test_a_target_not_allowed_is_refused_and_never_connected() -> None:
    async with echo_server() as echo, pair() as ends:
        acceptor, inviter = await ends.both(PeerCheck(ends.inviter.id), PeerCheck(ends.acceptor.id))
        # the same server under another name or port is another target
        allowed = Allowed.of([Target("localhost", echo.target.port), Target("127.0.0.1", 1)])
        async with serving(acceptor, allowed):
            for target in (echo.target, Target("127.0.0.2", echo.target.port)):
                with pytest.raises(TargetRefusedError) as error:
                    await asyncio.wait_for(forward.open_target(inviter, target), 5)
                assert str(error.value) == (
                    f"the acceptor refused {target}: {target} is not a target the acceptor allows this peer "
                    "(--forward-allow, allow=)"
                )
        assert echo.connections == 0


async def test_an_allowed_target_that_refuses_the_connection_is_refused_with_the_reason() -> None:
    # bound, not listening: connecting is refused, and no other test can take the port meanwhile
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind(("127.0.0.1", 0))
    target = Target("127.0.0.1", closed.getsockname()[1])
    try:
        async with echo_server() as echo, pair() as ends:
            acceptor, inviter = await ends.both(PeerCheck(ends.inviter.id), PeerCheck(ends.acceptor.id))
            async with serving(acceptor, Allowed.of([target, echo.target])):
                with pytest.raises(TargetRefusedError) as error:
                    await asyncio.wait_for(forward.open_target(inviter, target), 5)
                assert f"the acceptor cannot connect to {target}" in str(error.value)
                assert "\n" not in str(error.value)
                # the link is still good for the next stream
                assert await round_trip(inviter, echo.target, b"again") == b"againbye\n"
    finally:
        closed.close()


async def test_an_acceptor_pinning_another_id_lets_no_stream_through() -> None:
    async with echo_server() as echo, pair() as ends:
        serving_ = ends.serve(PeerCheck(Identity.ephemeral().id))
        with pytest.raises(PeerIdentityError) as refused:
            inviter = await ends.connect(PeerCheck(ends.acceptor.id))
            await asyncio.wait_for(forward.open_target(inviter, echo.target), 5)
        assert "the peer refused this host's identity" in str(refused.value)
        with pytest.raises(PeerIdentityError) as error:
            await serving_
        assert f"the peer is {ends.inviter.id}, not the pinned" in str(error.value)
        assert echo.connections == 0


async def test_an_inviter_pinning_another_id_does_not_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quic, "HANDSHAKE_TIMEOUT", 1.0)  # when the acceptor gives up on its candidates
    async with pair() as ends:
        serving_ = ends.serve(PeerCheck(ends.inviter.id))
        pinned = Identity.ephemeral().id
        with pytest.raises(PeerIdentityError) as error:
            await ends.connect(PeerCheck(pinned))
        assert str(error.value) == f"the peer is {ends.acceptor.id}, not the pinned {pinned}"
        assert ends.links == []
        with pytest.raises((PeerIdentityError, StreamsLostError)):
            await asyncio.wait_for(serving_, 5)


async def test_an_acceptor_refused_by_the_inviter_learns_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """It learns it when its handshake window ends: a candidate's end is no proof (a forged Initial can end
    its own), so the acceptor waits for another candidate to complete until then."""
    monkeypatch.setattr(quic, "HANDSHAKE_TIMEOUT", 1.0)
    async with pair() as ends:
        serving_ = ends.serve(PeerCheck(ends.inviter.id))
        with pytest.raises(PeerIdentityError):
            await ends.connect(PeerCheck(Identity.ephemeral().id))
        with pytest.raises(PeerIdentityError, match="the peer refused this host's identity"):
            await asyncio.wait_for(serving_, 5)


def client_initial(alpn: str) -> bytes:
    """The first datagram of another QUIC client (its own destination connection id): what an attacker who
    forges the inviter's endpoint can send before the real Initial."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[alpn], verify_mode=ssl.CERT_NONE)
    client = QuicConnection(configuration=config)
    client.connect(("127.0.0.1", 9), now=time.monotonic())
    datagram, _ = client.datagrams_to_send(now=time.monotonic())[0]
    assert len(datagram) >= quic.INITIAL_SIZE
    return datagram


def stray_long_header(size: int) -> bytes:
    """A well-formed Initial header (version 1, a random connection id, no token) over random bytes: it parses
    as the start of a connection, but nothing in it decrypts."""
    header = bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([8]) + os.urandom(8) + bytes([8]) + os.urandom(8)
    header += b"\x00"  # no token
    length = size - len(header) - 2
    return header + (0x4000 | length).to_bytes(2, "big") + os.urandom(length)


@pytest.mark.parametrize(
    "strays",
    [
        pytest.param(lambda: [stray_long_header(60)], id="a-stray-long-header"),
        pytest.param(lambda: [stray_long_header(1200)], id="a-stray-initial-sized-datagram"),
        pytest.param(lambda: [client_initial(wire.ALPN)], id="another-clients-initial"),
        pytest.param(lambda: [client_initial("h3")], id="an-initial-whose-candidate-fails-at-once"),
        pytest.param(
            lambda: [client_initial(wire.ALPN) for _ in range(quic.MAX_CANDIDATES + 3)],
            id="a-flood-of-initials",
        ),
    ],
)
async def test_strays_from_the_inviters_endpoint_before_its_initial_do_not_break_streams(
    strays: Callable[[], list[bytes]],
) -> None:
    async with echo_server() as echo, pair() as ends:
        serving_ = ends.serve(PeerCheck(ends.inviter.id))
        await asyncio.sleep(0.05)  # the acceptor listens
        for datagram in strays():
            ends.inviter_socket.sendto(datagram, ends.acceptor_socket.getsockname())
        await asyncio.sleep(0.05)  # ... and has made its candidates of them, before the real Initial
        inviter = await ends.connect(PeerCheck(ends.acceptor.id))
        acceptor = await asyncio.wait_for(serving_, 5)
        assert acceptor.peer_id == ends.inviter.id
        async with serving(acceptor, Allowed.of([echo.target])):
            assert await round_trip(inviter, echo.target, b"hello") == b"hellobye\n"


async def test_anonymous_on_both_sides_works_and_still_shows_the_ids() -> None:
    async with echo_server() as echo, pair() as ends:
        acceptor, inviter = await ends.both(PeerCheck(None), PeerCheck(None))
        assert (acceptor.peer_id, inviter.peer_id) == (ends.inviter.id, ends.acceptor.id)
        async with serving(acceptor, Allowed.of([echo.target])):
            assert await round_trip(inviter, echo.target, b"hello") == b"hellobye\n"


async def test_smime_certificates_are_the_identities_over_quic(tmp_path: Path) -> None:
    alice, bob = make_identity(tmp_path, "alice"), make_identity(tmp_path, "bob")
    a = smime.Keys.load(smime.SmimeConfig(alice.cert_path, alice.key_path, bob.cert_path))
    b = smime.Keys.load(smime.SmimeConfig(bob.cert_path, bob.key_path, alice.cert_path))
    async with echo_server() as echo, pair() as ends:
        ends.acceptor, ends.inviter = a.identity(), b.identity()
        acceptor, inviter = await ends.both(a.peer_check(), b.peer_check())
        async with serving(acceptor, Allowed.of([echo.target])):
            assert await round_trip(inviter, echo.target, b"signed") == b"signedbye\n"


@pytest.mark.parametrize("closer", ["inviter", "acceptor"])
async def test_closing_one_side_ends_the_other_at_once(closer: str) -> None:
    async with echo_server() as echo, pair() as ends:
        acceptor, inviter = await ends.both(PeerCheck(ends.inviter.id), PeerCheck(ends.acceptor.id))
        async with serving(acceptor, Allowed.of([echo.target])) as served:
            stream, _ = await forward.open_target(inviter, echo.target)
            await stream.write(b"open")
            assert await stream.read() == b"open"
            closing, other = (inviter, acceptor) if closer == "inviter" else (acceptor, inviter)
            started = time.monotonic()
            await closing.close()
            await asyncio.wait_for(asyncio.shield(other.closed), 1.0)
            assert time.monotonic() - started < 1.0
            if closer == "inviter":
                await asyncio.wait_for(served, 1.0)  # forward.serve ends with the link
            else:
                with pytest.raises(StreamsLostError):
                    await asyncio.wait_for(stream.read(), 1.0)


@pytest.mark.parametrize("closer", ["inviter", "acceptor"])
async def test_a_stream_opened_after_the_link_closed_fails_at_once(closer: str) -> None:
    async with pair() as ends:
        acceptor, inviter = await ends.both(PeerCheck(ends.inviter.id), PeerCheck(ends.acceptor.id))
        async with serving(acceptor, Allowed.of([Target("127.0.0.1", 22)])):
            await (inviter if closer == "inviter" else acceptor).close()
            await asyncio.wait_for(asyncio.shield(inviter.closed), 1.0)
            with pytest.raises(StreamsLostError):
                await asyncio.wait_for(forward.open_target(inviter, Target("127.0.0.1", 22)), 0.5)


async def test_a_stream_that_does_not_start_with_open_is_a_bad_request() -> None:
    async with pair() as ends:
        acceptor, inviter = await ends.both(PeerCheck(ends.inviter.id), PeerCheck(ends.acceptor.id))
        async with serving(acceptor, Allowed.of([Target("127.0.0.1", 22)])):
            stream = inviter.open()
            await stream.write(wire.frame(Code.CONNECTED))
            code, reason, _ = await asyncio.wait_for(read_verdict(stream), 5)
            assert (code, reason) == (Code.BAD_REQUEST, "expected OPEN, got CONNECTED")


async def test_a_stream_whose_open_never_comes_is_a_bad_request_with_a_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(forward, "OPEN_TIMEOUT", 0.2)
    async with pair() as ends:
        acceptor, inviter = await ends.both(PeerCheck(ends.inviter.id), PeerCheck(ends.acceptor.id))
        async with serving(acceptor, Allowed.of([Target("127.0.0.1", 22)])):
            stream = inviter.open()
            await stream.write(b"\x01")  # the start of an OPEN frame, and nothing more
            code, reason, _ = await asyncio.wait_for(read_verdict(stream), 5)
            assert code is Code.BAD_REQUEST
            assert reason.startswith("no OPEN frame within")


async def read_verdict(stream: quic.Stream) -> tuple[Code, str, bytes]:
    buffer = b""
    while (found := wire.read_frame(buffer)) is None:
        data = await stream.read()
        assert data, "the stream ended without a verdict"
        buffer += data
    return found


# The command line: the streams options are checked before any mail or network


@pytest.fixture(autouse=True)
def _no_cli_log_handler_left() -> Iterator[None]:
    """cli.main points the root logger at the test's captured stderr: take its handler away afterwards."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and type(handler) in (logging.StreamHandler, logging.FileHandler):
            root.removeHandler(handler)
    root.setLevel(level)


def base_options(tmp_path: Path) -> list[str]:
    """Every other option a session needs, without --exec-command (streams replace it)."""
    return [o for o in full_options(tmp_path) if not o.startswith("--exec-command")]


def test_show_id_prints_the_id_and_makes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "host.pem"
    code, out, err = run(["--show-id", f"--identity={path}"], capsys)
    assert (code, err) == (0, "")
    assert out == Identity.load(path).id + "\n"
    assert run(["--show-id", f"--identity={path}"], capsys)[1] == out


def test_show_id_without_identity_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--show-id"], capsys)
    assert code == ExitCode.USAGE
    assert err == "plexus: --show-id needs --identity=FILE (made on first use)\n"


@pytest.mark.parametrize(
    "streams",
    [["--accept", "--forward-allow=127.0.0.1:22"], ["--stdio=127.0.0.1:22"], ["--forward=8022:h:22"]],
)
def test_streams_without_an_identity_are_refused(
    tmp_path: Path, streams: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run([*base_options(tmp_path), *streams], capsys)
    assert code == ExitCode.USAGE
    assert err.count("\n") == 1 and err.startswith("plexus: streams need to know the peer")
    assert "--identity" in err and "--anonymous" in err


PINNED = ["--identity=KEY", "--peer-identity=PEER"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--forward-allow=127.0.0.1:22", "--anonymous"], "--forward-allow is the acceptor's"),
        (["--accept", "--stdio=127.0.0.1:22", "--anonymous"], "--stdio and --forward are the inviter's"),
        (["--accept", "--forward=8022:h:22", "--anonymous"], "--stdio and --forward are the inviter's"),
        (["--stdio=127.0.0.1:22", "--forward=8022:h:22", "--anonymous"], "give one or the other"),
        (["--stdio=127.0.0.1:22", *PINNED, "--exec-command=/bin/sh"], "leave out --exec-command"),
        (["--forward=8022:h:22", *PINNED, "--exec-command=/bin/sh"], "leave out --exec-command"),
        (["--stdio=127.0.0.1:22", "--identity=KEY"], "missing --peer-identity"),
        (["--stdio=127.0.0.1:22", "--identity=KEY", "--peer-identity=abc"], "--peer-identity 'abc' is not"),
        (["--forward=8022:localhost", "--anonymous"], "--forward 'localhost': expected HOST:PORT"),
        (["--forward=99999:h:22", "--anonymous"], "--forward '99999:h:22': local port 99999"),
        (["--forward=nonsense", "--anonymous"], "--forward 'nonsense': expected [BIND:]PORT:HOST:PORT"),
        (["--stdio=127.0.0.1", "--anonymous"], "--stdio '127.0.0.1': expected HOST:PORT"),
        (["--accept", "--forward-allow=h:0", "--anonymous"], "--forward-allow 'h:0': port 0"),
    ],
)
def test_bad_streams_options_are_one_line_usage_errors(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = Identity.ephemeral().id
    extra = [e.replace("KEY", str(tmp_path / "host.pem")).replace("PEER", peer) for e in extra]
    code, _, err = run([*base_options(tmp_path), *extra], capsys)
    assert (code, err.count("\n")) == (ExitCode.USAGE, 1), err
    assert err.startswith("plexus: ") and message in err, err


ROSTER = Roster.of(Peer("b", "b"))


def test_forward_allow_in_the_config_file_is_comma_separated(tmp_path: Path) -> None:
    path = tmp_path / "plexus.conf"
    path.write_text("accept\nanonymous\nforward-allow = 127.0.0.1:22, [::1]:80,localhost:8080\n")
    streams = streams_config(Options({}, read_config(path), path), None, ROSTER)
    assert streams is not None and streams.check is not None and streams.check.anonymous
    assert not streams.inviting
    assert streams.allowed == Allowed.of(
        [Target("127.0.0.1", 22), Target("::1", 80), Target("localhost", 8080)]
    )
    path.write_text("accept\nanonymous\nforward-allow = 127.0.0.1:22, nonsense\n")
    with pytest.raises(UsageError, match=r"^--forward-allow \(.*plexus.conf:3\) 'nonsense': expected"):
        streams_config(Options({}, read_config(path), path), None, ROSTER)


def test_identity_and_peer_identity_pin_the_peer(tmp_path: Path) -> None:
    peer = Identity.ephemeral()
    key = tmp_path / "host.pem"
    options = Options(
        {"stdio": "127.0.0.1:22", "identity": str(key), "peer-identity": f" {peer.id.upper()} "}, {}
    )
    streams = streams_config(options, None, ROSTER)
    assert streams is not None and streams.inviting
    assert streams.stdio == Target("127.0.0.1", 22) and streams.allowed is None
    assert streams.check == PeerCheck(peer.id)
    assert streams.identity.id == Identity.load(key).id
    assert command_config(options, streams, ROSTER) is None  # --stdio replaces the command


def test_no_streams_options_no_streams(tmp_path: Path) -> None:
    assert streams_config(Options({"identity": str(tmp_path / "k.pem")}, {}), None, ROSTER) is None
    assert not (tmp_path / "k.pem").exists()


# quic: the aioquic internals _Connection reaches (pinned aioquic; these fail first when it changes them)


CLIENT, SERVER = ("192.0.2.2", 1), ("192.0.2.1", 1)


def exchange(
    server: quic._Connection, client: quic._Connection, now: float, *, source: Address = CLIENT
) -> float:
    """Ten rounds of what each side has to send, the client's from `source`, 10 ms apart; the time after."""
    for _ in range(10):
        now += 0.01
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER, now=now)
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, source, now=now)
    return now


def handshake_in_memory() -> tuple[quic._Connection, quic._Connection, Identity, Identity, float]:
    """A server and a client that completed their handshake, without sockets: server, client, their
    identities, the time."""
    acceptor_id, inviter_id = Identity.ephemeral(), Identity.ephemeral()
    size = quic.DATAGRAM_SIZE
    client = quic._Connection(configuration=quic.configuration(inviter_id, client=True, datagram_size=size))
    now = 0.0
    client.connect(SERVER, now=now)
    in_flight = [data for data, _ in client.datagrams_to_send(now=now)]
    header = pull_quic_header(Buffer(data=in_flight[0]), host_cid_length=8)
    server = quic._Connection(
        configuration=quic.configuration(acceptor_id, client=False, datagram_size=size),
        original_destination_connection_id=header.destination_cid,
    )
    for data in in_flight:
        server.receive_datagram(data, CLIENT, now=now)
    return server, client, acceptor_id, inviter_id, exchange(server, client, now)


def test_the_aioquic_internals_the_connection_adapter_reaches_are_there() -> None:
    """_Connection's pacer, client-certificate request, peer certificate, unacknowledged bytes, when the
    peer was heard and asked (and answered by an ACK), its probe, the validated peer address, whether the
    peer takes DATAGRAM frames and the client's repointing, on an in-memory handshake: a new
    aioquic that renames what they reach fails here, by name, not as a hang."""
    server, client, acceptor_id, inviter_id, now = handshake_in_memory()
    for connection in (server, client):
        assert isinstance(connection._loss._pacer, quic._Pacer), "aioquic moved its pacer (_loss._pacer)"
    assert server.tls._request_client_certificate, "aioquic's tls.Context lost _request_client_certificate"
    assert client.peer_certificate is not None and server.peer_certificate is not None
    assert quic.id_of(server.peer_certificate.public_key()) == inviter_id.id
    assert quic.id_of(client.peer_certificate.public_key()) == acceptor_id.id
    assert (server.validated_peer, client.validated_peer) == (CLIENT, SERVER)
    assert 0 < server.heard_at <= now and 0 < client.heard_at <= now, "_payload_received is not reached"
    client.probe()
    for data, _ in client.datagrams_to_send(now=now):
        server.receive_datagram(data, CLIENT, now=now)
    assert client.asked_at == now, "aioquic lost _send_probe or _ack_eliciting_sent_since_receipt"
    exchange(server, client, now)
    assert client.asked_at is None and client.heard_at > now, "aioquic lost _handle_ack_frame or _spaces"
    assert client.takes_datagrams and server.takes_datagrams, "_remote_max_datagram_frame_size moved"
    client.repoint(("192.0.2.9", 9))
    client.probe()
    assert {addr for _, addr in client.datagrams_to_send(now=now)} == {("192.0.2.9", 9)}
    client.repoint(SERVER)
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"x" * 5000)
    assert client.unacknowledged(stream_id) == 5000
    pacer = client._loss._pacer
    pacer.update_rate(congestion_window=1 << 20, smoothed_rtt=0.025)
    rate = (1 << 20) / 0.025
    assert pacer.bucket_max >= quic.PACING_BURST * quic.DATAGRAM_SIZE / rate * 0.99  # 64 a wake-up, not 16


def test_the_server_moves_to_a_clients_new_address_once_it_answers_there_and_never_on_a_replay() -> None:
    """What Link counts on from aioquic: a new packet from a new address moves the server, validated by the
    client's answer there; a replayed or altered one, from anywhere, changes nothing; a genuine one raced
    to the server from another address (an attacker on the path) only until its challenge goes unanswered."""
    server, client, _, _, now = handshake_in_memory()
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"before")
    old = [data for data, _ in client.datagrams_to_send(now=now)]
    for data in old:
        server.receive_datagram(data, CLIENT, now=now)
    now = exchange(server, client, now)
    forger = ("192.0.2.66", 666)
    for data in [*old, old[0][:-1] + bytes([old[0][-1] ^ 1])]:
        server.receive_datagram(data, forger, now=now)
    assert server.validated_peer == CLIENT and server.get_peer_address() == CLIENT
    assert all(addr == CLIENT for _, addr in server.datagrams_to_send(now=now))
    client.send_stream_data(stream_id, b"raced")
    for data, _ in client.datagrams_to_send(now=now):
        server.receive_datagram(data, forger, now=now)
    assert server.get_peer_address() == forger and server.validated_peer is None  # challenged, not moved
    now = exchange(server, client, now)
    assert server.validated_peer == CLIENT
    moved = ("192.0.2.2", 2)
    client.send_ping(2)
    now = exchange(server, client, now, source=moved)
    assert server.validated_peer == moved
