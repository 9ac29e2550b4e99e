"""The state database: migrations upgrade an older database in place and never discard it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.common.proc import ProcessIdentity
from gateway.model.state import MIGRATIONS, StateStore


def old_database(path: Path, version: int, *rows: str) -> None:
    """A state database as a gateway of schema ``version`` left it, holding ``rows`` (INSERT statements)."""
    old = sqlite3.connect(path)
    for script in MIGRATIONS[:version]:
        old.executescript(script)
    for row in rows:
        old.execute(row)
    old.execute(f"PRAGMA user_version = {version}")
    old.commit()
    old.close()


def test_version_one_database_is_migrated_not_discarded(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    old_database(path, 1, "INSERT INTO desktops(account, backend, state, updated_at) "
                          "VALUES ('ws01', 'local', '{\"x\": 1}', 0)")
    store = StateStore(path)
    try:
        assert store.schema_version == len(MIGRATIONS)
        assert store.desktops()["ws01"].state == {"x": 1}
    finally:
        store.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_database_of_the_last_version_gets_the_event_state_and_keeps_the_rest(tmp_path: Path) -> None:
    """A state dir from before `gateway extend` was kept (schema 3) starts with no extension to take back."""
    path = tmp_path / "gateway.db"
    old_database(path, 3, "INSERT INTO desktops(account, backend, state, updated_at) VALUES ('ws01', 'local', '{}', 0)",
                 "INSERT INTO events(at, account, kind, detail) VALUES (0, NULL, 'extend', 'by admin: +30 min')")
    store = StateStore(path)
    try:
        assert store.schema_version == len(MIGRATIONS) >= 4
        assert list(store.desktops()) == ["ws01"] and [e[2] for e in store.events()] == ["extend"]
        assert store.event_state() == {}
        store.save_event_state({"idle": {"extended_s": 600.0}, "backend:slurm": {}})
        store.save_event_state({"idle": {"extended_s": 900.0}})
        assert store.event_state() == {"idle": {"extended_s": 900.0}, "backend:slurm": {}}
    finally:
        store.close()


def test_database_from_a_newer_gateway_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="newer gateway"):
        StateStore(path)


def test_two_stores_on_one_new_database_both_work(tmp_path: Path) -> None:
    first = StateStore(tmp_path / "gateway.db")
    second = StateStore(tmp_path / "gateway.db")
    try:
        first.save_service("apache", ProcessIdentity(1, 1, 1))
        assert second.services()["apache"].pid == 1
    finally:
        first.close()
        second.close()
