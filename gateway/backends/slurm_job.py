"""A desktop's Slurm job as data: its batch script, its ``sbatch`` command line, and the files it shares
with the gateway (the password secret in, the report out), for the Slurm and the DCV backend.

The script is rendered from ``templates/desktop-job.sh.j2`` (or ``dcv-job.sh.j2``); every value in
it is one quoted shell word, and no password is in it: the job reads the 0600 secret file the
gateway wrote in the account's directory of the shared dir. The job's report lives in a directory
the job's user owns, so it is read without following links and believed only where it repeats
what the gateway already knows (:func:`report_mismatch`).
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.backends.desktop import ShellValue, session_environment, shell_exports, xvnc_argv
from gateway.backends.xauth import xauthority_shell
from gateway.common.files import atomic_write, ensure_private_dir
from gateway.common.render import render, shell_quote
from gateway.model.config import Config
from gateway.model.config_checks import AUTO_INTERFACE
from gateway.model.container import ContainerSpec, exec_argv
from gateway.model.tokens import AUTO_HOST, Account

__all__ = ["render_job_script", "render_script", "sbatch_argv", "slurm_duration", "job_name", "container_spec",
           "parse_report", "report_mismatch", "read_report", "output_tail", "private_dir", "write_secret"]

_PASSWORD_MARK = "\0password-file\0"
_XAUTHORITY_MARK = "\0xauthority\0"
_INTERFACE_MARK = "\0interface\0"
_SCRIPT_VARIABLES = {_PASSWORD_MARK: '"$passwd_file"', _XAUTHORITY_MARK: '"$XAUTHORITY"',
                     _INTERFACE_MARK: '"$listen_address"'}
#: Where the job keeps its runtime files, on the node: private to the job's user and this job.
_RUNTIME_DIR = ShellValue('"${TMPDIR:-/tmp}/workshop-desktop-$(id -u)-$job"')


def _shell_line(argv: Sequence[str]) -> str:
    """``argv`` as one shell command line: each word quoted, the password and cookie files and the listening
    address left to the script."""
    return " ".join(_SCRIPT_VARIABLES.get(word) or shell_quote(word) for word in argv)


def container_spec(config: Config) -> ContainerSpec:
    c = config.container
    return ContainerSpec(runtime=c.runtime, image=c.image, binds=tuple(c.binds))


def render_script(template: str, account: Account, *, home: str, workdir: str, **values: Any) -> str:
    """A job script from ``template``: the account, its HOME and work directory, and ``values``."""
    return render(template, account=account.id, home=home, workdir=workdir, **values)


def render_job_script(config: Config, account: Account, *, home: str, workdir: str, secret_file: str) -> str:
    """The batch script of ``account``'s desktop job. Every value is quoted; the password is not in it.

    Xvnc listens on slurm.interface, or with auto on the node's address in Slurm (NodeAddr), which is where
    the gateway connects: the job works it out on the node (templates/node-address.sh.j2), or fails saying why.
    """
    spec = container_spec(config)
    d = config.desktop
    xvnc = xvnc_argv(
        xvnc="Xvnc", displayfd=3, rfb_port=account.vnc_port, password_file=Path(_PASSWORD_MARK),
        geometry=d.geometry, depth=d.depth, desktop_name=account.id, max_cut_text=d.max_cut_text,
        interface=_INTERFACE_MARK, xauthority=Path(_XAUTHORITY_MARK),
    )
    # DISPLAY is exported by the script once Xvnc has said which display it took.
    environment = session_environment(home=home, runtime_dir=_RUNTIME_DIR,
                                      xauthority=ShellValue('"$XDG_RUNTIME_DIR/Xauthority"'),
                                      keyboard_layout=d.keyboard_layout, user=ShellValue('"$(id -un)"'))
    return render_script(
        "desktop-job.sh.j2", account, home=home, workdir=workdir,
        runtime=spec.runtime,
        secret_file=secret_file,
        listen_auto=config.slurm.interface == AUTO_INTERFACE,
        interface=config.slurm.interface,
        port=account.vnc_port,
        session_exports=shell_exports(environment),
        write_xauthority=xauthority_shell('"$XAUTHORITY"'),
        vncpasswd_line=_shell_line(exec_argv(spec, ["vncpasswd"])),
        xvnc_line=_shell_line(exec_argv(spec, xvnc)),
        session_line=_shell_line(exec_argv(spec, list(d.session))),
    )


def slurm_duration(seconds: float) -> str:
    """Seconds as Slurm's ``D-HH:MM:SS``."""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def job_name(config: Config, account: Account) -> str:
    return f"{config.slurm.job_name_prefix}-{account.id}"


def sbatch_argv(config: Config, account: Account, *, reservation: str | None, workdir: str,
                extra_time_s: float = 0.0) -> list[str]:
    """``sbatch`` with every option as its own argument; the script goes on stdin.

    ``extra_time_s``: what `gateway extend` added to the event, given to jobs submitted since.
    """
    s = config.slurm
    argv = [
        "sbatch", "--parsable",
        f"--job-name={job_name(config, account)}",
        f"--time={slurm_duration(s.time_limit_s + extra_time_s)}",
        "--nodes=1", "--ntasks=1",
        f"--cpus-per-task={s.cpus_per_desktop}",
        f"--chdir={workdir}",
        f"--output={workdir}/job-%j.out",
        # The job sets its own environment; the gateway's must not leak into a participant's desktop.
        "--export=NONE",
    ]
    if s.mem_per_desktop:
        argv.append(f"--mem={s.mem_per_desktop}")
    if reservation:
        argv.append(f"--reservation={reservation}")
    if s.partition:
        argv.append(f"--partition={s.partition}")
    if s.account:
        argv.append(f"--account={s.account}")
    if s.qos:
        argv.append(f"--qos={s.qos}")
    if account.vnc_host != AUTO_HOST:
        argv.append(f"--nodelist={account.vnc_host}")  # a named host pins the desktop to that node
    argv += list(s.extra_sbatch_args)
    return argv


# -- what the job writes: its report and its output --------------------------------------------------


def parse_report(text: str) -> dict[str, str]:
    """The job's report: ``key=value`` lines (job, node, host, port, display)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def report_mismatch(report: Mapping[str, str], *, node: str, port: int) -> str | None:
    """Why a job's report disagrees with Slurm's node for the job or the account's port (None: it agrees).

    The report lives in a directory the participant's user owns: it may say anything, so it is only
    believed where it repeats what the gateway already knows.
    """
    reported_node, reported_port = report.get("node", ""), report.get("port", "")
    if reported_node != node:
        return f"it names node {reported_node[:64]!r}, but Slurm runs the job on {node!r}"
    if reported_port != str(port):
        return f"it names port {reported_port[:16]!r}, but the account's VNC port is {port}"
    return None


def _read_regular(path: Path, *, last_bytes: int) -> str | None:
    """The last ``last_bytes`` of ``path`` if it is a regular file (never a link, pipe or directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as handle:
        handle.seek(max(0, info.st_size - last_bytes))
        return handle.read(last_bytes).decode(errors="replace")


def read_report(workdir: str, job_id: int) -> dict[str, str] | None:
    """The report of job ``job_id`` in ``workdir``, if it is a regular file about this job."""
    text = _read_regular(Path(workdir) / f"report-{job_id}", last_bytes=4096)
    report = parse_report(text) if text is not None else None
    return report if report is not None and report.get("job") == str(job_id) else None


def output_tail(workdir: str, job_id: int, hidden: Sequence[str], lines: int = 6) -> str:
    """The last lines of the job's output file, for organisers; lines holding one of ``hidden`` are left out."""
    text = _read_regular(Path(workdir) / f"job-{job_id}.out", last_bytes=8192) or ""
    kept = [re.sub(r"[\x00-\x1f\x7f]", " ", line).strip()[:240] for line in text.splitlines()]
    kept = [line for line in kept if line and not any(secret and secret in line for secret in hidden)]
    return " | ".join(kept[-lines:])


# -- what the gateway writes for the job ---------------------------------------------------------------


def private_dir(path: Path, owner: pwd.struct_passwd | None) -> None:
    """Create ``path`` (0700), owned by ``owner`` if given; refuse a symlink planted in its place."""
    if owner is None:
        ensure_private_dir(path)
        return
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        raise OSError(f"{path} is not a directory")
    if info.st_uid != owner.pw_uid or info.st_gid != owner.pw_gid:
        os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
    os.chmod(path, 0o700)


def write_secret(path: Path, data: bytes, owner: pwd.struct_passwd | None) -> None:
    """Write a 0600 file atomically, owned by ``owner`` before it appears under its name."""
    atomic_write(path, data, mode=0o600, owner=None if owner is None else (owner.pw_uid, owner.pw_gid))
