"""One acceptor, many peers (issue 20), end to end: an acceptor on host b meets its household by mail and on
the DHT at once (--rendezvous=email,dht), its peers listed in a --peers file: two devices known by identity
(met on the DHT: a phone and a tablet, each with its own streams allow-list) and two known by mail id (a
laptop and a work machine, sharing the lab's mail account on host a under distinct --host-id; the work
machine with a command line of its own). Each launched command is tests/lab/hold.py, which says which peer it
serves (PLEXUS_PEER and %peer%) and holds its inner port until stopped; the acceptor's events, each naming
its peer (peer_name), and hold.py's lines are what the tests observe."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plexus.errors import ExitCode
from plexus.identity import Identity
from tests.lab import sessions
from tests.lab.dht import DhtNetwork
from tests.lab.lab import Lab
from tests.lab.services import BYE, TcpTarget
from tests.lab.sessions import HOLD, Plexus, Side

pytestmark = pytest.mark.lab
LAUNCHED = (HOLD.name,)  # stopped after each test by the `running` fixture (tests/conftest.py)

ARGS = "%innerip% %innerport% %outerip% %outerport% %peerip% %peerport% %secret%"
PHONE_TARGET, TABLET_TARGET = "127.0.0.1:7007", "127.0.0.1:7008"  # each allowed to one of them only
DEVICES = ("phone", "tablet", "laptop", "work")


@dataclass(frozen=True)
class Household:
    """What the tests share: the DHT, the echo targets on b, and the identity files of b's devices."""

    network: DhtNetwork
    keys: Path

    def key(self, name: str) -> Path:
        return self.keys / f"{name}.key"

    def id(self, name: str) -> str:
        return Identity.load(self.key(name)).id


@pytest.fixture(scope="module")
def household(_lab_instance: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Household]:
    keys = tmp_path_factory.mktemp("peers-keys")
    with (
        DhtNetwork(_lab_instance) as network,
        TcpTarget(_lab_instance, "b", "echo", port=7007),
        TcpTarget(_lab_instance, "b", "echo", port=7008),
    ):
        yield Household(network, keys)


@dataclass
class Home:
    """The acceptor on b, its peers file, and how each of its devices reaches it."""

    lab: Lab
    household: Household
    workdir: Path
    running: list[Plexus]
    side: Side  # b's mail side: its account and --host-id
    tag: str  # this test's: the mail ids of its devices
    peers_file: Path
    acceptor: Plexus | None = None

    def mail_id(self, name: str) -> str:
        return f"{name}-{self.tag}"

    @property
    def key(self) -> Path:
        """b's identity: this test's own, so that no request left on the DHT by an earlier test is for it."""
        return self.workdir / "home.key"

    def line(self, name: str) -> str:
        """A device's line in the peers file."""
        lines = {
            "phone": f"{self.household.id('phone')} phone allow={PHONE_TARGET}",
            "tablet": f"{self.household.id('tablet')} tablet allow={TABLET_TARGET}",
            "laptop": f"{self.mail_id('laptop')} laptop",
            "work": f'{self.mail_id("work")} work exec-command={HOLD} exec-args="{ARGS} own-%peer%"',
            "watch": f"{self.household.id('watch')} watch",
        }
        return lines[name]

    def write_peers(self, *names: str) -> None:
        self.peers_file.write_text(
            "# id or identity    name    options\n" + "".join(self.line(name) + "\n" for name in names)
        )

    def start(self) -> Plexus:
        inviter_side = Side("a", self.lab.accounts["local"], self.mail_id("laptop"))
        overrides: dict[str, str | None] = {
            "peer-id": None,
            "peers": str(self.peers_file),
            "rendezvous": "email,dht",
            "dht-bootstrap": ",".join(self.household.network.bootstrap),
            "identity": str(self.key),
            "exec-command": str(HOLD),
            "exec-args": f"{ARGS} %peer%",
        }
        acceptor = sessions.start(
            self.lab, self.side, inviter_side, self.workdir, accept=True, overrides=overrides
        )
        self.running.append(acceptor)
        sessions.wait_until_listening(acceptor, timeout=30)
        self.acceptor = acceptor
        return acceptor

    @property
    def listening(self) -> Plexus:
        assert self.acceptor is not None, "Home.start() first"
        return self.acceptor

    def options(self, name: str, **extra: str | None) -> dict[str, str | None]:
        """A device's inviter options: a DHT device by its identity, a mail device by its id (the lab's
        shared account on a); its own command exits at once (the acceptor's holds the session)."""
        if name in ("laptop", "work", "stranger-mail"):
            mine = Side("a", self.lab.accounts["local"], self.mail_id(name))
            values: dict[str, str | None] = {**sessions.options(self.lab, mine, self.side)}
        else:
            gone = ("host-id", "peer-id", "email-smtps", "email-imaps", "email-login", "email-passwd")
            values = dict.fromkeys((*gone, "email-from", "email-to", "email-ca")) | {
                "dht-bootstrap": ",".join(self.household.network.bootstrap),
                "identity": str(self.household.key(name)),
                "peer-identity": Identity.load(self.key).id,
            }
        return values | {"exec-command": "/bin/true"} | extra

    def inviter(self, name: str, **extra: Any) -> Plexus:
        """A device's inviter on host a, started."""
        kwargs = {key: extra.pop(key) for key in ("stdin", "text") if key in extra}
        me = Side("a", self.lab.accounts["local"], self.mail_id(name))
        invite = sessions.start(
            self.lab,
            me,
            self.side,
            self.workdir,
            accept=False,
            overrides=self.options(name, **extra),
            **kwargs,
        )
        self.running.append(invite)
        return invite

    def connect(self, name: str) -> dict[str, Any]:
        """A session from the device: its inviter exits 0 and the acceptor launches hold.py for it; returns
        hold.py's line (its pid, the peer it was told)."""
        launched = len(self.listening.matching("launched", peer_name=name))
        invite = self.inviter(name)
        code = invite.wait(90)
        assert code == 0, f"{name}: inviter exited {code}: {invite.stderr()}\n{self.listening.log()[-4000:]}"
        event = self.listening.wait_events("launched", count=launched + 1, peer_name=name)[-1]
        return self.held(event["pid"])

    def held(self, pid: int, timeout: float = 15.0) -> dict[str, Any]:
        """hold.py's line from that process."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.listening.hello_results() if line["pid"] == pid]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no line from the command {pid}: {self.listening.hello_results()}")


@pytest.fixture
def home(lab: Lab, tmp_path: Path, running: list[Plexus], household: Household) -> Home:
    """b's acceptor (not yet started) with the four devices in its peers file."""
    tag = uuid.uuid4().hex[:8]
    side = Side("b", lab.accounts["remote"], f"home-{tag}")
    made = Home(lab, household, tmp_path, running, side, tag, tmp_path / "peers")
    made.write_peers(*DEVICES)
    return made


def alive(pid: int) -> bool:
    """The process runs (a zombie, ended and not yet reaped by the acceptor, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"the command {pid} still runs after {timeout} s"
        time.sleep(0.05)


def test_four_devices_by_mail_and_on_the_dht_each_with_its_own_command(home: Home) -> None:
    """Each device connects; every command still runs after the other devices' sessions, knows its peer,
    and a second session from one device replaces that device's command only."""
    acceptor = home.start()
    assert acceptor.events("listening")[0]["peers"] == list(DEVICES), acceptor.events("listening")
    held = {name: home.connect(name) for name in DEVICES}
    for name, line in held.items():
        assert line["peer"] == name, line  # PLEXUS_PEER
        assert line["word"] == (f"own-{name}" if name == "work" else name), line  # %peer%, work's own args
        assert alive(line["pid"]), f"{name}'s command ended after the other sessions: {line}"
    assert len({line["args"]["innerport"] for line in held.values()}) == len(DEVICES), held
    for name in ("requested", "connected", "launched"):
        assert sorted(event["peer_name"] for event in acceptor.events(name)) == sorted(DEVICES), name
    for name in ("phone", "laptop"):  # one of each rendezvous
        again = home.connect(name)
        assert again["pid"] != held[name]["pid"] and again["peer"] == name
        wait_gone(held[name]["pid"])
        others = [line["pid"] for other, line in held.items() if other != name]
        assert all(alive(pid) for pid in others), f"a second session from {name} ended another's command"
        held[name] = again
    assert acceptor.process.poll() is None


def test_a_stranger_is_refused_with_nothing_launched_and_no_answer(home: Home) -> None:
    """An identity the acceptor does not list (on the DHT) and a mail id it does not list: each gets no
    response (its inviter times out), nothing is launched, and the acceptor says once whom it refused."""
    acceptor = home.start()
    stranger = Identity.load(home.household.key("stranger")).id
    by_dht = home.inviter("stranger", **{"response-timeout": "6"})
    by_mail = home.inviter("stranger-mail", **{"response-timeout": "6"})
    assert by_dht.wait(60) == ExitCode.PEER_NOT_FOUND, by_dht.stderr()
    assert by_mail.wait(60) == ExitCode.MAIL_TIMEOUT, by_mail.stderr()
    for named in (stranger, home.mail_id("stranger-mail")):
        assert len(acceptor.rejected(named)) == 1, (named, acceptor.events("rejected"))
    assert not acceptor.events("launched") and not acceptor.events("requested"), acceptor.events()
    answers = [event for event in acceptor.events("sent") if event["kind"] in ("response", "refusal")]
    assert not answers, answers
    assert not sessions.pids_of(home.lab, "b", HOLD.name)


def stdio(home: Home, name: str, target: str, data: bytes) -> tuple[int, bytes, str]:
    """A --stdio inviter from the device to the target on b, fed `data`: its exit code, stdout, stderr."""
    invite = home.inviter(name, stdio=target, **{"exec-command": None}, stdin=subprocess.PIPE, text=False)
    process: subprocess.Popen[bytes] = invite.process  # type: ignore[assignment]  # text=False
    out, err = process.communicate(data, timeout=120)
    return process.returncode, out, err.decode()


def test_each_peer_reaches_only_the_targets_its_line_allows(home: Home) -> None:
    """The phone's line allows one echo target, the tablet's the other: each reaches its own; the tablet's
    stream to the phone's target is refused (exit 16, one line naming the target and where it is allowed),
    and the acceptor's Rejected event names the tablet."""
    acceptor = home.start()
    code, out, err = stdio(home, "phone", PHONE_TARGET, b"ping\n")
    assert (code, out) == (0, b"ping\n" + BYE), f"{err}\n{acceptor.log()[-3000:]}"
    code, out, err = stdio(home, "tablet", PHONE_TARGET, b"ping\n")
    assert code == ExitCode.TARGET_REFUSED and out == b"", err
    assert err.count("\n") == 1 and PHONE_TARGET in err and "allow=" in err, err
    refused = [event for event in acceptor.events("rejected") if PHONE_TARGET in event["reason"]]
    assert [event["peer_name"] for event in refused] == ["tablet"], acceptor.events("rejected")
    code, out, err = stdio(home, "tablet", TABLET_TARGET, b"pong\n")
    assert (code, out) == (0, b"pong\n" + BYE), err


def status(home: Home) -> str:
    """`plexus --status` for b's acceptor (its --host-id), run on b as its user (root): its state folder."""
    argv = [sys.executable, "-m", "plexus", "--status", f"--host-id={home.side.host_id}"]
    done = home.lab.exec("b", argv, cwd=sessions.ROOT, timeout=30)
    assert done.returncode == 0, f"{done.returncode}: {done.stderr}"
    return str(done.stdout)


def rows(shown: str) -> dict[str, list[str]]:
    """`plexus --status`'s line of each peer (after the acceptor's header), split into its words."""
    return {words[0]: words for words in (line.split() for line in shown.splitlines()[1:]) if words}


def reloaded(home: Home, peers: tuple[str, ...], timeout: float = 10.0) -> dict[str, list[str]]:
    """Wait until `plexus --status` lists these peers (the acceptor rewrites it as it reloads --peers), and
    those only, but for a removed one whose session runs on; returns its rows."""
    deadline = time.monotonic() + timeout
    while True:
        shown = status(home)
        found = rows(shown)
        listed = {name for name, words in found.items() if "longer" not in words}
        if listed == set(peers):
            return found
        assert time.monotonic() < deadline, f"not reloaded to {peers} within {timeout} s:\n{shown}"
        time.sleep(0.1)


def test_sighup_adds_and_removes_peers_and_the_running_sessions_go_on(home: Home) -> None:
    """The peers file edited, then SIGHUP: a peer added (a watch) connects, a peer removed (the tablet) is
    a stranger from then on, and every command that ran still runs, the removed peer's too; a file that no
    longer reads leaves the peers as they were."""
    acceptor = home.start()
    held = {name: home.connect(name) for name in ("phone", "tablet", "laptop")}
    home.write_peers("phone", "laptop", "work", "watch")  # tablet goes, the watch comes
    acceptor.process.send_signal(signal.SIGHUP)
    (event,) = acceptor.wait_events("reloaded")
    assert (event["added"], event["removed"], event["error"]) == (["watch"], ["tablet"], None), event
    shown = reloaded(home, ("phone", "laptop", "work", "watch"))
    assert " ".join(shown["tablet"][1:]).endswith("no longer in the peers"), shown["tablet"]
    assert acceptor.process.poll() is None
    line = home.connect("watch")
    assert (line["peer"], line["word"]) == ("watch", "watch")
    rejected = len(acceptor.rejected(home.household.id("tablet")))
    refused = home.inviter("tablet", **{"response-timeout": "6"})
    assert refused.wait(60) == ExitCode.PEER_NOT_FOUND, refused.stderr()
    assert len(acceptor.rejected(home.household.id("tablet"))) == rejected + 1, acceptor.events("rejected")
    # Every session that ran before the reload still runs, the removed peer's too: the same commands.
    for name, before in held.items():
        assert alive(before["pid"]), f"{name}'s command ended at the reload"
    assert len(acceptor.matching("launched", peer_name="tablet")) == 1
    home.peers_file.write_text("not-an-identity\n")
    acceptor.process.send_signal(signal.SIGHUP)
    broken = acceptor.wait_events("reloaded", 2)[-1]
    assert broken["error"] is not None and not broken["added"] and not broken["removed"], broken
    reloaded(home, ("phone", "laptop", "work", "watch"))
    assert acceptor.process.poll() is None
    assert home.connect("watch")["peer"] == "watch"


def test_status_shows_each_peer_and_its_sessions_way(home: Home) -> None:
    """`plexus --status`: a header naming the acceptor, then a line a peer: its name, its latest session's
    state and way (or "idle -"), and the command's pid."""
    acceptor = home.start()
    held = {name: home.connect(name) for name in ("tablet", "work")}
    shown = status(home)
    assert shown.splitlines()[0].startswith(f"{home.side.host_id}: acceptor pid {acceptor.process.pid}"), (
        shown
    )
    found = rows(shown)
    assert list(found) == list(DEVICES), shown
    ways = {event["peer_name"]: event["way"] for event in acceptor.events("connected")}
    for name in DEVICES:
        if name in held:
            assert found[name][1:3] == ["running", ways[name]], shown
            assert f"pid {held[name]['pid']}" in " ".join(found[name]), shown
        else:
            assert found[name][1:3] == ["idle", "-"], shown
