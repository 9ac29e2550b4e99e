"""`gateway archive`: each account's workspace, wherever its desktop kept it, packed for download.

Local desktops' homes are read here; Slurm jobs' from the shared directory or the user's home on the
cluster file system; SSH hosts' over SFTP while packing (nothing copied first). Participants who
signed up are told by e-mail when ``archive.notify`` is set. The command line only parses and prints.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.backends import backend_name_for
from gateway.backends.desktop_users import account_workspace
from gateway.common.files import ensure_private_dir
from gateway.model.archive import PackResult, pack_accounts
from gateway.model.config import Config
from gateway.model.tokens import Account
from gateway.supervisor.recover import open_state_store

__all__ = ["ArchiveRun", "archive_accounts"]


@dataclass(slots=True)
class ArchiveRun:
    """What `gateway archive` did: per account its archive or why there is none, and the e-mails sent."""

    results: dict[str, PackResult | str] = field(default_factory=dict)
    notices: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0


def _local_and_remote(accounts: Sequence[Account], config: Config, state_dir: Path,
                      run: ArchiveRun) -> tuple[list[tuple[str, Path]], list[Account]]:
    """(account, directory) pairs read on this machine, and the accounts whose workspace is on an SSH host."""
    here: list[tuple[str, Path]] = []
    remote: list[Account] = []
    for account in accounts:
        backend = backend_name_for(account, config)
        if backend == "ssh":
            remote.append(account)
        elif backend in ("slurm", "dcv"):  # where the jobs wrote it: the shared dir or the user's home
            from gateway.backends.slurm import job_home

            try:
                here.append((account.id, job_home(config, state_dir, account.id)))
            except KeyError:
                run.results[account.id] = f"no user {account.id} on this host (slurm.run_as: account)"
        else:
            here.append((account.id, account_workspace(account.id, config, state_dir)))
    return here, remote


async def archive_accounts(accounts: Sequence[Account], config: Config, state_dir: Path, fmt: str) -> ArchiveRun:
    """Pack every account's workspace (at most ``archive.concurrency`` at a time), then send the e-mails."""
    if config.archive.notify:  # a bad credentials file stops here, before anything is packed
        from gateway.supervisor.archive_mail import smtp_target

        smtp_target(config)
    run = ArchiveRun()
    here, remote = _local_and_remote(accounts, config, state_dir, run)
    ensure_private_dir(state_dir)
    store = open_state_store(state_dir)
    try:
        started = time.monotonic()
        run.results.update(await pack_accounts(store, here, state_dir=state_dir, fmt=fmt,
                                               level=config.archive.compress_level,
                                               concurrency=config.archive.concurrency))
        if remote:
            from gateway.backends.remote_archive import pack_remote_accounts

            run.results.update(await pack_remote_accounts(store, remote, config=config, state_dir=state_dir, fmt=fmt,
                                                          level=config.archive.compress_level,
                                                          concurrency=config.archive.concurrency))
        run.elapsed_s = time.monotonic() - started
        if config.archive.notify:  # tell the participants who signed up
            from gateway.supervisor.archive_mail import notify_archives_ready

            packed = [a.id for a in accounts if isinstance(run.results.get(a.id), PackResult)]
            run.notices = await notify_archives_ready(config, store, packed)
    finally:
        store.close()
    return run
