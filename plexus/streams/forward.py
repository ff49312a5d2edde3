"""TCP over the QUIC link: the acceptor connects allowed targets, the inviter brings stdio or local listeners.

Every byte crosses a half-close: when one side's reader reaches EOF, the other side gets a FIN (QUIC) or a
shutdown of the write side (TCP), and the opposite direction carries on until it ends too. Only then is the
connection closed, so a reply written just before the writer shut its side still arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from plexus import events
from plexus.endpoint import Endpoint
from plexus.errors import PlexusError, StreamsLostError, TargetRefusedError, UsageError
from plexus.streams import wire
from plexus.streams.quic import Link, Stream
from plexus.streams.wire import Code, FrameError
from plexus.targets import Allowed, Target

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
OPEN_TIMEOUT = 10.0  # for the OPEN frame to arrive, for the target to accept, for the verdict to come back


@dataclass(frozen=True)
class Forward:
    """--forward=[BIND:]PORT:HOST:PORT: listen on BIND:PORT here, carry each connection to HOST:PORT there."""

    listen: Endpoint
    target: Target

    @classmethod
    def parse(cls, text: str) -> Forward:
        match = _FORWARD.fullmatch(text.strip())
        if match is None:
            raise UsageError(f"--forward {text!r}: expected [BIND:]PORT:HOST:PORT")
        port = int(match.group("port"))
        if not 0 < port < 65536:
            raise UsageError(f"--forward {text!r}: local port {port} is not 1-65535")
        bind = (match.group("bind") or "127.0.0.1").strip("[]")
        return cls(Endpoint(bind, port), Target.parse(match.group("target"), "--forward"))


_FORWARD = re.compile(r"(?:(?P<bind>\[[^\]]+\]|[^:\[\]]+):)?(?P<port>[0-9]{1,5}):(?P<target>.+)")


# The acceptor's side


async def serve(link: Link, allowed: Allowed) -> None:
    """Answer each stream the inviter opens, until the link closes."""
    tasks: set[asyncio.Task[None]] = set()
    try:
        while (stream := await link.accepted.get()) is not None:
            task = asyncio.create_task(_answer(link, stream, allowed))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _answer(link: Link, stream: Stream, allowed: Allowed) -> None:
    try:
        target, rest = await asyncio.wait_for(_read_open(stream), OPEN_TIMEOUT)
    except (FrameError, TimeoutError) as error:
        reason = str(error) if isinstance(error, FrameError) else f"no OPEN frame within {OPEN_TIMEOUT:g} s"
        log.warning("stream %d: bad request: %s", stream.id, reason)
        events.emit(events.Rejected, source="stream", reason=events.one_line(f"bad request: {reason}"))
        await _verdict(link, stream, Code.BAD_REQUEST, reason)
        return
    except PlexusError:
        link.forget(stream)
        return
    if not allowed.permits(target):
        log.warning("stream %d: %s is not a target this peer may reach: refused", stream.id, target)
        events.emit(events.Rejected, source="stream", reason=f"{target} is not a target this peer may reach")
        why = f"{target} is not a target the acceptor allows this peer (--forward-allow, allow=)"
        await _verdict(link, stream, Code.NOT_ALLOWED, why)
        return
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port), OPEN_TIMEOUT
        )
    except (OSError, TimeoutError) as error:
        reason = getattr(error, "strerror", None) or "no answer"
        log.warning("stream %d: cannot connect to %s: %s", stream.id, target, reason)
        await _verdict(link, stream, Code.UNREACHABLE, f"the acceptor cannot connect to {target}: {reason}")
        return
    log.info("stream %d: connected to %s", stream.id, target)
    await stream.write(wire.frame(Code.CONNECTED))
    if rest:
        writer.write(rest)
    await _splice(link, stream, reader, writer)


async def _read_open(stream: Stream) -> tuple[Target, bytes]:
    buffer = b""
    while True:
        found = wire.read_open(buffer)
        if found is not None:
            return found
        data = await stream.read()
        if not data:
            raise FrameError("the stream ended before its OPEN frame")
        buffer += data


async def _verdict(link: Link, stream: Stream, code: Code, reason: str) -> None:
    with contextlib.suppress(PlexusError):
        await stream.write(wire.frame(code, reason))
        stream.write_eof()
    link.forget(stream)


# Both sides


async def _splice(
    link: Link, stream: Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Carry a TCP connection over the stream both ways, each direction until its EOF."""

    async def outward() -> None:
        while data := await reader.read(CHUNK):
            await stream.write(data)
        stream.write_eof()

    async def inward() -> None:
        while data := await stream.read():
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    await _both(link, stream, outward(), inward(), writer.close)


async def _both(
    link: Link, stream: Stream, outward: Awaitable[None], inward: Awaitable[None], close: Callable[[], None]
) -> None:
    """Run both directions; a failure in either (a reset, a broken TCP side) abandons the whole stream."""
    tasks = [asyncio.ensure_future(outward), asyncio.ensure_future(inward)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((task.exception() for task in done if task.exception() is not None), None)
        if failed is not None:
            log.info("stream %d ended: %s", stream.id, failed)
            stream.reset()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        close()
        link.forget(stream)


# The inviter's side


async def open_target(link: Link, target: Target) -> tuple[Stream, bytes]:
    """A stream to the target, once the acceptor said CONNECTED; the bytes that came after the verdict."""
    stream = link.open()
    await stream.write(wire.open_frame(target))
    buffer = b""
    try:
        async with asyncio.timeout(OPEN_TIMEOUT * 2):
            while (found := wire.read_frame(buffer)) is None:
                data = await stream.read()
                if not data:
                    raise StreamsLostError(f"the acceptor closed the stream to {target} without a verdict")
                buffer += data
    except TimeoutError:
        stream.reset()
        raise StreamsLostError(
            f"no verdict on {target} from the acceptor within {OPEN_TIMEOUT * 2:g} s"
        ) from None
    except FrameError as error:
        stream.reset()
        raise StreamsLostError(f"unreadable verdict from the acceptor: {error}") from error
    code, reason, rest = found
    if code is not Code.CONNECTED:
        link.forget(stream)
        raise TargetRefusedError(f"the acceptor refused {target}: {reason or code.name}")
    return stream, rest


async def stdio(link: Link, target: Target) -> None:
    """--stdio: standard input to the target, its answers to standard output, until both ends finish.

    stdin and stdout may be pipes (ssh's ProxyCommand), a terminal or regular files: only threads read and
    write all of them. The reader is a daemon thread, so a stdin that never ends does not hold up the exit."""
    stream, rest = await open_target(link, target)
    chunks = _read_in_thread(sys.stdin.fileno())
    stdout = sys.stdout.fileno()

    async def outward() -> None:
        while data := await chunks.get():
            await stream.write(data)
        stream.write_eof()

    async def inward() -> None:
        data = rest
        while True:
            if data:
                await asyncio.to_thread(_write_all, stdout, data)
            data = await stream.read()
            if not data:
                return

    await _both(link, stream, outward(), inward(), lambda: None)  # stdin and stdout stay the process's


def _read_in_thread(fd: int) -> asyncio.Queue[bytes]:
    """Chunks read from fd by a daemon thread; b"" at EOF (or a read error, logged)."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    def put(data: bytes) -> None:
        asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()

    def run() -> None:
        try:
            while data := os.read(fd, CHUNK):
                put(data)
        except OSError as error:
            log.warning("reading standard input: %s", error.strerror)
        except RuntimeError:  # the loop is gone: plexus is exiting
            return
        with contextlib.suppress(RuntimeError):
            put(b"")

    threading.Thread(target=run, name="stdin", daemon=True).start()
    return chunks


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def listen(link: Link, forward: Forward) -> None:
    """--forward: accept local connections and carry each to the target, until the link closes."""

    async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            stream, rest = await open_target(link, forward.target)
        except PlexusError as error:
            log.error("connection from %s: %s", writer.get_extra_info("peername"), error)
            writer.close()
            return
        if rest:
            writer.write(rest)
        await _splice(link, stream, reader, writer)

    try:
        server = await asyncio.start_server(carry, forward.listen.host, forward.listen.port)
    except OSError as error:
        raise UsageError(f"cannot listen on --forward {forward.listen}: {error.strerror}") from error
    async with server:
        log.info("forwarding %s to %s on the peer", forward.listen, forward.target)
        events.emit(events.Forwarding, listen=forward.listen, target=str(forward.target))
        await asyncio.shield(link.closed)
