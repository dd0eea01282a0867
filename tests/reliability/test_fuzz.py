"""Hypothesis drives the real hooks (inlet, stream for each chunk, outlet) with hostile bodies, chunks,
usage objects, users, metadata and event emitters, then reads the ledger they wrote.

Whatever arrives, no exception escapes a hook, every hook hands back the object it was given, no hook
waits forever, the ledger holds no negative, non-finite or absurd money, its stored usage and its
export are strict JSON, and it still accepts an ordinary write afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import io
import json
import logging
import math
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.factories import EmitterRecorder, HookDriver, load_plugin_module
from tests.reliability.independent import MONEY_COLUMNS, TOKEN_COLUMNS, successful_record

# One event loop serves every example; each example is bounded so that a hook that waits on a hung
# emitter (or on anything else) fails the example instead of stalling the run.
EXAMPLE_TIMEOUT_SECONDS = 15.0
MAIN_EXAMPLES = 10_000  # with the hanging-emitter examples, the file runs 10,003
HANGING_EMITTER_EXAMPLES = 3
MAX_MONEY_PICO = 100_000 * 10**12  # $100,000: the contract's ceiling for one completion
UNIQUE = "<unique message id>"  # replaced by a fresh id per example, so most examples add a row
USAGE_KEYS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "cost",
    "is_byok",
)
DETAIL_KEYS = {
    "cost_details": ("upstream_inference_cost", "upstream_inference_prompt_cost", "server_tool_cost"),
    "prompt_tokens_details": ("cached_tokens", "cache_write_tokens", "audio_tokens"),
    "input_tokens_details": ("cached_tokens", "cache_write_tokens"),
    "completion_tokens_details": ("reasoning_tokens", "image_tokens"),
    "output_tokens_details": ("reasoning_tokens",),
}


# ── strategies ──────────────────────────────────────────────────────────────────────────────────────
# Hypothesis spends about 0.1 ms per choice it makes, and 10,000 examples must fit in about a minute
# of generation. So each dimension of a request is one draw from a pool of hand-picked hostile
# values (users, metadata, odd chunks), and the draws that matter most, the usage objects and their
# numbers, are generated: about 30 choices per request.


def nested(depth: int) -> Any:
    """An object `depth` levels deep, alternating dicts and lists, with a huge float at the bottom."""
    value: Any = 1e308
    for level in range(depth):
        value = {"cost": value, "prompt_tokens": level} if level % 2 else [value, -1]
    return value


DEEP = nested(300)
HUGE = "x" * 20_000  # far past every bound the plugin keeps (a few hundred characters)
NASTY_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x07\x08\x0b\x0c\x7f\x85",
    "\x1b[31mred\x1b[0m",
    "two\nlines\r",
    "\u202eevil\u2066",
    "\u2028\u2029",
    "\ufeffbom",
    "\ud800",
    "x\udfffy",
    '=HYPERLINK("http://evil","x")',
    "+1, -2\n@3",
    "ada@example.com",
    "<script>alert(1)</script>",
    "**bold** [link](http://evil)",
    "Robert'); DROP TABLE openrouter_usage_ledger;--",
    "NaN",
    "null",
    "gen-1700000000-abcdefghijklmnopqrst",
    "Zoë 🚀 名前",
    "y" * 300,
    HUGE,
)
WEIRD_SCALARS: tuple[Any, ...] = (
    0,
    1,
    -1,
    2**31,
    2**53,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**17,
    10**30,
    10**300,
    -(10**300),
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    -0.0,
    5e-324,
    1e-13,
    0.5,
    -0.5,
    0.00002415,
    0.1753356099,
    99_999.99,
    100_000.01,
    1e17,
    "1e400",
    "-1e400",
    "NaN",
    "-Infinity",
    "1e-400",
    "0.00002415",
    "-0.5",
    " 12 ",
    "12abc",
    "\uff11\uff12",  # full-width digits: Decimal() and int() accept them
    "1_000",
    True,
    False,
    None,
    [],
    {},
    [1, 2],
    {"value": math.nan},
    DEEP,
)
weird_values = st.one_of(
    st.sampled_from(WEIRD_SCALARS + NASTY_STRINGS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities included
)

PLAUSIBLE_MONEY = (None, 0, 0.0, 1e-12, 0.00002415, 0.000007765, 0.1753356099, 1.5, 12, 49.99)
plausible_usage = st.builds(
    lambda prompt, completion, cost, byok, upstream: {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost": cost,
        "is_byok": byok,
        "cost_details": {"upstream_inference_cost": upstream},
        "prompt_tokens_details": {"cached_tokens": prompt // 3},
        "completion_tokens_details": {"reasoning_tokens": completion // 4},
    },
    st.integers(min_value=0, max_value=200_000),
    st.integers(min_value=0, max_value=50_000),
    st.sampled_from(PLAUSIBLE_MONEY),
    st.booleans(),
    st.sampled_from(PLAUSIBLE_MONEY),
)
# Where a hostile value goes in a usage object: a top-level key, or a key of a details object.
USAGE_PATHS = (
    ("cost",),
    ("cost",),
    *((key,) for key in USAGE_KEYS),
    *((key,) for key in DETAIL_KEYS),
    *((key, field) for key, fields in DETAIL_KEYS.items() for field in fields),
)


def usage_from_entries(entries: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    for path, value in entries:
        if len(path) == 1:
            usage[path[0]] = value
        else:
            details = usage.get(path[0])
            usage[path[0]] = (details if isinstance(details, dict) else {}) | {path[1]: value}
    return usage


hostile_usage = st.lists(st.tuples(st.sampled_from(USAGE_PATHS), weird_values), min_size=1, max_size=3).map(
    usage_from_entries
)
ODD_USAGE: tuple[Any, ...] = (
    None,
    {},
    [],
    "usage",
    5,
    DEEP,
    {"cost": DEEP},
    {"cost_details": DEEP, "is_byok": "true"},
)
usage_objects = st.one_of(plausible_usage, hostile_usage, st.sampled_from(ODD_USAGE))

GENERATION_IDS = ("gen-1700000000-aaaaaaaaaaaaaaaaaaaa", "gen-1700000001-bbbbbbbbbbbbbbbbbbbb", "chatcmpl-1")
CHOICES: tuple[Any, ...] = (
    [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}],
    [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    [],
    [None, 5, "x", {"delta": None}, {"delta": {"content": DEEP}}],
    "choices",
    None,
    {"0": {"delta": {"content": "x"}}},
)
ERRORS = (
    {"code": 502, "message": "Provider returned error", "metadata": {"raw": "upstream"}},
    {"code": "rate_limited", "message": None},
    {"code": None, "message": "a\x00b\x1b[2J" + HUGE},
    {"message": DEEP},
    "plain text error",
    42,
    [1, 2],
    DEEP,
)
ODD_CHUNKS: tuple[Any, ...] = (
    None,
    "data: [DONE]",
    5,
    1.5,
    [],
    ["id", "usage"],
    DEEP,
    {"usage": None},
    {"id": None},
)
CHUNK_IDS = (*GENERATION_IDS, *GENERATION_IDS, None, "", 42, ["gen-1"], "\ud800", HUGE)
SERVED_BY: tuple[Any, ...] = (
    {"model": "openai/gpt-4o-mini", "provider": "OpenAI"},
    {"model": "anthropic/claude-3.5-sonnet", "provider": "Anthropic"},
    {},
    {"model": None, "provider": None},
    {"model": 5, "provider": ["OpenAI"]},
    {"model": "m\x00\x1b[2J", "provider": "p\u202e\ud800"},
    {"model": HUGE, "provider": HUGE},
    {"model": DEEP, "provider": DEEP},
)
chunk_dicts = st.builds(
    lambda chunk_id, served_by, extra: {"id": chunk_id, **served_by, **extra},
    st.sampled_from(CHUNK_IDS),
    st.sampled_from(SERVED_BY),
    st.fixed_dictionaries(
        {},
        optional={
            "choices": st.sampled_from(CHOICES),
            "usage": usage_objects,
            "error": st.sampled_from(ERRORS),
        },
    ),
)
# Two mapped copies: st.one_of draws its branches equally, and it would merge identical ones.
chunks = st.one_of(chunk_dicts, chunk_dicts.map(dict), st.sampled_from(ODD_CHUNKS))

# Shapes with UNIQUE where a message or chat id goes: most examples then add a row of their own.
METADATA: tuple[Any, ...] = (
    {"message_id": UNIQUE, "chat_id": UNIQUE, "session_id": "s-1", "user_id": "user-1"},
    {"message_id": UNIQUE},
    {"chat_id": UNIQUE},
    {},
    None,
    {"message_id": None, "chat_id": None},
    {"message_id": 42, "chat_id": ["c"]},
    {"message_id": "", "chat_id": ""},
    {"message_id": "m\x00\x1b[2J", "chat_id": "c\u202e"},
    {"message_id": "\ud800", "chat_id": UNIQUE},
    {"message_id": HUGE, "chat_id": HUGE},
    {"message_id": DEEP},
    {"message_id": UNIQUE, "openrouter_usage": "a foreign value where the plugin keeps its state"},
)
USERS = (
    {"id": "user-1", "name": "Ada", "email": "ada@example.com", "role": "user"},
    {"id": "user-2", "name": "ada@example.com", "email": "ada@example.com", "role": "admin"},
    None,
    {},
    {"id": None, "name": None, "email": None},
    {"name": "no id"},
    {"id": 42, "name": 43},
    {"id": ["user-1"], "name": {"first": "Ada"}},
    {"id": "", "name": ""},
    {"id": DEEP, "name": DEEP, "email": DEEP},
    {"id": HUGE, "name": HUGE, "email": HUGE},
    *({"id": f"user-nasty-{index}", "name": text, "email": text} for index, text in enumerate(NASTY_STRINGS)),
    *({"id": text, "name": "Nasty id"} for text in NASTY_STRINGS),
)
INLET_BODIES: tuple[Any, ...] = (
    {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
    {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "stream": False},
    {"stream": True, "stream_options": "not a dict", "usage": ["not", "a", "dict"]},
    {"stream": True, "stream_options": {"include_usage": False, "x": DEEP}, "usage": {"include": False}},
    {"stream": "yes", "stream_options": None, "usage": None},
    {"messages": None, "model": None},
    {"messages": DEEP, "model": DEEP},
    {},
)
EARLIER_MESSAGES: tuple[Any, ...] = (
    [],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Earlier", "id": UNIQUE}],
    [
        {"role": "assistant", "content": "Earlier, no id"},
        {"role": "assistant", "id": 42, "usage": {"cost": -5}},
    ],
    [{"role": None}, {"role": "tool", "content": DEEP}, None, "message", 7, []],
)
MESSAGE_IDS = (UNIQUE, UNIQUE, UNIQUE, UNIQUE, None, "", 42, "m\x00", "\ud800", HUGE, DEEP)
USAGE_PLACES = ("usage", "usage", "info", "nowhere")


def assistant_message(
    content: Any, message_id: Any, place: str, usage: Any, finish_reason: Any
) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "id": message_id, "finish_reason": finish_reason}
    if place == "usage":
        message["usage"] = usage
    elif place == "info":
        message["info"] = {"usage": usage}
    return message


outlet_body_dicts = st.builds(
    lambda model, earlier, last, body_id, chat_id: {
        "model": model,
        "messages": [*earlier, last],
        "id": body_id,
        "chat_id": chat_id,
    },
    st.sampled_from(("openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet", "", None, 5, "m\x00\ud800", HUGE)),
    st.sampled_from(EARLIER_MESSAGES),
    st.builds(
        assistant_message,
        st.sampled_from(("Hello", "", None, DEEP, HUGE)),
        st.sampled_from(MESSAGE_IDS),
        st.sampled_from(USAGE_PLACES),
        usage_objects,
        st.sampled_from(("stop", "error", None, 5)),
    ),
    st.sampled_from(MESSAGE_IDS),
    st.sampled_from(MESSAGE_IDS),
)
ODD_OUTLET_BODIES: tuple[Any, ...] = (
    {},
    {"messages": None},
    {"messages": "text"},
    {"messages": DEEP},
    {"messages": [None, 5]},
)
# Two mapped copies: st.one_of draws its branches equally, and it would merge identical ones.
outlet_bodies = st.one_of(outlet_body_dicts, outlet_body_dicts.map(dict), st.sampled_from(ODD_OUTLET_BODIES))

EMITTERS_THAT_RETURN = ("none", "records", "raises")

requests = st.fixed_dictionaries(
    {
        "inlet_body": st.sampled_from(INLET_BODIES),
        "chunks": st.lists(chunks, max_size=3),
        "outlet_body": outlet_bodies,
        "user": st.sampled_from(USERS),
        "metadata": st.sampled_from(METADATA),
        "emitter": st.sampled_from(EMITTERS_THAT_RETURN),
    }
)


# ── driving the hooks ───────────────────────────────────────────────────────────────────────────────


async def raising_emitter(event: dict[str, Any]) -> None:
    raise RuntimeError("the client went away")


async def hanging_emitter(event: dict[str, Any]) -> None:
    await asyncio.get_running_loop().create_future()  # never resolved


def make_emitter(kind: str) -> Callable[[dict[str, Any]], Any] | None:
    return {
        "none": None,
        "records": EmitterRecorder(),
        "raises": raising_emitter,
        "hangs": hanging_emitter,
    }[kind]


def with_unique_ids(value: Any, fresh_id: Callable[[], str], levels: int = 4) -> Any:
    """The case with every UNIQUE placeholder replaced by a fresh id. Placeholders sit at most four
    levels down (case, body, messages, message), so deeper objects are handed over untouched."""
    if isinstance(value, str) and value == UNIQUE:
        return fresh_id()
    if levels == 0:
        return value
    if isinstance(value, dict):
        return {key: with_unique_ids(item, fresh_id, levels - 1) for key, item in value.items()}
    if isinstance(value, list):
        return [with_unique_ids(item, fresh_id, levels - 1) for item in value]
    return value


class FuzzDriver(HookDriver):
    """HookDriver with each hook's signature read once: inspect.signature costs more than the hook
    itself, and the fuzz calls hooks some 30,000 times. Valves are still rebuilt before every call,
    as Open WebUI does."""

    def __init__(self, plugin: types.ModuleType, valves: dict[str, Any]) -> None:
        super().__init__(plugin, valves=valves)
        self._accepted = {
            hook: frozenset(inspect.signature(getattr(self.filter, hook)).parameters)
            for hook in ("inlet", "stream", "outlet")
        }

    def _params(self, hook: str, payload: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        self.filter.valves = self.filter.Valves(**self.valves)
        params: dict[str, Any] = {"event": payload} if hook == "stream" else {"body": payload}
        params |= {k: v for k, v in self.offered(extra).items() if k in self._accepted[hook]}
        if params.get("__user__"):
            params["__user__"] = dict(params["__user__"], valves=self.filter.UserValves(**self.user_valves))
        return params


class FuzzRun:
    """One ledger, one plugin module, one event loop for every example of a test."""

    def __init__(self, plugin: types.ModuleType, url: str) -> None:
        self.plugin = plugin
        self.url = url
        self.driver = FuzzDriver(plugin, {"database_url": url, "record_all_models": True})
        self.loop = asyncio.new_event_loop()
        self.examples = 0
        self.slowest_seconds = 0.0
        self._ids = 0

    def fresh_id(self) -> str:
        self._ids += 1
        return f"fuzz-{self._ids}"

    def run_example(self, case: dict[str, Any]) -> None:
        self.examples += 1
        case = with_unique_ids(case, self.fresh_id)
        started = time.monotonic()
        try:
            self.loop.run_until_complete(asyncio.wait_for(self.drive(case), timeout=EXAMPLE_TIMEOUT_SECONDS))
        except TimeoutError:
            pytest.fail(f"the hooks were still waiting after {EXAMPLE_TIMEOUT_SECONDS:.0f} s")
        self.slowest_seconds = max(self.slowest_seconds, time.monotonic() - started)

    async def drive(self, case: dict[str, Any]) -> None:
        """As Open WebUI runs one request: inlet, stream for every chunk, outlet; one metadata dict."""
        metadata = case["metadata"]
        emitter = make_emitter(case["emitter"])
        ids = metadata if isinstance(metadata, dict) else {}
        common = {
            "__user__": case["user"],
            "__metadata__": metadata,
            "__model__": {"id": "openai/gpt-4o-mini", "urlIdx": 0},
            "__event_emitter__": emitter,
            "__event_call__": None,
            "__chat_id__": ids.get("chat_id"),
            "__message_id__": ids.get("message_id"),
        }
        inlet_body = case["inlet_body"]
        assert await self.driver.call("inlet", inlet_body, **common) is inlet_body
        for chunk in case["chunks"]:
            assert await self.driver.call("stream", chunk, **common) is chunk
        outlet_common = {k: v for k, v in common.items() if k not in ("__chat_id__", "__message_id__")}
        outlet_body = case["outlet_body"]
        assert await self.driver.call("outlet", outlet_body, **outlet_common) is outlet_body

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def fuzz_settings(examples: int, *, shrink: bool = True) -> settings:
    """Deterministic settings: the same examples on every run and machine, no example database."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        # Shrinking an example that failed by timing out would re-run it, at the full bound, many times.
        phases=(Phase.explicit, Phase.generate, Phase.shrink) if shrink else (Phase.explicit, Phase.generate),
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# ── checks on the ledger ────────────────────────────────────────────────────────────────────────────


def reject_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=reject_constant)


def ledger_rows(url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                dict(row._mapping) for row in conn.execute(sa.text("SELECT * FROM openrouter_usage_ledger"))
            ]
    finally:
        engine.dispose()


def unsound_money_and_tokens(row: dict[str, Any]) -> list[str]:
    problems = []
    for column in MONEY_COLUMNS:
        value = row[column]
        if value is None:
            continue
        if not isinstance(value, int) or value < 0 or value > MAX_MONEY_PICO:
            problems.append(f"{column}={value!r}")
    for column in TOKEN_COLUMNS:
        value = row[column]
        if not isinstance(value, int) or value < 0:
            problems.append(f"{column}={value!r}")
    return problems


def export_json(plugin: types.ModuleType, url: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = plugin.cli_main(["export", "--format", "json", "--database-url", url])
    assert code == 0, "export failed"
    return out.getvalue()


def ordinary_record(plugin: types.ModuleType) -> Any:
    return successful_record(
        plugin,
        "after-the-fuzz",
        "After",
        generation_id="gen-1700000002-cccccccccccccccccccc",
        served_model="openai/gpt-4o-mini",
        provider="OpenAI",
        tokens=(10, 5),
        cost_pico=24_150_000,
        latency_ms=900,
        ttft_ms=120,
        created_at=datetime.now(UTC),
        model="openai/gpt-4o-mini",
        raw_usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cost": 0.00002415},
    )


def assert_ledger_sound(plugin: types.ModuleType, url: str, examples: int) -> None:
    rows = ledger_rows(url)
    unsound = {
        row["message_id"][:60]: problems for row in rows if (problems := unsound_money_and_tokens(row))
    }
    non_strict = []
    for row in rows:
        if row["usage_json"] is None:
            continue
        try:
            strict_json(row["usage_json"])
        except ValueError as exc:
            non_strict.append((row["message_id"][:60], str(exc)[:80]))
    export_error, exported = "", []
    try:
        exported = strict_json(export_json(plugin, url))
    except ValueError as exc:
        export_error = str(exc)
    after = (
        plugin.writer_for(url)
        .submit(plugin.WriteRequest(records=(ordinary_record(plugin),), zone=ZoneInfo("UTC")))
        .result(timeout=60)
    )
    ledger = plugin.ledger_for(url)
    ledger.replay_spool()
    costed = sum(row["cost_pico"] is not None for row in rows)
    repaired = sum(bool(row.get("notes")) for row in rows)
    print(
        f"\nfuzz: {examples} examples, {len(rows)} ledger rows ({costed} with a cost, {repaired} with repair "
        f"notes), {len(exported)} exported, {ledger.spool.pending_count()} spool files pending, "
        f"{ledger.spool.quarantined_count()} quarantined, write after the fuzz: {after.stored}"
    )
    assert not unsound, (
        f"{len(unsound)} rows hold negative or absurd money/tokens, e.g. {list(unsound.items())[:5]}"
    )
    assert not non_strict, f"{len(non_strict)} rows hold non-strict usage_json, e.g. {non_strict[:5]}"
    assert not export_error, f"the JSON export is not strict JSON: {export_error}"
    assert len(exported) == len(rows), "the export does not have one object per ledger row"
    assert after.stored == "recorded", f"an ordinary write after the fuzz was {after.stored!r}"
    assert ledger.spool.pending_count() == 0, "spooled records are still waiting after a replay"
    reasons = collections.Counter(str(entry.get("reason"))[:80] for entry in ledger.spool.quarantined())
    assert not reasons, (
        f"the database refused {sum(reasons.values())} fuzzed record(s): {reasons.most_common(5)}"
    )


# ── tests ───────────────────────────────────────────────────────────────────────────────────────────


class LogTally(logging.Handler):
    """Counts the plugin's log records by level and first words, instead of letting pytest keep
    tens of thousands of them (with tracebacks) in memory."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.msg if isinstance(record.msg, str) else repr(record.msg)
        self.counts[f"{record.levelname} {message[:70]}"] += 1

    def summary(self) -> str:
        return "\n".join(f"  {count:6d}  {key}" for key, count in self.counts.most_common(12))


MEMORY_FILESYSTEM = Path("/dev/shm")  # noqa: S108 (a RAM disk for speed, in a fresh directory below it)


@pytest.fixture
def fuzz_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh data directory (ledger and spool), in memory where the machine has a tmpfs: the fuzz
    tests what the plugin does with its inputs, not fsync, and a disk commit per example would
    more than double the run time."""
    with tempfile.TemporaryDirectory(
        prefix="openrouter-usage-fuzz-", dir=MEMORY_FILESYSTEM if MEMORY_FILESYSTEM.is_dir() else tmp_path
    ) as directory:
        monkeypatch.setenv("DATA_DIR", directory)
        monkeypatch.delenv("OPENROUTER_USAGE_DATABASE_URL", raising=False)
        monkeypatch.delenv("DATABASE_URL", raising=False)
        yield Path(directory)


@pytest.fixture
def fuzz_run(fuzz_data_dir: Path) -> Iterator[FuzzRun]:
    plugin = load_plugin_module()
    run = FuzzRun(plugin, f"sqlite:///{fuzz_data_dir / 'fuzz.sqlite3'}")
    logger = logging.getLogger("openrouter_usage")
    tally = LogTally()
    logger.addHandler(tally)
    logger.propagate = False
    try:
        yield run
    finally:
        logger.propagate = True
        logger.removeHandler(tally)
        run.close()
        for writer in list(plugin._LEDGERS.values()):
            writer.ledger.dispose()
        print(f"\nplugin log records during the fuzz (most frequent first):\n{tally.summary()}")


def test_hostile_requests_never_escape_and_leave_a_sound_ledger(fuzz_run: FuzzRun) -> None:
    """10,000 hostile requests through the real hooks: no hook raises, each returns what it was given
    and finishes in time; afterwards the ledger holds only sound money, strict JSON, an export that
    parses strictly, and it still records an ordinary write."""
    started, cpu_started = time.monotonic(), time.process_time()

    @fuzz_settings(MAIN_EXAMPLES)
    @given(case=requests)
    def one_request(case: dict[str, Any]) -> None:
        fuzz_run.run_example(case)

    one_request()
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
    print(
        f"\nfuzz: {fuzz_run.examples} examples in {elapsed:.1f} s ({cpu:.1f} s of CPU, all threads), "
        f"slowest example {fuzz_run.slowest_seconds:.2f} s"
    )
    assert fuzz_run.examples >= MAIN_EXAMPLES
    assert_ledger_sound(fuzz_run.plugin, fuzz_run.url, fuzz_run.examples)


def test_a_hanging_emitter_never_holds_a_hook(fuzz_run: FuzzRun) -> None:
    """An event emitter that never returns (a client whose socket stalls) does not hold the hooks:
    every request still finishes within the bound, and the ledger stays sound."""

    @fuzz_settings(HANGING_EMITTER_EXAMPLES, shrink=False)
    @given(case=requests.map(lambda case: case | {"emitter": "hangs"}))
    def one_request(case: dict[str, Any]) -> None:
        fuzz_run.run_example(case)

    one_request()
    assert fuzz_run.examples >= HANGING_EMITTER_EXAMPLES
    assert_ledger_sound(fuzz_run.plugin, fuzz_run.url, fuzz_run.examples)
