"""Participants who signed up get an e-mail when their archive is ready: a real SMTP server (aiosmtpd,
started by the test) receives it; it links to their page and never holds a password."""

from __future__ import annotations

import email
import email.policy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from gateway.model.signups import claim_account
from gateway.model.state import StateStore
from gateway.model.tokens import format_tokens
from tests.gateway_run import make_accounts
from tests.system import free_port


class Mailbox:
    def __init__(self) -> None:
        self.received: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.received.append((list(envelope.rcpt_tos), bytes(envelope.original_content or envelope.content)))
        return "250 Message accepted"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield mailbox, controller.port
    finally:
        controller.stop()


def archive(tokens: Path, config: Path, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "archive", str(tokens), "--config", str(config),
                           "--state-dir", str(state)], capture_output=True, text=True, timeout=120)


def test_a_packed_archive_is_announced_by_email_with_the_link_and_no_password(smtp_server, tmp_path: Path) -> None:
    mailbox, port = smtp_server
    accounts = make_accounts(2, prefix="ml")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(format_tokens(accounts))
    tokens.chmod(0o600)
    state = tmp_path / "state"
    for account in accounts:
        (state / "workspaces" / account.id).mkdir(parents=True)
        (state / "workspaces" / account.id / "report.txt").write_text("done\n")
    store = StateStore(state / "gateway.db")
    claim_account(store, [accounts[0].id], email="Alice@Example.org", name="Alice Doe", address="192.0.2.7",
                  documents=[])
    store.close()
    config = tmp_path / "gateway.yaml"
    base = ("public_url: https://desktops.example.org/event/\nevent:\n  title: Genomics 2026\n"
            "desktop:\n  users: gateway\n")
    config.write_text(base + f"archive:\n  enabled: true\n  expires: \"2099-01-31T18:00:00+01:00\"\n"
                             f"  notify: smtp://127.0.0.1:{port}\n  notify_from: desktops@example.org\n")

    result = archive(tokens, config, state)
    assert result.returncode == 0, result.stderr
    assert "e-mailed alice@example.org" in result.stdout
    assert len(mailbox.received) == 1  # the other account was handed out on paper: no address
    recipients, raw = mailbox.received[0]
    assert recipients == ["alice@example.org"]
    message = email.message_from_bytes(raw, policy=email.policy.default)
    body = message.get_content()
    assert message["Subject"] == "Genomics 2026: your files are ready to download"
    assert "https://desktops.example.org/event/me" in body and "2099-01-31" in body and accounts[0].id in body
    assert not any(a.password.encode() in raw for a in accounts)

    # SMTP credentials are never sent in clear: without STARTTLS nothing is sent at all.
    credentials = tmp_path / "smtp.secret"
    credentials.write_text("mailer\nsmtp-secret-pw\n")
    credentials.chmod(0o644)
    config.write_text(base + f"archive:\n  enabled: true\n  notify: smtp://127.0.0.1:{port}\n"
                             f"  notify_credentials: {credentials}\n")
    refused = archive(tokens, config, state)
    assert refused.returncode == 2 and "readable by others" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    credentials.chmod(0o600)
    cleartext = archive(tokens, config, state)
    assert "not e-mailed" in cleartext.stdout and "never sent in clear" in cleartext.stdout
    assert len(mailbox.received) == 1
