"""A ledger written by release 1.0.0, and one written by 1.1.0 (the last release with a row per
message), is upgraded by the current plugin with no loss, on SQLite and PostgreSQL.

Each release is built from git history: its plugin source is read at the release commit and loaded
as Open WebUI loads a function. It writes a varied ledger and leaves records in its spool; then the
current plugin writes one record, which runs the migrations and replays the spool, and one more
generation of a message the release recorded (a "Continue response" after the upgrade).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import subprocess
import sys
import time
import types
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tests.reliability.independent import (
    MEASURES,
    RELEASE_1_0_0,
    RELEASE_1_1_0,
    ROLLUP_KEYS,
    Rollups,
    load_release,
    scanned_rollups,
    successful_record,
)
from tests.reliability.schema_shape import schema_differences

PARIS = ZoneInfo("Europe/Paris")
OLD_RECORDS = 200
SPOOLED = "old-spooled"
CLAIMED_BY_DEAD_PROCESS = "old-spooled-claimed"
REPLAY_WAIT_SECONDS = 15.0


def old_record(old: types.ModuleType, index: int) -> Any:
    """A varied 1.0.0 record: several users, models and days (some close to midnight in Paris),
    BYOK, failures, cached and reasoning tokens, unknown cost, tool rounds."""
    rng = random.Random(index)
    byok = index % 7 == 0
    failed = index % 11 == 0
    prompt, completion = rng.randrange(1, 20_000), rng.randrange(0, 4_000)
    cost = None if index % 13 == 0 else rng.randrange(0, 5 * 10**10)
    upstream = rng.randrange(1, 10**11) if byok else cost
    usage = old.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=rng.randrange(0, prompt + 1) if index % 3 == 0 else 0,
        cache_write_tokens=rng.randrange(0, 50) if index % 5 == 0 else 0,
        reasoning_tokens=rng.randrange(0, completion + 1) if index % 4 == 0 else 0,
        cost_pico=cost,
        upstream_cost_pico=upstream,
        is_byok=byok,
    )
    day = datetime(2026, 9, 20, tzinfo=UTC) + timedelta(days=index % 17)
    # Every fifth record lands between 22:00 and 24:00 UTC: the next day in Paris.
    moment = day + (
        timedelta(hours=22, minutes=rng.randrange(120))
        if index % 5 == 0
        else timedelta(
            hours=rng.randrange(0, 21), minutes=rng.randrange(60), microseconds=rng.randrange(10**6)
        )
    )
    rounds = 1 + (index % 9 == 0)
    return old.UsageRecord(
        message_id=f"old-{index:04d}",
        chat_id=f"chat-{index % 23}",
        user_id=f"user-{index % 6}",
        user_name=["Ada", "Grace", "Zoë 🚀", "Edsger", "Barbara", "Ken"][index % 6],
        generation_ids=tuple(f"gen-{1700000000 + index}-{round_:02d}" for round_ in range(rounds)),
        model="openrouter/auto",
        served_model=["openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet", "google/gemini-2.0-flash"][
            index % 3
        ],
        provider=["OpenAI", "Anthropic", "Google", ""][index % 4],
        usage=usage,
        status="error" if failed else "ok",
        error="502: Provider returned error" if failed else "",
        latency_ms=rng.randrange(200, 60_000),
        ttft_ms=None if failed else rng.randrange(50, 2_000),
        raw_usage={"prompt_tokens": prompt, "completion_tokens": completion, "cost": 1e-12 * (cost or 0)},
        created_at=moment,
    )


def spooled_record(old: types.ModuleType, message_id: str) -> Any:
    return successful_record(
        old,
        message_id,
        "Spooled",
        generation_id="gen-1700009999-spooled",
        served_model="openai/gpt-4o-mini",
        provider="OpenAI",
        tokens=(120, 30),
        cost_pico=75_000_000,
        latency_ms=1500,
        ttft_ms=300,
        created_at=datetime(2026, 10, 6, 21, 30, tzinfo=UTC),
    )


def continued_record(plugin: types.ModuleType) -> Any:
    """A second generation of a message the release recorded: a Continue after the upgrade."""
    return successful_record(
        plugin,
        "old-0001",
        "Continued",
        generation_id="gen-1700010001-continued",
        served_model="openai/gpt-4o-mini",
        provider="OpenAI",
        tokens=(300, 40),
        cost_pico=91_000_000,
        latency_ms=800,
        ttft_ms=100,
        created_at=datetime(2026, 10, 7, 12, 5, tzinfo=UTC),
        generation_key="gen-1700010001-continued",
    )


def new_record(plugin: types.ModuleType) -> Any:
    return successful_record(
        plugin,
        "new-after-upgrade",
        "New",
        generation_id="gen-1700010000-new",
        served_model="anthropic/claude-3.5-sonnet",
        provider="Anthropic",
        tokens=(10, 5),
        cost_pico=24_150_000,
        latency_ms=900,
        ttft_ms=120,
        created_at=datetime(2026, 10, 7, 12, 0, tzinfo=UTC),
    )


def table_rows(url: str, table: str, order_by: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY {order_by}"))
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


def stored_rollups(url: str, zone: str) -> Rollups:
    stored = {}
    for table, keys in ROLLUP_KEYS.items():
        rows = [row for row in table_rows(url, table, ", ".join(keys)) if row["zone"] == zone]
        stored[table] = {
            tuple(row[key] for key in keys): tuple(int(row[m]) for m in MEASURES) for row in rows
        }
    return stored


def export_json(plugin: types.ModuleType, url: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert plugin.cli_main(["export", "--format", "json", "--database-url", url]) == 0
    exported: list[dict[str, Any]] = json.loads(out.getvalue())
    return exported


def dead_pid() -> int:
    """The id of a process that has exited and been reaped: what a killed 1.0.0 process leaves."""
    probe = subprocess.Popen([sys.executable, "-c", "pass"])
    probe.wait(timeout=30)
    return probe.pid


def write_with_release(old: types.ModuleType, url: str, release: str) -> None:
    """The released plugin writes OLD_RECORDS records. Two more wait in its spool: one file never
    replayed, and one that a process of the release had claimed for replay when it was killed (1.0.0
    claimed by renaming the file; later releases hold an OS lock, which dies with the process)."""
    writer = old.writer_for(url)
    futures = [
        writer.submit(old.WriteRequest(record=old_record(old, index), zone=PARIS))
        for index in range(OLD_RECORDS)
    ]
    outcomes = [future.result(timeout=60).stored for future in futures]
    assert outcomes == ["recorded"] * OLD_RECORDS, f"1.0.0 did not record every record: {set(outcomes)}"
    spool = writer.ledger.spool
    spool.append([spooled_record(old, SPOOLED)])
    claimed = spool.append([spooled_record(old, CLAIMED_BY_DEAD_PROCESS)])
    if release == RELEASE_1_0_0:
        claimed.rename(claimed.with_name(f"{claimed.name}.claimed-{dead_pid()}-1"))
    assert spool.pending_count() == 2
    for open_writer in list(old._LEDGERS.values()):
        open_writer.ledger.dispose()


def replay_until_empty(ledger: Any) -> int:
    """Replay the spool until no file is left (the writer may hold one mid-replay); bounded."""
    replayed = 0
    deadline = time.monotonic() + REPLAY_WAIT_SECONDS
    while ledger.spool.pending_count() and time.monotonic() < deadline:
        replayed += ledger.replay_spool()
        time.sleep(0.05)
    return replayed


@pytest.mark.parametrize("release", [RELEASE_1_0_0, RELEASE_1_1_0], ids=["1.0.0", "1.1.0"])
def test_a_released_ledger_is_upgraded_with_no_loss(
    plugin: types.ModuleType, database_url: str, release: str
) -> None:
    """Every row the release wrote survives the upgrade unchanged, id included (new columns at their
    defaults, the generation key its message id), its spooled records are replayed (one of them
    claimed by a process that died), a new generation of an old message is a row of its own,
    every migration is recorded, the schema is the declared one, the Paris rollups equal a full
    scan of the ledger, and the export has one row per record."""
    old = load_release(release)
    write_with_release(old, database_url, release)
    old_rows = table_rows(database_url, "openrouter_usage_ledger", "id")
    old_users = table_rows(database_url, "openrouter_usage_users", "user_id")
    assert len(old_rows) == OLD_RECORDS

    started = time.monotonic()
    outcome = (
        plugin.writer_for(database_url)
        .submit(plugin.WriteRequest(records=(new_record(plugin),), zone=PARIS))
        .result(timeout=60)
    )
    assert outcome.stored == "recorded"
    continued = (
        plugin.writer_for(database_url)
        .submit(plugin.WriteRequest(records=(continued_record(plugin),), zone=PARIS))
        .result(timeout=60)
    )
    assert continued.stored == "recorded"
    ledger = plugin.ledger_for(database_url)
    replayed = replay_until_empty(ledger)
    upgrade_seconds = time.monotonic() - started
    assert ledger.spool.pending_count() == 0, "the records 1.0.0 spooled were not all replayed"
    assert ledger.spool.quarantined_count() == 0

    rows = table_rows(database_url, "openrouter_usage_ledger", "id")
    by_key = {row["generation_key"]: row for row in rows}
    by_message = {row["message_id"]: row for row in rows if row["generation_key"] == row["message_id"]}
    changed = [
        (before["message_id"], column)
        for before in old_rows
        for column in before
        if by_message.get(before["message_id"], {}).get(column) != before[column]
    ]
    assert not changed, f"{len(changed)} values of the release's rows changed or vanished, e.g. {changed[:5]}"
    upgraded = [by_message[before["message_id"]] for before in old_rows]
    assert {(row["notes"], row["omitted_generation_ids"]) for row in upgraded} == {("", 0)}
    continuation = by_key["gen-1700010001-continued"]
    assert (continuation["message_id"], continuation["spend_pico"]) == ("old-0001", 91_000_000)

    for message_id in (SPOOLED, CLAIMED_BY_DEAD_PROCESS):
        spooled = by_message.get(message_id)
        assert spooled is not None, f"the spooled 1.0.0 record {message_id} is not in the ledger"
        values = (spooled["prompt_tokens"], spooled["cost_pico"], spooled["spend_pico"], spooled["notes"])
        assert values == (120, 75_000_000, 75_000_000, "")
    assert "new-after-upgrade" in by_key
    assert len(rows) == OLD_RECORDS + 4

    users = {row["user_id"]: row for row in table_rows(database_url, "openrouter_usage_users", "user_id")}
    assert all(
        {column: users.get(user["user_id"], {}).get(column) for column in user} == user for user in old_users
    ), "1.0.0 users rows changed"

    migrations = [row["name"] for row in table_rows(database_url, "openrouter_usage_migrations", "name")]
    assert migrations == sorted(migration.name for migration in plugin.MIGRATIONS)
    differences = schema_differences(plugin, database_url)
    assert not differences, "the upgraded ledger differs from the declared schema:\n" + "\n".join(differences)

    meta = {row["key"]: row["value"] for row in table_rows(database_url, "openrouter_usage_meta", '"key"')}
    assert meta.get("rollup_timezone") == "Europe/Paris"
    assert "rollup_recount" not in meta, "a rollup recount is still running"
    expected, stored = scanned_rollups(rows, PARIS), stored_rollups(database_url, "Europe/Paris")
    for table in ROLLUP_KEYS:
        assert stored[table] == expected[table], f"{table} for Europe/Paris differs from a full scan"

    exported = export_json(plugin, database_url)
    assert sorted(row["generation_key"] for row in exported) == sorted(by_key)

    engine = sa.engine.make_url(database_url).get_backend_name()
    print(
        f"\nupgrade from {release[:7]} on {engine}: {len(old_rows)} rows and 2 spooled records "
        f"(1 claimed) left by the release; "
        f"after the upgrade {len(rows)} rows, {replayed} replayed by the test (the rest by the writer), "
        f"{len(migrations)} migrations, {sum(len(sums) for sums in stored.values())} Paris rollup rows equal "
        f"to a full scan, {len(exported)} exported; first write and replay took {upgrade_seconds:.2f} s"
    )
