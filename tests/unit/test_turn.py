"""session.Turn: replacing sessions take turns, and the newest request wins."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from plexus.errors import SupersededError
from plexus.session import Turn


async def test_a_newer_request_gives_up_the_one_being_established() -> None:
    turn = Turn()
    started = asyncio.Event()

    async def forever() -> str:
        started.set()
        await asyncio.sleep(60)  # a handshake toward an endpoint nobody punches from
        return "never"

    async def quick() -> str:
        return "newest"

    older = asyncio.create_task(turn.run(forever))
    await started.wait()
    assert await asyncio.wait_for(turn.run(quick), 1) == "newest"
    with pytest.raises(SupersededError, match="before this one was established"):
        await older


async def test_only_the_newest_of_those_waiting_runs() -> None:
    turn = Turn()
    ran: list[str] = []
    release = asyncio.Event()

    def work(name: str, gate: asyncio.Event | None = None) -> Callable[[], Awaitable[str]]:
        async def body() -> str:
            ran.append(name)
            if gate is not None:
                await gate.wait()
            return name

        return body

    first = asyncio.create_task(turn.run(work("first", release)))
    await asyncio.sleep(0)
    second = asyncio.create_task(turn.run(work("second")))
    third = asyncio.create_task(turn.run(work("third")))
    results = await asyncio.gather(first, second, third, return_exceptions=True)
    assert isinstance(results[0], SupersededError) and isinstance(results[1], SupersededError)
    assert results[2] == "third"
    assert ran == ["first", "third"]  # the second never started: a newer one came while it waited


async def test_a_finished_session_is_not_touched_and_stopping_is_not_superseding() -> None:
    turn = Turn()

    async def done() -> int:
        return 1

    assert await turn.run(done) == 1
    assert await turn.run(done) == 1  # nothing left to give up

    async def slow() -> int:
        await asyncio.sleep(60)
        return 0

    running = asyncio.create_task(turn.run(slow))
    await asyncio.sleep(0.01)
    running.cancel()  # the acceptor stopping (SIGTERM): a cancellation, not a newer request
    with pytest.raises(asyncio.CancelledError):
        await running
