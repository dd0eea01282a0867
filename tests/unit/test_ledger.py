"""The ledger's guarantees on both engines: migrations, idempotency, exact rollups, spool/replay,
group commit."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import types
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

UTC_ZONE = ZoneInfo("UTC")


def make_record(plugin: types.ModuleType, index: int, **overrides: Any) -> Any:
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


def scan_rollups(plugin: types.ModuleType, url: str, zone: ZoneInfo) -> list[dict[Any, dict[str, int]]]:
    """What the rollups must hold, computed the slow way: a full scan of the ledger."""
    expected: list[dict[Any, dict[str, int]]] = [
        defaultdict(lambda: dict.fromkeys(plugin.MEASURES, 0)) for _ in plugin.ROLLUP_TABLES
    ]
    with plugin.ledger_for(url).engine.connect() as conn:
        for row in conn.execute(sa.select(plugin.ledger_table)):
            r = row._mapping
            day = plugin.local_day(r["created_at"], zone)
            measures = {
                "requests": 1,
                "failed": int(r["status"] != "ok"),
                **{m: int(r[m] or 0) for m in plugin.MEASURES[2:]},
            }
            for index, key in enumerate(
                ((day,), (day, r["user_id"]), (day, r["served_model"], r["provider"]))
            ):
                for name, value in measures.items():
                    expected[index][key][name] += value
    return [dict(e) for e in expected]


def stored_rollups(plugin: types.ModuleType, url: str) -> list[dict[Any, dict[str, int]]]:
    stored = []
    with plugin.ledger_for(url).engine.connect() as conn:
        for table in plugin.ROLLUP_TABLES:
            keys = [column.name for column in table.primary_key.columns]
            stored.append(
                {
                    tuple(row._mapping[k] for k in keys): {m: int(row._mapping[m]) for m in plugin.MEASURES}
                    for row in conn.execute(sa.select(table))
                }
            )
    return stored


def write(plugin: types.ModuleType, url: str, records: list[Any], zone: ZoneInfo = UTC_ZONE) -> list[str]:
    writer = plugin.writer_for(url)
    futures = [writer.submit(plugin.WriteRequest(record=r, zone=zone)) for r in records]
    return [f.result(timeout=60).stored for f in futures]


def test_migrations_are_named_recorded_and_run_once(plugin: types.ModuleType, database_url: str) -> None:
    ledger = plugin.Ledger(database_url)
    ledger.ensure_schema()
    names = [name for name, _ in plugin.MIGRATIONS]
    assert ledger.applied_migrations() == names
    again = plugin.Ledger(database_url)
    again.ensure_schema()
    assert again.applied_migrations() == names
    ledger.dispose()
    again.dispose()


def test_rollups_equal_a_full_scan_after_duplicates_and_a_replayed_failure(
    plugin: types.ModuleType, database_url: str, request: pytest.FixtureRequest, data_dir: Path
) -> None:
    records = [make_record(plugin, i) for i in range(400)]
    duplicates = [make_record(plugin, i) for i in random.Random(7).sample(range(400), 60)]
    workload = records[:150] + duplicates[:30] + records[150:]
    first, outage, rest = workload[:100], workload[100:160], workload[160:]
    assert set(write(plugin, database_url, first)) <= {"recorded", "duplicate"}

    if database_url.startswith("sqlite"):
        # The same file opened read-only: SQLite refuses every write, as on a read-only mount.
        path = database_url.removeprefix("sqlite:///")
        failing_url = f"sqlite:///file:{path}?mode=ro&uri=true"
        assert set(write(plugin, failing_url, outage)) == {"spooled"}
    else:
        server = request.getfixturevalue("postgres_server")
        server.stop()
        try:
            assert set(write(plugin, database_url, outage)) == {"spooled"}
        finally:
            server.start()
    assert plugin.ledger_for(database_url).spool.pending_count() >= 1

    write(plugin, database_url, rest + duplicates[30:])
    assert plugin.ledger_for(database_url).spool.pending_count() == 0
    with plugin.ledger_for(database_url).engine.connect() as conn:
        ids = list(conn.execute(sa.select(plugin.ledger_table.c.message_id)).scalars())
    assert sorted(ids) == sorted(r.message_id for r in records)  # every record, exactly once
    assert stored_rollups(plugin, database_url) == scan_rollups(plugin, database_url, UTC_ZONE)


def test_a_missing_directory_spools_and_the_next_write_replays(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    directory = data_dir / "not" / "yet"
    url = f"sqlite:///{directory / 'ledger.sqlite3'}"
    assert write(plugin, url, [make_record(plugin, 1), make_record(plugin, 2)]) == ["spooled", "spooled"]
    directory.mkdir(parents=True)
    assert write(plugin, url, [make_record(plugin, 3), make_record(plugin, 1)]) == ["recorded", "duplicate"]
    with plugin.ledger_for(url).engine.connect() as conn:
        ids = sorted(conn.execute(sa.select(plugin.ledger_table.c.message_id)).scalars())
    assert ids == ["msg-1", "msg-2", "msg-3"]


def test_a_claim_left_by_a_dead_process_is_replayed(plugin: types.ModuleType, database_url: str) -> None:
    ledger = plugin.ledger_for(database_url)
    path = ledger.spool.append([make_record(plugin, 5)])
    os.rename(path, str(path) + ".claimed-999999999-1")  # no such pid
    write(plugin, database_url, [make_record(plugin, 6)])
    with ledger.engine.connect() as conn:
        assert sorted(conn.execute(sa.select(plugin.ledger_table.c.message_id)).scalars()) == [
            "msg-5",
            "msg-6",
        ]
    assert ledger.spool.pending_count() == 0


def test_a_time_zone_change_rekeys_the_rollups_exactly(plugin: types.ModuleType, database_url: str) -> None:
    write(plugin, database_url, [make_record(plugin, i) for i in range(120)])
    tokyo = ZoneInfo("Asia/Tokyo")
    report = plugin.build_usage_report(
        plugin.ledger_for(database_url), tokyo, 5, now=datetime(2026, 11, 10, 20, 0, tzinfo=UTC)
    )
    assert report.timezone == "Asia/Tokyo"
    assert stored_rollups(plugin, database_url) == scan_rollups(plugin, database_url, tokyo)
    write(plugin, database_url, [make_record(plugin, i) for i in range(120, 160)], zone=tokyo)
    assert stored_rollups(plugin, database_url) == scan_rollups(plugin, database_url, tokyo)


async def test_concurrent_outlets_share_commits_and_are_durable_on_return(
    plugin: types.ModuleType, database_url: str
) -> None:
    writer = plugin.writer_for(database_url)
    writer.ledger.ensure_schema()
    commits = 0

    def count(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    sa.event.listen(writer.ledger.engine, "commit", count)
    records = [make_record(plugin, i) for i in range(64)]
    outcomes = await asyncio.gather(
        *(asyncio.wrap_future(writer.submit(plugin.WriteRequest(record=r, zone=UTC_ZONE))) for r in records)
    )
    assert {o.stored for o in outcomes} == {"recorded"}
    assert commits < len(records)  # group commit: one transaction served many outlets
    fresh = sa.create_engine(plugin.normalize_database_url(database_url))
    with fresh.connect() as conn:  # another connection sees every row: committed before returning
        assert conn.execute(sa.select(sa.func.count()).select_from(plugin.ledger_table)).scalar_one() == 64
    fresh.dispose()


def test_money_survives_the_round_trip_exactly(plugin: types.ModuleType, database_url: str) -> None:
    huge = make_record(plugin, 1, usage=plugin.Usage(cost_pico=175_335_609_900, upstream_cost_pico=None))
    write(plugin, database_url, [huge])
    (row,) = list(plugin.export_rows(plugin.ledger_for(database_url)))
    assert row["cost_usd"] == "0.1753356099" and row["upstream_cost_usd"] is None


def test_an_older_ledger_upgrades_and_its_rollups_are_recounted_exactly(
    plugin: types.ModuleType, database_url: str
) -> None:
    write(plugin, database_url, [make_record(plugin, i) for i in range(50)])
    ledger = plugin.ledger_for(database_url)
    latest = plugin.MIGRATIONS[-1][0]
    with ledger.engine.begin() as conn:  # as if the newest migration had never run
        conn.execute(plugin.migrations_table.delete().where(plugin.migrations_table.c.name == latest))
    upgraded = plugin.Ledger(database_url)
    upgraded.ensure_schema()
    assert upgraded.applied_migrations() == [name for name, _ in plugin.MIGRATIONS]
    plugin.build_usage_report(upgraded, UTC_ZONE, 5)  # the first read recounts stale rollups
    assert stored_rollups(plugin, database_url) == scan_rollups(plugin, database_url, UTC_ZONE)
    upgraded.dispose()


def test_a_message_recorded_by_another_process_mid_write_is_retried_and_counted_once(
    plugin: types.ModuleType, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL another process may commit the same message between this writer's check and
    its INSERT (a duplicate outlet served by another worker). The check is made to miss the row
    once, as it would then; the INSERT's unique violation must lead to a retry, not a spool."""
    raced, fresh = make_record(plugin, 1), make_record(plugin, 2)
    assert write(plugin, database_url, [raced]) == ["recorded"]
    checks = []
    real_check = plugin.recorded_message_ids

    def stale_once(conn: sa.Connection, message_ids: list[str]) -> set[str]:
        checks.append(list(message_ids))
        return set() if len(checks) == 1 else real_check(conn, message_ids)

    monkeypatch.setattr(plugin, "recorded_message_ids", stale_once)
    ledger = plugin.ledger_for(database_url)
    assert ledger.write([raced, fresh], UTC_ZONE) == {fresh.message_id}
    assert len(checks) == 2
    assert ledger.spool.pending_count() == 0
    with ledger.engine.connect() as conn:
        ids = sorted(conn.execute(sa.select(plugin.ledger_table.c.message_id)).scalars())
    assert ids == sorted([raced.message_id, fresh.message_id])
    assert stored_rollups(plugin, database_url) == scan_rollups(plugin, database_url, UTC_ZONE)


async def test_the_writer_lets_the_loop_it_answered_submit_again_before_closing_a_batch(
    plugin: types.ModuleType, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 outlets that write again as soon as they are answered, on a loop that is slow to resume
    them (each spends 1 ms of CPU first). Closing a batch before the loop has run them would commit
    whatever trickled in (dozens of small batches); waiting for the loop keeps every batch full."""
    monkeypatch.setattr(plugin, "LOOP_CATCH_UP_SECONDS", 30.0)  # the bound is not under test here
    writer = plugin.writer_for(f"sqlite:///{data_dir / 'catch-up.sqlite3'}")
    writer.ledger.ensure_schema()
    batches: list[int] = []
    real_write = writer.ledger.write

    def counting_write(records: list[Any], zone: ZoneInfo) -> set[str]:
        batches.append(len(records))
        inserted: set[str] = real_write(records, zone)
        return inserted

    writer.ledger.write = counting_write
    pending = iter([make_record(plugin, i) for i in range(64 * 4)])

    async def outlet() -> None:
        for record in pending:
            await writer.write(plugin.WriteRequest(record=record, zone=UTC_ZONE))
            busy_until = time.perf_counter() + 0.001
            while time.perf_counter() < busy_until:  # the rest of the request's work on the loop
                pass

    await asyncio.gather(*(outlet() for _ in range(64)))
    assert sum(batches) == 64 * 4
    assert len(batches) <= 5, batches  # 64 each; the first (and so the last) may be split in two


def test_a_stuck_event_loop_holds_up_other_writes_for_at_most_the_catch_up_bound(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    writer = plugin.writer_for(f"sqlite:///{data_dir / 'stuck.sqlite3'}")
    writer.ledger.ensure_schema()
    answered, release = threading.Event(), threading.Event()

    async def outlet_then_stuck() -> None:
        await writer.write(plugin.WriteRequest(record=make_record(plugin, 1), zone=UTC_ZONE))
        answered.set()
        release.wait(60)  # synchronous code blocking the loop: it cannot run the writer's callback

    stuck_loop = threading.Thread(target=asyncio.run, args=(outlet_then_stuck(),))
    stuck_loop.start()
    try:
        assert answered.wait(30)
        outcome = writer.submit(plugin.WriteRequest(record=make_record(plugin, 2), zone=UTC_ZONE))
        assert outcome.result(timeout=30).stored == "recorded"
        assert not release.is_set()  # committed while that loop was still stuck
    finally:
        release.set()
        stuck_loop.join()


def users_row(plugin: types.ModuleType, url: str, user_id: str) -> tuple[str, datetime]:
    with plugin.ledger_for(url).engine.connect() as conn:
        row = conn.execute(
            sa.select(plugin.users_table.c.user_name, plugin.users_table.c.last_seen_at).where(
                plugin.users_table.c.user_id == user_id
            )
        ).one()
    return row.user_name, row.last_seen_at


def test_a_users_row_follows_the_latest_name_and_is_rewritten_at_most_once_a_minute(
    plugin: types.ModuleType, database_url: str
) -> None:
    start = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)

    def completion(index: int, name: str, after: timedelta) -> Any:
        return make_record(plugin, index, user_id="ada", user_name=name, created_at=start + after)

    write(plugin, database_url, [completion(1, "Ada", timedelta(0))])
    write(plugin, database_url, [completion(2, "Ada", timedelta(seconds=30))])
    assert users_row(plugin, database_url, "ada") == ("Ada", start.replace(tzinfo=None))
    write(plugin, database_url, [completion(3, "Ada L.", timedelta(seconds=40))])  # a rename: at once
    assert users_row(plugin, database_url, "ada") == (
        "Ada L.",
        (start + timedelta(seconds=40)).replace(tzinfo=None),
    )
    write(plugin, database_url, [completion(4, "Ada L.", timedelta(minutes=2))])
    assert users_row(plugin, database_url, "ada") == (
        "Ada L.",
        (start + timedelta(minutes=2)).replace(tzinfo=None),
    )


def test_an_older_record_never_rolls_a_users_row_back(plugin: types.ModuleType, database_url: str) -> None:
    """A spooled record replayed late, or written by another process that knows nothing of this
    one's cache, must not bring back an old name."""
    now = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
    write(plugin, database_url, [make_record(plugin, 1, user_id="ada", user_name="Ada L.", created_at=now)])
    other_process = plugin.Ledger(database_url)
    older = make_record(plugin, 2, user_id="ada", user_name="Ada", created_at=now - timedelta(hours=1))
    assert other_process.write([older], UTC_ZONE) == {older.message_id}
    other_process.dispose()
    assert users_row(plugin, database_url, "ada") == ("Ada L.", now.replace(tzinfo=None))
