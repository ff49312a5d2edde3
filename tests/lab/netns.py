"""Run Python code inside a network namespace: a thread joins it with setns(2), then creates its sockets.

The network namespace is per thread and a socket stays in the namespace it was created in, so a thread that
joined a namespace may create sockets there and hand them back to any other thread. Threads are never reused
(no executor pool): a pooled thread left in a lab namespace would silently move unrelated code there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def join_netns(name: str) -> None:
    """Move the calling thread into the named network namespace (/run/netns/NAME)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(name: str, func: Callable[[], T]) -> T:
    """Call func in a fresh thread that joined the namespace; return its result or raise its exception."""
    box: dict[str, T | BaseException] = {}

    def body() -> None:
        try:
            join_netns(name)
            box["result"] = func()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def socket_in_netns(name: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM) -> socket.socket:
    return run_in_netns(name, lambda: socket.socket(family, type))


async def call_in_netns(name: str, factory: Callable[[], Awaitable[T]]) -> T:
    """Await factory() on its own event loop in a thread inside the namespace.

    Cancelling the caller cancels the coroutine in the namespace thread and waits for it to finish, so no work
    outlives the test that started it.
    """
    outer_loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = outer_loop.create_future()
    # When the caller is cancelled, the shielded future still receives the thread's outcome later: retrieve
    # it, or asyncio reports "Future exception was never retrieved" from a test that has long passed.
    done.add_done_callback(lambda future: None if future.cancelled() else future.exception())
    inner: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[T]]] = []
    started = threading.Event()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():
            outcome()

    async def main() -> T:
        task: asyncio.Task[T] = asyncio.current_task()  # type: ignore[assignment]
        inner.append((asyncio.get_running_loop(), task))
        started.set()
        return await factory()

    def body() -> None:
        try:
            join_netns(name)
            result = asyncio.run(main())
        except BaseException as exc:
            error = exc
            outer_loop.call_soon_threadsafe(settle, lambda: done.set_exception(error))
        else:
            outer_loop.call_soon_threadsafe(settle, lambda: done.set_result(result))
        finally:
            started.set()

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.to_thread(started.wait)
        if inner:
            loop, task = inner[0]
            # The loop may have finished on its own meanwhile
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        await asyncio.to_thread(thread.join)
        raise
