"""Commands about the participants' accounts and their archives: `accounts list|release|export`, `archive`."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from gateway.cli.shared import load_inputs, resolve_state_dir, setup_logging
from gateway.common.files import atomic_write
from gateway.model.config import Config, load_config
from gateway.model.errors import UserError
from gateway.model.state import StateStore
from gateway.supervisor.recover import STATE_DB, open_state_store

__all__ = ["cmd_accounts_list", "cmd_accounts_release", "cmd_accounts_export", "cmd_archive"]


def _open_store(args: argparse.Namespace) -> tuple[StateStore, Config, Path]:
    config = load_config(args.config)
    state_dir = resolve_state_dir(args.state_dir, config)
    if not (state_dir / STATE_DB).exists():
        raise UserError(f"no gateway state in {state_dir} (use --state-dir)")
    return open_state_store(state_dir), config, state_dir


def cmd_accounts_list(args: argparse.Namespace) -> int:
    from gateway.model.signups import acceptances, claims

    store, _, _ = _open_store(args)
    try:
        found = claims(store)
        accepted = acceptances(store)
    finally:
        store.close()
    print(f"{'ACCOUNT':<12} {'CLAIMED':<19} {'ACCEPTED':>8}  {'E-MAIL':<32} NAME")
    for c in found:
        count = len({a.document for a in accepted if a.account == c.account and a.email == c.email})
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.claimed_at))
        print(f"{c.account:<12} {when:<19} {count:>8}  {c.email:<32} {c.name}")
    print(f"{len(found)} accounts claimed", file=sys.stderr)
    return 0


def cmd_accounts_release(args: argparse.Namespace) -> int:
    from gateway.model.signups import release

    store, _, _ = _open_store(args)
    try:
        released = release(store, args.account)
    finally:
        store.close()
    if released is None:
        raise UserError(f"{args.account} is not claimed")
    print(f"Released {released.account} (was {released.email}); the next sign-up may get it.", file=sys.stderr)
    return 0


def cmd_accounts_export(args: argparse.Namespace) -> int:
    from gateway.model.signups import export_csv

    store, _, _ = _open_store(args)
    try:
        text = export_csv(store)
    finally:
        store.close()
    if args.output is None:
        sys.stdout.write(text)
    else:
        atomic_write(args.output, text, mode=0o600)  # names and e-mail addresses
        print(f"Wrote {args.output} (mode 0600)", file=sys.stderr)
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from gateway.model.archive import PackResult
    from gateway.supervisor.archive_event import archive_accounts

    setup_logging(args.verbose)
    tokens, config = load_inputs(args.tokens, args.config)
    state_dir = resolve_state_dir(args.state_dir, config)
    by_id = tokens.by_id()
    wanted = [a.strip() for a in args.accounts.split(",") if a.strip()] if args.accounts else list(by_id)
    unknown = [a for a in wanted if a not in by_id]
    if unknown:
        raise UserError(f"not in {args.tokens}: {', '.join(unknown)}")
    run = asyncio.run(archive_accounts([by_id[name] for name in wanted], config, state_dir,
                                       args.format or config.archive.format))
    results, notices, elapsed = run.results, run.notices, run.elapsed_s
    packed = 0
    for name in wanted:
        result = results[name]
        if isinstance(result, PackResult):
            packed += 1
            print(f"{name}: {result.path} {result.size} bytes, {result.files} files, sha256 {result.sha256}")
            for item in result.skipped:
                print(f"  skipped {item}")
            if name in notices:
                print(f"  {notices[name]}")
        else:
            print(f"{name}: no archive: {result}", file=sys.stderr)
    print(f"{packed} of {len(wanted)} archives written in {elapsed:.1f} s", file=sys.stderr)
    return 0 if packed == len(wanted) else 1
