"""Who is connected: established TCP connections to the desktops' VNC servers, from /proc/net/tcp.

Every proxy mode (websockify per account, shared websockify, the builtin relay) opens one TCP
connection per viewer to the desktop's VNC server, from this host. Counting this host's
established connections to each VNC endpoint therefore counts the viewers, whatever the mode.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from pathlib import Path

__all__ = ["established_by_remote", "parse_proc_net_tcp"]

_ESTABLISHED = "01"


def _decode(address: str) -> tuple[str, int]:
    host_hex, port_hex = address.split(":")
    raw = bytes.fromhex(host_hex)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:
        # IPv6 in /proc is four little-endian 32-bit words.
        ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return str(ip), int(port_hex, 16)


def parse_proc_net_tcp(text: str) -> list[tuple[tuple[str, int], tuple[str, int], str]]:
    """(local, remote, state) for each socket listed in /proc/net/tcp or tcp6 text."""
    rows = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        rows.append((_decode(fields[1]), _decode(fields[2]), fields[3]))
    return rows


def established_by_remote() -> Counter[tuple[str, int]]:
    """How many established connections this host has to each (ip, port)."""
    counts: Counter[tuple[str, int]] = Counter()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        for _, remote, state in parse_proc_net_tcp(text):
            if state == _ESTABLISHED:
                counts[remote] += 1
    return counts
