"""The stream frames an acceptor reads from its peer (plexus/streams/wire.py), fuzzed: whatever arrives, only
FrameError (the module's own rejection) comes out, and what does parse names a well-formed target."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plexus.streams import wire
from plexus.streams.wire import Code, FrameError
from plexus.targets import Target
from tests.fuzz import FUZZ

_texts = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"\[?[0-9a-fA-F:.]{0,40}\]?:[0-9\u00b2\u0663\u0e53]{0,7}", fullmatch=True),
    st.builds(lambda host, port: f"{host}:{port}", st.text(max_size=30), st.integers(-5, 70000)),
)


def _check(found: tuple[Target, bytes] | None) -> None:
    if found is None:
        return
    target, _ = found
    assert 0 < target.port < 65536
    assert target.host and target.host == target.host.strip()


@FUZZ
@given(st.binary(max_size=1100))
def test_any_bytes_read_as_an_open_frame_or_are_refused(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        _check(wire.read_open(data))


@FUZZ
@given(st.integers(0, 255), _texts, st.binary(max_size=16))
def test_framed_texts_read_as_an_open_frame_or_are_refused(code: int, text: str, tail: bytes) -> None:
    data = text.encode("utf-8", "surrogatepass")[: wire.MAX_TEXT + 8]
    buffer = struct.pack("!BH", code, len(data)) + data + tail
    with contextlib.suppress(FrameError):
        _check(wire.read_open(buffer))
    try:
        found = wire.read_frame(buffer)
    except FrameError:
        return
    if found is not None:
        assert found[0] in Code


@pytest.mark.parametrize("text", ["h:\u00b2", "h:\u0663", "[::1]:\u0e53", "0 :1", "a b:22", "[::1 ]:22"])
def test_a_malformed_target_is_refused(text: str) -> None:
    """A port in another script's digits; whitespace inside a host (Hypothesis found "0 :1" read as host
    "0 ": whitespace around a target is stripped, not inside it)."""
    with pytest.raises(FrameError):
        wire.read_open(wire.frame(Code.OPEN, text))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=80),
        st.builds(lambda text: wire.CONTROL_MAGIC + bytes([wire.CANDIDATE]) + text.encode(), _texts),
    )
)
def test_any_control_datagram_reads_as_a_candidate_or_is_refused(data: bytes) -> None:
    """A peer's control datagram (inside QUIC, but a peer's all the same): a candidate names an IP endpoint
    with a port, in its one spelling, or the datagram is refused."""
    with contextlib.suppress(FrameError):
        found = wire.read_candidate(data)
        assert 0 < found.port < 65536 and found == found.canonical()
        assert wire.read_candidate(wire.candidate_frame(found)) == found
