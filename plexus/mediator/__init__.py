"""How the peers meet: each side gives the other its outer endpoint and puzzle, by email (email.py,
message.py, smime.py; docs/protocol.md) or on OpenDHT (dht.py, the values; dhtnode.py, the node;
docs/dht.md).

The names below load their module on first use: a DHT session never loads the mail clients, and `import
plexus.mediator.dht` does not bring in email.py.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plexus.mediator.email import Invitation, MailConfig, Mediator
    from plexus.mediator.message import Offer
    from plexus.mediator.smime import SmimeConfig

_HOMES = {
    "Invitation": "email",
    "MailConfig": "email",
    "Mediator": "email",
    "Offer": "message",
    "SmimeConfig": "smime",
}
__all__ = ["Invitation", "MailConfig", "Mediator", "Offer", "SmimeConfig"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
