"""Failures plexus reports to its user: each has a one-line message and a distinct exit code.

A cron script reacts to the code, so the codes are part of the interface (docs/failures.md lists them).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # anything not classified below
    USAGE = 2  # bad or missing option, a named file that does not exist
    NAT_UNSUITABLE = 3  # mapping is not endpoint-independent: punching cannot work
    STUN_FAILED = 4  # no usable answer from the STUN server
    MAIL_TIMEOUT = 5  # the peer did not answer by mail within the deadline
    MAIL_AUTH = 6  # the mail server refused the login
    MAIL_UNREACHABLE = 7  # connection or TLS to the mail server failed
    HANDSHAKE_TIMEOUT = 8  # endpoints exchanged, but no handshake through the NATs
    LAUNCH_FAILED = 9  # the command could not be started
    COMMAND_FAILED = 10  # inviter: the launched command exited non-zero within the watch window
    PEER_REFUSED = 11  # inviter: the acceptor replied that it cannot serve this request (its reason follows)
    INTERRUPTED = 130  # SIGINT (Ctrl-C), 128 + 2 as shells report it
    TERMINATED = 143  # SIGTERM, 128 + 15; an acceptor stopped by SIGTERM exits OK instead (a service's stop)


class PlexusError(Exception):
    """Base class: str(error) is the one line shown to the user."""

    exit_code: ExitCode = ExitCode.ERROR


class UsageError(PlexusError):
    exit_code = ExitCode.USAGE


class NatUnsuitableError(PlexusError):
    exit_code = ExitCode.NAT_UNSUITABLE


class StunError(PlexusError):
    exit_code = ExitCode.STUN_FAILED


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


class CommandFailedError(PlexusError):
    exit_code = ExitCode.COMMAND_FAILED


class PeerRefusedError(PlexusError):
    exit_code = ExitCode.PEER_REFUSED
