"""plexus: connect two hosts behind NATs through an email rendezvous and UDP hole punching."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "accept", "connect", "explore", "invite", "serve"]

if TYPE_CHECKING:
    from plexus.api import accept, connect, explore, invite, serve


def __getattr__(name: str) -> Any:
    """The library's names (plexus/api.py), imported on first use: `import plexus` (and `plexus --version`)
    loads nothing else."""
    if name in __all__[1:]:
        from plexus import api

        return getattr(api, name)
    raise AttributeError(f"module 'plexus' has no attribute {name!r}")
