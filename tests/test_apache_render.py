"""The generated Apache configuration: right rules, sized for the class, accepted by Apache itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.proxies.apache import ApacheLayout, MpmSizing, render_apache_config
from gateway.model.config import Config, parse_config
from gateway.proxies.websockify import PerAccountWebsockify
from gateway.common.render import UnsafeValue, apache_quote, shell_quote
from gateway.model.tokens import generate_tokens, parse_tokens
from tests.system import require_program

TOKENS = parse_tokens(
    "ws01 localhost /desktop/ws01 6001 5901 abcdefg\n"
    "ws010 localhost /desktop/ws010 6002 5902 abcdefg\n"
    "deep localhost /desktop/ws01/x 6003 5903 abcdefg\n"
)


def routes(tokens=TOKENS, config: Config | None = None):
    return PerAccountWebsockify(config or Config(), Path("/tmp")).routes(tokens.accounts)


def proxy_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("ProxyPass ")]


def test_one_websocket_rule_per_account_deeper_paths_first() -> None:
    text = render_apache_config(Config(), routes(), web_port=9999, layout=None, listen="127.0.0.1:8080")
    lines = proxy_lines(text)
    assert lines[0] == "ProxyPass /desktop/ws01/x ws://127.0.0.1:6003/ retry=0 timeout=86400"
    assert "ProxyPass /desktop/ws01 ws://127.0.0.1:6001/ retry=0 timeout=86400" in lines
    assert "ProxyPass /desktop/ws010 ws://127.0.0.1:6002/ retry=0 timeout=86400" in lines
    # The web application is last, after the static exclusions, so it never shadows a desktop.
    assert lines[-1] == "ProxyPass / http://127.0.0.1:9999/ retry=0"
    assert lines.index("ProxyPass /static/ !") < len(lines) - 1
    # Every backend is on loopback: the gateway proxies only to what it manages.
    assert all("127.0.0.1" in line for line in lines if "://" in line)
    assert "Listen" not in text  # system mode: rules only, no server settings


def test_mpm_is_sized_for_the_class() -> None:
    small = MpmSizing.for_accounts(10, viewers_per_account=4)
    assert small.max_request_workers >= 150
    big = MpmSizing.for_accounts(300, viewers_per_account=4)
    # Every account's whole share of tunnels at once still leaves workers for the landing page.
    assert big.max_request_workers >= 4 * 300 + 64
    assert big.max_request_workers == big.server_limit * big.threads_per_child


@pytest.mark.system
def test_private_config_passes_apache_configtest(tmp_path: Path) -> None:
    apache2 = require_program("apache2")
    layout = ApacheLayout(tmp_path / "apache")
    (layout.root / "logs").mkdir(parents=True)
    layout.runtime_dir.mkdir(parents=True)
    tokens = parse_tokens("".join(f"{a.id} {a.vnc_host} {a.websocket_path} {a.websocket_port} {a.vnc_port} "
                                  f"{a.password}\n" for a in generate_tokens(300)))
    text = render_apache_config(Config(), routes(tokens), web_port=9999, layout=layout, listen="127.0.0.1:18099")
    layout.config_file.write_text(text)
    # 4 tunnels per account (the default viewer cap) + 64 spare, in children of 64 threads.
    assert "MaxRequestWorkers 1280" in text
    result = subprocess.run([apache2, "-t", "-f", str(layout.config_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Syntax OK" in result.stderr


@pytest.mark.system
def test_tls_config_passes_apache_configtest(tmp_path: Path) -> None:
    apache2 = require_program("apache2")
    openssl = require_program("openssl")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    config = parse_config(f"tls:\n  cert: {cert}\n  key: {key}\n")
    layout = ApacheLayout(tmp_path / "apache")
    (layout.root / "logs").mkdir(parents=True)
    layout.runtime_dir.mkdir(parents=True)
    layout.config_file.write_text(render_apache_config(config, routes(), web_port=9999, layout=layout,
                                                       listen="127.0.0.1:18443"))
    result = subprocess.run([apache2, "-t", "-f", str(layout.config_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "SSLEngine on" in layout.config_file.read_text()


@pytest.mark.parametrize("value", ['a"b', "a\nInclude /etc/passwd", "a\\", "x\x00"])
def test_values_that_would_break_apache_are_refused(value: str) -> None:
    with pytest.raises(UnsafeValue):
        apache_quote(value)


def test_shell_quote_makes_one_word() -> None:
    assert shell_quote("a b; rm -rf /") == "'a b; rm -rf /'"
    with pytest.raises(UnsafeValue):
        shell_quote("a\nb")


def test_apache_config_command_prints_rules(tmp_path: Path) -> None:
    tokens = tmp_path / "t.txt"
    tokens.write_text("ws01 localhost /desktop/ws01 6001 5901 s3cretpw\n")
    tokens.chmod(0o600)
    result = subprocess.run([sys.executable, "-m", "gateway", "apache-config", str(tokens), "--web-port", "8081"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ProxyPass /desktop/ws01 ws://127.0.0.1:6001/ retry=0" in result.stdout
    assert "ProxyPass / http://127.0.0.1:8081/ retry=0" in result.stdout
    assert "s3cretpw" not in result.stdout
