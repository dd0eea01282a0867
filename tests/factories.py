"""The one place tests (and bench/) get what they build from: the plugin loaded as Open WebUI loads
it, a driver that calls its hooks as Open WebUI 0.12.4's utils/filter.py does, an event-emitter
recorder, the simulator's real responses turned into what Open WebUI hands a filter (streamed
chunks, merged usage, outlet bodies, whole streamed turns), and ledger records.

Nothing here imports pytest: bench/ builds its workloads from these too.
"""

from __future__ import annotations

import inspect
import json
import random
import types
from datetime import UTC, datetime, timedelta
from numbers import Number
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from openrouter_sim import OpenRouterSimulator
from tests.reliability.independent import load_source

REPO = Path(__file__).resolve().parent.parent
PLUGIN_PATH = REPO / "plugin" / "openrouter_usage.py"
UTC_ZONE = ZoneInfo("UTC")

# ── the plugin and its hooks ──


def load_plugin_module() -> types.ModuleType:
    """exec the source text into a fresh module, as open_webui/utils/plugin.py does: no __file__.
    The code is compiled under the plugin's real path, so coverage and tracebacks name its lines."""
    return load_source(PLUGIN_PATH.read_text(encoding="utf-8"), filename=str(PLUGIN_PATH))


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


FUNCTION_ID = "openrouter_usage"  # the id HookDriver's hooks run under (`__id__`)


def webui_request(user: dict[str, Any] | None, user_valves: dict[str, Any] | None = None) -> Any:
    """What a hook's `__request__` carries of the user: Open WebUI's auth sets `request.state.user`
    (a UserModel: id, name, email, role, settings; the user's valves for a function in
    `settings["functions"]["valves"][<function id>]`)."""
    state = types.SimpleNamespace()
    if user:
        settings = {"functions": {"valves": {FUNCTION_ID: dict(user_valves or {})}}}
        state.user = types.SimpleNamespace(
            **{key: user.get(key) for key in ("id", "name", "email", "role")}, settings=settings
        )
    return types.SimpleNamespace(state=state)


class HookDriver:
    """Calls the filter's hooks the way Open WebUI 0.12.4 does for one request. As Open WebUI, it
    offers every hook both `__user__` and `__request__` (built from `__user__` and the driver's
    user valves when the caller gives none)."""

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
        handler = getattr(self.filter, hook)
        self.filter.valves = self.filter.Valves(**self.valves)
        signature = inspect.signature(handler)
        params: dict[str, Any] = {"event": payload} if hook == "stream" else {"body": payload}
        params |= {k: v for k, v in self.offered(extra).items() if k in signature.parameters}
        if "__user__" in params and params["__user__"] and hasattr(self.filter, "UserValves"):
            params["__user__"] = dict(params["__user__"], valves=self.filter.UserValves(**self.user_valves))
        return params

    def offered(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The extra parameters Open WebUI offers a hook: `__request__` (with the user) and `__id__`
        always, whatever the caller left out."""
        offered = {"__id__": FUNCTION_ID, **extra}
        if offered.get("__request__") is None:
            offered["__request__"] = webui_request(extra.get("__user__"), self.user_valves)
        return offered

    async def call(self, hook: str, payload: Any, **extra: Any) -> Any:
        """As utils/filter.py::process_filter_function: look the hook up first (a filter whose hook
        is missing or None is skipped), then set the valves, then await coroutine functions and
        call the others."""
        handler = getattr(self.filter, hook, None)
        if not callable(handler):
            return payload
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
            "__id__": FUNCTION_ID,
            "__user__": self.user,
            "__metadata__": metadata,
            "__model__": self.model,
            "__request__": webui_request(self.user, self.user_valves),
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


# ── the simulator's real HTTP responses, as Open WebUI 0.12.4 hands them to a filter ──

SUMMED_KEYS = ("input_tokens", "output_tokens", "total_tokens", "cost")
DETAIL_KEYS = ("prompt_tokens_details", "completion_tokens_details")


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The data events of an SSE body, as Open WebUI hands them to `stream` (no [DONE], no comments)."""
    events = []
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload and payload != "[DONE]":
                events.append(json.loads(payload))
    return events


def owui_merge_usage(current: dict[str, Any] | None, incoming: dict[str, Any]) -> dict[str, Any]:
    """Open WebUI's documented merge of per-call usage (utils/response.py): canonical token keys
    and cost are SUMMED as floats, detail maps summed key by key, any other key is the last call's."""
    incoming = dict(incoming)
    incoming.setdefault("input_tokens", incoming.get("prompt_tokens", 0))
    incoming.setdefault("output_tokens", incoming.get("completion_tokens", 0))
    if not current:
        return incoming
    merged = {**current, **incoming}
    for key in SUMMED_KEYS:
        values = [v for v in (current.get(key), incoming.get(key)) if isinstance(v, Number)]
        if values:
            merged[key] = sum(values)
    for key in DETAIL_KEYS:
        left, right = current.get(key) or {}, incoming.get(key) or {}
        merged[key] = {k: (left.get(k) or 0) + (right.get(k) or 0) for k in {*left, *right}}
    return merged


def complete(sim: OpenRouterSimulator, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{sim.base_url}/chat/completions",
        json=body,
        headers={"Authorization": "Bearer sk-or-test"},
        timeout=30,
    )


def stream_events(sim: OpenRouterSimulator, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks `stream` sees: each SSE data line parsed (json.loads, as Open WebUI's JSONCodec)."""
    response = complete(sim, {**body, "stream": True})
    response.raise_for_status()
    return parse_sse(response.text)


def usage_from_events(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    merged: dict[str, Any] | None = None
    for event in events:
        if isinstance(event.get("usage"), dict):
            merged = owui_merge_usage(merged, event["usage"])
    return merged


def outlet_body(
    request: dict[str, Any],
    answer: str,
    usage: dict[str, Any] | None,
    *,
    message_id: str | None,
    chat_id: str,
    previous: list[dict[str, Any]] | None = None,
    finish_reason: str | None = "stop",
) -> dict[str, Any]:
    """The outlet body of utils/middleware.py::outlet_filter_handler for this turn."""
    history = (
        previous
        if previous is not None
        else [{"role": m["role"], "content": m["content"]} for m in request["messages"]]
    )
    assistant: dict[str, Any] = {
        "id": message_id,
        "role": "assistant",
        "content": answer,
        "info": None,
        "timestamp": 0,
    }
    if usage:
        assistant["usage"] = usage
    if finish_reason:
        assistant["finish_reason"] = finish_reason
    return {
        "model": request["model"],
        "messages": [*history, assistant],
        "filter_ids": [],
        "chat_id": chat_id,
        "session_id": None,
        "id": message_id,
    }


def answer_text(events: list[dict[str, Any]]) -> str:
    return "".join(
        (choice.get("delta") or {}).get("content") or ""
        for event in events
        for choice in event.get("choices") or []
    )


def as_owui_json(data: Any) -> Any:
    """Open WebUI parses bodies into plain JSON values: money arrives as float."""
    return json.loads(json.dumps(data, default=float))


async def streamed_turn(
    driver: HookDriver,
    sim: OpenRouterSimulator,
    text: str,
    *,
    chat_id: str = "chat-1",
    message_id: str = "msg-1",
    emitter: EmitterRecorder | None = None,
    model: str = "openai/gpt-4o-mini",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One streamed chat turn, inlet → stream → outlet, over the simulator's real response: the
    request body as inlet left it and the chunks `stream` saw."""
    request = {"model": model, "stream": True, "messages": [{"role": "user", "content": text}]}
    metadata = {
        "chat_id": chat_id,
        "message_id": message_id,
        "session_id": "s-1",
        "user_id": driver.user.get("id"),
    }
    sent = dict(request)
    captured: list[dict[str, Any]] = []

    async def run() -> None:
        body = await driver.call(
            "inlet", sent, __metadata__=metadata, __model__=driver.model, __user__=driver.user
        )
        captured.extend(stream_events(sim, body))
        for chunk in captured:
            await driver.call("stream", chunk, __metadata__=metadata)
        outlet = outlet_body(
            request,
            answer_text(captured),
            usage_from_events(captured),
            message_id=message_id,
            chat_id=chat_id,
        )
        await driver.call(
            "outlet", outlet, __metadata__=metadata, __user__=driver.user, __event_emitter__=emitter
        )

    await run()
    return sent, captured


# ── ledger records ──


def make_record(plugin: types.ModuleType, index: int, **overrides: Any) -> Any:
    """A varied, reproducible UsageRecord of `plugin` (the same for the same `index`): five users,
    seven chats, three served models, BYOK one time in five, a failure one time in eleven."""
    rng = random.Random(index)
    cost = rng.randrange(1, 10**10)
    byok = rng.random() < 0.2
    usage = plugin.Usage(
        prompt_tokens=rng.randrange(1, 5000),
        completion_tokens=rng.randrange(1, 2000),
        total_tokens=0,
        cached_tokens=rng.randrange(0, 100),
        cache_write_tokens=rng.randrange(0, 10),
        reasoning_tokens=rng.randrange(0, 50),
        cost_pico=cost,
        upstream_cost_pico=rng.randrange(1, 10**10) if byok else cost,
        is_byok=byok,
    )
    fields: dict[str, Any] = {
        "message_id": f"msg-{index}",
        "chat_id": f"chat-{index % 7}",
        "user_id": f"user-{index % 5}",
        "user_name": f"User {index % 5}",
        "generation_ids": (f"gen-{index}",),
        "model": "openrouter/auto",
        "served_model": f"vendor/model-{index % 3}",
        "provider": f"Provider{index % 2}",
        "usage": usage,
        "status": "ok" if index % 11 else "error",
        "error": "" if index % 11 else "502: upstream",
        "latency_ms": 1000,
        "ttft_ms": 100,
        "raw_usage": {"cost": cost},
        "created_at": datetime(2026, 10, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(0, 40 * 24 * 60)),
    }
    return plugin.UsageRecord(**(fields | overrides))


def write(plugin: types.ModuleType, url: str, records: list[Any], zone: ZoneInfo = UTC_ZONE) -> list[str]:
    """Each record through the ledger's writer thread, as outlet hands it over: what became of each."""
    writer = plugin.writer_for(url)
    futures = [writer.submit(plugin.WriteRequest(records=(r,), zone=zone)) for r in records]
    return [f.result(timeout=60).stored for f in futures]
