"""The report fixture: a ledger of N random but seeded completions (200 users, 50 models on 1-3
providers each, 400 days), on SQLite, cached in .cache/bench/ and loadable into PostgreSQL.

Generation: the plugin creates the database itself (`ledger_for(url).ensure_schema()`: its own
migrations, so every table, column, index and meta row is the plugin's). The completions are the
plugin's own `UsageRecord`s, in created_at order (ids grow with time, as in a live ledger), written
100,000 at a time the way the plugin's writer writes a batch: rows from `ledger_values`, rollups
for the zone UTC from `rollup_increments` and `apply_rollups` (its upserts add up across chunks),
each user's latest name through `USERS_UPSERT`, and meta `rollup_timezone` UTC through
`META_UPSERT`. A cheap check then compares every rollup table's totals with SUM() over the ledger.
The file is keyed by FIXTURE_VERSION and a digest of the schema the plugin creates, so a schema
change or a generator change regenerates it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import sqlite3
import tempfile
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from bench.common import CACHE_DIR, file_size_mb, progress, sqlite_url

FIXTURE_VERSION = 3
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


def create_schema(plugin: types.ModuleType, url: str) -> None:
    """The plugin creates (or migrates) the ledger at `url` with its own migrations."""
    ledger = plugin.ledger_for(url)
    try:
        ledger.ensure_schema()
    finally:
        ledger.dispose()


def schema_digest(plugin: types.ModuleType) -> str:
    """A digest of the schema the plugin creates: its migrations run on an empty SQLite file."""
    with tempfile.TemporaryDirectory(prefix="bench-schema-") as scratch:
        path = Path(scratch) / "schema.sqlite3"
        create_schema(plugin, sqlite_url(path))
        with contextlib.closing(sqlite3.connect(path)) as raw:
            rows = raw.execute(
                "SELECT type, name, coalesce(sql, '') FROM sqlite_master "
                "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
            ).fetchall()
    return hashlib.sha256("\n".join("|".join(row) for row in rows).encode()).hexdigest()[:10]


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
    building.replace(path)
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


def check_rollups(plugin: types.ModuleType, conn: sa.Connection) -> None:
    """Each rollup table's totals for UTC equal SUM() over the ledger (request count, tokens, money)."""
    ledger = plugin.ledger_table
    summed = plugin.MEASURES[2:]
    expected = conn.execute(
        sa.select(sa.func.count(), *(sa.func.coalesce(sa.func.sum(ledger.c[name]), 0) for name in summed))
    ).one()
    for rollup in plugin.ROLLUP_TABLES:
        found = conn.execute(
            sa.select(
                *(sa.func.coalesce(sa.func.sum(rollup.c[name]), 0) for name in ("requests", *summed))
            ).where(rollup.c.zone == UTC_ZONE.key)
        ).one()
        if tuple(map(int, found)) != tuple(map(int, expected)):
            raise RuntimeError(
                f"{rollup.name} totals {tuple(found)} differ from the ledger's {tuple(expected)}"
            )


def write_chunk(plugin: types.ModuleType, conn: sa.Connection, rows: list[dict[str, Any]]) -> float:
    """Ledger rows (`ledger_values`) stored as the plugin's writer stores a batch: the rows, their
    rollups for UTC, each user's latest name. Returns the seconds spent on the rollups."""
    conn.execute(plugin.ledger_table.insert(), rows)
    started = time.perf_counter()
    plugin.apply_rollups(conn, UTC_ZONE.key, plugin.rollup_increments(rows, UTC_ZONE))
    rollup_seconds = time.perf_counter() - started
    latest = {row["user_id"]: row for row in rows}  # rows are in created_at order
    conn.execute(
        plugin.USERS_UPSERT,
        [
            {
                "user_id": key,
                "user_name": row["user_name"],
                "last_seen_at": row["created_at"],
                "openrouter_user": "",
            }
            for key, row in sorted(latest.items())
        ],
    )
    return rollup_seconds


def _ledger_rows(plugin: types.ModuleType, rows: int, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
    """generate_records' chunks as the plugin's own `ledger_values` rows."""
    for records in generate_records(plugin, rows, chunk_size):
        # A ledger in steady state with an OpenRouter key: every row checked and matched, so the
        # panel's reconciliation section reads only its (empty) partial index of open rows.
        yield [
            values | {"reconcile_status": "matched", "billed_pico": values["spend_pico"]}
            for values in map(plugin.ledger_values, records)
        ]


def _generate(plugin: types.ModuleType, path: Path, rows: int) -> tuple[float, float]:
    url = sqlite_url(path)
    create_schema(plugin, url)
    engine = sa.create_engine(url)
    rollup_seconds = 0.0
    try:
        started = time.perf_counter()
        for chunk in _ledger_rows(plugin, rows, INSERT_CHUNK):
            with engine.begin() as conn:
                rollup_seconds += write_chunk(plugin, conn, chunk)
        with engine.begin() as conn:
            conn.execute(plugin.META_UPSERT, {"key": "rollup_timezone", "value": UTC_ZONE.key})
            check_rollups(plugin, conn)
        total = time.perf_counter() - started
        progress(f"  {rows:,} records written in {total:.1f} s (rollups {rollup_seconds:.1f} s of it)")
    finally:
        engine.dispose()
    with contextlib.closing(sqlite3.connect(path)) as raw:  # fold the WAL into the file
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    Path(f"{path}-wal").unlink(missing_ok=True)
    Path(f"{path}-shm").unlink(missing_ok=True)
    return total - rollup_seconds, rollup_seconds


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


def generate_records(plugin: types.ModuleType, rows: int, chunk_size: int) -> Iterator[list[Any]]:
    """`plugin.UsageRecord`s in created_at order, `chunk_size` at a time; the same for the same count."""
    rng = random.Random(SEED)
    models = _models(rng)
    user_weights = [1 / (i + 1) ** 0.8 for i in range(USERS)]
    model_weights = [1 / (i + 1) ** 0.6 for i in range(MODELS)]
    span = DAYS * 86400 - 1
    # Sorted uniform offsets: time-ordered ids, like a live ledger.
    offsets = sorted(rng.random() * span for _ in range(rows))
    users = rng.choices(range(USERS), weights=user_weights, k=rows)
    picked = rng.choices(range(MODELS), weights=model_weights, k=rows)
    chunk: list[Any] = []
    for index in range(rows):
        created_at = FIRST_MOMENT + timedelta(seconds=offsets[index])
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
        generation = f"gen-{int(created_at.timestamp())}-{rng.getrandbits(80):020x}"
        usage = plugin.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cached_tokens=cached,
            cache_write_tokens=0,
            reasoning_tokens=reasoning,
            cost_pico=cost,
            upstream_cost_pico=upstream,
            is_byok=byok,
        )
        raw_usage = {
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
            plugin.UsageRecord(
                message_id=f"msg-{index:08d}",
                chat_id=f"chat-{user:03d}-{rng.randrange(3000):04d}",
                user_id=user_id(user),
                user_name=f"User {user:03d}",
                generation_ids=(generation,),
                model=model.name,
                served_model=model.name,
                provider=provider,
                usage=usage,
                status="error" if failed else "ok",
                error="502: upstream provider error" if failed else "",
                latency_ms=latency,
                ttft_ms=int(latency * rng.uniform(0.05, 0.4)),
                raw_usage=None if failed else raw_usage,
                created_at=created_at,
            )
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
    """A fresh PostgreSQL database, its schema created by the plugin; the fixture's ledger, users
    and rollups copied in (COPY), meta `rollup_timezone` set, the totals checked, then VACUUM
    ANALYZE. Returns durations."""
    server.create_database(dbname)
    url = server.url_for(dbname)
    create_schema(plugin, url)
    ledger = plugin.ledger_table.name
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with contextlib.closing(sqlite3.connect(fixture.path)) as source, server.connect(dbname) as target:
        for table in (plugin.ledger_table, plugin.users_table, *plugin.ROLLUP_TABLES):
            columns = [row[1] for row in source.execute(f"PRAGMA table_info({table.name})")]
            if set(columns) != set(table.c.keys()):
                raise RuntimeError(f"{table.name}: the fixture's columns differ from the plugin's")
            column_list = ", ".join(columns)
            with (
                target.cursor() as cursor,
                cursor.copy(f"COPY {table.name} ({column_list}) FROM STDIN") as copy,
            ):
                for row in source.execute(f"SELECT {column_list} FROM {table.name}"):
                    copy.write_row(row)
        target.execute(
            f"SELECT setval(pg_get_serial_sequence('{ledger}', 'id'), (SELECT max(id) FROM {ledger}))"
        )
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(plugin.META_UPSERT, {"key": "rollup_timezone", "value": UTC_ZONE.key})
            check_rollups(plugin, conn)
    finally:
        engine.dispose()
    copied = time.perf_counter()
    timings["copy_seconds"] = copied - started
    with server.connect(dbname) as admin:  # autocommit: VACUUM runs outside a transaction
        admin.execute("VACUUM ANALYZE")
    timings["vacuum_seconds"] = time.perf_counter() - copied
    return timings


def expected_rows_ok(report: Any, rows: int) -> None:
    requests = report.periods["all_time"].requests
    if requests != rows:
        raise RuntimeError(f"report counts {requests} requests, the fixture has {rows} rows")
