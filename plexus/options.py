"""plexus's options, each named once: the table below gives the command line (plexus.cli builds it), the
config file's keys, the help's groups, and how each value is checked; the configs are built from it here.

Values come from the command line over --config's `name = value` lines (plexus 2.2's option names). Code
names an option by its `Name` member, so a misspelt one fails mypy and at import rather than reading None;
every error names the option and, when the file set it, the file and line.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from plexus import files
from plexus.endpoint import ANY4, ANY6, Endpoint
from plexus.errors import UsageError

# Each config is built where its module is loaded: options for a mail session never load OpenDHT, say.
if TYPE_CHECKING:
    from plexus import identity, launcher, peers, session
    from plexus.mediator.dhtnode import DhtConfig
    from plexus.mediator.email import MailConfig
    from plexus.mediator.smime import SmimeConfig
    from plexus.paths import TurnConfig
    from plexus.relay import Transport
    from plexus.streams import StreamsConfig
    from plexus.streams.forward import Forward

log = logging.getLogger("plexus")

STUN_PORT = 3478
TURNS_PORT = 5349  # RFC 7065: turns: (TLS)
HANDSHAKE_VARIABLE = "PLEXUS_HANDSHAKE_TIMEOUT"
MAX_TIMEOUT = 24 * 3600.0
# Numbers in ASCII digits only: float() and int() also take Arabic-Indic digits, '1_0', and more.
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_WHOLE = re.compile(r"[0-9]{1,20}")


class Name(StrEnum):
    """Every option, by the name the command line (after --) and the config file give it."""

    ACCEPT = "accept"
    EXPLORE = "explore"
    JSON = "json"
    KEEP_SESSIONS = "keep-sessions"
    CONFIG = "config"
    HOST_ID = "host-id"
    PEER_ID = "peer-id"
    PEERS = "peers"
    STATUS = "status"
    EMAIL_SMTPS = "email-smtps"
    EMAIL_IMAPS = "email-imaps"
    EMAIL_LOGIN = "email-login"
    EMAIL_PASSWD = "email-passwd"
    EMAIL_FROM = "email-from"
    EMAIL_TO = "email-to"
    EMAIL_CA = "email-ca"
    EMAIL_CERT = "email-cert"
    EMAIL_KEY = "email-key"
    RESPONSE_TIMEOUT = "response-timeout"
    RENDEZVOUS = "rendezvous"
    DHT_BOOTSTRAP = "dht-bootstrap"
    DHT_PORT = "dht-port"
    DHT_NETWORK = "dht-network"
    STUN_SERVER = "stun-server"
    STUN_CLIENT = "stun-client"
    PUNCH_HOPS = "punch-hops"
    HANDSHAKE_TIMEOUT = "handshake-timeout"
    TURN_SERVER = "turn-server"
    TURN_USER = "turn-user"
    TURN_PASSWD = "turn-passwd"
    TURN_CA = "turn-ca"
    EXEC_COMMAND = "exec-command"
    EXEC_ARGS = "exec-args"
    EXEC_PWD = "exec-pwd"
    EXEC_LOG_FILE = "exec-log-file"
    CARRY = "carry"
    FORWARD_ALLOW = "forward-allow"
    STDIO = "stdio"
    FORWARD = "forward"
    IDENTITY = "identity"
    SHOW_ID = "show-id"
    PEER_IDENTITY = "peer-identity"
    ANONYMOUS = "anonymous"
    SMIME_CERT = "smime-cert"
    SMIME_KEY = "smime-key"
    SMIME_PEER = "smime-peer"
    SMIME_CA = "smime-ca"
    LOG_LEVEL = "log-level"
    LOG_FILE = "log-file"
    EXAMPLES = "examples"
    VERSION = "version"
    HELP = "help"


class Kind(Enum):
    FLAG = "flag"  # given or not; in --config: true or false
    VALUE = "value"
    LIST = "list"  # repeatable; in --config (or on the command line) comma-separated


# The table's values are NamedTuples, not dataclasses: as immutable and compared by value, and made without
# the code generation that made frozen dataclasses 2 ms of this module's import (every plexus run has it).


class Whole(NamedTuple):
    low: int
    high: int
    default: int | None = None

    def parse(self, text: str, where: str) -> int:
        """A whole number from low to high, in ASCII digits (str.isdigit takes '²', which int() refuses)."""
        if _WHOLE.fullmatch(text.strip()) and self.low <= (value := int(text)) <= self.high:
            return value
        raise UsageError(f"{where} must be a whole number from {self.low} to {self.high}, not {text!r}")


class Number(NamedTuple):
    default: float
    maximum: float = MAX_TIMEOUT

    def parse(self, text: str, where: str) -> float:
        """A decimal number above 0 and at most `maximum`, in ASCII digits."""
        if _NUMBER.fullmatch(text.strip()) and 0 < (value := float(text)) <= self.maximum:
            return value
        raise UsageError(f"{where} must be a number above 0 and at most {self.maximum:g}, not {text!r}")


class Choice(NamedTuple):
    choices: tuple[str, ...]


class Address(NamedTuple):
    default_port: int | None = None


class TurnUri(NamedTuple):
    """RFC 7065's TURN URI, or a bare address (UDP, as plexus 2.2 took it)."""

    def parse(self, text: str, where: str) -> tuple[Endpoint, Transport]:
        """`turn:HOST[:PORT][?transport=udp|tcp]` (port 3478), `turns:HOST[:PORT]` (TLS, port 5349), or
        `HOST[:PORT]` (UDP, port 3478)."""
        scheme, colon, rest = text.strip().partition(":")
        scheme = scheme.lower()
        # "turn:3478" is a host called turn and its port, as plexus 2.2 read it: a TURN URI's host is never
        # only digits.
        if not colon or scheme not in ("turn", "turns") or rest.isdigit():
            return self._endpoint(text, STUN_PORT, where), "udp"
        address, question, query = rest.partition("?")
        transport: Transport = "tls" if scheme == "turns" else "udp"
        if question:
            key, equals, value = query.partition("=")
            if key.lower() != "transport" or not equals or value.lower() not in ("udp", "tcp"):
                raise UsageError(f"{where}: {text!r}: the only query is ?transport=udp or ?transport=tcp")
            if value.lower() == "udp" and scheme == "turns":
                raise UsageError(f"{where}: {text!r}: turns: over UDP (DTLS) is not supported; leave it out")
            if scheme == "turn":
                transport = "tcp" if value.lower() == "tcp" else "udp"
        if address.startswith("//"):
            raise UsageError(
                f"{where}: {text!r}: a TURN URI has no //: turn:HOST[:PORT] or turns:HOST[:PORT]"
            )
        return self._endpoint(address, TURNS_PORT if scheme == "turns" else STUN_PORT, where), transport

    @staticmethod
    def _endpoint(text: str, default_port: int, where: str) -> Endpoint:
        try:
            return Endpoint.parse(text, default_port)
        except ValueError as error:
            raise UsageError(f"{where}: {error}") from error


class StunClient(NamedTuple):
    """--stun-client: the punching sockets' endpoints, IPv4's and IPv6's (None: no IPv6)."""

    def parse(self, text: str, where: str) -> tuple[Endpoint, Endpoint | None]:
        """`PORT` (both families, every address), `IPV4:PORT` (IPv4 only, as plexus 2.2 took it),
        `[IPV6]:PORT` (IPv6 there, IPv4 on every address and the same port), or both comma-separated."""
        text = text.strip()
        if text.isascii() and text.isdigit():
            endpoint = self._endpoint(f"0.0.0.0:{text}", where, text)
            return endpoint, Endpoint("::", endpoint.port)
        parts = [self._endpoint(part, where, text) for part in text.split(",")]
        v4 = [part for part in parts if ":" not in part.host]
        v6 = [part for part in parts if ":" in part.host]
        if len(v4) > 1 or len(v6) > 1:
            raise UsageError(f"{where}: {text!r}: at most one IPv4 and one IPv6 endpoint")
        if v6 and not v6[0].is_ip:
            raise UsageError(f"{where}: {v6[0].host!r} is not an IPv6 address")
        return (v4[0] if v4 else Endpoint("0.0.0.0", v6[0].port)), (v6[0] if v6 else None)

    @staticmethod
    def _endpoint(part: str, where: str, text: str) -> Endpoint:
        try:
            return Endpoint.parse(part)
        except ValueError as error:
            raise UsageError(
                f"{where}: {error} (IPV4:PORT, [IPV6]:PORT, both comma-separated, or PORT alone)"
            ) from error


class File(NamedTuple):
    directory: bool = False
    private: bool = False  # a private key: refused when others can read it, as ssh refuses one


# How an option's text becomes its value (`where`, in their parse(), names the option in the message).
Check = Whole | Number | Choice | Address | File | TurnUri | StunClient


class Option(NamedTuple):
    name: Name
    group: str
    help: str
    metavar: str | None = None  # None: a flag
    kind: Kind = Kind.VALUE
    check: Check | None = None
    aliases: tuple[str, ...] = ()
    in_config: bool = True  # may the config file set it


ROLE = "Role"
MAIL = "Rendezvous by mail"
DHT = "Rendezvous on OpenDHT (with --identity and --peer-identity)"
NAT = "NAT traversal"
COMMAND = "The command"
STREAMS = "Streams (ssh and TCP over QUIC, no root)"
SMIME = "S/MIME (sign and encrypt the mail)"
LOGGING = "Logging"
OTHER = "Other"
LOG_LEVELS = {
    "fatal": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG - 5,
}
_FILE = File()

# The help shows the groups in this order, each option in the order listed.
TABLE = (
    Option(Name.ACCEPT, ROLE, "Serve requests until stopped (the host to reach).", kind=Kind.FLAG),
    Option(Name.EXPLORE, ROLE, "Print the NAT's behaviour as STUN shows it, then exit.", kind=Kind.FLAG),
    Option(Name.JSON, ROLE, "With --explore: one JSON object.", kind=Kind.FLAG),
    Option(
        Name.KEEP_SESSIONS,
        ROLE,
        "Keep earlier sessions' commands running beside a new one (each needs its own inner port) instead "
        "of replacing them.",
        kind=Kind.FLAG,
    ),
    Option(
        Name.CONFIG,
        ROLE,
        "File of `name = value` lines with these options (mode 600 with a password).",
        "FILE",
        in_config=False,
    ),
    Option(
        Name.PEERS,
        ROLE,
        "Acceptor: the peers it serves, one a line (its id or identity, a name, per-peer options; "
        "docs/peers.md), re-read on SIGHUP.",
        "FILE",
        check=_FILE,
    ),
    Option(
        Name.STATUS,
        ROLE,
        "Print a running acceptor's peers and sessions, then exit.",
        kind=Kind.FLAG,
        in_config=False,
    ),
    Option(Name.HOST_ID, MAIL, "This host's id: the subject of its mail.", "ID"),
    Option(
        Name.PEER_ID,
        MAIL,
        "The peer's id: the subject plexus waits for (acceptor: repeatable, one peer each).",
        "ID",
        Kind.LIST,
    ),
    Option(
        Name.EMAIL_SMTPS, MAIL, "SMTP server (TLS; STARTTLS on 25 and 587).", "HOST:PORT", check=Address()
    ),
    Option(Name.EMAIL_IMAPS, MAIL, "IMAP server (TLS).", "HOST:PORT", check=Address()),
    Option(Name.EMAIL_LOGIN, MAIL, "Login for both mail servers.", "LOGIN"),
    Option(
        Name.EMAIL_PASSWD, MAIL, "Its password (better in --config).", "PASSWORD", aliases=("email-password",)
    ),
    Option(Name.EMAIL_FROM, MAIL, "Email address used by the host.", "ADDRESS"),
    Option(Name.EMAIL_TO, MAIL, "Email address used by the peer [default: --email-from].", "ADDRESS"),
    Option(
        Name.EMAIL_CA,
        MAIL,
        "CA to verify the mail servers with, for a private CA [default: system].",
        "FILE",
        check=_FILE,
    ),
    Option(Name.EMAIL_CERT, MAIL, "Client certificate for the mail servers.", "FILE", check=_FILE),
    Option(Name.EMAIL_KEY, MAIL, "Key of the client certificate.", "FILE", check=File(private=True)),
    Option(
        Name.RESPONSE_TIMEOUT,
        MAIL,
        "How long the inviter waits for the response [default: 60].",
        "SECONDS",
        check=Number(60),
    ),
    Option(
        Name.RENDEZVOUS,
        DHT,
        "How the peers meet [default: dht with --dht-bootstrap, else email]; an acceptor may meet them both "
        "ways: email,dht.",
        "email|dht",
        Kind.LIST,
        check=Choice(("email", "dht")),
    ),
    Option(
        Name.DHT_BOOTSTRAP,
        DHT,
        "A node of the DHT to join (port 4222 by default; repeatable).",
        "HOST[:PORT]",
        Kind.LIST,
    ),
    # Its default is plexus.mediator.dht's DEFAULT_PORT, given where the DHT config is built.
    Option(
        Name.DHT_PORT, DHT, "This host's DHT node's UDP port [default: 4222].", "PORT", check=Whole(1, 65535)
    ),
    Option(
        Name.DHT_NETWORK,
        DHT,
        "The DHT network id: 0 is the public OpenDHT network [default: 0].",
        "ID",
        check=Whole(0, 2**32 - 1, 0),
    ),
    Option(
        Name.STUN_SERVER,
        NAT,
        "STUN server (port 3478 by default).",
        "HOST[:PORT]",
        check=Address(STUN_PORT),
    ),
    Option(
        Name.STUN_CLIENT,
        NAT,
        "Inner endpoint to punch from: IPV4:PORT (IPv4 only), [IPV6]:PORT, both comma-separated, or PORT "
        "alone (both families) [default: any address and port, both families].",
        "ENDPOINT",
        check=StunClient(),
    ),
    Option(
        Name.PUNCH_HOPS, NAT, "TTL of the first punch packet [default: 7].", "TTL", check=Whole(1, 255, 7)
    ),
    Option(
        Name.HANDSHAKE_TIMEOUT,
        NAT,
        "How long the handshake may take [default: 60].",
        "SECONDS",
        check=Number(60),
    ),
    Option(
        Name.TURN_SERVER,
        NAT,
        "TURN server to relay through when both NATs map per destination or no UDP gets out: HOST[:PORT] "
        "(UDP, port 3478), turn:HOST[:PORT]?transport=tcp (TCP), turns:HOST[:PORT] (TLS, port 5349).",
        "URI",
        check=TurnUri(),
    ),
    Option(Name.TURN_USER, NAT, "TURN user (long-term credentials).", "USER"),
    Option(
        Name.TURN_PASSWD,
        NAT,
        "TURN password (better in --config).",
        "PASSWORD",
        aliases=("turn-password",),
    ),
    Option(
        Name.TURN_CA,
        NAT,
        "CA to verify a turns: server with, for a private CA [default: system].",
        "FILE",
        check=_FILE,
    ),
    Option(Name.EXEC_COMMAND, COMMAND, "Command to launch once connected.", "PATH"),
    Option(
        Name.EXEC_ARGS,
        COMMAND,
        "Its arguments, with wildcards %innerip% %innerport% %outerip% %outerport% %peerip% %peerport% "
        "%secret% [default: all seven in that order]. The command also gets them as PLEXUS_INNERIP ... "
        "PLEXUS_SECRET in its environment, which `ps` does not show.",
        "ARGS",
    ),
    Option(Name.EXEC_PWD, COMMAND, "Its working directory.", "DIR", check=File(directory=True)),
    Option(Name.EXEC_LOG_FILE, COMMAND, "File for its stdout and stderr.", "FILE"),
    Option(
        Name.CARRY,
        COMMAND,
        "Carry its datagrams through plexus, which then stays running with it and keeps the tunnel across "
        "a network change of either side (it talks to plexus on loopback: %peerip% is 127.0.0.1).",
        kind=Kind.FLAG,
    ),
    Option(
        Name.FORWARD_ALLOW,
        STREAMS,
        "Acceptor: a target the inviter may reach through streams (repeat it, or comma-separate it in "
        "--config; [IPv6]:PORT). None listed: no streams.",
        "HOST:PORT",
        Kind.LIST,
    ),
    Option(
        Name.STDIO,
        STREAMS,
        "Inviter: carry stdin and stdout to this target (ssh's ProxyCommand).",
        "HOST:PORT",
    ),
    Option(
        Name.FORWARD,
        STREAMS,
        "Inviter: listen on BIND:PORT (127.0.0.1 by default) and carry each connection to HOST:PORT on the "
        "acceptor's side, as ssh -L does, until interrupted (repeatable).",
        "[BIND:]PORT:HOST:PORT",
        Kind.LIST,
    ),
    Option(
        Name.IDENTITY,
        STREAMS,
        "This host's identity key, for streams and the DHT (made on first use).",
        "FILE",
    ),
    Option(
        Name.SHOW_ID, STREAMS, "Print the id of --identity (for the peer's --peer-identity).", kind=Kind.FLAG
    ),
    Option(
        Name.PEER_IDENTITY,
        STREAMS,
        "The peer's id, as its --show-id prints it (acceptor: repeatable, one peer each).",
        "ID",
        Kind.LIST,
    ),
    Option(
        Name.ANONYMOUS,
        STREAMS,
        "Streams without identities: whoever reads the mailbox could reach the allowed targets.",
        kind=Kind.FLAG,
    ),
    Option(Name.SMIME_CERT, SMIME, "Host's S/MIME certificate (RSA).", "FILE", check=_FILE),
    Option(Name.SMIME_KEY, SMIME, "Host's S/MIME key.", "FILE", check=File(private=True)),
    Option(Name.SMIME_PEER, SMIME, "Peer's S/MIME certificate.", "FILE", check=_FILE),
    Option(Name.SMIME_CA, SMIME, "CA to verify the peer's S/MIME certificate.", "FILE", check=_FILE),
    Option(
        Name.LOG_LEVEL,
        LOGGING,
        f"{'|'.join(LOG_LEVELS)} [default: info].",
        "LEVEL",
        check=Choice(tuple(LOG_LEVELS)),
    ),
    Option(Name.LOG_FILE, LOGGING, "Write the log here instead of stderr.", "FILE"),
    Option(
        Name.EXAMPLES,
        OTHER,
        "Print the folder of the installed examples (exec.sh for OpenVPN, the cron script plexus-reconnect, "
        "the systemd unit), then exit.",
        kind=Kind.FLAG,
        in_config=False,
    ),
    Option(Name.VERSION, OTHER, "Print the version.", kind=Kind.FLAG, in_config=False),
    Option(Name.HELP, OTHER, "Show this message and exit.", kind=Kind.FLAG, in_config=False),
)
OPTIONS = {option.name: option for option in TABLE}
# The config file's keys: 2.2's names and their aliases.
CONFIG_KEYS = {
    key: option.name for option in TABLE if option.in_config for key in (option.name, *option.aliases)
}
PASSWORDS = (Name.EMAIL_PASSWD, Name.TURN_PASSWD)
HELP_GROUPS: dict[str, list[Name]] = {}
for _option in TABLE:
    HELP_GROUPS.setdefault(_option.group, []).append(_option.name)


class Setting(NamedTuple):
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
        key, sep, value = line.partition("=")
        if not sep:
            key = _uncommented(key)
        key = key.strip().removeprefix("--")
        name = CONFIG_KEYS.get(key)
        if name is None:
            raise UsageError(f"{where}: unknown option {key!r}")
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
    file and line it came from.

    `given` maps option names (as the command line spells them, without --) to values: a string, True for a
    flag, a list for a repeatable option; None or False is not given. An unknown name is a ValueError.
    """

    def __init__(
        self,
        given: Mapping[str, Any] | None = None,
        config: Mapping[str, Setting] | None = None,
        config_path: Path | None = None,
    ):
        self._given = {Name(name): value for name, value in (given or {}).items()}
        self._config = dict(config or {})
        self._config_path = config_path

    @classmethod
    def read(cls, given: Mapping[str, Any]) -> Options:
        """The given values over those of the --config file they name, if any."""
        text = given.get(Name.CONFIG)
        path = Path(text).expanduser() if text else None
        return cls(given, read_config(path) if path else {}, path)

    def _from_command_line(self, name: Name) -> Any:
        value = self._given.get(Name(name))  # a name from outside the table: ValueError, never None
        return None if value is False else value

    def origin(self, name: Name) -> str:
        """How to name the option in a message: `--name`, or `--name (FILE:LINE)` when the file set it."""
        setting = self._config.get(name)
        if self._from_command_line(name) is None and setting is not None:
            return f"--{name} ({self._config_path}:{setting.line})"
        return f"--{name}"

    def get(self, name: Name) -> str | None:
        value = self._from_command_line(name)
        if value is None:
            setting = self._config.get(name)
            return setting.value if setting else None
        return str(value)

    def values(self, name: Name) -> list[str]:
        """A repeatable option: each time given on the command line, or comma-separated in --config; a
        comma-separated list works on the command line too."""
        given = self._from_command_line(name)
        if given:
            texts = [given] if isinstance(given, str) else list(given)
        else:
            setting = self._config.get(name)
            texts = [setting.value] if setting else []
        return [item.strip() for text in texts for item in text.split(",") if item.strip()]

    def flag(self, name: Name) -> bool:
        if self._from_command_line(name):
            return True
        setting = self._config.get(name)
        return setting is not None and _flag(setting.value, self.origin(name))

    def require(self, name: Name) -> str:
        value = self.get(name)
        if not value:
            raise UsageError(f"missing --{name} (give it on the command line or in --config)")
        return value

    def _check(self, name: Name, kind: type[CheckT]) -> CheckT:
        check = OPTIONS[name].check
        assert isinstance(check, kind), f"--{name} is not checked as {kind.__name__}"
        return check

    def endpoint(self, name: Name) -> Endpoint:
        try:
            return Endpoint.parse(self.require(name), self._check(name, Address).default_port)
        except ValueError as error:
            raise UsageError(f"{self.origin(name)}: {error}") from error

    def stun_client(self, name: Name) -> tuple[Endpoint, Endpoint | None]:
        return self._check(name, StunClient).parse(self.require(name), self.origin(name))

    def turn_uri(self, name: Name) -> tuple[Endpoint, Transport]:
        return self._check(name, TurnUri).parse(self.require(name), self.origin(name))

    def path(self, name: Name) -> Path | None:
        check = self._check(name, File)
        value = self.get(name)
        if value is None:
            return None
        path = Path(value).expanduser()
        if not (path.is_dir() if check.directory else path.is_file()):
            kind = "directory" if check.directory else "file"
            raise UsageError(f"{self.origin(name)} {value}: no such {kind}")
        if not os.access(path, os.R_OK | (os.X_OK if check.directory else 0)):
            raise UsageError(f"{self.origin(name)} {value}: permission denied")
        if check.private:
            files.check(path.stat(), f"{self.origin(name)} {value}", path, holds="a private key")
        return path

    def number(self, name: Name, default: float | None = None) -> float:
        check = self._check(name, Number)
        value = self.get(name)
        if value is None:
            return check.default if default is None else default
        return check.parse(value, self.origin(name))

    def whole(self, name: Name, default: int | None = None) -> int:
        check = self._check(name, Whole)
        value = self.get(name)
        if value is None:
            found = check.default if default is None else default
            assert found is not None, f"--{name} has no default"
            return found
        return check.parse(value, self.origin(name))

    def choice(self, name: Name, default: str) -> str:
        choices = self._check(name, Choice).choices
        value = (self.get(name) or default).lower()
        if value not in choices:
            allowed = " or ".join(choices) if len(choices) == 2 else f"one of {'|'.join(choices)}"
            raise UsageError(f"{self.origin(name)} must be {allowed}, not {value!r}")
        return value


CheckT = TypeVar("CheckT", bound=Check)


def smime_config(options: Options) -> SmimeConfig | None:
    names = (Name.SMIME_CERT, Name.SMIME_KEY, Name.SMIME_PEER)
    paths = [options.path(name) for name in names]
    if not any(paths):
        return None
    if not all(paths):
        missing = ", ".join(f"--{n}" for n, p in zip(names, paths, strict=True) if p is None)
        raise UsageError(f"S/MIME needs --smime-cert, --smime-key and --smime-peer; missing {missing}")
    cert, key, peer = paths
    assert cert and key and peer
    from plexus.mediator.smime import SmimeConfig

    return SmimeConfig(cert=cert, key=key, peer=peer, ca=options.path(Name.SMIME_CA))


def mail_config(options: Options, roster: peers.Roster | None = None) -> MailConfig:
    """The rendezvous by mail. Mail to and from a peer pinned by identity is signed (--identity signs)."""
    from plexus.mediator.email import MailConfig

    address = options.require(Name.EMAIL_FROM)
    return MailConfig(
        smtp=options.endpoint(Name.EMAIL_SMTPS),
        imap=options.endpoint(Name.EMAIL_IMAPS),
        login=options.require(Name.EMAIL_LOGIN),
        password=options.require(Name.EMAIL_PASSWD),
        address=address,
        # One shared mailbox is the common setup: --email-to defaults to the host's own address.
        peer_address=options.get(Name.EMAIL_TO) or address,
        host_id=options.require(Name.HOST_ID),
        peers=roster or peer_roster(options, ("email",)),
        ca=options.path(Name.EMAIL_CA),
        cert=options.path(Name.EMAIL_CERT),
        key=options.path(Name.EMAIL_KEY),
        smime=smime_config(options),
        identity=own_identity(options),
    )


def turn_config(options: Options) -> TurnConfig | None:
    if not options.get(Name.TURN_SERVER):
        return None
    from plexus.paths import TurnConfig

    server, transport = options.turn_uri(Name.TURN_SERVER)
    ca = options.path(Name.TURN_CA)
    if ca is not None and transport != "tls":
        raise UsageError(
            f"{options.origin(Name.TURN_CA)} is for a turns: server (TLS), not {transport.upper()}"
        )
    return TurnConfig(
        server=server,
        user=options.require(Name.TURN_USER),
        password=options.require(Name.TURN_PASSWD),
        transport=transport,
        ca=ca,
    )


def session_config(options: Options) -> session.SessionConfig:
    """Everything a session needs, checked now: nothing is sent before every option has proved usable."""
    from plexus import session

    hops = options.whole(Name.PUNCH_HOPS)
    # The variable tests and benchmarks set in place of --handshake-timeout: checked as the option is.
    variable = os.environ.get(HANDSHAKE_VARIABLE)
    handshake = OPTIONS[Name.HANDSHAKE_TIMEOUT].check
    assert isinstance(handshake, Number)
    handshake_default = (
        handshake.default if variable is None else handshake.parse(variable, HANDSHAKE_VARIABLE)
    )
    kinds = rendezvous_kinds(options)
    roster = peer_roster(options, kinds)
    smime_files = smime_config(options)
    if smime_files is not None and len([peer for peer in roster.peers.known if peer.id is not None]) > 1:
        raise UsageError(
            "S/MIME pins one peer's certificate (--smime-peer): serve several peers with --identity and "
            "each peer's identity (identity= in --peers)"
        )
    streams = streams_config(options, smime_files, roster)
    command = command_config(options, streams, roster)
    inner, inner6 = options.stun_client(Name.STUN_CLIENT) if options.get(Name.STUN_CLIENT) else (ANY4, ANY6)
    keep_sessions = options.flag(Name.KEEP_SESSIONS)
    fixed = inner.port or (inner6 and inner6.port)
    if keep_sessions and fixed and options.flag(Name.ACCEPT):
        raise UsageError(
            "--keep-sessions runs sessions side by side, each on its own inner port: "
            "leave out --stun-client's port (or give port 0)"
        )
    if fixed and options.flag(Name.ACCEPT) and (len(roster.peers.known) > 1 or roster.file is not None):
        raise UsageError(
            "several peers' sessions run side by side, each on its own inner port: leave out --stun-client's "
            "port (or give port 0); the command learns it from %innerport%"
        )
    stun_server = options.endpoint(Name.STUN_SERVER)
    meeting = rendezvous_configs(options, kinds, roster)
    return session.SessionConfig(
        inner=inner,
        inner6=inner6,
        stun_server=stun_server,
        rendezvous=meeting[0],
        rendezvous_also=meeting[1:],
        command=command,
        punch_hops=hops,
        response_timeout=options.number(Name.RESPONSE_TIMEOUT),
        handshake_timeout=options.number(Name.HANDSHAKE_TIMEOUT, handshake_default),
        keep_sessions=keep_sessions,
        turn=turn_config(options),
        streams=streams,
        carry=options.flag(Name.CARRY),
    )


def command_config(
    options: Options, streams: StreamsConfig | None, roster: peers.Roster
) -> launcher.Command | None:
    """The command to launch: required unless the session carries streams (an inviter's --stdio or
    --forward replace it; an acceptor with --forward-allow may have both) or each peer has its own."""
    exec_command = options.get(Name.EXEC_COMMAND)
    own = any(peer.command is not None for peer in roster.peers.known)
    if options.flag(Name.CARRY) and not (exec_command or own):
        raise UsageError("--carry carries a command's datagrams: give --exec-command (streams carry theirs)")
    if streams is not None and streams.inviting:
        if exec_command:
            raise UsageError("--stdio and --forward carry the session themselves: leave out --exec-command")
        return None
    if not exec_command and (streams is not None or own):
        return None
    if not exec_command:
        forwarding = " (or --forward-allow, to forward streams)" if options.flag(Name.ACCEPT) else ""
        raise UsageError(f"missing --exec-command{forwarding} (give it on the command line or in --config)")
    from plexus import launcher

    launcher.check_executable(exec_command)
    log_file = Path(p).expanduser() if (p := options.get(Name.EXEC_LOG_FILE)) else None
    if log_file is not None:
        launcher.check_log_file(log_file)
    return launcher.Command(
        path=exec_command,
        words=launcher.parse_args(options.get(Name.EXEC_ARGS)),
        pwd=options.path(Name.EXEC_PWD),
        log_file=log_file,
    )


NO_PEER_IDENTITY = "missing --peer-identity: pin the peer's id (`plexus --identity=FILE --show-id` prints it)"
NO_IDENTITY = (
    "streams need to know the peer: give --identity=FILE (made on first use) and --peer-identity=ID (the "
    "peer's `plexus --identity=FILE --show-id` prints it), or S/MIME (--smime-*), or --anonymous to let "
    "anyone who reads the mailbox in"
)


def streams_config(
    options: Options, smime_files: SmimeConfig | None, roster: peers.Roster
) -> StreamsConfig | None:
    """--forward-allow and the peers' allow= (acceptor), --stdio or --forward (inviter), and who may be on
    the other end."""
    from plexus.targets import Allowed, Target

    accepting = options.flag(Name.ACCEPT)
    allowed = [
        Target.parse(text, options.origin(Name.FORWARD_ALLOW)) for text in options.values(Name.FORWARD_ALLOW)
    ]
    stdio = Target.parse(text, options.origin(Name.STDIO)) if (text := options.get(Name.STDIO)) else None
    forwards = forward_config(options)
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
    per_peer = accepting and any(peer.allowed is not None for peer in roster.peers.known)
    if not (allowed or stdio or forwards or per_peer):
        return None
    for forward in forwards:
        check_listen(forward.listen, options.origin(Name.FORWARD))
    me, check = trust(options, smime_files)
    from plexus.streams import StreamsConfig

    return StreamsConfig(me, check, Allowed.of(allowed) if accepting and allowed else None, stdio, forwards)


def forward_config(options: Options) -> tuple[Forward, ...]:
    """--forward's listeners; their module carries streams, loaded only when one is given."""
    texts = options.values(Name.FORWARD)
    if not texts:
        return ()
    from plexus.streams.forward import Forward

    return tuple(Forward.parse(text) for text in texts)


_IPV4_LIKE = re.compile(r"[0-9.]+")


def check_listen(listen: Endpoint, origin: str) -> None:
    """Bind --forward's local address once now, as the listener will after the rendezvous: a typo, a name
    that does not resolve, a port in use or not allowed is found before anything is sent."""
    import socket

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


def trust(
    options: Options, smime_files: SmimeConfig | None
) -> tuple[identity.Identity, identity.PeerCheck | None]:
    """This host's identity and what the peer must prove: --identity and --peer-identity (an acceptor: each
    peer its own identity; None), else S/MIME's certificates, else (asked for by name) nothing."""
    from plexus import identity
    from plexus.mediator import smime

    if options.get(Name.IDENTITY):
        if options.flag(Name.ACCEPT):  # each peer proves its own identity (SessionConfig.serving)
            me = own_identity(options)
            assert me is not None
            return me, identity.PeerCheck(None) if options.flag(Name.ANONYMOUS) else None
        return pinned_identities(options)
    if smime_files is not None:
        keys = smime.Keys.load(smime_files)
        return keys.identity(), keys.peer_check()
    if options.flag(Name.ANONYMOUS):
        log.warning("streams are anonymous (--anonymous): whoever reads the mailbox can reach the targets")
        return identity.Identity.ephemeral(), identity.PeerCheck(None)
    raise UsageError(NO_IDENTITY)


def pinned_identities(options: Options) -> tuple[identity.Identity, identity.PeerCheck]:
    """--identity (made on first use) and --peer-identity, both required."""
    from plexus import identity

    key_file = options.require(Name.IDENTITY)
    pinned = options.values(Name.PEER_IDENTITY)
    if not pinned:
        raise UsageError(NO_PEER_IDENTITY)
    me = identity.Identity.load(Path(key_file).expanduser())
    return me, identity.PeerCheck(identity.parse_id(pinned[0], options.origin(Name.PEER_IDENTITY)))


def own_identity(options: Options) -> identity.Identity | None:
    """--identity's key, made on first use; None without it."""
    from plexus import identity

    key_file = options.get(Name.IDENTITY)
    return identity.Identity.load(Path(key_file).expanduser()) if key_file else None


def rendezvous_kinds(options: Options) -> tuple[str, ...]:
    """How the peers meet: --rendezvous (an acceptor may give both), else the DHT with --dht-bootstrap,
    else mail."""
    choices = OPTIONS[Name.RENDEZVOUS].check
    assert isinstance(choices, Choice)
    given = [value.lower() for value in options.values(Name.RENDEZVOUS)]
    for value in given:
        if value not in choices.choices:
            raise UsageError(f"{options.origin(Name.RENDEZVOUS)} must be email or dht, not {value!r}")
    kinds = tuple(dict.fromkeys(given)) or ("dht" if options.values(Name.DHT_BOOTSTRAP) else "email",)
    if len(kinds) > 1 and not options.flag(Name.ACCEPT):
        raise UsageError(
            f"{options.origin(Name.RENDEZVOUS)}: an inviter meets its peer one way (email or dht)"
        )
    return kinds


def peer_roster(options: Options, kinds: tuple[str, ...]) -> peers.Roster:
    """Who this side meets. An acceptor: each --peer-id and --peer-identity, and --peers FILE's lines. An
    inviter: its one peer, by --peer-id on mail (pinned by --peer-identity when mail is signed) or by
    --peer-identity on the DHT."""
    from plexus import identity, peers

    ids, pinned = options.values(Name.PEER_ID), options.values(Name.PEER_IDENTITY)
    if options.flag(Name.ACCEPT):
        roster = peers.Roster(peers.given(ids, pinned), options.path(Name.PEERS))
        roster.check(functools.partial(_unmet, kinds))
        return roster
    if options.get(Name.PEERS):
        raise UsageError("--peers lists the peers an acceptor serves: an inviter names its one peer")
    for name, values in ((Name.PEER_ID, ids), (Name.PEER_IDENTITY, pinned)):
        if len(values) > 1:
            raise UsageError(f"{options.origin(name)}: an inviter has one peer, not {len(values)}")
    if kinds == ("dht",):
        if not pinned:
            raise UsageError(NO_PEER_IDENTITY)
        return peers.Roster.of(peers.Peer(pinned[0], identity=identity.parse_id(pinned[0])))
    if not ids:
        raise UsageError("missing --peer-id (give it on the command line or in --config)")
    if options.get(Name.IDENTITY) and not pinned:  # mail is signed, and the peer's must be
        raise UsageError(NO_PEER_IDENTITY)
    check = identity.parse_id(pinned[0], options.origin(Name.PEER_IDENTITY)) if pinned else None
    return peers.Roster.of(peers.Peer(ids[0], id=ids[0], identity=check))


def _unmet(kinds: tuple[str, ...], listed: peers.Peers) -> None:
    """Warn of a peer no rendezvous of this acceptor meets: one known by identity alone when it meets by mail
    alone, or by mail id alone when it meets on the DHT alone."""
    for peer in listed.known:
        if peer.id is None and "dht" not in kinds:
            unmet = "its identity only, and this acceptor is not on the DHT"
        elif peer.identity is None and "email" not in kinds:
            unmet = "its mail id only, and this acceptor reads no mailbox"
        else:
            continue
        log.warning("peer %s cannot connect: it is known by %s (--rendezvous=email,dht)", peer, unmet)


def rendezvous_configs(
    options: Options, kinds: tuple[str, ...], roster: peers.Roster
) -> tuple[MailConfig | DhtConfig, ...]:
    """Where this side meets its peers (`kinds`: by mail, on the DHT, or an acceptor's both), one roster."""
    return tuple(
        mail_config(options, roster) if kind == "email" else dht_config(options, roster) for kind in kinds
    )


def dht_config(options: Options, roster: peers.Roster) -> DhtConfig:
    from plexus.mediator import dht
    from plexus.mediator.dhtnode import DhtConfig

    nodes = options.values(Name.DHT_BOOTSTRAP)
    if not nodes:
        raise UsageError("the DHT rendezvous needs --dht-bootstrap=HOST[:PORT] (a node of the DHT to join)")
    try:
        bootstrap = tuple(Endpoint.parse(node, dht.DEFAULT_PORT) for node in nodes)
    except ValueError as error:
        raise UsageError(f"{options.origin(Name.DHT_BOOTSTRAP)}: {error}") from error
    me = own_identity(options)
    if me is None:
        raise UsageError("missing --identity=FILE (made on first use): on the DHT hosts are known by it")
    return DhtConfig(
        identity=me,
        peers=roster,
        bootstrap=bootstrap,
        port=options.whole(Name.DHT_PORT, dht.DEFAULT_PORT),
        network=options.whole(Name.DHT_NETWORK),
    )
