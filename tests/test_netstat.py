"""Counting established connections from /proc/net/tcp, on recorded text and on a live socket."""

from __future__ import annotations

import socket

from gateway.common.netstat import established_by_remote, parse_proc_net_tcp

RECORDED = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:170D 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:D2F4 0100007F:170D 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
"""


def test_recorded_text() -> None:
    rows = parse_proc_net_tcp(RECORDED)
    assert rows[0] == (("127.0.0.1", 5901), ("0.0.0.0", 0), "0A")
    assert rows[1] == (("127.0.0.1", 0xD2F4), ("127.0.0.1", 5901), "01")


def test_live_connection_is_counted() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    before = established_by_remote()[("127.0.0.1", port)]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    accepted = [server.accept()[0] for _ in clients]
    try:
        assert established_by_remote()[("127.0.0.1", port)] == before + 3
    finally:
        for s in clients + accepted + [server]:
            s.close()
