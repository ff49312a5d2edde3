"""Who an acceptor serves: its peers, each known by its mail id (the subject of its mail, its --host-id) or by
its identity (its key on the DHT, and what its signed mail and its streams must prove), or both; each with a
name (the logs, `plexus --status`, and the command's %peer% and PLEXUS_PEER say it) and its own options.

They come from the command line (--peer-id, --peer-identity, each repeatable) and from --peers FILE, one peer
a line in the spirit of ssh's authorized_keys (docs/peers.md):

    # id or identity        name     options
    laptop                  laptop   identity=3u5...q  allow=127.0.0.1:22
    g4x...7a                phone    allow=127.0.0.1:22,127.0.0.1:8080
    work-pc                 work     exec-command=/etc/plexus/work.sh  exec-args="%innerport% %peerip%"

A first field that is a plexus id is an identity; anything else is a mail id. The Roster holds what is in
force and is read again on SIGHUP: a file that no longer reads leaves the peers as they were.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from plexus import events, files, identity, launcher
from plexus.errors import UsageError
from plexus.targets import Allowed, Target

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_ADDRESS = re.compile(r"[^\s@<>,;\"]+@[^\s@<>,;\"]+")
# The options a peer's line may give, after its id and name.
OPTIONS = ("identity", "email", "allow", "exec-command", "exec-args")
MAX_PEERS = 1000  # a peers file is a household's or a team's, not a directory: a longer one is a mistake
MAX_FILE = 1 << 20


@dataclass(frozen=True)
class Peer:
    """One peer: how it is known (`id` on mail, `identity` on the DHT and in signatures and streams; at least
    one), its name, and what differs for it from the acceptor's own options (None: the acceptor's)."""

    name: str
    id: str | None = None
    identity: str | None = None
    email: str | None = None  # its address, where it is not --email-to
    allowed: Allowed | None = None  # the targets its streams may reach, in place of --forward-allow
    command: launcher.Command | None = None  # what its sessions launch, in place of --exec-command

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Peers:
    """The peers in force, found by what a message names: its subject (mail) or its signer (the DHT)."""

    known: tuple[Peer, ...] = ()

    def __post_init__(self) -> None:
        for what, values in (
            ("name", [peer.name for peer in self.known]),
            ("id", [peer.id for peer in self.known if peer.id is not None]),
            ("identity", [peer.identity for peer in self.known if peer.identity is not None]),
        ):
            if len(set(values)) != len(values):
                twice = sorted({value for value in values if values.count(value) > 1})
                raise UsageError(f"two peers with the {what} {twice[0]!r}: each must be one peer's")

    def by_name(self, name: str) -> Peer | None:
        return next((peer for peer in self.known if peer.name == name), None)

    def by_id(self, mail_id: str) -> Peer | None:
        return next((peer for peer in self.known if peer.id == mail_id), None)

    def by_identity(self, pinned: str) -> Peer | None:
        return next((peer for peer in self.known if peer.identity == pinned), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(peer.name for peer in self.known)

    @property
    def only(self) -> Peer:
        """An inviter's one peer."""
        assert len(self.known) == 1, "an inviter has one peer"
        return self.known[0]


def given(ids: Iterable[str], identities: Iterable[str]) -> tuple[Peer, ...]:
    """The command line's peers: each --peer-id and each --peer-identity a peer named by it; one of each is
    one peer known both ways (its mail signed by that identity, its streams proving it), as before peers
    were many."""
    ids, pinned = list(ids), [identity.parse_id(text) for text in identities]
    if len(ids) == 1 and len(pinned) == 1:
        return (Peer(ids[0], ids[0], pinned[0]),)
    by_id = tuple(Peer(value, id=value) for value in ids)
    return by_id + tuple(Peer(value, identity=value) for value in pinned)


def parse(text: str, source: str) -> tuple[Peer, ...]:
    """The peers of a --peers file's text; UsageError naming `source` and the line for the first fault."""
    peers = []
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        try:
            words = shlex.split(line, comments=True)
        except ValueError as error:
            raise UsageError(f"{where}: {error}") from None
        if words:
            peers.append(_peer(words, where))
    if len(peers) > MAX_PEERS:
        raise UsageError(f"{source}: {len(peers)} peers, more than {MAX_PEERS}")
    try:
        Peers(tuple(peers))
    except UsageError as error:
        raise UsageError(f"{source}: {error}") from None
    return tuple(peers)


def _peer(words: list[str], where: str) -> Peer:
    if len(words) < 2:
        raise UsageError(f"{where}: a peer's line is its id or identity, then its name, then its options")
    first, name, *rest = words
    _single_line(first, where, "id")
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"{where}: name {name[:70]!r} is not 1-64 letters, digits and . _ @ + - (starting with a letter "
            "or digit)"
        )
    options: dict[str, str] = {}
    for word in rest:
        key, equals, value = word.partition("=")
        if not equals or key not in OPTIONS:
            raise UsageError(f"{where}: {word[:70]!r} is not one of {', '.join(o + '=' for o in OPTIONS)}")
        if key in options:
            raise UsageError(f"{where}: {key}= given twice")
        options[key] = value
    pinned = _identity(first, where) if _is_identity(first) else None
    if pinned is not None and "identity" in options:
        raise UsageError(f"{where}: {first} is an identity already: identity= is for a peer known by mail id")
    if "identity" in options:
        pinned = _identity(options["identity"], where)
    email = options.get("email")
    if email is not None and not _ADDRESS.fullmatch(email):
        raise UsageError(f"{where}: email={email[:70]!r} is not an address")
    allowed = None
    if "allow" in options:
        texts = [text for text in options["allow"].split(",") if text.strip()]
        allowed = Allowed.of(Target.parse(text, f"{where}: allow=") for text in texts)
    return Peer(
        name,
        id=None if _is_identity(first) else first,
        identity=pinned,
        email=email,
        allowed=allowed,
        command=_command(options, where),
    )


def _command(options: dict[str, str], where: str) -> launcher.Command | None:
    path = options.get("exec-command")
    if path is None:
        if "exec-args" in options:
            raise UsageError(f"{where}: exec-args= without exec-command=")
        return None
    try:
        launcher.check_executable(path)
        return launcher.Command(path, launcher.parse_args(options.get("exec-args")))
    except UsageError as error:
        raise UsageError(f"{where}: {error}") from None


def _is_identity(text: str) -> bool:
    try:
        identity.parse_id(text)
    except UsageError:
        return False
    return True


def _identity(text: str, where: str) -> str:
    try:
        return identity.parse_id(text, "identity")
    except UsageError as error:
        raise UsageError(f"{where}: {error}") from None


def _single_line(text: str, where: str, what: str) -> None:
    if any(not c.isprintable() for c in text):
        raise UsageError(f"{where}: the {what} {text[:70]!r} has characters that cannot be in a subject")


class Roster:
    """The peers an acceptor serves now: the command line's and its --peers file's. `reload` (on SIGHUP)
    reads the file again; sessions already running are not touched, whoever they serve."""

    def __init__(self, given: tuple[Peer, ...] = (), file: Path | None = None) -> None:
        self._given = given
        self.file = file
        self._checks: list[Callable[[Peers], None]] = []
        self.peers = self._read()
        if not self.peers.known:
            where = f" and {file} lists none" if file is not None else ""
            raise UsageError(f"no peer to serve: give --peer-id, --peer-identity or --peers FILE{where}")

    @classmethod
    def of(cls, *peers: Peer) -> Roster:
        return cls(peers)

    def check(self, judge: Callable[[Peers], None]) -> None:
        """Have `judge` (a rendezvous's: UsageError for peers it cannot serve) pass the peers now and those
        of every reload."""
        judge(self.peers)
        self._checks.append(judge)

    def _read(self) -> Peers:
        listed: tuple[Peer, ...] = ()
        if self.file is not None:
            try:
                with self.file.open("rb") as stream:
                    # It decides who may knock and what runs for them: no other user may change it.
                    files.check(os.fstat(stream.fileno()), f"--peers {self.file}", self.file, holds=None)
                    data = stream.read(MAX_FILE + 1)
            except OSError as error:
                raise UsageError(f"cannot read --peers {self.file}: {error.strerror}") from error
            if len(data) > MAX_FILE:
                raise UsageError(f"--peers {self.file} is over {MAX_FILE} bytes")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UsageError(f"--peers {self.file} is not UTF-8 ({error.reason})") from None
            listed = parse(text, str(self.file))
        try:
            peers = Peers(self._given + listed)
        except UsageError as error:
            where = "--peer-id, --peer-identity" if self.file is None else f"--peers {self.file}"
            raise UsageError(f"{where}: {error}") from None
        for judge in self._checks:
            judge(peers)
        return peers

    def reload(self) -> events.Reloaded:
        """Read --peers again; on a fault, say it once and keep the peers in force."""
        try:
            fresh = self._read()
        except UsageError as error:
            log.error("peers not reloaded, still serving %s: %s", ", ".join(self.peers.names), error)
            return events.Reloaded(role="accept", peers=self.peers.names, error=events.one_line(error))
        added = tuple(name for name in fresh.names if self.peers.by_name(name) is None)
        removed = tuple(name for name in self.peers.names if fresh.by_name(name) is None)
        self.peers = fresh
        log.info(
            "peers reloaded: %d (added: %s; removed: %s)",
            len(fresh.known),
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
        )
        return events.Reloaded(role="accept", peers=fresh.names, added=added, removed=removed)
