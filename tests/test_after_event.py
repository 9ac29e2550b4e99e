"""After the event: `gateway up --after-event` serves the downloads and nothing else.

Real `gateway archive`, a real private Apache in front, real HTTP requests as a participant makes them
(sign-in form, /me, a download resumed with Range); no Xvnc, websockify or Slurm job of the event may
exist meanwhile, and `gateway down` says last what stays offered. What exists is asked of the OS (listening
ports, Xvnc command lines) and of the Slurm test cluster, which must answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.model.tokens import Account, format_tokens, generate_password
from tests.gateway_run import processes_mentioning
from tests.os_check import listening_ports, xvnc_on_port
from tests.system import free_port, free_ports, require_slurm_cluster

pytestmark = pytest.mark.system

EXPIRES = "2099-12-31T18:00:00+01:00"


def gateway(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


def command_lines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return lines


def slurm_of(prefix: str) -> list[str]:
    """The jobs (also those that ended less than MinJobAge ago) and reservations named ``prefix``...;
    fails when Slurm does not answer."""
    jobs = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%j"], capture_output=True, text=True,
                          timeout=30)
    assert jobs.returncode == 0, jobs.stderr
    reservations = subprocess.run(["scontrol", "show", "reservation", "-o"], capture_output=True, text=True,
                                  timeout=30)
    assert reservations.returncode == 0, reservations.stderr
    names = jobs.stdout.split() + re.findall(r"^ReservationName=(\S+)", reservations.stdout, re.MULTILINE)
    return [name for name in names if name.startswith(prefix)]


def desktops_of(accounts: list[Account]) -> list[str]:
    """What serves an account's desktop on this machine: a listener on its websocket or VNC port (the
    websockify fork server's children name no state dir), or an Xvnc on its VNC port."""
    listening = listening_ports()
    return ([f"{a.id}: websocket port {a.websocket_port} listens" for a in accounts if a.websocket_port in listening]
            + [f"{a.id}: VNC port {a.vnc_port} listens" for a in accounts if a.vnc_port in listening]
            + [f"{a.id}: Xvnc {pid}" for a in accounts for pid, _ in xvnc_on_port(a.vnc_port)])


async def test_after_event_serves_byte_exact_archives_with_range_and_no_desktops(tmp_path: Path) -> None:
    require_slurm_cluster("apache2")
    ports = iter(free_ports(6))
    accounts = [Account(f"ae{i:02d}", "localhost", f"/desktop/ae{i:02d}", next(ports), next(ports),
                        generate_password(), i) for i in (1, 2)]
    prefix = f"aet{os.getpid() % 10000}"
    # A Slurm account too: after the event it must get no job and no reservation.
    accounts.append(Account("aes03", "auto", "/desktop/aes03", next(ports), next(ports), generate_password(), 3,
                            (("backend", "slurm"),)))
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(format_tokens(accounts))
    tokens.chmod(0o600)
    state = tmp_path / "state"
    config = tmp_path / "gateway.yaml"
    config.write_text(f"desktop:\n  users: gateway\narchive:\n  enabled: true\n  expires: \"{EXPIRES}\"\n"
                      f"slurm:\n  run_as: gateway\n  job_name_prefix: {prefix}\n")
    for account in accounts[:2]:
        home = state / "workspaces" / account.id
        home.mkdir(parents=True)
        (home / "results.bin").write_bytes(os.urandom(300_000))
        (home / "notes.txt").write_text(f"notes of {account.id}\n")
    slurm_home = state / "slurm" / "aes03" / "home"  # where a run_as: gateway job keeps its files
    slurm_home.mkdir(parents=True)
    (slurm_home / "job-result.txt").write_text("computed on the cluster\n")

    packed = gateway("archive", str(tokens), "--config", str(config), "--state-dir", str(state))
    assert packed.returncode == 0, packed.stderr
    assert "3 of 3 archives written" in packed.stderr

    # Without archive.enabled there is nothing to serve: one line, status 2, nothing started.
    plain = tmp_path / "plain.yaml"
    plain.write_text("desktop:\n  users: gateway\n")
    refused = gateway("up", str(tokens), "--after-event", "--config", str(plain), "--state-dir", str(state),
                      "--listen", f"127.0.0.1:{free_port()}")
    assert refused.returncode == 2 and "archive.enabled" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    out = tmp_path / "after.out"
    with open(out, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "up", str(tokens), "--after-event",
                                    "--config", str(config), "--state-dir", str(state), "--listen",
                                    f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "Landing page:" not in out.read_text():
            assert process.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        assert "3 of 3 archives offered" in out.read_text()

        # No desktop, proxy, job or reservation of the event exists.
        everything = "\n".join(command_lines())
        assert not any(a.password in everything for a in accounts)
        assert desktops_of(accounts) == []
        assert slurm_of(prefix) == []
        assert not (state / "slurm-reservation.json").exists()

        account = accounts[0]
        archive = state / "archives" / f"{account.id}.tar.gz"
        expected = archive.read_bytes()
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(base) as response:
                landing = await response.text()
            assert "The event is over" in landing and EXPIRES in landing

            auth = basic(account.id, account.password)
            async with session.get(f"{base}archive/{account.id}", headers=auth) as response:
                assert response.status == 200
                body = await response.read()
            assert body == expected
            assert hashlib.sha256(body).hexdigest() == response.headers["X-Archive-SHA256"]
            # A broken download resumes where it stopped.
            async with session.get(f"{base}archive/{account.id}", headers={**auth, "Range": "bytes=1000-"}) as response:
                assert response.status == 206
                assert await response.read() == expected[1000:]
            async with session.get(f"{base}archive/{account.id}",
                                   headers=basic(account.id, "wrong-pw")) as response:
                assert response.status == 401
            async with session.get(f"{base}archive/{accounts[1].id}", headers=auth) as response:
                assert response.status == 403

            # Sign in as a participant does, then /me offers the download.
            async with session.get(f"{base}login") as response:
                csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text()).group(1)
            async with session.post(f"{base}login", data={"csrf": csrf, "account": accounts[2].id,
                                                          "password": accounts[2].password}) as response:
                me = await response.text()
                assert response.status == 200 and str(response.url).endswith("/me"), me
            assert f"archive/{accounts[2].id}" in me and "The event is over" in me
            async with session.get(f"{base}archive/{accounts[2].id}") as response:
                assert await response.read() == (state / "archives" / "aes03.tar.gz").read_bytes()

            admin_password = (state / "secrets" / "admin.password").read_text().strip()
            admin = basic("admin", admin_password)
            async with session.get(f"{base}admin/api/desktops", headers=admin) as response:
                rows = (await response.json())["desktops"]
            assert {r["state"] for r in rows} == {"stopped"}
            async with session.post(f"{base}admin/api/desktops/{account.id}/start", headers=admin,
                                    json={}) as response:
                assert "the event is over" in (await response.json())["result"]
            async with session.get(f"{base}metrics", headers=admin) as response:
                assert response.status == 200 and 'gateway_desktops{state="stopped"} 3.0' in await response.text()
        # Nothing started since (not even by the start request above).
        assert slurm_of(prefix) == []
        assert desktops_of(accounts) == []

        down = gateway("down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        last = down.stderr.strip().splitlines()[-1]
        assert "remain available with `gateway up" in last and "--after-event" in last and EXPIRES in last
        assert process.wait(timeout=30) == 0
        assert processes_mentioning(str(state)) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        # A failed run must not leave its private Apache behind: stop what the killed gateway recorded.
        gateway("down", "--state-dir", str(state))
        for pid in processes_mentioning(str(state)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
