"""The web app's composition, without a running gateway: its routes, the routes token paths may not take,
one account-id pattern, the session key across an upgrade, the shared rate limit, and counts with their nouns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.common.ratelimit import RateLimit
from gateway.model.config import parse_config
from gateway.model.errors import InputError
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot
from gateway.model.tokens import parse_tokens
from gateway.web.app import make_app, reserved_segments
from gateway.web.cockpit import Cockpit, GatewayMetrics
from gateway.web.context import counted, make_templates, noun
from gateway.web.sessions import load_session_key
from gateway.web.thumbnails import ThumbnailService

TOKENS = "ws01 localhost /desktop/ws01 6001 5901 abcdefgh\n"


def full_app(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The app with every part enabled, as `gateway up` makes it."""
    config = parse_config("registration:\n  enabled: true\n")
    slots = {a.id: DesktopSlot(a) for a in parse_tokens(TOKENS, "t.txt").accounts}
    store = StateStore(tmp_path / "state.db")

    async def act(account: str, action: str) -> str:
        return "done"

    async def set_layout(account: str, layout: str) -> None:
        return None

    cockpit = Cockpit(slots=slots, store=store, act=act, metrics=GatewayMetrics(), admin_user="admin",
                      admin_password="admin-secret", thumbnails=ThumbnailService(config.wall, slots, tmp_path),
                      state_dir=tmp_path)
    return make_app(config, slots, novnc=tmp_path, store=store, state_dir=tmp_path, cockpit=cockpit,
                    set_keyboard_layout=set_layout)


def test_reserved_segments_are_the_first_segments_of_every_route_the_app_serves(tmp_path: Path) -> None:
    served = {r.canonical.strip("/").split("/")[0] for r in full_app(tmp_path).router.resources()} - {""}
    assert served == reserved_segments()
    assert {"watch", "files", "dcv", "admin", "static", "novnc", "signup", "view"} <= reserved_segments()


def test_a_websocket_path_on_a_route_of_the_app_is_refused_with_its_line(tmp_path: Path) -> None:
    """``/watch`` was missing from the hand-kept list; the list now comes from the app's route table."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKENS + "ws02 localhost /watch/ws02 6002 5902 abcdefgh\n")
    tokens.chmod(0o600)
    result = subprocess.run([sys.executable, "-m", "gateway", "tokens", "check", str(tokens)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{tokens}:2: websocketpath '/watch/ws02' collides with the gateway's own route /watch" in result.stderr
    tokens.write_text(TOKENS)
    assert subprocess.run([sys.executable, "-m", "gateway", "tokens", "check", str(tokens)],
                          capture_output=True, timeout=60).returncode == 0


@pytest.mark.parametrize("account", [".", "..", ".x"])
def test_an_account_id_starting_with_a_dot_is_refused_in_the_token_file(account: str) -> None:
    with pytest.raises(InputError) as refused:
        parse_tokens(TOKENS + f"{account} localhost /desktop/x 6002 5902 abcdefgh\n", "t.txt")
    (problem,) = refused.value.problems
    assert re.fullmatch(r"t\.txt:2: account .*not starting with \.", str(problem)), str(problem)


@pytest.mark.parametrize("account", [".", "..", ".x", "../ws01"])
async def test_an_account_id_starting_with_a_dot_is_refused_at_sign_in_and_for_archives(
        tmp_path: Path, account: str) -> None:
    async with TestClient(TestServer(full_app(tmp_path))) as client:
        form = await client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', await form.text())[1]  # type: ignore[index]
        signin = await client.post("/login", data={"csrf": csrf, "account": account, "password": "abcdefgh"},
                                   allow_redirects=False)
        assert signin.status == 401
        assert f'value="{account}"' not in await signin.text()  # not echoed as an account
        if "/" not in account and account.strip(".") == "x":  # the client resolves "." and ".." itself
            archive = await client.get(f"/archive/{account}")
            assert archive.status == 404 and "No such archive" in await archive.text()


def test_the_session_key_of_an_older_gateway_raw_bytes_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "web-session.key"
    path.parent.mkdir()
    raw = bytes(range(200, 232))  # 32 random bytes as the old code wrote them (not text)
    path.write_bytes(raw)
    assert load_session_key(tmp_path) == raw
    path.unlink()
    made = load_session_key(tmp_path)
    assert len(made) == 32 and path.read_text().strip() == made.hex()
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_session_key(tmp_path) == made


def test_rate_limit_counts_a_sliding_window_per_key_and_stays_bounded() -> None:
    now = [0.0]
    limit = RateLimit(2, 60.0, max_keys=3, clock=lambda: now[0])
    limit.add("a")
    limit.add("a")
    assert limit.blocked("a") == 60.0 and limit.blocked("b") == 0.0
    now[0] = 30.0
    assert limit.blocked("a") == 30.0
    now[0] = 60.0
    assert limit.blocked("a") == 0.0
    for key in "bcdefg":
        limit.add(key)
    assert len(limit) <= 3


async def test_counts_agree_with_their_nouns(tmp_path: Path) -> None:
    """"1 of 1 desktop ready", "1 item was left out": one filter for every template (the scripts use
    web/static/plural.js, which says it the same way)."""
    async with TestClient(TestServer(full_app(tmp_path))) as client:
        landing = await (await client.get("/")).text()
    summary = re.search(r'<p class="summary" id="summary"[^>]*>(.*?)</p>', landing, re.S)[1]  # type: ignore[index]
    assert " ".join(re.sub(r"<[^>]+>", " ", summary).split()) == "0 of 1 desktop ready"

    def personal_page(skipped: list[str]) -> str:
        archive = {"ready": True, "open": True, "message": "", "url": "archive/ws01", "filename": "ws01.tar.gz",
                   "sha256": "0" * 64, "size": "1 byte", "created": "2026-11-27 18:00", "skipped": skipped}
        return make_templates().get_template("me.html.j2").render(
            title="T", root="./", theme={}, csrf="c", account="ws01", state="queued", reason="", view_url="view/ws01",
            protocol="vnc", dcv_url=None, dcv_file_url=None, note=None, archive=archive)

    assert "1 item was left out" in personal_page(["a"])
    assert "2 items were left out" in personal_page(["a", "b"])
    assert (counted(1, "byte"), counted(0, "byte"), noun(2, "child", "children")) == ("1 byte", "0 bytes", "children")
