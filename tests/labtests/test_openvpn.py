"""exec/exec.sh: OpenVPN in TLS mode with pinned self-signed certificates.

The fast tests run the script's own checks (no lab; `init` needs no root), and its TLS role decision with a
stand-in openvpn. The lab tests launch it from a real plexus session across the lab's NATs on both hosts, each
with its own key folder, and ping through the tunnel; and over IPv6, launched by hand as plexus would.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from plexus import endpoint
from tests.lab import sessions
from tests.lab.lab import Lab, stop_process
from tests.lab.sessions import Plexus, Side
from tests.lab.tunnel import (
    DEV,
    EXEC_SH,
    SIX_ARGS,
    Laptop,
    exec_sh,
    first_ping,
    init,
    launch,
    pinned_pair,
    tun_addresses,
)

FINGERPRINT = re.compile(r"^([0-9A-F]{2}:){31}[0-9A-F]{2}$")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="exec.sh init needs openssl")
needs_openvpn = pytest.mark.skipif(
    shutil.which("openvpn", path=SBIN_PATH) is None, reason="exec.sh checks for openvpn before its key files"
)


# --- the script's own checks, no lab


@needs_openssl
def test_init_makes_a_key_once_and_prints_its_fingerprint(tmp_path: Path) -> None:
    directory = tmp_path / "openvpn"
    fingerprint = init(directory)
    assert FINGERPRINT.match(fingerprint), fingerprint
    assert (directory / "key.pem").stat().st_mode & 0o777 == 0o600
    certificate = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    assert fingerprint == sha256(certificate.public_bytes(Encoding.DER)).digest().hex(":").upper()
    key = (directory / "key.pem").read_bytes()
    again = exec_sh("init", str(directory))
    assert again.returncode != 0 and "not overwriting" in again.stderr, again.stderr
    assert (directory / "key.pem").read_bytes() == key
    shown = exec_sh("fingerprint", str(directory))
    assert (shown.returncode, shown.stdout.strip()) == (0, fingerprint)
    by_env = exec_sh("fingerprint", directory=directory)
    assert by_env.stdout.strip() == fingerprint


@needs_openvpn
@needs_openssl
def test_run_mode_checks_before_starting_openvpn(tmp_path: Path) -> None:
    endpoints = ("10.0.1.2", "40000", "198.51.100.2", "40000", "198.51.100.6", "40001")
    usage = exec_sh(*endpoints[:5], directory=tmp_path)
    assert usage.returncode == 2 and "usage" in usage.stderr
    if os.geteuid() != 0:
        refused = exec_sh(*endpoints, directory=tmp_path)
        assert refused.returncode != 0 and refused.stderr.count("\n") == 1 and "root" in refused.stderr
        pytest.skip("the key file checks come after the root check")
    as_nobody = exec_sh(*endpoints, directory=tmp_path, as_nobody=True)
    assert as_nobody.returncode != 0 and "needs root" in as_nobody.stderr, as_nobody.stderr
    for args in (endpoints, (*endpoints, "1234")):  # the recommended 6 arguments and plexus's default 7
        missing = exec_sh(*args, directory=tmp_path)
        assert missing.returncode != 0 and missing.stderr.count("\n") == 1, missing.stderr
        assert f"exec.sh init {tmp_path}" in missing.stderr, missing.stderr
    init(tmp_path)
    no_peer = exec_sh(*endpoints, directory=tmp_path)
    assert no_peer.returncode != 0 and "peer-fingerprint" in no_peer.stderr, no_peer.stderr
    (tmp_path / "peer-fingerprint").write_text("not a fingerprint\n")
    garbled = exec_sh(*endpoints, directory=tmp_path)
    assert garbled.returncode != 0 and "no SHA-256 fingerprint" in garbled.stderr, garbled.stderr


Endpoint = tuple[str, str]  # an address as plexus passes it, and a port

# Each host decides its TLS role alone, from the endpoints as plexus gave it: (a's own, b's as a has it), (b's
# own, a's as b has it), whether a is the TLS server, openvpn's --proto.
ROLES: list[tuple[tuple[Endpoint, Endpoint], tuple[Endpoint, Endpoint], bool, str]] = [
    ((("198.51.100.2", "40000"), ("198.51.100.6", "40001")),
     (("198.51.100.6", "40001"), ("198.51.100.2", "40000")), True, "udp"),
    ((("2001:db8:a::2", "40000"), ("2001:db8:b::2", "40001")),
     (("2001:db8:b::2", "40001"), ("2001:db8:a::2", "40000")), True, "udp6"),
    # Other spellings of the same addresses: as plain strings, each side would sort its own first
    ((("2001:db8:a::2", "40000"), ("2001:0db8:b::2", "40001")),
     (("2001:db8:b::2", "40001"), ("2001:0DB8:A:0:0:0:0:2", "40000")), True, "udp6"),
    ((("2001:db8:ff00::5", "40000"), ("2001:db8:1::9", "40001")),
     (("2001:db8:1::9", "40001"), ("2001:db8:ff00::5", "40000")), False, "udp6"),
    # One address, the port decides
    ((("2001:db8:a::2", "40001"), ("2001:db8:a::2", "40000")),
     (("2001:db8:a::2", "40000"), ("2001:db8:a::2", "40001")), False, "udp6"),
]  # fmt: skip


@needs_openssl
def test_tls_roles_are_opposite_whatever_the_family_or_spelling(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    folders = pinned_pair(tmp_path)
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "openvpn").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')  # its arguments, one a line
    (stand_in / "openvpn").chmod(0o755)

    def argv(folder: Path, own: Endpoint, peer: Endpoint) -> list[str]:
        done = exec_sh(*own, *own, *peer, directory=folder, path=stand_in)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    for (own_a, b_at_a), (own_b, a_at_b), a_serves, proto in ROLES:
        at_a, at_b = argv(folders[0], own_a, b_at_a), argv(folders[1], own_b, a_at_b)
        assert (("--tls-server" in at_a), ("--tls-server" in at_b)) == (a_serves, not a_serves), (at_a, at_b)
        for args, own, peer in ((at_a, own_a, b_at_a), (at_b, own_b, a_at_b)):
            assert args[args.index("--proto") + 1] == proto
            assert args[args.index("--local") + 1 : args.index("--local") + 4] == [own[0], "--lport", own[1]]
            assert args[args.index("--remote") + 1 : args.index("--remote") + 4] == [
                peer[0],
                "--rport",
                peer[1],
            ]
    for wrong in ("2001:db8::zz", "1:2:3:4:5:6:7:8:9", "2001:db8::1::2"):
        refused = exec_sh(wrong, "40000", wrong, "40000", "2001:db8::2", "40001", directory=folders[0])
        assert refused.returncode == 1 and refused.stderr == f"exec.sh: not an IPv6 address: {wrong}\n"


# --- a real session launches exec.sh on both hosts


LAUNCHED = ("openvpn",)  # stopped after each test by the `running` fixture (tests/conftest.py)


@pytest.fixture(autouse=True)
def no_tunnel_left(lab: Lab) -> Iterator[None]:
    """Checked after `running` has stopped every openvpn: no tun device is left behind."""
    yield
    for host in ("a", "b"):
        assert "does not exist" in lab.exec(host, ["ip", "link", "show", DEV]).stderr, f"{DEV} left on {host}"


def connect(
    lab: Lab, tmp_path: Path, running: list[Plexus], folders: tuple[Path, Path], **overrides: str
) -> tuple[Plexus, Plexus]:
    """An acceptor on b and an inviter on a, each launching exec.sh with its own key folder."""
    inviter, acceptor_side = sessions.pair(lab)
    options = {"exec-command": str(EXEC_SH)} | overrides

    def start(me: Side, peer: Side, folder: Path, accept: bool) -> Plexus:
        plexus = sessions.start(
            lab, me, peer, tmp_path, accept=accept, overrides=options, env={"PLEXUS_OPENVPN_DIR": str(folder)}
        )
        running.append(plexus)
        return plexus

    acceptor = start(acceptor_side, inviter, folders[1], True)
    sessions.wait_until_listening(acceptor)
    invite = start(inviter, acceptor_side, folders[0], False)
    code = invite.wait(90)
    assert code == 0, f"inviter exited {code}: {invite.stderr()}\n{invite.log()}\nacceptor:\n{acceptor.log()}"
    return invite, acceptor


def openvpn_logs(invite: Plexus, acceptor: Plexus) -> str:
    return "".join(
        f"\n{name} openvpn:\n{plexus.exec_log.read_text() if plexus.exec_log.exists() else '(no log)'}"
        for name, plexus in (("inviter", invite), ("acceptor", acceptor))
    )


@pytest.mark.lab
def test_a_ping_crosses_the_tunnel_of_pinned_certificates(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    folders = pinned_pair(tmp_path)
    began = time.monotonic()
    invite, acceptor = connect(lab, tmp_path, running, folders, **{"exec-args": SIX_ARGS})
    launched = time.monotonic()  # the inviter has exited: both sides launched exec.sh
    addresses = first_ping(lab, began + 60)
    assert addresses is not None, f"no ping across the tunnel{openvpn_logs(invite, acceptor)}"
    now = time.monotonic()
    print(f"first ping across the tunnel {now - began:.1f} s after the acceptor started,", end=" ")
    print(f"{now - launched:.1f} s after the inviter exited (both sides launched exec.sh)")
    ping = lab.exec("a", ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", addresses[1]])
    assert " 0% packet loss" in ping.stdout, ping.stdout

    # The two ends hold complementary addresses; the TLS server is the one with .1.
    own_a, far_a = addresses
    assert tun_addresses(lab, "b") == (far_a, own_a)
    nobody = pwd.getpwnam("nobody").pw_uid
    for host, own in (("a", own_a), ("b", far_a)):
        [pid] = sessions.pids_of(lab, host, "openvpn")
        uids = re.search(r"^Uid:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
        assert uids is not None and set(map(int, uids.group(1).split())) == {nobody}, f"{host}: {uids}"
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        assert ("--tls-server" in argv) == own.endswith(".1"), argv
        assert "--secret" not in argv
    logs = openvpn_logs(invite, acceptor)
    assert "Peer Connection Initiated" in logs
    assert "DEPRECATED" not in logs and "WARNING" not in logs, logs


@pytest.mark.lab
def test_a_wrong_peer_fingerprint_gives_no_tunnel(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    folders = pinned_pair(tmp_path)
    own = exec_sh("fingerprint", str(folders[1])).stdout
    (folders[1] / "peer-fingerprint").write_text(own)  # b pins its own fingerprint instead of a's
    invite, acceptor = connect(lab, tmp_path, running, folders)  # plexus's default 7 arguments
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "verification failed" not in openvpn_logs(invite, acceptor):
        time.sleep(0.1)
    logs = openvpn_logs(invite, acceptor)
    assert "--peer-fingerprint certificate hash verification failed" in acceptor.exec_log.read_text(), logs
    addresses = tun_addresses(lab, "a")
    if addresses is not None:  # a's openvpn waits for a peer that never completes the handshake
        ping = lab.exec("a", ["ping", "-n", "-c", "3", "-i", "0.3", "-W", "1", addresses[1]])
        assert ping.returncode != 0, f"a ping crossed without a trusted peer{logs}"
    assert "Initialization Sequence Completed" not in logs, logs


@pytest.mark.lab
def test_plexus_reconnect_brings_a_dead_tunnel_back(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    """The cron script: a healthy tunnel is left alone; a dead far end makes it run plexus, which replaces the
    inviter's previous openvpn (the script kills nothing), and logs the outcome."""
    folders = pinned_pair(tmp_path)
    inviter, acceptor_side = sessions.pair(lab)
    options = {"exec-command": str(EXEC_SH), "exec-args": SIX_ARGS}
    acceptor = sessions.start(
        lab,
        acceptor_side,
        inviter,
        tmp_path,
        accept=True,
        overrides=options,
        env={"PLEXUS_OPENVPN_DIR": str(folders[1])},
    )
    running.append(acceptor)
    sessions.wait_until_listening(acceptor)
    laptop = Laptop(lab, tmp_path, inviter, acceptor_side, folders[0], options)
    reconnect, logged = laptop.reconnect, laptop.logged
    assert reconnect() == 0  # no tunnel yet: plexus runs
    assert logged() == ["-t plexus reconnected"]
    assert first_ping(lab, time.monotonic() + 30), laptop.exec_log.read_text()
    [before] = sessions.pids_of(lab, "a", "openvpn")
    assert reconnect(PLEXUS="false") == 0 and len(logged()) == 1  # healthy: plexus is not even run

    sessions.signal_launched(lab, "b", "openvpn")  # the far end dies; a's openvpn lives on, holding plexus0
    assert reconnect() == 0, laptop.log_file.read_text()
    assert logged()[-1].startswith("-t plexus reconnected (the tunnel to 10.255.0."), logged()
    assert first_ping(lab, time.monotonic() + 30), laptop.exec_log.read_text()
    assert sessions.pids_of(lab, "a", "openvpn") != [before]


@pytest.mark.lab
def test_a_ping_crosses_the_tunnel_over_ipv6(lab: Lab, tmp_path: Path, running: list[Plexus]) -> None:
    """Both hosts behind symmetric IPv4 NATs, the IPv6 path between their global addresses: exec.sh given the
    plain IPv6 addresses plexus passes when that path wins, launched by hand on both hosts (no session: both
    ends send, so the stateful firewalls open by themselves)."""
    lab.set_nat("a", "symmetric")
    lab.set_nat("b", "symmetric")
    folders = pinned_pair(tmp_path)
    a, b = (lab.inner_ip6("a"), "41800"), (lab.inner_ip6("b"), "41801")
    logs = tmp_path / "a-openvpn.log", tmp_path / "b-openvpn.log"
    began = time.monotonic()
    launched = [
        launch(lab, "a", folders[0], logs[0], *a, *a, *b),
        launch(lab, "b", folders[1], logs[1], *b, *b, *a),
    ]
    try:
        addresses = first_ping(lab, began + 60)
        text = "".join(f"\n{log.name}:\n{log.read_text()}" for log in logs)
        assert addresses is not None, f"no ping across the tunnel{text}"
        print(f"first ping across the IPv6 tunnel {time.monotonic() - began:.1f} s after both launched")
        ping = lab.exec("a", ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", addresses[1]])
        assert " 0% packet loss" in ping.stdout, ping.stdout
        own_a, far_a = addresses
        assert own_a.endswith(".1")  # a's 2001:db8:a::2 sorts before b's 2001:db8:b::2: a is the TLS server
        assert tun_addresses(lab, "b") == (far_a, own_a)
        for host, own, peer in (("a", a, b), ("b", b, a)):
            [pid] = sessions.pids_of(lab, host, "openvpn")
            argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            assert argv[argv.index("--proto") + 1] == "udp6", argv
            assert argv[argv.index("--local") + 1] == own[0], argv
            assert argv[argv.index("--remote") + 1] == peer[0], argv
            assert ("--tls-server" in argv) == (host == "a"), argv
        text = "".join(f"\n{log.name}:\n{log.read_text()}" for log in logs)
        assert "Peer Connection Initiated" in text
        assert "DEPRECATED" not in text and "WARNING" not in text, text
    finally:
        for popen in launched:
            stop_process(popen)


@pytest.mark.lab
def test_a_plexus_session_over_ipv6_runs_openvpn_over_it(
    lab: Lab, tmp_path: Path, running: list[Plexus]
) -> None:
    """End to end: two symmetric IPv4 NATs and no relay, the STUN server by its dual-stack name: plexus
    connects over IPv6 and launches exec.sh with the plain IPv6 endpoints, and a ping crosses OpenVPN's tunnel
    over them."""
    lab.set_nat("a", "symmetric")
    lab.set_nat("b", "symmetric")
    folders = pinned_pair(tmp_path)
    began = time.monotonic()
    invite, acceptor = connect(
        lab, tmp_path, running, folders, **{"exec-args": SIX_ARGS, "stun-server": Lab.STUN_NAME}
    )
    assert [event["way"] for event in invite.events("connected")] == ["ipv6"]
    addresses = first_ping(lab, began + 60)
    assert addresses is not None, f"no ping across the tunnel{openvpn_logs(invite, acceptor)}"
    print(
        f"first ping across OpenVPN over plexus's IPv6 path {time.monotonic() - began:.1f} s after the start"
    )
    for host, own, peer in (("a", "a", "b"), ("b", "b", "a")):
        [pid] = sessions.pids_of(lab, host, "openvpn")
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        assert argv[argv.index("--proto") + 1] == "udp6", argv
        assert argv[argv.index("--local") + 1] == lab.inner_ip6(own), argv
        assert argv[argv.index("--remote") + 1] == lab.inner_ip6(peer), argv


@pytest.mark.lab
@pytest.mark.parametrize("mover", ["a", "b"])
def test_a_carried_tunnel_outlives_either_sides_nat_mapping_it_anew(
    lab: Lab, tmp_path: Path, running: list[Plexus], mover: str
) -> None:
    """--carry on both sides: exec.sh's OpenVPN talks to plexus on loopback, plexus carries its datagrams,
    and when one side's NAT (port-restricted cone on both) forgets its mappings and maps it anew, a rebind
    over the mail tells the peer, and pings across the tunnel go on: no new session, no cron run."""
    folders = pinned_pair(tmp_path)
    inviter, acceptor_side = sessions.pair(lab)
    options = {"exec-command": str(EXEC_SH), "exec-args": SIX_ARGS, "carry": ""}
    sides = {}
    for me, peer, folder, accept in (
        (acceptor_side, inviter, folders[1], True),
        (inviter, acceptor_side, folders[0], False),
    ):
        plexus = sessions.start(
            lab, me, peer, tmp_path, accept=accept, overrides=options, env={"PLEXUS_OPENVPN_DIR": str(folder)}
        )
        running.append(plexus)
        sides[me.host] = plexus
        if accept:
            sessions.wait_until_listening(plexus)
    addresses = first_ping(lab, time.monotonic() + 60)
    assert addresses is not None, f"no ping across the tunnel{openvpn_logs(sides['a'], sides['b'])}"
    assert [e["pid"] is not None for e in sides["a"].events("launched")] == [True]
    pinging = lab.popen(
        "a",
        ["ping", "-n", "-i", "0.1", "-c", "120", "-W", "1", addresses[1]],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    changed = time.time()
    lab.remap(mover)
    out, _ = pinging.communicate(timeout=60)
    moving, other = (sides["a"], sides["b"]) if mover == "a" else (sides["b"], sides["a"])
    try:
        (remapped,) = moving.wait_events("remapped", timeout=5)
        (moved,) = other.wait_events("migrated", timeout=5)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{sides['a'].log()[-4000:]}\n{sides['b'].log()[-4000:]}") from None
    replies = [int(m) for m in re.findall(r"icmp_seq=(\d+)", out)]
    gap = max(b - a for a, b in itertools.pairwise(replies)) * 0.1
    print(
        f"carried OpenVPN, {mover} remapped: the peer moved {moved['at'] - changed:.2f} s after;"
        f" {len(replies)} of 120 pings (every 0.1 s) answered, the longest gap {gap:.1f} s"
    )
    assert endpoint.Endpoint.parse(moved["after"]) == endpoint.Endpoint.parse(remapped["after"])
    assert replies and replies[-1] >= 115 and gap < 4.0, out  # the tunnel lives on to the end
    assert sides["a"].process.poll() is None and sides["b"].process.poll() is None  # both carry on
