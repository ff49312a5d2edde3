"""This host's addresses changing under a running session (Linux's rtnetlink; elsewhere nothing is watched).

A laptop that moves from Wi-Fi to tethering gets a new address on a new interface: what it sent from the old
one is gone, and the NAT in front of the new one maps it anew. The kernel says so at once (RTM_NEWADDR,
RTM_DELADDR to the RTMGRP_*_IFADDR groups), sooner than an unanswered packet would (plexus/resume.py's
`suspect`), so a session asks its STUN server where it is as soon as an address comes or goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RTM_NEWADDR, RTM_DELADDR = 20, 21
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id (host byte order)


def address_changes(data: bytes) -> int:
    """How many of the netlink messages in `data` say an address came or went; stops at the first that is
    cut short or malformed (the kernel's, but read as any input is)."""
    found, offset = 0, 0
    while offset + _HEADER.size <= len(data):
        length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            break
        found += kind in (RTM_NEWADDR, RTM_DELADDR)
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return found


@contextlib.contextmanager
def watching(on_change: Callable[[], None]) -> Iterator[None]:
    """Within it, `on_change()` whenever an IPv4 or IPv6 address of this host comes or goes; where netlink
    is not there (not Linux, a sandbox), nothing."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        sock.setblocking(False)
    except (AttributeError, OSError) as error:  # AF_NETLINK is Linux's
        log.debug("not watching this host's addresses: %s", error)
        yield
        return
    loop = asyncio.get_running_loop()

    def readable() -> None:
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # ENOBUFS: the kernel dropped some; something changed all the same
                log.debug("netlink: %s", error)
                on_change()
                return
            if address_changes(data):
                log.info("an address of this host came or went: asking where this side is now")
                on_change()

    loop.add_reader(sock.fileno(), readable)
    try:
        yield
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
