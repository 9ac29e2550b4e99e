"""The systemd units written by `gateway systemd install [--after-event]`: what each config makes of
them (rendered text), that systemd-analyze verify accepts every variant, and that the after-event
unit's capabilities are enough to serve a download (its gateway run with only those)."""

from __future__ import annotations

import base64
import contextlib
import os
import pwd
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.cli import systemd_unit
from gateway.common.render import UnsafeValue
from gateway.cli.shared import load_inputs
from gateway.cli.systemd_unit import ServiceSpec, render_service, service_spec, systemd_word, workspace_root
from gateway.model.config import PROJECT_ROOT
from gateway.model.tokens import format_tokens
from tests.gateway_run import make_accounts, processes_mentioning
from tests.system import free_port, require_program


@pytest.mark.system  # systemd-analyze
def test_install_writes_a_unit_that_systemd_accepts(tmp_path: Path) -> None:
    analyze = require_program("systemd-analyze")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("ws01 localhost /desktop/ws01 6001 5901 abcdefg\n")
    tokens.chmod(0o600)
    config = tmp_path / "gateway.yaml"
    # A public address: TLS is terminated by the site's proxy in front (else the install is refused).
    config.write_text("event:\n  title: Winter School\npublic_url: https://desktops.example.org/\n"
                      "tls:\n  terminated_by_proxy: true\n")
    units = tmp_path / "units"
    units.mkdir()
    result = subprocess.run([sys.executable, "-m", "gateway", "systemd", "install", str(tokens), "--config", str(config),
                             "--listen", "0.0.0.0:8443", "--unit-dir", str(units)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    unit = units / "workshop-gateway.service"
    text = unit.read_text()
    assert f"up {tokens} --config {config} --listen 0.0.0.0:8443 --state-dir /var/lib/workshop-gateway" in text
    assert "KillMode=process" in text and "Restart=on-failure" in text and "NoNewPrivileges=yes" in text
    assert "abcdefg" not in text
    # Root, for making the event's users and starting desktops as them, and no more than that takes.
    assert "CapabilityBoundingSet=CAP_SETUID CAP_SETGID" in text and "CAP_SYS_ADMIN" not in text
    assert "ReadWritePaths=/var/lib/workshop-gateway /tmp /etc /home" in text
    assert "RuntimeDirectoryMode=0711" in text and "RuntimeDirectoryPreserve=yes" in text
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    # systemd-analyze only warns about bad settings: any output about our unit is a failure.
    assert "workshop-gateway.service" not in verify.stderr, verify.stderr


def test_install_refuses_a_bad_token_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("ws01 localhost /desktop/ws01 6001 5901 abc\n")
    result = subprocess.run([sys.executable, "-m", "gateway", "systemd", "install", str(tokens),
                             "--unit-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{tokens}:1:")
    assert not (tmp_path / "workshop-gateway.service").exists()


@pytest.mark.parametrize("value", ['a"b', "a\nExecStartPre=/bin/rm", "%n", "$HOME", ""])
def test_unit_words_cannot_inject(value: str) -> None:
    with pytest.raises(UnsafeValue):
        systemd_word(value)


def test_paths_with_spaces_are_quoted(tmp_path: Path) -> None:
    spec = ServiceSpec(tokens=Path("/srv/winter school/tokens.txt"), config=None, listen="127.0.0.1:8080")
    assert '"/srv/winter school/tokens.txt"' in render_service(spec)


# -- the unit follows the config: what desktops write, what an after-event service needs ------------


def install(tmp_path: Path, config_text: str, *args: str, accounts: str = "ws01 localhost /desktop/ws01 6001 5901 abcdefg\n",
            name: str = "gateway.yaml") -> subprocess.CompletedProcess[str]:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(accounts)
    tokens.chmod(0o600)
    config = tmp_path / name
    config.write_text(config_text)
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "gateway", "systemd", "install", str(tokens), "--config", str(config),
                           "--unit-dir", str(units), *args], capture_output=True, text=True)


def unit_text(tmp_path: Path) -> str:
    return (tmp_path / "units" / "workshop-gateway.service").read_text()


def setting(text: str, key: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(f"{key}=")]
    return line.split("=", 1)[1]


def verify(unit: Path) -> None:
    verify = subprocess.run([require_program("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert unit.name not in verify.stderr, verify.stderr  # systemd-analyze only warns about bad settings


def test_created_users_homes_and_etc_are_writable_and_browsers_may_sandbox_themselves(tmp_path: Path) -> None:
    result = install(tmp_path, "desktop:\n  users: create\n")
    assert result.returncode == 0, result.stderr
    text = unit_text(tmp_path)
    assert setting(text, "ReadWritePaths") == "/var/lib/workshop-gateway /tmp /etc /home"
    assert setting(text, "ProtectHome") == "no"
    # Chromium's sandbox needs user, pid and net namespaces, Firefox's also ipc; nothing else is allowed.
    assert setting(text, "RestrictNamespaces") == "user pid net ipc"
    assert "--no-sandbox" in text  # the comment says how to close user namespaces instead
    assert setting(text, "KillMode") == "process" and setting(text, "TasksMax") == "infinity"
    assert "CAP_KILL" in setting(text, "CapabilityBoundingSet")


def spec_for(tmp_path: Path, config_text: str, accounts: str = "ws01 localhost /desktop/ws01 6001 5901 abcdefg\n",
             after_event: bool = False) -> ServiceSpec:
    tokens_path, config_path = tmp_path / "tokens.txt", tmp_path / "gateway.yaml"
    tokens_path.write_text(accounts)
    config_path.write_text(config_text)
    tokens, config = load_inputs(tokens_path, config_path)
    return service_spec(tokens, config, tokens_path=tokens_path, config_path=config_path, listen="127.0.0.1:8080",
                        after_event=after_event)


def test_existing_users_homes_are_writable_wherever_passwd_puts_them(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    homes = tmp_path / "nfs" / "home"
    homes.mkdir(parents=True)
    monkeypatch.setattr(systemd_unit.pwd, "getpwnam", lambda name: SimpleNamespace(pw_dir=str(homes / name)))
    accounts = "alice localhost /desktop/alice 6001 5901 abcdefg\nbob localhost /desktop/bob 6002 5902 bcdefgh\n"
    # The participants' own homes (their files and uploads), not /etc: no user is made.
    assert spec_for(tmp_path, "desktop:\n  users: existing\n", accounts).writable == (str(homes), str(homes))
    spec = ServiceSpec(tokens=Path("/t"), config=None, listen="127.0.0.1:8080", users="existing",
                       writable=("/nfs/home", "/nfs/home"))
    text = render_service(spec)
    assert setting(text, "ReadWritePaths") == "/var/lib/workshop-gateway /tmp /nfs/home"
    assert setting(text, "ProtectHome") == "read-only"  # /home itself stays read-only: their homes are elsewhere

    monkeypatch.setattr(systemd_unit.pwd, "getpwnam", lambda name: SimpleNamespace(pw_dir=f"/home/{name}"))
    spec = spec_for(tmp_path, "desktop:\n  users: existing\n", accounts)
    text = render_service(spec)
    assert setting(text, "ReadWritePaths") == "/var/lib/workshop-gateway /tmp /home"
    assert setting(text, "ProtectHome") == "no"
    # Only local desktops' users count: a Slurm account's home is on the cluster.
    slurm_only = "alice auto /desktop/alice 6001 5901 abcdefg backend=slurm\n"
    assert spec_for(tmp_path, "desktop:\n  users: existing\n", slurm_only).writable == ()


def test_a_workspace_root_and_the_slurm_shared_dir_are_writable(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    shared = tmp_path / "shared"
    config = (f"desktop:\n  users: create\n  workspace: {tmp_path}/ws/{{user}}\n"
              f"slurm:\n  shared_dir: {shared}\n")
    missing = install(tmp_path, config)
    assert missing.returncode == 2 and f"mkdir -p {shared}" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    shared.mkdir()
    assert spec_for(tmp_path, config).writable == (f"{tmp_path}/ws", str(shared))
    text = render_service(ServiceSpec(tokens=Path("/t"), config=None, listen="127.0.0.1:8080",
                                      writable=("/srv/ws", "/cluster/shared")))
    assert setting(text, "ReadWritePaths") == "/var/lib/workshop-gateway /tmp /etc /srv/ws /cluster/shared"
    assert setting(text, "ProtectHome") == "read-only"  # nothing is written in /home
    assert workspace_root("/srv/ws/{user}") == "/srv/ws" and workspace_root("/srv/ws-{account}/home") == "/srv"
    assert workspace_root("{state_dir}/workspaces/{account}") is None


def test_desktops_as_the_gateways_user_cannot_be_a_root_service(tmp_path: Path) -> None:
    result = install(tmp_path, "desktop:\n  users: gateway\n")
    assert result.returncode == 2 and "desktop.users: gateway" in result.stderr
    assert not (tmp_path / "units" / "workshop-gateway.service").exists()


AFTER_EVENT = "desktop:\n  users: create\narchive:\n  enabled: true\n"


def test_the_after_event_unit_keeps_only_what_serving_downloads_takes(tmp_path: Path) -> None:
    result = install(tmp_path, AFTER_EVENT, "--after-event", "--listen", "127.0.0.1:8080")
    assert result.returncode == 0, result.stderr
    text = unit_text(tmp_path)
    assert setting(text, "ExecStart").endswith("--state-dir /var/lib/workshop-gateway --after-event")
    # Root's uid, but no power over other users' files or processes: only the private Apache's setuid
    # and setgid, to hand its workers to www-data.
    assert setting(text, "CapabilityBoundingSet") == "CAP_SETUID CAP_SETGID"
    assert setting(text, "KillMode") == "mixed"  # nothing to adopt after a crash
    assert "TasksMax=infinity" not in text and "RuntimeDirectory" not in text
    assert setting(text, "ReadWritePaths") == "/var/lib/workshop-gateway"  # no /etc, /home, /tmp
    assert setting(text, "RestrictNamespaces") == "yes"
    # /home and /root are hidden unless the gateway's own files (here: its Python) are there.
    reads_home = any(str(p).startswith(("/home/", "/root/"))
                     for p in (Path(sys.executable).resolve(), Path(sys.base_prefix).resolve(), PROJECT_ROOT, tmp_path))
    assert setting(text, "ProtectHome") == ("read-only" if reads_home else "yes")

    for name in ("c.pem", "k.pem"):
        (tmp_path / name).write_text("not read by install\n")
    on_443 = install(tmp_path, AFTER_EVENT + f"tls:\n  cert: {tmp_path}/c.pem\n  key: {tmp_path}/k.pem\n", "--after-event",
                     "--listen", "0.0.0.0:443")
    assert on_443.returncode == 0, on_443.stderr
    assert setting(unit_text(tmp_path), "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID"
    no_apache = install(tmp_path, AFTER_EVENT + "apache:\n  mode: none\nproxy:\n  mode: builtin\n", "--after-event",
                        "--listen", "127.0.0.1:8080")
    assert no_apache.returncode == 0, no_apache.stderr
    assert setting(unit_text(tmp_path), "CapabilityBoundingSet") == ""  # the empty set


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the token file to another user")
def test_an_after_event_unit_refuses_files_root_could_read_only_with_its_dropped_powers(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("ws01 localhost /desktop/ws01 6001 5901 abcdefg\n")
    tokens.chmod(0o600)
    os.chown(tokens, 65534, 65534)  # nobody's, 0600: root reads it only with CAP_DAC_OVERRIDE
    config = tmp_path / "gateway.yaml"
    config.write_text(AFTER_EVENT)
    result = subprocess.run([sys.executable, "-m", "gateway", "systemd", "install", str(tokens), "--config", str(config),
                             "--unit-dir", str(tmp_path), "--after-event"], capture_output=True, text=True)
    assert result.returncode == 2 and str(tokens) in result.stderr and "readable by root" in result.stderr
    assert not (tmp_path / "workshop-gateway.service").exists()


@pytest.mark.system  # systemd-analyze
@pytest.mark.parametrize(("config_text", "args"), [
    ("desktop:\n  users: create\n", ()),
    ("desktop:\n  users: existing\napache:\n  mode: system\n", ()),
    (AFTER_EVENT, ("--after-event", "--listen", "127.0.0.1:8080")),
    (AFTER_EVENT + "apache:\n  mode: none\nproxy:\n  mode: builtin\n", ("--after-event", "--listen", "127.0.0.1:8080")),
])
def test_every_variant_of_the_unit_is_accepted_by_systemd(tmp_path: Path, config_text: str,
                                                          args: tuple[str, ...]) -> None:
    result = install(tmp_path, config_text, *args)
    assert result.returncode == 0, result.stderr
    verify(tmp_path / "units" / "workshop-gateway.service")


CAPABILITY_NUMBERS = {"CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_NET_BIND_SERVICE": 10}


def proc_status(pid: int, key: str) -> str:
    (line,) = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(f"{key}:")]
    return line.split(":", 1)[1].split()[0]


@pytest.mark.system  # apache2, root
def test_the_after_event_gateway_serves_downloads_with_only_its_units_capabilities(tmp_path: Path) -> None:
    """The gateway is run as the after-event unit runs it: root's uid, the unit's capability bounding set
    (setpriv) and no new privileges. It serves an archive through its private Apache, whose workers
    still become www-data (without CAP_SETUID/SETGID they would stay root's uid: Apache only warns)."""
    require_program("apache2")
    if os.geteuid() != 0:
        pytest.skip("the after-event service runs as root")
    port = free_port()
    (account,) = make_accounts(1, prefix="sd")
    result = install(tmp_path, "desktop:\n  users: gateway\narchive:\n  enabled: true\n", "--after-event",
                     "--listen", f"127.0.0.1:{port}", accounts=format_tokens([account]))
    assert result.returncode == 0, result.stderr
    capabilities = setting(unit_text(tmp_path), "CapabilityBoundingSet").split()
    assert capabilities == ["CAP_SETUID", "CAP_SETGID"]
    tokens, config, state = tmp_path / "tokens.txt", tmp_path / "gateway.yaml", tmp_path / "state"
    (state / "workspaces" / account.id).mkdir(parents=True)
    (state / "workspaces" / account.id / "results.bin").write_bytes(os.urandom(100_000))
    packed = subprocess.run([sys.executable, "-m", "gateway", "archive", str(tokens), "--config", str(config),
                             "--state-dir", str(state)], capture_output=True, text=True, timeout=120)
    assert packed.returncode == 0, packed.stderr

    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in capabilities)])
    out = tmp_path / "after-event.out"
    with open(out, "wb") as log:
        process = subprocess.Popen(["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs", "--",
                                    sys.executable, "-m", "gateway", "up", str(tokens), "--config", str(config),
                                    "--listen", f"127.0.0.1:{port}", "--state-dir", str(state), "--after-event"],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Landing page:" not in out.read_text():
            assert process.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        expected = sum(1 << CAPABILITY_NUMBERS[c] for c in capabilities)
        assert int(proc_status(process.pid, "CapBnd"), 16) == expected
        request = urllib.request.Request(f"http://127.0.0.1:{port}/archive/{account.id}",
                                         headers={"Authorization": "Basic " + base64.b64encode(
                                             f"{account.id}:{account.password}".encode()).decode()})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.read() == (state / "archives" / f"{account.id}.tar.gz").read_bytes()
        apache = [pid for pid in processes_mentioning(str(state / "apache" / "httpd.conf"))
                  if Path(f"/proc/{pid}/comm").read_text().strip().startswith("apache2")]
        parent = [pid for pid in apache if proc_status(pid, "PPid") not in {str(p) for p in apache}]
        workers = [pid for pid in apache if pid not in parent]
        assert len(parent) == 1 and workers, apache
        www_data = pwd.getpwnam("www-data").pw_uid
        assert {int(proc_status(pid, "Uid")) for pid in workers} == {www_data}
    finally:
        subprocess.run([sys.executable, "-m", "gateway", "down", "--state-dir", str(state)], capture_output=True,
                       timeout=120)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        for pid in processes_mentioning(str(state)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
