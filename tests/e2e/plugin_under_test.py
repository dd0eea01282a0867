"""The plugin inside the running Open WebUI, for the end-to-end modules: installing it as an admin
does, reading its ledger through the admin CLI (as an admin would), and finding the simulator's
record of a completion.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

from scripts.build_manifest import PLUGIN, build_manifest
from tests.e2e.owui import OpenWebUIClient, OpenWebUIServer
from tests.factories import PLUGIN_PATH

FUNCTION_ID = "openrouter_usage"
MODEL = "openai/gpt-4o-mini"


def install(admin: OpenWebUIClient, item: dict[str, Any]) -> None:
    created = admin.create_function(item["id"], item["name"], item["content"], item["meta"])
    assert created["id"] == FUNCTION_ID and created["type"] == "filter"
    state = admin.activate_global(FUNCTION_ID)
    assert state["is_active"] and state["is_global"]
    # The simulator listens on loopback; this makes it count as an OpenRouter connection, so
    # inlet asks it for usage exactly as it would ask openrouter.ai.
    admin.update_valves(FUNCTION_ID, {"openrouter_url_pattern": "openrouter.ai,127.0.0.1"})


@contextlib.contextmanager
def installed_looking_up_at(admin: OpenWebUIClient, simulator: Any, lookup_key: str) -> Iterator[None]:
    """The plugin installed as an admin pastes it, looking its rows up at the simulator with
    `lookup_key` (any key may look any generation up there); deleted afterwards."""
    (item,) = build_manifest(PLUGIN.read_text(encoding="utf-8"))
    install(admin, {**item, "meta": {"description": item["meta"]["description"]}})
    admin.update_valves(
        FUNCTION_ID, {"openrouter_api_key": lookup_key, "openrouter_api_base": simulator.base_url}, merge=True
    )
    yield
    admin.delete_function(FUNCTION_ID)


def run_cli(
    openwebui: OpenWebUIServer, *args: str, env: Mapping[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """The admin CLI of this checkout's plugin file (`python openrouter_usage.py …`, what the
    `openrouter-usage` console script runs; a venv shared between checkouts may point its script
    at another), finding the default SQLite ledger in Open WebUI's DATA_DIR unless `args` name
    another; `env` is added to a scrubbed environment."""
    environment = {**os.environ, "DATA_DIR": str(openwebui.data_dir)}
    for name in ("OPENROUTER_USAGE_DATABASE_URL", "OPENROUTER_API_KEY"):
        environment.pop(name, None)
    return subprocess.run(
        [sys.executable, str(PLUGIN_PATH), *args],
        capture_output=True,
        text=True,
        env=environment | dict(env or {}),
        timeout=120,
        check=check,
    )


def export(openwebui: OpenWebUIServer, *database_url: str, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The ledger, through the admin CLI: the default SQLite file in Open WebUI's DATA_DIR, or
    the ledger at `database_url`. With `missing_ok`, no ledger yet (exit status 2) is no rows."""
    options = ["--database-url", *database_url] if database_url else []
    result = run_cli(openwebui, "export", "--format", "json", *options, check=False)
    if missing_ok and result.returncode == 2 and "no ledger" in result.stderr:
        return []
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def generation_for(simulator: Any, marker: str) -> Any:
    """The simulator's record of the chat completion whose last user message holds `marker`."""
    chats = [
        g
        for g in simulator.generations.values()
        if g.task is None and marker in json.dumps(g.request_body.get("messages", [])[-1:])
    ]
    assert len(chats) == 1, f"expected one completion for {marker!r}, got {len(chats)}"
    return chats[0]


def generations_for(simulator: Any, marker: str) -> list[Any]:
    """The simulator's records of the chat completions (no title, tag or follow-up task) whose
    last USER message holds `marker`, oldest first. That is a turn's first answer and each of its
    continuations: a "Continue response" request ends with the assistant's partial answer, so
    `generation_for`, which reads only the last message, does not see it."""

    def last_user_message(generation: Any) -> Any:
        messages = generation.request_body.get("messages") or []
        return next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)

    chats = [
        g
        for g in simulator.generations.values()
        if g.task is None and marker in json.dumps(last_user_message(g))
    ]
    return sorted(chats, key=lambda g: (g.created_at, g.completed_at))


def usd(row_value: str | None) -> Decimal:
    return Decimal(row_value or "0")


def rows_by_message(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["message_id"]: row for row in rows}


def wait_for_row(openwebui: OpenWebUIServer, message_id: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = rows_by_message(export(openwebui)).get(message_id)
        if row is not None or time.monotonic() > deadline:
            assert row is not None, f"no ledger row for {message_id}"
            return row
        time.sleep(0.2)
