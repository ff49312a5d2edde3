"""This host's address changes (plexus/netwatch.py): the netlink messages counted, fuzzed as any input is."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from plexus import netwatch
from tests.fuzz import FUZZ


def message(kind: int, body: bytes = b"\0" * 8) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, 0, 0, 0) + body + b"\0" * (-length % 4)


def test_new_and_deleted_addresses_are_counted_and_nothing_else() -> None:
    data = message(netwatch.RTM_NEWADDR) + message(24, b"\0" * 5) + message(netwatch.RTM_DELADDR)
    assert netwatch.address_changes(data) == 2
    assert netwatch.address_changes(message(16)) == 0  # RTM_NEWLINK


def test_a_message_cut_short_ends_the_count() -> None:
    whole = message(netwatch.RTM_NEWADDR)
    assert netwatch.address_changes(whole + whole[:10]) == 1
    assert netwatch.address_changes(struct.pack("=IHHII", 8, netwatch.RTM_NEWADDR, 0, 0, 0)) == 0


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_give_a_count_and_nothing_else(data: bytes) -> None:
    assert 0 <= netwatch.address_changes(data) <= len(data) // 16


async def test_watching_where_the_platform_lets_it_and_leaving_cleanly() -> None:
    changes: list[None] = []
    with netwatch.watching(lambda: changes.append(None)):
        pass
    assert changes == []
