"""A ledger row is a billed generation: a message's first answer, each "Continue response" and each
tool round are rows of their own, each recorded exactly once whatever repeats (a second outlet, the
legacy /api/chat/completed re-run, a spool replay), and the usage line totals the message."""

from __future__ import annotations

import json
import os
import subprocess
import types
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from openrouter_sim import OpenRouterSimulator
from tests.factories import (
    UTC_ZONE,
    EmitterRecorder,
    HookDriver,
    answer_text,
    make_record,
    outlet_body,
    stream_events,
    streamed_turn,
    usage_from_events,
)

MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def sim() -> Iterator[OpenRouterSimulator]:
    with OpenRouterSimulator() as simulator:
        yield simulator


def rows(plugin: types.ModuleType, url: str, message_id: str | None = None) -> list[dict[str, Any]]:
    ledger = plugin.ledger_for(url)
    ledger.ensure_schema()
    query = sa.select(plugin.ledger_table).order_by("id")
    if message_id is not None:
        query = query.where(plugin.ledger_table.c.message_id == message_id)
    with ledger.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def pico(sim: OpenRouterSimulator, generation_id: str) -> int:
    return int(sim.generations[generation_id].spend * 10**12)


async def continue_response(
    driver: HookDriver,
    sim: OpenRouterSimulator,
    history: list[dict[str, Any]],
    partial: str,
    *,
    message_id: str = "msg-1",
    chat_id: str = "chat-1",
    emitter: EmitterRecorder | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """What the web client's Continue sends (a new request for the same assistant message, the
    history ending in its partial answer), through inlet → stream → outlet; returns the
    request's metadata, its outlet body and the chunks `stream` saw."""
    request = {
        "model": MODEL,
        "stream": True,
        "messages": [*history, {"role": "assistant", "content": partial}],
    }
    metadata = {
        "chat_id": chat_id,
        "message_id": message_id,
        "session_id": "s-1",
        "user_id": driver.user["id"],
    }
    body = await driver.call("inlet", dict(request), __metadata__=metadata, __model__=driver.model)
    chunks = stream_events(sim, body)
    for chunk in chunks:
        await driver.call("stream", chunk, __metadata__=metadata)
    outlet = outlet_body(
        request,
        partial + answer_text(chunks),
        usage_from_events(chunks),
        message_id=message_id,
        chat_id=chat_id,
        previous=history,
    )
    await driver.call(
        "outlet", outlet, __metadata__=metadata, __event_emitter__=emitter, __user__=driver.user
    )
    return metadata, outlet, chunks


async def test_answer_continue_continue_is_three_exact_rows_and_the_line_totals_the_message(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator
) -> None:
    driver = HookDriver(plugin, valves={"database_url": database_url})
    emitter = EmitterRecorder()
    _, first = await streamed_turn(driver, sim, "Tell me a long story", emitter=emitter)
    history = [{"role": "user", "content": "Tell me a long story"}]
    answer = answer_text(first)
    ids = [first[0]["id"]]
    for _ in range(2):
        metadata, outlet, chunks = await continue_response(driver, sim, history, answer, emitter=emitter)
        ids.append(chunks[0]["id"])
        answer += answer_text(chunks)
    assert len(set(ids)) == 3, "each Continue is a generation of its own"
    recorded = rows(plugin, database_url, "msg-1")
    assert [(row["generation_key"], row["spend_pico"]) for row in recorded] == [
        (g, pico(sim, g)) for g in ids
    ]
    total = sum(pico(sim, g) for g in ids)
    assert sum(row["spend_pico"] for row in recorded) == total
    line = emitter.statuses[-1]
    assert line.startswith(f"{plugin.format_usd(total)} · 3 calls · chat {plugin.format_usd(total)} · ")
    prompt = sum(sim.generations[g].usage["prompt_tokens"] for g in ids)
    assert f" · {plugin.format_count(prompt)} in · " in line

    # The last outlet again in the same request, then the legacy re-run (no inlet): nothing more.
    await driver.call("outlet", outlet, __metadata__=metadata)
    await driver.call("outlet", json.loads(json.dumps(outlet)), __metadata__={})
    assert len(rows(plugin, database_url)) == 3


async def test_a_generation_whose_id_never_arrives_is_keyed_by_its_request_once(
    plugin: types.ModuleType, database_url: str
) -> None:
    """Non-streamed replies carry no generation id to the outlet: the first answer and a
    continuation of the same message are two rows, keyed `<message id>~<request fingerprint>`;
    a repeated outlet and a replay of the same records add nothing."""
    driver = HookDriver(plugin, valves={"database_url": database_url})
    user = [{"role": "user", "content": "hi"}]
    requests = [
        {"model": MODEL, "stream": False, "messages": user},
        {"model": MODEL, "stream": False, "messages": [*user, {"role": "assistant", "content": "Once"}]},
    ]
    usages = [{"prompt_tokens": 3, "completion_tokens": 2, "cost": 0.25}, {"prompt_tokens": 5, "cost": 0.5}]
    for request, usage in zip(requests, usages, strict=True):
        metadata = {"chat_id": "c", "message_id": "m"}
        outlet = outlet_body(request, "Once upon", usage, message_id="m", chat_id="c")
        await driver.run(dict(request), None, outlet, metadata, None)
        await driver.call("outlet", outlet, __metadata__=metadata)  # repeated: nothing more
    recorded = rows(plugin, database_url, "m")
    assert [row["generation_key"] for row in recorded] == [
        plugin.fallback_generation_key("m", plugin.request_fingerprint(request)) for request in requests
    ]
    assert [row["spend_pico"] for row in recorded] == [250_000_000_000, 500_000_000_000]
    assert all(row["generation_key"].startswith("m~") and row["generation_ids"] == "[]" for row in recorded)
    replayed = [
        make_record(plugin, i, message_id="m", generation_key=row["generation_key"])
        for i, row in enumerate(recorded)
    ]
    assert plugin.ledger_for(database_url).store(replayed, UTC_ZONE).inserted == set()


async def test_a_record_spooled_before_1_2_0_stands_only_for_a_message_not_yet_recorded(
    plugin: types.ModuleType, database_url: str, sim: OpenRouterSimulator
) -> None:
    """A 1.x spool record has no generation key: it is its whole message. Replayed for a message
    the ledger already holds it adds nothing; for a new message it is one row keyed by the id."""
    driver = HookDriver(plugin, valves={"database_url": database_url})
    await streamed_turn(driver, sim, "Hello")
    old_format = make_record(plugin, 1, message_id="msg-1").to_json()
    del old_format["generation_key"]
    again = plugin.UsageRecord.from_json(old_format)
    unknown = plugin.UsageRecord.from_json({**old_format, "message_id": "msg-from-1.1"})
    assert (again.generation_key, again.ledger_key) == ("", "msg-1")
    assert plugin.ledger_for(database_url).store([again, unknown], UTC_ZONE).inserted == {"msg-from-1.1"}
    assert len(rows(plugin, database_url)) == 2


def open_webui_merge_usage(python: Path, rounds: list[dict[str, Any]], data_dir: Path) -> dict[str, Any]:
    """Open WebUI's own merge_usage (utils/response.py) over the rounds, run in its venv."""
    code = (
        "import json, sys\n"
        "from open_webui.utils.response import merge_usage\n"
        "merged = None\n"
        "for usage in json.load(sys.stdin):\n"
        "    merged = merge_usage(merged, usage)\n"
        "print(json.dumps(merged))\n"
    )
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir / "owui"),
        "WEBUI_SECRET_KEY": "merge-usage-test-" + "k" * 24,
    }
    done = subprocess.run(
        [str(python), "-c", code],
        check=False,
        input=json.dumps(rounds),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    merged: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return merged


def round_usage(cost: str, upstream: str, *, byok: bool, tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": tokens,
        "completion_tokens": 5,
        "cost": float(cost),
        "is_byok": byok,
        "cost_details": {"upstream_inference_cost": float(upstream)},
    }


BYOK_ROUND = ("0.0001", "0.002", True)  # cost, upstream_inference_cost, is_byok
SECOND_BYOK_ROUND = ("0.0002", "0.004", True)
CREDIT_ROUND = ("0.003", "0.003", False)  # non-BYOK: upstream is about `cost` again, never added


@pytest.mark.parametrize(
    "rounds",
    [[BYOK_ROUND, CREDIT_ROUND], [BYOK_ROUND, SECOND_BYOK_ROUND]],
    ids=["byok-then-credits", "byok-twice"],
)
async def test_byok_over_tool_rounds_is_summed_round_by_round_despite_open_webuis_merge(
    plugin: types.ModuleType,
    database_url: str,
    openwebui_python: Path,
    data_dir: Path,
    rounds: list[tuple[str, str, bool]],
) -> None:
    """Open WebUI's merge_usage sums `cost` over a turn's rounds but keeps only the last round's
    `is_byok` and `cost_details` (pinned here by running it), so a spend read from the merged
    figure loses BYOK upstream cost. The ledger reads each round's own usage from the stream:
    spend = Σ (cost + upstream_inference_cost for a BYOK round, cost otherwise)."""
    usages = [round_usage(cost, up, byok=byok, tokens=10 + i) for i, (cost, up, byok) in enumerate(rounds)]
    merged = open_webui_merge_usage(openwebui_python, usages, data_dir)
    assert merged["cost"] == pytest.approx(sum(float(cost) for cost, _, _ in rounds))
    assert (merged["is_byok"], merged["cost_details"]) == (usages[-1]["is_byok"], usages[-1]["cost_details"])

    driver = HookDriver(plugin, valves={"database_url": database_url})
    request = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "time?"}]}
    metadata = {"chat_id": "c", "message_id": "m"}
    chunks = [{"id": f"gen-round-{i}", "choices": [], "usage": usage} for i, usage in enumerate(usages)]
    outlet = outlet_body(request, "12:00", merged, message_id="m", chat_id="c")
    await driver.run(dict(request), chunks, outlet, metadata, None)

    expected = [Decimal(cost) + (Decimal(up) if byok else 0) for cost, up, byok in rounds]
    recorded = rows(plugin, database_url, "m")
    by_round = {row["generation_key"]: row["spend_pico"] for row in recorded}
    assert by_round == {f"gen-round-{i}": plugin.usd_to_pico(spend) for i, spend in enumerate(expected)}
    assert plugin.parse_usage(merged).spend_pico < plugin.usd_to_pico(sum(expected)), "merged loses upstream"


async def test_a_continuation_holds_a_reservation_of_its_own(
    plugin: types.ModuleType, database_url: str
) -> None:
    """Two requests for the same message (an answer still streaming and a Continue) each reserve;
    the one that ends releases only its own."""
    driver = HookDriver(
        plugin,
        valves={"database_url": database_url, "budgets": "default: $20 per month"},
        user={"id": "u-1", "name": "Una", "email": "una@example.com", "role": "user"},
    )
    first: dict[str, Any] = {"message_id": "m", "chat_id": "c"}
    second: dict[str, Any] = {"message_id": "m", "chat_id": "c"}
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    for metadata in (first, second):
        await driver.call(
            "inlet", dict(body), __metadata__=metadata, __model__=driver.model, __user__=driver.user
        )
    table = plugin.reservations_table

    def held() -> set[str]:
        with plugin.ledger_for(database_url).engine.connect() as conn:
            return set(conn.execute(sa.select(table.c.reservation_id)).scalars())

    ids = {first[plugin.STATE_KEY].budget.reservation_id, second[plugin.STATE_KEY].budget.reservation_id}
    assert len(ids) == 2 and held() == ids and all(i.startswith("m~") for i in ids)
    outlet = outlet_body(body, "ok", {"cost": 0.01, "prompt_tokens": 1}, message_id="m", chat_id="c")
    await driver.call("outlet", outlet, __metadata__=second, __user__=driver.user)
    assert held() == {first[plugin.STATE_KEY].budget.reservation_id}
