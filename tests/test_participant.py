"""Sign-up, sign-in and archive downloads through a real `gateway up` (Xvnc, Apache), over real HTTP."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sqlite3
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.model.config import parse_config
from gateway.web.participant import archive_window
from gateway.web.terms import render_markdown
from tests.gateway_run import GatewayRun, processes_mentioning
from tests.test_archive import tree

pytestmark = pytest.mark.system

CONFIG = """\
registration:
  enabled: true
  documents: [terms.md, privacy.md]
  signup_attempts: 12
  signin_failures: 6
archive:
  enabled: true
  available_from: "2000-01-01T00:00:00Z"
  expires: "2100-01-01T00:00:00+00:00"
"""

TERMS = "# Terms of use\n\nBe kind. <script>alert('x')</script>\n\n[click](javascript:alert(1))\n"
PRIVACY = "# Privacy notice\n\nWe keep your e-mail until the event ends.\n"


def fill_workspace(root: Path, seed: bytes) -> Path:
    """The test's files, in a subfolder (the desktop session writes its own files beside it)."""
    work = root / "work"
    (work / "results").mkdir(parents=True)
    (work / "notes.txt").write_bytes(b"notes of " + seed)
    (work / "results" / "big.bin").write_bytes(os.urandom(3_000_000) + seed)
    (work / "etc").symlink_to("/etc")
    os.mkfifo(work / "pipe")
    return work


def gateway_cli(run: GatewayRun, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(run.config),
                           "--state-dir", str(run.state_dir)], capture_output=True, text=True, timeout=120)


def basic(account: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(account, password)}


def raw_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """A GET with the path sent exactly as given (no client-side normalisation)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


def session() -> aiohttp.ClientSession:
    # unsafe: keep cookies from an IP address (127.0.0.1); no redirects followed unless asked.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def test_archives_download_only_to_their_owner_resume_and_equal_the_workspace(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=3, config_text=CONFIG)
    (run.tmp / "terms.md").write_text(TERMS)
    (run.tmp / "privacy.md").write_text(PRIVACY)
    run.up()
    ws01, ws02, ws03 = run.accounts
    try:
        workspaces = {a.id: run.workspace(a) for a in (ws01, ws02)}
        work = {name: fill_workspace(path, name.encode()) for name, path in workspaces.items()}

        result = subprocess.run(
            [sys.executable, "-m", "gateway", "archive", str(run.tokens), "--accounts", "ws01,ws02",
             "--config", str(run.config), "--state-dir", str(run.state_dir)],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "skipped ws01/work/pipe: named pipe" in result.stdout
        assert "2 of 2 archives written" in result.stderr
        archive_files = {n: run.state_dir / "archives" / f"{n}.tar.gz" for n in workspaces}
        for path in archive_files.values():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600

        base = run.url
        right = basic(ws01.id, ws01.password)
        async with session() as http:
            async with http.get(base + "archive/ws01", headers=right) as response:
                assert response.status == 200, await response.text()
                body = await response.read()
                headers = response.headers
            assert body == archive_files["ws01"].read_bytes()
            digest = hashlib.sha256(body).hexdigest()
            assert headers["X-Archive-SHA256"] == digest
            assert headers["Content-Type"] == "application/gzip"
            assert "Content-Encoding" not in headers
            assert headers["Accept-Ranges"] == "bytes"
            assert 'filename="ws01.tar.gz"' in headers["Content-Disposition"]

            # Unpacked, it is the workspace: files, folders, and the link to /etc as a link.
            unpacked = run.tmp / "unpacked"
            unpacked.mkdir()
            (run.tmp / "got.tar.gz").write_bytes(body)
            subprocess.run(["tar", "-xzf", str(run.tmp / "got.tar.gz"), "-C", str(unpacked)], check=True)
            expected = {k: v for k, v in tree(work["ws01"]).items() if k != "pipe"}
            assert tree(unpacked / "ws01" / "work") == expected
            assert os.readlink(unpacked / "ws01" / "work" / "etc") == "/etc"
            with tarfile.open(run.tmp / "got.tar.gz") as tar:
                assert tar.getmember("ws01/work/etc").issym()

            # A broken download resumes with Range to identical bytes.
            cut = len(body) // 3
            async with http.get(base + "archive/ws01",
                                headers={**right, "Range": f"bytes={cut}-", "If-Range": headers["ETag"]}) as response:
                assert response.status == 206
                rest = await response.read()
                assert response.headers["Content-Range"] == f"bytes {cut}-{len(body) - 1}/{len(body)}"
            assert body[:cut] + rest == body
            assert hashlib.sha256(body[:cut] + rest).hexdigest() == digest

            # Other credentials: never a byte of it.
            gzip_magic = b"\x1f\x8b"
            cases = [
                (basic(ws02.id, ws02.password), 403),     # another participant
                (basic(ws01.id, "wrong-password"), 401),  # wrong password
                (basic("nobody", ws01.password), 401),     # no such account
                ({}, 401),                                 # no credentials
            ]
            for auth, status in cases:
                async with http.get(base + "archive/ws01", headers={**auth, "Range": "bytes=0-"}) as response:
                    data = await response.read()
                    assert response.status == status, (auth, data)
                    assert gzip_magic not in data and body[100:200] not in data
                    if status == 401:
                        assert response.headers["WWW-Authenticate"].startswith("Basic")

            # Path tricks with ws01's own credentials never reach ws02's archive.
            other = archive_files["ws02"].read_bytes()
            for path in ("/archive/..%2Fws02", "/archive/ws01%2F..%2Fws02", "/archive/ws01/../ws02",
                         "/archive/%2e%2e/archives/ws02.tar.gz", "/archive/ws02.tar.gz",
                         "/archive/ws01%00", "/archive/../archives/ws02.tar.gz"):
                status, data = raw_get(run.listen_port, path, right)
                assert status in (400, 403, 404), (path, status)
                assert gzip_magic not in data and other[100:200] not in data, path
            # Apache resolves "/archive/.." to "/" (the landing page): still no archive.
            status, data = raw_get(run.listen_port, "/archive/..", right)
            assert gzip_magic not in data and b"data-account=" in data

            # Signed in with the form, the page offers the archive; the cookie opens only ws01's.
            page = await (await http.get(base + "login")).text()
            async with http.post(base + "login", allow_redirects=False,
                                 data={"csrf": csrf_of(page), "account": ws01.id, "password": ws01.password}) as response:
                assert response.status == 303 and response.headers["Location"] == "me"
                cookie = response.headers["Set-Cookie"]
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            me = await (await http.get(base + "me")).text()
            assert 'href="./archive/ws01"' in me and digest in me and ws01.password not in me
            async with http.get(base + "archive/ws01") as response:
                assert response.status == 200 and await response.read() == body
            async with http.get(base + "archive/ws02") as response:
                assert response.status == 403 and other[:200] not in await response.read()
            page = await (await http.get(base + "me")).text()
            async with http.post(base + "logout", data={"csrf": csrf_of(page)}, allow_redirects=False) as response:
                assert response.status == 303
            async with http.get(base + "me", allow_redirects=False) as response:
                assert response.status == 303 and response.headers["Location"] == "login"

            # Failed sign-ins are rate-limited per address; a forged X-Forwarded-For doesn't help.
            statuses = []
            for _ in range(10):
                async with http.get(base + "archive/ws01", headers={
                        **basic(ws01.id, "nope-nope"), "X-Forwarded-For": f"10.0.0.{len(statuses)}"}) as response:
                    statuses.append(response.status)
            # Limit 6 per account and address: one failure for ws01 above, five here, then refused.
            assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}, statuses
            async with http.get(base + "archive/ws01", headers=right) as response:
                assert response.status == 429 and "Retry-After" in response.headers
            # Another participant in the same room (the same address behind the venue's NAT) is not locked out.
            async with http.get(base + "archive/ws02", headers=basic(ws02.id, ws02.password)) as response:
                assert response.status != 429, response.status
        assert run.terminate() == 0
        assert processes_mentioning(str(run.state_dir)) == []
    finally:
        run.kill_everything()


async def test_signup_hands_out_accounts_records_acceptance_and_checks_csrf(gateway_factory) -> None:
    run: GatewayRun = gateway_factory(count=3, config_text=CONFIG)
    (run.tmp / "terms.md").write_text(TERMS)
    (run.tmp / "privacy.md").write_text(PRIVACY)
    run.up()
    passwords = {a.id: a.password for a in run.accounts}
    base = run.url
    started = time.time()
    try:
        async with session() as http:
            form = await (await http.get(base + "signup")).text()
            assert "Terms of use" in form and "Privacy notice" in form
            assert "<script>" not in form and "&lt;script&gt;" in form
            assert 'href="javascript:' not in form
            token = csrf_of(form)
            accept = {"accept-0": "yes", "accept-1": "yes"}

            async def sign_up(email: str, **extra: str) -> tuple[int, str]:
                data = {"csrf": token, "name": "Ada Lovelace", "email": email, **accept, **extra}
                async with http.post(base + "signup", data=data) as response:
                    return response.status, await response.text()

            def shown_account(page: str) -> tuple[str, str]:
                account = re.search(r'id="account">([^<]+)<', page)
                password = re.search(r'id="password">([^<]+)<', page)
                assert account and password, page
                return account.group(1), password.group(1)

            status, page = await sign_up("ada@example.org")
            assert status == 200, page
            first, first_pw = shown_account(page)
            assert passwords[first] == first_pw and 'href="./view/' + first + '"' in page
            status, page = await sign_up("grace@example.org")
            second, second_pw = shown_account(page)
            assert second != first and passwords[second] == second_pw
            status, page = await sign_up("  ADA@Example.org ")  # the same e-mail, typed differently
            assert status == 200 and "already have an account" in page and f'id="account">{first}<' in page
            assert first_pw not in page and 'id="password"' not in page  # a password is shown once

            # No CSRF token, a forged one, or one from another browser (cookie): refused.
            async with http.post(base + "signup", data={"name": "Eve", "email": "eve@example.org", **accept}) as r:
                assert r.status == 403
            status, page = await sign_up("eve@example.org", csrf=token[:-2] + "xx")
            assert status == 403
            async with session() as stranger:
                async with stranger.post(base + "signup", data={"csrf": token, "name": "Eve",
                                                                "email": "eve@example.org", **accept}) as r:
                    assert r.status == 403
            # Terms not accepted, a bad e-mail, an over-long name: the form again, nothing claimed.
            status, page = await sign_up("eve@example.org", **{"accept-1": ""})
            assert status == 400 and "Privacy notice" in page
            status, page = await sign_up("not-an-address")
            assert status == 400
            status, page = await sign_up("eve@example.org", name="x" * 5000)
            assert status == 400

            status, page = await sign_up("lin@example.org")
            third, _ = shown_account(page)
            assert len({first, second, third}) == 3
            status, page = await sign_up("late@example.org")
            assert status == 409 and "every account has been given out" in page

            # Per-address rate limit: 12 failed sign-ups in the window. The three refused above count, the
            # sign-ups that worked do not (a room behind one NAT is one address); a forged address doesn't help.
            statuses = []
            for i in range(10):
                async with http.post(base + "signup", headers={"X-Forwarded-For": f"10.1.0.{i}"},
                                     data={"csrf": token, "name": "Z", "email": "not-an-address", **accept}) as r:
                    statuses.append(r.status)
            assert statuses == [400] * 9 + [429], statuses
        finished = time.time()

        with sqlite3.connect(run.state_dir / "gateway.db") as db:
            claims = dict(db.execute("SELECT email, account FROM claims").fetchall())
            acceptances = db.execute("SELECT account, email, document, accepted_at FROM acceptances").fetchall()
        assert claims == {"ada@example.org": first, "grace@example.org": second, "lin@example.org": third}
        assert {(a, d) for a, _, d, _ in acceptances} == {
            (acc, doc) for acc in (first, second, third) for doc in ("Terms of use", "Privacy notice")}
        assert len(acceptances) == 8  # ada accepted twice
        assert all(started <= at <= finished for *_, at in acceptances)

        listed = gateway_cli(run, "accounts", "list")
        assert listed.returncode == 0 and "ada@example.org" in listed.stdout and first in listed.stdout
        assert not any(p in listed.stdout for p in passwords.values())
        exported = gateway_cli(run, "accounts", "export", "--csv")
        assert exported.stdout.splitlines()[0] == "account,email,name,claimed_at,address,accepted"
        assert "Terms of use" in exported.stdout and len(exported.stdout.splitlines()) == 4
        released = gateway_cli(run, "accounts", "release", first)
        assert released.returncode == 0, released.stderr
        assert "ada@example.org" not in gateway_cli(run, "accounts", "list").stdout
        assert gateway_cli(run, "accounts", "release", first).returncode == 2
        assert run.terminate() == 0
        assert processes_mentioning(str(run.state_dir)) == []
    finally:
        run.kill_everything()


def test_archive_window_and_markdown_are_safe() -> None:
    early = parse_config('archive:\n  enabled: true\n  available_from: "2999-01-01T00:00:00Z"\n')
    late = parse_config('archive:\n  enabled: true\n  expires: "2001-01-01T00:00:00Z"\n')
    assert (archive_window(early).open, archive_window(early).status) == (False, 403)
    assert (archive_window(late).open, archive_window(late).status) == (False, 410)
    assert archive_window(parse_config("")).open
    html = render_markdown("# T\n\n<img src=x onerror=alert(1)> [a](javascript:alert(1))")
    assert "<img" not in html and 'href="javascript:' not in html and "<h1>T</h1>" in html
