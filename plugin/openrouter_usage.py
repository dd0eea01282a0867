"""
title: OpenRouter Usage
author: openrouter-usage
version: 1.2.0
license: MIT
description: Exact OpenRouter usage and cost for every chat completion: ledger, usage line, reports.
required_open_webui_version: 0.10.0
"""

# ── The Open WebUI contract this file relies on (checked against 0.12.4) ──────────────────────────
# * Loading: the source text is exec'd into a fresh module (no usable __file__); certain import
#   spellings are rewritten on load, so this file imports only the standard library, pydantic,
#   httpx and SQLAlchemy, all shipped with Open WebUI. One Filter instance serves every user and
#   request, so per-request state lives in __metadata__ (one dict shared by inlet, stream, outlet).
# * Hooks: only parameters named in a signature are passed; coroutine functions are awaited and
#   plain functions called directly (`stream` is plain here). Naming `__user__` costs a read of
#   the user's settings from Open WebUI's database before the call; `__request__.state.user` is
#   the same user, loaded once by its auth for the request, so the hooks take that. `stream` sees
#   each upstream SSE chunk as a dict, for every model call of a turn (tool rounds included), never
#   for non-streaming responses. `outlet` runs server-side after every completion (0.9), API calls
#   included (0.10); the legacy POST /api/chat/completed runs it again for the same message. No
#   outlet runs for a stopped generation: the task that runs `stream` is cancelled (its
#   done-callbacks still run).
#   __metadata__ carries user_id, chat_id and message_id from inlet on. A `user` body field set in
#   inlet reaches the OpenAI-compatible connection. Title, tag and follow-up generations never
#   reach a function filter. A streamed `error` is shown to the user only when its chunk has no
#   choices.
# * The outlet body's last assistant message carries `usage` as Open WebUI merged it: it SUMS
#   input_tokens/output_tokens/total_tokens/cost over tool rounds (as floats) and keeps the last
#   round's other keys. Non-streaming outlets carry no generation id or provider.
# * API calls: __event_emitter__ is None in outlet, chat_id is "", message_id is None (the outlet
#   body's "id" holds a generated msg_… id).
# * Valves: self.valves is rebuilt as Valves(**saved) before every hook; the admin and user valve
#   specs are rebuilt synchronously on the event loop on every GET …/valves/spec, which runs a
#   callable json_schema_extra and calls a UserValves classmethod named in input.options with
#   __user__. A validation error on save reaches the admin only as a generic toast. The panel
#   always shows a field's description as Markdown, draws no control for a string field with an
#   input type it does not know, and a save drops fields left at null ("Default"). The user spec
#   runs the options method after UserValves.schema(), on the same dicts.
# * Internals read (next section), each behind a guard that degrades to "unknown":
#   open_webui.env.DATA_DIR (where the default ledger lives); the `openai.api_base_urls` config key
#   with the model's urlIdx (which connection served the request); the module name Open WebUI gives
#   this source, `function_<id>_<hex>`, and `sys.modules["function_<id>"]`, its newest copy; the
#   function's saved valves, through open_webui.internal.db.get_db (a synchronous session),
#   open_webui.models.functions.Function and open_webui.utils.valves.decrypt_valves; the request's
#   user (`request.state.user`: id, name, email, role, and `settings.functions.valves.<id>`, the
#   user's valves, decrypted the same way).

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import contextvars
import copy
import csv
import dataclasses
import email.utils
import fcntl
import functools
import hashlib
import hmac
import importlib.util
import json
import logging
import math
import operator
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import sqlalchemy as sa
from pydantic import BaseModel, Field, model_validator

if TYPE_CHECKING:
    import io

log = logging.getLogger("openrouter_usage")

STATE_KEY: Final = "openrouter_usage"
INTERNAL_WAIT_SECONDS: Final = 5.0  # longest a hook waits on an Open WebUI internal or an emitter
PICO: Final = Decimal("1e-12")
DEFAULT_SQLITE_NAME: Final = "openrouter_usage.sqlite3"
DATABASE_URL_ENV: Final = "OPENROUTER_USAGE_DATABASE_URL"

EventEmitter = Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]

# The input domain. A value outside it is treated as missing and the row says so (`notes`).
MAX_TOKENS: Final = 2**53  # the largest integer a JSON number holds exactly
MAX_COMPLETION_USD: Final = Decimal(100_000)  # no single completion costs more than this
MAX_TEXT: Final = 256  # ids, names, models and providers
MAX_ERROR_TEXT: Final = 500
MAX_GENERATION_IDS: Final = 64  # a row keeps this many ids and counts the rest
MAX_TRACKED_IDS: Final = 4096  # ids remembered per stream to count distinct ones; beyond, every new id counts
MAX_RAW_DEPTH: Final = 16  # raw usage JSON is cut below this depth
MAX_RAW_ITEMS: Final = 64  # … and after this many items per object or list


# ══ Open WebUI internals, each behind a guard that degrades to "unknown" ══════════════════════════


def data_dir() -> Path:
    """Open WebUI's data directory, resolved as Open WebUI resolves it when it is running."""
    owui_env = sys.modules.get("open_webui.env")
    configured = getattr(owui_env, "DATA_DIR", None)
    if configured is not None:
        return Path(configured)
    return Path(os.environ.get("DATA_DIR") or "data").resolve()  # as Open WebUI's env.py does


FUNCTION_MODULE_NAME: Final = re.compile(r"function_(?P<id>.+)_[0-9a-f]{32}")


def open_webui_function_id() -> str | None:
    """This function's id in Open WebUI: it loads the source as module `function_<id>_<hex>`."""
    match = FUNCTION_MODULE_NAME.fullmatch(__name__)
    return match.group("id") if match else None


def superseded() -> bool:
    """Whether Open WebUI has since loaded a newer copy of this function (an admin saved code)."""
    function_id = open_webui_function_id()
    current = sys.modules.get(f"function_{function_id}") if function_id else None
    return current is not None and getattr(current, "superseded", None) is not superseded


def valves_in_open_webui_store(function_id: str) -> dict[str, Any] | None:
    """The function's saved valves, read through Open WebUI's synchronous database session (the
    async `Functions.get_function_valves_by_id` cannot be awaited from a synchronous spec builder
    that holds the event loop). None when any internal is missing or the read fails. Blocking:
    call it off the event loop."""
    database = sys.modules.get("open_webui.internal.db")
    functions = sys.modules.get("open_webui.models.functions")
    valves_module = sys.modules.get("open_webui.utils.valves")
    get_db = getattr(database, "get_db", None)
    function_table = getattr(functions, "Function", None)
    decrypt = getattr(valves_module, "decrypt_valves", None)
    if get_db is None or function_table is None or decrypt is None:
        return None
    try:
        with get_db() as session:
            stored = session.execute(
                sa.select(function_table.valves).filter_by(id=function_id)
            ).scalar_one_or_none()
        valves = decrypt(stored)
    except Exception as exc:
        log.warning("openrouter_usage: saved settings unreadable in Open WebUI (%s)", short_error(exc))
        return None
    return valves if isinstance(valves, dict) else None


def request_user(request: Any, metadata: Any, function_id: str | None = None) -> dict[str, Any] | None:
    """The user a hook runs for, shaped as Open WebUI's `__user__` (id, name, email, role), from
    the request: Open WebUI's auth puts the user it loaded for the request on `request.state.user`.
    A hook that names `__user__` makes Open WebUI read that user's settings from its database
    again before every call; the hooks take `__request__` instead, which costs nothing.

    With `function_id`, "valves" holds the user's saved settings for that function, read from the
    same user's settings as Open WebUI reads them (decrypted when valve encryption is on). A user
    other than `__metadata__`'s user_id is not trusted: then only that id is known. None when the
    request carries no user and `__metadata__` names none."""
    user = getattr(getattr(request, "state", None), "user", None)
    metadata_user_id = metadata.get("user_id") if isinstance(metadata, Mapping) else None
    user_id = getattr(user, "id", None)
    if not isinstance(user_id, str) or (metadata_user_id and metadata_user_id != user_id):
        return {"id": metadata_user_id} if isinstance(metadata_user_id, str) and metadata_user_id else None
    found = {key: getattr(user, key, None) for key in ("id", "name", "email", "role")}
    if function_id is not None:
        found["valves"] = saved_user_valves(getattr(user, "settings", None), function_id)
    return found


def saved_user_valves(settings: Any, function_id: str) -> dict[str, Any]:
    """A user's saved valves for a function, from their settings (`functions.valves.<id>`, a dict,
    or a string when Open WebUI encrypts valves); {} when absent or unreadable. `settings` is a
    dict or Open WebUI's UserSettings model, which keeps `functions` as an extra attribute."""
    functions = (
        settings.get("functions") if isinstance(settings, Mapping) else getattr(settings, "functions", None)
    )
    # Each level checked: a user's malformed settings must not stop their completion being recorded.
    by_function = functions.get("valves") if isinstance(functions, Mapping) else None
    stored = by_function.get(function_id) if isinstance(by_function, Mapping) else None
    if isinstance(stored, str):
        decrypt = getattr(sys.modules.get("open_webui.utils.valves"), "decrypt_valves", None)
        try:
            stored = decrypt(stored) if decrypt is not None else None
        except Exception as exc:
            log.warning("openrouter_usage: a user's settings are unreadable (%s)", short_error(exc))
            stored = None
    return dict(stored) if isinstance(stored, Mapping) else {}


_BASE_URLS_TTL: Final = 30.0


@dataclasses.dataclass(slots=True)
class _TimedList:
    expires: float = 0.0
    items: list[Any] = dataclasses.field(default_factory=list)


_base_urls_cache = _TimedList()


async def connection_base_url(model: Any) -> str | None:
    """The base URL of the OpenAI-compatible connection serving `model`, or None when unknown."""
    index = model.get("urlIdx") if isinstance(model, Mapping) else None
    if not isinstance(index, int):
        return None
    if time.monotonic() > _base_urls_cache.expires:
        config = getattr(sys.modules.get("open_webui.models.config"), "Config", None)
        if config is None:
            return None
        try:
            fetched = await asyncio.wait_for(config.get("openai.api_base_urls", []), INTERNAL_WAIT_SECONDS)
        except Exception as exc:
            log.debug("openrouter_usage: connection URLs unavailable (%s)", exc)
            return None
        _base_urls_cache.items = fetched if isinstance(fetched, list) else []
        _base_urls_cache.expires = time.monotonic() + _BASE_URLS_TTL
    urls = _base_urls_cache.items
    return str(urls[index]) if 0 <= index < len(urls) else None


# Open WebUI's users and groups (tables `user`, `group`, `group_member`), read for budgets through
# its synchronous session. Plain SQL on three columns each, so a change in its models elsewhere
# does not matter; any failure reads as "groups unknown".
WEBUI_USER_GROUPS_SQL: Final = sa.text(
    'SELECT g.name FROM group_member gm JOIN "group" g ON g.id = gm.group_id WHERE gm.user_id = :user_id'
)
WEBUI_USERS_SQL: Final = sa.text('SELECT id, email, role FROM "user"')
WEBUI_MEMBERSHIPS_SQL: Final = sa.text(
    'SELECT gm.user_id, g.name FROM group_member gm JOIN "group" g ON g.id = gm.group_id'
)
GROUPS_TTL_SECONDS: Final = 60.0
MAX_CACHED_GROUPS: Final = 1024
_groups_cache: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
_groups_cache_lock = threading.Lock()


@contextlib.contextmanager
def open_webui_connection() -> Iterator[sa.Connection | None]:
    """A connection to Open WebUI's own database (None outside Open WebUI). Blocking."""
    get_db = getattr(sys.modules.get("open_webui.internal.db"), "get_db", None)
    if get_db is None:
        yield None
        return
    with get_db() as session:
        yield session.connection()


def user_group_names(user_id: str) -> tuple[str, ...] | None:
    """The names of the Open WebUI groups `user_id` belongs to, cached GROUPS_TTL_SECONDS; None
    when they cannot be read. Blocking: call it off the event loop."""
    now = time.monotonic()
    with _groups_cache_lock:
        cached = _groups_cache.get(user_id)
        if cached is not None and cached[0] > now:
            return cached[1]
    try:
        with open_webui_connection() as conn:
            if conn is None:
                return None
            names = tuple(
                sorted(
                    str(name) for name in conn.execute(WEBUI_USER_GROUPS_SQL, {"user_id": user_id}).scalars()
                )
            )
    except Exception as exc:
        log.warning("openrouter_usage: Open WebUI's groups unreadable (%s)", short_error(exc))
        return None
    with _groups_cache_lock:
        _groups_cache[user_id] = (now + GROUPS_TTL_SECONDS, names)
        _groups_cache.move_to_end(user_id)
        while len(_groups_cache) > MAX_CACHED_GROUPS:
            _groups_cache.popitem(last=False)
    return names


def read_webui_directory(conn: sa.Connection) -> dict[str, BudgetUser]:
    """Every Open WebUI user with e-mail, role and groups, from a connection to its database."""
    groups: dict[str, list[str]] = {}
    for user_id, name in conn.execute(WEBUI_MEMBERSHIPS_SQL):
        groups.setdefault(str(user_id), []).append(str(name))
    return {
        str(user_id): BudgetUser(
            str(user_id), str(email or ""), role == "admin", tuple(sorted(groups.get(str(user_id), ())))
        )
        for user_id, email, role in conn.execute(WEBUI_USERS_SQL)
    }


# ══ Value types ═══════════════════════════════════════════════════════════════════════════════════
# The measures have one home: the token kinds are Usage's `token_kind` fields, and the money
# measures are MONEY_MEASURES. Parsing, the ledger and rollup columns, Totals, the rollup
# arithmetic and the export all follow MEASURES; adding a token kind is one line in Usage plus the
# frozen migration that adds its columns (docs/internals.md, "Adding a measure").


def token_kind(*keys: str, details: Literal["prompt", "completion"] | None = None) -> Any:
    """A token count of Usage, and where a usage object reports it: the first of `keys` present,
    at the top level or in `prompt_tokens_details` / `completion_tokens_details`."""
    return dataclasses.field(default=0, metadata={"keys": keys, "details": details})


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and money of one completion, money in integer pico-dollars (exact).

    `notes` names every value that was outside the input domain and was therefore treated as
    missing (tokens 0, cost unknown)."""

    # Open WebUI's merged input/output keys are sums over tool rounds, while prompt/completion_tokens
    # keep only the last round, so the merged keys come first.
    prompt_tokens: int = token_kind("input_tokens", "prompt_tokens")
    completion_tokens: int = token_kind("output_tokens", "completion_tokens")
    total_tokens: int = token_kind("total_tokens")  # missing: prompt + completion
    cached_tokens: int = token_kind("cached_tokens", details="prompt")
    cache_write_tokens: int = token_kind("cache_write_tokens", details="prompt")
    reasoning_tokens: int = token_kind("reasoning_tokens", details="completion")
    cost_pico: int | None = None
    upstream_cost_pico: int | None = None
    is_byok: bool = False
    notes: tuple[str, ...] = ()

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
            **{name: getattr(self, name) + getattr(other, name) for name in TOKEN_MEASURES},
            cost_pico=_add_optional(self.cost_pico, other.cost_pico),
            upstream_cost_pico=_add_optional(self.upstream_cost_pico, other.upstream_cost_pico),
            is_byok=self.is_byok or other.is_byok,
            notes=self.notes + other.notes,
        )


TOKEN_KINDS: Final = tuple(field for field in dataclasses.fields(Usage) if "keys" in field.metadata)
TOKEN_MEASURES: Final = tuple(field.name for field in TOKEN_KINDS)
MONEY_MEASURES: Final = ("cost_pico", "upstream_cost_pico", "spend_pico")  # cost unknown counts 0
# What rollups sum and reports show, in column order: completions, failed ones, tokens, money.
MEASURES: Final = ("requests", "failed", *TOKEN_MEASURES, *MONEY_MEASURES)


def _add_optional(left: int | None, right: int | None) -> int | None:
    if left is None:
        return right
    if right is None:
        return left
    return left + right


# "stopped": the user stopped the answer and Open WebUI ran no outlet; OpenRouter still bills what
# was generated, and reconciliation prices the row from its record.
Status = Literal["ok", "error", "stopped"]


@dataclasses.dataclass(frozen=True, slots=True)
class UsageRecord:
    """One ledger row: everything known about one billed generation (one model call) of an
    assistant message. A message has one row per generation: its first answer, each "Continue
    response", each tool round.

    `generation_key` is the row's identity in the ledger (see `ledger_key`): the generation's id
    (`gen-…`), or for a generation whose id never arrived a fallback formed from the message id and
    the request (`fallback_generation_key`). Empty means only the message is known (an outlet that
    no inlet of this function saw: the legacy /api/chat/completed re-run, a record spooled by 1.x):
    such a record stands only while the ledger holds nothing of its message.

    `notes` lists what was repaired on the way in; `omitted_generation_ids` counts the generation
    ids beyond the MAX_GENERATION_IDS kept (their usage is folded into the request's last row)."""

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
    notes: tuple[str, ...] = ()
    omitted_generation_ids: int = 0
    openrouter_user: str = ""  # the opaque id sent to OpenRouter as `user`, if any
    generation_key: str = ""

    @property
    def ledger_key(self) -> str:
        """The ledger's unique key of this row: the generation key, else the message id."""
        return self.generation_key or self.message_id

    def to_json(self) -> dict[str, Any]:
        """A strict-JSON form, used by the spool: it round-trips through `from_json` (raw usage
        as strict_json_value makes it)."""
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        data["usage"] = dataclasses.asdict(self.usage) | {"notes": list(self.usage.notes)}
        data["generation_ids"] = list(self.generation_ids)
        data["notes"] = list(self.notes)
        data["raw_usage"] = strict_json_value(self.raw_usage) if self.raw_usage is not None else None
        data["created_at"] = self.created_at.isoformat()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UsageRecord:
        fields = dict(data)
        usage = dict(fields["usage"])
        usage["notes"] = tuple(usage.get("notes") or ())
        fields["usage"] = Usage(**usage)
        fields["generation_ids"] = tuple(fields["generation_ids"])
        fields["notes"] = tuple(fields.get("notes") or ())
        fields["created_at"] = datetime.fromisoformat(fields["created_at"])
        return cls(**fields)


@dataclasses.dataclass(frozen=True, slots=True)
class Totals:
    """Sums of each of MEASURES over some set of completions, read by name (`totals.spend_pico`)."""

    sums: tuple[int, ...] = ()  # in MEASURES order; () is all zeros

    def __getattr__(self, measure: str) -> int:
        if measure not in MEASURES:
            raise AttributeError(measure)
        return self.sums[MEASURES.index(measure)] if self.sums else 0

    @classmethod
    def from_row(cls, row: Any) -> Totals:
        mapping = row._mapping if row is not None else {}
        return cls(tuple(int(mapping.get(name) or 0) for name in MEASURES))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MEASURES}


@dataclasses.dataclass(frozen=True, slots=True)
class MessageTotals:
    """Every recorded generation of one assistant message added up (what its usage line shows):
    `usage` sums tokens and money (cost None when no call was priced); `spend_pico` sums each
    call's own spend, since whether upstream cost counts is decided call by call (BYOK)."""

    calls: int
    usage: Usage
    spend_pico: int
    unpriced_calls: int

    @classmethod
    def of(cls, records: Sequence[UsageRecord]) -> MessageTotals:
        return cls(
            calls=len(records),
            usage=sum((record.usage for record in records), Usage()),
            spend_pico=sum(record.usage.spend_pico for record in records),
            unpriced_calls=sum(record.usage.cost_pico is None for record in records),
        )


class CaptureState:
    """What inlet and stream learn about one request, kept in __metadata__ until outlet.

    `stream` runs once per chunk, so the per-chunk path only compares the chunk's id with the last
    one seen and checks for `usage`/`error` keys; everything else happens on the rare chunks that
    carry something new, and costs O(1) however often the id changes.
    """

    __slots__ = (
        "budget",
        "calls",
        "chat_id",
        "current_generation",
        "error",
        "first_token_at",
        "generation_ids",
        "is_openrouter_connection",
        "last_id",
        "message_id",
        "omitted_generation_ids",
        "openrouter_user",
        "outlet_started",
        "provider",
        "request_fingerprint",
        "requested_model",
        "seen_ids",
        "served_model",
        "started_at",
        "stop_watch",
        "user_id",
        "valves",
        "watching_for_stop",
    )

    def __init__(self, started_at: float, *, is_openrouter_connection: bool | None = None) -> None:
        self.started_at = started_at
        self.is_openrouter_connection = is_openrouter_connection
        self.first_token_at: float | None = None
        self.last_id: object = None
        self.current_generation = ""  # the last non-empty id: id-less usage chunks belong to it
        self.generation_ids: list[str] = []  # the first MAX_GENERATION_IDS distinct ids
        self.seen_ids: set[str] = set()
        self.omitted_generation_ids = 0
        self.provider = ""
        self.served_model = ""
        # Per model call (keyed by generation id): the parsed usage and the object as sent. Usage
        # is cumulative per generation, so a later usage chunk of the same call replaces the last.
        self.calls: dict[str, tuple[Usage, Mapping[str, Any]]] = {}
        self.error = ""
        # What a stopped generation's record needs, since no outlet brings it (set by inlet).
        self.user_id = ""
        self.chat_id = ""
        self.message_id = ""
        self.requested_model = ""
        self.openrouter_user = ""
        # Set by inlet: keys a generation whose id never arrives (fallback_generation_key); ""
        # when no inlet of this function saw the request.
        self.request_fingerprint = ""
        self.watching_for_stop = False
        # The task running `stream` and the callback watching it end: removed when outlet starts,
        # so a long-lived task never collects the callbacks of finished requests.
        self.stop_watch: tuple[asyncio.Task[Any], Callable[[asyncio.Task[Any]], None]] | None = None
        self.outlet_started = False
        self.budget: BudgetTicket | None = None  # the turn's standing with its budget, if checked
        self.valves: Settings | None = None  # inlet's: what a record made without an outlet uses

    def note_generation(self, generation_id: str) -> None:
        self.current_generation = generation_id
        if generation_id in self.seen_ids:
            return
        if len(self.seen_ids) < MAX_TRACKED_IDS:
            self.seen_ids.add(generation_id)
        if len(self.generation_ids) < MAX_GENERATION_IDS:
            self.generation_ids.append(generation_id)
        else:
            self.omitted_generation_ids += 1

    @property
    def has_openrouter_signature(self) -> bool:
        return bool(self.provider) or any(gid.startswith("gen-") for gid in self.generation_ids)


def capture_state(metadata: Any) -> CaptureState:
    """This request's state, created (and stored) when inlet did not run or could not store it."""
    state = metadata.get(STATE_KEY) if isinstance(metadata, dict) else None
    if isinstance(state, CaptureState):
        return state
    state = CaptureState(started_at=time.monotonic())
    if isinstance(metadata, dict):
        metadata[STATE_KEY] = state
    return state


# ── Budgets: rules and windows ──
# A budget limits one user's spend over a calendar window (day, week Monday to Sunday, month) in
# the report time zone. A window is only a date range: nothing resets, spend is read from the
# ledger for the window in force, so a rule's new amount keeps the spend and a new period counts
# in its own window.

BudgetPeriod = Literal["day", "week", "month"]
BUDGET_PERIODS: Final[tuple[BudgetPeriod, ...]] = ("day", "week", "month")
# Which group rule is the most generous: limits compared per 30 days.
_PER_30_DAYS: Final = {"day": Decimal(30), "week": Decimal(30) / 7, "month": Decimal(1)}
MAX_BUDGET_USD: Final = Decimal(1_000_000_000)


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetRule:
    """One parsed line of the `budgets` valve. `limit_pico` None is unlimited."""

    line: int
    kind: Literal["default", "group", "user"]
    target: str  # the group's name or the user's e-mail or id, as written ("" for default)
    limit_pico: int | None
    period: BudgetPeriod = "month"

    @property
    def label(self) -> str:
        return "default" if self.kind == "default" else f"{self.kind} {self.target}"

    @property
    def amount_text(self) -> str:
        """'$20.00 per month', or 'unlimited'."""
        if self.limit_pico is None:
            return "unlimited"
        return f"{format_usd(self.limit_pico)} per {self.period}"

    @property
    def generosity(self) -> Decimal:
        if self.limit_pico is None:
            return Decimal("Infinity")
        return pico_to_usd(self.limit_pico) * _PER_30_DAYS[self.period]


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetUser:
    """Who asks, as far as budgets care: id, e-mail, whether an admin, and their groups' names
    (None when Open WebUI's groups could not be read)."""

    user_id: str
    email: str = ""
    is_admin: bool = False
    groups: tuple[str, ...] | None = ()


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetRules:
    """The parsed `budgets` valve: the rules that parsed, and a reason for each line that did not
    (such a line is ignored: it never blocks anyone)."""

    rules: tuple[BudgetRule, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def needs_groups(self) -> bool:
        return any(rule.kind == "group" for rule in self.rules)

    def rule_for(self, user: BudgetUser) -> BudgetRule | None:
        """The rule that applies: the user's own; else (admins excepted) the most generous of
        their groups'; else the default; else None (unlimited)."""
        names = {user.user_id.casefold(), user.email.casefold()} - {""}
        for rule in self.rules:
            if rule.kind == "user" and rule.target.casefold() in names:
                return rule
        if user.is_admin:
            return None
        groups = {name.casefold() for name in user.groups or ()}
        matching = [rule for rule in self.rules if rule.kind == "group" and rule.target.casefold() in groups]
        if matching:
            return max(matching, key=lambda rule: (rule.generosity, -rule.line))
        return next((rule for rule in self.rules if rule.kind == "default"), None)


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetWindow:
    """The calendar window a budget counts in: local days `first_day` to `last_day`, all of them
    (spend is read by date range, so every reading of a window counts the same days); the next one
    starts at local midnight of `resets_on`."""

    first_day: date
    resets_on: date
    zone: ZoneInfo

    @property
    def last_day(self) -> date:
        return self.resets_on - timedelta(days=1)

    @property
    def days(self) -> list[str]:
        return [
            (self.first_day + timedelta(days=n)).isoformat()
            for n in range((self.last_day - self.first_day).days + 1)
        ]

    @property
    def starts_at(self) -> datetime:
        """The window's first moment, as naive UTC (the ledger's created_at)."""
        return _naive_utc(datetime.combine(self.first_day, datetime.min.time(), tzinfo=self.zone))

    @property
    def resets_text(self) -> str:
        """'1 December 2026 at 00:00 UTC'."""
        return f"{self.resets_on.day} {self.resets_on:%B %Y} at 00:00 {self.zone.key}"


def budget_window(period: BudgetPeriod, now: datetime, zone: ZoneInfo) -> BudgetWindow:
    """The window of `period` holding `now`, in `zone`."""
    today = now.astimezone(zone).date()
    if period == "day":
        first, resets = today, today + timedelta(days=1)
    elif period == "week":
        first = today - timedelta(days=today.weekday())
        resets = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        resets = (first + timedelta(days=32)).replace(day=1)
    return BudgetWindow(first, resets, zone)


# ══ Parsing ═══════════════════════════════════════════════════════════════════════════════════════


def token_count(mapping: Mapping[str, Any] | None, *keys: str, notes: list[str]) -> int | None:
    """The first of `keys` holding a number (0 counts; booleans and text do not), as a token
    count; None when there is none. A number outside 0..MAX_TOKENS, fractional, NaN or infinite
    is treated as missing (None) and noted."""
    if not isinstance(mapping, Mapping):
        return None
    for key in keys:
        value = mapping.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            notes.append(f"{key} {_brief(value)} is not a whole number; treated as missing")
            return None
        if not 0 <= value <= MAX_TOKENS:
            notes.append(f"{key} {_brief(value)} is out of range; treated as missing")
            return None
        return int(value)
    return None


def _brief(value: Any) -> str:
    """A short rendering of a bad value for a note (the notes column is read by people)."""
    return clean_text(repr(value), 24)


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


def money_pico(mapping: Mapping[str, Any] | None, key: str, *, notes: list[str]) -> int | None:
    """A money value as pico-dollars; None when absent, or when it is not a finite amount from
    0 to MAX_COMPLETION_USD (then noted: the cost is unknown rather than wrong)."""
    if not isinstance(mapping, Mapping) or mapping.get(key) is None:
        return None
    raw = mapping[key]
    amount = to_decimal(raw)
    if amount is None:
        notes.append(f"{key} {_brief(raw)} is not an amount; cost unknown")
        return None
    if not 0 <= amount <= MAX_COMPLETION_USD:
        notes.append(f"{key} {_brief(raw)} is out of range; cost unknown")
        return None
    return usd_to_pico(amount)


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
    notes: list[str] = []
    where = {
        None: raw,
        "prompt": _details(raw, "prompt_tokens_details", "input_tokens_details"),
        "completion": _details(raw, "completion_tokens_details", "output_tokens_details"),
    }
    tokens = {
        kind.name: token_count(where[kind.metadata["details"]], *kind.metadata["keys"], notes=notes)
        for kind in TOKEN_KINDS
    }
    if tokens["total_tokens"] is None:
        tokens["total_tokens"] = (tokens["prompt_tokens"] or 0) + (tokens["completion_tokens"] or 0)
    return Usage(
        **{name: count or 0 for name, count in tokens.items()},
        cost_pico=money_pico(raw, "cost", notes=notes),
        upstream_cost_pico=money_pico(_details(raw, "cost_details"), "upstream_inference_cost", notes=notes),
        is_byok=raw.get("is_byok") is True,
        notes=tuple(notes),
    )


# Control characters, bidi controls, and lone surrogates (valid in JSON text, unencodable in UTF-8).
_UNSAFE_CHARACTERS: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def clean_text(value: Any, limit: int = MAX_TEXT) -> str:
    """Text safe to store and show: no NUL, C0/C1 control or bidi control characters and no lone
    surrogates (line breaks and tabs become spaces), at most `limit` characters."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    # isprintable() is one C pass and true for almost every real name; the regex runs otherwise.
    if not text.isprintable() and _UNSAFE_CHARACTERS.search(text):
        text = _UNSAFE_CHARACTERS.sub(lambda m: " " if m.group() in "\t\n\r" else "", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def strict_json_value(value: Any, depth: int = 0) -> Any:  # noqa: PLR0911 - one return per JSON kind
    """`value` as strict JSON data: NaN and infinities become null, depth and width are bounded,
    keys are text, strings are cleaned and bounded, and anything that is not JSON becomes its
    (short) text."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_RAW_DEPTH:
        return "…"
    if isinstance(value, Mapping):
        items = list(value.items())[:MAX_RAW_ITEMS]
        return {clean_text(key): strict_json_value(item, depth + 1) for key, item in items}
    if isinstance(value, list | tuple):
        return [strict_json_value(item, depth + 1) for item in value[:MAX_RAW_ITEMS]]
    return clean_text(value, 64)


def describe_error(error: Any) -> str:
    """A short, loggable text for a provider error object (code and message, never content)."""
    if isinstance(error, Mapping):
        code = error.get("code")
        message = str(error.get("message") or "").strip()
        text = f"{code}: {message}" if code not in (None, "") else message
    else:
        text = str(error)
    return clean_text(text, MAX_ERROR_TEXT) or "error"


def observe_chunk(state: CaptureState, chunk: Any) -> bool:
    """Fold one streamed chunk into the request's state; True when it carries an error. Runs once
    per chunk: keep it cheap."""
    if type(chunk) is not dict:
        return False
    chunk_id = chunk.get("id")
    if chunk_id != state.last_id:
        _observe_new_generation(state, chunk, chunk_id)
    if state.first_token_at is None:
        _observe_first_token(state, chunk)
    if "usage" in chunk or "error" in chunk:
        return _observe_usage_or_error(state, chunk)
    return False


def _observe_new_generation(state: CaptureState, chunk: dict[str, Any], chunk_id: Any) -> None:
    state.last_id = chunk_id
    if isinstance(chunk_id, str) and chunk_id:
        state.note_generation(chunk_id)
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


def _observe_usage_or_error(state: CaptureState, chunk: dict[str, Any]) -> bool:
    raw = chunk.get("usage")
    if isinstance(raw, Mapping):
        # OpenRouter's usage is cumulative per generation: the last chunk of a call wins, and a
        # usage chunk without an id belongs to the generation streaming at the time.
        chunk_id = chunk.get("id")
        key = chunk_id if isinstance(chunk_id, str) and chunk_id else state.current_generation
        state.calls[key] = (parse_usage(raw), raw)
    error = chunk.get("error")
    if error:
        state.error = describe_error(error)
        return True
    return False


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
        clean_text(m["id"])
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


_EMAIL: Final = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
MAX_RAW_CALLS: Final = 16  # per-call usage objects kept in a row's raw usage


def is_openrouter_completion(state: CaptureState, body: Mapping[str, Any]) -> bool:
    """Whether the connection, the stream, or the usage Open WebUI kept says OpenRouter."""
    if state.is_openrouter_connection or state.has_openrouter_signature:
        return True
    outlet_usage = message_usage(final_assistant_message(body))
    return outlet_usage is not None and "cost" in outlet_usage


def build_records(state: CaptureState, context: CompletionContext) -> list[UsageRecord]:
    """The ledger rows of this completion, one per generation (`records_per_generation`), or none
    when it is not OpenRouter traffic to record. Every value is brought into the input domain
    here; what had to be repaired is noted."""
    body = context.body
    if not (context.record_all_models or is_openrouter_completion(state, body)):
        log.debug("openrouter_usage: completion not from OpenRouter; not recorded")
        return []
    message = final_assistant_message(body)
    notes: list[str] = []
    metadata = context.metadata or {}
    user = context.user or {}
    message_id = _clean_field(
        notes, "message_id", _first_text(metadata.get("message_id"), body.get("id"), message.get("id"))
    )
    if not message_id:
        message_id = (
            clean_text(state.generation_ids[0]) if state.generation_ids else f"unidentified-{uuid.uuid4()}"
        )
        log.warning("openrouter_usage: completion has no message id; recorded as %s", message_id)
    user_id = _clean_field(notes, "user_id", _first_text(user.get("id"))) or "unknown"
    if user_id == "unknown":
        log.warning("openrouter_usage: completion %s has no user; recorded as unknown", message_id)
    error = state.error
    if not error and message.get("finish_reason") == "error":
        error = "provider reported finish_reason=error"
    model = _clean_field(notes, "model", _first_text(body.get("model")))
    request = UsageRecord(
        message_id=message_id,
        chat_id=_clean_field(notes, "chat_id", _first_text(body.get("chat_id"), metadata.get("chat_id"))),
        user_id=user_id,
        user_name=display_name(user, user_id, notes),
        generation_ids=(),
        model=model,
        served_model=_clean_field(notes, "served_model", state.served_model) or model,
        provider=_clean_field(notes, "provider", state.provider),
        usage=Usage(),
        status="error" if error else "ok",
        error=error,
        latency_ms=round((context.now_monotonic - state.started_at) * 1000),
        ttft_ms=_ttft_ms(state),
        raw_usage=None,
        created_at=context.now,
        notes=tuple(notes),
        openrouter_user=state.openrouter_user,
    )
    records = records_per_generation(state, request, message_usage(message))
    if all(record.raw_usage is None for record in records):
        log.warning(
            "openrouter_usage: completion %s reported no usage; recorded with zero tokens", message_id
        )
    return records


def records_per_generation(
    state: CaptureState, request: UsageRecord, outlet_usage: Mapping[str, Any] | None
) -> list[UsageRecord]:
    """`request` (what is common to the request's generations) as one record per generation the
    stream named, each with the usage of its own usage chunk: OpenRouter bills each generation on
    its own, and Open WebUI's merged figure keeps only the last call's cost_details and is_byok.

    Usage reported under an id beyond the MAX_GENERATION_IDS kept goes to the last generation, with
    a note. A stream that named its generations but reported no usage gets Open WebUI's figure
    on its last generation. A request whose generation id never arrived (a non-streaming reply,
    an error before the first chunk) is one record keyed by `fallback_generation_key`. The
    request's outcome (error, stopped) goes on its last record; its latency and time to first
    token on its first."""
    from_outlet = [(parse_usage(outlet_usage), outlet_usage)] if outlet_usage is not None else []
    ids = state.generation_ids
    if not ids:  # usage chunks without an id, else Open WebUI's figure
        key = fallback_generation_key(request.message_id, state.request_fingerprint)
        return [_generation_record(request, list(state.calls.values()) or from_outlet, "", key)]
    calls: dict[str, list[tuple[Usage, Mapping[str, Any]]]] = {gid: [] for gid in ids}
    unkept = [call for key, call in state.calls.items() if key not in calls]
    for key, call in state.calls.items():
        calls.get(key, calls[ids[-1]]).append(call)
    notes = [f"usage of {len(unkept)} generation(s) beyond the ids kept counted here"] if unkept else []
    if not state.calls and from_outlet:
        calls[ids[-1]] = from_outlet
        notes += (
            ["no usage per generation; Open WebUI's figure merged over the calls"] if len(ids) > 1 else []
        )
    records = [_generation_record(request, calls[gid], gid, clean_text(gid)) for gid in ids]
    # The request's outcome (an error, a stop) is its last call's; its timing, its first's.
    records[:-1] = [
        dataclasses.replace(r, status="ok", error="", latency_ms=None, ttft_ms=None) for r in records[:-1]
    ]
    records[0] = dataclasses.replace(records[0], latency_ms=request.latency_ms, ttft_ms=request.ttft_ms)
    records[-1] = dataclasses.replace(
        records[-1],
        notes=(*records[-1].notes, *notes),
        omitted_generation_ids=state.omitted_generation_ids,
    )
    return records


def _generation_record(
    request: UsageRecord, calls: Sequence[tuple[Usage, Mapping[str, Any]]], generation_id: str, key: str
) -> UsageRecord:
    """One generation's record: `request` with the usage of the generation's calls, summed (one,
    but for a stream whose ids could not all be kept)."""
    summed = sum((call_usage for call_usage, _ in calls), Usage())
    notes = list(summed.notes)
    usage = _bounded_per_completion(summed, notes)
    notes += request.notes
    raws = [call_raw for _, call_raw in calls]
    clean_id = clean_text(generation_id)
    if clean_id != generation_id:
        notes.append("generation_id had control characters or was too long; cleaned")
    return dataclasses.replace(
        request,
        usage=usage,
        # Made strict JSON by the writer thread (ledger_values, to_json), off the loop.
        raw_usage=raws[0] if len(raws) == 1 else _raw_calls(raws) if raws else None,
        generation_ids=(clean_id,) if clean_id else (),
        generation_key=key,
        notes=tuple(notes),
    )


def fallback_generation_key(message_id: str, request_fingerprint: str) -> str:
    """The key of a generation whose id never arrived: `<message id>~<request fingerprint>`, so
    the same request yields the same key however often its outlet runs or its record is replayed,
    while a continuation of the same message (another request) gets its own. Without a
    fingerprint (no inlet of this function saw the request) only the message is known: ""."""
    return f"{message_id}~{request_fingerprint}" if request_fingerprint else ""


FINGERPRINT_TEXT_LIMIT: Final = 65_536  # characters of the last message a fingerprint reads


def request_fingerprint(body: Mapping[str, Any]) -> str:
    """What tells this request apart from another for the same message: the number of messages
    and the last one, role and text (a Continue ends in the assistant's partial answer, a second
    Continue in a longer one). Reads at most FINGERPRINT_TEXT_LIMIT characters."""
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    last = messages[-1] if messages and isinstance(messages[-1], Mapping) else {}
    content = last.get("content")
    if isinstance(content, list):
        content = "\n".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    text = content[:FINGERPRINT_TEXT_LIMIT] if isinstance(content, str) else ""
    digest = hashlib.sha256(f"{len(messages)}\0{last.get('role')}\0{text}".encode(errors="replace"))
    return digest.hexdigest()[:16]


def _raw_calls(raws: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"calls": list(raws[:MAX_RAW_CALLS]), "calls_total": len(raws)}


def _ttft_ms(state: CaptureState) -> int | None:
    return (
        round((state.first_token_at - state.started_at) * 1000) if state.first_token_at is not None else None
    )


def records_without_outlet(
    state: CaptureState, status: Status, now: datetime, now_monotonic: float
) -> list[UsageRecord]:
    """The rows of a request whose outlet never ran, from what inlet, `stream` and the model-call
    tap put in its state: a generation the user stopped (`stopped`: OpenRouter bills what was
    generated; its cost stays unknown unless the usage arrived before the stop, and reconciliation
    prices it), a reply Open WebUI gives no outlet (`ok`: one that is only tool calls), or a
    provider's error reply (`error`, with `state.error`)."""
    notes: list[str] = []
    model = _clean_field(notes, "model", state.requested_model)
    # An API call names no message (Open WebUI makes one up for its outlet): its first generation
    # names the row, as in build_records.
    message_id = _clean_field(notes, "message_id", state.message_id) or (
        clean_text(state.generation_ids[0]) if state.generation_ids else f"unidentified-{uuid.uuid4()}"
    )
    request = UsageRecord(
        message_id=message_id,
        chat_id=_clean_field(notes, "chat_id", state.chat_id),
        user_id=_clean_field(notes, "user_id", state.user_id) or "unknown",
        user_name="",  # unknown here; the users table keeps the last name seen
        generation_ids=(),
        model=model,
        served_model=_clean_field(notes, "served_model", state.served_model) or model,
        provider=_clean_field(notes, "provider", state.provider),
        usage=Usage(),
        status=status,
        error=state.error if status == "error" else "",
        latency_ms=round((now_monotonic - state.started_at) * 1000),
        ttft_ms=_ttft_ms(state),
        raw_usage=None,
        created_at=now,
        notes=tuple(notes),
        openrouter_user=state.openrouter_user,
    )
    return records_per_generation(state, request, None)


MAX_COMPLETION_PICO: Final = usd_to_pico(MAX_COMPLETION_USD)


def _bounded_per_completion(usage: Usage, notes: list[str]) -> Usage:
    """The money ceiling holds for the completion as a whole, not only for each of its calls."""
    if (usage.cost_pico or 0) > MAX_COMPLETION_PICO:
        notes.append("cost summed over the calls is out of range; cost unknown")
        usage = dataclasses.replace(usage, cost_pico=None)
    if (usage.upstream_cost_pico or 0) > MAX_COMPLETION_PICO:
        notes.append("upstream_inference_cost summed over the calls is out of range; unknown")
        usage = dataclasses.replace(usage, upstream_cost_pico=None)
    return usage


def display_name(user: Mapping[str, Any], user_id: str, notes: list[str]) -> str:
    """The name reports show: the user's name, never an e-mail address (then the user id)."""
    name = _clean_field(notes, "user_name", _first_text(user.get("name"))).strip()
    email = str(user.get("email") or "").strip().lower()
    if not name or name.lower() == email or ("@" in name and _EMAIL.fullmatch(name)):
        return user_id
    return name


def _clean_field(notes: list[str], field: str, value: str) -> str:
    cleaned = clean_text(value)
    if cleaned != value:
        notes.append(f"{field} had control characters or was too long; cleaned")
    return cleaned


def _first_text(*values: Any) -> str:
    for value in values:
        if isinstance(value, str) and value:
            return value
    return ""


_BUDGET_LIMIT: Final = re.compile(
    r"\$?\s*(?P<amount>[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)\s*(?:per\s+|/\s*|a\s+)?(?P<period>.*)",
    re.IGNORECASE,
)


def parse_budget_line(number: int, text: str) -> BudgetRule | str:
    """One line of the `budgets` valve as a rule, or the reason it is not one."""
    head, colon, limit = text.rpartition(":")
    words = head.split(None, 1)
    kind = words[0].lower() if words else ""
    if not colon or kind not in ("default", "group", "user") or (kind == "default") != (len(words) == 1):
        return (
            f"line {number}: {clean_text(text, 60)!r} is not a rule "
            "(write 'default: …', 'group NAME: …' or 'user E-MAIL: …')"
        )
    target = clean_text(words[1].strip()) if len(words) > 1 else ""
    limit = limit.strip()
    rule = BudgetRule(number, kind, target, None)  # type: ignore[arg-type]
    if limit.lower() == "unlimited":
        return rule
    match = _BUDGET_LIMIT.fullmatch(limit)
    if match is None:
        shown = clean_text(limit, 40)
        return f"line {number}: {shown!r} is not an amount (write '$20 per month' or 'unlimited')"
    period = match.group("period").strip().lower()
    if period not in BUDGET_PERIODS:
        shown = f"per {period}" if period else "no period"
        return f"line {number}: {clean_text(shown, 40)!r} is not a period (day, week or month)"
    amount = Decimal(match.group("amount").replace(",", ""))
    if amount > MAX_BUDGET_USD:
        return f"line {number}: {clean_text(limit, 40)!r} is more than any budget needs"
    return dataclasses.replace(rule, limit_pico=usd_to_pico(amount), period=period)


@functools.lru_cache(maxsize=8)
def parse_budget_rules(text: str) -> BudgetRules:
    """The `budgets` valve: one rule per line; blank lines and lines starting with # are skipped.
    A line that does not parse, or repeats an earlier rule's target, is named and ignored."""
    rules: list[BudgetRule] = []
    errors: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parsed = parse_budget_line(number, line)
        if isinstance(parsed, str):
            errors.append(parsed)
            continue
        key = (parsed.kind, parsed.target.casefold())
        if key in seen:
            errors.append(f"line {number}: repeats the rule for {parsed.label} of line {seen[key]}; ignored")
            continue
        seen[key] = number
        rules.append(parsed)
    return BudgetRules(tuple(rules), tuple(errors))


# ══ Ledger ════════════════════════════════════════════════════════════════════════════════════════
# Tables share one prefix so the ledger can live inside Open WebUI's own PostgreSQL database.
# Money is integer pico-dollars (1e-12 USD): SQLite's SUM over integers is exact, NUMERIC is not.
#
# The write path, end to end: outlet → GroupCommitWriter (one thread per ledger and process) →
# Ledger.store (one transaction per batch; a batch the database refuses for a data reason is
# retried record by record, and a record still refused is quarantined) → on any failure to reach
# the database, the Spool (fsync'd files, replayed later under an OS file lock).

# ── Schema and migrations ──

TABLE_PREFIX: Final = "openrouter_usage_"
MIGRATION_LOCK_KEY: Final = 0x6F72_7573_0001  # PostgreSQL advisory lock keys, "orus" + purpose
ROLLUP_LOCK_KEY: Final = 0x6F72_7573_0002

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
    sa.Column("message_id", sa.Text, nullable=False),  # a message has a row per generation
    # The row's identity (UsageRecord.ledger_key): the generation id, a fallback key for a
    # generation whose id never arrived, or the message id for a row that only knows its message
    # (every row written before migration 0008, when a row was a message).
    sa.Column("generation_key", sa.Text, nullable=False),
    sa.Column("generation_ids", sa.Text, nullable=False),  # JSON array: the row's generation, if known
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("served_model", sa.Text, nullable=False),
    sa.Column("provider", sa.Text, nullable=False),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in TOKEN_MEASURES),
    sa.Column("cost_pico", sa.BigInteger, nullable=True),
    sa.Column("upstream_cost_pico", sa.BigInteger, nullable=True),
    sa.Column("spend_pico", sa.BigInteger, nullable=False),
    sa.Column("is_byok", sa.Boolean, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("latency_ms", sa.Integer, nullable=True),
    sa.Column("ttft_ms", sa.Integer, nullable=True),
    sa.Column("usage_json", sa.Text, nullable=True),  # the provider's usage object, as strict JSON
    sa.Column("notes", sa.Text, nullable=False, server_default=""),  # what was repaired; "; "-separated
    sa.Column("omitted_generation_ids", sa.Integer, nullable=False, server_default="0"),
    # Reconciliation (see that section): OpenRouter's bill beside our own figures, never over them.
    sa.Column("reconcile_status", sa.Text, nullable=False, server_default="pending"),
    sa.Column("billed_pico", sa.BigInteger, nullable=True),  # summed over the row's generations
    sa.Column("billed_json", sa.Text, nullable=True),  # OpenRouter's record of each generation
    sa.Column("reconciled_at", sa.DateTime, nullable=True),  # last checked, UTC
    sa.Column("reconcile_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("reconcile_after", sa.DateTime, nullable=True),  # the next lookup waits until then
    sa.Column("reconcile_error", sa.Text, nullable=False, server_default=""),
    sa.UniqueConstraint("generation_key", name=f"{TABLE_PREFIX}ledger_generation_key_key"),
    sa.Index(f"{TABLE_PREFIX}ledger_message_id", "message_id"),
    sa.Index(f"{TABLE_PREFIX}ledger_created_at", "created_at"),
    sa.Index(f"{TABLE_PREFIX}ledger_user_created_at", "user_id", "created_at"),
    sa.Index(f"{TABLE_PREFIX}ledger_chat_id", "chat_id"),
    # A budget's reservation estimate reads one user's recent spends on one model from the index.
    sa.Index(f"{TABLE_PREFIX}ledger_user_model_created_at", "user_id", "model", "created_at", "spend_pico"),
    # Partial: counting repaired rows reads only those rows.
    sa.Index(
        f"{TABLE_PREFIX}ledger_repaired",
        "id",
        sqlite_where=sa.text("notes <> ''"),
        postgresql_where=sa.text("notes <> ''"),
    ),
    # Partial: once a key is set nearly every row is matched, so the rows still to check and the
    # exceptions the panel counts are few, whatever the ledger's size.
    sa.Index(
        f"{TABLE_PREFIX}ledger_reconcile_open",
        "created_at",
        sqlite_where=sa.text("reconcile_status <> 'matched'"),
        postgresql_where=sa.text("reconcile_status <> 'matched'"),
    ),
)
users_table = sa.Table(
    f"{TABLE_PREFIX}users",
    schema,
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("user_name", sa.Text, nullable=False),
    sa.Column("last_seen_at", sa.DateTime, nullable=False),
    # The opaque id sent to OpenRouter as `user` (see Attribution), to match its Activity view.
    sa.Column("openrouter_user", sa.Text, nullable=False, server_default=""),
)


def _rollup_table(name: str, *keys: str) -> sa.Table:
    """A rollup: text key columns (the primary key: time zone, then day first) and one integer
    column per measure.

    On SQLite the table is stored in key order (WITHOUT ROWID), so a range of days is one
    contiguous read that already holds every measure; and no index leads with another column,
    which would tempt SQLite's planner into scanning every day to avoid a sort.
    """
    key_columns = [sa.Column(key, sa.Text, primary_key=True) for key in ("zone", *keys)]
    return sa.Table(
        f"{TABLE_PREFIX}{name}", schema, *key_columns, *_measure_columns(), sqlite_with_rowid=False
    )


# Rollups are keyed by time zone and the calendar day in it, and updated in the same transaction
# as the ledger rows they count, so reports never scan the ledger. Only the zone named by meta key
# "rollup_timezone" is complete; another exists only while a recount builds it (see RollupState).
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
# A named job that one process at a time may run (reconciliation), until `expires_at`: a holder
# that dies stops renewing, and another process takes over.
leases_table = sa.Table(
    f"{TABLE_PREFIX}leases",
    schema,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
)
# What running requests hold against their user's budget until the outlet, a stopped generation
# or the expiry releases it: every worker and replica sees the same reservations.
reservations_table = sa.Table(
    f"{TABLE_PREFIX}budget_reservations",
    schema,
    sa.Column("reservation_id", sa.Text, primary_key=True),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("amount_pico", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),  # UTC, naive
    sa.Index(f"{TABLE_PREFIX}budget_reservations_user", "user_id", "expires_at"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One schema change, frozen as the SQL it ran when it was released, per dialect.

    Named and append-only: a released migration is never edited; a change comes as a new entry.
    The declared tables above describe the result of all of them (a test compares the two)."""

    name: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]


def _frozen_rollup_ddl(table: str, keys: Sequence[str], measures: Sequence[str], tail: str = "") -> str:
    columns = [f"{key} TEXT NOT NULL" for key in keys] + [
        f"{m} BIGINT DEFAULT '0' NOT NULL" for m in measures
    ]
    return f"CREATE TABLE {table} ({', '.join(columns)}, PRIMARY KEY ({', '.join(keys)})){tail}"


# The measures as they were when 0002 and 0005 were released, spelled out: a migration never
# follows the live MEASURES. Never edit: add a migration.
_MEASURES_1_0: Final = (
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
_LEDGER_COLUMNS_1_0: Final = (
    "created_at {ts} NOT NULL, user_id TEXT NOT NULL, user_name TEXT NOT NULL, chat_id TEXT NOT NULL, "
    "message_id TEXT NOT NULL, generation_ids TEXT NOT NULL, model TEXT NOT NULL, "
    "served_model TEXT NOT NULL, "
    "provider TEXT NOT NULL, prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, "
    "total_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL, cache_write_tokens BIGINT NOT NULL, "
    "reasoning_tokens BIGINT NOT NULL, cost_pico BIGINT, upstream_cost_pico BIGINT, "
    "spend_pico BIGINT NOT NULL, is_byok BOOLEAN NOT NULL, status TEXT NOT NULL, error TEXT NOT NULL, "
    "latency_ms INTEGER, ttft_ms INTEGER, "
    "usage_json TEXT, PRIMARY KEY (id), CONSTRAINT openrouter_usage_ledger_message_id_key UNIQUE (message_id)"
)
_LEDGER_INDEXES_1_0: Final = (
    "CREATE INDEX openrouter_usage_ledger_created_at ON openrouter_usage_ledger (created_at)",
    "CREATE INDEX openrouter_usage_ledger_user_created_at ON openrouter_usage_ledger (user_id, created_at)",
    "CREATE INDEX openrouter_usage_ledger_chat_id ON openrouter_usage_ledger (chat_id)",
)
_USERS_1_0: Final = (
    "CREATE TABLE openrouter_usage_users (user_id TEXT NOT NULL, user_name TEXT NOT NULL, "
    "last_seen_at {ts} NOT NULL, PRIMARY KEY (user_id))"
)
_ROLLUP_KEYS_1_0: Final = (
    ("openrouter_usage_rollup_day", ("day",)),
    ("openrouter_usage_rollup_user_day", ("day", "user_id")),
    ("openrouter_usage_rollup_model_day", ("day", "served_model", "provider")),
)


# The ledger's columns after 0007, in order, for 0008's SQLite rebuild (generation_key is new).
_LEDGER_COLUMNS_0008: Final = (
    "id", "created_at", "user_id", "user_name", "chat_id", "message_id", "generation_key",
    "generation_ids", "model", "served_model", "provider", "prompt_tokens", "completion_tokens",
    "total_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens", "cost_pico",
    "upstream_cost_pico", "spend_pico", "is_byok", "status", "error", "latency_ms", "ttft_ms",
    "usage_json", "notes", "omitted_generation_ids", "reconcile_status", "billed_pico", "billed_json",
    "reconciled_at", "reconcile_attempts", "reconcile_after", "reconcile_error",
)  # fmt: skip
_LEDGER_TABLE_0008_SQLITE: Final = (
    "CREATE TABLE openrouter_usage_ledger_0008 (id INTEGER NOT NULL, created_at DATETIME NOT NULL, "
    "user_id TEXT NOT NULL, user_name TEXT NOT NULL, chat_id TEXT NOT NULL, message_id TEXT NOT NULL, "
    "generation_key TEXT NOT NULL, generation_ids TEXT NOT NULL, model TEXT NOT NULL, "
    "served_model TEXT NOT NULL, provider TEXT NOT NULL, prompt_tokens BIGINT NOT NULL, "
    "completion_tokens BIGINT NOT NULL, total_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL, "
    "cache_write_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT NULL, cost_pico BIGINT, "
    "upstream_cost_pico BIGINT, spend_pico BIGINT NOT NULL, is_byok BOOLEAN NOT NULL, "
    "status TEXT NOT NULL, error TEXT NOT NULL, latency_ms INTEGER, ttft_ms INTEGER, usage_json TEXT, "
    "notes TEXT DEFAULT '' NOT NULL, omitted_generation_ids INTEGER DEFAULT '0' NOT NULL, "
    "reconcile_status TEXT DEFAULT 'pending' NOT NULL, billed_pico BIGINT, billed_json TEXT, "
    "reconciled_at DATETIME, reconcile_attempts INTEGER DEFAULT '0' NOT NULL, "
    "reconcile_after DATETIME, reconcile_error TEXT DEFAULT '' NOT NULL, PRIMARY KEY (id), "
    "CONSTRAINT openrouter_usage_ledger_generation_key_key UNIQUE (generation_key))"
)
_REPAIRED_INDEX_0005: Final = (
    "CREATE INDEX openrouter_usage_ledger_repaired ON openrouter_usage_ledger (id) WHERE notes <> ''"
)
_RECONCILE_OPEN_INDEX_0006: Final = (
    "CREATE INDEX openrouter_usage_ledger_reconcile_open ON openrouter_usage_ledger "
    "(created_at) WHERE reconcile_status <> 'matched'"
)
_USER_MODEL_INDEX_0007: Final = (
    "CREATE INDEX openrouter_usage_ledger_user_model_created_at "
    "ON openrouter_usage_ledger (user_id, model, created_at, spend_pico)"
)
# Every index of the ledger after 0007 (SQLite drops them with the table it rebuilds).
_LEDGER_INDEXES_0007: Final = (
    *_LEDGER_INDEXES_1_0,
    _REPAIRED_INDEX_0005,
    _RECONCILE_OPEN_INDEX_0006,
    _USER_MODEL_INDEX_0007,
)
_MESSAGE_ID_INDEX_0008: Final = (
    "CREATE INDEX openrouter_usage_ledger_message_id ON openrouter_usage_ledger (message_id)"
)


def _one_row_per_generation(dialect: str) -> tuple[str, ...]:
    """Migration 0008: a ledger row is a billed generation, unique on `generation_key`, no longer
    on the message id. A row written before keeps its figures and is keyed by its message id
    (then a row was a message, its generations summed). SQLite cannot drop a constraint: the
    table is rebuilt with the same rows and ids."""
    if dialect != "sqlite":
        return (
            "ALTER TABLE openrouter_usage_ledger ADD COLUMN generation_key TEXT",
            "UPDATE openrouter_usage_ledger SET generation_key = message_id",
            "ALTER TABLE openrouter_usage_ledger ALTER COLUMN generation_key SET NOT NULL",
            "ALTER TABLE openrouter_usage_ledger DROP CONSTRAINT openrouter_usage_ledger_message_id_key",
            (
                "ALTER TABLE openrouter_usage_ledger ADD CONSTRAINT "
                "openrouter_usage_ledger_generation_key_key UNIQUE (generation_key)"
            ),
            _MESSAGE_ID_INDEX_0008,
        )
    copied = ", ".join(
        "message_id" if column == "generation_key" else column for column in _LEDGER_COLUMNS_0008
    )
    return (
        _LEDGER_TABLE_0008_SQLITE,
        (
            f"INSERT INTO openrouter_usage_ledger_0008 ({', '.join(_LEDGER_COLUMNS_0008)}) "
            f"SELECT {copied} FROM openrouter_usage_ledger"
        ),
        "DROP TABLE openrouter_usage_ledger",
        "ALTER TABLE openrouter_usage_ledger_0008 RENAME TO openrouter_usage_ledger",
        *_LEDGER_INDEXES_0007,
        _MESSAGE_ID_INDEX_0008,
    )


def _migrations_for(dialect: str) -> list[tuple[str, tuple[str, ...]]]:
    """The frozen SQL of every migration for one dialect (SQLite spells timestamps DATETIME and
    stores rollups WITHOUT ROWID; PostgreSQL numbers ledger rows with BIGSERIAL)."""
    sqlite = dialect == "sqlite"
    ts = "DATETIME" if sqlite else "TIMESTAMP WITHOUT TIME ZONE"
    serial = "id INTEGER NOT NULL" if sqlite else "id BIGSERIAL NOT NULL"
    rowid = " WITHOUT ROWID" if sqlite else ""
    any_gen_id = "'%\"gen-%'" if sqlite else "'%%\"gen-%%'"
    zoned = [
        statement
        for table, keys in _ROLLUP_KEYS_1_0
        for statement in (
            _frozen_rollup_ddl(f"{table}_zoned", ("zone", *keys), _MEASURES_1_0, rowid),
            (
                f"INSERT INTO {table}_zoned (zone, {', '.join((*keys, *_MEASURES_1_0))}) "
                f"SELECT meta.value, {', '.join(f'r.{c}' for c in (*keys, *_MEASURES_1_0))} FROM {table} r "
                "JOIN openrouter_usage_meta meta ON meta.\"key\" = 'rollup_timezone'"
            ),
            f"DROP TABLE {table}",
            f"ALTER TABLE {table}_zoned RENAME TO {table}",
            *(() if sqlite else (f"ALTER INDEX {table}_zoned_pkey RENAME TO {table}_pkey",)),
        )
    ]
    return [
        (
            "0001_ledger_and_users",
            (
                f"CREATE TABLE openrouter_usage_ledger ({serial}, {_LEDGER_COLUMNS_1_0.format(ts=ts)})",
                *_LEDGER_INDEXES_1_0,
                _USERS_1_0.format(ts=ts),
            ),
        ),
        (
            "0002_daily_rollups",
            (
                _frozen_rollup_ddl("openrouter_usage_rollup_day", ("day",), _MEASURES_1_0, rowid),
                _frozen_rollup_ddl("openrouter_usage_rollup_user_day", ("user_id", "day"), _MEASURES_1_0),
                "CREATE INDEX openrouter_usage_rollup_user_day_day ON openrouter_usage_rollup_user_day (day)",
                _frozen_rollup_ddl(
                    "openrouter_usage_rollup_model_day",
                    ("day", "served_model", "provider"),
                    _MEASURES_1_0,
                    rowid,
                ),
            ),
        ),
        (
            "0003_meta",
            (
                (
                    'CREATE TABLE openrouter_usage_meta ("key" TEXT NOT NULL, value TEXT NOT NULL, '
                    'PRIMARY KEY ("key"))'
                ),
            ),
        ),
        (
            "0004_rollup_user_day_keyed_by_day",
            (
                "DROP TABLE openrouter_usage_rollup_user_day",
                _frozen_rollup_ddl(
                    "openrouter_usage_rollup_user_day", ("day", "user_id"), _MEASURES_1_0, rowid
                ),
                "DELETE FROM openrouter_usage_meta WHERE \"key\" = 'rollup_timezone'",
            ),
        ),
        (
            "0005_repair_notes_and_zoned_rollups",
            (
                "ALTER TABLE openrouter_usage_ledger ADD COLUMN notes TEXT DEFAULT '' NOT NULL",
                (
                    "ALTER TABLE openrouter_usage_ledger "
                    "ADD COLUMN omitted_generation_ids INTEGER DEFAULT '0' NOT NULL"
                ),
                _REPAIRED_INDEX_0005,
                *zoned,
                # The rollup zone is settled here, under the migration lock, never by racing writers:
                # an empty ledger starts in UTC (the first write's zone, if another, is a recount of
                # nothing); one whose rollups were stale (0004 drops them) is recounted, in UTC first.
                (
                    "INSERT INTO openrouter_usage_meta (\"key\", value) SELECT 'rollup_timezone', 'UTC' "
                    "WHERE NOT EXISTS (SELECT 1 FROM openrouter_usage_meta "
                    "WHERE \"key\" = 'rollup_timezone') "
                    "AND NOT EXISTS (SELECT 1 FROM openrouter_usage_ledger)"
                ),
                (
                    "INSERT INTO openrouter_usage_meta (\"key\", value) SELECT 'rollup_recount', "
                    '\'{"zone": "UTC", "after_id": 0}\' '
                    "WHERE NOT EXISTS (SELECT 1 FROM openrouter_usage_meta "
                    "WHERE \"key\" = 'rollup_timezone') AND EXISTS (SELECT 1 FROM openrouter_usage_ledger)"
                ),
            ),
        ),
        (
            "0006_reconciliation",
            (
                *(
                    f"ALTER TABLE openrouter_usage_ledger ADD COLUMN {column}"
                    for column in (
                        "reconcile_status TEXT DEFAULT 'pending' NOT NULL",
                        "billed_pico BIGINT",
                        "billed_json TEXT",
                        f"reconciled_at {ts}",
                        "reconcile_attempts INTEGER DEFAULT '0' NOT NULL",
                        f"reconcile_after {ts}",
                        "reconcile_error TEXT DEFAULT '' NOT NULL",
                    )
                ),
                # Rows without an OpenRouter generation id (non-streaming answers) cannot be checked.
                # (psycopg reads % as a placeholder: PostgreSQL's statement doubles it.)
                (
                    "UPDATE openrouter_usage_ledger SET reconcile_status = 'no_id' "
                    f"WHERE generation_ids NOT LIKE {any_gen_id}"
                ),
                _RECONCILE_OPEN_INDEX_0006,
                "ALTER TABLE openrouter_usage_users ADD COLUMN openrouter_user TEXT DEFAULT '' NOT NULL",
                (
                    "CREATE TABLE openrouter_usage_leases (name TEXT NOT NULL, holder TEXT NOT NULL, "
                    f"expires_at {ts} NOT NULL, PRIMARY KEY (name))"
                ),
            ),
        ),
        (
            "0007_budget_reservations",
            (
                (
                    "CREATE TABLE openrouter_usage_budget_reservations (reservation_id TEXT NOT NULL, "
                    f"user_id TEXT NOT NULL, amount_pico BIGINT NOT NULL, expires_at {ts} NOT NULL, "
                    "PRIMARY KEY (reservation_id))"
                ),
                (
                    "CREATE INDEX openrouter_usage_budget_reservations_user "
                    "ON openrouter_usage_budget_reservations (user_id, expires_at)"
                ),
                _USER_MODEL_INDEX_0007,
            ),
        ),
        ("0008_one_row_per_generation", _one_row_per_generation(dialect)),
    ]


MIGRATIONS: Final = tuple(
    Migration(name, sqlite, postgresql)
    for (name, sqlite), (_, postgresql) in zip(
        _migrations_for("sqlite"), _migrations_for("postgresql"), strict=True
    )
)
MIGRATIONS_TABLE_DDL: Final = {
    "sqlite": "CREATE TABLE IF NOT EXISTS openrouter_usage_migrations "
    "(name TEXT NOT NULL, applied_at DATETIME NOT NULL, PRIMARY KEY (name))",
    "postgresql": "CREATE TABLE IF NOT EXISTS openrouter_usage_migrations "
    "(name TEXT NOT NULL, applied_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, PRIMARY KEY (name))",
}


def apply_migrations(conn: sa.Connection) -> list[str]:
    """Run the migrations this database has not recorded, in order; returns their names. The
    caller holds the migration lock and the transaction."""
    dialect = conn.dialect.name
    conn.exec_driver_sql(MIGRATIONS_TABLE_DDL[dialect])
    applied = set(conn.execute(sa.select(migrations_table.c.name)).scalars())
    ran = []
    for migration in MIGRATIONS:
        if migration.name in applied:
            continue
        for statement in getattr(migration, dialect):
            conn.exec_driver_sql(statement)
        conn.execute(migrations_table.insert(), {"name": migration.name, "applied_at": _utcnow_naive()})
        ran.append(migration.name)
    return ran


# ── Connection ──


class UnsupportedDatabase(Exception):
    """The ledger runs on SQLite and PostgreSQL; other engines lack the upserts it relies on."""


class NoLedger(Exception):
    """A read found no ledger where it looked (reads never create one)."""


class LedgerNeedsUpgrade(Exception):
    """The ledger's schema is older than this code; the next recorded completion upgrades it."""


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
        owui_data_dir = getattr(sys.modules.get("open_webui.env"), "DATA_DIR", None)
        url = _default_sqlite_url(str(owui_data_dir), os.environ.get("DATA_DIR"), str(Path.cwd()))
    return normalize_database_url(url)


@functools.lru_cache(maxsize=8)
def _default_sqlite_url(*_where_data_dir_comes_from: str | None) -> str:
    """The default ledger's URL, for each place data_dir() reads (the arguments are only the
    cache key: every outlet resolves the URL, and building paths is not free)."""
    return f"sqlite:///{data_dir() / DEFAULT_SQLITE_NAME}"


_SECRET_PARAMETER: Final = re.compile(r"pass|secret|token|key", re.IGNORECASE)


def masked_url(url: str) -> str:
    """A URL safe to show or log: the user-info password and every query parameter whose name
    suggests a secret (pass, secret, token, key) are replaced by ***."""
    try:
        parsed = parse_database_url(url)
        query = {
            name: "***" if _SECRET_PARAMETER.search(name) else value for name, value in parsed.query.items()
        }
        return parsed.set(query=query).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable database URL)"


def parse_database_url(url: str) -> sa.engine.URL:
    """SQLAlchemy's reading of a URL, refusing one whose host holds an "@": that is a password
    with an unencoded "@", which would otherwise end up, in part, in the host (and its errors)."""
    parsed = sa.engine.make_url(url)
    if "@" in (parsed.host or ""):
        raise sa.exc.ArgumentError("the password in the database URL must be percent-encoded (@ as %40)")
    return parsed


def url_has_secret(url: str) -> bool:
    """Whether a URL carries a password or a secret-looking query parameter (or cannot be parsed,
    so nobody can tell)."""
    try:
        parsed = parse_database_url(url)
    except Exception:
        return True
    return parsed.password is not None or any(_SECRET_PARAMETER.search(name) for name in parsed.query)


def ledger_identity(url: str) -> str:
    """What makes two URLs the same ledger: the SQLite file, or the server and database."""
    try:
        parsed = sa.engine.make_url(url)
    except Exception:
        return "unparseable:" + url
    if parsed.get_backend_name() == "sqlite":
        database = (parsed.database or "").removeprefix("file:")
        return "sqlite:" + str(Path(database).resolve()) if database else "sqlite:memory"
    return f"{parsed.get_backend_name()}://{parsed.host}:{parsed.port}/{parsed.database}"


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (None for other engines and for in-memory databases)."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database.removeprefix("file:"))


def create_ledger_engine(url: str) -> sa.Engine:
    """An engine sized for a guest inside someone else's server: small pool, bounded waits, and
    commits that are durable whatever the server's default (synchronous_commit)."""
    parsed = parse_database_url(url)
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
                "options": "-c statement_timeout=120000 -c lock_timeout=30000 -c synchronous_commit=on",
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


def is_unavailable(exc: BaseException) -> bool:
    """Whether a failure means "the database cannot be reached or used right now" (spool and
    retry later) rather than "the database refused this data" (quarantine)."""
    return isinstance(
        exc,
        sa.exc.OperationalError
        | sa.exc.InterfaceError
        | sa.exc.DisconnectionError
        | sa.exc.TimeoutError
        | sa.exc.ArgumentError
        | sa.exc.NoSuchModuleError
        | UnsupportedDatabase
        | OSError
        | ImportError,
    )


def short_error(exc: BaseException) -> str:
    """One line naming the failure, without the SQL or parameters an SQLAlchemy error carries."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {clean_text(text, 200)}" if text else type(cause).__name__


def _advisory_lock(conn: sa.Connection, key: int, *, shared: bool = False) -> None:
    if conn.dialect.name == "postgresql":
        function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        conn.execute(sa.text(f"SELECT {function}(:key)"), {"key": key})


# ── Statements ──
# Plain SQL text for the upserts: the same on SQLite (3.35+) and PostgreSQL, and compiled once.


def _rollup_upsert(table: sa.Table) -> sa.TextClause:
    """Adds every measure to the row of its key: exact under concurrent writers."""
    keys = [column.name for column in table.primary_key.columns]
    columns = [*keys, *MEASURES]
    additions = ", ".join(f"{name} = {table.name}.{name} + excluded.{name}" for name in MEASURES)
    return sa.text(
        f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {additions}"
    )


ROLLUP_UPSERTS: Final = {table.name: _rollup_upsert(table) for table in ROLLUP_TABLES}
# A user's name as of their latest completion. The SELECT proposes a row only for a new user or a
# new name, so the common case (same user, same name) writes nothing and, on PostgreSQL, locks no
# users row that writers in other processes would queue behind. `last_seen_at` is when the stored
# name was last seen; a replayed older record never brings an old name back. (SQLite needs the
# WHERE on the SELECT to read ON CONFLICT as the upsert clause.)
# An empty opaque id (attribution off) keeps the one stored.
USERS_UPSERT: Final = sa.text(
    f"INSERT INTO {users_table.name} (user_id, user_name, last_seen_at, openrouter_user) "
    "SELECT :user_id, :user_name, :last_seen_at, :openrouter_user WHERE NOT EXISTS ("
    f"SELECT 1 FROM {users_table.name} WHERE user_id = :user_id "
    "AND ((user_name = :user_name AND (:openrouter_user = '' OR openrouter_user = :openrouter_user)) "
    "OR last_seen_at > :last_seen_at)) "
    "ON CONFLICT (user_id) DO UPDATE SET "
    "user_name = excluded.user_name, last_seen_at = excluded.last_seen_at, "
    f"openrouter_user = CASE WHEN excluded.openrouter_user = '' THEN {users_table.name}.openrouter_user "
    "ELSE excluded.openrouter_user END "
    f"WHERE {users_table.name}.last_seen_at <= excluded.last_seen_at"
).bindparams(sa.bindparam("last_seen_at", type_=sa.DateTime))
META_INSERT_IF_ABSENT: Final = sa.text(
    f'INSERT INTO {meta_table.name} ("key", value) VALUES (:key, :value) ON CONFLICT ("key") DO NOTHING'
)
META_UPSERT: Final = sa.text(
    f'INSERT INTO {meta_table.name} ("key", value) VALUES (:key, :value) '
    'ON CONFLICT ("key") DO UPDATE SET value = excluded.value'
)
_IN_LIST: Final[sa.BindParameter[Any]] = sa.bindparam("values", expanding=True)
SELECT_RECORDED_KEYS: Final = sa.select(ledger_table.c.generation_key).where(
    ledger_table.c.generation_key.in_(_IN_LIST)
)
SELECT_RECORDED_KEY: Final = sa.select(ledger_table.c.generation_key).where(
    ledger_table.c.generation_key == sa.bindparam("value")
)
SELECT_RECORDED_MESSAGES: Final = sa.select(ledger_table.c.message_id).where(
    ledger_table.c.message_id.in_(_IN_LIST)
)
SELECT_SPEND_OF_MESSAGES: Final = sa.select(
    sa.func.coalesce(sa.func.sum(ledger_table.c.spend_pico), 0)
).where(ledger_table.c.message_id.in_(_IN_LIST))
SELECT_MESSAGE_TOTALS: Final = sa.select(
    sa.func.count().label("calls"),
    sa.func.count(ledger_table.c.cost_pico).label("priced"),
    *(
        sa.func.coalesce(sa.func.sum(ledger_table.c[name]), 0).label(name)
        for name in (*TOKEN_MEASURES, *MONEY_MEASURES)
    ),
).where(ledger_table.c.message_id == sa.bindparam("message_id"))
IN_LIST_CHUNK: Final = 500  # parameters per IN list: well inside every SQLite build's limit


def in_list_chunks(values: Sequence[str]) -> Iterator[dict[str, list[str]]]:
    """Parameters for the IN-list statements above, at most IN_LIST_CHUNK values each."""
    for start in range(0, len(values), IN_LIST_CHUNK):
        yield {"values": list(values[start : start + IN_LIST_CHUNK])}


def recorded_keys(conn: sa.Connection, keys: Sequence[str]) -> set[str]:
    """Which of these generation keys the ledger already holds."""
    if len(keys) == 1:  # a batch of one, the common case under light load: no IN list to render
        return set(conn.execute(SELECT_RECORDED_KEY, {"value": keys[0]}).scalars())
    found: set[str] = set()
    for parameters in in_list_chunks(keys):
        found.update(conn.execute(SELECT_RECORDED_KEYS, parameters).scalars())
    return found


def recorded_messages(conn: sa.Connection, message_ids: Sequence[str]) -> set[str]:
    """Which of these messages the ledger holds a row of."""
    found: set[str] = set()
    for parameters in in_list_chunks(message_ids):
        found.update(conn.execute(SELECT_RECORDED_MESSAGES, parameters).scalars())
    return found


def fresh_records(conn: sa.Connection, records: Sequence[UsageRecord]) -> list[UsageRecord]:
    """The records the ledger does not hold yet, in key order: one per generation key, and a
    record that knows only its message (no generation key) only while nothing of that message is
    recorded, in the ledger or in this batch."""
    unique: dict[str, UsageRecord] = {}
    for record in records:
        unique.setdefault(record.ledger_key, record)
    recorded = recorded_keys(conn, sorted(unique))
    keyed = [unique[key] for key in sorted(unique) if key not in recorded]
    message_level = sorted({record.message_id for record in keyed if not record.generation_key})
    if not message_level:
        return keyed
    known = recorded_messages(conn, message_level)
    known.update(record.message_id for record in keyed if record.generation_key)
    return [record for record in keyed if record.generation_key or record.message_id not in known]


def ledger_values(record: UsageRecord) -> dict[str, Any]:
    """The record as a ledger row."""
    usage = record.usage
    return {
        "created_at": _naive_utc(record.created_at),
        "user_id": record.user_id,
        "user_name": record.user_name,
        "chat_id": record.chat_id,
        "message_id": record.message_id,
        "generation_key": record.ledger_key,
        "generation_ids": json.dumps(list(record.generation_ids)),
        "model": record.model,
        "served_model": record.served_model,
        "provider": record.provider,
        **{name: getattr(usage, name) for name in TOKEN_MEASURES},
        "cost_pico": usage.cost_pico,
        "upstream_cost_pico": usage.upstream_cost_pico,
        "spend_pico": usage.spend_pico,
        "is_byok": usage.is_byok,
        "status": record.status,
        "error": record.error,
        "latency_ms": record.latency_ms,
        "ttft_ms": record.ttft_ms,
        "usage_json": (
            json.dumps(strict_json_value(record.raw_usage), allow_nan=False)
            if record.raw_usage is not None
            else None
        ),
        "notes": "; ".join(record.notes),
        "omitted_generation_ids": record.omitted_generation_ids,
        "reconcile_status": "pending"
        if any(map(is_openrouter_generation_id, record.generation_ids))
        else "no_id",
    }


# ── Rollup arithmetic ──


def local_day(moment: datetime, zone: ZoneInfo) -> str:
    """The calendar day of a UTC moment in `zone`, as YYYY-MM-DD (rollup key)."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(zone).date().isoformat()


def resolve_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name.strip() or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("openrouter_usage: unknown time zone %r; using UTC", clean_text(name, 64))
        return ZoneInfo("UTC")


def row_measures(row: Mapping[Any, Any]) -> list[int]:
    """A ledger row's contribution to each of MEASURES (an unknown cost counts 0)."""
    return [1, 1 if row["status"] == "error" else 0, *(int(row[name] or 0) for name in MEASURES[2:])]


RollupKey = tuple[str, ...]


def rollup_increments(rows: Iterable[Mapping[Any, Any]], zone: ZoneInfo) -> list[dict[RollupKey, list[int]]]:
    """Per-table sums of ledger rows (in ROLLUP_TABLES order, measures in MEASURES order), keyed
    by day in `zone`. The rows are the ledger's: as written (ledger_values) or as read back."""
    sums: list[dict[RollupKey, list[int]]] = [{} for _ in ROLLUP_TABLES]
    for row in rows:
        day = local_day(row["created_at"], zone)
        values = row_measures(row)
        for table_sums, key in zip(
            sums, ((day,), (day, row["user_id"]), (day, row["served_model"], row["provider"])), strict=True
        ):
            bucket = table_sums.get(key)
            table_sums[key] = values if bucket is None else list(map(operator.add, bucket, values))
    return sums


def apply_rollups(conn: sa.Connection, zone: str, increments: list[dict[RollupKey, list[int]]]) -> None:
    for table, sums in zip(ROLLUP_TABLES, increments, strict=True):
        if not sums:
            continue
        keys = [column.name for column in table.primary_key.columns]
        # Sorted keys give concurrent PostgreSQL writers one lock order: no deadlocks.
        conn.execute(
            ROLLUP_UPSERTS[table.name],
            [dict(zip((*keys, *MEASURES), (zone, *key, *sums[key]), strict=True)) for key in sorted(sums)],
        )


_RECOUNT_COLUMNS: Final = [
    ledger_table.c[name]
    for name in ("id", "created_at", "user_id", "served_model", "provider", "status", *MEASURES[2:])
]


@dataclasses.dataclass(frozen=True, slots=True)
class RollupState:
    """Which time zone's rollups are complete (`zone`), and the recount building another one, if
    any: it has counted every ledger row up to id `recount_after_id` into `recount_zone`.

    A recount never blocks writers for long: it runs in chunks of RECOUNT_CHUNK_ROWS, each in a
    transaction that excludes writers (an advisory lock on PostgreSQL, the write lock on SQLite).
    Rows written meanwhile get ids above the chunk just counted, so a later chunk counts them."""

    zone: str | None
    recount_zone: str | None = None
    recount_after_id: int = 0


ROLLUP_ZONE_KEY: Final = "rollup_timezone"
RECOUNT_KEY: Final = "rollup_recount"
RECOUNT_CHUNK_ROWS: Final = 5_000
# Two equalities, not IN: an IN list is re-rendered at every execution, and this runs in every write.
_SELECT_ROLLUP_STATE: Final = sa.select(meta_table.c.key, meta_table.c.value).where(
    sa.or_(meta_table.c.key == ROLLUP_ZONE_KEY, meta_table.c.key == RECOUNT_KEY)
)


def read_rollup_state(conn: sa.Connection) -> RollupState:
    values = dict(conn.execute(_SELECT_ROLLUP_STATE).tuples().all())
    recount: Any = {}
    with contextlib.suppress(ValueError):
        recount = json.loads(values.get(RECOUNT_KEY) or "{}")
    if not isinstance(recount, dict):
        recount = {}
    return RollupState(
        values.get(ROLLUP_ZONE_KEY), recount.get("zone") or None, int(recount.get("after_id") or 0)
    )


def _start_recount(conn: sa.Connection, state: RollupState, zone: str) -> RollupState:
    _delete_zone_rollups(conn, {z for z in (state.recount_zone, zone) if z and z != state.zone})
    conn.execute(META_UPSERT, {"key": RECOUNT_KEY, "value": json.dumps({"zone": zone, "after_id": 0})})
    log.info("openrouter_usage: recounting the rollups for time zone %s", zone)
    return RollupState(state.zone, zone, 0)


def _delete_zone_rollups(conn: sa.Connection, zones: set[str]) -> None:
    for zone in zones:
        for table in ROLLUP_TABLES:
            conn.execute(table.delete().where(table.c.zone == zone))


def settle_zone(conn: sa.Connection, state: RollupState, zone: str) -> RollupState:
    """Bring the rollup state in line with the zone the settings ask for (inside a write, which
    several processes may run at once: every branch is safe to take twice)."""
    if state.zone is None and state.recount_zone is None:  # not left by any migration; recount
        return _start_recount(conn, state, zone)
    if state.zone == zone:
        if state.recount_zone is not None:  # the settings went back: the recount is not needed
            _delete_zone_rollups(conn, {state.recount_zone} - {zone})  # never the complete zone's
            conn.execute(meta_table.delete().where(meta_table.c.key == RECOUNT_KEY))
        return RollupState(zone)
    if state.recount_zone != zone:
        return _start_recount(conn, state, zone)
    return state


def recount_chunk(conn: sa.Connection) -> bool:
    """Count the next chunk of ledger rows into the zone being recounted (inside a write that
    excludes other writers); True while more remain."""
    state = read_rollup_state(conn)
    if state.recount_zone is None:
        return False
    if state.recount_zone == state.zone:  # nothing to recount: its rollups are complete
        conn.execute(meta_table.delete().where(meta_table.c.key == RECOUNT_KEY))
        return False
    rows = conn.execute(
        sa.select(*_RECOUNT_COLUMNS)
        .where(ledger_table.c.id > state.recount_after_id)
        .order_by(ledger_table.c.id)
        .limit(RECOUNT_CHUNK_ROWS)
    ).all()
    apply_rollups(
        conn,
        state.recount_zone,
        rollup_increments((row._mapping for row in rows), ZoneInfo(state.recount_zone)),
    )
    if len(rows) == RECOUNT_CHUNK_ROWS:
        progress = {"zone": state.recount_zone, "after_id": int(rows[-1][0])}
        conn.execute(META_UPSERT, {"key": RECOUNT_KEY, "value": json.dumps(progress)})
        return True
    if state.zone is not None and state.zone != state.recount_zone:
        _delete_zone_rollups(conn, {state.zone})
    conn.execute(META_UPSERT, {"key": ROLLUP_ZONE_KEY, "value": state.recount_zone})
    conn.execute(meta_table.delete().where(meta_table.c.key == RECOUNT_KEY))
    log.info("openrouter_usage: rollups now kept in time zone %s", state.recount_zone)
    return False


# ── Spool ──


SPOOL_SUFFIX: Final = ".jsonl"
ABANDONED_PARTIAL_SECONDS: Final = 3600.0  # a .tmp spool file this old belongs to a dead writer
LEGACY_CLAIM_MARKER: Final = ".jsonl.claimed-"  # 1.0.0 claimed files by renaming them


class SpoolClaim:
    """A spool file held under an exclusive OS lock: released when the holder ends, even by kill -9,
    so a claim can never outlive its process (whatever PID the next process gets)."""

    def __init__(self, spool: Spool, path: Path, records: list[UsageRecord], unreadable: list[str]) -> None:
        self.spool = spool
        self.path = path
        self.records = records
        self.unreadable = unreadable

    def finish(self) -> None:
        """The records are in the ledger (or quarantined): drop the file, keeping unreadable lines."""
        if self.unreadable:
            self.spool.quarantine_lines(self.unreadable, "unreadable spool line")
        self.path.unlink(missing_ok=True)
        _fsync_directory(self.path.parent)


class Spool:
    """Records that could not reach the database, one fsync'd JSONL file per failed batch, and a
    `quarantine/` folder for records the database refused (dead letters, never retried by
    themselves: `openrouter-usage spool --replay` retries them)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.quarantine_directory = directory / "quarantine"

    def append(self, records: Sequence[UsageRecord]) -> Path:
        return _write_jsonl(self.directory, [json.dumps(r.to_json(), default=str) for r in records])

    def quarantine(self, entries: Sequence[tuple[UsageRecord, str]]) -> None:
        lines = [json.dumps({"reason": reason, "record": r.to_json()}, default=str) for r, reason in entries]
        _write_jsonl(self.quarantine_directory, lines)

    def quarantine_lines(self, lines: Sequence[str], reason: str) -> None:
        _write_jsonl(self.quarantine_directory, [json.dumps({"reason": reason, "line": ln}) for ln in lines])

    def pending_files(self) -> list[Path]:
        return _files(self.directory, lambda name: name.endswith(SPOOL_SUFFIX) or LEGACY_CLAIM_MARKER in name)

    def pending_count(self) -> int:
        """Files waiting for replay, including any another process is replaying right now."""
        return len(self.pending_files())

    def quarantined_files(self) -> list[Path]:
        return _files(self.quarantine_directory, lambda name: name.endswith(SPOOL_SUFFIX))

    def quarantined(self) -> list[dict[str, Any]]:
        """Every quarantined entry: {"reason", and "record" or the unreadable "line"}."""
        return [entry for path in self.quarantined_files() for entry in quarantine_entries(path)]

    def quarantined_count(self) -> int:
        return len(self.quarantined())

    def remove_abandoned_partials(self) -> None:
        """Delete half-written files a killed process left: never acknowledged, so never owed."""
        cutoff = time.time() - ABANDONED_PARTIAL_SECONDS
        for path in _files(self.directory, lambda name: name.endswith(".tmp")):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()

    @contextlib.contextmanager
    def claim(self, path: Path) -> Iterator[SpoolClaim | None]:
        """Hold `path` for replay, or yield None when another thread or process holds it or it
        is already gone."""
        try:
            handle = path.open(encoding="utf-8")  # held open for the lock's life
        except FileNotFoundError:
            yield None
            return
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            try:
                if path.stat().st_ino != os.fstat(handle.fileno()).st_ino:
                    yield None  # replayed and removed by the holder we waited for
                    return
            except FileNotFoundError:
                yield None
                return
            records, unreadable = _read_records(handle)
            yield SpoolClaim(self, path, records, unreadable)


def quarantine_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of one quarantine file; a line that is not an entry is kept as one."""
    entries: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            entries.append(entry if isinstance(entry, dict) else {"reason": "unreadable entry", "line": line})
    return entries


def entry_record(entry: Mapping[str, Any]) -> UsageRecord | None:
    """The record of a quarantine entry, or None when it holds none that can be read."""
    try:
        return UsageRecord.from_json(entry["record"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _read_records(handle: io.TextIOBase | Any) -> tuple[list[UsageRecord], list[str]]:
    records, unreadable = [], []
    for line in handle:
        if not line.strip():
            continue
        try:
            records.append(UsageRecord.from_json(json.loads(line)))
        except (ValueError, TypeError, KeyError, AttributeError):
            unreadable.append(line.rstrip("\n"))
    return records, unreadable


def _write_jsonl(directory: Path, lines: Sequence[str]) -> Path:
    """A new file of `lines`, durable when this returns (fsync'd, then renamed into place)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex}{SPOOL_SUFFIX}"
    temporary = directory / (name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)
        handle.flush()
        os.fsync(handle.fileno())
    final = directory / name
    temporary.rename(final)
    _fsync_directory(directory)
    return final


def _files(directory: Path, wanted: Callable[[str], bool]) -> list[Path]:
    try:
        return sorted(
            Path(entry.path) for entry in os.scandir(directory) if entry.is_file() and wanted(entry.name)
        )
    except (FileNotFoundError, NotADirectoryError):
        return []


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def spool_directory(url: str) -> Path:
    """Where records wait while this ledger is unreachable: the data directory, never the ledger's
    own (that may be the very thing that is missing), else the temp directory. Created on first
    use, so reading never leaves one behind."""
    digest = hashlib.sha256(ledger_identity(url).encode()).hexdigest()[:16]
    base = data_dir()
    if not os.access(base if base.exists() else base.parent, os.W_OK):
        base = Path(tempfile.gettempdir())
    return base / "openrouter_usage_spool" / digest


# ── Ledger ──

WRITE_ATTEMPTS: Final = 3  # a batch that lost a race to another process is retried


def _sums(table: sa.Table) -> list[sa.Label[Any]]:
    return [sa.func.coalesce(sa.func.sum(table.c[name]), 0).label(name) for name in MEASURES]


@dataclasses.dataclass(frozen=True, slots=True)
class StoreResult:
    """What one store did: the ledger keys newly inserted, those quarantined (with the reason),
    the time zone the rollups are kept in, and whether a recount is under way."""

    inserted: set[str]
    quarantined: dict[str, str]
    rollup_zone: str | None
    recounting: bool = False


class Ledger:
    """The durable record: one row per billed generation, plus rollups kept in step with it.

    Nothing here touches the database when constructed: a bad URL fails at the first write (and
    the record is spooled) or read (and the reader says why)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.location = masked_url(url)
        self.spool = Spool(spool_directory(url))
        self._engine: sa.Engine | None = None
        self._lock = threading.Lock()
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    @property
    def engine(self) -> sa.Engine:
        with self._lock:
            if self._engine is None:
                self._engine = create_ledger_engine(self.url)
            return self._engine

    # ── schema ──
    def ensure_schema(self) -> None:
        """Apply pending migrations (writes only: reads never change the ledger)."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            self._prepare_location()
            with self._write_transaction() as conn:
                _advisory_lock(conn, MIGRATION_LOCK_KEY)
                for name in apply_migrations(conn):
                    log.info("openrouter_usage: applied migration %s", name)
            self._schema_ready = True

    def applied_migrations(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(migrations_table.c.name).order_by("name")).scalars())

    def _prepare_location(self) -> None:
        # SQLite creates the file but not its directory; a missing directory stays an error so the
        # record is spooled, except for the default location, which is ours to create.
        path = sqlite_path(self.url)
        if path is not None and path.parent == data_dir() and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def writing(self) -> Iterator[sa.Connection]:
        """A write transaction on an up-to-date ledger (for work beside recording: reconciliation)."""
        self.ensure_schema()
        with self._write_transaction() as conn:
            yield conn

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as connection:
            conn = connection.execution_options(ledger_write=True)
            with conn.begin():
                yield conn

    # ── writes ──
    def store(self, records: Sequence[UsageRecord], zone: ZoneInfo | None) -> StoreResult:
        """Commit records not yet in the ledger, with their rollups. A batch the database refuses
        for a data reason is retried record by record; a record still refused is quarantined.
        Raises (nothing committed for the failing part) when the database cannot be used; the
        caller spools. `zone` is the time zone the settings ask for (None: no opinion)."""
        self.ensure_schema()
        try:
            return self._commit(records, zone)
        except Exception as exc:
            if is_unavailable(exc) or len(records) == 0:
                raise
            log.warning(
                "openrouter_usage: the ledger refused a batch of %d (%s); retrying one by one",
                len(records),
                short_error(exc),
            )
        inserted: set[str] = set()
        quarantined: dict[str, str] = {}
        last = StoreResult(set(), {}, None)
        for record in records:
            try:
                result = self._commit([record], zone)
            except Exception as exc:
                if is_unavailable(exc):
                    raise
                reason = short_error(exc)
                self.spool.quarantine([(record, reason)])
                quarantined[record.ledger_key] = reason
                log.warning("openrouter_usage: record %s quarantined (%s)", record.ledger_key, reason)
                continue
            inserted |= result.inserted
            last = result
        return StoreResult(inserted, quarantined, last.rollup_zone, last.recounting)

    def _commit(self, records: Sequence[UsageRecord], zone: ZoneInfo | None) -> StoreResult:
        attempts = 1
        while True:
            try:
                with self._write_transaction() as conn:
                    _advisory_lock(conn, ROLLUP_LOCK_KEY, shared=True)
                    state = read_rollup_state(conn)
                    if zone is not None:
                        state = settle_zone(conn, state, zone.key)
                    inserted = self._insert(conn, records, state.zone)
                    return StoreResult(inserted, {}, state.zone, state.recount_zone is not None)
            except sa.exc.IntegrityError:
                if attempts == WRITE_ATTEMPTS:
                    raise
                attempts += 1
                log.info("openrouter_usage: another process recorded one of these messages first; retrying")

    def _insert(self, conn: sa.Connection, records: Sequence[UsageRecord], zone: str | None) -> set[str]:
        fresh = fresh_records(conn, records)
        if not fresh:
            return set()
        # A generation another process recorded since the SELECT (only possible on PostgreSQL;
        # SQLite writers are serialised) fails the INSERT and the transaction, which is retried.
        rows = [ledger_values(record) for record in fresh]
        conn.execute(ledger_table.insert(), rows)
        if zone is not None:  # None: a recount from scratch is running and will count these rows
            apply_rollups(conn, zone, rollup_increments(rows, ZoneInfo(zone)))
        latest: dict[str, UsageRecord] = {}
        for record in fresh:
            if not record.user_name:  # a stopped generation does not know the user's name
                continue
            if record.user_id not in latest or record.created_at >= latest[record.user_id].created_at:
                latest[record.user_id] = record
        users = [
            {
                "user_id": r.user_id,
                "user_name": r.user_name,
                "last_seen_at": _naive_utc(r.created_at),
                "openrouter_user": r.openrouter_user,
            }
            for _, r in sorted(latest.items())
        ]
        if users:
            conn.execute(USERS_UPSERT, users)
        return {record.ledger_key for record in fresh}

    def claim_once(self, key: str) -> bool:
        """True for exactly one caller per key, across processes (used for one-time notices)."""
        self.ensure_schema()
        with self._write_transaction() as conn:
            inserted = conn.execute(
                sa.text(
                    f'INSERT INTO {meta_table.name} ("key", value) VALUES (:key, :value) '
                    'ON CONFLICT ("key") DO NOTHING RETURNING "key"'
                ),
                {"key": key, "value": _utcnow_naive().isoformat()},
            ).first()
            return inserted is not None

    def recount_step(self) -> bool:
        """One chunk of a pending time-zone recount; True while more remain."""
        self.ensure_schema()
        with self._write_transaction() as conn:
            _advisory_lock(conn, ROLLUP_LOCK_KEY)
            return recount_chunk(conn)

    def replay_spool(self, budget_seconds: float | None = None) -> int:
        """Replay spooled files, each in its own transaction, until done or `budget_seconds` is
        spent; returns the records replayed. Raises when the database cannot be used."""
        deadline = time.monotonic() + budget_seconds if budget_seconds is not None else math.inf
        replayed = 0
        self.spool.remove_abandoned_partials()
        for path in self.spool.pending_files():
            if time.monotonic() >= deadline:
                break
            with self.spool.claim(path) as claim:
                if claim is None:
                    continue
                if claim.records:
                    self.store(claim.records, None)
                claim.finish()
                replayed += len(claim.records)
        if replayed:
            log.info("openrouter_usage: replayed %d spooled record(s)", replayed)
        return replayed

    def retry_quarantined(self) -> tuple[int, int]:
        """Retry every quarantined record (the CLI's `spool --replay`): (stored, still refused).
        A record refused again goes back to quarantine with the new reason."""
        stored = refused = 0
        for path in self.spool.quarantined_files():
            with self.spool.claim(path) as claim:
                if claim is None:
                    continue
                entries = quarantine_entries(path)
                records = [record for record in map(entry_record, entries) if record is not None]
                unreadable = [str(e.get("line", json.dumps(e))) for e in entries if entry_record(e) is None]
                result = self.store(records, None) if records else StoreResult(set(), {}, None)
                if unreadable:
                    self.spool.quarantine_lines(unreadable, "unreadable spool line")
                path.unlink()
                refused += len(result.quarantined) + len(unreadable)
                stored += len(records) - len(result.quarantined)
        return stored, refused

    # ── budget reservations ──
    def admit(self, request: AdmissionRequest) -> BudgetAdmission:
        """Admit one model call against its user's budget, or refuse it, in one transaction that
        excludes every other admission of the same user, in every process: the write lock on
        SQLite (BEGIN IMMEDIATE), a per-user advisory lock on PostgreSQL. So two processes can
        never both admit past the limit."""
        self.ensure_schema()
        with self.engine.connect() as connection, _relaxed_sqlite_commits(connection):
            conn = connection.execution_options(ledger_write=True)
            with conn.begin():
                _budget_lock(conn, request.user_id)
                return admit_in_transaction(conn, request)

    def release_reservations(self, reservation_ids: Sequence[str]) -> None:
        """Drop these reservations (a finished, failed or stopped request holds nothing any more)."""
        if not reservation_ids:
            return
        self.ensure_schema()
        with self._write_transaction() as conn:
            conn.execute(
                reservations_table.delete().where(
                    reservations_table.c.reservation_id.in_(list(reservation_ids))
                )
            )

    # ── reads: never write ──
    @contextlib.contextmanager
    def reading(self) -> Iterator[tuple[sa.Connection, RollupState]]:
        """A read-only view of an up-to-date ledger and its rollup state. Raises NoLedger when
        there is none, LedgerNeedsUpgrade when it is older than this code."""
        path = sqlite_path(self.url)
        if path is not None and not path.exists():
            raise NoLedger(f"no ledger at {self.location} yet")
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table(migrations_table.name):
                raise NoLedger(f"no ledger in {self.location} yet")
            applied = set(conn.execute(sa.select(migrations_table.c.name)).scalars())
            if any(migration.name not in applied for migration in MIGRATIONS):
                raise LedgerNeedsUpgrade(
                    "the ledger was written by an older release; "
                    "it is upgraded at the next recorded completion"
                )
            yield conn, read_rollup_state(conn)

    def message_totals(self, conn: sa.Connection, message_id: str) -> MessageTotals:
        """What every recorded generation of one message adds up to."""
        row = conn.execute(SELECT_MESSAGE_TOTALS, {"message_id": message_id}).one()._mapping
        tokens: dict[str, Any] = {name: int(row[name]) for name in TOKEN_MEASURES}
        usage = Usage(
            **tokens,
            cost_pico=None if row["priced"] == 0 else int(row["cost_pico"]),
            upstream_cost_pico=int(row["upstream_cost_pico"]),
        )
        return MessageTotals(
            int(row["calls"]), usage, int(row["spend_pico"]), int(row["calls"] - row["priced"])
        )

    def chat_spend_pico(self, conn: sa.Connection, message_ids: Sequence[str]) -> int:
        return sum(
            int(conn.execute(SELECT_SPEND_OF_MESSAGES, parameters).scalar_one())
            for parameters in in_list_chunks(message_ids)
        )

    def dispose(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()


_SELECT_USER_TOTALS: Final = sa.select(*_sums(rollup_user_day_table)).where(
    rollup_user_day_table.c.zone == sa.bindparam("zone"),
    rollup_user_day_table.c.user_id == sa.bindparam("user_id"),
    rollup_user_day_table.c.day >= sa.bindparam("first_day"),
    rollup_user_day_table.c.day <= sa.bindparam("last_day"),
)


def user_totals(conn: sa.Connection, zone: str, user_id: str, first_day: str, last_day: str) -> Totals:
    parameters = {"zone": zone, "user_id": user_id, "first_day": first_day, "last_day": last_day}
    return Totals.from_row(conn.execute(_SELECT_USER_TOTALS, parameters).first())


# ── Budget reservations and spend in a window ──
# Admission: spend in the window (rollups, or rows while the rollups are kept in another zone)
# + what the user's other running requests reserve + this call's reservation <= the limit.

RESERVATION_TTL_SECONDS: Final = 900  # a reservation nobody released (a worker died) lapses
ESTIMATE_DAYS: Final = 30
ESTIMATE_SAMPLE: Final = 1000  # the p95 is taken over the user's latest completions on the model
BUDGET_LOCK_NAMESPACE: Final = 0x6F72_7573  # "orus": PostgreSQL advisory locks (namespace, user hash)


@dataclasses.dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """One model call asking to start. `turn_spent_pico` is what this turn's earlier calls cost
    (seen in the stream, not yet in the ledger); `unpriced_calls` are earlier calls whose cost is
    unknown: each counts as one more reservation."""

    reservation_id: str
    user_id: str
    model: str
    limit_pico: int
    window: BudgetWindow
    default_estimate_pico: int
    now: datetime
    turn_spent_pico: int = 0
    unpriced_calls: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetAdmission:
    admitted: bool
    spent_pico: int  # in the window, from the ledger
    held_pico: int  # reserved by the user's other running requests
    amount_pico: int  # this request's reservation


_RESERVATION_UPSERT: Final = sa.text(
    f"INSERT INTO {reservations_table.name} (reservation_id, user_id, amount_pico, expires_at) "
    "VALUES (:reservation_id, :user_id, :amount_pico, :expires_at) "
    "ON CONFLICT (reservation_id) DO UPDATE SET amount_pico = excluded.amount_pico, "
    "expires_at = excluded.expires_at"
).bindparams(sa.bindparam("expires_at", type_=sa.DateTime))
_SELECT_HELD: Final = sa.select(sa.func.coalesce(sa.func.sum(reservations_table.c.amount_pico), 0)).where(
    reservations_table.c.user_id == sa.bindparam("user_id"),
    reservations_table.c.reservation_id != sa.bindparam("reservation_id"),
    reservations_table.c.expires_at > sa.bindparam("now"),
)
_SELECT_EXPIRED: Final = sa.select(sa.func.count()).where(
    reservations_table.c.user_id == sa.bindparam("user_id"),
    reservations_table.c.expires_at <= sa.bindparam("now"),
)
_DELETE_EXPIRED: Final = reservations_table.delete().where(
    reservations_table.c.user_id == sa.bindparam("user_id"),
    reservations_table.c.expires_at <= sa.bindparam("now"),
)
_RECENT_SPENDS: Final = (
    sa.select(ledger_table.c.spend_pico)
    .where(
        ledger_table.c.user_id == sa.bindparam("user_id"),
        ledger_table.c.model == sa.bindparam("model"),
        ledger_table.c.created_at >= sa.bindparam("since"),
    )
    .order_by(ledger_table.c.created_at.desc())
    .limit(ESTIMATE_SAMPLE)
    .cte("recent")
)
# The nearest-rank p95 of n spends: rank ceil(0.95 n) from the cheapest, which is floor(0.05 n)
# places after the dearest. Dearest first with LIMIT 1 OFFSET, the database keeps only the top 5%
# while it sorts, where ranking every row needs a full sort; the offset is integer arithmetic on
# both engines (no float rounding). NULL: no history.
_SELECT_ESTIMATE: Final = (
    sa.select(_RECENT_SPENDS.c.spend_pico)
    .order_by(_RECENT_SPENDS.c.spend_pico.desc())
    .limit(1)
    .offset(sa.select(sa.func.count() * 5 // 100).select_from(_RECENT_SPENDS).scalar_subquery())
)
# The window's days are read from rollup_day (a row for each day with a completion in the zone)
# rather than bound one by one: still one key lookup per day whatever the number of users, but two
# bound days, not up to 31 expanded at every execution. A day range straight on rollup_user_day
# would read every user's row of every day.
_SELECT_WINDOW_ROLLUP_SPEND: Final = sa.select(
    sa.func.coalesce(sa.func.sum(rollup_user_day_table.c.spend_pico), 0)
).where(
    rollup_user_day_table.c.zone == sa.bindparam("zone"),
    rollup_user_day_table.c.user_id == sa.bindparam("user_id"),
    rollup_user_day_table.c.day.in_(
        sa.select(rollup_day_table.c.day).where(
            rollup_day_table.c.zone == sa.bindparam("zone"),
            rollup_day_table.c.day >= sa.bindparam("first_day"),
            rollup_day_table.c.day <= sa.bindparam("last_day"),
        )
    ),
)
_SELECT_WINDOW_ROW_SPEND: Final = sa.select(
    sa.func.coalesce(sa.func.sum(ledger_table.c.spend_pico), 0)
).where(ledger_table.c.user_id == sa.bindparam("user_id"), ledger_table.c.created_at >= sa.bindparam("since"))


# One round trip for everything admission reads: the zone the rollups are kept in, the spend in
# the window by those rollups (used when the zones agree), what is held, how many of the user's
# reservations lapsed (deleted only when there are some), and the estimate.
_SELECT_ADMISSION_FIGURES: Final = sa.select(
    sa.select(meta_table.c.value).where(meta_table.c.key == ROLLUP_ZONE_KEY).scalar_subquery(),
    _SELECT_WINDOW_ROLLUP_SPEND.scalar_subquery(),
    _SELECT_HELD.scalar_subquery(),
    _SELECT_EXPIRED.scalar_subquery(),
    _SELECT_ESTIMATE.scalar_subquery(),
)


@contextlib.contextmanager
def _relaxed_sqlite_commits(connection: sa.Connection) -> Iterator[None]:
    """On SQLite, commits without fsync (synchronous=NORMAL: in WAL mode still atomic and
    consistent) for the duration, then back to FULL before the connection returns to the pool:
    a reservation lost in a power cut only lapses early, and the fsync would be most of an
    admission's time."""
    raw = connection.connection.dbapi_connection if connection.dialect.name == "sqlite" else None
    if raw is None:
        yield
        return
    raw.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        raw.execute("PRAGMA synchronous=FULL")


_BUDGET_LOCK: Final = sa.text(
    # set_config(..., true) is SET LOCAL: a reservation lost in a crash only lapses early, so its
    # commit need not wait for the disk. One statement with the lock: one round trip, not two.
    "SELECT set_config('synchronous_commit', 'off', true), "
    "pg_advisory_xact_lock(:namespace, hashtext(:user_id))"
)


def _budget_lock(conn: sa.Connection, user_id: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(_BUDGET_LOCK, {"namespace": BUDGET_LOCK_NAMESPACE, "user_id": user_id})


def window_spend_pico(conn: sa.Connection, state: RollupState, user_id: str, window: BudgetWindow) -> int:
    """The user's spend in the window: from the daily rollups when they are kept in the window's
    zone, else from the ledger rows since the window's first moment."""
    if state.zone == window.zone.key:
        by_day = {
            "zone": state.zone,
            "first_day": window.first_day.isoformat(),
            "last_day": window.last_day.isoformat(),
            "user_id": user_id,
        }
        return int(conn.execute(_SELECT_WINDOW_ROLLUP_SPEND, by_day).scalar_one())
    by_row = {"user_id": user_id, "since": window.starts_at}
    return int(conn.execute(_SELECT_WINDOW_ROW_SPEND, by_row).scalar_one())


def admit_in_transaction(conn: sa.Connection, request: AdmissionRequest) -> BudgetAdmission:
    """The admission rule, inside the caller's exclusive transaction (see Ledger.admit). The
    estimate is the user's 95th-percentile spend on the model over the last ESTIMATE_DAYS (nearest
    rank, over the latest ESTIMATE_SAMPLE completions), or the default without history."""
    now = _naive_utc(request.now)
    window = request.window
    kept_zone, rollup_spent, held, expired, estimate = conn.execute(
        _SELECT_ADMISSION_FIGURES,
        {
            "zone": window.zone.key,
            "first_day": window.first_day.isoformat(),
            "last_day": window.last_day.isoformat(),
            "user_id": request.user_id,
            "reservation_id": request.reservation_id,
            "now": now,
            "model": request.model,
            "since": now - timedelta(days=ESTIMATE_DAYS),
        },
    ).one()
    if expired:
        conn.execute(_DELETE_EXPIRED, {"user_id": request.user_id, "now": now})
    spent = (
        int(rollup_spent)
        if kept_zone == window.zone.key
        else window_spend_pico(conn, RollupState(kept_zone), request.user_id, window)
    )
    held = int(held)
    estimate = request.default_estimate_pico if estimate is None else int(estimate)
    # At least one pico: a budget that is exactly used up admits nothing, even a free model.
    amount = max(1, request.turn_spent_pico + (request.unpriced_calls + 1) * estimate)
    admitted = spent + held + amount <= request.limit_pico
    if admitted:
        conn.execute(
            _RESERVATION_UPSERT,
            {
                "reservation_id": request.reservation_id,
                "user_id": request.user_id,
                "amount_pico": amount,
                "expires_at": now + timedelta(seconds=RESERVATION_TTL_SECONDS),
            },
        )
    else:
        conn.execute(
            reservations_table.delete().where(reservations_table.c.reservation_id == request.reservation_id)
        )
    return BudgetAdmission(admitted, spent, held, amount)


def user_window_spend(ledger: Ledger, user_id: str, window: BudgetWindow) -> int:
    """A read of the user's spend in the window (never writes)."""
    with ledger.reading() as (conn, state):
        return window_spend_pico(conn, state, user_id, window)


def _utcnow_naive() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


# ── Writer ──

MAX_BATCH: Final = 256
WRITER_IDLE_SECONDS: Final = 30.0  # the thread ends after this long without work
IDLE_CHECK_SECONDS: Final = 1.0  # how often a waiting writer checks whether it may end
OUTLET_WAIT_SECONDS: Final = 10.0  # an outlet waits this long for the writer, then spools itself
SPOOL_WAIT_SECONDS: Final = 5.0
REPLAY_INTERVAL_SECONDS: Final = 5.0  # while the database fails, replay is tried this often
REPLAY_BUDGET_SECONDS: Final = 0.5  # replay work per turn of the writer, between batches


@dataclasses.dataclass(frozen=True, slots=True)
class WriteRequest:
    """The records of one request (a generation each, one message) to commit, and what the usage
    line wants to know once they are committed.

    `render_line`, when given, renders the usage line from the records, their message's totals
    (every generation recorded so far), the chat's spend (these records included) and the user's
    spend today; the writer runs it after the commit."""

    records: tuple[UsageRecord, ...]
    zone: ZoneInfo
    chat_message_ids: tuple[str, ...] = ()
    want_user_today: bool = False
    render_line: Callable[[Sequence[UsageRecord], MessageTotals, int | None, int | None], str] | None = None

    @property
    def message_id(self) -> str:
        return self.records[0].message_id


# A write whose request is built on the writer thread (parsing an outlet body costs the event loop
# more than handing it over); None means "nothing to record".
DeferredRequest = Callable[[], WriteRequest | None]

# "skipped": a deferred request that built nothing to record.
Stored = Literal["recorded", "duplicate", "spooled", "quarantined", "skipped"]


@dataclasses.dataclass(frozen=True, slots=True)
class WriteOutcome:
    """Where a record went. "recorded" and "spooled" are both durable: a spooled record is
    replayed later. "quarantined": the database refused it; it waits in the quarantine folder."""

    stored: Stored
    chat_spend_pico: int | None = None
    user_today: Totals | None = None
    usage_line: str = ""


class RecordNotDurable(Exception):
    """The record could neither be committed nor spooled (both the database and the disk failed)."""


class WriterTimedOut(Exception):
    """The writer did not answer an outlet within OUTLET_WAIT_SECONDS."""


class LoopReply:
    """An outlet waiting on its event loop for a write's outcome."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[WriteOutcome]) -> None:
        self.loop = loop
        self.future = future


# Outlets wait on their event loop; the CLI, tests and benchmarks on a concurrent Future.
Reply = concurrent.futures.Future[WriteOutcome] | LoopReply
Pending = tuple[WriteRequest, Reply]
Queued = tuple[WriteRequest | DeferredRequest, Reply]
Answer = tuple[Reply, WriteOutcome | BaseException]
Settlement = tuple[asyncio.Future[WriteOutcome], WriteOutcome | BaseException]


def answer_all(replies: Iterable[Answer]) -> None:
    """Settle every waiter (from the writer thread). The outlets of one event loop are woken with
    one call: a wake-up costs the loop a self-pipe read, and a batch under load holds dozens of
    outlets of the same loop. A waiter that gave up is skipped. Never raises."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Settlement]] = {}
    for reply, outcome in replies:
        if isinstance(reply, LoopReply):
            by_loop.setdefault(reply.loop, []).append((reply.future, outcome))
            continue
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if reply.done():  # cancelled
                continue
            if isinstance(outcome, BaseException):
                reply.set_exception(outcome)
            else:
                reply.set_result(outcome)
    for loop, settlements in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, settlements)


def _settle(settlements: list[Settlement]) -> None:
    for future, outcome in settlements:
        if future.done():  # timed out or cancelled
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _time_out(future: asyncio.Future[WriteOutcome]) -> None:
    if not future.done():
        future.set_exception(WriterTimedOut())


def _answered(reply: Reply) -> bool:
    return reply.future.done() if isinstance(reply, LoopReply) else reply.done()


def _records_json(records: Iterable[UsageRecord]) -> str:
    """Records as a log line an admin can replay by hand (no message content: only usage)."""
    try:
        return json.dumps([record.to_json() for record in records], default=str)
    except Exception as exc:
        return f"(could not be serialised: {short_error(exc)})"


class GroupCommitWriter:
    """Commits records off the event loop: it drains what is queued, commits it in one
    transaction, and answers each request, so concurrent outlets share one fsync.

    Supervised: an exception anywhere in its loop spools the batch in hand, answers its waiters and
    runs the loop again; a thread that died anyway is started again by the next request. Between
    batches it keeps the ledger: replaying the spool (REPLAY_BUDGET_SECONDS a turn, and while the
    database fails at most once per REPLAY_INTERVAL_SECONDS) and recounting rollups after a time
    zone change (a chunk a turn). The thread ends when idle, so a reloaded plugin leaves none.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._queue: queue.SimpleQueue[Queued] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._in_hand: list[Pending] = []
        self._spool_waiting = True  # unknown at start: look once
        self._next_replay = 0.0
        self._recount_due = False
        self._last_batch_at = time.monotonic()

    async def write(self, request: WriteRequest | DeferredRequest) -> WriteOutcome:
        """Commit `request` and return once it is durable; the event loop only waits, and for at
        most OUTLET_WAIT_SECONDS: then the record is spooled from here (a later commit of the same
        message by the writer is a duplicate, never a second count)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[WriteOutcome] = loop.create_future()
        self._enqueue(request, LoopReply(loop, future))
        timer = loop.call_later(OUTLET_WAIT_SECONDS, _time_out, future)
        try:
            with contextlib.suppress(WriterTimedOut):
                return await future
        finally:
            timer.cancel()
        built = request if isinstance(request, WriteRequest) else request()
        if built is None:
            return WriteOutcome("skipped")
        log.error(
            "openrouter_usage: the ledger writer did not answer within %.0f s; spooling %s",
            OUTLET_WAIT_SECONDS,
            built.message_id,
        )
        try:
            await asyncio.wait_for(
                asyncio.to_thread(self.ledger.spool.append, list(built.records)), SPOOL_WAIT_SECONDS
            )
        except Exception as exc:
            raise RecordNotDurable(f"could not spool {built.message_id}: {short_error(exc)}") from exc
        return WriteOutcome("spooled")

    def submit(self, request: WriteRequest) -> concurrent.futures.Future[WriteOutcome]:
        """The same for callers outside an event loop (the CLI, tests, benchmarks), unbounded."""
        future: concurrent.futures.Future[WriteOutcome] = concurrent.futures.Future()
        self._enqueue(request, future)
        return future

    def _enqueue(self, request: WriteRequest | DeferredRequest, reply: Reply) -> None:
        self._queue.put((request, reply))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="openrouter_usage_writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                if not self._turn():
                    return
            except BaseException as exc:  # SystemExit too: nothing but idleness ends this loop
                log.exception("openrouter_usage: the ledger writer failed; restarting it")
                self._rescue(exc)

    def _turn(self) -> bool:
        """One batch (if any is queued) and one piece of upkeep; False when the thread should end."""
        wait = self._seconds_to_upkeep()
        try:
            first = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            first = None
            if self._may_end() and self._end_if_idle():
                return False
        if first is not None:
            self._last_batch_at = time.monotonic()
            drained = [first]
            while len(drained) < MAX_BATCH:
                try:
                    drained.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            early = self._build(drained)
            if self._in_hand:
                self._commit(self._in_hand, early)
            else:
                answer_all(early)
            self._in_hand = []
        self._upkeep()
        return True

    def _build(self, drained: list[Queued]) -> list[Answer]:
        """Builds the deferred requests into `_in_hand`; returns the answers they already have
        (nothing to record, or a build that failed: that outlet logs it, the others go on)."""
        early: list[Answer] = []
        for request, reply in drained:
            if isinstance(request, WriteRequest):
                self._in_hand.append((request, reply))
                continue
            try:
                built = request()
            except Exception as exc:
                early.append((reply, exc))
                continue
            if built is None:
                early.append((reply, WriteOutcome("skipped")))
            else:
                self._in_hand.append((built, reply))
        return early

    def _end_if_idle(self) -> bool:
        """End the thread if nothing is queued, closing the ledger's connections: an idle (or
        superseded) plugin keeps no thread, no connection and no open file. A superseded one also
        leaves its spool to the newer copy, which replays it."""
        with self._lock:
            if not self._queue.empty():
                return False
            self._thread = None
            self.ledger.dispose()
            return True

    def release_if_idle(self) -> None:
        """After a read: close the ledger's connections unless the writer is at work (it closes
        them when it goes idle)."""
        with self._lock:
            if self._thread is None:
                self.ledger.dispose()

    def _seconds_to_upkeep(self) -> float:
        if self._recount_due:
            return 0.0
        if self._spool_waiting:
            return min(IDLE_CHECK_SECONDS, max(0.0, self._next_replay - time.monotonic()))
        return IDLE_CHECK_SECONDS

    def _may_end(self) -> bool:
        """A superseded copy ends at once (the newer copy takes over its spool and recount); the
        current one after WRITER_IDLE_SECONDS without work and with nothing left to keep."""
        if superseded():
            return True
        idle = time.monotonic() - self._last_batch_at >= WRITER_IDLE_SECONDS
        return idle and not self._spool_waiting and not self._recount_due

    def _commit(self, batch: list[Pending], early: list[Answer]) -> None:
        """Commits `batch` and answers it, with the `early` answers, in one wake-up per loop."""
        records = [record for request, _ in batch for record in request.records]
        try:
            result = self.ledger.store(records, batch[-1][0].zone)
        except Exception as exc:
            self._spool(batch, exc, early)
            return
        self._recount_due = self._recount_due or result.recounting
        outcomes = self._outcomes(batch, result)
        answer_all([*early, *((reply, outcome) for (_, reply), outcome in zip(batch, outcomes, strict=True))])

    def _spool(
        self,
        batch: list[Pending],
        exc: BaseException,
        early: Sequence[Answer] = (),
    ) -> None:
        log.error(
            "openrouter_usage: ledger %s unavailable (%s); spooling %d record(s) for replay",
            self.ledger.location,
            short_error(exc),
            len(batch),
        )
        try:
            self.ledger.spool.append([record for request, _ in batch for record in request.records])
        except Exception as spool_exc:
            log.critical(
                "openrouter_usage: could not spool either (%s); %d record(s) not durable, kept here: %s",
                short_error(spool_exc),
                len(batch),
                _records_json(record for request, _ in batch for record in request.records),
            )
            answer_all([*early, *((reply, RecordNotDurable(short_error(spool_exc))) for _, reply in batch)])
            return
        self._spool_waiting = True
        self._next_replay = time.monotonic() + REPLAY_INTERVAL_SECONDS
        answer_all([*early, *((reply, WriteOutcome("spooled")) for _, reply in batch)])

    def _rescue(self, exc: BaseException) -> None:
        """After a failure in the loop: whatever was in hand and unanswered is spooled (a record
        that was in fact committed replays as a duplicate)."""
        unanswered = [pending for pending in self._in_hand if not _answered(pending[1])]
        self._in_hand = []
        if unanswered:
            with contextlib.suppress(BaseException):
                self._spool(unanswered, exc)
            # If even that failed (a waiter answered twice keeps the first answer):
            answer_all((reply, RecordNotDurable(short_error(exc))) for _, reply in unanswered)

    def _upkeep(self) -> None:
        if self._spool_waiting and time.monotonic() >= self._next_replay:
            try:
                replayed = self.ledger.replay_spool(REPLAY_BUDGET_SECONDS)
                self._spool_waiting = self.ledger.spool.pending_count() > 0
                self._next_replay = time.monotonic() + (0.0 if replayed else REPLAY_INTERVAL_SECONDS)
            except Exception as exc:
                log.warning(
                    "openrouter_usage: spool replay failed (%s); next try in %.0f s",
                    short_error(exc),
                    REPLAY_INTERVAL_SECONDS,
                )
                self._next_replay = time.monotonic() + REPLAY_INTERVAL_SECONDS
        if self._recount_due:
            try:
                self._recount_due = self.ledger.recount_step()
            except Exception as exc:
                log.warning("openrouter_usage: rollup recount paused (%s)", short_error(exc))
                self._recount_due = False  # the next write that sees the recount resumes it

    def _outcomes(self, batch: list[Pending], result: StoreResult) -> list[WriteOutcome]:
        """Per request: "recorded" when one of its generations is new, "quarantined" when none is
        and one was refused, else "duplicate" (a repeated outlet, a replay)."""
        seen: set[str] = set()
        kinds: list[Stored] = []
        for request, _ in batch:
            keys = [record.ledger_key for record in request.records]
            if any(key in result.inserted and key not in seen for key in keys):
                kinds.append("recorded")
            elif any(key in result.quarantined for key in keys):
                kinds.append("quarantined")
            else:
                kinds.append("duplicate")
                log.info(
                    "openrouter_usage: message %s: generation(s) already recorded; not counted again",
                    request.message_id,
                )
            seen.update(keys)
        figures = self._line_figures(batch, kinds, result.rollup_zone)
        return [
            WriteOutcome(
                kind, chat, today, _usage_line(request, message, chat, today) if kind == "recorded" else ""
            )
            for (request, _), kind, (message, chat, today) in zip(batch, kinds, figures, strict=True)
        ]

    def _line_figures(
        self, batch: list[Pending], kinds: list[Stored], zone: str | None
    ) -> list[tuple[MessageTotals, int | None, Totals | None]]:
        """For each newly recorded request whose usage line wants them: its message's totals
        (every generation recorded so far), the chat's spend (these records included) and the
        user's totals today. On failure, or when not wanted: the request's own records' totals,
        None and None."""
        own: list[tuple[MessageTotals, int | None, Totals | None]] = [
            (MessageTotals.of(request.records), None, None) for request, _ in batch
        ]
        wanted = [
            kind == "recorded" and request.render_line is not None
            for (request, _), kind in zip(batch, kinds, strict=True)
        ]
        if not any(wanted):
            return own
        try:
            with self.ledger.engine.connect() as conn:
                today = local_day(datetime.now(UTC), ZoneInfo(zone)) if zone else ""
                return [
                    (
                        self.ledger.message_totals(conn, request.message_id),
                        _chat_spend(self.ledger, conn, request) if request.chat_message_ids else None,
                        user_totals(conn, zone, request.records[0].user_id, today, today)
                        if zone and request.want_user_today
                        else None,
                    )
                    if want
                    else fallback
                    for (request, _), want, fallback in zip(batch, wanted, own, strict=True)
                ]
        except Exception as exc:
            log.warning("openrouter_usage: totals for the usage line unavailable (%s)", short_error(exc))
            return own


def _chat_spend(ledger: Ledger, conn: sa.Connection, request: WriteRequest) -> int:
    """The chat's spend so far, these records included even when the body did not list them."""
    spend = ledger.chat_spend_pico(conn, request.chat_message_ids)
    if request.message_id not in request.chat_message_ids:
        spend += sum(record.usage.spend_pico for record in request.records)
    return spend


def _usage_line(
    request: WriteRequest, message: MessageTotals, chat_spend_pico: int | None, today: Totals | None
) -> str:
    """The request's usage line ("" when it wants none or cannot be rendered: the record stands)."""
    if request.render_line is None:
        return ""
    try:
        return request.render_line(
            request.records, message, chat_spend_pico, today.spend_pico if today else None
        )
    except Exception as exc:
        log.warning(
            "openrouter_usage: the usage line of %s could not be rendered (%s)",
            request.message_id,
            short_error(exc),
        )
        return ""


# ── Registry ──

_LEDGERS: OrderedDict[str, GroupCommitWriter] = OrderedDict()
_LEDGERS_LOCK = threading.Lock()
_MAX_OPEN_LEDGERS: Final = 4


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


# ══ Reconciliation with OpenRouter's bill ═════════════════════════════════════════════════════════
# OpenRouter lists no past generations, but it answers GET /generation?id= for any id, with any
# key. So every ledger row with OpenRouter generation ids is looked up, one id at a time, once
# OpenRouter has the record; its bill is stored beside our own figures (never over them) with a
# status. Stopped generations, recorded without a cost, are priced from that bill. One process at a
# time reconciles a ledger (a lease row); the work resumes after a restart from the pending rows.

OPENROUTER_API_BASE: Final = "https://openrouter.ai/api/v1"
API_KEY_ENV: Final = "OPENROUTER_API_KEY"
FIRST_LOOKUP_DELAY_SECONDS: Final = 5.0  # OpenRouter answers 404 for a while after a completion
FIRST_BACKOFF_SECONDS: Final = 5.0  # then doubling, up to BACKOFF_CAP_SECONDS
BACKOFF_CAP_SECONDS: Final = 900.0
GIVE_UP_ATTEMPTS: Final = 12  # 5 s doubling to 15 min: about an hour of backoff
LOOKUP_TIMEOUT_SECONDS: Final = 10.0
RETRY_AFTER_CAP_SECONDS: Final = 300.0
RATE_LIMITED_TRIES: Final = 3  # 429s in a row for one id before its row waits for a later pass
LEASE_SECONDS: Final = 30.0  # longer than any one lookup (LOOKUP_TIMEOUT_SECONDS), renewed before each
RECONCILE_BATCH: Final = 50
KEY_POLL_SECONDS: Final = 300.0  # how often /key's daily spend is sampled while reconciling
KEY_DAYS_KEPT: Final = 7
DEFAULT_LOOKUPS_PER_SECOND: Final = 5.0
RECONCILE_LEASE: Final = "reconcile"
RECONCILE_STATE_KEY: Final = "reconcile_state"  # meta: the last rejection and error counts
KEY_DAY_PREFIX: Final = "openrouter_key_day:"  # meta, per UTC day: /key's daily figures
KEY_LIMIT_KEY: Final = "openrouter_key_limit"  # meta: the key's limit, remaining and reset

ReconcileStatus = Literal["pending", "matched", "differs", "not_found", "no_id", "failed"]


def is_openrouter_generation_id(generation_id: str) -> bool:
    return generation_id.startswith("gen-")


@dataclasses.dataclass(frozen=True, slots=True)
class BilledGeneration:
    """OpenRouter's record of one generation (GET /generation), money in pico-dollars."""

    total_cost_pico: int
    upstream_cost_pico: int | None
    is_byok: bool
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    provider: str
    cancelled: bool

    @property
    def billed_pico(self) -> int:
        """What the generation cost the account: `total_cost`, plus the provider's charge for BYOK."""
        return self.total_cost_pico + ((self.upstream_cost_pico or 0) if self.is_byok else 0)


def parse_generation(data: Any) -> BilledGeneration | None:
    """OpenRouter's generation record, or None when it is not one (no usable `total_cost`)."""
    if not isinstance(data, Mapping):
        return None
    notes: list[str] = []
    total = money_pico(data, "total_cost", notes=notes)
    if total is None:
        return None
    return BilledGeneration(
        total_cost_pico=total,
        upstream_cost_pico=money_pico(data, "upstream_inference_cost", notes=notes),
        is_byok=data.get("is_byok") is True,
        prompt_tokens=token_count(data, "native_tokens_prompt", "tokens_prompt", notes=notes) or 0,
        completion_tokens=token_count(data, "native_tokens_completion", "tokens_completion", notes=notes)
        or 0,
        reasoning_tokens=token_count(data, "native_tokens_reasoning", notes=notes) or 0,
        cached_tokens=token_count(data, "native_tokens_cached", notes=notes) or 0,
        provider=clean_text(data.get("provider_name") or ""),
        cancelled=data.get("cancelled") is True,
    )


LookupOutcome = Literal["found", "not_ready", "slow_down", "rejected", "error"]


@dataclasses.dataclass(frozen=True, slots=True)
class Lookup:
    """One answer from OpenRouter: the record (`found`), 404 (`not_ready`), 429 with its
    Retry-After (`slow_down`), 401/403 (`rejected`), or anything else (`error`, with a reason that
    names the kind: an HTTP status, "timeout", "malformed JSON"; never the key or a URL)."""

    outcome: LookupOutcome
    data: Mapping[str, Any] | None = None
    retry_after: float = 0.0
    reason: str = ""


def retry_after_seconds(value: str | None, now: float) -> float:
    """Retry-After as seconds (a number or an HTTP date), capped; 10 s when absent or unreadable."""
    if value:
        with contextlib.suppress(ValueError):
            return min(max(float(value), 0.0), RETRY_AFTER_CAP_SECONDS)
        with contextlib.suppress(TypeError, ValueError, IndexError):
            moment = email.utils.parsedate_to_datetime(value)
            return min(max(moment.timestamp() - now, 0.0), RETRY_AFTER_CAP_SECONDS)
    return 10.0


class OpenRouterAccount:
    """The two read-only OpenRouter endpoints reconciliation uses, through one httpx client with a
    timeout on every request. The key goes in the Authorization header only."""

    def __init__(
        self, api_key: str, base_url: str = OPENROUTER_API_BASE, client: httpx.Client | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._client = client or httpx.Client(timeout=LOOKUP_TIMEOUT_SECONDS, follow_redirects=False)

    def generation(self, generation_id: str) -> Lookup:
        return self._get("/generation", {"id": generation_id})

    def key(self) -> Lookup:
        return self._get("/key", {})

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self._api_key)

    def close(self) -> None:
        self._client.close()

    def _get(self, path: str, params: Mapping[str, str]) -> Lookup:  # noqa: PLR0911 - one per kind of answer
        try:
            response = self._client.get(
                self.base_url + path,
                params=params,
                headers={"Authorization": f"Bearer {self._api_key}", "X-Title": "openrouter-usage"},
            )
        except httpx.TimeoutException:
            return Lookup("error", reason="timeout")
        except httpx.HTTPError as exc:
            return Lookup("error", reason=f"connection failed ({type(exc).__name__})")
        status = response.status_code
        if status == HTTPStatus.NOT_FOUND:
            return Lookup("not_ready")
        if status == HTTPStatus.TOO_MANY_REQUESTS:
            return Lookup(
                "slow_down", retry_after=retry_after_seconds(response.headers.get("retry-after"), time.time())
            )
        if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
            return Lookup("rejected", reason=f"HTTP {status}")
        if status != HTTPStatus.OK:
            return Lookup("error", reason=f"HTTP {status}")
        try:  # money stays exact: JSON numbers are read as Decimal, never float
            data = json.loads(response.content, parse_float=Decimal).get("data")
        except (ValueError, AttributeError):
            return Lookup("error", reason="malformed JSON")
        if not isinstance(data, Mapping):
            return Lookup("error", reason="malformed JSON")
        return Lookup("found", data)


@dataclasses.dataclass(slots=True)
class ReconcileSummary:
    """What one reconciliation pass did."""

    looked_up: int = 0
    matched: int = 0
    differs: int = 0
    difference_pico: int = 0  # OpenRouter's bill minus our spend, over the rows that differ
    priced_stopped: int = 0
    not_found: int = 0
    failed: int = 0
    no_id: int = 0
    waiting: int = 0  # rows still pending after the pass
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    rejected: str = ""  # the key was rejected: the HTTP status
    busy: str = ""  # another process holds the lease

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


def backoff_seconds(attempts: int) -> float:
    return min(FIRST_BACKOFF_SECONDS * 2.0 ** max(attempts - 1, 0), BACKOFF_CAP_SECONDS)


def key_fingerprint(api_key: str) -> str:
    """Tells keys apart (a rejection is kept until the key changes) without storing the key."""
    return hashlib.sha256(("openrouter-usage:" + api_key).encode()).hexdigest()[:12]


_RECONCILE_COLUMNS: Final = [
    ledger_table.c[name]
    for name in (
        "id",
        "created_at",
        "user_id",
        "served_model",
        "provider",
        "status",
        "generation_ids",
        "billed_json",
        "reconcile_attempts",
        "is_byok",
        *MEASURES[2:],
    )
]
_NOT_MATCHED: Final = ledger_table.c.reconcile_status != "matched"  # the partial index's condition
_PENDING: Final = sa.and_(_NOT_MATCHED, ledger_table.c.reconcile_status == "pending")


def rollup_difference(
    before: Mapping[str, Any], after: Mapping[str, Any], zone: ZoneInfo
) -> list[dict[RollupKey, list[int]]]:
    """What changing one ledger row from `before` to `after` adds to each rollup (same keys)."""
    added, removed = rollup_increments([after], zone), rollup_increments([before], zone)
    return [
        {key: list(map(operator.sub, sums, removed_sums[key])) for key, sums in added_sums.items()}
        for added_sums, removed_sums in zip(added, removed, strict=True)
    ]


class Reconciler:
    """Checks pending ledger rows against OpenRouter's records. `clock` (epoch seconds) and `sleep`
    are injectable, so tests control time; lookups are paced to `lookups_per_second`."""

    def __init__(  # noqa: PLR0913 - the collaborators, each injectable for tests
        self,
        ledger: Ledger,
        account: OpenRouterAccount,
        *,
        lookups_per_second: float = DEFAULT_LOOKUPS_PER_SECOND,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        holder: str = "",
    ) -> None:
        self.ledger = ledger
        self.account = account
        self.interval = (
            1.0 / lookups_per_second if lookups_per_second > 0 else 1.0 / DEFAULT_LOOKUPS_PER_SECOND
        )
        self.clock = clock
        self.sleep = sleep
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._next_request_at = 0.0
        self._next_key_poll = 0.0

    # ── one pass ──
    def run_pass(self, *, since: datetime | None = None, due_only: bool = True) -> ReconcileSummary:
        """Look up every pending row that is due (or, with `due_only` off, every pending row created
        since `since`), once, under the lease. Never raises for OpenRouter's answers."""
        summary = ReconcileSummary()
        holder = self._hold_lease()
        if holder != self.holder:
            summary.busy = holder
            return summary
        try:
            self._poll_key(summary)
            last_id = 0
            while not summary.rejected:
                rows = self._candidates(since, due_only=due_only, after_id=last_id)
                for row in rows:
                    if summary.rejected or self._hold_lease() != self.holder:
                        break
                    self._check_row(row, summary)
                if len(rows) < RECONCILE_BATCH or summary.rejected:
                    break
                last_id = int(rows[-1]["id"])
            with self.ledger.writing() as conn:
                save_reconcile_state(conn, summary, self.account.fingerprint, self.clock())
                summary.waiting = int(conn.execute(sa.select(sa.func.count()).where(_PENDING)).scalar_one())
        finally:
            self._release_lease()
        return summary

    def next_due(self) -> float | None:
        """When the next pending row is due (epoch seconds), or None when nothing is pending."""
        self.ledger.ensure_schema()
        with self.ledger.engine.connect() as conn:  # a read: no write lock
            return next_reconcile_due(conn)

    # ── the lease ──
    def _hold_lease(self) -> str:
        now = _naive_from_epoch(self.clock())
        with self.ledger.writing() as conn:
            return hold_lease(conn, RECONCILE_LEASE, self.holder, now, LEASE_SECONDS)

    def _release_lease(self) -> None:
        with contextlib.suppress(Exception), self.ledger.writing() as conn:
            conn.execute(
                leases_table.delete().where(
                    leases_table.c.name == RECONCILE_LEASE, leases_table.c.holder == self.holder
                )
            )

    # ── rows ──
    def _candidates(
        self, since: datetime | None, *, due_only: bool, after_id: int
    ) -> list[Mapping[str, Any]]:
        now = _naive_from_epoch(self.clock())
        condition = [_PENDING, ledger_table.c.id > after_id]
        if due_only:
            condition.append(ledger_table.c.created_at <= now - timedelta(seconds=FIRST_LOOKUP_DELAY_SECONDS))
            condition.append(
                sa.or_(ledger_table.c.reconcile_after.is_(None), ledger_table.c.reconcile_after <= now)
            )
        if since is not None:
            condition.append(ledger_table.c.created_at >= _naive_utc(since))
        query = (
            sa.select(*_RECONCILE_COLUMNS)
            .where(*condition)
            .order_by(ledger_table.c.id)
            .limit(RECONCILE_BATCH)
        )
        with self.ledger.engine.connect() as conn:  # a read (the lease's write made the schema current)
            return [dict(row._mapping) for row in conn.execute(query)]

    def _check_row(self, row: Mapping[str, Any], summary: ReconcileSummary) -> None:
        ids = [gid for gid in json.loads(row["generation_ids"] or "[]") if is_openrouter_generation_id(gid)]
        if not ids:
            self._settle(row, {"reconcile_status": "no_id"})
            summary.no_id += 1
            return
        found: dict[str, Any] = json.loads(row["billed_json"] or "{}")
        for generation_id in ids:
            if generation_id in found:  # found in an earlier pass: never looked up twice
                continue
            lookup = self._lookup(generation_id, summary)
            if lookup.outcome == "found":
                generation = parse_generation(lookup.data)
                if generation is None:
                    lookup = Lookup("error", reason="malformed JSON")
                else:
                    found[generation_id] = dataclasses.asdict(generation)
                    continue
            if lookup.outcome == "rejected":
                summary.rejected = lookup.reason
            elif lookup.outcome == "slow_down":
                self._settle(row, {"billed_json": json.dumps(found)})  # keep what was found; retry later
            else:
                self._retry_later(row, found, lookup, summary)
            return
        self._conclude(row, {gid: BilledGeneration(**found[gid]) for gid in ids}, summary)

    def _lookup(self, generation_id: str, summary: ReconcileSummary) -> Lookup:
        for _ in range(RATE_LIMITED_TRIES):
            self._pace()
            lookup = self.account.generation(generation_id)
            summary.looked_up += 1
            if lookup.outcome != "slow_down":
                if lookup.outcome == "error":
                    summary.count_error(lookup.reason)
                return lookup
            summary.count_error("HTTP 429")
            self._next_request_at = self.clock() + lookup.retry_after
        return Lookup("slow_down")

    def _pace(self) -> None:
        wait = self._next_request_at - self.clock()
        if wait > 0:
            self.sleep(wait)
        self._next_request_at = max(self.clock(), self._next_request_at) + self.interval

    def _retry_later(
        self, row: Mapping[str, Any], found: Mapping[str, Any], lookup: Lookup, summary: ReconcileSummary
    ) -> None:
        attempts = int(row["reconcile_attempts"] or 0) + 1
        now = self.clock()
        values: dict[str, Any] = {
            "billed_json": json.dumps(found),
            "reconcile_attempts": attempts,
            "reconciled_at": _naive_from_epoch(now),
            "reconcile_error": "" if lookup.outcome == "not_ready" else lookup.reason,
            "reconcile_after": _naive_from_epoch(now + backoff_seconds(attempts)),
        }
        if attempts >= GIVE_UP_ATTEMPTS:
            if lookup.outcome == "not_ready":
                values["reconcile_status"] = "not_found"
                summary.not_found += 1
            else:
                values["reconcile_status"] = "failed"
                summary.failed += 1
        self._settle(row, values)

    def _conclude(
        self, row: Mapping[str, Any], billed: Mapping[str, BilledGeneration], summary: ReconcileSummary
    ) -> None:
        total = sum(generation.billed_pico for generation in billed.values())
        values: dict[str, Any] = {
            "billed_pico": total,
            "billed_json": json.dumps({gid: dataclasses.asdict(g) for gid, g in billed.items()}),
            "reconciled_at": _naive_from_epoch(self.clock()),
            "reconcile_error": "",
            "reconcile_after": None,
        }
        priced = None
        if row["status"] == "stopped" and row["cost_pico"] is None:
            priced = priced_from_bill(row, billed.values())
            values |= {name: priced[name] for name in (*TOKEN_MEASURES, *MONEY_MEASURES)} | {
                "is_byok": priced["is_byok"]
            }
            summary.priced_stopped += 1
        status: ReconcileStatus = "matched" if (priced or row)["spend_pico"] == total else "differs"
        values["reconcile_status"] = status
        if status == "matched":
            summary.matched += 1
        else:
            summary.differs += 1
            summary.difference_pico += total - int(row["spend_pico"] or 0)
        self._settle(row, values, priced)

    def _settle(
        self, row: Mapping[str, Any], values: Mapping[str, Any], priced: Mapping[str, Any] | None = None
    ) -> None:
        with self.ledger.writing() as conn:
            save_reconciliation(conn, row, values, priced)

    # ── the account's figures ──
    def _poll_key(self, summary: ReconcileSummary) -> None:
        now = self.clock()
        if now < self._next_key_poll:
            return
        self._next_key_poll = now + KEY_POLL_SECONDS
        self._pace()
        lookup = self.account.key()
        if lookup.outcome == "rejected":
            summary.rejected = lookup.reason
            return
        if lookup.outcome != "found" or lookup.data is None:
            summary.count_error(lookup.reason or "HTTP 429")
            return
        with self.ledger.writing() as conn:
            save_key_usage(conn, lookup.data, _naive_from_epoch(now))


def priced_from_bill(row: Mapping[str, Any], billed: Iterable[BilledGeneration]) -> dict[str, Any]:
    """A stopped row, as OpenRouter billed it: its cost, and its tokens where the stream saw none."""
    generations = list(billed)
    byok = any(g.is_byok for g in generations)
    cost = sum(g.total_cost_pico for g in generations)
    upstream_values = [g.upstream_cost_pico for g in generations if g.upstream_cost_pico is not None]
    upstream = sum(upstream_values) if upstream_values else None
    priced = dict(row) | {
        "cost_pico": cost,
        "upstream_cost_pico": upstream,
        "spend_pico": cost + ((upstream or 0) if byok else 0),
        "is_byok": byok,
    }
    if not any(int(row[name] or 0) for name in TOKEN_MEASURES):
        prompt = sum(g.prompt_tokens for g in generations)
        completion = sum(g.completion_tokens for g in generations)
        priced |= {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": sum(g.cached_tokens for g in generations),
            "reasoning_tokens": sum(g.reasoning_tokens for g in generations),
        }
    return priced


def _naive_from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)


# ── Statements ──

_LEASE_UPSERT: Final = sa.text(
    f"INSERT INTO {leases_table.name} (name, holder, expires_at) VALUES (:name, :holder, :expires_at) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
    f"WHERE {leases_table.name}.holder = excluded.holder OR {leases_table.name}.expires_at < :now"
).bindparams(sa.bindparam("expires_at", type_=sa.DateTime), sa.bindparam("now", type_=sa.DateTime))


def hold_lease(conn: sa.Connection, name: str, holder: str, now: datetime, seconds: float) -> str:
    """Take or renew the lease `name` for `holder` unless another holder's lease is still valid;
    returns whoever holds it now."""
    expires_at = now + timedelta(seconds=seconds)
    conn.execute(_LEASE_UPSERT, {"name": name, "holder": holder, "expires_at": expires_at, "now": now})
    return str(conn.execute(sa.select(leases_table.c.holder).where(leases_table.c.name == name)).scalar_one())


def save_reconciliation(
    conn: sa.Connection, row: Mapping[str, Any], values: Mapping[str, Any], priced: Mapping[str, Any] | None
) -> None:
    """Store what a check found for a pending row. A stopped row priced from OpenRouter's bill
    (`priced`: the row as it now is) moves its rollups by the difference, in the same transaction."""
    if priced is not None:
        _advisory_lock(conn, ROLLUP_LOCK_KEY, shared=True)
    updated = conn.execute(
        ledger_table.update().where(ledger_table.c.id == row["id"], _PENDING).values(**values)
    ).rowcount
    if priced is None or updated != 1:
        return
    state = read_rollup_state(conn)
    zones = [state.zone] if state.zone else []
    if state.recount_zone and int(row["id"]) <= state.recount_after_id:  # the recount counted it already
        zones.append(state.recount_zone)
    for zone in zones:
        apply_rollups(conn, zone, rollup_difference(row, priced, ZoneInfo(zone)))


def next_reconcile_due(conn: sa.Connection) -> float | None:
    """When the next pending row is due (epoch seconds), or None when nothing is pending."""
    retry_at = conn.execute(
        sa.select(sa.func.min(ledger_table.c.reconcile_after)).where(
            _PENDING, ledger_table.c.reconcile_after.is_not(None)
        )
    ).scalar_one()
    first_at = conn.execute(
        sa.select(sa.func.min(ledger_table.c.created_at)).where(
            _PENDING, ledger_table.c.reconcile_after.is_(None)
        )
    ).scalar_one()
    candidates = [moment.replace(tzinfo=UTC).timestamp() for moment in (retry_at,) if moment is not None]
    if first_at is not None:
        candidates.append(first_at.replace(tzinfo=UTC).timestamp() + FIRST_LOOKUP_DELAY_SECONDS)
    return min(candidates) if candidates else None


def read_meta_json(conn: sa.Connection, key: str) -> dict[str, Any]:
    value = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == key)).scalar()
    with contextlib.suppress(TypeError, ValueError):
        loaded = json.loads(str(value))
        if isinstance(loaded, dict):
            return loaded
    return {}


def save_reconcile_state(
    conn: sa.Connection, summary: ReconcileSummary, fingerprint: str, now: float
) -> None:
    """The panel's view of reconciliation across processes: the key's rejection (kept until the key
    changes) and the errors counted so far."""
    state = read_meta_json(conn, RECONCILE_STATE_KEY)
    errors = dict(state.get("errors") or {})
    for reason, count in summary.errors.items():
        errors[reason] = int(errors.get(reason, 0)) + count
    state |= {"errors": errors, "last_pass_at": _naive_from_epoch(now).isoformat()}
    if summary.rejected:
        state |= {
            "rejected": summary.rejected,
            "rejected_key": fingerprint,
            "rejected_at": state["last_pass_at"],
        }
    elif summary.looked_up:
        for key in ("rejected", "rejected_key", "rejected_at"):
            state.pop(key, None)
    conn.execute(META_UPSERT, {"key": RECONCILE_STATE_KEY, "value": json.dumps(state)})


def save_key_usage(conn: sa.Connection, data: Mapping[str, Any], now: datetime) -> None:
    """Sample /key: today's (UTC) spend on this key, kept per day for KEY_DAYS_KEPT days, and its limit."""

    def usd(name: str) -> str | None:
        amount = to_decimal(data.get(name))
        return decimal_text(amount) if amount is not None else None

    day = now.date().isoformat()
    sample = {"usage": usd("usage_daily"), "byok_usage": usd("byok_usage_daily"), "at": now.isoformat()}
    conn.execute(META_UPSERT, {"key": KEY_DAY_PREFIX + day, "value": json.dumps(sample)})
    oldest = (now.date() - timedelta(days=KEY_DAYS_KEPT - 1)).isoformat()
    conn.execute(
        meta_table.delete().where(
            meta_table.c.key.startswith(KEY_DAY_PREFIX, autoescape=True),
            meta_table.c.key < KEY_DAY_PREFIX + oldest,
        )
    )
    limit = {
        "limit": usd("limit"),
        "remaining": usd("limit_remaining"),
        "reset": clean_text(data.get("limit_reset") or "", 40),
        "at": now.isoformat(),
    }
    conn.execute(META_UPSERT, {"key": KEY_LIMIT_KEY, "value": json.dumps(limit)})


# ── Running it ──


@dataclasses.dataclass(frozen=True, slots=True)
class ReconcileConfig:
    """What a background reconciler needs from the settings (the key never in a repr)."""

    api_key: str = dataclasses.field(repr=False)
    base_url: str
    lookups_per_second: float = DEFAULT_LOOKUPS_PER_SECOND


def reconcile_config(settings: Settings) -> ReconcileConfig | None:
    """The reconciler's settings, or None when reconciliation is off or no key is available."""
    api_key = openrouter_api_key(settings)[0]
    if not (settings.reconcile and api_key):
        return None
    return ReconcileConfig(
        api_key,
        settings.openrouter_api_base.strip() or OPENROUTER_API_BASE,
        settings.reconcile_lookups_per_second,
    )


# An OpenRouter key is printable ASCII without spaces. Anything else (a pasted line break, a
# no-break space) is never sent: an HTTP library would refuse it, and may log the header it refused.
_USABLE_API_KEY: Final = re.compile(r"[\x21-\x7e]+")
MALFORMED_KEY_NOTE: Final = "it is not a valid key (printable characters only, no spaces); not used"


def openrouter_api_key(settings: Settings) -> tuple[str, str]:
    """The key and where it came from: the valve, else $OPENROUTER_API_KEY, else none. A key that
    is malformed is not returned; its source then says so."""
    for candidate, source in (
        (settings.openrouter_api_key.strip(), "this function's settings"),
        (os.environ.get(API_KEY_ENV, "").strip(), f"${API_KEY_ENV}"),
    ):
        if candidate:
            if _USABLE_API_KEY.fullmatch(candidate):
                return candidate, source
            return "", f"{source}, but {MALFORMED_KEY_NOTE}"
    return "", ""


class BackgroundReconciler:
    """Reconciliation in the background, for one ledger in this process: a thread that runs while
    rows are pending (sleeping until the next is due), ends when none is, when the key was
    rejected, or within IDLE_CHECK_SECONDS once this copy of the plugin is superseded. Every
    outlet (and stopped generation) asks it to run; asking a running one costs a lock."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._config: ReconcileConfig | None = None
        self._rejected_key = ""  # the fingerprint of a key OpenRouter rejected: not tried again
        self._wake = threading.Event()  # set by a new completion: the next due time may be sooner
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def ensure_running(self, config: ReconcileConfig) -> None:
        with self._lock:
            self._config = config
            if self._thread is not None:
                self._wake.set()
                return
            if key_fingerprint(config.api_key) == self._rejected_key:
                return
            self._thread = threading.Thread(target=self._run, name="openrouter_usage_reconcile", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        reconciler: Reconciler | None = None
        try:
            while not superseded():
                with self._lock:
                    config = self._config
                if config is None:
                    break
                if reconciler is None or reconciler.account.fingerprint != key_fingerprint(config.api_key):
                    if reconciler is not None:
                        reconciler.account.close()
                    account = OpenRouterAccount(config.api_key, config.base_url)
                    reconciler = Reconciler(
                        self.ledger, account, lookups_per_second=config.lookups_per_second, holder=self.holder
                    )
                self._wake.clear()
                summary = reconciler.run_pass()
                if summary.rejected:
                    log.warning(
                        "openrouter_usage: OpenRouter rejected the API key (%s); lookups stop",
                        summary.rejected,
                    )
                    self._rejected_key = reconciler.account.fingerprint
                    break
                due = time.time() + LEASE_SECONDS / 2 if summary.busy else reconciler.next_due()
                if due is None or not self._sleep_until(due):
                    break
        except Exception:
            log.exception("openrouter_usage: reconciliation stopped; it resumes at the next completion")
        finally:
            if reconciler is not None:
                reconciler.account.close()
            with self._lock:
                self._thread = None

    def _sleep_until(self, moment: float) -> bool:
        """Sleep until `moment`, or, once a new completion asks, until its row is due (at most
        FIRST_LOOKUP_DELAY_SECONDS later): no database work per completion, however many arrive.
        False if this copy of the plugin was superseded meanwhile."""
        while (remaining := moment - time.time()) > 0:
            if superseded():
                return False
            if self._wake.wait(min(remaining, IDLE_CHECK_SECONDS)):
                self._wake.clear()
                moment = min(moment, time.time() + FIRST_LOOKUP_DELAY_SECONDS)
        return True


_RECONCILERS: OrderedDict[str, BackgroundReconciler] = OrderedDict()
_RECONCILERS_LOCK = threading.Lock()


def reconciler_for(url: str) -> BackgroundReconciler:
    """The process-wide background reconciler for a ledger URL; as many as writers are kept."""
    ledger = ledger_for(url)
    with _RECONCILERS_LOCK:
        reconciler = _RECONCILERS.get(url)
        if reconciler is None:
            reconciler = BackgroundReconciler(ledger)
            _RECONCILERS[url] = reconciler
            while len(_RECONCILERS) > _MAX_OPEN_LEDGERS:
                _RECONCILERS.popitem(last=False)
        return reconciler


# ══ Reporting ═════════════════════════════════════════════════════════════════════════════════════


def format_usd(pico: int) -> str:
    """$12.34 from a dollar up; below, enough decimals for two significant digits (at least 4)."""
    return format_money(pico_to_usd(pico), "$")


def format_money(amount: Decimal, symbol: str) -> str:
    """`amount` after `symbol`: two decimals from one unit up; below, enough decimals for two
    significant digits (at least 4). The one place money is rounded, and only to be shown."""
    if amount == 0:
        return f"{symbol}0.00"
    if abs(amount) >= 1:
        return f"{symbol}{amount.quantize(Decimal('0.01'), rounding=ROUND_HALF_EVEN):,}"
    decimals = min(max(4, -amount.adjusted() + 1), 12)
    return f"{symbol}{amount.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_EVEN)}"


def format_count(value: int) -> str:
    return f"{value:,}"


def count_of(value: int, noun: str) -> str:
    """'1 request', '2 requests', '1,204 tokens'."""
    return f"{format_count(value)} {noun}{'' if value == 1 else 's'}"


def format_share(part: int, whole: int) -> str:
    return f"{part * 100 / whole:.1f}%" if whole else "-"


_MARKDOWN_SPECIALS = re.compile(r"([!-/:-@\[-`{-~])")


def escape_markdown(text: str, limit: int = 60) -> str:
    """Make a user-controlled string inert in Markdown: every ASCII punctuation character is
    backslash-escaped (no links, autolinks, HTML, emphasis or table cells can form), line breaks
    become spaces, and long values are cut."""
    flat = " ".join(clean_text(text, 10 * limit).split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return _MARKDOWN_SPECIALS.sub(r"\\\1", flat) or "-"


# ── Display currency ──
# The ledger, the export and the CLI's JSON and CSV keep exact USD. The usage line, the panel and
# the read-out may show another currency at a rate the admin sets; converting multiplies exactly
# (a rate has at most MAX_RATE_DIGITS digits, a sum of pico-dollars at most 19: far below the
# context's precision), and format_money rounds only the text.

CURRENCY_SYMBOLS: Final = {"USD": "$", "EUR": "€", "GBP": "£"}  # other codes are written out
MAX_RATE_PER_USD: Final = Decimal(1_000_000)  # the weakest currencies trade below 10^6 per USD
MAX_RATE_DIGITS: Final = 15
_EXACT: Final = Context(prec=64)
CURRENCY_FORM: Final = (
    "a currency code and its rate per USD, then optionally the date of the rate: EUR 0.92 2026-11-29"
)


@dataclasses.dataclass(frozen=True, slots=True)
class DisplayCurrency:
    """How money is shown: `code` at `rate` units per USD, set on `rate_date` when the admin said.
    `problem` says why the admin's `text` was not understood (money is then shown in USD)."""

    code: str = "USD"
    rate: Decimal = Decimal(1)
    rate_date: date | None = None
    problem: str = ""
    text: str = ""

    def convert(self, pico: int) -> Decimal:
        """Pico-dollars in this currency, exactly."""
        return _EXACT.multiply(pico_to_usd(pico), self.rate)

    def format(self, pico: int) -> str:
        return format_money(self.convert(pico), CURRENCY_SYMBOLS.get(self.code, f"{self.code} "))

    def rate_text(self) -> str:
        """'0.92 EUR per USD (rate of 2026-11-29)', or '… as set by the admin' without a date."""
        when = f"rate of {self.rate_date.isoformat()}" if self.rate_date else "as set by the admin"
        return f"{decimal_text(self.rate)} {self.code} per USD ({when})"


USD: Final = DisplayCurrency()


@functools.lru_cache(maxsize=8)  # outlet reads the valve for every completion
def parse_display_currency(text: str) -> DisplayCurrency:
    """`USD`, `EUR 0.92` or `EUR 0.92 2026-11-29` (code, rate per USD, optional date). Never raises:
    anything else is USD with the problem named, so a bad value breaks neither a chat nor a save."""
    words = str(text).split()
    if not words:
        return USD
    code, rate_text, date_text = words[0].upper(), " ".join(words[1:2]), " ".join(words[2:])
    rate = to_decimal(rate_text) if rate_text else (Decimal(1) if code == "USD" else None)
    problem = ""
    if not re.fullmatch(r"[A-Z]{3}", code):
        problem = "expected " + CURRENCY_FORM
    elif rate is None:
        problem = "the rate is not a number" if rate_text else f"no rate per USD for {code}"
    elif not 0 < rate <= MAX_RATE_PER_USD or len(rate.as_tuple().digits) > MAX_RATE_DIGITS:
        problem = f"the rate must be above 0 and at most {MAX_RATE_PER_USD:,} per USD"
    elif code == "USD" and rate != 1:
        problem = "USD's rate per USD is 1"
    rate_date = None
    if not problem and date_text:
        try:
            rate_date = date.fromisoformat(date_text)
        except ValueError:
            problem = "the date must be YYYY-MM-DD"
    if problem or rate is None:
        return DisplayCurrency(problem=problem, text=str(text))
    return DisplayCurrency(code, rate, rate_date, text=str(text))


def currency_note(currency: DisplayCurrency) -> str:
    """The panel's line about the display currency ("" for plain USD)."""
    if currency.problem:
        return (
            f"Display currency {escape_markdown(currency.text, 40)} not understood ({currency.problem}): "
            "amounts are in USD."
        )
    if currency.code == "USD":
        return ""
    example = f"{currency.code} {decimal_text(currency.rate)} YYYY-MM-DD"
    undated = "" if currency.rate_date else f" Add the rate's date to the valve: `{example}`."
    return (
        f"Amounts in {currency.code} at {currency.rate_text()}; the ledger, the export and the CLI keep "
        f"exact USD.{undated}"
    )


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
class LedgerHealth:
    """What the ledger's keeper should know besides the figures: where it is, what waits in the
    spool or quarantine, what was repaired, and whether a recount is running."""

    location: str
    spooled_files: int = 0
    quarantined: int = 0
    quarantine_reason: str = ""  # the latest reason, as an example
    repaired_rows: int = 0
    recount: str = ""  # e.g. "Europe/Paris, 45%", while the rollups are recounted for that zone


@dataclasses.dataclass(frozen=True, slots=True)
class UsageReport:
    """The admin report: the same figures for the settings panel and the CLI."""

    generated_at: datetime
    timezone: str
    periods: dict[str, Totals]
    top_users: list[UserSpend]
    top_models: list[ModelSpend]
    last_written_at: datetime | None
    health: LedgerHealth
    daily: DailySpend
    daily_top_users: list[SpendSeries]  # the first CHART_SERIES of top_users, day by day
    daily_top_models: list[SpendSeries]
    breakdown: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    breakdown_since: str = ""


PERIODS: Final = (
    ("today", "Today", 1),
    ("last_7_days", "Last 7 days", 7),
    ("last_30_days", "Last 30 days", 30),
)


class RollupsRecounting(Exception):
    """No time zone's rollups are complete yet (an upgraded ledger is being counted)."""


@contextlib.contextmanager
def rollups_in_zone(
    conn: sa.Connection, state: RollupState, zone: ZoneInfo | None
) -> Iterator[tuple[sa.Connection, str]]:
    """A connection holding rollups in `zone`, and that zone's name: the ledger's own when they
    are kept in it (or `zone` is None), else rollups counted afresh from the ledger rows into a
    scratch in-memory database, so that a read in another zone never writes to the ledger."""
    if zone is None or zone.key == state.zone:
        if state.zone is None:
            raise RollupsRecounting(
                f"the rollups are being counted ({state.recount_zone}); try again shortly"
            )
        yield conn, state.zone
        return
    scratch = sa.create_engine("sqlite://")
    try:
        with scratch.begin() as scratch_conn:
            for table in (*ROLLUP_TABLES, users_table):
                table.create(scratch_conn)
            users = [dict(row._mapping) for row in conn.execute(sa.select(users_table))]
            if users:
                scratch_conn.execute(users_table.insert(), users)
            rows = conn.execution_options(yield_per=20_000).execute(sa.select(*_RECOUNT_COLUMNS))
            for chunk in rows.partitions():
                apply_rollups(
                    scratch_conn, zone.key, rollup_increments((row._mapping for row in chunk), zone)
                )
        with scratch.connect() as scratch_conn:
            yield scratch_conn, zone.key
    finally:
        scratch.dispose()


_SELECT_REPAIRED_ROWS: Final = (
    sa.select(sa.func.count()).select_from(ledger_table).where(ledger_table.c.notes != "")
)


def ledger_health(ledger: Ledger, conn: sa.Connection, state: RollupState) -> LedgerHealth:
    recount = ""
    if state.recount_zone:
        last_id = conn.execute(sa.select(sa.func.max(ledger_table.c.id))).scalar() or 0
        share = min(state.recount_after_id / last_id, 1.0) if last_id else 1.0
        recount = f"{state.recount_zone}, {share:.0%}"
    quarantined = ledger.spool.quarantined()
    return LedgerHealth(
        location=ledger.location,
        spooled_files=ledger.spool.pending_count(),
        quarantined=len(quarantined),
        quarantine_reason=str(quarantined[-1].get("reason", "")) if quarantined else "",
        repaired_rows=int(conn.execute(_SELECT_REPAIRED_ROWS).scalar_one()),
        recount=recount,
    )


def build_usage_report(
    ledger: Ledger,
    zone: ZoneInfo | None,
    rows: int,
    now: datetime | None = None,
    breakdown: tuple[Breakdown, str] | None = None,
) -> UsageReport:
    """Read the report from the rollups (their cost does not grow with the number of ledger
    rows), in the zone they are kept in unless `zone` asks for another. Never writes.
    `breakdown` adds spend by one dimension since a day ('30d' or an ISO date; see parse_since)."""
    now = now or datetime.now(UTC)
    by_rows: list[dict[str, Any]] = []
    since = ""
    with ledger.reading() as (conn, state):
        health = ledger_health(ledger, conn, state)
        last_written = conn.execute(sa.select(sa.func.max(ledger_table.c.created_at))).scalar_one_or_none()
        with rollups_in_zone(conn, state, zone) as (source, zone_key):
            today = date.fromisoformat(local_day(now, ZoneInfo(zone_key)))
            periods, top_users, top_models = _report_figures(source, zone_key, rows, today)
            daily = read_daily_spend(source, zone_key, today)
            user_series, model_series = read_spend_series(
                source, zone_key, daily.days, top_users[:CHART_SERIES], top_models[:CHART_SERIES]
            )
            if breakdown is not None:
                since = parse_since(breakdown[1], ZoneInfo(zone_key), now)
                by_rows = breakdown_rows(source, zone_key, breakdown[0], since, today)
    if isinstance(last_written, str):  # SQLite hands back text from an aggregate over DATETIME
        last_written = datetime.fromisoformat(last_written)
    return UsageReport(
        generated_at=now,
        timezone=zone_key,
        periods=periods,
        top_users=top_users,
        top_models=top_models,
        last_written_at=last_written.replace(tzinfo=UTC) if last_written else None,
        health=health,
        daily=daily,
        daily_top_users=user_series,
        daily_top_models=model_series,
        breakdown=by_rows,
        breakdown_since=since,
    )


def _report_figures(
    conn: sa.Connection, zone: str, rows: int, today: date
) -> tuple[dict[str, Totals], list[UserSpend], list[ModelSpend]]:
    first_30 = (today - timedelta(days=29)).isoformat()
    periods = {
        key: _period_totals(conn, zone, (today - timedelta(days=days - 1)).isoformat())
        for key, _, days in PERIODS
    }
    periods["all_time"] = _period_totals(conn, zone, None)
    user_table, model_table = rollup_user_day_table, rollup_model_day_table
    # Rank on the rollup alone, then join names for the few rows kept.
    ranked = (
        sa.select(
            user_table.c.user_id,
            sa.func.sum(user_table.c.spend_pico).label("spend"),
            sa.func.sum(user_table.c.requests).label("requests"),
        )
        .where(user_table.c.zone == zone, user_table.c.day >= first_30)
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
            .where(model_table.c.zone == zone, model_table.c.day >= first_30)
            .group_by(model_table.c.served_model, model_table.c.provider)
            .order_by(model_spend.desc(), model_table.c.served_model)
            .limit(rows)
        )
    ]
    return periods, top_users, top_models


_SELECT_PERIOD_TOTALS: Final = sa.select(*_sums(rollup_day_table)).where(
    rollup_day_table.c.zone == sa.bindparam("zone"), rollup_day_table.c.day >= sa.bindparam("first_day")
)


def _period_totals(conn: sa.Connection, zone: str, first_day: str | None) -> Totals:
    parameters = {"zone": zone, "first_day": first_day or ""}  # every day sorts after ""
    return Totals.from_row(conn.execute(_SELECT_PERIOD_TOTALS, parameters).first())


# ── Spend by day: the chart ──
# The panel, the read-out and the CLI draw the last CHART_DAYS local days as Unicode block bars in
# a monospace block: Open WebUI renders a valve's description as sanitised Markdown, where a code
# block always shows (an image would depend on the sanitiser), and the same lines print in a
# terminal. Each day is a column; a day without spend is an empty column, never a missing one.

CHART_DAYS: Final = 30
CHART_HEIGHT: Final = 8  # rows of bars; with eighth blocks, 64 steps from nothing to the busiest day
CHART_SERIES: Final = 3  # top users and top models drawn day by day under the chart
EIGHTHS_UP: Final = " ▁▂▃▄▅▆▇█"  # a column's cell, filled from the bottom by 0..8 eighths
EIGHTHS_RIGHT: Final = " ▏▎▍▌▋▊▉█"  # a row's cell, filled from the left
PARTIAL_DAY: Final = "▒"  # today's bar: the day is not over
MAX_BAR_WIDTH: Final = 3  # characters per day when a terminal is wide enough
BUDGET_BAR_CELLS: Final = 20
USER_CHART_HEIGHT: Final = 5  # a user's chart sits in the narrow Chat Controls pane


@dataclasses.dataclass(frozen=True, slots=True)
class DailySpend:
    """Spend and requests on each of the last CHART_DAYS local days of `zone`, oldest first; the
    last day is today, still partial. Days without spend are there, with zero."""

    zone: str
    days: tuple[str, ...]
    spend_pico: tuple[int, ...]
    requests: tuple[int, ...]

    @property
    def total_pico(self) -> int:
        return sum(self.spend_pico)

    @property
    def busiest(self) -> int:
        """Index of the day with the most spend (the earliest of equals)."""
        return max(range(len(self.days)), key=lambda index: (self.spend_pico[index], -index))


@dataclasses.dataclass(frozen=True, slots=True)
class SpendSeries:
    """One user's or model's spend on each day of a DailySpend (a top list's first entries)."""

    label: str
    spend_pico: tuple[int, ...]


def chart_days(today: date) -> tuple[str, ...]:
    return tuple((today - timedelta(days=CHART_DAYS - 1 - n)).isoformat() for n in range(CHART_DAYS))


def _spend_by_day(
    conn: sa.Connection, table: sa.Table, zone: str, days: Sequence[str], *where: Any
) -> dict[tuple[Any, ...], tuple[int, int]]:
    """(key columns..., day) -> (spend, requests) from one rollup over `days`: one range of its key."""
    keys = [column for column in table.primary_key.columns if column.name not in ("zone", "day")]
    result = conn.execute(
        sa.select(
            *keys,
            table.c.day,
            sa.func.sum(table.c.spend_pico).label("spend"),
            sa.func.sum(table.c.requests).label("requests"),
        )
        .where(table.c.zone == zone, table.c.day >= days[0], table.c.day <= days[-1], *where)
        .group_by(*keys, table.c.day)
    )
    return {tuple(row[:-2]): (int(row.spend), int(row.requests)) for row in result}


def read_daily_spend(conn: sa.Connection, zone: str, today: date, user_id: str | None = None) -> DailySpend:
    """The chart's days from the day rollup, or one user's from the user-day rollup."""
    days = chart_days(today)
    if user_id is None:
        found = _spend_by_day(conn, rollup_day_table, zone, days)
    else:
        table = rollup_user_day_table
        found = {
            (day,): figures
            for (_, day), figures in _spend_by_day(
                conn, table, zone, days, table.c.user_id == user_id
            ).items()
        }
    figures = [found.get((day,), (0, 0)) for day in days]
    return DailySpend(
        zone, days, tuple(spend for spend, _ in figures), tuple(requests for _, requests in figures)
    )


def read_spend_series(
    conn: sa.Connection,
    zone: str,
    days: Sequence[str],
    users: Sequence[UserSpend],
    models: Sequence[ModelSpend],
) -> tuple[list[SpendSeries], list[SpendSeries]]:
    """The top users' and top models' spend on each of `days`."""
    user_table, model_table = rollup_user_day_table, rollup_model_day_table
    by_user = (
        _spend_by_day(conn, user_table, zone, days, user_table.c.user_id.in_([u.user_id for u in users]))
        if users
        else {}
    )
    names = sorted({m.served_model for m in models})
    by_model = (
        _spend_by_day(conn, model_table, zone, days, model_table.c.served_model.in_(names)) if names else {}
    )
    user_series = [
        SpendSeries(u.user_name, tuple(by_user.get((u.user_id, d), (0, 0))[0] for d in days)) for u in users
    ]
    model_series = [
        SpendSeries(
            f"{m.served_model} ({m.provider})" if m.provider else m.served_model,
            tuple(by_model.get((m.served_model, m.provider, d), (0, 0))[0] for d in days),
        )
        for m in models
    ]
    return user_series, model_series


def _eighths(value: int, top: int, cells: int) -> int:
    """`value` in eighths of `cells` cells, `top` filling them all; anything above zero shows."""
    return -(-value * cells * 8 // top) if top > 0 else 0


def daily_chart_lines(
    daily: DailySpend, money: Callable[[int], str], bar_width: int = 1, height: int = CHART_HEIGHT
) -> list[str]:
    """Vertical bars, one per day and `bar_width` characters wide, the scale on the left in
    `money` (its top is the busiest day); today's bar is shaded, as the day is not over."""
    top = max(daily.spend_pico, default=0)
    top_label, zero_label = money(top), money(0)
    width = max(len(top_label), len(zero_label))
    filled = [_eighths(spend, top, height) for spend in daily.spend_pico[:-1]]
    today_cells = -(-_eighths(daily.spend_pico[-1], top, height) // 8)
    lines = []
    for row in range(height - 1, -1, -1):
        cells = [EIGHTHS_UP[min(max(eighths - row * 8, 0), 8)] for eighths in filled]
        cells.append(PARTIAL_DAY if today_cells > row else " ")
        scale = f"{top_label:>{width}} ┤" if row == height - 1 else f"{'':>{width}} │"
        lines.append(scale + "".join(cell * bar_width for cell in cells))
    columns = len(daily.days) * bar_width
    lines.append(f"{zero_label:>{width}} └" + "─" * columns)
    first, last = daily.days[0][5:], f"{daily.days[-1][5:]} today {PARTIAL_DAY}"
    gap = columns - len(first) - len(last)
    dates = first + " " * gap + last if gap > 0 else first
    lines.append(" " * (width + 2) + dates)
    return lines


def terminal_chart_lines(daily: DailySpend, money: Callable[[int], str], columns: int) -> list[str]:
    """The chart as wide as fits a terminal of `columns`: 1 to MAX_BAR_WIDTH characters a day."""
    narrow = daily_chart_lines(daily, money)
    spare = columns - 1 - len(narrow[0])  # a line as wide as the terminal would wrap on some
    bar_width = min(max(1 + spare // len(daily.days), 1), MAX_BAR_WIDTH)
    return narrow if bar_width == 1 else daily_chart_lines(daily, money, bar_width)


def sparkline(values: Sequence[int], top: int, bar_width: int = 1) -> str:
    """`bar_width` characters per value, filled by eighths from the bottom, `top` the full cell."""
    return "".join(EIGHTHS_UP[min(_eighths(value, top, 1), 8)] * bar_width for value in values)


def series_lines(
    series: Sequence[SpendSeries], money: Callable[[int], str], chart: Sequence[str]
) -> list[str]:
    """For each series its name and total on one line, then its days as a sparkline under the
    columns of `chart` (the daily chart's lines); all on one scale (the busiest day of any of
    them), so the lines compare."""
    top = max((spend for s in series for spend in s.spend_pico), default=0)
    margin, width = chart[-2].index("└"), max(map(len, chart))
    bar_width = (len(chart[-2]) - margin - 1) // max(len(series[0].spend_pico), 1) if series else 1
    lines = []
    for s in series:
        total = f" · {money(sum(s.spend_pico))}"
        name = terminal_text(s.label)
        if len(name) + len(total) > width:
            name = name[: max(width - len(total) - 1, 1)] + "…"
        lines += [name + total, " " * margin + "│" + sparkline(s.spend_pico, top, bar_width)]
    return lines


def share_bar(percent: int, cells: int = BUDGET_BAR_CELLS) -> str:
    """`percent` (capped at 100) as a bar of `cells` cells filled from the left by eighths."""
    eighths = min(max(percent, 0), 100) * cells * 8 // 100
    full, part = divmod(eighths, 8)
    return ("█" * full + (EIGHTHS_RIGHT[part] if part else "")).ljust(cells)


def daily_summary_text(daily: DailySpend, money: Callable[[int], str]) -> str:
    """The chart in words, for a screen reader, a plain-text view and the CLI."""
    span = f"{daily.days[0]} to {daily.days[-1]}, days in {daily.zone}"
    return f"Last {CHART_DAYS} days ({span}): {daily_figures_text(daily, money)}"


def daily_figures_text(daily: DailySpend, money: Callable[[int], str]) -> str:
    """The total, the busiest day, today so far and the days without spend, in one sentence."""
    if not daily.total_pico:
        return "no spend."
    busiest = daily.busiest
    idle = daily.spend_pico.count(0)
    return (
        f"{money(daily.total_pico)} in total; the busiest day was {daily.days[busiest]} with "
        f"{money(daily.spend_pico[busiest])}; today so far {money(daily.spend_pico[-1])}"
        + (f"; {count_of(idle, 'day')} without spend." if idle else ".")
    )


def code_block(lines: Sequence[str]) -> str:
    """`lines` as a fenced Markdown code block, the fence longer than any run of backticks inside,
    so no line can close it."""
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return "\n".join([f"{fence}text", *lines, fence])


def render_report_markdown(report: UsageReport, currency: DisplayCurrency = USD) -> str:
    zone = ZoneInfo(report.timezone)
    generated = f"{report.generated_at.astimezone(zone):%Y-%m-%d %H:%M} {report.timezone}"
    money = currency.format
    note = currency_note(currency)
    chart = daily_chart_lines(report.daily, money)
    lines = [
        f"Read-only, computed when this panel opens: {generated}.",
        *(["", note] if note else []),
        "",
        f"**Spend by day, last {CHART_DAYS} days ({report.daily.zone})**",
        "",
        daily_summary_text(report.daily, money),
        "",
        code_block(chart),
    ]
    for title, series in (("users", report.daily_top_users), ("models", report.daily_top_models)):
        if series:
            lines += [
                "",
                f"Top {title}, day by day (one scale: the busiest day of any of them):",
                "",
                code_block(series_lines(series, money, chart)),
            ]
    lines += [
        "",
        "| Period | Spend | Requests | Tokens | Failed |",
        "|---|--:|--:|--:|--:|",
    ]
    labels = {key: label for key, label, _ in PERIODS} | {"all_time": "All time"}
    for key, label in labels.items():
        totals = report.periods[key]
        lines.append(
            f"| {label} | {money(totals.spend_pico)} | {format_count(totals.requests)} | "
            f"{format_count(totals.total_tokens)} | {format_count(totals.failed)} |"
        )
    lines += ["", "**Top users, last 30 days**", ""]
    if report.top_users:
        lines += ["| User | Spend | Requests |", "|---|--:|--:|"]
        lines += [
            f"| {escape_markdown(u.user_name)} | {money(u.spend_pico)} | {format_count(u.requests)} |"
            for u in report.top_users
        ]
    else:
        lines.append("No usage in the last 30 days.")
    lines += ["", "**Top models, last 30 days**", ""]
    if report.top_models:
        lines += ["| Model | Provider | Spend | Tokens |", "|---|---|--:|--:|"]
        lines += [
            f"| {escape_markdown(m.served_model)} | {escape_markdown(m.provider)} | "
            f"{money(m.spend_pico)} | {format_count(m.total_tokens)} |"
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
        (
            f"Last 30 days: cached tokens {format_share(month.cached_tokens, month.prompt_tokens)} of prompt "
            f"tokens · reasoning tokens {format_share(month.reasoning_tokens, month.completion_tokens)} of "
            f"completion tokens · failed completions {format_count(month.failed)} "
            f"({format_count(report.periods['all_time'].failed)} all time)"
        ),
        "",
        f"Ledger last written: {written} · ledger: `{report.health.location}`",
        *health_lines(report.health),
    ]
    return "\n".join(lines)


def health_lines(health: LedgerHealth) -> list[str]:
    """Markdown lines about what waits, what was repaired and what is being recounted."""
    lines = []
    if health.recount:
        zone, _, share = health.recount.partition(", ")
        lines.append(f"Recounting the rollups for time zone {escape_markdown(zone)}: {share} done.")
    if health.spooled_files:
        lines.append(f"{health.spooled_files} spooled batch(es) waiting to be replayed.")
    if health.quarantined:
        lines.append(
            f"{health.quarantined} record(s) quarantined: the database refused them "
            f"(latest reason: {escape_markdown(health.quarantine_reason, 120)}). "
            "`openrouter-usage spool` lists them; `--replay` retries them."
        )
    if health.repaired_rows:
        lines.append(
            f"{format_count(health.repaired_rows)} row(s) repaired on the way in "
            "(values outside the valid range were recorded as unknown; see `notes` in the export)."
        )
    return ["", " ".join(lines)] if lines else []


@dataclasses.dataclass(frozen=True, slots=True)
class KeyDay:
    """One UTC day of this key: OpenRouter's spend (sampled at `sampled_at`) and the ledger's over
    the same span; the difference is what the filter cannot see."""

    day: str
    openrouter_pico: int
    ledger_pico: int
    sampled_at: str


@dataclasses.dataclass(frozen=True, slots=True)
class ReconciliationView:
    """The panel's reconciliation section: checks over the last 30 days, stopped rows without a
    cost, the key's state and the per-day comparison with OpenRouter's spend on this key."""

    rows: int  # ledger rows in the last 30 days
    by_status: dict[str, int]  # rows in the last 30 days not matched, by reconcile status
    difference_pico: int  # OpenRouter's bill minus our spend, over the rows that differ
    oldest_pending: datetime | None
    unpriced_stopped: int  # stopped generations still without a cost (all time)
    state: dict[str, Any]  # RECONCILE_STATE_KEY
    key_days: list[KeyDay]
    key_limit: dict[str, Any]


def read_reconciliation_view(ledger: Ledger, report: UsageReport) -> ReconciliationView:
    """The reconciliation section over the report's last 30 days (the same calendar days)."""
    zone = ZoneInfo(report.timezone)
    today = report.generated_at.astimezone(zone).date()
    first_day = datetime.combine(today - timedelta(days=29), datetime.min.time(), tzinfo=zone)
    with ledger.reading() as (conn, _):
        return build_reconciliation_view(conn, _naive_utc(first_day), report.periods["last_30_days"].requests)


def build_reconciliation_view(conn: sa.Connection, first_day_utc: datetime, rows: int) -> ReconciliationView:
    """Read the reconciliation figures (through the partial index of rows not matched). Never writes."""
    in_window = sa.and_(_NOT_MATCHED, ledger_table.c.created_at >= first_day_utc)
    by_status: dict[str, int] = {}
    difference = 0
    oldest_pending = None
    for status, count, differs, oldest in conn.execute(
        sa.select(
            ledger_table.c.reconcile_status,
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(ledger_table.c.billed_pico - ledger_table.c.spend_pico), 0),
            sa.func.min(ledger_table.c.created_at),
        )
        .where(in_window)
        .group_by(ledger_table.c.reconcile_status)
    ):
        by_status[str(status)] = int(count)
        if status == "differs":
            difference = int(differs)
        if status == "pending":
            oldest_pending = datetime.fromisoformat(oldest) if isinstance(oldest, str) else oldest
    unpriced = conn.execute(
        sa.select(sa.func.count()).where(
            _NOT_MATCHED, ledger_table.c.status == "stopped", ledger_table.c.cost_pico.is_(None)
        )
    ).scalar_one()
    samples = conn.execute(
        sa.select(meta_table.c.key, meta_table.c.value)
        .where(meta_table.c.key.startswith(KEY_DAY_PREFIX, autoescape=True))
        .order_by(meta_table.c.key.desc())
    ).all()
    return ReconciliationView(
        rows=rows,
        by_status=by_status,
        difference_pico=difference,
        oldest_pending=oldest_pending.replace(tzinfo=UTC) if oldest_pending else None,
        unpriced_stopped=int(unpriced),
        state=read_meta_json(conn, RECONCILE_STATE_KEY),
        key_days=[day for key, value in samples if (day := _key_day(conn, key, value)) is not None],
        key_limit=read_meta_json(conn, KEY_LIMIT_KEY),
    )


def _key_day(conn: sa.Connection, key: str, value: str) -> KeyDay | None:
    try:
        sample = json.loads(value)
        day = date.fromisoformat(key.removeprefix(KEY_DAY_PREFIX))
        sampled_at = datetime.fromisoformat(sample["at"])
        openrouter = sum(usd_to_pico(Decimal(sample[name] or 0)) for name in ("usage", "byok_usage"))
    except (ValueError, KeyError, TypeError, InvalidOperation):
        return None
    start = datetime.combine(day, datetime.min.time())
    ledger = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(ledger_table.c.spend_pico), 0)).where(
            ledger_table.c.created_at >= start, ledger_table.c.created_at < sampled_at
        )
    ).scalar_one()
    return KeyDay(day.isoformat(), openrouter, int(ledger), f"{sampled_at:%H:%M}")


def render_reconciliation_markdown(
    view: ReconciliationView | None,
    key_source: str,
    *,
    enabled: bool,
    currency: DisplayCurrency = USD,
    key_in_use: str = "",
) -> str:
    """The panel's "Checked against OpenRouter's bill" section, money in `currency`, as Markdown
    paragraphs. Without a usable key (or with checking off) it is the one line saying so, and the
    stopped answers still without a cost. `key_in_use` is the fingerprint of the key set now: a
    rejection of another key is not shown."""
    money = currency.format
    checking = bool(key_source) and enabled and MALFORMED_KEY_NOTE not in key_source
    paragraphs = ["**Checked against OpenRouter's bill**", key_line(key_source, enabled=enabled)]
    state = view.state if view is not None else {}
    if checking and state.get("rejected") and state.get("rejected_key") == key_in_use:
        try:
            when = f", {datetime.fromisoformat(str(state.get('rejected_at'))):%Y-%m-%d %H:%M} UTC"
        except ValueError:
            when = ""
        paragraphs.append(
            f"**The key was rejected** ({escape_markdown(str(state['rejected']), 20)}{when}): "
            "lookups stopped until the key changes."
        )
    if view is not None and checking:
        paragraphs.append(reconcile_summary_line(view, money))
    if view is not None and view.unpriced_stopped:
        paragraphs.append(
            f"{count_of(view.unpriced_stopped, 'stopped answer')} without a cost yet: "
            + (
                "they are priced once OpenRouter has their record."
                if checking
                else "set an OpenRouter API key above and they are priced from OpenRouter's record."
            )
        )
    if view is None or not checking:
        return "\n\n" + "\n\n".join(paragraphs)
    errors = state.get("errors") or {}
    if errors:
        counted = ", ".join(
            f"{escape_markdown(str(k), 40)}: {format_count(int(v))}" for k, v in sorted(errors.items())
        )
        paragraphs.append(f"Lookup errors so far (each retried later): {counted}.")
    paragraphs += key_day_paragraphs(view.key_days, money)
    limit, remaining = (to_decimal(view.key_limit.get(name)) for name in ("limit", "remaining"))
    if limit is not None:
        reset = view.key_limit.get("reset")
        paragraphs.append(
            f"Key limit (admins only): {money(usd_to_pico(remaining or Decimal(0)))} remaining of "
            f"{money(usd_to_pico(limit))}"
            + (f", resets {escape_markdown(str(reset), 30)}" if reset else "")
            + "."
        )
    return "\n\n" + "\n\n".join(paragraphs)


def key_line(key_source: str, *, enabled: bool) -> str:
    """Which key is in use (never the key itself), or why none is."""
    if not key_source:
        return (
            f"No OpenRouter API key (set one above, or `${API_KEY_ENV}`): answers are not checked against "
            "OpenRouter's bill, and stopped answers stay without a cost."
        )
    if MALFORMED_KEY_NOTE in key_source:
        return f"API key: {key_source}. Answers are not checked against OpenRouter's bill."
    if not enabled:
        return f"API key: set ({key_source}). Checking is switched off."
    return f"API key: set ({key_source})."


def key_day_paragraphs(key_days: Sequence[KeyDay], money: Callable[[int], str]) -> list[str]:
    """OpenRouter's spend on this key against the ledger's, per UTC day: a sentence and a table."""
    if not key_days:
        return []
    rows = [
        f"| {d.day} (to {d.sampled_at}) | {money(d.openrouter_pico)} | "
        f"{money(d.ledger_pico)} | {money(d.openrouter_pico - d.ledger_pico)} |"
        for d in key_days
    ]
    return [
        (
            "Spend on this key by UTC day (OpenRouter's figure, sampled while checking) against the "
            "ledger's: the difference is background tasks (titles, tags, follow-ups) and other clients "
            "of this key."
        ),
        "\n".join(["| UTC day | OpenRouter | Ledger | Difference |", "|---|--:|--:|--:|", *rows]),
    ]


def reconcile_summary_line(view: ReconciliationView, money: Callable[[int], str] = format_usd) -> str:
    """How much of the last 30 days is checked, what differs, and what waits."""
    counts = view.by_status
    no_id = counts.get("no_id", 0)
    checkable = view.rows - no_id
    unchecked = counts.get("pending", 0)
    checked = max(checkable - unchecked, 0)
    differs = counts.get("differs", 0)
    matched = max(checked - differs - counts.get("not_found", 0) - counts.get("failed", 0), 0)
    parts = [
        (
            f"Last 30 days: {format_count(checked)} of {count_of(checkable, 'answer')} with a generation "
            f"id checked ({format_share(checked, checkable)})"
        ),
        f"{format_count(matched)} match to the pico-dollar",
    ]
    if differs:
        sign = "+" if view.difference_pico >= 0 else "-"
        parts.append(
            f"{format_count(differs)} differ by {sign}{money(abs(view.difference_pico))} in total "
            "(OpenRouter's bill minus the ledger)"
        )
    for status, label in (("not_found", "not found at OpenRouter"), ("failed", "failed")):
        if counts.get(status):
            parts.append(f"{format_count(counts[status])} {label}")
    if unchecked and view.oldest_pending is not None:
        parts.append(
            f"{format_count(unchecked)} waiting, the oldest from {view.oldest_pending:%Y-%m-%d %H:%M} UTC"
        )
    if no_id:
        parts.append(
            f"{format_count(no_id)} without a generation id (an error before any reply) cannot be checked"
        )
    return "; ".join(parts) + "."


def totals_as_dict(totals: Totals) -> dict[str, Any]:
    """Totals for reports, money in exact USD. OpenRouter fills upstream_inference_cost for
    non-BYOK calls too (about the cost itself), so a sum over all rows would mislead: reports give
    the BYOK upstream spend only, which is spend - cost exactly (spend adds upstream for BYOK only)."""
    data: dict[str, Any] = totals.as_dict()
    data["byok_upstream_cost_pico"] = data["spend_pico"] - data["cost_pico"]
    del data["upstream_cost_pico"]
    for name in ("cost_pico", "byok_upstream_cost_pico", "spend_pico"):
        data[name.replace("_pico", "_usd")] = decimal_text(pico_to_usd(data.pop(name)))
    return data


def daily_as_dict(report: UsageReport) -> dict[str, Any]:
    """The chart's figures: every day (zeros included; today `partial`), and the top users' and
    top models' spend on each of those days, in exact USD."""
    daily = report.daily

    def usd(pico: int) -> str:
        return decimal_text(pico_to_usd(pico))

    return {
        "timezone": daily.zone,
        "total_usd": usd(daily.total_pico),
        "busiest_day": daily.days[daily.busiest] if daily.total_pico else None,
        "days": [
            {"day": day, "spend_usd": usd(spend), "requests": requests, "partial": day == daily.days[-1]}
            for day, spend, requests in zip(daily.days, daily.spend_pico, daily.requests, strict=True)
        ],
        "top_users": [
            {"user_id": u.user_id, "user_name": u.user_name, "spend_usd": [usd(p) for p in s.spend_pico]}
            for u, s in zip(report.top_users, report.daily_top_users, strict=False)
        ],
        "top_models": [
            {
                "served_model": m.served_model,
                "provider": m.provider,
                "spend_usd": [usd(p) for p in s.spend_pico],
            }
            for m, s in zip(report.top_models, report.daily_top_models, strict=False)
        ],
    }


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
        "daily": daily_as_dict(report),
        "last_written_at": report.last_written_at.isoformat() if report.last_written_at else None,
        "ledger": report.health.location,
        "spooled_batches": report.health.spooled_files,
        "quarantined_records": report.health.quarantined,
        "repaired_rows": report.health.repaired_rows,
        "recount": report.health.recount or None,
    }


Breakdown = Literal["user", "model", "day", "provider"]


def breakdown_rows(
    conn: sa.Connection, zone: str, by: Breakdown, first_day: str, today: date
) -> list[dict[str, Any]]:
    """Spend grouped by one dimension since `first_day` (a local YYYY-MM-DD), from the rollups;
    by day, every day up to `today`, those without spend with zeros."""
    if by == "user":
        table = rollup_user_day_table
        keys: list[Any] = [
            table.c.user_id,
            sa.func.max(users_table.c.user_name).label("user_name"),
            sa.func.max(users_table.c.openrouter_user).label("openrouter_user"),
        ]
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
    result = conn.execute(
        sa.select(*keys, *_sums(table))
        .select_from(source)
        .where(table.c.zone == zone, table.c.day >= first_day)
        .group_by(*group)
        .order_by(*order)
    )
    rows = []
    for row in result:
        mapping = dict(row._mapping)
        totals = Totals(tuple(int(mapping.pop(name) or 0) for name in MEASURES))
        rows.append(mapping | totals_as_dict(totals))
    if by != "day":
        return rows
    found = {row["day"]: row for row in rows}
    first = date.fromisoformat(first_day)
    days = ((first + timedelta(days=n)).isoformat() for n in range((today - first).days + 1))
    return [found.get(day) or {"day": day} | totals_as_dict(Totals()) for day in days]


@dataclasses.dataclass(frozen=True, slots=True)
class UserSummary:
    """One user's own figures: today, this calendar month, and each of the last CHART_DAYS days."""

    today: Totals
    month: Totals
    daily: DailySpend


def user_usage_summary(ledger: Ledger, user_id: str, now: datetime | None = None) -> UserSummary:
    """One user's own totals for today, this calendar month and by day, in the zone the rollups
    are kept in: three ranges of one index."""
    with ledger.reading() as (conn, state):
        if state.zone is None:
            raise RollupsRecounting("the rollups are being counted; try again shortly")
        today = date.fromisoformat(local_day(now or datetime.now(UTC), ZoneInfo(state.zone)))
        return UserSummary(
            today=user_totals(conn, state.zone, user_id, today.isoformat(), today.isoformat()),
            month=user_totals(conn, state.zone, user_id, today.replace(day=1).isoformat(), today.isoformat()),
            daily=read_daily_spend(conn, state.zone, today, user_id),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class LineParts:
    """Which parts the usage line shows, and in which currency (admin valves)."""

    model: bool = True
    provider: bool = True
    tokens: bool = True
    cost: bool = True
    chat_total: bool = True
    timing: bool = True
    speed: bool = True
    today_total: bool = False
    currency: DisplayCurrency = USD


def render_usage_line(
    parts: LineParts,
    records: Sequence[UsageRecord],
    message: MessageTotals,
    chat_spend_pico: int | None = None,
    today_spend_pico: int | None = None,
) -> str:
    """The line Open WebUI shows under the model name, most important first, so a phone's narrow
    column (which cuts it short) still shows the money: the answer's cost, the chat's total, tokens,
    time, speed, provider; the model only when it is not the one requested (a router's choice).

    Money and tokens are the message's, over every generation recorded for it (a "Continue
    response" adds one, and the line says how many there are); time, speed, provider and outcome
    are this request's (`records`)."""
    money, usage, last = parts.currency.format, message.usage, records[-1]
    pieces: list[str] = [f"failed: {last.error}"] if last.status != "ok" else []
    if parts.cost:
        pieces.append(_cost_piece(message, money))
    if message.calls > 1:
        pieces.append(f"{format_count(message.calls)} calls")
    if parts.chat_total and chat_spend_pico is not None:
        pieces.append(f"chat {money(chat_spend_pico)}")
    if parts.today_total and today_spend_pico is not None:
        pieces.append(f"today {money(today_spend_pico)}")
    if parts.tokens:
        pieces += _token_pieces(usage)
    latency_ms, ttft_ms = records[0].latency_ms, records[0].ttft_ms
    if parts.timing and latency_ms is not None:
        pieces.append(f"{latency_ms / 1000:.1f} s")
    if parts.speed:
        pieces += _speed_piece(sum(record.usage.completion_tokens for record in records), latency_ms, ttft_ms)
    if parts.provider and last.provider:
        pieces.append(last.provider)
    if parts.model and last.served_model and last.served_model != last.model:
        pieces.append(last.served_model)
    return " · ".join(pieces)


def _cost_piece(message: MessageTotals, money: Callable[[int], str]) -> str:
    if message.unpriced_calls == message.calls:
        return "cost not reported"
    if message.unpriced_calls:
        return f"{money(message.spend_pico)} + {message.unpriced_calls} not reported"
    return money(message.spend_pico)


def _token_pieces(usage: Usage) -> list[str]:
    cached = f" ({format_count(usage.cached_tokens)} cached)" if usage.cached_tokens else ""
    reasoning = f" ({format_count(usage.reasoning_tokens)} reasoning)" if usage.reasoning_tokens else ""
    return [
        f"{format_count(usage.prompt_tokens)} in{cached}",
        f"{format_count(usage.completion_tokens)} out{reasoning}",
    ]


def _speed_piece(completion_tokens: int, latency_ms: int | None, ttft_ms: int | None) -> list[str]:
    """Output tokens per second of generating (after the first token), when it can be told."""
    generating_ms = (latency_ms or 0) - (ttft_ms or 0)
    if not completion_tokens or generating_ms <= 0:
        return []
    return [f"{completion_tokens * 1000 / generating_ms:.0f} tok/s"]


# ── Budgets: standing, the report's section, the read-out ──


def compact_usd(pico: int) -> str:
    """'$20' for whole dollars, else as format_usd: the usage line is short."""
    amount = pico_to_usd(pico)
    if amount >= 1 and amount == amount.to_integral_value():
        return f"${amount:,.0f}"
    return format_usd(pico)


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetStanding:
    """One user's spend against the limited rule that applies to them, in its current window."""

    user_id: str
    user_name: str
    rule: BudgetRule
    window: BudgetWindow
    spent_pico: int

    @property
    def limit_pico(self) -> int:
        return self.rule.limit_pico or 0

    @property
    def percent(self) -> int:
        """Whole percent used, rounded down: 79.9% is not yet 80%."""
        return self.spent_pico * 100 // self.limit_pico if self.limit_pico else 100

    @property
    def used_up(self) -> bool:
        return self.spent_pico >= self.limit_pico

    @property
    def line_text(self) -> str:
        """The usage line's part: 'budget 82% of $20/month'."""
        return f"budget {self.percent}% of {compact_usd(self.limit_pico)}/{self.rule.period}"

    @property
    def warning_text(self) -> str:
        return (
            f"You have used {self.percent}% of your budget ({format_usd(self.spent_pico)} of "
            f"{self.rule.amount_text}). It resets on {self.window.resets_text}."
        )


def budget_block_message(standing: BudgetStanding, admission: BudgetAdmission) -> str:
    """What a blocked user reads as the chat's error (and an API client as the error detail)."""
    budget = f"Your budget of {standing.rule.amount_text}"
    if admission.spent_pico >= standing.limit_pico:
        reason = f"{budget} is used up ({format_usd(admission.spent_pico)} spent)."
    else:
        reason = (
            f"{budget} would be exceeded by this request ({format_usd(admission.spent_pico)} spent, "
            f"{format_usd(admission.held_pico + admission.amount_pico)} held for answers in progress)."
        )
    return f"{reason} It resets on {standing.window.resets_text}. Ask an admin to raise it."


BUDGET_UNCHECKED_MESSAGE: Final = (
    "Your request was not sent: your spend budget could not be checked because the usage ledger "
    "is unavailable. Ask an admin."
)


@dataclasses.dataclass(slots=True)
class BudgetCheckFailure:
    """The latest budget check in this process that could not read the ledger (the panel says
    so): one entry, replaced by the next failure."""

    at: datetime | None = None
    reason: str = ""
    fail_closed: bool = False

    def note(self, reason: str, *, fail_closed: bool) -> None:
        self.at, self.reason, self.fail_closed = datetime.now(UTC), reason, fail_closed


BUDGET_CHECK_FAILURE = BudgetCheckFailure()


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetReport:
    """The report's Budgets section, for the panel and `openrouter-usage budgets`."""

    mode: str
    warn_percent: int
    timezone: str
    rules: tuple[tuple[BudgetRule, int], ...]  # each rule, and how many users it covers
    errors: tuple[str, ...]
    standings: tuple[BudgetStanding, ...]  # users at or over the warning line, most used first
    users_source: str


def spend_by_user_day(
    conn: sa.Connection, state: RollupState, zone: ZoneInfo, first_day: date
) -> dict[tuple[str, str], int]:
    """Spend per (user, local day) since `first_day`: rollups when kept in `zone`, else rows."""
    spends: dict[tuple[str, str], int] = {}
    if state.zone == zone.key:
        table = rollup_user_day_table
        rows = conn.execute(
            sa.select(table.c.user_id, table.c.day, table.c.spend_pico).where(
                table.c.zone == zone.key, table.c.day >= first_day.isoformat()
            )
        )
        return {(str(user_id), str(day)): int(spend) for user_id, day, spend in rows}
    since = _naive_utc(datetime.combine(first_day, datetime.min.time(), tzinfo=zone))
    rows = conn.execute(
        sa.select(ledger_table.c.user_id, ledger_table.c.created_at, ledger_table.c.spend_pico).where(
            ledger_table.c.created_at >= since
        )
    )
    for user_id, created_at, spend in rows:
        key = (str(user_id), local_day(created_at, zone))
        spends[key] = spends.get(key, 0) + int(spend)
    return spends


def build_budget_report(
    ledger: Ledger,
    settings: Settings,
    directory: Mapping[str, BudgetUser] | None,
    rows: int,
    now: datetime | None = None,
) -> BudgetReport:
    """Each rule with the users it covers, and the users at or over the warning line. Users are
    Open WebUI's (`directory`) plus any the ledger knows; without a directory only the ledger's,
    matched by id. Reads only."""
    now = now or datetime.now(UTC)
    rules = parse_budget_rules(settings.budgets)
    zone = resolve_zone(settings.report_timezone)
    windows = {period: budget_window(period, now, zone) for period in BUDGET_PERIODS}
    with ledger.reading() as (conn, state):
        names = {
            str(uid): str(name)
            for uid, name in conn.execute(sa.select(users_table.c.user_id, users_table.c.user_name))
        }
        spends = spend_by_user_day(conn, state, zone, min(w.first_day for w in windows.values()))
    people = dict(directory or {})
    for user_id in names:
        people.setdefault(user_id, BudgetUser(user_id))
    covered: dict[int, int] = {}
    standings = []
    for user_id, person in sorted(people.items()):
        rule = rules.rule_for(person)
        if rule is None:
            continue
        covered[rule.line] = covered.get(rule.line, 0) + 1
        if rule.limit_pico is None:
            continue
        window = windows[rule.period]
        spent = sum(spends.get((user_id, day), 0) for day in window.days)
        standing = BudgetStanding(user_id, names.get(user_id) or user_id, rule, window, spent)
        if standing.percent >= settings.budget_warn_percent or standing.used_up:
            standings.append(standing)
    standings.sort(key=lambda s: (-Decimal(s.spent_pico) / max(s.limit_pico, 1), s.user_id))
    source = (
        f"Open WebUI's {len(directory)} users and their groups"
        if directory is not None
        else f"the {len(names)} users in the ledger, by id (Open WebUI's users and groups could not be read)"
    )
    return BudgetReport(
        mode=settings.budget_mode,
        warn_percent=settings.budget_warn_percent,
        timezone=zone.key,
        rules=tuple((rule, covered.get(rule.line, 0)) for rule in rules.rules),
        errors=rules.errors,
        standings=tuple(standings[:rows]),
        users_source=source,
    )


def render_budgets_markdown(report: BudgetReport) -> str:
    zone, source = escape_markdown(report.timezone), escape_markdown(report.users_source, 200)
    lines = [
        "**Budgets**",
        "",
        (
            f"Mode: {report.mode}; warning at {report.warn_percent}%; windows in {zone}. "
            f"Users counted: {source}."
        ),
        "",
    ]
    if report.rules:
        lines += ["| Rule | Budget | Users |", "|---|---|--:|"]
        lines += [
            f"| {escape_markdown(rule.label)} | {rule.amount_text} | {format_count(users)} |"
            for rule, users in report.rules
        ]
    else:
        lines.append("No budget rules: everyone is unlimited.")
    lines += ["", "**At or over the warning line**", ""]
    if report.standings:
        lines += ["| User | Rule | Spent | Budget | Used | Resets |", "|---|---|--:|---|--:|---|"]
        for s in report.standings:
            blocked = " (blocked now)" if s.used_up and report.mode == "block" else ""
            lines.append(
                f"| {escape_markdown(s.user_name)} | {escape_markdown(s.rule.label)} | "
                f"{format_usd(s.spent_pico)} | {s.rule.amount_text} | "
                f"{s.percent}%{blocked} | {escape_markdown(s.window.resets_text)} |"
            )
    else:
        lines.append("Nobody.")
    if report.errors:
        lines += ["", "**Lines ignored**", ""]
        lines += [f"- {escape_markdown(error, 200)}" for error in report.errors]
    failure = BUDGET_CHECK_FAILURE
    if failure.at is not None:
        outcome = "blocked (fail closed)" if failure.fail_closed else "let through"
        lines += [
            "",
            (
                f"The ledger could not be read for a budget check at {failure.at:%Y-%m-%d %H:%M:%S} UTC "
                f"(in this worker): requests were {outcome}. Reason: {escape_markdown(failure.reason, 200)}."
            ),
        ]
    return "\n".join(lines)


def budget_report_as_dict(report: BudgetReport) -> dict[str, Any]:
    return {
        "mode": report.mode,
        "warn_percent": report.warn_percent,
        "timezone": report.timezone,
        "users_source": report.users_source,
        "rules": [
            {
                "line": rule.line,
                "rule": rule.label,
                "limit_usd": _usd_or_none(rule.limit_pico),
                "period": rule.period if rule.limit_pico is not None else None,
                "users": users,
            }
            for rule, users in report.rules
        ],
        "users": [
            {
                "user_id": s.user_id,
                "user_name": s.user_name,
                "rule": s.rule.label,
                "spent_usd": decimal_text(pico_to_usd(s.spent_pico)),
                "limit_usd": decimal_text(pico_to_usd(s.limit_pico)),
                "period": s.rule.period,
                "percent": s.percent,
                "blocked": s.used_up and report.mode == "block",
                "resets_on": s.window.resets_on.isoformat(),
            }
            for s in report.standings
        ],
        "ignored_lines": list(report.errors),
    }


@dataclasses.dataclass(frozen=True, slots=True)
class UserBudget:
    """A user's budget as their read-out shows it: the line, and for a limited budget how much of
    it is used and how much of its period has passed (whole percent, rounded down)."""

    text: str
    period: str = ""
    used_percent: int | None = None
    passed_percent: int | None = None

    def bar_lines(self) -> list[str]:
        """The two shares as bars of one length, so they compare at a glance."""
        if self.used_percent is None or self.passed_percent is None:
            return []
        rows = (("budget used", self.used_percent), (f"{self.period} passed", self.passed_percent))
        width = max(len(label) for label, _ in rows)
        return [f"{label:<{width}} │{share_bar(percent)}│ {percent}%" for label, percent in rows]


def window_passed_percent(window: BudgetWindow, now: datetime) -> int:
    """How much of the window's time has passed, in whole percent (a daylight-saving day counts
    its real hours)."""
    start, end = (
        datetime.combine(day, datetime.min.time(), tzinfo=window.zone).astimezone(UTC)
        for day in (window.first_day, window.resets_on)
    )
    return min(max(int((now.astimezone(UTC) - start) * 100 // (end - start)), 0), 100)


def user_budget(
    ledger: Ledger, settings: Settings, user: BudgetUser, now: datetime | None = None
) -> UserBudget | None:
    """The user's own budget for the read-out (None when no rules are set). Reads only."""
    rules = parse_budget_rules(settings.budgets)
    if not rules.rules:
        return None
    if rules.needs_groups and not user.is_admin:
        user = dataclasses.replace(user, groups=user_group_names(user.user_id))
    rule = rules.rule_for(user)
    if rule is None or rule.limit_pico is None:
        return UserBudget("Budget: unlimited")
    now = now or datetime.now(UTC)
    window = budget_window(rule.period, now, resolve_zone(settings.report_timezone))
    spent = user_window_spend(ledger, user.user_id, window)
    used = BudgetStanding(user.user_id, "", rule, window, spent).percent
    passed = window_passed_percent(window, now)
    return UserBudget(
        f"Budget: {rule.amount_text} · spent {format_usd(spent)} ({used}% used, {passed}% of the "
        f"{rule.period} passed) · remaining {format_usd(max(rule.limit_pico - spent, 0))} · "
        f"resets {window.resets_text}",
        rule.period,
        used,
        passed,
    )


# ══ Bulk sync: deprecated for good, interfaces kept ═══════════════════════════════════════════════

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
            "No bulk sync ran and none will: the switch was saved off.",
            "",
            # Open WebUI labels the button of a field holding a saved value "Custom"; clicking it
            # empties the field, and a save then drops it (docs/contract.md, saving the panel).
            (
                "To dismiss this notice, click **Custom** beside its title (it turns to **Default**), "
                "then **Save**."
            ),
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


async def claim_bulk_sync_notification(
    user: Mapping[str, Any] | None, notice: str, ledger: Ledger
) -> dict[str, Any] | None:
    """The warning toast for the next admin chat after bulk sync was switched on, once per saved
    notice across processes (None for anyone else, and after the first)."""
    if (user or {}).get("role") != "admin":
        return None
    key = "bulk_sync_notice:" + hashlib.sha256(notice.encode()).hexdigest()[:16]
    if not await asyncio.wait_for(asyncio.to_thread(ledger.claim_once, key), INTERNAL_WAIT_SECONDS):
        return None
    text = BULK_SYNC_NOTICE["message"] + " " + BULK_SYNC_NOTICE["details"]["alternative"]
    return {"type": "notification", "data": {"type": "warning", "content": text}}


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


# ══ Admin CLI: `openrouter-usage report | export | spool | reconcile | budgets | sync` ════════════

# One row per billed generation (a row recorded before 1.2.0 is one per message: its
# generation_key is its message id); rows of one message share message_id, to group by.
EXPORT_FIELDS: Final = (
    "id",
    "created_at",
    "message_id",
    "generation_key",
    "chat_id",
    "user_id",
    "user_name",
    "model",
    "served_model",
    "provider",
    "generation_ids",
    *TOKEN_MEASURES,
    "cost_usd",
    "upstream_cost_usd",
    "spend_usd",
    "is_byok",
    "status",
    "error",
    "latency_ms",
    "ttft_ms",
    "usage",
    "notes",
    "omitted_generation_ids",
    "billed_usd",
    "reconcile_status",
    "reconciled_at",
    "reconcile_error",
)
# A spreadsheet runs a cell (or a line inside one) that starts with one of these as a formula.
_FORMULA_START: Final = re.compile(r"(?:^|(?<=[\r\n]))(?=[=+\-@\t\r])")


# Export fields that are not ledger columns copied as they are.
_EXPORT_CONVERTERS: Final[dict[str, Callable[[sa.RowMapping], Any]]] = {
    "created_at": lambda row: row["created_at"].replace(tzinfo=UTC).isoformat().replace("+00:00", "Z"),
    "generation_ids": lambda row: json.loads(row["generation_ids"] or "[]"),
    "cost_usd": lambda row: _usd_or_none(row["cost_pico"]),
    "upstream_cost_usd": lambda row: _usd_or_none(row["upstream_cost_pico"]),
    "spend_usd": lambda row: decimal_text(pico_to_usd(row["spend_pico"])),
    "is_byok": lambda row: bool(row["is_byok"]),
    # Strict JSON even for rows an older release stored with NaN.
    "usage": lambda row: strict_json_value(json.loads(row["usage_json"])) if row["usage_json"] else None,
    "notes": lambda row: row["notes"] or "",
    "billed_usd": lambda row: _usd_or_none(row["billed_pico"]),
    "reconciled_at": lambda row: (
        row["reconciled_at"].replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
        if row["reconciled_at"]
        else None
    ),
}


def export_rows(ledger: Ledger, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Every ledger row, oldest first, with money as exact decimal strings. Never writes."""
    query = sa.select(ledger_table).order_by(ledger_table.c.id)
    if since is not None:
        query = query.where(ledger_table.c.created_at >= _naive_utc(since))
    with ledger.reading() as (conn, _):
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
    """Text for a CSV cell that a spreadsheet will not run as a formula: a formula prefix at the
    start, or after a line break inside the cell, gets an apostrophe before it."""
    return _FORMULA_START.sub("'", cell_text(value))


def write_csv(rows: Iterable[Mapping[str, Any]], fields: Sequence[str], out: io.TextIOBase | Any) -> None:
    # RFC 4180 line ends: the writer quotes every cell holding CR, LF or the delimiter.
    writer = csv.writer(out, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    writer.writerow(fields)
    for row in rows:
        writer.writerow([csv_cell(row.get(field)) for field in fields])


def write_table(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], out: Any) -> None:
    """An aligned plain-text table: numbers right-aligned, text left-aligned."""
    # No control or bidi characters: a user name must not be able to drive the admin's terminal.
    cells = [[terminal_text(cell_text(row.get(field))) for field in fields] for row in rows]
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


def terminal_text(text: str) -> str:
    """One line of printable text: line breaks and tabs become spaces, and C0/C1 controls, bidi
    overrides and other invisible format characters are dropped."""
    flat = text.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    return "".join(character for character in flat if character.isprintable())


_NUMERIC_CELL: Final = re.compile(rf"-?(?:[{''.join(CURRENCY_SYMBOLS.values())}]|[A-Z]{{3}} )?[\d,]+(\.\d+)?")


def _looks_numeric(text: str) -> bool:
    return bool(_NUMERIC_CELL.fullmatch(text))


class BadOption(ValueError):
    """A command-line option the CLI cannot read; its message says what works, for a person."""


def parse_since(text: str, zone: ZoneInfo, now: datetime | None = None) -> str:
    """'30d' (the last 30 local days, today included) or an ISO date, as a local YYYY-MM-DD."""
    text = text.strip()
    match = re.fullmatch(r"(\d+)d", text)
    if match:
        today = date.fromisoformat(local_day(now or datetime.now(UTC), zone))
        return (today - timedelta(days=max(int(match.group(1)), 1) - 1)).isoformat()
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise BadOption(
            f"--since {text!r} is neither a number of days nor a date. Give a number of days, such "
            "as 30d for the last 30 days, or a date as YYYY-MM-DD, such as 2026-11-01."
        ) from None


def open_webui_data_dirs() -> list[Path]:
    """Where an Open WebUI install keeps its data: $DATA_DIR, the data folder of an importable
    open_webui package (pip installs), and the Docker image's /app/backend/data."""
    directories = []
    if os.environ.get("DATA_DIR"):
        directories.append(Path(os.environ["DATA_DIR"]).absolute())
    with contextlib.suppress(Exception):  # find_spec locates the package without importing it
        spec = importlib.util.find_spec("open_webui")
        if spec is not None and spec.origin:
            package = Path(spec.origin).parent
            directories += [package / "data", package.parent / "data"]
    directories.append(Path("/app/backend/data"))
    return directories


def find_ledger_url(explicit: str = "") -> str | None:
    """The ledger the CLI reads: --database-url, else $OPENROUTER_USAGE_DATABASE_URL, else Open
    WebUI's PostgreSQL $DATABASE_URL, else an existing ledger file in an Open WebUI data
    directory; None when there is none (a read never creates one)."""
    for candidate in (explicit, os.environ.get(DATABASE_URL_ENV, "")):
        if candidate.strip():
            return normalize_database_url(candidate.strip())
    owui_url = os.environ.get("DATABASE_URL", "").strip()
    if owui_url.startswith(("postgres://", "postgresql")):
        return normalize_database_url(owui_url)
    for directory in open_webui_data_dirs():
        if (directory / DEFAULT_SQLITE_NAME).is_file():
            return f"sqlite:///{directory / DEFAULT_SQLITE_NAME}"
    return None


NO_LEDGER_HELP: Final = (
    f"no ledger found. Name it with --database-url, or set ${DATABASE_URL_ENV}, $DATABASE_URL "
    f"(Open WebUI's PostgreSQL) or $DATA_DIR (the folder holding {DEFAULT_SQLITE_NAME})."
)
CLI_ERRORS: Final = (
    sa.exc.SQLAlchemyError,
    UnsupportedDatabase,
    NoLedger,
    LedgerNeedsUpgrade,
    RollupsRecounting,
    OSError,
    ValueError,
)


def cli_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `openrouter-usage` console script. Exit status 2: nothing to read."""
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
            f"$DATABASE_URL, else {DEFAULT_SQLITE_NAME} in $DATA_DIR or an Open WebUI data directory)",
        )

    export = commands.add_parser("export", help="every ledger record, one per row or object")
    export.add_argument("--format", choices=("json", "csv"), default="json")
    export.add_argument("--since", help="only records created on or after this ISO date or time (UTC)")
    add_database_option(export)

    report = commands.add_parser("report", help="spend, requests and tokens, as in the settings panel")
    report.add_argument("--since", default="30d", help="'30d' or an ISO date (default: 30d)")
    report.add_argument("--by", choices=("user", "model", "day", "provider"), default="user")
    report.add_argument("--format", choices=("table", "json", "csv"), default="table")
    report.add_argument(
        "--timezone",
        default=None,
        help="time zone of 'today' and of days (default: the zone the ledger's rollups are kept in, "
        "the settings' report time zone); another zone is counted from the ledger rows, more slowly",
    )
    report.add_argument("--rows", type=int, default=10, help="rows in the top lists (default: 10)")
    report.add_argument(
        "--currency",
        default="",
        help='money in the tables in another currency: a code and its rate per USD, e.g. "EUR 0.92" '
        "(JSON and CSV keep exact USD)",
    )
    add_database_option(report)

    spool = commands.add_parser(
        "spool", help="records waiting for replay, and quarantined ones, with reasons"
    )
    action = spool.add_mutually_exclusive_group()
    action.add_argument("--replay", action="store_true", help="write them to the ledger now")
    action.add_argument("--discard", action="store_true", help="delete them (asks first)")
    spool.add_argument("--yes", action="store_true", help="with --discard: do not ask")
    add_database_option(spool)

    reconcile = commands.add_parser(
        "reconcile",
        help=f"check pending records against OpenRouter's bill now (key: ${API_KEY_ENV}, never a flag)",
    )
    reconcile.add_argument("--since", default="7d", help="records since '7d' or an ISO date (default: 7d)")
    reconcile.add_argument(
        "--base-url",
        default=OPENROUTER_API_BASE,
        help=f"OpenRouter API base (default: {OPENROUTER_API_BASE})",
    )
    add_database_option(reconcile)
    budgets = commands.add_parser(
        "budgets", help="budget rules, users at or over the warning line, ignored lines (as in the panel)"
    )
    budgets.add_argument("--format", choices=("table", "json", "csv"), default="table")
    budgets.add_argument("--rows", type=int, default=10, help="users listed (default: 10)")
    budgets.add_argument(
        "--webui-database-url",
        default="",
        help="Open WebUI's database, for users and groups (default: $DATABASE_URL, else webui.db in "
        "$DATA_DIR or an Open WebUI data directory)",
    )
    add_database_option(budgets)

    sync = commands.add_parser("sync", help="deprecated: prints why bulk sync cannot work, requests nothing")
    sync.add_argument("--date", help="ignored; kept so old scripts keep working")
    add_database_option(sync)

    args = parser.parse_args(argv)
    try:
        return run_command(args, sys.stdout)
    except BrokenPipeError:
        # The reader went away (`report | head`): stop quietly, and keep the interpreter's final
        # flush of stdout from raising the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def run_command(args: argparse.Namespace, out: Any) -> int:
    """The parsed command; its exit status."""
    if args.command == "sync":
        json.dump(sync_openrouter_usage(date=args.date), out, indent=2)
        out.write("\n")
        return 0
    url = find_ledger_url(args.database_url)
    if url is None:
        sys.stderr.write(f"openrouter-usage: {NO_LEDGER_HELP}\n")
        return 2
    ledger = Ledger(url)
    try:
        return run_ledger_command(args, ledger, out)
    except BrokenPipeError:
        raise
    except BadOption as exc:
        sys.stderr.write(f"openrouter-usage: {exc}\n")
        return 2
    except CLI_ERRORS as exc:
        sys.stderr.write(f"openrouter-usage: {cli_error_text(exc)} ({ledger.location})\n")
        return 2
    finally:
        ledger.dispose()


def run_ledger_command(args: argparse.Namespace, ledger: Ledger, out: Any) -> int:
    """`spool`, `export`, `budgets` or `report` on an existing ledger; the exit status."""
    if args.command == "spool":
        return spool_command(ledger, out, replay=args.replay, discard=args.discard, assume_yes=args.yes)
    if args.command == "reconcile":
        return reconcile_command(ledger, args.since, args.base_url, out)
    if args.command == "budgets":
        directory = webui_directory_at(find_webui_database_url(args.webui_database_url))
        settings = saved_settings(SETTINGS_FILE.recall())
        print_budgets(build_budget_report(ledger, settings, directory, max(args.rows, 1)), args.format, out)
        return 0
    if args.command == "export":
        since = export_since(args.since) if args.since else None
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        write_export(export_rows(ledger, since), args.format, out)
        return 0
    currency = cli_currency(args.currency, args.format)
    zone = resolve_zone(args.timezone) if args.timezone else None
    usage_report = build_usage_report(ledger, zone, max(args.rows, 1), breakdown=(args.by, args.since))
    print_report(usage_report, args.by, args.format, out, currency)
    return 0


def export_since(text: str) -> datetime:
    """`export --since`: an ISO date or date and time."""
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadOption(
            f"--since {text!r} is not a date. Give a date as YYYY-MM-DD, such as 2026-11-01, or a "
            "date and time, such as 2026-11-01T09:30 (UTC unless it names its offset)."
        ) from None


def cli_currency(text: str, fmt: str) -> DisplayCurrency:
    """`report --currency` for the tables; JSON and CSV keep exact USD."""
    if not text.strip():
        return USD
    if fmt != "table":
        raise BadOption(f"--currency applies to tables; --format {fmt} keeps exact USD")
    currency = parse_display_currency(text)
    if currency.problem:
        raise BadOption(f'--currency {text!r}: {currency.problem} (e.g. "EUR 0.92")')
    return currency


CLI_LEASE_WAIT_SECONDS: Final = 2 * LEASE_SECONDS


def reconcile_command(ledger: Ledger, since_text: str, base_url: str, out: Any) -> int:
    """One reconciliation pass over the pending records since `since_text`, due or not (waiting
    for a server process that holds the lease); prints a summary."""
    api_key, source = openrouter_api_key(Settings())
    if not api_key:
        problem = f" (${API_KEY_ENV}: {MALFORMED_KEY_NOTE})" if source else ""
        sys.stderr.write(
            f"openrouter-usage: set ${API_KEY_ENV} to an OpenRouter API key (any key works){problem}\n"
        )
        return 2
    since = datetime.fromisoformat(parse_since(since_text, ZoneInfo("UTC"))).replace(tzinfo=UTC)
    account = OpenRouterAccount(api_key, base_url)
    try:
        reconciler = Reconciler(ledger, account)
        deadline = time.monotonic() + CLI_LEASE_WAIT_SECONDS
        while (summary := reconciler.run_pass(since=since, due_only=False)).busy:
            if time.monotonic() >= deadline:
                sys.stderr.write(
                    f"openrouter-usage: {terminal_text(summary.busy)} is reconciling this ledger; "
                    "try again later\n"
                )
                return 1
            time.sleep(1.0)
    finally:
        account.close()
    out.write(reconcile_summary_text(summary))
    return 1 if summary.rejected else 0


def reconcile_summary_text(summary: ReconcileSummary) -> str:
    if summary.rejected:
        return f"OpenRouter rejected the key ({summary.rejected}); nothing was checked.\n"
    sign = "+" if summary.difference_pico >= 0 else "-"
    difference = (
        f" ({sign}{format_usd(abs(summary.difference_pico))}, OpenRouter's bill minus the ledger)"
        if summary.differs
        else ""
    )
    lines = [
        f"Looked up {count_of(summary.looked_up, 'generation')} at OpenRouter.",
        (
            f"matched: {format_count(summary.matched)} · "
            f"differ: {format_count(summary.differs)}{difference} · "
            f"stopped answers priced: {format_count(summary.priced_stopped)} · not found: "
            f"{format_count(summary.not_found)} · failed: {format_count(summary.failed)} · "
            f"without a generation id: {format_count(summary.no_id)}"
        ),
        f"still waiting: {format_count(summary.waiting)} (no record at OpenRouter yet; retried with backoff)",
    ]
    if summary.errors:
        lines.append("errors: " + ", ".join(f"{k}: {v}" for k, v in sorted(summary.errors.items())))
    return "\n".join(lines) + "\n"


def find_webui_database_url(explicit: str = "") -> str | None:
    """Open WebUI's own database, for its users and groups: --webui-database-url, else
    $DATABASE_URL, else webui.db in an Open WebUI data directory; None when there is none."""
    for candidate in (explicit, os.environ.get("DATABASE_URL", "")):
        if candidate.strip():
            return normalize_database_url(candidate.strip())
    for directory in open_webui_data_dirs():
        if (directory / "webui.db").is_file():
            return f"sqlite:///{directory / 'webui.db'}"
    return None


def webui_directory_at(url: str | None) -> dict[str, BudgetUser] | None:
    """Open WebUI's users and groups read from its database at `url`; None when unreadable."""
    if url is None:
        return None
    engine = sa.create_engine(parse_database_url(url))
    try:
        with engine.connect() as conn:
            return read_webui_directory(conn)
    except Exception as exc:
        sys.stderr.write(f"openrouter-usage: Open WebUI's users unreadable ({cli_error_text(exc)})\n")
        return None
    finally:
        engine.dispose()


BUDGET_CSV_FIELDS: Final = (
    "section",
    "line",
    "rule",
    "limit_usd",
    "period",
    "users",
    "user_id",
    "user_name",
    "spent_usd",
    "percent",
    "blocked",
    "resets_on",
    "reason",
)


def print_budgets(report: BudgetReport, fmt: str, out: Any) -> None:
    """`openrouter-usage budgets`: the panel's Budgets section as a table, JSON or CSV."""
    data = budget_report_as_dict(report)
    if fmt == "json":
        json.dump(data, out, indent=2)
        out.write("\n")
        return
    rules = [{"section": "rule", **rule} for rule in data["rules"]]
    users = [{"section": "user", **user} for user in data["users"]]
    ignored = [{"section": "ignored", "reason": reason} for reason in data["ignored_lines"]]
    if fmt == "csv":
        write_csv([*rules, *users, *ignored], BUDGET_CSV_FIELDS, out)
        return
    out.write(
        f"Budgets: mode {report.mode}, warning at {report.warn_percent}%, windows in {report.timezone}\n"
        f"Users counted: {terminal_text(report.users_source)}\n\n"
    )
    write_table(
        [_as_shown(rule, USD) for rule in rules], ["line", "rule", "limit_usd", "period", "users"], out
    )
    out.write("\nAt or over the warning line:\n\n")
    write_table(
        [_as_shown(user, USD) for user in users],
        [
            "user_id",
            "user_name",
            "rule",
            "spent_usd",
            "limit_usd",
            "period",
            "percent",
            "blocked",
            "resets_on",
        ],
        out,
    )
    for reason in data["ignored_lines"]:
        out.write(f"Ignored: {terminal_text(reason)}\n")


def cli_error_text(exc: BaseException) -> str:
    if isinstance(exc, NoLedger | LedgerNeedsUpgrade | RollupsRecounting):
        return str(exc)
    if isinstance(exc, sa.exc.ArgumentError):  # its message quotes the URL, secrets and all
        return "the database URL could not be parsed"
    return short_error(exc)


def write_export(rows: Iterable[dict[str, Any]], fmt: str, out: Any) -> None:
    if fmt == "csv":
        write_csv(rows, EXPORT_FIELDS, out)
        return
    out.write("[")
    for index, row in enumerate(rows):
        out.write(("," if index else "") + "\n  " + json.dumps(row, ensure_ascii=False, allow_nan=False))
    out.write("\n]\n")


def spool_command(ledger: Ledger, out: Any, *, replay: bool, discard: bool, assume_yes: bool) -> int:
    """`openrouter-usage spool`: list, replay or discard what waits outside the ledger."""
    spool = ledger.spool
    if replay:
        replayed = ledger.replay_spool()
        stored, refused = ledger.retry_quarantined()
        out.write(
            f"Replayed {replayed} spooled record(s); {stored} quarantined record(s) stored, "
            f"{refused} still refused.\n"
        )
        return 0 if not refused else 1
    pending = spool.pending_files()
    quarantined = spool.quarantined()
    if discard:
        total = len(pending) + len(quarantined)
        if total and not assume_yes:
            if not sys.stdin.isatty():
                sys.stderr.write("openrouter-usage: refusing to discard without --yes (no terminal to ask)\n")
                return 2
            answer_text = input(
                f"Delete {len(pending)} spool file(s) and {len(quarantined)} quarantined "
                "record(s) for good? Type yes: "
            )
            if answer_text.strip().lower() != "yes":
                out.write("Nothing discarded.\n")
                return 1
        for path in [*pending, *spool.quarantined_files()]:
            path.unlink(missing_ok=True)
        out.write(f"Discarded {len(pending)} spool file(s) and {len(quarantined)} quarantined record(s).\n")
        return 0
    rows = []
    for path in pending:
        with contextlib.suppress(OSError), path.open(encoding="utf-8") as handle:
            records, unreadable = _read_records(handle)
            rows += [_spool_row("pending", record, "database unavailable when written") for record in records]
            rows += [{"state": "pending", "reason": "unreadable line"} for _ in unreadable]
    for entry in quarantined:
        record = entry_record(entry)
        reason = str(entry.get("reason", ""))
        rows.append(
            _spool_row("quarantined", record, reason)
            if record
            else {"state": "quarantined", "reason": reason}
        )
    out.write(f"Spool: {spool.directory}\n")
    out.write(f"{len(pending)} file(s) waiting for replay; {len(quarantined)} record(s) quarantined.\n\n")
    if rows:
        write_table(
            rows, ["state", "message_id", "created_at", "user_id", "model", "spend_usd", "reason"], out
        )
    return 0


def _spool_row(state: str, record: UsageRecord, reason: str) -> dict[str, Any]:
    return {
        "state": state,
        "message_id": record.message_id,
        "created_at": record.created_at.isoformat(),
        "user_id": record.user_id,
        "model": record.served_model or record.model,
        "spend_usd": decimal_text(pico_to_usd(record.usage.spend_pico)),
        "reason": reason,
    }


def print_report(
    usage_report: UsageReport, by: str, fmt: str, out: Any, currency: DisplayCurrency = USD
) -> None:
    money = f"spend_{currency.code.lower()}"
    fields = {
        "user": ["user_id", "user_name", "openrouter_user"],
        "model": ["served_model", "provider"],
        "day": ["day"],
        "provider": ["provider"],
    }[by] + [
        money if fmt == "table" else "spend_usd",
        "requests",
        "failed",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "total_tokens",
    ]
    breakdown, since = usage_report.breakdown, usage_report.breakdown_since
    if fmt == "json":
        json.dump(
            report_as_dict(usage_report) | {"breakdown": {"by": by, "since": since, "rows": breakdown}},
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
            money: currency.format(usage_report.periods[key].spend_pico),
            "requests": format_count(usage_report.periods[key].requests),
            "tokens": format_count(usage_report.periods[key].total_tokens),
            "failed": format_count(usage_report.periods[key].failed),
        }
        for key, label in [(k, lbl) for k, lbl, _ in PERIODS] + [("all_time", "All time")]
    ]
    out.write(f"Ledger: {terminal_text(usage_report.health.location)}   time zone: {usage_report.timezone}\n")
    if currency.code != "USD":
        out.write(f"Money in {currency.code} at {currency.rate_text()}; the ledger keeps exact USD.\n")
    for line in health_lines(usage_report.health)[1:]:
        out.write(terminal_text(line.replace("\\", "")) + "\n")
    out.write("\n")
    write_table(periods, ["period", money, "requests", "tokens", "failed"], out)
    daily = usage_report.daily
    chart = terminal_chart_lines(daily, currency.format, shutil.get_terminal_size().columns)
    out.write(f"\nSpend by day: {daily_summary_text(daily, currency.format)}\n\n")
    out.write("\n".join(chart) + "\n")
    for title, series in (("users", usage_report.daily_top_users), ("models", usage_report.daily_top_models)):
        if series:
            out.write(f"\nTop {title}, day by day (one scale):\n")
            out.write("\n".join(series_lines(series, currency.format, chart)) + "\n")
    out.write(f"\nBy {by}, since {since}:\n\n")
    write_table([_as_shown(row, currency) for row in breakdown], fields, out)


def _as_shown(row: Mapping[str, Any], currency: DisplayCurrency) -> dict[str, Any]:
    """A report row as the tables show money (in `currency`, its fields renamed from `_usd`) and
    counts (`$0.0314`, `68,883`); JSON and CSV keep the exact decimals in USD."""
    shown: dict[str, Any] = {}
    for key, value in row.items():
        if key.endswith("_usd"):
            money = currency.format(usd_to_pico(Decimal(value))) if value is not None else None
            shown[key.removesuffix("usd") + currency.code.lower()] = money
        elif isinstance(value, int) and not isinstance(value, bool):
            shown[key] = format_count(value)
        else:
            shown[key] = value
    return shown


# ══ The filter ════════════════════════════════════════════════════════════════════════════════════


class Settings(BaseModel):
    """The admin valves the hooks and the readers use. `Filter.Valves` adds the panel's read-only
    fields (the report and the bulk-sync notice); in the settings panel they follow these."""

    priority: int = Field(default=0, title="Priority", description="Order among filters (lower runs first).")
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
    capture_stream: bool = Field(
        default=True,
        title="Read streamed chunks",
        description="Off: this filter leaves streamed chunks alone, for the lowest server cost. "
        "Each answer is then recorded from the usage Open WebUI keeps, without generation ids, "
        "provider, time to first token or per-call usage, and a stopped generation cannot be captured.",
    )
    show_usage_line: bool = Field(
        default=True,
        title="Usage line",
        description="Show the usage line with each answer (above it, under the model name).",
    )
    line_show_model: bool = Field(
        default=True, title="Line: model", description="The model that served, when not the one requested."
    )
    line_show_provider: bool = Field(default=True, title="Line: provider", description="The provider.")
    line_show_tokens: bool = Field(default=True, title="Line: tokens", description="Tokens in and out.")
    line_show_cost: bool = Field(default=True, title="Line: cost", description="This answer's cost.")
    line_show_chat_total: bool = Field(
        default=True, title="Line: chat total", description="The chat's total cost."
    )
    line_show_today_total: bool = Field(
        default=False, title="Line: today's total", description="The user's own spend today."
    )
    line_show_timing: bool = Field(default=True, title="Line: time", description="Time to the full answer.")
    line_show_speed: bool = Field(default=True, title="Line: speed", description="Output tokens per second.")
    display_currency: str = Field(
        default="USD",
        title="Display currency",
        description="Money in the usage line, this report and users' read-outs: `USD`, or a currency code "
        "and its rate per USD, then optionally the rate's date: `EUR 0.92 2026-11-29`. The ledger, the "
        "export and the CLI keep exact USD.",
    )
    report_timezone: str = Field(
        default="UTC", title="Report time zone", description="IANA name; decides what 'today' means."
    )
    report_rows: int = Field(
        default=10, title="Report rows", description="Rows in the report's top users and top models."
    )
    openrouter_api_key: str = Field(
        default="",
        title="OpenRouter API key",
        description="Checks each answer against OpenRouter's own bill (read-only lookups; any key "
        f"works). Empty: `${API_KEY_ENV}`. Never shown, logged or exported.",
        json_schema_extra={"input": {"type": "password"}},
    )
    openrouter_api_base: str = Field(
        default=OPENROUTER_API_BASE,
        title="OpenRouter API base",
        description="Where the lookups go: OpenRouter, or a proxy in front of it.",
    )
    reconcile: bool = Field(
        default=True,
        title="Check against the bill",
        description="A few seconds after each answer, look its generations up at OpenRouter "
        "(`/generation?id=`) and keep OpenRouter's bill beside the ledger's figures; stopped answers "
        "are priced this way. Needs a key.",
    )
    reconcile_lookups_per_second: float = Field(
        default=DEFAULT_LOOKUPS_PER_SECOND,
        title="Lookups per second",
        description="At most this many lookups per second (one process looks up at a time).",
        gt=0,
        le=50,
    )
    send_user_id: bool = Field(
        default=True,
        title="Send user id",
        description="Send OpenRouter an opaque, stable id per user as `user` (an HMAC of the user id, "
        "never the e-mail or name), so its Activity view can be filtered by person. "
        "`openrouter-usage report --by user` prints the id next to each name.",
    )
    budgets: str = Field(
        default="",
        title="Budgets",
        description="Spend limits, one rule per line: `default: $20 per month`, `group Interns: $2 per day`, "
        "`user alice@example.com: $50 per week`, `user bob@example.com: unlimited` (users by e-mail or "
        "id, groups by their Open WebUI name). Periods: day, week (Monday to Sunday), month, in the "
        "report time zone. **Which rule applies:** 1. the user's own `user` rule; 2. otherwise the most "
        "generous of their groups' rules (compared per 30 days); 3. otherwise `default`; 4. otherwise "
        "unlimited. Admins are unlimited unless a `user` rule names them. A line that does not parse is "
        "ignored (it never blocks anyone) and named in the report's Budgets section.",
    )
    budget_warn_percent: int = Field(
        default=80,
        title="Budget warning at %",
        description="Above this share of their budget, users see it in the usage line and get one "
        "notification per window.",
    )
    budget_mode: Literal["block", "warn only"] = Field(
        default="block",
        title="Budget mode",
        description="block: a request that would pass the budget is not sent. warn only: never blocks.",
    )
    budget_reservation_usd: str = Field(
        default="0.05",
        title="Budget reservation $",
        description="Held against the budget while a request runs when the user has no history on "
        "that model (otherwise their 95th-percentile cost on it over 30 days).",
    )
    budget_fail_closed: bool = Field(
        default=False,
        title="Budget: fail closed",
        description="Off: when the ledger cannot be read, requests go through (the report says so). "
        "On: they are blocked with a message saying why.",
    )

    def line_parts(self) -> LineParts:
        return LineParts(
            model=self.line_show_model,
            provider=self.line_show_provider,
            tokens=self.line_show_tokens,
            cost=self.line_show_cost,
            chat_total=self.line_show_chat_total,
            timing=self.line_show_timing,
            speed=self.line_show_speed,
            today_total=self.line_show_today_total,
            currency=parse_display_currency(self.display_currency),
        )

    def budget_reservation_pico(self) -> int:
        """The reservation without history; the default when the valve is not an amount."""
        amount = to_decimal(self.budget_reservation_usd.strip().lstrip("$"))
        if amount is None or not 0 <= amount <= MAX_COMPLETION_USD:
            amount = Decimal("0.05")
        return usd_to_pico(amount)


# ── Saved settings, for code Open WebUI calls without them ──
# The settings panel's report and the user read-out run inside Open WebUI's synchronous valve-spec
# builders, which pass no valves. They read the function's saved valves from Open WebUI's own store,
# so every worker and replica shows the same database and zone; the file is the fallback (and the
# CLI's only source).


class SettingsFile:
    """The admin valves last saved or used in this process, in a small file in the data
    directory: the fallback when Open WebUI's store cannot be read, and what the CLI reads. A
    database URL holding a secret is never written there."""

    def __init__(self) -> None:
        self._last: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _path(self) -> Path:
        return data_dir() / "openrouter_usage_settings.json"

    def remember(self, values: Mapping[str, Any]) -> None:
        """Keep `values` if they changed. Runs whenever Open WebUI builds the valves (once per hook
        per request), so the unchanged case copies nothing and takes no lock."""
        if values == self._last:
            return
        snapshot = dict(values)
        with self._lock:
            self._last = snapshot
        persisted = dict(snapshot)
        persisted.pop("openrouter_api_key", None)  # a secret: the CLI reads $OPENROUTER_API_KEY
        if persisted.get("database_url") and url_has_secret(str(persisted["database_url"])):
            persisted.pop("database_url")
        try:
            path = self._path()
            # Unique per writer: replicas sharing a data volume may run under the same PID.
            temporary = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(persisted, handle)
            temporary.replace(path)
        except OSError as exc:
            log.debug("openrouter_usage: could not persist settings (%s)", exc)

    def last_seen(self) -> dict[str, Any]:
        """The valves this copy of the function last saw in this process, without the file (which
        every copy installed in this data directory writes)."""
        with self._lock:
            return dict(self._last or {})

    def recall(self) -> dict[str, Any]:
        with self._lock:
            if self._last is not None:
                return dict(self._last)
        try:
            loaded = json.loads(self._path().read_text(encoding="utf-8"))
            return loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            return {}


SETTINGS_FILE = SettingsFile()


def saved_valves() -> dict[str, Any]:
    """The saved valves: Open WebUI's store, else the settings file. Blocking (off the loop)."""
    function_id = open_webui_function_id()
    stored = valves_in_open_webui_store(function_id) if function_id else None
    return stored if stored is not None else SETTINGS_FILE.recall()


def saved_settings(valves: Mapping[str, Any]) -> Settings:
    """`valves` as Settings, defaults filling gaps; a saved value that no longer validates (from
    an older release) falls back to its default rather than hiding the report."""
    known = {key: value for key, value in valves.items() if key in Settings.model_fields}
    try:
        return Settings(**known)
    except ValueError:
        return Settings.model_construct(**Settings().model_dump() | known)


# ── The panel and the read-out ──

PANEL_TIMEOUT_SECONDS: Final = 3.0


def run_off_loop(work: Callable[[], Any], timeout: float = PANEL_TIMEOUT_SECONDS) -> Any:
    """Run `work` (database reads) on a thread of its own, waiting at most `timeout`: Open WebUI
    builds valve specs synchronously on its event loop, so this bounds how long a panel can hold
    it. The thread ends with the work, so nothing stays behind (panels open rarely)."""
    outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            outcome.set_result(work())
        except BaseException as exc:
            outcome.set_exception(exc)

    threading.Thread(target=run, name="openrouter_usage_read", daemon=True).start()
    return outcome.result(timeout=timeout)


def admin_report_markdown() -> str:
    """The settings-panel report, or a line saying why it cannot be read and what waits. Reads
    only: the rollups are read in the zone they are kept in."""

    def read() -> tuple[Settings, Ledger, UsageReport | str, ReconciliationView | None, str]:
        settings = saved_settings(saved_valves())
        writer = writer_for(resolve_database_url(settings.database_url))
        rows = min(max(settings.report_rows, 1), 100)
        try:
            report = build_usage_report(writer.ledger, None, rows)
            view = read_reconciliation_view(writer.ledger, report)
            budgets = budgets_markdown(settings, writer.ledger, rows)
        except (NoLedger, LedgerNeedsUpgrade, RollupsRecounting) as exc:
            return settings, writer.ledger, str(exc), None, ""
        except Exception as exc:
            return settings, writer.ledger, cli_error_text(exc), None, ""
        finally:
            writer.release_if_idle()
        return settings, writer.ledger, report, view, budgets

    try:
        settings, ledger, report, view, budgets = run_off_loop(read)
    except concurrent.futures.TimeoutError:
        return f"Usage report unavailable: the ledger did not answer within {PANEL_TIMEOUT_SECONDS:.0f} s."
    except Exception as exc:
        return f"Usage report unavailable: {escape_markdown(cli_error_text(exc), 300)}."
    if isinstance(report, str):
        unavailable = f"Usage report unavailable: {escape_markdown(report, 300)} (`{ledger.location}`)."
        return unavailable + waiting_note(ledger)
    wanted = resolve_zone(settings.report_timezone).key
    currency = parse_display_currency(settings.display_currency)
    api_key, key_source = openrouter_api_key(settings)
    markdown = render_report_markdown(report, currency) + render_reconciliation_markdown(
        view, key_source, enabled=settings.reconcile, currency=currency, key_in_use=key_fingerprint(api_key)
    )
    if wanted != report.timezone and not report.health.recount:
        markdown += (
            f"\n\nThe report time zone is now {escape_markdown(wanted)}: the rollups are recounted "
            "for it from the next recorded completion; until then figures are by day in "
            f"{escape_markdown(report.timezone)}."
        )
    return markdown + (f"\n\n{budgets}" if budgets else "")


def budgets_markdown(settings: Settings, ledger: Ledger, rows: int) -> str:
    """The report's Budgets section ("" when no budget is set), with Open WebUI's users and groups
    when they can be read. Blocking."""
    if not settings.budgets.strip():
        return ""
    directory = None
    try:
        with open_webui_connection() as conn:
            directory = read_webui_directory(conn) if conn is not None else None
    except Exception as exc:
        log.warning("openrouter_usage: Open WebUI's users unreadable for the budgets (%s)", short_error(exc))
    return render_budgets_markdown(build_budget_report(ledger, settings, directory, rows))


def waiting_note(ledger: Ledger) -> str:
    """What waits outside the ledger, for a panel that cannot read it."""
    with contextlib.suppress(OSError):
        pending, quarantined = ledger.spool.pending_count(), ledger.spool.quarantined_count()
        parts = []
        if pending:
            parts.append(f"{pending} spooled batch(es) of completions will be written once it can be reached")
        if quarantined:
            parts.append(f"{quarantined} record(s) are quarantined (`openrouter-usage spool` lists them)")
        return " " + "; ".join(parts) + "." if parts else ""
    return ""


# Open WebUI 0.12.4 draws a control for a valve of an enum, boolean, multiselect or non-string
# type, and for a string whose input type is password, select, color or map (else a text box); a
# string with any other input type shows only its title, the Default/Custom button and its
# description (Markdown). The panel's read-only fields use one, so nothing invites typing; their
# values are never stored (Filter.Valves, Filter.UserValves), whatever that button is set to.
READ_ONLY_INPUT: Final = "readonly"


def _admin_report_schema(schema: dict[str, Any]) -> None:
    schema["input"] = {"type": READ_ONLY_INPUT}
    schema["description"] = admin_report_markdown()


def _bulk_sync_notice_schema(schema: dict[str, Any]) -> None:
    """The notice of this copy of the function only: another copy, installed under another id,
    has its own saved valves (and shares the settings file, so that is not read here)."""
    schema["input"] = {"type": READ_ONLY_INPUT}
    function_id = open_webui_function_id()
    try:
        stored = run_off_loop(lambda: valves_in_open_webui_store(function_id)) if function_id else None
    except Exception:
        stored = None
    notice = (stored if stored is not None else SETTINGS_FILE.last_seen()).get("bulk_sync_notice")
    if notice:
        schema["description"] = bulk_sync_notice_markdown()


@dataclasses.dataclass(frozen=True, slots=True)
class UserReadout:
    """A user's own figures, as their valves panel shows them: (label, figures) lines, the chart
    of their last days and their budget's bars (monospace lines), then a note (the display
    currency's rate, or why there are no figures)."""

    lines: tuple[tuple[str, str], ...] = ()
    note: str = ""
    chart: tuple[str, ...] = ()

    def markdown(self) -> str:
        items = "\n".join(f"- **{label}:** {figures}" for label, figures in self.lines)
        chart = code_block(self.chart) if self.chart else ""
        return "\n\n".join(part for part in (items, chart, self.note) if part)

    def options(self) -> list[dict[str, str]]:
        """The same, as the option list Open WebUI asks the options method for."""
        lines = self.lines or (("", self.note),)
        return [
            {"value": label, "label": f"{label}: {figures}" if label else figures} for label, figures in lines
        ]


def user_readout_lines(
    summary: UserSummary, currency: DisplayCurrency, budget: UserBudget | None = None
) -> tuple[tuple[str, str], ...]:
    """Spend, requests and tokens today and this calendar month, the last days in words, then
    the budget line (the budget, what is spent and how much of it and of its period, what
    remains, when it resets) when budgets are set."""
    lines = []
    for label, totals in (("Today", summary.today), ("This month", summary.month)):
        figures = (
            currency.format(totals.spend_pico),
            count_of(totals.requests, "request"),
            count_of(totals.total_tokens, "token"),
        )
        lines.append((label, " · ".join(figures)))
    lines.append(
        (
            f"Last {CHART_DAYS} days",
            f"{daily_figures_text(summary.daily, currency.format)} Days in {summary.daily.zone}.",
        )
    )
    if budget:
        label, _, text = budget.text.partition(": ")
        lines.append((label, text))
    return tuple(lines)


def user_readout(user: Mapping[str, Any] | None) -> UserReadout:
    """The user's own read-out, from the ledger the saved valves name (reads only)."""
    user_id = str((user or {}).get("id") or "")
    if not user_id:
        return UserReadout(note="Usage unavailable: not signed in.")

    def read() -> tuple[UserSummary, DisplayCurrency, UserBudget | None]:
        settings = saved_settings(saved_valves())
        currency = parse_display_currency(settings.display_currency)
        writer = writer_for(resolve_database_url(settings.database_url))
        try:
            budget_user = BudgetUser(
                user_id, str((user or {}).get("email") or ""), (user or {}).get("role") == "admin"
            )
            budget = user_budget(writer.ledger, settings, budget_user)
            return user_usage_summary(writer.ledger, user_id), currency, budget
        finally:
            writer.release_if_idle()

    try:
        summary, currency, budget = run_off_loop(read)
    except Exception as exc:
        log.warning("openrouter_usage: user read-out unavailable (%s)", short_error(exc))
        return UserReadout(note="Your usage is unavailable right now.")
    converted = f"Converted from USD at {currency.rate_text()}." if currency.code != "USD" else ""
    chart = daily_chart_lines(summary.daily, currency.format, height=USER_CHART_HEIGHT)
    if budget is not None and (bars := budget.bar_lines()):
        chart += ["", *bars]
    return UserReadout(user_readout_lines(summary, currency, budget), converted, tuple(chart))


# Open WebUI 0.12.4 builds a user's valves spec as `UserValves.schema()` (which calls
# model_json_schema), then, synchronously and on the same dicts, calls the options method named in
# a field's `input.options` with __user__: the one call that knows the user. The schema's
# read-out property waits here (per request: a context variable) for that call to write the
# user's figures into its description, which the panel always shows.
_READOUT_PROPERTY: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "openrouter_usage_readout_property", default=None
)


# ── The hooks' work ──


def request_usage_reporting(body: dict[str, Any], *, is_openrouter: bool) -> None:
    """Ask the upstream for usage: stream_options.include_usage when streaming, and OpenRouter's
    usage.include (a no-op today, needed by older deployments) only on OpenRouter connections."""
    if body.get("stream"):
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    if is_openrouter:
        usage = body.get("usage")
        body["usage"] = {**(usage if isinstance(usage, dict) else {}), "include": True}


async def record_completion(  # noqa: PLR0913 - the outlet hook's inputs, passed on as they are
    body: Mapping[str, Any],
    user: Mapping[str, Any] | None,
    metadata: Any,
    emitter: EventEmitter | None,
    valves: Settings,
    *,
    bulk_sync_notice: str = "",
) -> WriteOutcome | None:
    """outlet's work: hand the completion to the writer, which builds the record, commits it
    (durably) and renders the usage line off the event loop; then show the line."""
    state = capture_state(metadata)
    stop_watching(state)  # from here on, a stop does not make this a stopped generation
    if not (valves.record_all_models or is_openrouter_completion(state, body)):
        log.debug("openrouter_usage: completion not from OpenRouter; not recorded")
        await release_budget_reservation(metadata, valves.database_url)
        return None
    context = CompletionContext(
        body=body,
        user=user,
        metadata=metadata if isinstance(metadata, Mapping) else None,
        record_all_models=valves.record_all_models,
        now=datetime.now(UTC),
        now_monotonic=time.monotonic(),
    )
    user_valves = (user or {}).get("valves")
    show_line = (
        emitter is not None
        and valves.show_usage_line
        and (user_valves.get("show_usage_line", True) if isinstance(user_valves, Mapping) else True)
        is not False
    )
    zone = resolve_zone(valves.report_timezone)
    parts = valves.line_parts() if show_line else None
    url = resolve_database_url(valves.database_url)
    writer = writer_for(url)
    outcome = await writer.write(functools.partial(outlet_write_request, state, context, zone, parts))
    start_reconciling(url, valves)
    # After the record is committed: until then the reservation stands for its spend.
    standing = await settle_budget(state, user, valves, writer.ledger)
    try:
        line = outcome.usage_line
        if line and standing is not None and standing.percent >= valves.budget_warn_percent:
            line += " · " + standing.line_text
        if line and emitter is not None:
            await emit(
                emitter,
                {
                    "type": "status",
                    "data": {"description": line, "done": True, "hidden": False},
                },
            )
        if bulk_sync_notice and emitter is not None and outcome.stored != "skipped":
            notification = await claim_bulk_sync_notification(user, bulk_sync_notice, writer.ledger)
            if notification is not None:
                await emit(emitter, notification)
        if emitter is not None:
            warning = await budget_warning(standing, valves, writer.ledger)
            if warning is not None:
                await emit(emitter, warning)
    except Exception as exc:
        log.warning(
            "openrouter_usage: a completion was %s, but the usage line or a notice could not be shown (%s)",
            outcome.stored,
            short_error(exc),
        )
    return outcome


def outlet_write_request(
    state: CaptureState, context: CompletionContext, zone: ZoneInfo, parts: LineParts | None
) -> WriteRequest | None:
    """What the writer thread commits for one outlet (None: nothing to record); `parts` is None
    when no usage line is shown."""
    records = build_records(state, context)
    if not records:
        return None
    return WriteRequest(
        records=tuple(records),
        zone=zone,
        chat_message_ids=tuple(assistant_message_ids(context.body)) if parts and parts.chat_total else (),
        want_user_today=bool(parts and parts.today_total),
        render_line=functools.partial(render_usage_line, parts) if parts else None,
    )


def start_reconciling(url: str, valves: Settings) -> None:
    """Have this process reconcile the ledger in the background, if a key allows (never raises)."""
    try:
        config = reconcile_config(valves)
        if config is not None:
            reconciler_for(url).ensure_running(config)
    except Exception as exc:
        log.warning("openrouter_usage: reconciliation could not start (%s)", short_error(exc))


# ── Stopped generations ──
# Pressing stop cancels the task that reads the stream, and Open WebUI then runs no outlet. The
# stream hook runs inside that task, so on the first generation id it asks to be told when the task
# ends; a task that ended cancelled or failed before any outlet started is a stopped generation.
# The record waits STOPPED_GRACE_SECONDS first: for API calls the outlet runs in a task of its own,
# which may still be starting when the streaming task is cancelled by the client's disconnect.

STOPPED_GRACE_SECONDS: Final = 2.0


def watch_for_stop(state: CaptureState, valves: Settings) -> None:
    """Record the generation as stopped if the task running the stream ends without an outlet."""
    state.watching_for_stop = True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not inside an event loop (called directly, as some tests do)
        return
    if task is not None:
        callback = functools.partial(_stream_task_done, state, valves)
        task.add_done_callback(callback)
        state.stop_watch = (task, callback)


def stop_watching(state: CaptureState) -> None:
    """outlet started: this is not a stopped generation, and the task need not hold the state."""
    state.outlet_started = True
    if state.stop_watch is not None:
        task, callback = state.stop_watch
        state.stop_watch = None
        task.remove_done_callback(callback)


def _stream_task_done(state: CaptureState, valves: Settings, task: asyncio.Task[Any]) -> None:
    try:
        if state.outlet_started or not (task.cancelled() or task.exception() is not None):
            return
        task.get_loop().call_later(STOPPED_GRACE_SECONDS, record_without_outlet, state, valves, "stopped")
    except Exception:
        log.exception("openrouter_usage: could not check a stopped generation")


def record_without_outlet(state: CaptureState, valves: Settings, status: Status) -> None:
    """Hand the record of a request whose outlet never ran to the writer without waiting for it
    (durable: the writer commits or spools it), then have reconciliation check or price it."""
    try:
        if state.outlet_started:
            return
        state.outlet_started = True  # recorded once, whichever watcher fires
        if not (valves.record_all_models or state.is_openrouter_connection or state.has_openrouter_signature):
            return
        records = records_without_outlet(state, status, datetime.now(UTC), time.monotonic())
        url = resolve_database_url(valves.database_url)
        writer = writer_for(url)
        written = writer.submit(WriteRequest(tuple(records), resolve_zone(valves.report_timezone)))
        written.add_done_callback(
            functools.partial(
                _after_write_without_outlet, records[0].message_id, status, state.budget, writer.ledger
            )
        )
        start_reconciling(url, valves)
    except Exception:
        log.exception("openrouter_usage: could not record a %s generation without an outlet", status)


def _after_write_without_outlet(
    message_id: str,
    status: Status,
    ticket: BudgetTicket | None,
    ledger: Ledger,
    written: concurrent.futures.Future[WriteOutcome],
) -> None:
    """On the writer thread, once the record is written: log it, and release the request's budget
    reservation (the row now counts against the budget; a stopped one once it is priced)."""
    if written.exception() is not None:
        log.error(
            "openrouter_usage: %s generation %s was not recorded (%s)",
            status,
            message_id,
            written.exception(),
        )
        return
    log.info(
        "openrouter_usage: %s generation %s without an outlet %s", status, message_id, written.result().stored
    )
    if ticket is not None and ticket.reserved:
        try:
            ledger.release_reservations([ticket.reservation_id])
            ticket.reserved = False
        except Exception as exc:
            log.warning("openrouter_usage: a budget reservation could not be released (%s)", short_error(exc))


# ── Replies no filter sees: the model-call tap ──
# Open WebUI gives filters a non-streamed reply without its generation id (contract row 37), runs
# no outlet for a non-streamed reply that is only tool calls, nor for a provider's error reply
# (row 39). Its chat pipeline reaches the OpenAI-compatible connection through one module global,
# `open_webui.utils.chat.generate_openai_chat_completion` (row 39), so inlet wraps that global once:
# the tap awaits the real call, and folds a JSON reply (or an error reply) into the request's
# CaptureState as one chunk carrying everything, so the outlet records it under its own id and
# usage. A request the tap saw and no outlet followed is recorded when its task ends.
# The tap touches only requests whose metadata holds this function's state (inlet ran): with the
# function disabled or deleted, every call passes through untouched. Each copy of this source
# (a reload) replaces the tap with its own, around the same original, so the calls are wrapped
# once; streamed replies pass through as they are (`stream` sees them).

MODEL_CALL_MODULE: Final = "open_webui.utils.chat"
MODEL_CALL_NAME: Final = "generate_openai_chat_completion"
TAP_ORIGINAL_ATTRIBUTE: Final = "openrouter_usage_original"  # on the tap: the call it wraps
MAX_ERROR_BODY_BYTES: Final = 65_536  # of an error reply the tap reads for its message
FIRST_ERROR_STATUS: Final = 400  # an HTTP status from here on is the provider's error reply


def install_model_call_tap() -> bool:
    """Wrap Open WebUI's call into its OpenAI connection (idempotent; never imports anything:
    outside a running Open WebUI there is nothing to wrap). True when this copy's tap is in place."""
    module = sys.modules.get(MODEL_CALL_MODULE)
    current = getattr(module, MODEL_CALL_NAME, None)
    if not callable(current):
        return False
    if getattr(current, "__globals__", None) is globals():
        return True  # this very copy installed it
    original = getattr(current, TAP_ORIGINAL_ATTRIBUTE, current)

    @functools.wraps(original)
    async def tapped_model_call(*args: Any, **kwargs: Any) -> Any:
        response = await original(*args, **kwargs)
        try:
            observe_model_reply(kwargs.get("form_data"), response)
        except Exception:
            log.exception("openrouter_usage: could not read a model reply; the chat continues")
        return response

    setattr(tapped_model_call, TAP_ORIGINAL_ATTRIBUTE, original)
    setattr(module, MODEL_CALL_NAME, tapped_model_call)
    return True


def observe_model_reply(form_data: Any, response: Any) -> None:
    """The tap's work after a model call: fold a non-streamed reply, or an error reply, into the
    state of the request that inlet saw, and have the request recorded if no outlet follows."""
    metadata = form_data.get("metadata") if isinstance(form_data, dict) else None
    if not isinstance(metadata, dict) or metadata.get("task"):
        return  # a task call (title, tags, follow-ups) carries the chat's metadata merged into its own
    state = metadata.get(STATE_KEY)
    if not isinstance(state, CaptureState) or state.outlet_started:
        return
    if isinstance(response, dict):
        observe_chunk(state, response)  # id, provider, model, usage and error, like one whole chunk
        status: Status = "error" if state.error else "ok"
    elif getattr(response, "status_code", 200) >= FIRST_ERROR_STATUS:
        state.error = provider_error_text(response)
        status = "error"
    else:
        return  # a stream: `stream` reads it, and its outlet or its stop records it
    watch_for_no_outlet(state, status)


def provider_error_text(response: Any) -> str:
    """What an error reply (a Starlette response Open WebUI built from the provider's answer) says."""
    body = getattr(response, "body", b"")
    detail: Any = None
    if isinstance(body, bytes) and body:
        with contextlib.suppress(ValueError):
            detail = json.loads(body[:MAX_ERROR_BODY_BYTES])
    error = detail.get("error", detail) if isinstance(detail, dict) else detail
    if isinstance(error, dict) and str(error.get("code")) == str(response.status_code):
        error = {**error, "code": None}  # said once, as the HTTP status
    text = describe_error(error) if error else ""
    return f"HTTP {response.status_code}: {text}" if text else f"HTTP {response.status_code}"


def watch_for_no_outlet(state: CaptureState, status: Status) -> None:
    """Record the request when the task that made the call ends, unless an outlet started first
    (Open WebUI runs a non-streamed reply's outlet inside that task)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return
    if task is not None and state.valves is not None:
        task.add_done_callback(functools.partial(_model_call_task_done, state, state.valves, status))


def _model_call_task_done(
    state: CaptureState, valves: Settings, status: Status, _task: asyncio.Task[Any]
) -> None:
    record_without_outlet(state, valves, status)


# ── Attribution ──
# OpenRouter shows the request's `user` in its Activity view and logs. The plugin sends an opaque,
# stable id per Open WebUI user: an HMAC of the user id, keyed by Open WebUI's own secret (the same
# in every worker and replica), else by a random secret kept in the ledger's meta table.

# Open WebUI's public fallback when none is configured: no secret at all.
OPEN_WEBUI_DEFAULT_SECRET: Final = "t0p-s3cr3t"  # noqa: S105 - a known public value, compared against
ATTRIBUTION_SECRET_KEY: Final = "attribution_secret"  # noqa: S105 - the name of a meta row
_ATTRIBUTION_SECRETS: dict[str, bytes] = {}  # per ledger URL, when Open WebUI has no secret of its own


def openrouter_user_id(user_id: str, secret: bytes) -> str:
    digest = hmac.new(secret, b"openrouter-usage user\x00" + user_id.encode(), hashlib.sha256).hexdigest()
    return "owui-" + digest[:32]


def ledger_attribution_secret(ledger: Ledger) -> bytes:
    """The ledger's own attribution secret, created once across processes."""
    with ledger.writing() as conn:
        conn.execute(
            META_INSERT_IF_ABSENT,
            {"key": ATTRIBUTION_SECRET_KEY, "value": secrets.token_hex(32)},
        )
        value = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == ATTRIBUTION_SECRET_KEY))
        return str(value.scalar_one()).encode()


async def attribution_secret(url: str) -> bytes | None:
    """Open WebUI's secret, else the ledger's (read once per process, off the event loop); None
    when the ledger does not answer in time (the request then goes without `user`)."""
    configured = os.environ.get("WEBUI_SECRET_KEY", "")
    if configured and configured != OPEN_WEBUI_DEFAULT_SECRET:
        return configured.encode()
    secret = _ATTRIBUTION_SECRETS.get(url)
    if secret is None:
        try:
            secret = await asyncio.wait_for(
                asyncio.to_thread(ledger_attribution_secret, ledger_for(url)), INTERNAL_WAIT_SECONDS
            )
        except Exception as exc:
            log.warning("openrouter_usage: no attribution secret (%s); `user` not sent", short_error(exc))
            return None
        if len(_ATTRIBUTION_SECRETS) >= _MAX_OPEN_LEDGERS:
            _ATTRIBUTION_SECRETS.clear()
        _ATTRIBUTION_SECRETS[url] = secret
    return secret


async def start_capture(
    body: dict[str, Any], metadata: dict[str, Any] | None, model: dict[str, Any] | None, valves: Settings
) -> None:
    """inlet's work: note which connection serves the request and who asked, ask for usage, and
    attribute the request to an opaque user id."""
    base_url = await connection_base_url(model)
    is_openrouter = matches_url_pattern(base_url, valves.openrouter_url_pattern)
    state = CaptureState(time.monotonic(), is_openrouter_connection=is_openrouter if base_url else None)
    state.valves = valves
    install_model_call_tap()
    if isinstance(metadata, dict):
        metadata[STATE_KEY] = state
        state.user_id = _first_text(metadata.get("user_id"))
        state.chat_id = _first_text(metadata.get("chat_id"))
        state.message_id = _first_text(metadata.get("message_id"))
    if not isinstance(body, dict):
        return
    state.requested_model = _first_text(body.get("model"))
    state.request_fingerprint = request_fingerprint(body)
    request_usage_reporting(body, is_openrouter=is_openrouter)
    if is_openrouter and valves.send_user_id and state.user_id:
        secret = await attribution_secret(resolve_database_url(valves.database_url))
        if secret is not None:
            state.openrouter_user = openrouter_user_id(state.user_id, secret)
            body["user"] = state.openrouter_user


# ── Budgets in the hooks ──


class BudgetBlocked(Exception):
    """A deliberate block, raised from inlet or request: Open WebUI 0.12.4 sends nothing upstream,
    shows the message as the chat's error, and answers an API client HTTP 400 with it as detail."""


@dataclasses.dataclass(slots=True)
class BudgetTicket:
    """A turn's standing with its budget, in the request's CaptureState. `admitted_calls` counts
    the model calls admitted so far and `requests` the request hooks seen: inlet admits the first
    call, so the first request hook has nothing to check."""

    reservation_id: str
    user: BudgetUser
    model: str
    resolved: bool = False
    rule: BudgetRule | None = None
    reserved: bool = False
    admitted_calls: int = 0
    requests: int = 0

    @property
    def limited(self) -> bool:
        return self.rule is not None and self.rule.limit_pico is not None

    def needs_admission(self, *, model_call: bool) -> bool:
        """Counts a request hook; whether this model call is not yet admitted (nor unlimited)."""
        if model_call:
            self.requests += 1
            if self.requests <= self.admitted_calls:
                return False
        elif self.admitted_calls:
            return False
        return not self.resolved or self.limited


def budget_ticket(user: Mapping[str, Any], metadata: Any, body: Mapping[str, Any]) -> BudgetTicket:
    """A new ticket. Its reservation is this request's own, `<message id>~<random>` (`api-…` for
    an API call without one): a "Continue response" is another request for the same message, and
    its reservation must never overwrite or release the one of a request still running."""
    message_id = metadata.get("message_id") if isinstance(metadata, Mapping) else None
    request_tag = uuid.uuid4().hex[:16]
    return BudgetTicket(
        reservation_id=f"{clean_text(message_id)}~{request_tag}"
        if isinstance(message_id, str) and message_id
        else f"api-{request_tag}",
        user=BudgetUser(
            clean_text(user.get("id") or "unknown"), str(user.get("email") or ""), user.get("role") == "admin"
        ),
        model=clean_text(_first_text(body.get("model"))),
    )


def resolve_budget_rule(ticket: BudgetTicket, rules: BudgetRules) -> None:
    """Which rule applies to the ticket's user (groups read when a group rule exists). Blocking."""
    if ticket.resolved:
        return
    user = ticket.user
    if rules.needs_groups and not user.is_admin:
        user = dataclasses.replace(user, groups=user_group_names(user.user_id))
    ticket.rule = rules.rule_for(user)
    ticket.resolved = True


def budget_standing(user_id: str, rule: BudgetRule, zone: ZoneInfo, spent_pico: int) -> BudgetStanding:
    window = budget_window(rule.period, datetime.now(UTC), zone)
    return BudgetStanding(user_id, user_id, rule, window, spent_pico)


def admit_model_call(
    ticket: BudgetTicket, rules: BudgetRules, valves: Settings, state: CaptureState
) -> tuple[BudgetStanding, BudgetAdmission] | None:
    """Resolve the rule and admit the next model call of the turn (None: unlimited). Blocking."""
    resolve_budget_rule(ticket, rules)
    rule = ticket.rule
    if rule is None or rule.limit_pico is None:
        return None
    standing = budget_standing(ticket.user.user_id, rule, resolve_zone(valves.report_timezone), 0)
    calls_before = max(ticket.requests - 1, 0)
    priced = [usage for usage, _ in state.calls.values() if usage.cost_pico is not None]
    admission = ledger_for(resolve_database_url(valves.database_url)).admit(
        AdmissionRequest(
            reservation_id=ticket.reservation_id,
            user_id=ticket.user.user_id,
            model=ticket.model,
            limit_pico=rule.limit_pico,
            window=standing.window,
            default_estimate_pico=valves.budget_reservation_pico(),
            now=datetime.now(UTC),
            turn_spent_pico=sum(usage.spend_pico for usage in priced),
            unpriced_calls=max(calls_before - len(priced), 0),
        )
    )
    ticket.reserved = admission.admitted
    return dataclasses.replace(standing, spent_pico=admission.spent_pico), admission


async def enforce_budget(body: Any, user: Any, metadata: Any, valves: Settings, *, model_call: bool) -> None:
    """The budget check of inlet (`model_call` False) and of the request hook before each model
    call: admits the call, or raises BudgetBlocked. Database work runs on a thread; the hook
    waits at most INTERNAL_WAIT_SECONDS. When the ledger cannot be read, the call goes through
    (the report says so) unless `budget_fail_closed`."""
    rules = parse_budget_rules(valves.budgets)
    if valves.budget_mode != "block" or not rules.rules or not isinstance(user, Mapping):
        return
    state = capture_state(metadata)
    if state.is_openrouter_connection is False and not valves.record_all_models:
        return  # not traffic this plugin counts
    if state.budget is None:
        state.budget = budget_ticket(user, metadata, body if isinstance(body, Mapping) else {})
    ticket = state.budget
    if not ticket.needs_admission(model_call=model_call):
        return
    try:
        decided = await asyncio.wait_for(
            asyncio.to_thread(admit_model_call, ticket, rules, valves, state), INTERNAL_WAIT_SECONDS
        )
    except Exception as exc:
        budget_check_failed(exc, ticket, valves)
        return
    if decided is None:
        return
    standing, admission = decided
    if admission.admitted:
        ticket.admitted_calls = max(ticket.requests, 1)
        return
    log.info(
        "openrouter_usage: budget blocked user %s (rule line %d, %s %s: spent %s, held %s, this call %s)",
        ticket.user.user_id,
        standing.rule.line,
        standing.rule.label,
        standing.rule.amount_text,
        format_usd(admission.spent_pico),
        format_usd(admission.held_pico),
        format_usd(admission.amount_pico),
    )
    raise BudgetBlocked(budget_block_message(standing, admission))


def budget_check_failed(exc: Exception, ticket: BudgetTicket, valves: Settings) -> None:
    """The ledger could not be read for a check: noted for the report; the call goes through,
    or with `budget_fail_closed` is blocked (BudgetBlocked)."""
    reason = "the ledger did not answer in time" if isinstance(exc, TimeoutError) else short_error(exc)
    BUDGET_CHECK_FAILURE.note(reason, fail_closed=valves.budget_fail_closed)
    outcome = "blocked" if valves.budget_fail_closed else "let through"
    log.warning(
        "openrouter_usage: budget check failed for user %s (%s); %s", ticket.user.user_id, reason, outcome
    )
    if valves.budget_fail_closed:
        raise BudgetBlocked(BUDGET_UNCHECKED_MESSAGE) from None


def settle_budget_work(ticket: BudgetTicket, valves: Settings, ledger: Ledger) -> BudgetStanding | None:
    """After a completion is recorded: release its reservation, then read the user's standing
    (None when no limited rule applies). Blocking."""
    if ticket.reserved:
        ledger.release_reservations([ticket.reservation_id])
        ticket.reserved = False
    resolve_budget_rule(ticket, parse_budget_rules(valves.budgets))
    rule = ticket.rule
    if rule is None or rule.limit_pico is None:
        return None
    standing = budget_standing(ticket.user.user_id, rule, resolve_zone(valves.report_timezone), 0)
    spent = user_window_spend(ledger, ticket.user.user_id, standing.window)
    return dataclasses.replace(standing, spent_pico=spent)


async def settle_budget(
    state: CaptureState, user: Any, valves: Settings, ledger: Ledger
) -> BudgetStanding | None:
    """settle_budget_work off the event loop, bounded; never raises. Without a ticket from inlet
    (warn-only mode, or no inlet ran) the rule is resolved here."""
    ticket = state.budget
    if ticket is None and isinstance(user, Mapping) and parse_budget_rules(valves.budgets).rules:
        ticket = budget_ticket(user, None, {})
    if ticket is None:
        return None
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(settle_budget_work, ticket, valves, ledger), INTERNAL_WAIT_SECONDS
        )
    except Exception as exc:
        log.warning("openrouter_usage: budget standing unavailable after a completion (%s)", short_error(exc))
        return None


async def release_budget_reservation(metadata: Any, database_url: str = "") -> None:
    """Release the budget reservation of the request whose `__metadata__` this is, for a
    generation that ends without an outlet (stopped). Never raises; waits at most
    INTERNAL_WAIT_SECONDS (an unreleased reservation lapses after RESERVATION_TTL_SECONDS)."""
    state = metadata.get(STATE_KEY) if isinstance(metadata, Mapping) else None
    ticket = getattr(state, "budget", None)
    if not isinstance(ticket, BudgetTicket) or not ticket.reserved:
        return
    ledger = ledger_for(resolve_database_url(database_url))
    try:
        await asyncio.wait_for(
            asyncio.to_thread(ledger.release_reservations, [ticket.reservation_id]), INTERNAL_WAIT_SECONDS
        )
        ticket.reserved = False
    except Exception as exc:
        log.warning("openrouter_usage: a budget reservation could not be released (%s)", short_error(exc))


async def budget_warning(
    standing: BudgetStanding | None, valves: Settings, ledger: Ledger
) -> dict[str, Any] | None:
    """The warning notification, once per user, rule and window across processes (None when not
    due, or already sent)."""
    if standing is None or standing.percent < valves.budget_warn_percent:
        return None
    key = (
        "budget_warning:"
        + hashlib.sha256(
            f"{standing.user_id}\n{standing.rule.label}\n{standing.rule.period}\n{standing.window.first_day}".encode()
        ).hexdigest()[:24]
    )
    if not await asyncio.wait_for(asyncio.to_thread(ledger.claim_once, key), INTERNAL_WAIT_SECONDS):
        return None
    return {"type": "notification", "data": {"type": "warning", "content": standing.warning_text}}


async def emit(emitter: EventEmitter, event: dict[str, Any]) -> None:
    """Send an event to the browser, waiting at most INTERNAL_WAIT_SECONDS."""
    sent = emitter(event)
    if asyncio.iscoroutine(sent) or isinstance(sent, asyncio.Future):
        async with asyncio.timeout(INTERNAL_WAIT_SECONDS):  # no Task per event, unlike wait_for
            await sent


class Filter:
    """Open WebUI entry point. Each hook delegates to the named functions above and never raises."""

    class Valves(Settings):
        usage_report: str = Field(
            default="",
            title="Usage report",  # short: a phone's panel squeezes the Default button beside it
            json_schema_extra=_admin_report_schema,
        )
        bulk_sync: bool = Field(
            default=False,
            title="Bulk sync (deprecated)",
            description="Does nothing: OpenRouter has no endpoint listing past generations, and usage is "
            "recorded in real time at every completion. Saving with it on runs nothing: it is saved off "
            "(this panel still shows it on until you close it), and the notice below explains why when "
            "you open the panel again.",
        )
        bulk_sync_notice: str = Field(
            default="",
            title="Bulk sync notice",
            description="Appears here after bulk sync is switched on and saved.",
            json_schema_extra=_bulk_sync_notice_schema,
        )

        @model_validator(mode="after")
        def _deprecate_bulk_sync(self) -> Filter.Valves:
            # No hook runs on save and a validation error shows only a generic toast, so the switch
            # flips back off and the notice is stored in a field the panel displays.
            if self.bulk_sync:
                self.bulk_sync = False
                self.bulk_sync_notice = bulk_sync_notice_text(datetime.now(UTC))
            # Read-only fields: what the Default/Custom button leaves in them is never stored.
            self.model_fields_set.discard("usage_report")
            if not self.bulk_sync_notice:
                self.model_fields_set.discard("bulk_sync_notice")
            if self.model_fields_set:  # Valves() with no saved settings teaches nothing
                SETTINGS_FILE.remember(self.__dict__)
            return self

    class UserValves(BaseModel):
        show_usage_line: bool = Field(
            default=True, title="Usage line", description="Show the usage line with my answers."
        )
        my_usage: str = Field(
            default="",
            title="My usage",
            description="Your own spend, from the usage ledger.",  # the figures replace it
            json_schema_extra={"input": {"type": READ_ONLY_INPUT, "options": "my_usage_options"}},
        )

        @model_validator(mode="after")
        def _read_only(self) -> Filter.UserValves:
            self.model_fields_set.discard("my_usage")  # a read-out, never a setting
            return self

        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            schema = super().model_json_schema(*args, **kwargs)
            _READOUT_PROPERTY.set(schema.get("properties", {}).get("my_usage"))
            return schema

        @classmethod
        def my_usage_options(cls, __user__: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
            readout = user_readout(__user__)
            readout_property = _READOUT_PROPERTY.get()
            if readout_property is not None:
                readout_property["description"] = readout.markdown()
                _READOUT_PROPERTY.set(None)
            return readout.options()

    # Open WebUI looks `stream` up on the instance for every chunk (getattr) and skips a filter
    # whose `stream` is None, so with capture off the hook is absent, not a no-op that still costs
    # the server its per-chunk dispatch. Open WebUI assigns `valves` before every hook call.
    stream: Callable[..., dict[str, Any]] | None

    def __init__(self) -> None:
        self.valves = self.Valves()

    @property
    def valves(self) -> Filter.Valves:
        return self._valves

    @valves.setter
    def valves(self, valves: Filter.Valves) -> None:
        self._valves = valves
        self.stream = self.observe_stream if valves.capture_stream else None

    # The hooks take `__request__`, not `__user__`: see request_user.
    async def inlet(
        self,
        body: dict[str, Any],
        __request__: Any = None,
        __metadata__: dict[str, Any] | None = None,
        __model__: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        try:
            await start_capture(body, __metadata__, __model__, self.valves)
            user = request_user(__request__, __metadata__)
            await enforce_budget(body, user, __metadata__, self.valves, model_call=False)
        except BudgetBlocked:
            raise  # the one exception that leaves a hook: a deliberate, clearly worded block
        except Exception:
            log.exception("openrouter_usage: inlet failed; the chat continues")
        return body

    async def request(
        self,
        body: dict[str, Any],
        __request__: Any = None,
        __metadata__: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Before every model call, tool rounds included (Open WebUI >= 0.11.2): the budget check."""
        try:
            user = request_user(__request__, __metadata__)
            await enforce_budget(body, user, __metadata__, self.valves, model_call=True)
        except BudgetBlocked:
            raise
        except Exception:
            log.exception("openrouter_usage: the budget check failed; the chat continues")
        return body

    def observe_stream(
        self, event: dict[str, Any], __metadata__: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The `stream` hook while stream capture is on."""
        # A plain function, not a coroutine: it never waits, and creating a coroutine for every
        # chunk would cost more than the work it does.
        try:
            try:
                state = __metadata__[STATE_KEY]  # type: ignore[index]
            except (KeyError, TypeError):
                state = capture_state(__metadata__)
            if observe_chunk(state, event):
                # The one change made to what the user sees: see surface_stream_error.
                surface_stream_error(event)
            if not state.watching_for_stop and state.generation_ids:
                watch_for_stop(state, self.valves)
        except Exception:
            log.exception("openrouter_usage: could not read a stream chunk; the chat continues")
        return event

    async def outlet(
        self,
        body: dict[str, Any],
        __request__: Any = None,
        __metadata__: dict[str, Any] | None = None,
        __event_emitter__: EventEmitter | None = None,
        __id__: str | None = None,
    ) -> dict[str, Any]:
        try:
            valves = self.valves
            # The user's own settings matter only where a usage line can be shown.
            settings_of = (__id__ or open_webui_function_id()) if __event_emitter__ else None
            await record_completion(
                body,
                request_user(__request__, __metadata__, settings_of),
                __metadata__,
                __event_emitter__,
                valves,
                bulk_sync_notice=valves.bulk_sync_notice,
            )
        except RecordNotDurable as exc:
            log.critical("openrouter_usage: a completion could not be recorded or spooled (%s)", exc)
        except Exception:
            log.exception("openrouter_usage: could not record a completion; the chat continues")
        return body


if __name__ == "__main__":
    sys.exit(cli_main())
