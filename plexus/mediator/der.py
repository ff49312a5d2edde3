"""A minimal DER reader: just enough to walk a CMS SignedData (RFC 5652) and verify it.

cryptography signs and encrypts CMS but cannot verify a signature, and one small reader is cheaper than a
new dependency. It reads definite lengths only: DER forbids the indefinite form, and a BER message from an old
tool is rejected rather than half-understood.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

SEQUENCE = 0x30
SET = 0x31
OID = 0x06
INTEGER = 0x02
OCTET_STRING = 0x04
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18


class DerError(ValueError):
    """The bytes are not the DER structure expected."""


@dataclass(frozen=True)
class Tlv:
    tag: int
    value: bytes
    encoded: bytes  # the whole element, tag and length included: signatures cover encodings

    def children(self) -> list[Tlv]:
        if not self.tag & 0x20:
            raise DerError(f"tag 0x{self.tag:02x} is not constructed")
        return read_all(self.value)

    def expect(self, tag: int) -> Tlv:
        if self.tag != tag:
            raise DerError(f"expected tag 0x{tag:02x}, found 0x{self.tag:02x}")
        return self


def read(data: bytes, offset: int = 0) -> tuple[Tlv, int]:
    """Read one element at offset; return it and the offset after it."""
    if offset + 2 > len(data):
        raise DerError("truncated element")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DerError("multi-byte tags are not used by CMS")
    length = data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4:
            raise DerError("indefinite or oversized length")
        if start + count > len(data):
            raise DerError("truncated length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise DerError("element longer than its container")
    return Tlv(tag, data[start:end], data[offset:end]), end


def read_all(data: bytes) -> list[Tlv]:
    items = []
    offset = 0
    while offset < len(data):
        item, offset = read(data, offset)
        items.append(item)
    return items


def read_one(data: bytes) -> Tlv:
    item, end = read(data)
    if end != len(data):
        raise DerError("trailing bytes after element")
    return item


def oid(tlv: Tlv) -> str:
    value = tlv.expect(OID).value
    if not value or value[-1] & 0x80:
        raise DerError("malformed object identifier")
    arcs: list[int] = []
    current = 0
    for byte in value:
        current = (current << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(current)
            current = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])


def integer(tlv: Tlv) -> int:
    return int.from_bytes(tlv.expect(INTEGER).value, "big", signed=True)


def time(tlv: Tlv) -> datetime.datetime:
    """UTCTime or GeneralizedTime, as CMS signingTime uses them (always UTC, 'Z')."""
    text = tlv.value.decode("ascii", "replace")
    if tlv.tag == UTC_TIME:
        formats = ["%y%m%d%H%M%SZ"]
    elif tlv.tag == GENERALIZED_TIME:
        formats = ["%Y%m%d%H%M%SZ", "%Y%m%d%H%M%S.%fZ"]
    else:
        raise DerError(f"tag 0x{tlv.tag:02x} is not a time")
    for pattern in formats:
        try:
            return datetime.datetime.strptime(text, pattern).replace(tzinfo=datetime.UTC)
        except ValueError:
            continue
    raise DerError(f"malformed time {text!r}")
