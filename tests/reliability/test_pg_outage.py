"""A PostgreSQL crash under live traffic: two Open WebUI worker processes keep chatting through the
real Filter hooks while the server is stopped with `pg_ctl stop -m immediate` for 5 s. No hook
raises, no outlet waits more than a second, and after recovery every message is in the ledger
exactly once, with its exact cost, and the spool is empty."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import time
import types
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.factories import HookDriver, load_plugin_module, outlet_body, owui_merge_usage
from tests.pg import PostgresServer

pytestmark = pytest.mark.postgres

WORKERS = 2
PACE_SECONDS = 0.05  # one chat turn per worker every 50 ms: steady traffic, not a flood
WARM_UP_TURNS = 5  # turns each worker completes before the outage timeline starts
MAX_TURNS = 2_000  # bound on each worker's loop, far above what the timeline allows
BEFORE_OUTAGE_SECONDS = 1.0
OUTAGE_SECONDS = 5.0
AFTER_RECOVERY_SECONDS = 3.0
OUTLET_LIMIT_SECONDS = 1.0
REPLAY_DEADLINE_SECONDS = 30.0
MODEL = "openai/gpt-4o-mini"


def cost_text(message_id: str) -> str:
    """The cost OpenRouter reports for this message, as JSON text: up to 10 decimals, as live."""
    units = int(hashlib.sha256(message_id.encode()).hexdigest()[:12], 16) % 10**9 + 1
    return format(Decimal(units).scaleb(-10), "f")


def expected_cost_pico(message_id: str) -> int:
    return int(Decimal(cost_text(message_id)).scaleb(12))


def stream_chunks(generation_id: str, usage: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks `stream` sees for one OpenRouter completion, the usage chunk last."""
    envelope = {
        "id": generation_id,
        "provider": "OpenAI",
        "model": MODEL,
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
    }

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**envelope, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    return [
        choice({"role": "assistant", "content": ""}),
        choice({"content": "Hello"}),
        choice({"content": " there"}),
        choice({}, "stop"),
        {**envelope, "choices": [], "usage": usage},
    ]


class TurnLog:
    """What one worker saw: hook exceptions, outlet wall times, message ids sent, write outcomes."""

    def __init__(self) -> None:
        self.hook_errors: list[str] = []
        self.outlet_seconds: list[float] = []
        self.sent: list[str] = []
        self.outcomes: dict[str, str] = {}
        self.log_levels: Counter[str] = Counter()
        self.critical: list[str] = []

    def as_dict(self) -> dict[str, Any]:
        return {
            "hook_errors": self.hook_errors,
            "outlet_seconds": self.outlet_seconds,
            "sent": self.sent,
            "outcomes": dict(self.outcomes),
            "log_levels": dict(self.log_levels),
            "critical": self.critical,
        }


class LogTally(logging.Handler):
    """Counts the plugin's log records by level (an outage logs one error per spooled batch) and
    keeps the critical ones, instead of printing hundreds of expected lines."""

    def __init__(self, log: TurnLog) -> None:
        super().__init__(logging.DEBUG)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.log_levels[record.levelname] += 1
        if record.levelno >= logging.CRITICAL:
            self.log.critical.append(record.getMessage())


def note_outcomes(plugin: types.ModuleType, outcomes: dict[str, str]) -> None:
    """Keep what each outlet's write came to ("recorded", "spooled", …) without changing it: the
    hooks return nothing that says whether the outage really hit."""
    original = plugin.GroupCommitWriter.write

    async def write(self: Any, request: Any) -> Any:
        built: list[Any] = []
        if callable(request):  # outlet defers building the record to the writer thread

            def build(deferred: Any = request) -> Any:
                built.append(deferred())
                return built[-1]

            request = build
        else:
            built.append(request)
        outcome = await original(self, request)
        if built and built[-1] is not None:
            outcomes[built[-1].message_id] = outcome.stored
        return outcome

    plugin.GroupCommitWriter.write = write


async def chat_turn(driver: HookDriver, worker: int, index: int, log: TurnLog) -> None:
    """inlet, stream chunks, outlet, as Open WebUI runs them for one streamed turn."""
    message_id = f"w{worker}-msg-{index}"
    chat_id = f"w{worker}-chat-{index % 7}"
    request = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": f"turn {index}"}]}
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 2,
        "total_tokens": 14,
        "cost": float(cost_text(message_id)),
        "is_byok": False,
        "cost_details": {"upstream_inference_cost": float(cost_text(message_id))},
    }
    metadata = {"chat_id": chat_id, "message_id": message_id, "session_id": f"s-{worker}"}
    common = {"__user__": driver.user, "__metadata__": metadata, "__model__": driver.model}
    log.sent.append(message_id)
    try:
        body = await driver.call("inlet", dict(request), **common)
    except Exception as exc:
        log.hook_errors.append(f"inlet {message_id}: {exc!r}")
        body = request
    for chunk in stream_chunks(f"gen-{message_id}", usage):
        try:
            await driver.call("stream", chunk, **common)
        except Exception as exc:
            log.hook_errors.append(f"stream {message_id}: {exc!r}")
    outlet = outlet_body(
        body, "Hello there", owui_merge_usage(None, usage), message_id=message_id, chat_id=chat_id
    )
    started = time.monotonic()
    try:
        returned = await driver.call("outlet", outlet, **common, __event_emitter__=None)
        if returned is not outlet:
            log.hook_errors.append(f"outlet {message_id}: returned another body")
    except Exception as exc:
        log.hook_errors.append(f"outlet {message_id}: {exc!r}")
    finally:
        log.outlet_seconds.append(time.monotonic() - started)


async def drive_chats(url: str, worker: int, ready: Any, finish: Any) -> TurnLog:
    plugin = load_plugin_module()
    log = TurnLog()
    plugin_logger = logging.getLogger("openrouter_usage")
    plugin_logger.addHandler(LogTally(log))
    plugin_logger.propagate = False
    note_outcomes(plugin, log.outcomes)
    user = {"id": f"user-{worker}", "name": f"Worker {worker}", "email": f"w{worker}@example.com"}
    driver = HookDriver(plugin, valves={"database_url": url}, user=user | {"role": "user"})
    for index in range(MAX_TURNS):
        if index == WARM_UP_TURNS:
            ready.set()
        if index >= WARM_UP_TURNS and finish.is_set():
            break
        started = time.monotonic()
        await chat_turn(driver, worker, index, log)
        await asyncio.sleep(max(0.0, PACE_SECONDS - (time.monotonic() - started)))
    return log


def worker_process(url: str, data_dir: str, worker: int, ready: Any, finish: Any, results: Any) -> None:
    """One Open WebUI worker: its own plugin module, filter instance and writer thread."""
    os.environ["DATA_DIR"] = data_dir
    try:
        log = asyncio.run(drive_chats(url, worker, ready, finish))
        results.put(("ok", worker, log.as_dict()))
    except BaseException as exc:  # reported to the parent, which fails the test
        results.put(("failed", worker, repr(exc)))


def replay_until_empty(ledger: Any) -> tuple[int, float]:
    """Replay the spool until nothing is pending (bounded); returns (records replayed, seconds)."""
    started = time.monotonic()
    replayed, last_error = 0, None
    while ledger.spool.pending_count() and time.monotonic() - started < REPLAY_DEADLINE_SECONDS:
        try:
            replayed += ledger.replay_spool()
        except Exception as exc:  # the server may still be finishing crash recovery
            last_error = exc
        if ledger.spool.pending_count():
            time.sleep(0.2)
    pending = ledger.spool.pending_count()
    assert pending == 0, f"{pending} spool file(s) left after {REPLAY_DEADLINE_SECONDS} s: {last_error!r}"
    return replayed, time.monotonic() - started


def test_an_immediate_postgresql_stop_under_two_writing_processes_loses_nothing(
    plugin: types.ModuleType, pg_url: str, data_dir: Path, postgres_server: PostgresServer
) -> None:
    """Proves: with PostgreSQL crash-stopped for 5 s under two processes chatting through the real
    hooks, no hook raises, every outlet returns within 1 s, some outlets are spooled, and once the
    spool is replayed each message is in the ledger exactly once with its exact cost."""
    # The session server runs with synchronous_commit=off for speed; a crash then loses commits it
    # already acknowledged unless the client asks for durable ones, as the plugin's engine does
    # (synchronous_commit=on in its connection options). A lost "recorded" row fails this test.
    plugin.ledger_for(pg_url).ensure_schema()  # the ledger exists before the outage, as in production
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    finish = context.Event()
    readiness = [context.Event() for _ in range(WORKERS)]
    processes = [
        context.Process(
            target=worker_process, args=(pg_url, str(data_dir), worker, readiness[worker], finish, results)
        )
        for worker in range(WORKERS)
    ]
    logs: dict[int, dict[str, Any]] = {}
    try:
        for process in processes:
            process.start()
        for ready in readiness:
            assert ready.wait(timeout=60), "a worker never finished its warm-up turns"
        time.sleep(BEFORE_OUTAGE_SECONDS)
        postgres_server.stop_immediately()
        time.sleep(OUTAGE_SECONDS)
        postgres_server.start()
        time.sleep(AFTER_RECOVERY_SECONDS)
        finish.set()
        for _ in processes:
            status, worker, payload = results.get(timeout=60)
            assert status == "ok", f"worker {worker} failed: {payload}"
            logs[worker] = payload
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0
    finally:
        finish.set()
        postgres_server.start()
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)

    sent = [message_id for log in logs.values() for message_id in log["sent"]]
    outcome_of = {message_id: kind for log in logs.values() for message_id, kind in log["outcomes"].items()}
    outcomes = Counter(outcome_of.values())
    hook_errors = [error for log in logs.values() for error in log["hook_errors"]]
    log_levels: Counter[str] = sum((Counter(log["log_levels"]) for log in logs.values()), Counter())
    critical = [message for log in logs.values() for message in log["critical"]]
    outlet_seconds = [seconds for log in logs.values() for seconds in log["outlet_seconds"]]
    ledger = plugin.ledger_for(pg_url)
    spool_files_after_run = ledger.spool.pending_count()
    replayed, replay_seconds = replay_until_empty(ledger)
    with ledger.engine.connect() as conn:
        table = plugin.ledger_table
        stored = conn.execute(sa.select(table.c.message_id, table.c.cost_pico)).all()
    print(
        f"\nrecords sent {len(sent)} (per worker {[len(logs[w]['sent']) for w in sorted(logs)]}), "
        f"in ledger {len(stored)}; outlet outcomes {dict(outcomes)}; spool files after the run "
        f"{spool_files_after_run}, records replayed by the test {replayed} in {replay_seconds:.2f} s; "
        f"max outlet {max(outlet_seconds) * 1000:.0f} ms, "
        f"p50 {sorted(outlet_seconds)[len(outlet_seconds) // 2] * 1000:.1f} ms; "
        f"plugin log records in the workers {dict(log_levels)}"
    )

    assert not hook_errors, hook_errors[:10]
    assert not critical, critical[:5]  # "could not spool either": a record was not durable
    slow = sorted((seconds for seconds in outlet_seconds if seconds > OUTLET_LIMIT_SECONDS), reverse=True)
    assert not slow, f"{len(slow)} outlet(s) waited longer than {OUTLET_LIMIT_SECONDS} s: {slow[:5]}"
    assert outcomes["spooled"] > 0, "the outage never reached an outlet"
    assert len(sent) == len(set(sent)) == len(outcome_of), "every outlet wrote exactly one record"
    missing = sorted(set(sent) - {message_id for message_id, _ in stored})
    assert not missing, [(message_id, outcome_of.get(message_id)) for message_id in missing]
    assert len(stored) == len(sent), "every message exactly once"
    assert dict(stored) == {message_id: expected_cost_pico(message_id) for message_id in sent}
    assert ledger.spool.pending_count() == 0
    assert ledger.spool.quarantined_count() == 0
