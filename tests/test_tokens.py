"""The token file: what organisers write, and every way it can be wrong."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from gateway.model.errors import InputError
from gateway.web.app import reserved_segments
from gateway.model.tokens import format_tokens, generate_tokens, load_tokens, parse_tokens

GOOD = """\
# account   vnchost    websocketpath   websocketport  vncport  vncpassword
ws01        localhost  /desktop/ws01   6001           5901     k3Rf9xQa
ws02        127.0.0.1  desktop/ws02    6002           5902     Zz8pq2mn   # trailing comment

ws03        node17     /p/ws03         6003           5901     abcdef backend=ssh
"""


def problems(text: str) -> list[str]:
    with pytest.raises(InputError) as info:
        parse_tokens(text, "t.txt", reserved_routes=reserved_segments())
    return [str(p) for p in info.value.problems]


def test_good_file_parses_with_normalised_paths() -> None:
    tokens = parse_tokens(GOOD, "t.txt")
    assert [a.id for a in tokens.accounts] == ["ws01", "ws02", "ws03"]
    assert tokens.accounts[1].websocket_path == "/desktop/ws02"
    assert tokens.accounts[2].extra("backend") == "ssh"
    assert tokens.accounts[0].is_local and not tokens.accounts[2].is_local
    # The same VNC port on another host is fine.
    assert tokens.accounts[2].vnc_port == tokens.accounts[0].vnc_port


def test_password_never_in_repr() -> None:
    account = parse_tokens(GOOD).accounts[0]
    assert "k3Rf9xQa" not in repr(account)


def test_every_problem_is_reported_with_its_line() -> None:
    text = (
        "ws01 localhost /desktop/ws01 6001 5901 abcdefg\n"        # 1: fine
        "bad id! localhost /x 6002 5902 abcdefg\n"                # 2: 7 fields, account invalid
        "ws03 localhost /desktop/../x 6003 5903 abcdefg\n"        # 3: '..'
        "ws04 localhost /desktop/ws04 80 5904 abcdefg\n"          # 4: port below 1024
        "ws05 localhost /desktop/ws05 6005 5905 abcdefghij\n"     # 5: password too long
        "ws01 localhost /desktop/ws06 6006 5906 abcdefg\n"        # 6: duplicate account
        "ws07 localhost /desktop/ws07 6001 5907 abcdefg\n"        # 7: duplicate websocket port
        "ws08 localhost /desktop/ws08 6008 5907 abcdefg\n"        # 8: duplicate vnc port on host
        "ws09 localhost /static/ws09 6009 5909 abcdefg\n"         # 9: reserved route
        "ws10 local_host! /desktop/ws10 6010 5910 abcdefg\n"      # 10: bad host
        "ws11 localhost /desktop/ws11 6011 5911 abcdefg color=red\n"  # 11: unknown key
        "ws12 localhost /desktop/ws12 5901 5912 abcdefg\n"        # 12: ws port = a local vnc port
        "ws13 localhost /desktop/ws13 6013 5913 short\n"          # 13: password too short
    )
    found = problems(text)
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == sorted(lines)
    assert set(lines) == set(range(2, 14)), found
    assert all(p.startswith("t.txt:") for p in found)
    assert any("too short" in p for p in found)
    assert any("too long" in p and "first 8" in p for p in found)
    assert any("already on line 1" in p for p in found)


def test_duplicate_ids_differing_only_in_case_are_refused() -> None:
    found = problems("WS01 localhost /a 6001 5901 abcdefg\nws01 localhost /b 6002 5902 abcdefg\n")
    assert found == ["t.txt:2: account ws01 already on line 1"]


def test_duplicate_paths_after_normalisation() -> None:
    found = problems("a localhost /d/x 6001 5901 abcdefg\nb localhost d/x 6002 5902 abcdefg\n")
    assert "websocketpath /d/x already on line 1" in found[0]


@pytest.mark.parametrize("path", ["/a//b", "/a/b/", "/a b", "/a/%2e%2e", '/a"b', "/a/<x>", "/"])
def test_bad_paths(path: str) -> None:
    text = f"ws01 localhost {path} 6001 5901 abcdefg\n"
    assert problems(text)


def test_empty_file_is_an_error() -> None:
    assert problems("# only a comment\n\n") == ["t.txt:0: no accounts: the file has no token lines"]


def test_crlf_and_bom_are_accepted(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffws01 localhost /d/ws01 6001 5901 abcdefg\r\n".encode())
    path.chmod(0o600)
    tokens = load_tokens(path, reserved_routes=frozenset())
    assert tokens.accounts[0].password == "abcdefg"
    assert tokens.warnings == ()


def test_world_readable_file_warns(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("ws01 localhost /d/ws01 6001 5901 abcdefg\n")
    path.chmod(0o644)
    (warning,) = load_tokens(path, reserved_routes=frozenset()).warnings
    assert "chmod 600" in warning


def test_generate_is_valid_and_private(tmp_path) -> None:
    accounts = generate_tokens(30, prefix="ws")
    assert len({a.password for a in accounts}) == 30
    reparsed = parse_tokens(format_tokens(accounts)).accounts
    assert [(a.id, a.websocket_port, a.vnc_port, a.password) for a in reparsed] == [
        (a.id, a.websocket_port, a.vnc_port, a.password) for a in accounts]
    out = tmp_path / "gen.txt"
    result = subprocess.run([sys.executable, "-m", "gateway", "tokens", "generate", "--count", "5",
                             "--prefix", "user", "-o", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert len(load_tokens(out, reserved_routes=frozenset()).accounts) == 5
    check = subprocess.run([sys.executable, "-m", "gateway", "tokens", "check", str(out)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "5 accounts" in check.stdout


def test_check_command_exits_2_with_path_line(tmp_path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("ws01 localhost /d/ws01 6001 5901 abcdefg\nws02 localhost /d/ws02 notaport 5902 abcdefg\n")
    result = subprocess.run([sys.executable, "-m", "gateway", "tokens", "check", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"{path}:2: websocketport 'notaport' is not a number"
    assert "Traceback" not in result.stderr


def test_auto_vnc_ports_unique_among_auto_and_pinned_slurm_accounts() -> None:
    text = (
        "a1 auto   /d/a1 6001 5901 abcdefg\n"                 # 1
        "a2 auto   /d/a2 6002 5901 abcdefg\n"                 # 2: same port as auto a1
        "p1 node01 /d/p1 6003 5902 abcdefg\n"                 # 3: pinned
        "a3 auto   /d/a3 6004 5902 abcdefg\n"                 # 4: same port as pinned p1
        "p2 node02 /d/p2 6005 5903 abcdefg backend=slurm\n"   # 5: pinned (explicit)
        "a4 auto   /d/a4 6006 5903 abcdefg\n"                 # 6: same port as pinned p2
        "s1 node03 /d/s1 6007 5904 abcdefg backend=ssh\n"     # 7: not a Slurm node
        "a5 auto   /d/a5 6008 5904 abcdefg\n"                 # 8: fine
        "l1 localhost /d/l1 6009 5905 abcdefg\n"              # 9: the gateway host
        "a6 auto   /d/a6 6010 5905 abcdefg\n"                 # 10: fine
        "p3 node01 /d/p3 6011 5906 abcdefg\n"                 # 11
        "p4 node04 /d/p4 6012 5906 abcdefg\n"                 # 12: pinned on other nodes may share
    )
    found = problems(text)
    assert [f.split(":")[1] for f in found] == ["2", "4", "6"]
    assert found[0].startswith("t.txt:2: vncport 5901 is also used by a1 on line 1")
    assert found[1].startswith("t.txt:4: vncport 5902 is also used by p1 on line 3")
    assert found[2].startswith("t.txt:6: vncport 5903 is also used by p2 on line 5")


def test_pinned_before_or_after_auto_reports_the_later_line() -> None:
    found = problems("p1 node01 /d/p1 6001 5901 abcdefg\n"
                     "x1 node02 /d/x1 6002 5999 abcdefg\n"
                     "a1 auto   /d/a1 6003 5999 abcdefg\n")
    assert found == [f for f in found if f.startswith("t.txt:3: vncport 5999 is also used by x1 on line 2")]
    assert len(found) == 1
    tokens = parse_tokens("a1 auto /d/a1 6001 5901 abcdefg\na2 auto /d/a2 6002 5902 abcdefg\n", "t.txt")
    assert [a.vnc_host for a in tokens.accounts] == ["auto", "auto"]
