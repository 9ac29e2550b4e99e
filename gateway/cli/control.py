"""Commands that talk to the running gateway over its control socket: `status`, `desktop`, `extend`."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

from gateway.cli.shared import PID_FILE, lock_is_held, resolve_state_dir
from gateway.model.config import load_config
from gateway.model.errors import UserError
from gateway.supervisor.front import CONTROL_SOCKET
from gateway.web.cockpit import fetch_status, request_action, request_extend

__all__ = ["cmd_status", "cmd_desktop", "cmd_extend", "format_status_table", "parse_duration"]


def _control_socket(args: argparse.Namespace) -> Path:
    state_dir = resolve_state_dir(args.state_dir, load_config(args.config))
    socket_path = state_dir / CONTROL_SOCKET
    if not lock_is_held(state_dir / PID_FILE) or not socket_path.exists():
        raise UserError(f"no gateway is running with state dir {state_dir}")
    return socket_path


def cmd_status(args: argparse.Namespace) -> int:
    status = asyncio.run(fetch_status(_control_socket(args)))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status_table(status["desktops"]))
    print(f"\nLocal desktops: {status.get('isolation') or 'none'}")
    return 0


def format_status_table(rows: list[dict]) -> str:
    columns = ("account", "backend", "protocol", "state", "where", "job", "up", "restarts", "viewers", "reason")
    table = [columns]
    for r in rows:
        where = f"{r['host']}:{r['port']}" if r["host"] else "-"
        up = f"{int(r['uptime_s'] // 60)}m" if r["uptime_s"] is not None else "-"
        table.append((r["account"], r["backend"], r["protocol"], r["state"], where, r["job_id"] or "-", up,
                      str(r["restarts"]), str(r["viewers"]), r["reason"] or ""))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in table)


def cmd_desktop(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(request_action(_control_socket(args), args.account, args.action))
    except LookupError:
        raise UserError(f"no desktop {args.account} in the running gateway") from None
    print(f"{args.account}: {result}")
    return 0


def parse_duration(text: str) -> float:
    """``30m``, ``1h``, ``1h30m`` or a plain number of minutes, as seconds; ValueError if not."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*(?:m|min)?)?\s*", text)
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"{text!r}: give a duration such as 30m, 1h or 1h30m")
    seconds = float(match.group(1) or 0) * 3600 + float(match.group(2) or 0) * 60
    if not 0 < seconds <= 24 * 3600:
        raise ValueError(f"{text!r}: give more than 0 and at most 24 hours")
    return seconds


def cmd_extend(args: argparse.Namespace) -> int:
    try:
        seconds = parse_duration(args.duration)
    except ValueError as exc:
        raise UserError(f"extend: {exc}") from None
    accounts = [a.strip() for a in args.accounts.split(",") if a.strip()] if args.accounts else None
    try:
        answer = asyncio.run(request_extend(_control_socket(args), seconds / 60, accounts))
    except LookupError as exc:
        raise UserError(f"extend: {exc}") from None
    except ValueError as exc:
        raise UserError(f"extend: {exc}") from None
    lines = answer["lines"]
    for line in lines:
        print(line)
    # A desktop that is not running has no limit to raise; one whose extension failed is worth an exit status.
    refused = [line for line in lines if ("refused" in line or "not extended" in line) and "the desktop is" not in line]
    print(f"Extended by {seconds / 60:g} min; recorded in the audit log."
          + (f" {len(refused)} not extended (see above)." if refused else ""), file=sys.stderr)
    return 1 if refused else 0
