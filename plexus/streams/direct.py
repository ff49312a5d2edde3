"""A relayed streams session's move to a direct path, and back to the relay (issue 19; docs/streams.md,
"From the relay to a direct path").

A session goes through a TURN relay when no direct pair worked at its start: both NATs mapped per
destination, or one network let no UDP out. Networks change. While on the relay, each side checks now and
then (every CHECK_FIRST seconds at first, then twice as long each time up to CHECK_LAST) whether its NAT maps
endpoint-independently now (quic.Link.independent: the STUN server and its other address see the same
endpoint), from the socket a direct path would use: the streams socket, or, on the side that allocated the
relay, the socket beside its forwarder. When it does, the side tells the peer that endpoint in a CANDIDATE
control datagram inside the QUIC connection, which authenticates it. Once a side holds its own candidate and
the peer's:

- the acceptor punches toward the inviter's (resume.punches), so that its NAT lets the
  inviter's packets in;
- the inviter punches toward the acceptor's and, PUNCH_LEAD later, sends its QUIC packets there
  (Link.reroute). The acceptor's QUIC validates the inviter's new path and moves to it. A packet that
  decrypts, from the acceptor's direct endpoint, within DIRECT_TRIAL: the session is direct (`Rerouted`);
  none: the inviter goes back to the relay and tries again at its next check.

On the direct path the inviter watches for its death (Link.dead: nothing answered for quic.DEAD_AFTER) and
then goes back to the relay at once; the acceptor's QUIC follows it there as it followed it away. The relay
allocation is kept for this, for the session's life. Each step is QUIC's or authenticated: a candidate only
comes inside the connection, and the acceptor sends to a new path only once it answers QUIC's challenge.
"""

from __future__ import annotations

import asyncio
import logging

from plexus import events
from plexus.driver import wait_event
from plexus.endpoint import Endpoint
from plexus.resume import punches, resolve
from plexus.streams.quic import Link

log = logging.getLogger(__name__)

CHECK_FIRST = 5.0  # the first check of this side's NAT after the session starts on the relay
CHECK_LAST = 300.0  # the longest wait between checks: a network that stays as it is costs little
PUNCH_LEAD = 0.1  # the inviter's punch goes ahead of its packets, for its own NAT
DIRECT_TRIAL = 2.0  # for the acceptor to answer through the direct path before the inviter goes back
TRIAL_PROBE = 0.2  # the inviter's probes during the trial


async def upgrade(link: Link, server: Endpoint) -> None:
    """Until cancelled: this side's half of the move (module docstring). `server`: its STUN server, whose
    other address (RFC 5780) the mapping check needs."""
    address = await resolve(server)
    relay = link.peer  # the relay path: the forwarder beside this side's allocation, or the peer's relay
    wait, acted_on = CHECK_FIRST, None
    while True:
        if link.client and link.peer != relay:
            await link.dead.wait()
            _back(link, relay)
            wait = CHECK_FIRST
            continue
        named = await _until(link, wait, acted_on)  # a new candidate from the peer: check now
        wait = CHECK_FIRST if named else min(2 * wait, CHECK_LAST)
        if not link.client and link.peer != relay:
            continue  # the inviter moved this session to the direct path: nothing to check meanwhile
        mine = await link.independent(address)
        theirs = acted_on = link.peer_candidate
        if mine is None:
            log.debug("streams: on the relay, and this side's NAT does not map endpoint-independently")
            continue
        link.send_candidate(mine)
        if theirs is None:
            continue
        if link.client:
            await _try(link, theirs, relay)
        else:
            await punches(link, theirs)


async def _until(link: Link, wait: float, acted_on: Endpoint | None) -> bool:
    """Wait `wait` seconds, or until the peer names a candidate other than `acted_on` (True)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while (remaining := deadline - loop.time()) > 0:
        link.candidate_arrived.clear()
        await wait_event(link.candidate_arrived, remaining)
        if link.peer_candidate is not None and link.peer_candidate != acted_on:
            return True
    return False


async def _try(link: Link, theirs: Endpoint, relay: Endpoint) -> bool:
    """The inviter's trial of the direct path toward the acceptor's candidate; back on the relay if it
    fails."""
    link.punch(theirs)
    await asyncio.sleep(PUNCH_LEAD)
    log.info("streams: trying the direct path to %s", theirs)
    link.reroute(theirs)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DIRECT_TRIAL
    while loop.time() < deadline:
        link.probe()
        await link.heard_within(TRIAL_PROBE)
        if link.heard_from == (theirs.host, theirs.port):
            log.info("streams: on the direct path to %s; the relay stays for a fall back", theirs)
            events.emit(events.Rerouted, way="direct", peer=theirs)
            return True
    log.info(
        "streams: no answer on the direct path to %s within %g s: back on the relay", theirs, DIRECT_TRIAL
    )
    link.reroute(relay)
    return False


def _back(link: Link, relay: Endpoint) -> None:
    log.warning("streams: the direct path died: back on the relay")
    link.reroute(relay)
    link.probe()
    events.emit(events.Rerouted, way="relay", peer=relay)
