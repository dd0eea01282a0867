"""One user at the edge of their budget fires 20 concurrent requests through 2 OS processes (each
its own filter instance, as Open WebUI workers are): admission is atomic across processes, so spend
plus reservations never passes the limit."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import types
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.factories import HookDriver, load_plugin_module, make_record, write

PROCESSES = 2
REQUESTS_PER_PROCESS = 10
USER = {"id": "u-edge", "name": "Edge", "email": "edge@example.com", "role": "user"}
SPENT = Decimal("19.80")
RESERVATION = Decimal("0.05")  # the user has no history on the model: every request reserves this
LIMIT = Decimal(20)
# The bound asserted: spend + n x reservation <= limit, so at most floor((20 - 19.80) / 0.05) = 4
# requests are admitted; admission is exact, so exactly 4 are.
BOUND = int((LIMIT - SPENT) // RESERVATION)


async def _fire(plugin: types.ModuleType, url: str, process: int, start: Any) -> dict[str, int]:
    valves = {
        "database_url": url,
        "budgets": f"default: ${LIMIT} per month",
        "budget_reservation_usd": "0.05",
    }
    drivers = [HookDriver(plugin, valves=valves, user=dict(USER)) for _ in range(REQUESTS_PER_PROCESS)]
    outcomes = {"admitted": 0, "blocked": 0}

    async def one(index: int) -> None:
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        metadata = {"message_id": f"p{process}-{index}", "chat_id": "c"}
        try:
            await drivers[index].call("inlet", body, __user__=drivers[index].user, __metadata__=metadata)
        except plugin.BudgetBlocked:
            outcomes["blocked"] += 1
        else:
            outcomes["admitted"] += 1

    await asyncio.to_thread(start.wait, 60)
    await asyncio.gather(*(one(index) for index in range(REQUESTS_PER_PROCESS)))
    return outcomes


def worker(url: str, data_dir: str, process: int, ready: Any, start: Any, results: Any) -> None:
    os.environ["DATA_DIR"] = data_dir
    try:
        plugin = load_plugin_module()
        plugin.ledger_for(url).ensure_schema()  # connections warm before the start signal
        ready.put(process)
        results.put(("ok", asyncio.run(_fire(plugin, url, process, start))))
    except BaseException as exc:  # reported to the parent, which fails the test
        results.put(("failed", repr(exc)))


def test_twenty_concurrent_requests_in_two_processes_never_pass_the_limit(
    plugin: types.ModuleType, database_url: str, data_dir: Path
) -> None:
    earlier = make_record(
        plugin,
        1,
        user_id=USER["id"],
        model="other/model",
        usage=plugin.Usage(cost_pico=plugin.usd_to_pico(SPENT)),
        status="ok",
        error="",
        created_at=datetime.now(UTC),
    )
    assert write(plugin, database_url, [earlier]) == ["recorded"]
    context = multiprocessing.get_context("spawn")
    ready, results, start = context.Queue(), context.Queue(), context.Event()
    processes = [
        context.Process(target=worker, args=(database_url, str(data_dir), n, ready, start, results))
        for n in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=120)
    start.set()
    admitted = blocked = 0
    for _ in processes:
        status, payload = results.get(timeout=120)
        assert status == "ok", payload
        admitted, blocked = admitted + payload["admitted"], blocked + payload["blocked"]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert admitted + blocked == PROCESSES * REQUESTS_PER_PROCESS
    assert admitted == BOUND == 4
    with plugin.ledger_for(database_url).engine.connect() as conn:
        held = conn.execute(sa.select(sa.func.sum(plugin.reservations_table.c.amount_pico))).scalar_one()
    assert plugin.usd_to_pico(SPENT) + int(held) <= plugin.usd_to_pico(LIMIT)
    assert int(held) == BOUND * plugin.usd_to_pico(RESERVATION)
