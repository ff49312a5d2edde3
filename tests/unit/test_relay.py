"""plexus/relay.py without a TURN server: error mapping, the refresher, the send path, the forwarder."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from typing import Any

import pytest
from aioice import stun
from hypothesis import given
from hypothesis import strategies as st

from plexus.endpoint import Endpoint
from plexus.errors import ExitCode, TurnAuthError, TurnError, TurnUnreachableError
from plexus.relay import PENDING_SIZE, Refresher, Relay, _Client, _StreamClient, forward, refusal
from tests.fuzz import FUZZ

SERVER = "192.0.2.1:3478"
PEER = Endpoint("198.51.100.6", 40000)


def failed(code: int, reason: str) -> stun.TransactionFailed:
    response = stun.Message(stun.Method.ALLOCATE, stun.Class.ERROR)
    response.attributes["ERROR-CODE"] = (code, reason)
    return stun.TransactionFailed(response)


# ---- error mapping -----------------------------------------------------------------------------------------


def test_a_401_after_the_nonce_round_is_an_auth_error() -> None:
    error = refusal(SERVER, "allocation", failed(401, "Unauthorized"))
    assert type(error) is TurnAuthError and error.exit_code is ExitCode.TURN_AUTH == 12
    assert str(error) == "TURN server 192.0.2.1:3478 refused the user name or password (401 Unauthorized)"


def test_other_refusals_are_turn_errors_with_their_code() -> None:
    error = refusal(SERVER, "allocation", failed(486, "Allocation Quota Reached"))
    assert type(error) is TurnError and error.exit_code is ExitCode.TURN_REFUSED
    assert str(error) == "TURN server 192.0.2.1:3478 refused the allocation (486 Allocation Quota Reached)"
    assert "403" in str(refusal(SERVER, "channel", failed(403, "Forbidden IP")))


def test_a_transaction_timeout_is_unreachable() -> None:
    error = refusal(SERVER, "allocation", stun.TransactionTimeout())
    assert type(error) is TurnUnreachableError and error.exit_code is ExitCode.TURN_UNREACHABLE == 13
    assert str(error) == "no answer from TURN server 192.0.2.1:3478 to the allocation"


async def test_a_closed_port_is_unreachable_within_the_bound() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = Endpoint(*probe.getsockname())
    started = time.monotonic()
    with pytest.raises(TurnUnreachableError) as caught:
        async with Relay(closed, "user", "password", allocate_timeout=0.5):
            pass
    assert time.monotonic() - started < 1.0
    assert str(caught.value) == f"no answer from TURN server {closed} within 0.5 s (Connection refused)"


async def test_an_unresolvable_server_is_unreachable() -> None:
    with pytest.raises(TurnUnreachableError, match=r"^cannot resolve TURN server nowhere\.invalid: "):
        async with Relay(Endpoint("nowhere.invalid", 3478), "user", "password"):
            pass


# ---- the refresher -----------------------------------------------------------------------------------------


class FakeClient:
    """The parts of aioice's client the refresher and the send path use; records what is asked of it."""

    def __init__(self) -> None:
        self.peer_to_channel: dict[tuple[str, int], int] = {}
        self.channel_to_peer: dict[int, tuple[str, int]] = {}
        self.channel_refresh_at: dict[int, float] = {}
        self.channel_refresh_time = 500
        self.permitted: set[str] = set()
        self.calls: list[tuple[str, Any]] = []
        self.fail: set[str] = set()  # IPs whose requests time out
        self.hang: set[str] = set()  # IPs whose requests never end
        self.sent: list[bytes] = []
        self.transport = self
        self.bind_delay = 0.0

    async def _answer(self, ip: str) -> None:
        if ip in self.hang:
            await asyncio.sleep(3600)
        if ip in self.fail:
            raise stun.TransactionTimeout()

    def channel(self, peer: tuple[str, int]) -> int | None:
        return self.peer_to_channel.get(peer)

    def channels(self) -> list[tuple[tuple[str, int], int]]:
        return list(self.peer_to_channel.items())

    def rebound(self, channel: int) -> None:
        self.channel_refresh_at[channel] = time.time() + self.channel_refresh_time

    async def channel_bind(self, channel_number: int, addr: tuple[str, int]) -> None:
        self.calls.append(("bind", (channel_number, addr)))
        await self._answer(addr[0])

    async def request_with_retry(self, request: stun.Message) -> tuple[stun.Message, tuple[str, int]]:
        assert request.message_method is stun.Method.CREATE_PERMISSION
        peer = request.attributes["XOR-PEER-ADDRESS"]
        self.calls.append(("permission", peer[0]))
        await self._answer(peer[0])
        return stun.Message(stun.Method.CREATE_PERMISSION, stun.Class.RESPONSE), ("192.0.2.1", 3478)

    async def send_data(self, data: bytes, addr: tuple[str, int]) -> None:  # aioice: binds, then sends
        self.calls.append(("send_data", addr))
        await asyncio.sleep(self.bind_delay)
        await self._answer(addr[0])
        channel = 0x4000 + len(self.peer_to_channel)
        self.peer_to_channel[addr] = channel
        self.channel_to_peer[channel] = addr
        self.sendto(struct.pack("!HH", channel, len(data)) + data)

    # the transport
    def sendto(self, data: bytes) -> None:
        self.sent.append(data)

    write = sendto  # _Plexus.write: a ChannelData message, framed for the transport

    def is_closing(self) -> bool:
        return False


async def test_each_round_rebinds_every_channel_and_renews_permissions_without_one() -> None:
    client = FakeClient()
    client.peer_to_channel = {("198.51.100.6", 1000): 0x4000, ("198.51.100.7", 2000): 0x4001}
    client.permitted = {"198.51.100.6", "198.51.100.9"}
    refresher = Refresher(client, SERVER, interval=240, timeout=1)
    before = time.time()
    await refresher.refresh()
    assert client.calls == [
        ("bind", (0x4000, ("198.51.100.6", 1000))),
        ("bind", (0x4001, ("198.51.100.7", 2000))),
        ("permission", "198.51.100.9"),  # .6 is covered by its channel
    ]
    assert all(at >= before + 500 for at in client.channel_refresh_at.values())
    assert (refresher.rounds, refresher.failures) == (1, 0)


async def test_the_refresher_runs_every_interval_and_outlives_failures() -> None:
    client = FakeClient()
    client.peer_to_channel = {("198.51.100.6", 1000): 0x4000, ("198.51.100.7", 2000): 0x4001}
    client.permitted = {"198.51.100.8"}
    client.fail = {"198.51.100.6"}
    client.hang = {"198.51.100.8"}
    refresher = Refresher(client, SERVER, interval=0.05, timeout=0.05)
    task = asyncio.create_task(refresher.run())
    await asyncio.sleep(0.5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # each round: .6 fails at once, .7 succeeds, .8 hangs until the timeout; about 0.1 s a round
    assert 3 <= refresher.rounds <= 5
    assert 2 * refresher.rounds <= refresher.failures <= 2 * refresher.rounds + 2  # cancelled mid-round
    binds_of_7 = [c for c in client.calls if c == ("bind", (0x4001, ("198.51.100.7", 2000)))]
    assert len(binds_of_7) >= refresher.rounds
    assert 0x4000 not in client.channel_refresh_at and 0x4001 in client.channel_refresh_at


def test_the_refresh_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Refresher(FakeClient(), SERVER, interval=0, timeout=1)


# ---- the send path and the forwarder, on a relay with a fake client ----------------------------------------


def fake_relay() -> tuple[Relay, FakeClient]:
    relay = Relay(Endpoint("192.0.2.1", 3478), "user", "password")
    client = FakeClient()
    relay._client = client  # type: ignore[assignment]
    relay.relayed = Endpoint("192.0.2.1", 49152)
    return relay, client


def channel_data(message: bytes) -> tuple[int, bytes]:
    channel, length = struct.unpack("!HH", message[:4])
    assert len(message) == 4 + length
    return channel, message[4:]


async def test_one_bind_per_new_peer_then_channel_data_without_tasks() -> None:
    relay, client = fake_relay()
    client.bind_delay = 0.05
    for n in range(PENDING_SIZE + 5):
        relay.sendto(b"%d" % n, PEER)
    assert len(relay._tasks) == 1  # one bind, not a task per datagram
    await asyncio.gather(*relay._tasks)
    assert [c for c in client.calls if c[0] == "send_data"] == [("send_data", PEER)]
    sent = [channel_data(m) for m in client.sent]
    assert [data for _, data in sent] == [b"%d" % n for n in range(PENDING_SIZE + 1)]  # the first + pending
    assert relay.dropped == 4
    relay.sendto(b"direct", PEER)
    assert not relay._tasks and channel_data(client.sent[-1]) == (0x4000, b"direct")


async def test_a_failed_bind_drops_its_datagrams_and_the_next_send_binds_again() -> None:
    relay, client = fake_relay()
    client.fail = {PEER.host}
    relay.sendto(b"1", PEER)
    relay.sendto(b"2", PEER)
    await asyncio.gather(*relay._tasks)
    assert relay.dropped == 2 and not client.sent
    client.fail = set()
    relay.sendto(b"3", PEER)
    await asyncio.gather(*relay._tasks)
    assert [channel_data(m)[1] for m in client.sent] == [b"3"]


async def test_recvfrom_queues_and_ends_with_the_relay() -> None:
    relay, _ = fake_relay()
    relay._sink(b"x", PEER)
    assert await relay.recvfrom() == (b"x", PEER)
    waiting = asyncio.create_task(relay.recvfrom())
    await asyncio.sleep(0.01)
    relay._sink(b"y", PEER)
    assert await waiting == (b"y", PEER)
    relay._ended(None)
    with pytest.raises(TurnError, match="was lost"):
        await relay.recvfrom()
    with pytest.raises(TurnError, match="was lost"):
        relay.sendto(b"z", PEER)


async def test_a_relay_over_a_stream_is_lost_with_its_connection() -> None:
    relay = Relay(Endpoint("192.0.2.1", 5349), "user", "password", transport="tls")
    relay._client = FakeClient()  # type: ignore[assignment]
    relay.relayed = Endpoint("192.0.2.1", 49152)
    relay._ended(None)
    message = "TURN relay 192.0.2.1:49152 on 192.0.2.1:5349 over TLS was lost: its connection closed"
    with pytest.raises(TurnError, match=f"^{re.escape(message)}$"):
        await relay.recvfrom()


def test_data_indications_from_a_permitted_ip_reach_the_receiver_from_any_port() -> None:
    client = _Client(("192.0.2.1", 3478), "user", "password", 600)
    heard: list[tuple[bytes, tuple[str, int]]] = []

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            heard.append((data, addr))

    client.receiver = Receiver()
    client.permitted.add("198.51.100.6")

    def indication(source: tuple[str, int], data: bytes) -> bytes:
        message = stun.Message(stun.Method.DATA, stun.Class.INDICATION)
        message.attributes["XOR-PEER-ADDRESS"] = source
        message.attributes["DATA"] = data
        return bytes(message)

    client.datagram_received(indication(("198.51.100.6", 5555), b"in"), ("192.0.2.1", 3478))
    client.datagram_received(indication(("198.51.100.7", 5555), b"out"), ("192.0.2.1", 3478))
    assert heard == [(b"in", ("198.51.100.6", 5555))]


def _indication_bytes(data: bytes) -> bytes:
    message = stun.Message(stun.Method.DATA, stun.Class.INDICATION)
    message.attributes["XOR-PEER-ADDRESS"] = ("198.51.100.6", 5555)
    message.attributes["DATA"] = data
    return bytes(message)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=120),
        st.builds(
            lambda data, spots: bytes(
                byte ^ spots.get(index, 0) for index, byte in enumerate(_indication_bytes(data))
            )[: len(_indication_bytes(data)) - spots.get(-1, 0)],
            st.binary(max_size=16),
            st.dictionaries(st.integers(-1, 47), st.integers(0, 255), max_size=4),
        ),
    )
)
def test_no_datagram_from_the_servers_address_escapes_the_turn_client(data: bytes) -> None:
    """aioice's parser raises struct.error on some malformed messages, which aioice does not catch."""
    client = _Client(("192.0.2.1", 3478), "user", "password", 600)
    client.receiver = asyncio.DatagramProtocol()
    client.permitted.add("198.51.100.6")
    client.datagram_received(data, ("192.0.2.1", 3478))


async def test_forward_carries_both_ways_and_hears_only_the_authenticated_peer() -> None:
    relay, client = fake_relay()
    client.peer_to_channel = {tuple(PEER): 0x4000}  # type: ignore[dict-item]
    loop = asyncio.get_running_loop()
    command = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    local = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with command, local, stranger:
        for sock in (command, local, stranger):
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
        command_at, local_at = Endpoint(*command.getsockname()), Endpoint(*local.getsockname())
        relay._sink(b"early", PEER)
        task = asyncio.create_task(forward(relay, local, command_at, PEER))
        async with asyncio.timeout(2):
            assert await loop.sock_recvfrom(command, 100) == (b"early", tuple(local_at))
            await loop.sock_sendto(command, b"out", local_at)
            await loop.sock_sendto(stranger, b"not the command", local_at)
            while not client.sent:
                await asyncio.sleep(0.01)
            assert [channel_data(m) for m in client.sent] == [(0x4000, b"out")]
            relay._sink(b"from elsewhere", Endpoint("198.51.100.99", PEER.port))  # another IP: dropped
            # Another port of the peer's IP (someone behind its carrier NAT, or spoofing): dropped as well,
            # however often it comes; the peer stays the one the handshake authenticated.
            for _ in range(3):
                relay._sink(b"spoofed", Endpoint(PEER.host, PEER.port + 1))
            relay._sink(b"the peer", PEER)
            assert await loop.sock_recvfrom(command, 100) == (b"the peer", tuple(local_at))
            await loop.sock_sendto(command, b"still to the peer", local_at)
            while len(client.sent) < 2:
                await asyncio.sleep(0.01)
            assert channel_data(client.sent[-1]) == (0x4000, b"still to the peer")
            assert [c for c in client.calls if c[0] == "send_data"] == []  # no channel to a new source
        relay._ended(TurnError("gone"))
        with pytest.raises(TurnError, match=r"^gone$"):
            await task
    assert relay._sink == relay._enqueue


async def test_the_channel_adapter_reads_what_aioice_writes() -> None:
    """_Client's channel, channels and rebound over aioice's undocumented channel table, against aioice's own
    send_data (pinned aioice): a version that renames or reshapes the table fails here, by name."""
    client = _Client(("192.0.2.1", 3478), "user", "password", 600)
    binds: list[tuple[int, tuple[str, int]]] = []
    sent: list[bytes] = []

    async def channel_bind(channel_number: int, addr: tuple[str, int]) -> None:
        binds.append((channel_number, addr))

    client.channel_bind = channel_bind  # type: ignore[method-assign]
    client._send = sent.append  # type: ignore[method-assign]
    peer = ("198.51.100.6", 1000)
    assert client.channel(peer) is None and client.channels() == []
    await client.send_data(b"first", peer)
    (channel, bound), *_ = binds
    assert bound == peer and client.channel(peer) == channel and client.channels() == [(peer, channel)]
    assert [channel_data(m) for m in sent] == [(channel, b"first")]
    client.channel_refresh_at[channel] = 0  # aioice would re-bind on its next send...
    client.rebound(channel)  # ...not once the refresher has
    await client.send_data(b"second", peer)
    assert len(binds) == 1 and channel_data(sent[-1]) == (channel, b"second")


class _Stream(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 3478) if name == "peername" else default


def test_over_a_stream_channel_data_is_padded_and_split_whatever_the_segments() -> None:
    """RFC 8656 section 12.5: over TCP and TLS each ChannelData message is padded to 4 bytes; the stream's
    segments need not follow the messages."""
    client = _StreamClient(("192.0.2.1", 3478), "user", "password", 600)
    stream = _Stream()
    client.connection_made(stream)
    client.write(struct.pack("!HH", 0x4000, 5) + b"hello")
    assert stream.written == [struct.pack("!HH", 0x4000, 5) + b"hello\0\0\0"]
    got: list[tuple[bytes, tuple[str, int]]] = []

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            got.append((data, addr))

    client.receiver = Receiver()
    client.channel_to_peer[0x4000] = tuple(PEER)  # type: ignore[assignment]
    wire = b"".join(
        struct.pack("!HH", 0x4000, len(m)) + m + bytes(-len(m) % 4) for m in (b"abc", b"", b"12345")
    )
    for start in range(0, len(wire), 3):
        client.data_received(wire[start : start + 3])
    assert got == [(b"abc", tuple(PEER)), (b"", tuple(PEER)), (b"12345", tuple(PEER))]


@FUZZ
@given(
    st.lists(
        st.one_of(st.binary(max_size=60), st.builds(_indication_bytes, st.binary(max_size=16))), max_size=6
    )
)
def test_no_stream_from_the_server_escapes_the_turn_client(chunks: list[bytes]) -> None:
    """Over TCP or TLS aioice cuts the stream into messages by their length fields and hands each to the
    same checks as a datagram: whatever the server's stream holds, nothing but a dropped message comes out."""
    client = _StreamClient(("192.0.2.1", 3478), "user", "password", 600)
    client.connection_made(_Stream())
    client.receiver = asyncio.DatagramProtocol()
    client.permitted.add("198.51.100.6")
    for chunk in chunks:
        client.data_received(chunk)
