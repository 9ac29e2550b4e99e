"""Per-desktop limits (``desktop.limits``): cgroup scopes where systemd runs the machine, per-user rlimits
and nice everywhere. This machine need not run systemd, so the scope path is checked as the command
line the gateway would run (as the Apptainer command lines are); the rlimit path runs for real in
tests/test_isolation.py (the fork bomb)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from gateway.backends import desktop_limits
from gateway.backends.desktop_limits import CgroupScopes, describe_limits, scope_argv
from gateway.backends.desktop_users import DesktopUser, launch_argv, limits_in_force
from gateway.model.config import DesktopLimits, parse_config
from gateway.model.errors import InputError
from tests.system import require_program

USER = DesktopUser("wg-ws01", 1201, 1202, "/home/wg-ws01", owned=True)
XVNC = ["/usr/bin/Xvnc", "-desktop", "ws01", "-rfbport", "5901"]
RLIMIT_CHAIN = ["prlimit", "--nproc=512:512", "--", "nice", "-n", "5", "setpriv", "--reuid=1201", "--regid=1202",
                "--init-groups", "--no-new-privs", "--"]


@pytest.fixture
def no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(desktop_limits, "cgroup_scopes", lambda: None)


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(desktop_limits, "cgroup_scopes", lambda: CgroupScopes(expands_environment=False))


def test_without_systemd_a_desktop_starts_under_rlimits_and_nice_only(no_systemd: None) -> None:
    assert launch_argv(XVNC, USER, DesktopLimits()) == [*RLIMIT_CHAIN, *XVNC]
    limits = DesktopLimits(processes=64, memory_per_process="2G", nice=7)
    assert launch_argv(["xterm"], USER, limits) == [
        "prlimit", "--nproc=64:64", f"--as={2 << 30}:{2 << 30}", "--", "nice", "-n", "7", "setpriv",
        "--reuid=1201", "--regid=1202", "--init-groups", "--no-new-privs", "--", "xterm"]


def test_with_systemd_each_program_starts_in_a_scope_of_its_own_then_under_the_same_rlimits(systemd: None) -> None:
    argv = launch_argv(XVNC, USER, DesktopLimits())
    split = argv.index("--")
    scope, rest = argv[:split + 1], argv[split + 1:]
    assert rest == [*RLIMIT_CHAIN, *XVNC]  # the rlimits stay, as a second line of defence
    assert scope[:4] == ["systemd-run", "--scope", "--quiet", "--collect"]
    (unit,) = [word for word in scope if word.startswith("--unit=")]
    assert re.fullmatch(r"--unit=workshop-gateway-wg-ws01-xvnc-[0-9a-f]{6}\.scope", unit)
    properties = [scope[i + 1] for i, word in enumerate(scope) if word == "--property"]
    assert properties == ["TasksMax=512", "CPUWeight=20", "MemoryMax=25%"]
    assert "--description=Workshop desktop of wg-ws01: xvnc" in scope
    assert "--expand-environment=no" not in scope  # systemd before 254 refuses it (and expands nothing)
    # A new scope name each time: a restarted session never collides with its predecessor's scope.
    assert launch_argv(XVNC, USER, DesktopLimits()) != argv


def test_a_desktop_without_a_user_of_its_own_gets_nice_only_even_with_systemd(systemd: None) -> None:
    assert launch_argv(["xterm"], None, DesktopLimits(nice=9)) == ["nice", "-n", "9", "xterm"]


def test_scope_properties_follow_the_config() -> None:
    new_systemd = CgroupScopes(expands_environment=True)
    limits = DesktopLimits(processes=128, memory_per_desktop="4G", cpu_weight=50)
    assert scope_argv("wg-ws02", "/opt/x/desktop-session", limits, new_systemd, unit_suffix="abc123") == [
        "systemd-run", "--scope", "--quiet", "--collect", "--unit=workshop-gateway-wg-ws02-desktop-session-abc123.scope",
        "--description=Workshop desktop of wg-ws02: desktop-session", "--expand-environment=no",
        "--property", "TasksMax=128", "--property", "CPUWeight=50", "--property", f"MemoryMax={4 << 30}", "--"]
    unlimited = scope_argv("wg-ws02", "xmessage", DesktopLimits(memory_per_desktop=None), new_systemd)
    assert not any(word.startswith("MemoryMax") for word in unlimited)
    odd = scope_argv("wg-ws02", "/usr/bin/My Tool+", DesktopLimits(), new_systemd, unit_suffix="000000")
    assert "--unit=workshop-gateway-wg-ws02-my_tool-000000.scope" in odd


def test_status_says_which_enforcement_is_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = DesktopLimits(processes=64)
    rlimits = describe_limits("create", limits, None)
    assert "enforced by per-user rlimits and nice" in rlimits and "per-user rlimits: 64 processes" in rlimits
    assert "cgroup scopes (systemd)" not in rlimits
    scopes = describe_limits("existing", limits, CgroupScopes(expands_environment=True))
    assert "enforced by cgroup scopes (systemd)" in scopes and "at most 64 tasks, memory 25%, CPU weight 20" in scopes
    assert "per-user rlimits: 64 processes" in scopes and "one user per desktop (existing)" in scopes
    assert "no per-desktop process limit" in describe_limits("gateway", limits, None)

    config = parse_config("desktop:\n  users: existing\n  limits:\n    processes: 64\n")
    monkeypatch.setattr(desktop_limits, "cgroup_scopes", lambda: CgroupScopes(expands_environment=False))
    assert "cgroup scopes (systemd)" in limits_in_force(config)
    monkeypatch.setattr(desktop_limits, "cgroup_scopes", lambda: None)
    assert "per-user rlimits and nice" in limits_in_force(config)


def test_this_machine_is_probed_once_and_only_systemd_gets_scopes() -> None:
    desktop_limits.cgroup_scopes.cache_clear()
    try:
        found = desktop_limits.cgroup_scopes()
        pid1 = Path("/proc/1/comm").read_text().strip()
        if pid1 != "systemd" or not Path("/run/systemd/system").is_dir():
            assert found is None
        assert desktop_limits.cgroup_scopes() is found  # cached: one probe per gateway run
    finally:
        desktop_limits.cgroup_scopes.cache_clear()


@pytest.mark.parametrize(("yaml", "key"), [
    ("memory_per_desktop: 4 GB", "desktop.limits.memory_per_desktop"),
    ("memory_per_desktop: 150%", "desktop.limits.memory_per_desktop"),
    ("cpu_weight: 0", "desktop.limits.cpu_weight"),
    ("cpu_weight: 20000", "desktop.limits.cpu_weight"),
])
def test_bad_limits_are_refused_at_config_read(yaml: str, key: str) -> None:
    with pytest.raises(InputError) as refused:
        parse_config(f"desktop:\n  limits:\n    {yaml}\n", "gateway.yaml")
    assert f"gateway.yaml:3: {key}:" in str(refused.value)


def test_good_limits_are_read() -> None:
    config = parse_config("desktop:\n  limits:\n    memory_per_desktop: 6G\n    cpu_weight: 100\n")
    assert config.desktop.limits == DesktopLimits(memory_per_desktop="6G", cpu_weight=100)
    assert parse_config("desktop:\n  limits:\n    memory_per_desktop: null\n").desktop.limits.memory_per_desktop is None


@pytest.mark.system  # systemd-run
def test_every_option_of_the_scope_command_is_one_this_systemd_run_knows() -> None:
    """The scope path can't run without systemd as PID 1, but its options can be checked against the
    installed systemd-run (--expand-environment only from systemd 254, where it is passed)."""
    help_text = subprocess.run([require_program("systemd-run"), "--help"], capture_output=True, text=True).stdout
    argv = scope_argv("wg-ws01", "Xvnc", DesktopLimits(), CgroupScopes(expands_environment=False))
    for option in (word.split("=")[0] for word in argv[1:-1] if word.startswith("--")):
        assert f" {option}" in help_text, option
