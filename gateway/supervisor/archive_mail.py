"""Telling participants by e-mail that their archive is ready (``archive.notify: smtp://host:port``).

After `gateway archive`, each packed account that a participant signed up for (gateway/model/signups.py)
gets one message (templates/archive-ready.txt.j2) with the link to their page (``public_url`` +
``me``), where they sign in and download. Never the password: the message says to sign in with the
password they were given. Sent with the standard library's smtplib: ``smtp://`` uses STARTTLS
whenever the server offers it, and credentials (``archive.notify_credentials``: a 0600 file with the
user name on the first line and the password on the second) are only ever sent over TLS
(``smtps://`` or STARTTLS); a server that offers neither gets no credentials and no mail. The
server's certificate is always verified, against the system's CAs or, for a private mail server,
against ``archive.notify_ca_file`` alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import smtplib
import socket
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formataddr, make_msgid
from pathlib import Path

from gateway.model.signups import claim_for
from gateway.model.config import Config, parse_notify_url
from gateway.model.errors import UserError
from gateway.common.render import render
from gateway.model.state import StateStore

__all__ = ["SmtpTarget", "parse_notify_url", "load_credentials", "tls_context", "compose", "notify_archives_ready"]

log = logging.getLogger("gateway.mail")

SMTP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    host: str
    port: int
    implicit_tls: bool  # smtps://
    username: str | None = None
    password: str | None = None
    #: Verifies the server's certificate and host name (smtps:// and STARTTLS alike).
    context: ssl.SSLContext = field(default_factory=ssl.create_default_context, compare=False, repr=False)


def load_credentials(path: str) -> tuple[str, str]:
    """User name and password from a 0600 file (two lines); UserError if it is missing or readable by others."""
    try:
        info = os.stat(path)
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UserError(f"archive.notify_credentials: cannot read {path}: {exc.strerror}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise UserError(f"archive.notify_credentials: {path} holds a password and is readable by others; "
                        f"chmod 600 {path}")
    if len(lines) < 2 or not lines[0].strip() or not lines[1]:
        raise UserError(f"archive.notify_credentials: {path} must hold the user name, then the password, "
                        "on two lines")
    return lines[0].strip(), lines[1]


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate and host name checks against the system's CAs, or only ``ca_file``'s (PEM)."""
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except OSError as exc:  # ssl.SSLError is one: the file holds no PEM certificate
        why = "no PEM CA certificate in it" if isinstance(exc, ssl.SSLError) else exc.strerror
        raise UserError(f"archive.notify_ca_file: cannot load {ca_file}: {why}") from None


def smtp_target(config: Config) -> SmtpTarget:
    a = config.archive
    assert a.notify is not None
    host, port, implicit = parse_notify_url(a.notify)
    username = password = None
    if a.notify_credentials:
        username, password = load_credentials(a.notify_credentials)
    return SmtpTarget(host, port, implicit, username, password, tls_context(a.notify_ca_file))


def page_url(config: Config) -> str:
    base = config.public_url or f"http://{config.listen}/"
    return base if base.endswith("/") else base + "/"


def compose(config: Config, *, account: str, email: str, name: str, sender: str) -> EmailMessage:
    """The message to one participant: the link to their page, never a password."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = formataddr((name, email))
    message["Subject"] = f"{config.event.title}: your files are ready to download"
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    message.set_content(render("archive-ready.txt.j2", title=config.event.title, name=name, account=account,
                               url=page_url(config) + "me", expires=config.archive.expires))
    return message


def _send(target: SmtpTarget, messages: Sequence[EmailMessage]) -> list[str]:
    """Send ``messages`` over one connection; a line per message that failed (empty when all went)."""
    context = target.context
    if target.implicit_tls:
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(target.host, target.port, timeout=SMTP_TIMEOUT_S, context=context)
    else:
        smtp = smtplib.SMTP(target.host, target.port, timeout=SMTP_TIMEOUT_S)
    with smtp:
        smtp.ehlo()
        encrypted = target.implicit_tls
        if not encrypted and smtp.has_extn("starttls"):
            smtp.starttls(context=context)
            smtp.ehlo()
            encrypted = True
        if target.username is not None:
            if not encrypted:
                raise smtplib.SMTPException(f"{target.host}:{target.port} offers no STARTTLS: the credentials are "
                                            "never sent in clear, so nothing was sent")
            smtp.login(target.username, target.password or "")
        failures = []
        for message in messages:
            try:
                smtp.send_message(message)
            except smtplib.SMTPRecipientsRefused:
                failures.append(f"{message['To']}: refused by the server")
        return failures


async def notify_archives_ready(config: Config, store: StateStore, accounts: Sequence[str]) -> dict[str, str]:
    """E-mail each of ``accounts`` that a participant signed up for; per account what happened."""
    if config.archive.notify is None:
        return {}
    target = smtp_target(config)
    sender = config.archive.notify_from or f"workshop-gateway@{socket.getfqdn()}"
    messages, outcome = [], {}
    for account in accounts:
        claim = claim_for(store, account)
        if claim is None:
            continue  # handed out on paper: no address known
        messages.append(compose(config, account=account, email=claim.email, name=claim.name, sender=sender))
        outcome[account] = f"e-mailed {claim.email}"
    if not messages:
        return outcome
    try:
        failures = await asyncio.to_thread(_send, target, messages)
    except (OSError, smtplib.SMTPException) as exc:
        why = f"not e-mailed: {target.host}:{target.port}: {exc}"
        log.error("archive notices not sent: %s", exc)
        return {account: why for account in outcome}
    for line in failures:
        address = line.split(":", 1)[0]
        for account, text in outcome.items():
            if text.endswith(address.split("<")[-1].rstrip(">")):
                outcome[account] = f"not e-mailed: {line}"
    for account, text in outcome.items():
        store.record_event("archive:notify", account, text)
    return outcome
