"""The per-account websockify's view of the RFB handshake (gateway/proxies/websockify_deadline.py): the
deadline is lifted exactly when the server accepts the viewer, whatever way the bytes are split."""

from __future__ import annotations

import socket

import pytest

from gateway.proxies.websockify_deadline import HandshakeWatch

SERVER = [b"RFB 003.008\n", b"\x01\x02", b"C" * 16, b"\x00\x00\x00\x00"]  # VNC auth, then "OK"
CLIENT = b"RFB 003.008\n" + b"\x02" + b"R" * 16


def run(client_writes: list[bytes], result: bytes = b"\x00\x00\x00\x00") -> tuple[list[str], HandshakeWatch]:
    """The server's half through the watched socket; the client's writes sent in between, as a viewer would."""
    settled: list[str] = []
    desktop, gateway_side = socket.socketpair()
    with desktop, gateway_side:
        watch = HandshakeWatch(gateway_side, lambda: settled.append("settled"))
        writes = iter(client_writes)
        for part in SERVER[:-1] + [result]:
            desktop.sendall(part)
            watch.recv(4096)
            if part == SERVER[1]:  # the viewer answers the security types with its choice (and response)
                for chunk in writes:
                    watch.send(chunk)
                    desktop.recv(4096)
        return settled, watch


@pytest.mark.parametrize("splits", [[CLIENT], [CLIENT[:12], CLIENT[12:13], CLIENT[13:]], [CLIENT[:13], CLIENT[13:]],
                                    [CLIENT[:5], CLIENT[5:20], CLIENT[20:]]])
def test_the_deadline_is_lifted_when_the_server_accepts(splits: list[bytes]) -> None:
    settled, watch = run(splits)
    assert settled == ["settled"] and watch.handshake.result is True


def test_a_refused_password_keeps_the_deadline() -> None:
    settled, watch = run([CLIENT], result=b"\x00\x00\x00\x01")
    assert settled == [] and watch.handshake.result is False


def test_a_handshake_it_cannot_follow_lifts_the_deadline() -> None:
    """Another protocol version: the watch cannot tell when authentication ends, so it must not cut."""
    settled: list[str] = []
    desktop, gateway_side = socket.socketpair()
    with desktop, gateway_side:
        watch = HandshakeWatch(gateway_side, lambda: settled.append("settled"))
        desktop.sendall(b"RFB 003.003\n")
        watch.recv(4096)
    assert settled == ["settled"]
