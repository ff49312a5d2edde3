"""The servers that forwarding tests reach, checked from inside their own namespace: sshd takes the test's
key, each TCP target mode answers as documented, and nothing outlives a stop."""

from __future__ import annotations

import os
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest

from tests.lab.lab import Lab, stop_process
from tests.lab.services import (
    BYE,
    Sshd,
    TcpTarget,
    descendants,
    exchange,
    http_get,
    pattern,
    proxy_command,
    sink_reply,
    with_loss,
)

pytestmark = pytest.mark.lab

SSH_TIMEOUT_S = 30


def ssh(lab: Lab, host: str, sshd: Sshd, command: list[str], proxy: str | None = None) -> str:
    done = lab.exec(host, sshd.client_argv(proxy, command), timeout=SSH_TIMEOUT_S)
    assert done.returncode == 0, f"ssh {command} from {host}: {done.stderr}\n{sshd.log_tail()}"
    return str(done.stdout)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # exited meanwhile
        return b""


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet (this machine's pid 1 may never do it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def test_sshd_runs_commands_for_the_client_key(lab: Lab) -> None:
    with Sshd(lab, "b") as sshd:
        pid = sshd.pid
        assert os.readlink(f"/proc/{pid}/exe") == "/usr/sbin/sshd"
        ssh(lab, "b", sshd, ["true"])
        assert ssh(lab, "b", sshd, ["echo", "hi"]) == "hi\n"
    assert gone(pid)


def test_sshd_through_a_proxy_command_from_the_other_host(lab: Lab) -> None:
    with Sshd(lab, "b") as sshd:
        # a's loopback is a's own: only the ProxyCommand into b's namespace reaches this sshd
        direct = lab.exec("a", sshd.client_argv(None, ["true"]), timeout=SSH_TIMEOUT_S)
        assert direct.returncode == 255
        proxy = proxy_command(lab, "b", sshd.address, sshd.port)
        assert ssh(lab, "a", sshd, ["echo", "hi"], proxy) == "hi\n"


def test_sshd_stop_ends_its_sessions(lab: Lab) -> None:
    with Sshd(lab, "b") as sshd:
        argv = sshd.client_argv(None, ["sleep", "61"])
        client = lab.popen(
            "b", argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + SSH_TIMEOUT_S
            while not any(cmdline(pid) == b"sleep\x0061\x00" for pid in descendants(sshd.pid)):
                assert time.monotonic() < deadline, f"no session started\n{sshd.log_tail()}"
                time.sleep(0.05)
            pids = [sshd.pid, *descendants(sshd.pid)]
            sshd.stop()
            # the client sees its connection end and exits by itself
            assert client.wait(SSH_TIMEOUT_S) == 255
        finally:
            stop_process(client)
    assert all(gone(pid) for pid in pids)


def test_echo_target_answers_bye_after_the_half_close(lab: Lab) -> None:
    payload = os.urandom(3_000_000)  # big enough that echoes come back while it is still being sent
    with TcpTarget(lab, "b", "echo") as target:
        assert target.port > 0
        assert lab.run_sync("b", lambda: exchange(target.address, target.port, b"")) == BYE
        reply = lab.run_sync("b", lambda: exchange(target.address, target.port, payload))
        assert reply == payload + BYE, target.log_tail()
        assert "echoed 3000000 bytes" in target.log_tail()


def test_http_target_serves_sized_bodies(lab: Lab) -> None:
    with TcpTarget(lab, "b", "http") as target:
        for size in (0, 1, 251, 5_000_000):
            body = lab.run_sync("b", partial(http_get, target.address, target.port, size))
            assert body == pattern(size), f"/size/{size}: {len(body)} bytes\n{target.log_tail()}"
        missing = lab.run_sync("b", lambda: exchange(target.address, target.port, b"GET /x HTTP/1.0\r\n\r\n"))
        assert missing.startswith(b"HTTP/1.0 404 ")


def test_sink_target_reports_length_and_digest(lab: Lab) -> None:
    payload = os.urandom(3_000_000)
    with TcpTarget(lab, "b", "sink", port=7000) as target:
        assert target.port == 7000
        for data in (payload, b""):
            reply = lab.run_sync("b", partial(exchange, target.address, target.port, data))
            assert reply == sink_reply(data), target.log_tail()


def test_with_loss_resets_the_link_whatever_happens(lab: Lab) -> None:
    def link_rules() -> str:
        return str(lab.exec("nat-b", ["nft", "list", "table", "inet", "plexus_link"], check=True).stdout)

    with pytest.raises(RuntimeError, match="inside"), with_loss(lab, "b", 30):
        assert "numgen random mod 1000 <= 299 drop" in link_rules()
        raise RuntimeError("inside")
    assert "numgen" not in link_rules()
