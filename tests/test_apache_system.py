"""`apache.mode: system` end to end, against a second, Debian-style Apache of the test's own.

The site's Apache is the layout Debian ships (apache2.conf, envvars, ports.conf, mods-enabled/,
conf-enabled/) in a directory of this test, run and reloaded with Debian's apache2ctl through
``APACHE_CONFDIR``: the gateway writes its include file there, lets apache2ctl check the whole
configuration and reloads it gracefully. The machine's own Apache (/etc/apache2) is never touched.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.common import rfb
from tests.gateway_run import GatewayRun, make_accounts, processes_mentioning
from tests.system import free_port, require_program

pytestmark = pytest.mark.system

MODULES = ("mpm_event", "authz_core", "alias", "mime", "headers", "reqtimeout", "proxy", "proxy_http")

APACHE2_CONF = """\
# Debian's apache2.conf, cut down: everything comes from envvars and the *-enabled directories.
DefaultRuntimeDir ${APACHE_RUN_DIR}
PidFile ${APACHE_PID_FILE}
Mutex file:${APACHE_LOCK_DIR} default
Timeout 300
KeepAlive On
User ${APACHE_RUN_USER}
Group ${APACHE_RUN_GROUP}
ServerName localhost
ErrorLog ${APACHE_LOG_DIR}/error.log
LogLevel warn
IncludeOptional mods-enabled/*.load
IncludeOptional mods-enabled/*.conf
Include ports.conf
<Directory />
    Options FollowSymLinks
    AllowOverride None
    Require all denied
</Directory>
TypesConfig /etc/mime.types
IncludeOptional conf-enabled/*.conf
IncludeOptional sites-enabled/*.conf
"""


@dataclass
class SiteApache:
    """A Debian-style Apache with its own config root (APACHE_CONFDIR), driven by apache2ctl."""

    root: Path
    port: int

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "APACHE_CONFDIR": str(self.root)}

    @property
    def include(self) -> Path:
        return self.root / "conf-enabled" / "workshop-gateway.conf"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def command(self, action: str) -> list[str]:
        """What the gateway runs: apache2ctl ACTION on this config root."""
        return ["env", f"APACHE_CONFDIR={self.root}", require_program("apache2ctl"), action]

    def write(self) -> None:
        for name in ("mods-enabled", "conf-enabled", "sites-enabled", "run", "lock", "log"):
            (self.root / name).mkdir(parents=True)
        (self.root / "apache2.conf").write_text(APACHE2_CONF)
        (self.root / "ports.conf").write_text(f"Listen 127.0.0.1:{self.port}\n")
        (self.root / "envvars").write_text(
            "export APACHE_RUN_USER=www-data\nexport APACHE_RUN_GROUP=www-data\n"
            f"export APACHE_PID_FILE={self.root}/run/apache2.pid\nexport APACHE_RUN_DIR={self.root}/run\n"
            f"export APACHE_LOCK_DIR={self.root}/lock\nexport APACHE_LOG_DIR={self.root}/log\nexport LANG=C\n")
        for module in MODULES:
            (self.root / "mods-enabled" / f"{module}.load").write_text(
                f"LoadModule {module}_module /usr/lib/apache2/modules/mod_{module}.so\n")

    def pid(self) -> int | None:
        try:
            return int((self.root / "run" / "apache2.pid").read_text())
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        # APACHE_STARTED_BY_SYSTEMD: start this instance itself, never hand over to systemctl.
        result = subprocess.run(self.command("start"), env={**self.env, "APACHE_STARTED_BY_SYSTEMD": "1"},
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        deadline = time.monotonic() + 10
        while self.pid() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.pid() is not None, (self.root / "log" / "error.log").read_text()

    def stop(self) -> None:
        pid = self.pid()
        subprocess.run(self.command("stop"), env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while pid is not None and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for leftover in processes_mentioning(str(self.root)):  # whatever a failed stop left
            os.kill(leftover, signal.SIGKILL)


def etc_apache_snapshot() -> dict[str, tuple[int, float]]:
    """The machine's Apache configuration: every entry's size and modification time."""
    found = {}
    for directory, _, files in os.walk("/etc/apache2"):
        for name in files:
            path = Path(directory) / name
            st = path.lstat()
            found[str(path)] = (st.st_size, st.st_mtime)
    return found


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SiteApache]:
    for program in ("apache2", "apache2ctl", "Xvnc", "vncpasswd", "openbox", "xterm"):
        require_program(program)
    machine = etc_apache_snapshot()
    apache = SiteApache(tmp_path / "site-apache2", free_port())
    apache.write()
    apache.start()
    try:
        yield apache
    finally:
        apache.stop()
        assert processes_mentioning(str(apache.root)) == []
        assert etc_apache_snapshot() == machine  # /etc/apache2 untouched


def system_config(site: SiteApache) -> str:
    return ("apache:\n  mode: system\n"
            f"  system_include: {site.include}\n"
            f"  configtest_command: {site.command('configtest')}\n"
            f"  reload_command: {site.command('graceful')}\n").replace("'", '"')


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            return response.status, await response.text()


def basic_admin(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}


async def x_forwarded_for_is_believed_only_from_the_sites_apache(site: SiteApache, run: GatewayRun) -> None:
    """A desktop's process can reach the gateway's own port on loopback; a made-up X-Forwarded-For there
    must not make it a fresh client of the admin page's failure limit (nor of any per-address limit)."""
    web_port = re.search(r"ProxyPass / http://127\.0\.0\.1:(\d+)/", site.include.read_text())
    assert web_port, site.include.read_text()
    direct = f"http://127.0.0.1:{web_port[1]}/admin/"
    async with aiohttp.ClientSession() as http:
        statuses = []
        for i in range(11):  # through the site's Apache, which appends the address it saw (127.0.0.1)
            async with http.get(site.url + "admin/", headers={**basic_admin("nope"),
                                                               "X-Forwarded-For": f"198.51.100.{i}"}) as r:
                statuses.append(r.status)
        assert statuses == [401] * 10 + [429], statuses
        async with http.get(direct, headers={**basic_admin("nope"), "X-Forwarded-For": "198.51.100.77"}) as r:
            assert r.status == 429  # straight to the gateway: the forged address is not believed
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
        async with other.get(site.url + "admin/", headers=basic_admin("nope")) as r:
            assert r.status == 401  # another client, through the site's Apache, is counted as itself


async def test_system_mode_serves_participants_through_the_sites_apache(site: SiteApache, runs, tmp_path: Path) -> None:
    status, page = await get(site.url)
    assert status in (403, 404) and "data-account" not in page  # the site before the gateway: nothing of it
    master = site.pid()

    (tmp_path / "gw").mkdir()
    run = GatewayRun(tmp_path / "gw", make_accounts(2), system_config(site))
    runs.append(run)
    run.up(timeout_s=40)
    # The rules are in the site's own conf-enabled, and the site reloaded gracefully (same master).
    assert site.include.is_file() and "ProxyPass /desktop/ws01 ws://127.0.0.1:" in site.include.read_text()
    assert site.pid() == master
    assert not (run.state_dir / "apache").exists()  # no private Apache in system mode
    # The rules hold the secret that makes the gateway believe this Apache's X-Forwarded-For: root only.
    assert stat.S_IMODE(site.include.stat().st_mode) == 0o600
    await x_forwarded_for_is_believed_only_from_the_sites_apache(site, run)

    # A participant's whole path goes through the site's Apache: pages, static files, desktops.
    status, page = await get(site.url)
    assert status == 200 and 'data-account="ws01"' in page and 'data-account="ws02"' in page
    assert (await get(site.url + "static/viewer.js"))[0] == 200
    assert (await get(site.url + "novnc/core/rfb.js"))[0] == 200
    for account in run.accounts:
        session = await rfb.connect_websocket(f"ws://127.0.0.1:{site.port}{account.websocket_path}",
                                              account.password, timeout_s=15)
        assert session.name == account.id
        with pytest.raises(rfb.RfbAuthFailed):
            await rfb.connect_websocket(f"ws://127.0.0.1:{site.port}{account.websocket_path}", "wrong-pw",
                                        timeout_s=15)
    assert run.terminate() == 0
    assert processes_mentioning(str(run.state_dir)) == []
    working = site.include.read_text()

    # Rules the site's apache2ctl rejects are taken back: the site keeps the working ones and runs on.
    (site.root / "conf-enabled" / "broken.conf").write_text("ThisIsNotADirective on\n")
    (tmp_path / "gw2").mkdir()
    rejected = GatewayRun(tmp_path / "gw2", make_accounts(1, prefix="zz"), system_config(site))
    runs.append(rejected)
    rejected.start()
    assert rejected.process is not None
    assert rejected.process.wait(timeout=60) != 0
    assert "rejected the gateway rules" in rejected.text(), rejected.text()
    assert site.include.read_text() == working
    assert site.pid() == master
    (site.root / "conf-enabled" / "broken.conf").unlink()
    status, _ = await get(site.url + "static/viewer.js")
    assert status == 200
    rejected.kill_everything()
    assert processes_mentioning(str(rejected.state_dir)) == []
