"""plexus: connect two hosts behind NATs through an email rendezvous and UDP hole punching."""

__version__ = "0.1.0"
