"""An admin saving new code reloads the function: Open WebUI execs the source into a new module,
publishes it as sys.modules["function_<id>"] and drops the old one. A reload must leave nothing
behind: no thread, no engine, no open file (docs/internals.md, "Module state")."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
import types
import weakref
from pathlib import Path
from typing import Any

from tests.factories import HookDriver, load_plugin_module, outlet_body

PUBLISHED = "function_openrouter_usage"  # what Open WebUI 0.12.4 names the newest copy
RELOADS = 5


def publish(module: types.ModuleType) -> None:
    """As utils/plugin.py::set_function_module_in_cache: the new copy replaces the previous."""
    previous = sys.modules.get(PUBLISHED)
    if previous is not None:
        sys.modules.pop(previous.__name__, None)
    sys.modules[PUBLISHED] = module


def retire(published: str) -> None:
    """As deleting the function: the newest copy leaves sys.modules under both its names."""
    module = sys.modules.pop(published, None)
    if module is not None:
        sys.modules.pop(module.__name__, None)


def plugin_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("openrouter_usage")]


def open_files_under(directory: Path) -> list[str]:
    """This process's open file descriptors that point into `directory`."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


def use_every_path(module: types.ModuleType, url: str, index: int) -> None:
    """What a working day does to one copy: a recorded completion (writer thread, engine, files),
    the admin's panel report and a user's read-out (reads off the loop), the one-time notice."""
    driver = HookDriver(
        module,
        valves={"database_url": url, "bulk_sync_notice": f"notice {index}"},
        user={"id": "admin-1", "name": "Admin", "role": "admin"},
    )
    body = outlet_body(
        {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        "hello",
        {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "cost": 0.001},
        message_id=f"m-{index}",
        chat_id="c-1",
    )

    async def emitter(_event: dict[str, Any]) -> None:
        return None

    asyncio.run(driver.call("outlet", body, __metadata__={}, __user__=driver.user, __event_emitter__=emitter))
    assert "Usage report" in str(module.Filter.Valves.model_json_schema())
    module.user_readout({"id": "admin-1"})


def wait_until(condition: Any, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def test_reloads_leave_no_thread_engine_or_open_file(data_dir: Path) -> None:
    url = f"sqlite:///{data_dir / 'ledger.sqlite3'}"
    threads_before = {t.ident for t in threading.enumerate()}
    old_copies: list[weakref.ref[types.ModuleType]] = []
    try:
        for index in range(RELOADS + 1):
            module = load_plugin_module()
            publish(module)
            use_every_path(module, url, index)
            assert plugin_threads(), "the write should have started this copy's writer thread"
            old_copies.append(weakref.ref(module))
            del module
        # Every superseded copy's writer ends at its next idle check; the newest ends when idle.
        newest = old_copies[-1]()
        assert newest is not None
        vars(newest)["WRITER_IDLE_SECONDS"] = 0.2  # not monkeypatch: its undo list would keep the copy alive
        del newest
        assert wait_until(lambda: not plugin_threads()), [t.name for t in plugin_threads()]
        assert wait_until(lambda: not open_files_under(data_dir)), open_files_under(data_dir)
        retire(PUBLISHED)
        gc.collect()
        alive = [ref for ref in old_copies if ref() is not None]
        assert not alive, f"{len(alive)} of {len(old_copies)} copies are still referenced: " + ", ".join(
            type(r).__name__ for ref in alive for r in gc.get_referrers(ref())
        )
        assert {t.ident for t in threading.enumerate()} <= threads_before
    finally:
        retire(PUBLISHED)
