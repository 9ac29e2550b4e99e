"""Participants who signed up get an e-mail when their archive is ready: a real SMTP server (aiosmtpd,
started by the test) receives it; it links to their page and never holds a password. A second server
speaks STARTTLS with a certificate from a throwaway CA and takes only the credentials in the
organiser's 0600 file: the mail arrives, and the login happened over TLS."""

from __future__ import annotations

import datetime
import email
import email.policy
import ipaddress
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.model.signups import claim_account
from gateway.model.state import StateStore
from gateway.model.tokens import format_tokens
from tests.gateway_run import make_accounts
from tests.system import free_port


class Mailbox:
    def __init__(self) -> None:
        self.received: list[tuple[list[str], bytes]] = []
        #: Per message: did it come over TLS, from a client that had logged in?
        self.sessions: list[tuple[bool, bool]] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.received.append((list(envelope.rcpt_tos), bytes(envelope.original_content or envelope.content)))
        self.sessions.append((session.ssl is not None, bool(session.authenticated)))
        return "250 Message accepted"


class OnlyTheseCredentials:
    """An aiosmtpd authenticator: one user name and password; remembers each attempt and whether it was
    made over TLS."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user.encode(), password.encode()
        self.attempts: list[tuple[str, bool, bool]] = []  # (user name, over TLS, accepted)

    def __call__(self, server, session, envelope, mechanism, auth_data) -> AuthResult:  # type: ignore[no-untyped-def]
        accepted = (isinstance(auth_data, LoginPassword) and auth_data.login == self.user
                    and auth_data.password == self.password)
        login = auth_data.login.decode(errors="replace") if isinstance(auth_data, LoginPassword) else "?"
        self.attempts.append((login, session.ssl is not None, accepted))
        return AuthResult(success=accepted, handled=False)


def throwaway_ca(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA made for this test only (its PEM file) and a server context with a certificate it signed
    for 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test mail CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                   .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = directory / "mail-ca.pem", directory / "mail.crt", directory / "mail.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return ca_file, context


@pytest.fixture
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield mailbox, controller.port
    finally:
        controller.stop()


@pytest.fixture
def starttls_server(tmp_path: Path) -> Iterator[tuple[Mailbox, OnlyTheseCredentials, int, Path]]:
    """STARTTLS required before anything else, AUTH required (and only over TLS)."""
    ca_file, context = throwaway_ca(tmp_path)
    mailbox, credentials = Mailbox(), OnlyTheseCredentials("mailer", "smtp-secret-pw")
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), tls_context=context,
                            require_starttls=True, authenticator=credentials, auth_required=True,
                            auth_require_tls=True)
    controller.start()
    try:
        yield mailbox, credentials, controller.port, ca_file
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


def test_mail_goes_over_starttls_with_the_organisers_credentials_and_ca(starttls_server, tmp_path: Path) -> None:
    mailbox, server_credentials, port, ca_file = starttls_server
    accounts = make_accounts(1, prefix="tl")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(format_tokens(accounts))
    tokens.chmod(0o600)
    state = tmp_path / "state"
    (state / "workspaces" / accounts[0].id).mkdir(parents=True)
    (state / "workspaces" / accounts[0].id / "notes.txt").write_text("notes\n")
    store = StateStore(state / "gateway.db")
    claim_account(store, [accounts[0].id], email="bob@example.org", name="Bob", address="192.0.2.8", documents=[])
    store.close()
    credentials = tmp_path / "smtp.secret"
    credentials.write_text("mailer\nsmtp-secret-pw\n")
    credentials.chmod(0o600)
    config = tmp_path / "gateway.yaml"

    def configure(ca: str | None, secret: Path = credentials) -> None:
        config.write_text("public_url: https://desktops.example.org/\ndesktop:\n  users: gateway\n"
                          f"archive:\n  enabled: true\n  notify: smtp://127.0.0.1:{port}\n"
                          f"  notify_credentials: {secret}\n  notify_from: desktops@example.org\n"
                          + (f"  notify_ca_file: {ca}\n" if ca else ""))

    # The server's certificate is checked: against the system's CAs the throwaway one is refused.
    configure(None)
    untrusted = archive(tokens, config, state)
    assert untrusted.returncode == 0, untrusted.stderr
    assert "not e-mailed" in untrusted.stdout and "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout
    assert mailbox.received == [] and server_credentials.attempts == []

    # A CA file that is no CA is a one-line error before anything is sent.
    configure(str(credentials))
    bad_ca = archive(tokens, config, state)
    assert bad_ca.returncode == 2 and "archive.notify_ca_file" in bad_ca.stderr and "PEM" in bad_ca.stderr
    assert len(bad_ca.stderr.strip().splitlines()) == 1

    # Wrong credentials: the server refuses them (over TLS) and nothing is sent.
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("mailer\nnot-the-password\n")
    wrong.chmod(0o600)
    configure(str(ca_file), wrong)
    refused = archive(tokens, config, state)
    assert "not e-mailed" in refused.stdout and mailbox.received == []
    # (smtplib tries each mechanism the server offers: PLAIN, then LOGIN)
    assert server_credentials.attempts and set(server_credentials.attempts) == {("mailer", True, False)}

    configure(str(ca_file))
    result = archive(tokens, config, state)
    assert result.returncode == 0, result.stderr
    assert "e-mailed bob@example.org" in result.stdout and "not e-mailed" not in result.stdout
    assert server_credentials.attempts[-1] == ("mailer", True, True)  # the login happened over TLS
    assert mailbox.sessions == [(True, True)]
    (recipients, raw), = mailbox.received
    assert recipients == ["bob@example.org"]
    body = email.message_from_bytes(raw, policy=email.policy.default).get_content()
    assert "https://desktops.example.org/me" in body and accounts[0].id in body
    assert accounts[0].password.encode() not in raw and b"smtp-secret-pw" not in raw
    for output in (result.stdout, result.stderr, *(p.read_text() for p in (state / "logs").glob("*"))):
        assert "smtp-secret-pw" not in output and accounts[0].password not in output
