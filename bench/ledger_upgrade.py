"""How long the upgrade to a row per generation (migration 0008) takes on a big ledger written by
release 1.1.0, on SQLite and PostgreSQL.

The first recorded completion after an upgrade runs the migrations on the writer thread; until
they are done, outlets wait (at most OUTLET_WAIT_SECONDS, then they spool and are replayed), so
this is how long the first completions after an upgrade are delayed. No target: it runs once.

Method: release 1.1.0's plugin (read from git history) builds the seeded report fixture of
bench/fixture.py (1,000,000 rows; 100,000 with --quick; cached in .cache/bench/), which is copied
for SQLite, and loaded with COPY into a fresh database of a durable loopback server
(bench/pgserver.py) for PostgreSQL; then the current plugin's `Ledger.ensure_schema` is timed
once on each (wall time), and the row count checked.
"""

from __future__ import annotations

import shutil
import time
import types

from bench.common import (
    BenchResult,
    Figure,
    close_plugin,
    command_for,
    isolated_data_dir,
    ledger_row_count,
    load_plugin,
    main_for,
    progress,
    sqlite_url,
)
from bench.fixture import fixture_path, load_into_postgres, report_fixture
from bench.pgserver import PostgresUnavailableError, durable_postgres
from tests.reliability.independent import RELEASE_1_1_0, load_release

NAME = "ledger_upgrade"
ROWS = 1_000_000
QUICK_ROWS = 100_000


def _timed_upgrade(plugin: types.ModuleType, url: str, rows: int) -> float:
    started = time.perf_counter()
    plugin.ledger_for(url).ensure_schema()
    seconds = time.perf_counter() - started
    if ledger_row_count(plugin, url) != rows:
        raise RuntimeError("the upgraded ledger does not hold every row")
    return seconds


def run(quick: bool) -> BenchResult:
    rows = QUICK_ROWS if quick else ROWS
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    released = load_release(RELEASE_1_1_0)
    fixture = report_fixture(released, rows)
    with isolated_data_dir(NAME) as data:
        copy = data / "ledger-1.1.0.sqlite3"
        shutil.copy(fixture_path(released, rows), copy)
        plugin = load_plugin()
        try:
            progress(f"upgrading a {rows:,}-row SQLite ledger of 1.1.0")
            seconds = _timed_upgrade(plugin, sqlite_url(copy), rows)
            result.add(Figure(f"{NAME}.sqlite_s", f"migration 0008, SQLite, {rows:,} rows", seconds, "s"))
            try:
                with durable_postgres() as server:
                    progress(f"loading the {rows:,} rows into PostgreSQL with 1.1.0's schema")
                    load_into_postgres(released, fixture, server, NAME)
                    seconds = _timed_upgrade(plugin, server.url_for(NAME), rows)
                    result.add(
                        Figure(
                            f"{NAME}.postgresql_s", f"migration 0008, PostgreSQL, {rows:,} rows", seconds, "s"
                        )
                    )
            except PostgresUnavailableError as exc:
                result.note(f"PostgreSQL not measured: {exc}")
        finally:
            close_plugin(plugin)
            close_plugin(released)
    result.note(f"fixture of release 1.1.0 ({RELEASE_1_1_0[:7]}): {rows:,} rows, seeded, bench/fixture.py")
    return result


if __name__ == "__main__":
    raise SystemExit(main_for(NAME, run))
