"""Range requests on an archive download, as download managers and `curl -C -` send them.

One real `gateway up` (Xvnc, private Apache in front) for the module; the archive is a real
`gateway archive` of the account's workspace. Every answer is checked byte for byte against the
archive file on disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest

from tests.gateway_run import GatewayRun, make_accounts, processes_mentioning
from tests.system import require_program

pytestmark = pytest.mark.system

CONFIG = """\
archive:
  enabled: true
  available_from: "2000-01-01T00:00:00Z"
  expires: "2100-01-01T00:00:00+00:00"
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayRun]:
    for program in ("Xvnc", "vncpasswd", "apache2", "openbox", "xterm"):
        require_program(program)
    gateway = GatewayRun(tmp_path_factory.mktemp("ranges"), make_accounts(1), CONFIG)
    try:
        gateway.up()
        work = gateway.workspace(gateway.accounts[0]) / "work"
        work.mkdir()
        # Random bytes do not compress: the archive is a few hundred KB, several of aiohttp's chunks.
        (work / "data.bin").write_bytes(os.urandom(400_000))
        pack(gateway)
        yield gateway
        assert gateway.terminate() == 0
        assert processes_mentioning(str(gateway.state_dir)) == []
    finally:
        gateway.kill_everything()


def pack(run: GatewayRun) -> bytes:
    """`gateway archive` for the account, again; returns the new archive's bytes."""
    result = subprocess.run([sys.executable, "-m", "gateway", "archive", str(run.tokens), "--config", str(run.config),
                             "--state-dir", str(run.state_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return archive_bytes(run)


def archive_bytes(run: GatewayRun) -> bytes:
    return (run.state_dir / "archives" / f"{run.accounts[0].id}.tar.gz").read_bytes()


def url(run: GatewayRun) -> str:
    return f"{run.url}archive/{run.accounts[0].id}"


def auth(run: GatewayRun) -> dict[str, str]:
    account = run.accounts[0]
    return {"Authorization": aiohttp.encode_basic_auth(account.id, account.password)}


async def get(run: GatewayRun, **headers: str) -> tuple[int, Mapping[str, str], bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(url(run), headers={**auth(run), **headers}) as response:
            return response.status, response.headers.copy(), await response.read()


async def test_suffix_range_gives_the_last_bytes(run: GatewayRun) -> None:
    whole = archive_bytes(run)
    status, headers, body = await get(run, Range="bytes=-500")
    assert status == 206
    assert headers["Content-Range"] == f"bytes {len(whole) - 500}-{len(whole) - 1}/{len(whole)}"
    assert body == whole[-500:]
    # A suffix longer than the file is the whole file.
    status, headers, body = await get(run, Range=f"bytes=-{len(whole) + 1000}")
    assert status == 206 and body == whole
    assert headers["Content-Range"] == f"bytes 0-{len(whole) - 1}/{len(whole)}"


async def test_multiple_ranges_give_the_whole_file(run: GatewayRun) -> None:
    """Satisfiable ranges are never refused (aiohttp alone answers several ranges with 416): the gateway
    ignores a Range of several ranges and sends the whole file with 200, as RFC 9110 allows
    (gateway/web/participant.py, _ArchiveResponse); never a part, never other bytes."""
    whole = archive_bytes(run)
    wanted = [(0, 99), (1000, 1999), (len(whole) - 10, len(whole) - 1)]
    status, headers, body = await get(run, Range="bytes=" + ",".join(f"{a}-{b}" for a, b in wanted))
    assert status == 200, (status, headers, body[:200])
    assert "Content-Range" not in headers and headers["Content-Type"] == "application/gzip", headers
    assert int(headers["Content-Length"]) == len(whole) and body == whole


async def test_unsatisfiable_range_is_416_without_archive_bytes(run: GatewayRun) -> None:
    whole = archive_bytes(run)
    for wanted in (f"bytes={len(whole)}-", f"bytes={len(whole) + 10}-{len(whole) + 20}"):
        status, headers, body = await get(run, Range=wanted)
        assert status == 416, (wanted, status)
        assert headers.get("Content-Range") == f"bytes */{len(whole)}", (wanted, headers)
        assert whole[:64] not in body and b"\x1f\x8b" not in body


async def test_if_range_with_a_stale_validator_gives_the_whole_new_file(run: GatewayRun) -> None:
    """A download resumed after the archive was packed again must not splice new bytes onto old."""
    old = archive_bytes(run)
    status, headers, _ = await get(run)
    assert status == 200
    old_etag, old_date = headers["ETag"], headers["Last-Modified"]
    # The current validator still resumes.
    status, _, body = await get(run, Range="bytes=100-", **{"If-Range": old_etag})
    assert status == 206 and body == old[100:]

    workspace = run.workspace(run.accounts[0]) / "work"
    (workspace / "later.bin").write_bytes(os.urandom(50_000))
    new = pack(run)
    assert new != old
    status, headers, body = await get(run, Range="bytes=100-", **{"If-Range": old_etag})
    assert status == 200, status
    assert body == new and headers["ETag"] != old_etag
    # A date validator older than the file: the whole file too.
    stale_date = formatdate(0, usegmt=True)
    status, _, body = await get(run, Range="bytes=100-", **{"If-Range": stale_date})
    assert status == 200 and body == new
    assert old_date  # the first answer carried a date validator as well


def test_curl_resumes_a_broken_download_to_the_whole_file(run: GatewayRun, tmp_path: Path) -> None:
    """`curl -C -` (the command the README gives participants) on a partial file."""
    curl = require_program("curl")
    whole = archive_bytes(run)
    account = run.accounts[0]
    partial = tmp_path / "archive.tar.gz"
    partial.write_bytes(whole[:len(whole) // 3])
    netrc = tmp_path / "netrc"  # the password stays off the command line
    netrc.write_text(f"machine 127.0.0.1 login {account.id} password {account.password}\n")
    netrc.chmod(0o600)
    result = subprocess.run([curl, "--fail", "--silent", "--show-error", "--netrc-file", str(netrc),
                             "-C", "-", "-o", str(partial), "-D", str(tmp_path / "headers"), url(run)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    headers = (tmp_path / "headers").read_text()
    assert headers.startswith("HTTP/1.1 206"), headers  # it resumed, not downloaded again
    assert partial.read_bytes() == whole
    digest = re.search(r"^X-Archive-SHA256: ([0-9a-f]{64})", headers, re.MULTILINE | re.IGNORECASE)
    assert digest and digest.group(1) == hashlib.sha256(partial.read_bytes()).hexdigest()
