"""Files in and out of a desktop from the viewer (gateway/web/transfer.py), in real Chromium against a real
`gateway up`: a 20 MB upload lands byte-exact in ~/Uploads as the account's own user, a 20 MB file of
~/Downloads comes back byte-exact (and resumes with Range), and nothing outside those folders or of
another account is ever reached, whatever links the participant plants."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

from tests.gateway_run import GatewayRun, running_gateway
from tests.system import chromium_browser
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
