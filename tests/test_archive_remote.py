"""`gateway archive` packs a workspace that lives on an SSH host, read over SFTP from the project's own
test sshd (tests/ssh_host.py): unpacked with tar, it matches the files; links stay links, a FIFO is
skipped and listed, and the SHA-256 is recorded for the download page."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.model.archive import archive_record
from gateway.model.state import StateStore
from gateway.model.tokens import format_tokens
from tests.ssh_host import SshHost, ssh_accounts, ssh_host  # noqa: F401 - ssh_host is a fixture
from tests.test_archive import make_workspace, tree, without_special

pytestmark = pytest.mark.system


def test_an_ssh_workspace_is_packed_over_sftp_and_matches_the_files(ssh_host: SshHost, tmp_path: Path) -> None:
    accounts = ssh_accounts(2, prefix="ar")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(format_tokens(accounts))
    tokens.chmod(0o600)
    config = tmp_path / "gateway.yaml"
    config.write_text("backend: ssh\n" + ssh_host.config_text())
    state = tmp_path / "state"
    # The first account's workspace on the host (the test sshd serves this machine); the second has none.
    workspace = make_workspace(ssh_host.remote_dir / "workspaces" / accounts[0].id)
    (workspace / "data" / "big.bin").write_bytes(os.urandom(3_000_000))  # several SFTP reads

    logins_before = ssh_host.logins()
    result = subprocess.run([sys.executable, "-m", "gateway", "archive", str(tokens), "--config", str(config),
                             "--state-dir", str(state)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr  # one account has no workspace
    assert f"{accounts[1].id}: no archive: cannot pack its workspace on" in result.stderr
    assert "1 of 2 archives written" in result.stderr
    assert f"skipped {accounts[0].id}/pipe: named pipe" in result.stdout
    assert ssh_host.logins() > logins_before  # read over SSH, not from the local disk

    archive = state / "archives" / f"{accounts[0].id}.tar.gz"
    assert archive.stat().st_mode & 0o777 == 0o600
    out = tmp_path / "unpacked"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(out)], check=True, timeout=60)
    assert tree(out / accounts[0].id) == without_special(tree(workspace))
    assert os.readlink(out / accounts[0].id / "etc-link") == "/etc"

    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    store = StateStore(state / "gateway.db")
    try:
        record = archive_record(store, accounts[0].id)
    finally:
        store.close()
    assert record is not None and record.sha256 == digest and record.files == 4
    assert (state / "archives" / f"{accounts[0].id}.tar.gz.sha256").read_text().startswith(digest)
    assert f"sha256 {digest}" in result.stdout
