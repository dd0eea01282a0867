"""Ledger throughput with 64 concurrent outlets, durable on SQLite.

Target: at least 2,000 records/s committed and durable, on SQLite, with 64 concurrent outlets.

Method: 64 asyncio tasks on one loop, each awaiting `writer.write(WriteRequest(records=(...,), zone=UTC))`
(what outlet awaits) in a loop until the records run out; `writer = writer_for(url)`, the plugin's
own group-commit writer, which commits whatever is waiting in one transaction (WAL,
synchronous=FULL: every commit is fsync'd). Every write must answer "recorded"; then the record is
committed: every 64th one is looked up, the moment its write returns, through a separate sqlite3
connection, and after the run the ledger must hold every record, and the writer's connection must
report journal_mode=wal and synchronous=FULL (or EXTRA). One warm-up write (not timed) creates the
schema and starts the writer thread. Each round starts on a fresh database file; records/s is all
records over the wall time from the first write to the last answer; the figure is the median over
rounds. Records are tests/factories.py::make_record records spread over 200 users, all created now,
like live traffic.

For information: release 1.0.0 (git c1e0c47, loaded from git like bench.event_loop does) in the
same rounds, back to back with the current plugin, so that the two can be compared on a machine
whose speed varies; the current plugin with one outlet (so one commit per record); each thread's
CPU per record; and where the writer and loop threads' time goes at 64 outlets (bench/sampler.py;
a separate, untimed run).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import sqlite3
import threading
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from bench.common import (
    RELEASE_COMMIT,
    RELEASE_LABEL,
    BenchResult,
    Figure,
    at_least,
    close_plugin,
    command_for,
    isolated_data_dir,
    ledger_row_count,
    load_plugin,
    load_release_plugin,
    main_for,
    make_records,
    median,
    number,
    progress,
    sqlite_url,
)
from bench.sampler import ThreadSampler

NAME = "ledger_throughput"
WRITER_THREAD = "openrouter_usage_writer"  # the plugin's writer thread's name
CONCURRENCY = 64
TARGET_RATE = 2000.0
VISIBILITY_EVERY = 64  # every n-th record is looked up from another connection when its write returns
LEDGER_TABLE = "openrouter_usage_ledger"
UTC = ZoneInfo("UTC")


@contextlib.contextmanager
def counting_commits(engine: sa.Engine) -> Iterator[list[int]]:
    """Counts the transactions committed through `engine` (the writer's) while in the block."""
    commits = [0]

    def count(_conn: Any) -> None:
        commits[0] += 1

    sa.event.listen(engine, "commit", count)
    try:
        yield commits
    finally:
        sa.event.remove(engine, "commit", count)


def durability_settings(engine: sa.Engine) -> tuple[str, int]:
    """(journal_mode, synchronous) as the plugin's own connections see them."""
    with engine.connect() as conn:
        journal = str(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one())
        synchronous = int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one())
    return journal, synchronous


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    rate: float  # records/s
    commits: int  # transactions committed on the writer's engine
    loop_cpu_us: float  # event-loop thread CPU per record
    writer_cpu_us: float  # the plugin's writer thread CPU per record


def writer_threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.name == WRITER_THREAD and t.ident is not None}


def thread_cpu_ns(ident: int | None) -> int:
    """CPU time so far of thread `ident` (0 when unknown or gone)."""
    if ident is not None:
        with contextlib.suppress(OSError):
            return time.clock_gettime_ns(time.pthread_getcpuclockid(ident))
    return 0


def outlets_run(
    plugin: types.ModuleType, url: str, path: Path, records: Sequence[Any], concurrency: int
) -> Run:
    """Throughput and per-record CPU for `concurrency` outlets awaiting writer.write."""
    writer = plugin.writer_for(url)
    warmup = plugin.WriteRequest(records=(make_records(plugin, 1, f"warmup-{path.stem}")[0],), zone=UTC)
    outcomes: collections.Counter[str] = collections.Counter()
    invisible: list[str] = []

    async def outlets() -> tuple[float, int, int, int]:
        before = writer_threads()
        outcomes[(await writer.write(warmup)).stored] += 1  # creates the file and the schema
        started_threads = writer_threads() - before  # this writer's thread (earlier ones may idle on)
        writer_ident = started_threads.pop() if len(started_threads) == 1 else None
        with contextlib.closing(sqlite3.connect(path)) as reader:

            def visible(message_id: str) -> bool:
                query = f"SELECT 1 FROM {LEDGER_TABLE} WHERE message_id = ?"
                return reader.execute(query, (message_id,)).fetchone() is not None

            pending = iter(enumerate(records))

            async def outlet_task() -> None:
                for index, record in pending:
                    outcome = await writer.write(plugin.WriteRequest(records=(record,), zone=UTC))
                    outcomes[outcome.stored] += 1
                    if index % VISIBILITY_EVERY == 0 and not visible(record.message_id):
                        invisible.append(record.message_id)

            with counting_commits(writer.ledger.engine) as commits:
                writer_cpu = thread_cpu_ns(writer_ident)
                loop_cpu = time.thread_time_ns()
                started = time.perf_counter()
                await asyncio.gather(*(outlet_task() for _ in range(concurrency)))
                seconds = time.perf_counter() - started
                loop_cpu = time.thread_time_ns() - loop_cpu
                writer_cpu = thread_cpu_ns(writer_ident) - writer_cpu
        return seconds, commits[0], loop_cpu, writer_cpu

    seconds, commits, loop_cpu, writer_cpu = asyncio.run(outlets())
    _check(plugin, url, len(records) + 1, outcomes, invisible)
    journal, synchronous = durability_settings(writer.ledger.engine)
    if journal.lower() != "wal" or synchronous < 2:
        raise RuntimeError(f"ledger not durable: journal_mode={journal}, synchronous={synchronous}")
    count = len(records)
    return Run(count / seconds, commits, loop_cpu / 1000 / count, writer_cpu / 1000 / count)


def _check(
    plugin: types.ModuleType,
    url: str,
    expected: int,
    outcomes: collections.Counter[str],
    invisible: list[str],
) -> None:
    if invisible:
        raise RuntimeError(
            f"{len(invisible)} record(s) not in the ledger when their write returned: {invisible[:3]}"
        )
    stored = ledger_row_count(plugin, url)
    if stored != expected or outcomes["recorded"] != expected:
        raise RuntimeError(
            f"expected {expected} recorded rows, got {stored} rows and outcomes {dict(outcomes)}"
        )


def thread_profiles(plugin: types.ModuleType, url: str, path: Path, records: Sequence[Any]) -> dict[str, str]:
    """Where the writer thread and the event-loop thread spend their time at CONCURRENCY outlets
    (sampled, untimed)."""
    earlier = {thread.ident for thread in threading.enumerate()}  # e.g. idle writers of earlier rounds

    def group(thread: threading.Thread) -> str | None:
        if thread is threading.main_thread():
            return "event-loop thread"
        if thread.name == WRITER_THREAD and thread.ident not in earlier:
            return "writer thread"
        return None

    with ThreadSampler(group) as sampler:
        outlets_run(plugin, url, path, records, CONCURRENCY)
    return {group: profile.summary() for group, profile in sampler.profiles.items()}


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    rounds, count, single_count = (1, 2000, 300) if quick else (3, 5000, 1000)
    runs: list[Run] = []
    release_runs: list[Run] = []
    single_runs: list[Run] = []
    with isolated_data_dir(NAME) as data:
        for index in range(rounds):
            plugin, release = load_plugin(), load_release_plugin()
            try:
                # The current plugin and release 1.0.0 back to back, alternating which goes first.
                for version in ("current", "release") if index % 2 == 0 else ("release", "current"):
                    module = plugin if version == "current" else release
                    progress(f"round {index + 1}/{rounds}: {version}, {count} records, {CONCURRENCY} outlets")
                    path = Path(data) / f"{version}-{index}.sqlite3"
                    records = make_records(module, count, f"r{index}")
                    run_figures = outlets_run(module, sqlite_url(path), path, records, CONCURRENCY)
                    (runs if version == "current" else release_runs).append(run_figures)
                progress(f"round {index + 1}/{rounds}: {single_count} records, one outlet")
                path = Path(data) / f"single-{index}.sqlite3"
                records = make_records(plugin, single_count, f"s{index}")
                single_runs.append(outlets_run(plugin, sqlite_url(path), path, records, 1))
            finally:
                close_plugin(plugin)
                close_plugin(release)
            progress(
                f"  {CONCURRENCY} outlets {runs[-1].rate:,.0f}/s ({count / max(runs[-1].commits, 1):.1f} "
                f"per commit; {RELEASE_LABEL}: {release_runs[-1].rate:,.0f}/s), "
                f"one outlet {single_runs[-1].rate:,.0f}/s"
            )
        progress("sampling the plugin's threads at 64 outlets (untimed)")
        plugin = load_plugin()
        try:
            path = Path(data) / "profile.sqlite3"
            profiles = thread_profiles(plugin, sqlite_url(path), path, make_records(plugin, count, "profile"))
        finally:
            close_plugin(plugin)
    rates = [run.rate for run in runs]
    per_commit = [count / max(run.commits, 1) for run in runs]
    single_rates = [run.rate for run in single_runs]
    rate = median(rates)
    result.add(
        Figure(
            "ledger_throughput.rate_64",
            f"{CONCURRENCY} concurrent outlets, durable SQLite (committed on return)",
            rate,
            "records/s",
            f">= {TARGET_RATE:,.0f} records/s",
            at_least(rate, TARGET_RATE),
            f"{rounds} round(s) of {count:,} records: {', '.join(number(r) for r in rates)}",
        )
    )
    result.add(
        Figure(
            "ledger_throughput.records_per_commit",
            "  records per transaction at 64 outlets",
            median(per_commit),
            "records",
            detail="records / commits on the writer's engine: " + ", ".join(f"{b:.1f}" for b in per_commit),
        )
    )
    for key, label, values in (
        ("loop_cpu_us", "event-loop thread", [run.loop_cpu_us for run in runs]),
        ("writer_cpu_us", "writer thread", [run.writer_cpu_us for run in runs]),
    ):
        result.add(
            Figure(
                f"ledger_throughput.{key}",
                f"  {label} CPU per record at 64 outlets",
                median(values),
                "µs",
                detail="thread CPU over the timed run / records: " + ", ".join(number(v) for v in values),
            )
        )
    release_rates = [run.rate for run in release_runs]
    release_batches = [count / max(run.commits, 1) for run in release_runs]
    result.add(
        Figure(
            "ledger_throughput.release_rate_64",
            f"{RELEASE_LABEL} (git {RELEASE_COMMIT[:7]}), same rounds, {CONCURRENCY} outlets",
            median(release_rates),
            "records/s",
            detail=f"{', '.join(number(r) for r in release_rates)}; current / {RELEASE_LABEL} per round: "
            + ", ".join(f"{c.rate / r.rate:.2f}" for c, r in zip(runs, release_runs, strict=True)),
        )
    )
    for key, label, values in (
        ("release_records_per_commit", "records per transaction", release_batches),
        ("release_loop_cpu_us", "event-loop thread CPU per record", [r.loop_cpu_us for r in release_runs]),
        ("release_writer_cpu_us", "writer thread CPU per record", [r.writer_cpu_us for r in release_runs]),
    ):
        result.add(
            Figure(
                f"ledger_throughput.{key}",
                f"  {RELEASE_LABEL}: {label}",
                median(values),
                "records" if key.endswith("commit") else "µs",
                detail=", ".join(number(v) for v in values),
            )
        )
    result.add(
        Figure(
            "ledger_throughput.rate_1",
            "one outlet (one commit per record), durable SQLite",
            median(single_rates),
            "records/s",
            detail=f"{single_count:,} records per round: " + ", ".join(number(r) for r in single_rates),
        )
    )
    for group, summary in profiles.items():
        result.note(f"sampled, untimed run at {CONCURRENCY} outlets, {group}: {summary}")
    result.note(
        "SQLite file on the machine's ext4 disk; journal_mode=WAL, synchronous=FULL as the plugin sets them "
        f"(checked); every {VISIBILITY_EVERY}th record looked up from another connection as its write "
        "returned."
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main_for(NAME, run))
