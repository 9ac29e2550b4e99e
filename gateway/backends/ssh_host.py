"""SSH connections to the VNC hosts: one per login, shared by its accounts, and the only way commands reach a host.

A login is a host with the shared ``ssh.user``, or ``user@host`` with ``ssh.user: "{account}"``
(:func:`login_key`). Its connection is opened on first use and again after it is lost, with
retries and backoff; at most ``ssh.max_sessions_per_host`` commands run over it at once. Host keys
are checked against ``ssh.known_hosts``: a host with no entry there, or with another key, is
refused (:class:`HostUnreachable`, with a message that says which), and only its accounts fail.
Never read: the gateway user's ``~/.ssh/config`` and SSH agent.

Commands are argv lists (:func:`gateway.backends.ssh_scripts.remote_command`); secrets go on stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh

from gateway.backends.base import BackendError
from gateway.backends.ssh_scripts import (
    ProbeReport,
    RemoteProcess,
    parse_arrival,
    parse_probe,
    remote_command,
    script,
    shown,
)
from gateway.common.polling import Backoff, PollTimeout, poll_until
from gateway.common.proc import last_line
from gateway.model.config import RestartConfig, SshConfig
from gateway.model.restart import RestartPolicy

__all__ = ["SshHosts", "HostUnreachable", "HostInfo", "RemoteResult", "login_key", "split_login", "describe",
           "PER_ACCOUNT_USER"]

log = logging.getLogger("gateway.ssh")

#: ssh.user meaning "each account logs in as the user named like it".
PER_ACCOUNT_USER = "{account}"
#: How often terminate() looks whether the signalled processes have exited.
STOP_CHECK_INTERVAL_S = 0.2
KEEPALIVE_INTERVAL_S = 15


def describe(exc: BaseException) -> str:
    """A connection error in words ("Connection refused", not "Connect call failed (...)")."""
    errno_ = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and errno_:
        return os.strerror(errno_)
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def login_key(host: str, user: str | None) -> str:
    """One SSH login: ``user@host`` for an account's own user, just the host for the shared ssh.user."""
    return f"{user}@{host}" if user else host


def split_login(where: str) -> tuple[str | None, str]:
    """(user or None, host) of a :func:`login_key` (host names never contain ``@``)."""
    user, sep, host = where.rpartition("@")
    return (user or None) if sep else None, host


class HostUnreachable(BackendError):
    """The host could not be reached or did not answer in time: nothing is known about it."""


@dataclass(frozen=True, slots=True)
class HostInfo:
    state_dir: str  # absolute, on the host
    boot_id: str
    #: The host's address this login's connection arrived at (sshd's SSH_CONNECTION); None: sshd named none.
    arrived_at: str | None = None


@dataclass(frozen=True, slots=True)
class RemoteResult:
    argv: tuple[str, ...]
    exit_status: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def last_error_line(self) -> str:
        return last_line(self.stderr) or last_line(self.stdout) or "(no output)"


class _HostLink:
    """The one SSH connection to a host, opened when first needed and again after it is lost."""

    def __init__(self, hosts: "SshHosts", host: str) -> None:
        self.hosts = hosts
        self.host = host
        self.sessions = asyncio.Semaphore(hosts.settings.max_sessions_per_host)
        self.conn: asyncssh.SSHClientConnection | None = None
        #: The host's facts, learnt over ``info_conn`` (learnt again over a new connection).
        self.info: HostInfo | None = None
        self.info_conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self.info_lock = asyncio.Lock()
        self._attempts = 0
        self._last_error: str | None = None

    async def connection(self) -> asyncssh.SSHClientConnection:
        seen = self._attempts
        async with self._lock:
            if self.conn is not None and not self.conn.is_closed():
                return self.conn
            if self._attempts != seen and self._last_error is not None:
                # Another account's attempt failed while this one waited: don't hammer the host.
                raise HostUnreachable(self._last_error)
            self._attempts += 1
            try:
                self.conn = await self.hosts.connect(self.host)
            except HostUnreachable as exc:
                self._last_error = str(exc)
                raise
            self._last_error = None
            log.info("ssh connected host=%s", self.host)
            return self.conn

    def drop(self, conn: asyncssh.SSHClientConnection) -> None:
        if self.conn is conn:
            self.conn = None
        conn.close()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.wait_closed()


class SshHosts:
    """Every login's connection, and the commands run over them."""

    def __init__(self, settings: SshConfig) -> None:
        self.settings = settings
        self._links: dict[str, _HostLink] = {}
        self._client_key: asyncssh.SSHKey | None = None

    @property
    def per_account(self) -> bool:
        return self.settings.user == PER_ACCOUNT_USER

    def username(self, where: str) -> str | None:
        """Who logs in for ``where``: its own user, else ssh.user (None: the gateway's user)."""
        user, _ = split_login(where)
        return user or (None if self.per_account else self.settings.user)

    @property
    def private_key_path(self) -> str:
        return os.path.expanduser(self.settings.private_key)

    @property
    def known_hosts_path(self) -> str:
        return os.path.expanduser(self.settings.known_hosts)

    def link(self, host: str) -> _HostLink:
        link = self._links.get(host)
        if link is None:
            link = self._links[host] = _HostLink(self, host)
        return link

    def load_key(self) -> asyncssh.SSHKey:
        if self._client_key is None:
            try:
                self._client_key = asyncssh.read_private_key(self.private_key_path)
            except (OSError, asyncssh.KeyImportError) as exc:
                raise BackendError(f"cannot read ssh.private_key {self.private_key_path}: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
        return self._client_key

    async def connect(self, where: str) -> asyncssh.SSHClientConnection:
        """Connect, retrying with jittered backoff; HostUnreachable with the reason if it can't."""
        s = self.settings
        username = self.username(where)
        _, host = split_login(where)
        key = self.load_key()
        if not os.access(self.known_hosts_path, os.R_OK):
            raise HostUnreachable(f"cannot read ssh.known_hosts {self.known_hosts_path}: host keys can't be checked")
        options: dict[str, Any] = {
            "port": s.port,
            "client_keys": [key],
            "known_hosts": self.known_hosts_path,
            "config": None,  # never the gateway user's ~/.ssh/config
            "agent_path": None,
            "password_auth": False,
            "kbdint_auth": False,
            "gss_auth": False,
            "host_based_auth": False,
            "connect_timeout": s.connect_timeout_s,
            "login_timeout": s.connect_timeout_s,
            "keepalive_interval": KEEPALIVE_INTERVAL_S,
            "keepalive_count_max": 3,
        }
        if username:
            options["username"] = username
        policy = RestartPolicy(RestartConfig(max_attempts=s.connect_attempts, window_s=3600,
                                             backoff_initial_s=0.5, backoff_max_s=5.0))
        reason = "no attempt made"
        for attempt in range(1, s.connect_attempts + 1):
            try:
                async with asyncio.timeout(s.connect_timeout_s + 1):
                    return await asyncssh.connect(host, **options)
            except asyncssh.HostKeyNotVerifiable:
                raise HostUnreachable(self._host_key_problem(host)) from None
            except asyncssh.PermissionDenied:
                raise HostUnreachable(
                    f"{username or 'the gateway user'}@{host} refused the key {self.private_key_path} "
                    "(is its public key in that user's authorized_keys?)") from None
            except TimeoutError:
                reason = f"no answer within {s.connect_timeout_s:g} s"
            except (OSError, asyncssh.Error) as exc:
                reason = describe(exc)
            log.warning("ssh connect failed host=%s user=%s attempt=%d reason=%s", host, username or "-",
                        attempt, reason)
            delay = policy.next_delay()
            if attempt < s.connect_attempts and delay is not None:
                await asyncio.sleep(delay)
        raise HostUnreachable(f"cannot connect to {host} port {s.port} over SSH: {reason} "
                              f"({s.connect_attempts} attempts)")

    def _host_key_problem(self, host: str) -> str:
        path = self.known_hosts_path
        port = self.settings.port
        try:
            known = asyncssh.read_known_hosts(path)
            keys, ca_keys, *_ = known.match(host, host, port)
        except (OSError, ValueError, asyncssh.Error):
            keys, ca_keys = [], []
        where = host if port == 22 else f"[{host}]:{port}"
        if keys or ca_keys:
            return (f"the host key of {where} does not match the one in {path}: refused. The host was "
                    f"reinstalled, or something is intercepting the connection; check the key, then "
                    f"update {path}")
        return (f"the host key of {where} is unknown: {path} has no entry for it, so it was refused. "
                f"Check the key, then add it (e.g. ssh-keyscan -p {port} {host} >> {path})")

    async def exec(
        self,
        host: str,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout_s: float | None = None,
    ) -> RemoteResult:
        """Run one command on ``host`` over its shared connection (the only way commands reach a host).

        Secrets go through ``input`` (stdin), which is never logged. HostUnreachable when the host
        can't be reached, the connection breaks, or the command takes longer than ``timeout_s``.
        """
        argv = tuple(str(a) for a in argv)
        command = remote_command(argv)
        timeout_s = timeout_s or self.settings.command_timeout_s
        link = self.link(host)
        conn = await link.connection()
        async with link.sessions:
            started = time.monotonic()
            try:
                async with asyncio.timeout(timeout_s):
                    async with conn.create_process(
                        command, encoding="utf-8", errors="replace",
                        stdin=asyncssh.PIPE if input is not None else asyncssh.DEVNULL,
                    ) as process:
                        stdout, stderr = await process.communicate(input)
                        status = process.exit_status
            except TimeoutError:
                raise HostUnreachable(f"{shown(argv)[:60]} on {host} did not finish within {timeout_s:g} s") from None
            except asyncssh.ChannelOpenError as exc:
                raise HostUnreachable(f"{host} refused a new SSH session: {exc.reason}") from None
            except (OSError, asyncssh.Error) as exc:
                link.drop(conn)
                raise HostUnreachable(f"lost the SSH connection to {host}: {exc or type(exc).__name__}") from None
        duration = time.monotonic() - started
        log.debug("ssh host=%s command=%s status=%s duration_s=%.3f", host, shown(argv), status, duration)
        return RemoteResult(argv, status, stdout or "", stderr or "", duration)

    async def host_info(self, host: str) -> HostInfo:
        """The host's absolute state dir (created), boot id and the address the connection arrived at, once per
        connection (a new connection may arrive at another address)."""
        link = self.link(host)
        async with link.info_lock:
            conn = await link.connection()
            if link.info is not None and link.info_conn is conn:
                return link.info
            result = await self.exec(host, script("prepare-host", self.settings.state_dir))
            values = dict(line.partition(" ")[::2] for line in result.stdout.splitlines())
            if not result.ok or not values.get("dir") or not values.get("boot"):
                raise BackendError(f"cannot create {self.settings.state_dir} on {host}: {result.last_error_line()}")
            link.info = HostInfo(values["dir"], values["boot"].strip(), parse_arrival(values.get("arrived", "")))
            link.info_conn = conn
            return link.info

    async def probe(self, host: str, processes: Sequence[RemoteProcess]) -> ProbeReport:
        result = await self.exec(host, script("probe", *(p.pid for p in processes)))
        try:
            return parse_probe(result.stdout)
        except ValueError as exc:
            raise HostUnreachable(f"checking processes on {host} failed: {exc} "
                                  f"(status {result.exit_status}: {result.last_error_line()})") from None

    async def terminate(self, host: str, boot_id: str, processes: Sequence[RemoteProcess], *,
                        grace_s: float) -> None:
        """SIGTERM the process groups of those ``processes`` that are still themselves, wait, SIGKILL.

        Each was started with setsid, so its pid is its process group id.
        """
        if not processes:
            return
        report = await self.probe(host, processes)
        if report.boot_id != boot_id:
            return  # the host restarted: nothing of ours runs there
        live = [p for p in processes if p.found_in(report)]
        if not live:
            return
        groups = [f"-{p.pid}" for p in live]
        await self.exec(host, ["kill", "-s", "TERM", "--", *groups])

        async def all_gone() -> bool:
            report = await self.probe(host, live)
            return not any(p.found_in(report) for p in live)

        with contextlib.suppress(PollTimeout):
            await poll_until(all_gone, timeout_s=grace_s, what=f"processes on {host} exiting",
                             backoff=Backoff(first_s=STOP_CHECK_INTERVAL_S, factor=1.0, max_s=STOP_CHECK_INTERVAL_S))
        # Members of a group may outlive its leader (a session's terminal): SIGKILL what is left.
        await self.exec(host, ["kill", "-s", "KILL", "--", *groups])

    async def sftp(self, where: str) -> asyncssh.SFTPClient:
        """An SFTP session over the login's connection; the caller exits it."""
        conn = await self.link(where).connection()
        try:
            return await conn.start_sftp_client()
        except (OSError, asyncssh.Error) as exc:
            raise HostUnreachable(f"{where} refused an SFTP session: {getattr(exc, 'reason', None) or exc}") from None

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self._links.values()))
