"""Shared fixtures: the plugin loaded as Open WebUI loads it, and a driver that calls its hooks as
Open WebUI 0.12.4's utils/filter.py does (keyword body/event, only the parameters in a signature)."""

from __future__ import annotations

import inspect
import json
import os
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.pg"]

REPO = Path(__file__).resolve().parent.parent
PLUGIN_PATH = REPO / "plugin" / "openrouter_usage.py"


def load_plugin_module() -> types.ModuleType:
    """exec the source text into a fresh module, as open_webui/utils/plugin.py does: no __file__."""
    source = PLUGIN_PATH.read_text(encoding="utf-8")
    name = f"function_openrouter_usage_{uuid.uuid4().hex}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, f"<function {name}>", "exec"), module.__dict__)
    return module


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh Open WebUI data directory; no ambient ledger settings leak in."""
    directory = tmp_path / "data"
    directory.mkdir()
    monkeypatch.setenv("DATA_DIR", str(directory))
    monkeypatch.delenv("OPENROUTER_USAGE_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return directory


@pytest.fixture
def plugin(data_dir: Path) -> Iterator[types.ModuleType]:
    module = load_plugin_module()
    yield module
    for writer in list(module._LEDGERS.values()):
        writer.ledger.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, data_dir: Path) -> str:
    """Every ledger test runs on both engines: an SQLite file and a real PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{data_dir / 'ledger.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


class EmitterRecorder:
    """An __event_emitter__ that keeps what it was sent."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    @property
    def statuses(self) -> list[str]:
        return [e["data"]["description"] for e in self.events if e.get("type") == "status"]

    @property
    def notifications(self) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e.get("type") == "notification"]


class HookDriver:
    """Calls the filter's hooks the way Open WebUI 0.12.4 does for one request."""

    def __init__(
        self,
        plugin: types.ModuleType,
        valves: dict[str, Any] | None = None,
        user: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
        user_valves: dict[str, Any] | None = None,
    ) -> None:
        self.plugin = plugin
        self.filter = plugin.Filter()
        self.valves = valves or {}
        self.user = (
            user
            if user is not None
            else {"id": "user-1", "name": "Ada", "email": "ada@example.com", "role": "user"}
        )
        self.user_valves = user_valves or {}
        self.model = model or {"id": "openai/gpt-4o-mini", "urlIdx": 0}

    def _params(self, hook: str, payload: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        self.filter.valves = self.filter.Valves(**self.valves)
        handler = getattr(self.filter, hook)
        signature = inspect.signature(handler)
        params: dict[str, Any] = {"event": payload} if hook == "stream" else {"body": payload}
        params |= {k: v for k, v in extra.items() if k in signature.parameters}
        if "__user__" in params and params["__user__"] and hasattr(self.filter, "UserValves"):
            params["__user__"] = dict(params["__user__"], valves=self.filter.UserValves(**self.user_valves))
        return params

    async def call(self, hook: str, payload: Any, **extra: Any) -> Any:
        """As utils/filter.py::run_filter_handler: await coroutine functions, call the others."""
        handler = getattr(self.filter, hook)
        params = self._params(hook, payload, extra)
        if inspect.iscoroutinefunction(handler):
            return await handler(**params)
        return handler(**params)

    async def run(
        self,
        request_body: dict[str, Any],
        chunks: list[dict[str, Any]] | None,
        outlet_body: dict[str, Any],
        metadata: dict[str, Any],
        emitter: EmitterRecorder | None,
    ) -> dict[str, Any]:
        common = {
            "__id__": "openrouter_usage",
            "__user__": self.user,
            "__metadata__": metadata,
            "__model__": self.model,
            "__request__": None,
            "__event_emitter__": emitter,
            "__event_call__": None,
            "__chat_id__": metadata.get("chat_id"),
            "__message_id__": metadata.get("message_id"),
        }
        body = await self.call("inlet", request_body, **common)
        for chunk in chunks or []:
            await self.call("stream", chunk, **common)
        outlet_common = {k: v for k, v in common.items() if k not in ("__chat_id__", "__message_id__")}
        await self.call("outlet", outlet_body, **outlet_common)
        return body  # type: ignore[no-any-return]


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The data events of an SSE body, as Open WebUI hands them to `stream` (no [DONE], no comments)."""
    events = []
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload and payload != "[DONE]":
                events.append(json.loads(payload))
    return events


@pytest.fixture(scope="session")
def openwebui_python() -> Path:
    """The pinned Open WebUI's interpreter, in a cached venv built on first use."""
    from tests.e2e.owui import DEFAULT_OPENWEBUI_VERSION, ensure_openwebui

    version = os.environ.get("OPENWEBUI_VERSION", DEFAULT_OPENWEBUI_VERSION)
    try:
        return ensure_openwebui(version)
    except Exception as exc:
        message = f"cannot prepare Open WebUI {version}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def never_a_bulk_listing_request() -> Iterator[None]:
    """Across the whole session, no simulator was ever asked for GET …/generations."""
    yield
    from openrouter_sim.server import PATHS_SEEN_BY_ANY_SIMULATOR

    bulk = [path for path in PATHS_SEEN_BY_ANY_SIMULATOR if path.rstrip("/").endswith("/generations")]
    assert not bulk, f"something asked for the non-existent bulk listing: {bulk}"
