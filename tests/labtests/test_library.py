"""docs/library.md's examples, run as they are written between the lab's two hosts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plexus.identity import Identity
from tests.lab.dht import DhtNetwork
from tests.lab.lab import Lab, stop_process

pytestmark = pytest.mark.lab

LIBRARY = Path(__file__).resolve().parents[2] / "docs" / "library.md"
ROOT = LIBRARY.parents[1]


def examples() -> dict[str, str]:
    """Each ```python block under its section's title."""
    found, title = {}, ""
    for part in re.split(r"^(## .*)$", LIBRARY.read_text(), flags=re.MULTILINE):
        if part.startswith("## "):
            title = part[3:].strip()
        for block in re.findall(r"```python\n(.*?)```", part, flags=re.DOTALL):
            found[title] = block
    return found


def run(lab: Lab, host: str, code: str, env: dict[str, str], output: Path) -> subprocess.Popen[str]:
    with output.open("w") as sink:
        return lab.popen(
            host,
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=os.environ | env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )


def wait_for(output: Path, text: str, process: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in output.read_text():
        assert process.poll() is None or text in output.read_text(), output.read_text()
        assert time.monotonic() < deadline, output.read_text()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def network(_lab_instance: Lab) -> Iterator[DhtNetwork]:
    with DhtNetwork(_lab_instance) as started:
        yield started


def test_the_sections_are_there() -> None:
    assert list(examples()) == ["Explore", "Accept, on the DHT", "Invite, on the DHT"]


def test_explore(lab: Lab, tmp_path: Path) -> None:
    output = tmp_path / "explore.out"
    process = run(lab, "a", examples()["Explore"], {"PLEXUS_STUN_SERVER": str(Lab.STUN_PRIMARY)}, output)
    assert process.wait(60) == 0, output.read_text()
    text = output.read_text()
    assert f"outer endpoint {lab.public_ip('a')}" in text or lab.public_ip("a") in text, text
    assert "to a peer whose NAT maps endpoint-independently" in text
    assert "{'independent': 'direct'" in text


def test_invite_and_accept_on_the_dht(lab: Lab, tmp_path: Path, network: DhtNetwork) -> None:
    laptop, home = tmp_path / "laptop.key", tmp_path / "home.key"
    inviter, acceptor = Identity.load(laptop), Identity.load(home)
    common = {
        "PLEXUS_STUN_SERVER": str(Lab.STUN_PRIMARY),
        "PLEXUS_DHT_BOOTSTRAP": ",".join(network.bootstrap),
    }
    accepting_out, inviting_out = tmp_path / "accept.out", tmp_path / "invite.out"
    accepting = run(
        lab,
        "b",
        examples()["Accept, on the DHT"],
        common | {"PLEXUS_IDENTITY": str(home), "PLEXUS_PEER_ID": inviter.id},
        accepting_out,
    )
    try:
        wait_for(accepting_out, "event: listening", accepting)
        inviting = run(
            lab,
            "a",
            examples()["Invite, on the DHT"],
            common | {"PLEXUS_IDENTITY": str(laptop), "PLEXUS_PEER_ID": acceptor.id},
            inviting_out,
        )
        assert inviting.wait(60) == 0, f"{inviting_out.read_text()}\nacceptor:\n{accepting_out.read_text()}"
        wait_for(accepting_out, "heard: hello from the inviter", accepting)
    finally:
        stop_process(accepting)
    invited = inviting_out.read_text()
    assert "path: direct" in invited and "heard: hello from the acceptor" in invited, invited
    assert [line for line in invited.splitlines() if line.startswith("event: ")][:4] == [
        "event: started",
        "event: discovered",
        "event: sent",
        "event: answered",
    ]
