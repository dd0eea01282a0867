"""Turning the simulator's real HTTP responses into what Open WebUI 0.12.4 hands a filter."""

from __future__ import annotations

import json
from numbers import Number
from typing import Any

import httpx

from openrouter_sim import OpenRouterSimulator
from tests.conftest import parse_sse

SUMMED_KEYS = ("input_tokens", "output_tokens", "total_tokens", "cost")
DETAIL_KEYS = ("prompt_tokens_details", "completion_tokens_details")


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
    parts = []
    for event in events:
        for choice in event.get("choices") or []:
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def as_owui_json(data: Any) -> Any:
    """Open WebUI parses bodies into plain JSON values: money arrives as float."""
    return json.loads(json.dumps(data, default=float))
