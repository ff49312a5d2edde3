"""The plexus command line, compatible with plexus 2.2's option names, plus --explore.

Every failure ends here as one line on stderr and a distinct exit code (plexus.errors.ExitCode); typer/click
parse the options, but their multi-line usage boxes are replaced by that one line too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from plexus import __version__, launcher, session, stun
from plexus.endpoint import Endpoint
from plexus.errors import ExitCode, PlexusError, UsageError
from plexus.mediator import MailConfig, SmimeConfig

log = logging.getLogger("plexus")

LOG_LEVELS = {
    "fatal": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG - 5,
}
STUN_PORT = 3478
ALIASES = {"email-password": "email-passwd"}

app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)


def read_config(path: Path) -> dict[str, str]:
    """plexus 2.2's config file: `name = value` lines with the command line's option names, `#` comments.

    A bare name (or name=true/yes/1) sets a flag; [sections] are accepted and ignored, as 2.2 has none.
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise UsageError(f"cannot read --config {path}: {error.strerror}") from error
    values: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        name, sep, value = line.partition("=")
        name = name.strip().removeprefix("--")
        name = ALIASES.get(name, name)
        if name not in OPTION_NAMES:
            raise UsageError(f"{path}:{number}: unknown option {name!r}")
        values[name] = value.strip() if sep else "true"
    return values


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"expected true or false, got {value!r}")


class Options:
    """Command-line values over config-file values; every lookup says which option was missing."""

    def __init__(self, given: dict[str, Any], config: dict[str, str]) -> None:
        self._given = given
        self._config = config

    def get(self, name: str) -> str | None:
        value = self._given.get(name.replace("-", "_"))
        if value is None or value is False:
            return self._config.get(name)
        return str(value)

    def flag(self, name: str) -> bool:
        return bool(self._given.get(name.replace("-", "_"))) or _flag(self._config.get(name, "false"))

    def require(self, name: str) -> str:
        value = self.get(name)
        if not value:
            raise UsageError(f"missing --{name} (give it on the command line or in --config)")
        return value

    def endpoint(self, name: str, default_port: int | None = None) -> Endpoint:
        try:
            return Endpoint.parse(self.require(name), default_port)
        except ValueError as error:
            raise UsageError(f"--{name}: {error}") from error

    def path(self, name: str, *, directory: bool = False) -> Path | None:
        value = self.get(name)
        if value is None:
            return None
        path = Path(value).expanduser()
        if not (path.is_dir() if directory else path.is_file()):
            raise UsageError(f"--{name} {value}: no such {'directory' if directory else 'file'}")
        return path

    def number(self, name: str, default: float) -> float:
        value = self.get(name)
        try:
            number = float(value) if value is not None else float(default)
        except ValueError as error:
            raise UsageError(f"--{name}: expected a number, got {value!r}") from error
        if number <= 0:
            raise UsageError(f"--{name} must be positive")
        return number


def smime_config(options: Options) -> SmimeConfig | None:
    names = ("smime-cert", "smime-key", "smime-peer")
    paths = [options.path(name) for name in names]
    if not any(paths):
        return None
    if not all(paths):
        missing = ", ".join(f"--{n}" for n, p in zip(names, paths, strict=True) if p is None)
        raise UsageError(f"S/MIME needs --smime-cert, --smime-key and --smime-peer; missing {missing}")
    cert, key, peer = paths
    assert cert and key and peer
    return SmimeConfig(cert=cert, key=key, peer=peer, ca=options.path("smime-ca"))


def mail_config(options: Options) -> MailConfig:
    address = options.require("email-from")
    return MailConfig(
        smtp=options.endpoint("email-smtps"),
        imap=options.endpoint("email-imaps"),
        login=options.require("email-login"),
        password=options.require("email-passwd"),
        address=address,
        # One shared mailbox is the common setup: --email-to defaults to the host's own address.
        peer_address=options.get("email-to") or address,
        host_id=options.require("host-id"),
        peer_id=options.require("peer-id"),
        ca=options.path("email-ca"),
        cert=options.path("email-cert"),
        key=options.path("email-key"),
        smime=smime_config(options),
    )


def session_config(options: Options) -> session.SessionConfig:
    hops = options.number("punch-hops", 7)
    if not hops.is_integer() or not 1 <= hops <= 255:
        raise UsageError("--punch-hops must be a whole number from 1 to 255")
    command = launcher.Command(
        path=options.require("exec-command"),
        args=options.get("exec-args"),
        pwd=options.path("exec-pwd", directory=True),
        log_file=Path(p) if (p := options.get("exec-log-file")) else None,
    )
    launcher.check_executable(command.path)
    inner = options.get("stun-client")
    return session.SessionConfig(
        inner=options.endpoint("stun-client") if inner else Endpoint("0.0.0.0", 0),
        stun_server=options.endpoint("stun-server", STUN_PORT),
        mail=mail_config(options),
        command=command,
        punch_hops=int(hops),
        response_timeout=options.number("response-timeout", 60),
        handshake_timeout=options.number(
            "handshake-timeout", float(os.environ.get("PLEXUS_HANDSHAKE_TIMEOUT", "60"))
        ),
    )


def setup_logging(options: Options) -> None:
    level_name = (options.get("log-level") or "info").lower()
    if level_name not in LOG_LEVELS:
        raise UsageError(f"--log-level must be one of {'|'.join(LOG_LEVELS)}")
    logging.addLevelName(LOG_LEVELS["trace"], "TRACE")
    log_file = options.get("log-file")
    try:
        handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    except OSError as error:
        raise UsageError(f"cannot open --log-file {log_file}: {error.strerror}") from error
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[level_name])
    # aioimaplib reports every untagged line it skips at INFO: that is protocol chatter, shown only at trace.
    chatter = LOG_LEVELS["trace"] if level_name == "trace" else max(LOG_LEVELS[level_name], logging.WARNING)
    logging.getLogger("aioimaplib").setLevel(chatter)


async def explore(options: Options, as_json: bool) -> None:
    inner = options.get("stun-client")
    sock = session.bind(options.endpoint("stun-client") if inner else Endpoint("0.0.0.0", 0))
    with sock:
        report = await stun.explore(sock, options.endpoint("stun-server", STUN_PORT))
    print(json.dumps(report.to_json()) if as_json else report.render())


def _version(value: bool) -> None:
    if value:
        print(f"plexus {__version__}")
        raise typer.Exit()


def _option(metavar: str, help: str, *names: str) -> Any:
    return typer.Option(*names, metavar=metavar, help=help)


Value = str | None


@app.command(context_settings={"help_option_names": ["--help", "-h"]})
def run(
    accept: Annotated[
        bool, typer.Option("--accept", help="Serve requests forever (the remote host).")
    ] = False,
    explore_: Annotated[
        bool, typer.Option("--explore", help="Print the NAT's behaviour as STUN shows it, then exit.")
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="With --explore: one JSON object.")] = False,
    host_id: Annotated[Value, _option("ID", "This host's id: the subject of its mail.")] = None,
    peer_id: Annotated[Value, _option("ID", "The peer's id: the subject plexus waits for.")] = None,
    stun_server: Annotated[Value, _option("HOST[:PORT]", "STUN server (port 3478 by default).")] = None,
    stun_client: Annotated[Value, _option("IP:PORT", "Inner endpoint to punch from [default: any].")] = None,
    email_smtps: Annotated[Value, _option("HOST:PORT", "SMTP server (TLS; STARTTLS on 25 and 587).")] = None,
    email_imaps: Annotated[Value, _option("HOST:PORT", "IMAP server (TLS).")] = None,
    email_login: Annotated[Value, _option("LOGIN", "Login for both mail servers.")] = None,
    email_passwd: Annotated[
        Value, _option("PASSWORD", "Its password (better in --config).", "--email-passwd", "--email-password")
    ] = None,
    email_from: Annotated[Value, _option("ADDRESS", "Email address used by the host.")] = None,
    email_to: Annotated[
        Value, _option("ADDRESS", "Email address used by the peer [default: --email-from].")
    ] = None,
    email_cert: Annotated[Value, _option("FILE", "Client certificate for the mail servers.")] = None,
    email_key: Annotated[Value, _option("FILE", "Key of the client certificate.")] = None,
    email_ca: Annotated[
        Value, _option("FILE", "CA to verify the mail servers with [default: system].")
    ] = None,
    smime_peer: Annotated[Value, _option("FILE", "Peer's S/MIME certificate.")] = None,
    smime_cert: Annotated[Value, _option("FILE", "Host's S/MIME certificate (RSA).")] = None,
    smime_key: Annotated[Value, _option("FILE", "Host's S/MIME key.")] = None,
    smime_ca: Annotated[Value, _option("FILE", "CA to verify the peer's S/MIME certificate.")] = None,
    punch_hops: Annotated[Value, _option("TTL", "TTL of the first punch packet [default: 7].")] = None,
    exec_command: Annotated[Value, _option("PATH", "Command to launch once connected.")] = None,
    exec_args: Annotated[
        Value,
        _option(
            "ARGS",
            "Its arguments, with wildcards %innerip% %innerport% %outerip% %outerport% %peerip% %peerport% "
            "%secret% [default: all seven in that order].",
        ),
    ] = None,
    exec_pwd: Annotated[Value, _option("DIR", "Its working directory.")] = None,
    exec_log_file: Annotated[Value, _option("FILE", "File for its stdout and stderr.")] = None,
    response_timeout: Annotated[
        Value, _option("SECONDS", "How long the inviter waits for the response [default: 60].")
    ] = None,
    handshake_timeout: Annotated[
        Value, _option("SECONDS", "How long the handshake may take [default: 60].")
    ] = None,
    log_level: Annotated[
        Value, _option("LEVEL", "fatal|error|warning|info|debug|trace [default: info].")
    ] = None,
    log_file: Annotated[Value, _option("FILE", "Write the log here instead of stderr.")] = None,
    config: Annotated[Value, _option("FILE", "File of `name = value` lines with these options.")] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Connect two hosts behind NATs: STUN, an email rendezvous, UDP hole punching, then your command."""
    given = dict(locals())
    options = Options(given, read_config(Path(config)) if config else {})
    setup_logging(options)
    if explore_ or options.flag("explore"):
        asyncio.run(explore(options, json_ or options.flag("json")))
        return
    config_ = session_config(options)
    if accept or options.flag("accept"):
        asyncio.run(session.accept(config_))
    else:
        asyncio.run(session.invite(config_))


OPTION_NAMES = frozenset(
    name
    for param in typer.main.get_command(app).params
    for opt in param.opts
    if (name := opt[2:]) != "config"
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="plexus", standalone_mode=False)
    except typer.Abort:
        _fail("interrupted", ExitCode.ERROR)
    except typer.TyperException as error:  # typer's own click raises its usage errors as these
        _fail(error.format_message(), ExitCode.USAGE)
    except PlexusError as error:
        log.debug("failure", exc_info=True)
        _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", ExitCode.ERROR)
    except Exception as error:  # a bug or an unforeseen OS error: still one line; the log has the traceback
        log.debug("unexpected failure", exc_info=True)
        _fail(f"unexpected error: {error}", ExitCode.ERROR)
    sys.exit(ExitCode.OK)


def _fail(message: str, code: ExitCode) -> NoReturn:
    print(f"plexus: {message}", file=sys.stderr)
    sys.exit(code)
