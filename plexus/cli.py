"""The plexus command line, compatible with plexus 2.2's option names, plus --explore.

Every failure ends here as one line on stderr and a distinct exit code (plexus.errors.ExitCode); typer/click
parse the options, but their multi-line usage boxes are replaced by that one line too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import typer.core
import uvloop
from typer import _click as click  # typer (pinned) carries its own click; help formatting is typed there

from plexus import __version__, files, identity, launcher, session
from plexus.endpoint import Endpoint
from plexus.errors import MEANINGS, STOP_SIGNALS, ExitCode, Interrupted, PlexusError, UsageError
from plexus.mediator import MailConfig, SmimeConfig, dht, smime
from plexus.mediator.dhtnode import DhtConfig
from plexus.session import TurnConfig
from plexus.streams import StreamsConfig
from plexus.streams.forward import Forward
from plexus.streams.wire import Allowed, Target

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
HANDSHAKE_VARIABLE = "PLEXUS_HANDSHAKE_TIMEOUT"
MAX_TIMEOUT = 24 * 3600.0
EXAMPLES = Path(__file__).resolve().parent / "examples"
T = TypeVar("T")
ALIASES = {"email-password": "email-passwd", "turn-password": "turn-passwd"}
PASSWORDS = ("email-passwd", "turn-passwd")
# Options naming a private key: refused when others can read the file, as ssh refuses one.
PRIVATE_KEYS = ("email-key", "smime-key")
# Numbers in ASCII digits only: float() and int() also take Arabic-Indic digits, '1_0', and more.
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_WHOLE = re.compile(r"[0-9]{1,20}")

app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)


@dataclass(frozen=True)
class Setting:
    """One value from --config, and where it was written."""

    value: str
    line: int


def read_config(path: Path) -> dict[str, Setting]:
    """plexus 2.2's config file: `name = value` lines with the command line's option names.

    `#` starts a comment at the start of a line or after whitespace; a value may be quoted ("..." or '...'),
    which keeps a `#` or surrounding spaces in it. A bare name sets a flag; [sections] are ignored (2.2 has
    none); a UTF-8 byte order mark (Windows editors) is skipped. Each error names the file, the line and the
    option. The file names the command plexus runs: refused when another user could change it, and when it
    holds a password others can read (plexus.files).
    """
    try:
        with path.open("rb") as file:
            info, data = os.fstat(file.fileno()), file.read()
        lines = data.decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not a UTF-8 text file"
        raise UsageError(f"cannot read --config {path}: {reason}") from error
    files.check(info, f"--config {path}", path, holds=None)
    values = _parse_config(path, lines)
    if any(name in values for name in PASSWORDS):
        files.check(info, f"--config {path}", path, holds="a password")
    return values


def _parse_config(path: Path, lines: list[str]) -> dict[str, Setting]:
    values: dict[str, Setting] = {}
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            name = _uncommented(name)
        name = name.strip().removeprefix("--")
        name = ALIASES.get(name, name)
        if name not in OPTION_NAMES:
            raise UsageError(f"{where}: unknown option {name!r}")
        if name in values:
            raise UsageError(f"{where}: {name} is already set on line {values[name].line}")
        text = _config_value(value, f"{where}: {name}") if sep else "true"
        if not text:
            raise UsageError(f"{where}: {name} has no value (quote a value that starts with #)")
        values[name] = Setting(text, number)
    return values


def _config_value(text: str, where: str) -> str:
    text = text.strip()
    quote = text[:1]
    if quote in ("'", '"'):
        end = text.find(quote, 1)
        if end < 0:
            raise UsageError(f"{where}: the value's {quote} quote is not closed")
        rest = text[end + 1 :].strip()
        if rest and not rest.startswith("#"):
            raise UsageError(f"{where}: unexpected {rest[:20]!r} after the quoted value")
        return text[1:end]
    return _uncommented(text)


def _uncommented(text: str) -> str:
    if text.startswith("#"):
        return ""
    comment = re.search(r"\s#", text)
    return (text[: comment.start()] if comment else text).strip()


def _flag(value: str, origin: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{origin}: expected true or false, got {value!r}")


class Options:
    """Command-line values over config-file values; every error names the option and, from --config, the
    file and line it came from."""

    def __init__(self, given: dict[str, Any], config: dict[str, Setting], config_path: Path | None = None):
        self._given = given
        self._config = config
        self._config_path = config_path

    def _from_command_line(self, name: str) -> Any:
        value = self._given.get(name.replace("-", "_"))
        return None if value is False else value

    def origin(self, name: str) -> str:
        """How to name the option in a message: `--name`, or `--name (FILE:LINE)` when the file set it."""
        setting = self._config.get(name)
        if self._from_command_line(name) is None and setting is not None:
            return f"--{name} ({self._config_path}:{setting.line})"
        return f"--{name}"

    def get(self, name: str) -> str | None:
        value = self._from_command_line(name)
        if value is None:
            setting = self._config.get(name)
            return setting.value if setting else None
        return str(value)

    def values(self, name: str) -> list[str]:
        """A repeatable option: each time given on the command line, or comma-separated in --config; a
        comma-separated list works on the command line too."""
        given = self._from_command_line(name)
        if given:
            texts = list(given)
        else:
            setting = self._config.get(name)
            texts = [setting.value] if setting else []
        return [item.strip() for text in texts for item in text.split(",") if item.strip()]

    def flag(self, name: str) -> bool:
        if self._from_command_line(name):
            return True
        setting = self._config.get(name)
        return setting is not None and _flag(setting.value, self.origin(name))

    def require(self, name: str) -> str:
        value = self.get(name)
        if not value:
            raise UsageError(f"missing --{name} (give it on the command line or in --config)")
        return value

    def endpoint(self, name: str, default_port: int | None = None) -> Endpoint:
        try:
            return Endpoint.parse(self.require(name), default_port)
        except ValueError as error:
            raise UsageError(f"{self.origin(name)}: {error}") from error

    def path(self, name: str, *, directory: bool = False) -> Path | None:
        value = self.get(name)
        if value is None:
            return None
        path = Path(value).expanduser()
        if not (path.is_dir() if directory else path.is_file()):
            kind = "directory" if directory else "file"
            raise UsageError(f"{self.origin(name)} {value}: no such {kind}")
        if not os.access(path, os.R_OK | (os.X_OK if directory else 0)):
            raise UsageError(f"{self.origin(name)} {value}: permission denied")
        if name in PRIVATE_KEYS:
            files.check(path.stat(), f"{self.origin(name)} {value}", path, holds="a private key")
        return path

    def number(self, name: str, default: float, maximum: float) -> float:
        value = self.get(name)
        return default if value is None else parse_number(value, self.origin(name), maximum)

    def whole(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get(name)
        return default if value is None else parse_whole(value, self.origin(name), low, high)


def parse_number(text: str, where: str, maximum: float) -> float:
    """A decimal number above 0 and at most `maximum`, in ASCII digits; `where` names the option."""
    if _NUMBER.fullmatch(text.strip()) and 0 < (value := float(text)) <= maximum:
        return value
    raise UsageError(f"{where} must be a number above 0 and at most {maximum:g}, not {text!r}")


def parse_whole(text: str, where: str, low: int, high: int) -> int:
    """A whole number from `low` to `high`, in ASCII digits (str.isdigit takes '²', which int() refuses)."""
    if _WHOLE.fullmatch(text.strip()) and low <= (value := int(text)) <= high:
        return value
    raise UsageError(f"{where} must be a whole number from {low} to {high}, not {text!r}")


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
    # With --identity (and its required --peer-identity) mail is signed, and the peer's must be.
    me, check = pinned_identities(options) if options.get("identity") else (None, None)
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
        identity=me,
        peer_identity=check.pinned_id if check is not None else None,
    )


def turn_config(options: Options) -> TurnConfig | None:
    if not options.get("turn-server"):
        return None
    return TurnConfig(
        server=options.endpoint("turn-server", STUN_PORT),
        user=options.require("turn-user"),
        password=options.require("turn-passwd"),
    )


def session_config(options: Options) -> session.SessionConfig:
    """Everything a session needs, checked now: nothing is sent before every option has proved usable."""
    hops = options.whole("punch-hops", 7, 1, 255)
    # The variable tests and benchmarks set in place of --handshake-timeout: checked as the option is.
    variable = os.environ.get(HANDSHAKE_VARIABLE)
    handshake_default = 60.0 if variable is None else parse_number(variable, HANDSHAKE_VARIABLE, MAX_TIMEOUT)
    streams = streams_config(options, smime_config(options))
    command = command_config(options, streams)
    inner = options.endpoint("stun-client") if options.get("stun-client") else Endpoint("0.0.0.0", 0)
    keep_sessions = options.flag("keep-sessions")
    if keep_sessions and inner.port and options.flag("accept"):
        raise UsageError(
            "--keep-sessions runs sessions side by side, each on its own inner port: "
            "leave out --stun-client's port (or give port 0)"
        )
    return session.SessionConfig(
        inner=inner,
        stun_server=options.endpoint("stun-server", STUN_PORT),
        rendezvous=rendezvous_config(options),
        command=command,
        punch_hops=hops,
        response_timeout=options.number("response-timeout", 60, MAX_TIMEOUT),
        handshake_timeout=options.number("handshake-timeout", handshake_default, MAX_TIMEOUT),
        keep_sessions=keep_sessions,
        turn=turn_config(options),
        streams=streams,
    )


def command_config(options: Options, streams: StreamsConfig | None) -> launcher.Command | None:
    """The command to launch: required unless the session carries streams (an inviter's --stdio or
    --forward replace it; an acceptor with --forward-allow may have both)."""
    exec_command = options.get("exec-command")
    if streams is not None and streams.inviting:
        if exec_command:
            raise UsageError("--stdio and --forward carry the session themselves: leave out --exec-command")
        return None
    if not exec_command and streams is not None:
        return None
    if not exec_command:
        forwarding = " (or --forward-allow, to forward streams)" if options.flag("accept") else ""
        raise UsageError(f"missing --exec-command{forwarding} (give it on the command line or in --config)")
    launcher.check_executable(exec_command)
    log_file = Path(p).expanduser() if (p := options.get("exec-log-file")) else None
    if log_file is not None:
        launcher.check_log_file(log_file)
    return launcher.Command(
        path=exec_command,
        words=launcher.parse_args(options.get("exec-args")),
        pwd=options.path("exec-pwd", directory=True),
        log_file=log_file,
    )


NO_IDENTITY = (
    "streams need to know the peer: give --identity=FILE (made on first use) and --peer-identity=ID (the "
    "peer's `plexus --identity=FILE --show-id` prints it), or S/MIME (--smime-*), or --anonymous to let "
    "anyone who reads the mailbox in"
)


def streams_config(options: Options, smime_files: SmimeConfig | None) -> StreamsConfig | None:
    """--forward-allow (acceptor), --stdio or --forward (inviter), and who may be on the other end."""
    accepting = options.flag("accept")
    allowed = [
        Target.parse(text, options.origin("forward-allow")) for text in options.values("forward-allow")
    ]
    stdio = Target.parse(text, options.origin("stdio")) if (text := options.get("stdio")) else None
    forwards = tuple(Forward.parse(text) for text in options.values("forward"))
    if accepting and (stdio or forwards):
        raise UsageError(
            "--stdio and --forward are the inviter's: the acceptor lists targets in --forward-allow"
        )
    if not accepting and allowed:
        raise UsageError(
            "--forward-allow is the acceptor's (with --accept): the inviter uses --stdio or --forward"
        )
    if stdio and forwards:
        raise UsageError("--stdio and --forward: give one or the other")
    if not (allowed or stdio or forwards):
        return None
    for forward in forwards:
        check_listen(forward.listen, options.origin("forward"))
    me, check = trust(options, smime_files)
    return StreamsConfig(me, check, Allowed.of(allowed) if accepting else None, stdio, forwards)


_IPV4_LIKE = re.compile(r"[0-9.]+")


def check_listen(listen: Endpoint, origin: str) -> None:
    """Bind --forward's local address once now, as the listener will after the rendezvous: a typo, a name
    that does not resolve, a port in use or not allowed is found before anything is sent."""
    where = f"{origin} {listen}"
    if (":" in listen.host or _IPV4_LIKE.fullmatch(listen.host)) and not listen.is_ip:  # no name for DNS
        raise UsageError(f"{where}: {listen.host} is not an IP address")
    try:
        found = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not a host name"
        raise UsageError(f"{where}: cannot resolve {listen.host}: {reason}") from error
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's listener sets them
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as error:
                raise UsageError(f"cannot listen on {where}: {error.strerror}") from error


def trust(options: Options, smime_files: SmimeConfig | None) -> tuple[identity.Identity, identity.PeerCheck]:
    """This host's identity and what the peer must prove: --identity and --peer-identity, else S/MIME's
    certificates, else (asked for by name) nothing."""
    if options.get("identity"):
        return pinned_identities(options)
    if smime_files is not None:
        keys = smime.Keys.load(smime_files)
        return identity.Identity.of_smime(keys), identity.PeerCheck.of_smime(keys)
    if options.flag("anonymous"):
        log.warning("streams are anonymous (--anonymous): whoever reads the mailbox can reach the targets")
        return identity.Identity.ephemeral(), identity.PeerCheck(None)
    raise UsageError(NO_IDENTITY)


def pinned_identities(options: Options) -> tuple[identity.Identity, identity.PeerCheck]:
    """--identity (made on first use) and --peer-identity, both required."""
    key_file = options.require("identity")
    pinned = options.get("peer-identity")
    if not pinned:
        raise UsageError(
            "missing --peer-identity: pin the peer's id (`plexus --identity=FILE --show-id` prints it)"
        )
    me = identity.Identity.load(Path(key_file).expanduser())
    return me, identity.PeerCheck(identity.parse_id(pinned, options.origin("peer-identity")))


RENDEZVOUS = ("email", "dht")


def rendezvous_config(options: Options) -> MailConfig | DhtConfig:
    """By mail unless the DHT is asked for: --rendezvous=dht, or --dht-bootstrap given."""
    chosen = (options.get("rendezvous") or ("dht" if options.values("dht-bootstrap") else "email")).lower()
    if chosen not in RENDEZVOUS:
        raise UsageError(f"{options.origin('rendezvous')} must be email or dht, not {chosen!r}")
    if chosen == "email":
        return mail_config(options)
    nodes = options.values("dht-bootstrap")
    if not nodes:
        raise UsageError("the DHT rendezvous needs --dht-bootstrap=HOST[:PORT] (a node of the DHT to join)")
    try:
        bootstrap = tuple(Endpoint.parse(node, dht.DEFAULT_PORT) for node in nodes)
    except ValueError as error:
        raise UsageError(f"{options.origin('dht-bootstrap')}: {error}") from error
    me, check = pinned_identities(options)
    assert check.pinned_id is not None
    return DhtConfig(
        identity=me,
        peer_id=check.pinned_id,
        bootstrap=bootstrap,
        port=options.whole("dht-port", dht.DEFAULT_PORT, 1, 65535),
        network=options.whole("dht-network", 0, 0, 2**32 - 1),
    )


def show_id(options: Options) -> None:
    key_file = options.get("identity")
    if not key_file:
        raise UsageError("--show-id needs --identity=FILE (made on first use)")
    print(identity.Identity.load(Path(key_file).expanduser()).id)


def setup_logging(options: Options) -> None:
    # With --stdio, stderr is the terminal of the ssh session plexus carries: only problems belong there.
    level_name = (options.get("log-level") or ("warning" if options.get("stdio") else "info")).lower()
    if level_name not in LOG_LEVELS:
        raise UsageError(f"--log-level must be one of {'|'.join(LOG_LEVELS)}")
    logging.addLevelName(LOG_LEVELS["trace"], "TRACE")
    log_file = Path(name).expanduser() if (name := options.get("log-file")) else None
    warning = files.readable_by_others(log_file) if log_file else None
    try:
        if log_file:
            files.create_private(log_file)  # what the mail servers were told lands here at trace level
        handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    except OSError as error:
        raise UsageError(f"cannot open --log-file {log_file}: {error.strerror}") from error
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(Redactor(options))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[level_name])
    if warning:
        log.warning("--log-file %s", warning)
    # aioimaplib reports every untagged line it skips at INFO, aioquic its handshake's steps: protocol
    # chatter, shown only at trace.
    chatter = LOG_LEVELS["trace"] if level_name == "trace" else max(LOG_LEVELS[level_name], logging.WARNING)
    logging.getLogger("aioimaplib").setLevel(chatter)
    logging.getLogger("quic").setLevel(chatter)  # aioquic's per-connection notes (version, ALPN, close)


class Redactor(logging.Filter):
    """Blanks the configured passwords out of every record, in each form a library may log them: aioimaplib
    scrubs its LOGIN line of the password only as given, not as it quoted it (a `"` or `\\` escaped), and
    shows the line as a bytes repr; a repr, JSON, or base64 as SMTP's AUTH sends it, may carry one too."""

    def __init__(self, options: Options) -> None:
        super().__init__()
        login = options.get("email-login") or ""
        forms = {
            form
            for name in PASSWORDS
            if len(secret := options.get(name) or "") >= MIN_REDACTED
            for form in _forms(secret, login)
        }
        longest_first = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, longest_first))) if forms else None

    def redact(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text) if self._pattern else text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:  # bad arguments: logging would show them, the password too
            message = f"{record.msg} (unformattable arguments)"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


REDACTED = "***"
# A shorter password would blank out common words all over the log (and is guessed in no time anyway).
MIN_REDACTED = 4


def _forms(secret: str, login: str) -> set[str]:
    """The secret as it may appear in a log line: as is or IMAP-quoted; each inside a str or bytes repr (with
    `'` escaped or not: repr picks its quote by the whole line) or a JSON string; in base64 as AUTH LOGIN
    and AUTH PLAIN send it."""
    found = set()
    for text in (secret, secret.replace("\\", "\\\\").replace('"', '\\"')):
        # With both quotes in it, repr quotes with ' and escapes each ' the secret holds.
        escaped = (repr(text + "'\"")[1:-4], repr((text + "'\"").encode())[2:-4])
        found |= {text, json.dumps(text)[1:-1], *escaped, *(body.replace("\\'", "'") for body in escaped)}
    plain = f"\0{login}\0{secret}".encode()
    found |= {base64.b64encode(value).decode("ascii") for value in (secret.encode(), plain)}
    return found


async def explore(options: Options, as_json: bool) -> None:
    from plexus import api  # the library's explore: --explore is a thin layer over it

    inner = options.endpoint("stun-client") if options.get("stun-client") else Endpoint("0.0.0.0", 0)
    server = options.endpoint("stun-server", STUN_PORT)
    found = await api.explore(server, stun_client=inner, relay=turn_config(options) is not None)
    print(found.json() if as_json else found)


def run_until_signal(main: Coroutine[Any, Any, T]) -> T:
    """Run the flow; SIGINT or SIGTERM cancel it, so every `finally` and `async with` unwinds (mail sessions
    closed, commands stopped), and end it with Interrupted. As PID 1 (a container) SIGTERM would otherwise be
    ignored, and typer's own KeyboardInterrupt handling is not ours to rely on."""

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        received: list[int] = []

        def stop(signum: int) -> None:
            if not received:
                log.info("%s received: stopping", signal.Signals(signum).name)
                received.append(signum)
                task.cancel()

        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop, signum)
        try:
            return await main
        except asyncio.CancelledError:
            if received:
                raise Interrupted(received[0]) from None
            raise

    # uvloop: the streams' QUIC is bound by the event loop's cost per datagram, and uvloop halves it.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(guarded())


def _version(value: bool) -> None:
    if value:
        print(f"plexus {__version__}")
        raise typer.Exit()


def _examples(value: bool) -> None:
    if value:
        print(EXAMPLES)
        raise typer.Exit()


def _option(metavar: str, help: str, *names: str) -> Any:
    return typer.Option(*names, metavar=metavar, help=help)


HELP_GROUPS = {
    "Role": ("accept", "explore", "json", "keep-sessions", "config"),
    "Rendezvous by mail": (
        "host-id",
        "peer-id",
        "email-smtps",
        "email-imaps",
        "email-login",
        "email-passwd",
        "email-from",
        "email-to",
        "email-ca",
        "email-cert",
        "email-key",
        "response-timeout",
    ),
    "Rendezvous on OpenDHT (with --identity and --peer-identity)": (
        "rendezvous",
        "dht-bootstrap",
        "dht-port",
        "dht-network",
    ),
    "NAT traversal": (
        "stun-server",
        "stun-client",
        "punch-hops",
        "handshake-timeout",
        "turn-server",
        "turn-user",
        "turn-passwd",
    ),
    "The command": ("exec-command", "exec-args", "exec-pwd", "exec-log-file"),
    "Streams (ssh and TCP over QUIC, no root)": (
        "forward-allow",
        "stdio",
        "forward",
        "identity",
        "show-id",
        "peer-identity",
        "anonymous",
    ),
    "S/MIME (sign and encrypt the mail)": ("smime-cert", "smime-key", "smime-peer", "smime-ca"),
    "Logging": ("log-level", "log-file"),
    "Other": ("examples", "version", "help"),
}
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


class GroupedCommand(typer.core.TyperCommand):
    """Help with the options in groups, examples per role and the exit codes; click's plain layout."""

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


Value = str | None


@app.command(cls=GroupedCommand, context_settings={"help_option_names": ["--help", "-h"]})
def run(
    accept: Annotated[
        bool, typer.Option("--accept", help="Serve requests until stopped (the host to reach).")
    ] = False,
    explore_: Annotated[
        bool, typer.Option("--explore", help="Print the NAT's behaviour as STUN shows it, then exit.")
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="With --explore: one JSON object.")] = False,
    keep_sessions: Annotated[
        bool,
        typer.Option(
            "--keep-sessions",
            help="Keep earlier sessions' commands running beside a new one (each needs its own inner "
            "port) instead of replacing them.",
        ),
    ] = False,
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
        Value, _option("FILE", "CA to verify the mail servers with, for a private CA [default: system].")
    ] = None,
    smime_peer: Annotated[Value, _option("FILE", "Peer's S/MIME certificate.")] = None,
    smime_cert: Annotated[Value, _option("FILE", "Host's S/MIME certificate (RSA).")] = None,
    smime_key: Annotated[Value, _option("FILE", "Host's S/MIME key.")] = None,
    smime_ca: Annotated[Value, _option("FILE", "CA to verify the peer's S/MIME certificate.")] = None,
    punch_hops: Annotated[Value, _option("TTL", "TTL of the first punch packet [default: 7].")] = None,
    turn_server: Annotated[
        Value,
        _option(
            "HOST[:PORT]",
            "TURN server to relay through when both NATs map per destination (port 3478 by default).",
        ),
    ] = None,
    turn_user: Annotated[Value, _option("USER", "TURN user (long-term credentials).")] = None,
    turn_passwd: Annotated[
        Value, _option("PASSWORD", "TURN password (better in --config).", "--turn-passwd", "--turn-password")
    ] = None,
    exec_command: Annotated[Value, _option("PATH", "Command to launch once connected.")] = None,
    exec_args: Annotated[
        Value,
        _option(
            "ARGS",
            "Its arguments, with wildcards %innerip% %innerport% %outerip% %outerport% %peerip% %peerport% "
            "%secret% [default: all seven in that order]. The command also gets them as PLEXUS_INNERIP ... "
            "PLEXUS_SECRET in its environment, which `ps` does not show.",
        ),
    ] = None,
    exec_pwd: Annotated[Value, _option("DIR", "Its working directory.")] = None,
    exec_log_file: Annotated[Value, _option("FILE", "File for its stdout and stderr.")] = None,
    forward_allow: Annotated[
        list[str] | None,
        _option(
            "HOST:PORT",
            "Acceptor: a target the inviter may reach through streams (repeat it, or comma-separate it in "
            "--config; [IPv6]:PORT). None listed: no streams.",
        ),
    ] = None,
    stdio: Annotated[
        Value, _option("HOST:PORT", "Inviter: carry stdin and stdout to this target (ssh's ProxyCommand).")
    ] = None,
    forward: Annotated[
        list[str] | None,
        _option(
            "[BIND:]PORT:HOST:PORT",
            "Inviter: listen on BIND:PORT (127.0.0.1 by default) and carry each connection to HOST:PORT on "
            "the acceptor's side, as ssh -L does, until interrupted (repeatable).",
        ),
    ] = None,
    identity_: Annotated[
        Value,
        _option(
            "FILE", "This host's identity key, for streams and the DHT (made on first use).", "--identity"
        ),
    ] = None,
    show_id_: Annotated[
        bool, typer.Option("--show-id", help="Print the id of --identity (for the peer's --peer-identity).")
    ] = False,
    peer_identity: Annotated[Value, _option("ID", "The peer's id, as its --show-id prints it.")] = None,
    anonymous: Annotated[
        bool,
        typer.Option(
            "--anonymous",
            help="Streams without identities: whoever reads the mailbox could reach the allowed targets.",
        ),
    ] = False,
    rendezvous: Annotated[
        Value, _option("email|dht", "How the peers meet [default: dht with --dht-bootstrap, else email].")
    ] = None,
    dht_bootstrap: Annotated[
        list[str] | None,
        _option(
            "HOST[:PORT]", "A node of the DHT to join (port 4222 by default; repeatable).", "--dht-bootstrap"
        ),
    ] = None,
    dht_port: Annotated[Value, _option("PORT", "This host's DHT node's UDP port [default: 4222].")] = None,
    dht_network: Annotated[
        Value, _option("ID", "The DHT network id: 0 is the public OpenDHT network [default: 0].")
    ] = None,
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
    config: Annotated[
        Value, _option("FILE", "File of `name = value` lines with these options (mode 600 with a password).")
    ] = None,
    examples: Annotated[
        bool,
        typer.Option(
            "--examples",
            callback=_examples,
            is_eager=True,
            help="Print the folder of the installed examples (exec.sh for OpenVPN, the cron script "
            "plexus-reconnect, the systemd unit), then exit.",
        ),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Connect two hosts behind NATs: STUN, an email rendezvous, UDP hole punching, then your command."""
    # named so to spare the builtins and the modules
    given = dict(locals()) | {"explore": explore_, "json": json_, "identity": identity_, "show_id": show_id_}
    config_path = Path(config).expanduser() if config else None
    options = Options(given, read_config(config_path) if config_path else {}, config_path)
    setup_logging(options)
    accepting, exploring, as_json = (options.flag(name) for name in ("accept", "explore", "json"))
    if exploring:
        run_until_signal(explore(options, as_json))
        return
    if options.flag("show-id"):
        show_id(options)
        return
    config_ = session_config(options)
    from plexus.events import JsonLines  # here: the options' rewrite of this module's imports is elsewhere

    sink = JsonLines.from_environment()  # PLEXUS_EVENTS: the lab tests and bench/ read them
    if sink is not None:
        config_ = config_.reporting(sink)
    # A normal end by signal: a service manager stopping the acceptor, ssh ending its ProxyCommand (--stdio).
    normal_end = signal.SIGTERM if accepting else signal.SIGHUP if options.get("stdio") else None
    try:
        run_until_signal(session.accept(config_) if accepting else session.invite(config_))
    except Interrupted as stopped:
        if stopped.signum != normal_end:
            raise
        log.info("stopped")


OPTION_NAMES = frozenset(
    name
    for param in typer.main.get_command(app).params
    for opt in param.opts
    if (name := opt[2:]) not in ("config", "examples", "version", "help")
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    # Until the event loop takes over, SIGTERM ends the run as SIGINT does (as PID 1 it would be ignored).
    signal.signal(signal.SIGTERM, _terminated)
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="plexus", standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", ExitCode.INTERRUPTED)
    except typer.TyperException as error:  # typer's own click raises its usage errors as these
        _fail(error.format_message(), ExitCode.USAGE)
    except PlexusError as error:
        log.debug("failure", exc_info=True)
        _fail(str(error), error.exit_code)
    except Exception as error:  # a bug or an unforeseen OS error: still one line; the log has the traceback
        log.debug("unexpected failure", exc_info=True)
        _fail(f"unexpected error: {error}", ExitCode.ERROR)
    sys.exit(ExitCode.OK)


def _terminated(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _fail(message: str, code: ExitCode) -> NoReturn:
    handlers = logging.getLogger().handlers
    if any(isinstance(handler, logging.FileHandler) for handler in handlers):
        log.error("exit %d: %s", code, message)  # a log file read later must say how the run ended
    for redactor in (f for handler in handlers for f in handler.filters if isinstance(f, Redactor)):
        message = redactor.redact(message)  # an unexpected error may quote what a library was sending
    print(f"plexus: {message}", file=sys.stderr)
    sys.exit(code)
