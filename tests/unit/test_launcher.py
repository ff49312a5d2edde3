import asyncio
import json
import sys
from pathlib import Path

import pytest

from plexus import launcher
from plexus.endpoint import Endpoint
from plexus.errors import LaunchError, UsageError
from plexus.launcher import Command, Tunnel

TUNNEL = Tunnel(
    inner=Endpoint("10.0.1.2", 5000),
    outer=Endpoint("198.51.100.2", 5000),
    peer=Endpoint("198.51.100.6", 6000),
    secret=18446744073709551615,
)


def test_default_arguments_follow_plexus_2_2_order() -> None:
    assert launcher.expand_args(None, TUNNEL) == [
        "10.0.1.2",
        "5000",
        "198.51.100.2",
        "5000",
        "198.51.100.6",
        "6000",
        "18446744073709551615",
    ]


def test_wildcards_expand_inside_words_and_quotes_follow_shell_rules() -> None:
    args = launcher.expand_args("--remote %peerip%:%peerport% 'two words' --key=%secret%", TUNNEL)
    assert args == ["--remote", "198.51.100.6:6000", "two words", "--key=18446744073709551615"]


def test_unbalanced_quote_is_a_launch_error() -> None:
    with pytest.raises(LaunchError, match="--exec-args"):
        launcher.expand_args("'open", TUNNEL)


async def test_started_command_gets_arguments_cwd_and_log_file(tmp_path: Path) -> None:
    script = (
        "import json, os, sys; print(json.dumps([os.getcwd(), os.getsid(0) == os.getpid(), sys.argv[1:]]))"
    )
    log_file = tmp_path / "command.log"
    command = Command(sys.executable, f"-c '{script}' %outerport% %secret%", pwd=tmp_path, log_file=log_file)
    process = launcher.start(command, TUNNEL)
    assert await launcher.watch(process) == 0
    cwd, own_session, argv = json.loads(log_file.read_text())
    assert (cwd, own_session, argv) == (str(tmp_path), True, ["5000", "18446744073709551615"])


def test_watch_with_grace_returns_while_the_command_runs_on() -> None:
    # asyncio.run, as the inviter uses it: it must not wait for the detached command at shutdown.
    process = launcher.start(Command(sys.executable, "-c 'import time; time.sleep(30)'"), TUNNEL)
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
