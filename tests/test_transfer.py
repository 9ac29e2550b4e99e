"""Files in and out of a desktop from the viewer (gateway/web/transfer.py), in real Chromium against a real
`gateway up`: a 20 MB upload lands byte-exact in ~/Uploads as the account's own user, a 20 MB file of
~/Downloads comes back byte-exact (and resumes with Range), and nothing outside those folders or of
another account is ever reached, whatever links the participant plants. With ``desktop.users: existing``
(lab accounts this module creates) files are the lab user's too, and the upload quota counts what was
uploaded during the event, however the files were moved since."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import http.cookiejar
import json
import os
import pwd
import secrets
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.backends.desktop_users import kill_user_processes
from gateway.model.tokens import Account
from tests.gateway_run import GatewayRun, make_accounts, running_gateway
from tests.system import chromium_browser, require_program
from tests.test_participant_day import LAPTOP, shot, wait_connected

pytestmark = pytest.mark.system

CONFIG = """\
proxy:
  mode: builtin
transfer:
  max_file_mb: 25
  quota_mb: 45
"""
SIZE = 20_000_000


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[GatewayRun]:
    with running_gateway(tmp_path_factory.mktemp("files"), 2, CONFIG) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium_browser() as launched:
        yield launched


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_upload_and_download_of_20_mb_are_byte_exact_and_owned_by_the_account(run: GatewayRun, browser) -> None:
    account = run.accounts[0]
    user = run.users()[account.id]
    home = run.workspace(account)
    payload = os.urandom(SIZE)
    source = run.tmp / "results 2026.bin"
    source.write_bytes(payload)

    page = browser.new_page(viewport=LAPTOP)
    page.goto(run.url + f"view/{account.id}")
    page.fill("#password", account.password)
    page.click("#connect")
    wait_connected(page)
    page.wait_for_selector("#toggle-files", state="visible", timeout=10000)  # the typed password signed in
    page.click("#toggle-files")
    page.set_input_files("#upload-input", str(source))
    page.wait_for_function("() => document.getElementById('upload-message').dataset.result", timeout=60000)
    assert "results 2026.bin is in ~/Uploads" in page.inner_text("#upload-message")
    landed = home / "Uploads" / "results 2026.bin"
    assert digest(landed.read_bytes()) == digest(payload)
    info = landed.stat()
    assert (info.st_uid, info.st_gid) == (user.uid, user.gid)       # the account's own file
    assert (home / "Uploads").stat().st_uid == user.uid
    # The same name again: a second file, the first one kept.
    page.set_input_files("#upload-input", str(source))
    page.wait_for_function("() => document.getElementById('upload-message').textContent.includes('(1)')", timeout=60000)
    assert (home / "Uploads" / "results 2026 (1).bin").stat().st_size == SIZE
    # A third would pass the quota of 45 MB: refused with a clear message, nothing written.
    page.set_input_files("#upload-input", str(source))
    page.wait_for_function("() => document.getElementById('upload-message').dataset.result === 'error'", timeout=60000)
    assert "quota" in page.inner_text("#upload-message")
    assert sorted(p.name for p in (home / "Uploads").iterdir()) == ["results 2026 (1).bin", "results 2026.bin"]

    # Downloads: a file the desktop saved in ~/Downloads (as its user) comes back byte-exact.
    downloads = home / "Downloads"
    downloads.mkdir(exist_ok=True)
    os.chown(downloads, user.uid, user.gid)
    report = downloads / "report.pdf"
    report.write_bytes(payload[::-1])
    os.chown(report, user.uid, user.gid)
    page.click("#downloads-refresh")
    link = page.locator("#download-list a", has_text="report.pdf")
    link.wait_for()
    assert "20 MB" in page.inner_text("#download-list")
    assert "1 file to download" in page.inner_text("#quota-message")
    shot(page, run, "viewer-files-1366")
    with page.expect_download() as download:
        link.click()
    saved = run.tmp / "downloaded.pdf"
    download.value.save_as(saved)
    assert digest(saved.read_bytes()) == digest(payload[::-1])
    page.close()


def test_links_and_other_accounts_never_reach_outside_the_folders(run: GatewayRun, browser) -> None:
    ws01, ws02 = run.accounts
    users = run.users()
    home, other_home = run.workspace(ws01), run.workspace(ws02)
    secret = os.urandom(4096)
    (other_home / "secret.txt").write_bytes(secret)
    os.chown(other_home / "secret.txt", users[ws02.id].uid, users[ws02.id].gid)
    downloads = home / "Downloads"
    downloads.mkdir(exist_ok=True)
    os.chown(downloads, users[ws01.id].uid, users[ws01.id].gid)
    # What a participant can plant: links out of the folder, a hard link to root's file.
    (downloads / "escape").symlink_to(other_home / "secret.txt")
    (downloads / "shadow").symlink_to("/etc/shadow")
    if os.stat("/etc/passwd").st_dev == os.stat(downloads).st_dev:  # hard links only within one file system
        os.link("/etc/passwd", downloads / "passwd")
    base = run.url + f"files/{ws01.id}/"
    context = browser.new_context()
    http = context.request
    assert http.get(base).status == 401                          # no session, no files
    response = http.post(run.url + "api/session", data={"account": ws01.id, "password": ws01.password},
                         headers={"Content-Type": "application/json"})
    assert response.status == 200
    listed = [f["name"] for f in http.get(base).json()["files"]]
    assert "escape" not in listed and "shadow" not in listed and "passwd" not in listed
    for name in ("escape", "shadow", "passwd", "..%2F..%2Fetc%2Fshadow", "%2Fetc%2Fshadow"):
        response = http.get(base + f"downloads/{name}")
        body = response.body()
        assert response.status in (400, 403, 404), (name, response.status)
        assert secret not in body and b"root:" not in body
    assert http.get(run.url + f"files/{ws02.id}/downloads/secret.txt").status == 403  # another participant's
    assert http.put(run.url + f"files/{ws02.id}/uploads/x.txt", data=b"x").status == 403
    # An Uploads folder that is a link elsewhere is refused; nothing is written there.
    elsewhere = run.tmp / "elsewhere"
    elsewhere.mkdir()
    uploads = home / "Uploads"
    if uploads.exists():
        uploads.rename(home / "Uploads.old")
    uploads.symlink_to(elsewhere)
    response = http.put(base + "uploads/planted.txt", data=b"hello")
    assert response.status == 403 and "not a plain folder" in response.json()["error"]
    assert list(elsewhere.iterdir()) == []
    uploads.unlink()
    # Bad names get a clear message.
    response = http.put(base + "uploads/.bashrc", data=b"x")
    assert response.status == 400 and "file name" in response.json()["error"]
    # A resumed download: Range gives the exact bytes.
    payload = os.urandom(100_000)
    (downloads / "data.bin").write_bytes(payload)
    os.chown(downloads / "data.bin", users[ws01.id].uid, users[ws01.id].gid)
    response = http.get(base + "downloads/data.bin", headers={"Range": "bytes=40000-"})
    assert response.status == 206 and response.body() == payload[40000:]
    assert response.headers["content-range"] == f"bytes 40000-99999/{len(payload)}"
    context.close()


# -- desktop.users: existing ------------------------------------------------------------------------------

LAB_CONFIG = """\
proxy:
  mode: builtin
desktop:
  users: existing
transfer:
  max_file_mb: 0.1
  quota_mb: 0.15
"""


@contextlib.contextmanager
def lab_users(accounts: list[Account]) -> Iterator[None]:
    """A Unix user named like each account (what a lab's accounts are), removed with its home and
    processes afterwards, whatever happened."""
    made = []
    try:
        for account in accounts:
            subprocess.run(["useradd", "--create-home", "--user-group", "--shell", "/bin/bash", account.id],
                           check=True, timeout=30)
            made.append(pwd.getpwnam(account.id))
        yield
    finally:
        for entry in made:
            try:  # in a thread of its own: Playwright's event loop may be running in this one
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    pool.submit(asyncio.run, kill_user_processes(entry.pw_uid)).result()
            finally:
                subprocess.run(["userdel", "--remove", entry.pw_name], check=False, capture_output=True,
                               timeout=30)


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory) -> Iterator[GatewayRun]:
    """`gateway up` with ``desktop.users: existing`` for two lab users (ids unique to this run)."""
    for program in ("useradd", "setpriv"):
        require_program(program)
    accounts = make_accounts(2, prefix=f"tx{secrets.token_hex(3)}")
    with lab_users(accounts), running_gateway(tmp_path_factory.mktemp("lab-files"), len(accounts), LAB_CONFIG,
                                              accounts=accounts) as gateway:
        yield gateway


class Viewer:
    """HTTP as the viewer page speaks it: signed in with ``POST /api/session``, then the file routes."""

    def __init__(self, run: GatewayRun, account: Account) -> None:
        self.base = run.url + f"files/{account.id}/"
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        body = json.dumps({"account": account.id, "password": account.password}).encode()
        status, _ = self.request("POST", run.url + "api/session", body, {"Content-Type": "application/json"})
        assert status == 200

    def request(self, method: str, url: str, data: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
        try:
            with self.opener.open(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def upload(self, name: str, payload: bytes) -> tuple[int, dict]:
        status, body = self.request("PUT", self.base + "uploads/" + urllib.parse.quote(name), payload,
                                    {"Content-Type": "application/octet-stream"})
        return status, json.loads(body)

    def listing(self) -> dict:
        status, body = self.request("GET", self.base)
        assert status == 200, body
        return json.loads(body)


def test_with_existing_lab_users_files_are_the_lab_users_own(lab_run: GatewayRun) -> None:
    account = lab_run.accounts[0]
    user = pwd.getpwnam(account.id)
    home = Path(user.pw_dir)
    viewer = Viewer(lab_run, account)
    payload = os.urandom(90_000)
    status, body = viewer.upload("field notes.txt", payload)
    assert (status, body["name"]) == (201, "field notes.txt"), body
    landed = home / "Uploads" / "field notes.txt"
    assert landed.read_bytes() == payload
    assert (landed.stat().st_uid, landed.stat().st_gid) == (user.pw_uid, user.pw_gid)  # never root's
    assert (home / "Uploads").stat().st_uid == user.pw_uid                           # made for the user

    # ~/Downloads: the user's own file is listed and comes back byte-exact; root's is not offered.
    downloads = home / "Downloads"
    downloads.mkdir()
    os.chown(downloads, user.pw_uid, user.pw_gid)
    report = os.urandom(2_000_000)
    (downloads / "report.pdf").write_bytes(report)
    os.chown(downloads / "report.pdf", user.pw_uid, user.pw_gid)
    (downloads / "root-owned.txt").write_bytes(b"not the participant's")
    assert [f["name"] for f in viewer.listing()["files"]] == ["report.pdf"]
    assert viewer.request("GET", viewer.base + "downloads/report.pdf") == (200, report)
    status, part = viewer.request("GET", viewer.base + "downloads/report.pdf", headers={"Range": "bytes=1500000-"})
    assert (status, part) == (206, report[1_500_000:])
    assert viewer.request("GET", viewer.base + "downloads/root-owned.txt")[0] == 403


def test_the_upload_quota_counts_files_moved_out_of_uploads(lab_run: GatewayRun) -> None:
    """0.15 MB for the event: moving an upload out of ~/Uploads does not make room for another."""
    account = lab_run.accounts[1]
    user = pwd.getpwnam(account.id)
    uploads = Path(user.pw_dir) / "Uploads"
    viewer = Viewer(lab_run, account)
    assert viewer.upload("first.bin", os.urandom(100_000))[0] == 201
    # The participant moves it away, as its desktop would (as the user, not root).
    moved = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
                            "mv", str(uploads / "first.bin"), user.pw_dir], check=False, capture_output=True,
                           timeout=30)
    assert moved.returncode == 0, moved.stderr
    assert list(uploads.iterdir()) == []
    assert viewer.listing()["used"] == 100_000

    status, body = viewer.upload("second.bin", os.urandom(60_000))
    assert status == 413
    assert body["error"] == ("This file (60 KB) is larger than what is left of your upload quota for the event: "
                             "50 KB of 150 KB."), body
    assert list(uploads.iterdir()) == []                                       # nothing written
    assert viewer.upload("second.bin", os.urandom(50_000))[0] == 201           # what is left still fits
    status, body = viewer.upload("third.bin", b"x")
    assert status == 413 and "quota for the event (150 KB) is used up" in body["error"], body
    assert sorted(p.name for p in uploads.iterdir()) == ["second.bin"]
    assert viewer.listing()["used"] == 150_000
