"""The `gateway` command: `up`, `down`, `tokens check|generate`, `apache-config`, `container build`."""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import logging
import os
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.model.config import PROJECT_ROOT, Config, default_state_dir, load_config, parse_listen, public_listen_problem
from gateway.model.errors import InputError, UserError
from gateway.common.files import atomic_write, ensure_private_dir
from gateway.model.tokens import TokenFile, format_tokens, generate_tokens, load_tokens

if TYPE_CHECKING:
    from gateway.model.state import StateStore

__all__ = ["main"]

log = logging.getLogger("gateway")


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
        for line in str(exc).splitlines():
            print(f"gateway: error: {line}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


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
    desktop.add_argument("action", choices=("restart", "stop", "start", "disconnect"))
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


# -- up ---------------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    tokens, config = load_inputs(args.tokens, args.config)
    listen = args.listen or config.listen
    check_listen(listen, config)
    check_signup(listen, config)
    state_dir = resolve_state_dir(args.state_dir, config)
    if args.after_event:
        _after_event_preflight(config)
    else:
        preflight(config, tokens)
        check_users(tokens, config, state_dir, listen)
    for warning in tokens.warnings:
        log.warning("%s", warning)
    ensure_private_dir(state_dir)
    try:
        add_log_file(state_dir / "logs" / "gateway.log")
        with hold_lock(state_dir):
            from gateway.supervisor.after_event import record_invocation

            record_invocation(state_dir, args.tokens, args.config)  # for `gateway down`'s last line
            if args.after_event:
                return asyncio.run(_run_after_event(tokens, config, state_dir, listen))
            return asyncio.run(_run_gateway(tokens, config, state_dir, listen))
    except (OSError, sqlite3.Error) as exc:
        if not is_disk_full(exc):
            raise
        # Everything started so far was stopped on the way out; say what to fix, not a traceback.
        raise UserError(f"no space left on the device of the state dir {state_dir}; free some space "
                        "and start again (the state written before is intact)") from None


def check_listen(listen: str, config: Config) -> None:
    """A well-formed listen address, and TLS wherever other machines can connect; before anything starts."""
    try:
        problem = public_listen_problem(config, listen)
    except ValueError as exc:
        raise UserError(f"--listen {exc}") from None
    if problem:
        raise UserError(problem)


def check_signup(listen: str, config: Config) -> None:
    """A public sign-up form needs the event code; before anything starts."""
    from gateway.model.config import public_signup_problem

    problem = public_signup_problem(config, listen)
    if problem:
        raise UserError(problem)


def is_disk_full(exc: BaseException) -> bool:
    """True for a write that failed because the disk or the user's quota is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and (
        getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in str(exc))


async def _run_gateway(tokens: TokenFile, config: Config, state_dir: Path, listen: str) -> int:
    from gateway.supervisor.gateway import Gateway, GatewayOptions

    use_pidfd_child_watcher()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(tokens, config, GatewayOptions(state_dir=state_dir, listen=listen))
    print(f"Starting {len(tokens.accounts)} desktops; state in {state_dir}", file=sys.stderr)
    await gateway.run(stop, on_ready=lambda message: print(message, flush=True))
    print("Stopped: every desktop, proxy and web server of this gateway has exited.", file=sys.stderr)
    return 0


def _after_event_preflight(config: Config) -> None:
    """Downloads only: archives must be offered, and the front must be there; nothing else is needed."""
    from gateway.supervisor.after_event import after_event_problems

    problems = after_event_problems(config)
    if config.apache.mode == "private" and not _program_exists(config.apache.binary):
        problems.append(f"program not found: {config.apache.binary}")
    if problems:
        raise UserError("\n".join(problems))


async def _run_after_event(tokens: TokenFile, config: Config, state_dir: Path, listen: str) -> int:
    from gateway.supervisor.after_event import AfterEventGateway
    from gateway.supervisor.gateway import GatewayOptions

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway = AfterEventGateway(tokens, config, GatewayOptions(state_dir=state_dir, listen=listen))
    print(f"After the event: serving downloads for {len(tokens.accounts)} accounts; state in {state_dir}",
          file=sys.stderr)
    await gateway.run(stop, on_ready=lambda message: print(message, flush=True))
    print("Stopped: the download pages are no longer served.", file=sys.stderr)
    return 0


def use_pidfd_child_watcher() -> None:
    """Before Python 3.12 asyncio waits for each child in a thread of its own; pidfds need none."""
    if sys.version_info < (3, 12) and hasattr(os, "pidfd_open"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            watcher = asyncio.PidfdChildWatcher()
            watcher.attach_loop(asyncio.get_running_loop())
            asyncio.set_child_watcher(watcher)


def load_inputs(tokens_path: Path, config_path: Path | None) -> tuple[TokenFile, Config]:
    """Both inputs are read and every problem in either is reported together."""
    problems = []
    tokens = config = None
    try:
        tokens = load_tokens(tokens_path)
    except InputError as exc:
        problems += exc.problems
    try:
        config = load_config(config_path)
    except InputError as exc:
        problems += exc.problems
    if problems:
        raise InputError(problems)
    assert tokens is not None and config is not None
    return tokens, config


def resolve_state_dir(option: Path | None, config: Config) -> Path:
    if option is not None:
        return option.resolve()
    if config.state_dir:
        return Path(config.state_dir).expanduser().resolve()
    return default_state_dir()


def preflight(config: Config, tokens: TokenFile | None = None) -> None:
    """Everything that must exist before anything starts; one error listing all that is missing."""
    from gateway.backends import backend_name_for

    missing = []
    needed = {"local"} if tokens is None else {backend_name_for(a, config) for a in tokens.accounts}
    programs = []
    if "local" in needed:  # Xvnc and the session run here only for local desktops
        programs += ["Xvnc", "vncpasswd", config.desktop.session[0]]
    if "slurm" in needed:
        programs += ["sbatch", "squeue", "scancel", "scontrol", "sinfo"]
    if config.apache.mode == "private":
        programs.append(config.apache.binary)
    for program in programs:
        if not _program_exists(program):
            missing.append(f"program not found: {program}")
    for key in ("cert", "key"):
        value = getattr(config.tls, key)
        if value and not os.access(value, os.R_OK):
            missing.append(f"tls.{key}: cannot read {value}")
    missing += _qos_problem(config)
    if tokens is not None and needed & {"slurm", "dcv"}:  # jobs run as the accounts' users: they must exist
        from gateway.backends.slurm import run_as_problems

        slurm_accounts = [a for a in tokens.accounts if backend_name_for(a, config) in ("slurm", "dcv")]
        missing += run_as_problems(config, slurm_accounts, tokens.path)
    if "ssh" in needed:  # the key that logs in to the VNC hosts, and their host keys
        for key in ("private_key", "known_hosts"):
            path = os.path.expanduser(getattr(config.ssh, key))
            if not os.access(path, os.R_OK):
                missing.append(f"ssh.{key}: cannot read {path}")
    if missing:
        hint = ("install them with: apt-get install tigervnc-standalone-server tigervnc-tools apache2 openbox xterm"
                if any("not found" in m for m in missing) else "")
        if any(m.endswith(("sbatch", "squeue", "scancel", "scontrol", "sinfo")) for m in missing):
            hint += "\nthe Slurm client commands come with: apt-get install slurm-client (and a munge key)"
        raise UserError("\n".join(missing + ([hint] if hint else [])))


def check_users(tokens: TokenFile, config: Config, state_dir: Path, listen: str) -> None:
    """Every local account can get a Unix user of its own (or the trial mode is allowed here)."""
    from gateway.backends import backend_name_for
    from gateway.backends.desktop_users import check_desktop_users

    local = [a for a in tokens.accounts if backend_name_for(a, config) == "local"]
    problems = check_desktop_users(local, config, state_dir, tokens_path=tokens.path,
                                   listen_host=parse_listen(listen)[0])
    if problems:
        raise InputError(problems)


def _qos_problem(config: Config) -> list[str]:
    """The private Apache caps tunnels per account with mod_qos in the websockify modes."""
    from gateway.proxies.apache import needs_qos, qos_module_path

    path = qos_module_path(config)
    if config.apache.mode != "private" or not needs_qos(config) or os.path.exists(path):
        return []
    return [f"Apache module missing: {path} (it caps the tunnels per account): apt-get install "
            "libapache2-mod-qos, or use proxy.mode builtin"]


def _program_exists(program: str) -> bool:
    if os.sep in program:
        return os.access(program, os.X_OK)
    return shutil.which(program) is not None


class hold_lock:
    """One gateway per state dir: an exclusive lock on ``gateway.pid`` for the whole run."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "gateway.pid"
        self.fd = -1

    def __enter__(self) -> "hold_lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                pid = _read_pid(self.path)
                raise UserError(f"a gateway is already running with state dir {self.path.parent}"
                                + (f" (pid {pid})" if pid else "") + "; stop it with `gateway down`") from None
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc: object) -> None:
        os.ftruncate(self.fd, 0)
        os.close(self.fd)


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _lock_is_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# -- down -------------------------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    setup_logging(False)
    config = load_config(args.config)
    state_dir = resolve_state_dir(args.state_dir, config)
    lock = state_dir / "gateway.pid"
    if not state_dir.exists():
        raise UserError(f"no gateway state in {state_dir}")
    if _lock_is_held(lock):
        pid = _read_pid(lock)
        if pid is None:
            raise UserError(f"a gateway holds {lock} but its pid is unknown")
        os.kill(pid, signal.SIGTERM)
        print(f"Asked the gateway (pid {pid}) to stop; waiting...", file=sys.stderr)
        deadline = time.monotonic() + 60
        while _lock_is_held(lock):
            if time.monotonic() > deadline:
                raise UserError(f"the gateway (pid {pid}) did not stop within 60 s")
            time.sleep(0.2)
        print("Stopped.", file=sys.stderr)
    else:
        # No gateway runs (it crashed): stop what it recorded.
        asyncio.run(_clean_up_after_crash(state_dir, config))
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
    if _lock_is_held(state_dir / "gateway.pid"):
        raise UserError(f"a gateway runs with {state_dir}; stop it first (gateway down --remove-users)")
    _remove_users(state_dir, args.delete_homes)
    return 0


def _remove_users(state_dir: Path, delete_homes: bool) -> None:
    from gateway.backends.desktop_users import remove_users

    lines = asyncio.run(remove_users(state_dir, delete_homes=delete_homes))
    for line in lines:
        print(line, file=sys.stderr)
    print(f"Removed the event's users: {len(lines)}.", file=sys.stderr)


async def _clean_up_after_crash(state_dir: Path, config: Config) -> int:
    from gateway.backends import BackendError, backends_with_leftovers, make_backend
    from gateway.common.proc import is_alive, terminate_group
    from gateway.model.state import StateStore
    from gateway.supervisor.gateway import _placeholder

    use_pidfd_child_watcher()
    store = StateStore(state_dir / "gateway.db")
    stopped = 0
    backends = {}
    try:
        for name, identity in store.services().items():
            if is_alive(identity):
                await terminate_group(identity, grace_s=3)
                stopped += 1
            store.forget_service(name)
        for record in store.desktops().values():
            if record.backend not in backends:
                try:
                    backends[record.backend] = make_backend(record.backend, config, state_dir)
                except BackendError as exc:
                    raise UserError(f"cannot stop {record.account}: {exc}") from None
            await backends[record.backend].stop(_placeholder(record.account), record.state)
            store.forget_desktop(record.account)
            stopped += 1
        for name in backends_with_leftovers(state_dir):  # e.g. the event reservation it created
            if name not in backends:
                backends[name] = make_backend(name, config, state_dir)
        for backend in backends.values():
            await backend.close(final=True)
    finally:
        store.close()
    print(f"No gateway was running; stopped {stopped} leftover desktops and services.", file=sys.stderr)
    return 0


# -- tokens ---------------------------------------------------------------------------------------


def cmd_tokens_check(args: argparse.Namespace) -> int:
    tokens = load_tokens(args.file)
    for warning in tokens.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.file}: {len(tokens.accounts)} accounts, no problems")
    return 0


def cmd_tokens_generate(args: argparse.Namespace) -> int:
    try:
        accounts = generate_tokens(
            args.count, host=args.host, prefix=args.prefix,
            first_websocket_port=args.first_websocket_port, first_vnc_port=args.first_vnc_port,
        )
    except ValueError as exc:
        raise UserError(f"cannot generate: {exc}") from None
    except InputError as exc:
        reasons = "; ".join(p.message for p in exc.problems[:3])
        raise UserError(f"cannot generate with these options: {reasons}") from None
    text = format_tokens(accounts)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} exists; use --force to overwrite it")
    atomic_write(args.output, text, mode=0o600)
    print(f"Wrote {len(accounts)} accounts to {args.output} (mode 0600)", file=sys.stderr)
    return 0


def cmd_tokens_sheet(args: argparse.Namespace) -> int:
    from gateway.cli.slips import MAX_PER_PAGE, check_url, make_slips, render_sheet

    url = check_url(args.url)
    if not 1 <= args.per_page <= MAX_PER_PAGE:
        raise UserError(f"--per-page {args.per_page}: use 1 to {MAX_PER_PAGE}")
    tokens, config = load_inputs(args.file, args.config)
    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} exists; use --force to overwrite it")
    data = render_sheet(args.output, make_slips(tokens.accounts, url), title=config.event.title,
                        per_page=args.per_page)
    atomic_write(args.output, data, mode=0o600)
    print(f"Wrote {len(tokens.accounts)} slips to {args.output} (mode 0600). It holds every password: print it, "
          "then delete it.", file=sys.stderr)
    return 0


# -- container ------------------------------------------------------------------------------------


def cmd_container_build(args: argparse.Namespace) -> int:
    from gateway.model.container import ContainerSpec, build_argv, parse_definition

    summary = parse_definition(args.definition)  # a broken definition fails here, in one line
    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} exists; use --force to rebuild it")
    argv = build_argv(ContainerSpec(runtime=args.runtime, image=str(args.output.resolve())), args.definition.resolve(),
                      args.output.resolve(), fakeroot=args.fakeroot, force=args.force)
    if not _program_exists(argv[0]):
        raise UserError(f"{argv[0]} not found: install {args.runtime} to build the image")
    print(f"Building {args.output} from {args.definition} ({summary.bootstrap}:{summary.from_}): {' '.join(argv)}",
          file=sys.stderr)
    # The build takes minutes and prints its own progress: let it talk to the terminal directly.
    return asyncio.run(_run_attached(argv, cwd=args.definition.resolve().parent))


async def _run_attached(argv: list[str], *, cwd: Path) -> int:
    process = await asyncio.create_subprocess_exec(*argv, cwd=cwd)
    status = await process.wait()
    if status != 0:
        raise UserError(f"{argv[0]} build failed with status {status}")
    return 0


# -- status and desktop actions -----------------------------------------------------------------


def _control_socket(args: argparse.Namespace) -> Path:
    from gateway.supervisor.gateway import CONTROL_SOCKET

    state_dir = resolve_state_dir(args.state_dir, load_config(args.config))
    socket_path = state_dir / CONTROL_SOCKET
    if not _lock_is_held(state_dir / "gateway.pid") or not socket_path.exists():
        raise UserError(f"no gateway is running with state dir {state_dir}")
    return socket_path


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from gateway.web.cockpit import fetch_status

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
    from gateway.web.cockpit import request_action

    try:
        result = asyncio.run(request_action(_control_socket(args), args.account, args.action))
    except LookupError:
        raise UserError(f"no desktop {args.account} in the running gateway") from None
    print(f"{args.account}: {result}")
    return 0


def parse_duration(text: str) -> float:
    """``30m``, ``1h``, ``1h30m`` or a plain number of minutes, as seconds; ValueError if not."""
    import re

    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*(?:m|min)?)?\s*", text)
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"{text!r}: give a duration such as 30m, 1h or 1h30m")
    seconds = float(match.group(1) or 0) * 3600 + float(match.group(2) or 0) * 60
    if not 0 < seconds <= 24 * 3600:
        raise ValueError(f"{text!r}: give more than 0 and at most 24 hours")
    return seconds


def cmd_extend(args: argparse.Namespace) -> int:
    from gateway.web.cockpit import request_extend

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


# -- systemd --------------------------------------------------------------------------------------


def cmd_systemd_install(args: argparse.Namespace) -> int:
    from gateway.cli.systemd_unit import ServiceSpec, install_service

    tokens, config = load_inputs(args.tokens, args.config)  # refuse to install a service that can't start
    check_listen(args.listen, config)
    if args.after_event:
        _after_event_preflight(config)
    # The service runs as root: without desktop.users set, it creates the event's users.
    creates_users = config.desktop.users in (None, "create")
    del tokens
    spec = ServiceSpec(tokens=args.tokens.resolve(), config=args.config.resolve() if args.config else None,
                       listen=args.listen, creates_users=creates_users and not args.after_event,
                       after_event=args.after_event)
    unit = install_service(spec, args.unit_dir)
    print(f"Wrote {unit}. Start it with: systemctl daemon-reload && systemctl enable --now {unit.name}")
    print(f"State, logs and workspaces: {spec.state_dir}; stop with: systemctl stop {unit.name}")
    return 0


# -- apache-config --------------------------------------------------------------------------------


def cmd_apache_config(args: argparse.Namespace) -> int:
    from gateway.proxies.apache import render_apache_config
    from gateway.proxies.websockify import PerAccountWebsockify
    from gateway.proxies.relay import BuiltinRelay

    tokens, config = load_inputs(args.tokens, args.config)
    if config.proxy.mode == "shared":
        # The shared mode's route tokens are secrets made fresh by each `gateway up`.
        raise UserError("proxy.mode shared: use apache.mode system, which installs the rules at each start")
    mode = BuiltinRelay(config, {}) if config.proxy.mode == "builtin" else PerAccountWebsockify(config, Path("."))
    routes = mode.routes(tokens.accounts)
    text = render_apache_config(config, routes, web_port=args.web_port, layout=None, listen=config.listen)
    sys.stdout.write(text)
    return 0


# -- accounts, archive (participants' sign-up and post-event archives) ---------------------------


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


def _open_store(args: argparse.Namespace) -> tuple["StateStore", Config, Path]:
    from gateway.model.state import StateStore

    config = load_config(args.config)
    state_dir = resolve_state_dir(args.state_dir, config)
    if not (state_dir / "gateway.db").exists():
        raise UserError(f"no gateway state in {state_dir} (use --state-dir)")
    return StateStore(state_dir / "gateway.db"), config, state_dir


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
    from gateway.model.archive import PackResult, pack_accounts
    from gateway.backends import backend_name_for
    from gateway.backends.desktop_users import account_workspace
    from gateway.model.state import StateStore

    setup_logging(args.verbose)
    tokens, config = load_inputs(args.tokens, args.config)
    state_dir = resolve_state_dir(args.state_dir, config)
    by_id = tokens.by_id()
    wanted = [a.strip() for a in args.accounts.split(",") if a.strip()] if args.accounts else list(by_id)
    unknown = [a for a in wanted if a not in by_id]
    if unknown:
        raise UserError(f"not in {args.tokens}: {', '.join(unknown)}")
    fmt = args.format or config.archive.format
    if config.archive.notify:  # a bad credentials file stops here, before anything is packed
        from gateway.supervisor.archive_mail import smtp_target

        smtp_target(config)
    jobs, remote, results = [], [], {}
    for name in wanted:
        backend = backend_name_for(by_id[name], config)
        if backend == "ssh":
            remote.append(by_id[name])
        elif backend in ("slurm", "dcv"):  # where the jobs wrote it: the shared dir or the user's home
            from gateway.backends.slurm import job_home

            try:
                jobs.append((name, job_home(config, state_dir, name)))
            except KeyError:
                results[name] = f"no user {name} on this host (slurm.run_as: account)"
        else:
            jobs.append((name, account_workspace(name, config, state_dir)))
    ensure_private_dir(state_dir)
    store = StateStore(state_dir / "gateway.db")
    try:
        started = time.monotonic()
        results.update(asyncio.run(pack_accounts(store, jobs, state_dir=state_dir, fmt=fmt,
                                                 level=config.archive.compress_level,
                                                 concurrency=config.archive.concurrency)))
        if remote:  # workspaces on SSH hosts, read over SFTP while packing
            from gateway.backends.remote_archive import pack_remote_accounts

            results.update(asyncio.run(pack_remote_accounts(store, remote, config=config, state_dir=state_dir,
                                                            fmt=fmt, level=config.archive.compress_level,
                                                            concurrency=config.archive.concurrency)))
        elapsed = time.monotonic() - started
        notices = {}
        if config.archive.notify:  # tell the participants who signed up
            from gateway.supervisor.archive_mail import notify_archives_ready

            notices = asyncio.run(notify_archives_ready(
                config, store, [name for name in wanted if isinstance(results.get(name), PackResult)]))
    finally:
        store.close()
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


# -- logging --------------------------------------------------------------------------------------

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=_LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # asyncssh logs every channel (each remote command of backend: ssh) at INFO.
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if verbose else logging.WARNING)


def add_log_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logging.getLogger().addHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
