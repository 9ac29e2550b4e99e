"""The systemd unit written by `gateway systemd install` is accepted by systemd-analyze verify."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.common.render import UnsafeValue
from gateway.cli.systemd_unit import ServiceSpec, render_service, systemd_word
from tests.system import require_program


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
