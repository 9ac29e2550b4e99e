"""Checks `gateway up` (and `systemd install`) make before anything starts: one error listing all that is wrong."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from gateway.model.config import Config, parse_listen, public_listen_problem, public_signup_problem
from gateway.model.errors import InputError, UserError
from gateway.model.tokens import TokenFile
from gateway.cli.shared import program_exists

__all__ = ["check_listen", "check_signup", "is_disk_full", "after_event_preflight", "preflight", "check_users",
           "check_secret_files", "check_admin_password"]


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
    problem = public_signup_problem(config, listen)
    if problem:
        raise UserError(problem)


def is_disk_full(exc: BaseException) -> bool:
    """True for a write that failed because the disk or the user's quota is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and (
        getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in str(exc))


def after_event_preflight(config: Config) -> None:
    """Downloads only: archives must be offered, and the front must be there; nothing else is needed."""
    from gateway.supervisor.after_event import after_event_problems

    problems = after_event_problems(config)
    if config.apache.mode == "private" and not program_exists(config.apache.binary):
        problems.append(f"program not found: {config.apache.binary}")
    if problems:
        raise UserError("\n".join(problems))


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
        if not program_exists(program):
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


def check_secret_files(tokens: TokenFile, config: Config) -> None:
    """Files holding passwords or keys are private when the desktops run as other users.

    Those users are the participants: a token file that others may read hands every desktop's
    password to every desktop. (Desktops running as the gateway's own user read anything it can
    anyway; the token file then only gets a warning.)
    """
    from gateway.backends import backend_name_for
    from gateway.backends.desktop_users import users_mode

    if users_mode(config) == "gateway":
        return
    secrets = [(tokens.path, "holds every account's password")]
    if config.tls.key:
        secrets.append((config.tls.key, "is the TLS private key"))
    if any(backend_name_for(a, config) == "ssh" for a in tokens.accounts):
        secrets.append((os.path.expanduser(config.ssh.private_key), "is the SSH key that logs in to the hosts"))
    problems = []
    for path, what in secrets:
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            continue  # a missing key is reported by what needs it
        if mode & 0o077:
            problems.append(f"{path}: {what} and other users may read it (mode {mode:04o}), the participants' "
                            f"desktops among them; run: chmod 600 {path}")
    if problems:
        raise UserError("\n".join(problems))


def check_admin_password(config: Config, state_dir: Path) -> None:
    """An admin password the organiser chose is long enough not to be guessed from the event's Wi-Fi.

    The admin page never refuses the right password, even while one address is over its limit of
    failures (the organiser shares the venue's address with every participant), so length is what
    stops guessing. The password made by the gateway is random and long enough.
    """
    from gateway.web.admin_access import MIN_PASSWORD_LENGTH
    from gateway.web.cockpit import admin_password_path

    path = admin_password_path(config, state_dir)
    try:
        length = len(path.read_text().strip())
    except FileNotFoundError:
        return  # made at the first start, random
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the admin password: {getattr(exc, 'strerror', None) or exc}") from None
    if length < MIN_PASSWORD_LENGTH:
        raise UserError(f"{path}: the admin password has {length} characters; use at least {MIN_PASSWORD_LENGTH} "
                        "(or delete the file: a random one is made at the next start)")


def _qos_problem(config: Config) -> list[str]:
    """The private Apache caps tunnels per account with mod_qos in the websockify modes."""
    from gateway.proxies.apache import needs_qos, qos_module_path

    path = qos_module_path(config)
    if config.apache.mode != "private" or not needs_qos(config) or os.path.exists(path):
        return []
    return [f"Apache module missing: {path} (it caps the tunnels per account): apt-get install "
            "libapache2-mod-qos, or use proxy.mode builtin"]
