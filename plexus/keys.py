"""The session's keys, each derived in one place from what both sides hold once the offers are exchanged: both
puzzles and, where the two identities are pinned, the ECDH secret of their keys. Each use has its label (the
HKDF info): the handshake's datagrams (plexus/puncher.py), the rebind (plexus/rendezvous.py). A key of one use
says nothing of another's, and a new format or key schedule gets a new label, not a change of an old one.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PUZZLE_LIMIT = 1 << 64
BOUND_SUFFIX = b" bound"  # the label of a key bound to the identities: "plexus handshake 1 bound"


def derive(
    label: bytes, inviter_puzzle: int, acceptor_puzzle: int, bound: bytes = b"", length: int = 32
) -> bytes:
    """HKDF-SHA256, no salt, over inviter puzzle || acceptor puzzle (8 bytes each, big-endian) || bound,
    with the info `label` (then " bound" when `bound` is given). `bound`: the ECDH secret of the two pinned
    identity keys, where both sides have them; then knowing the puzzles (a mailbox reader does) is not
    enough to make the key. ValueError for a puzzle that is not an unsigned 64-bit number."""
    for puzzle in (inviter_puzzle, acceptor_puzzle):
        if not 0 <= puzzle < PUZZLE_LIMIT:
            raise ValueError(f"puzzle {puzzle} is not an unsigned 64-bit number")
    material = inviter_puzzle.to_bytes(8, "big") + acceptor_puzzle.to_bytes(8, "big") + bound
    info = label + BOUND_SUFFIX if bound else label
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(material)
