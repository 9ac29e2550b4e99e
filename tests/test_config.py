"""The YAML config: defaults, documented keys, and clear PATH:LINE errors."""

from __future__ import annotations

import pytest

from gateway.model.config import Config, parse_config
from gateway.model.errors import InputError


def errors(text: str) -> list[str]:
    with pytest.raises(InputError) as info:
        parse_config(text, "g.yaml")
    return [str(p) for p in info.value.problems]


def test_empty_config_is_all_defaults() -> None:
    assert parse_config("", "g.yaml") == Config(source="g.yaml")
    assert Config().apache.mode == "private"
    assert Config().desktop.start_concurrency >= 1


def test_values_are_read_and_typed() -> None:
    config = parse_config(
        "listen: 0.0.0.0:8443\n"
        "desktop:\n  geometry: 1920x1080\n  session: [xterm, -e, top]\n  start_timeout_s: 10\n"
        "event:\n  title: Winter School\n  primary_color: '#005a9c'\n"
        "tls:\n  cert: /etc/ssl/c.pem\n  key: /etc/ssl/k.pem\n",
        "g.yaml",
    )
    assert config.listen == "0.0.0.0:8443"
    assert config.desktop.session == ("xterm", "-e", "top")
    assert config.desktop.start_timeout_s == 10.0
    assert config.event.title == "Winter School"
    assert config.tls.enabled


def test_unknown_and_mistyped_keys_have_lines() -> None:
    found = errors("desktop:\n  geometry: 1280x800\n  geometr: 1x1\napache:\n  mode: public\nproxy:\n  heartbeat_s: often\n")
    assert found[0].startswith("g.yaml:3: unknown key 'desktop.geometr'")
    assert any(f.startswith("g.yaml:5: apache.mode must be one of: private, system") for f in found)
    assert any(f.startswith("g.yaml:7: proxy.heartbeat_s must be a whole number") for f in found)


def test_semantic_errors() -> None:
    found = errors("desktop:\n  geometry: big\n  start_concurrency: 0\ntls:\n  cert: /a.pem\n")
    assert "g.yaml:2: desktop.geometry: use WIDTHxHEIGHT, e.g. 1280x800" in found
    assert any(f.startswith("g.yaml:3: desktop.start_concurrency") for f in found)
    assert any("give both tls.cert and tls.key" in f for f in found)


def test_invalid_yaml_reports_its_line() -> None:
    (found,) = errors("desktop:\n  geometry: [1280\n")
    assert found.startswith("g.yaml:3: invalid YAML") or found.startswith("g.yaml:2: invalid YAML")


def test_top_level_must_be_a_mapping() -> None:
    (found,) = errors("- a\n- b\n")
    assert found == "g.yaml:1: config must be a mapping of keys to values"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("[::1]", True),
                                            ("localhost", True), ("0.0.0.0", False), ("10.0.0.1", False),
                                            ("gateway.example.org", False), ("", False)])
def test_only_loopback_addresses_and_localhost_count_as_private(host: str, loopback: bool) -> None:
    """A name is never looked up: it counts as reachable from other machines, so it needs TLS."""
    from gateway.model.config_checks import is_loopback_host

    assert is_loopback_host(host) is loopback
