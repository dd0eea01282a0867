"""The admin panel report and the per-user read-out at 1,000,000 ledger rows, and at 1,000.

Both read only the daily rollups (plus one indexed max(created_at), and the reconciliation
section's partial index of rows not matched), so their cost should not grow with the ledger:
targets are the panel report (build_usage_report and read_reconciliation_view) <= 50 ms at 1M rows,
time(1M)/time(1K) <= 3, user_usage_summary <= 5 ms at 1M rows.

Method: the fixtures come from bench/fixture.py (seeded, 200 users, 50 models, 400 days, schema
created by the plugin, rollups for UTC; the 1M one is cached in .cache/bench/). Each is opened
through the plugin's `ledger_for(url)`, called once as
warm-up, then the calls alternate between the big and the small ledger so both see the same
machine; median of the timed calls (perf_counter, wall time). Reports are asked "as of" the
fixture's last day so today / 7 days / 30 days hold data; report_rows = 10 (the default valve).
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable
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
    median,
    progress,
    spread,
)
from bench.fixture import REPORT_NOW, USERS, UTC_ZONE, FixtureInfo, expected_rows_ok, report_fixture, user_id

NAME = "report_scale"
BIG_ROWS = 1_000_000
QUICK_BIG_ROWS = 100_000
SMALL_ROWS = 1_000
REPORT_TARGET_MS = 50.0
RATIO_TARGET = 3.0
USER_TARGET_MS = 5.0
REPORT_ROWS = 10


def _ms(work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) * 1000


def panel_report(plugin: types.ModuleType, ledger: Any) -> Any:
    """What the settings panel reads: the report, and the reconciliation section over its last 30 days."""
    usage_report = plugin.build_usage_report(ledger, UTC_ZONE, REPORT_ROWS, REPORT_NOW)
    plugin.read_reconciliation_view(ledger, usage_report)
    return usage_report


def measure(
    plugin: types.ModuleType, big: FixtureInfo, small: FixtureInfo, calls: int
) -> dict[str, list[float]]:
    """Alternating timed calls on both fixtures: report and user read-out, in ms."""
    ledgers = {"big": plugin.ledger_for(big.url), "small": plugin.ledger_for(small.url)}
    times: dict[str, list[float]] = {f"{k}_{w}": [] for k in ledgers for w in ("report", "user", "cold")}
    report = functools.partial(panel_report, plugin)
    summary = functools.partial(plugin.user_usage_summary, now=REPORT_NOW)  # in the rollups' zone (UTC)
    try:
        for key, ledger in ledgers.items():
            times[f"{key}_cold"].append(_ms(functools.partial(report, ledger)))
            expected_rows_ok(report(ledger), big.rows if key == "big" else small.rows)
            summary(ledger, user_id(0))
        for index in range(calls):
            for key, ledger in ledgers.items():
                times[f"{key}_report"].append(_ms(functools.partial(report, ledger)))
            for key, ledger in ledgers.items():
                who = user_id((index * 37) % USERS)
                times[f"{key}_user"].append(_ms(functools.partial(summary, ledger, who)))
    finally:
        for ledger in ledgers.values():
            ledger.dispose()
    return times


def _statement_kind(statement: str) -> str:
    if "rollup_user_day" in statement and "user_name" in statement:
        return "top users"
    if "rollup_model_day" in statement:
        return "top models"
    if "rollup_day" in statement:
        return "period totals"
    if "max(" in statement and "_ledger" in statement:
        return "last written"
    return "other"


def statement_times(plugin: types.ModuleType, fixture: FixtureInfo, calls: int) -> dict[str, float]:
    """Per report, ms spent executing each kind of statement (engine events; not in the timed runs)."""
    ledger = plugin.ledger_for(fixture.url)
    spent: dict[str, float] = {}
    started: dict[int, float] = {}

    def before(conn: Any, _cursor: Any, _statement: str, *_args: Any) -> None:
        started[id(conn)] = time.perf_counter()

    def after(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        kind = _statement_kind(statement)
        spent[kind] = spent.get(kind, 0.0) + (time.perf_counter() - started.pop(id(conn))) * 1000

    try:
        panel_report(plugin, ledger)
        sa.event.listen(ledger.engine, "before_cursor_execute", before)
        sa.event.listen(ledger.engine, "after_cursor_execute", after)
        for _ in range(calls):
            panel_report(plugin, ledger)
    finally:
        ledger.dispose()
    return {kind: total / calls for kind, total in spent.items()}


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    big_rows = QUICK_BIG_ROWS if quick else BIG_ROWS
    calls = 20 if quick else 40
    label = f"{big_rows:,}"
    with isolated_data_dir(NAME):
        plugin = load_plugin()
        try:
            big = report_fixture(plugin, big_rows)
            small = report_fixture(plugin, SMALL_ROWS)
            progress(f"timing {calls} reports and read-outs on {label} and {SMALL_ROWS:,} rows")
            times = measure(plugin, big, small, calls)
            statements = {
                key: statement_times(plugin, f, calls // 2) for key, f in (("big", big), ("small", small))
            }
        finally:
            close_plugin(plugin)
    quick_note = f"; quick run: {label} rows, the target is for 1,000,000" if quick else ""
    big_report, small_report = median(times["big_report"]), median(times["small_report"])
    result.add(
        Figure(
            "report_scale.report_big_ms",
            f"panel report (build_usage_report + read_reconciliation_view) at {label} rows",
            big_report,
            "ms",
            f"<= {REPORT_TARGET_MS:.0f} ms",
            at_most(big_report, REPORT_TARGET_MS),
            spread(times["big_report"], unit="ms") + quick_note,
        )
    )
    result.add(
        Figure(
            "report_scale.report_small_ms",
            f"panel report at {SMALL_ROWS:,} rows",
            small_report,
            "ms",
            detail=spread(times["small_report"], unit="ms"),
        )
    )
    ratio = big_report / small_report
    result.add(
        Figure(
            "report_scale.report_ratio",
            f"report time({label}) / time({SMALL_ROWS:,})",
            ratio,
            "x",
            f"<= {RATIO_TARGET:.0f}",
            at_most(ratio, RATIO_TARGET),
            "medians of alternating calls" + quick_note,
        )
    )
    for key, rows in (("big", label), ("small", f"{SMALL_ROWS:,}")):
        kinds = sorted(statements[key].items(), key=lambda item: -item[1])
        result.add(
            Figure(
                f"report_scale.slowest_statement_{key}_ms",
                f"  slowest statement at {rows} rows: {kinds[0][0]} query",
                kinds[0][1],
                "ms",
                detail="mean execute time per report; then "
                + ", ".join(f"{kind} {ms:.2f}" for kind, ms in kinds[1:4]),
            )
        )
    big_user = median(times["big_user"])
    result.add(
        Figure(
            "report_scale.user_big_ms",
            f"per-user read-out (user_usage_summary) at {label} rows",
            big_user,
            "ms",
            f"<= {USER_TARGET_MS:.0f} ms",
            at_most(big_user, USER_TARGET_MS),
            spread(times["big_user"], unit="ms") + quick_note,
        )
    )
    result.add(
        Figure(
            "report_scale.user_small_ms",
            f"per-user read-out at {SMALL_ROWS:,} rows",
            median(times["small_user"]),
            "ms",
            detail=spread(times["small_user"], unit="ms"),
        )
    )
    result.add(
        Figure(
            "report_scale.report_big_cold_ms",
            f"first report on a fresh Ledger at {label} rows (schema check, connect)",
            times["big_cold"][0],
            "ms",
            detail="single call, before the warm-up",
        )
    )
    generated = "cached fixture, generated " + big.generated_at if big.cached else "generated in this run"
    result.add(
        Figure(
            "report_scale.fixture_rate",
            f"fixture generation at {label} rows (the plugin's rows and rollup code)",
            big.rows_per_second,
            "rows/s",
            detail=f"{big.seconds:.0f} s: records and rows {big.insert_seconds:.0f} s, "
            f"rollups {big.rollup_seconds:.0f} s; {generated}",
        )
    )
    result.add(
        Figure(
            "report_scale.fixture_mb",
            f"SQLite file at {label} rows",
            big.size_mb,
            "MB",
            detail=str(big.path.name),
        )
    )
    result.note(
        f"fixture: {big.rows:,} rows, 200 users, 50 models, 400 days, seeded; "
        f"reports as of {REPORT_NOW:%Y-%m-%d}; {calls} timed calls per figure after one warm-up, "
        "alternating big and small ledger."
    )
    return result


if __name__ == "__main__":
    raise SystemExit(main_for(NAME, run))
