"""The start of each QUIC stream: which target the inviter asks for, and the acceptor's verdict.

Sans-I/O: frames are built to bytes and read back from whatever bytes have arrived. A frame is a code (one
byte), a length (two bytes, big-endian) and that many bytes of UTF-8. The inviter opens a stream with an OPEN
frame naming `host:port`; the acceptor answers with one status frame (its text a reason) and, on CONNECTED,
both sides then carry the TCP connection's bytes as they are, a FIN for a TCP half-close. docs/streams.md
has the byte layout.
"""

from __future__ import annotations

import ipaddress
import struct
from enum import IntEnum

from plexus.endpoint import Endpoint
from plexus.errors import UsageError
from plexus.targets import Target

ALPN = "plexus-streams/1"
MAX_TEXT = 1024  # a target or a reason: far more than any real one
_HEAD = struct.Struct("!BH")


class Code(IntEnum):
    OPEN = 0x01  # inviter -> acceptor: the target
    CONNECTED = 0x10  # acceptor -> inviter: the bytes that follow are the target's
    NOT_ALLOWED = 0x11  # the target is not in --forward-allow
    UNREACHABLE = 0x12  # allowed, but connecting to it failed (the reason says how)
    BAD_REQUEST = 0x13  # not an OPEN frame, or a target that does not parse


class FrameError(ValueError):
    pass


def frame(code: Code, text: str = "") -> bytes:
    # Cut at MAX_TEXT bytes, but never inside a character: the frame must read back.
    data = text.encode("utf-8")[:MAX_TEXT].decode("utf-8", "ignore").encode("utf-8")
    return _HEAD.pack(code, len(data)) + data


def read_frame(buffer: bytes) -> tuple[Code, str, bytes] | None:
    """The first frame in `buffer` and the bytes after it, or None while it is incomplete."""
    if len(buffer) < _HEAD.size:
        return None
    raw, length = _HEAD.unpack_from(buffer)
    if length > MAX_TEXT:
        raise FrameError(f"frame of {length} bytes (at most {MAX_TEXT})")
    end = _HEAD.size + length
    if len(buffer) < end:
        return None
    try:
        code = Code(raw)
        text = buffer[_HEAD.size : end].decode("utf-8")
    except (ValueError, UnicodeDecodeError) as error:
        raise FrameError(f"unreadable frame (code {raw:#04x})") from error
    return code, text, buffer[end:]


def open_frame(target: Target) -> bytes:
    return frame(Code.OPEN, str(target))


def read_open(buffer: bytes) -> tuple[Target, bytes] | None:
    """The target an OPEN frame asks for; FrameError for anything else."""
    found = read_frame(buffer)
    if found is None:
        return None
    code, text, rest = found
    if code is not Code.OPEN:
        raise FrameError(f"expected OPEN, got {code.name}")
    try:
        return Target.parse(text, "target"), rest
    except UsageError as error:
        raise FrameError(str(error)) from error


# Control datagrams: QUIC DATAGRAM frames (RFC 9221) between the two ends of a link, outside every stream.
# Each is CONTROL_MAGIC, a code (one byte) and its text. The one code so far is CANDIDATE: the sender's
# endpoint that its NAT maps endpoint-independently now, as its STUN server saw it (`ip:port`, IPv6 in
# brackets), where a relayed session may go directly (plexus/streams/direct.py). The QUIC connection
# authenticates them; a peer's malformed one is still only dropped.
CONTROL_MAGIC = b"PXC1"
CONTROL_LIMIT = 64  # bytes of a control datagram: the longest candidate is under 60
CANDIDATE = 0x01


def candidate_frame(endpoint: Endpoint) -> bytes:
    return CONTROL_MAGIC + bytes([CANDIDATE]) + str(endpoint.canonical()).encode("ascii")


def read_candidate(data: bytes) -> Endpoint:
    """The endpoint a CANDIDATE control datagram names; FrameError for anything else."""
    if len(data) > CONTROL_LIMIT or data[:5] != CONTROL_MAGIC + bytes([CANDIDATE]):
        raise FrameError("not a candidate control datagram")
    try:
        endpoint = Endpoint.parse(data[5:].decode("ascii"))
        ipaddress.ip_address(endpoint.host)
    except ValueError as error:
        raise FrameError(f"a candidate that is not an IP endpoint: {data[5:]!r}") from error
    if not endpoint.port:
        raise FrameError("a candidate with port 0")
    return endpoint.canonical()
