"""The command line's contract: one-line errors with distinct exit codes, 2.2's option names, --config."""

import sys
from pathlib import Path

import pytest

from plexus import __version__, cli
from plexus.endpoint import Endpoint
from plexus.errors import ExitCode, UsageError


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
        (["--accept"], "missing --exec-command"),
        (["--exec-command=sh"], "missing --stun-server"),
        (["--config=/nonexistent/plexus.conf"], "cannot read --config"),
        (["--log-level=loud"], "--log-level must be one of"),
        (["--exec-command=/nonexistent/cmd"], "does not exist"),
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
        (["--punch-hops=0"], "--punch-hops must be positive"),
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
    values = cli.read_config(path)
    assert values == {
        "accept": "true",
        "host-id": "remote",
        "peer-id": "local",
        "email-passwd": "se=cret",
        "stun-server": "203.0.113.10",
    }
    options = cli.Options({"host_id": "override"}, values)
    assert options.flag("accept")
    assert options.require("host-id") == "override"
    assert options.require("email-passwd") == "se=cret"
    assert options.endpoint("stun-server", 3478) == Endpoint("203.0.113.10", 3478)


def test_config_file_rejects_unknown_names(tmp_path: Path) -> None:
    path = tmp_path / "plexus.conf"
    path.write_text("host-id = a\nemail-pasword = typo\n")
    with pytest.raises(UsageError, match=r"plexus.conf:2: unknown option 'email-pasword'"):
        cli.read_config(path)


def test_session_config_from_a_full_command_line(tmp_path: Path) -> None:
    options = cli.Options(
        {},
        {name.removeprefix("--").split("=")[0]: name.split("=", 1)[1] for name in full_options(tmp_path)}
        | {"email-passwd": "p"},
    )
    config = cli.session_config(options)
    assert config.inner == Endpoint("10.0.1.2", 5000)
    assert config.stun_server == Endpoint("203.0.113.10", 3478)
    assert config.punch_hops == 7
    assert (config.mail.address, config.mail.peer_address) == ("a@lab.test", "b@lab.test")
    assert config.mail.smime is None
