"""A UDP endpoint as the protocol names them: inner (own socket), outer (its public mapping), peer."""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

_PORT = re.compile(r"[0-9]{1,5}")  # ASCII: str.isdigit takes '²', which int() then refuses


class Endpoint(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Endpoint:
        """Parse HOST:PORT (or [V6]:PORT); HOST alone when a default port is given."""
        text = text.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep:
                raise ValueError(f"bad endpoint {text!r}: missing ']'")
            if rest and not rest.startswith(":"):
                raise ValueError(f"bad endpoint {text!r}: expected ':' after ']'")
            port_text = rest[1:] if rest else None
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        else:
            host, port_text = text, None
        if not host:
            raise ValueError(f"bad endpoint {text!r}: no host")
        if port_text is None:
            if default_port is None:
                raise ValueError(f"bad endpoint {text!r}: expected HOST:PORT")
            return cls(host, default_port)
        if not _PORT.fullmatch(port_text) or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"bad endpoint {text!r}: port must be 0-65535")
        return cls(host, int(port_text))

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def canonical(self) -> Endpoint:
        """The same endpoint with one spelling per IP (IPv6 has many), so that endpoints compare equal when
        their addresses are; a hostname stays as it is."""
        return Endpoint(canonical_ip(self.host), self.port)


ANY4 = Endpoint("0.0.0.0", 0)  # every IPv4 address, a port the system chooses
ANY6 = Endpoint("::", 0)


def canonical_ip(host: str) -> str:
    """`host` in the one spelling of its IP address; a hostname as it is."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host
