"""The floor: the least time the same path could take, from the round trips it must make.

Round trips are counted from what the code does (docs/performance.md states the assumptions); the two inputs
that are not round trips are measured here: each host's round-trip time to the servers (ping), and the mail
server's own delivery time (end of the SMTP DATA until an IMAP client in IDLE hears of the message).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import statistics
import time
import uuid
from dataclasses import dataclass

import aioimaplib
import aiosmtplib

from tests.lab.lab import Account, Lab

# In round trips between a host and the servers (STUN and mail live in one place, pub), except HANDSHAKE,
# which is between the two hosts.
STUN_RTT = 2.0  # binding request to the primary address, then the mapping test to the alternate address
# TCP 1 + TLS 1.3 1 + the 220 greeting 1 (sent once TLS is done) + EHLO, AUTH PLAIN, MAIL, RCPT, DATA 5
# + the message itself, which only has to reach the server: 0.5. All but DATA and the message can run while
# STUN does (plexus opens the session then), so after STUN SMTP_RTT - STUN_RTT remain.
SMTP_RTT = 8.5
IMAP_IN_RTT = 1.5  # the IDLE push travels one way (0.5), then one FETCH of the message (1)
HANDSHAKE_RTT = 1.5  # hello, ready, ready: the acceptor's TTL punch leaves before its response mail

_PING_MIN = re.compile(r"= ([\d.]+)/")


@dataclass(frozen=True)
class Paths:
    rtt_inviter: float  # inviter's host <-> servers
    rtt_acceptor: float  # acceptor's host <-> servers
    delivery: float  # the mail server: end of DATA until the IDLE push leaves

    @property
    def rtt_peers(self) -> float:
        """Host to host goes through both hosts' links, as each host's path to the servers does."""
        return self.rtt_inviter + self.rtt_acceptor


def floor(paths: Paths) -> dict[str, float]:
    """The floor of each phase of bench.timeline.PHASES; their sum is the floor of the time to connect."""
    a, b = paths.rtt_inviter, paths.rtt_acceptor
    return {
        "start": 0.0,
        "stun": STUN_RTT * a,
        "mail_out": (SMTP_RTT - STUN_RTT) * a,
        "mail_in": paths.delivery + IMAP_IN_RTT * b,
        "stun_acceptor": STUN_RTT * b,
        "mail_out_response": (SMTP_RTT - STUN_RTT) * b,
        "mail_in_response": paths.delivery + IMAP_IN_RTT * a,
        "handshake": HANDSHAKE_RTT * paths.rtt_peers,
        "launch": 0.0,
    }


def ping_rtt(lab: Lab, host: str, count: int = 5) -> float:
    """The smallest ping round trip from the host to the mail/STUN server, in seconds."""
    result = lab.exec(host, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", Lab.MAIL_HOST])
    match = _PING_MIN.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"ping from host {host} to {Lab.MAIL_HOST} failed: {result.stdout}{result.stderr}")
    return float(match.group(1)) / 1000


async def delivery_time(lab: Lab, sender: Account, receiver: Account, timeout: float = 10.0) -> float:
    """Seconds from handing a message to the SMTP server (DATA) until IMAP IDLE reports it.

    Run it where the network adds nothing (0 ms links), so that what remains is the servers' own time.
    """
    context = ssl.create_default_context(cafile=str(lab.ca_file))
    imap = aioimaplib.IMAP4_SSL(Lab.MAIL_HOST, Lab.IMAPS_PORT, ssl_context=context, timeout=timeout)
    await imap.wait_hello_from_server()
    await imap.login(receiver.login, receiver.password)
    await imap.select("INBOX")
    smtp = aiosmtplib.SMTP(
        hostname=Lab.MAIL_HOST, port=Lab.SMTPS_PORT, use_tls=True, tls_context=context, timeout=timeout
    )
    async with smtp:
        await smtp.login(sender.login, sender.password)
        await smtp.mail(sender.address)
        await smtp.rcpt(receiver.address)
        idle = await imap.idle_start(timeout=timeout)
        message = f"Subject: bench-{uuid.uuid4().hex}\r\n\r\ndelivery probe\r\n"
        sent = time.monotonic()
        data = asyncio.ensure_future(smtp.data(message))
        while not any(bytes(line).endswith(b"EXISTS") for line in await imap.wait_server_push(timeout)):
            pass
        seen = time.monotonic()
        await data
    imap.idle_done()
    await asyncio.wait_for(idle, timeout)
    await imap.logout()
    return seen - sent


async def delivery_times(lab: Lab, rounds: int) -> list[float]:
    sender, receiver = lab.accounts["local"], lab.accounts["remote"]
    return [await delivery_time(lab, sender, receiver) for _ in range(rounds)]


def measure_delivery(lab: Lab, host: str, rounds: int = 5) -> float:
    """The median delivery time over a few messages sent and watched from the host."""
    return statistics.median(asyncio.run(lab.call(host, lambda: delivery_times(lab, rounds))))
