"""Who an acceptor serves (plexus.peers): the --peers file's lines, the command line's peers, and the Roster
that SIGHUP reads again. The file is fuzzed as the parsers of network input are: a hand edits it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given as examples
from hypothesis import strategies as st

from plexus import peers
from plexus.errors import UsageError
from plexus.launcher import Command
from plexus.peers import Peer, Peers, Roster, given, parse
from plexus.targets import Allowed, Target
from tests.fuzz import FUZZ

LAPTOP = "a" * 32
PHONE = "b" * 32


def test_a_plexus_id_is_an_identity_anything_else_a_mail_id() -> None:
    text = f"""
        # id or identity   name     options
        laptop             laptop   identity={LAPTOP.upper()}   # the id as pasted, in capitals
        {PHONE}            phone
    """
    assert parse(text, "f") == (
        Peer("laptop", id="laptop", identity=LAPTOP),
        Peer("phone", identity=PHONE),
    )


def test_every_option(tmp_path: Path) -> None:
    program = tmp_path / "work.sh"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    line = (
        f"work-pc work email=pc@work.example allow=127.0.0.1:22,,[::1]:8080 "
        f"exec-command={program} exec-args='%innerport% \"%peer ip%\"'"
    )
    (peer,) = parse(line, "f")
    assert peer == Peer(
        "work",
        id="work-pc",
        email="pc@work.example",
        allowed=Allowed.of([Target.parse("127.0.0.1:22", ""), Target.parse("[::1]:8080", "")]),
        command=Command(str(program), ("%innerport%", "%peer ip%")),
    )
    # allow= with nothing listed reaches nothing, which is not the acceptor's --forward-allow
    assert parse("x y allow=", "f")[0].allowed == Allowed.of([])


def test_quoting_and_comments() -> None:
    assert parse("'my laptop' laptop # a comment with 'quotes\n#\n\n   \n", "f") == (
        Peer("laptop", id="my laptop"),
    )


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("laptop", r"f:1: a peer's line is its id or identity, then its name"),
        ("\n\nlaptop 'open", r"f:3: No closing quotation"),
        ("laptop -x", r"f:1: name '-x' is not 1-64"),
        ("laptop " + "n" * 65, r"f:1: name 'n+' is not 1-64"),
        ("'lap\ttop' laptop", r"f:1: the id 'lap\\ttop' has characters that cannot be in a subject"),
        ("laptop laptop colour=red", r"f:1: 'colour=red' is not one of identity=, email="),
        ("laptop laptop email", r"f:1: 'email' is not one of"),
        ("laptop laptop email=a@b email=c@d", r"f:1: email= given twice"),
        ("laptop laptop email=not-an-address", r"f:1: email='not-an-address' is not an address"),
        ("laptop laptop email=a@b,c@d", r"f:1: email='a@b,c@d' is not an address"),
        ("laptop laptop identity=zzz", r"f:1: identity 'zzz' is not a plexus id"),
        (f"{LAPTOP} laptop identity={PHONE}", r"f:1: .* is an identity already"),
        ("laptop laptop allow=127.0.0.1", r"f:1: allow= '127.0.0.1': expected HOST:PORT"),
        ("laptop laptop allow=127.0.0.1:0", r"f:1: allow="),
        (
            "laptop laptop exec-command=/nonexistent/plexus-x",
            r"f:1: --exec-command /nonexistent/plexus-x does",
        ),
        ("laptop laptop exec-command=plexus-no-such-program", r"f:1: .* is not found in PATH"),
        ("laptop laptop exec-args=%peer%", r"f:1: exec-args= without exec-command="),
        ('laptop laptop exec-command=true exec-args="\'open"', r"f:1: cannot split --exec-args"),
        ("a laptop\nb laptop", r"f: two peers with the name 'laptop'"),
        ("a one\na two", r"f: two peers with the id 'a'"),
        (f"a one identity={LAPTOP}\n{LAPTOP} two", r"f: two peers with the identity '" + LAPTOP),
    ],
)
def test_faults_name_the_file_and_line(text: str, fault: str) -> None:
    with pytest.raises(UsageError, match=fault):
        parse(text, "f")


def test_too_many_peers() -> None:
    text = "".join(f"p{n} p{n}\n" for n in range(peers.MAX_PEERS + 1))
    with pytest.raises(UsageError, match=f"f: {peers.MAX_PEERS + 1} peers, more than {peers.MAX_PEERS}"):
        parse(text, "f")


def test_the_command_line_peers() -> None:
    # One of each is one peer known both ways: its mail signed by that identity, its streams proving it.
    assert given(["laptop"], [LAPTOP.upper()]) == (Peer("laptop", "laptop", LAPTOP),)
    assert given(["a", "b"], [LAPTOP]) == (
        Peer("a", id="a"),
        Peer("b", id="b"),
        Peer(LAPTOP, identity=LAPTOP),
    )
    assert given([], [LAPTOP, PHONE]) == (Peer(LAPTOP, identity=LAPTOP), Peer(PHONE, identity=PHONE))
    assert given(["a"], []) == (Peer("a", id="a"),)
    with pytest.raises(UsageError, match="--peer-identity 'zzz' is not a plexus id"):
        given([], ["zzz"])


def test_peers_are_found_by_what_a_message_names() -> None:
    found = Peers((Peer("laptop", "laptop", LAPTOP), Peer("phone", identity=PHONE)))
    assert found.by_id("laptop") is found.known[0] and found.by_identity(PHONE) is found.known[1]
    assert found.by_id("phone") is None and found.by_identity("c" * 32) is None
    assert found.by_name("phone") is found.known[1] and found.names == ("laptop", "phone")


def test_a_roster_with_no_peer_is_a_usage_error(tmp_path: Path) -> None:
    file = tmp_path / "peers"
    file.write_text("# nobody yet\n")
    with pytest.raises(UsageError, match=f"no peer to serve: .* and {file} lists none"):
        Roster((), file)
    with pytest.raises(
        UsageError, match=r"no peer to serve: give --peer-id, --peer-identity or --peers FILE$"
    ):
        Roster(())


def test_the_file_and_the_command_line_are_one_set_of_peers(tmp_path: Path) -> None:
    file = tmp_path / "peers"
    file.write_text("laptop laptop\n")
    assert Roster((Peer("phone", id="phone"),), file).peers.names == ("phone", "laptop")
    with pytest.raises(UsageError, match=f"--peers {file}: two peers with the name 'laptop'"):
        Roster((Peer("laptop", id="other"),), file)
    with pytest.raises(UsageError, match=r"^--peer-id, --peer-identity: two peers with the name 'a'"):
        Roster(given(["a", "a"], []))


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        (b"x" * (peers.MAX_FILE + 1), f"is over {peers.MAX_FILE} bytes"),
        (b"laptop laptop\n\xff\xfe\n", r"is not UTF-8 \(invalid start byte\)"),
    ],
)
def test_a_file_too_long_or_not_utf8_is_one_usage_error(tmp_path: Path, data: bytes, fault: str) -> None:
    file = tmp_path / "peers"
    file.write_bytes(data)
    with pytest.raises(UsageError, match=f"--peers {file} {fault}"):
        Roster((), file)


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot read --peers .*: No such file or directory"):
        Roster((), tmp_path / "missing")


def test_reload_adds_and_removes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file = tmp_path / "peers"
    file.write_text("laptop laptop\nphone phone\n")
    roster = Roster((Peer("desk", id="desk"),), file)
    file.write_text("phone phone\ntablet tablet\n")
    with caplog.at_level(logging.INFO, "plexus.peers"):
        reloaded = roster.reload()
    assert roster.peers.names == ("desk", "phone", "tablet")
    assert (reloaded.peers, reloaded.added, reloaded.removed, reloaded.error) == (
        ("desk", "phone", "tablet"),
        ("tablet",),
        ("laptop",),
        None,
    )
    assert "peers reloaded: 3 (added: tablet; removed: laptop)" in caplog.text


@pytest.mark.parametrize("data", [b"laptop\n", b"\xff", b"x" * (peers.MAX_FILE + 1), b"a one\na two\n", None])
def test_a_broken_file_on_reload_keeps_the_peers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, data: bytes | None
) -> None:
    file = tmp_path / "peers"
    file.write_text("laptop laptop\n")
    roster = Roster((Peer("desk", id="desk"),), file)
    before = roster.peers
    if data is None:
        file.unlink()
    else:
        file.write_bytes(data)
    reloaded = roster.reload()
    assert roster.peers is before
    assert reloaded.peers == ("desk", "laptop") and reloaded.error is not None and not reloaded.added
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("peers not reloaded, still serving desk, laptop: "), (
        errors
    )


def test_a_rendezvous_check_runs_at_start_and_on_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "peers"
    file.write_text("laptop laptop\n")
    roster = Roster((), file)
    judged: list[tuple[str, ...]] = []

    def judge(found: Peers) -> None:
        judged.append(found.names)
        if any(peer.identity is None for peer in found.known):
            raise UsageError("every peer needs an identity here")

    with pytest.raises(UsageError, match="needs an identity"):
        roster.check(judge)
    assert judged == [("laptop",)]
    file.write_text(f"laptop laptop identity={LAPTOP}\n")
    roster.reload()
    roster.check(judge)
    file.write_text(f"laptop laptop identity={LAPTOP}\nphone phone\n")
    roster.reload()
    assert judged[-1] == ("laptop", "phone") and roster.peers.names == ("laptop",)
    assert "peers not reloaded, still serving laptop: every peer needs an identity here" in caplog.text


_WORDS = st.sampled_from(
    [
        "laptop",
        LAPTOP,
        LAPTOP.upper(),
        "phone",
        "#",
        "'",
        '"',
        "\\",
        "=",
        "identity=",
        f"identity={PHONE}",
        "identity=x",
        "email=a@b",
        "email=",
        "allow=127.0.0.1:22",
        "allow=[::1]:1,x:0",
        "allow=",
        "exec-command=",
        "exec-command=/nonexistent",
        "exec-command=/",
        "exec-args=%peer%",
        "\x00",
        "\t",
        "\u2028",
        "\r",
        "é",
        " ",
    ]
)


@FUZZ
@examples(st.one_of(st.text(), st.lists(st.one_of(_WORDS, st.text(max_size=8))).map(" ".join)))
def test_any_text_gives_peers_or_a_usage_error(text: str) -> None:
    try:
        found = parse(text, "f")
    except UsageError as error:
        assert str(error).startswith("f"), error
    else:
        Peers(found)  # what parse gives, a Roster takes
