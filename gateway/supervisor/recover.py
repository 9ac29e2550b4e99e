"""What a gateway that crashed left behind: its proxies, its Apache, its desktops.

:func:`recover` is used by both `gateway up` (which keeps the desktops still wanted and stops the
rest) and `gateway down` without a running gateway (which wants none, so stops them all). A desktop
whose stop fails keeps its record, so that the next `up` or `down` tries again: forgetting it would
leave it running, unseen, until the end of its time limit.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.backends.base import Backend, DesktopState, Status
from gateway.common.proc import is_alive, terminate_group
from gateway.model.errors import UserError
from gateway.model.state import DesktopRecord, StateStore
from gateway.model.tokens import Account

__all__ = ["Recovery", "recover", "stop_leftover_services", "open_state_store", "placeholder_account", "STATE_DB"]

log = logging.getLogger("gateway")

#: The state database in the state dir.
STATE_DB = "gateway.db"


def open_state_store(state_dir: Path) -> StateStore:
    """The state dir's database, migrated; UserError if it is unreadable or from a newer gateway."""
    path = state_dir / STATE_DB
    try:
        return StateStore(path)
    except RuntimeError as exc:  # written by a newer gateway: the message says what to do
        raise UserError(str(exc)) from None
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            raise  # the disk is full: `gateway up` says so in its own words
        raise UserError(f"{path}: cannot use the state database ({exc}); move it aside or use another "
                        "--state-dir") from None


def placeholder_account(account_id: str) -> Account:
    """An account record for stopping a desktop whose line was removed from the token file."""
    return Account(account_id, "localhost", f"/{account_id}", 1024, 1, "", 0)


@dataclass(slots=True)
class Recovery:
    """What :func:`recover` did."""

    #: Desktops still running (or whose state can't be told) that the new gateway takes over.
    adopted: dict[str, DesktopState] = field(default_factory=dict)
    #: Leftover desktops and services stopped.
    stopped: int = 0
    #: Desktops that could not be stopped, with why; their records are kept.
    not_stopped: dict[str, str] = field(default_factory=dict)

    def held(self, wanted: Mapping[str, object]) -> dict[str, str]:
        """Wanted accounts whose earlier desktop could not be stopped, with why.

        They get no new desktop: its record would replace the old one's, which would then run on
        unseen. The organiser stops it (or fixes what prevented it) and starts the gateway again.
        """
        return {account: reason for account, reason in self.not_stopped.items() if account in wanted}


async def recover(store: StateStore, backend_for: Callable[[str], Backend | None],
                  wanted: Mapping[str, tuple[Account, str]]) -> Recovery:
    """Stop the services a crashed gateway left, then adopt or stop each desktop it recorded.

    ``backend_for(name)`` is the backend that stops or adopts a recorded desktop (None: not
    configured, the record is left alone). ``wanted`` maps the accounts to keep to their account
    and backend name; every other desktop is stopped.
    """
    recovery = Recovery()
    recovery.stopped += await stop_leftover_services(store)
    for record in store.desktops().values():
        backend = backend_for(record.backend)
        if backend is None:
            # Written by a backend this configuration no longer uses; leave it, and say so.
            log.error("desktop of an unconfigured backend left alone account=%s backend=%s",
                      record.account, record.backend)
            continue
        account, backend_name = wanted.get(record.account, (None, None))
        if account is None or backend_name != record.backend:
            log.warning("desktop no longer wanted, stopping account=%s", record.account)
            await _stop(store, backend, account or placeholder_account(record.account), record, recovery)
            continue
        result = await backend.adopt(account, record.state)
        if result.status in (Status.RUNNING, Status.PENDING):
            log.info("desktop adopted account=%s backend=%s", account.id, record.backend)
            store.record_event("adopted", account.id)
            recovery.adopted[account.id] = record.state
        elif result.status is Status.UNKNOWN:
            # Can't tell (scheduler or host unreachable): keep it and let the watcher find out.
            log.warning("desktop state unknown, keeping account=%s reason=%s", account.id, result.reason)
            recovery.adopted[account.id] = record.state
        else:
            await _stop(store, backend, account, record, recovery)
    return recovery


async def stop_leftover_services(store: StateStore) -> int:
    """Stop proxies and Apache that a crashed gateway left behind; they are restartable."""
    stopped = 0
    for name, identity in store.services().items():
        if is_alive(identity):
            log.warning("stopping leftover service=%s pid=%d", name, identity.pid)
            await terminate_group(identity, grace_s=3)
            stopped += 1
        store.forget_service(name)
    return stopped


async def _stop(store: StateStore, backend: Backend, account: Account, record: DesktopRecord,
                recovery: Recovery) -> None:
    try:
        await backend.stop(account, record.state)
    except Exception as exc:  # kept on record: the next `gateway up` or `down` tries again
        reason = str(exc) or type(exc).__name__
        log.error("leftover desktop not stopped, its record is kept account=%s error=%s", record.account, reason)
        recovery.not_stopped[record.account] = reason
        return
    store.forget_desktop(record.account)
    recovery.stopped += 1
