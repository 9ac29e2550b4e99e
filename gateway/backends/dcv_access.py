"""What a browser or the native DCV client needs to reach an account's DCV session.

Public, unlike :mod:`gateway.backends.dcv`: the web layer's DCV proxy (:mod:`gateway.web.dcv_proxy`)
uses these, and never the backend itself.
"""

from __future__ import annotations

import re
import ssl

from gateway.model.config import Config

__all__ = ["web_url_path", "connection_file", "upstream_ssl"]


def web_url_path(config: Config, account_id: str) -> str:
    """The DCV web-url-path of ``account_id``'s session (dcv.web_url_path with {account} replaced)."""
    return config.dcv.web_url_path.replace("{account}", account_id)


_INI_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")


def connection_file(*, host: str, port: int, session_id: str, user: str) -> str:
    """A DCV connection file for the native client (INI). Never holds a password."""
    values = {"host": host, "port": str(port), "sessionid": session_id, "user": user}
    for key, value in values.items():
        if not value or _INI_FORBIDDEN.search(value):
            raise ValueError(f"{key} {value[:40]!r} cannot go into a .dcv file")
    lines = ["[version]", "format=1.0", "", "[connect]"] + [f"{k}={v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def upstream_ssl(config: Config) -> ssl.SSLContext | bool:
    """How to talk TLS to DCV web servers: their certificates are self-signed, so not checked."""
    return False if config.dcv.scheme == "https" else True
