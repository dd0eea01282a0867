"""Smoke test of the e2e harness itself, with a tiny inline filter instead of the real plugin.

It proves: a function can be installed (create + activate/global, and the admin Import path),
a browser-style chat is saved with the filter's status in ``statusHistory``, API calls
(streaming and not) run the filter, and the simulator sees the chat and task-model requests.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.owui import OpenWebUIClient, OpenWebUIServer, eventually

pytestmark = pytest.mark.e2e

MODEL = "openai/gpt-4o-mini"

# Every hook call appends one JSON line to $DATA_DIR/<id>.jsonl: this also proves that a
# function sees the server's DATA_DIR, where the real plugin keeps its ledger.
PROBE_SOURCE = '''"""
title: E2E Probe
author: openrouter-usage tests
version: 0.0.1
"""

import json
import os

from pydantic import BaseModel, Field


class Filter:
    class Valves(BaseModel):
        priority: int = Field(default=0, description="Filter order")
        label: str = Field(default="probe", description="Prefix of the status line")

    class UserValves(BaseModel):
        shout: bool = Field(default=False, description="Upper-case the status line")

    def __init__(self):
        self.valves = self.Valves()

    def _log(self, fid, hook, **fields):
        path = os.path.join(os.environ["DATA_DIR"], f"{fid}.jsonl")
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"hook": hook, **fields}) + "\\n")

    async def inlet(self, body, __id__=None, __metadata__=None, __chat_id__=None, __message_id__=None):
        __metadata__["probe_chunks"] = 0
        body["usage"] = {"include": True}
        self._log(__id__, "inlet", chat_id=__chat_id__, message_id=__message_id__)
        return body

    async def stream(self, event, __metadata__=None):
        __metadata__["probe_chunks"] = __metadata__.get("probe_chunks", 0) + 1
        return event

    async def outlet(self, body, __id__=None, __user__=None, __metadata__=None, __event_emitter__=None):
        chunks = (__metadata__ or {}).get("probe_chunks")
        text = f"{self.valves.label}: chunks={chunks}"
        if __user__ and getattr(__user__.get("valves"), "shout", False):
            text = text.upper()
        self._log(
            __id__,
            "outlet",
            chat_id=body.get("chat_id"),
            message_id=body.get("id"),
            has_emitter=__event_emitter__ is not None,
            chunks=chunks,
        )
        if __event_emitter__ is not None:
            await __event_emitter__({"type": "status", "data": {"description": text, "done": True}})
        return body
'''


def probe_log(server: OpenWebUIServer, function_id: str) -> list[dict[str, Any]]:
    path = server.data_dir / f"{function_id}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def probe(admin: OpenWebUIClient) -> Iterator[str]:
    function_id = f"e2e_probe_{uuid.uuid4().hex[:8]}"
    created = admin.create_function(function_id, "E2E Probe", PROBE_SOURCE, {"description": "harness probe"})
    assert created["id"] == function_id
    assert created["type"] == "filter"
    state = admin.activate_global(function_id)
    assert state["is_active"] and state["is_global"]
    # Flipping is idempotent from the caller's side: a second call must not turn anything off.
    assert admin.activate_global(function_id)["is_global"]
    yield function_id
    admin.delete_function(function_id)  # leave the server to the tests of the real plugin


def test_valves_roundtrip(admin: OpenWebUIClient, probe: str) -> None:
    spec = admin.get_valves_spec(probe)
    assert spec is not None and {"priority", "label"} <= set(spec["properties"])
    assert admin.update_valves(probe, {"label": "probe"}) == {"label": "probe"}
    assert admin.update_valves(probe, {"priority": 0}, merge=True) == {"label": "probe", "priority": 0}
    assert admin.get_valves(probe) == {"label": "probe", "priority": 0}
    user_spec = admin.get_user_valves_spec(probe)
    assert user_spec is not None and "shout" in user_spec["properties"]
    assert admin.update_user_valves(probe, {"shout": False}) == {"shout": False}


def test_browser_chat_saves_status(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, probe: str
) -> None:
    simulator.clear()
    chat_id, message_id = admin.browser_chat(MODEL, "Hello there [sim:shape=B]")

    message = admin.get_message(chat_id, message_id)
    assert message is not None and message["done"] is True and not message.get("error")
    assert message["content"].strip()
    descriptions = [s.get("description") for s in message.get("statusHistory", [])]
    assert any(d and d.startswith("probe: chunks=") for d in descriptions), descriptions

    # Second turn in the same chat, threaded under the first answer.
    _, second_id = admin.browser_chat(MODEL, "And again [sim:shape=C]", chat_id=chat_id)
    history = admin.get_chat(chat_id)["chat"]["history"]
    second = history["messages"][second_id]
    user_turn = history["messages"][second["parentId"]]
    assert user_turn["role"] == "user" and user_turn["parentId"] == message_id
    assert history["currentId"] == second_id
    assert any(s.get("description", "").startswith("probe:") for s in second.get("statusHistory", []))

    outlets = [e for e in probe_log(openwebui, probe) if e["hook"] == "outlet" and e["chat_id"] == chat_id]
    assert {e["message_id"] for e in outlets} == {message_id, second_id}
    assert all(e["has_emitter"] and e["chunks"] for e in outlets)

    # The simulator saw both user turns (with the key the inlet added) and the task-model calls,
    # which never pass through filters and may land after the answer is saved.
    chats = [r for r in simulator.requests if r.path.endswith("/chat/completions") and r.task is None]
    assert len(chats) == 2
    assert all(r.body.get("usage") == {"include": True} for r in chats)
    assert chats[1].body["messages"][-1]["content"].startswith("And again")

    def task_kinds() -> set[str] | None:
        kinds = {r.task for r in simulator.requests if r.task}
        return kinds if kinds >= {"title", "tags", "follow_ups"} else None

    eventually(task_kinds, what="title, tags and follow-up requests")
    title_requests = [r for r in simulator.requests if r.task == "title"]
    assert len(title_requests) == 1, "a title only for the chat's first turn"

    def saved_title() -> str | None:
        title = str(admin.get_chat(chat_id)["title"])
        return title if title != "New Chat" else None

    eventually(saved_title, what="the generated title to be saved")


def test_browser_chat_precreated(admin: OpenWebUIClient, probe: str) -> None:
    chat_id, message_id = admin.browser_chat(MODEL, "Pre-created chat", precreate=True)
    message = admin.get_message(chat_id, message_id)
    assert message is not None and message["done"] and message["content"].strip()
    assert any(s.get("description", "").startswith("probe:") for s in message.get("statusHistory", []))


def test_api_calls_run_filter(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, probe: str
) -> None:
    simulator.clear()
    before = len(probe_log(openwebui, probe))
    messages = [{"role": "user", "content": "Streaming API call"}]

    streamed = admin.chat_completion(MODEL, messages, stream=True)
    assert streamed.done and streamed.content.strip()
    assert streamed.usage_events, "the final usage chunk reaches API clients"

    plain = admin.chat_completion(MODEL, [{"role": "user", "content": "Plain API call"}], stream=False)
    assert plain["choices"][0]["message"]["content"].strip()

    # API calls: no chat, no event emitter in outlet, stream hook only for the streaming call.
    def api_outlets() -> list[dict[str, Any]] | None:
        found = [e for e in probe_log(openwebui, probe)[before:] if e["hook"] == "outlet"]
        return found if len(found) >= 2 else None

    entries = eventually(api_outlets, what="both API outlets")
    assert all(not e["chat_id"] and not e["has_emitter"] for e in entries)
    assert sorted(bool(e["chunks"]) for e in entries) == [False, True]
    sent = [r for r in simulator.requests if r.path.endswith("/chat/completions")]
    assert len(sent) == 2 and all(r.task is None for r in sent)


def test_chat_completed_legacy_reruns_outlet(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, probe: str
) -> None:
    session_id = f"e2e-{uuid.uuid4().hex[:12]}"
    chat_id, message_id = admin.browser_chat(MODEL, "Legacy completed", session_id=session_id)
    message = admin.get_message(chat_id, message_id)
    assert message is not None
    admin.chat_completed(
        {
            "model": MODEL,
            "messages": [{"id": message_id, "role": "assistant", "content": message["content"]}],
            "chat_id": chat_id,
            "session_id": session_id,
            "id": message_id,
        }
    )
    outlets = [
        e for e in probe_log(openwebui, probe) if e["hook"] == "outlet" and e["message_id"] == message_id
    ]
    assert len(outlets) == 2, "the legacy endpoint runs the outlet a second time"


def test_import_manifest(admin: OpenWebUIClient, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    plain_id, wrapped_id = f"e2e_import_{suffix}", f"e2e_import_wrapped_{suffix}"
    manifest = [
        {"id": plain_id, "name": "Imported", "content": PROBE_SOURCE, "meta": {"description": "plain item"}},
        {
            "function": {
                "id": wrapped_id,
                "name": "Imported (community)",
                "content": PROBE_SOURCE,
                "meta": {"description": "wrapped item", "manifest": {}},
            }
        },
    ]
    path = tmp_path / "functions-export.json"
    path.write_text(json.dumps(manifest))
    try:
        created = admin.import_manifest(path)
        assert [f["id"] for f in created] == [plain_id, wrapped_id]
        for function_id in (plain_id, wrapped_id):
            func = admin.get_function(function_id)
            assert func is not None and func["type"] == "filter"
            assert not func["is_active"] and not func["is_global"], "Import leaves functions off"
            assert func["meta"]["manifest"]["title"] == "E2E Probe"
    finally:
        for function_id in (plain_id, wrapped_id):
            if admin.get_function(function_id) is not None:
                admin.delete_function(function_id)
