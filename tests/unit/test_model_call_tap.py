"""The model-call tap: Open WebUI's call into its OpenAI connection, wrapped so that a non-streamed
reply is recorded under its own generation id and usage, and a reply Open WebUI gives no outlet
(only tool calls, a provider's error) is still recorded once. Here `open_webui.utils.chat` is a
stand-in module whose call answers from the simulator over loopback; the real Open WebUI runs in
tests/e2e/test_openrouter_usage.py (the direct API calls, and the replies Open WebUI gives no outlet)."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from openrouter_sim import OpenRouterSimulator
from tests.factories import HookDriver, as_owui_json, complete, load_plugin_module, outlet_body

CHAT_MODULE = "open_webui.utils.chat"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class ErrorReply:
    """What Open WebUI's OpenAI router returns for a provider's HTTP error: a JSONResponse."""

    def __init__(self, status_code: int, content: Any) -> None:
        self.status_code = status_code
        self.body = json.dumps(content).encode()


@pytest.fixture(scope="module")
def sim() -> Iterator[OpenRouterSimulator]:
    with OpenRouterSimulator() as simulator:
        yield simulator


@pytest.fixture
def open_webui_chat(sim: OpenRouterSimulator, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in for open_webui.utils.chat: its connection call posts the form (without Open
    WebUI's metadata) to the simulator and returns the JSON reply, or an ErrorReply."""
    module = types.ModuleType(CHAT_MODULE)
    module.calls = 0  # type: ignore[attr-defined]

    async def generate_openai_chat_completion(request: Any, form_data: dict[str, Any], user: Any) -> Any:
        module.calls += 1  # type: ignore[attr-defined]
        payload = {key: value for key, value in form_data.items() if key != "metadata"}
        reply = await asyncio.to_thread(complete, sim, payload)
        if reply.status_code >= 400:
            return ErrorReply(reply.status_code, reply.json())
        return as_owui_json(reply.json())

    module.generate_openai_chat_completion = generate_openai_chat_completion  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, CHAT_MODULE, module)
    return module


def non_streamed(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "openai/gpt-4o-mini",
        "stream": False,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def rows(plugin: types.ModuleType, url: str) -> list[dict[str, Any]]:
    with plugin.ledger_for(url).engine.connect() as conn:
        if not sa.inspect(conn).has_table(plugin.ledger_table.name):
            return []
        return [dict(r._mapping) for r in conn.execute(sa.select(plugin.ledger_table).order_by("id"))]


async def wait_for_rows(plugin: types.ModuleType, url: str, count: int) -> list[dict[str, Any]]:
    for _ in range(200):
        found = rows(plugin, url)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} row(s), found {len(rows(plugin, url))}")


def spend_pico(sim: OpenRouterSimulator, generation_id: str) -> int:
    return int(sim.generations[generation_id].spend.scaleb(12))


async def model_call(
    open_webui_chat: types.ModuleType, body: dict[str, Any], metadata: dict[str, Any]
) -> Any:
    """As utils/chat.py calls it: keywords, with the request's metadata merged into a new dict
    (`{**form_data['metadata'], **request.state.metadata}`), so the values are the request's own."""
    form_data = {**body, "metadata": {**metadata}}
    return await open_webui_chat.generate_openai_chat_completion(request=None, form_data=form_data, user=None)


async def test_a_non_streamed_reply_is_recorded_under_its_generation_id_with_its_own_usage(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator, open_webui_chat: types.ModuleType
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    request = non_streamed("Hi")
    metadata: dict[str, Any] = {"chat_id": "", "message_id": None, "session_id": None}
    body = await driver.call("inlet", dict(request), __metadata__=metadata, __model__=driver.model)
    reply = await model_call(open_webui_chat, body, metadata)
    outlet = outlet_body(
        request, reply["choices"][0]["message"]["content"], reply["usage"], message_id="msg_api_1", chat_id=""
    )
    await driver.call("outlet", outlet, __metadata__=metadata, __user__=driver.user, __event_emitter__=None)
    await asyncio.sleep(0.1)  # the task's end must not record it a second time
    (row,) = rows(plugin, database_url)
    assert row["generation_key"] == reply["id"] and json.loads(row["generation_ids"]) == [reply["id"]]
    assert row["spend_pico"] == spend_pico(sim, reply["id"]) and row["status"] == "ok"
    assert row["provider"] == reply["provider"]
    assert json.loads(row["usage_json"]) == reply["usage"]  # the reply's own, not Open WebUI's merge


async def test_a_reply_of_only_tool_calls_gets_one_row_though_open_webui_runs_no_outlet(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator, open_webui_chat: types.ModuleType
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    request = non_streamed("Weather in Paris? [sim:tool-call]", tools=[WEATHER_TOOL])
    metadata = {"chat_id": "", "message_id": "msg-tools", "user_id": "user-1"}
    body = await driver.call("inlet", dict(request), __metadata__=metadata, __model__=driver.model)
    reply = await asyncio.create_task(model_call(open_webui_chat, body, metadata))  # the request's task
    assert reply["choices"][0]["message"]["tool_calls"] and not reply["choices"][0]["message"]["content"]
    (row,) = await wait_for_rows(plugin, database_url, 1)
    assert (row["message_id"], row["user_id"], row["status"]) == ("msg-tools", "user-1", "ok")
    assert row["generation_key"] == reply["id"] and row["spend_pico"] == spend_pico(sim, reply["id"])


async def test_a_providers_error_reply_is_one_error_row_with_its_message_and_no_cost(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator, open_webui_chat: types.ModuleType
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url, "record_all_models": True})
    request = {"model": "no-such/model", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    metadata = {"chat_id": "chat-e", "message_id": "msg-error", "user_id": "user-1"}
    body = await driver.call("inlet", dict(request), __metadata__=metadata, __model__=driver.model)
    reply = await asyncio.create_task(model_call(open_webui_chat, body, metadata))
    assert isinstance(reply, ErrorReply)
    (row,) = await wait_for_rows(plugin, database_url, 1)
    assert (row["message_id"], row["status"]) == ("msg-error", "error")
    assert row["error"].startswith(f"HTTP {reply.status_code}: ") and len(row["error"]) > 12
    assert row["cost_pico"] is None and row["spend_pico"] == 0  # cost unknown, never a made-up $0 cost
    assert row["generation_key"].startswith("msg-error~")


async def test_calls_this_function_did_not_see_and_task_calls_pass_through_untouched(
    plugin: types.ModuleType, database_url: str, open_webui_chat: types.ModuleType
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    request = non_streamed("Hi")
    metadata: dict[str, Any] = {"chat_id": "c", "message_id": "msg-seen", "user_id": "user-1"}
    await driver.call("inlet", dict(request), __metadata__=metadata, __model__=driver.model)
    # The function disabled (no inlet ran) and a title generation carrying the chat's metadata.
    unseen = await asyncio.create_task(model_call(open_webui_chat, request, {"chat_id": "c"}))
    title = await asyncio.create_task(
        model_call(open_webui_chat, request, {**metadata, "task": "title_generation"})
    )
    await asyncio.sleep(0.3)
    assert unseen["choices"] and title["choices"]
    assert rows(plugin, database_url) == []
    assert plugin.STATE_KEY in metadata and not metadata[plugin.STATE_KEY].generation_ids


async def test_the_tap_wraps_once_however_often_inlet_runs_and_a_reload_replaces_it(
    plugin: types.ModuleType, open_webui_chat: types.ModuleType
) -> None:
    original = open_webui_chat.generate_openai_chat_completion
    assert plugin.install_model_call_tap() and plugin.install_model_call_tap()
    tap = open_webui_chat.generate_openai_chat_completion
    assert tap is not original and getattr(tap, plugin.TAP_ORIGINAL_ATTRIBUTE) is original
    reloaded = load_plugin_module()  # Open WebUI execs the source again after an edit
    assert reloaded.install_model_call_tap()
    newer = open_webui_chat.generate_openai_chat_completion
    assert newer is not tap and getattr(newer, reloaded.TAP_ORIGINAL_ATTRIBUTE) is original
    assert newer.__globals__ is vars(reloaded)  # the old copy's code is no longer on the path
    await model_call(open_webui_chat, non_streamed("Hi"), {})
    assert open_webui_chat.calls == 1


def test_outside_open_webui_there_is_nothing_to_tap(plugin: types.ModuleType) -> None:
    assert CHAT_MODULE not in sys.modules
    assert plugin.install_model_call_tap() is False
    assert CHAT_MODULE not in sys.modules  # never imported to find out


async def test_a_reply_the_tap_cannot_read_never_breaks_the_call(
    plugin: types.ModuleType,
    database_url: str,
    open_webui_chat: types.ModuleType,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    request = non_streamed("Hi")
    metadata: dict[str, Any] = {"chat_id": "", "message_id": "m", "user_id": "u"}
    body = await driver.call("inlet", dict(request), __metadata__=metadata, __model__=driver.model)

    def broken(*_: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(plugin, "observe_chunk", broken)
    reply = await model_call(open_webui_chat, body, metadata)
    assert reply["choices"][0]["message"]["content"]
    assert Decimal(str(reply["usage"]["cost"])) > 0
