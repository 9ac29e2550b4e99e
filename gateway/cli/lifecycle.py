"""`gateway up`, `gateway down` and `gateway users`: the event's whole life, from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gateway.backends import Backend, BackendError, backends_with_leftovers, make_backend
from gateway.cli.checks import (after_event_preflight, check_admin_password, check_listen, check_secret_files,
                                check_signup, check_users, is_disk_full, preflight)
from gateway.cli.shared import (PID_FILE, add_log_file, hold_lock, load_inputs, lock_is_held, read_pid, resolve_state_dir,
                                setup_logging, run_watching_children)
from gateway.common.files import ensure_private_dir
from gateway.common.polling import Backoff, PollTimeout, poll_until
from gateway.model.config import Config, load_config
from gateway.model.errors import UserError
from gateway.supervisor.recover import open_state_store, recover

__all__ = ["cmd_up", "cmd_down", "cmd_users_list", "cmd_users_remove"]

log = logging.getLogger("gateway")

#: How long `gateway down` waits for a running gateway to stop everything it started.
DOWN_TIMEOUT_S = 60.0


class _Runnable(Protocol):
    async def run(self, stop: asyncio.Event, *, on_ready: Callable[[str], None] | None = None) -> None: ...


def cmd_up(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    tokens, config = load_inputs(args.tokens, args.config)
    for warning in config.warnings:  # found when the config was read (theme colours below WCAG AA)
        log.warning("%s", warning)
    listen = args.listen or config.listen
    check_listen(listen, config)
    check_signup(listen, config)
    state_dir = resolve_state_dir(args.state_dir, config)
    check_admin_password(config, state_dir)
    if args.after_event:
        after_event_preflight(config)
    else:
        preflight(config, tokens)
        check_users(tokens, config, state_dir, listen)
        check_secret_files(tokens, config)
    for warning in tokens.warnings:
        log.warning("%s", warning)
    ensure_private_dir(state_dir)
    from gateway.supervisor.after_event import AfterEventGateway, record_invocation
    from gateway.supervisor.gateway import Gateway, GatewayOptions

    options = GatewayOptions(state_dir=state_dir, listen=listen)
    try:
        add_log_file(state_dir / "logs" / "gateway.log")
        with hold_lock(state_dir):
            record_invocation(state_dir, args.tokens, args.config)  # for `gateway down`'s last line
            if args.after_event:
                run_watching_children(_serve(lambda: AfterEventGateway(tokens, config, options),
                                   f"After the event: serving downloads for {len(tokens.accounts)} accounts; "
                                   f"state in {state_dir}"))
                print("Stopped: the download pages are no longer served.", file=sys.stderr)
                return 0
            run_watching_children(_serve(lambda: Gateway(tokens, config, options),
                               f"Starting {len(tokens.accounts)} desktops; state in {state_dir}"))
            print("Stopped: every desktop, proxy and web server of this gateway has exited.", file=sys.stderr)
            return 0
    except (OSError, sqlite3.Error) as exc:
        if not is_disk_full(exc):
            raise
        # Everything started so far was stopped on the way out; say what to fix, not a traceback.
        raise UserError(f"no space left on the device of the state dir {state_dir}; free some space "
                        "and start again (the state written before is intact)") from None


async def _serve(make_gateway: Callable[[], _Runnable], starting: str) -> None:
    """Run the gateway ``make_gateway()`` makes (inside the loop) until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway = make_gateway()
    print(starting, file=sys.stderr)
    await gateway.run(stop, on_ready=lambda message: print(message, flush=True))


# -- down -------------------------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    setup_logging(False)
    config = load_config(args.config)
    state_dir = resolve_state_dir(args.state_dir, config)
    lock = state_dir / PID_FILE
    if not state_dir.exists():
        raise UserError(f"no gateway state in {state_dir}")
    if lock_is_held(lock):
        pid = read_pid(lock)
        if pid is None:
            raise UserError(f"a gateway holds {lock} but its pid is unknown")
        os.kill(pid, signal.SIGTERM)
        print(f"Asked the gateway (pid {pid}) to stop; waiting...", file=sys.stderr)
        try:
            asyncio.run(poll_until(lambda: not lock_is_held(lock), timeout_s=DOWN_TIMEOUT_S,
                                   what="the gateway stopped", backoff=Backoff(first_s=0.2, factor=1.0, max_s=0.2)))
        except PollTimeout:
            raise UserError(f"the gateway (pid {pid}) did not stop within {DOWN_TIMEOUT_S:g} s") from None
        print("Stopped.", file=sys.stderr)
    else:
        # No gateway runs (it crashed): stop what it recorded.
        run_watching_children(_clean_up_after_crash(state_dir, config))
    if args.remove_users:
        _remove_users(state_dir, args.delete_homes)
    from gateway.supervisor.after_event import downloads_line

    print(downloads_line(state_dir, args.config), file=sys.stderr)
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    from gateway.backends.desktop_users import recorded_users

    state_dir = resolve_state_dir(args.state_dir, load_config(None))
    for account, user in sorted(recorded_users(state_dir).items()):
        print(f"{account}\t{user.name}\tuid {user.uid}\t{user.home}")
    return 0


def cmd_users_remove(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir, load_config(None))
    if lock_is_held(state_dir / PID_FILE):
        raise UserError(f"a gateway runs with {state_dir}; stop it first (gateway down --remove-users)")
    _remove_users(state_dir, args.delete_homes)
    return 0


def _remove_users(state_dir: Path, delete_homes: bool) -> None:
    from gateway.backends.desktop_users import remove_users

    lines = asyncio.run(remove_users(state_dir, delete_homes=delete_homes))
    for line in lines:
        print(line, file=sys.stderr)
    print(f"Removed the event's users: {len(lines)}.", file=sys.stderr)


async def _clean_up_after_crash(state_dir: Path, config: Config) -> None:
    """Stop every desktop and service a crashed gateway recorded, then what its backends left."""
    backends: dict[str, Backend] = {}

    def backend_for(name: str) -> Backend:
        if name not in backends:
            try:
                backends[name] = make_backend(name, config, state_dir)
            except BackendError as exc:
                raise UserError(f"cannot stop the desktops of backend {name}: {exc}") from None
        return backends[name]

    store = open_state_store(state_dir)
    try:
        recovery = await recover(store, backend_for, wanted={})  # nothing is wanted any more
        for name in backends_with_leftovers(state_dir):  # e.g. the event reservation it created
            backend_for(name)
        for backend in backends.values():
            await backend.close(final=True)
    finally:
        store.close()
    print(f"No gateway was running; stopped {recovery.stopped} leftover desktops and services.", file=sys.stderr)
    if recovery.not_stopped:
        raise UserError("\n".join(f"could not stop the desktop of {account}: {reason} (still recorded: "
                                  "`gateway down` tries again)" for account, reason in recovery.not_stopped.items()))
