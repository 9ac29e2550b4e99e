"""Claims: which participant (e-mail) signed up for which account, and what they accepted when.

An account of the token file is free until claimed; a claim is made in one transaction that
picks the first free account in token-file order, so two sign-ups never get the same account,
even from two processes. Organisers list, release and export claims with `gateway accounts`.
Nothing here stores or returns a password.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.model.state import StateStore

__all__ = ["Claim", "Acceptance", "ClaimResult", "claim_account", "claims", "claim_for", "release",
           "acceptances", "export_csv", "normalise_email"]


@dataclass(frozen=True, slots=True)
class Claim:
    account: str
    email: str
    name: str
    address: str
    claimed_at: float


@dataclass(frozen=True, slots=True)
class Acceptance:
    account: str
    email: str
    document: str
    sha256: str
    accepted_at: float


@dataclass(frozen=True, slots=True)
class ClaimResult:
    #: The claim, or None when every account is taken.
    claim: Claim | None
    #: True when this e-mail already had the account before this request.
    existing: bool = False


def normalise_email(email: str) -> str:
    return email.strip().lower()


def claim_account(store: StateStore, accounts: Sequence[str], *, email: str, name: str, address: str,
                  documents: Sequence[tuple[str, str]]) -> ClaimResult:
    """Give ``email`` the first free account of ``accounts`` (or the one it already has).

    ``documents`` are the (title, sha256) pairs the participant accepted; each is recorded with
    the time, also when the e-mail already had an account (they accepted again).
    """
    email = normalise_email(email)
    now = time.time()
    with store.transaction() as db:
        row = db.execute("SELECT account, email, name, address, claimed_at FROM claims WHERE email = ?",
                         (email,)).fetchone()
        existing = row is not None
        if row is None:
            taken = {a for (a,) in db.execute("SELECT account FROM claims")}
            free = next((a for a in accounts if a not in taken), None)
            if free is None:
                return ClaimResult(None)
            row = (free, email, name, address, now)
            db.execute("INSERT INTO claims(account, email, name, address, claimed_at) VALUES (?, ?, ?, ?, ?)", row)
        claim = Claim(*row)
        db.executemany(
            "INSERT INTO acceptances(account, email, document, sha256, accepted_at) VALUES (?, ?, ?, ?, ?)",
            [(claim.account, email, title, digest, now) for title, digest in documents],
        )
        db.execute("INSERT INTO events(at, account, kind, detail) VALUES (?, ?, ?, ?)",
                   (now, claim.account, "claim-repeated" if existing else "claimed", f"from {address}"))
    return ClaimResult(claim, existing)


def claims(store: StateStore) -> list[Claim]:
    rows = store.query("SELECT account, email, name, address, claimed_at FROM claims ORDER BY claimed_at, account")
    return [Claim(*row) for row in rows]


def claim_for(store: StateStore, account: str) -> Claim | None:
    rows = store.query("SELECT account, email, name, address, claimed_at FROM claims WHERE account = ?", (account,))
    return Claim(*rows[0]) if rows else None


def release(store: StateStore, account: str) -> Claim | None:
    """Free ``account`` for the next sign-up; returns the claim released (None: it was free).

    Acceptances stay on record: they document what that participant agreed to.
    """
    with store.transaction() as db:
        row = db.execute("SELECT account, email, name, address, claimed_at FROM claims WHERE account = ?",
                         (account,)).fetchone()
        if row is None:
            return None
        db.execute("DELETE FROM claims WHERE account = ?", (account,))
        db.execute("INSERT INTO events(at, account, kind, detail) VALUES (?, ?, ?, ?)",
                   (time.time(), account, "released", ""))
    return Claim(*row)


def acceptances(store: StateStore, account: str | None = None) -> list[Acceptance]:
    query = "SELECT account, email, document, sha256, accepted_at FROM acceptances"
    rows = (store.query(query + " ORDER BY id") if account is None
            else store.query(query + " WHERE account = ? ORDER BY id", (account,)))
    return [Acceptance(*row) for row in rows]


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(moment))


def export_csv(store: StateStore) -> str:
    """Every claim with what its e-mail accepted and when; one line per claim."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["account", "email", "name", "claimed_at", "address", "accepted"])
    accepted: dict[tuple[str, str], list[str]] = {}
    for a in acceptances(store):
        accepted.setdefault((a.account, a.email), []).append(f"{a.document} ({_iso(a.accepted_at)}, sha256 {a.sha256[:12]})")
    for c in claims(store):
        writer.writerow([c.account, _csv_safe(c.email), _csv_safe(c.name), _iso(c.claimed_at), c.address,
                         "; ".join(accepted.get((c.account, c.email), []))])
    return out.getvalue()


def _csv_safe(value: str) -> str:
    """Participants typed these: keep a spreadsheet from reading them as formulas."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
