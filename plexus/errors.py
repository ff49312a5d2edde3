"""Failures plexus reports to its user: each has a one-line message and a distinct exit code.

A cron script reacts to the code, so the codes are part of the interface (docs/failures.md lists them).
"""

from __future__ import annotations

import signal
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # anything not classified below
    USAGE = 2  # bad or missing option, a named file that does not exist
    NAT_UNSUITABLE = 3  # no way through: this NAT maps per destination and the peer can only punch directly
    STUN_FAILED = 4  # no usable answer from the STUN server
    MAIL_TIMEOUT = 5  # the peer did not answer by mail within the deadline
    MAIL_AUTH = 6  # the mail server refused the login
    MAIL_UNREACHABLE = 7  # connection or TLS to the mail server failed
    HANDSHAKE_TIMEOUT = 8  # endpoints exchanged, but no handshake through the NATs
    LAUNCH_FAILED = 9  # the command could not be started
    COMMAND_FAILED = 10  # inviter: the launched command exited non-zero within the watch window
    PEER_REFUSED = 11  # inviter: the acceptor replied that it cannot serve this request (its reason follows)
    TURN_AUTH = 12  # the TURN server refused the user name or password
    TURN_UNREACHABLE = 13  # no answer from the TURN server
    TURN_REFUSED = 14  # the TURN server answered but refused the allocation or a request on it, or dropped it
    PEER_IDENTITY = 15  # streams: the peer proved another identity than the one pinned
    TARGET_REFUSED = 16  # streams: the acceptor refused the target (not allowed, or it could not connect)
    STREAMS_LOST = 17  # streams: the encrypted connection failed or went silent (idle timeout)
    PEER_NOT_FOUND = 18  # DHT: the peer's card or its response did not appear within --response-timeout
    DHT_UNREACHABLE = 19  # DHT: no node answered (--dht-bootstrap)
    UDP_BLOCKED = 20  # no UDP gets out (STUN answers over TCP only), and no TURN relay over TCP or TLS
    PEER_LOST = 21  # streams, --carry: this side moved (a new network, a NAT mapped anew), rebinds unanswered
    NO_ACCEPTOR = 22  # --status: no acceptor runs here as this user (it left no status file)
    HANGUP = 129  # SIGHUP, 128 + 1: the terminal went away (with --stdio: ssh's normal end, exit OK instead)
    INTERRUPTED = 130  # SIGINT (Ctrl-C), 128 + 2 as shells report it
    TERMINATED = 143  # SIGTERM, 128 + 15; an acceptor stopped by SIGTERM exits OK instead (a service's stop)


# One line per code for `plexus --help`; docs/failures.md says the same at length.
MEANINGS = {
    ExitCode.OK: "inviter: connected, command launched and still running after 1 s; acceptor: stopped",
    ExitCode.ERROR: "an unexpected error (the log at --log-level=debug has the details)",
    ExitCode.USAGE: "a bad or missing option, config line or file",
    ExitCode.NAT_UNSUITABLE: "no way through: a symmetric NAT here and a plexus 2.2 peer",
    ExitCode.STUN_FAILED: "the STUN server did not answer",
    ExitCode.MAIL_TIMEOUT: "no response by mail within --response-timeout",
    ExitCode.MAIL_AUTH: "the mail server refused the login",
    ExitCode.MAIL_UNREACHABLE: "cannot connect to the mail server, or its TLS failed",
    ExitCode.HANDSHAKE_TIMEOUT: "endpoints exchanged, but no handshake crossed the NATs",
    ExitCode.LAUNCH_FAILED: "the command could not be started",
    ExitCode.COMMAND_FAILED: "the command exited non-zero within 1 s of its launch",
    ExitCode.PEER_REFUSED: "the acceptor replied that it cannot serve the request (its reason follows)",
    ExitCode.TURN_AUTH: "the TURN server refused the user name or password",
    ExitCode.TURN_UNREACHABLE: "the TURN server did not answer",
    ExitCode.TURN_REFUSED: "the TURN server refused the relay (quota, policy) or lost the allocation",
    ExitCode.PEER_IDENTITY: "streams: the peer is not the identity pinned (--peer-identity, --smime-peer)",
    ExitCode.TARGET_REFUSED: "streams: the acceptor refused the target (not allowed there, or unreachable)",
    ExitCode.STREAMS_LOST: "streams: the encrypted connection to the peer could not be set up or was lost",
    ExitCode.PEER_NOT_FOUND: "DHT: the peer is not there (no card), or no response within --response-timeout",
    ExitCode.DHT_UNREACHABLE: "DHT: no node answered (--dht-bootstrap, UDP egress)",
    ExitCode.UDP_BLOCKED: "no UDP gets out: a TURN relay over TCP or TLS would carry it (--turn-server)",
    ExitCode.PEER_LOST: "this side moved (streams, --carry) and the peer did not answer its rebinds",
    ExitCode.NO_ACCEPTOR: "--status: no acceptor runs here as this user",
    ExitCode.HANGUP: "hung up (SIGHUP): the terminal closed (--stdio: ssh's normal end, exit 0)",
    ExitCode.INTERRUPTED: "interrupted (SIGINT, Ctrl-C)",
    ExitCode.TERMINATED: "terminated (SIGTERM) before the session ended",
}


class PlexusError(Exception):
    """Base class: str(error) is the one line shown to the user."""

    exit_code: ExitCode = ExitCode.ERROR


class UsageError(PlexusError):
    exit_code = ExitCode.USAGE


class NatUnsuitableError(PlexusError):
    exit_code = ExitCode.NAT_UNSUITABLE


class StunError(PlexusError):
    exit_code = ExitCode.STUN_FAILED


class StunSilentError(StunError):
    """No answer at all from the STUN server (not a refusal, an unknown name, or no route)."""


class UdpBlockedError(StunError):
    """STUN answers over TCP but not over UDP, and no relay over TCP or TLS was given."""

    exit_code = ExitCode.UDP_BLOCKED


class MailTimeoutError(PlexusError):
    exit_code = ExitCode.MAIL_TIMEOUT


class MailAuthError(PlexusError):
    exit_code = ExitCode.MAIL_AUTH


class MailConnectionError(PlexusError):
    exit_code = ExitCode.MAIL_UNREACHABLE


class HandshakeTimeoutError(PlexusError):
    exit_code = ExitCode.HANDSHAKE_TIMEOUT


class LaunchError(PlexusError):
    exit_code = ExitCode.LAUNCH_FAILED


class Interrupted(PlexusError):
    """SIGINT or SIGTERM ended the run; the exit code tells which."""

    def __init__(self, signum: int) -> None:
        word, self.exit_code = _STOPS[signal.Signals(signum)]
        super().__init__(word)
        self.signum = signum


_STOPS = {
    signal.SIGINT: ("interrupted", ExitCode.INTERRUPTED),
    signal.SIGTERM: ("terminated", ExitCode.TERMINATED),
    signal.SIGHUP: ("hung up", ExitCode.HANGUP),
}
STOP_SIGNALS = tuple(_STOPS)


class CommandFailedError(PlexusError):
    exit_code = ExitCode.COMMAND_FAILED


class PeerRefusedError(PlexusError):
    exit_code = ExitCode.PEER_REFUSED


class TurnError(PlexusError):
    """The TURN server refused the allocation or a request on it (its error code follows), or lost it."""

    exit_code = ExitCode.TURN_REFUSED


class TurnAuthError(TurnError):
    exit_code = ExitCode.TURN_AUTH


class TurnUnreachableError(TurnError):
    exit_code = ExitCode.TURN_UNREACHABLE


class PeerIdentityError(PlexusError):
    exit_code = ExitCode.PEER_IDENTITY


class TargetRefusedError(PlexusError):
    exit_code = ExitCode.TARGET_REFUSED


class StreamsLostError(PlexusError):
    exit_code = ExitCode.STREAMS_LOST


class PeerLostError(PlexusError):
    exit_code = ExitCode.PEER_LOST


class NotServedError(PlexusError):
    """An acceptor's reason to refuse a request it is not configured for (the inviter exits PEER_REFUSED)."""


class SupersededError(PlexusError):
    """An acceptor's session given up for a newer request (session.Turn); only ever logged."""


class PeerNotFoundError(PlexusError):
    exit_code = ExitCode.PEER_NOT_FOUND


class DhtUnreachableError(PlexusError):
    exit_code = ExitCode.DHT_UNREACHABLE


class NoAcceptorError(PlexusError):
    exit_code = ExitCode.NO_ACCEPTOR
