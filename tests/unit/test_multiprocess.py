"""Several OS processes, each its own filter instance (as Open WebUI workers are), writing one
ledger at once: exact counts, exact per-user sums, rollups equal to a full scan. (An outage under
several processes: tests/reliability/test_pg_outage.py.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import types
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.factories import UTC_ZONE, load_plugin_module
from tests.unit.rollup_checks import scan_rollups, stored_rollups

USERS = 25


def completion(index: int) -> tuple[str, str, str]:
    """(message id, user id, cost as the JSON text OpenRouter would send) for completion `index`."""
    rng = random.Random(index)
    cost = Decimal(rng.randrange(1, 10**9)).scaleb(-10)  # up to 10 decimal places, as live
    return f"msg-{index}", f"user-{index % USERS}", format(cost, "f")


def plan(total: int, duplicates: int, processes: int) -> list[list[int]]:
    """Spread `total` outlets over processes; each duplicate goes to a different process than
    its original, as the inline outlet and the legacy /api/chat/completed may land on two workers."""
    unique = total - duplicates
    assignments: list[list[int]] = [[] for _ in range(processes)]
    for index in range(unique):
        assignments[index % processes].append(index)
    for index in random.Random(1).sample(range(unique), duplicates):
        assignments[(index + 1) % processes].append(index)
    for jobs in assignments:
        random.Random(len(jobs)).shuffle(jobs)
    return assignments


async def _send(plugin: types.ModuleType, url: str, indexes: list[int], pause: float) -> Counter[str]:
    valves = plugin.Filter.Valves(database_url=url)
    outcomes: Counter[str] = Counter()
    semaphore = asyncio.Semaphore(16)

    async def one(index: int) -> None:
        message_id, user_id, cost = completion(index)
        usage = {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "cost": float(cost),
            "is_byok": False,
            "cost_details": {"upstream_inference_cost": float(cost)},
        }
        body = {
            "model": "openai/gpt-4o-mini",
            "chat_id": f"chat-{index}",
            "id": message_id,
            "messages": [
                {"role": "user", "content": "hi"},
                {"id": message_id, "role": "assistant", "content": "hello", "usage": usage},
            ],
        }
        async with semaphore:
            outcome = await plugin.record_completion(body, {"id": user_id, "name": user_id}, {}, None, valves)
            outcomes[outcome.stored] += 1
            if pause:
                await asyncio.sleep(pause)

    await asyncio.gather(*(one(index) for index in indexes))
    return outcomes


def worker(url: str, data_dir: str, indexes: list[int], pause: float, results: Any) -> None:
    """One Open WebUI worker process: its own module, filter settings and writer thread."""
    os.environ["DATA_DIR"] = data_dir
    try:
        outcomes = asyncio.run(_send(load_plugin_module(), url, indexes, pause))
        results.put(("ok", dict(outcomes)))
    except BaseException as exc:  # reported to the parent, which fails the test
        results.put(("failed", repr(exc)))


def run_workers(url: str, data_dir: Path, assignments: list[list[int]], pause: float = 0.0) -> Counter[str]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=worker, args=(url, str(data_dir), jobs, pause, results))
        for jobs in assignments
    ]
    for process in processes:
        process.start()
    totals: Counter[str] = Counter()
    for _ in processes:
        status, payload = results.get(timeout=600)
        assert status == "ok", payload  # no chat failed
        totals.update(payload)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return totals


def check_ledger(plugin: types.ModuleType, url: str, indexes: set[int]) -> None:
    tally: dict[str, Decimal] = defaultdict(Decimal)
    for index in indexes:
        _, user_id, cost = completion(index)
        tally[user_id] += Decimal(cost)
    ledger = plugin.ledger_for(url)
    with ledger.engine.connect() as conn:
        table = plugin.ledger_table
        count = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
        distinct = conn.execute(sa.select(sa.func.count(sa.distinct(table.c.message_id)))).scalar_one()
        sums = dict(
            conn.execute(
                sa.select(table.c.user_id, sa.func.sum(table.c.spend_pico)).group_by(table.c.user_id)
            ).all()
        )
    assert count == distinct == len(indexes)
    assert {user: plugin.pico_to_usd(int(pico)) for user, pico in sums.items()} == dict(tally)
    assert stored_rollups(plugin, url) == scan_rollups(plugin, url, UTC_ZONE)


@pytest.mark.postgres
def test_four_processes_record_20000_completions_into_postgresql(
    plugin: types.ModuleType, pg_url: str, data_dir: Path
) -> None:
    assignments = plan(total=20_000, duplicates=2_000, processes=4)
    outcomes = run_workers(pg_url, data_dir, assignments)
    assert outcomes == {"recorded": 18_000, "duplicate": 2_000}
    check_ledger(plugin, pg_url, set(range(18_000)))


def test_two_processes_record_20000_completions_into_one_sqlite_file(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    url = f"sqlite:///{data_dir / 'shared.sqlite3'}"
    assignments = plan(total=20_000, duplicates=2_000, processes=2)
    outcomes = run_workers(url, data_dir, assignments)
    assert outcomes == {"recorded": 18_000, "duplicate": 2_000}
    check_ledger(plugin, url, set(range(18_000)))
