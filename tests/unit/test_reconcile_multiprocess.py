"""Two OS processes (two Open WebUI workers, or replicas) reconcile one ledger at the same moment,
each with its own copy of the plugin and a real OpenRouterAccount against the simulator: the lease
lets one of them look every generation up, once, while the other is told it is busy.

Seeded rows carry the ids of real completions the simulator served, with the simulator's own
cost, so that every row can reach `matched`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from openrouter_sim import OpenRouterSimulator
from tests.factories import complete, load_plugin_module, make_record, write

KEY = "sk-or-v1-multiprocess-reconcile"
MODEL = "openai/gpt-4o-mini"
ROWS = 40
# A pass over 40 rows then takes about 2 s: long enough for the other process to ask for the lease.
LOOKUPS_PER_SECOND = 20.0
PASSES_DEADLINE_SECONDS = 120.0


@pytest.fixture
def sim() -> Iterator[OpenRouterSimulator]:
    with OpenRouterSimulator() as simulator:
        yield simulator


def seed(plugin: types.ModuleType, url: str, sim: OpenRouterSimulator) -> dict[str, int]:
    """ROWS ledger rows, due for their first lookup, each holding one generation the simulator
    served and priced as it billed it; returns each generation id's bill in pico-dollars."""
    created_at = datetime.now(UTC) - timedelta(minutes=1)  # past the first lookup's delay
    bills, records = {}, []
    for index in range(ROWS):
        question = {"role": "user", "content": f"question {index}"}
        response = complete(sim, {"model": MODEL, "messages": [question]})
        response.raise_for_status()
        generation = sim.generations[response.headers["x-generation-id"]]
        bills[generation.id] = int(generation.spend.scaleb(12))
        usage = plugin.Usage(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            total_tokens=generation.prompt_tokens + generation.completion_tokens,
            cost_pico=bills[generation.id],
        )
        records.append(
            make_record(
                plugin,
                index,
                usage=usage,
                generation_ids=(generation.id,),
                status="ok",
                error="",
                created_at=created_at,
            )
        )
    assert write(plugin, url, records) == ["recorded"] * ROWS
    return bills


def reconcile_until_done(url: str, data_dir: str, base_url: str, start: Any, results: Any) -> None:
    """One process: its own plugin copy, ledger and account; passes until one ran (not told busy)
    and left nothing pending. Reports its lease holder name and each pass's figures."""
    os.environ["DATA_DIR"] = data_dir
    try:
        plugin = load_plugin_module()
        ledger = plugin.Ledger(url)
        account = plugin.OpenRouterAccount(KEY, base_url)
        reconciler = plugin.Reconciler(ledger, account, lookups_per_second=LOOKUPS_PER_SECOND)
        passes = []
        start.wait(timeout=60)  # both processes ask for the lease at the same moment
        deadline = time.monotonic() + PASSES_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            summary = reconciler.run_pass()
            passes.append({"looked_up": summary.looked_up, "busy": summary.busy, "waiting": summary.waiting})
            if not summary.busy and not summary.waiting:
                break
            time.sleep(0.05)
        account.close()
        ledger.dispose()
        results.put(("ok", reconciler.holder, passes))
    except BaseException as exc:  # reported to the parent, which fails the test
        results.put(("failed", "", repr(exc)))


def run_two_processes(url: str, data_dir: Path, base_url: str) -> dict[str, list[dict[str, Any]]]:
    """Each process's passes, by its lease holder name."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = context.Barrier(2)
    processes = [
        context.Process(target=reconcile_until_done, args=(url, str(data_dir), base_url, start, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    passes = {}
    for _ in processes:
        status, holder, payload = results.get(timeout=PASSES_DEADLINE_SECONDS + 60)
        assert status == "ok", payload
        passes[holder] = payload
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return passes


def check(
    plugin: types.ModuleType, url: str, sim: OpenRouterSimulator, bills: dict[str, int], data_dir: Path
) -> None:
    passes = run_two_processes(url, data_dir, sim.base_url)
    with plugin.ledger_for(url).engine.connect() as conn:
        table = plugin.ledger_table
        columns = ("generation_ids", "reconcile_status", "billed_pico", "spend_pico")
        rows = conn.execute(sa.select(*(table.c[name] for name in columns))).all()
    lookups = sim.successful_lookups()
    looked_up = {holder: sum(p["looked_up"] for p in runs) for holder, runs in passes.items()}
    busy = {holder: sum(bool(p["busy"]) for p in runs) for holder, runs in passes.items()}
    print(f"\n{len(rows)} rows; lookups by process {looked_up}; passes told busy {busy}")

    assert len(rows) == ROWS
    assert {row.reconcile_status for row in rows} == {"matched"}
    assert all(row.billed_pico == row.spend_pico == bills[json.loads(row.generation_ids)[0]] for row in rows)
    assert lookups == dict.fromkeys(bills, 1), "every id looked up successfully, and only once"
    # What is asserted of the two: one process held the lease for the whole pass and looked every
    # generation up; the other, asking at the same moment, was told that one was busy and looked
    # nothing up (its own later pass found nothing pending).
    (winner,) = [holder for holder, count in looked_up.items() if count]
    (other,) = set(passes) - {winner}
    assert looked_up == {winner: ROWS, other: 0}
    assert {p["busy"] for p in passes[other] if p["busy"]} == {winner}
    assert passes[other][-1] == {"looked_up": 0, "busy": "", "waiting": 0}


def test_two_processes_reconcile_one_sqlite_ledger_once_per_generation(
    plugin: types.ModuleType, data_dir: Path, sim: OpenRouterSimulator
) -> None:
    url = f"sqlite:///{data_dir / 'shared.sqlite3'}"
    check(plugin, url, sim, seed(plugin, url, sim), data_dir)


@pytest.mark.postgres
def test_two_processes_reconcile_one_postgresql_ledger_once_per_generation(
    plugin: types.ModuleType, pg_url: str, data_dir: Path, sim: OpenRouterSimulator
) -> None:
    check(plugin, pg_url, sim, seed(plugin, pg_url, sim), data_dir)
