"""Streams end to end: ssh and TCP through plexus's QUIC over the punched path, real servers on the acceptor's
side (Debian's sshd, TCP targets), real NATs, no root needed by the forwarding itself."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from plexus import identity
from plexus.errors import ExitCode
from tests.lab import sessions
from tests.lab.lab import Lab
from tests.lab.services import BYE, Sshd, TcpTarget, exchange, http_get, pattern, with_loss
from tests.lab.sessions import Plexus, Side
from tests.labtests.test_reach import turn

pytestmark = pytest.mark.lab


class Ids:
    """Both hosts' identity files and ids."""

    def __init__(self, directory: Path) -> None:
        self.inviter_file, self.acceptor_file = directory / "laptop.key", directory / "home.key"
        self.inviter = identity.Identity.load(self.inviter_file).id
        self.acceptor = identity.Identity.load(self.acceptor_file).id


@pytest.fixture
def ids(tmp_path: Path) -> Ids:
    return Ids(tmp_path / "ids")


def acceptor_options(ids: Ids, *allowed: str) -> dict[str, str | None]:
    return {
        "exec-command": None,
        "forward-allow": ",".join(allowed),
        "identity": str(ids.acceptor_file),
        "peer-identity": ids.inviter,
    }


def inviter_options(ids: Ids, **extra: str) -> dict[str, str | None]:
    return {
        "exec-command": None,
        "identity": str(ids.inviter_file),
        "peer-identity": ids.acceptor,
        **extra,
    }


def start_acceptor(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids, *allowed: str, **extra: str | None
) -> tuple[Plexus, Side, Side]:
    return sessions.accepting(lab, tmp_path, running, overrides=acceptor_options(ids, *allowed) | extra)


def stdio(
    lab: Lab,
    tmp_path: Path,
    running: list[Plexus],
    sides: tuple[Side, Side],
    ids: Ids,
    target: str,
    data: bytes,
    **extra: str | None,
) -> tuple[int, bytes, str]:
    """A --stdio inviter on host a fed `data`: its exit code, its stdout and its stderr."""
    me, peer = sides
    overrides = inviter_options(ids, stdio=target) | extra
    invite = sessions.start(
        lab, me, peer, tmp_path, accept=False, overrides=overrides, stdin=subprocess.PIPE, text=False
    )
    running.append(invite)
    out, err = invite.process.communicate(data, timeout=120)
    return invite.process.returncode, out, err.decode()


def forwarding(
    lab: Lab, tmp_path: Path, running: list[Plexus], sides: tuple[Side, Side], ids: Ids, spec: str
) -> Plexus:
    """A --forward inviter on host a, once its local port listens."""
    me, peer = sides
    invite = sessions.start(
        lab, me, peer, tmp_path, accept=False, overrides=inviter_options(ids, forward=spec)
    )
    running.append(invite)
    invite.wait_events("forwarding", timeout=60)
    return invite


def laptop_config(lab: Lab, tmp_path: Path, me: Side, peer: Side, ids: Ids) -> Path:
    """The inviter's options in a --config file, as a user's ~/.ssh/config would name it."""
    values = (
        sessions.options(lab, me, peer) | inviter_options(ids) | {"log-file": str(tmp_path / "laptop.log")}
    )
    values |= {"log-level": "debug"}
    path = tmp_path / "laptop.conf"
    path.write_text("".join(f"{key} = {value}\n" for key, value in values.items() if value is not None))
    path.chmod(0o600)  # it holds the mail password: plexus refuses it readable by others
    return path


def test_ssh_through_stdio_runs_a_remote_command_and_carries_a_large_file(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(pattern(32 << 20))
    with Sshd(lab, "b") as sshd:
        acceptor, me, peer = start_acceptor(lab, tmp_path, running, ids, f"127.0.0.1:{sshd.port}")
        config = laptop_config(lab, tmp_path, me, peer, ids)
        proxy = f"{sys.executable} -m plexus --config {config} --stdio=127.0.0.1:{sshd.port}"
        started = time.monotonic()
        first = lab.exec(
            "a", sshd.client_argv(proxy, ["echo", "hello from b"]), timeout=120, cwd=sessions.ROOT
        )
        elapsed = time.monotonic() - started
        assert first.returncode == 0, (
            f"{first.stderr}\n{(tmp_path / 'laptop.log').read_text()}\n{acceptor.log()}"
        )
        assert first.stdout == "hello from b\n"
        print(f"ssh through plexus: remote command's output after {elapsed:.2f} s")
        copy = lab.exec(
            "a", sshd.client_argv(proxy, ["cat", str(big)]), timeout=180, cwd=sessions.ROOT, text=False
        )
        assert copy.returncode == 0, copy.stderr
        assert hashlib.sha256(copy.stdout).digest() == hashlib.sha256(big.read_bytes()).digest()
    # ssh ended its ProxyCommand, which closed the session: the acceptor says so at once, not after a minute.
    acceptor.wait_events("ended", count=2, timeout=5)


def test_forward_carries_several_http_connections_at_once(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids
) -> None:
    with TcpTarget(lab, "b", "http", port=8080) as web:
        sides = start_acceptor(lab, tmp_path, running, ids, f"127.0.0.1:{web.port}")[1:]
        invite = forwarding(lab, tmp_path, running, sides, ids, f"18080:127.0.0.1:{web.port}")
        sizes = [1 << 20, 3 << 20, 0, 17, 2 << 20, 5 << 20, 1, 4 << 20]
        bodies: dict[int, bytes] = {}

        def get(index: int, size: int) -> None:
            bodies[index] = lab.run_sync("a", lambda: http_get("127.0.0.1", 18080, size, timeout=60))

        threads = [threading.Thread(target=get, args=item) for item in enumerate(sizes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert [len(bodies.get(i, b"")) for i in range(len(sizes))] == sizes, invite.log()
        assert all(bodies[i] == pattern(size) for i, size in enumerate(sizes))
    invite.process.send_signal(2)
    assert invite.wait(10) == ExitCode.INTERRUPTED


def test_every_reply_written_before_a_half_close_arrives(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids
) -> None:
    """The echo target writes a last line after the client's EOF: over 200 connections, none loses it."""
    with TcpTarget(lab, "b", "echo", port=7007) as echo:
        sides = start_acceptor(lab, tmp_path, running, ids, f"127.0.0.1:{echo.port}")[1:]
        invite = forwarding(lab, tmp_path, running, sides, ids, f"17007:127.0.0.1:{echo.port}")
        replies: dict[int, bytes] = {}

        def talk(first: int) -> None:
            for index in range(first, 200, 8):
                payload = f"connection {index}\n".encode() * (index % 7)
                replies[index] = lab.run_sync(
                    "a", lambda p=payload: exchange("127.0.0.1", 17007, p, timeout=30)
                )

        threads = [threading.Thread(target=talk, args=(first,)) for first in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        lost = [i for i in range(200) if replies.get(i) != f"connection {i}\n".encode() * (i % 7) + BYE]
        assert not lost, f"{len(lost)} of 200 connections lost bytes: {lost[:10]}\n{invite.log()[-3000:]}"


def test_a_target_off_the_allow_list_is_refused(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids
) -> None:
    with TcpTarget(lab, "b", "echo", port=7007):
        acceptor, *sides = start_acceptor(lab, tmp_path, running, ids, "127.0.0.1:7008")
        code, out, err = stdio(lab, tmp_path, running, (sides[0], sides[1]), ids, "127.0.0.1:7007", b"hi")
    assert code == ExitCode.TARGET_REFUSED, err
    assert err.count("\n") == 1 and "127.0.0.1:7007" in err and "--forward-allow" in err, err
    assert out == b""
    assert acceptor.rejected("127.0.0.1:7007 is not a target this peer may reach"), acceptor.events()


@pytest.mark.parametrize("wrong", ["inviter pins", "acceptor pins"])
def test_a_peer_with_the_wrong_identity_is_refused_before_any_byte(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids, wrong: str
) -> None:
    stranger = identity.Identity.load(tmp_path / "stranger.key").id
    acceptor_pin = {"peer-identity": stranger} if wrong == "acceptor pins" else {}
    # Nothing answers the inviter when a side pins another id: it waits out a short response timeout.
    inviter_pin = ({"peer-identity": stranger} if wrong == "inviter pins" else {}) | {"response-timeout": "8"}
    with TcpTarget(lab, "b", "sink", port=7009) as sink:
        acceptor, *sides = start_acceptor(lab, tmp_path, running, ids, "127.0.0.1:7009", **acceptor_pin)
        code, out, err = stdio(
            lab, tmp_path, running, (sides[0], sides[1]), ids, "127.0.0.1:7009", b"x" * 1000, **inviter_pin
        )
        connections = sink.log.read_text().count("sink (")
    # The mail is signed with the identity: the side that pins another id ignores it (docs/protocol.md, Trust
    # model), so the session never starts and the inviter times out, saying why if it was the one ignoring it.
    assert code == ExitCode.MAIL_TIMEOUT, err
    assert err.count("\n") == 1 and out == b"", err
    assert connections == 0  # the target never saw a connection
    if wrong == "acceptor pins":
        assert acceptor.rejected(f"not the pinned peer {stranger}"), acceptor.events()
    else:
        assert f"not the pinned peer {stranger}" in err  # what the person who ran it reads


def test_five_percent_loss_still_delivers_every_byte(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids
) -> None:
    data = pattern(4 << 20)
    with TcpTarget(lab, "b", "sink", port=7009):
        sides = start_acceptor(lab, tmp_path, running, ids, "127.0.0.1:7009")[1:]
        with with_loss(lab, "a", 5):
            code, out, err = stdio(lab, tmp_path, running, (sides[0], sides[1]), ids, "127.0.0.1:7009", data)
    assert code == 0, err
    assert out == f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()


def test_without_an_identity_forwarding_is_refused_with_how_to_make_one(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids
) -> None:
    me, peer = sessions.pair(lab)
    overrides: dict[str, str | None] = {"exec-command": None, "forward-allow": "127.0.0.1:22"}
    acceptor = sessions.start(lab, peer, me, tmp_path, accept=True, overrides=overrides)
    running.append(acceptor)
    assert acceptor.wait(20) == ExitCode.USAGE
    message = acceptor.stderr()
    assert message.count("\n") == 1 and "--identity" in message and "--anonymous" in message, message


def _between_symmetric_nats(
    lab: Lab,
    tmp_path: Path,
    running: list[Plexus],
    ids: Ids,
    acceptor: dict[str, str],
    inviter: dict[str, str],
) -> Plexus:
    """Both NATs map per destination: 2 MiB from a's --stdio to a sink on b, every byte checked; returns the
    acceptor, whose events say which way the session took."""
    for host in ("a", "b"):
        lab.set_nat(host, "symmetric")
    data = pattern(2 << 20)
    with TcpTarget(lab, "b", "sink", port=7009):
        accepting, *sides = start_acceptor(lab, tmp_path, running, ids, "127.0.0.1:7009", **acceptor)
        code, out, err = stdio(
            lab, tmp_path, running, (sides[0], sides[1]), ids, "127.0.0.1:7009", data, **inviter
        )
    assert code == 0, f"{err}\n{accepting.log()[-3000:]}"
    assert out == f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()
    return accepting


@pytest.mark.parametrize("relayed", ["a", "b"])
def test_streams_cross_a_turn_relay(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids, relayed: str
) -> None:
    """The session goes through TURN (allocated by the side named, whose streams then pass plexus's own relay
    forwarder), and the streams with it."""
    acceptor_relay = turn(lab) if relayed == "b" else {}
    inviter_relay = turn(lab) if relayed == "a" else {}
    acceptor = _between_symmetric_nats(lab, tmp_path, running, ids, acceptor_relay, inviter_relay)
    assert [event["way"] for event in acceptor.events("chosen")] == ["relay"], acceptor.events()


def test_streams_run_over_ipv6(lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids) -> None:
    """No relay, the STUN server by its dual-stack name: the session's path is IPv6 and QUIC runs over it
    (issue 18)."""
    dual = {"stun-server": Lab.STUN_NAME}
    acceptor = _between_symmetric_nats(lab, tmp_path, running, ids, dual, dual)
    assert [event["way"] for event in acceptor.events("connected")] == ["ipv6"], acceptor.events()


def test_an_acceptor_serves_what_it_is_configured_for(
    lab: Lab, tmp_path: Path, running: list[Plexus], ids: Ids
) -> None:
    """Command and streams side by side on one acceptor; a request for what it lacks gets a refusal (11)."""
    with TcpTarget(lab, "b", "echo", port=7007):
        both = acceptor_options(ids, "127.0.0.1:7007") | {"exec-command": str(sessions.HELLO)}
        acceptor, me, peer = sessions.accepting(lab, tmp_path, running, overrides=both)
        code, out, err = stdio(lab, tmp_path, running, (me, peer), ids, "127.0.0.1:7007", b"ping\n")
        assert (code, out) == (0, b"ping\n" + BYE), err
        # A command's inviter signs its mail too: the acceptor pins its id.
        signing = {"identity": str(ids.inviter_file), "peer-identity": ids.acceptor}
        invite, code, _ = sessions.invite_once(lab, me, peer, tmp_path, running, overrides=signing)
        assert code == 0, invite.stderr()
        acceptor.wait_hello()
    pinned = {"identity": str(ids.acceptor_file), "peer-identity": ids.inviter}
    _, me, peer = sessions.accepting(lab, tmp_path, running, overrides=pinned)
    code, out, err = stdio(lab, tmp_path, running, (me, peer), ids, "127.0.0.1:7007", b"")
    assert code == ExitCode.PEER_REFUSED and "forwards no streams" in err, err
    _, me, peer = start_acceptor(lab, tmp_path, running, ids, "127.0.0.1:7007")
    invite, code, _ = sessions.invite_once(lab, me, peer, tmp_path, running, overrides=signing)
    assert code == ExitCode.PEER_REFUSED and "runs no command" in invite.stderr()
