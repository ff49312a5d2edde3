"""The rebind across the lab (issue 19): an inviter on host a sends rebinds by mail (the lab's SMTP and
Dovecot) and on the DHT (a private network in the lab's public namespace) to an acceptor on host b, whose
listening loop runs as an acceptor's does. The genuine rebind reaches the session it names; one forged by
someone who knows the session's id but not its key, and the genuine one sent again, change nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plexus import events
from plexus.endpoint import Endpoint
from plexus.identity import Identity
from plexus.mediator.dhtnode import DhtConfig
from plexus.peers import Peer, Roster
from plexus.rendezvous import Reach, Rebind, RebindKey, RendezvousConfig
from tests.lab.dht import DhtNetwork
from tests.lab.lab import Lab
from tests.labtests.test_mediator import Pair, until

pytestmark = pytest.mark.lab

KEY = RebindKey.derive(1111, 2222)
FORGER = dataclasses.replace(RebindKey.derive(1111, 2223), session=KEY.session)  # the id, not the key
NEW_PLACE = (Endpoint("198.51.100.2", 41001), Reach("independent", hosts=(Endpoint("10.0.1.2", 41001),)))
TIMEOUT = 30.0


def genuine(issued: int) -> Rebind:
    return KEY.seal(1, *NEW_PLACE, datetime.datetime.fromtimestamp(issued, datetime.UTC))


@dataclasses.dataclass
class Accepting:
    """The acceptor's side on b: its rendezvous's requests() loop running, this session's rebinds watched;
    `on_ready` once both are in place."""

    config: RendezvousConfig
    on_ready: Callable[[], object]
    rebinds: list[Rebind] = dataclasses.field(default_factory=list)
    rejected: list[str] = dataclasses.field(default_factory=list)
    took: float = 0.0  # time.monotonic() as the genuine rebind came out of the watch

    async def run(self) -> None:
        def note(event: events.Event) -> None:
            if isinstance(event, events.Rejected):
                self.rejected.append(event.reason)

        with events.reporting(note, "accept"):
            async with self.config.open() as rendezvous:
                await rendezvous.listen()
                with rendezvous.rebinds(KEY) as rebound:

                    async def serve() -> None:
                        async for _ in rendezvous.requests():
                            raise AssertionError("no request was sent")

                    loop = asyncio.ensure_future(serve())
                    self.on_ready()
                    try:
                        self.rebinds.append(await asyncio.wait_for(anext(rebound), TIMEOUT))
                        self.took = time.monotonic()
                        await until(lambda: len(self.rejected) >= 2, TIMEOUT)  # the forged, the replay
                        await asyncio.sleep(1.0)  # anything more (a second rebind taken) would show now
                        assert not loop.done(), loop
                    finally:
                        loop.cancel()
                        await asyncio.gather(loop, return_exceptions=True)


async def send(config: RendezvousConfig, issued: int) -> float:
    """The forged rebind, the genuine one, the genuine one again; returns when the forged one had left."""
    async with config.open() as rendezvous:
        peer = config.peers.peers.only
        await rendezvous.rebind(FORGER.seal(1, *NEW_PLACE, datetime.datetime.now(datetime.UTC)), peer, None)
        left = time.monotonic()
        await rendezvous.rebind(genuine(issued), peer, None)
        await rendezvous.rebind(genuine(issued), peer, None)  # a replay, later
    return left


def summary(rebinds: list[Rebind]) -> list[list[object]]:
    """What the acceptor's side took, as it comes back from another process too (JSON)."""
    return [[rebind.sequence, str(rebind.outer), rebind.tag.hex()] for rebind in rebinds]


def check(taken: list[list[object]], rejected: list[str], issued: int, took: float, left: float) -> None:
    assert taken == summary([genuine(issued)])
    assert any("bad tag" in reason for reason in rejected), rejected
    assert any("a replay" in reason for reason in rejected), rejected
    # The forged one leaves first: the genuine one is admitted this long after it left (with -s).
    print(f"rebind admitted {(took - left) * 1000:.0f} ms after the forged one left")


async def test_a_rebind_by_mail(lab: Lab) -> None:
    pair = Pair.make(lab, shared=False)
    issued = int(time.time())
    ready = threading.Event()
    accepting = Accepting(pair.acceptor, ready.set)
    task = asyncio.ensure_future(lab.call("b", accepting.run))
    await until(lambda: ready.is_set() or task.done(), TIMEOUT)
    if task.done():
        task.result()
    left = await lab.call("a", lambda: send(pair.inviter, issued))
    await task
    check(summary(accepting.rebinds), accepting.rejected, issued, accepting.took, left)


# On the DHT, each side runs in a process of its own, which leaves opendht's runner to die with it
# (os._exit), as the lab's DHT probes do: a pytest process that ran two runners crashes as it finalizes them.


def dht_side(argv: list[str]) -> None:
    """`accept` or `send`: one side, its identity file, the peer's id, the bootstrap nodes (comma-separated),
    the genuine rebind's time, and the JSON file it writes what it saw to (`accept`: `.ready` beside it once
    it listens)."""
    role, me, peer_id, bootstrap, issued_text, out = argv
    nodes = tuple(Endpoint.parse(node) for node in bootstrap.split(","))
    config = DhtConfig(Identity.load(Path(me)), Roster.of(Peer(peer_id, identity=peer_id)), nodes)
    issued = int(issued_text)
    code = 1
    try:
        if role == "accept":
            accepting = Accepting(config, lambda: Path(out + ".ready").touch())
            asyncio.run(accepting.run())
            taken = summary(accepting.rebinds)
            result: dict[str, object] = {
                "taken": taken,
                "rejected": accepting.rejected,
                "took": accepting.took,
            }
        else:
            result = {"left": asyncio.run(send(config, issued))}
        Path(out).write_text(json.dumps(result))
        code = 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def side_argv(role: str, me: Path, peer: Identity, network: DhtNetwork, issued: int, out: Path) -> list[str]:
    code = "import sys; from tests.labtests.test_rebind import dht_side; dht_side(sys.argv[1:])"
    bootstrap = ",".join(network.bootstrap)
    return [sys.executable, "-c", code, role, str(me), peer.id, bootstrap, str(issued), str(out)]


@pytest.fixture
def network(lab: Lab) -> Iterator[DhtNetwork]:
    with DhtNetwork(lab) as started:
        yield started


async def test_a_rebind_on_the_dht(lab: Lab, network: DhtNetwork, tmp_path: Path) -> None:
    files = {role: tmp_path / f"{role}.key" for role in ("inviter", "acceptor")}
    ids = {role: Identity.load(path) for role, path in files.items()}
    issued = int(time.time())
    seen, sent = tmp_path / "acceptor.json", tmp_path / "inviter.json"
    acceptor = lab.popen("b", side_argv("accept", files["acceptor"], ids["inviter"], network, issued, seen))
    try:
        await until(lambda: Path(f"{seen}.ready").exists() or acceptor.poll() is not None, TIMEOUT)
        assert acceptor.poll() is None, "the acceptor's side ended before it listened"
        argv = side_argv("send", files["inviter"], ids["acceptor"], network, issued, sent)
        inviter = await asyncio.to_thread(lab.exec, "a", argv)
        assert inviter.returncode == 0, inviter.stderr[-2000:]
        assert await asyncio.to_thread(acceptor.wait, TIMEOUT * 2) == 0
    finally:
        if acceptor.poll() is None:
            acceptor.kill()
            acceptor.wait()
    got = json.loads(seen.read_text())
    check(got["taken"], got["rejected"], issued, got["took"], json.loads(sent.read_text())["left"])
