"""VNC authentication (RFB security type 2): the DES answer to a server's 16-byte challenge.

Kept apart from the RFB client (:mod:`gateway.common.rfb`) because it is pure computation with an
odd key schedule worth testing on its own against known vectors (vncpasswd's obfuscation key).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, modes

try:  # cryptography >= 43 keeps DES-era ciphers here
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES  # type: ignore[no-redef]

__all__ = ["CHALLENGE_LEN", "vnc_auth_key", "vnc_auth_response"]

#: Length of a VncAuth challenge and of its answer, in bytes.
CHALLENGE_LEN = 16
_BIT_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def vnc_auth_key(password: str) -> bytes:
    """Return the 8-byte DES key VncAuth derives from ``password``.

    The password is UTF-8 encoded, truncated or NUL-padded to 8 bytes, and the bits of each byte
    are reversed (VNC's DES code numbers key bits the other way round from standard DES).
    """
    return password.encode()[:8].ljust(8, b"\0").translate(_BIT_REVERSED)


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """Return the 16-byte answer to a VncAuth ``challenge``: the challenge DES-ECB encrypted.

    Raises ValueError if ``challenge`` is not 16 bytes long.
    """
    if len(challenge) != CHALLENGE_LEN:
        raise ValueError(f"a VncAuth challenge is {CHALLENGE_LEN} bytes, not {len(challenge)}")
    return _des_ecb_encrypt(vnc_auth_key(password), challenge)


def _des_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """Single DES in ECB mode: TripleDES with the key repeated three times is plain DES."""
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()
