"""The plexus command line, compatible with plexus 2.2's option names, plus --explore: a thin layer that
builds typer's command from the table of options (plexus.options), sets up logging, and runs the session.

Every failure ends here as one line on stderr and a distinct exit code (plexus.errors.ExitCode); typer/click
parse the options, but their multi-line usage boxes are replaced by that one line too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from plexus import __version__, files
from plexus.endpoint import ANY4, ANY6
from plexus.errors import STOP_SIGNALS, ExitCode, Interrupted, NoAcceptorError, PlexusError, UsageError
from plexus.options import (
    LOG_LEVELS,
    PASSWORDS,
    Name,
    Options,
    session_config,
    turn_config,
)

# The rest loads where a path needs it: --version and --help load no network library, an email session no
# OpenDHT, a DHT session no mail client.
if TYPE_CHECKING:
    from plexus.session import SessionConfig
    from plexus.status import Status

log = logging.getLogger("plexus")

# exec/ beside plexus/ in the repository; plexus/examples links to it, so wheels, sdists and editable installs
# all carry it as the package's data.
EXAMPLES = (Path(__file__).resolve().parent / "examples").resolve()
# What --version and --examples print: answered here when alone, before typer loads, else by typer.
QUICK = {"--version": lambda: f"plexus {__version__}", "--examples": lambda: str(EXAMPLES)}
T = TypeVar("T")


def show_id(options: Options) -> None:
    from plexus import identity

    key_file = options.get(Name.IDENTITY)
    if not key_file:
        raise UsageError("--show-id needs --identity=FILE (made on first use)")
    print(identity.Identity.load(Path(key_file).expanduser()).id)


def show_status(options: Options) -> None:
    """--status: the acceptor of --host-id, else of --identity (a DHT acceptor's host id is its identity's
    id), else every acceptor this user runs here."""
    from plexus import status

    host_id = options.get(Name.HOST_ID)
    key_file = options.get(Name.IDENTITY)
    if not host_id and key_file:
        from plexus import identity

        path = Path(key_file).expanduser()
        if not path.exists():  # an acceptor would have made it; --status must not
            raise NoAcceptorError(f"no acceptor runs with --identity {path}: there is no such file")
        host_id = identity.Identity.load(path).id
    print(status.show(host_id or None))


@contextlib.contextmanager
def reporting(
    config_: SessionConfig, accepting: bool
) -> Iterator[tuple[SessionConfig, Callable[[], None] | None]]:
    """The session's config with its sinks: PLEXUS_EVENTS's JSON lines (the lab tests and bench/ read them)
    and, for an acceptor, its status file (`plexus --status`), which is removed when it ends; and for an
    acceptor what SIGHUP does: read --peers again (its sessions run on), reported as a Reloaded event (the
    status file shows the peers it serves now)."""
    from plexus import events

    sinks: list[events.Sink] = []
    if (lines := events.JsonLines.from_environment()) is not None:
        sinks.append(lines)
    status: Status | None = None
    if accepting:
        from plexus.status import Status

        status = Status(config_.rendezvous.host_id, config_.rendezvous.peers)
        sinks.append(status)
    reported = config_.reporting(events.tee(*sinks)) if sinks else config_

    def reload() -> None:
        reported.on_event(reported.rendezvous.peers.reload())

    try:
        yield reported, (reload if accepting else None)
    finally:
        if status is not None:
            status.close()


def setup_logging(options: Options) -> None:
    # With --stdio, stderr is the terminal of the ssh session plexus carries: only problems belong there.
    level_name = options.choice(Name.LOG_LEVEL, "warning" if options.get(Name.STDIO) else "info")
    logging.addLevelName(LOG_LEVELS["trace"], "TRACE")
    log_file = Path(name).expanduser() if (name := options.get(Name.LOG_FILE)) else None
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
        login = options.get(Name.EMAIL_LOGIN) or ""
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
    import base64

    found |= {base64.b64encode(value).decode("ascii") for value in (secret.encode(), plain)}
    return found


async def explore(options: Options, as_json: bool) -> None:
    from plexus import api  # the library's explore: --explore is a thin layer over it

    inner, inner6 = options.stun_client(Name.STUN_CLIENT) if options.get(Name.STUN_CLIENT) else (ANY4, ANY6)
    found = await api.explore(
        options.endpoint(Name.STUN_SERVER), stun_client=inner, stun_client6=inner6, turn=turn_config(options)
    )
    print(found.json() if as_json else found)


def run_until_signal(
    main: Coroutine[Any, Any, T], *, streams: bool = False, reload: Callable[[], None] | None = None
) -> T:
    """Run the flow; SIGINT, SIGTERM or SIGHUP cancel it, so every `finally` and `async with` unwinds (mail
    sessions closed, commands stopped), and end it with Interrupted. As PID 1 (a container) SIGTERM would
    otherwise be ignored, and typer's own KeyboardInterrupt handling is not ours to rely on. With `reload`
    (an acceptor's), SIGHUP calls it instead, as a daemon's reload does."""
    import asyncio

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
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, reload)
        try:
            return await main
        except asyncio.CancelledError:
            if received:
                raise Interrupted(received[0]) from None
            raise

    # uvloop for streams: their QUIC is bound by the event loop's cost per datagram, and uvloop halves it.
    # Elsewhere asyncio's own loop does as well, and a session starts 17 ms sooner without loading uvloop.
    loop_factory = None
    if streams:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(guarded())


def run(**given: Any) -> None:
    """Connect two hosts behind NATs: STUN, an email rendezvous, UDP hole punching, then your command."""
    options = Options.read({name.replace("_", "-"): value for name, value in given.items()})
    setup_logging(options)
    accepting, exploring = options.flag(Name.ACCEPT), options.flag(Name.EXPLORE)
    if exploring:
        run_until_signal(explore(options, options.flag(Name.JSON)))
        return
    if options.flag(Name.SHOW_ID):
        show_id(options)
        return
    if options.flag(Name.STATUS):
        show_status(options)
        return
    from plexus import api

    # A normal end by signal: a service manager stopping the acceptor, ssh ending its ProxyCommand (--stdio).
    normal_end = signal.SIGTERM if accepting else signal.SIGHUP if options.get(Name.STDIO) else None
    with reporting(session_config(options), accepting) as (config_, reload):
        try:
            run_until_signal(
                api.serve(config_) if accepting else api.connect(config_),
                streams=config_.streams is not None,
                reload=reload,
            )
        except Interrupted as stopped:
            if stopped.signum != normal_end:
                raise
            log.info("stopped")


def parse(argv: Sequence[str]) -> Options:
    """The options of a command line, as run() would get them (with --config's); a UsageError, or typer's,
    for a bad one. For tests and programs that build configs as a user would write them."""
    from plexus.command import command

    with command(run, QUICK).make_context("plexus", list(argv), resilient_parsing=False) as context:
        return Options.read({name.replace("_", "-"): value for name, value in context.params.items()})


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1 and (answer := QUICK.get(args[0])) is not None:
        print(answer())  # before typer loads: `plexus --version` in a script, `$(plexus --examples)` in setup
        sys.exit(ExitCode.OK)
    # Until the event loop takes over, SIGTERM ends the run as SIGINT does (as PID 1 it would be ignored).
    signal.signal(signal.SIGTERM, _terminated)
    import typer

    from plexus.command import command

    try:
        command(run, QUICK).main(args=args, prog_name="plexus", standalone_mode=False)
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
