"""Bulk sync is deprecated: the valve shows the notice, old interfaces answer it, nothing is requested."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openrouter_sim import OpenRouterSimulator
from scripts.build_manifest import PLUGIN
from tests.factories import EmitterRecorder, HookDriver, load_plugin_module, streamed_turn

NOTICE: dict[str, Any] = {
    "status": "deprecated",
    "message": "Bulk sync has been disabled: OpenRouter has no endpoint that lists past generations.",
    "details": {
        "reason": "GET /api/v1/generations does not exist on the OpenRouter API; only single generations can "
        "be looked up by id.",
        "alternative": "Usage is recorded in real time at every completion; that is the primary method.",
        "impact": "No data loss: real-time tracking continues to work normally.",
    },
    "results": [],
    "total_organizations": 0,
}


@pytest.fixture
def sim() -> Iterator[OpenRouterSimulator]:
    with OpenRouterSimulator() as simulator:
        yield simulator


def test_saving_the_switch_on_stores_the_notice_and_a_valid_off_switch(plugin: types.ModuleType) -> None:
    saved = plugin.Filter.Valves(bulk_sync=True)  # what POST …/valves/update validates
    stored = saved.model_dump(exclude_unset=True)  # … and what it stores
    assert stored["bulk_sync"] is False
    assert "Bulk sync has been disabled" in stored["bulk_sync_notice"]
    assert "GET /api/v1/generations does not exist" in stored["bulk_sync_notice"]
    reloaded = plugin.Filter.Valves(**stored)  # every later hook and save re-validates the stored dict
    assert reloaded.bulk_sync is False and reloaded.bulk_sync_notice == stored["bulk_sync_notice"]
    properties = plugin.Filter.Valves.model_json_schema()["properties"]
    assert properties["bulk_sync"]["title"] == "Bulk sync (deprecated)"
    # What the admin sees after saving: the switch still on until the panel is reopened (Open
    # WebUI keeps its own copy of the form), then off, with the notice.
    assert (
        "it is saved off (this panel still shows it on until you close it)"
        in (properties["bulk_sync"]["description"])
    )
    # The panel shows the notice once: as Markdown in the description, with no text box (docs/contract.md,
    # valves rendering).
    notice = properties["bulk_sync_notice"]
    assert notice["description"].startswith("**Deprecated.** Bulk sync has been disabled")
    assert notice["type"] == "string" and notice["input"]["type"] not in {
        "password",
        "select",
        "color",
        "map",
    }
    assert (
        "click **Custom** beside its title (it turns to **Default**), then **Save**" in notice["description"]
    )


def test_dismissing_the_notice_as_the_panel_does_drops_it(plugin: types.ModuleType) -> None:
    stored = plugin.Filter.Valves(bulk_sync=True).model_dump(exclude_unset=True)
    # Custom → Default sets the field to null; POST …/valves/update drops nulls, validates the rest
    # and stores what was set (docs/contract.md, saving the panel).
    form = {**stored, "bulk_sync_notice": None, "usage_report": ""}
    saved = plugin.Filter.Valves(**{k: v for k, v in form.items() if v is not None})
    assert saved.model_dump(exclude_unset=True) == {"bulk_sync": False}
    notice = plugin.Filter.Valves.model_json_schema()["properties"]["bulk_sync_notice"]
    assert notice["description"] == "Appears here after bulk sync is switched on and saved."


def test_a_second_copy_shows_only_its_own_notice(plugin: types.ModuleType) -> None:
    """Copies installed under other ids share the data directory's settings file, never a notice."""
    plugin.Filter.Valves(bulk_sync=True)  # the first copy's save, remembered in the shared file
    assert "Bulk sync has been disabled" in plugin.SettingsFile().recall()["bulk_sync_notice"]
    second = load_plugin_module()
    notice = second.Filter.Valves.model_json_schema()["properties"]["bulk_sync_notice"]
    assert notice["description"] == "Appears here after bulk sync is switched on and saved."
    first = plugin.Filter.Valves.model_json_schema()["properties"]["bulk_sync_notice"]
    assert first["description"].startswith("**Deprecated.**")


async def test_the_next_admin_chat_gets_the_notice_once_and_users_never(
    plugin: types.ModuleType, data_dir: Path, sim: OpenRouterSimulator
) -> None:
    valves = plugin.Filter.Valves(bulk_sync=True).model_dump(exclude_unset=True)
    valves["database_url"] = f"sqlite:///{data_dir / 'l.sqlite3'}"
    user = HookDriver(plugin, valves=valves, user={"id": "u", "name": "U", "role": "user"})
    user_events = EmitterRecorder()
    await streamed_turn(user, sim, "hi", message_id="m-user", emitter=user_events)
    assert user_events.notifications == []
    admin = HookDriver(plugin, valves=valves, user={"id": "a", "name": "A", "role": "admin"})
    admin_events = EmitterRecorder()
    await streamed_turn(admin, sim, "hi", message_id="m-admin-1", emitter=admin_events)
    await streamed_turn(admin, sim, "again", message_id="m-admin-2", emitter=admin_events)
    (notification,) = admin_events.notifications
    assert notification["type"] == "warning" and NOTICE["message"] in notification["content"]
    # Real-time tracking goes on with the switch on: every completion was recorded.
    assert len(admin_events.statuses) == 2 and len(user_events.statuses) == 1


def test_get_generations_answers_501_without_a_request(
    plugin: types.ModuleType, sim: OpenRouterSimulator
) -> None:
    client = plugin.OpenRouterClient(api_key="sk-or-test", base_url=sim.base_url)
    answer = client.get_generations(date="2026-11-01", limit=100)
    assert answer["status_code"] == 501 and answer["status"] == "deprecated"
    assert answer["error"] == "Bulk sync disabled"
    assert (
        answer["message"] == NOTICE["message"] and answer["alternative"] == NOTICE["details"]["alternative"]
    )
    assert sim.requests == []


def test_sync_openrouter_usage_returns_the_notice(plugin: types.ModuleType) -> None:
    assert plugin.sync_openrouter_usage(date="2026-11-01") == NOTICE
    plugin.sync_openrouter_usage()["results"].append("mutation")  # callers get a copy
    assert plugin.sync_openrouter_usage()["results"] == []


def test_the_cli_sync_prints_the_notice_and_exits_zero(database_url: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "openrouter_usage",
            "sync",
            "--date",
            "2026-11-01",
            "--database-url",
            database_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert json.loads(result.stdout) == NOTICE


def test_the_only_openrouter_endpoints_the_plugin_requests_are_single_lookups() -> None:
    """Bulk sync cannot call a listing endpoint: the plugin's one HTTP client requests only
    /generation?id= (one known id) and /key, and builds no other URL."""
    source = PLUGIN.read_text(encoding="utf-8")
    assert set(re.findall(r"self\._get\(\"([^\"]+)\"", source)) == {"/generation", "/key"}
    assert source.count("self._client.get(") == 1
    for client in ("import urllib", "import http.client", "from urllib", "import requests", "import aiohttp"):
        assert client not in source
