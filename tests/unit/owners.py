"""Making a file another user's, for the checks that refuse one (as ssh refuses a key it does not own)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def owned_by_another(path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Make `path` look owned by another user than this one; return that owner's uid. As root the file is
    given to nobody (65534); otherwise this process pretends to be someone other than its owner, not root."""
    if os.geteuid() == 0:
        os.chown(path, 65534, -1)
        return 65534
    owner = path.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    return owner
