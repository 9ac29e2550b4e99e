"""The supervisor without real desktops: typed commands reach the backend only through the watcher,
adoption keeps what it could not stop, and broken state or backends end `gateway` in one line."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.backends.base import Backend, BackendError, DesktopState, PollResult, Status
from gateway.cli.main import main
from gateway.model.actions import Action
from gateway.model.config import load_config
from gateway.model.state import StateStore
from gateway.model.status import DesktopSlot, Endpoint, Phase
from gateway.model.tokens import Account, format_tokens
from gateway.proxies.base import ProxyMode, RunningProxy
from gateway.supervisor.commands import Command, DesktopCommands
from gateway.supervisor.recover import recover
from gateway.supervisor.watcher import AccountWatcher, EventContext
from gateway.web.cockpit import GatewayMetrics


class FakeBackend(Backend):
    """Records every call; its desktops are "dcv" so no websocket proxy is started for them."""

    name = "fake"

    def __init__(self, *, stop_fails: bool = False, open_fails: bool = False) -> None:
        self.calls: list[tuple[str, object]] = []
        self.stop_fails = stop_fails
        self.open_fails = open_fails

    async def open(self, accounts: Sequence[Account]) -> None:
        if self.open_fails:
            raise BackendError("the scheduler does not answer")

    async def start(self, account: Account) -> DesktopState:
        self.calls.append(("start", account.id))
        return {"desktop": account.id}

    async def poll(self, account: Account, state: DesktopState) -> PollResult:
        return PollResult(Status.RUNNING, Endpoint("127.0.0.1", 1))

    async def prove_ready(self, account: Account, state: DesktopState, endpoint: Endpoint) -> None:
        return None

    def protocol(self, state: DesktopState) -> str:
        return "dcv"

    async def stop(self, account: Account, state: DesktopState) -> None:
        self.calls.append(("stop", account.id))
        if self.stop_fails:
            raise BackendError("the host is unreachable")

    async def set_keyboard_layout(self, account: Account, state: DesktopState, layout: str) -> None:
        if layout == "xx":
            raise BackendError("no such layout")
        self.calls.append(("keyboard", layout))

    async def notify(self, account: Account, state: DesktopState, text: str) -> None:
        self.calls.append(("notify", text))


class NoProxies(ProxyMode):
    name = "none"

    def routes(self, accounts: Sequence[Account]) -> list:  # type: ignore[type-arg]
        return []

    async def start(self, account: Account, endpoint: Endpoint) -> RunningProxy:
        raise AssertionError("dcv desktops need no websocket proxy")


def account(name: str = "a1") -> Account:
    return Account(name, "localhost", f"/{name}", 6001, 5901, "secret1", 1)


async def wait_for(check: object, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_keyboard_layout_and_notices_go_through_the_watcher(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "gateway.db")
    backend = FakeBackend()
    slots = {"a1": DesktopSlot(account(), backend="fake")}
    context = EventContext(load_config(None), slots, store, NoProxies(), GatewayMetrics(),
                           start_limit=asyncio.Semaphore(1), changed=asyncio.Event())
    watcher = AccountWatcher(context, account(), backend, None)
    commands = DesktopCommands({"a1": watcher.commands}, slots)
    with pytest.raises(BackendError, match="not running"):  # refused before the desktop is ready
        await commands.set_keyboard_layout("a1", "de")
    task = asyncio.create_task(watcher.run())
    try:
        await wait_for(lambda: slots["a1"].phase is Phase.READY)
        await commands.set_keyboard_layout("a1", "de")
        assert slots["a1"].keyboard_layout == "de"
        with pytest.raises(BackendError, match="no such layout"):
            await commands.set_keyboard_layout("a1", "xx")
        await commands.notify("a1", "hello")
        assert ("keyboard", "de") in backend.calls and ("notify", "hello") in backend.calls
        with pytest.raises(LookupError):
            await commands.act("a1", "extend")  # needs a payload: only through DesktopCommands.extend
        assert await commands.act("a1", "stop") == "stop requested"
        await wait_for(lambda: slots["a1"].phase is Phase.STOPPED)
        assert ("stop", "a1") in backend.calls
        # A stopped desktop takes no notices; the caller hears why, nothing is raised.
        await commands.notify("a1", "anyone there?")
        assert ("notify", "anyone there?") not in backend.calls
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()


async def test_a_command_that_is_refused_tells_its_caller() -> None:
    command = Command(Action.KEYBOARD_LAYOUT, "de")
    command.refuse("the desktop is failed")
    with pytest.raises(BackendError, match="failed"):
        await command.done
    assert not Action.STOP.awaited and Action.NOTIFY.awaited


async def test_adoption_keeps_the_record_of_a_desktop_it_could_not_stop(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "gateway.db")
    try:
        store.save_desktop("gone", "fake", {"desktop": "gone"})
        backend = FakeBackend(stop_fails=True)
        recovery = await recover(store, {"fake": backend}.get, wanted={})
        assert recovery.not_stopped == {"gone": "the host is unreachable"}
        assert "gone" in store.desktops()  # the next `up` or `down` tries again
        backend.stop_fails = False
        recovery = await recover(store, {"fake": backend}.get, wanted={})
        assert recovery.stopped == 1 and "gone" not in store.desktops()
    finally:
        store.close()


@pytest.mark.parametrize("damage", ["future", "corrupt"])
def test_a_state_database_it_cannot_use_is_one_line_and_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    db = tmp_path / "gateway.db"
    if damage == "future":
        connection = sqlite3.connect(db)
        connection.execute("PRAGMA user_version = 999")
        connection.close()
    else:
        db.write_bytes(b"this is not a database\n" * 200)
    assert main(["down", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gateway: error: "), err
    assert ("newer gateway" if damage == "future" else "state database") in err[0]


def test_a_backend_whose_open_fails_is_one_line_and_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.cli.lifecycle as lifecycle
    import gateway.supervisor.gateway as supervisor

    monkeypatch.setattr(lifecycle, "preflight", lambda config, tokens: None)
    monkeypatch.setattr(lifecycle, "check_users", lambda *args: None)
    monkeypatch.setattr(supervisor, "make_backends", lambda *args: {"local": FakeBackend(open_fails=True)})
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(format_tokens([account()]))
    tokens.chmod(0o600)
    with socket.socket() as probe:  # a port that is free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handlers = list(logging.getLogger().handlers)
    try:
        status = main(["up", str(tokens), "--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}"])
    finally:  # `up` logs to the state dir's gateway.log: not beyond this test
        for handler in set(logging.getLogger().handlers) - set(handlers):
            logging.getLogger().removeHandler(handler)
            handler.close()
    output = capsys.readouterr().err
    err = [line for line in output.splitlines() if line.startswith("gateway: error:")]
    assert status == 2
    assert err == ["gateway: error: backend local: the scheduler does not answer"]
    assert "Traceback" not in output


def test_down_that_cannot_stop_a_leftover_desktop_keeps_it_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.cli.lifecycle as lifecycle

    store = StateStore(tmp_path / "gateway.db")
    store.save_desktop("a1", "fake", {"desktop": "a1"})
    store.close()
    monkeypatch.setattr(lifecycle, "make_backend", lambda *args: FakeBackend(stop_fails=True))
    assert main(["down", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "gateway: error: could not stop the desktop of a1: the host is unreachable" in err
    store = StateStore(tmp_path / "gateway.db")
    try:
        assert "a1" in store.desktops()
    finally:
        store.close()


async def test_an_account_whose_earlier_desktop_could_not_be_stopped_gets_no_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The account moved to another backend, and its old desktop can't be stopped (its host is down): a
    new desktop would overwrite the old one's record, which would then run on unseen. It is held instead."""
    import gateway.supervisor.gateway as supervisor
    from gateway.model.tokens import TokenFile

    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    store = StateStore(state_dir / "gateway.db")
    store.save_desktop("a1", "old", {"desktop": "a1"})
    store.close()
    old, new = FakeBackend(stop_fails=True), FakeBackend()
    monkeypatch.setattr(supervisor, "make_backends", lambda *args: {"local": new, "old": old})
    defaults = load_config(None)
    config = replace(defaults, apache=replace(defaults.apache, mode="none"), proxy=replace(defaults.proxy, mode="builtin"))
    accounts = [account("a1"), account("a2")]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gateway = supervisor.Gateway(TokenFile(str(tmp_path / "tokens.txt"), tuple(accounts)), config,
                                 supervisor.GatewayOptions(state_dir, f"127.0.0.1:{port}"))
    stop = asyncio.Event()
    running = asyncio.create_task(gateway.run(stop))
    try:
        await wait_for(lambda: gateway.slots["a2"].phase is Phase.READY, timeout_s=15)
        held = gateway.slots["a1"]
        assert held.phase is Phase.FAILED and "could not be stopped (the host is unreachable)" in held.reason
        assert ("start", "a1") not in new.calls and ("start", "a2") in new.calls
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
    store = StateStore(state_dir / "gateway.db")
    try:  # the old desktop is still on record, under its own backend: `gateway down` tries again
        assert store.desktops()["a1"].backend == "old"
    finally:
        store.close()
