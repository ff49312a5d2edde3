"""The command line's contract: one-line errors with distinct exit codes, 2.2's option names, --config."""

import asyncio
import base64
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from aioimaplib import aioimaplib
from hypothesis import assume, given
from hypothesis import strategies as st

from plexus import __version__, cli
from plexus.endpoint import Endpoint
from plexus.errors import ExitCode, Interrupted, UsageError
from plexus.identity import Identity
from plexus.mediator import MailConfig
from plexus.mediator.dhtnode import DhtConfig
from plexus.options import (
    CONFIG_KEYS,
    HELP_GROUPS,
    TABLE,
    Name,
    Options,
    Setting,
    StunClient,
    read_config,
    session_config,
    streams_config,
)
from plexus.peers import Peer, Roster
from tests.fuzz import FUZZ
from tests.unit.owners import owned_by_another


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def full_options(tmp_path: Path) -> list[str]:
    return [
        "--host-id=remote",
        "--peer-id=local",
        "--stun-server=203.0.113.10",
        "--stun-client=10.0.1.2:5000",
        "--email-smtps=203.0.113.10:465",
        "--email-imaps=203.0.113.10:993",
        "--email-login=l",
        "--email-password=p",
        "--email-from=a@lab.test",
        "--email-to=b@lab.test",
        f"--exec-command={sys.executable}",
    ]


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"], capsys)[:2] == (0, f"plexus {__version__}\n")
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for option in ("--accept", "--email-passwd", "--exec-args", "--punch-hops", "--config", "--explore"):
        assert option in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-such-option"], "No such option"),
        (["--accept"], "no peer to serve"),
        (["--accept", "--peer-id=b"], "missing --exec-command"),
        (["--exec-command=sh", "--peer-id=b"], "missing --stun-server"),
        (["--config=/nonexistent/plexus.conf"], "cannot read --config"),
        (["--log-level=loud"], "--log-level must be one of"),
        (["--exec-command=/nonexistent/cmd", "--peer-id=b"], "does not exist"),
        (["--explore"], "missing --stun-server"),
    ],
)
def test_bad_usage_is_one_line_with_exit_code_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(argv, capsys)
    assert code == ExitCode.USAGE
    assert err.count("\n") == 1 and err.startswith("plexus: ")
    assert message in err


def test_missing_named_files_and_bad_values_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = full_options(tmp_path)
    for extra, message in [
        (["--email-ca=/nonexistent/ca.pem"], "--email-ca /nonexistent/ca.pem: no such file"),
        (["--exec-pwd=/nonexistent"], "no such directory"),
        (["--punch-hops=2.5"], "--punch-hops must be a whole number"),
        (["--punch-hops=0"], "--punch-hops must be a whole number from 1 to 255, not '0'"),
        (["--response-timeout=nan"], "--response-timeout must be a number above 0"),
        (["--handshake-timeout=inf"], "--handshake-timeout must be a number above 0"),
        (["--exec-args='open"], "cannot split --exec-args"),
        ([f"--exec-log-file={tmp_path}/absent/x.log"], "cannot write --exec-log-file"),
        (["--accept", "--keep-sessions"], "--keep-sessions runs sessions side by side"),
        (["--smime-cert=" + sys.executable], "missing --smime-key, --smime-peer"),
        (["--stun-client=nonsense"], "--stun-client: bad endpoint"),
    ]:
        code, _, err = run([*base, *extra], capsys)
        assert (code, err.count("\n")) == (ExitCode.USAGE, 1), err
        assert message in err


def test_config_file_uses_the_option_names(tmp_path: Path) -> None:
    path = tmp_path / "plexus.conf"
    path.write_text(
        "# comment\n[plexus]\naccept\nhost-id = remote\n--peer-id=local\nemail-password = se=cret\n"
        "stun-server = 203.0.113.10\n"
    )
    path.chmod(0o600)  # it holds a password
    values = read_config(path)
    assert {name: setting.value for name, setting in values.items()} == {
        "accept": "true",
        "host-id": "remote",
        "peer-id": "local",
        "email-passwd": "se=cret",
        "stun-server": "203.0.113.10",
    }
    options = Options({"host-id": "override"}, values, path)
    assert options.flag(Name.ACCEPT)
    assert options.require(Name.HOST_ID) == "override"
    assert options.require(Name.EMAIL_PASSWD) == "se=cret"
    assert options.endpoint(Name.STUN_SERVER) == Endpoint("203.0.113.10", 3478)  # its default port


def test_an_option_outside_the_table_is_an_error_not_none() -> None:
    with pytest.raises(ValueError, match="email-pasword"):
        Options({"email-pasword": "typo"})
    with pytest.raises(ValueError, match="email-pasword"):
        Options().get("email-pasword")  # type: ignore[arg-type]


def test_the_table_gives_the_command_line_the_config_keys_and_the_help_groups(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = run(["--help"], capsys)
    for option in TABLE:
        assert f"--{option.name}" in out
        assert option.name in HELP_GROUPS[option.group]
        assert (option.name in CONFIG_KEYS) == option.in_config
        for alias in option.aliases:
            assert f"--{alias}" in out and CONFIG_KEYS[alias] == option.name
    assert set(CONFIG_KEYS.values()) == {o.name for o in TABLE if o.in_config}


def test_config_file_rejects_unknown_names(tmp_path: Path) -> None:
    path = tmp_path / "plexus.conf"
    path.write_text("host-id = a\nemail-pasword = typo\n")
    with pytest.raises(UsageError, match=r"plexus.conf:2: unknown option 'email-pasword'"):
        read_config(path)


def test_session_config_from_a_full_command_line(tmp_path: Path) -> None:
    config = session_config(cli.parse(full_options(tmp_path)))
    assert config.inner == Endpoint("10.0.1.2", 5000)
    assert config.stun_server == Endpoint("203.0.113.10", 3478)
    assert config.punch_hops == 7
    assert isinstance(config.rendezvous, MailConfig)
    assert (config.rendezvous.address, config.rendezvous.peer_address) == ("a@lab.test", "b@lab.test")
    assert config.rendezvous.smime is None


def test_the_dht_rendezvous_needs_identities_and_a_bootstrap_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "id.key"
    peer = Identity.load(tmp_path / "peer.key").id
    base = ["--stun-server=203.0.113.10", f"--exec-command={sys.executable}"]
    ids = [f"--identity={key}", f"--peer-identity={peer}"]
    for extra, message in [
        (["--rendezvous=dht", *ids], "needs --dht-bootstrap"),
        (["--rendezvous=carrier-pigeon"], "--rendezvous must be email or dht"),
        (["--dht-bootstrap=203.0.113.10", f"--peer-identity={peer}"], "missing --identity"),
        (["--dht-bootstrap=203.0.113.10", f"--identity={key}"], "missing --peer-identity"),
        (["--rendezvous=email,dht", *ids], "an inviter meets its peer one way"),
        (["--dht-bootstrap=203.0.113.10", f"--identity={key}"], "missing --peer-identity"),
        (["--dht-bootstrap=203.0.113.10:x", *ids], "--dht-bootstrap"),
        (["--dht-bootstrap=203.0.113.10", *ids, "--dht-network=-1"], "--dht-network must be a whole number"),
    ]:
        code, _, err = run([*base, *extra], capsys)
        assert code == ExitCode.USAGE, (extra, err)
        assert err.count("\n") == 1 and message in err, (extra, err)
    options = Options(
        {"stun-server": "203.0.113.10", "exec-command": sys.executable, "identity": str(key),
         "peer-identity": peer.upper(), "dht-bootstrap": ["203.0.113.10", "203.0.113.11:4300"]},
        {},
    )  # fmt: skip
    config = session_config(options)
    assert isinstance(config.rendezvous, DhtConfig)
    assert config.rendezvous.bootstrap == (Endpoint("203.0.113.10", 4222), Endpoint("203.0.113.11", 4300))
    assert (
        config.rendezvous.peers.peers.only.identity == peer
        and config.rendezvous.host_id == Identity.load(key).id
    )


def write_config(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "plexus.conf"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_config_comments_and_quotes(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "host-id = home   # the server\n"
        'email-passwd = "pa ss # word"  # quoted: the # stays\n'
        "email-login = 'me@example.net'\n"
        "peer-id = a#b\n"
        "accept  # a flag with a comment\n",
    )
    values = {name: setting.value for name, setting in read_config(path).items()}
    assert values == {
        "host-id": "home",
        "email-passwd": "pa ss # word",
        "email-login": "me@example.net",
        "peer-id": "a#b",
        "accept": "true",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host-id = a\nhost-id = b\n", "plexus.conf:2: host-id is already set on line 1"),
        ("email-passwd = 'open\n", "plexus.conf:1: email-passwd: the value's ' quote is not closed"),
        ("email-passwd = 'a' b\n", "plexus.conf:1: email-passwd: unexpected 'b' after the quoted value"),
        ("email-passwd = #secret\n", "plexus.conf:1: email-passwd has no value"),
    ],
)
def test_config_errors_name_the_file_line_and_option(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError) as error:
        read_config(write_config(tmp_path, text))
    assert message in str(error.value)


def test_bad_config_values_name_the_option_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "# mine\naccept = maybe\n")
    code, _, err = run([f"--config={path}"], capsys)
    assert code == ExitCode.USAGE
    assert err == f"plexus: --accept ({path}:2): expected true or false, got 'maybe'\n"
    path = write_config(
        tmp_path, "\n".join(o.removeprefix("--").replace("=", " = ", 1) for o in full_options(tmp_path))
    )
    path.write_text(path.read_text() + "\nresponse-timeout = nan\n")
    code, _, err = run([f"--config={path}"], capsys)
    assert code == ExitCode.USAGE
    assert f"--response-timeout ({path}:12) must be a number above 0" in err


def test_help_groups_the_options_and_lists_examples_and_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for heading in ("Role:", "Rendezvous by mail:", "NAT traversal:", "The command:", "S/MIME", "Logging:"):
        assert heading in out
    assert "plexus --accept --config" in out and "plexus --config /etc/plexus/laptop.conf" in out
    for exit_code in ExitCode:
        assert f"{exit_code.value:>3} {exit_code.name}" in out


def test_examples_prints_the_installed_folder(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--examples"], capsys)
    folder = Path(out.strip())
    assert code == 0 and folder.is_dir()
    assert (folder / "exec.sh").is_file()
    # The repository keeps them in exec/ (plexus/examples links there): --examples names the real folder.
    assert folder == Path(__file__).resolve().parents[2] / "exec"
    assert {path.name for path in folder.iterdir()} >= {
        "exec.sh",
        "exec.bat",
        "plexus-reconnect",
        "plexus-accept@.service",
        "hello.py",
    }
    assert os.access(folder / "exec.sh", os.X_OK) and os.access(folder / "plexus-reconnect", os.X_OK)


def test_failures_doc_lists_every_exit_code() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "failures.md").read_text()
    for exit_code in ExitCode:
        assert f"| {exit_code.value} | {exit_code.name} |" in doc


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, ExitCode.INTERRUPTED), (signal.SIGTERM, ExitCode.TERMINATED)]
)
def test_a_signal_cancels_the_flow_and_ends_it_as_interrupted(signum: int, code: ExitCode) -> None:
    unwound = []

    async def flow() -> None:
        try:
            os.kill(os.getpid(), signum)
            await asyncio.sleep(10)
        finally:
            unwound.append(True)

    with pytest.raises(Interrupted) as error:
        cli.run_until_signal(flow())
    assert (error.value.exit_code, unwound) == (code, [True])


# Bad input found at start (issue 16, item 7): one line naming the option, the file and line, or the variable.


def dht_options(tmp_path: Path) -> list[str]:
    return [
        "--stun-server=203.0.113.10",
        f"--exec-command={sys.executable}",
        "--dht-bootstrap=203.0.113.10",
        f"--identity={tmp_path / 'id.key'}",
        f"--peer-identity={Identity.load(tmp_path / 'peer.key').id}",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dht-network=²"], "--dht-network must be a whole number from 0 to 4294967295, not '²'"),
        (["--dht-network=٣"], "--dht-network must be a whole number from 0 to 4294967295, not '٣'"),
        (["--dht-port=0.5"], "--dht-port must be a whole number from 1 to 65535, not '0.5'"),
        (["--dht-port=4²"], "--dht-port must be a whole number from 1 to 65535, not '4²'"),
        (
            ["--dht-bootstrap=203.0.113.10:²"],
            "--dht-bootstrap: bad endpoint '203.0.113.10:²': port must be 0-65535",
        ),
    ],
)
def test_dht_numbers_take_ascii_digits_only(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run([*dht_options(tmp_path), *extra], capsys)
    assert (code, err) == (ExitCode.USAGE, f"plexus: {message}\n")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stun-server=127.0.0.1:²"], "--stun-server: bad endpoint '127.0.0.1:²': port must be 0-65535"),
        (["--stun-server=[::1]x"], "--stun-server: bad endpoint '[::1]x': expected ':' after ']'"),
        (["--stun-client=10.0.1.2:" + "9" * 5000], "--stun-client: bad endpoint"),
        (["--punch-hops=٣"], "--punch-hops must be a whole number from 1 to 255, not '٣'"),
        (["--punch-hops=1_0"], "--punch-hops must be a whole number from 1 to 255, not '1_0'"),
        (
            ["--response-timeout=1e3"],
            "--response-timeout must be a number above 0 and at most 86400, not '1e3'",
        ),
        (
            ["--handshake-timeout=-5"],
            "--handshake-timeout must be a number above 0 and at most 86400, not '-5'",
        ),
        (["--exec-command=/tmp"], "--exec-command /tmp is a directory, not a program"),
        (["--exec-command=tmp"], "--exec-command tmp is not found in PATH"),  # PATH=/: /tmp is a folder
    ],
)
def test_bad_values_are_found_at_start(
    tmp_path: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/")
    code, _, err = run([*full_options(tmp_path), *extra], capsys)
    assert (code, err.count("\n")) == (ExitCode.USAGE, 1), err
    assert err.startswith(f"plexus: {message}"), err


@pytest.mark.parametrize("value", ["abc", "²", "0", "nan", ""])
def test_a_bad_handshake_timeout_variable_is_named(
    tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLEXUS_HANDSHAKE_TIMEOUT", value)
    code, _, err = run(full_options(tmp_path), capsys)
    assert (code, err) == (
        ExitCode.USAGE,
        f"plexus: PLEXUS_HANDSHAKE_TIMEOUT must be a number above 0 and at most 86400, not {value!r}\n",
    )
    monkeypatch.setenv("PLEXUS_HANDSHAKE_TIMEOUT", "2.5")
    config = session_config(Options({}, read_config(write_config(tmp_path, config_text(tmp_path)))))
    assert config.handshake_timeout == 2.5


def config_text(tmp_path: Path) -> str:
    return "".join(f"{o.removeprefix('--').replace('=', ' = ', 1)}\n" for o in full_options(tmp_path))


def test_a_config_file_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "plexus.conf"
    path.write_text(config_text(tmp_path), encoding="utf-8-sig")  # as Windows' Notepad saves it
    path.chmod(0o600)
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    values = read_config(path)
    assert values["host-id"] == Setting("remote", 1)
    assert session_config(Options({}, values, path)).rendezvous.host_id == "remote"


def test_a_config_file_in_another_encoding_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, "")
    path.write_bytes("host-id = caf\xe9\n".encode("latin-1"))
    code, _, err = run([f"--config={path}"], capsys)
    assert (code, err) == (ExitCode.USAGE, f"plexus: cannot read --config {path}: not a UTF-8 text file\n")


def forward_options(tmp_path: Path, forward: str) -> list[str]:
    return [*full_options(tmp_path)[:-1], f"--forward={forward}", "--anonymous"]


@pytest.mark.parametrize(
    ("forward", "message"),
    [
        ("999.1.1.1:8080:127.0.0.1:22", "--forward 999.1.1.1:8080: 999.1.1.1 is not an IP address"),
        ("127.1:8080:127.0.0.1:22", "--forward 127.1:8080: 127.1 is not an IP address"),
        ("192.0.2.1:8080:127.0.0.1:22", "cannot listen on --forward 192.0.2.1:8080: Cannot assign requested"),
        (
            "[::ffff:1.2.3.4.5]:8080:h:22",
            "--forward [::ffff:1.2.3.4.5]:8080: ::ffff:1.2.3.4.5 is not an IP address",
        ),
    ],
)
def test_a_bad_forward_bind_address_is_found_at_start(
    tmp_path: Path, forward: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(forward_options(tmp_path, forward), capsys)
    assert (code, err.count("\n")) == (ExitCode.USAGE, 1), err
    assert err.startswith(f"plexus: {message}"), err


def test_a_forward_bind_name_that_does_not_resolve_is_found_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []

    def no_such_name(host: str, *args: object, **kwargs: object) -> object:
        asked.append(host)  # no DNS query leaves the test
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    code, _, err = run(forward_options(tmp_path, "nowhere.invalid:8080:127.0.0.1:22"), capsys)
    assert (code, asked) == (ExitCode.USAGE, ["nowhere.invalid"])
    assert err == (
        "plexus: --forward nowhere.invalid:8080: cannot resolve nowhere.invalid: Name or service not known\n"
    )


def test_a_forward_port_in_use_is_found_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(forward_options(tmp_path, f"{port}:127.0.0.1:22"), capsys)
    assert (code, err) == (
        ExitCode.USAGE,
        f"plexus: cannot listen on --forward 127.0.0.1:{port}: Address already in use\n",
    )
    options = Options({"forward": [f"{port}:127.0.0.1:22"], "anonymous": True}, {})
    roster = Roster.of(Peer("b", "b"))
    assert streams_config(options, None, roster) is not None  # free again: the check left nothing bound


def test_help_and_an_unreadable_config_read_well(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and max(map(len, out.splitlines())) <= 110
    code, _, err = run([f"--config={tmp_path}"], capsys)
    assert (code, err) == (ExitCode.USAGE, f"plexus: cannot read --config {tmp_path}: Is a directory\n")


# Secrets (issue 16, item 8): what plexus reads must be private as ssh wants a key, what it writes is.


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging replaces the root logger's handlers: put pytest's back, close the ones a test made."""
    root, imap = logging.getLogger(), logging.getLogger("aioimaplib")
    handlers, levels = root.handlers[:], (root.level, imap.level)
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    imap.setLevel(levels[1])


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("restore_logging")
def test_a_new_log_file_is_private_and_an_existing_one_keeps_its_mode_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "plexus.log"
    code, _, _ = run([f"--log-file={log_file}", "--accept"], capsys)
    assert (code, mode_of(log_file)) == (ExitCode.USAGE, 0o600)
    assert "exit 2: no peer to serve" in log_file.read_text()
    log_file.chmod(0o644)
    run([f"--log-file={log_file}", "--accept"], capsys)
    assert mode_of(log_file) == 0o644
    warning = f"--log-file {log_file} is readable by group or others (mode 0644): chmod 600 {log_file}"
    assert warning in log_file.read_text()


@pytest.mark.usefixtures("restore_logging")
def test_a_new_exec_log_file_is_private(tmp_path: Path) -> None:
    exec_log = tmp_path / "command.log"
    options = [*full_options(tmp_path), f"--exec-log-file={exec_log}"]
    session_config(cli.parse(options))
    assert mode_of(exec_log) == 0o600


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("email-passwd = secret\n", 0o644, "holds a password and is readable by group or others (mode 0644)"),
        (
            "turn-password = secret\n",
            0o640,
            "holds a password and is readable by group or others (mode 0640)",
        ),
        ("host-id = home\n", 0o664, "is writable by group or others (mode 0664)"),
        ("host-id = home\n", 0o602, "is writable by group or others (mode 0602)"),
    ],
)
def test_a_config_file_others_can_change_or_read_its_password_from_is_refused(
    tmp_path: Path, text: str, mode: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It names the command plexus runs, as root under systemd; a password in it is the mailbox's.
    path = write_config(tmp_path, text, mode)
    code, _, err = run([f"--config={path}"], capsys)
    assert (code, err) == (ExitCode.USAGE, f"plexus: --config {path} {message}: chmod 600 {path}\n")


def test_a_config_file_without_a_password_may_be_readable(tmp_path: Path) -> None:
    path = write_config(tmp_path, "host-id = home\n", 0o644)
    assert read_config(path)["host-id"].value == "home"


def test_a_config_file_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, "host-id = home\n")
    owner = owned_by_another(path, monkeypatch)
    with pytest.raises(UsageError, match=rf"^--config {path} belongs to another user \(uid {owner}\)"):
        read_config(path)


@pytest.mark.parametrize("name", ["email-key", "smime-key"])
def test_a_private_key_others_can_read_is_refused(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o644)
    others = (
        [f"--smime-cert={sys.executable}", f"--smime-peer={sys.executable}"] if name == "smime-key" else []
    )
    code, _, err = run([*full_options(tmp_path), *others, f"--{name}={key}"], capsys)
    assert (code, err) == (
        ExitCode.USAGE,
        f"plexus: --{name} {key} holds a private key and is readable by group or others (mode 0644): "
        f"chmod 600 {key}\n",
    )


# Quoted and escaped by IMAP (\" and \\), then shown by aioimaplib as a bytes repr (\\\" and \\\\\\\\).
PASSWORD = "pa\"ss\\wo'rd"


def imap_login_logged(password: str) -> None:
    """aioimaplib's own LOGIN line, logged as it does at debug level, with its own scrubbing."""

    async def send() -> None:
        protocol = aioimaplib.IMAP4ClientProtocol(asyncio.get_running_loop())
        protocol.transport = mock.Mock()
        login = aioimaplib.Command("LOGIN", "A001", "me", aioimaplib.quoted(password))
        protocol.send(str(login), scrub=password)

    asyncio.run(send())


@pytest.mark.parametrize("to_file", [True, False])
@pytest.mark.usefixtures("restore_logging")
def test_no_password_reaches_the_log_in_any_quoting(
    tmp_path: Path, to_file: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "plexus.log"
    turn = "tu\\rn'pass\"word"
    options = {"log-level": "trace", "email-login": "me", "email-passwd": PASSWORD, "turn-passwd": turn}
    cli.setup_logging(Options(options | ({"log-file": str(log_file)} if to_file else {}), {}))
    imap_login_logged(PASSWORD)
    logger = logging.getLogger("plexus.test")
    logger.debug("as given %s, in a repr %r, as JSON %s", PASSWORD, PASSWORD, json.dumps(PASSWORD))
    logger.debug("bytes %r, TURN %s %r", PASSWORD.encode(), turn, {"password": turn})
    plain = base64.b64encode(f"\0me\0{PASSWORD}".encode()).decode()
    logger.debug("AUTH PLAIN %s, AUTH LOGIN %s", plain, base64.b64encode(PASSWORD.encode()).decode())
    try:
        raise ValueError(f"login {PASSWORD!r} refused")
    except ValueError:
        logger.debug("failure", exc_info=True)
    text = log_file.read_text() if to_file else capsys.readouterr().err
    assert "ValueError: login '***' refused" in text
    for secret in (PASSWORD, turn):
        for form in cli._forms(secret, "me"):
            assert form not in text, (form, text)
    for line in (
        """aioimaplib.aioimaplib: Sending : b'A001 LOGIN me "***"\\r\\n'""",
        """plexus.test: as given ***, in a repr '***', as JSON "***"\n""",
        "plexus.test: bytes b'***', TURN *** {'password': '***'}",
        "plexus.test: AUTH PLAIN ***, AUTH LOGIN ***",
    ):
        assert line in text, text
    # What aioimaplib logs without the filter: its scrubbing looked for the password as given, found nothing.
    unfiltered = repr(f"A001 LOGIN me {aioimaplib.quoted(PASSWORD)}\r\n".encode())
    assert "*" not in unfiltered and "wo\\'rd" in unfiltered


@pytest.mark.usefixtures("restore_logging")
def test_an_unexpected_error_s_line_is_redacted_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.setup_logging(Options({"email-passwd": PASSWORD}, {}))
    with pytest.raises(SystemExit):
        cli._fail(f"unexpected error: cannot log in with {PASSWORD}", ExitCode.ERROR)
    assert capsys.readouterr().err == "plexus: unexpected error: cannot log in with ***\n"


def test_a_short_password_is_not_redacted_out_of_every_word() -> None:
    assert cli.Redactor(Options({"email-passwd": "p"}, {})).redact("plexus: stopped") == "plexus: stopped"


@FUZZ
@given(st.text(min_size=cli.MIN_REDACTED), st.sampled_from(["me", "me@example.net", ""]))
def test_aioimaplibs_login_line_never_shows_the_password(password: str, login: str) -> None:
    """Whatever the password: as aioimaplib logs its LOGIN line (IMAP-quoted, a bytes repr), none of it
    is left once redacted. (aioimaplib refuses NUL, CR and LF in arguments: no LOGIN line for those.)"""
    assume(not re.search("[\0\r\n]", password))
    data = f"A001 LOGIN {login or 'x'} {aioimaplib.quoted(password)}\r\n".encode()
    redactor = cli.Redactor(Options({"email-passwd": password, "email-login": login}, {}))
    line = redactor.redact(f"Sending : {data!r}")
    assert repr(aioimaplib.quoted(password).encode())[2:-1] not in line
    assert "***" in line


# What a network session needs and --version or --help must not load (issue 17: they start in a fraction of
# the time, and a broken network library cannot break them).
NETWORK_LIBRARIES = (
    "aiosmtplib", "aioimaplib", "aioice", "aioquic", "opendht", "cryptography", "uvloop", "asyncio", "ssl",
    "plexus.session", "plexus.mediator.email", "plexus.mediator.dhtnode", "plexus.streams",
)  # fmt: skip
LOADED = """
import sys
from plexus import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print("\\n".join(sys.modules))
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["--examples"]])
def test_version_and_help_load_no_network_library(argv: list[str]) -> None:
    found = subprocess.run(
        [sys.executable, "-c", LOADED, *argv], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    loaded = {
        name for name in found if name.partition(".")[0] in NETWORK_LIBRARIES or name in NETWORK_LIBRARIES
    }
    assert not loaded, f"{' '.join(argv)} loads {sorted(loaded)}"
    if argv != ["--help"]:  # answered before the command line is parsed at all
        assert "typer" not in found


@pytest.mark.parametrize(
    ("value", "server", "transport"),
    [
        ("203.0.113.10", Endpoint("203.0.113.10", 3478), "udp"),
        ("turn.example:3479", Endpoint("turn.example", 3479), "udp"),
        ("turn:3478", Endpoint("turn", 3478), "udp"),  # a host called turn, as plexus 2.2 read it
        ("turn:turn.example", Endpoint("turn.example", 3478), "udp"),
        ("turn:turn.example?transport=udp", Endpoint("turn.example", 3478), "udp"),
        ("TURN:turn.example:80?transport=TCP", Endpoint("turn.example", 80), "tcp"),
        ("turns:turn.example", Endpoint("turn.example", 5349), "tls"),
        ("turns:turn.example:443?transport=tcp", Endpoint("turn.example", 443), "tls"),
        ("turns:[2001:db8::1]", Endpoint("2001:db8::1", 5349), "tls"),
    ],
)
def test_turn_server_takes_rfc_7065_uris(
    tmp_path: Path, value: str, server: Endpoint, transport: str
) -> None:
    options = [*full_options(tmp_path), f"--turn-server={value}", "--turn-user=u", "--turn-passwd=p"]
    turn = session_config(cli.parse(options)).turn
    assert turn is not None and (turn.server, turn.transport, turn.ca) == (server, transport, None)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "turn:host?transport=sctp",
            "--turn-server: 'turn:host?transport=sctp': the only query is ?transport=",
        ),
        ("turns:host?transport=udp", "turns: over UDP (DTLS) is not supported"),
        ("turn://host", "a TURN URI has no //"),
        ("turn:host:99999", "--turn-server: bad endpoint 'host:99999': port must be 0-65535"),
        ("turns:", "--turn-server: bad endpoint '': no host"),
    ],
)
def test_a_bad_turn_uri_is_one_usage_line(
    tmp_path: Path, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    options = [*full_options(tmp_path), f"--turn-server={value}", "--turn-user=u", "--turn-passwd=p"]
    code, _, err = run(options, capsys)
    assert (code, err.count("\n")) == (ExitCode.USAGE, 1), err
    assert message in err, err


def test_turn_ca_is_for_turns_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    options = [*full_options(tmp_path), "--turn-user=u", "--turn-passwd=p", f"--turn-ca={ca}"]
    turn = session_config(cli.parse([*options, "--turn-server=turns:h"])).turn
    assert turn is not None and turn.ca == ca and str(turn) == "turns:h:5349"
    code, _, err = run([*options, "--turn-server=turn:h?transport=tcp"], capsys)
    assert (code, err) == (ExitCode.USAGE, "plexus: --turn-ca is for a turns: server (TLS), not TCP\n")


def test_configs_and_tunnels_do_not_show_their_secrets() -> None:
    """A config or tunnel printed or logged (a library caller's f-string, a traceback's locals) shows neither
    the passwords nor the shared secret."""
    from plexus.launcher import Tunnel
    from plexus.mediator.email import MailConfig
    from plexus.paths import TurnConfig

    server = Endpoint("203.0.113.10", 3478)
    shown = [
        repr(TurnConfig(server, "user", "turn-password-1")),
        repr(MailConfig(server, server, "me", "mail-password-2", "a@x", "b@x", "a", Roster.of(Peer("b")))),
        repr(Tunnel(server, server, server, 1234567890123, "direct")),
    ]
    for text in shown:
        assert not any(secret in text for secret in ("turn-password-1", "mail-password-2", "1234567890123"))


@pytest.mark.parametrize(
    ("text", "v4", "v6"),
    [
        ("5000", Endpoint("0.0.0.0", 5000), Endpoint("::", 5000)),  # both families, every address
        ("10.0.1.2:5000", Endpoint("10.0.1.2", 5000), None),  # IPv4 only, as plexus 2.2 took it
        ("[2001:db8:a::2]:5000", Endpoint("0.0.0.0", 5000), Endpoint("2001:db8:a::2", 5000)),
        ("10.0.1.2:5000,[::]:6000", Endpoint("10.0.1.2", 5000), Endpoint("::", 6000)),
        (" [::]:0 , 0.0.0.0:0 ", Endpoint("0.0.0.0", 0), Endpoint("::", 0)),
    ],
)
def test_stun_client_takes_either_family_or_both(text: str, v4: Endpoint, v6: Endpoint | None) -> None:
    assert StunClient().parse(text, "--stun-client") == (v4, v6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.1.2:5000,10.0.1.3:5000", "at most one IPv4 and one IPv6 endpoint"),
        ("[::]:1,[::]:2", "at most one IPv4 and one IPv6 endpoint"),
        ("[::g]:5000", "'::g' is not an IPv6 address"),
        ("70000", "port must be 0-65535"),
        ("10.0.1.2:5000,", "bad endpoint ''"),
    ],
)
def test_a_bad_stun_client_says_what_it_takes(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        StunClient().parse(text, "--stun-client")


# An acceptor's peers


def acceptor_options(tmp_path: Path, *extra: str) -> list[str]:
    """An acceptor's command line without its peers, and without --stun-client's fixed port."""
    options = [
        option for option in full_options(tmp_path) if not option.startswith(("--peer-id", "--stun-c"))
    ]
    return ["--accept", *options, *extra]


def test_an_acceptor_serves_each_peer_given(tmp_path: Path) -> None:
    pinned = Identity.load(tmp_path / "peer.key").id
    argv = acceptor_options(tmp_path, "--peer-id=a", "--peer-id=b", f"--peer-identity={pinned}")
    config = session_config(cli.parse(argv))
    assert config.rendezvous.peers.peers.known == (
        Peer("a", id="a"),
        Peer("b", id="b"),
        Peer(pinned, identity=pinned),
    )


def test_email_and_dht_at_once_share_one_roster(tmp_path: Path) -> None:
    peers = tmp_path / "peers"
    peers.write_text(f"{Identity.load(tmp_path / 'peer.key').id} phone\n")
    argv = acceptor_options(
        tmp_path,
        "--rendezvous=email,dht",
        "--peer-id=laptop",
        f"--peers={peers}",
        "--dht-bootstrap=203.0.113.10",
        f"--identity={tmp_path / 'id.key'}",
    )
    config = session_config(cli.parse(argv))
    (also,) = config.rendezvous_also
    assert isinstance(config.rendezvous, MailConfig) and isinstance(also, DhtConfig)
    assert config.rendezvous.peers is also.peers and also.peers.peers.names == ("laptop", "phone")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--accept", "--peer-id=a", "--peer-id=b", "--stun-client=10.0.1.2:5000"],
            "several peers' sessions",
        ),
        (
            ["--accept", "--peer-id=a", "--peers=PEERS", "--stun-client=10.0.1.2:5000"],
            "several peers' sessions",
        ),
        (["--peer-id=a", "--peer-id=b"], "--peer-id: an inviter has one peer, not 2"),
        (["--peer-id=a", "--peers=PEERS"], "--peers lists the peers an acceptor serves"),
        (
            [
                "--accept",
                "--peer-id=a",
                "--peer-id=b",
                "--smime-cert=PEERS",
                "--smime-key=PEERS",
                "--smime-peer=PEERS",
            ],
            "S/MIME pins one peer's certificate",
        ),
        (["--accept", "--peers=PEERS"], "peers: two peers with the name 'x'"),
    ],
)
def test_what_several_peers_cannot_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    peers = tmp_path / "peers"
    peers.write_text("x x\nx2 x\n" if "--peer-id=a" not in extra else "b b\n")
    peers.chmod(0o600)  # it stands for --smime-key's file too
    base = [option for option in full_options(tmp_path) if not option.startswith(("--peer-id", "--stun-c"))]
    code, _, err = run([*base, *(word.replace("PEERS", str(peers)) for word in extra)], capsys)
    assert code == ExitCode.USAGE, err
    assert err.count("\n") == 1 and re.search(message, err), err
