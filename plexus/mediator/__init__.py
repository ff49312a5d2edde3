"""How the peers meet: each side gives the other its outer endpoint and puzzle, by email (email.py,
message.py, smime.py; docs/protocol.md) or on OpenDHT (dht.py, the values; dhtnode.py, the node;
docs/dht.md)."""

from plexus.mediator.email import Invitation, MailConfig, Mediator
from plexus.mediator.message import Offer
from plexus.mediator.smime import SmimeConfig

__all__ = ["Invitation", "MailConfig", "Mediator", "Offer", "SmimeConfig"]
