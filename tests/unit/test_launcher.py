import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from plexus import launcher
from plexus.endpoint import Endpoint
from plexus.errors import LaunchError, UsageError
from plexus.launcher import Command, Running, Slot, Tunnel

TUNNEL = Tunnel(
    inner=Endpoint("10.0.1.2", 5000),
    outer=Endpoint("198.51.100.2", 5000),
    peer=Endpoint("198.51.100.6", 6000),
    secret=18446744073709551615,
)


def expand(template: str | None) -> list[str]:
    return launcher.expand_args(launcher.parse_args(template), TUNNEL)


def test_default_arguments_follow_plexus_2_2_order() -> None:
    assert expand(None) == [
        "10.0.1.2",
        "5000",
        "198.51.100.2",
        "5000",
        "198.51.100.6",
        "6000",
        "18446744073709551615",
    ]


def test_wildcards_expand_inside_words_and_quotes_follow_shell_rules() -> None:
    args = expand("--remote %peerip%:%peerport% 'two words' --key=%secret%")
    assert args == ["--remote", "198.51.100.6:6000", "two words", "--key=18446744073709551615"]


def test_the_secret_is_redacted_for_the_log() -> None:
    words = launcher.parse_args("--key=%secret% %peerport%")
    assert launcher.expand_args(words, TUNNEL, redact=True) == ["--key=%secret%", "6000"]


def test_unbalanced_quote_is_a_usage_error_found_at_start() -> None:
    with pytest.raises(UsageError, match="--exec-args"):
        launcher.parse_args("'open")


def test_the_command_gets_the_values_in_its_environment() -> None:
    assert TUNNEL.environment() == {
        "PLEXUS_INNERIP": "10.0.1.2",
        "PLEXUS_INNERPORT": "5000",
        "PLEXUS_OUTERIP": "198.51.100.2",
        "PLEXUS_OUTERPORT": "5000",
        "PLEXUS_PEERIP": "198.51.100.6",
        "PLEXUS_PEERPORT": "6000",
        "PLEXUS_SECRET": "18446744073709551615",
        "PLEXUS_PEER": "",
        "PLEXUS_PATH": "direct",
    }


async def test_started_command_gets_arguments_cwd_and_log_file(tmp_path: Path) -> None:
    script = (
        "import json, os, sys; print(json.dumps([os.getcwd(), os.getsid(0) == os.getpid(), sys.argv[1:]]))"
    )
    log_file = tmp_path / "command.log"
    words = launcher.parse_args(f"-c '{script}' %outerport% %secret%")
    command = Command(sys.executable, words, pwd=tmp_path, log_file=log_file)
    process = launcher.start(command, TUNNEL)
    assert await launcher.watch(process) == 0
    cwd, own_session, argv = json.loads(log_file.read_text())
    assert (cwd, own_session, argv) == (str(tmp_path), True, ["5000", "18446744073709551615"])


def test_watch_with_grace_returns_while_the_command_runs_on() -> None:
    # asyncio.run, as the inviter uses it: it must not wait for the detached command at shutdown.
    process = launcher.start(sleeper(), TUNNEL)
    try:
        assert asyncio.run(launcher.watch(process, grace=0.1)) is None
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_missing_command_is_a_launch_error(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="cannot start"):
        launcher.start(Command(str(tmp_path / "absent")), TUNNEL)


def test_check_executable(tmp_path: Path) -> None:
    launcher.check_executable("sh")
    launcher.check_executable(sys.executable)
    plain = tmp_path / "plain"
    plain.write_text("")
    for path, reason in [
        (str(tmp_path / "absent"), "does not exist"),
        (str(plain), "not executable"),
        ("no-such-command-xyz", "not found in PATH"),
    ]:
        with pytest.raises(UsageError, match=reason):
            launcher.check_executable(path)


def test_a_slot_s_new_folders_are_private(tmp_path: Path) -> None:
    slot = Slot(tmp_path / "state" / "plexus" / "slot.json")
    slot.save(os.getpid())
    assert slot.load() == Running.of(os.getpid())
    for folder in (tmp_path / "state", tmp_path / "state" / "plexus"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_the_command_s_log_file_is_made_private(tmp_path: Path) -> None:
    log_file = tmp_path / "new.log"
    launcher.check_log_file(log_file)
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    log_file.unlink()  # gone by launch time: made private again
    launcher.start(Command("/bin/true", (), log_file=log_file), TUNNEL).wait()
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_an_unwritable_log_file_is_a_usage_error(tmp_path: Path) -> None:
    launcher.check_log_file(tmp_path / "new.log")
    with pytest.raises(UsageError, match="cannot write --exec-log-file"):
        launcher.check_log_file(tmp_path / "no-such-dir" / "x.log")


def sleeper(ignore_term: bool = False) -> Command:
    """A command whose group has two processes: a shell and its child (as exec.sh and its openvpn)."""
    trap = "trap '' TERM; " if ignore_term else ""
    return Command("sh", ("-c", f"{trap}sleep 30 & wait"))


@pytest.mark.parametrize("ignore_term", [False, True], ids=["sigterm", "sigkill-after-grace"])
async def test_the_previous_command_is_stopped_with_its_whole_group(
    tmp_path: Path, ignore_term: bool
) -> None:
    slot = Slot(tmp_path / "slot.json")
    process = launcher.start(sleeper(ignore_term), TUNNEL)
    try:
        slot.save(process.pid)
        await asyncio.sleep(0.2)
        assert len(launcher.group_members(process.pid)) == 2
        await slot.stop_previous(grace=0.3)
        assert launcher.group_members(process.pid) == []
        assert not slot.path.exists()
        await slot.stop_previous()  # nothing recorded: nothing to do
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def test_a_recorded_pid_now_used_by_another_process_is_left_alone() -> None:
    process = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        running = Running.of(process.pid)
        assert running is not None and running.alive()
        stranger = Running(process.pid, running.started + 1)  # same pid, another start time
        assert not stranger.alive()
        await stranger.stop(grace=0.1)
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_slot_files_are_named_for_the_role_and_both_ids() -> None:
    path = Slot.for_session("invite", "lap top", "home/1").path
    assert path.name == "invite-lap_top-home_1.json"


async def test_a_frozen_command_is_stopped_without_waiting_for_sigkill() -> None:
    """A stale tunnel's process may be stopped (SIGSTOP): SIGCONT lets it act on the SIGTERM at once."""
    process = launcher.start(sleeper(), TUNNEL)
    try:
        await asyncio.sleep(0.2)
        os.killpg(process.pid, signal.SIGSTOP)
        running = Running.of(process.pid)
        assert running is not None
        await asyncio.wait_for(running.stop(grace=10), timeout=2)
        assert launcher.group_members(process.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
