"""The small DER reader under the CMS verification."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plexus.mediator import der


def test_reads_nested_elements() -> None:
    data = bytes.fromhex("30090603 2a86480202 0100")  # SEQUENCE { OID 1.2.840, INTEGER 256 }
    oid, number = der.read_one(data).expect(der.SEQUENCE).children()
    assert der.oid(oid) == "1.2.840"
    assert der.integer(number) == 256


def test_long_form_length() -> None:
    data = bytes([der.OCTET_STRING, 0x81, 200]) + b"x" * 200
    assert der.read_one(data).value == b"x" * 200


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x30",
        b"\x30\x05\x01",
        b"\x30\x80\x00\x00",
        b"\x04\x01ab",
        b"\x1f\x01\x00",
        b"\x30\x85\x01\x01\x01\x01\x01",
    ],
)
def test_malformed_input_is_refused(data: bytes) -> None:
    with pytest.raises(der.DerError):
        der.read_one(data)


def test_times() -> None:
    utc = der.Tlv(der.UTC_TIME, b"261122040000Z", b"")
    general = der.Tlv(der.GENERALIZED_TIME, b"20261122040000.5Z", b"")
    assert der.time(utc) == datetime.datetime(2026, 11, 22, 4, 0, tzinfo=datetime.UTC)
    assert der.time(general) == datetime.datetime(2026, 11, 22, 4, 0, 0, 500000, tzinfo=datetime.UTC)
    with pytest.raises(der.DerError):
        der.time(der.Tlv(der.UTC_TIME, b"yesterday", b""))


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        items = der.read_all(data)
    except der.DerError:
        return
    assert b"".join(item.encoded for item in items) == data
