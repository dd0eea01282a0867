"""A loopback simulator of the OpenRouter HTTP API, standard library only.

It reproduces the parts of the wire format that usage accounting depends on: the ``usage`` object
(with exact decimal money literals), the three shapes in which a stream reports usage, mid-stream
and pre-stream errors, the ``/generation`` lookup with its "not found yet" window, ``/key`` and the
models list.  Behaviour is chosen per request by ``[sim:...]`` directives in the last user message;
see :func:`parse_directives`.  Tests steer the lookups (``/generation``, ``/key``) of a running
simulator through :class:`OpenRouterSimulator`'s methods: injected :class:`LookupFault` answers,
rejected keys, extra billing, a key limit, and a count of successful lookups.  They can also queue
a :class:`Recording`, a real OpenRouter answer, that the next chat completion gets byte for byte
(:meth:`OpenRouterSimulator.replay_next`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import re
import secrets
import select
import socket
import string
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Literal, Self, cast
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "AUTO_ROUTER_ID",
    "AUTO_ROUTER_TARGET",
    "BYOK_FEE_RATE",
    "MODELS",
    "Directives",
    "GenerationRecord",
    "KeyLimitReset",
    "LookupEndpoint",
    "LookupFault",
    "LookupFaultKind",
    "ModelInfo",
    "OpenRouterSimulator",
    "RecordedRequest",
    "Recording",
    "ServedReplay",
    "compute_charge",
    "detect_task",
    "format_decimal",
    "new_generation_id",
    "parse_directives",
    "replayed_generation",
    "to_json",
]

log = logging.getLogger("openrouter_sim")

API_PREFIX: Final = "/api/v1"
AUTO_ROUTER_ID: Final = "openrouter/auto"
AUTO_ROUTER_TARGET: Final = "openai/gpt-4o-mini"
BYOK_FEE_RATE: Final = Decimal("0.05")
RETRY_AFTER_SECONDS: Final = 1
_ALNUM: Final = string.ascii_letters + string.digits
_PROCESSING_COMMENT: Final = b": OPENROUTER PROCESSING\n\n"
_WORDS_PER_CHUNK: Final = 3


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """One model the simulator serves. Prices are USD per token."""

    id: str
    name: str
    provider: str
    prompt_price: Decimal
    completion_price: Decimal
    context_length: int
    reasoning: bool = False
    cache_read_price: Decimal | None = None  # None: the provider gives no discount for cached reads
    cache_write_price: Decimal | None = None  # None: writing the cache costs the normal prompt price
    max_completion_tokens: int | None = None
    created: int = 0
    description: str = ""
    tokenizer: str = "Other"
    instruct_type: str | None = None
    input_modalities: tuple[str, ...] = ("text",)
    hugging_face_id: str | None = None
    canonical_slug: str = ""
    is_moderated: bool = False


MODELS: dict[str, ModelInfo] = {
    m.id: m
    for m in (
        ModelInfo(
            id="openai/gpt-4o-mini",
            name="OpenAI: GPT-4o-mini",
            provider="OpenAI",
            prompt_price=Decimal("0.00000015"),
            completion_price=Decimal("0.0000006"),
            context_length=128000,
            cache_read_price=Decimal("0.000000075"),
            max_completion_tokens=16384,
            created=1721260800,
            description="GPT-4o mini is OpenAI's small, affordable multimodal model.",
            tokenizer="GPT",
            input_modalities=("text", "image", "file"),
            canonical_slug="openai/gpt-4o-mini-2024-07-18",
            is_moderated=True,
        ),
        ModelInfo(
            id="openai/gpt-4o",
            name="OpenAI: GPT-4o",
            provider="OpenAI",
            prompt_price=Decimal("0.0000025"),
            completion_price=Decimal("0.00001"),
            context_length=128000,
            cache_read_price=Decimal("0.00000125"),
            max_completion_tokens=16384,
            created=1715558400,
            description="GPT-4o is OpenAI's flagship multimodal model with text and image input.",
            tokenizer="GPT",
            input_modalities=("text", "image", "file"),
            canonical_slug="openai/gpt-4o",
            is_moderated=True,
        ),
        ModelInfo(
            id="anthropic/claude-sonnet-4.5",
            name="Anthropic: Claude Sonnet 4.5",
            provider="Anthropic",
            prompt_price=Decimal("0.000003"),
            completion_price=Decimal("0.000015"),
            context_length=1000000,
            cache_read_price=Decimal("0.0000003"),
            cache_write_price=Decimal("0.00000375"),
            max_completion_tokens=64000,
            created=1759161676,
            description="Claude Sonnet 4.5 is Anthropic's model for coding and agentic work.",
            tokenizer="Claude",
            input_modalities=("text", "image", "file"),
            canonical_slug="anthropic/claude-4.5-sonnet-20250929",
            is_moderated=True,
        ),
        ModelInfo(
            id="google/gemini-2.5-flash",
            name="Google: Gemini 2.5 Flash",
            provider="Google",
            prompt_price=Decimal("0.0000003"),
            completion_price=Decimal("0.0000025"),
            context_length=1048576,
            cache_read_price=Decimal("0.00000003"),
            cache_write_price=Decimal("0.0000003833"),
            max_completion_tokens=65535,
            created=1750172488,
            description="Gemini 2.5 Flash is Google's fast workhorse model.",
            tokenizer="Gemini",
            input_modalities=("text", "image", "file", "audio", "video"),
            canonical_slug="google/gemini-2.5-flash",
        ),
        ModelInfo(
            id="deepseek/deepseek-r1",
            name="DeepSeek: R1",
            provider="DeepInfra",
            prompt_price=Decimal("0.0000004"),
            completion_price=Decimal("0.000002"),
            context_length=163840,
            reasoning=True,
            max_completion_tokens=163840,
            created=1737381095,
            description="DeepSeek R1 is an open reasoning model that thinks before it answers.",
            tokenizer="DeepSeek",
            instruct_type="deepseek-r1",
            hugging_face_id="deepseek-ai/DeepSeek-R1",
            canonical_slug="deepseek/deepseek-r1",
        ),
        ModelInfo(
            id="meta-llama/llama-3.3-70b-instruct",
            name="Meta: Llama 3.3 70B Instruct",
            provider="Together",
            prompt_price=Decimal("0.00000013"),
            completion_price=Decimal("0.0000004"),
            context_length=131072,
            max_completion_tokens=16384,
            created=1733506137,
            description="Llama 3.3 70B Instruct is Meta's multilingual instruction-tuned model.",
            tokenizer="Llama3",
            instruct_type="llama3",
            hugging_face_id="meta-llama/Llama-3.3-70B-Instruct",
            canonical_slug="meta-llama/llama-3.3-70b-instruct",
        ),
    )
}


def resolve_model(requested: str) -> ModelInfo | None:
    """The model that serves a request for ``requested``; ``openrouter/auto`` picks a fixed one."""
    if requested == AUTO_ROUTER_ID:
        return MODELS[AUTO_ROUTER_TARGET]
    return MODELS.get(requested)


# --------------------------------------------------------------------------------------------
# Exact JSON with Decimal money
# --------------------------------------------------------------------------------------------


def format_decimal(value: Decimal) -> str:
    """Plain-notation, exact literal for ``value``: never an exponent, no float rounding.

    Trailing zeros after the point are dropped (``0.0000100`` -> ``0.00001``) without going
    through the context precision, so no digit is ever lost.
    """
    if not value.is_finite():
        raise ValueError(f"cannot serialise {value!r} as a JSON number")
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def to_json(obj: Any) -> str:
    """Compact JSON like OpenRouter's, writing :class:`~decimal.Decimal` as exact literals."""
    out: list[str] = []
    _encode(obj, out)
    return "".join(out)


def _encode(obj: Any, out: list[str]) -> None:  # noqa: C901, PLR0912 (a branch per JSON type)
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, Decimal):
        out.append(format_decimal(obj))
    elif isinstance(obj, int):
        out.append(str(int(obj)))
    elif isinstance(obj, float):
        out.append(json.dumps(obj, allow_nan=False))
    elif isinstance(obj, str):
        out.append(json.dumps(obj, ensure_ascii=False))
    elif isinstance(obj, Mapping):
        out.append("{")
        for i, (key, value) in enumerate(obj.items()):
            if i:
                out.append(",")
            out.append(json.dumps(str(key), ensure_ascii=False))
            out.append(":")
            _encode(value, out)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out)
        out.append("]")
    else:
        raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


# --------------------------------------------------------------------------------------------
# Directives
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Directives:
    """Scenario switches parsed from ``[sim:...]`` tokens in the last user message."""

    shape: str = "B"
    byok: bool = False
    midstream_error: bool = False
    midstream_error_code: int | str = 502
    midstream_error_usage: bool = False
    error: int | None = None
    tool_call: bool = False
    chunks: int | None = None
    cached: int = 0
    cache_write: int = 0
    reasoning: int | None = None
    null_cost: bool = False
    no_usage: bool = False
    delay_ms: int | None = None
    bill_extra: Decimal = Decimal(0)


_DIRECTIVE_RE: Final = re.compile(r"\[sim:([a-z][a-z0-9_-]*)(?:=([^\]\s]*))?\]", re.IGNORECASE)
_FLAG_DIRECTIVES: Final = {
    "byok": "byok",
    "tool-call": "tool_call",
    "null-cost": "null_cost",
    "no-usage": "no_usage",
}
_COUNT_DIRECTIVES: Final = {
    "chunks": "chunks",
    "cached": "cached",
    "cache-write": "cache_write",
    "reasoning": "reasoning",
    "delay-ms": "delay_ms",
}
_USD_RE: Final = re.compile(r"-?\d+(?:\.\d+)?")


def parse_directives(text: str) -> Directives:
    """Parse every ``[sim:name]`` / ``[sim:name=value]`` token in ``text``.

    Supported: ``shape=A|B|C``, ``byok``, ``midstream-error[=code]`` (int or string code, default
    502), ``midstream-error-usage`` (implies ``midstream-error``), ``error=<http status>``,
    ``tool-call``, ``chunks=N``, ``cached=N``, ``cache-write=N``, ``reasoning=N``, ``null-cost``,
    ``no-usage``, ``delay-ms=N``, ``bill-extra=USD`` (a plain decimal such as ``0.0001``, may be
    negative: ``/generation`` and ``/key`` then bill that much more than the ``usage.cost`` sent on
    the wire, which stays as it would be). Unknown names and malformed values are ignored (and
    logged); when a name repeats, the last one wins.
    """
    values: dict[str, Any] = {}
    for match in _DIRECTIVE_RE.finditer(text):
        name = match.group(1).lower()
        raw = match.group(2)
        if name in _FLAG_DIRECTIVES and raw is None:
            values[_FLAG_DIRECTIVES[name]] = True
        elif name == "shape" and raw is not None and raw.upper() in ("A", "B", "C"):
            values["shape"] = raw.upper()
        elif name == "midstream-error":
            values["midstream_error"] = True
            if raw:
                values["midstream_error_code"] = int(raw) if raw.isdigit() else raw
        elif name == "midstream-error-usage" and raw is None:
            values["midstream_error"] = True
            values["midstream_error_usage"] = True
        elif name == "error" and raw is not None and raw.isdigit() and 400 <= int(raw) <= 599:
            values["error"] = int(raw)
        elif name in _COUNT_DIRECTIVES and raw is not None and raw.isdigit():
            values[_COUNT_DIRECTIVES[name]] = int(raw)
        elif name == "bill-extra" and raw is not None and _USD_RE.fullmatch(raw):
            values["bill_extra"] = Decimal(raw)
        else:
            log.warning("ignoring unrecognised simulator directive %r", match.group(0))
    return Directives(**values)


# --------------------------------------------------------------------------------------------
# Open WebUI task requests
# --------------------------------------------------------------------------------------------

_CHAT_HISTORY_RE: Final = re.compile(r"<chat_history>.*?(?:</chat_history>|$)", re.DOTALL)
_TASK_KEY_RE: Final = re.compile(r"\{\s*\"(title|tags|follow_ups)\"\s*:")


def detect_task(text: str) -> str | None:
    """``"title"``, ``"tags"``, ``"follow_ups"`` for Open WebUI's task prompts, else ``None``.

    Open WebUI's default templates start with ``### Task:`` and describe the JSON answer they
    want (``{ "title": ... }`` etc.). The embedded ``<chat_history>`` is removed first so that what
    the user wrote cannot make an ordinary chat look like a task.
    """
    head = _CHAT_HISTORY_RE.sub("", text)
    if "### Task:" not in head:
        return None
    keys = set(_TASK_KEY_RE.findall(head))
    for task in ("follow_ups", "tags", "title"):
        if task in keys:
            return task
    task_line = head.split("### Task:", 1)[1].strip().split("\n", 1)[0].lower()
    if "follow-up" in task_line or "follow up" in task_line or "might naturally send next" in task_line:
        return "follow_ups"
    if "tags" in task_line:
        return "tags"
    if "title" in task_line:
        return "title"
    return None


_TITLES: Final = (
    "Quick Question",
    "Travel Planning",
    "Python Debugging",
    "Healthy Recipes",
    "Project Ideas",
    "Weekend Plans",
)
_FOLLOW_UPS: Final = (
    "Can you give me a concrete example?",
    "How does this compare with the alternatives?",
    "What should I do first?",
    "Summarize that in three bullet points.",
)


def _task_answer(task: str, seed: int) -> str:
    if task == "title":
        return json.dumps({"title": _TITLES[seed % len(_TITLES)]})
    if task == "tags":
        return json.dumps({"tags": ["General"]})
    start = seed % len(_FOLLOW_UPS)
    picks = [_FOLLOW_UPS[(start + i) % len(_FOLLOW_UPS)] for i in range(3)]
    return json.dumps({"follow_ups": picks})


# --------------------------------------------------------------------------------------------
# Text, tokens and money
# --------------------------------------------------------------------------------------------

_SENTENCES: Final = (
    "That is a good question, and the short answer is that it depends on what you need.",
    "Here is a simple way to think about it.",
    "Start with the smallest version that works, then improve it step by step.",
    "Most people find that a clear plan saves a lot of time later.",
    "The main trade-off is between speed and accuracy.",
    "If you share a few more details, I can give you a more specific answer.",
    "In practice, the default settings are a sensible place to begin.",
    "It also helps to write down what success looks like before you start.",
    "A common mistake is to optimise too early.",
    "You can always revisit the decision once you have real data.",
    "The documentation covers the remaining edge cases in more detail.",
    "Let me know if you would like an example.",
)
_REASONING: Final = (
    "The user is asking a general question, so I should give a short and practical answer.",
    "I will outline the key idea first and then suggest a next step.",
    "There is no need for code here; a plain explanation is enough.",
)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _compose_answer(seed: int, min_words: int = 0) -> str:
    count = 2 + seed % 3
    start = (seed >> 8) % len(_SENTENCES)
    sentences: list[str] = []
    words = 0
    i = 0
    while i < count or words < min_words:
        sentence = _SENTENCES[(start + i) % len(_SENTENCES)]
        sentences.append(sentence)
        words += len(sentence.split(" "))
        i += 1
    return " ".join(sentences)


def _split_chunks(text: str, n_chunks: int | None = None) -> list[str]:
    """Split ``text`` into pieces of a few words (or exactly ``n_chunks`` pieces); they join back."""
    if not text:
        return []
    words = text.split(" ")
    if n_chunks is None:
        groups = [words[i : i + _WORDS_PER_CHUNK] for i in range(0, len(words), _WORDS_PER_CHUNK)]
    else:
        base, extra = divmod(len(words), n_chunks)
        groups = []
        pos = 0
        for i in range(n_chunks):
            size = base + (1 if i < extra else 0)
            groups.append(words[pos : pos + size])
            pos += size
    pieces = [" ".join(g) for g in groups]
    return [p + " " for p in pieces[:-1]] + pieces[-1:]


def _split_chars(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def count_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def content_text(content: Any) -> str:
    """The text of a message ``content``: a string, or the ``text`` parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        return "\n".join(parts)
    return ""


def _message_text(message: Mapping[str, Any]) -> str:
    text = content_text(message.get("content"))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                text += str(fn.get("name", "")) + str(fn.get("arguments", ""))
    return text


def count_prompt_tokens(messages: Iterable[Mapping[str, Any]], tools: Any = None) -> int:
    """Sum over messages of ceil(len(text)/4) + 4, plus the tool definitions if any."""
    total = sum(count_tokens(_message_text(m)) + 4 for m in messages)
    if isinstance(tools, list) and tools:
        total += count_tokens(json.dumps(tools, separators=(",", ":"), sort_keys=True))
    return total


@dataclass(frozen=True)
class Charge:
    """What the provider charges for one generation, split like ``cost_details``."""

    prompt_cost: Decimal
    completion_cost: Decimal
    cache_discount: Decimal | None

    @property
    def total(self) -> Decimal:
        return self.prompt_cost + self.completion_cost


def compute_charge(
    model: ModelInfo, prompt_tokens: int, completion_tokens: int, cached: int = 0, cache_write: int = 0
) -> Charge:
    """Exact provider charge: uncached prompt at the prompt price, cached reads and cache writes
    at the model's cache prices, completion (reasoning included) at the completion price."""
    read_price = model.prompt_price if model.cache_read_price is None else model.cache_read_price
    write_price = model.prompt_price if model.cache_write_price is None else model.cache_write_price
    uncached = prompt_tokens - cached - cache_write
    prompt_cost = uncached * model.prompt_price + cached * read_price + cache_write * write_price
    completion_cost = completion_tokens * model.completion_price
    discount: Decimal | None = None
    if cached or cache_write:
        discount = cached * (model.prompt_price - read_price) + cache_write * (
            model.prompt_price - write_price
        )
    return Charge(prompt_cost, completion_cost, discount)


def new_generation_id(now: float | None = None) -> str:
    stamp = int(time.time() if now is None else now)
    return f"gen-{stamp}-{''.join(secrets.choice(_ALNUM) for _ in range(20))}"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the simulator received (recorded before it was answered)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    task: str | None = None
    received_at: float = 0.0


@dataclass(frozen=True)
class GenerationRecord:
    """One generation as the simulator billed it.

    ``usage`` is the exact usage object sent on the wire (``{}`` if none was sent: ``no-usage``,
    a mid-stream error without usage, a cancelled stream); ``cost`` and
    ``upstream_inference_cost`` are what ``/generation`` reports. ``cost`` includes
    ``bill_extra`` (``[sim:bill-extra=...]`` or :meth:`OpenRouterSimulator.add_to_bill`): what
    OpenRouter billed beyond the wire's ``usage.cost``. A cancelled stream is billed for its prompt
    and for the completion tokens streamed before the client went away. ``api_key`` is the key the
    request carried; ``/key`` sums the generations of the key it is asked with.
    """

    id: str
    requested_model: str
    served_model: str
    provider: str
    streamed: bool
    usage: dict[str, Any]
    cost: Decimal | None
    upstream_inference_cost: Decimal | None
    is_byok: bool
    finish_reason: str | None
    error: dict[str, Any] | None
    created_at: float
    request_body: Any
    cancelled: bool = False
    task: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_discount: Decimal | None = None
    completed_at: float = 0.0
    latency_ms: int = 0
    generation_time_ms: int = 0
    request_headers: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    bill_extra: Decimal = Decimal(0)

    @property
    def spend(self) -> Decimal:
        """Total USD this generation cost the user: OpenRouter's charge plus, for BYOK, the
        provider's own charge (which OpenRouter does not bill)."""
        cost = self.cost if self.cost is not None else Decimal(0)
        if self.is_byok and self.upstream_inference_cost is not None:
            return cost + self.upstream_inference_cost
        return cost


_EVENT_END: Final = re.compile(rb"(?<=\n\n)|(?<=\r\n\r\n)")


@dataclass(frozen=True)
class Recording:
    """A recorded OpenRouter answer to ``POST /chat/completions``, to replay (see
    :meth:`OpenRouterSimulator.replay_next`).

    ``body`` is the response body exactly as recorded (an event stream's text, or the JSON), sent
    unchanged with ``status`` and ``content_type``. An event stream is sent one event (up to and
    including its blank line) per HTTP chunk, as OpenRouter sends it. ``name`` only labels it.
    """

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    name: str = ""

    @property
    def streamed(self) -> bool:
        return self.content_type.split(";", 1)[0].strip().lower() == "text/event-stream"

    def events(self) -> list[bytes]:
        """The body cut after each blank line: the chunks a stream is sent in (they join to ``body``)."""
        return [part for part in _EVENT_END.split(self.body) if part]

    def payloads(self) -> list[Any]:
        """Every JSON payload of the answer (each ``data:`` of a stream, or the body), numbers with
        a fraction as :class:`~decimal.Decimal`, so money keeps the digits written. What does not
        parse (``[DONE]``, a comment, a truncated body) is left out."""
        texts = (
            [
                line.removeprefix("data:").strip()
                for line in self.body.decode("utf-8", "replace").splitlines()
                if line.startswith("data:")
            ]
            if self.streamed
            else [self.body.decode("utf-8", "replace")]
        )
        found: list[Any] = []
        for text in texts:
            with contextlib.suppress(json.JSONDecodeError):
                found.append(json.loads(text, parse_float=Decimal))
        return found


@dataclass(frozen=True)
class ServedReplay:
    """A queued :class:`Recording` and the chat request that was answered with it.

    ``generation_id`` is the recording's ``gen-…`` id when the simulator also keeps it as a
    generation for ``/generation`` (a 200 answer with an id and a ``usage.cost``), else None."""

    recording: Recording
    request: RecordedRequest
    generation_id: str | None


def _decimal_or_none(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        return None
    try:
        return Decimal(str(value))
    except ArithmeticError:
        return None


def _count(mapping: Any, key: str) -> int:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def replayed_generation(
    recording: Recording, request_body: Any, headers: Mapping[str, str], started: float
) -> GenerationRecord | None:
    """What OpenRouter billed for ``recording``, as ``/generation`` and ``/key`` report it: its id,
    tokens, ``cost``, ``upstream_inference_cost`` and ``is_byok`` read from its own (last) usage.

    None when the answer is not a generation the simulator can price: not a 200, no ``gen-`` id,
    or no ``usage.cost`` (the recording does not say what was billed, so a lookup finds nothing)."""
    if recording.status != 200:
        return None
    gen_id, provider, model, finish, error, usage = "", "", "", None, None, None
    for payload in recording.payloads():
        if not isinstance(payload, dict):
            continue
        if not gen_id and isinstance(payload.get("id"), str) and payload["id"].startswith("gen-"):
            gen_id = payload["id"]
        provider = payload["provider"] if isinstance(payload.get("provider"), str) else provider
        model = payload["model"] if isinstance(payload.get("model"), str) else model
        error = payload["error"] if isinstance(payload.get("error"), dict) else error
        usage = payload["usage"] if isinstance(payload.get("usage"), dict) else usage
        for choice in payload.get("choices") or []:
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                finish = choice["finish_reason"]
    cost = _decimal_or_none(usage.get("cost")) if usage is not None else None
    if not gen_id or usage is None or cost is None:
        return None
    details = usage.get("cost_details")
    upstream = _decimal_or_none(details.get("upstream_inference_cost")) if isinstance(details, dict) else None
    prompt_details = usage.get("prompt_tokens_details")
    body = request_body if isinstance(request_body, dict) else {}
    now = time.time()
    return GenerationRecord(
        id=gen_id,
        requested_model=str(body.get("model") or model),
        served_model=model,
        provider=provider,
        streamed=recording.streamed,
        usage=copy.deepcopy(usage),
        cost=cost,
        upstream_inference_cost=upstream,
        is_byok=usage.get("is_byok") is True,
        finish_reason=finish,
        error=dict(error) if error else None,
        created_at=started,
        request_body=copy.deepcopy(request_body),
        prompt_tokens=_count(usage, "prompt_tokens"),
        completion_tokens=_count(usage, "completion_tokens"),
        reasoning_tokens=_count(usage.get("completion_tokens_details"), "reasoning_tokens"),
        cached_tokens=_count(prompt_details, "cached_tokens"),
        cache_write_tokens=_count(prompt_details, "cache_write_tokens"),
        completed_at=now,
        latency_ms=round((now - started) * 1000),
        generation_time_ms=round((now - started) * 1000),
        request_headers=dict(headers),
        api_key=_bearer_token(headers.get("authorization", "")),
    )


LookupEndpoint = Literal["generation", "key"]


class LookupFaultKind(StrEnum):
    HTTP_ERROR = "http-error"  # an error status with OpenRouter's error body
    SLOW = "slow"  # wait, then answer normally unless the client has given up meanwhile
    NOT_JSON = "not-json"  # 200, Content-Type application/json, a truncated JSON body
    NO_DATA = "no-data"  # 200 with the JSON object ``{}``: no ``data`` member


# OpenRouter's messages (the spec's examples); other statuses get "Upstream error <status>".
_FAULT_MESSAGES: Final = {
    429: "Rate limit exceeded",
    500: "Internal Server Error",
    502: "Provider returned error",
    503: "Service Unavailable",
    524: "Request timed out. Please try again later.",
    529: "Provider returned error",
}


@dataclass(frozen=True)
class LookupFault:
    """One injected answer to a lookup request; see :meth:`OpenRouterSimulator.inject_lookup_faults`.

    Build it with a class method: :meth:`rate_limited` (429 with ``Retry-After``),
    :meth:`server_error` (500, 502, 503 or any other 5xx), :meth:`slow` (answer after
    ``delay_s``, so that a client timeout fires first), :meth:`not_json`, :meth:`without_data`.
    """

    kind: LookupFaultKind
    status: int = 200
    retry_after_s: int | None = None
    delay_s: float = 0.0

    @classmethod
    def rate_limited(cls, retry_after_s: int = 1) -> Self:
        """HTTP 429 ``Rate limit exceeded`` with ``Retry-After: <retry_after_s>`` (seconds)."""
        if retry_after_s < 0:
            raise ValueError("retry_after_s must not be negative")
        return cls(LookupFaultKind.HTTP_ERROR, 429, retry_after_s=retry_after_s)

    @classmethod
    def server_error(cls, status: int = 500) -> Self:
        """HTTP ``status`` (a 5xx) with OpenRouter's error body."""
        if not 500 <= status <= 599:
            raise ValueError(f"a server error is a 5xx status, not {status}")
        return cls(LookupFaultKind.HTTP_ERROR, status)

    @classmethod
    def slow(cls, delay_s: float) -> Self:
        """Answer normally after ``delay_s`` seconds; nothing at all if the client hung up meanwhile."""
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        return cls(LookupFaultKind.SLOW, delay_s=delay_s)

    @classmethod
    def not_json(cls) -> Self:
        """HTTP 200 whose body is the first half of the real JSON answer: it does not parse."""
        return cls(LookupFaultKind.NOT_JSON)

    @classmethod
    def without_data(cls) -> Self:
        """HTTP 200 with the valid JSON ``{}``: no ``data`` member."""
        return cls(LookupFaultKind.NO_DATA)


def _bearer_token(header: str) -> str | None:
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


class _ClientGoneError(Exception):
    """The client disconnected, or the simulator is stopping."""


_PRE_STREAM_ERRORS: Final[dict[int, tuple[str, dict[str, Any]]]] = {
    400: ("Invalid request parameters", {}),
    401: ("User not found.", {}),
    402: (
        (
            "Insufficient credits. This account never purchased credits. Make sure your key is on the "
            "correct account or org, and if so, purchase more at https://openrouter.ai/settings/credits"
        ),
        {},
    ),
    403: (
        (
            '{model} requires moderation on {provider}. Your input was flagged for "harassment". No credits '
            "were charged."
        ),
        {"reasons": ["harassment"], "flagged_input": "...", "provider_name": "{provider}"},
    ),
    408: ("Operation timed out. Please try again later.", {}),
    429: (
        "{model} is temporarily rate-limited upstream. Please retry shortly.",
        {"raw": "{model} is temporarily rate-limited upstream.", "provider_name": "{provider}"},
    ),
    500: ("Internal Server Error", {}),
    502: ("Provider returned error", {"raw": "upstream connect error", "provider_name": "{provider}"}),
    503: (
        "No allowed providers are available for the selected model.",
        {"provider_name": "{provider}", "raw": "Service Unavailable"},
    ),
}


class _SimHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sim: OpenRouterSimulator) -> None:
        self.sim = sim
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "OpenRouterSim/1.0"
    sys_version = ""
    timeout = 120
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms stalls

    _status: int = 0
    _headers_sent: bool = False
    _note: str = ""

    def version_string(self) -> str:
        return self.server_version

    @property
    def sim(self) -> OpenRouterSimulator:
        return cast("_SimHTTPServer", self.server).sim

    # ---- plumbing -------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.sim._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.sim._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's parameter name)
        log.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = bytearray()
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send_body(status, to_json(payload).encode("utf-8"), headers)

    def _send_body(self, status: int, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        """Send ``data`` as an ``application/json`` answer (even when it does not parse)."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self._status = status
        self._headers_sent = True
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(
        self,
        status: int,
        message: str,
        metadata: Mapping[str, Any] | None = None,
        *,
        retry_after_s: int | None = None,
    ) -> None:
        error: dict[str, Any] = {"code": status, "message": message}
        if metadata:
            error["metadata"] = dict(metadata)
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        self._send_json(status, {"error": error}, headers)

    def _not_found(self) -> None:
        self._send_json(404, {"error": {"message": "Not Found", "code": 404}})

    def _api_key(self) -> str | None:
        return _bearer_token(self.headers.get("Authorization", ""))

    def _require_key(self) -> str | None:
        key = self._api_key()
        if key is None:
            self._send_json(401, {"error": {"message": "No auth credentials found", "code": 401}})
        return key

    # ---- dispatch -------------------------------------------------------------------------

    def _dispatch(self) -> None:  # noqa: C901, PLR0912, PLR0915 (the route table)
        started = time.time()
        self._status, self._headers_sent, self._note = 0, False, ""
        split = urlsplit(self.path)
        path = split.path
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body: Any = None
        body_ok = True
        try:
            raw = self._read_body()
        except (OSError, ValueError):
            raw, body_ok = b"", False
            self.close_connection = True
        if raw:
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                body_ok = False

        route = path.rstrip("/") if len(path) > 1 else path
        is_chat = self.command == "POST" and route == f"{API_PREFIX}/chat/completions"
        read = self.command in ("GET", "HEAD")
        task = detect_task(_last_user_text(body)) if is_chat and isinstance(body, dict) else None
        recorded = RecordedRequest(self.command, path, query, headers, body, task, received_at=started)
        self.sim._record_request(recorded)
        try:
            rejection = self.sim._rejection(self._api_key())
            if rejection is not None:
                self._send_error(*rejection)
            elif is_chat and self._api_key() and (replay := self.sim._take_replay(recorded)) is not None:
                self._replay(replay, headers)
            elif is_chat:
                self._chat(body, headers, task, body_ok=body_ok)
            elif read and route == f"{API_PREFIX}/models":
                self._send_json(200, _models_payload())
            elif read and route == f"{API_PREFIX}/generation":
                self._generation(query)
            elif read and route == f"{API_PREFIX}/key":
                self._key()
            else:
                self._not_found()
        except _ClientGoneError:
            self.close_connection = True
            self._note += " client-gone"
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self._note += " client-gone"
        except Exception:
            log.exception("simulator failed on %s %s", self.command, path)
            self.close_connection = True
            if not self._headers_sent:
                with contextlib.suppress(OSError):
                    self._send_error(500, "Internal Server Error")
        log.info(
            "%s %s -> %s in %.0f ms%s%s",
            self.command,
            self.path,
            self._status or "-",
            (time.time() - started) * 1000,
            f" task={task}" if task else "",
            self._note,
        )

    # ---- endpoints ------------------------------------------------------------------------

    def _generation(self, query: Mapping[str, str]) -> None:
        if self._require_key() is None:
            return
        fault = self._take_fault("generation")
        if fault is not None and fault.kind is LookupFaultKind.HTTP_ERROR:
            return
        gen_id = query.get("id", "")
        if not gen_id:
            missing = {"error": {"code": 400, "message": "Missing required query parameter: id"}}
            self._answer_lookup(400, missing, fault)
            return
        record = self.sim._ready_generation(gen_id)
        if record is None:
            self._answer_lookup(404, {"error": {"message": "Generation not found", "code": 404}}, fault)
        else:
            self._answer_lookup(200, {"data": _generation_payload(record)}, fault, counted_id=gen_id)

    def _key(self) -> None:
        key = self._require_key()
        if key is None:
            return
        fault = self._take_fault("key")
        if fault is not None and fault.kind is LookupFaultKind.HTTP_ERROR:
            return
        sim = self.sim
        payload = _key_payload(key, sim._key_generations(key), sim.key_limit, sim.key_limit_reset)
        self._answer_lookup(200, {"data": payload}, fault)

    def _take_fault(self, endpoint: LookupEndpoint) -> LookupFault | None:
        """The next injected fault for ``endpoint``; an HTTP error is answered here, a slow answer
        waits here (and ends the request when the client hung up meanwhile)."""
        fault = self.sim._next_lookup_fault(endpoint)
        if fault is None:
            return None
        self._note += f" fault={fault.kind}"
        if fault.kind is LookupFaultKind.HTTP_ERROR:
            message = _FAULT_MESSAGES.get(fault.status, f"Upstream error {fault.status}")
            self._send_error(fault.status, message, retry_after_s=fault.retry_after_s)
        elif fault.kind is LookupFaultKind.SLOW:
            self._pause(fault.delay_s)
            if self._peer_closed():
                raise _ClientGoneError("the client gave up on a slow lookup")
        return fault

    def _answer_lookup(
        self, status: int, payload: Any, fault: LookupFault | None, counted_id: str | None = None
    ) -> None:
        """Send a lookup's answer, garbled as ``fault`` says. A genuine 200 for ``counted_id`` is
        counted before it is sent, so that a client that has read it also sees it counted."""
        if fault is not None and fault.kind is LookupFaultKind.NOT_JSON:
            text = to_json(payload).encode("utf-8")
            self._send_body(200, text[: len(text) // 2])
        elif fault is not None and fault.kind is LookupFaultKind.NO_DATA:
            self._send_json(200, {})
        elif counted_id is None or status != 200:
            self._send_json(status, payload)
        else:
            self.sim._count_successful_lookup(counted_id)
            try:
                self._send_json(status, payload)
            except OSError:
                self.sim._count_successful_lookup(counted_id, -1)
                raise

    def _peer_closed(self) -> bool:
        """Whether the client closed the connection (a client timeout does) while we waited."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _chat(self, body: Any, headers: dict[str, str], task: str | None, *, body_ok: bool) -> None:
        if self._require_key() is None:
            return
        if not body_ok or not isinstance(body, dict):
            self._send_error(400, "Invalid JSON in request body")
            return
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            self._send_error(400, "No model specified")
            return
        model = resolve_model(requested)
        if model is None:
            self._send_error(400, f"{requested} is not a valid model ID")
            return
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            self._send_error(400, 'Input required: specify "prompt" or "messages"')
            return

        # Task prompts embed the chat history, including any directives the user typed, so
        # they ignore directives and always succeed.
        directives = Directives() if task else parse_directives(_last_user_text(body))
        if directives.error is not None:
            self._directed_error(directives.error, requested, model)
            return
        plan = _plan(body, requested, model, directives, task)
        self._note = f" {plan.gen_id}"
        delay = self.sim.chunk_delay_s if directives.delay_ms is None else directives.delay_ms / 1000
        if body.get("stream") is True:
            self._stream(plan, headers, delay)
        else:
            self._complete(plan, headers, delay)

    def _directed_error(self, status: int, requested: str, model: ModelInfo) -> None:
        message, metadata = _PRE_STREAM_ERRORS.get(status, (f"Simulated error {status}", {}))
        fill = {"model": requested, "provider": model.provider}
        meta: dict[str, Any] = {}
        for key, value in metadata.items():
            meta[key] = value.format(**fill) if isinstance(value, str) else value
        retry_after_s = RETRY_AFTER_SECONDS if status == 429 else None
        self._send_error(status, message.format(**fill), meta or None, retry_after_s=retry_after_s)

    # ---- chat: a recorded answer ----------------------------------------------------------

    def _replay(self, served: ServedReplay, headers: dict[str, str]) -> None:
        """Answer with ``served.recording`` byte for byte; keep its generation (if it is one) for
        ``/generation``: before a JSON answer is sent, after the last event of a stream."""
        recording = served.recording
        record = replayed_generation(recording, served.request.body, headers, served.request.received_at)
        self._note = f" replay={recording.name or '-'}" + (f" {record.id}" if record else "")
        self.send_response(recording.status)
        self.send_header("Content-Type", recording.content_type)
        if not recording.streamed:
            if record is not None:
                self.sim._store_generation(record)
            self.send_header("Content-Length", str(len(recording.body)))
            self.end_headers()
            self._status, self._headers_sent = recording.status, True
            self.wfile.write(recording.body)
            return
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._status, self._headers_sent = recording.status, True
        for event in recording.events():
            self._write_chunk(event)
        if record is not None:
            self.sim._store_generation(replace(record, completed_at=time.time()))
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGoneError(str(exc)) from exc

    # ---- chat: non-streaming --------------------------------------------------------------

    def _complete(self, plan: _Plan, headers: dict[str, str], delay: float) -> None:
        started = time.time()
        steps = len(plan.reasoning_chunks) + len(plan.content_chunks)
        if delay > 0:
            self._pause(delay * max(1, steps))
        d = plan.directives
        if d.midstream_error and not plan.tool_call:
            partial = "".join(plan.content_chunks[: plan.error_after])
            completion_tokens = count_tokens(partial) + plan.reasoning_tokens
            usage = plan.usage(completion_tokens, billed=False) if d.midstream_error_usage else None
            error = plan.midstream_error()
            message: dict[str, Any] = {"role": "assistant", "content": partial}
            record = plan.record(usage, completion_tokens, "error", error, headers, started, billed=False)
            self.sim._store_generation(record)
            payload = plan.envelope("chat.completion")
            payload["error"] = error
            payload["choices"] = [_choice(message, "error")]
            payload["system_fingerprint"] = None
            if usage is not None:
                payload["usage"] = usage
            self._send_json(200, payload, {"X-Generation-Id": plan.gen_id})
            return

        message = {"role": "assistant", "content": None if plan.tool_call else plan.text, "refusal": None}
        if plan.reasoning_text:
            message["reasoning"] = plan.reasoning_text
        if plan.tool_call:
            message["tool_calls"] = [plan.tool_call]
        usage = None if d.no_usage else plan.usage(plan.completion_tokens)
        record = plan.record(usage, plan.completion_tokens, plan.finish_reason, None, headers, started)
        self.sim._store_generation(record)
        payload = plan.envelope("chat.completion")
        payload["choices"] = [_choice(message, plan.finish_reason)]
        payload["system_fingerprint"] = None
        if usage is not None:
            payload["usage"] = usage
        self._send_json(200, payload, {"X-Generation-Id": plan.gen_id})

    # ---- chat: streaming ------------------------------------------------------------------

    def _pause(self, seconds: float) -> None:
        if seconds > 0 and self.sim._stopping.wait(seconds):
            raise _ClientGoneError("simulator stopping")

    def _write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGoneError(str(exc)) from exc

    def _sse(self, payload: Any) -> None:
        self._write_chunk(b"data: " + to_json(payload).encode("utf-8") + b"\n\n")

    def _stream(  # noqa: C901, PLR0912, PLR0915 (one stream, chunk by chunk, with every injected fault)
        self, plan: _Plan, headers: dict[str, str], delay: float
    ) -> None:
        started = time.time()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Generation-Id", plan.gen_id)
        self.end_headers()
        self._status, self._headers_sent = 200, True
        d = plan.directives
        sent: list[str] = []  # content (or tool-call name and arguments) streamed so far
        reasoning_sent: list[str] = []
        first_token_at: list[float] = []

        def emit(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
            chunk = plan.envelope("chat.completion.chunk")
            chunk["choices"] = [_stream_choice(delta, finish)]
            chunk.update(extra)
            self._sse(chunk)

        try:
            self._write_chunk(_PROCESSING_COMMENT)
            if plan.model.reasoning or plan.requested_model == AUTO_ROUTER_ID:
                self._pause(delay)
                self._write_chunk(_PROCESSING_COMMENT)
            self._pause(delay)
            emit({"role": "assistant", "content": ""})
            first_token_at.append(time.time())
            for piece in plan.reasoning_chunks:
                self._pause(delay)
                emit({"role": "assistant", "content": "", "reasoning": piece})
                reasoning_sent.append(piece)

            if plan.tool_call is not None:
                self._stream_tool_call(plan, emit, delay, sent)
            else:
                limit = plan.error_after if d.midstream_error else len(plan.content_chunks)
                for piece in plan.content_chunks[:limit]:
                    self._pause(delay)
                    emit({"role": "assistant", "content": piece})
                    sent.append(piece)
                if d.midstream_error:
                    self._pause(delay)
                    completion_tokens = count_tokens("".join(sent)) + plan.reasoning_tokens
                    usage = plan.usage(completion_tokens, billed=False) if d.midstream_error_usage else None
                    error = plan.midstream_error()
                    record = plan.record(
                        usage,
                        completion_tokens,
                        "error",
                        error,
                        headers,
                        started,
                        first_token_at,
                        billed=False,
                    )
                    self.sim._store_generation(record)
                    chunk = plan.envelope("chat.completion.chunk")
                    chunk["error"] = error
                    chunk["choices"] = [_stream_choice({"content": ""}, "error")]
                    if usage is not None:
                        chunk["usage"] = usage
                    self._sse(chunk)
                    self._finish_stream()
                    return

            usage = None if d.no_usage else plan.usage(plan.completion_tokens)
            record = plan.record(
                usage, plan.completion_tokens, plan.finish_reason, None, headers, started, first_token_at
            )
            self.sim._store_generation(record)
            self._pause(delay)
            finish_delta: dict[str, Any] = {"role": "assistant", "content": ""}
            if usage is not None and d.shape == "C":
                emit(finish_delta, plan.finish_reason, usage=usage)
            else:
                emit(finish_delta, plan.finish_reason)
                if usage is not None and d.shape == "A":
                    emit({"role": "assistant", "content": ""}, None, usage=usage)
                elif usage is not None:
                    chunk = plan.envelope("chat.completion.chunk")
                    chunk["choices"] = []
                    chunk["usage"] = usage
                    self._sse(chunk)
            self._finish_stream()
        except _ClientGoneError:
            if not self.sim.has_generation(plan.gen_id):
                # Billed like any generation: the whole prompt, and what was streamed before the
                # client went away (OpenRouter stops the provider there).
                record = plan.record(
                    None,
                    plan.streamed_tokens(sent, reasoning_sent),
                    None,
                    None,
                    headers,
                    started,
                    first_token_at,
                    cancelled=True,
                )
                self.sim._store_generation(record)
            raise

    def _stream_tool_call(
        self, plan: _Plan, emit: Callable[..., None], delay: float, sent: list[str]
    ) -> None:
        call = plan.tool_call
        if call is None:
            raise AssertionError("a tool-call plan always has a tool call")
        self._pause(delay)
        first = {"index": 0, "id": call["id"], "type": "function"}
        first["function"] = {"name": call["function"]["name"], "arguments": ""}
        emit({"role": "assistant", "content": None, "tool_calls": [first]})
        sent.append(call["function"]["name"])
        for piece in _split_chars(call["function"]["arguments"], 16):
            self._pause(delay)
            emit(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"index": 0, "function": {"arguments": piece}}],
                }
            )
            sent.append(piece)

    def _finish_stream(self) -> None:
        self._write_chunk(b"data: [DONE]\n\n")
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGoneError(str(exc)) from exc


# --------------------------------------------------------------------------------------------
# Response planning
# --------------------------------------------------------------------------------------------


def _last_user_text(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def _choice(message: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "logprobs": None,
        "finish_reason": finish,
        "native_finish_reason": finish,
        "index": 0,
        "message": message,
    }


def _stream_choice(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "index": 0,
        "delta": delta,
        "finish_reason": finish,
        "native_finish_reason": finish,
        "logprobs": None,
    }


def _example_value(schema: Any) -> Any:  # noqa: PLR0911 (a return per JSON Schema type)
    if not isinstance(schema, dict):
        return "example"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return "example"


def _tool_call(tools: list[Any]) -> dict[str, Any] | None:
    tool = tools[0] if tools else None
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        return None
    params = fn.get("parameters")
    props = params.get("properties") if isinstance(params, dict) else None
    args: dict[str, Any] = {}
    if isinstance(props, dict):
        required = params.get("required") if isinstance(params, dict) else None
        names = [n for n in props if not isinstance(required, list) or n in required] or list(props)
        args = {name: _example_value(props[name]) for name in names}
    call_id = "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": fn["name"], "arguments": json.dumps(args)},
    }


@dataclass
class _Plan:
    gen_id: str
    created: int
    requested_model: str
    model: ModelInfo
    directives: Directives
    task: str | None
    body: dict[str, Any]
    text: str
    content_chunks: list[str]
    reasoning_text: str
    reasoning_chunks: list[str]
    reasoning_tokens: int
    tool_call: dict[str, Any] | None
    prompt_tokens: int
    cached: int
    cache_write: int
    completion_tokens: int
    finish_reason: str

    @property
    def error_after(self) -> int:
        """How many content chunks go out before a mid-stream error."""
        return max(1, len(self.content_chunks) // 2) if self.content_chunks else 0

    def envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.gen_id,
            "provider": self.model.provider,
            "model": self.model.id,
            "object": obj,
            "created": self.created,
        }

    def midstream_error(self) -> dict[str, Any]:
        code = self.directives.midstream_error_code
        if isinstance(code, int):
            message = "Provider returned error" if code == 502 else f"Upstream error {code}"
        else:
            message = "Provider disconnected unexpectedly: stream terminated"
        return {"code": code, "message": message}

    def streamed_tokens(self, sent: list[str], reasoning_sent: list[str]) -> int:
        """Completion tokens of a stream broken off after ``sent`` (and ``reasoning_sent``) went out."""
        if len(reasoning_sent) == len(self.reasoning_chunks):
            reasoning = self.reasoning_tokens if reasoning_sent else 0
        else:
            reasoning = count_tokens("".join(reasoning_sent))
        return count_tokens("".join(sent)) + reasoning

    def charge(self, completion_tokens: int) -> Charge:
        return compute_charge(
            self.model, self.prompt_tokens, completion_tokens, self.cached, self.cache_write
        )

    def money(self, completion_tokens: int, *, billed: bool = True) -> tuple[Decimal, Decimal, Charge]:
        """(cost, upstream_inference_cost, provider charge) of ``completion_tokens``."""
        charge = self.charge(completion_tokens)
        if not billed:
            zero = Decimal(0)
            return zero, zero, Charge(zero, zero, charge.cache_discount)
        if self.directives.byok:
            return charge.total * BYOK_FEE_RATE, charge.total, charge
        return charge.total, charge.total, charge

    def usage(self, completion_tokens: int, *, billed: bool = True) -> dict[str, Any]:
        cost, upstream, charge = self.money(completion_tokens, billed=billed)
        cost_details: dict[str, Any] | None = {
            "upstream_inference_cost": upstream,
            "upstream_inference_prompt_cost": charge.prompt_cost,
            "upstream_inference_completions_cost": charge.completion_cost,
        }
        cost_out: Decimal | None = cost
        if self.directives.null_cost and billed:
            cost_out, cost_details = None, None
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "cost": cost_out,
            "is_byok": self.directives.byok,
            "prompt_tokens_details": {
                "cached_tokens": self.cached,
                "cache_write_tokens": self.cache_write,
                "audio_tokens": 0,
                "video_tokens": 0,
            },
            "cost_details": cost_details,
            "completion_tokens_details": {
                "reasoning_tokens": min(self.reasoning_tokens, completion_tokens),
                "image_tokens": 0,
                "audio_tokens": 0,
            },
        }

    def record(  # noqa: PLR0913, PLR0917 (what one generation was: every field of its record)
        self,
        usage: dict[str, Any] | None,
        completion_tokens: int,
        finish_reason: str | None,
        error: dict[str, Any] | None,
        headers: dict[str, str],
        started: float,
        first_token_at: list[float] | None = None,
        *,
        billed: bool = True,
        cancelled: bool = False,
    ) -> GenerationRecord:
        cost: Decimal | None
        upstream: Decimal | None
        cost, upstream, charge = self.money(completion_tokens, billed=billed)
        if usage is not None and usage.get("cost") is None:
            cost, upstream = None, None  # null-cost: what was sent is what is recorded
        extra = self.directives.bill_extra
        if extra:
            cost = (cost or Decimal(0)) + extra
        now = time.time()
        first = first_token_at[0] if first_token_at else now
        return GenerationRecord(
            id=self.gen_id,
            requested_model=self.requested_model,
            served_model=self.model.id,
            provider=self.model.provider,
            streamed=self.body.get("stream") is True,
            usage=copy.deepcopy(usage) if usage is not None else {},
            cost=cost,
            upstream_inference_cost=upstream,
            is_byok=self.directives.byok,
            finish_reason=finish_reason,
            error=dict(error) if error else None,
            created_at=started,
            request_body=copy.deepcopy(self.body),
            cancelled=cancelled,
            task=self.task,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            reasoning_tokens=min(self.reasoning_tokens, completion_tokens),
            cached_tokens=self.cached,
            cache_write_tokens=self.cache_write,
            cache_discount=charge.cache_discount,
            completed_at=now,
            latency_ms=round((first - started) * 1000),
            generation_time_ms=round((now - started) * 1000),
            request_headers=dict(headers),
            api_key=_bearer_token(headers.get("authorization", "")),
            bill_extra=extra,
        )


def _plan(body: dict[str, Any], requested: str, model: ModelInfo, d: Directives, task: str | None) -> _Plan:
    messages = [m for m in body["messages"] if isinstance(m, dict)]
    tools = body.get("tools")
    seed_text = "\n".join(f"{m.get('role')}:{_message_text(m)}" for m in messages)
    seed = _digest(seed_text)

    tool_call: dict[str, Any] | None = None
    last_role = messages[-1].get("role") if messages else None
    if (
        d.tool_call
        and not d.midstream_error
        and task is None
        and isinstance(tools, list)
        and tools
        and last_role != "tool"
    ):
        tool_call = _tool_call(tools)

    finish = "stop"
    if task is not None:
        text = _task_answer(task, seed)
        chunks = _split_chunks(text)
    elif tool_call is not None:
        text, chunks, finish = "", [], "tool_calls"
    else:
        text = _compose_answer(seed, min_words=d.chunks or 0)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if d.chunks is None and isinstance(max_tokens, int) and 0 < max_tokens < count_tokens(text):
            text, finish = text[: max_tokens * 4], "length"
        if d.chunks == 0:
            text = ""
        chunks = _split_chunks(text, d.chunks or None)

    reasoning_text = ""
    if d.reasoning != 0 and (model.reasoning or d.reasoning is not None):
        reasoning_text = " ".join(_REASONING[(seed + i) % len(_REASONING)] for i in range(2))
    reasoning_tokens = d.reasoning if d.reasoning is not None else count_tokens(reasoning_text)
    reasoning_chunks = _split_chunks(reasoning_text)

    if tool_call is not None:
        fn = tool_call["function"]
        answer_tokens = count_tokens(fn["name"] + fn["arguments"]) + 3
    else:
        answer_tokens = count_tokens(text)
    prompt_tokens = max(count_prompt_tokens(messages, tools), d.cached + d.cache_write)
    return _Plan(
        gen_id=new_generation_id(),
        created=int(time.time()),
        requested_model=requested,
        model=model,
        directives=d,
        task=task,
        body=body,
        text=text,
        content_chunks=chunks,
        reasoning_text=reasoning_text,
        reasoning_chunks=reasoning_chunks,
        reasoning_tokens=reasoning_tokens,
        tool_call=tool_call,
        prompt_tokens=prompt_tokens,
        cached=d.cached,
        cache_write=d.cache_write,
        completion_tokens=answer_tokens + reasoning_tokens,
        finish_reason=finish,
    )


# --------------------------------------------------------------------------------------------
# Payloads for the GET endpoints
# --------------------------------------------------------------------------------------------

_BASE_PARAMETERS: Final = (
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "response_format",
    "structured_outputs",
    "tools",
    "tool_choice",
)


def _model_entry(m: ModelInfo) -> dict[str, Any]:
    inputs = list(m.input_modalities)
    pricing: dict[str, Any] = {
        "prompt": format_decimal(m.prompt_price),
        "completion": format_decimal(m.completion_price),
        "request": "0",
        "image": "0",
        "web_search": "0",
        "internal_reasoning": "0",
    }
    if m.cache_read_price is not None:
        pricing["input_cache_read"] = format_decimal(m.cache_read_price)
    if m.cache_write_price is not None:
        pricing["input_cache_write"] = format_decimal(m.cache_write_price)
    params = list(_BASE_PARAMETERS)
    if m.reasoning:
        params += ["reasoning", "include_reasoning"]
    return {
        "id": m.id,
        "canonical_slug": m.canonical_slug or m.id,
        "hugging_face_id": m.hugging_face_id,
        "name": m.name,
        "created": m.created,
        "description": m.description,
        "context_length": m.context_length,
        "architecture": {
            "modality": ("text+image" if "image" in inputs else "text") + "->text",
            "input_modalities": inputs,
            "output_modalities": ["text"],
            "tokenizer": m.tokenizer,
            "instruct_type": m.instruct_type,
        },
        "pricing": pricing,
        "top_provider": {
            "context_length": m.context_length,
            "max_completion_tokens": m.max_completion_tokens,
            "is_moderated": m.is_moderated,
        },
        "per_request_limits": None,
        "supported_parameters": params,
        "default_parameters": {"temperature": None, "top_p": None, "frequency_penalty": None},
        "supported_voices": None,
        "knowledge_cutoff": None,
        "expiration_date": None,
        "links": {"details": f"{API_PREFIX}/models/{m.canonical_slug or m.id}/endpoints"},
    }


def _models_payload() -> dict[str, Any]:
    data = [_model_entry(m) for m in MODELS.values()]
    data.append(
        {
            "id": AUTO_ROUTER_ID,
            "canonical_slug": AUTO_ROUTER_ID,
            "hugging_face_id": None,
            "name": "Auto Router",
            "created": 1699401600,
            "description": "Your prompt will be processed by a meta-model and routed to one of the models.",
            "context_length": 2000000,
            "architecture": {
                "modality": "text->text",
                "input_modalities": ["text"],
                "output_modalities": ["text"],
                "tokenizer": "Router",
                "instruct_type": None,
            },
            "pricing": {"prompt": "-1", "completion": "-1"},
            "top_provider": {"context_length": None, "max_completion_tokens": None, "is_moderated": False},
            "per_request_limits": None,
            "supported_parameters": list(_BASE_PARAMETERS),
            "default_parameters": None,
            "supported_voices": None,
            "knowledge_cutoff": None,
            "expiration_date": None,
            "links": {"details": f"{API_PREFIX}/models/{AUTO_ROUTER_ID}/endpoints"},
        }
    )
    # total_count and links are required by the spec's ModelsListResponse.
    return {"data": data, "total_count": len(data), "links": {"next": None}}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _generation_payload(r: GenerationRecord) -> dict[str, Any]:
    body = r.request_body if isinstance(r.request_body, dict) else {}
    user = body.get("user")
    session = body.get("session_id")
    referer = r.request_headers.get("http-referer") or r.request_headers.get("referer")
    total = r.cost if r.cost is not None else Decimal(0)
    return {
        "id": r.id,
        "upstream_id": "chatcmpl-" + hashlib.sha256(r.id.encode()).hexdigest()[:29],
        "total_cost": total,
        "cache_discount": r.cache_discount,
        "upstream_inference_cost": r.upstream_inference_cost,
        "created_at": _iso(r.created_at),
        "model": r.served_model,
        "app_id": None,
        "streamed": r.streamed,
        "cancelled": r.cancelled,
        "provider_name": r.provider,
        "latency": r.latency_ms,
        "moderation_latency": None,
        "generation_time": r.generation_time_ms,
        "finish_reason": r.finish_reason,
        "native_finish_reason": r.finish_reason,
        "service_tier": None,
        "tokens_prompt": r.prompt_tokens,
        "tokens_completion": r.completion_tokens,
        "native_tokens_prompt": r.prompt_tokens,
        "native_tokens_completion": r.completion_tokens,
        "native_tokens_completion_images": 0,
        "native_tokens_reasoning": r.reasoning_tokens,
        "native_tokens_cached": r.cached_tokens,
        "num_media_prompt": 0,
        "num_input_audio_prompt": 0,
        "num_media_completion": 0,
        "num_search_results": 0,
        "num_fetches": 0,
        "web_search_engine": None,
        "origin": referer or "",
        "usage": total,
        "is_byok": r.is_byok,
        "external_user": user if isinstance(user, str) else None,
        "api_type": "completions",
        "preset_id": None,
        "router": r.requested_model if r.requested_model == AUTO_ROUTER_ID else None,
        "provider_responses": [
            {
                "id": "chatcmpl-" + hashlib.sha256(r.id.encode()).hexdigest()[:29],
                "endpoint_id": hashlib.sha256(r.served_model.encode()).hexdigest()[:32],
                "model_permaslug": MODELS[r.served_model].canonical_slug if r.served_model in MODELS else "",
                "provider_name": r.provider,
                "status": 200 if r.error is None else 502,
                "latency": r.latency_ms,
                "is_byok": r.is_byok,
            }
        ],
        "user_agent": r.request_headers.get("user-agent"),
        "http_referer": referer,
        "data_region": "global",
        "workspace_id": None,
        "request_id": "req-" + r.id.removeprefix("gen-"),
        "session_id": session if isinstance(session, str) else None,
        "response_cache_source_id": None,
    }


KeyLimitReset = Literal["daily", "weekly", "monthly"]
_RESET_SUFFIX: Final[dict[str | None, str]] = {
    None: "",
    "daily": "_daily",
    "weekly": "_weekly",
    "monthly": "_monthly",
}


def _key_payload(
    key: str,
    generations: Iterable[GenerationRecord],
    limit: Decimal | None = None,
    limit_reset: KeyLimitReset | None = None,
) -> dict[str, Any]:
    """``/key``'s ``data`` for ``key``, summing ``generations`` (the caller passes that key's).

    ``limit_remaining`` is ``limit`` minus the usage of the window ``limit_reset`` names (all time
    when it is None), BYOK excluded as ``include_byok_in_limit: false`` says; it is not clamped.
    """
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week = day - timedelta(days=day.weekday())
    month = day.replace(day=1)
    starts = {"": 0.0, "_daily": day.timestamp(), "_weekly": week.timestamp(), "_monthly": month.timestamp()}
    sums = {f"{kind}{suffix}": Decimal(0) for kind in ("usage", "byok_usage") for suffix in starts}
    for g in generations:
        for suffix, start in starts.items():
            if g.created_at >= start:
                sums[f"usage{suffix}"] += g.cost or Decimal(0)
                if g.is_byok:
                    sums[f"byok_usage{suffix}"] += g.upstream_inference_cost or Decimal(0)
    label = f"{key[:12]}...{key[-3:]}" if len(key) > 15 else f"{key[:3]}..."
    remaining = None if limit is None else limit - sums["usage" + _RESET_SUFFIX[limit_reset]]
    return {
        "label": label,
        "limit": limit,
        "limit_remaining": remaining,
        "limit_reset": limit_reset,
        "include_byok_in_limit": False,
        "is_free_tier": False,
        "is_management_key": False,
        "is_provisioning_key": False,
        "creator_user_id": "user_sim0000000000000000000000",
        "expires_at": None,
        "rate_limit": {
            "requests": -1,
            "interval": "10s",
            "note": "This field is deprecated and safe to ignore.",
        },
        **sums,
    }


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


# Every path any simulator in this process was asked for, kept through clear() and stop(): a test
# session checks at its end that nothing ever asked for the non-existent bulk listing. Requests
# marked with SELF_TEST_HEADER (the simulator's own tests of its 404s) are left out.
PATHS_SEEN_BY_ANY_SIMULATOR: list[str] = []
SELF_TEST_HEADER = "x-simulator-self-test"
_PATHS_LOCK = threading.Lock()


class OpenRouterSimulator:
    """An OpenRouter API simulator serving on loopback from a daemon thread.

    Plain attributes, read per request, so tests may change them on a running simulator:

    * ``chunk_delay_s``: pause between stream events.
    * ``generation_ready_after_s``: how long ``/generation`` answers 404 after a generation
      completed; ``cancelled_ready_extra_s`` more after a stream the client broke off.
    * ``key_limit`` (USD) and ``key_limit_reset`` (``"daily"``, ``"weekly"``, ``"monthly"`` or
      None): ``/key``'s ``limit`` and ``limit_reset``; ``limit_remaining`` follows from them.

    Methods steer the lookups (``GET /generation`` and ``GET /key``), all thread-safe:
    :meth:`inject_lookup_faults` queues :class:`LookupFault` answers, :meth:`reject_key` makes
    every endpoint refuse a key, :meth:`add_to_bill` bills a generation differently from its wire
    usage, :meth:`successful_lookups` counts the 200 answers ``/generation`` gave per id.
    """

    def __init__(  # noqa: PLR0913 (each is a documented knob with a default)
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        chunk_delay_s: float = 0.0,
        generation_ready_after_s: float = 0.0,
        *,
        cancelled_ready_extra_s: float = 0.25,
        key_limit: Decimal | None = None,
        key_limit_reset: KeyLimitReset | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.chunk_delay_s = chunk_delay_s
        self.generation_ready_after_s = generation_ready_after_s
        self.cancelled_ready_extra_s = cancelled_ready_extra_s
        self.key_limit = key_limit
        self.key_limit_reset = key_limit_reset
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._generations: dict[str, GenerationRecord] = {}
        self._lookup_faults: dict[LookupEndpoint, deque[LookupFault]] = {
            "generation": deque(),
            "key": deque(),
        }
        self._rejected_keys: dict[str, tuple[int, str]] = {}
        self._successful_lookups: Counter[str] = Counter()
        self._replays: deque[Recording] = deque()
        self._served_replays: list[ServedReplay] = []
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _SimHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._stopping.clear()
        server = _SimHTTPServer((self.host, self.requested_port), self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="openrouter-sim", daemon=True
        )
        self._thread.start()
        log.info("OpenRouter simulator listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- public state ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("simulator not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}{API_PREFIX}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def generations(self) -> dict[str, GenerationRecord]:
        with self._lock:
            return dict(self._generations)

    def has_generation(self, gen_id: str) -> bool:
        with self._lock:
            return gen_id in self._generations

    def clear(self) -> None:
        """Forget requests, generations, queued faults and replays, served replays and lookup counts
        (rejected keys stay)."""
        with self._lock:
            self._requests.clear()
            self._generations.clear()
            self._replays.clear()
            self._served_replays.clear()
            for faults in self._lookup_faults.values():
                faults.clear()
            self._successful_lookups.clear()

    # ---- replaying recorded answers ---------------------------------------------------------

    def replay_next(self, *recordings: Recording) -> None:
        """Queue ``recordings``: each following ``POST /chat/completions`` with an accepted key
        takes the next one and gets it byte for byte (status, ``Content-Type``, body; a stream one
        event per HTTP chunk) instead of a simulated answer, whatever it asked. Title, tag and
        follow-up requests (:func:`detect_task`) take none. A recording that is a priced generation
        (a 200 with a ``gen-`` id and ``usage.cost``) is also kept for ``/generation`` and ``/key``
        with its own id, tokens and money (:func:`replayed_generation`)."""
        with self._lock:
            self._replays.extend(recordings)

    def pending_replays(self) -> int:
        """How many queued recordings no request has taken yet."""
        with self._lock:
            return len(self._replays)

    @property
    def served_replays(self) -> list[ServedReplay]:
        """The recordings taken so far, in order, each with the request it answered."""
        with self._lock:
            return list(self._served_replays)

    # ---- steering the lookups -------------------------------------------------------------

    def inject_lookup_faults(self, *faults: LookupFault, endpoint: LookupEndpoint = "generation") -> None:
        """Queue ``faults`` for ``endpoint``; each authenticated request to it takes the next one.

        ``/generation`` and ``/key`` have separate queues. A request that finds its queue empty is
        answered normally. Requests without a key or with a rejected key take no fault.
        """
        with self._lock:
            self._lookup_faults[endpoint].extend(faults)

    def pending_lookup_faults(self, endpoint: LookupEndpoint = "generation") -> int:
        """How many injected faults ``endpoint`` has not used yet."""
        with self._lock:
            return len(self._lookup_faults[endpoint])

    def reject_key(self, key: str, status: Literal[401, 403] = 401, message: str | None = None) -> None:
        """Answer every request carrying ``key``, on every endpoint, with ``status`` and
        OpenRouter's error body (default messages ``User not found.`` / ``Key limit exceeded``)."""
        default = "User not found." if status == 401 else "Key limit exceeded"
        with self._lock:
            self._rejected_keys[key] = (status, message or default)

    def accept_key(self, key: str) -> None:
        """Undo :meth:`reject_key`."""
        with self._lock:
            self._rejected_keys.pop(key, None)

    def add_to_bill(self, gen_id: str, extra_usd: Decimal) -> None:
        """Bill generation ``gen_id`` ``extra_usd`` more in ``/generation`` and ``/key`` than its
        wire ``usage.cost`` said (like ``[sim:bill-extra=...]``); raises KeyError for an unknown id."""
        with self._lock:
            record = self._generations[gen_id]
            self._generations[gen_id] = replace(
                record,
                cost=(record.cost or Decimal(0)) + extra_usd,
                bill_extra=record.bill_extra + extra_usd,
            )

    def successful_lookups(self) -> dict[str, int]:
        """Per generation id, how many ``/generation`` requests got a 200 answer with its data."""
        with self._lock:
            return dict(self._successful_lookups)

    # ---- used by the handler --------------------------------------------------------------

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _record_request(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
        if SELF_TEST_HEADER not in request.headers:
            with _PATHS_LOCK:
                PATHS_SEEN_BY_ANY_SIMULATOR.append(request.path)

    def _take_replay(self, request: RecordedRequest) -> ServedReplay | None:
        """The next queued recording for chat request ``request``, or None for a task request
        (title, tags, follow-ups) or when none is queued."""
        if request.task is not None:
            return None
        with self._lock:
            if not self._replays:
                return None
            recording = self._replays.popleft()
            record = replayed_generation(recording, request.body, request.headers, request.received_at)
            served = ServedReplay(recording, request, record.id if record else None)
            self._served_replays.append(served)
            return served

    def _store_generation(self, record: GenerationRecord) -> None:
        with self._lock:
            self._generations[record.id] = record

    def _ready_generation(self, gen_id: str) -> GenerationRecord | None:
        with self._lock:
            record = self._generations.get(gen_id)
        if record is None:
            return None
        wait = self.generation_ready_after_s + (self.cancelled_ready_extra_s if record.cancelled else 0.0)
        return None if time.time() < record.completed_at + wait else record

    def _key_generations(self, key: str) -> list[GenerationRecord]:
        with self._lock:
            return [g for g in self._generations.values() if g.api_key == key]

    def _next_lookup_fault(self, endpoint: LookupEndpoint) -> LookupFault | None:
        with self._lock:
            faults = self._lookup_faults[endpoint]
            return faults.popleft() if faults else None

    def _rejection(self, key: str | None) -> tuple[int, str] | None:
        if key is None:
            return None
        with self._lock:
            return self._rejected_keys.get(key)

    def _count_successful_lookup(self, gen_id: str, step: Literal[1, -1] = 1) -> None:
        with self._lock:
            self._successful_lookups[gen_id] += step
            if not self._successful_lookups[gen_id]:
                del self._successful_lookups[gen_id]
