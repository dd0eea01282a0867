"""Tests of the OpenRouter simulator over real loopback HTTP, validated against OpenRouter's spec."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from openrouter_sim import (
    BYOK_FEE_RATE,
    MODELS,
    Directives,
    GenerationRecord,
    LookupFault,
    LookupFaultKind,
    OpenRouterSimulator,
    RecordedRequest,
    detect_task,
    format_decimal,
    parse_directives,
    to_json,
)
from openrouter_sim.server import SELF_TEST_HEADER
from tests.e2e.owui import site_packages

SPEC_PATH = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "openrouter-openapi.yaml"
if not SPEC_PATH.exists():  # fall back to the absolute location used in the project brief
    SPEC_PATH = Path("/work/shared/reference/openrouter-openapi.yaml")
SPEC_URI = "urn:openrouter-openapi"
GEN_ID_RE = re.compile(r"^gen-\d{10}-[A-Za-z0-9]{20}$")
KEY = "sk-or-v1-0123456789abcdefsimtest"
AUTH = {"Authorization": f"Bearer {KEY}"}
_TLS = ssl.create_default_context()  # shared: building one per httpx.Client is slow

Json = dict[str, Any]
Validate = Callable[[str, Any], None]


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


def _nullable_to_type(node: Any) -> Any:
    """OpenAPI 3.0 ``nullable: true`` -> JSON Schema type lists (the 3.1 spec should not need it)."""
    if isinstance(node, dict):
        out = {k: _nullable_to_type(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") is True and "type" in out:
            kinds = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*kinds, "null"] if "null" not in kinds else kinds
        return out
    if isinstance(node, list):
        return [_nullable_to_type(v) for v in node]
    return node


@pytest.fixture(scope="module")
def spec() -> Json:
    if not SPEC_PATH.exists():
        message = f"OpenAPI spec not found at {SPEC_PATH}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    text = SPEC_PATH.read_text(encoding="utf-8")
    doc = yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader: the C one when built)
    assert str(doc["openapi"]).startswith("3.1")
    if re.search(r"^\s*nullable:", text, re.MULTILINE):
        doc = _nullable_to_type(doc)
    return doc  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def validate(spec: Json) -> Validate:
    """``validate(pointer, instance)``: validate against the spec node at JSON pointer ``pointer``
    (e.g. ``/components/schemas/ChatResult``), resolving ``#/components/schemas/...`` refs."""
    registry: Registry[Any] = Registry().with_resource(
        SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    cache: dict[str, Draft202012Validator] = {}

    def check(pointer: str, instance: Any) -> None:
        if pointer not in cache:
            cache[pointer] = Draft202012Validator({"$ref": f"{SPEC_URI}#{pointer}"}, registry=registry)
        errors = sorted(cache[pointer].iter_errors(instance), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])

    return check


def _schema(name: str) -> str:
    return f"/components/schemas/{name}"


def _response_schema(path: str, status: str) -> str:
    escaped = path.replace("~", "~0").replace("/", "~1")
    return f"/paths/{escaped}/get/responses/{status}/content/application~1json/schema"


def _chat_error_schema(status: int) -> str:
    return f"/paths/~1chat~1completions/post/responses/{status}/content/application~1json/schema"


@pytest.fixture
def sim() -> Iterator[OpenRouterSimulator]:
    with OpenRouterSimulator(host="127.0.0.1", port=0) as simulator:
        yield simulator


@pytest.fixture
def client(sim: OpenRouterSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers=AUTH, timeout=10, verify=_TLS) as c:
        yield c


@pytest.fixture
def anon(sim: OpenRouterSimulator) -> Iterator[httpx.Client]:
    """A client that sends no API key."""
    with httpx.Client(base_url=sim.base_url, timeout=10, verify=_TLS) as c:
        yield c


def loads(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


def chat_body(text: str, model: str = "openai/gpt-4o-mini", stream: bool = False, **extra: Any) -> Json:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream, **extra}


def parse_sse(raw: str) -> tuple[list[str], list[Any]]:
    """(comment lines, data payloads) of an SSE body; payloads are parsed JSON or the string [DONE]."""
    comments: list[str] = []
    events: list[Any] = []
    for block in raw.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else loads(data))
    return comments, events


def stream_chat(client: httpx.Client, body: Json) -> tuple[httpx.Response, str, list[str], list[Any]]:
    response = client.post("/chat/completions", json=body)
    comments, events = parse_sse(response.text)
    return response, response.text, comments, events


def expected_charge(model: str, prompt: int, completion: int) -> tuple[Decimal, Decimal]:
    info = MODELS[model]
    return prompt * info.prompt_price, completion * info.completion_price


def prompt_tokens_of(*texts: str) -> int:
    return sum(math.ceil(len(t) / 4) + 4 for t in texts)


# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------


def test_parse_directives_defaults_and_flags() -> None:
    assert parse_directives("just a question") == Directives()
    assert Directives().shape == "B"
    d = parse_directives(
        "hi [sim:shape=a] [sim:byok] [sim:tool-call] [sim:chunks=7] [sim:cached=12] [sim:cache-write=3]"
        " [sim:reasoning=9] [sim:null-cost] [sim:no-usage] [sim:delay-ms=15] [sim:error=429]"
    )
    assert d == Directives(
        shape="A",
        byok=True,
        tool_call=True,
        chunks=7,
        cached=12,
        cache_write=3,
        reasoning=9,
        null_cost=True,
        no_usage=True,
        delay_ms=15,
        error=429,
    )


def test_parse_directives_midstream_and_invalid_values() -> None:
    assert parse_directives("[sim:midstream-error]") == Directives(midstream_error=True)
    assert parse_directives("[sim:midstream-error=server_error]").midstream_error_code == "server_error"
    assert parse_directives("[sim:midstream-error=503]").midstream_error_code == 503
    both = parse_directives("[sim:midstream-error-usage]")
    assert both.midstream_error and both.midstream_error_usage
    # unknown names and malformed values are ignored; the last occurrence wins
    assert parse_directives("[sim:shape=Z] [sim:chunks=x] [sim:error=200] [sim:bogus]") == Directives()
    assert parse_directives("[sim:shape=A] [sim:shape=C]").shape == "C"


def test_format_decimal_and_to_json_write_exact_plain_literals() -> None:
    assert format_decimal(Decimal("0.00002415")) == "0.00002415"
    assert format_decimal(Decimal("2.415E-5")) == "0.00002415"
    assert format_decimal(Decimal("0.0000100")) == "0.00001"
    assert format_decimal(Decimal("1E+2")) == "100"
    assert format_decimal(Decimal("0E-12")) == "0"
    assert format_decimal(Decimal("0.1753356099")) == "0.1753356099"
    text = to_json({"cost": Decimal(29) * Decimal("0.00000015"), "n": 1, "ok": True, "x": None, "s": "é"})
    assert text == '{"cost":0.00000435,"n":1,"ok":true,"x":null,"s":"é"}'
    assert loads(text)["cost"] == Decimal("0.00000435")


TASK_SAMPLES = {
    "title": '### Task:\nGenerate a concise title for the chat.\n### Output:\nJSON format: { "title": "x" }\n'
    "### Chat History:\n<chat_history>\nUSER: hello\n</chat_history>",
    "tags": '### Task:\nGenerate broad tags for the chat.\n### Output:\nJSON format: { "tags": ["a"] }\n'
    "### Chat History:\n<chat_history>\nUSER: hello\n</chat_history>",
    "follow_ups": "### Task:\nSuggest follow-up messages.\n### Output:\n"
    'JSON format: { "follow_ups": ["a"] }\n### Chat History:\n<chat_history>\nUSER: hi\n</chat_history>',
}


@pytest.mark.parametrize("task", sorted(TASK_SAMPLES))
def test_detect_task(task: str) -> None:
    assert detect_task(TASK_SAMPLES[task]) == task


def test_detect_task_ignores_ordinary_chats_and_history() -> None:
    assert detect_task("Please suggest a title and some tags for my essay") is None
    # a user message quoting a task-like JSON inside the chat history does not change the task
    text = TASK_SAMPLES["title"].replace("USER: hello", 'USER: give me { "tags": ["x"] } [sim:byok]')
    assert detect_task(text) == "title"
    assert (
        detect_task('### Task:\nRespond using the context.\n<chat_history>{ "title": 1 }</chat_history>')
        is None
    )


def test_detect_task_on_open_webui_default_templates(openwebui_python: Path) -> None:
    """The real Open WebUI 0.12.4 templates, read (not imported) from the pinned install."""
    config = site_packages(openwebui_python) / "open_webui" / "config.py"
    consts: dict[str, str] = {}
    for node in ast.parse(config.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    consts[target.id] = node.value.value
    history = "USER: What is the capital of France? [sim:error=502]\nASSISTANT: Paris."
    expected = {
        "DEFAULT_TITLE_GENERATION_PROMPT_TEMPLATE": "title",
        "DEFAULT_TAGS_GENERATION_PROMPT_TEMPLATE": "tags",
        "DEFAULT_FOLLOW_UP_GENERATION_PROMPT_TEMPLATE": "follow_ups",
        "DEFAULT_QUERY_GENERATION_PROMPT_TEMPLATE": None,
        "DEFAULT_RAG_TEMPLATE": None,
        "DEFAULT_IMAGE_PROMPT_GENERATION_PROMPT_TEMPLATE": None,
    }
    for name, task in expected.items():
        prompt = re.sub(r"\{\{MESSAGES:[^}]*\}\}", history, consts[name])
        assert detect_task(prompt) == task, name


# --------------------------------------------------------------------------------------------
# GET endpoints
# --------------------------------------------------------------------------------------------


def test_models_list(sim: OpenRouterSimulator, anon: httpx.Client, validate: Validate) -> None:
    response = anon.get("/models")  # no key needed, as live
    assert response.status_code == 200
    payload = loads(response.text)
    validate(_schema("ModelsListResponse"), payload)
    by_id = {m["id"]: m for m in payload["data"]}
    assert set(MODELS) | {"openrouter/auto"} == set(by_id)
    mini = by_id["openai/gpt-4o-mini"]
    assert mini["pricing"]["prompt"] == "0.00000015"
    assert mini["pricing"]["completion"] == "0.0000006"
    assert (
        Decimal(by_id["deepseek/deepseek-r1"]["pricing"]["prompt"])
        == MODELS["deepseek/deepseek-r1"].prompt_price
    )
    assert sim.requests[-1].path == "/api/v1/models"


# Marks this file's deliberate requests to /generations, which the session-wide check in
# tests/conftest.py (no request ever reaches the bulk listing) leaves out.
SELF_TEST = {SELF_TEST_HEADER: "1"}


def test_generations_plural_and_unknown_paths_are_404_and_recorded(
    client: httpx.Client, sim: OpenRouterSimulator
) -> None:
    for method, path in [
        ("GET", "/generations"),
        ("GET", "/nope"),
        ("POST", "/generation"),
        ("GET", "/credits"),
    ]:
        response = client.request(method, path, params={"limit": "5"}, headers=SELF_TEST)
        assert response.status_code == 404
        assert response.json() == {"error": {"message": "Not Found", "code": 404}}
    paths = [(r.method, r.path, r.query) for r in sim.requests]
    assert paths[0] == ("GET", "/api/v1/generations", {"limit": "5"})
    assert [p[1] for p in paths] == [
        "/api/v1/generations",
        "/api/v1/nope",
        "/api/v1/generation",
        "/api/v1/credits",
    ]


def test_generation_lookup_404_window_then_data(
    client: httpx.Client, anon: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    sim.generation_ready_after_s = 0.3
    body = chat_body("Tell me something [sim:cached=8]", model="anthropic/claude-sonnet-4.5", user="u-42")
    response = client.post("/chat/completions", json=body, headers={"HTTP-Referer": "https://chat.example"})
    gen_id = response.json()["id"]
    missing = client.get("/generation", params={"id": gen_id})
    assert missing.status_code == 404
    assert missing.json() == {"error": {"message": "Generation not found", "code": 404}}
    validate(_response_schema("/generation", "404"), missing.json())
    unknown = client.get("/generation", params={"id": "gen-1700000000-AAAAAAAAAAAAAAAAAAAA"})
    assert unknown.status_code == 404
    time.sleep(0.35)
    found = client.get("/generation", params={"id": gen_id})
    assert found.status_code == 200
    payload = loads(found.text)
    validate(_schema("GenerationResponse"), payload)
    data = payload["data"]
    record = sim.generations[gen_id]
    usage = loads(response.text)["usage"]
    assert data["id"] == gen_id
    assert data["total_cost"] == data["usage"] == usage["cost"] == record.cost
    assert data["upstream_inference_cost"] == usage["cost_details"]["upstream_inference_cost"]
    assert (
        data["tokens_prompt"] == usage["prompt_tokens"]
        and data["tokens_completion"] == usage["completion_tokens"]
    )
    assert data["native_tokens_cached"] == 8
    # 8 cached tokens read at 0.0000003 instead of 0.000003
    assert data["cache_discount"] == 8 * (Decimal("0.000003") - Decimal("0.0000003"))
    assert data["model"] == "anthropic/claude-sonnet-4.5" and data["provider_name"] == "Anthropic"
    assert data["streamed"] is False and data["cancelled"] is False and data["finish_reason"] == "stop"
    assert data["external_user"] == "u-42" and data["http_referer"] == "https://chat.example"
    assert data["is_byok"] is False
    assert client.get("/generation").status_code == 400
    assert anon.get("/generation", params={"id": gen_id}).status_code == 401


def test_key_sums_generations(
    client: httpx.Client, anon: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    a = loads(client.post("/chat/completions", json=chat_body("first")).text)["usage"]
    b = loads(client.post("/chat/completions", json=chat_body("second [sim:byok]")).text)["usage"]
    response = client.get("/key")
    assert response.status_code == 200
    payload = loads(response.text)
    validate(_response_schema("/key", "200"), payload)
    data = payload["data"]
    assert data["usage"] == data["usage_daily"] == data["usage_weekly"] == data["usage_monthly"]
    assert data["usage"] == a["cost"] + b["cost"]
    assert data["byok_usage"] == b["cost_details"]["upstream_inference_cost"]
    assert data["limit"] is None and data["limit_remaining"] is None and data["is_free_tier"] is False
    assert data["label"].startswith(KEY[:8]) and "..." in data["label"]
    assert anon.get("/key").status_code == 401


# --------------------------------------------------------------------------------------------
# chat completions: non-streaming
# --------------------------------------------------------------------------------------------


def test_non_streaming_completion(client: httpx.Client, sim: OpenRouterSimulator, validate: Validate) -> None:
    text = "What is the capital of France?"
    response = client.post("/chat/completions", json=chat_body(text))
    assert response.status_code == 200
    raw = response.text
    payload = loads(raw)
    # The spec's ChatResult has no top-level `provider`; live responses always carry it (see the
    # notes). The schema does not forbid extra properties, so validation still applies.
    validate(_schema("ChatResult"), payload)
    assert GEN_ID_RE.match(payload["id"])
    assert response.headers["X-Generation-Id"] == payload["id"]
    assert payload["provider"] == "OpenAI" and payload["model"] == "openai/gpt-4o-mini"
    assert payload["object"] == "chat.completion" and payload["system_fingerprint"] is None
    message = payload["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    assert payload["choices"][0]["finish_reason"] == "stop"

    usage = payload["usage"]
    assert list(usage) == [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost",
        "is_byok",
        "prompt_tokens_details",
        "cost_details",
        "completion_tokens_details",
    ]
    assert usage["prompt_tokens"] == prompt_tokens_of(text)
    assert usage["completion_tokens"] == math.ceil(len(message["content"]) / 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    prompt_cost, completion_cost = expected_charge(
        "openai/gpt-4o-mini", usage["prompt_tokens"], usage["completion_tokens"]
    )
    assert usage["cost"] == prompt_cost + completion_cost
    assert usage["is_byok"] is False
    # non-BYOK: upstream_inference_cost repeats cost (live since early 2026); adding them double counts
    assert usage["cost_details"] == {
        "upstream_inference_cost": usage["cost"],
        "upstream_inference_prompt_cost": prompt_cost,
        "upstream_inference_completions_cost": completion_cost,
    }
    assert usage["prompt_tokens_details"] == {
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "audio_tokens": 0,
        "video_tokens": 0,
    }
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0, "image_tokens": 0, "audio_tokens": 0}
    # money is written as exact plain decimal literals
    assert f'"cost":{format_decimal(usage["cost"])},' in raw
    assert not re.search(r"[:,\[]-?\d+(?:\.\d+)?[eE][-+]?\d", raw)

    record = sim.generations[payload["id"]]
    assert isinstance(record, GenerationRecord)
    assert record.usage == usage and record.cost == usage["cost"] == record.upstream_inference_cost
    assert record.spend == usage["cost"]
    assert record.streamed is False and record.finish_reason == "stop" and record.error is None
    assert record.requested_model == record.served_model == "openai/gpt-4o-mini"
    assert record.request_body == chat_body(text)
    request = sim.requests[-1]
    assert isinstance(request, RecordedRequest)
    assert request.method == "POST" and request.path == "/api/v1/chat/completions" and request.task is None
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body == chat_body(text)


def test_exact_decimals_that_floats_would_round(client: httpx.Client) -> None:
    # 0.0000003833 (cache write) and a 5% fee produce digits a float round-trip would mangle
    body = chat_body("x" * 37 + " [sim:byok] [sim:cache-write=7]", model="google/gemini-2.5-flash")
    raw = client.post("/chat/completions", json=body).text
    usage = loads(raw)["usage"]
    info = MODELS["google/gemini-2.5-flash"]
    prompt = usage["prompt_tokens"]
    provider = (
        (prompt - 7) * info.prompt_price
        + 7 * Decimal("0.0000003833")
        + usage["completion_tokens"] * info.completion_price
    )
    assert usage["cost_details"]["upstream_inference_cost"] == provider
    assert usage["cost"] == provider * BYOK_FEE_RATE
    assert f'"cost":{format_decimal(provider * BYOK_FEE_RATE)},' in raw
    assert f'"upstream_inference_cost":{format_decimal(provider)},' in raw
    assert not re.search(r"[:,\[]-?\d+(?:\.\d+)?[eE][-+]?\d", raw)


def test_deterministic_answers_and_usage(client: httpx.Client) -> None:
    first = client.post("/chat/completions", json=chat_body("Same prompt")).json()
    second = client.post("/chat/completions", json=chat_body("Same prompt")).json()
    assert first["id"] != second["id"]
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    assert first["usage"] == second["usage"]


def test_auth_and_bad_requests(
    sim: OpenRouterSimulator, client: httpx.Client, anon: httpx.Client, validate: Validate
) -> None:
    no_key = anon.post("/chat/completions", json=chat_body("hi"))
    assert no_key.status_code == 401
    validate(_chat_error_schema(401), no_key.json())
    empty = anon.post("/chat/completions", json=chat_body("hi"), headers={"Authorization": "Bearer"})
    assert empty.status_code == 401
    assert sim.requests[0].path == "/api/v1/chat/completions"  # recorded even when refused
    bad_model = client.post("/chat/completions", json=chat_body("hi", model="nope/none"))
    assert bad_model.status_code == 400 and "not a valid model" in bad_model.json()["error"]["message"]
    bad_json = client.post(
        "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 400 and sim.requests[-1].body is None
    assert not sim.generations


def test_auto_router_serves_another_model(client: httpx.Client, sim: OpenRouterSimulator) -> None:
    payload = client.post("/chat/completions", json=chat_body("route me", model="openrouter/auto")).json()
    assert payload["model"] != "openrouter/auto" and payload["model"] in MODELS
    record = sim.generations[payload["id"]]
    assert record.requested_model == "openrouter/auto" and record.served_model == payload["model"]
    assert record.provider == payload["provider"] == MODELS[payload["model"]].provider
    data = client.get("/generation", params={"id": payload["id"]}).json()["data"]
    assert data["router"] == "openrouter/auto" and data["model"] == payload["model"]


# --------------------------------------------------------------------------------------------
# chat completions: streaming
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["A", "B", "C", None])
def test_stream_usage_shapes(
    shape: str | None, client: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    directive = f" [sim:shape={shape}]" if shape else ""  # None: the default, which is B
    response, raw, comments, events = stream_chat(
        client, chat_body(f"Explain streams{directive}", stream=True)
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert comments and all(c == ": OPENROUTER PROCESSING" for c in comments)
    assert raw.startswith(": OPENROUTER PROCESSING\n\n")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    gen_id = response.headers["X-Generation-Id"]
    for chunk in chunks:
        # top-level `provider` is absent from the spec's ChatStreamChunk but on every live chunk
        validate(_schema("ChatStreamChunk"), chunk)
        assert (
            chunk["id"] == gen_id and chunk["provider"] == "OpenAI" and chunk["model"] == "openai/gpt-4o-mini"
        )
        assert chunk["object"] == "chat.completion.chunk"
    with_usage = [i for i, c in enumerate(chunks) if "usage" in c]
    assert len(with_usage) == 1
    usage_chunk = chunks[with_usage[0]]
    finish_index = next(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["finish_reason"])
    assert chunks[finish_index]["choices"][0]["finish_reason"] == "stop"
    if shape == "A":
        assert with_usage[0] == finish_index + 1 == len(chunks) - 1
        assert usage_chunk["choices"][0]["finish_reason"] is None
        assert usage_chunk["choices"][0]["delta"].get("content", "") == ""
    elif shape == "C":
        assert with_usage[0] == finish_index == len(chunks) - 1
        assert usage_chunk["choices"][0]["finish_reason"] == "stop"
    else:
        assert with_usage[0] == finish_index + 1 == len(chunks) - 1
        assert usage_chunk["choices"] == []
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == math.ceil(len(content) / 4)
    assert usage["cost_details"]["upstream_inference_cost"] == usage["cost"]
    assert f'"cost":{format_decimal(usage["cost"])},' in raw
    record = sim.generations[gen_id]
    assert record.streamed is True and record.usage == usage and record.finish_reason == "stop"
    # stream and non-stream answers to the same prompt are identical
    body = chat_body(f"Explain streams{directive}")
    assert client.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"] == content


def test_stream_chunk_count_directive(client: httpx.Client) -> None:
    _, _, _, events = stream_chat(client, chat_body("bench [sim:chunks=25]", stream=True))
    contents = [
        c["choices"][0]["delta"]["content"]
        for c in events[:-1]
        if c["choices"]
        and c["choices"][0]["finish_reason"] is None
        and c["choices"][0]["delta"].get("content")
    ]
    assert len(contents) == 25


def test_stream_delay(sim: OpenRouterSimulator, client: httpx.Client) -> None:
    started = time.monotonic()
    stream_chat(client, chat_body("slow [sim:chunks=4] [sim:delay-ms=30]", stream=True))
    assert time.monotonic() - started >= 0.15  # 7 pauses of 30 ms
    sim.chunk_delay_s = 0.01
    started = time.monotonic()
    stream_chat(client, chat_body("fast [sim:chunks=4] [sim:delay-ms=0]", stream=True))
    assert time.monotonic() - started < 0.15


def test_reasoning_model_streams_reasoning_first(client: httpx.Client, validate: Validate) -> None:
    _response, _, comments, events = stream_chat(
        client, chat_body("Think", model="deepseek/deepseek-r1", stream=True)
    )
    assert len(comments) == 2
    chunks = events[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasoning_at = [i for i, d in enumerate(deltas) if d.get("reasoning")]
    content_at = [i for i, d in enumerate(deltas) if d.get("content")]
    assert reasoning_at and content_at and max(reasoning_at) < min(content_at)
    reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == math.ceil(len(reasoning) / 4)
    assert usage["completion_tokens"] == math.ceil(len(content) / 4) + math.ceil(len(reasoning) / 4)
    assert chunks[-1]["provider"] == "DeepInfra"
    forced = client.post("/chat/completions", json=chat_body("Think [sim:reasoning=120]")).json()
    validate(_schema("ChatResult"), forced)
    assert forced["usage"]["completion_tokens_details"]["reasoning_tokens"] == 120
    assert forced["choices"][0]["message"]["reasoning"]
    assert forced["usage"]["completion_tokens"] == 120 + math.ceil(
        len(forced["choices"][0]["message"]["content"]) / 4
    )


def test_byok_usage_and_spend(client: httpx.Client, sim: OpenRouterSimulator) -> None:
    response, _raw, _, events = stream_chat(
        client, chat_body("my own key [sim:byok]", model="openai/gpt-4o", stream=True)
    )
    usage = events[-2]["usage"]
    assert usage["is_byok"] is True
    details = usage["cost_details"]
    provider = details["upstream_inference_prompt_cost"] + details["upstream_inference_completions_cost"]
    assert details["upstream_inference_cost"] == provider
    assert provider == expected_charge("openai/gpt-4o", usage["prompt_tokens"], usage["completion_tokens"])[
        0
    ] + (usage["completion_tokens"] * MODELS["openai/gpt-4o"].completion_price)
    assert usage["cost"] == provider * Decimal("0.05")
    record = sim.generations[response.headers["X-Generation-Id"]]
    assert record.is_byok and record.cost == usage["cost"] and record.upstream_inference_cost == provider
    assert record.spend == usage["cost"] + provider
    plain_id = client.post("/chat/completions", json=chat_body("no byok")).json()["id"]
    plain = sim.generations[plain_id]
    assert plain.spend == plain.cost == plain.upstream_inference_cost


def test_cached_tokens_discount(client: httpx.Client) -> None:
    usage = loads(client.post("/chat/completions", json=chat_body("cached [sim:cached=1000]")).text)["usage"]
    info = MODELS["openai/gpt-4o-mini"]
    assert usage["prompt_tokens"] >= 1000 and usage["prompt_tokens_details"]["cached_tokens"] == 1000
    expected = (
        (usage["prompt_tokens"] - 1000) * info.prompt_price
        + 1000 * Decimal("0.000000075")
        + usage["completion_tokens"] * info.completion_price
    )
    assert usage["cost"] == expected
    assert (
        usage["cost"]
        < usage["prompt_tokens"] * info.prompt_price + usage["completion_tokens"] * info.completion_price
    )


@pytest.mark.parametrize("stream", [True, False])
def test_null_cost_and_no_usage(stream: bool, client: httpx.Client, sim: OpenRouterSimulator) -> None:
    response = client.post("/chat/completions", json=chat_body("nothing [sim:null-cost]", stream=stream))
    gen_id = response.headers["X-Generation-Id"]
    usage = parse_sse(response.text)[1][-2]["usage"] if stream else response.json()["usage"]
    assert usage["cost"] is None and usage["prompt_tokens"] > 0
    assert sim.generations[gen_id].cost is None and sim.generations[gen_id].spend == 0

    response = client.post("/chat/completions", json=chat_body("nothing [sim:no-usage]", stream=stream))
    gen_id = response.headers["X-Generation-Id"]
    if stream:
        events = parse_sse(response.text)[1]
        assert events[-1] == "[DONE]" and not any("usage" in e for e in events[:-1])
    else:
        assert "usage" not in response.json()
    record = sim.generations[gen_id]
    assert record.usage == {}
    assert record.cost is not None and record.cost > 0  # still billed: /generation reports it
    data = loads(client.get("/generation", params={"id": gen_id}).text)["data"]
    assert data["total_cost"] == record.cost


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "code"),
    [("[sim:midstream-error]", 502), ("[sim:midstream-error=server_error]", "server_error")],
)
def test_midstream_error(
    directive: str, code: int | str, client: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    response, _, _, events = stream_chat(client, chat_body(f"break {directive}", stream=True))
    assert response.status_code == 200
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    error_chunk = chunks[-1]
    assert error_chunk["error"]["code"] == code and error_chunk["error"]["message"]
    assert error_chunk["choices"] == [
        {
            "index": 0,
            "delta": {"content": ""},
            "finish_reason": "error",
            "native_finish_reason": "error",
            "logprobs": None,
        }
    ]
    assert "usage" not in error_chunk
    content = [c for c in chunks[:-1] if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert content  # some content arrived before the error
    assert not any(c["choices"] and c["choices"][0]["finish_reason"] == "stop" for c in chunks)
    if isinstance(code, int):
        validate(_schema("ChatStreamChunk"), error_chunk)
    else:
        # The spec types ChatStreamChunk.error.code as an integer, but live streams also send string
        # codes such as "server_error" (see the notes): validate the chunk without the code.
        validate(_schema("ChatStreamChunk"), {**error_chunk, "error": {**error_chunk["error"], "code": 0}})
    record = sim.generations[response.headers["X-Generation-Id"]]
    assert record.finish_reason == "error" and record.error == error_chunk["error"]
    assert record.usage == {} and record.cost == 0  # errored completions are not billed


def test_midstream_error_with_usage(
    client: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    response, _, _, events = stream_chat(client, chat_body("break [sim:midstream-error-usage]", stream=True))
    error_chunk = events[-2]
    validate(_schema("ChatStreamChunk"), error_chunk)
    assert error_chunk["choices"][0]["finish_reason"] == "error"
    usage = error_chunk["usage"]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-2] if c["choices"])
    assert usage["completion_tokens"] == math.ceil(len(streamed) / 4)
    assert usage["cost"] == 0
    assert sim.generations[response.headers["X-Generation-Id"]].usage == usage


@pytest.mark.parametrize("status", [401, 402, 403, 429, 502, 503])
@pytest.mark.parametrize("stream", [True, False])
def test_pre_stream_errors(
    status: int, stream: bool, client: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    response = client.post("/chat/completions", json=chat_body(f"fail [sim:error={status}]", stream=stream))
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    validate(_chat_error_schema(status), payload)
    assert payload["error"]["code"] == status and payload["error"]["message"]
    assert isinstance(payload["error"].get("metadata", {}), dict)
    assert ("Retry-After" in response.headers) == (status == 429)
    assert "X-Generation-Id" not in response.headers
    assert not sim.generations and len(sim.requests) == 1


# --------------------------------------------------------------------------------------------
# tools and Open WebUI tasks
# --------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}


def test_tool_call_round_trip(client: httpx.Client, sim: OpenRouterSimulator, validate: Validate) -> None:
    first_body = chat_body("Weather in Paris? [sim:tool-call]", stream=True, tools=[WEATHER_TOOL])
    response, _, _, events = stream_chat(client, first_body)
    chunks = events[:-1]
    for chunk in chunks:
        validate(_schema("ChatStreamChunk"), chunk)
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    arguments = "".join(tc["function"].get("arguments", "") for tc in calls)
    assert json.loads(arguments) == {"city": "example"}
    finish = [
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert finish == ["tool_calls"]
    first_usage = chunks[-1]["usage"]
    first_id = response.headers["X-Generation-Id"]

    second_body = {
        "model": "openai/gpt-4o-mini",
        "stream": True,
        "tools": [WEATHER_TOOL],
        "messages": [
            *first_body["messages"],
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": calls[0]["id"],
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temp": 21}'},
        ],
    }
    response2, _, _, events2 = stream_chat(client, second_body)
    chunks2 = events2[:-1]
    assert not any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks2)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks2 if c["choices"])
    second_id = response2.headers["X-Generation-Id"]
    assert second_id != first_id
    gens = sim.generations
    assert gens[first_id].finish_reason == "tool_calls" and gens[second_id].finish_reason == "stop"
    assert gens[first_id].usage == first_usage and gens[second_id].usage == chunks2[-1]["usage"]
    assert gens[second_id].usage["prompt_tokens"] > first_usage["prompt_tokens"]

    plain = client.post("/chat/completions", json={**first_body, "stream": False}).json()
    validate(_schema("ChatResult"), plain)
    assert plain["choices"][0]["finish_reason"] == "tool_calls"
    assert plain["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize(
    ("task", "key"), [("title", "title"), ("tags", "tags"), ("follow_ups", "follow_ups")]
)
def test_open_webui_task_requests(
    task: str, key: str, client: httpx.Client, sim: OpenRouterSimulator
) -> None:
    # the embedded chat history carries the user's directives; task requests ignore them
    prompt = TASK_SAMPLES[task].replace("USER: ", "USER: [sim:error=502] [sim:no-usage] ")
    response = client.post("/chat/completions", json=chat_body(prompt))
    assert response.status_code == 200
    payload = response.json()
    answer = json.loads(payload["choices"][0]["message"]["content"])
    assert list(answer) == [key]
    if key == "tags":
        assert answer == {"tags": ["General"]}
    elif key == "follow_ups":
        assert len(answer["follow_ups"]) >= 2 and all(isinstance(s, str) for s in answer["follow_ups"])
    else:
        assert isinstance(answer["title"], str) and answer["title"]
    assert payload["usage"]["cost"] > 0
    assert sim.requests[-1].task == task
    assert sim.generations[payload["id"]].task == task
    # streamed task requests work too
    _, _, _, events = stream_chat(client, chat_body(prompt, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"])
    assert json.loads(text) == answer


def test_list_content_and_last_user_message(client: httpx.Client) -> None:
    body = {
        "model": "openai/gpt-4o-mini",
        "messages": [
            {"role": "user", "content": "earlier [sim:error=503]"},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "now"}, {"type": "text", "text": "[sim:byok]"}],
            },
        ],
    }
    payload = client.post("/chat/completions", json=body).json()
    assert payload["usage"]["is_byok"] is True


# --------------------------------------------------------------------------------------------
# lifecycle
# --------------------------------------------------------------------------------------------


def test_cancelled_stream_is_recorded_and_billed_for_what_was_streamed(
    sim: OpenRouterSimulator, client: httpx.Client, validate: Validate
) -> None:
    sim.chunk_delay_s = 0.02
    sim.cancelled_ready_extra_s = 0.5
    text = "long [sim:chunks=200]"
    with (
        httpx.Client(base_url=sim.base_url, headers=AUTH, verify=_TLS) as c,
        c.stream("POST", "/chat/completions", json=chat_body(text, stream=True)) as response,
    ):
        gen_id = response.headers["X-Generation-Id"]
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                break
    deadline = time.monotonic() + 3
    while gen_id not in sim.generations and time.monotonic() < deadline:
        time.sleep(0.02)
    record = sim.generations[gen_id]
    assert record.cancelled is True and record.finish_reason is None and record.usage == {}
    assert 0 < record.completion_tokens < 200
    # a partial bill, priced like any generation: the whole prompt and the tokens streamed
    prompt_cost, completion_cost = expected_charge(
        "openai/gpt-4o-mini", prompt_tokens_of(text), record.completion_tokens
    )
    assert record.prompt_tokens == prompt_tokens_of(text)
    assert record.cost == record.spend == prompt_cost + completion_cost > 0

    # /generation takes cancelled_ready_extra_s longer for it than for a finished generation
    finished_id = client.post("/chat/completions", json=chat_body("short")).json()["id"]
    assert client.get("/generation", params={"id": finished_id}).status_code == 200
    assert client.get("/generation", params={"id": gen_id}).status_code == 404
    time.sleep(max(0.0, record.completed_at + 0.52 - time.time()))
    found = client.get("/generation", params={"id": gen_id})
    assert found.status_code == 200
    payload = loads(found.text)
    validate(_schema("GenerationResponse"), payload)
    data = payload["data"]
    assert data["cancelled"] is True and data["streamed"] is True and data["finish_reason"] is None
    assert data["total_cost"] == data["usage"] == record.cost
    assert data["tokens_prompt"] == record.prompt_tokens
    assert data["tokens_completion"] == record.completion_tokens


def test_cancelled_tool_call_and_reasoning_streams_bill_what_was_streamed(sim: OpenRouterSimulator) -> None:
    sim.chunk_delay_s = 0.02

    def break_off(body: Json, stop_at: str) -> GenerationRecord:
        with (
            httpx.Client(base_url=sim.base_url, headers=AUTH, verify=_TLS) as c,
            c.stream("POST", "/chat/completions", json=body) as response,
        ):
            gen_id = response.headers["X-Generation-Id"]
            for line in response.iter_lines():
                if stop_at in line:
                    break
        deadline = time.monotonic() + 3
        while gen_id not in sim.generations and time.monotonic() < deadline:
            time.sleep(0.02)
        return sim.generations[gen_id]

    tool_body = chat_body("Weather? [sim:tool-call]", stream=True, tools=[WEATHER_TOOL])
    tool = break_off(tool_body, '"name":"get_weather"')
    assert tool.cancelled and tool.completion_tokens >= math.ceil(len("get_weather") / 4)
    think = chat_body("Think [sim:chunks=100]", model="deepseek/deepseek-r1", stream=True)
    reasoning = break_off(think, '"reasoning":"')
    sim.chunk_delay_s = 0.0  # (a non-streamed answer waits the delay of every chunk)
    planned = httpx.post(
        f"{sim.base_url}/chat/completions", json={**think, "stream": False}, headers=AUTH, verify=_TLS
    ).json()["usage"]["completion_tokens_details"]["reasoning_tokens"]
    # part of the reasoning went out: its tokens are billed, not the whole planned reasoning
    assert reasoning.cancelled and 0 < reasoning.completion_tokens < planned
    assert reasoning.cost == reasoning.spend > 0


def test_lifecycle_snapshots_and_clear() -> None:
    simulator = OpenRouterSimulator(port=0)
    with pytest.raises(RuntimeError):
        _ = simulator.base_url
    with simulator as sim, httpx.Client(base_url=sim.base_url, headers=AUTH, verify=_TLS) as c:
        assert re.match(r"^http://127\.0\.0\.1:\d+/api/v1$", sim.base_url)
        c.post("/chat/completions", json=chat_body("hi"))
        snapshot = sim.requests
        generations = sim.generations
        c.get("/models")
        assert len(snapshot) == 1 and len(sim.requests) == 2
        generations.clear()
        assert len(sim.generations) == 1
        sim.clear()
        assert sim.requests == [] and sim.generations == {}
        url = sim.base_url
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/models", timeout=1, verify=_TLS)


def test_non_streaming_midstream_error(client: httpx.Client, sim: OpenRouterSimulator) -> None:
    # Without streaming the status is already committed too: 200 with a top-level error.
    response = client.post("/chat/completions", json=chat_body("break [sim:midstream-error=server_error]"))
    assert response.status_code == 200
    payload = response.json()
    assert payload["error"]["code"] == "server_error"
    assert payload["choices"][0]["finish_reason"] == "error" and "usage" not in payload
    record = sim.generations[response.headers["X-Generation-Id"]]
    assert record.finish_reason == "error" and record.error == payload["error"] and record.spend == 0


def test_max_tokens_truncates_with_length(client: httpx.Client) -> None:
    payload = client.post("/chat/completions", json=chat_body("short please", max_tokens=3)).json()
    assert payload["choices"][0]["finish_reason"] == "length"
    assert payload["usage"]["completion_tokens"] == 3
    assert len(payload["choices"][0]["message"]["content"]) == 12


def test_cache_write_surcharge_in_generation(client: httpx.Client, validate: Validate) -> None:
    body = chat_body("write the cache [sim:cache-write=100]", model="anthropic/claude-sonnet-4.5")
    usage = loads(client.post("/chat/completions", json=body).text)
    gen_id, usage = usage["id"], usage["usage"]
    assert usage["prompt_tokens_details"]["cache_write_tokens"] == 100
    info = MODELS["anthropic/claude-sonnet-4.5"]
    assert usage["cost_details"]["upstream_inference_prompt_cost"] == (
        (usage["prompt_tokens"] - 100) * info.prompt_price + 100 * Decimal("0.00000375")
    )
    payload = loads(client.get("/generation", params={"id": gen_id}).text)
    validate(_schema("GenerationResponse"), payload)
    assert payload["data"]["cache_discount"] == 100 * (Decimal("0.000003") - Decimal("0.00000375")) < 0


def test_head_requests_are_recorded(client: httpx.Client, sim: OpenRouterSimulator) -> None:
    response = client.head("/models")
    assert response.status_code == 200 and response.content == b""
    assert client.head("/generations", headers=SELF_TEST).status_code == 404
    assert [(r.method, r.path) for r in sim.requests] == [
        ("HEAD", "/api/v1/models"),
        ("HEAD", "/api/v1/generations"),
    ]


# --------------------------------------------------------------------------------------------
# lookups steered by tests: faults, rejected keys, billing, /key, lookup counts
# --------------------------------------------------------------------------------------------


def test_injected_lookup_faults_are_used_one_per_request(
    client: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    gen_id = client.post("/chat/completions", json=chat_body("look me up")).json()["id"]
    sim.inject_lookup_faults(
        LookupFault.rate_limited(retry_after_s=7),
        LookupFault.server_error(),
        LookupFault.server_error(502),
        LookupFault.server_error(503),
        LookupFault.not_json(),
        LookupFault.without_data(),
    )
    assert sim.pending_lookup_faults() == 6 and sim.pending_lookup_faults("key") == 0

    def lookup() -> httpx.Response:
        return client.get("/generation", params={"id": gen_id})

    limited = lookup()
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert limited.json() == {"error": {"code": 429, "message": "Rate limit exceeded"}}
    validate(_response_schema("/generation", "429"), limited.json())
    for status in (500, 502, 503):
        failed = lookup()
        assert failed.status_code == status and "Retry-After" not in failed.headers
        assert failed.json()["error"]["code"] == status and failed.json()["error"]["message"]
        if status != 503:  # the spec lists no 503 for /generation
            validate(_response_schema("/generation", str(status)), failed.json())
    garbled = lookup()
    assert garbled.status_code == 200 and garbled.headers["content-type"] == "application/json"
    assert garbled.text.startswith('{"data":{')
    with pytest.raises(json.JSONDecodeError):
        json.loads(garbled.text)
    empty = lookup()
    assert empty.status_code == 200 and empty.json() == {}
    assert sim.successful_lookups() == {}  # none of those was a usable answer
    assert sim.pending_lookup_faults() == 0
    assert lookup().status_code == 200 and lookup().status_code == 200
    assert sim.successful_lookups() == {gen_id: 2}


def test_key_faults_have_their_own_queue(client: httpx.Client, sim: OpenRouterSimulator) -> None:
    gen_id = client.post("/chat/completions", json=chat_body("key faults")).json()["id"]
    sim.inject_lookup_faults(LookupFault.server_error(502), LookupFault.without_data(), endpoint="key")
    assert client.get("/generation", params={"id": gen_id}).status_code == 200
    assert sim.pending_lookup_faults("key") == 2
    assert client.get("/key").status_code == 502
    assert client.get("/key").json() == {}
    assert "usage" in client.get("/key").json()["data"]
    # faults answer before the generation is looked at: a missing id or an unknown one too
    sim.inject_lookup_faults(LookupFault.rate_limited(0), LookupFault.not_json())
    assert client.get("/generation").headers["Retry-After"] == "0"
    unknown = client.get("/generation", params={"id": "gen-1700000000-AAAAAAAAAAAAAAAAAAAA"})
    assert unknown.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(unknown.text)
    sim.inject_lookup_faults(LookupFault.server_error())
    sim.clear()
    assert sim.pending_lookup_faults() == 0 and sim.successful_lookups() == {}


def test_lookup_fault_constructors_check_their_arguments() -> None:
    assert LookupFault.slow(0.5) == LookupFault(LookupFaultKind.SLOW, delay_s=0.5)
    assert LookupFault.server_error(529).status == 529
    with pytest.raises(ValueError, match="5xx"):
        LookupFault.server_error(429)
    with pytest.raises(ValueError, match="negative"):
        LookupFault.rate_limited(-1)
    with pytest.raises(ValueError, match="negative"):
        LookupFault.slow(-0.1)


def test_slow_lookup_lets_a_client_timeout_fire_and_is_not_a_successful_lookup(
    client: httpx.Client, sim: OpenRouterSimulator
) -> None:
    gen_id = client.post("/chat/completions", json=chat_body("slow lookup")).json()["id"]
    sim.inject_lookup_faults(LookupFault.slow(0.3), LookupFault.slow(0.1))
    started = time.monotonic()
    with (
        httpx.Client(base_url=sim.base_url, headers=AUTH, timeout=0.05, verify=_TLS) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.get("/generation", params={"id": gen_id})
    time.sleep(max(0.0, started + 0.45 - time.monotonic()))  # the slow answer's time has passed
    assert sim.successful_lookups() == {}  # the client had hung up: nothing was answered
    started = time.monotonic()
    patient = client.get("/generation", params={"id": gen_id})
    assert patient.status_code == 200 and time.monotonic() - started >= 0.1
    assert patient.json()["data"]["id"] == gen_id
    assert sim.successful_lookups() == {gen_id: 1}


def test_slow_lookup_does_not_hold_up_stop() -> None:
    with OpenRouterSimulator(port=0) as sim:
        sim.inject_lookup_faults(LookupFault.slow(30))
        with (
            httpx.Client(base_url=sim.base_url, headers=AUTH, timeout=0.1, verify=_TLS) as c,
            pytest.raises(httpx.ReadTimeout),
        ):
            c.get("/generation", params={"id": "gen-1700000000-AAAAAAAAAAAAAAAAAAAA"})
        started = time.monotonic()
    assert time.monotonic() - started < 2


def test_rejected_keys_get_401_or_403_on_every_endpoint(
    client: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    other_key = "sk-or-v1-another-key-for-the-sim"
    other = httpx.Client(base_url=sim.base_url, headers={"Authorization": f"Bearer {other_key}"}, verify=_TLS)
    gen_id = client.post("/chat/completions", json=chat_body("before")).json()["id"]
    sim.reject_key(KEY)
    sim.reject_key(other_key, status=403)
    sim.inject_lookup_faults(LookupFault.server_error())
    with other:
        calls: list[tuple[str, str, Json | None]] = [
            ("POST", "/chat/completions", chat_body("hi")),
            ("POST", "/chat/completions", chat_body("hi", stream=True)),
            ("GET", f"/generation?id={gen_id}", None),
            ("GET", "/key", None),
            ("GET", "/models", None),
        ]
        for method, path, body in calls:
            refused = client.request(method, path, json=body)
            assert refused.status_code == 401, path
            assert refused.json() == {"error": {"code": 401, "message": "User not found."}}
            forbidden = other.request(method, path, json=body)
            assert forbidden.status_code == 403, path
            assert forbidden.json() == {"error": {"code": 403, "message": "Key limit exceeded"}}
        validate(_response_schema("/generation", "401"), refused.json())
        validate(_response_schema("/key", "401"), refused.json())
        validate(_chat_error_schema(403), forbidden.json())
        assert sim.pending_lookup_faults() == 1  # refused requests take no fault
        assert len(sim.generations) == 1
        sim.accept_key(KEY)
        sim.reject_key(other_key, message="Key disabled")
        assert client.get("/generation", params={"id": gen_id}).status_code == 500  # the fault
        assert client.get("/generation", params={"id": gen_id}).status_code == 200
        assert other.get("/key").json() == {"error": {"code": 401, "message": "Key disabled"}}


def test_bill_extra_makes_generation_and_key_differ_from_the_wire(
    client: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    assert parse_directives("[sim:bill-extra=0.0001]").bill_extra == Decimal("0.0001")
    assert parse_directives("[sim:bill-extra=-0.00000002]").bill_extra == Decimal("-0.00000002")
    for bad in ("[sim:bill-extra=1e-4]", "[sim:bill-extra=abc]", "[sim:bill-extra]", "[sim:bill-extra=.5]"):
        assert parse_directives(bad).bill_extra == 0
    text = "charge me more [sim:bill-extra=0.0001]"
    for stream in (False, True):
        response = client.post("/chat/completions", json=chat_body(text, stream=stream))
        usage = parse_sse(response.text)[1][-2]["usage"] if stream else loads(response.text)["usage"]
        # the wire is what it would be without the directive
        assert usage["cost"] == sum(
            expected_charge("openai/gpt-4o-mini", prompt_tokens_of(text), usage["completion_tokens"])
        )
        gen_id = response.headers["X-Generation-Id"]
        payload = loads(client.get("/generation", params={"id": gen_id}).text)
        validate(_schema("GenerationResponse"), payload)
        data = payload["data"]
        assert data["total_cost"] == data["usage"] == usage["cost"] + Decimal("0.0001")
        assert data["upstream_inference_cost"] == usage["cost_details"]["upstream_inference_cost"]
        record = sim.generations[gen_id]
        assert record.bill_extra == Decimal("0.0001") and record.usage == usage
    key = loads(client.get("/key").text)["data"]
    assert key["usage_daily"] == sum(g.usage["cost"] for g in sim.generations.values()) + Decimal("0.0002")

    plain = loads(client.post("/chat/completions", json=chat_body("plain")).text)
    sim.add_to_bill(plain["id"], Decimal("0.00002"))
    sim.add_to_bill(plain["id"], Decimal("0.00001"))
    data = loads(client.get("/generation", params={"id": plain["id"]}).text)["data"]
    assert data["total_cost"] == plain["usage"]["cost"] + Decimal("0.00003")
    assert sim.generations[plain["id"]].bill_extra == Decimal("0.00003")
    with pytest.raises(KeyError):
        sim.add_to_bill("gen-1700000000-AAAAAAAAAAAAAAAAAAAA", Decimal(1))


def test_byok_generation_lookup_matches_the_wire(
    client: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    response, _, _, events = stream_chat(
        client, chat_body("my own key [sim:byok]", model="anthropic/claude-sonnet-4.5", stream=True)
    )
    usage = events[-2]["usage"]
    payload = loads(client.get("/generation", params={"id": response.headers["X-Generation-Id"]}).text)
    validate(_schema("GenerationResponse"), payload)
    data = payload["data"]
    provider = usage["cost_details"]["upstream_inference_cost"]
    assert data["is_byok"] is True and data["provider_responses"][0]["is_byok"] is True
    assert data["total_cost"] == data["usage"] == usage["cost"] == provider * BYOK_FEE_RATE > 0
    assert (
        data["upstream_inference_cost"]
        == provider
        == sum(
            expected_charge("anthropic/claude-sonnet-4.5", usage["prompt_tokens"], usage["completion_tokens"])
        )
    )
    key = loads(client.get("/key").text)["data"]
    assert key["usage_daily"] == usage["cost"] and key["byok_usage_daily"] == provider


def test_key_sums_per_key_including_open_webui_tasks_and_reports_the_limit(
    client: httpx.Client, sim: OpenRouterSimulator, validate: Validate
) -> None:
    other_key = "sk-or-v1-another-key-for-the-sim"
    with httpx.Client(
        base_url=sim.base_url, headers={"Authorization": f"Bearer {other_key}"}, verify=_TLS
    ) as other:
        chat = loads(client.post("/chat/completions", json=chat_body("a chat")).text)
        byok = loads(client.post("/chat/completions", json=chat_body("mine [sim:byok]")).text)
        title = loads(client.post("/chat/completions", json=chat_body(TASK_SAMPLES["title"])).text)
        client.post("/chat/completions", json=chat_body(TASK_SAMPLES["tags"], stream=True))
        elsewhere = loads(other.post("/chat/completions", json=chat_body("other key")).text)
        tags_id = next(g.id for g in sim.generations.values() if g.task == "tags")
        # Open WebUI's task-model calls are generations like any other, billed to the key
        assert sim.generations[title["id"]].task == "title" and sim.generations[tags_id].api_key == KEY
        mine = [chat, byok, title]
        expected = sum((g["usage"]["cost"] for g in mine), Decimal(0)) + sim.generations[tags_id].spend
        data = loads(client.get("/key").text)["data"]
        assert (
            data["usage"] == data["usage_daily"] == data["usage_weekly"] == data["usage_monthly"] == expected
        )
        assert data["byok_usage_daily"] == byok["usage"]["cost_details"]["upstream_inference_cost"]
        theirs = loads(other.get("/key").text)["data"]
        assert theirs["usage_daily"] == elsewhere["usage"]["cost"] and theirs["byok_usage_daily"] == 0

        sim.key_limit = Decimal(10)
        sim.key_limit_reset = "monthly"
        payload = loads(client.get("/key").text)
        validate(_response_schema("/key", "200"), payload)
        data = payload["data"]
        assert data["limit"] == 10 and data["limit_reset"] == "monthly"
        assert data["limit_remaining"] == Decimal(10) - expected
        sim.key_limit_reset = None
        assert loads(client.get("/key").text)["data"]["limit_remaining"] == Decimal(10) - expected


def test_prompt_tokens_count_messages_and_tool_definitions_at_four_characters_a_token(
    client: httpx.Client,
) -> None:
    # Open WebUI 0.12.4 sends its builtin tools with every chat from the web UI (28 definitions,
    # about 20,000 characters of JSON): they are input the provider bills, counted like text.
    tools = [json.loads(json.dumps(WEATHER_TOOL).replace("get_weather", f"tool_{i}")) for i in range(28)]
    text = "What is the capital of France?"
    usage = client.post("/chat/completions", json=chat_body(text, tools=tools)).json()["usage"]
    tools_json = json.dumps(tools, separators=(",", ":"))
    assert usage["prompt_tokens"] == prompt_tokens_of(text) + math.ceil(len(tools_json) / 4)
