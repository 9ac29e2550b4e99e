"""The proxy mode ``proxy.mode`` names: the one place that knows every :class:`ProxyMode`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gateway.model.config import Config
from gateway.model.status import DesktopSlot
from gateway.proxies.base import ProxyMode
from gateway.proxies.relay import BuiltinRelay
from gateway.proxies.websockify import PerAccountWebsockify, SharedWebsockify

__all__ = ["make_proxy_mode"]


def make_proxy_mode(config: Config, *, logs_dir: Path, runtime_dir: Path,
                    slots: Mapping[str, DesktopSlot]) -> ProxyMode:
    """The proxy mode ``config.proxy.mode`` names."""
    if config.proxy.mode == "shared":
        return SharedWebsockify(config, logs_dir, runtime_dir)
    if config.proxy.mode == "builtin":
        return BuiltinRelay(config, slots)
    return PerAccountWebsockify(config, logs_dir)
