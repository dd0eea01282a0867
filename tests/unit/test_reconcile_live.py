"""Reconciliation through the hooks and the real simulator over loopback: the background reconciler
started by outlet, stopped generations recorded once, attribution, the HTTP layer and the CLI."""

from __future__ import annotations

import asyncio
import io
import json
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from openrouter_sim import LookupFault, OpenRouterSimulator
from tests.factories import HookDriver, stream_events, streamed_turn

KEY = "sk-or-v1-reconcile-test-key-0123456789"


@pytest.fixture
def sim() -> Iterator[OpenRouterSimulator]:
    with OpenRouterSimulator(generation_ready_after_s=0.3) as simulator:
        yield simulator


@pytest.fixture
def fast(plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The plugin with its waits shortened to test scale (the code paths are the same)."""
    monkeypatch.setattr(plugin, "FIRST_LOOKUP_DELAY_SECONDS", 0.2)
    monkeypatch.setattr(plugin, "FIRST_BACKOFF_SECONDS", 0.2)
    monkeypatch.setattr(plugin, "STOPPED_GRACE_SECONDS", 0.05)
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    return plugin


def rows(plugin: types.ModuleType, url: str) -> list[dict[str, Any]]:
    """The ledger's rows, oldest first ([] before the first write created the ledger)."""
    with plugin.ledger_for(url).engine.connect() as conn:
        if not sa.inspect(conn).has_table(plugin.ledger_table.name):
            return []
        return [dict(r._mapping) for r in conn.execute(sa.select(plugin.ledger_table).order_by("id"))]


def wait_until(check: Any, seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def sim_bill_pico(sim: OpenRouterSimulator, generation_id: str) -> int:
    return int(sim.generations[generation_id].spend.scaleb(12))


async def test_outlet_starts_reconciliation_and_ordinary_rows_reach_matched(
    fast: types.ModuleType, sim: OpenRouterSimulator, data_dir: Any
) -> None:
    valves = {"openrouter_api_key": KEY, "openrouter_api_base": sim.base_url}
    driver = HookDriver(fast, valves=valves)
    for turn in range(2):
        await streamed_turn(driver, sim, f"question {turn}", message_id=f"msg-{turn}")
    url = fast.resolve_database_url("")

    def all_matched() -> list[dict[str, Any]] | None:
        current = rows(fast, url)
        return current if current and all(r["reconcile_status"] == "matched" for r in current) else None

    settled = wait_until(all_matched)
    assert len(settled) == 2
    for row in settled:
        (generation_id,) = json.loads(row["generation_ids"])
        assert row["billed_pico"] == row["spend_pico"] == sim_bill_pico(sim, generation_id)
    lookups = [r for r in sim.requests if r.path.endswith("/generation")]
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in lookups)
    wait_until(lambda: fast.reconciler_for(url)._thread is None)  # nothing pending: the thread ended


async def stopped_after_three_chunks(
    driver: HookDriver, sim: OpenRouterSimulator, metadata: dict[str, Any], messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """A streamed request (inlet, then three chunks through `stream`) that the user stops: Open
    WebUI cancels the task running the stream, and runs no outlet. Returns the whole stream."""
    request = {"model": "openai/gpt-4o-mini", "stream": True, "messages": messages}
    body = await driver.call(
        "inlet", request, __metadata__=metadata, __model__=driver.model, __user__=driver.user
    )
    chunks = stream_events(sim, body)
    reached_stop = asyncio.Event()

    async def stream_then_hang() -> None:  # the task Open WebUI cancels when the user presses stop
        for chunk in chunks[:3]:
            await driver.call("stream", chunk, __metadata__=metadata)
        reached_stop.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(stream_then_hang())
    await reached_stop.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return chunks


async def test_a_stopped_generation_is_recorded_once_and_priced_from_the_bill(
    fast: types.ModuleType, sim: OpenRouterSimulator, data_dir: Any
) -> None:
    valves = {"openrouter_api_key": KEY, "openrouter_api_base": sim.base_url}
    driver = HookDriver(fast, valves=valves)
    metadata = {"chat_id": "chat-9", "message_id": "msg-stopped", "user_id": "user-1"}
    await stopped_after_three_chunks(driver, sim, metadata, [{"role": "user", "content": "hi"}])
    url = fast.resolve_database_url("")

    (row,) = await asyncio.to_thread(wait_until, lambda: rows(fast, url))
    assert (row["message_id"], row["status"], row["chat_id"], row["user_id"]) == (
        "msg-stopped",
        "stopped",
        "chat-9",
        "user-1",
    )
    priced = await asyncio.to_thread(
        wait_until,
        lambda: rows(fast, url)[0] if rows(fast, url)[0]["reconcile_status"] == "matched" else None,
    )
    (generation_id,) = json.loads(priced["generation_ids"])
    assert priced["cost_pico"] == priced["billed_pico"] == sim_bill_pico(sim, generation_id)
    await asyncio.sleep(0.2)
    assert len(rows(fast, url)) == 1


async def test_a_turn_whose_outlet_ran_is_never_also_recorded_as_stopped(
    fast: types.ModuleType, sim: OpenRouterSimulator, data_dir: Any
) -> None:
    driver = HookDriver(fast)

    async def whole_turn() -> None:
        await streamed_turn(driver, sim, "hello", message_id="msg-done")
        raise RuntimeError("the task fails after the outlet")  # as if something later broke

    with pytest.raises(RuntimeError):
        await asyncio.create_task(whole_turn())
    await asyncio.sleep(0.3)
    url = fast.resolve_database_url("")
    assert [(r["message_id"], r["status"]) for r in rows(fast, url)] == [("msg-done", "ok")]


async def test_requests_carry_an_opaque_stable_user_id_and_the_ledger_keeps_it(
    fast: types.ModuleType, sim: OpenRouterSimulator, data_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBUI_SECRET_KEY", "a-real-open-webui-secret")
    driver = HookDriver(fast, model={"id": "openai/gpt-4o-mini", "urlIdx": 0})
    monkeypatch.setattr(fast, "connection_base_url", _openrouter_connection)
    first, _ = await streamed_turn(driver, sim, "one", message_id="m-1")
    second, _ = await streamed_turn(driver, sim, "two", message_id="m-2")

    opaque = first["user"]
    assert opaque == second["user"] and opaque.startswith("owui-") and len(opaque) == 37
    assert "ada" not in opaque.lower() and "user-1" not in opaque
    sent = [r.body.get("user") for r in sim.requests if r.path.endswith("/chat/completions")]
    assert sent == [opaque, opaque]
    out = io.StringIO()
    fast.print_report(
        fast.build_usage_report(
            fast.ledger_for(fast.resolve_database_url("")), None, 5, breakdown=("user", "30d")
        ),
        "user",
        "csv",
        out,
    )
    assert opaque in out.getvalue()

    monkeypatch.setenv("WEBUI_SECRET_KEY", "t0p-s3cr3t")  # Open WebUI's public default is no secret
    third, _ = await streamed_turn(driver, sim, "three", message_id="m-3")
    assert third["user"] != opaque and third["user"].startswith("owui-")
    off = HookDriver(fast, valves={"send_user_id": False})
    fourth, _ = await streamed_turn(off, sim, "four", message_id="m-4")
    assert "user" not in fourth


async def _openrouter_connection(_model: Any) -> str:
    return "https://openrouter.ai/api/v1"


def test_the_http_layer_maps_each_answer(plugin: types.ModuleType) -> None:
    answers = {
        "gen-ok": httpx.Response(200, content=b'{"data": {"total_cost": 0.000007765}}'),
        "gen-404": httpx.Response(404, json={"error": {"message": "Generation not found", "code": 404}}),
        "gen-429": httpx.Response(429, headers={"Retry-After": "3"}),
        "gen-401": httpx.Response(401),
        "gen-403": httpx.Response(403),
        "gen-500": httpx.Response(500),
        "gen-bad": httpx.Response(200, content=b"<html>"),
        "gen-nodata": httpx.Response(200, json={"result": 1}),
    }
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        generation_id = request.url.params["id"]
        if generation_id == "gen-slow":
            raise httpx.ReadTimeout("slow", request=request)
        if generation_id == "gen-down":
            raise httpx.ConnectError("refused", request=request)
        return answers[generation_id]

    account = plugin.OpenRouterAccount(
        KEY, "http://sim/api/v1/", httpx.Client(transport=httpx.MockTransport(handler))
    )
    found = account.generation("gen-ok")
    assert found.outcome == "found" and found.data["total_cost"] == Decimal("0.000007765")
    outcomes = {
        gid: (lookup.outcome, lookup.reason, lookup.retry_after)
        for gid in (
            "gen-404",
            "gen-429",
            "gen-401",
            "gen-403",
            "gen-500",
            "gen-bad",
            "gen-nodata",
            "gen-slow",
            "gen-down",
        )
        for lookup in [account.generation(gid)]
    }
    assert outcomes == {
        "gen-404": ("not_ready", "", 0.0),
        "gen-429": ("slow_down", "", 3.0),
        "gen-401": ("rejected", "HTTP 401", 0.0),
        "gen-403": ("rejected", "HTTP 403", 0.0),
        "gen-500": ("error", "HTTP 500", 0.0),
        "gen-bad": ("error", "malformed JSON", 0.0),
        "gen-nodata": ("error", "malformed JSON", 0.0),
        "gen-slow": ("error", "timeout", 0.0),
        "gen-down": ("error", "connection failed (ConnectError)", 0.0),
    }
    assert str(seen[0].url) == "http://sim/api/v1/generation?id=gen-ok"
    assert all(KEY not in str(r.url) and r.headers["authorization"] == f"Bearer {KEY}" for r in seen)
    account.close()


def test_the_cli_reconciles_once_and_prints_a_summary(
    fast: types.ModuleType,
    sim: OpenRouterSimulator,
    data_dir: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    driver = HookDriver(fast)
    asyncio.run(streamed_turn(driver, sim, "for the cli", message_id="m-cli"))
    url = fast.resolve_database_url("")
    time.sleep(0.4)  # the simulator's record becomes ready
    args = ["reconcile", "--database-url", url, "--base-url", sim.base_url]

    assert fast.cli_main(args) == 2
    assert "set $OPENROUTER_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    assert fast.cli_main(args) == 0
    captured = capsys.readouterr()
    assert "Looked up 1 generation at OpenRouter." in captured.out
    assert "matched: 1 · differ: 0" in captured.out
    assert rows(fast, url)[0]["reconcile_status"] == "matched"
    assert KEY not in captured.out + captured.err


def test_faults_from_a_real_server_back_off_are_counted_and_the_row_still_matches(
    fast: types.ModuleType, sim: OpenRouterSimulator, data_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast, "LOOKUP_TIMEOUT_SECONDS", 0.5)
    driver = HookDriver(fast)
    asyncio.run(streamed_turn(driver, sim, "faults", message_id="m-faults"))
    url = fast.resolve_database_url("")
    time.sleep(0.4)  # the simulator's record becomes ready
    sim.inject_lookup_faults(
        LookupFault.rate_limited(1),
        LookupFault.server_error(503),
        LookupFault.slow(2.0),
        LookupFault.not_json(),
    )
    account = fast.OpenRouterAccount(KEY, sim.base_url)
    checker = fast.Reconciler(fast.ledger_for(url), account)
    started = time.monotonic()
    summaries = []
    for _ in range(10):
        summaries.append(checker.run_pass(due_only=False))
        if rows(fast, url)[0]["reconcile_status"] != "pending":
            break
    account.close()

    row = rows(fast, url)[0]
    assert (row["reconcile_status"], row["reconcile_attempts"], row["reconcile_error"]) == ("matched", 3, "")
    errors: dict[str, int] = {}
    for summary in summaries:
        for reason, count in summary.errors.items():
            errors[reason] = errors.get(reason, 0) + count
    assert errors == {"HTTP 429": 1, "HTTP 503": 1, "timeout": 1, "malformed JSON": 1}
    assert time.monotonic() - started >= 1.0, "the 429's Retry-After was honoured"
    (generation_id,) = json.loads(row["generation_ids"])
    assert sim.successful_lookups() == {generation_id: 1}


async def test_a_new_completion_wakes_a_reconciler_sleeping_on_a_long_backoff(
    fast: types.ModuleType, sim: OpenRouterSimulator, data_dir: Any
) -> None:
    valves = {"openrouter_api_key": KEY, "openrouter_api_base": sim.base_url}
    driver = HookDriver(fast, valves=valves)
    await streamed_turn(driver, sim, "first", message_id="m-first")
    url = fast.resolve_database_url("")
    await asyncio.to_thread(wait_until, lambda: rows(fast, url)[0]["reconcile_status"] == "matched")
    with fast.ledger_for(url).writing() as conn:  # a row OpenRouter will not know for 15 minutes
        conn.execute(
            sa.update(fast.ledger_table).values(
                reconcile_status="pending",
                generation_ids='["gen-never-served"]',
                billed_json=None,
                reconcile_attempts=8,
                reconcile_after=datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=900),
            )
        )
    fast.reconciler_for(url).ensure_running(fast.reconcile_config(fast.Settings(**valves)))
    await asyncio.sleep(0.5)  # the reconciler now sleeps until that row is due

    await streamed_turn(driver, sim, "second", message_id="m-second")

    second = await asyncio.to_thread(
        wait_until,
        lambda: next(
            (
                r
                for r in rows(fast, url)
                if r["message_id"] == "m-second" and r["reconcile_status"] == "matched"
            ),
            None,
        ),
        10.0,
    )
    assert second["billed_pico"] == second["spend_pico"]


async def test_a_stopped_continuation_is_a_row_of_its_own_priced_from_the_bill(
    fast: types.ModuleType, sim: OpenRouterSimulator, data_dir: Any
) -> None:
    """Continue, then stop: the message's first answer keeps its row, the stopped continuation is
    a second, `stopped` row keyed by its own generation id, priced from OpenRouter's bill as a
    stopped answer is, and every generation id of the message is checked against the bill."""
    valves = {"openrouter_api_key": KEY, "openrouter_api_base": sim.base_url}
    driver = HookDriver(fast, valves=valves)
    _, first = await streamed_turn(driver, sim, "Tell me a story", message_id="msg-c", chat_id="chat-c")
    metadata = {"chat_id": "chat-c", "message_id": "msg-c", "user_id": driver.user["id"]}
    history = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once"}]
    chunks = await stopped_after_three_chunks(driver, sim, metadata, history)
    url = fast.resolve_database_url("")

    def both_matched() -> list[dict[str, Any]] | None:
        found = rows(fast, url)
        return found if len(found) == 2 and {r["reconcile_status"] for r in found} == {"matched"} else None

    answer, stopped = await asyncio.to_thread(wait_until, both_matched)
    assert (answer["generation_key"], answer["status"]) == (first[0]["id"], "ok")
    assert (stopped["generation_key"], stopped["message_id"], stopped["status"]) == (
        chunks[0]["id"],
        "msg-c",
        "stopped",
    )
    assert stopped["cost_pico"] == stopped["billed_pico"] == sim_bill_pico(sim, chunks[0]["id"])
    assert answer["billed_pico"] == sim_bill_pico(sim, first[0]["id"])
