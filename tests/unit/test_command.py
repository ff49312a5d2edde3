"""The typer command built from the table (plexus/command.py): its values are typer's own, coerced without
pydantic (issue 17: typer's adapters cost 60 ms of each start)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus import cli, command
from plexus.options import TABLE, Kind, Name

OPTIONS = [option for option in TABLE if option.name not in (Name.HELP, Name.VERSION, Name.EXAMPLES)]


def parsed(argv: list[str]) -> dict[str, Any] | str:
    """What run() would be given for `argv`, or the usage error's message."""
    try:
        with command.command(cli.run, cli.QUICK).make_context(
            "plexus", list(argv)
        ) as context:  # it eats argv
            return dict(context.params)
    except Exception as error:  # typer's usage errors
        return f"{type(error).__name__}: {error}"


def by_typer(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any] | str:
    """The same, coerced by typer's own pydantic adapters."""
    with monkeypatch.context() as patch:
        patch.setattr(command, "plain_coercion", lambda params: None)
        return parsed(argv)


def test_a_command_line_is_parsed_without_pydantic() -> None:
    code = (
        "import sys; from plexus import cli; "
        "cli.parse(['--dht-bootstrap=127.0.0.1', '--dht-bootstrap=192.0.2.1:4222', "
        "'--stun-server=127.0.0.1', '--exec-command=/bin/true', '--keep-sessions']); "
        "print('pydantic' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False"]


def test_the_values_are_typers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [
        "--accept",
        "--stun-server=203.0.113.10",
        "--forward-allow=127.0.0.1:22",
        "--forward-allow=[::1]:80",
    ]
    values = parsed(argv)
    assert isinstance(values, dict)
    assert values["accept"] is True and values["keep_sessions"] is False
    assert values["stun_server"] == "203.0.113.10" and values["host_id"] is None
    assert values["forward_allow"] == ["127.0.0.1:22", "[::1]:80"] and values["forward"] == ()
    assert values == by_typer(argv, monkeypatch)


def _argument(option: Any) -> st.SearchStrategy[list[str]]:
    flag = f"--{option.name}"
    if option.kind is Kind.FLAG:
        return st.sampled_from([[flag], [flag, flag], [f"{flag}=yes"]])
    values = st.text(max_size=12).map(lambda text: [f"{flag}={text}"])
    if option.kind is Kind.LIST:
        return st.lists(values, min_size=1, max_size=3).map(
            lambda parts: [word for part in parts for word in part]
        )
    return values | st.just([flag])  # a value missing at the end of the line


command_lines = st.lists(st.sampled_from(OPTIONS).flatmap(_argument), max_size=6).map(
    lambda parts: [word for part in parts for word in part]
)


# Not FUZZ: a command line is the user's, not hostile input, and each example builds typer's adapters anew.
@settings(max_examples=300, deadline=None)
@given(command_lines)
def test_any_command_line_parses_as_typer_itself_parses_it(argv: list[str]) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        ours, theirs = parsed(argv), by_typer(argv, monkeypatch)
    assert ours == theirs
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert [type(value) for value in ours.values()] == [type(value) for value in theirs.values()]
