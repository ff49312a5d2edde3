import pytest
from hypothesis import given
from hypothesis import strategies as st

from plexus.endpoint import Endpoint
from tests.fuzz import FUZZ


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4:5", Endpoint("1.2.3.4", 5)),
        (" stun.example.net:3478 ", Endpoint("stun.example.net", 3478)),
        ("[::1]:80", Endpoint("::1", 80)),
        ("0.0.0.0:0", Endpoint("0.0.0.0", 0)),
    ],
)
def test_parse(text: str, expected: Endpoint) -> None:
    assert Endpoint.parse(text) == expected


def test_default_port_applies_only_without_one() -> None:
    assert Endpoint.parse("stun.example.net", 3478) == Endpoint("stun.example.net", 3478)
    assert Endpoint.parse("stun.example.net:19302", 3478).port == 19302


@pytest.mark.parametrize("text", ["", ":5", "host", "host:x", "host:70000", "[::1", "host:-1"])
def test_bad_endpoints_are_rejected_with_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="bad endpoint"):
        Endpoint.parse(text)


@given(st.ip_addresses(), st.integers(0, 65535))
def test_str_and_parse_round_trip(address: object, port: int) -> None:
    endpoint = Endpoint(str(address), port)
    assert Endpoint.parse(str(endpoint)) == endpoint
    assert endpoint.is_ip


@pytest.mark.parametrize("text", ["1.2.3.4:²", "1.2.3.4:٣", "1.2.3.4:" + "9" * 5000, "[::1]x", "[::1]:"])
def test_a_port_is_ascii_digits_and_nothing_follows_the_bracket(text: str) -> None:
    with pytest.raises(ValueError, match="bad endpoint"):
        Endpoint.parse(text, 3478)


@FUZZ
@given(st.text(), st.none() | st.integers(0, 65535))
def test_parse_ends_in_an_endpoint_or_its_own_rejection(text: str, default_port: int | None) -> None:
    # The DHT's outer endpoints come from anyone who can put a value: nothing but ValueError may escape.
    try:
        endpoint = Endpoint.parse(text, default_port)
    except ValueError as error:
        assert str(error).startswith("bad endpoint"), error
        return
    assert 0 <= endpoint.port <= 65535 and endpoint.host
