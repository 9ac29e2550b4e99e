"""Durable state in SQLite: what the gateway started, so a restarted gateway can find it again.

The database lives in the state dir (0700). Writes are single small transactions; sqlite3 is
called directly from the event loop because each call takes well under a millisecond on a local
disk, far less than handing it to a thread would cost. Schema changes are numbered migrations:
an older database is upgraded in place, never discarded.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.common.proc import ProcessIdentity

__all__ = ["StateStore", "DesktopRecord", "MIGRATIONS"]

#: Each entry upgrades the schema by one version. Append only; never edit a released entry.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE desktops (
        account     TEXT PRIMARY KEY,
        backend     TEXT NOT NULL,
        state       TEXT NOT NULL,          -- the backend's JSON state
        updated_at  REAL NOT NULL
    );
    CREATE TABLE services (
        name        TEXT PRIMARY KEY,       -- e.g. "websockify:ws01", "apache"
        pid         INTEGER NOT NULL,
        pgid        INTEGER NOT NULL,
        start_time  INTEGER NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          REAL NOT NULL,
        account     TEXT,
        kind        TEXT NOT NULL,
        detail      TEXT NOT NULL DEFAULT ''
    );
    """,
    # 2: participants' sign-up (gateway/model/signups.py) and post-event archives (gateway/model/archive.py).
    """
    CREATE TABLE claims (
        account     TEXT PRIMARY KEY,
        email       TEXT NOT NULL UNIQUE,   -- normalised: trimmed, lower case
        name        TEXT NOT NULL,
        address     TEXT NOT NULL,          -- the client address the form came from
        claimed_at  REAL NOT NULL
    );
    CREATE TABLE acceptances (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        account     TEXT NOT NULL,
        email       TEXT NOT NULL,
        document    TEXT NOT NULL,          -- the terms document's title
        sha256      TEXT NOT NULL,          -- of the document's text as shown
        accepted_at REAL NOT NULL
    );
    CREATE INDEX acceptances_by_account ON acceptances(account);
    CREATE TABLE archives (
        account     TEXT PRIMARY KEY,
        format      TEXT NOT NULL,          -- "tar.gz" or "zip"
        filename    TEXT NOT NULL,          -- in {state_dir}/archives
        size        INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        files       INTEGER NOT NULL,
        skipped     TEXT NOT NULL,          -- JSON list of "path: reason"
        created_at  REAL NOT NULL
    );
    """,
    # 3: instructors' expiring view-only links (gateway/web/watch.py); only a hash of each token is kept.
    """
    CREATE TABLE watch_links (
        token_sha256 TEXT PRIMARY KEY,
        account      TEXT NOT NULL,
        created_by   TEXT NOT NULL,
        created_at   REAL NOT NULL,
        expires_at   REAL NOT NULL
    );
    """,
    # 4: what the whole event holds beyond its desktops, e.g. what `gateway extend` added to the event
    # window and to the limit of new Slurm jobs (gateway/supervisor/extend.py), for a restarted gateway.
    """
    CREATE TABLE event_state (
        name        TEXT PRIMARY KEY,       -- "idle" (the event window), "backend:slurm", ...
        state       TEXT NOT NULL,          -- JSON
        updated_at  REAL NOT NULL
    );
    """,
)


@dataclass(frozen=True, slots=True)
class DesktopRecord:
    account: str
    backend: str
    state: Mapping[str, Any]


class StateStore:
    """The gateway's database. One instance per running gateway; not shared between processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        path.chmod(0o600)
        self.migrate()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"{self.path} was written by a newer gateway (schema {current}, this one knows "
                f"{len(MIGRATIONS)}); upgrade the gateway or use another --state-dir"
            )
        for version in range(current, len(MIGRATIONS)):
            with self._transaction() as db:
                # Another process (`gateway archive` beside `gateway up`) may have migrated since
                # we looked; the write lock of this transaction makes this second look reliable.
                if self.schema_version > version:
                    continue
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")

    # -- desktops ---------------------------------------------------------------------------------

    def save_desktop(self, account: str, backend: str, state: Mapping[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO desktops(account, backend, state, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(account) DO UPDATE SET backend=excluded.backend, state=excluded.state, "
                "updated_at=excluded.updated_at",
                (account, backend, json.dumps(dict(state), sort_keys=True), time.time()),
            )

    def forget_desktop(self, account: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM desktops WHERE account = ?", (account,))

    def desktops(self) -> dict[str, DesktopRecord]:
        rows = self._db.execute("SELECT account, backend, state FROM desktops").fetchall()
        return {a: DesktopRecord(a, b, json.loads(s)) for a, b, s in rows}

    # -- services (proxies, Apache): restartable, so only recorded to be cleaned up -------------

    def save_service(self, name: str, identity: ProcessIdentity) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO services(name, pid, pgid, start_time, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET pid=excluded.pid, pgid=excluded.pgid, "
                "start_time=excluded.start_time, updated_at=excluded.updated_at",
                (name, identity.pid, identity.pgid, identity.start_time, time.time()),
            )

    def forget_service(self, name: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM services WHERE name = ?", (name,))

    def services(self) -> dict[str, ProcessIdentity]:
        rows = self._db.execute("SELECT name, pid, pgid, start_time FROM services").fetchall()
        return {name: ProcessIdentity(pid, pgid, st) for name, pid, pgid, st in rows}

    # -- the event: what it holds beyond its desktops (an extension), restored by the next start ----

    def save_event_state(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the named states (one transaction: a restart never sees half of an extension)."""
        with self._transaction() as db:
            for name, state in states.items():
                db.execute(
                    "INSERT INTO event_state(name, state, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET state=excluded.state, updated_at=excluded.updated_at",
                    (name, json.dumps(dict(state), sort_keys=True), time.time()),
                )

    def event_state(self) -> dict[str, dict[str, Any]]:
        rows = self._db.execute("SELECT name, state FROM event_state").fetchall()
        return {name: json.loads(state) for name, state in rows}

    # -- for feature modules with tables of their own (accounts, archives) -----------------------

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        return self._transaction()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read-only statement."""
        return list(self._db.execute(sql, params).fetchall())

    # -- events -------------------------------------------------------------------------------------

    def record_event(self, kind: str, account: str | None = None, detail: str = "") -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO events(at, account, kind, detail) VALUES (?, ?, ?, ?)",
                (time.time(), account, kind, detail),
            )

    def events(self, account: str | None = None) -> list[tuple[float, str | None, str, str]]:
        if account is None:
            query = self._db.execute("SELECT at, account, kind, detail FROM events ORDER BY id")
        else:
            query = self._db.execute(
                "SELECT at, account, kind, detail FROM events WHERE account = ? ORDER BY id", (account,)
            )
        return list(query.fetchall())
