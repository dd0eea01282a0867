"""What a budget adds to `inlet` and to `request` at 1,000,000 ledger rows: the admission check
(rule, spend in the window from the rollups, the user's p95 on the model from the ledger index,
the other requests' reservations, the reservation upsert, in one exclusive transaction on a thread)
as the hook runs it, event loop to event loop. Target: p99 <= 2 ms each.

Method, on each engine: SQLite, a copy of the cached 1M-row report fixture (bench/fixture.py: 200
users, 50 models, 400 days, rollups in UTC), so admissions never write into the cache; then
PostgreSQL, the same fixture loaded into a fresh database of a durable server on loopback
(bench/pgserver.py), the engine of the multi-replica deployments budgets are made for. The clock is
the fixture's last day (REPORT_NOW), so the month window and the 30-day history hold data. Budget:
`default: $1000000 per month`, so every call is admitted and upserts its reservation (the costlier
path). Each timed turn: `enforce_budget` as inlet calls it (a fresh turn), then as the request hook
calls it before a tool round (a second model call: a fresh admission), each timed on its own, then
the reservation is released (outlet's work, not timed). Users and models rotate over the fixture's.
Percentiles over all timed calls after a warm-up. Beside each hook's figure, the time inside
`Ledger.admit` during the same calls (the admission transaction, on the thread), and a floor: the
same turns again with `Ledger.admit` answering at once, i.e. the thread hop, the rule's resolution
and the ticket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
import types
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from bench.common import (
    BenchResult,
    Figure,
    at_most,
    close_plugin,
    command_for,
    isolated_data_dir,
    load_plugin,
    main_for,
    progress,
    spread,
    sqlite_url,
)
from bench.fixture import REPORT_NOW, USERS, load_into_postgres, report_fixture, user_id
from bench.pgserver import PostgresUnavailableError, durable_postgres, server_version

NAME = "budget_admission"
BIG_ROWS = 1_000_000
QUICK_BIG_ROWS = 100_000
TARGET_MS = 2.0
WARM_UP = 50


class _FixtureClock(datetime):
    """datetime whose now() is the fixture's last day (the ledger's data ends there)."""

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return REPORT_NOW if tz is None else REPORT_NOW.astimezone(tz)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def time_admissions(ledger: Any) -> list[float]:
    """Wraps this Ledger's admit so each call's duration (ms) is appended to the list returned."""
    admit = ledger.admit
    durations: list[float] = []

    def timed_admit(request: Any) -> Any:
        started = time.perf_counter()
        try:
            return admit(request)
        finally:
            durations.append((time.perf_counter() - started) * 1000)

    vars(ledger)["admit"] = timed_admit
    return durations


async def measure(
    plugin: types.ModuleType, url: str, models: list[str], turns: int
) -> dict[str, list[float]]:
    valves = plugin.Filter.Valves(database_url=url, budgets="default: $1000000 per month")
    ledger = plugin.ledger_for(url)
    admissions = time_admissions(ledger)
    times: dict[str, list[float]] = {
        hook: [] for hook in ("inlet", "request", "inlet_admit", "request_admit")
    }
    for turn in range(WARM_UP + turns):
        user = {"id": user_id(turn % USERS), "email": "", "role": "user"}
        body = {"model": models[(turn * 7) % len(models)], "messages": []}
        metadata: dict[str, Any] = {"message_id": f"bench-{turn}"}
        plugin.capture_state(metadata)
        started = time.perf_counter()
        await plugin.enforce_budget(body, user, metadata, valves, model_call=False)
        inlet_ms = (time.perf_counter() - started) * 1000
        await plugin.enforce_budget(body, user, metadata, valves, model_call=True)  # admitted at inlet
        started = time.perf_counter()
        await plugin.enforce_budget(body, user, metadata, valves, model_call=True)  # a tool round
        request_ms = (time.perf_counter() - started) * 1000
        assert metadata[plugin.STATE_KEY].budget.reserved  # noqa: S101 - the admission ran and admitted
        assert len(admissions) == 2  # noqa: S101 - one admission per timed call, none in between
        await asyncio.to_thread(
            ledger.release_reservations, [metadata[plugin.STATE_KEY].budget.reservation_id]
        )
        if turn >= WARM_UP:
            times["inlet"].append(inlet_ms)
            times["request"].append(request_ms)
            times["inlet_admit"].append(admissions[0])
            times["request_admit"].append(admissions[1])
        admissions.clear()
    return times


@dataclasses.dataclass(frozen=True, slots=True)
class Engine:
    key: str  # the figures' key prefix
    label: str  # appended to the figures' labels


SQLITE = Engine("", "")
POSTGRESQL = Engine("pg_", ", PostgreSQL")


def measure_ledger(
    plugin: types.ModuleType, url: str, turns: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The timed turns on this ledger, then the same turns with an admission that answers at once."""
    ledger = plugin.ledger_for(url)
    ledger.ensure_schema()
    with ledger.engine.connect() as conn:
        models = sorted(conn.execute(sa.select(sa.distinct(plugin.ledger_table.c.model))).scalars())
    progress(f"timing {turns} inlet and request budget checks")
    times = asyncio.run(measure(plugin, url, models, turns))
    progress(f"timing {turns} more with an admission that answers at once (the floor)")
    vars(ledger)["admit"] = lambda _request: plugin.BudgetAdmission(True, 0, 0, 1)
    floor = asyncio.run(measure(plugin, url, models, turns))
    ledger.dispose()
    return times, floor


def add_figures(
    result: BenchResult,
    engine: Engine,
    label: str,
    times: dict[str, list[float]],
    floor: dict[str, list[float]],
    quick_note: str,
) -> None:
    for hook in ("inlet", "request"):
        p99 = percentile(times[hook], 0.99)
        result.add(
            Figure(
                f"{NAME}.{engine.key}{hook}_p99_ms",
                f"budget check added to {hook} at {label} rows{engine.label}, p99",
                p99,
                "ms",
                f"<= {TARGET_MS:.0f} ms",
                at_most(p99, TARGET_MS),
                f"p50 {percentile(times[hook], 0.5):.3f} ms; " + spread(times[hook], unit="ms") + quick_note,
            )
        )
    for hook in ("inlet", "request"):
        inside = times[f"{hook}_admit"]
        result.add(
            Figure(
                f"{NAME}.{engine.key}{hook}_admission_p99_ms",
                f"  of which the admission transaction (Ledger.admit, on the thread), {hook}, p99",
                percentile(inside, 0.99),
                "ms",
                detail=f"p50 {percentile(inside, 0.5):.3f} ms; " + spread(inside, unit="ms"),
            )
        )
    for hook in ("inlet", "request"):
        result.add(
            Figure(
                f"{NAME}.{engine.key}{hook}_floor_p99_ms",
                f"  floor: {hook} with an admission that answers at once (thread hop, rule), p99",
                percentile(floor[hook], 0.99),
                "ms",
                detail=f"p50 {percentile(floor[hook], 0.5):.3f} ms; " + spread(floor[hook], unit="ms"),
            )
        )


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    rows = QUICK_BIG_ROWS if quick else BIG_ROWS
    turns = 300 if quick else 1000
    label = f"{rows:,}"
    quick_note = f"; quick run: {label} rows, the target is for 1,000,000" if quick else ""
    with isolated_data_dir(NAME) as data:
        plugin = load_plugin()
        try:
            fixture = report_fixture(plugin, rows)
            copy = data / "ledger.sqlite3"
            shutil.copyfile(fixture.path, copy)
            vars(plugin)["datetime"] = _FixtureClock  # the module global the plugin reads
            progress(f"SQLite, a copy of the {label}-row fixture")
            add_figures(result, SQLITE, label, *measure_ledger(plugin, sqlite_url(copy), turns), quick_note)
            try:
                with durable_postgres() as server:
                    progress(f"PostgreSQL: loading the {label}-row fixture (COPY, VACUUM ANALYZE)")
                    load_into_postgres(plugin, fixture, server, NAME)
                    measured = measure_ledger(plugin, server.url_for(NAME), turns)
                    version = server_version(server)
                add_figures(result, POSTGRESQL, label, *measured, quick_note)
                result.note(
                    f"PostgreSQL {version} on loopback, fsync=on, synchronous_commit=on (bench/pgserver.py)."
                )
            except PostgresUnavailableError as exc:
                result.error = f"PostgreSQL unavailable: {exc}"
        finally:
            close_plugin(plugin)
    result.note(
        f"{turns} turns after {WARM_UP} warm-up turns per engine; the {label}-row fixture (a copy on SQLite, "
        "loaded into a fresh database on PostgreSQL); every call admitted (reservation upserted, then "
        "released); clock at the fixture's last day."
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main_for(NAME, run))
