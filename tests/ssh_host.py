"""A private OpenSSH server on a loopback address (127.0.0.2) for tests of backend: ssh.

The sshd runs from a temporary directory with its own generated host key, user key, authorized_keys
and config; the machine's ~/.ssh and /etc/ssh keys are never read or written. The "VNC host" is this
machine seen through that sshd. Shared by tests/test_ssh_backend.py and tests/test_faults.py.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.model.tokens import Account, generate_password
from tests.gateway_run import processes_mentioning
from tests.os_check import processes
from tests.system import free_port, require_program, skip_or_fail

__all__ = ["HOST", "SshHost", "ssh_host", "ssh_accounts", "free_port_on", "children_of"]

HOST = "127.0.0.2"


def require_sshd() -> str:
    path = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)
    if path is None:
        skip_or_fail("sshd is not installed (openssh-server)")
    require_program("ssh-keygen")
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege separation directory
    if not privsep.is_dir():
        if os.geteuid() != 0:
            skip_or_fail("/run/sshd (which sshd needs) is missing and only root can create it")
        privsep.mkdir(mode=0o755, parents=True, exist_ok=True)
    return path


def free_port_on(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (sshd's per-connection processes leave its process group)."""
    parents: dict[int, list[int]] = {}
    for child in processes():
        parents.setdefault(child.ppid, []).append(child.pid)
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class SshHost:
    """A private sshd on HOST:port, with keys made for the test."""

    directory: Path
    sshd: str
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        d = self.directory
        d.mkdir(mode=0o700)
        self.port = free_port_on(HOST)
        self.host_key = d / "host_ed25519"
        self.user_key = d / "user_ed25519"
        for key in (self.host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(key)], check=True)
        (d / "authorized_keys").write_text(self.user_key.with_suffix(".pub").read_text())
        self.known_hosts = d / "known_hosts"
        self.write_known_hosts(self.host_key)
        self.config = d / "sshd_config"
        self.config.write_text(
            f"ListenAddress {HOST}\nPort {self.port}\nHostKey {self.host_key}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PrintMotd no\nMaxSessions 10\nLogLevel VERBOSE\n"
            "Subsystem sftp internal-sftp\n"  # `gateway archive` reads workspaces over SFTP
        )
        self.log = d / "sshd.log"
        self.remote_dir = d / "remote"  # ssh.state_dir: what the gateway keeps on the "host"

    def write_known_hosts(self, key: Path) -> None:
        kind, blob = key.with_suffix(".pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[{HOST}]:{self.port} {kind} {blob}\n")

    def start(self, wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        """Start sshd in the foreground; ``wrap`` may turn its command line into another that runs it
        under the same pid (e.g. traced: tests.exec_log.ExecRecorder.command)."""
        argv = [self.sshd, "-D", "-e", "-f", str(self.config)]
        log = open(self.log, "ab")
        self.process = subprocess.Popen(wrap(argv) if wrap else argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex((HOST, self.port)) == 0:
                    return
            if self.process.poll() is not None:
                raise AssertionError(f"sshd exited: {self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError("sshd did not listen within 10 s")

    def stop(self) -> None:
        """Stop the listener and every connection it serves (as when the host goes away)."""
        if self.process is None:
            return
        children = children_of(self.process.pid)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None

    def logins(self) -> int:
        return self.log.read_text(errors="replace").count("Accepted publickey")

    def config_text(self, **overrides: object) -> str:
        # ssh.interface is left to its default, auto: Xvnc listens on HOST, where sshd took the connection.
        values = {"user": getpass.getuser(), "private_key": self.user_key, "known_hosts": self.known_hosts,
                  "port": self.port, "state_dir": self.remote_dir, "connect_timeout_s": 5,
                  "connect_attempts": 2, "command_timeout_s": 20, **overrides}
        return "ssh:\n" + "".join(f"  {k}: {v}\n" for k, v in values.items())

    def leftovers(self) -> list[int]:
        """Processes started for desktops on this host (their command line or HOME names remote_dir)."""
        return processes_mentioning(str(self.remote_dir))


@pytest.fixture
def ssh_host(tmp_path: Path) -> Iterator[SshHost]:
    host = SshHost(tmp_path / "sshhost", require_sshd())
    host.start()
    try:
        yield host
    finally:
        host.stop()
        for pid in host.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def ssh_accounts(count: int, prefix: str = "sh") -> list[Account]:
    return [Account(f"{prefix}{i:02d}", HOST, f"/desktop/{prefix}{i:02d}", free_port(), free_port_on(HOST),
                    generate_password(), i, (("backend", "ssh"),)) for i in range(1, count + 1)]
