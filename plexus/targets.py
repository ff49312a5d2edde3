"""What a stream may reach: a target as --forward-allow, --stdio, --forward and a peer's allow= write it
(HOST:PORT), and the set an acceptor allows. The streams' OPEN frame names one (plexus/streams/wire.py);
the acceptor's options and its peers (plexus/peers.py) list them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from plexus.errors import UsageError

# [0-9]{1,5}, not \d+: \d takes any script's digits (int() reads them), and a 5000-digit port breaks int().
_TARGET = re.compile(
    r"\[(?P<v6>[^\]\s]+)\]:(?P<v6port>[0-9]{1,5})|(?P<host>[^\[\]:\s]+):(?P<port>[0-9]{1,5})"
)


@dataclass(frozen=True)
class Target:
    """HOST:PORT, as written in --forward-allow, --stdio and --forward: a name, IPv4, or [IPv6]."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, option: str) -> Target:
        match = _TARGET.fullmatch(text.strip())
        if match is None:
            raise UsageError(f"{option} {text!r}: expected HOST:PORT ([ADDRESS]:PORT for IPv6)")
        host = match.group("v6") or match.group("host")
        port = int(match.group("v6port") or match.group("port"))
        if not 0 < port < 65536:
            raise UsageError(f"{option} {text!r}: port {port} is not 1-65535")
        if match.group("v6") is not None:
            try:
                host = str(ipaddress.IPv6Address(host))
            except ValueError as error:
                raise UsageError(f"{option} {text!r}: {host!r} is not an IPv6 address") from error
        return cls(host.lower(), port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Allowed:
    """--forward-allow: exactly these targets, as written (a name is not resolved to match an address);
    none listed, none reachable."""

    targets: frozenset[Target]

    @classmethod
    def of(cls, targets: Iterable[Target]) -> Allowed:
        return cls(frozenset(targets))

    def permits(self, target: Target) -> bool:
        return target in self.targets
