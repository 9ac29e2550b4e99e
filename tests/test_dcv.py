"""NICE DCV sessions for GPU accounts, with the VNC desktop as the fallback (issue 6).

Unit tests for the pure pieces (job script, sbatch line, .dcv file, sinfo verdict, backend choice,
config), and system tests on the project's real Slurm test cluster (partition ``gpu`` with one fake
GRES gpu on /dev/null), real Apache and the real sign-in. Only DCV itself is replaced: by
``tests/standin/dcv-standin`` (the ``dcv`` CLI subset and a small web server per session). Skips
without a cluster, unless GATEWAY_REQUIRE_SYSTEM=1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.common import rfb
from gateway.backends import backend_name_for
from gateway.backends.dcv import (
    connection_file,
    dcv_sbatch_argv,
    partition_problem,
    render_dcv_job_script,
)
from gateway.backends.slurm_parse import parse_sinfo_partitions
from gateway.model.config import Config, parse_config
from gateway.model.errors import InputError
from gateway.model.tokens import Account, generate_password
from tests.gateway_run import GatewayRun, port_is_listening, processes_mentioning
from tests.system import free_port, require_program, require_slurm_cluster
from tests.test_slurm_gateway import (
    clean_up_slurm_event,
    gateway_down,
    our_jobs,
    wait_no_jobs,
)

STANDIN = Path(__file__).with_name("standin") / "dcv-standin"


def account(name: str, *extras: tuple[str, str], host: str = "auto") -> Account:
    return Account(name, host, f"/desktop/{name}", free_port(), free_port(), generate_password(), 1, tuple(extras))


# -- unit tests -----------------------------------------------------------------------------------


def test_backend_choice_follows_protocol_and_gpu() -> None:
    plain = Config()
    auto = parse_config("dcv:\n  default_protocol: auto\n")
    assert backend_name_for(account("a", ("protocol", "dcv")), plain) == "dcv"
    assert backend_name_for(account("b", ("gpu", "yes")), plain) == plain.backend  # default protocol: vnc
    assert backend_name_for(account("c", ("gpu", "yes")), auto) == "dcv"
    assert backend_name_for(account("d", ("protocol", "auto"), ("gpu", "yes")), plain) == "dcv"
    assert backend_name_for(account("e", ("protocol", "auto")), auto) == auto.backend
    assert backend_name_for(account("f", ("protocol", "vnc"), ("gpu", "yes")), auto) == auto.backend
    assert backend_name_for(account("g", ("protocol", "dcv"), ("backend", "ssh")), plain) == "ssh"
    assert backend_name_for(account("h", ("protocol", "dcv"), host="localhost"), plain) == "local"


def test_dcv_config_is_validated_with_lines() -> None:
    with pytest.raises(InputError) as caught:
        parse_config("dcv:\n  port: 0\n  gres: 'gpu 1'\n  web_url_path: dcv\n  wait_s: 0\n  init_script: rel.sh\n"
                     "  partition: 'a b'\n", "g.yaml")
    text = str(caught.value)
    for line, key in ((2, "dcv.port"), (3, "dcv.gres"), (4, "dcv.web_url_path"), (5, "dcv.wait_s"),
                      (6, "dcv.init_script"), (7, "dcv.partition")):
        assert f"g.yaml:{line}: {key}" in text, text
    with pytest.raises(InputError, match="g.yaml:2: dcv.session_type must be one of: virtual, console"):
        parse_config("dcv:\n  session_type: shared\n", "g.yaml")
    config = parse_config("dcv:\n  partition: viz\n  gres: gpu:a100:1\n  web_url_path: /\n")
    assert config.dcv.partition == "viz" and config.dcv.port == 8443 and config.dcv.session_type == "virtual"


def test_job_script_creates_waits_reports_and_closes_the_session() -> None:
    config = parse_config("slurm:\n  job_name_prefix: ev\ndcv:\n  init_script: /opt/init it.sh\n  wait_s: 20\n"
                          "  dcv_path: /opt/nice dcv/bin/dcv\n  port: 9443\n")
    script = render_dcv_job_script(config, account("ws.01"), home="/h", workdir="/w/ws.01", owner="ws01")
    assert "dcv='/opt/nice dcv/bin/dcv'" in script
    assert ('"$dcv" create-session --type virtual --owner ws01 --init \'/opt/init it.sh\' "$session"') in script
    assert "session=ev-ws_01\"-$job\"" in script  # DCV session ids: letters, digits, - and _
    assert '"$dcv" describe-session "$session" -j' in script
    assert '"$dcv" close-session "$session"' in script and "trap cleanup EXIT" in script
    assert "port=%s" in script and " 9443 " in script and "session=%s" in script
    assert "-le 40 ]" in script  # 20 s of 0.5 s tries
    bash = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert bash.returncode == 0, bash.stderr
    argv = dcv_sbatch_argv(config, account("ws.01"), reservation="res", workdir="/w/ws.01")
    assert "--partition=gpu" in argv and "--gres=gpu:1" in argv and "--reservation=res" in argv
    off = parse_config("dcv:\n  use_reservation: false\n  gres: ''\n")
    argv = dcv_sbatch_argv(off, account("ws01"), reservation="res", workdir="/w")
    assert not any(a.startswith(("--reservation", "--gres")) for a in argv)


async def test_a_vnc_fallback_gets_the_new_view_only_password_a_dcv_session_has_none(tmp_path: Path) -> None:
    """A fallback runs the Slurm desktop job, which makes its password file again from a rewritten secret; a DCV
    session's job reads no secret, so none is written for it."""
    from gateway.backends.dcv import DcvBackend

    backend = DcvBackend(parse_config("slurm:\n  run_as: gateway\n"), tmp_path)
    owner = account("ws01")
    for protocol, written in (("dcv", False), ("vnc", True)):
        workdir = tmp_path / protocol
        workdir.mkdir()
        state = {"job_id": 7, "user": None, "workdir": str(workdir), "protocol": protocol}
        await backend.refresh_passwords(owner, state)
        secret = workdir / ".vnc-secret"
        assert secret.exists() is written, protocol
        assert not written or owner.password in secret.read_text()


def test_connection_file_has_no_password_and_refuses_injection() -> None:
    text = connection_file(host="gpu01", port=8443, session_id="ev-ws01-42", user="ws01")
    assert text == "[version]\nformat=1.0\n\n[connect]\nhost=gpu01\nport=8443\nsessionid=ev-ws01-42\nuser=ws01\n"
    assert "password" not in text
    with pytest.raises(ValueError):
        connection_file(host="gpu01\npassword=x", port=8443, session_id="s", user="u")
    with pytest.raises(ValueError):
        connection_file(host="gpu01", port=8443, session_id="", user="u")


def test_partition_verdict() -> None:
    def verdict(sinfo: str) -> tuple[str | None, bool]:  # sinfo --format=%P|%a|%D|%t|%G for partition gpu
        return partition_problem(parse_sinfo_partitions(sinfo), "gpu", "gpu:1")

    assert verdict("") == ("there is no partition gpu", False)
    assert verdict("gpu|up|1|idle|gpu:1\n") == (None, True)
    assert verdict("gpu|up|1|alloc|gpu:1\n") == (None, False)
    assert verdict("gpu|up|1|mix|gpu:1(S:0)\n") == (None, True)
    assert verdict("gpu*|up|1|mix|gpu:1(S:0)\n") == (None, True)
    assert verdict("gpu|down|1|idle|gpu:1\n")[0] == "partition gpu is not up"
    assert verdict("gpu|up|2|drain*|gpu:1\n")[0] == "partition gpu has no node in service"
    assert verdict("gpu|up|1|idle|(null)\n") == ("the nodes of partition gpu have no gpu (GRES)", True)


def test_standin_speaks_the_documented_json(tmp_path: Path) -> None:
    port = free_port()
    dcv = [sys.executable, str(STANDIN), "--sessions-dir", str(tmp_path), "--port", str(port),
           "--web-url-path", "/dcv/", "--listen-address", "127.0.0.1"]
    try:
        subprocess.run(dcv + ["create-session", "--type", "virtual", "--owner", "ws01", "s-1"], check=True, timeout=30)
        shown = json.loads(subprocess.run(dcv + ["describe-session", "s-1", "-j"], check=True, capture_output=True,
                                          text=True).stdout)
        assert shown["id"] == "s-1" and shown["owner"] == "ws01" and shown["type"] == "virtual"
        assert {"num-of-connections", "creation-time", "x11-display", "display-layout"} <= set(shown)
        listed = json.loads(subprocess.run(dcv + ["list-sessions", "-j"], check=True, capture_output=True,
                                           text=True).stdout)
        assert [s["id"] for s in listed] == ["s-1"]
        assert port_is_listening(port)
    finally:
        subprocess.run(dcv + ["close-session", "s-1"], timeout=30)
    assert subprocess.run(dcv + ["describe-session", "s-1", "-j"], capture_output=True).returncode != 0
    assert not port_is_listening(port) or _wait_closed(port)
    assert list(tmp_path.iterdir()) == []


def _wait_closed(port: int) -> bool:
    deadline = time.monotonic() + 5
    while port_is_listening(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not port_is_listening(port)


# -- system tests on the Slurm test cluster ----------------------------------------------------------


def _cluster() -> None:
    require_slurm_cluster("srun", "Xvnc", "vncpasswd", "apache2", partition="gpu", gres="gpu")


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate for the stand-in's HTTPS (DCV makes a self-signed one on each node)."""
    cert, key = directory / "dcv-cert.pem", directory / "dcv-key.pem"
    subprocess.run([require_program("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "1", "-subj", "/CN=dcv-standin", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


class DcvEvent:
    """One gateway on the test cluster with DCV accounts, and the stand-in it uses as `dcv` (HTTPS only)."""

    def __init__(self, tmp: Path, prefix: str, accounts: list[Account], *, wait_s: float, never_report: bool) -> None:
        self.prefix = prefix
        self.sessions = tmp / "dcv-sessions"
        self.sessions.mkdir()
        self.port = free_port()
        cert, key = self_signed_certificate(tmp)
        wrapper = tmp / "dcv"
        options = (f"--sessions-dir {self.sessions} --port {self.port} --web-url-path /dcv/ "
                   f"--listen-address 127.0.0.1 --tls-cert {cert} --tls-key {key}"
                   + (" --never-report" if never_report else ""))
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN} {options} \"$@\"\n")
        wrapper.chmod(0o755)
        self.wrapper = wrapper
        # run_as gateway: these test accounts are not users of the test cluster.
        config = (f"backend: slurm\nslurm:\n  job_name_prefix: {prefix}\n  interface: 127.0.0.1\n  run_as: gateway\n"
                  f"  time_limit_s: 1800\n  event_duration_s: 3600\n"
                  f"dcv:\n  default_protocol: auto\n  partition: gpu\n  gres: gpu:1\n  port: {self.port}\n"
                  f"  wait_s: {wait_s}\n  dcv_path: {wrapper}\n")  # dcv.scheme: https, the default
        directory = tmp / "gw"
        directory.mkdir()
        self.run = GatewayRun(directory, accounts, config)

    def standin(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.wrapper), *argv], capture_output=True, text=True, timeout=30)

    def sessions_left(self) -> list[str]:
        return sorted(p.name for p in self.sessions.glob("*.json"))

    def status(self) -> dict[str, dict]:
        result = subprocess.run([sys.executable, "-m", "gateway", "status", "--json", "--state-dir",
                                 str(self.run.state_dir)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return {row["account"]: row for row in json.loads(result.stdout)["desktops"]}


@pytest.fixture
def dcv_event(tmp_path: Path) -> Iterator:
    _cluster()
    prefix = f"gwd{os.getpid() % 10000}r{random.randint(100, 999)}"
    events: list[DcvEvent] = []

    def make(accounts: list[Account], *, wait_s: float = 12, never_report: bool = False) -> DcvEvent:
        directory = tmp_path / f"e{len(events)}"
        directory.mkdir()
        event = DcvEvent(directory, prefix, accounts, wait_s=wait_s, never_report=never_report)
        events.append(event)
        return event

    try:
        yield make
    finally:
        clean_up_slurm_event([event.run for event in events], prefix, stop_timeout_s=90)
        for event in events:
            for session in event.sessions.glob("*.json"):
                event.standin("close-session", session.stem)
            event.run.kill_everything()
            for pid in processes_mentioning(str(event.sessions)):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass


def basic(a: Account) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{a.id}:{a.password}".encode()).decode()}


async def check_cross_site_refused(http: aiohttp.ClientSession, run: GatewayRun, owner: Account,
                                   session_id: str) -> None:
    """Another site's page cannot use a participant's browser (its cookie or cached Basic credentials)."""
    page = f"{run.url}dcv/{owner.id}/"
    own_origin = f"http://127.0.0.1:{run.listen_port}"
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": f"http://127.0.0.1:{run.listen_port + 1}"}):
        for url in (page, f"{run.url}dcv/{owner.id}.dcv"):
            async with http.get(url, headers={**basic(owner), **headers}) as response:
                assert response.status == 403, (headers, url)
                assert "refused" in await response.text()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"ws://127.0.0.1:{run.listen_port}/dcv/{owner.id}/ws", headers=basic(owner),
                              origin="https://evil.example")
    assert refused.value.status == 403
    # The gateway's own pages (same origin, or same-origin fetches) are served.
    for headers in ({"Origin": own_origin}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}):
        async with http.get(page, headers={**basic(owner), **headers}) as response:
            assert response.status == 200 and f"session={session_id} " in await response.text()
    async with http.ws_connect(f"ws://127.0.0.1:{run.listen_port}/dcv/{owner.id}/ws", headers=basic(owner),
                               origin=own_origin) as ws:
        await ws.send_str("same site")
        assert (await ws.receive(timeout=5)).data == f"echo {session_id}: same site"


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: str


async def raw_request(port: int, target: str, headers: dict[str, str]) -> RawAnswer:
    """One HTTP/1.1 request written byte for byte (no client library normalises the target)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close", "", ""]
        writer.write("\r\n".join(lines).encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=15)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines if ": " in line)
    return RawAnswer(int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()},
                     body.decode(errors="replace"))


class Decoy:
    """A listener on another loopback port that no request may ever reach (SSRF canary)."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> "Decoy":
        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(count, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def check_requests_stay_on_the_registered_session(run: GatewayRun, owner: Account, other: Account,
                                                        session_id: str) -> None:
    """Traversal and SSRF attempts on /dcv/ACCOUNT/...: through Apache and straight at the gateway's own
    port, every answer is a refusal or comes from the account's own session at its registered node:port,
    under its web-url-path; a decoy listener is never contacted; no other route answers."""
    config = (run.state_dir / "apache" / "httpd.conf").read_text()
    web_port = int(re.search(r"^ProxyPass / http://127\.0\.0\.1:(\d+)/", config, re.M).group(1))
    prefix = f"/dcv/{owner.id}/"
    async with Decoy() as decoy:
        elsewhere = f"127.0.0.1:{decoy.port}"
        targets = [f"{prefix}../{other.id}/", f"{prefix}..", f"{prefix}%2e%2e/%2e%2e/admin/",
                   f"{prefix}.%2e/{other.id}/", f"{prefix}..%2f..%2fadmin/", f"{prefix}%2fetc%2fpasswd",
                   f"{prefix}%5c..%5cadmin", f"{prefix}/{elsewhere}/", f"{prefix}http://{elsewhere}/",
                   f"{prefix}@{elsewhere}/", f"{prefix}%40{elsewhere}/", f"http://{elsewhere}{prefix}x",
                   f"{prefix}x?next=http://{elsewhere}/", f"/dcv/{owner.id}%2f..%2fadmin/"]
        tricks = [{}, {"Host": elsewhere}, {"X-Forwarded-Host": elsewhere}, {"Host": f"{elsewhere}@127.0.0.1"}]
        answers = []
        for port in (run.listen_port, web_port):
            for target in targets:
                for trick in tricks:
                    headers = {"Host": f"127.0.0.1:{port}", **basic(owner), **trick}
                    answer = await raw_request(port, target, headers)
                    answers.append((port, target, trick, answer.status))
                    if answer.status < 400:
                        assert answer.status == 200, (port, target, trick, answer.status)
                        assert answer.headers.get("x-dcv-standin") == session_id, (port, target, trick)
                        path = re.search(r" path=(\S+) ", answer.body).group(1)
                        assert path.startswith(prefix) and ".." not in path.split("/"), (port, target, path)
                    else:  # refused; a path that normalises out of /dcv/ meets that route's own sign-in
                        assert answer.status in (400, 401, 403, 404), (port, target, trick, answer.status)
                        assert "x-dcv-standin" not in answer.headers
        assert decoy.connections == 0
    served = sum(1 for *_, status in answers if status == 200)
    print(f"\n/dcv/ traversal and SSRF attempts: {len(answers)} requests, {served} reached the own session, "
          f"the rest refused ({sorted({s for *_, s in answers if s != 200})})")
    assert served > 0  # the harmless ones (e.g. Host tricks on a plain path) still work


@pytest.mark.system
async def test_one_gpu_gives_one_dcv_session_and_a_vnc_fallback(dcv_event) -> None:
    first, second = account("gd01", ("protocol", "dcv")), account("gd02", ("gpu", "yes"))
    event: DcvEvent = dcv_event([first, second], wait_s=12)
    run = event.run
    seconds = run.up(timeout_s=90)
    print(f"\nDCV + fallback desktops ready in {seconds:.1f} s")
    assert "2 of 2 desktops ready" in run.text(), run.text()

    rows = event.status()
    by_protocol = {row["protocol"]: name for name, row in rows.items()}
    assert sorted(by_protocol) == ["dcv", "vnc"], rows
    dcv_account = first if by_protocol["dcv"] == first.id else second
    vnc_account = second if dcv_account is first else first
    assert rows[dcv_account.id]["backend"] == "dcv" and rows[vnc_account.id]["backend"] == "dcv"
    assert "VNC instead of DCV" in (rows[vnc_account.id]["reason"] or ""), rows
    assert "no DCV session within 12 s" in rows[vnc_account.id]["reason"]
    assert "DCV not available, starting a VNC desktop instead" in run.text()  # logged, with the reason

    # Slurm: the DCV job holds the GPU on the gpu partition; the fallback runs without one.
    jobs = our_jobs(event.prefix)
    (dcv_job,) = jobs[dcv_account.id]
    (vnc_job,) = jobs[vnc_account.id]
    shown = subprocess.run(["scontrol", "show", "job", "-o", str(dcv_job.job_id)], capture_output=True, text=True).stdout
    assert "Partition=gpu " in shown and "gpu:1" in shown
    (session,) = event.sessions_left()
    session_id = session.removesuffix(".json")
    assert session_id.endswith(f"-{dcv_job.job_id}")
    assert rows[dcv_account.id]["port"] == event.port

    # The fallback is a real VNC desktop: an RFB handshake through Apache. The DCV account's VNC
    # websocket path reaches nothing (its session is only behind the sign-in).
    await rfb.connect_websocket(run.ws_url(vnc_account), vnc_account.password, timeout_s=10)
    with pytest.raises(aiohttp.WSServerHandshakeError) as nothing_there:
        await rfb.connect_websocket(run.ws_url(dcv_account), dcv_account.password, timeout_s=5)
    assert nothing_there.value.status == 503  # Apache: no proxy listens for that path

    # The stand-in speaks HTTPS only, so every answer from it below came over the default dcv.scheme.
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientError):
            async with plain.get(f"http://127.0.0.1:{event.port}/dcv/") as response:
                await response.read()

    base = run.url
    async with aiohttp.ClientSession() as http:
        # Landing page: the browser link and the .dcv file for the DCV account; the note for the other.
        async with http.get(base) as response:
            landing = await response.text()
        assert f'href="dcv/{dcv_account.id}/"' in landing and f'href="dcv/{dcv_account.id}.dcv"' in landing
        assert "Open in browser" in landing and "VNC instead of DCV" in landing
        assert f'href="dcv/{vnc_account.id}/"' not in landing

        page = f"{base}dcv/{dcv_account.id}/"
        async with http.get(page) as response:
            assert response.status == 401 and "Basic" in response.headers["WWW-Authenticate"]
        async with http.get(page, headers=basic(vnc_account)) as response:
            assert response.status == 403
        async with http.get(f"{base}dcv/{dcv_account.id}.dcv", headers=basic(vnc_account)) as response:
            assert response.status == 403
        wrong = {"Authorization": "Basic " + base64.b64encode(f"{dcv_account.id}:nope1234".encode()).decode()}
        async with http.get(page, headers=wrong) as response:
            assert response.status == 401
        async with http.get(page + "app/index.html?x=1", headers=basic(dcv_account)) as response:
            text = await response.text()
            assert response.status == 200, text
        assert f"session={session_id} " in text and f"path=/dcv/{dcv_account.id}/app/index.html " in text
        assert "query=x=1 " in text and "auth=no " in text  # the gateway's credentials are not passed on

        # The .dcv file: host, port and session id; no password.
        async with http.get(f"{base}dcv/{dcv_account.id}.dcv", headers=basic(dcv_account)) as response:
            assert response.status == 200
            assert "attachment" in response.headers["Content-Disposition"]
            dcv_file = await response.text()
        assert dcv_file.startswith("[version]\nformat=1.0\n")
        assert "host=127.0.0.1\n" in dcv_file and f"port={event.port}\n" in dcv_file
        assert f"sessionid={session_id}\n" in dcv_file and "user=" in dcv_file
        assert "password" not in dcv_file.lower() and dcv_account.password not in dcv_file

        # A websocket through Apache and the gateway echoes only with the right credentials.
        ws_url = f"ws://127.0.0.1:{run.listen_port}/dcv/{dcv_account.id}/ws"
        for headers, status in (({}, 401), (basic(vnc_account), 403)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(ws_url, headers=headers)
            assert refused.value.status == status
        async with http.ws_connect(ws_url, headers=basic(dcv_account)) as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == f"echo {session_id}: hello"
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive(timeout=5)).data == b"\x00\x01"
        await check_cross_site_refused(http, run, dcv_account, session_id)
    await check_requests_stay_on_the_registered_session(run, dcv_account, vnc_account, session_id)

    # Signed in with the session cookie, the personal page offers the same, and the route opens.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # cookies for an IP
        async with http.get(base + "login") as response:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text()).group(1)
        async with http.post(base + "login", data={"csrf": csrf, "account": dcv_account.id,
                                                   "password": dcv_account.password}) as response:
            me = await response.text()
        assert 'id="dcv-open"' in me and f"dcv/{dcv_account.id}.dcv" in me
        async with http.get(f"{base}dcv/{dcv_account.id}/") as response:
            assert response.status == 200 and f"session={session_id} " in await response.text()
        async with http.get(f"{base}dcv/{vnc_account.id}/") as response:
            assert response.status == 403  # signed in, but as another account

    # gateway down: the DCV session is closed, every job cancelled, nothing left running.
    result = gateway_down(run)
    assert result.returncode == 0, result.stderr
    assert run.process is not None and run.process.wait(timeout=90) == 0
    assert wait_no_jobs(event.prefix, timeout_s=10) == {}
    assert event.sessions_left() == []
    assert _wait_closed(event.port)
    assert processes_mentioning(str(event.sessions)) == []
    assert processes_mentioning(str(run.state_dir)) == []
    assert "DCV session closed" in run.text()


@pytest.mark.system
async def test_a_dcv_session_that_never_becomes_ready_falls_back_within_the_wait(dcv_event) -> None:
    only = account("gn01", ("protocol", "dcv"))
    event: DcvEvent = dcv_event([only], wait_s=8, never_report=True)
    run = event.run
    started = time.monotonic()
    run.start()
    rows = {}
    while time.monotonic() - started < 60:
        rows = event.status() if (run.state_dir / "control.sock").exists() else {}
        if rows.get(only.id, {}).get("state") == "ready":
            break
        assert run.process is not None and run.process.poll() is None, run.text()
        await asyncio.sleep(0.3)
    seconds = time.monotonic() - started
    print(f"\nnever-ready DCV fell back to VNC, ready in {seconds:.1f} s (wait_s 8)")
    row = rows[only.id]
    assert row["state"] == "ready" and row["protocol"] == "vnc", row
    assert "no DCV session within 8 s" in row["reason"] and "did not report" in row["reason"], row
    assert seconds < 8 + 25
    await rfb.connect_websocket(run.ws_url(only), only.password, timeout_s=10)
    # The abandoned DCV job was cancelled and closed its (never reported) session.
    deadline = time.monotonic() + 15
    while event.sessions_left() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert event.sessions_left() == []
    assert [info.state.value for info in our_jobs(event.prefix)[only.id]] == ["running"]
    assert run.terminate(timeout_s=90) == 0
    assert wait_no_jobs(event.prefix, timeout_s=10) == {}
