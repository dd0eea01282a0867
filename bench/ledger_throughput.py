"""Ledger throughput with 64 concurrent outlets, durable on SQLite, against one commit per record.

Group commit: 64 asyncio tasks on one loop, each awaiting
`writer.write(WriteRequest(record=..., zone=UTC))` (what outlet awaits) in a loop until the
records run out: the plugin's own writer thread batches whatever arrived during the previous
commit into one transaction (WAL, synchronous=FULL: every commit is fsync'd). Baseline: the
same records written by `Ledger.write([record], zone)` one at a time from one thread, one
transaction (and one fsync) each. Each run starts on a fresh database file; rounds alternate
group commit and baseline, and the figures are the medians over rounds (the ratio is taken per
round). Records are tests/unit/test_ledger.py::make_record records spread over 200 users, all
created now, like live traffic.
"""

from __future__ import annotations

import asyncio
import collections
import cProfile
import pstats
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bench.common import (
    BenchResult,
    Figure,
    at_least,
    close_plugin,
    command_for,
    isolated_data_dir,
    ledger_row_count,
    load_plugin,
    main_for,
    make_records,
    median,
    number,
    progress,
    sqlite_url,
)

NAME = "ledger_throughput"
CONCURRENCY = 64
TARGET_RATE = 5000.0
TARGET_RATIO = 10.0
UTC = ZoneInfo("UTC")


def group_commit_run(plugin: types.ModuleType, url: str, records: Sequence[Any]) -> tuple[float, float]:
    """(records/s, mean records per commit) for CONCURRENCY concurrent submitters."""
    writer = plugin.writer_for(url)
    writer.ledger.ensure_schema()
    commits = 0
    write = writer.ledger.write

    def counting_write(batch: Sequence[Any], zone: ZoneInfo) -> set[str]:
        nonlocal commits
        commits += 1
        inserted: set[str] = write(batch, zone)
        return inserted

    writer.ledger.write = counting_write  # instance attribute: counts transactions, changes nothing
    outcomes: collections.Counter[str] = collections.Counter()

    async def outlets() -> float:
        pending = iter(records)

        async def outlet_task() -> None:
            for record in pending:
                request = plugin.WriteRequest(record=record, zone=UTC)
                outcome = await writer.write(request)
                outcomes[outcome.stored] += 1

        started = time.perf_counter()
        await asyncio.gather(*(outlet_task() for _ in range(CONCURRENCY)))
        return time.perf_counter() - started

    seconds = asyncio.run(outlets())
    _check(plugin, url, records, outcomes)
    return len(records) / seconds, len(records) / max(commits, 1)


def baseline_run(plugin: types.ModuleType, url: str, records: Sequence[Any]) -> float:
    """records/s committing each record in its own transaction, from one thread."""
    ledger = plugin.Ledger(url)
    ledger.ensure_schema()
    try:
        started = time.perf_counter()
        for record in records:
            ledger.write([record], UTC)
        seconds = time.perf_counter() - started
    finally:
        ledger.dispose()
    _check(plugin, url, records, collections.Counter(recorded=len(records)))
    return len(records) / seconds


def profile_writes(plugin: types.ModuleType, url: str, batches: Sequence[Sequence[Any]]) -> dict[str, float]:
    """Where Ledger.write spends its time (single thread, no asyncio): wall ms per write measured
    without the profiler, then cProfile's self time bucketed by where the code lives."""
    ledger = plugin.Ledger(url)
    ledger.ensure_schema()
    half = len(batches) // 2
    try:
        for batch in batches[:2]:  # warm-up
            ledger.write(batch, UTC)
        started = time.perf_counter()
        for batch in batches[2:half]:
            ledger.write(batch, UTC)
        wall_ms = (time.perf_counter() - started) * 1000 / (half - 2)
        profiler = cProfile.Profile()
        profiler.enable()
        for batch in batches[half:]:
            ledger.write(batch, UTC)
        profiler.disable()
    finally:
        ledger.dispose()
    buckets: collections.Counter[str] = collections.Counter()
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rollups = inserts = 0.0
    for (filename, _line, function), (_cc, _nc, self_time, cumulative, _callers) in stats.items():
        if "function_openrouter_usage" in filename and function == "_apply_rollups":
            rollups = cumulative
        if "function_openrouter_usage" in filename and function == "_insert_records":
            inserts = cumulative
        if "/sqlalchemy/sql/" in filename:
            bucket = "compile"  # statement construction and compilation
        elif "sqlite3.Connection' objects" in function and "commit" in function:
            bucket = "commit"
        elif "sqlite3.Cursor' objects" in function or "sqlite3.Connection' objects" in function:
            bucket = "sqlite"
        elif "/sqlalchemy/" in filename:
            bucket = "sqlalchemy_other"
        elif "function_openrouter_usage" in filename:
            bucket = "plugin"
        else:
            bucket = "other"
        buckets[bucket] += self_time
    total = sum(buckets.values())
    shares = {key: value / total for key, value in buckets.items()}
    shares["wall_ms"] = wall_ms
    shares["rollups_cumulative"] = rollups / total
    shares["inserts_cumulative"] = inserts / total
    return shares


def _profile_detail(shares: dict[str, float]) -> str:
    other = shares.get("sqlalchemy_other", 0) + shares.get("other", 0)
    return (
        f"{shares.get('compile', 0):.0%} SQLAlchemy statement build+compile, "
        f"{shares.get('sqlite', 0):.0%} sqlite3 execute, "
        f"{shares.get('commit', 0):.0%} commit (fsync), "
        f"{shares.get('plugin', 0):.0%} plugin code, {other:.0%} other (cProfile self time); "
        f"cumulative: _insert_records {shares['inserts_cumulative']:.0%}, "
        f"of which _apply_rollups {shares['rollups_cumulative']:.0%}"
    )


def _check(
    plugin: types.ModuleType, url: str, records: Sequence[Any], outcomes: collections.Counter[str]
) -> None:
    stored = ledger_row_count(plugin, url)
    if stored != len(records) or outcomes["recorded"] != len(records):
        raise RuntimeError(
            f"expected {len(records)} recorded rows, got {stored} rows and outcomes {dict(outcomes)}"
        )


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    rounds, count = (1, 2000) if quick else (3, 5000)
    group_rates: list[float] = []
    batch_sizes: list[float] = []
    baseline_rates: list[float] = []
    ratios: list[float] = []
    with isolated_data_dir(NAME) as data:
        for index in range(rounds):
            plugin = load_plugin()
            try:
                records = make_records(plugin, count, f"r{index}")
                progress(f"round {index + 1}/{rounds}: group commit, {count} records, {CONCURRENCY} outlets")
                rate, batch = group_commit_run(
                    plugin, sqlite_url(Path(data) / f"group-{index}.sqlite3"), records
                )
                progress(f"round {index + 1}/{rounds}: baseline, {count} records, one commit each")
                baseline = baseline_run(plugin, sqlite_url(Path(data) / f"single-{index}.sqlite3"), records)
            finally:
                close_plugin(plugin)
            progress(f"  group {rate:,.0f}/s (batch {batch:.1f}), baseline {baseline:,.0f}/s")
            group_rates.append(rate)
            batch_sizes.append(batch)
            baseline_rates.append(baseline)
            ratios.append(rate / baseline)
    rate, baseline, ratio = median(group_rates), median(baseline_rates), median(ratios)
    per_round = ", ".join(number(r) for r in group_rates)
    result.add(
        Figure(
            "ledger_throughput.group_commit_rate",
            f"group commit, {CONCURRENCY} concurrent outlets, durable SQLite",
            rate,
            "records/s",
            f">= {TARGET_RATE:,.0f} records/s",
            at_least(rate, TARGET_RATE),
            f"{rounds} round(s) of {count:,} records: {per_round}",
        )
    )
    result.add(
        Figure(
            "ledger_throughput.baseline_rate",
            "baseline: one commit per record, one thread",
            baseline,
            "records/s",
            detail=", ".join(number(r) for r in baseline_rates),
        )
    )
    result.add(
        Figure(
            "ledger_throughput.ratio",
            "group commit / baseline",
            ratio,
            "x",
            f">= {TARGET_RATIO:.0f}x",
            at_least(ratio, TARGET_RATIO),
            ", ".join(f"{r:.1f}" for r in ratios),
        )
    )
    result.add(
        Figure(
            "ledger_throughput.mean_batch",
            "records per transaction under group commit",
            median(batch_sizes),
            "records",
            detail=f"cap {CONCURRENCY} (one per waiting outlet)",
        )
    )
    with isolated_data_dir(NAME) as data:
        plugin = load_plugin()
        try:
            progress("profiling Ledger.write: batches of 64 and single records")
            records = make_records(plugin, 64 * 24 + 48, "profile")
            batches = [records[i : i + 64] for i in range(0, 64 * 24, 64)]
            batched = profile_writes(plugin, sqlite_url(Path(data) / "profile-64.sqlite3"), batches)
            singles = [[record] for record in records[64 * 24 :]]
            single = profile_writes(plugin, sqlite_url(Path(data) / "profile-1.sqlite3"), singles)
        finally:
            close_plugin(plugin)
    for key, label, shares in (
        ("batch64", "a 64-record batch", batched),
        ("single", "a 1-record write", single),
    ):
        result.add(
            Figure(
                f"ledger_throughput.write_{key}_ms",
                f"Ledger.write of {label} (one thread, wall)",
                shares["wall_ms"],
                "ms",
                detail=_profile_detail(shares),
            )
        )
    result.note(
        "SQLite file on the machine's ext4 disk; journal_mode=WAL, synchronous=FULL as the plugin sets them."
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main_for(NAME, run))
