"""An acceptor's status file (plexus/status.py): events in, the file and `plexus --status` out."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plexus import events, launcher, status
from plexus.endpoint import Endpoint
from plexus.errors import ExitCode, NoAcceptorError
from plexus.peers import Peer, Roster
from tests.fuzz import FUZZ

INVITER = Endpoint("198.51.100.7", 40001)
PATH_PEER = Endpoint("198.51.100.7", 40002)
HOME = Endpoint("10.0.0.2", 5000)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The state folder, here rather than /run/plexus or the user's runtime folder (the tests may be root)."""
    where = tmp_path / "run" / "plexus"
    monkeypatch.setattr(launcher, "state_dir", lambda: where)
    return where


def roster() -> Roster:
    return Roster.of(Peer("laptop", id="laptop"), Peer("phone", id="phone"))


def content(path: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(path.read_text())
    return value


def peer(path: Path, name: str) -> dict[str, Any]:
    return next(item for item in content(path)["peers"] if item["name"] == name)


def running(
    sink: status.Status, name: str = "laptop", at: float | None = None, pid: int | None = 4242
) -> None:
    at = time.time() if at is None else at
    sink(events.Requested(role="accept", at=at, peer=INVITER, peer_name=name))
    sink(
        events.Connected(
            role="accept", at=at + 1, inner=HOME, outer=HOME, peer=PATH_PEER, way="direct", peer_name=name
        )
    )
    sink(events.Launched(role="accept", at=at + 2, pid=pid, peer_name=name))


def test_each_peer_has_its_latest_session_in_a_private_file(folder: Path) -> None:
    sink = status.Status("home", roster())
    path = folder / "status-home.json"
    assert content(path)["peers"] == [
        {"name": name, "listed": True, **dataclasses.asdict(status.Session())} for name in ("laptop", "phone")
    ]
    sink(events.Listening(role="accept", at=99.0, peers=("laptop", "phone")))
    sink(events.Requested(role="accept", at=100.0, peer=INVITER, peer_name="laptop"))
    assert peer(path, "laptop") | {"since": 0} == {
        "name": "laptop", "listed": True, "state": "connecting", "since": 0, "way": None,
        "endpoint": "198.51.100.7:40001", "launched": False, "pid": None, "error": None, "silent_since": None,
        "sessions": 1,
    }  # fmt: skip
    running(sink, at=100.0)
    written = content(path)
    assert (written["plexus_status"], written["host_id"], written["pid"]) == (1, "home", os.getpid())
    assert written["listening_since"] == 99.0
    assert launcher.Running(os.getpid(), written["started"]) == launcher.Running.of(os.getpid())
    laptop = peer(path, "laptop")
    assert (laptop["state"], laptop["way"], laptop["since"], laptop["endpoint"], laptop["pid"]) == (
        "running", "direct", 101.0, "198.51.100.7:40002", 4242,
    )  # fmt: skip
    assert peer(path, "phone")["state"] == "idle"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in folder.iterdir()) == ["status-home.json"]  # no temporary file left
    sink.close()
    assert not path.exists()


def test_a_session_moves_fails_and_ends(folder: Path) -> None:
    sink = status.Status("home", roster())
    path = folder / "status-home.json"
    running(sink, at=100.0, pid=None)
    sink(
        events.Rerouted(
            role="accept", at=110.0, way="relay", peer=Endpoint("203.0.113.9", 3478), peer_name="laptop"
        )
    )
    sink(
        events.Rebound(
            role="accept", at=111.0, outer=Endpoint("192.0.2.4", 6000), sequence=1, peer_name="laptop"
        )
    )
    sink(events.PathDead(role="accept", at=130.0, silent=15.0, peer_name="laptop"))
    laptop = peer(path, "laptop")
    assert (laptop["way"], laptop["since"], laptop["endpoint"]) == ("relay", 110.0, "192.0.2.4:6000")
    assert (laptop["launched"], laptop["pid"], laptop["silent_since"]) == (True, None, 115.0)
    sink(events.PathBack(role="accept", at=131.0, silent=16.0, peer_name="laptop"))
    sink(events.Ended(role="accept", at=140.0, error="lost\nthe peer 12345678901234", peer_name="laptop"))
    laptop = peer(path, "laptop")
    assert (laptop["state"], laptop["since"], laptop["error"], laptop["silent_since"]) == (
        "ended", 140.0, "lost the peer …", None,
    )  # fmt: skip
    sink(events.Requested(role="accept", at=150.0, peer=INVITER, peer_name="phone"))
    sink(events.Failed(role="accept", at=151.0, error="handshake timed out", peer_name="phone"))
    phone = peer(path, "phone")
    assert (phone["state"], phone["error"], phone["sessions"]) == ("failed", "handshake timed out", 0)


def test_an_older_sessions_end_does_not_hide_a_newer_one(folder: Path) -> None:
    sink = status.Status("home", roster())
    running(sink, at=100.0, pid=None)
    running(sink, at=200.0, pid=None)
    path = folder / "status-home.json"
    assert (peer(path, "laptop")["state"], peer(path, "laptop")["sessions"]) == ("running", 2)
    sink(events.Ended(role="accept", at=300.0, peer_name="laptop"))
    assert (peer(path, "laptop")["state"], peer(path, "laptop")["sessions"]) == ("running", 1)
    sink(events.Ended(role="accept", at=301.0, peer_name="laptop"))
    assert (peer(path, "laptop")["state"], peer(path, "laptop")["sessions"]) == ("ended", 0)


def test_events_of_no_peer_change_nothing(folder: Path) -> None:
    sink = status.Status("home", roster())
    path = folder / "status-home.json"
    before = path.read_bytes()
    sink(events.Sent(role="accept", kind="response"))
    sink(events.Requested(role="accept", peer=INVITER))  # no peer_name: not an acceptor's session for a peer
    sink(events.Rejected(role="accept", source="mail", reason="unsigned", peer_name="laptop"))
    assert path.read_bytes() == before


def test_a_peer_gone_from_the_roster_is_shown_while_its_session_runs(folder: Path) -> None:
    sink = status.Status("home", roster())
    running(sink, name="old")
    assert peer(folder / "status-home.json", "old")["listed"] is False
    sink(events.Ended(role="accept", peer_name="old"))
    assert [item["name"] for item in content(folder / "status-home.json")["peers"]] == ["laptop", "phone"]


def test_a_write_that_fails_is_one_warning_never_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(launcher, "state_dir", lambda: tmp_path / "file" / "plexus")  # cannot be a folder
    with caplog.at_level(logging.WARNING, "plexus.status"):
        sink = status.Status("home", roster())
        running(sink)
        sink.close()
    assert len(caplog.records) == 1, caplog.records  # not one a write
    assert caplog.records[0].getMessage().startswith(f"cannot write the status file {tmp_path}/file/plexus/")


def test_show_tells_each_peers_session(folder: Path) -> None:
    sink = status.Status("home", roster())
    sink(events.Listening(role="accept", peers=("laptop", "phone")))
    running(sink, at=time.time() - 200)
    lines = status.show("home").splitlines()
    assert lines[0].startswith(f"home: acceptor pid {os.getpid()}, up since ")
    assert lines[0].endswith(", listening, 2 peers")
    assert lines[1].split()[:6] == ["laptop", "running", "direct", "since", lines[1].split()[4], "UTC"]
    assert "(for 3 min)" in lines[1] and "198.51.100.7:40002  command pid 4242" in lines[1]
    assert lines[2].split() == ["phone", "idle", "-", "-", "-"]
    assert status.show(None).splitlines()[1:] == lines[1:]  # every acceptor here: the one


def test_show_says_when_the_acceptor_is_not_running(folder: Path) -> None:
    sink = status.Status("home", roster())
    running(sink)
    path = folder / "status-home.json"
    written = content(path)
    path.write_text(json.dumps(written | {"started": written["started"] + 1}))  # a later process, same pid
    header = status.show("home").splitlines()[0]
    assert header.startswith(f"home: acceptor pid {os.getpid()} is not running; its last state, as of ")
    assert header.endswith(" s ago):")


def test_no_status_file_is_its_own_failure(folder: Path) -> None:
    with pytest.raises(NoAcceptorError) as raised:
        status.show("home")
    assert (raised.value.exit_code, int(raised.value.exit_code)) == (ExitCode.NO_ACCEPTOR, 22)
    assert str(raised.value).startswith("no acceptor with host id 'home' runs here as ")
    with pytest.raises(NoAcceptorError, match=f"^no acceptor runs here as .*: no status file in {folder}$"):
        status.show(None)


def test_a_file_that_does_not_read_is_said_so(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "status-a.json").write_text('{"plexus_status": 2}')
    os.mkfifo(folder / "status-b.json")  # would hang a reader that opened it blocking
    assert status.show(None).splitlines() == [
        f"{folder}/status-a.json: not a status file of this plexus (not format 1)",
        "",
        f"{folder}/status-b.json: cannot read: not a regular file",
    ]


def valid() -> dict[str, Any]:
    session = {**dataclasses.asdict(status.Session("running", 1.0, "direct", "192.0.2.1:1", True, 7))}
    return {
        "plexus_status": 1, "host_id": "home", "pid": 1, "started": 5, "up_since": 1.0,
        "listening_since": None, "written": 2.0, "peers": [{"name": "laptop", "listed": True, **session}],
    }  # fmt: skip


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=400),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def files(draw: st.DrawFn) -> bytes:
    """Bytes, JSON, and a good file with one value made anything (the checks a made-up file meets)."""
    kind = draw(st.sampled_from(["bytes", "json", "changed"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    data = valid()
    target = data if draw(st.booleans()) else data["peers"][0]
    target[draw(st.sampled_from(sorted(target)))] = draw(JSON)
    return json.dumps(data).encode()


def test_a_good_file_reads_back() -> None:
    snapshot = status.parse(json.dumps(valid()).encode())
    assert snapshot.peers[0][2] == status.Session("running", 1.0, "direct", "192.0.2.1:1", True, 7)
    assert "laptop  running  direct  since 1970-01-01 00:00 UTC" in status.describe(snapshot, time.time())


@FUZZ
@given(files())
def test_the_reader_lets_only_its_own_rejection_escape(data: bytes) -> None:
    try:
        snapshot = status.parse(data)
    except status.Unreadable:
        return
    shown = status.describe(snapshot, time.time())
    assert all(line.isprintable() for line in shown.split("\n"))  # no escape sequence reaches the terminal


def test_a_deep_file_is_refused() -> None:
    with pytest.raises(status.Unreadable):
        status.parse(b"[" * 100_000)


PLEXUS = """
import runpy, sys
from pathlib import Path
from plexus import launcher
folder = Path(sys.argv.pop(1))
launcher.state_dir = lambda: folder  # as root it would be /run/plexus, XDG_RUNTIME_DIR notwithstanding
runpy.run_module("plexus", run_name="__main__")
"""


def test_plexus_status_prints_it(folder: Path, tmp_path: Path) -> None:
    sink = status.Status("home", roster())
    running(sink)
    environment = os.environ | {"XDG_RUNTIME_DIR": str(tmp_path / "run")}

    def plexus(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", PLEXUS, str(folder), *argv]
        return subprocess.run(command, capture_output=True, text=True, env=environment, check=False)

    shown = plexus("--status")
    assert (shown.returncode, shown.stderr) == (0, "")
    assert shown.stdout.startswith(f"home: acceptor pid {os.getpid()}, up since ")
    assert "laptop  running  direct  since " in shown.stdout
    assert plexus("--status", "--host-id=home").stdout.splitlines()[0] == shown.stdout.splitlines()[0]
    missing = plexus("--status", "--host-id=work")
    assert missing.returncode == ExitCode.NO_ACCEPTOR
    assert missing.stderr.startswith("plexus: no acceptor with host id 'work' runs here as ")
    sink.close()
    assert plexus("--status").returncode == ExitCode.NO_ACCEPTOR


def test_plexus_status_by_identity_makes_no_key(folder: Path, tmp_path: Path) -> None:
    from plexus import cli

    key = tmp_path / "id.pem"
    with pytest.raises(NoAcceptorError, match="no acceptor runs with --identity"):
        cli.show_status(cli.parse(["--status", f"--identity={key}"]))
    assert not key.exists()


def test_plexus_status_by_identity_shows_that_ids_acceptor(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from plexus import cli
    from plexus.identity import Identity

    key = tmp_path / "id.pem"
    sink = status.Status(Identity.load(key).id, roster())  # a DHT acceptor's host id: its identity's
    cli.show_status(cli.parse(["--status", f"--identity={key}"]))
    assert capsys.readouterr().out.startswith(f"{sink.host_id}: acceptor pid {os.getpid()}, ")


def test_plexus_status_loads_no_session_nor_network_library() -> None:
    from tests.unit.test_cli import LOADED, NETWORK_LIBRARIES

    found = subprocess.run(
        [sys.executable, "-c", LOADED, "--status"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    # asyncio (and the ssl it imports) come with plexus.launcher, where state_dir() and Running are
    unwanted = set(NETWORK_LIBRARIES) - {"asyncio", "ssl"}
    loaded = {name for name in found if name.partition(".")[0] in unwanted or name in unwanted}
    assert not loaded, f"--status loads {sorted(loaded)}"
    assert "plexus.status" in found


def test_an_acceptors_events_reach_its_status_file_and_plexus_events(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plexus import cli
    from plexus.session import SessionConfig

    @dataclasses.dataclass(frozen=True)
    class Rendezvous:  # what the CLI asks of the acceptor's rendezvous config
        host_id: str
        peers: Roster

    monkeypatch.setenv(events.ENVIRONMENT, str(tmp_path / "events.jsonl"))
    given = SessionConfig(HOME, INVITER, Rendezvous("home", roster()), None)  # type: ignore[arg-type]
    with cli.reporting(given, accepting=True) as (config, reload):
        config.on_event(events.Requested(role="accept", peer=INVITER, peer_name="phone"))
        assert peer(folder / "status-home.json", "phone")["state"] == "connecting"
        assert reload is not None
        reload()  # SIGHUP: the peers read again, reported, the file rewritten
        assert peer(folder / "status-home.json", "phone")["state"] == "connecting"
    assert [line["event"] for line in events.read(tmp_path / "events.jsonl")] == ["requested", "reloaded"]
    assert not (folder / "status-home.json").exists()  # the acceptor ended
    with cli.reporting(given, accepting=False) as (config, reload):  # an inviter: no status file
        assert reload is None
        config.on_event(events.Started(role="invite"))
        assert not list(folder.iterdir())
