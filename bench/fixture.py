"""The report fixture: a ledger of N random but seeded completions (200 users, 50 models on 1-3
providers each, 400 days), on SQLite, cached in .cache/bench/ and loadable into PostgreSQL.

Generation: the plugin creates the database itself (`ledger_for(url).ensure_schema()`: its own
migrations, so every table, column, index and meta row is the plugin's). The bench then reflects
the tables from the database and bulk-inserts the ledger rows (time-ordered, as ids grow with time
in a live ledger; `notes` '' and `omitted_generation_ids` 0, as for a record nothing had to be
repaired in) in 100,000-row transactions, one users row per user, and computes the rollups in SQL
for the zone UTC (one INSERT ... SELECT ... GROUP BY per rollup table: zone, local day, the
table's keys, and the measures as the contract defines them: requests = rows, failed = status !=
'ok', the other measures summed with NULL as 0). Meta `rollup_timezone` is set to UTC (and no
recount is pending). The rollups are then checked against the ledger's totals and, up to
CROSS_CHECK_ROWS rows, against the plugin's own count of the same rows. The file is keyed by
FIXTURE_VERSION and a digest of the schema the plugin creates, so a schema change or a generator
change regenerates it.
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

FIXTURE_VERSION = 2
SEED = 20261126
USERS = 200
MODELS = 50
DAYS = 400
# The reports are asked "as of" the fixture's last day, so today / 7 / 30 days hold data.
REPORT_NOW = datetime(2026, 6, 30, 18, 0, tzinfo=UTC)
FIRST_MOMENT = datetime(2026, 6, 30, tzinfo=UTC) - timedelta(days=DAYS - 1)
INSERT_CHUNK = 100_000
CROSS_CHECK_ROWS = 100_000  # up to this size, a generated fixture is checked against the plugin's own count
UTC_ZONE = ZoneInfo("UTC")
PREFIX = "openrouter_usage_"
LEDGER = f"{PREFIX}ledger"
USERS_TABLE = f"{PREFIX}users"
META = f"{PREFIX}meta"
ROLLUPS = (f"{PREFIX}rollup_day", f"{PREFIX}rollup_user_day", f"{PREFIX}rollup_model_day")

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
    if rows <= CROSS_CHECK_ROWS:
        cross_check(plugin, sqlite_url(building))
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


def reflect(engine: sa.Engine) -> dict[str, sa.Table]:
    """The plugin's tables as the database holds them."""
    metadata = sa.MetaData()
    metadata.reflect(bind=engine, only=lambda name, _meta: name.startswith(PREFIX))
    missing = {LEDGER, USERS_TABLE, META, *ROLLUPS} - set(metadata.tables)
    if missing:
        raise RuntimeError(f"the plugin's schema lacks tables the fixture fills: {sorted(missing)}")
    return dict(metadata.tables)


def ledger_rows_for(table: sa.Table, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The generated rows as `table` takes them; a NOT NULL column without default left unfilled
    is an error here rather than a fixture that differs from what the plugin writes."""
    generated = set(rows[0])
    unknown = generated - set(table.c.keys())
    required = {
        column.name
        for column in table.columns
        if not column.nullable and column.server_default is None and not column.primary_key
    }
    if required - generated:
        raise RuntimeError(f"the fixture does not fill ledger columns {sorted(required - generated)}")
    if not unknown:
        return rows
    return [{key: value for key, value in row.items() if key not in unknown} for row in rows]


def _day(column: sa.ColumnElement[Any], dialect: str) -> sa.ColumnElement[str]:
    """The UTC calendar day of a naive-UTC timestamp, 'YYYY-MM-DD' (the rollups' zone is UTC)."""
    if dialect == "sqlite":  # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff'
        return sa.func.substr(column, 1, 10)
    return sa.func.to_char(column, "YYYY-MM-DD")


def compute_rollups(conn: sa.Connection, tables: dict[str, sa.Table], zone: ZoneInfo) -> None:
    """Every rollup table recounted from the ledger for `zone` (UTC only: days are UTC dates), and
    meta `rollup_timezone` set to it with no recount pending."""
    if zone.key != "UTC":
        raise ValueError("the fixture computes UTC days only")
    ledger = tables[LEDGER]
    day = _day(ledger.c.created_at, conn.dialect.name)
    for name in ROLLUPS:
        rollup = tables[name]
        keys = [column.name for column in rollup.primary_key.columns if column.name not in ("zone", "day")]
        if not keys and name != f"{PREFIX}rollup_day":
            raise RuntimeError(f"{name} has no key columns besides zone and day")
        measures: list[sa.ColumnElement[Any]] = []
        names: list[str] = []
        for column in rollup.columns:
            if column.name in ("zone", "day", *keys):
                continue
            if column.name == "requests":
                measure: sa.ColumnElement[Any] = sa.func.count()
            elif column.name == "failed":
                measure = sa.func.sum(sa.case((ledger.c.status != "ok", 1), else_=0))
            elif column.name in ledger.c:
                measure = sa.func.sum(sa.func.coalesce(ledger.c[column.name], 0))
            else:
                raise RuntimeError(f"{name}.{column.name}: a measure the fixture does not know")
            names.append(column.name)
            measures.append(measure)
        # Release 1.0.0's rollups had no zone column (one zone at a time); the fixture serves both.
        zoned = "zone" in rollup.c
        leading = [sa.literal(zone.key), day] if zoned else [day]
        select = sa.select(*leading, *(ledger.c[key] for key in keys), *measures).group_by(
            day, *(ledger.c[key] for key in keys)
        )
        conn.execute(rollup.delete())
        target = ["zone", "day"] if zoned else ["day"]
        conn.execute(rollup.insert().from_select([*target, *keys, *names], select))
    meta = tables[META]
    conn.execute(meta.delete().where(meta.c.key.in_(["rollup_timezone", "rollup_recount"])))
    conn.execute(meta.insert().values(key="rollup_timezone", value=zone.key))
    _check_rollups(conn, tables, zone)


def _check_rollups(conn: sa.Connection, tables: dict[str, sa.Table], zone: ZoneInfo) -> None:
    """Each rollup's totals equal the ledger's (what the plugin's own invariant requires)."""
    ledger = tables[LEDGER]
    expected = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(ledger.c.spend_pico), 0))
    ).one()
    for name in ROLLUPS:
        rollup = tables[name]
        totals = sa.select(
            sa.func.coalesce(sa.func.sum(rollup.c.requests), 0),
            sa.func.coalesce(sa.func.sum(rollup.c.spend_pico), 0),
        )
        if "zone" in rollup.c:
            totals = totals.where(rollup.c.zone == zone.key)
        found = conn.execute(totals).one()
        if tuple(map(int, found)) != tuple(map(int, expected)):
            raise RuntimeError(f"{name} totals {tuple(found)} differ from the ledger's {tuple(expected)}")


def cross_check(plugin: types.ModuleType, url: str) -> None:
    """The rollups computed in SQL give the report the plugin computes from the ledger rows itself:
    asked for another zone with the same days (Etc/UTC), build_usage_report counts the rows afresh
    with its own rollup code (in a scratch database)."""
    ledger = plugin.ledger_for(url)
    try:
        from_sql = plugin.build_usage_report(ledger, UTC_ZONE, 10, REPORT_NOW)
        recounted = plugin.build_usage_report(ledger, ZoneInfo("Etc/UTC"), 10, REPORT_NOW)
    finally:
        ledger.dispose()
    if recounted.timezone == from_sql.timezone:
        raise RuntimeError("cross-check: the plugin did not recount for Etc/UTC")
    for field in ("periods", "top_users", "top_models"):
        if getattr(from_sql, field) != getattr(recounted, field):
            raise RuntimeError(f"the fixture's rollups differ from the plugin's own count: {field}")


def _generate(plugin: types.ModuleType, path: Path, rows: int) -> tuple[float, float]:
    url = sqlite_url(path)
    create_schema(plugin, url)
    engine = sa.create_engine(url)
    try:
        tables = reflect(engine)
        started = time.perf_counter()
        for chunk in generate_rows(rows, INSERT_CHUNK):
            with engine.begin() as conn:
                conn.execute(tables[LEDGER].insert(), ledger_rows_for(tables[LEDGER], chunk))
        with engine.begin() as conn:
            conn.execute(tables[USERS_TABLE].insert(), user_rows())
        inserted = time.perf_counter()
        progress(f"  {rows:,} ledger rows inserted in {inserted - started:.1f} s; computing rollups")
        with engine.begin() as conn:
            compute_rollups(conn, tables, UTC_ZONE)
        rolled_up = time.perf_counter()
        progress(f"  rollups computed in {rolled_up - inserted:.1f} s")
    finally:
        engine.dispose()
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
                "notes": "",
                "omitted_generation_ids": 0,
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
    """A fresh PostgreSQL database, its schema created by the plugin; the fixture's ledger and users
    copied in (COPY), the rollups computed there in SQL, then VACUUM ANALYZE. Returns durations."""
    server.create_database(dbname)
    url = server.url_for(dbname)
    create_schema(plugin, url)
    timings: dict[str, float] = {}
    engine = sa.create_engine(url)
    try:
        tables = reflect(engine)
        started = time.perf_counter()
        with contextlib.closing(sqlite3.connect(fixture.path)) as source, server.connect(dbname) as target:
            for name in (LEDGER, USERS_TABLE):
                source_columns = [row[1] for row in source.execute(f"PRAGMA table_info({name})")]
                if set(source_columns) != set(tables[name].c.keys()):
                    raise RuntimeError(f"{name}: SQLite and PostgreSQL columns differ")
                column_list = ", ".join(source_columns)
                statement = f"COPY {name} ({column_list}) FROM STDIN"
                with target.cursor() as cursor, cursor.copy(statement) as copy:
                    for row in source.execute(f"SELECT {column_list} FROM {name}"):
                        copy.write_row(row)
            target.execute(
                f"SELECT setval(pg_get_serial_sequence('{LEDGER}', 'id'), (SELECT max(id) FROM {LEDGER}))"
            )
        copied = time.perf_counter()
        timings["copy_seconds"] = copied - started
        with engine.begin() as conn:
            compute_rollups(conn, tables, UTC_ZONE)
        rebuilt = time.perf_counter()
        timings["rollup_seconds"] = rebuilt - copied
        with server.connect(dbname) as admin:  # autocommit: VACUUM runs outside a transaction
            admin.execute("VACUUM ANALYZE")
        timings["vacuum_seconds"] = time.perf_counter() - rebuilt
    finally:
        engine.dispose()
    return timings


def expected_rows_ok(report: Any, rows: int) -> None:
    requests = report.periods["all_time"].requests
    if requests != rows:
        raise RuntimeError(f"report counts {requests} requests, the fixture has {rows} rows")
