"""The lab's SMTP submission server: implicit TLS and STARTTLS, AUTH required, delivery to Dovecot over LMTP.

Run as its own process inside the lab's pub namespace (see Lab):
    python3 smtpd.py --host IP --cert PEM --key PEM --accounts JSON --lmtp HOST:PORT
It keeps aiosmtpd's line-length limit (1000 characters + CRLF), like real servers. It also accepts AUTH after
HELO, as many real servers do, because plexus 2.2 authenticates after HELO.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import smtplib
import ssl
import warnings
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


class LabSMTP(SMTP):
    async def smtp_HELO(self, hostname: str) -> None:
        await super().smtp_HELO(hostname)
        if self.session is not None and self.session.host_name:
            self.session.extended_smtp = True


class Authenticator:
    def __init__(self, accounts: dict[str, str]) -> None:
        self.accounts = accounts

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = data.login.decode(), data.password.decode()
        return AuthResult(success=self.accounts.get(login) == password, handled=False)


class LmtpRelay:
    def __init__(self, accounts: dict[str, str], lmtp: tuple[str, int]) -> None:
        self.accounts = accounts
        self.lmtp = lmtp

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() not in self.accounts:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        try:
            await asyncio.to_thread(self._deliver, envelope.mail_from or "", envelope.rcpt_tos, content)
        except (OSError, smtplib.SMTPException) as exc:
            return f"451 4.3.0 Delivery to the mailbox failed: {exc}"
        return "250 OK"

    def _deliver(self, sender: str, recipients: list[str], content: bytes) -> None:
        with smtplib.LMTP(self.lmtp[0], self.lmtp[1], timeout=10) as lmtp:
            lmtp.sendmail(sender, recipients, content)


async def serve(args: argparse.Namespace) -> None:
    accounts: dict[str, str] = json.loads(Path(args.accounts).read_text())
    host, _, port = args.lmtp.rpartition(":")
    relay = LmtpRelay(accounts, (host, int(port)))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.cert, args.key)
    loop = asyncio.get_running_loop()

    def session(implicit_tls: bool) -> SMTP:
        return LabSMTP(
            relay,
            hostname="mail.lab.test",
            authenticator=Authenticator(accounts),
            auth_required=True,
            # Implicit TLS is encrypted from the first byte; aiosmtpd only knows about STARTTLS.
            auth_require_tls=not implicit_tls,
            tls_context=None if implicit_tls else tls,
            require_starttls=not implicit_tls,
        )

    servers = [
        await loop.create_server(lambda: session(True), args.host, 465, ssl=tls),
        await loop.create_server(lambda: session(False), args.host, 587),
    ]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("smtpd listening on 465 (TLS) and 587 (STARTTLS)", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    # aiosmtpd only counts STARTTLS as TLS and warns about AUTH on the implicit-TLS port, which is encrypted
    warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
    parser = argparse.ArgumentParser(description=__doc__)
    for option in ("--host", "--cert", "--key", "--accounts", "--lmtp"):
        parser.add_argument(option, required=True)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
