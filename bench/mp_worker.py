"""The child side of bench.multiprocess_writers: one OS process, one plugin module instance (loaded
as Open WebUI loads it), one group-commit writer, `concurrency` asyncio outlets submitting records.

Kept in its own module so that spawn children import only this (not the parent's __main__)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import time
import traceback
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSpec:
    index: int
    url: str
    data_dir: str
    count: int
    concurrency: int
    prefix: str


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerResult:
    index: int
    started_ns: int  # time.monotonic_ns(): CLOCK_MONOTONIC, comparable across processes
    finished_ns: int
    outcomes: dict[str, int]
    error: str = ""


def writer_process(spec: WorkerSpec, ready: Any, go: Any, results: Any) -> None:
    os.environ["DATA_DIR"] = spec.data_dir
    os.environ.pop("OPENROUTER_USAGE_DATABASE_URL", None)
    os.environ.pop("DATABASE_URL", None)
    plugin = None
    try:
        from bench.common import close_plugin, load_plugin, make_records

        plugin = load_plugin()
        records = make_records(plugin, spec.count, f"{spec.prefix}-p{spec.index}")
        writer = plugin.writer_for(spec.url)
        writer.ledger.ensure_schema()
        ready.put(spec.index)
        if not go.wait(timeout=300):
            raise TimeoutError("never told to start")
        zone = plugin.resolve_zone("UTC")
        outcomes: collections.Counter[str] = collections.Counter()

        async def outlets() -> tuple[int, int]:
            pending = iter(records)

            async def outlet_task() -> None:
                for record in pending:
                    request = plugin.WriteRequest(record=record, zone=zone)
                    outcome = await asyncio.wrap_future(writer.submit(request))
                    outcomes[outcome.stored] += 1

            started = time.monotonic_ns()
            await asyncio.gather(*(outlet_task() for _ in range(spec.concurrency)))
            return started, time.monotonic_ns()

        started, finished = asyncio.run(outlets())
        results.put(WorkerResult(spec.index, started, finished, dict(outcomes)))
    except BaseException:
        ready.put(spec.index)  # never leave the parent waiting for a crashed child
        results.put(WorkerResult(spec.index, 0, 0, {}, traceback.format_exc()))
    finally:
        if plugin is not None:
            close_plugin(plugin)
