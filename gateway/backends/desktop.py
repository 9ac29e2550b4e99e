"""What every desktop is made of, whichever backend runs it: the Xvnc command line and the session's environment.

Local, SSH and Slurm desktops start the same Xvnc with the same options, and give the desktop
session the same clean environment, nothing of the gateway's (or the SSH session's, or the
submitting shell's) own. The local backend passes the environment to the process, the SSH backend
to ``env -i`` on the host, and the Slurm job script exports it (:func:`shell_exports`), all from
:func:`session_environment`: there is one list of variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gateway.common.render import shell_quote

__all__ = ["xvnc_argv", "session_environment", "shell_exports", "ShellValue", "SESSION_PATH",
           "DISPLAYFD_TIMEOUT_S", "NOTICE_SECONDS"]

#: How long Xvnc may take to report its display number (it does once it listens).
DISPLAYFD_TIMEOUT_S = 15.0
#: How long a notice (an idle warning) stays on the desktop unless closed.
NOTICE_SECONDS = 300
#: PATH of the desktop session.
SESSION_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def xvnc_argv(
    *,
    xvnc: str,
    displayfd: int,
    rfb_port: int,
    password_file: Path,
    geometry: str,
    depth: int,
    desktop_name: str,
    max_cut_text: int,
    interface: str = "127.0.0.1",
    xauthority: Path | None = None,
) -> list[str]:
    """The Xvnc command line. The password is in a file: command lines are public."""
    # With -auth only clients holding the cookie open the display (its user's and root).
    auth = ["-auth", str(xauthority)] if xauthority is not None else []
    return [
        xvnc,
        *auth,
        "-displayfd", str(displayfd),
        "-rfbport", str(rfb_port),
        "-rfbauth", str(password_file),
        "-SecurityTypes", "VncAuth",
        # Every viewer reaches Xvnc through a proxy on 127.0.0.1; TigerVNC's blacklist would lock
        # out everyone behind it after one participant's five typos.
        "-UseBlacklist=0",
        "-interface", interface,
        "-geometry", geometry,
        "-depth", str(depth),
        "-desktop", desktop_name,
        "-AlwaysShared",
        "-SendCutText=1",
        "-AcceptCutText=1",
        f"-MaxCutText={max_cut_text}",
        "-nolisten", "tcp",
    ]


class ShellValue(str):
    """A value a script computes itself (``"$XDG_RUNTIME_DIR/Xauthority"``): written as is, not quoted."""

    __slots__ = ()


def session_environment(*, home: str, runtime_dir: str, xauthority: str, keyboard_layout: str,
                        user: str | None = None, display: str | None = None) -> dict[str, str]:
    """The whole environment of a desktop session (and of its Xvnc, without ``display``).

    ``user`` names the desktop's user (USER, LOGNAME) when the caller knows it; ``display`` is
    ``":N"``. LANG is C.UTF-8 everywhere: the gateway's own locale may not exist where the desktop runs.
    """
    env = {
        "PATH": SESSION_PATH,  # first: a script's later values may run commands ($(id -u))
        "HOME": home,
        "LANG": "C.UTF-8",
        "SHELL": "/bin/bash",
        "TERM": "xterm-256color",
        "XDG_RUNTIME_DIR": runtime_dir,
        "XAUTHORITY": xauthority,  # after XDG_RUNTIME_DIR, which a script's value may name
    }
    if user:
        env["USER"] = env["LOGNAME"] = user
    if display is not None:
        env["DISPLAY"] = display
    if keyboard_layout:
        env["GATEWAY_KEYBOARD_LAYOUT"] = keyboard_layout
    return env


def shell_exports(env: Mapping[str, str]) -> str:
    """``export NAME=VALUE`` lines for a script: each value one quoted word, a :class:`ShellValue` as is."""
    return "".join(f"export {name}={value if isinstance(value, ShellValue) else shell_quote(value)}\n"
                   for name, value in env.items())
