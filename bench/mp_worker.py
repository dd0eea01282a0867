"""The child side of bench.multiprocess_writers: one OS process, one plugin module instance (loaded
as Open WebUI loads it), one group-commit writer, `concurrency` asyncio outlets each awaiting
`writer.write(request)` (what outlet awaits).

Kept in its own module so that spawn children import only this (not the parent's __main__)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import time
import traceback
from typing import Any
from zoneinfo import ZoneInfo


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSpec:
    index: int
    url: str
    data_dir: str
    count: int
    concurrency: int
    prefix: str
    release: bool = False  # run release 1.0.0 (from git) instead of the working tree's plugin


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
    announced = False
    try:
        from bench.common import close_plugin, load_plugin, load_release_plugin, make_records

        plugin = load_release_plugin() if spec.release else load_plugin()
        records = make_records(plugin, spec.count + 1, f"{spec.prefix}-p{spec.index}")
        writer = plugin.writer_for(spec.url)
        zone = ZoneInfo("UTC")
        outcomes: collections.Counter[str] = collections.Counter()

        async def outlets() -> tuple[int, int]:
            # One untimed write first: creates or checks the schema, connects, starts the writer thread.
            outcomes[(await writer.write(plugin.WriteRequest(records=(records[0],), zone=zone))).stored] += 1
            nonlocal announced
            ready.put(spec.index)
            announced = True
            if not await asyncio.to_thread(go.wait, 300):
                raise TimeoutError("never told to start")  # noqa: TRY301 (the handler below reports it)
            pending = iter(records[1:])

            async def outlet_task() -> None:
                for record in pending:
                    outcome = await writer.write(plugin.WriteRequest(records=(record,), zone=zone))
                    outcomes[outcome.stored] += 1

            started = time.monotonic_ns()
            await asyncio.gather(*(outlet_task() for _ in range(spec.concurrency)))
            return started, time.monotonic_ns()

        started, finished = asyncio.run(outlets())
        results.put(WorkerResult(spec.index, started, finished, dict(outcomes)))
    except BaseException:
        if not announced:
            ready.put(spec.index)  # never leave the parent waiting for a crashed child
        results.put(WorkerResult(spec.index, 0, 0, {}, traceback.format_exc()))
    finally:
        if plugin is not None:
            close_plugin(plugin)
