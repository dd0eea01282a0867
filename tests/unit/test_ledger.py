"""The ledger's guarantees on both engines: migrations, idempotency, exact rollups, spool/replay,
group commit."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tests.factories import UTC_ZONE, make_record, write
from tests.unit.rollup_checks import scan_rollups, stored_rollups


def rollup_zone(plugin: types.ModuleType, url: str) -> str | None:
    with plugin.ledger_for(url).engine.connect() as conn:
        return plugin.read_rollup_state(conn).zone  # type: ignore[no-any-return]


def wait_for_recount(plugin: types.ModuleType, url: str, zone: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with plugin.ledger_for(url).engine.connect() as conn:
            state = plugin.read_rollup_state(conn)
        if state.zone == zone and state.recount_zone is None:
            return
        time.sleep(0.05)
    raise AssertionError(f"the rollups were not recounted for {zone} within {seconds} s")


def test_migrations_are_named_recorded_and_run_once(plugin: types.ModuleType, database_url: str) -> None:
    ledger = plugin.Ledger(database_url)
    ledger.ensure_schema()
    names = [migration.name for migration in plugin.MIGRATIONS]
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
    ledger = plugin.ledger_for(database_url)
    assert ledger.spool.pending_count() >= 1

    write(plugin, database_url, rest + duplicates[30:])
    ledger.replay_spool()
    assert ledger.spool.pending_count() == 0
    with ledger.engine.connect() as conn:
        ids = list(conn.execute(sa.select(plugin.ledger_table.c.message_id)).scalars())
    assert sorted(ids) == sorted(r.message_id for r in records)  # every record, exactly once
    assert stored_rollups(plugin, database_url) == scan_rollups(plugin, database_url, UTC_ZONE)


def test_a_missing_directory_spools_and_a_later_replay_writes_it(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    directory = data_dir / "not" / "yet"
    url = f"sqlite:///{directory / 'ledger.sqlite3'}"
    assert write(plugin, url, [make_record(plugin, 1), make_record(plugin, 2)]) == ["spooled", "spooled"]
    directory.mkdir(parents=True)
    assert write(plugin, url, [make_record(plugin, 3), make_record(plugin, 1)]) == ["recorded", "recorded"]
    assert plugin.ledger_for(url).replay_spool() == 2  # msg-1 again (a duplicate) and msg-2
    with plugin.ledger_for(url).engine.connect() as conn:
        ids = sorted(conn.execute(sa.select(plugin.ledger_table.c.message_id)).scalars())
    assert ids == ["msg-1", "msg-2", "msg-3"]


def test_a_claim_left_by_release_1_0_0_is_replayed(plugin: types.ModuleType, database_url: str) -> None:
    """1.0.0 claimed a file by renaming it with its PID; such a file is replayed like any other."""
    ledger = plugin.ledger_for(database_url)
    path = ledger.spool.append([make_record(plugin, 5)])
    Path(path).rename(f"{path}.claimed-1-1")  # PID 1: alive, as a restarted container's server
    assert ledger.spool.pending_count() == 1
    write(plugin, database_url, [make_record(plugin, 6)])
    ledger.replay_spool()  # or the writer's own upkeep, which may hold the file at this moment
    deadline = time.monotonic() + 30
    while ledger.spool.pending_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    with ledger.engine.connect() as conn:
        assert sorted(conn.execute(sa.select(plugin.ledger_table.c.message_id)).scalars()) == [
            "msg-5",
            "msg-6",
        ]
    assert ledger.spool.pending_count() == 0


def test_a_spool_file_held_by_a_live_replay_is_left_alone_and_counted(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    """The claim is an OS lock: while one holder replays a file, nobody else does, the panel still
    counts it, and once the holder is gone (closed, or killed) the file is free again."""
    url = f"sqlite:///{data_dir / 'held.sqlite3'}"
    ledger = plugin.ledger_for(url)
    path = ledger.spool.append([make_record(plugin, 7)])
    with ledger.spool.claim(path) as held:
        assert held is not None and [r.message_id for r in held.records] == ["msg-7"]
        assert plugin.Ledger(url).replay_spool() == 0  # another "process" skips it
        assert ledger.spool.pending_count() == 1
    assert ledger.replay_spool() == 1
    assert ledger.spool.pending_count() == 0


def test_during_an_outage_a_write_never_touches_the_spool_files(
    plugin: types.ModuleType, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outlet latency must not grow with the backlog: while the database fails, replay is tried at
    most once per REPLAY_INTERVAL_SECONDS, not by every write."""
    url = f"sqlite:///{data_dir / 'missing' / 'ledger.sqlite3'}"
    ledger = plugin.ledger_for(url)
    for index in range(200):
        ledger.spool.append([make_record(plugin, 10_000 + index)])
    claims = 0
    real_claim = plugin.Spool.claim

    def counting_claim(self: Any, path: Path) -> Any:
        nonlocal claims
        claims += 1
        return real_claim(self, path)

    monkeypatch.setattr(plugin.Spool, "claim", counting_claim)
    assert write(plugin, url, [make_record(plugin, 1)]) == ["spooled"]
    time.sleep(0.2)  # the writer's upkeep after that batch: replay is not due yet
    claims_after_first = claims
    assert write(plugin, url, [make_record(plugin, i) for i in range(2, 40)]) == ["spooled"] * 38
    time.sleep(0.2)
    assert claims == claims_after_first <= 1
    assert ledger.spool.pending_count() >= 201


def test_a_report_in_another_zone_reads_without_rekeying_the_rollups(
    plugin: types.ModuleType, database_url: str
) -> None:
    write(plugin, database_url, [make_record(plugin, i) for i in range(120)])
    tokyo = ZoneInfo("Asia/Tokyo")
    before = stored_rollups(plugin, database_url)
    report = plugin.build_usage_report(
        plugin.ledger_for(database_url), tokyo, 5, now=datetime(2026, 11, 10, 20, 0, tzinfo=UTC)
    )
    assert report.timezone == "Asia/Tokyo"
    expected_total = sum(v["spend_pico"] for v in scan_rollups(plugin, database_url, tokyo)[0].values())
    assert report.periods["all_time"].spend_pico == expected_total
    assert rollup_zone(plugin, database_url) == "UTC"
    assert stored_rollups(plugin, database_url) == before  # reads never write


def test_a_zone_change_recounts_in_the_background_and_loses_nothing(
    plugin: types.ModuleType, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes go on during the recount (their rows are counted by a later chunk), the report says
    it is recounting, and at the end the new zone's rollups equal a full scan."""
    monkeypatch.setattr(plugin, "RECOUNT_CHUNK_ROWS", 25)
    write(plugin, database_url, [make_record(plugin, i) for i in range(120)])
    tokyo = ZoneInfo("Asia/Tokyo")
    ledger = plugin.ledger_for(database_url)
    ledger.store([make_record(plugin, 120)], tokyo)  # starts the recount, counts nothing yet
    report = plugin.build_usage_report(ledger, None, 5)
    assert report.timezone == "UTC" and report.health.recount == "Asia/Tokyo, 0%"
    write(plugin, database_url, [make_record(plugin, i) for i in range(121, 200)], zone=tokyo)
    wait_for_recount(plugin, database_url, "Asia/Tokyo")
    assert stored_rollups(plugin, database_url) == scan_rollups(plugin, database_url, tokyo)
    assert plugin.build_usage_report(ledger, None, 5).health.recount == ""


def test_an_upgraded_ledger_without_complete_rollups_is_counted_from_scratch(
    plugin: types.ModuleType, database_url: str
) -> None:
    """What migration 0005 leaves when 1.0.0's rollups were stale: no zone, a recount from id 0."""
    write(plugin, database_url, [make_record(plugin, i) for i in range(60)])
    ledger = plugin.ledger_for(database_url)
    with ledger.engine.begin() as conn:
        for table in plugin.ROLLUP_TABLES:
            conn.execute(table.delete())
        conn.execute(plugin.meta_table.delete().where(plugin.meta_table.c.key == "rollup_timezone"))
        conn.execute(plugin.META_UPSERT, {"key": "rollup_recount", "value": '{"zone": "UTC", "after_id": 0}'})
    with pytest.raises(plugin.RollupsRecounting):
        plugin.build_usage_report(ledger, None, 5)
    write(plugin, database_url, [make_record(plugin, 60)])
    wait_for_recount(plugin, database_url, "UTC")
    assert stored_rollups(plugin, database_url) == scan_rollups(plugin, database_url, UTC_ZONE)


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
        *(writer.write(plugin.WriteRequest(records=(r,), zone=UTC_ZONE)) for r in records)
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


def test_a_message_recorded_by_another_process_mid_write_is_retried_and_counted_once(
    plugin: types.ModuleType, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL another process may commit the same message between this writer's check and
    its INSERT (a duplicate outlet served by another worker). The check is made to miss the row
    once, as it would then; the INSERT's unique violation must lead to a retry, not a spool."""
    raced, fresh = (
        plugin.dataclasses.replace(make_record(plugin, n), generation_key=f"gen-race-{n}") for n in (1, 2)
    )
    assert write(plugin, database_url, [raced]) == ["recorded"]
    checks = []
    real_check = plugin.recorded_keys

    def stale_once(conn: sa.Connection, message_ids: list[str]) -> set[str]:
        checks.append(list(message_ids))
        return set() if len(checks) == 1 else real_check(conn, message_ids)

    monkeypatch.setattr(plugin, "recorded_keys", stale_once)
    ledger = plugin.ledger_for(database_url)
    assert ledger.store([raced, fresh], UTC_ZONE).inserted == {fresh.ledger_key}
    assert len(checks) == 2
    assert ledger.spool.pending_count() == 0 and ledger.spool.quarantined_count() == 0
    with ledger.engine.connect() as conn:
        ids = sorted(conn.execute(sa.select(plugin.ledger_table.c.message_id)).scalars())
    assert ids == sorted([raced.message_id, fresh.message_id])
    assert stored_rollups(plugin, database_url) == scan_rollups(plugin, database_url, UTC_ZONE)


def test_a_record_the_database_refuses_is_quarantined_and_never_halts_the_others(
    plugin: types.ModuleType, database_url: str
) -> None:
    """The issue's repro: 1 good, 1 the database refuses (10^19 pico-dollars overflows BIGINT),
    then 3 good. Before, every later record was spooled behind it forever."""
    overflowing = make_record(plugin, 2, usage=plugin.Usage(cost_pico=10**19, upstream_cost_pico=None))
    assert write(plugin, database_url, [make_record(plugin, 1)]) == ["recorded"]
    writer = plugin.writer_for(database_url)
    batch = [overflowing, make_record(plugin, 3), make_record(plugin, 4), make_record(plugin, 5)]
    futures = [writer.submit(plugin.WriteRequest(records=(r,), zone=UTC_ZONE)) for r in batch]
    assert [f.result(timeout=60).stored for f in futures] == [
        "quarantined",
        "recorded",
        "recorded",
        "recorded",
    ]
    assert write(plugin, database_url, [make_record(plugin, 6)]) == ["recorded"]
    ledger = plugin.ledger_for(database_url)
    assert ledger.spool.pending_count() == 0
    (entry,) = ledger.spool.quarantined()
    assert entry["record"]["message_id"] == "msg-2" and entry["reason"]
    report = plugin.build_usage_report(ledger, None, 5)
    assert report.health.quarantined == 1 and report.periods["all_time"].requests == 5
    assert "1 record(s) quarantined" in plugin.render_report_markdown(report)
    assert stored_rollups(plugin, database_url) == scan_rollups(plugin, database_url, UTC_ZONE)
    # A replay from the CLI retries it; still refused, it stays quarantined (once), never lost.
    assert ledger.retry_quarantined() == (0, 1)
    assert ledger.spool.quarantined_count() == 1


@pytest.mark.parametrize(
    "fault",
    [RecursionError("deep"), RuntimeError("boom"), SystemExit(3)],
    ids=["recursion-in-store", "error-in-store", "system-exit-in-store"],
)
def test_a_failure_inside_the_writer_spools_the_batch_and_the_writer_goes_on(
    plugin: types.ModuleType, data_dir: Path, monkeypatch: pytest.MonkeyPatch, fault: BaseException
) -> None:
    writer = plugin.writer_for(f"sqlite:///{data_dir / 'faults.sqlite3'}")
    real_store = writer.ledger.store
    failures = iter([fault])

    def faulty_store(records: list[Any], zone: Any) -> Any:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_store(records, zone)

    monkeypatch.setattr(writer.ledger, "store", faulty_store)
    first = writer.submit(plugin.WriteRequest(records=(make_record(plugin, 1),), zone=UTC_ZONE))
    assert first.result(timeout=30).stored == "spooled"
    second = writer.submit(plugin.WriteRequest(records=(make_record(plugin, 2),), zone=UTC_ZONE))
    assert second.result(timeout=30).stored == "recorded"
    assert writer.ledger.replay_spool() == 1


def test_a_writer_thread_that_died_is_started_again_by_the_next_request(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    writer = plugin.writer_for(f"sqlite:///{data_dir / 'dead.sqlite3'}")
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    writer._thread = dead  # as if it had died without cleaning up
    outcome = writer.submit(plugin.WriteRequest(records=(make_record(plugin, 1),), zone=UTC_ZONE))
    assert outcome.result(timeout=30).stored == "recorded"
    assert writer._thread is not dead


def test_a_failure_after_the_commit_still_answers_every_waiter(
    plugin: types.ModuleType, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception outside the guarded store (here in building the outcomes) must not leave an
    outlet waiting: the batch is spooled (a duplicate on replay) and the loop runs again."""
    writer = plugin.writer_for(f"sqlite:///{data_dir / 'outcomes.sqlite3'}")
    calls = iter([True])

    def failing_outcomes(batch: list[Any], result: Any) -> list[Any]:
        if next(calls, False):
            raise RecursionError("in outcomes")
        return [plugin.WriteOutcome("recorded") for _ in batch]

    monkeypatch.setattr(writer, "_outcomes", failing_outcomes)
    first = writer.submit(plugin.WriteRequest(records=(make_record(plugin, 1),), zone=UTC_ZONE))
    assert first.result(timeout=30).stored == "spooled"
    second = writer.submit(plugin.WriteRequest(records=(make_record(plugin, 2),), zone=UTC_ZONE))
    assert second.result(timeout=30).stored == "recorded"
    assert writer.ledger.replay_spool() == 1
    with writer.ledger.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(plugin.ledger_table)).scalar_one() == 2


def test_a_cancelled_waiter_never_breaks_the_writer(plugin: types.ModuleType, data_dir: Path) -> None:
    writer = plugin.writer_for(f"sqlite:///{data_dir / 'cancelled.sqlite3'}")
    gate = threading.Event()
    real_store = writer.ledger.store
    writer.ledger.store = lambda records, zone: (gate.wait(30), real_store(records, zone))[1]
    abandoned = writer.submit(plugin.WriteRequest(records=(make_record(plugin, 1),), zone=UTC_ZONE))
    time.sleep(0.1)
    abandoned.cancel()
    gate.set()
    later = writer.submit(plugin.WriteRequest(records=(make_record(plugin, 2),), zone=UTC_ZONE))
    assert later.result(timeout=30).stored == "recorded"
    with writer.ledger.engine.connect() as conn:  # the abandoned record was written all the same
        assert conn.execute(sa.select(sa.func.count()).select_from(plugin.ledger_table)).scalar_one() == 2


async def test_an_outlet_waits_a_bounded_time_then_spools_and_nothing_is_counted_twice(
    plugin: types.ModuleType, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plugin, "OUTLET_WAIT_SECONDS", 0.3)
    writer = plugin.writer_for(f"sqlite:///{data_dir / 'stalled.sqlite3'}")
    gate = threading.Event()
    real_store = writer.ledger.store
    writer.ledger.store = lambda records, zone: (gate.wait(30), real_store(records, zone))[1]
    started = time.monotonic()
    outcome = await writer.write(plugin.WriteRequest(records=(make_record(plugin, 1),), zone=UTC_ZONE))
    assert outcome.stored == "spooled" and time.monotonic() - started < 5
    assert writer.ledger.spool.pending_count() == 1
    gate.set()  # the stalled commit goes through after all; the spooled copy is a duplicate
    assert (
        await writer.write(plugin.WriteRequest(records=(make_record(plugin, 2),), zone=UTC_ZONE))
    ).stored == ("recorded")
    writer.ledger.replay_spool()
    with writer.ledger.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(plugin.ledger_table)).scalar_one() == 2


def users_row(plugin: types.ModuleType, url: str, user_id: str) -> tuple[str, datetime]:
    with plugin.ledger_for(url).engine.connect() as conn:
        row = conn.execute(
            sa.select(plugin.users_table.c.user_name, plugin.users_table.c.last_seen_at).where(
                plugin.users_table.c.user_id == user_id
            )
        ).one()
    return row.user_name, row.last_seen_at


def test_a_users_row_follows_the_latest_name(plugin: types.ModuleType, database_url: str) -> None:
    start = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)

    def completion(index: int, name: str, after: timedelta) -> Any:
        return make_record(plugin, index, user_id="ada", user_name=name, created_at=start + after)

    write(plugin, database_url, [completion(1, "Ada", timedelta(0))])
    write(plugin, database_url, [completion(2, "Ada L.", timedelta(seconds=40))])
    assert users_row(plugin, database_url, "ada") == (
        "Ada L.",
        (start + timedelta(seconds=40)).replace(tzinfo=None),
    )


def test_an_older_record_never_rolls_a_users_row_back(plugin: types.ModuleType, database_url: str) -> None:
    """A spooled record replayed late, or written by another process, must not bring back an old
    name."""
    now = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
    write(plugin, database_url, [make_record(plugin, 1, user_id="ada", user_name="Ada L.", created_at=now)])
    other_process = plugin.Ledger(database_url)
    older = make_record(plugin, 2, user_id="ada", user_name="Ada", created_at=now - timedelta(hours=1))
    assert other_process.store([older], UTC_ZONE).inserted == {older.message_id}
    other_process.dispose()
    assert users_row(plugin, database_url, "ada") == ("Ada L.", now.replace(tzinfo=None))


def test_a_half_written_spool_file_of_a_dead_writer_is_cleared_only_when_old(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    """A kill between writing and renaming leaves a .tmp file: never acknowledged, so never owed."""
    ledger = plugin.ledger_for(f"sqlite:///{data_dir / 'partial.sqlite3'}")
    ledger.spool.directory.mkdir(parents=True)
    fresh, old = ledger.spool.directory / "a.jsonl.tmp", ledger.spool.directory / "b.jsonl.tmp"
    fresh.write_text("{")
    old.write_text("{")
    hours_ago = time.time() - 2 * plugin.ABANDONED_PARTIAL_SECONDS
    os.utime(old, (hours_ago, hours_ago))
    assert ledger.replay_spool() == 0
    assert fresh.exists() and not old.exists()


def test_an_unreadable_quarantine_entry_never_blocks_retrying_the_others(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    url = f"sqlite:///{data_dir / 'retry.sqlite3'}"
    ledger = plugin.ledger_for(url)
    ledger.spool.quarantine([(make_record(plugin, 1), "OperationalError: was locked")])
    (path,) = ledger.spool.quarantined_files()
    with path.open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    assert ledger.retry_quarantined() == (1, 1)
    (kept,) = ledger.spool.quarantined()
    assert kept["line"] == "{not json"
    with ledger.engine.connect() as conn:
        assert list(conn.execute(sa.select(plugin.ledger_table.c.message_id)).scalars()) == ["msg-1"]
