"""The email rendezvous: each side mails the other its outer endpoint and puzzle (docs/protocol.md, Mail)."""

from plexus.mediator.email import Invitation, MailConfig, Mediator
from plexus.mediator.message import Offer
from plexus.mediator.smime import SmimeConfig

__all__ = ["Invitation", "MailConfig", "Mediator", "Offer", "SmimeConfig"]
