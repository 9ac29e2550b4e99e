"""The sign-up form and sessions against a hostile visitor, through a real `gateway up` (Xvnc, Apache).

A password is shown once; a public form needs the event code; a global sign-up rate beside the
per-address one; control characters refused in every field; Secure cookies whenever participants
use https.
"""

from __future__ import annotations

import re
import sqlite3
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest

from gateway.model.config import parse_config
from gateway.model.errors import InputError
from tests.gateway_run import GatewayRun, processes_mentioning

pytestmark = pytest.mark.system

SIGNUP = "registration:\n  enabled: true\n"


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


def claims(run: GatewayRun) -> dict[str, str]:
    with sqlite3.connect(run.state_dir / "gateway.db") as db:
        return dict(db.execute("SELECT email, account FROM claims").fetchall())


def http_session(local_address: str | None = None) -> aiohttp.ClientSession:
    """A browser-like client (cookies kept for 127.0.0.1), optionally from another loopback address."""
    connector = aiohttp.TCPConnector(local_addr=(local_address, 0)) if local_address else None
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), connector=connector)


# -- refused before anything starts ----------------------------------------------------------------


def test_repeat_show_is_gone() -> None:
    assert parse_config(SIGNUP).registration.repeat == "hide"
    with pytest.raises(InputError, match=r"<config>:3: registration.repeat must be one of: hide"):
        parse_config(SIGNUP + "  repeat: show\n")


@pytest.mark.parametrize("where", ["public_url", "listen"])
def test_a_public_form_without_an_event_code_is_refused_at_once(where: str, tmp_path: Path) -> None:
    from tests.gateway_run import make_accounts

    config = SIGNUP
    if where == "public_url":
        config += "public_url: https://desktops.example.org/\ntls:\n  terminated_by_proxy: true\n"
    else:  # a public address, TLS and all, but no code
        cert, key = self_signed(tmp_path)
        config += f"tls:\n  cert: {cert}\n  key: {key}\n"
    run = GatewayRun(tmp_path, make_accounts(1), config)
    argv = run.argv()
    if where == "listen":
        argv[argv.index("--listen") + 1] = f"0.0.0.0:{run.listen_port}"
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gateway: error: registration.event_code: the sign-up form is public"), line
    assert ("public_url https://desktops.example.org/" if where == "public_url" else "listen 0.0.0.0:") in line
    assert not run.state_dir.exists() and processes_mentioning(str(tmp_path)) == []
    # With a code, the same configuration starts (checked without starting anything: the same function).
    from gateway.model.config import public_signup_problem

    coded = parse_config(config.replace(SIGNUP, SIGNUP + "  event_code: owl-42\n"))
    assert public_signup_problem(coded, f"0.0.0.0:{run.listen_port}") is None
    assert public_signup_problem(parse_config(SIGNUP), "127.0.0.1:8080") is None  # loopback only: no code needed


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key


# -- through a running gateway ----------------------------------------------------------------------


async def test_a_password_is_shown_once_and_fields_with_control_characters_are_refused(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=2, config_text=SIGNUP)
    run.up()
    passwords = {a.id: a.password for a in run.accounts}
    try:
        async with http_session() as http:
            token = csrf_of(await (await http.get(run.url + "signup")).text())

            async def sign_up(**fields: str) -> tuple[int, str]:
                data = {"csrf": token, "name": "Ada Lovelace", "email": "ada@example.org", **fields}
                async with http.post(run.url + "signup", data=data) as response:
                    return response.status, await response.text()

            # Control characters anywhere: refused with a clear message, nothing claimed, nothing echoed.
            hostile = {
                "name": ["Ada\nLovelace", "Ada\x00", "\x1b[31mAda", "Ada\u202eecalevoL", "Ada\t", "Ada\u2028"],
                "email": ["ada@example.org\r\nBcc: x@example.org", "ada\x00@example.org", "ada@example.org\x85"],
                "event_code": ["owl\n"],
                "extra": ["\x07"],
            }
            for field, values in hostile.items():
                for value in values:
                    status, page = await sign_up(**{field: value})
                    assert status == 400, (field, value)
                    assert "remove the control characters" in page, (field, value)
                    assert value not in page and "\x1b" not in page and "\u202e" not in page
            assert "from your name" in (await sign_up(name="a\nb"))[1]
            assert "from your e-mail address" in (await sign_up(email="a\n@example.org"))[1]
            assert claims(run) == {}

            # The first sign-up shows the password, once; the same e-mail later never sees it again.
            status, page = await sign_up()
            assert status == 200, page
            account = re.search(r'id="account">([^<]+)<', page).group(1)  # type: ignore[union-attr]
            assert f'id="password">{passwords[account]}<' in page
            for email in ("ada@example.org", "  ADA@EXAMPLE.ORG "):
                status, page = await sign_up(email=email)
                assert status == 200 and "already have an account" in page
                assert passwords[account] not in page and 'id="password"' not in page
            async with http_session() as stranger:  # another browser, the same e-mail: nothing either
                other = csrf_of(await (await stranger.get(run.url + "signup")).text())
                async with stranger.post(run.url + "signup", data={"csrf": other, "name": "Eve",
                                                                    "email": "ada@example.org"}) as response:
                    page = await response.text()
                    assert response.status == 200 and passwords[account] not in page

            # Sign-in refuses control characters too (and does not count them as a wrong password).
            page = await (await http.get(run.url + "login")).text()
            async with http.post(run.url + "login", data={"csrf": csrf_of(page), "account": f"{account}\n",
                                                          "password": passwords[account]}) as response:
                assert response.status == 400 and "remove the control characters" in await response.text()
        assert claims(run) == {"ada@example.org": account}
        assert run.terminate() == 0
    finally:
        run.kill_everything()


async def test_a_global_signup_rate_beside_the_per_address_one(gateway_factory) -> None:
    config = SIGNUP + "  signup_attempts: 3\n  signup_global_attempts: 5\n  signup_global_window_s: 600\n"
    run: GatewayRun = gateway_factory(count=1, config_text=config)
    run.up()
    try:
        async def attempts(address: str, count: int) -> list[tuple[int, str]]:
            """``count`` sign-ups (with a bad e-mail: nothing is claimed) from loopback ``address``."""
            async with http_session(address) as http:
                token = csrf_of(await (await http.get(run.url + "signup")).text())
                answers = []
                for _ in range(count):
                    async with http.post(run.url + "signup", data={"csrf": token, "name": "Z", "email": "nope"}) as r:
                        answers.append((r.status, await r.text()))
                return answers

        first = await attempts("127.0.0.2", 4)
        assert [s for s, _ in first] == [400, 400, 400, 429], first
        assert "from your address" in first[3][1]
        second = await attempts("127.0.0.3", 3)  # its own first requests: 4 and 5 of the whole form
        assert [s for s, _ in second] == [400, 400, 429], second
        assert "Too many sign-ups at the moment" in second[2][1]
        (third,) = await attempts("127.0.0.4", 1)  # a fresh address: the form is busy for everyone
        assert third[0] == 429 and "Too many sign-ups at the moment" in third[1]
        assert "sign-up refused: the global sign-up rate limit is reached" in run.text()
        assert run.terminate() == 0
    finally:
        run.kill_everything()


@pytest.mark.parametrize("scheme", ["http", "public_url", "tls"])
async def test_session_cookies_are_secure_whenever_participants_use_https(
        scheme: str, gateway_factory, tmp_path: Path) -> None:
    config = SIGNUP + "  event_code: owl-42\n"
    if scheme == "public_url":
        config += "public_url: https://desktops.example.org/\ntls:\n  terminated_by_proxy: true\n"
    elif scheme == "tls":
        cert, key = self_signed(tmp_path)
        config += f"tls:\n  cert: {cert}\n  key: {key}\n"
    run: GatewayRun = gateway_factory(count=1, config_text=config)
    run.up()
    (account,) = run.accounts
    base = run.url.replace("http://", "https://") if scheme == "tls" else run.url
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    try:
        # Cookies are handled by hand: a client keeps Secure cookies away from http, as it should.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                         connector=aiohttp.TCPConnector(ssl=insecure)) as http:
            async with http.get(base + "login") as response:
                page = await response.text()
                set_cookies = response.headers.getall("Set-Cookie")
            (csrf_cookie,) = [c for c in set_cookies if c.startswith("gw_csrf=")]
            async with http.post(base + "login", allow_redirects=False,
                                 headers={"Cookie": csrf_cookie.split(";")[0]},
                                 data={"csrf": csrf_of(page), "account": account.id,
                                       "password": account.password}) as response:
                assert response.status == 303, await response.text()
                (session_cookie,) = [c for c in response.headers.getall("Set-Cookie") if c.startswith("gw_session=")]
        for cookie in (csrf_cookie, session_cookie):
            attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
            assert {"httponly", "samesite"} <= attributes, cookie
            assert ("secure" in attributes) == (scheme != "http"), (scheme, cookie)
        assert run.terminate() == 0
    finally:
        run.kill_everything()
