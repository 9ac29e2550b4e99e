"""The desktop container: its definition (read with spython), the command lines, and the session script.

Singularity and Apptainer cannot be installed on the test machines, so the definition is checked with
spython's recipe parser and the command lines as text. ``containers/desktop-session`` runs for real under
Xvnc (openbox and xterm here; XFCE inside the image).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gateway.model.container import (
    ContainerSpec,
    build_argv,
    exec_argv,
    parse_definition,
    validate_bind,
)
from gateway.model.errors import UserError

from tests.system import free_port, require_program

ROOT = Path(__file__).resolve().parent.parent
DEFINITION = ROOT / "containers" / "desktop.def"
SESSION = ROOT / "containers" / "desktop-session"
PASSWORD = "s3cret-pw"

# --- the definition, as spython reads it ----------------------------------------------------------------


@pytest.fixture(scope="module")
def definition():
    return parse_definition(DEFINITION)


def test_definition_header_and_sections(definition) -> None:
    assert definition.bootstrap == "docker"
    assert definition.from_.startswith("debian")
    assert {"post", "environment", "runscript", "labels", "help", "files"} <= definition.sections


def test_definition_installs_tigervnc_and_a_desktop(definition) -> None:
    words = set(" ".join(definition.install).replace("\\", " ").split())
    assert {"tigervnc-standalone-server", "tigervnc-tools"} <= words
    assert "xfce4" in words
    assert {"xfce4-terminal", "firefox-esr", "dbus-x11", "xclip", "git", "vim", "nano", "python3"} <= words
    assert any("apt-get install" in line for line in definition.install)


def test_definition_environment_and_runscript(definition) -> None:
    names = {pair.split("=", 1)[0] for pair in definition.environ}
    assert {"LANG", "PATH"} <= names
    assert definition.runscript is not None
    assert "gateway-desktop-session" in definition.runscript
    # The session script the runscript starts is copied in by %files.
    assert "desktop-session /usr/local/bin/gateway-desktop-session" in DEFINITION.read_text()


def test_parse_definition_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read") as info:
        parse_definition(tmp_path / "missing.def")
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty.def"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="empty"):
        parse_definition(empty)
    headless = tmp_path / "headless.def"
    headless.write_text("%post\n    echo hi\n")
    with pytest.raises(UserError, match="Bootstrap"):
        parse_definition(headless)
    other = tmp_path / "other.def"
    other.write_text("Bootstrap: localimage\nFrom: base.sif\n%post\n    echo hi\n")
    with pytest.raises(UserError, match="localimage"):
        parse_definition(other)


# --- command lines ----------------------------------------------------------------------------------

XVNC = ["Xvnc", ":5", "-rfbport", "5905", "-rfbauth", "/tmp/job/passwd", "-SecurityTypes", "VncAuth",
        "-UseBlacklist=0"]


@pytest.mark.parametrize("runtime", ["singularity", "apptainer"])
def test_exec_argv_container(runtime: str) -> None:
    spec = ContainerSpec(runtime, "/images/desktop.sif", binds=("/home", "/scratch:/scratch:rw", "/opt:/opt:ro"),
                         extra_args=("--cleanenv",))
    argv = exec_argv(spec, XVNC, env={"DISPLAY": ":5", "GATEWAY_KEYBOARD_LAYOUT": "de"})
    assert argv[:2] == [runtime, "exec"]
    assert argv == [
        runtime, "exec",
        "--bind", "/home", "--bind", "/scratch:/scratch:rw", "--bind", "/opt:/opt:ro",
        "--env", "DISPLAY=:5", "--env", "GATEWAY_KEYBOARD_LAYOUT=de",
        "--cleanenv",
        "/images/desktop.sif", *XVNC,
    ]
    # The image comes right before the program, and the program's arguments are untouched.
    image_at = argv.index("/images/desktop.sif")
    assert argv[image_at + 1:] == XVNC
    assert PASSWORD not in " ".join(argv)


def test_exec_argv_none() -> None:
    spec = ContainerSpec("none", None, binds=("/home",))
    assert exec_argv(spec, XVNC) == XVNC
    assert exec_argv(spec, ("xterm",)) == ["xterm"]
    assert exec_argv(spec, ["xterm"], env={"DISPLAY": ":5"}) == ["/usr/bin/env", "DISPLAY=:5", "xterm"]


def test_exec_argv_matches_spython_text() -> None:
    """Same text as spython's Client.execute would run (its executable name, its --bind form)."""
    spec = ContainerSpec("singularity", "/images/desktop.sif", binds=("/home:/home",))
    assert " ".join(exec_argv(spec, ["xterm", "-e", "bash -l"])) == (
        "singularity exec --bind /home:/home /images/desktop.sif xterm -e bash -l"
    )
    assert exec_argv(spec, ["xterm", "-e", "bash -l"])[-1] == "bash -l"


def test_exec_argv_refuses_secrets_and_bad_input() -> None:
    spec = ContainerSpec("apptainer", "/images/desktop.sif")
    with pytest.raises(ValueError, match="secret"):
        exec_argv(spec, ["Xvnc"], env={"VNC_PASSWORD": PASSWORD})
    with pytest.raises(ValueError, match="not a string"):
        exec_argv(spec, "Xvnc :5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="program"):
        exec_argv(spec, [])
    with pytest.raises(ValueError, match="not valid"):
        exec_argv(spec, ["xterm"], env={"BAD NAME": "x"})


@pytest.mark.parametrize("runtime", ["singularity", "apptainer"])
def test_build_argv(runtime: str) -> None:
    spec = ContainerSpec(runtime, "/images/desktop.sif")
    assert build_argv(spec, Path("/src/desktop.def"), Path("/images/desktop.sif")) == [
        runtime, "build", "/images/desktop.sif", "/src/desktop.def",
    ]
    assert build_argv(spec, Path("desktop.def"), Path("out.sif"), fakeroot=True, force=True) == [
        runtime, "build", "--force", "--fakeroot", "out.sif", "desktop.def",
    ]


def test_build_argv_none() -> None:
    with pytest.raises(ValueError, match="none"):
        build_argv(ContainerSpec("none", None), Path("d.def"), Path("d.sif"))


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("", "empty"),
        ("home", "absolute"),
        ("/home:home", "absolute"),
        ("/a,/b", "commas"),
        ("/a\n/b", "newlines"),
        ("/a:/b:ro:x", "parts"),
        ("/a:/b:rx", "options"),
        ("/a::ro", "absolute"),
    ],
)
def test_bind_validation(bind: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_bind(bind)
    with pytest.raises(ValueError, match=message):
        ContainerSpec("singularity", "/i.sif", binds=(bind,))


def test_spec_validation() -> None:
    assert validate_bind("/opt:/opt:ro") == "/opt:/opt:ro"
    with pytest.raises(ValueError, match="image"):
        ContainerSpec("apptainer", None)
    with pytest.raises(ValueError, match="runtime"):
        ContainerSpec("docker", "/i.sif")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tuples"):
        ContainerSpec("apptainer", "/i.sif", binds="/home")  # type: ignore[arg-type]


# --- the session script under a real Xvnc ---------------------------------------------------------------


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


@pytest.fixture
def xvnc_display(tmp_path: Path):
    """A real Xvnc on a free display; yields ":N"."""
    xvnc = require_program("Xvnc")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [xvnc, "-displayfd", str(write_fd), "-rfbport", str(free_port()), "-SecurityTypes", "None",
         "-interface", "127.0.0.1", "-geometry", "1024x768"],
        pass_fds=(write_fd,), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "xvnc.log", "wb"),
    )
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            number = pipe.readline().strip()  # Xvnc writes the display number once it listens
        if not number.isdigit():
            pytest.fail(f"Xvnc did not report a display: {(tmp_path / 'xvnc.log').read_text()[-2000:]}")
        yield f":{int(number)}"
    finally:
        _kill_group(proc)


def _xprop_root(display: str, prop: str) -> str:
    result = subprocess.run(["xprop", "-root", "-display", display, prop], capture_output=True, text=True,
                            timeout=5)
    return result.stdout if result.returncode == 0 else ""


@pytest.mark.system
def test_desktop_session_under_xvnc(xvnc_display: str, tmp_path: Path) -> None:
    require_program("xprop")
    require_program("openbox" if not shutil.which("startxfce4") else "startxfce4")
    setxkbmap = require_program("setxkbmap")  # the layout is checked, never silently left out
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "DISPLAY": xvnc_display,
        "XDG_RUNTIME_DIR": str(tmp_path),
    }
    env["GATEWAY_KEYBOARD_LAYOUT"] = "de"
    log = open(tmp_path / "session.log", "wb")
    session = subprocess.Popen([str(SESSION)], env=env, start_new_session=True, stdout=log, stderr=log,
                               cwd=tmp_path)
    try:
        # A window manager announces itself on the root window ...
        _wait_for(lambda: "window id" in _xprop_root(xvnc_display, "_NET_SUPPORTING_WM_CHECK"), 30,
                  f"a window manager on {xvnc_display}")
        # ... and manages the terminal's window.
        _wait_for(lambda: re.search(r"0x[0-9a-f]+", _xprop_root(xvnc_display, "_NET_CLIENT_LIST")), 30,
                  f"a terminal window on {xvnc_display}")
        assert session.poll() is None, (tmp_path / "session.log").read_text()
        query = subprocess.run([setxkbmap, "-display", xvnc_display, "-query"], capture_output=True,
                               text=True, timeout=5).stdout
        assert re.search(r"^layout:\s+de$", query, re.MULTILINE), query
        # The session is the window manager (exec): when it exits, the session ends.
        os.kill(session.pid, signal.SIGTERM)
        assert session.wait(timeout=10) is not None
    finally:
        _kill_group(session)
        log.close()


def test_desktop_session_needs_display(tmp_path: Path) -> None:
    result = subprocess.run([str(SESSION)], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert "DISPLAY" in result.stderr
