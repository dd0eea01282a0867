"""Several Open WebUI worker processes writing one ledger; and the report on PostgreSQL vs SQLite.

Target: at least 1,000 records/s on one durable PostgreSQL ledger with 4 writer processes
(SQLite with 4 processes: information).

Writers: 4 OS processes (multiprocessing, spawn), each loading its own plugin module instance
(tests.factories.load_plugin_module in the child) with its own group-commit writer, each awaiting
`writer.write(request)` (what outlet awaits) from 16 concurrent asyncio outlets. All children
prepare (load, build records, one untimed write that creates or checks the schema and starts the
writer thread) and then start together on an Event; records/s = all timed records / (last child's
end - first child's start), CLOCK_MONOTONIC. The same run does it on one durable PostgreSQL ledger
(a throwaway server from tests/pg.py's machinery, started with fsync=on and synchronous_commit=on,
checked with SHOW) and on one SQLite WAL file (synchronous=FULL), alternating rounds, each on a
fresh database; medians over rounds. Every record must come back "recorded" and be in the ledger.

For information, release 1.0.0 (git c1e0c47, its source from git) runs the same PostgreSQL rounds
next to the current plugin's, so the two compare on the same machine state.

Report ratio (information): the SQLite report fixture (bench/fixture.py, 1,000,000 rows) is copied
into a PostgreSQL ledger created by the plugin with COPY (ledger, users and the rollups the plugin's
code computed), then VACUUM ANALYZE; build_usage_report is timed on both engines, alternating
calls, median of each.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
import types
import uuid
from pathlib import Path
from typing import Any

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
    main_for,
    median,
    number,
    progress,
    spread,
    sqlite_url,
)
from bench.fixture import REPORT_NOW, UTC_ZONE, expected_rows_ok, load_into_postgres, report_fixture
from bench.mp_worker import WorkerResult, WorkerSpec, writer_process
from bench.pgserver import PostgresUnavailableError, durable_postgres, server_version

NAME = "multiprocess_writers"
TARGET_PG_RATE = 1000.0
PROCESSES = 4
CONCURRENCY = 16
REPORT_ROWS = 10


def writers_run(
    url: str, data_dir: Path, per_process: int, prefix: str, release: bool = False
) -> tuple[float, dict[str, int]]:
    """records/s of PROCESSES spawned writer processes on `url` (running release 1.0.0 when
    `release`); raises when a record is missing."""
    context = multiprocessing.get_context("spawn")
    ready: Any = context.Queue()
    results: Any = context.Queue()
    go = context.Event()
    specs = [
        WorkerSpec(i, url, str(data_dir), per_process, CONCURRENCY, prefix, release) for i in range(PROCESSES)
    ]
    processes = [context.Process(target=writer_process, args=(spec, ready, go, results)) for spec in specs]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready.get(timeout=300)
        go.set()
        done: list[WorkerResult] = [results.get(timeout=900) for _ in processes]
    except queue.Empty as exc:
        raise RuntimeError("a writer process did not report in time") from exc
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    errors = [r.error for r in done if r.error]
    if errors:
        raise RuntimeError("writer process failed:\n" + errors[0])
    outcomes: dict[str, int] = {}
    for r in done:
        for kind, count in r.outcomes.items():
            outcomes[kind] = outcomes.get(kind, 0) + count
    total = PROCESSES * per_process
    seconds = (max(r.finished_ns for r in done) - min(r.started_ns for r in done)) / 1e9
    return total / seconds, outcomes


def _verify(plugin: types.ModuleType, url: str, total: int, outcomes: dict[str, int]) -> None:
    stored = ledger_row_count(plugin, url)
    if outcomes.get("recorded") != total or stored != total:
        raise RuntimeError(
            f"expected {total} recorded rows; outcomes {outcomes}, {stored} rows in the ledger"
        )


def report_ratio(plugin: types.ModuleType, server: Any, rows: int, calls: int, result: BenchResult) -> None:
    fixture = report_fixture(plugin, rows)
    progress(f"loading the {rows:,}-row fixture into PostgreSQL (COPY, VACUUM ANALYZE)")
    timings = load_into_postgres(plugin, fixture, server, "report_fixture")
    ledgers = {
        "pg": plugin.ledger_for(server.url_for("report_fixture")),
        "sqlite": plugin.ledger_for(fixture.url),
    }
    times: dict[str, list[float]] = {f"{key}_{what}": [] for key in ledgers for what in ("report", "user")}
    try:
        for ledger in ledgers.values():
            expected_rows_ok(plugin.build_usage_report(ledger, UTC_ZONE, REPORT_ROWS, REPORT_NOW), rows)
        progress(f"timing {calls} reports on each engine")
        for index in range(calls):
            for key, ledger in ledgers.items():
                started = time.perf_counter()
                plugin.build_usage_report(ledger, UTC_ZONE, REPORT_ROWS, REPORT_NOW)
                times[f"{key}_report"].append((time.perf_counter() - started) * 1000)
            for key, ledger in ledgers.items():
                started = time.perf_counter()
                plugin.user_usage_summary(ledger, f"user-{index % 200:03d}", now=REPORT_NOW)
                times[f"{key}_user"].append((time.perf_counter() - started) * 1000)
    finally:
        for ledger in ledgers.values():
            ledger.dispose()
    label = f"{rows:,}"
    pg_ms, sqlite_ms = median(times["pg_report"]), median(times["sqlite_report"])
    result.add(
        Figure(
            "multiprocess_writers.report_pg_over_sqlite",
            f"panel report at {label} rows: PostgreSQL / SQLite",
            pg_ms / sqlite_ms,
            "x",
            detail=f"medians of {calls} alternating calls",
        )
    )
    result.add(
        Figure(
            "multiprocess_writers.report_pg_ms",
            f"  panel report on PostgreSQL at {label} rows",
            pg_ms,
            "ms",
            detail=spread(times["pg_report"], unit="ms"),
        )
    )
    result.add(
        Figure(
            "multiprocess_writers.report_sqlite_ms",
            f"  panel report on SQLite at {label} rows",
            sqlite_ms,
            "ms",
            detail=spread(times["sqlite_report"], unit="ms"),
        )
    )
    result.add(
        Figure(
            "multiprocess_writers.user_pg_ms",
            f"  per-user read-out on PostgreSQL at {label} rows",
            median(times["pg_user"]),
            "ms",
            detail=spread(times["pg_user"], unit="ms"),
        )
    )
    result.add(
        Figure(
            "multiprocess_writers.pg_load_s",
            f"  PostgreSQL fixture load at {label} rows",
            timings["copy_seconds"],
            "s",
            detail=f"COPY of ledger, users and rollups {timings['copy_seconds']:.0f} s, "
            f"then VACUUM ANALYZE {timings['vacuum_seconds']:.0f} s",
        )
    )


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    per_process, rounds, fixture_rows, calls = (1000, 1, 100_000, 20) if quick else (5000, 3, 1_000_000, 30)
    rates: dict[str, list[float]] = {"postgresql": [], "release": [], "sqlite": []}
    with isolated_data_dir(NAME) as data:
        plugin = load_plugin()
        try:
            with durable_postgres() as server:
                version = server_version(server)
                for index in range(rounds):
                    # "release": release 1.0.0 on PostgreSQL, next to the current plugin's PostgreSQL run.
                    order = ("postgresql", "release", "sqlite")
                    for engine in order if index % 2 == 0 else order[::-1]:
                        if engine in ("postgresql", "release"):
                            dbname = f"writers_{uuid.uuid4().hex[:8]}"
                            server.create_database(dbname)
                            url = server.url_for(dbname)
                        else:
                            url = sqlite_url(data / f"writers-{index}.sqlite3")
                        progress(
                            f"round {index + 1}/{rounds}: {PROCESSES} processes x {per_process} records "
                            f"x {CONCURRENCY} outlets on {engine}"
                        )
                        rate, outcomes = writers_run(url, data, per_process, f"r{index}", engine == "release")
                        _verify(plugin, url, PROCESSES * (per_process + 1), outcomes)  # + warm-up writes
                        progress(f"  {rate:,.0f} records/s")
                        rates[engine].append(rate)
                report_ratio(plugin, server, fixture_rows, calls, result)
        except PostgresUnavailableError as exc:
            result.error = f"PostgreSQL unavailable: {exc}"
        finally:
            close_plugin(plugin)
    for position, (engine, label) in enumerate(
        (("postgresql", "PostgreSQL (durable)"), ("sqlite", "SQLite WAL file"))
    ):
        if not rates[engine]:
            continue
        rate = median(rates[engine])
        targeted = engine == "postgresql"
        result.figures.insert(
            position,
            Figure(
                f"multiprocess_writers.{engine}_rate",
                f"{PROCESSES} writer processes x {CONCURRENCY} outlets, one {label}",
                rate,
                "records/s",
                f">= {TARGET_PG_RATE:,.0f} records/s" if targeted else "",
                at_least(rate, TARGET_PG_RATE) if targeted else None,
                detail=f"{rounds} round(s) of {PROCESSES} x {per_process:,} records: "
                + ", ".join(number(r) for r in rates[engine]),
            ),
        )
    if rates["release"]:
        pairs = zip(rates["postgresql"], rates["release"], strict=False)
        result.figures.insert(
            2,
            Figure(
                "multiprocess_writers.release_postgresql_rate",
                f"  {RELEASE_LABEL} (git {RELEASE_COMMIT[:7]}), same rounds, PostgreSQL",
                median(rates["release"]),
                "records/s",
                detail=", ".join(number(r) for r in rates["release"])
                + f"; current / {RELEASE_LABEL} per round: "
                + ", ".join(f"{c / r:.2f}" for c, r in pairs),
            ),
        )
    if rates["postgresql"] and rates["sqlite"]:
        result.figures.insert(
            3 if rates["release"] else 2,
            Figure(
                "multiprocess_writers.pg_over_sqlite_rate",
                "  writer throughput PostgreSQL / SQLite",
                median(rates["postgresql"]) / median(rates["sqlite"]),
                "x",
            ),
        )
        result.note(
            f"PostgreSQL {version}, fsync=on, synchronous_commit=on, on the same disk as the SQLite file."
        )
    return result


if __name__ == "__main__":
    raise SystemExit(main_for(NAME, run))
