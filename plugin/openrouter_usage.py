"""
title: OpenRouter Usage
author: openrouter-usage
version: 1.0.0
license: MIT
description: Exact OpenRouter usage and cost for every chat completion: ledger, usage line, reports.
required_open_webui_version: 0.10.0
"""

# ── The Open WebUI contract this file relies on (checked against 0.12.4) ──────────────────────────
# * Loading: the source text is exec'd into a fresh module (no usable __file__); certain import
#   spellings are rewritten on load, so this file imports only the standard library, pydantic
#   and SQLAlchemy, both shipped with Open WebUI. One Filter instance serves every user and
#   request, so per-request state lives in __metadata__ (one dict shared by inlet, stream, outlet).
# * Hooks: only parameters named in a signature are passed; coroutine functions are awaited and
#   plain functions called directly (`stream` is plain here). `stream` sees each upstream SSE chunk
#   as a dict, for every model call of a turn (tool rounds included), never for non-streaming
#   responses. `outlet` runs server-side after every completion (0.9), API calls included (0.10);
#   the legacy POST /api/chat/completed runs it again for the same message. No outlet runs for a
#   stopped generation. Title, tag and follow-up generations never reach a function filter.
#   A streamed `error` is shown to the user only when its chunk has no choices.
# * The outlet body's last assistant message carries `usage` as Open WebUI merged it: it SUMS
#   input_tokens/output_tokens/total_tokens/cost over tool rounds (as floats) and keeps the last
#   round's other keys. Non-streaming outlets carry no generation id or provider.
# * API calls: __event_emitter__ is None in outlet, chat_id is "", message_id is None (the outlet
#   body's "id" holds a generated msg_… id).
# * Valves: self.valves is rebuilt as Valves(**saved) before every hook; the admin and user valve
#   specs are rebuilt synchronously on the event loop on every GET …/valves/spec, which runs a
#   callable json_schema_extra and calls a UserValves classmethod named in input.options with
#   __user__. A validation error on save reaches the admin only as a generic toast.
# * Internals read, each behind a guard that degrades to "unknown": open_webui.env.DATA_DIR (where
#   the default ledger lives) and the `openai.api_base_urls` config key with the model's urlIdx
#   (which connection served the request).

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import copy
import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import operator
import os
import queue
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from pydantic import BaseModel, Field, model_validator
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

log = logging.getLogger("openrouter_usage")

FUNCTION_ID: Final = "openrouter_usage"
STATE_KEY: Final = "openrouter_usage"
PICO_PER_USD: Final = 10**12
PICO: Final = Decimal("1e-12")
DEFAULT_SQLITE_NAME: Final = "openrouter_usage.sqlite3"
DATABASE_URL_ENV: Final = "OPENROUTER_USAGE_DATABASE_URL"

EventEmitter = Callable[[dict[str, Any]], Awaitable[Any]]


# ══ Value types ═══════════════════════════════════════════════════════════════════════════════════


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and money of one completion, money in integer pico-dollars (exact)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_pico: int | None = None
    upstream_cost_pico: int | None = None
    is_byok: bool = False

    @property
    def spend_pico(self) -> int:
        """What the completion cost the account: `cost`, plus the provider's charge for BYOK only.

        For non-BYOK responses OpenRouter also fills upstream_inference_cost with about the same
        number as cost, so adding it would count the money twice.
        """
        spend = self.cost_pico or 0
        if self.is_byok:
            spend += self.upstream_cost_pico or 0
        return spend

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            cost_pico=_add_optional(self.cost_pico, other.cost_pico),
            upstream_cost_pico=_add_optional(self.upstream_cost_pico, other.upstream_cost_pico),
            is_byok=self.is_byok or other.is_byok,
        )


def _add_optional(left: int | None, right: int | None) -> int | None:
    if left is None:
        return right
    if right is None:
        return left
    return left + right


Status = Literal["ok", "error"]


@dataclasses.dataclass(frozen=True, slots=True)
class UsageRecord:
    """One ledger row: everything known about one assistant message's completion."""

    message_id: str
    chat_id: str
    user_id: str
    user_name: str
    generation_ids: tuple[str, ...]
    model: str
    served_model: str
    provider: str
    usage: Usage
    status: Status
    error: str
    latency_ms: int | None
    ttft_ms: int | None
    raw_usage: Mapping[str, Any] | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form, used by the spool: it round-trips through `from_json` unchanged."""
        data = dataclasses.asdict(self)
        data["generation_ids"] = list(self.generation_ids)
        data["created_at"] = self.created_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UsageRecord:
        fields = dict(data)
        fields["usage"] = Usage(**fields["usage"])
        fields["generation_ids"] = tuple(fields["generation_ids"])
        fields["created_at"] = datetime.fromisoformat(fields["created_at"])
        return cls(**fields)


class CaptureState:
    """What inlet and stream learn about one request, kept in __metadata__ until outlet.

    `stream` runs once per chunk, so the per-chunk path only compares the chunk's id with the last
    one seen and checks for `usage`/`error` keys; everything else happens on the rare chunks that
    carry something new.
    """

    __slots__ = (
        "calls",
        "error",
        "first_token_at",
        "generation_ids",
        "is_openrouter_connection",
        "last_id",
        "provider",
        "served_model",
        "started_at",
    )

    def __init__(self, started_at: float, is_openrouter_connection: bool | None = None) -> None:
        self.started_at = started_at
        self.is_openrouter_connection = is_openrouter_connection
        self.first_token_at: float | None = None
        self.last_id: object = None
        self.generation_ids: list[str] = []
        self.provider = ""
        self.served_model = ""
        # Per model call (keyed by generation id): the parsed usage and the object as sent.
        self.calls: dict[str, tuple[Usage, Mapping[str, Any]]] = {}
        self.error = ""

    @property
    def has_openrouter_signature(self) -> bool:
        return bool(self.provider) or any(gid.startswith("gen-") for gid in self.generation_ids)


# ══ Parsing ═══════════════════════════════════════════════════════════════════════════════════════


def first_number(mapping: Mapping[str, Any] | None, *keys: str) -> int | float | None:
    """The first of `keys` whose value is a number (0 counts; booleans do not)."""
    if not isinstance(mapping, Mapping):
        return None
    for key in keys:
        value = mapping.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    return None


def first_int(mapping: Mapping[str, Any] | None, *keys: str) -> int:
    value = first_number(mapping, *keys)
    return int(value) if value is not None else 0


def to_decimal(value: Any) -> Decimal | None:
    """An exact Decimal for a JSON money value, or None.

    Open WebUI hands filters parsed JSON, so money arrives as float. repr() of a float is the
    shortest text that round-trips, which is the literal OpenRouter sent for any value with up to
    17 significant digits; Decimal(float) would instead expose the binary approximation.
    """
    if isinstance(value, bool) or value is None:
        return None
    try:
        if isinstance(value, Decimal):
            result = value
        elif isinstance(value, float):
            result = Decimal(repr(value))
        elif isinstance(value, int | str):
            result = Decimal(value)
        else:
            return None
    except (InvalidOperation, ValueError):
        return None
    return result if result.is_finite() else None


def usd_to_pico(amount: Decimal) -> int:
    """Integer pico-dollars; rounding at 1e-12 absorbs the float noise of Open WebUI's sums."""
    return int(amount.quantize(PICO, rounding=ROUND_HALF_EVEN).scaleb(12))


def pico_to_usd(pico: int) -> Decimal:
    return Decimal(pico).scaleb(-12)


def decimal_text(amount: Decimal) -> str:
    """Plain decimal notation without trailing zeros: 0.00002415, 12, never 2.415E-5."""
    text = format(amount.normalize(), "f")
    return "0" if text in ("-0", "") else text


def money_pico(mapping: Mapping[str, Any] | None, key: str) -> int | None:
    if not isinstance(mapping, Mapping):
        return None
    amount = to_decimal(mapping.get(key))
    return usd_to_pico(amount) if amount is not None else None


def _details(usage: Mapping[str, Any], *keys: str) -> Mapping[str, Any] | None:
    for key in keys:
        value = usage.get(key)
        if isinstance(value, Mapping):
            return value
    return None


def parse_usage(raw: Mapping[str, Any]) -> Usage:
    """Read a usage object: OpenRouter's own, or Open WebUI's merge of several of them.

    Open WebUI's canonical input/output/total keys are sums over tool rounds, while
    prompt/completion_tokens keep only the last round, so the canonical keys come first.
    """
    prompt = first_int(raw, "input_tokens", "prompt_tokens")
    completion = first_int(raw, "output_tokens", "completion_tokens")
    total = first_number(raw, "total_tokens")
    prompt_details = _details(raw, "prompt_tokens_details", "input_tokens_details")
    completion_details = _details(raw, "completion_tokens_details", "output_tokens_details")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=int(total) if total is not None else prompt + completion,
        cached_tokens=first_int(prompt_details, "cached_tokens"),
        cache_write_tokens=first_int(prompt_details, "cache_write_tokens"),
        reasoning_tokens=first_int(completion_details, "reasoning_tokens"),
        cost_pico=money_pico(raw, "cost"),
        upstream_cost_pico=money_pico(_details(raw, "cost_details"), "upstream_inference_cost"),
        is_byok=raw.get("is_byok") is True,
    )


def describe_error(error: Any) -> str:
    """A short, loggable text for a provider error object (code and message, never content)."""
    if isinstance(error, Mapping):
        code = error.get("code")
        message = str(error.get("message") or "").strip()
        text = f"{code}: {message}" if code not in (None, "") else message
    else:
        text = str(error)
    return text[:500] or "error"


def observe_chunk(state: CaptureState, chunk: Any) -> None:
    """Fold one streamed chunk into the request's state. Runs once per chunk: keep it cheap."""
    if type(chunk) is not dict:
        return
    chunk_id = chunk.get("id")
    if chunk_id != state.last_id:
        _observe_new_generation(state, chunk, chunk_id)
    if state.first_token_at is None:
        _observe_first_token(state, chunk)
    if "usage" in chunk or "error" in chunk:
        _observe_usage_or_error(state, chunk)


def _observe_new_generation(state: CaptureState, chunk: dict[str, Any], chunk_id: Any) -> None:
    state.last_id = chunk_id
    if isinstance(chunk_id, str) and chunk_id and chunk_id not in state.generation_ids:
        state.generation_ids.append(chunk_id)
    provider = chunk.get("provider")
    if isinstance(provider, str) and provider:
        state.provider = provider
    model = chunk.get("model")
    if isinstance(model, str) and model:
        state.served_model = model


def _observe_first_token(state: CaptureState, chunk: dict[str, Any]) -> None:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and delta.get("content"):
            state.first_token_at = time.monotonic()
            return


def _observe_usage_or_error(state: CaptureState, chunk: dict[str, Any]) -> None:
    raw = chunk.get("usage")
    if isinstance(raw, Mapping):
        chunk_id = chunk.get("id")
        key = chunk_id if isinstance(chunk_id, str) else f"call-{len(state.calls)}"
        state.calls[key] = (parse_usage(raw), raw)
    error = chunk.get("error")
    if error:
        state.error = describe_error(error)
        surface_stream_error(chunk)


def surface_stream_error(chunk: dict[str, Any]) -> None:
    """Let Open WebUI show a mid-stream error. OpenRouter sends it beside a choice whose
    finish_reason is "error", but Open WebUI 0.12.4 reads `error` only from chunks without
    choices, so the answer would just stop, truncated, with no error shown."""
    if chunk.get("choices"):
        chunk["choices"] = []


def final_assistant_message(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The assistant message this outlet is about: the one whose id is body["id"], else the last."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return {}
    target = body.get("id")
    assistants = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant"]
    for message in reversed(assistants):
        if target and message.get("id") == target:
            return message
    return assistants[-1] if assistants else {}


def message_usage(message: Mapping[str, Any]) -> Mapping[str, Any] | None:
    usage = message.get("usage")
    if not isinstance(usage, Mapping):
        info = message.get("info")
        usage = info.get("usage") if isinstance(info, Mapping) else None
    return usage if isinstance(usage, Mapping) and usage else None


def assistant_message_ids(body: Mapping[str, Any]) -> list[str]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [
        str(m["id"])
        for m in messages
        if isinstance(m, Mapping) and m.get("role") == "assistant" and isinstance(m.get("id"), str)
    ]


def matches_url_pattern(base_url: str | None, pattern: str) -> bool:
    """Whether a connection URL contains one of the comma-separated fragments in `pattern`."""
    if not base_url:
        return False
    fragments = [p.strip().lower() for p in pattern.split(",") if p.strip()]
    return any(fragment in base_url.lower() for fragment in fragments)


@dataclasses.dataclass(frozen=True, slots=True)
class CompletionContext:
    """What outlet knows besides the stream state: who asked, which message, and the settings."""

    body: Mapping[str, Any]
    user: Mapping[str, Any] | None
    metadata: Mapping[str, Any] | None
    record_all_models: bool
    now: datetime
    now_monotonic: float


def build_record(state: CaptureState, context: CompletionContext) -> UsageRecord | None:
    """The ledger row for this completion, or None when it is not OpenRouter traffic to record."""
    body = context.body
    message = final_assistant_message(body)
    outlet_usage = message_usage(message)
    is_openrouter = bool(
        state.is_openrouter_connection
        or state.has_openrouter_signature
        or (outlet_usage is not None and "cost" in outlet_usage)
    )
    if not (is_openrouter or context.record_all_models):
        log.debug("openrouter_usage: completion not from OpenRouter; not recorded")
        return None

    if state.calls:
        # Exact per-call usage seen in the stream beats Open WebUI's float sums of the same calls.
        usage = sum((call_usage for call_usage, _ in state.calls.values()), Usage())
        raws = [call_raw for _, call_raw in state.calls.values()]
        raw: Mapping[str, Any] | None = raws[0] if len(raws) == 1 else {"calls": raws}
    elif outlet_usage is not None:
        usage, raw = parse_usage(outlet_usage), outlet_usage
    else:
        usage, raw = Usage(), None

    metadata = context.metadata or {}
    user = context.user or {}
    message_id = _first_text(metadata.get("message_id"), body.get("id"), message.get("id"))
    if not message_id:
        message_id = state.generation_ids[0] if state.generation_ids else f"unidentified-{uuid.uuid4()}"
        log.warning("openrouter_usage: completion has no message id; recorded as %s", message_id)
    if not user.get("id"):
        log.warning("openrouter_usage: completion %s has no user; recorded as unknown", message_id)
    if raw is None:
        log.warning(
            "openrouter_usage: completion %s reported no usage; recorded with zero tokens", message_id
        )

    error = state.error
    if not error and message.get("finish_reason") == "error":
        error = "provider reported finish_reason=error"
    ttft_ms = (
        round((state.first_token_at - state.started_at) * 1000) if state.first_token_at is not None else None
    )
    return UsageRecord(
        message_id=message_id,
        chat_id=_first_text(body.get("chat_id"), metadata.get("chat_id")),
        user_id=str(user.get("id") or "unknown"),
        user_name=str(user.get("name") or user.get("email") or "unknown"),
        generation_ids=tuple(state.generation_ids),
        model=_first_text(body.get("model")),
        served_model=state.served_model or _first_text(body.get("model")),
        provider=state.provider,
        usage=usage,
        status="error" if error else "ok",
        error=error,
        latency_ms=round((context.now_monotonic - state.started_at) * 1000),
        ttft_ms=ttft_ms,
        raw_usage=raw,
        created_at=context.now,
    )


def _first_text(*values: Any) -> str:
    for value in values:
        if isinstance(value, str) and value:
            return value
    return ""


# ══ Ledger ════════════════════════════════════════════════════════════════════════════════════════
# Tables share one prefix so the ledger can live inside Open WebUI's own PostgreSQL database.
# Money is integer pico-dollars (1e-12 USD): SQLite's SUM over integers is exact, NUMERIC is not.

TABLE_PREFIX: Final = "openrouter_usage_"
MEASURES: Final = (
    "requests",
    "failed",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_pico",
    "upstream_cost_pico",
    "spend_pico",
)
MIGRATION_LOCK_KEY: Final = 0x6F72_7573_0001  # PostgreSQL advisory lock keys, "orus" + purpose
ROLLUP_LOCK_KEY: Final = 0x6F72_7573_0002
MAX_BATCH: Final = 256
WRITE_ATTEMPTS: Final = 3  # a batch that lost a race to another process is retried
WRITER_IDLE_SECONDS: Final = 30.0
LOOP_CATCH_UP_SECONDS: Final = 0.002  # longest the writer holds a batch open for a busy event loop
LAST_SEEN_RESOLUTION: Final = timedelta(minutes=1)  # users.last_seen_at is rewritten at most this often
SEEN_USERS_CAPACITY: Final = 10_000

schema = sa.MetaData()
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER PRIMARY KEY is SQLite's rowid


def _measure_columns() -> list[sa.Column[Any]]:
    return [sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in MEASURES]


migrations_table = sa.Table(
    f"{TABLE_PREFIX}migrations",
    schema,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)
ledger_table = sa.Table(
    f"{TABLE_PREFIX}ledger",
    schema,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime, nullable=False),  # UTC, naive on every engine
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("user_name", sa.Text, nullable=False),
    sa.Column("chat_id", sa.Text, nullable=False),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("generation_ids", sa.Text, nullable=False),  # JSON array
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("served_model", sa.Text, nullable=False),
    sa.Column("provider", sa.Text, nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("total_tokens", sa.BigInteger, nullable=False),
    sa.Column("cached_tokens", sa.BigInteger, nullable=False),
    sa.Column("cache_write_tokens", sa.BigInteger, nullable=False),
    sa.Column("reasoning_tokens", sa.BigInteger, nullable=False),
    sa.Column("cost_pico", sa.BigInteger, nullable=True),
    sa.Column("upstream_cost_pico", sa.BigInteger, nullable=True),
    sa.Column("spend_pico", sa.BigInteger, nullable=False),
    sa.Column("is_byok", sa.Boolean, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("latency_ms", sa.Integer, nullable=True),
    sa.Column("ttft_ms", sa.Integer, nullable=True),
    sa.Column("usage_json", sa.Text, nullable=True),  # the provider's usage object, verbatim
    sa.UniqueConstraint("message_id", name=f"{TABLE_PREFIX}ledger_message_id_key"),
    sa.Index(f"{TABLE_PREFIX}ledger_created_at", "created_at"),
    sa.Index(f"{TABLE_PREFIX}ledger_user_created_at", "user_id", "created_at"),
    sa.Index(f"{TABLE_PREFIX}ledger_chat_id", "chat_id"),
)
users_table = sa.Table(
    f"{TABLE_PREFIX}users",
    schema,
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("user_name", sa.Text, nullable=False),
    sa.Column("last_seen_at", sa.DateTime, nullable=False),
)


def _rollup_table(name: str, *keys: str) -> sa.Table:
    """A rollup: text key columns (the primary key, day first) and one integer column per measure.

    On SQLite the table is stored in key order (WITHOUT ROWID), so a range of days is one
    contiguous read that already holds every measure; and no index leads with another column,
    which would tempt SQLite's planner into scanning every day to avoid a sort.
    """
    key_columns = [sa.Column(key, sa.Text, primary_key=True) for key in keys]
    return sa.Table(
        f"{TABLE_PREFIX}{name}", schema, *key_columns, *_measure_columns(), sqlite_with_rowid=False
    )


# Rollups are keyed by the calendar day in the report time zone (meta key "rollup_timezone") and
# updated in the same transaction as the ledger rows they count, so reports never scan the ledger.
rollup_day_table = _rollup_table("rollup_day", "day")
rollup_user_day_table = _rollup_table("rollup_user_day", "day", "user_id")
rollup_model_day_table = _rollup_table("rollup_model_day", "day", "served_model", "provider")
meta_table = sa.Table(
    f"{TABLE_PREFIX}meta",
    schema,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
ROLLUP_TABLES: Final = (rollup_day_table, rollup_user_day_table, rollup_model_day_table)


def _create_tables(*tables: sa.Table) -> Callable[[sa.Connection], None]:
    def apply(conn: sa.Connection) -> None:
        for table in tables:
            table.create(conn, checkfirst=True)

    return apply


def _recreate_rollup(table: sa.Table) -> Callable[[sa.Connection], None]:
    """Rollups are derived data: drop and recreate one in its current layout, and mark all
    rollups stale, so the next write or report recounts them from the ledger."""

    def apply(conn: sa.Connection) -> None:
        table.drop(conn, checkfirst=True)
        table.create(conn)
        conn.execute(meta_table.delete().where(meta_table.c.key == "rollup_timezone"))

    return apply


# Named and append-only: a released migration is never edited; changes come as new entries.
MIGRATIONS: Final[tuple[tuple[str, Callable[[sa.Connection], None]], ...]] = (
    ("0001_ledger_and_users", _create_tables(ledger_table, users_table)),
    ("0002_daily_rollups", _create_tables(rollup_day_table, rollup_user_day_table, rollup_model_day_table)),
    ("0003_meta", _create_tables(meta_table)),
    ("0004_rollup_user_day_keyed_by_day", _recreate_rollup(rollup_user_day_table)),
)


class UnsupportedDatabase(Exception):
    """The ledger runs on SQLite and PostgreSQL; other engines lack the upserts it relies on."""


def data_dir() -> Path:
    """Open WebUI's data directory, resolved as Open WebUI resolves it when it is running."""
    owui_env = sys.modules.get("open_webui.env")
    configured = getattr(owui_env, "DATA_DIR", None)
    if configured is not None:
        return Path(configured)
    return Path(os.path.abspath(os.environ.get("DATA_DIR") or "data"))


def normalize_database_url(url: str) -> str:
    """Map PostgreSQL URLs onto psycopg 3, the driver Open WebUI ships."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def resolve_database_url(configured: str = "") -> str:
    """The ledger URL: the valve or flag, else $OPENROUTER_USAGE_DATABASE_URL, else Open WebUI's
    own PostgreSQL database ($DATABASE_URL), else an SQLite file in Open WebUI's data directory."""
    url = configured.strip() or os.environ.get(DATABASE_URL_ENV, "").strip()
    if not url:
        owui_url = os.environ.get("DATABASE_URL", "").strip()
        if owui_url.startswith(("postgres://", "postgresql")):
            url = owui_url
    if not url:
        url = f"sqlite:///{data_dir() / DEFAULT_SQLITE_NAME}"
    return normalize_database_url(url)


def masked_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable database URL)"


def ledger_identity(url: str) -> str:
    """What makes two URLs the same ledger: the SQLite file, or the server and database."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = (parsed.database or "").removeprefix("file:")
        return "sqlite:" + str(Path(database).resolve()) if database else "sqlite:memory"
    return f"{parsed.get_backend_name()}://{parsed.host}:{parsed.port}/{parsed.database}"


def create_ledger_engine(url: str) -> sa.Engine:
    """An engine sized for a guest inside someone else's server: small pool, bounded waits."""
    parsed = sa.engine.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        connect_args: dict[str, Any] = {} if "timeout" in parsed.query else {"timeout": 10.0}
        engine = sa.create_engine(parsed, connect_args=connect_args)
        sa.event.listen(engine, "connect", _configure_sqlite_connection)
        sa.event.listen(engine, "begin", _begin_sqlite_transaction)
        return engine
    if backend == "postgresql":
        return sa.create_engine(
            parsed,
            pool_size=2,
            max_overflow=3,
            pool_timeout=5,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={
                "connect_timeout": 5,
                "options": "-c statement_timeout=120000 -c lock_timeout=30000",
            },
        )
    raise UnsupportedDatabase(f"the ledger supports SQLite and PostgreSQL, not {backend}")


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control from the driver so writers can BEGIN IMMEDIATE (see below).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # a commit survives power loss: durable
    finally:
        cursor.close()


def _begin_sqlite_transaction(conn: sa.Connection) -> None:
    # A writer that starts with a read and later upgrades can fail at once with SQLITE_BUSY when
    # another process commits in between; BEGIN IMMEDIATE queues for the lock up front instead.
    writing = conn.get_execution_options().get("ledger_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if writing else "BEGIN")


def _insert(dialect: str, table: sa.Table) -> Any:
    if dialect == "sqlite":
        return sqlite_dialect.insert(table)
    if dialect == "postgresql":
        return pg_dialect.insert(table)
    raise UnsupportedDatabase(f"the ledger supports SQLite and PostgreSQL, not {dialect}")


class BulkInsert:
    """An INSERT (plus an optional ON CONFLICT tail) run as the driver's own executemany.

    Rows are plain tuples in `columns` order. SQLAlchemy's executemany builds a parameter dict and
    calls every type's processor for each row, which costs more than SQLite's insert itself; here
    the SQL is compiled once per dialect, and only values whose type needs converting (on SQLite,
    datetimes and booleans) are touched, by the same processors SQLAlchemy would use, so values are
    stored exactly as SQLAlchemy reads them back. The upsert tails used here are the same SQL on
    SQLite (3.35+) and PostgreSQL.
    """

    def __init__(self, dialect: sa.Dialect, table: sa.Table, columns: Sequence[str], tail: str = "") -> None:
        quote = dialect.identifier_preparer.quote
        text = sa.text(
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(name) for name in columns)}) "
            f"VALUES ({', '.join(':' + name for name in columns)}) {tail}"
        ).bindparams(*(sa.bindparam(name, type_=table.c[name].type) for name in columns))
        compiled = text.compile(dialect=dialect)
        self.sql = compiled.string
        self.columns = tuple(columns)
        # Positional placeholders follow VALUES, which follows `columns`; named ones need a dict.
        self._named = not compiled.positional
        converters = []
        for index, name in enumerate(self.columns):
            processor = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                converters.append((index, processor))
        self._converters = tuple(converters)

    def execute(self, conn: sa.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
        parameters = [self._parameters(row) for row in rows]
        if parameters:
            conn.exec_driver_sql(self.sql, parameters)

    def _parameters(self, row: tuple[Any, ...]) -> tuple[Any, ...] | dict[str, Any]:
        if self._converters:
            values = list(row)
            for index, convert in self._converters:
                values[index] = convert(values[index])
            row = tuple(values)
        return dict(zip(self.columns, row, strict=True)) if self._named else row


LEDGER_COLUMNS: Final = tuple(column.name for column in ledger_table.columns if column.name != "id")
USER_COLUMNS: Final = ("user_id", "user_name", "last_seen_at")


@functools.lru_cache(maxsize=8)
def _ledger_insert(dialect: sa.Dialect) -> BulkInsert:
    """A plain INSERT: a message another process recorded since the check fails the transaction."""
    return BulkInsert(dialect, ledger_table, LEDGER_COLUMNS)


_AMONG_MESSAGES: Final = ledger_table.c.message_id.in_(sa.bindparam("message_ids", expanding=True))
_RECORDED_AMONG: Final = sa.select(ledger_table.c.message_id).where(_AMONG_MESSAGES)
_SPEND_AMONG: Final = sa.select(sa.func.coalesce(sa.func.sum(ledger_table.c.spend_pico), 0)).where(
    _AMONG_MESSAGES
)
IN_LIST_CHUNK: Final = 500  # parameters per IN list: well inside every SQLite build's limit


def in_list_chunks(message_ids: Sequence[str]) -> Iterator[dict[str, list[str]]]:
    """The parameters of _RECORDED_AMONG / _SPEND_AMONG, one IN list of at most IN_LIST_CHUNK ids each."""
    for start in range(0, len(message_ids), IN_LIST_CHUNK):
        yield {"message_ids": list(message_ids[start : start + IN_LIST_CHUNK])}


def recorded_message_ids(conn: sa.Connection, message_ids: Sequence[str]) -> set[str]:
    """Which of these messages the ledger already holds."""
    found: set[str] = set()
    for parameters in in_list_chunks(message_ids):
        found.update(conn.execute(_RECORDED_AMONG, parameters).scalars())
    return found


@functools.lru_cache(maxsize=16)
def _rollup_upsert(dialect: sa.Dialect, table: sa.Table) -> BulkInsert:
    """Adds every measure to the row of its key: exact under concurrent writers."""
    quote = dialect.identifier_preparer.quote
    keys = [column.name for column in table.primary_key.columns]
    additions = ", ".join(
        f"{quote(name)} = {quote(table.name)}.{quote(name)} + excluded.{quote(name)}" for name in MEASURES
    )
    conflict = ", ".join(quote(name) for name in keys)
    tail = f"ON CONFLICT ({conflict}) DO UPDATE SET {additions}"
    return BulkInsert(dialect, table, [*keys, *MEASURES], tail)


@functools.lru_cache(maxsize=8)
def _users_upsert(dialect: sa.Dialect) -> BulkInsert:
    """Stores a user's name as of their latest completion: a replayed older record changes nothing."""
    quote = dialect.identifier_preparer.quote
    updates = ", ".join(f"{quote(name)} = excluded.{quote(name)}" for name in USER_COLUMNS[1:])
    seen = quote("last_seen_at")
    newer = f"excluded.{seen} >= {quote(users_table.name)}.{seen}"
    return BulkInsert(
        dialect, users_table, USER_COLUMNS, f"ON CONFLICT (user_id) DO UPDATE SET {updates} WHERE {newer}"
    )


UserRow = tuple[str, str, datetime]  # user_id, user_name, last_seen_at (naive UTC)


class SeenUsers:
    """The users rows this process wrote lately, so that a user's steady stream of completions
    rewrites their row when the name changes or last_seen_at is LAST_SEEN_RESOLUTION out of date,
    not in every batch. Bounded; forgetting a user only costs one more write."""

    def __init__(self, capacity: int = SEEN_USERS_CAPACITY) -> None:
        self._written: OrderedDict[str, tuple[str, datetime]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def due(self, records: Iterable[UsageRecord]) -> list[UserRow]:
        """The rows to upsert for these records: each user's latest, unless already written."""
        latest: dict[str, UserRow] = {}
        for record in records:
            row = (record.user_id, record.user_name, _naive_utc(record.created_at))
            if record.user_id not in latest or row[2] >= latest[record.user_id][2]:
                latest[record.user_id] = row
        with self._lock:
            return [
                row
                for user_id, row in sorted(latest.items())
                if self._is_due(row, self._written.get(user_id))
            ]

    @staticmethod
    def _is_due(row: UserRow, written: tuple[str, datetime] | None) -> bool:
        if written is None:
            return True
        name, seen_at = written
        return row[2] >= seen_at and (row[1] != name or row[2] - seen_at >= LAST_SEEN_RESOLUTION)

    def remember(self, rows: Iterable[UserRow]) -> None:
        """Note rows once their transaction has committed."""
        with self._lock:
            for user_id, user_name, seen_at in rows:
                self._written[user_id] = (user_name, seen_at)
                self._written.move_to_end(user_id)
            while len(self._written) > self._capacity:
                self._written.popitem(last=False)


def _advisory_lock(conn: sa.Connection, key: int, *, shared: bool = False) -> None:
    if conn.dialect.name == "postgresql":
        function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        conn.execute(sa.text(f"SELECT {function}(:key)"), {"key": key})


def local_day(moment: datetime, zone: ZoneInfo) -> str:
    """The calendar day of a UTC moment in `zone`, as YYYY-MM-DD (rollup key)."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(zone).date().isoformat()


def resolve_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name.strip() or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("openrouter_usage: unknown time zone %r; using UTC", name)
        return ZoneInfo("UTC")


def record_measures(record: UsageRecord) -> list[int]:
    """The record's contribution to each rollup measure, in MEASURES order."""
    usage = record.usage
    return [
        1,
        0 if record.status == "ok" else 1,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.cached_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
        usage.cost_pico or 0,
        usage.upstream_cost_pico or 0,
        usage.spend_pico,
    ]


_LEDGER_VALUES: Final = operator.itemgetter(*LEDGER_COLUMNS)
_USAGE_JSON: Final = json.JSONEncoder(default=str)  # built once: json.dumps(default=…) builds one per call


def ledger_row(record: UsageRecord) -> tuple[Any, ...]:
    """The record's ledger values, in LEDGER_COLUMNS order."""
    usage = record.usage
    row = {
        "created_at": _naive_utc(record.created_at),
        "user_id": record.user_id,
        "user_name": record.user_name,
        "chat_id": record.chat_id,
        "message_id": record.message_id,
        "generation_ids": json.dumps(list(record.generation_ids)),
        "model": record.model,
        "served_model": record.served_model,
        "provider": record.provider,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cost_pico": usage.cost_pico,
        "upstream_cost_pico": usage.upstream_cost_pico,
        "spend_pico": usage.spend_pico,
        "is_byok": usage.is_byok,
        "status": record.status,
        "error": record.error,
        "latency_ms": record.latency_ms,
        "ttft_ms": record.ttft_ms,
        "usage_json": _USAGE_JSON.encode(record.raw_usage) if record.raw_usage is not None else None,
    }
    values: tuple[Any, ...] = _LEDGER_VALUES(row)
    return values


RollupKey = tuple[str, ...]


def rollup_increments(
    rows: Iterable[tuple[datetime, str, str, str, list[int]]], zone: ZoneInfo
) -> list[dict[RollupKey, list[int]]]:
    """Per-table sums, in MEASURES order, for rows of (created_at, user_id, served_model,
    provider, measures in MEASURES order)."""
    sums: list[dict[RollupKey, list[int]]] = [{} for _ in ROLLUP_TABLES]
    for created_at, user_id, served_model, provider, values in rows:
        day = local_day(created_at, zone)
        for table_sums, key in zip(
            sums, ((day,), (day, user_id), (day, served_model, provider)), strict=True
        ):
            bucket = table_sums.get(key)
            table_sums[key] = values if bucket is None else list(map(operator.add, bucket, values))
    return sums


def _apply_rollups(conn: sa.Connection, increments: list[dict[RollupKey, list[int]]]) -> None:
    for table, sums in zip(ROLLUP_TABLES, increments, strict=True):
        if not sums:
            continue
        # Sorted keys give concurrent PostgreSQL writers one lock order: no deadlocks.
        _rollup_upsert(conn.dialect, table).execute(conn, ((*key, *sums[key]) for key in sorted(sums)))


class Spool:
    """Records that could not reach the database: one fsync'd JSONL file per failed batch.

    Files are claimed for replay by renaming them, so several processes sharing a data directory
    never replay the same file twice; a claim left by a process that died is taken over.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def append(self, records: Sequence[UsageRecord]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}.jsonl"
        temporary = self.directory / (name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record.to_json(), default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        final = self.directory / name
        os.rename(temporary, final)
        _fsync_directory(self.directory)
        return final

    def pending_count(self) -> int:
        return len(self._candidates())

    def claim(self) -> list[tuple[Path, list[UsageRecord]]]:
        claimed: list[tuple[Path, list[UsageRecord]]] = []
        for path in self._candidates():
            original = self.directory / path.name.split(".jsonl")[0]
            target = self.directory / f"{original.name}.jsonl.claimed-{os.getpid()}-{threading.get_ident()}"
            try:
                os.rename(path, target)
            except OSError:
                continue  # another process claimed it first
            claimed.append((target, self._read(target)))
        return claimed

    def release(self, claimed: Sequence[tuple[Path, list[UsageRecord]]], *, replayed: bool) -> None:
        for path, _ in claimed:
            try:
                if replayed:
                    path.unlink()
                else:
                    os.rename(path, self.directory / (path.name.split(".jsonl")[0] + ".jsonl"))
            except OSError:
                log.exception("openrouter_usage: could not release spool file %s", path.name)

    def _candidates(self) -> list[Path]:
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        paths = []
        for entry in entries:
            if entry.name.endswith(".jsonl") or _is_abandoned_claim(entry.name):
                paths.append(Path(entry.path))
        return sorted(paths)

    def _read(self, path: Path) -> list[UsageRecord]:
        records = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    records.append(UsageRecord.from_json(json.loads(line)))
                except (ValueError, TypeError, KeyError):
                    log.error("openrouter_usage: unreadable line %d in spool file %s kept", number, path.name)
                    with open(self.directory / "unreadable.txt", "a", encoding="utf-8") as bad:
                        bad.write(line)
        return records


def _is_abandoned_claim(name: str) -> bool:
    marker = ".jsonl.claimed-"
    if marker not in name:
        return False
    try:
        pid = int(name.split(marker, 1)[1].split("-", 1)[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def spool_directory(url: str) -> Path:
    """Where records wait while this ledger is unreachable: the data directory, never the ledger's
    own (that may be the very thing that is missing), else the temp directory."""
    digest = hashlib.sha256(ledger_identity(url).encode()).hexdigest()[:16]
    for base in (data_dir(), Path(os.environ.get("TMPDIR") or "/tmp")):
        candidate = base / "openrouter_usage_spool" / digest
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            return candidate
        except OSError:
            continue
    return Path("/tmp") / "openrouter_usage_spool" / digest


@dataclasses.dataclass(frozen=True, slots=True)
class Totals:
    """Sums of the rollup measures over some set of completions."""

    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_pico: int = 0
    upstream_cost_pico: int = 0
    spend_pico: int = 0

    @classmethod
    def from_row(cls, row: Any) -> Totals:
        mapping = row._mapping if row is not None else {}
        return cls(**{name: int(mapping.get(name) or 0) for name in MEASURES})


def _sums(table: sa.Table) -> list[sa.Label[Any]]:
    return [sa.func.coalesce(sa.func.sum(table.c[name]), 0).label(name) for name in MEASURES]


class Ledger:
    """The durable record: one row per assistant message, plus rollups kept in step with it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.location = masked_url(url)
        self.engine = create_ledger_engine(url)
        self.spool = Spool(spool_directory(url))
        self.seen_users = SeenUsers()
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    # ── schema ──
    def ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            self._prepare_location()
            with self._write_transaction() as conn:
                _advisory_lock(conn, MIGRATION_LOCK_KEY)
                migrations_table.create(conn, checkfirst=True)
                applied = set(conn.execute(sa.select(migrations_table.c.name)).scalars())
                for name, apply in MIGRATIONS:
                    if name not in applied:
                        apply(conn)
                        conn.execute(migrations_table.insert(), {"name": name, "applied_at": _utcnow_naive()})
                        log.info("openrouter_usage: applied migration %s", name)
            self._schema_ready = True

    def applied_migrations(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(migrations_table.c.name).order_by("name")).scalars())

    def _prepare_location(self) -> None:
        # SQLite creates the file but not its directory; a missing directory stays an error so the
        # record is spooled, except for the default location, which is ours to create.
        parsed = sa.engine.make_url(self.url)
        if parsed.get_backend_name() == "sqlite" and parsed.database:
            path = Path(parsed.database.removeprefix("file:"))
            if path.parent == data_dir() and not path.parent.exists():
                path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            conn = conn.execution_options(ledger_write=True)
            with conn.begin():
                yield conn

    # ── writes ──
    def write(self, records: Sequence[UsageRecord], zone: ZoneInfo) -> set[str]:
        """Commit records (and any spooled ones) in one transaction; returns the ids of `records`
        newly inserted. Raises when the database cannot be written; nothing is then committed."""
        self.ensure_schema()
        claimed = self.spool.claim()
        replaying = [record for _, batch in claimed for record in batch]
        try:
            inserted, users_written = self._commit_records([*replaying, *records], zone)
        except BaseException:
            self.spool.release(claimed, replayed=False)
            raise
        self.seen_users.remember(users_written)
        self.spool.release(claimed, replayed=True)
        if replaying:
            log.info("openrouter_usage: replayed %d spooled record(s)", len(replaying))
        # A spooled record was already reported as recorded; its later duplicates are duplicates.
        return inserted - {record.message_id for record in replaying}

    def _commit_records(
        self, records: Sequence[UsageRecord], zone: ZoneInfo
    ) -> tuple[set[str], list[UserRow]]:
        attempts = 1
        while True:
            try:
                with self._write_transaction() as conn:
                    self._sync_rollup_zone(conn, zone)
                    return self._insert_records(conn, records, zone)
            except sa.exc.IntegrityError:
                if attempts == WRITE_ATTEMPTS:
                    raise
                attempts += 1
                log.info("openrouter_usage: another process recorded one of these messages first; retrying")

    def _insert_records(
        self, conn: sa.Connection, records: Sequence[UsageRecord], zone: ZoneInfo
    ) -> tuple[set[str], list[UserRow]]:
        """Inserts the records not yet in the ledger, with their rollups and users rows; returns
        the message ids inserted and the users rows written."""
        unique: dict[str, UsageRecord] = {}
        for record in records:
            unique.setdefault(record.message_id, record)
        if not unique:
            return set(), []
        message_ids = sorted(unique)
        recorded = recorded_message_ids(conn, message_ids)
        fresh = [unique[key] for key in message_ids if key not in recorded]
        if not fresh:
            return set(), []
        # A message another process recorded since the SELECT (only possible on PostgreSQL; SQLite
        # writers are serialised) fails the plain INSERT and the transaction, which is retried.
        _ledger_insert(conn.dialect).execute(conn, (ledger_row(record) for record in fresh))
        _apply_rollups(
            conn,
            rollup_increments(
                ((r.created_at, r.user_id, r.served_model, r.provider, record_measures(r)) for r in fresh),
                zone,
            ),
        )
        users = self.seen_users.due(fresh)
        _users_upsert(conn.dialect).execute(conn, users)
        return {record.message_id for record in fresh}, users

    def _sync_rollup_zone(self, conn: sa.Connection, zone: ZoneInfo) -> None:
        if _rollup_zone(conn) == zone.key:
            _advisory_lock(conn, ROLLUP_LOCK_KEY, shared=True)
            return
        _advisory_lock(conn, ROLLUP_LOCK_KEY)
        if _rollup_zone(conn) != zone.key:
            self._rebuild_rollups(conn, zone)

    def _rebuild_rollups(self, conn: sa.Connection, zone: ZoneInfo) -> None:
        """Recount every rollup from the ledger, keyed by days in `zone` (after a zone change)."""
        started = time.monotonic()
        for table in ROLLUP_TABLES:
            conn.execute(table.delete())
        columns = [
            ledger_table.c[name]
            for name in ("created_at", "user_id", "served_model", "provider", "status", *MEASURES[2:])
        ]
        result = conn.execute(sa.select(*columns).order_by(ledger_table.c.id))
        while chunk := result.fetchmany(20_000):
            _apply_rollups(conn, rollup_increments((_measured(row) for row in chunk), zone))
        upsert = _insert(conn.dialect.name, meta_table).values(key="rollup_timezone", value=zone.key)
        conn.execute(upsert.on_conflict_do_update(index_elements=["key"], set_={"value": zone.key}))
        log.info(
            "openrouter_usage: rollups rebuilt for time zone %s in %.1f s",
            zone.key,
            time.monotonic() - started,
        )

    def claim_once(self, key: str) -> bool:
        """True for exactly one caller per key, across processes (used for one-time notices)."""
        self.ensure_schema()
        with self._write_transaction() as conn:
            stmt = _insert(conn.dialect.name, meta_table).values(key=key, value=_utcnow_naive().isoformat())
            stmt = stmt.on_conflict_do_nothing(index_elements=["key"]).returning(meta_table.c.key)
            return conn.execute(stmt).first() is not None

    # ── reads ──
    def chat_spend_pico(self, conn: sa.Connection, message_ids: Sequence[str]) -> int:
        return sum(
            int(conn.execute(_SPEND_AMONG, parameters).scalar_one())
            for parameters in in_list_chunks(message_ids)
        )

    def user_totals(self, conn: sa.Connection, user_id: str, first_day: str, last_day: str) -> Totals:
        table = rollup_user_day_table
        row = conn.execute(
            sa.select(*_sums(table)).where(
                table.c.user_id == user_id, table.c.day >= first_day, table.c.day <= last_day
            )
        ).first()
        return Totals.from_row(row)

    @contextlib.contextmanager
    def reading(self, zone: ZoneInfo) -> Iterator[sa.Connection]:
        """A read connection whose rollups are keyed in `zone` (rebuilt first if they are not)."""
        self.ensure_schema()
        with self.engine.connect() as conn:
            stored = _rollup_zone(conn)
            conn.rollback()
        if stored != zone.key:
            with self._write_transaction() as conn:
                self._sync_rollup_zone(conn, zone)
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()


_ROLLUP_ZONE: Final = sa.select(meta_table.c.value).where(meta_table.c.key == "rollup_timezone")


def _rollup_zone(conn: sa.Connection) -> str | None:
    return conn.execute(_ROLLUP_ZONE).scalar_one_or_none()


def _measured(row: Any) -> tuple[datetime, str, str, str, list[int]]:
    """A ledger row as rollup_increments takes it (the row as selected by _rebuild_rollups)."""
    created_at, user_id, served_model, provider, status, *measured = row
    measures = [1, 0 if status == "ok" else 1, *(int(value or 0) for value in measured)]
    return created_at, user_id, served_model, provider, measures


def _utcnow_naive() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


@dataclasses.dataclass(frozen=True, slots=True)
class WriteRequest:
    """A record to commit, and what the usage line wants to know once it is committed."""

    record: UsageRecord
    zone: ZoneInfo
    chat_message_ids: tuple[str, ...] = ()
    want_user_today: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class WriteOutcome:
    stored: Literal["recorded", "duplicate", "spooled"]
    chat_spend_pico: int | None = None
    user_today: Totals | None = None


class LoopReply:
    """An outlet waiting on its event loop for a write's outcome."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[WriteOutcome]) -> None:
        self.loop = loop
        self.future = future


# The CLI, tests and benchmarks wait on a concurrent Future; outlets on their loop.
Reply = concurrent.futures.Future[WriteOutcome] | LoopReply
Settlement = tuple[asyncio.Future[WriteOutcome], WriteOutcome | BaseException]


def deliver(replies: Iterable[tuple[Reply, WriteOutcome | BaseException]]) -> list[threading.Lock]:
    """Hand every waiter its outcome (from the writer thread). Each event loop is woken once for
    all of its outlets in the batch: a wake-up is a system call on the writer thread and a
    self-pipe read on the loop, and under load a batch holds dozens of outlets of the same loop.

    Returns one held lock per loop woken, released once that loop has run the outlets it resumed
    (a lock rather than an Event: releasing it costs the loop one C call, not a Condition)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Settlement]] = {}
    for reply, outcome in replies:
        if isinstance(reply, LoopReply):
            by_loop.setdefault(reply.loop, []).append((reply.future, outcome))
        elif isinstance(outcome, BaseException):
            reply.set_exception(outcome)
        else:
            reply.set_result(outcome)
    caught_up: list[threading.Lock] = []
    for loop, settlements in by_loop.items():
        signal = threading.Lock()
        signal.acquire()
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, loop, settlements, signal.release)
            caught_up.append(signal)
    return caught_up


def _settle(
    loop: asyncio.AbstractEventLoop, settlements: list[Settlement], caught_up: Callable[[], None]
) -> None:
    for future, outcome in settlements:
        if future.done():  # the waiting outlet was cancelled
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    # Queued behind the wake-ups just scheduled: runs once every resumed outlet has taken a step.
    loop.call_soon(caught_up)


class GroupCommitWriter:
    """Commits records off the event loop, sharing one transaction among all waiting outlets.

    Each outlet awaits its future, so a record is durable (committed, or fsync'd to the spool)
    before outlet returns. Under load, the batch grows to whatever arrived during the previous
    commit, so many outlets pay for one fsync. Before closing a batch, the writer lets the event
    loops it last answered run the outlets it resumed (for at most LOOP_CATCH_UP_SECONDS): that
    loop work holds the GIL and would delay this thread anyway, and whatever it submits joins the
    batch instead of waiting for the next commit. The thread exits after a quiet spell and is
    started again on demand, so a reloaded plugin leaves no thread behind.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._queue: queue.SimpleQueue[tuple[WriteRequest, Reply]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loops_catching_up: list[threading.Lock] = []  # touched by the writer thread only

    async def write(self, request: WriteRequest) -> WriteOutcome:
        """Commit `request` and return once it is durable; the event loop only waits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[WriteOutcome] = loop.create_future()
        self._enqueue(request, LoopReply(loop, future))
        return await future

    def submit(self, request: WriteRequest) -> concurrent.futures.Future[WriteOutcome]:
        """The same for callers outside an event loop (the CLI, tests, benchmarks)."""
        future: concurrent.futures.Future[WriteOutcome] = concurrent.futures.Future()
        self._enqueue(request, future)
        return future

    def _enqueue(self, request: WriteRequest, reply: Reply) -> None:
        self._queue.put((request, reply))
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="openrouter_usage_writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=WRITER_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            self._let_loops_catch_up()
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)

    def _let_loops_catch_up(self) -> None:
        deadline = time.monotonic() + LOOP_CATCH_UP_SECONDS
        for signal in self._loops_catching_up:
            signal.acquire(timeout=max(0.0, deadline - time.monotonic()))
        self._loops_catching_up = []

    def _commit(self, batch: list[tuple[WriteRequest, Reply]]) -> None:
        records = [request.record for request, _ in batch]
        try:
            inserted = self.ledger.write(records, batch[-1][0].zone)
        except Exception as exc:
            self._spool(batch, exc)
            return
        outcomes = self._outcomes(batch, inserted)
        self._loops_catching_up = deliver(
            (reply, outcome) for (_, reply), outcome in zip(batch, outcomes, strict=True)
        )

    def _spool(self, batch: list[tuple[WriteRequest, Reply]], exc: Exception) -> None:
        log.error(
            "openrouter_usage: ledger %s unavailable (%s); spooling %d record(s) for replay",
            self.ledger.location,
            short_error(exc),
            len(batch),
        )
        try:
            self.ledger.spool.append([request.record for request, _ in batch])
        except Exception as spool_exc:
            log.critical(
                "openrouter_usage: could not spool either (%s); records: %s",
                short_error(spool_exc),
                json.dumps([request.record.to_json() for request, _ in batch], default=str),
            )
            self._loops_catching_up = deliver((reply, spool_exc) for _, reply in batch)
            return
        self._loops_catching_up = deliver((reply, WriteOutcome("spooled")) for _, reply in batch)

    def _outcomes(self, batch: list[tuple[WriteRequest, Reply]], inserted: set[str]) -> list[WriteOutcome]:
        claimed: set[str] = set()
        stored: list[Literal["recorded", "duplicate"]] = []
        for request, _ in batch:
            message_id = request.record.message_id
            fresh = message_id in inserted and message_id not in claimed
            claimed.add(message_id)
            stored.append("recorded" if fresh else "duplicate")
        # Totals feed the usage line, which only a newly recorded message shows.
        wanted = [
            kind == "recorded" and bool(request.chat_message_ids or request.want_user_today)
            for (request, _), kind in zip(batch, stored, strict=True)
        ]
        if not any(wanted):
            return [WriteOutcome(kind) for kind in stored]
        try:
            with self.ledger.engine.connect() as conn:
                return [
                    WriteOutcome(
                        kind,
                        self.ledger.chat_spend_pico(conn, request.chat_message_ids)
                        if want and request.chat_message_ids
                        else None,
                        self._user_today(conn, request) if want and request.want_user_today else None,
                    )
                    for (request, _), kind, want in zip(batch, stored, wanted, strict=True)
                ]
        except Exception as exc:
            log.warning("openrouter_usage: totals for the usage line unavailable (%s)", short_error(exc))
            return [WriteOutcome(kind) for kind in stored]

    def _user_today(self, conn: sa.Connection, request: WriteRequest) -> Totals:
        today = local_day(datetime.now(UTC), request.zone)
        return self.ledger.user_totals(conn, request.record.user_id, today, today)


def short_error(exc: BaseException) -> str:
    """One line naming the failure, without the SQL or parameters an SQLAlchemy error carries."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text[:200]}" if text else type(cause).__name__


_LEDGERS: OrderedDict[str, GroupCommitWriter] = OrderedDict()
_LEDGERS_LOCK = threading.Lock()
_MAX_OPEN_LEDGERS: Final = 4
_READ_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="openrouter_usage_read")


def writer_for(url: str) -> GroupCommitWriter:
    """The process-wide writer (and ledger) for a URL; a few at most are kept open."""
    with _LEDGERS_LOCK:
        writer = _LEDGERS.get(url)
        if writer is None:
            writer = GroupCommitWriter(Ledger(url))
            _LEDGERS[url] = writer
            while len(_LEDGERS) > _MAX_OPEN_LEDGERS:
                _, evicted = _LEDGERS.popitem(last=False)
                evicted.ledger.dispose()
        else:
            _LEDGERS.move_to_end(url)
        return writer


def ledger_for(url: str) -> Ledger:
    return writer_for(url).ledger


# ══ Reporting ═════════════════════════════════════════════════════════════════════════════════════


def format_usd(pico: int) -> str:
    """$12.34 from a dollar up; below, enough decimals for two significant digits (at least 4)."""
    amount = pico_to_usd(pico)
    if amount == 0:
        return "$0.00"
    if abs(amount) >= 1:
        return f"${amount.quantize(Decimal('0.01'), rounding=ROUND_HALF_EVEN):,}"
    decimals = min(max(4, -amount.adjusted() + 1), 12)
    return f"${amount.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_EVEN)}"


def format_count(value: int) -> str:
    return f"{value:,}"


def format_share(part: int, whole: int) -> str:
    return f"{part * 100 / whole:.1f}%" if whole else "-"


_MARKDOWN_SPECIALS = re.compile(r"([!-/:-@\[-`{-~])")


def escape_markdown(text: str, limit: int = 60) -> str:
    """Make a user-controlled string inert in Markdown: every ASCII punctuation character is
    backslash-escaped (no links, autolinks, HTML, emphasis or table cells can form), line breaks
    become spaces, and long values are cut."""
    flat = " ".join(str(text).split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return _MARKDOWN_SPECIALS.sub(r"\\\1", flat) or "-"


@dataclasses.dataclass(frozen=True, slots=True)
class UserSpend:
    user_id: str
    user_name: str
    spend_pico: int
    requests: int


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpend:
    served_model: str
    provider: str
    spend_pico: int
    total_tokens: int
    requests: int


@dataclasses.dataclass(frozen=True, slots=True)
class UsageReport:
    """The admin report: the same figures for the settings panel and the CLI."""

    generated_at: datetime
    timezone: str
    periods: dict[str, Totals]
    top_users: list[UserSpend]
    top_models: list[ModelSpend]
    last_written_at: datetime | None
    location: str
    spooled_files: int


PERIODS: Final = (
    ("today", "Today", 1),
    ("last_7_days", "Last 7 days", 7),
    ("last_30_days", "Last 30 days", 30),
)


def build_usage_report(ledger: Ledger, zone: ZoneInfo, rows: int, now: datetime | None = None) -> UsageReport:
    """Read the report from the rollups: its cost does not grow with the number of ledger rows."""
    now = now or datetime.now(UTC)
    today = date.fromisoformat(local_day(now, zone))
    first_30 = (today - timedelta(days=29)).isoformat()
    with ledger.reading(zone) as conn:
        periods = {
            key: _period_totals(conn, (today - timedelta(days=days - 1)).isoformat())
            for key, _, days in PERIODS
        }
        periods["all_time"] = _period_totals(conn, None)
        user_table, model_table = rollup_user_day_table, rollup_model_day_table
        # Rank on the rollup alone, then join names for the few rows kept.
        ranked = (
            sa.select(
                user_table.c.user_id,
                sa.func.sum(user_table.c.spend_pico).label("spend"),
                sa.func.sum(user_table.c.requests).label("requests"),
            )
            .where(user_table.c.day >= first_30)
            .group_by(user_table.c.user_id)
            .order_by(sa.desc("spend"), user_table.c.user_id)
            .limit(rows)
            .subquery()
        )
        top_users = [
            UserSpend(row.user_id, row.user_name or row.user_id, int(row.spend), int(row.requests))
            for row in conn.execute(
                sa.select(ranked, users_table.c.user_name)
                .select_from(ranked.outerjoin(users_table, users_table.c.user_id == ranked.c.user_id))
                .order_by(ranked.c.spend.desc(), ranked.c.user_id)
            )
        ]
        model_spend = sa.func.sum(model_table.c.spend_pico)
        top_models = [
            ModelSpend(row.served_model, row.provider, int(row.spend), int(row.tokens), int(row.requests))
            for row in conn.execute(
                sa.select(
                    model_table.c.served_model,
                    model_table.c.provider,
                    model_spend.label("spend"),
                    sa.func.sum(model_table.c.total_tokens).label("tokens"),
                    sa.func.sum(model_table.c.requests).label("requests"),
                )
                .where(model_table.c.day >= first_30)
                .group_by(model_table.c.served_model, model_table.c.provider)
                .order_by(model_spend.desc(), model_table.c.served_model)
                .limit(rows)
            )
        ]
        last_written = conn.execute(sa.select(sa.func.max(ledger_table.c.created_at))).scalar_one_or_none()
    if isinstance(last_written, str):  # SQLite hands back text from an aggregate over DATETIME
        last_written = datetime.fromisoformat(last_written)
    return UsageReport(
        generated_at=now,
        timezone=zone.key,
        periods=periods,
        top_users=top_users,
        top_models=top_models,
        last_written_at=last_written.replace(tzinfo=UTC) if last_written else None,
        location=ledger.location,
        spooled_files=ledger.spool.pending_count(),
    )


def _period_totals(conn: sa.Connection, first_day: str | None) -> Totals:
    query = sa.select(*_sums(rollup_day_table))
    if first_day is not None:
        query = query.where(rollup_day_table.c.day >= first_day)
    return Totals.from_row(conn.execute(query).first())


def render_report_markdown(report: UsageReport) -> str:
    zone = ZoneInfo(report.timezone)
    lines = [
        f"Generated {report.generated_at.astimezone(zone):%Y-%m-%d %H:%M} {report.timezone}.",
        "",
        "| Period | Spend | Requests | Tokens | Failed |",
        "|---|--:|--:|--:|--:|",
    ]
    labels = {key: label for key, label, _ in PERIODS} | {"all_time": "All time"}
    for key, label in labels.items():
        totals = report.periods[key]
        lines.append(
            f"| {label} | {format_usd(totals.spend_pico)} | {format_count(totals.requests)} | "
            f"{format_count(totals.total_tokens)} | {format_count(totals.failed)} |"
        )
    lines += ["", "**Top users, last 30 days**", ""]
    if report.top_users:
        lines += ["| User | Spend | Requests |", "|---|--:|--:|"]
        lines += [
            f"| {escape_markdown(u.user_name)} | {format_usd(u.spend_pico)} | {format_count(u.requests)} |"
            for u in report.top_users
        ]
    else:
        lines.append("No usage in the last 30 days.")
    lines += ["", "**Top models, last 30 days**", ""]
    if report.top_models:
        lines += ["| Model | Provider | Spend | Tokens |", "|---|---|--:|--:|"]
        lines += [
            f"| {escape_markdown(m.served_model)} | {escape_markdown(m.provider)} | "
            f"{format_usd(m.spend_pico)} | {format_count(m.total_tokens)} |"
            for m in report.top_models
        ]
    else:
        lines.append("No usage in the last 30 days.")
    month = report.periods["last_30_days"]
    written = (
        f"{report.last_written_at.astimezone(zone):%Y-%m-%d %H:%M:%S} {report.timezone}"
        if report.last_written_at
        else "never"
    )
    lines += [
        "",
        f"Last 30 days: cached tokens {format_share(month.cached_tokens, month.prompt_tokens)} of prompt "
        f"tokens · reasoning tokens {format_share(month.reasoning_tokens, month.completion_tokens)} of "
        f"completion tokens · failed completions {format_count(month.failed)} "
        f"({format_count(report.periods['all_time'].failed)} all time)",
        "",
        f"Ledger last written: {written} · ledger: `{report.location}`"
        + (
            f" · {report.spooled_files} spooled batch(es) waiting to be replayed"
            if report.spooled_files
            else ""
        ),
    ]
    return "\n".join(lines)


def totals_as_dict(totals: Totals) -> dict[str, Any]:
    data: dict[str, Any] = dataclasses.asdict(totals)
    for name in ("cost_pico", "upstream_cost_pico", "spend_pico"):
        data[name.replace("_pico", "_usd")] = decimal_text(pico_to_usd(data.pop(name)))
    return data


def report_as_dict(report: UsageReport) -> dict[str, Any]:
    return {
        "generated_at": report.generated_at.isoformat(),
        "timezone": report.timezone,
        "periods": {key: totals_as_dict(totals) for key, totals in report.periods.items()},
        "top_users": [
            {
                "user_id": u.user_id,
                "user_name": u.user_name,
                "spend_usd": decimal_text(pico_to_usd(u.spend_pico)),
                "requests": u.requests,
            }
            for u in report.top_users
        ],
        "top_models": [
            {
                "served_model": m.served_model,
                "provider": m.provider,
                "spend_usd": decimal_text(pico_to_usd(m.spend_pico)),
                "total_tokens": m.total_tokens,
                "requests": m.requests,
            }
            for m in report.top_models
        ],
        "last_written_at": report.last_written_at.isoformat() if report.last_written_at else None,
        "ledger": report.location,
        "spooled_batches": report.spooled_files,
    }


Breakdown = Literal["user", "model", "day", "provider"]


def breakdown_rows(ledger: Ledger, by: Breakdown, first_day: str, zone: ZoneInfo) -> list[dict[str, Any]]:
    """Spend grouped by one dimension since `first_day` (a local YYYY-MM-DD), from the rollups."""
    if by == "user":
        table = rollup_user_day_table
        keys: list[Any] = [table.c.user_id, sa.func.max(users_table.c.user_name).label("user_name")]
        source: Any = table.outerjoin(users_table, users_table.c.user_id == table.c.user_id)
        group: list[Any] = [table.c.user_id]
    elif by == "day":
        table = rollup_day_table
        keys, source, group = [table.c.day], table, [table.c.day]
    else:
        table = rollup_model_day_table
        group = [table.c.served_model, table.c.provider] if by == "model" else [table.c.provider]
        keys, source = list(group), table
    spend = sa.func.sum(table.c.spend_pico)
    order = [table.c.day] if by == "day" else [spend.desc(), *group]
    with ledger.reading(zone) as conn:
        result = conn.execute(
            sa.select(*keys, *_sums(table))
            .select_from(source)
            .where(table.c.day >= first_day)
            .group_by(*group)
            .order_by(*order)
        )
        rows = []
        for row in result:
            mapping = dict(row._mapping)
            totals = Totals(**{name: int(mapping.pop(name) or 0) for name in MEASURES})
            rows.append(mapping | totals_as_dict(totals))
    return rows


def user_usage_summary(
    ledger: Ledger, user_id: str, zone: ZoneInfo, now: datetime | None = None
) -> dict[str, Totals]:
    """One user's own totals for today and this calendar month: two index lookups."""
    today = date.fromisoformat(local_day(now or datetime.now(UTC), zone))
    with ledger.reading(zone) as conn:
        return {
            "today": ledger.user_totals(conn, user_id, today.isoformat(), today.isoformat()),
            "month": ledger.user_totals(conn, user_id, today.replace(day=1).isoformat(), today.isoformat()),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class LineParts:
    """Which parts the usage line shows (admin valves)."""

    model: bool = True
    provider: bool = True
    tokens: bool = True
    cost: bool = True
    chat_total: bool = True
    timing: bool = True
    speed: bool = True
    today_total: bool = False


def render_usage_line(
    record: UsageRecord,
    parts: LineParts,
    chat_spend_pico: int | None = None,
    today_spend_pico: int | None = None,
) -> str:
    usage = record.usage
    pieces: list[str] = []
    if parts.model:
        pieces.append(record.served_model or record.model or "unknown model")
    if parts.provider and record.provider:
        pieces.append(record.provider)
    if parts.tokens:
        cached = f" ({format_count(usage.cached_tokens)} cached)" if usage.cached_tokens else ""
        reasoning = f" ({format_count(usage.reasoning_tokens)} reasoning)" if usage.reasoning_tokens else ""
        pieces.append(f"{format_count(usage.prompt_tokens)} in{cached}")
        pieces.append(f"{format_count(usage.completion_tokens)} out{reasoning}")
    if parts.cost:
        pieces.append(format_usd(usage.spend_pico) if usage.cost_pico is not None else "cost not reported")
    if parts.chat_total and chat_spend_pico is not None:
        pieces.append(f"chat {format_usd(chat_spend_pico)}")
    if parts.today_total and today_spend_pico is not None:
        pieces.append(f"today {format_usd(today_spend_pico)}")
    if parts.timing and record.latency_ms is not None:
        pieces.append(f"{record.latency_ms / 1000:.1f} s")
    if parts.speed and record.latency_ms and usage.completion_tokens:
        generating_ms = record.latency_ms - (record.ttft_ms or 0)
        if generating_ms > 0:
            pieces.append(f"{usage.completion_tokens * 1000 / generating_ms:.0f} tok/s")
    if record.status != "ok":
        pieces.append(f"failed: {record.error}")
    return " · ".join(pieces)


# ── Bulk sync: deprecated for good, interfaces kept ──

BULK_SYNC_NOTICE: Final[dict[str, Any]] = {
    "status": "deprecated",
    "message": "Bulk sync has been disabled: OpenRouter has no endpoint that lists past generations.",
    "details": {
        "reason": "GET /api/v1/generations does not exist on the OpenRouter API; "
        "only single generations can be looked up by id.",
        "alternative": "Usage is recorded in real time at every completion; that is the primary method.",
        "impact": "No data loss: real-time tracking continues to work normally.",
    },
    "results": [],
    "total_organizations": 0,
}


def bulk_sync_notice() -> dict[str, Any]:
    """A fresh copy of the deprecation notice (callers may mutate what they get)."""
    return copy.deepcopy(BULK_SYNC_NOTICE)


def bulk_sync_notice_markdown() -> str:
    """The notice as the settings panel renders it (a field description is Markdown)."""
    details = BULK_SYNC_NOTICE["details"]
    return "\n".join(
        [
            f"**Deprecated.** {BULK_SYNC_NOTICE['message']}",
            "",
            f"- **Reason:** {details['reason']}",
            f"- **Alternative:** {details['alternative']}",
            f"- **Impact:** {details['impact']}",
            "",
            "No bulk sync ran and none will: the switch turns itself back off. Clear this field and save "
            "to dismiss the notice.",
        ]
    )


def bulk_sync_notice_text(requested_at: datetime) -> str:
    """The notice as stored in the `bulk_sync_notice` valve: plain text, for a text box."""
    details = BULK_SYNC_NOTICE["details"]
    return (
        f"Deprecated. {BULK_SYNC_NOTICE['message']} Reason: {details['reason']} "
        f"Alternative: {details['alternative']} Impact: {details['impact']} "
        f"(bulk sync requested {requested_at:%Y-%m-%d %H:%M:%S} UTC; nothing was run.)"
    )


def sync_openrouter_usage(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
    """Kept for old callers: returns the deprecation notice (empty results) and requests nothing."""
    log.warning("openrouter_usage: bulk sync requested; it is disabled (no listing endpoint exists)")
    return bulk_sync_notice()


class OpenRouterClient:
    """The OpenRouter client this plugin used to expose. Only the bulk listing remains, disabled."""

    def __init__(self, api_key: str = "", base_url: str = "https://openrouter.ai/api/v1") -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key

    def get_generations(self, *_args: Any, **_kwargs: Any) -> dict[str, Any]:
        """Formerly GET /api/v1/generations, which does not exist: returns HTTP 501 as data, and
        makes no request."""
        return {
            "error": "Bulk sync disabled",
            "message": BULK_SYNC_NOTICE["message"],
            "alternative": BULK_SYNC_NOTICE["details"]["alternative"],
            "status": "deprecated",
            "status_code": 501,
        }


# ── Admin CLI: `openrouter-usage export | report | sync` (same code as the settings panel) ──

EXPORT_FIELDS: Final = (
    "id",
    "created_at",
    "message_id",
    "chat_id",
    "user_id",
    "user_name",
    "model",
    "served_model",
    "provider",
    "generation_ids",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_usd",
    "upstream_cost_usd",
    "spend_usd",
    "is_byok",
    "status",
    "error",
    "latency_ms",
    "ttft_ms",
    "usage",
)
_FORMULA_PREFIXES: Final = ("=", "+", "-", "@", "\t", "\r")


# Export fields that are not ledger columns copied as they are.
_EXPORT_CONVERTERS: Final[dict[str, Callable[[sa.RowMapping], Any]]] = {
    "created_at": lambda row: row["created_at"].replace(tzinfo=UTC).isoformat().replace("+00:00", "Z"),
    "generation_ids": lambda row: json.loads(row["generation_ids"] or "[]"),
    "cost_usd": lambda row: _usd_or_none(row["cost_pico"]),
    "upstream_cost_usd": lambda row: _usd_or_none(row["upstream_cost_pico"]),
    "spend_usd": lambda row: decimal_text(pico_to_usd(row["spend_pico"])),
    "is_byok": lambda row: bool(row["is_byok"]),
    "usage": lambda row: json.loads(row["usage_json"]) if row["usage_json"] else None,
}


def export_rows(ledger: Ledger, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Every ledger row, oldest first, with money as exact decimal strings."""
    ledger.ensure_schema()
    query = sa.select(ledger_table).order_by(ledger_table.c.id)
    if since is not None:
        query = query.where(ledger_table.c.created_at >= _naive_utc(since))
    with ledger.engine.connect() as conn:
        for row in conn.execution_options(yield_per=1000).execute(query):
            data = row._mapping
            yield {
                field: _EXPORT_CONVERTERS[field](data) if field in _EXPORT_CONVERTERS else data[field]
                for field in EXPORT_FIELDS
            }


def _usd_or_none(pico: int | None) -> str | None:
    return decimal_text(pico_to_usd(pico)) if pico is not None else None


def cell_text(value: Any) -> str:
    """One value as the text of a table or CSV cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def csv_cell(value: Any) -> str:
    """Text for a CSV cell that a spreadsheet will not run as a formula."""
    text = cell_text(value)
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def write_csv(rows: Iterable[Mapping[str, Any]], fields: Sequence[str], out: io.TextIOBase | Any) -> None:
    writer = csv.writer(out, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        writer.writerow([csv_cell(row.get(field)) for field in fields])


def write_table(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], out: Any) -> None:
    """An aligned plain-text table: numbers right-aligned, text left-aligned."""
    # Control characters are dropped: a user name must not be able to drive the admin's terminal.
    cells = [
        ["".join(c for c in cell_text(row.get(field)) if c.isprintable()) for field in fields] for row in rows
    ]
    numeric = [all(_looks_numeric(row[i]) for row in cells if row[i]) for i in range(len(fields))]
    widths = [max([len(field)] + [len(row[i]) for row in cells]) for i, field in enumerate(fields)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out.write(line(list(fields)) + "\n")
    out.write(line(["-" * width for width in widths]) + "\n")
    for row in cells:
        out.write(line(row) + "\n")


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"-?\$?[\d,]+(\.\d+)?", text))


def parse_since(text: str, zone: ZoneInfo, now: datetime | None = None) -> str:
    """'30d' (the last 30 local days, today included) or an ISO date, as a local YYYY-MM-DD."""
    text = text.strip()
    match = re.fullmatch(r"(\d+)d", text)
    if match:
        today = date.fromisoformat(local_day(now or datetime.now(UTC), zone))
        return (today - timedelta(days=max(int(match.group(1)), 1) - 1)).isoformat()
    return date.fromisoformat(text).isoformat()


def cli_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `openrouter-usage` console script."""
    parser = argparse.ArgumentParser(
        prog="openrouter-usage",
        description="Read the OpenRouter usage ledger that the Open WebUI filter keeps.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add_database_option(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--database-url",
            default="",
            help=f"SQLAlchemy URL of the ledger (default: ${DATABASE_URL_ENV}, else Open WebUI's PostgreSQL "
            f"$DATABASE_URL, else $DATA_DIR/{DEFAULT_SQLITE_NAME})",
        )

    export = commands.add_parser("export", help="every ledger record, one per row or object")
    export.add_argument("--format", choices=("json", "csv"), default="json")
    export.add_argument("--since", help="only records created on or after this ISO date or time (UTC)")
    add_database_option(export)

    report = commands.add_parser("report", help="spend, requests and tokens, as in the settings panel")
    report.add_argument("--since", default="30d", help="'30d' or an ISO date (default: 30d)")
    report.add_argument("--by", choices=("user", "model", "day", "provider"), default="user")
    report.add_argument("--format", choices=("table", "json", "csv"), default="table")
    report.add_argument("--timezone", default="UTC", help="time zone of 'today' and of days (default: UTC)")
    report.add_argument("--rows", type=int, default=10, help="rows in the top lists (default: 10)")
    add_database_option(report)

    sync = commands.add_parser("sync", help="deprecated: prints why bulk sync cannot work, requests nothing")
    sync.add_argument("--date", help="ignored; kept so old scripts keep working")
    add_database_option(sync)

    args = parser.parse_args(argv)
    out = sys.stdout
    if args.command == "sync":
        json.dump(sync_openrouter_usage(date=args.date), out, indent=2)
        out.write("\n")
        return 0
    try:
        ledger = Ledger(resolve_database_url(args.database_url))
        if args.command == "export":
            since = datetime.fromisoformat(args.since) if args.since else None
            if since is not None and since.tzinfo is None:
                since = since.replace(tzinfo=UTC)
            rows = export_rows(ledger, since)
            if args.format == "csv":
                write_csv(rows, EXPORT_FIELDS, out)
            else:
                out.write("[")
                for index, row in enumerate(rows):
                    out.write(("," if index else "") + "\n  " + json.dumps(row, ensure_ascii=False))
                out.write("\n]\n")
            return 0
        zone = resolve_zone(args.timezone)
        first_day = parse_since(args.since, zone)
        usage_report = build_usage_report(ledger, zone, max(args.rows, 1))
        breakdown = breakdown_rows(ledger, args.by, first_day, zone)
        print_report(usage_report, args.by, first_day, breakdown, args.format, out)
        return 0
    except (sa.exc.SQLAlchemyError, UnsupportedDatabase, OSError, ValueError) as exc:
        sys.stderr.write(f"openrouter-usage: {short_error(exc)}\n")
        return 2


def print_report(
    usage_report: UsageReport, by: str, first_day: str, breakdown: list[dict[str, Any]], fmt: str, out: Any
) -> None:
    fields = {
        "user": ["user_id", "user_name"],
        "model": ["served_model", "provider"],
        "day": ["day"],
        "provider": ["provider"],
    }[by] + [
        "spend_usd",
        "requests",
        "failed",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "total_tokens",
    ]
    if fmt == "json":
        json.dump(
            report_as_dict(usage_report) | {"breakdown": {"by": by, "since": first_day, "rows": breakdown}},
            out,
            indent=2,
        )
        out.write("\n")
        return
    if fmt == "csv":
        write_csv(breakdown, fields, out)
        return
    periods = [
        {
            "period": label,
            "spend_usd": format_usd(usage_report.periods[key].spend_pico),
            "requests": format_count(usage_report.periods[key].requests),
            "tokens": format_count(usage_report.periods[key].total_tokens),
            "failed": format_count(usage_report.periods[key].failed),
        }
        for key, label in [(k, lbl) for k, lbl, _ in PERIODS] + [("all_time", "All time")]
    ]
    out.write(f"Ledger: {usage_report.location}   time zone: {usage_report.timezone}\n\n")
    write_table(periods, ["period", "spend_usd", "requests", "tokens", "failed"], out)
    out.write(f"\nBy {by}, since {first_day}:\n\n")
    write_table(breakdown, fields, out)


# ══ The filter ════════════════════════════════════════════════════════════════════════════════════


class SettingsMemory:
    """The admin valves this process last saw, for code Open WebUI calls without them: the
    settings-panel report and the user read-out. Kept in a small file so a restart remembers."""

    def __init__(self) -> None:
        self._values: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _path(self) -> Path:
        return data_dir() / "openrouter_usage_settings.json"

    def remember(self, values: Mapping[str, Any]) -> None:
        """Keep `values` if they changed. Runs whenever Open WebUI builds the valves (once per hook
        per request), so the unchanged case copies nothing and takes no lock."""
        if values == self._values:
            return
        snapshot = dict(values)
        with self._lock:
            self._values = snapshot
        try:
            path = self._path()
            temporary = path.with_suffix(".tmp")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(snapshot, handle)
            os.replace(temporary, path)
        except OSError as exc:
            log.debug("openrouter_usage: could not persist settings (%s)", exc)

    def recall(self) -> dict[str, Any]:
        with self._lock:
            if self._values is not None:
                return dict(self._values)
        try:
            loaded = json.loads(self._path().read_text(encoding="utf-8"))
            return loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            return {}


SETTINGS = SettingsMemory()
PANEL_TIMEOUT_SECONDS: Final = 3.0


def run_off_loop(work: Callable[[], Any], timeout: float = PANEL_TIMEOUT_SECONDS) -> Any:
    """Run database reads on a worker thread, waiting at most `timeout`: Open WebUI builds valve
    specs synchronously on its event loop, so this bounds how long a panel can hold it."""
    return _READ_POOL.submit(work).result(timeout=timeout)


def current_valves() -> Filter.Valves:
    try:
        return Filter.Valves.model_construct(**Filter.Valves().model_dump() | SETTINGS.recall())
    except Exception:
        return Filter.Valves.model_construct()


def admin_report_markdown() -> str:
    """The settings-panel report, or one line saying why it cannot be read."""
    valves = current_valves()
    url = resolve_database_url(valves.database_url)
    try:
        report = run_off_loop(
            lambda: build_usage_report(
                ledger_for(url), resolve_zone(valves.report_timezone), min(max(valves.report_rows, 1), 100)
            )
        )
        return render_report_markdown(report)
    except concurrent.futures.TimeoutError:
        return (
            f"Usage report unavailable: the ledger did not answer within {PANEL_TIMEOUT_SECONDS:.0f} s "
            f"(`{masked_url(url)}`)."
        )
    except Exception as exc:
        return f"Usage report unavailable: {escape_markdown(short_error(exc), 200)} (`{masked_url(url)}`)."


def _admin_report_schema(schema: dict[str, Any]) -> None:
    schema["description"] = admin_report_markdown()


def _bulk_sync_notice_schema(schema: dict[str, Any]) -> None:
    if SETTINGS.recall().get("bulk_sync_notice"):
        schema["description"] = bulk_sync_notice_markdown()


def user_usage_options(user: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """The user's own read-out, as the options of a dropdown in their valves panel."""
    user_id = str((user or {}).get("id") or "")
    if not user_id:
        return [{"value": "today", "label": "Usage unavailable: not signed in"}]
    valves = current_valves()
    url = resolve_database_url(valves.database_url)
    zone = resolve_zone(valves.report_timezone)
    try:
        summary = run_off_loop(lambda: user_usage_summary(ledger_for(url), user_id, zone))
    except Exception as exc:
        log.warning("openrouter_usage: user read-out unavailable (%s)", short_error(exc))
        return [{"value": "today", "label": "Your usage is unavailable right now"}]
    today, month = summary["today"], summary["month"]
    return [
        {
            "value": "today",
            "label": f"Today: {format_usd(today.spend_pico)} · {format_count(today.requests)} "
            f"requests · {format_count(today.total_tokens)} tokens",
        },
        {
            "value": "month",
            "label": f"This month: {format_usd(month.spend_pico)} · "
            f"{format_count(month.requests)} requests · "
            f"{format_count(month.total_tokens)} tokens",
        },
    ]


_BASE_URLS_TTL: Final = 30.0
_base_urls_cache: tuple[float, list[Any]] = (0.0, [])


async def connection_base_url(model: Any) -> str | None:
    """The base URL of the OpenAI-compatible connection serving `model`, or None when unknown."""
    global _base_urls_cache
    index = model.get("urlIdx") if isinstance(model, Mapping) else None
    if not isinstance(index, int):
        return None
    expires, urls = _base_urls_cache
    if time.monotonic() > expires:
        config = getattr(sys.modules.get("open_webui.models.config"), "Config", None)
        if config is None:
            return None
        try:
            fetched = await config.get("openai.api_base_urls", [])
        except Exception as exc:
            log.debug("openrouter_usage: connection URLs unavailable (%s)", exc)
            return None
        urls = fetched if isinstance(fetched, list) else []
        _base_urls_cache = (time.monotonic() + _BASE_URLS_TTL, urls)
    return str(urls[index]) if 0 <= index < len(urls) else None


def request_usage_reporting(body: dict[str, Any], *, is_openrouter: bool) -> None:
    """Ask the upstream for usage: stream_options.include_usage when streaming, and OpenRouter's
    usage.include (a no-op today, needed by older deployments) only on OpenRouter connections."""
    if body.get("stream"):
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    if is_openrouter:
        usage = body.get("usage")
        body["usage"] = {**(usage if isinstance(usage, dict) else {}), "include": True}


def capture_state(metadata: Any) -> CaptureState:
    """This request's state, created (and stored) when inlet did not run or could not store it."""
    state = metadata.get(STATE_KEY) if isinstance(metadata, dict) else None
    if isinstance(state, CaptureState):
        return state
    state = CaptureState(started_at=time.monotonic())
    if isinstance(metadata, dict):
        metadata[STATE_KEY] = state
    return state


def line_parts(valves: Filter.Valves) -> LineParts:
    return LineParts(
        model=valves.line_show_model,
        provider=valves.line_show_provider,
        tokens=valves.line_show_tokens,
        cost=valves.line_show_cost,
        chat_total=valves.line_show_chat_total,
        timing=valves.line_show_timing,
        speed=valves.line_show_speed,
        today_total=valves.line_show_today_total,
    )


async def record_completion(
    body: Mapping[str, Any],
    user: Mapping[str, Any] | None,
    metadata: Any,
    emitter: EventEmitter | None,
    valves: Filter.Valves,
) -> WriteOutcome | None:
    """outlet's work: build the record, commit it (durably), then show the usage line."""
    state = capture_state(metadata)
    context = CompletionContext(
        body=body,
        user=user,
        metadata=metadata if isinstance(metadata, Mapping) else None,
        record_all_models=valves.record_all_models,
        now=datetime.now(UTC),
        now_monotonic=time.monotonic(),
    )
    record = build_record(state, context)
    if record is None:
        return None
    user_valves = (user or {}).get("valves")
    show_line = (
        emitter is not None
        and valves.show_usage_line
        and getattr(user_valves, "show_usage_line", True) is not False
    )
    parts = line_parts(valves)
    request = WriteRequest(
        record=record,
        zone=resolve_zone(valves.report_timezone),
        chat_message_ids=tuple(assistant_message_ids(body)) if show_line and parts.chat_total else (),
        want_user_today=show_line and parts.today_total,
    )
    writer = writer_for(resolve_database_url(valves.database_url))
    outcome = await writer.write(request)
    if outcome.stored == "duplicate":
        log.info("openrouter_usage: message %s was already recorded; not counted again", record.message_id)
        return outcome
    if show_line and emitter is not None:
        chat_spend = outcome.chat_spend_pico
        if chat_spend is not None and record.message_id not in request.chat_message_ids:
            chat_spend += record.usage.spend_pico
        today = outcome.user_today.spend_pico if outcome.user_today else None
        description = render_usage_line(record, parts, chat_spend, today)
        await emitter({"type": "status", "data": {"description": description, "done": True, "hidden": False}})
    await deliver_bulk_sync_notice(user, emitter, valves, writer.ledger)
    return outcome


async def deliver_bulk_sync_notice(
    user: Mapping[str, Any] | None, emitter: EventEmitter | None, valves: Filter.Valves, ledger: Ledger
) -> None:
    """Once per saved notice, across processes: a warning toast in the next admin chat."""
    notice = valves.bulk_sync_notice
    if not notice or emitter is None or (user or {}).get("role") != "admin":
        return
    key = "bulk_sync_notice:" + hashlib.sha256(notice.encode()).hexdigest()[:16]
    if await asyncio.wrap_future(_READ_POOL.submit(ledger.claim_once, key)):
        text = BULK_SYNC_NOTICE["message"] + " " + BULK_SYNC_NOTICE["details"]["alternative"]
        await emitter({"type": "notification", "data": {"type": "warning", "content": text}})


class Filter:
    """Open WebUI entry point. Each hook delegates to the named functions above and never raises."""

    class Valves(BaseModel):
        priority: int = Field(
            default=0, title="Priority", description="Order among filters (lower runs first)."
        )
        database_url: str = Field(
            default="",
            title="Ledger database URL",
            description="Ledger database as an SQLAlchemy URL (`sqlite:///…` or `postgresql://…`). Empty: "
            "`$OPENROUTER_USAGE_DATABASE_URL`, else Open WebUI's own PostgreSQL database, else "
            "`openrouter_usage.sqlite3` in Open WebUI's data directory.",
            json_schema_extra={"input": {"type": "password"}},
        )
        openrouter_url_pattern: str = Field(
            default="openrouter.ai",
            title="OpenRouter URL pattern",
            description="Connections whose base URL contains one of these comma-separated fragments are "
            "OpenRouter. Responses with OpenRouter's signature (gen- ids, provider, usage.cost) count too.",
        )
        record_all_models: bool = Field(
            default=False,
            title="Record all models",
            description="Also record other connections: tokens always, cost where reported.",
        )
        show_usage_line: bool = Field(
            default=True, title="Usage line", description="Show the usage line under each answer."
        )
        line_show_model: bool = Field(default=True, title="Line: model", description="The model that served.")
        line_show_provider: bool = Field(default=True, title="Line: provider", description="The provider.")
        line_show_tokens: bool = Field(default=True, title="Line: tokens", description="Tokens in and out.")
        line_show_cost: bool = Field(default=True, title="Line: cost", description="This answer's cost.")
        line_show_chat_total: bool = Field(
            default=True, title="Line: chat total", description="The chat's total cost."
        )
        line_show_today_total: bool = Field(
            default=False, title="Line: today's total", description="The user's own spend today."
        )
        line_show_timing: bool = Field(
            default=True, title="Line: time", description="Time to the full answer."
        )
        line_show_speed: bool = Field(
            default=True, title="Line: speed", description="Output tokens per second."
        )
        report_timezone: str = Field(
            default="UTC", title="Report time zone", description="IANA name; decides what 'today' means."
        )
        report_rows: int = Field(
            default=10, title="Report rows", description="Rows in the report's top users and top models."
        )
        usage_report: str = Field(
            default="",
            title="Usage report (read-only: computed each time this panel opens)",
            json_schema_extra=_admin_report_schema,
        )
        bulk_sync: bool = Field(
            default=False,
            title="Bulk sync (deprecated)",
            description="Does nothing: OpenRouter has no endpoint listing past generations. "
            "Usage is recorded in real time at every completion.",
        )
        bulk_sync_notice: str = Field(
            default="",
            title="Bulk sync notice",
            description="Filled in when bulk sync is switched on.",
            json_schema_extra=_bulk_sync_notice_schema,
        )

        @model_validator(mode="after")
        def _deprecate_bulk_sync(self) -> Filter.Valves:
            # No hook runs on save and a validation error shows only a generic toast, so the switch
            # flips back off and the notice is stored in a field the panel displays.
            if self.bulk_sync:
                self.bulk_sync = False
                self.bulk_sync_notice = bulk_sync_notice_text(datetime.now(UTC))
            if self.model_fields_set:  # Valves() with no saved settings teaches nothing
                SETTINGS.remember(self.__dict__)
            return self

    class UserValves(BaseModel):
        show_usage_line: bool = Field(
            default=True, title="Usage line", description="Show the usage line under my answers."
        )
        my_usage: str = Field(
            default="today",
            title="My usage",
            description="Your own spend, from the usage ledger (click Default to show it).",
            json_schema_extra={"input": {"type": "select", "options": "my_usage_options"}},
        )

        @classmethod
        def my_usage_options(cls, __user__: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
            return user_usage_options(__user__)

    def __init__(self) -> None:
        self.valves = self.Valves()

    async def inlet(
        self,
        body: dict[str, Any],
        __metadata__: dict[str, Any] | None = None,
        __model__: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        try:
            base_url = await connection_base_url(__model__)
            is_openrouter = matches_url_pattern(base_url, self.valves.openrouter_url_pattern)
            state = CaptureState(time.monotonic(), is_openrouter if base_url else None)
            if isinstance(__metadata__, dict):
                __metadata__[STATE_KEY] = state
            if isinstance(body, dict):
                request_usage_reporting(body, is_openrouter=is_openrouter)
        except Exception:
            log.exception("openrouter_usage: inlet failed; the chat continues")
        return body

    def stream(self, event: dict[str, Any], __metadata__: dict[str, Any] | None = None) -> dict[str, Any]:
        # A plain function, not a coroutine: it never waits, and creating a coroutine for every
        # chunk would cost more than the work it does.
        try:
            observe_chunk(__metadata__[STATE_KEY], event)  # type: ignore[index]
        except Exception:
            try:
                observe_chunk(capture_state(__metadata__), event)
            except Exception:
                log.exception("openrouter_usage: could not read a stream chunk; the chat continues")
        return event

    async def outlet(
        self,
        body: dict[str, Any],
        __user__: dict[str, Any] | None = None,
        __metadata__: dict[str, Any] | None = None,
        __event_emitter__: EventEmitter | None = None,
    ) -> dict[str, Any]:
        try:
            await record_completion(body, __user__, __metadata__, __event_emitter__, self.valves)
        except Exception:
            log.exception("openrouter_usage: could not record a completion; the chat continues")
        return body


if __name__ == "__main__":
    sys.exit(cli_main())
