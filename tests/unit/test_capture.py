"""inlet → stream → outlet over the simulator's real responses, as Open WebUI 0.12.4 calls them,
checked against the ledger on both engines."""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import types
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from openrouter_sim import OpenRouterSimulator
from tests import factories
from tests.factories import (
    FUNCTION_ID,
    EmitterRecorder,
    HookDriver,
    answer_text,
    as_owui_json,
    complete,
    outlet_body,
    stream_events,
    streamed_turn,
    usage_from_events,
    webui_request,
)

PICO = Decimal("1e-12")


@pytest.fixture(scope="module")
def sim() -> Iterator[OpenRouterSimulator]:
    with OpenRouterSimulator() as simulator:
        yield simulator


def rows(plugin: types.ModuleType, url: str) -> list[dict[str, Any]]:
    ledger = plugin.ledger_for(url)
    ledger.ensure_schema()
    with ledger.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(plugin.ledger_table).order_by("id"))]


def spend_of(sim: OpenRouterSimulator, *generation_ids: str) -> int:
    total = sum((sim.generations[g].spend for g in generation_ids), Decimal(0))
    return int(total / PICO)


@pytest.mark.parametrize("shape", ["A", "B", "C"])
async def test_every_streamed_usage_shape_is_recorded_exactly(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator, shape: str
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    emitter = EmitterRecorder()
    _, events = await streamed_turn(driver, sim, f"Explain WAL mode [sim:shape={shape}]", emitter=emitter)
    generation_id = events[0]["id"]
    (row,) = rows(plugin, database_url)
    generation = sim.generations[generation_id]
    assert generation.cost is not None
    assert row["message_id"] == "msg-1" and row["chat_id"] == "chat-1"
    assert row["generation_ids"] == f'["{generation_id}"]'
    assert row["cost_pico"] == int(generation.cost / PICO) == row["spend_pico"]
    assert row["prompt_tokens"] == generation.usage["prompt_tokens"]
    assert row["completion_tokens"] == generation.usage["completion_tokens"]
    assert row["total_tokens"] == generation.usage["total_tokens"]
    assert (row["provider"], row["served_model"], row["model"]) == (
        "OpenAI",
        "openai/gpt-4o-mini",
        "openai/gpt-4o-mini",
    )
    assert row["user_id"] == "user-1" and row["user_name"] == "Ada" and row["status"] == "ok"
    assert row["ttft_ms"] is not None and row["latency_ms"] >= row["ttft_ms"]
    assert '"prompt_tokens_details"' in row["usage_json"]
    (line,) = emitter.statuses
    # Money first (a phone cuts the line short), provider last, no model: it is the one requested.
    assert line.startswith(f"{plugin.format_usd(row['spend_pico'])} · chat ") and line.endswith(" · OpenAI")
    assert "gpt-4o-mini" not in line
    assert emitter.events[0]["data"]["done"] is True


async def test_non_streaming_completion_is_recorded_from_the_outlet_alone(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    request = {
        "model": "anthropic/claude-sonnet-4.5",
        "stream": False,
        "messages": [{"role": "user", "content": "Say hi"}],
    }
    metadata: dict[str, Any] = {"chat_id": "", "message_id": None, "session_id": None}
    body = await driver.call("inlet", dict(request), __metadata__=metadata, __model__=driver.model)
    assert "stream_options" not in body
    response = as_owui_json(complete(sim, body).json())
    outlet = outlet_body(
        request,
        response["choices"][0]["message"]["content"],
        response["usage"],
        message_id="msg_api_1",
        chat_id="",
    )
    await driver.call("outlet", outlet, __metadata__=metadata, __user__=driver.user, __event_emitter__=None)
    (row,) = rows(plugin, database_url)
    assert row["message_id"] == "msg_api_1" and row["chat_id"] == ""
    assert row["spend_pico"] == spend_of(sim, response["id"])
    assert row["generation_ids"] == "[]"  # non-streaming outlets carry no generation id


async def test_byok_spend_adds_upstream_cost_and_non_byok_never_does(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    _, byok_events = await streamed_turn(driver, sim, "Use my key [sim:byok]", message_id="m-byok")
    _, plain_events = await streamed_turn(driver, sim, "Use credits", message_id="m-plain")
    by_id = {r["message_id"]: r for r in rows(plugin, database_url)}
    byok = sim.generations[byok_events[0]["id"]]
    plain = sim.generations[plain_events[0]["id"]]
    assert byok.is_byok and by_id["m-byok"]["is_byok"]
    assert byok.cost is not None and byok.upstream_inference_cost is not None and plain.cost is not None
    assert by_id["m-byok"]["spend_pico"] == int((byok.cost + byok.upstream_inference_cost) / PICO)
    assert by_id["m-byok"]["upstream_cost_pico"] == int(byok.upstream_inference_cost / PICO)
    assert plain.upstream_inference_cost == plain.cost  # filled on non-BYOK too, since early 2026
    assert by_id["m-plain"]["spend_pico"] == int(plain.cost / PICO)


async def test_each_tool_round_is_its_own_exact_row_of_the_message(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    request = {
        "model": "openai/gpt-4o",
        "stream": True,
        "tools": tools,
        "messages": [{"role": "user", "content": "What time is it? [sim:tool-call]"}],
    }
    metadata: dict[str, Any] = {"chat_id": "chat-t", "message_id": "msg-t"}
    body = await driver.call("inlet", dict(request), __metadata__=metadata, __model__=driver.model)
    first = stream_events(sim, body)
    call = next(
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in first
        if c.get("choices") and c["choices"][0]["delta"].get("tool_calls")
    )
    follow_up = {
        **body,
        "messages": [
            *body["messages"],
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "12:00"},
        ],
    }
    second = stream_events(sim, follow_up)
    for chunk in [*first, *second]:
        await driver.call("stream", chunk, __metadata__=metadata)
    outlet = outlet_body(
        request,
        answer_text(second),
        usage_from_events([*first, *second]),
        message_id="msg-t",
        chat_id="chat-t",
    )
    await driver.call("outlet", outlet, __metadata__=metadata, __user__=driver.user)
    ids = [first[0]["id"], second[0]["id"]]
    assert ids[0] != ids[1]
    by_generation = {row["generation_key"]: row for row in rows(plugin, database_url)}
    assert sorted(by_generation) == sorted(ids)
    for gid in ids:
        row = by_generation[gid]
        assert (row["message_id"], row["generation_ids"]) == ("msg-t", f'["{gid}"]')
        assert row["spend_pico"] == spend_of(sim, gid)
        assert row["prompt_tokens"] == sim.generations[gid].usage["prompt_tokens"]
    assert sum(row["spend_pico"] for row in by_generation.values()) == spend_of(sim, *ids)


async def test_a_second_outlet_for_the_same_message_never_double_counts(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    emitter = EmitterRecorder()
    request, events = await streamed_turn(driver, sim, "Hello", emitter=emitter)
    legacy = outlet_body(
        request, answer_text(events), usage_from_events(events), message_id="msg-1", chat_id="chat-1"
    )
    # POST /api/chat/completed runs the outlet again, in a fresh request with fresh metadata.
    await driver.call(
        "outlet",
        legacy,
        __metadata__={"chat_id": "chat-1", "message_id": "msg-1"},
        __user__=driver.user,
        __event_emitter__=emitter,
    )
    assert len(rows(plugin, database_url)) == 1
    assert len(emitter.statuses) == 1
    # A regenerate is a new message and counts.
    await streamed_turn(driver, sim, "Hello", message_id="msg-2", emitter=emitter)
    assert len(rows(plugin, database_url)) == 2


async def test_api_calls_without_an_emitter_are_recorded_and_nothing_fails(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    request = {
        "model": "openai/gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "API"}],
    }
    metadata: dict[str, Any] = {"chat_id": "", "message_id": None, "session_id": None}
    body = await driver.call("inlet", dict(request), __metadata__=metadata, __model__=driver.model)
    assert body["stream_options"] == {"include_usage": True}
    events = stream_events(sim, body)
    for chunk in events:
        await driver.call("stream", chunk, __metadata__=metadata, __event_emitter__=None)
    outlet = outlet_body(
        request, answer_text(events), usage_from_events(events), message_id="msg_generated", chat_id=""
    )
    await driver.call("outlet", outlet, __metadata__=metadata, __user__=driver.user, __event_emitter__=None)
    (row,) = rows(plugin, database_url)
    assert row["message_id"] == "msg_generated" and row["spend_pico"] == spend_of(sim, events[0]["id"])


@pytest.mark.parametrize("code", ["502", "server_error"])
async def test_a_mid_stream_error_marks_the_row_failed_and_keeps_its_usage(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator, code: str
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    emitter = EmitterRecorder()
    _, events = await streamed_turn(
        driver, sim, f"Fail please [sim:midstream-error={code}] [sim:midstream-error-usage]", emitter=emitter
    )
    (error_chunk,) = [e for e in events if "error" in e]
    assert error_chunk["choices"] == []  # the shape Open WebUI 0.12.4 shows as an error
    (row,) = rows(plugin, database_url)
    assert row["status"] == "error" and row["error"].startswith(code)
    assert row["spend_pico"] == spend_of(sim, events[0]["id"])
    assert "failed:" in emitter.statuses[0]


async def test_inlet_asks_openrouter_connections_for_usage(
    plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in for Open WebUI's config store (open_webui.models.config.Config.get), which the
    # plugin reads to learn which connection serves the model.
    class Config:
        @staticmethod
        async def get(key: str, default: Any = None) -> Any:
            return {"openai.api_base_urls": ["https://openrouter.ai/api/v1", "https://api.openai.com/v1"]}[
                key
            ]

    monkeypatch.setitem(sys.modules, "open_webui.models.config", types.SimpleNamespace(Config=Config))
    monkeypatch.setattr(plugin, "_base_urls_cache", plugin._TimedList())
    driver = HookDriver(plugin)
    openrouter = await driver.call(
        "inlet",
        {"model": "x", "stream": True, "messages": []},
        __metadata__={},
        __model__={"id": "x", "urlIdx": 0},
    )
    assert openrouter["usage"] == {"include": True}
    assert openrouter["stream_options"] == {"include_usage": True}
    other = await driver.call(
        "inlet",
        {"model": "y", "stream": False, "messages": []},
        __metadata__={},
        __model__={"id": "y", "urlIdx": 1},
    )
    assert "usage" not in other and "stream_options" not in other


async def test_other_connections_are_recorded_only_when_asked(
    plugin: types.ModuleType, data_dir: Any
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    body = outlet_body(
        {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]},
        "hello",
        usage,
        message_id="m-local",
        chat_id="c",
    )
    await HookDriver(plugin, valves={"database_url": url}).call("outlet", body, __metadata__={})
    assert rows(plugin, url) == []
    await HookDriver(plugin, valves={"database_url": url, "record_all_models": True}).call(
        "outlet", body, __metadata__={}
    )
    (row,) = rows(plugin, url)
    assert row["total_tokens"] == 15 and row["cost_pico"] is None and row["spend_pico"] == 0


async def test_the_usage_line_shows_the_chat_total_of_both_turns(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    emitter = EmitterRecorder()
    _, first = await streamed_turn(driver, sim, "Turn one", message_id="m-1", emitter=emitter)
    previous = [
        {"role": "user", "content": "Turn one"},
        {"id": "m-1", "role": "assistant", "content": answer_text(first)},
        {"role": "user", "content": "Turn two"},
    ]
    metadata: dict[str, Any] = {"chat_id": "chat-1", "message_id": "m-2"}
    request2 = {"model": "openai/gpt-4o-mini", "stream": True, "messages": previous}
    body = await driver.call("inlet", dict(request2), __metadata__=metadata, __model__=driver.model)
    second = stream_events(sim, body)
    for chunk in second:
        await driver.call("stream", chunk, __metadata__=metadata)
    await driver.call(
        "outlet",
        outlet_body(
            request2,
            answer_text(second),
            usage_from_events(second),
            message_id="m-2",
            chat_id="chat-1",
            previous=previous,
        ),
        __metadata__=metadata,
        __user__=driver.user,
        __event_emitter__=emitter,
    )
    total = spend_of(sim, first[0]["id"], second[0]["id"])
    assert f"chat {plugin.format_usd(total)}" in emitter.statuses[-1]


def test_no_hook_names___user___so_open_webui_reads_no_user_settings_before_it(
    plugin: types.ModuleType,
) -> None:
    """Open WebUI reads the user's settings from its database before every call of a hook that names
    `__user__` (utils/filter.py::apply_user_valves); the hooks take the user from `__request__`."""
    hooks = plugin.Filter()
    for name in ("inlet", "request", "observe_stream", "outlet"):
        parameters = inspect.signature(getattr(hooks, name)).parameters
        assert "__user__" not in parameters, name
    assert "__request__" in inspect.signature(hooks.outlet).parameters


async def test_a_user_whose_saved_settings_are_malformed_is_still_recorded_and_shown_the_line(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's valves are read inside the outlet, before the record is handed over: settings
    whose `functions.valves` is not a mapping mean default valves, not a lost completion."""
    driver = HookDriver(plugin, valves={"database_url": database_url})

    def request_with_malformed_settings(user: dict[str, Any] | None, _valves: object = None) -> Any:
        request = webui_request(user)
        if user:  # the stream hook is offered no user
            request.state.user.settings = {"functions": {"valves": "not a mapping"}}
        return request

    monkeypatch.setattr(factories, "webui_request", request_with_malformed_settings)
    emitter = EmitterRecorder()
    await streamed_turn(driver, sim, "Hello", emitter=emitter)
    (row,) = rows(plugin, database_url)
    assert row["user_id"] == driver.user["id"]
    assert len(emitter.statuses) == 1  # the default: the line is shown


def test_the_user_is_the_one_open_webui_authenticated_for_the_request(plugin: types.ModuleType) -> None:
    ada = {"id": "u-1", "name": "Ada", "email": "ada@example.com", "role": "admin"}
    request = webui_request(ada, {"show_usage_line": False})
    assert plugin.request_user(request, {"user_id": "u-1"}) == ada
    assert plugin.request_user(request, {}, FUNCTION_ID) == {**ada, "valves": {"show_usage_line": False}}
    assert plugin.request_user(request, None, "another_function")["valves"] == {}
    # A request user other than the one the metadata names is not trusted: only the id is known.
    assert plugin.request_user(request, {"user_id": "u-2"}, FUNCTION_ID) == {"id": "u-2"}
    assert plugin.request_user(webui_request(None), {"user_id": "u-2"}) == {"id": "u-2"}
    assert plugin.request_user(None, None) is None
    assert plugin.request_user(webui_request({"id": 42, "name": "x"}), {"user_id": 7}) is None


def test_a_users_saved_valves_are_read_as_open_webui_stores_them(
    plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a dict, or encrypted to a string when ENABLE_VALVE_ENCRYPTION is on (decrypted with Open
    WebUI's own decrypt_valves); settings may be its UserSettings model (extra keys kept)."""
    valves_module = types.ModuleType("open_webui.utils.valves")
    valves_module.decrypt_valves = lambda text: {"show_usage_line": text == "sealed:on"}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "open_webui.utils.valves", valves_module)
    settings = {"functions": {"valves": {"f": "sealed:off"}}}
    assert plugin.saved_user_valves(settings, "f") == {"show_usage_line": False}

    class UserSettings(BaseModel):
        model_config = ConfigDict(extra="allow")
        ui: dict[str, Any] | None = {}

    as_model = UserSettings.model_validate(
        {"ui": {}, "functions": {"valves": {"f": {"show_usage_line": False}}}}
    )
    assert plugin.saved_user_valves(as_model, "f") == {"show_usage_line": False}
    assert plugin.saved_user_valves(None, "f") == {}
    assert plugin.saved_user_valves({"functions": "not a mapping"}, "f") == {}
    assert plugin.saved_user_valves({"functions": {"valves": None}}, "f") == {}
    assert plugin.saved_user_valves({"functions": {"valves": "not a mapping"}}, "f") == {}

    def unreadable(text: str) -> dict[str, Any]:
        raise ValueError(text)

    valves_module.decrypt_valves = unreadable  # type: ignore[attr-defined]
    assert plugin.saved_user_valves(settings, "f") == {}
    monkeypatch.delitem(sys.modules, "open_webui.utils.valves")
    assert plugin.saved_user_valves(settings, "f") == {}  # encrypted, and no way to decrypt: defaults


async def test_a_user_can_hide_the_line_and_admins_choose_its_parts(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator
) -> None:
    hidden = EmitterRecorder()
    await streamed_turn(
        HookDriver(plugin, valves={"database_url": database_url}, user_valves={"show_usage_line": False}),
        sim,
        "Hi",
        emitter=hidden,
    )
    assert hidden.statuses == []
    trimmed = EmitterRecorder()
    valves = {
        "database_url": database_url,
        "line_show_provider": False,
        "line_show_timing": False,
        "line_show_speed": False,
        "line_show_chat_total": False,
        "line_show_today_total": True,
    }
    await streamed_turn(HookDriver(plugin, valves=valves), sim, "Hi", message_id="m-2", emitter=trimmed)
    (line,) = trimmed.statuses
    assert "OpenAI" not in line and " s ·" not in line and "tok/s" not in line and "chat $" not in line
    assert "today $" in line
    assert len(rows(plugin, database_url)) == 2


@pytest.mark.parametrize(
    "body",
    [None, {}, {"messages": "nonsense"}, {"messages": [None, 3, {"role": "assistant", "usage": "bad"}]}],
)
async def test_malformed_bodies_and_missing_users_never_raise(
    plugin: types.ModuleType, data_dir: Any, body: Any, caplog: pytest.LogCaptureFixture
) -> None:
    driver = HookDriver(plugin, valves={"database_url": f"sqlite:///{data_dir / 'l.sqlite3'}"})
    assert await driver.call("inlet", body, __metadata__=None, __model__=None) == body
    assert await driver.call("stream", body, __metadata__=None) == body
    assert await driver.call("outlet", body, __metadata__=None, __user__=None) == body


async def test_missing_user_and_missing_usage_are_recorded_and_logged(
    plugin: types.ModuleType, data_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    driver = HookDriver(plugin, valves={"database_url": url})
    metadata: dict[str, Any] = {}
    await driver.call(
        "stream",
        {"id": "gen-1-abc", "provider": "OpenAI", "model": "m", "choices": []},
        __metadata__=metadata,
    )
    body = outlet_body({"model": "m", "messages": []}, "x", None, message_id="m-nouser", chat_id="c")
    await driver.call("outlet", body, __metadata__=metadata, __user__=None)
    (row,) = rows(plugin, url)
    assert row["user_id"] == "unknown" and row["total_tokens"] == 0 and row["cost_pico"] is None
    assert "has no user" in caplog.text and "reported no usage" in caplog.text


async def test_when_even_the_spool_fails_the_record_is_logged_and_the_chat_goes_on(
    plugin: types.ModuleType, data_dir: Any, sim: OpenRouterSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{data_dir / 'missing' / 'ledger.sqlite3'}"
    blocker = data_dir / "not-a-directory"
    blocker.write_text("")
    plugin.writer_for(url).ledger.spool.directory = blocker / "spool"  # cannot be created
    driver = HookDriver(plugin, valves={"database_url": url})
    emitter = EmitterRecorder()
    await streamed_turn(driver, sim, "Hello", message_id="m-lost", emitter=emitter)
    assert "could not spool either" in caplog.text
    assert '"message_id": "m-lost"' in caplog.text  # the whole record is in the log, nothing lost
    assert "could not be recorded or spooled" in caplog.text
    assert emitter.statuses == []


async def test_outlet_parses_and_renders_on_the_writer_thread_not_on_the_event_loop(
    plugin: types.ModuleType, data_dir: Any, sim: OpenRouterSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    threads: dict[str, str] = {}
    for name in ("build_records", "render_usage_line"):
        real = getattr(plugin, name)

        def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
            threads[_name] = threading.current_thread().name
            return _real(*args)

        monkeypatch.setattr(plugin, name, spy)
    emitter = EmitterRecorder()
    await streamed_turn(HookDriver(plugin, valves={"database_url": url}), sim, "Hi", emitter=emitter)
    assert threads == {
        "build_records": "openrouter_usage_writer",
        "render_usage_line": "openrouter_usage_writer",
    }
    assert len(rows(plugin, url)) == 1 and emitter.statuses[-1].startswith("$")


async def test_a_completion_whose_record_cannot_be_built_fails_alone(
    plugin: types.ModuleType, data_dir: Any, sim: OpenRouterSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    real = plugin.build_records

    def fails_for_one(state: Any, context: Any) -> Any:
        if context.metadata.get("message_id") == "m-bad":
            raise RuntimeError("injected")
        return real(state, context)

    monkeypatch.setattr(plugin, "build_records", fails_for_one)
    driver = HookDriver(plugin, valves={"database_url": url})
    await asyncio.gather(
        *(streamed_turn(driver, sim, "Hi", message_id=m, chat_id=m) for m in ("m-1", "m-bad", "m-2"))
    )
    assert sorted(row["message_id"] for row in rows(plugin, url)) == ["m-1", "m-2"]


async def test_with_stream_capture_off_open_webui_sees_no_stream_hook_and_the_outlet_still_records(
    plugin: types.ModuleType, data_dir: Any, sim: OpenRouterSimulator
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    hook = plugin.Filter()
    assert callable(getattr(hook, "stream", None)), "on by default"
    hook.valves = plugin.Filter.Valves(database_url=url, capture_stream=False)
    assert getattr(hook, "stream", None) is None, "Open WebUI's getattr(module, 'stream', None)"
    driver = HookDriver(plugin, valves={"database_url": url, "capture_stream": False})
    _, chunks = await streamed_turn(driver, sim, "Hi", message_id="m-off")
    (row,) = rows(plugin, url)
    assert row["spend_pico"] == spend_of(sim, chunks[0]["id"]) and row["generation_ids"] in ("[]", [], None)
    hook.valves = plugin.Filter.Valves(database_url=url)
    assert callable(getattr(hook, "stream", None)), "switched back on at the next valves Open WebUI sets"


def test_the_line_names_the_model_only_when_a_router_chose_another(plugin: types.ModuleType) -> None:
    usage = plugin.Usage(prompt_tokens=1200, completion_tokens=30, cost_pico=1_500_000_000)
    routed = plugin.UsageRecord(
        message_id="m",
        chat_id="c",
        user_id="u",
        user_name="U",
        generation_ids=("gen-1",),
        model="openrouter/auto",
        served_model="anthropic/claude-3.5-sonnet",
        provider="Anthropic",
        usage=usage,
        status="ok",
        error="",
        latency_ms=2000,
        ttft_ms=500,
        raw_usage=None,
        created_at=plugin.datetime.now(plugin.UTC),
    )
    parts = plugin.LineParts()
    line = plugin.render_usage_line(parts, [routed], plugin.MessageTotals.of([routed]), 3_000_000_000)
    assert line == (
        "$0.0015 · chat $0.0030 · 1,200 in · 30 out · 2.0 s · 20 tok/s · Anthropic"
        " · anthropic/claude-3.5-sonnet"
    )
    asked = plugin.dataclasses.replace(routed, model="anthropic/claude-3.5-sonnet")
    assert "claude" not in plugin.render_usage_line(
        parts, [asked], plugin.MessageTotals.of([asked]), 3_000_000_000
    )


@pytest.mark.parametrize(
    ("display_currency", "shown"),
    [("EUR 0.92 2026-11-29", "EUR 0.92"), ("EUR", "USD"), ("EUR 0.92 sometime", "USD"), ("{}", "USD")],
)
async def test_the_line_shows_money_in_the_display_currency_and_a_bad_one_is_usd(
    plugin: types.ModuleType, data_dir: Any, sim: OpenRouterSimulator, display_currency: str, shown: str
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    valves = {"database_url": url, "display_currency": display_currency, "line_show_today_total": True}
    emitter = EmitterRecorder()
    _, chunks = await streamed_turn(
        HookDriver(plugin, valves=valves), sim, "Hi", message_id="m-1", emitter=emitter
    )
    spend = spend_of(sim, chunks[0]["id"])
    currency = plugin.parse_display_currency(shown)
    (line,) = emitter.statuses
    assert line.startswith(
        f"{currency.format(spend)} · chat {currency.format(spend)} · today {currency.format(spend)} · "
    )
    (row,) = rows(plugin, url)
    assert row["spend_pico"] == spend, "the ledger keeps exact USD"
