"""The typer command of plexus.cli, built from the table of options (plexus.options): one keyword of run()
per option, the help in the table's groups with examples and the exit codes. Loaded only when the command
line is parsed: `plexus --version` alone never loads typer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer
import typer.core
from typer import _click as click  # typer (pinned) carries its own click; help formatting is typed there
from typer import _coercion

from plexus.errors import MEANINGS
from plexus.options import HELP_GROUPS, TABLE, Kind, Name, Option


def _eager(answer: Callable[[], str]) -> Callable[[bool], None]:
    """--version or --examples: print the answer and exit, whatever else is given."""

    def callback(value: bool) -> None:
        if value:
            print(answer())
            raise typer.Exit()

    return callback


_TYPES: dict[Kind, tuple[Any, Any]] = {
    Kind.FLAG: (bool, False),
    Kind.VALUE: (str | None, None),
    Kind.LIST: (list[str] | None, None),
}


def _parameter(option: Option, answers: Mapping[str, Callable[[], str]]) -> inspect.Parameter:
    """The typer parameter of one option of the table: a keyword of run()."""
    # Eager, the options with an answer: they print and exit before the others are looked at.
    callback = _eager(answer) if (answer := answers.get(f"--{option.name}")) else None
    names = (f"--{option.name}", *(f"--{alias}" for alias in option.aliases))
    info = typer.Option(
        *names, metavar=option.metavar, help=option.help, callback=callback, is_eager=callback is not None
    )
    annotation, default = _TYPES[option.kind]
    return inspect.Parameter(
        option.name.replace("-", "_"),
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, info],
    )


HELP_EPILOG = """\
Examples:
  The host to reach serves requests until stopped (systemd unit: --examples):
    plexus --accept --config /etc/plexus/home.conf
  The laptop connects once, launches the command and exits (from cron:
  plexus-reconnect in --examples):
    plexus --config /etc/plexus/laptop.conf
  ssh to the home host through plexus (the host: --accept --forward-allow
  127.0.0.1:22 --identity=FILE --peer-identity=ID):
    ssh -o ProxyCommand='plexus --config laptop.conf --stdio=127.0.0.1:22' home
  Does this network's NAT allow hole punching?
    plexus --explore --stun-server=stun.example.net

A config file holds `name = value` lines with these option names (no --),
`#` comments, and values that may be quoted; the command line wins. A new
session replaces the previous one's command (its process group is stopped
before the inner port is bound) unless --keep-sessions is given.

Exit codes:
"""


class _Given(_coercion.RuntimeParam):
    """typer's coercion of a value, without pydantic for the values the table's options take.

    typer (pinned) checks every option's value with a pydantic TypeAdapter, built for each option on its
    first parse even for a value it then passes over (None): importing pydantic and building ~50 adapters took
    60 ms of each start. click's parser has made the value already: a str (a list of them for a repeatable
    option) or, for a flag, a bool, which typer's adapters return as they are (a list as a new list); so does
    this. Anything else goes to typer's own coercion, adapters and all."""

    def _coerce_value(self, value: Any, param: typer.core._TyperParameter, ctx: click.Context) -> Any:
        annotation = self.annotation
        if (annotation is str and isinstance(value, str)) or (annotation is bool and isinstance(value, bool)):
            return value
        if (
            annotation == list[str]
            and isinstance(value, list | tuple)
            and all(isinstance(v, str) for v in value)
        ):
            return list(value)
        return _coercion.build_runtime_param(param.type_descriptor).coerce(value, param=param, ctx=ctx)


def plain_coercion(params: list[click.Parameter]) -> None:
    """Give each of typer's parameters not coerced yet the coercion of _Given."""
    for param in params:
        if isinstance(param, typer.core._TyperParameter) and param._runtime_param is None:
            descriptor = param.type_descriptor
            param._runtime_param = _Given(descriptor.parameter_info, descriptor.annotation)


class GroupedCommand(typer.core.TyperCommand):
    """Help with the options in groups, examples per role and the exit codes; click's plain layout. Its
    options' values are coerced by _Given."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)  # --help among them
        plain_coercion(params)
        return params

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {
            opt[2:]: record
            for param in self.get_params(ctx)
            if (record := param.get_help_record(ctx)) is not None
            for opt in param.opts
            if opt.startswith("--")
        }
        for title, names in HELP_GROUPS.items():
            with formatter.section(title):
                formatter.write_dl([records[name] for name in names])

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write("\n" + HELP_EPILOG.removeprefix("\\\n"))
        formatter.write_dl([(f"{code.value:>3} {code.name}", meaning) for code, meaning in MEANINGS.items()])


def command(run: Callable[..., None], answers: Mapping[str, Callable[[], str]]) -> click.Command:
    """run() as a click command whose options are the table's (--help is click's own); `answers` give what
    --version and --examples print."""
    run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [_parameter(option, answers) for option in TABLE if option.name is not Name.HELP]
    )
    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command(cls=GroupedCommand, context_settings={"help_option_names": ["--help", "-h"]})(run)
    return typer.main.get_command(app)
