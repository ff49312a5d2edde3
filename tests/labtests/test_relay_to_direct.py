"""A relayed streams session that moves to a direct path once one works, and back to the relay when that
path dies (issue 19), with an ssh-style --stdio stream to the echo target on b running through it all:

- a's network lets no UDP out, so its inviter goes relay-only through its TURN allocation over TCP; then it
  lets UDP out again (both NATs port-restricted cone), and later blocks it again;
- both NATs map per destination (symmetric), so the session goes through a's TURN allocation over UDP; then
  both NATs are reconfigured to map endpoint-independently (their mappings kept: the relay's flows go on),
  and later the internet router drops UDP between the sites.

In between, the two sides find that their NATs map endpoint-independently, tell each other their endpoints
inside the QUIC connection, punch, and the inviter moves the connection to the direct path; when that path
dies the inviter goes back to the relay, which it kept. Every byte arrives, in order, once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from plexus.endpoint import Endpoint
from plexus.streams import direct, quic
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.services import TcpTarget, pattern
from tests.lab.sessions import Plexus, turn
from tests.labtests.test_resume import TARGET, StdioTransfer
from tests.labtests.test_streams import Ids, acceptor_options, ids, inviter_options

__all__ = ["ids"]  # the fixture, used by name

pytestmark = pytest.mark.lab

RATE = 1 << 20  # bytes per second each way: the stream outlasts the first check and both moves
SIZE = 24 << 20


class Blocked:
    """a's network lets no UDP out, then does, then does not again."""

    transport = "tcp"

    def before(self, lab: Lab) -> None:
        lab.block_udp("a")

    def opened(self, lab: Lab, ports: dict[str, int]) -> None:
        lab.block_udp("a", False)

    def cut(self, lab: Lab) -> None:
        lab.block_udp("a")


class Symmetric:
    """Both NATs map per destination, then endpoint-independently (in place), then the sites are separated."""

    transport = "udp"

    def before(self, lab: Lab) -> None:
        lab.set_nat("a", "symmetric")
        lab.set_nat("b", "symmetric")

    def opened(self, lab: Lab, ports: dict[str, int]) -> None:
        for host in ("a", "b"):
            lab.set_nat(host, "cone", flush=False)
            # The streams socket's STUN flows from the session's start would otherwise keep their mappings
            # until the NAT's UDP timeout, and STUN would see the old mode's mapping for minutes.
            lab.expire_stun_flows(host, ports[host])

    def cut(self, lab: Lab) -> None:
        lab.separate()


@pytest.mark.parametrize("network", [Blocked(), Symmetric()], ids=["udp-blocked", "symmetric"])
def test_a_relayed_stream_moves_to_a_direct_path_and_back_to_the_relay(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids, network: Blocked | Symmetric
) -> None:
    network.before(lab)
    with TcpTarget(lab, "b", "echo", port=7007):
        acceptor, me, peer = sessions.accepting(
            lab, tmp_path, running, overrides=acceptor_options(ids, TARGET)
        )
        overrides = inviter_options(ids, stdio=TARGET) | turn(lab, transport=network.transport)
        invite = sessions.start(
            lab, me, peer, tmp_path, accept=False, overrides=overrides, stdin=subprocess.PIPE, text=False
        )
        running.append(invite)
        transfer = StdioTransfer(invite, pattern(SIZE), rate=RATE)
        transfer.wait_past(1 << 20, timeout=60)
        assert [e["way"] for e in invite.events("connected")] == ["relay"]
        started = invite.events("launched")[0]["at"]
        inner = {"a": invite, "b": acceptor}
        network.opened(
            lab, {k: Endpoint.parse(v.events("connected")[0]["inner"]).port for k, v in inner.items()}
        )
        opened = time.time()
        try:
            (moved,) = invite.wait_events("rerouted", timeout=direct.CHECK_FIRST + 15, way="direct")
            (followed,) = acceptor.wait_events("migrated", timeout=5)
            time.sleep(1.0)  # a while on the direct path
            network.cut(lab)
            cut = time.time()
            (back,) = invite.wait_events("rerouted", timeout=10, way="relay")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{invite.log()[-5000:]}\n{acceptor.log()[-3000:]}") from None
        transfer.finish(timeout=120)
    assert Endpoint.parse(moved["peer"]).host == lab.public_ip("b")
    assert Endpoint.parse(followed["after"]).host == lab.public_ip("a")
    print(
        f"{type(network).__name__}: relay over {network.transport.upper()} -> direct"
        f" {moved['at'] - opened:.2f} s after the way opened ({moved['at'] - started:.2f} s into the"
        f" session; first check at {direct.CHECK_FIRST:g} s); back on the relay {back['at'] - cut:.2f} s"
        f" after it was cut; {SIZE >> 20} MiB each way intact, longest silence"
        f" {transfer.longest_silence * 1000:.0f} ms"
    )
    assert back["at"] - cut < quic.DEAD_AFTER + 1.5
