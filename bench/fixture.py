"""The report fixture: a ledger of N random but seeded completions (200 users, 50 models on 1-3
providers each, 400 days), on SQLite, cached in .cache/bench/ and loadable into PostgreSQL.

Generation: ledger rows (time-ordered, as ids grow with time in a live ledger) are inserted with
`conn.execute(plugin.ledger_table.insert(), rows)` in 100,000-row transactions, the users table
gets one row per user, and the rollups are built by the ledger's own `Ledger._rebuild_rollups`
inside `Ledger._write_transaction()`. The file is keyed by FIXTURE_VERSION and a digest of the
plugin's schema, so a schema change or a generator change regenerates it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import sqlite3
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect

from bench.common import CACHE_DIR, file_size_mb, progress, sqlite_url

FIXTURE_VERSION = 1
SEED = 20261126
USERS = 200
MODELS = 50
DAYS = 400
# The reports are asked "as of" the fixture's last day, so today / 7 / 30 days hold data.
REPORT_NOW = datetime(2026, 6, 30, 18, 0, tzinfo=UTC)
FIRST_MOMENT = datetime(2026, 6, 30, tzinfo=UTC) - timedelta(days=DAYS - 1)
INSERT_CHUNK = 100_000
UTC_ZONE = ZoneInfo("UTC")

_VENDORS = (
    "openai",
    "anthropic",
    "google",
    "meta-llama",
    "mistralai",
    "deepseek",
    "qwen",
    "x-ai",
    "cohere",
    "nvidia",
)
_PROVIDERS = (
    "OpenAI",
    "Anthropic",
    "Google",
    "Together",
    "Fireworks",
    "DeepInfra",
    "Groq",
    "Azure",
    "Amazon Bedrock",
    "Mistral",
    "Novita",
    "Lambda",
)


@dataclasses.dataclass(frozen=True, slots=True)
class FixtureInfo:
    path: Path
    rows: int
    cached: bool
    generated_at: str
    insert_seconds: float
    rollup_seconds: float
    size_mb: float

    @property
    def seconds(self) -> float:
        return self.insert_seconds + self.rollup_seconds

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def url(self) -> str:
        return sqlite_url(self.path)


def user_id(index: int) -> str:
    return f"user-{index:03d}"


def schema_digest(plugin: types.ModuleType) -> str:
    dialect = sqlite_dialect.dialect()
    parts = [name for name, _ in plugin.MIGRATIONS]
    for table in plugin.schema.sorted_tables:
        parts.append(str(sa.schema.CreateTable(table).compile(dialect=dialect)))
        parts.extend(
            str(sa.schema.CreateIndex(index).compile(dialect=dialect))
            for index in sorted(table.indexes, key=lambda i: str(i.name))
        )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def fixture_path(plugin: types.ModuleType, rows: int) -> Path:
    return CACHE_DIR / f"report-v{FIXTURE_VERSION}-{schema_digest(plugin)}-{rows}.sqlite3"


def report_fixture(plugin: types.ModuleType, rows: int) -> FixtureInfo:
    """The cached fixture of `rows` rows, generated first when missing."""
    path = fixture_path(plugin, rows)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return FixtureInfo(
            path,
            rows,
            True,
            meta["generated_at"],
            meta["insert_seconds"],
            meta["rollup_seconds"],
            file_size_mb(path),
        )
    for stale in CACHE_DIR.glob(f"report-v*-{rows}.*"):
        stale.unlink()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    building = path.with_name(path.name + ".building")
    for leftover in (building, Path(f"{building}-wal"), Path(f"{building}-shm")):
        leftover.unlink(missing_ok=True)
    progress(f"generating the {rows:,}-row report fixture (cached afterwards in {CACHE_DIR})")
    insert_seconds, rollup_seconds = _generate(plugin, building, rows)
    os.replace(building, path)
    info = FixtureInfo(
        path,
        rows,
        False,
        datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        insert_seconds,
        rollup_seconds,
        file_size_mb(path),
    )
    meta_path.write_text(
        json.dumps(
            {
                "rows": rows,
                "generated_at": info.generated_at,
                "insert_seconds": insert_seconds,
                "rollup_seconds": rollup_seconds,
                "fixture_version": FIXTURE_VERSION,
            },
            indent=2,
        )
    )
    return info


def _generate(plugin: types.ModuleType, path: Path, rows: int) -> tuple[float, float]:
    ledger = plugin.Ledger(sqlite_url(path))
    try:
        ledger.ensure_schema()
        started = time.perf_counter()
        for chunk in generate_rows(rows, INSERT_CHUNK):
            with ledger._write_transaction() as conn:
                conn.execute(plugin.ledger_table.insert(), chunk)
        with ledger._write_transaction() as conn:
            conn.execute(plugin.users_table.insert(), user_rows())
        inserted = time.perf_counter()
        progress(f"  {rows:,} ledger rows inserted in {inserted - started:.1f} s; rebuilding rollups")
        with ledger._write_transaction() as conn:
            ledger._rebuild_rollups(conn, UTC_ZONE)
        rolled_up = time.perf_counter()
        progress(f"  rollups rebuilt in {rolled_up - inserted:.1f} s")
    finally:
        ledger.dispose()
    with contextlib.closing(sqlite3.connect(path)) as raw:  # fold the WAL into the file
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    Path(f"{path}-wal").unlink(missing_ok=True)
    Path(f"{path}-shm").unlink(missing_ok=True)
    return inserted - started, rolled_up - inserted


def user_rows() -> list[dict[str, Any]]:
    return [
        {"user_id": user_id(i), "user_name": f"User {i:03d}", "last_seen_at": REPORT_NOW.replace(tzinfo=None)}
        for i in range(USERS)
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class _Model:
    name: str
    providers: tuple[str, ...]
    prompt_pico: int  # per token
    completion_pico: int


def _models(rng: random.Random) -> list[_Model]:
    models = []
    for index in range(MODELS):
        vendor = _VENDORS[index % len(_VENDORS)]
        providers = tuple(rng.sample(_PROVIDERS, rng.randint(1, 3)))
        prompt = rng.choice((50_000, 150_000, 500_000, 1_000_000, 3_000_000, 15_000_000))  # $0.05..$15 / Mtok
        models.append(
            _Model(f"{vendor}/model-{index:02d}", providers, prompt, prompt * rng.choice((2, 4, 5)))
        )
    return models


def generate_rows(rows: int, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
    """Ledger rows in created_at order, `chunk_size` at a time; the same rows for the same count."""
    rng = random.Random(SEED)
    models = _models(rng)
    user_weights = [1 / (i + 1) ** 0.8 for i in range(USERS)]
    model_weights = [1 / (i + 1) ** 0.6 for i in range(MODELS)]
    span = DAYS * 86400 - 1
    # Sorted uniform offsets: time-ordered ids, like a live ledger.
    offsets = sorted(rng.random() * span for _ in range(rows))
    users = rng.choices(range(USERS), weights=user_weights, k=rows)
    picked = rng.choices(range(MODELS), weights=model_weights, k=rows)
    base = FIRST_MOMENT.replace(tzinfo=None)
    chunk: list[dict[str, Any]] = []
    for index in range(rows):
        created_at = base + timedelta(seconds=offsets[index])
        model = models[picked[index]]
        user = users[index]
        provider = model.providers[0] if rng.random() < 0.7 else rng.choice(model.providers)
        failed = rng.random() < 0.02
        prompt = 0 if failed else min(int(rng.lognormvariate(7.0, 1.2)) + 1, 200_000)
        completion = 0 if failed else min(int(rng.lognormvariate(5.5, 1.0)) + 1, 32_000)
        cached = int(prompt * rng.random() * 0.8) if rng.random() < 0.3 else 0
        reasoning = int(completion * rng.random() * 0.6) if rng.random() < 0.15 else 0
        byok = rng.random() < 0.05
        upstream = prompt * model.prompt_pico + completion * model.completion_pico
        cost = upstream // 20 if byok else upstream
        spend = cost + upstream if byok else cost
        created = int(created_at.replace(tzinfo=UTC).timestamp())
        generation = f"gen-{created}-{rng.getrandbits(80):020x}"
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cost": cost / 1e12,
            "is_byok": byok,
            "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0, "audio_tokens": 0},
            "cost_details": {"upstream_inference_cost": upstream / 1e12},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "image_tokens": 0},
        }
        latency = int(rng.lognormvariate(8.0, 0.6))
        chunk.append(
            {
                "created_at": created_at,
                "user_id": user_id(user),
                "user_name": f"User {user:03d}",
                "chat_id": f"chat-{user:03d}-{rng.randrange(3000):04d}",
                "message_id": f"msg-{index:08d}",
                "generation_ids": json.dumps([generation]),
                "model": model.name,
                "served_model": model.name,
                "provider": provider,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "cached_tokens": cached,
                "cache_write_tokens": 0,
                "reasoning_tokens": reasoning,
                "cost_pico": cost,
                "upstream_cost_pico": upstream,
                "spend_pico": spend,
                "is_byok": byok,
                "status": "error" if failed else "ok",
                "error": "502: upstream provider error" if failed else "",
                "latency_ms": latency,
                "ttft_ms": int(latency * rng.uniform(0.05, 0.4)),
                "usage_json": None if failed else json.dumps(usage),
            }
        )
        if len(chunk) == chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ── PostgreSQL ──


def load_into_postgres(
    plugin: types.ModuleType, fixture: FixtureInfo, server: Any, dbname: str
) -> dict[str, float]:
    """Copy the fixture's ledger and users into a fresh PostgreSQL database (COPY), rebuild the
    rollups there with the ledger's own code, then VACUUM ANALYZE. Returns phase durations."""
    server.create_database(dbname)
    url = server.url_for(dbname)
    ledger = plugin.Ledger(url)
    timings: dict[str, float] = {}
    try:
        ledger.ensure_schema()
        started = time.perf_counter()
        columns = [column.name for column in plugin.ledger_table.columns]
        with contextlib.closing(sqlite3.connect(fixture.path)) as source, server.connect(dbname) as target:
            for table, names in (
                (plugin.ledger_table, columns),
                (plugin.users_table, ["user_id", "user_name", "last_seen_at"]),
            ):
                column_list = ", ".join(names)
                with (
                    target.cursor() as cursor,
                    cursor.copy(f"COPY {table.name} ({column_list}) FROM STDIN") as copy,
                ):
                    for row in source.execute(f"SELECT {column_list} FROM {table.name}"):
                        copy.write_row(row)
            target.execute(
                f"SELECT setval(pg_get_serial_sequence('{plugin.ledger_table.name}', 'id'), "
                f"(SELECT max(id) FROM {plugin.ledger_table.name}))"
            )
        copied = time.perf_counter()
        timings["copy_seconds"] = copied - started
        with ledger._write_transaction() as conn:
            ledger._rebuild_rollups(conn, UTC_ZONE)
        rebuilt = time.perf_counter()
        timings["rollup_seconds"] = rebuilt - copied
        with server.connect(dbname) as admin:
            admin.execute("VACUUM ANALYZE")
        timings["vacuum_seconds"] = time.perf_counter() - rebuilt
    finally:
        ledger.dispose()
    return timings


def expected_rows_ok(report: Any, rows: int) -> None:
    requests = report.periods["all_time"].requests
    if requests != rows:
        raise RuntimeError(f"report counts {requests} requests, the fixture has {rows} rows")
