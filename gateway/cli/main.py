"""The `gateway` command: argument parsing and the one-line errors; each command lives in a module of its own.

`up`, `down`, `users` (gateway.cli.lifecycle); `status`, `desktop`, `extend` (gateway.cli.control,
through the running gateway's control socket); `tokens`, `container`, `systemd`, `apache-config`
(gateway.cli.prepare); `accounts`, `archive` (gateway.cli.accounts).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.backends.base import BackendError
from gateway.cli.accounts import cmd_accounts_export, cmd_accounts_list, cmd_accounts_release, cmd_archive
from gateway.cli.control import cmd_desktop, cmd_extend, cmd_status
from gateway.cli.lifecycle import cmd_down, cmd_up, cmd_users_list, cmd_users_remove
from gateway.cli.prepare import (cmd_apache_config, cmd_container_build, cmd_systemd_install, cmd_tokens_check,
                                 cmd_tokens_generate, cmd_tokens_sheet)
from gateway.model.actions import ORGANISER_ACTION_NAMES
from gateway.model.config import PROJECT_ROOT, default_state_dir
from gateway.model.errors import InputError, UserError

__all__ = ["main", "build_parser"]

#: Exit status of a command that failed for a reason printed in one line.
ERROR_STATUS = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except InputError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return exc.exit_status
    except UserError as exc:
        _print_error(str(exc))
        return exc.exit_status
    except BackendError as exc:  # a scheduler, host or desktop program refused: say so, without a traceback
        _print_error(str(exc) or type(exc).__name__)
        return ERROR_STATUS
    except KeyboardInterrupt:
        return 130


def _print_error(text: str) -> None:
    for line in text.splitlines() or [""]:
        print(f"gateway: error: {line}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Browser desktops for hands-on workshops.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start every desktop in TOKENS and serve the landing page")
    up.add_argument("tokens", type=Path, help="token file: account vnchost websocketpath websocketport vncport vncpassword")
    _common_options(up)
    up.add_argument("--listen", help="HOST:PORT participants connect to (default from config: 127.0.0.1:8080)")
    up.add_argument("--after-event", action="store_true",
                    help="start no desktops: serve only the landing page, sign-in, /me, the archives, admin and /metrics")
    up.set_defaults(handler=cmd_up)

    down = commands.add_parser("down", help="stop the gateway running with this state dir, and all it started")
    down.add_argument("--state-dir", type=Path, help="state directory (default: %s)" % default_state_dir())
    down.add_argument("--config", type=Path, help="gateway.yaml (for the backend settings)")
    _remove_users_options(down, "then also delete the Unix users made for the event's desktops")
    down.set_defaults(handler=cmd_down)

    users = commands.add_parser("users", help="the Unix users made for the event's desktops")
    users_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    users_list = users_commands.add_parser("list", help="the users this event made, one per account")
    users_list.add_argument("--state-dir", type=Path, help="state directory (default: %s)" % default_state_dir())
    users_list.set_defaults(handler=cmd_users_list)
    users_remove = users_commands.add_parser("remove", help="delete the users this event made, and nothing else")
    users_remove.add_argument("--state-dir", type=Path, help="state directory (default: %s)" % default_state_dir())
    _remove_users_options(users_remove, None)
    users_remove.set_defaults(handler=cmd_users_remove)

    tokens = commands.add_parser("tokens", help="check or generate token files")
    token_commands = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    check = token_commands.add_parser("check", help="validate a token file; exit 2 with PATH:LINE: messages if wrong")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=cmd_tokens_check)
    gen = token_commands.add_parser("generate", help="write a token file with random passwords (mode 0600)")
    gen.add_argument("--count", type=int, required=True)
    gen.add_argument("--host", default="localhost")
    gen.add_argument("--prefix", default="ws")
    gen.add_argument("--first-websocket-port", type=int,
                     help="default: after the VNC ports, at 6001 at the earliest")
    gen.add_argument("--first-vnc-port", type=int, default=5901)
    gen.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    gen.add_argument("--force", action="store_true", help="overwrite an existing file")
    gen.set_defaults(handler=cmd_tokens_generate)
    sheet = token_commands.add_parser("sheet", help="one slip per account (URL, account, password, QR code) to "
                                                    "print and hand out; written mode 0600")
    sheet.add_argument("file", type=Path, help="token file")
    sheet.add_argument("--url", required=True, help="the landing page URL participants open")
    sheet.add_argument("-o", "--output", type=Path, default=Path("slips.pdf"),
                       help="slips.pdf or slips.html (the format follows the suffix; default slips.pdf)")
    sheet.add_argument("--per-page", type=int, default=8, help="slips per page (1-24, default 8)")
    sheet.add_argument("--config", type=Path, help="gateway.yaml (for event.title)")
    sheet.add_argument("--force", action="store_true", help="overwrite an existing file")
    sheet.set_defaults(handler=cmd_tokens_sheet)

    container = commands.add_parser("container", help="build the desktop container image")
    container_commands = container.add_subparsers(dest="container_command", required=True, metavar="ACTION")
    build = container_commands.add_parser("build", help="singularity/apptainer build of containers/desktop.def")
    build.add_argument("--runtime", choices=("singularity", "apptainer"), default="apptainer")
    build.add_argument("--definition", type=Path, default=PROJECT_ROOT / "containers" / "desktop.def")
    build.add_argument("--output", type=Path, default=Path("desktop.sif"))
    build.add_argument("--fakeroot", action="store_true", help="build without root (needs subuid/subgid set up)")
    build.add_argument("--force", action="store_true", help="overwrite an existing image")
    build.set_defaults(handler=cmd_container_build)

    status = commands.add_parser("status", help="show every desktop of the running gateway")
    status.add_argument("--state-dir", type=Path, help="state directory (default: %s)" % default_state_dir())
    status.add_argument("--config", type=Path)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)

    desktop = commands.add_parser("desktop", help="restart, stop, start or disconnect one desktop")
    desktop.add_argument("action", choices=ORGANISER_ACTION_NAMES)
    desktop.add_argument("account")
    desktop.add_argument("--state-dir", type=Path)
    desktop.add_argument("--config", type=Path)
    desktop.set_defaults(handler=cmd_desktop)

    extend = commands.add_parser("extend", help="give the running event and its desktops more time (Slurm "
                                                "time limits, the reservation, the idle event window)")
    extend.add_argument("duration", help="how much longer: 30m, 1h, 1h30m (a plain number is minutes)")
    extend.add_argument("--accounts", help="comma-separated accounts (default: every desktop)")
    extend.add_argument("--state-dir", type=Path)
    extend.add_argument("--config", type=Path)
    extend.set_defaults(handler=cmd_extend)

    systemd = commands.add_parser("systemd", help="run the gateway as a systemd service")
    systemd_commands = systemd.add_subparsers(dest="systemd_command", required=True, metavar="ACTION")
    install = systemd_commands.add_parser("install", help="write the unit file for this token file and config")
    install.add_argument("tokens", type=Path)
    install.add_argument("--config", type=Path)
    install.add_argument("--listen", default="127.0.0.1:8080")
    install.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    install.add_argument("--after-event", action="store_true", help="the unit serves only the downloads "
                                                                    "(gateway up --after-event)")
    install.set_defaults(handler=cmd_systemd_install)

    apache = commands.add_parser("apache-config", help="print the Apache rules for organisers who run Apache themselves")
    apache.add_argument("tokens", type=Path)
    apache.add_argument("--config", type=Path)
    apache.add_argument("--web-port", type=int, default=8080, help="port the gateway's pages listen on (default 8080)")
    apache.set_defaults(handler=cmd_apache_config)
    _add_participant_commands(commands)
    return parser


def _remove_users_options(parser: argparse.ArgumentParser, remove_help: str | None) -> None:
    if remove_help is not None:
        parser.add_argument("--remove-users", action="store_true", help=remove_help)
    parser.add_argument("--delete-homes", action="store_true",
                        help="with the users, delete their homes (default: keep them, owned by root, for archives)")


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="gateway.yaml (every key optional; see README)")
    parser.add_argument("--state-dir", type=Path, help="state, logs and password files (default: %s)" % default_state_dir())


def _add_participant_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    accounts = commands.add_parser("accounts", help="see and manage the accounts participants signed up for")
    actions = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every claimed account: e-mail, name, when, what was accepted")
    release = actions.add_parser("release", help="free an account for the next sign-up (acceptances stay on record)")
    release.add_argument("account")
    export = actions.add_parser("export", help="write the claims as CSV (mode 0600 when written to a file)")
    export.add_argument("--csv", action="store_true", required=True, help="CSV format (the only one)")
    export.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    for parser, handler in ((listing, cmd_accounts_list), (release, cmd_accounts_release), (export, cmd_accounts_export)):
        _common_options(parser)
        parser.set_defaults(handler=handler)

    archive = commands.add_parser("archive", help="pack each account's workspace for download after the event")
    archive.add_argument("tokens", type=Path)
    archive.add_argument("--accounts", help="comma-separated accounts (default: every account in TOKENS)")
    archive.add_argument("--format", choices=("tar.gz", "zip"), help="default from config: archive.format")
    _common_options(archive)
    archive.set_defaults(handler=cmd_archive)


if __name__ == "__main__":
    sys.exit(main())
