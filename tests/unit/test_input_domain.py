"""The strict input domain, applied while parsing: every finding of the issue "The ledger keeps
every record…" about bad input, reproduced through the real hooks and checked in the ledger."""

from __future__ import annotations

import json
import logging
import math
import types
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.factories import EmitterRecorder, HookDriver, outlet_body


def ledger_rows(plugin: types.ModuleType, url: str) -> list[dict[str, Any]]:
    with plugin.ledger_for(url).engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(plugin.ledger_table).order_by("id"))]


async def outlet_with_usage(
    plugin: types.ModuleType,
    url: str,
    usage: Any,
    message_id: str,
    *,
    user: dict[str, Any] | None = None,
    chunks: list[Any] | None = None,
    emitter: Any = None,
) -> dict[str, Any]:
    driver = HookDriver(plugin, valves={"database_url": url}, user=user)
    request = {"model": "openai/gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    body = outlet_body(request, "answer", usage, message_id=message_id, chat_id="chat-1")
    metadata = {"chat_id": "chat-1", "message_id": message_id}
    await driver.run(request, chunks, body, metadata, emitter)
    return body


@pytest.fixture
def url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'domain.sqlite3'}"


@pytest.mark.parametrize(
    ("usage", "expected", "noted"),
    [
        (
            {"prompt_tokens": math.inf, "completion_tokens": 5, "cost": 0.01},
            {"prompt_tokens": 0},
            "prompt_tokens",
        ),
        ({"prompt_tokens": 3, "total_tokens": math.nan, "cost": 0.01}, {"total_tokens": 3}, "total_tokens"),
        ({"prompt_tokens": 3, "cost": "1e400"}, {"cost_pico": None, "spend_pico": 0}, "cost"),
        ({"prompt_tokens": 3, "cost": 1e7}, {"cost_pico": None, "spend_pico": 0}, "cost"),
        ({"prompt_tokens": 3, "cost": -3}, {"cost_pico": None, "spend_pico": 0}, "cost"),
        (
            {"prompt_tokens": -7, "cost": 0.5},
            {"prompt_tokens": 0, "cost_pico": 500_000_000_000},
            "prompt_tokens",
        ),
        ({"prompt_tokens": 2**60, "cost": 0.5}, {"prompt_tokens": 0}, "prompt_tokens"),
        ({"prompt_tokens": 2.5, "cost": 0.5}, {"prompt_tokens": 0}, "prompt_tokens"),
        (
            {
                "prompt_tokens": 1,
                "cost": 0.5,
                "is_byok": True,
                "cost_details": {"upstream_inference_cost": math.nan},
            },
            {"upstream_cost_pico": None, "spend_pico": 500_000_000_000},
            "upstream_inference_cost",
        ),
    ],
    ids=[
        "inf-tokens",
        "nan-total",
        "cost-1e400",
        "cost-1e7",
        "negative-cost",
        "negative-tokens",
        "tokens-beyond-2^53",
        "fractional-tokens",
        "nan-upstream",
    ],
)
async def test_a_value_outside_the_domain_is_recorded_as_missing_and_noted(
    plugin: types.ModuleType, url: str, usage: dict[str, Any], expected: dict[str, Any], noted: str
) -> None:
    await outlet_with_usage(plugin, url, usage, "m-bad")
    (row,) = ledger_rows(plugin, url)
    assert {key: row[key] for key in expected} == expected
    assert noted in row["notes"]
    json.loads(row["usage_json"], parse_constant=_refuse)  # strict JSON: NaN/Infinity became null
    report = plugin.build_usage_report(plugin.ledger_for(url), None, 5)
    assert report.health.repaired_rows == 1
    assert "1 row(s) repaired" in plugin.render_report_markdown(report)


def _refuse(constant: str) -> None:
    raise ValueError(f"not strict JSON: {constant}")


async def test_a_sane_row_has_no_notes_and_the_export_is_strict_json(
    plugin: types.ModuleType, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await outlet_with_usage(plugin, url, {"prompt_tokens": 3, "completion_tokens": 4, "cost": 0.25}, "m-ok")
    await outlet_with_usage(plugin, url, {"prompt_tokens": math.nan, "cost": math.inf}, "m-nan")
    assert plugin.cli_main(["export", "--database-url", url]) == 0
    exported = json.loads(capsys.readouterr().out, parse_constant=_refuse)
    assert exported[0]["notes"] == ""
    assert exported[1]["usage"]["prompt_tokens"] is None and exported[1]["cost_usd"] is None


async def test_deep_or_huge_usage_objects_are_bounded_and_never_lose_the_record(
    plugin: types.ModuleType, url: str
) -> None:
    deep: dict[str, Any] = {"cost": 0.001}
    cursor = deep
    for _ in range(500):
        cursor["next"] = {}
        cursor = cursor["next"]
    wide = {f"k{i}": i for i in range(10_000)} | {"cost": 0.002}
    await outlet_with_usage(plugin, url, deep, "m-deep")
    await outlet_with_usage(plugin, url, wide, "m-wide")
    rows = ledger_rows(plugin, url)
    assert [row["cost_pico"] for row in rows] == [1_000_000_000, 2_000_000_000]
    assert all(len(row["usage_json"]) < 10_000 for row in rows)


async def test_strings_lose_nul_and_control_characters_and_are_bounded(
    plugin: types.ModuleType, url: str
) -> None:
    user = {
        "id": "u\x00-1",
        "name": "Eve\x00\u202e\x1b[31m\r\nAdmin",
        "email": "eve@example.com",
        "role": "user",
    }
    chunks = [
        {"id": "gen-1", "provider": "Prov\x00ider\x85", "model": "m" * 5000, "choices": []},
        {"id": "gen-1", "choices": [], "usage": {"prompt_tokens": 1, "cost": 0.1}},
    ]
    await outlet_with_usage(plugin, url, None, "m-\x00strings", user=user, chunks=chunks)
    (row,) = ledger_rows(plugin, url)
    assert row["user_id"] == "u-1" and row["user_name"] == "Eve[31m  Admin"
    assert row["provider"] == "Provider" and row["message_id"] == "m-strings"
    assert len(row["served_model"]) == plugin.MAX_TEXT
    assert "user_name had control characters" in row["notes"]


@pytest.mark.parametrize(
    ("user", "stored"),
    [
        ({"id": "u-1", "name": "", "email": "ada@example.com"}, "u-1"),
        ({"id": "u-1", "name": "ada@example.com", "email": "ada@example.com"}, "u-1"),
        ({"id": "u-1", "name": "someone@else.org", "email": "ada@example.com"}, "u-1"),
        ({"id": "u-1", "name": "Ada Lovelace", "email": "ada@example.com"}, "Ada Lovelace"),
    ],
    ids=["empty-name", "name-is-the-email", "name-is-an-email", "a-real-name"],
)
async def test_an_email_is_never_stored_as_a_name(
    plugin: types.ModuleType, url: str, user: dict[str, Any], stored: str
) -> None:
    await outlet_with_usage(
        plugin, url, {"prompt_tokens": 1, "cost": 0.1}, "m-1", user=user | {"role": "user"}
    )
    (row,) = ledger_rows(plugin, url)
    assert row["user_name"] == stored


async def test_cumulative_usage_chunks_without_an_id_count_once_the_last_wins(
    plugin: types.ModuleType, url: str
) -> None:
    """OpenRouter's usage is cumulative per generation: 0.05 then 0.1 for the same call bills 0.1."""
    chunks = [
        {"id": "gen-7", "choices": [{"delta": {"content": "hi"}}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "cost": 0.05}},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "cost": 0.1}},
    ]
    await outlet_with_usage(plugin, url, None, "m-cumulative", chunks=chunks)
    (row,) = ledger_rows(plugin, url)
    assert row["cost_pico"] == 100_000_000_000 and row["completion_tokens"] == 3


async def test_id_churn_keeps_64_generation_ids_and_counts_the_rest(
    plugin: types.ModuleType, url: str
) -> None:
    """Exact up to MAX_TRACKED_IDS distinct ids (beyond, every change of id counts as a new one)."""
    chunks: list[Any] = [{"id": f"gen-{i}", "choices": []} for i in range(3_000)]
    chunks += [{"id": "gen-0", "choices": []}, {"id": "gen-2999", "choices": [], "usage": {"cost": 0.01}}]
    await outlet_with_usage(plugin, url, None, "m-churn", chunks=chunks)
    rows = {row["generation_key"]: row for row in ledger_rows(plugin, url)}
    assert sorted(rows) == sorted(f"gen-{i}" for i in range(64))
    assert {key: json.loads(row["generation_ids"]) for key, row in rows.items()} == {k: [k] for k in rows}
    omitted = {
        key: row["omitted_generation_ids"] for key, row in rows.items() if row["omitted_generation_ids"]
    }
    assert omitted == {"gen-63": 3_000 - 64}
    last = rows["gen-63"]  # the usage of an id not kept is counted on the last row kept, and said so
    assert last["cost_pico"] == 10**10 and "beyond the ids kept" in last["notes"]


async def test_a_failing_usage_line_is_logged_as_such_never_as_a_lost_record(
    plugin: types.ModuleType, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_emitter(_event: dict[str, Any]) -> None:
        raise ConnectionError("socket closed")

    caplog.set_level(logging.INFO, logger="openrouter_usage")
    await outlet_with_usage(plugin, url, {"prompt_tokens": 1, "cost": 0.1}, "m-line", emitter=broken_emitter)
    assert len(ledger_rows(plugin, url)) == 1
    assert "was recorded, but the usage line or a notice could not be shown" in caplog.text
    assert "could not record" not in caplog.text


async def test_an_emitter_that_never_answers_holds_the_outlet_for_a_bounded_time(
    plugin: types.ModuleType, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    monkeypatch.setattr(plugin, "INTERNAL_WAIT_SECONDS", 0.2)

    async def hanging_emitter(_event: dict[str, Any]) -> None:
        await asyncio.Event().wait()

    emitter = EmitterRecorder()
    await asyncio.wait_for(
        outlet_with_usage(plugin, url, {"prompt_tokens": 1, "cost": 0.1}, "m-hang", emitter=hanging_emitter),
        timeout=10,
    )
    assert len(ledger_rows(plugin, url)) == 1 and emitter.events == []


async def test_an_unparseable_or_unsupported_url_spools_the_record_and_the_panel_says_why(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    for bad in ("not a url at all", "mysql://u:p@localhost/db"):
        await outlet_with_usage(plugin, bad, {"prompt_tokens": 1, "cost": 0.1}, f"m-{len(bad)}")
        ledger = plugin.ledger_for(plugin.resolve_database_url(bad))
        assert ledger.spool.pending_count() == 1
        plugin.Filter.Valves(database_url=bad)
        panel = plugin.admin_report_markdown()
        assert panel.startswith("Usage report unavailable:") and "1 spooled batch(es)" in panel
        assert ":p@" not in panel


def test_reads_never_create_a_ledger(plugin: types.ModuleType, data_dir: Path) -> None:
    url = f"sqlite:///{data_dir / 'never.sqlite3'}"
    plugin.Filter.Valves(database_url=url)
    assert "No ledger" in plugin.admin_report_markdown() or "no ledger" in plugin.admin_report_markdown()
    assert "unavailable" in plugin.user_readout({"id": "u-1"}).markdown()
    assert plugin.cli_main(["report", "--database-url", url]) == 2
    assert plugin.cli_main(["export", "--database-url", url]) == 2
    assert not (data_dir / "never.sqlite3").exists()
    assert not (data_dir / "openrouter_usage_spool").exists()


async def test_a_lone_surrogate_is_cleaned_not_quarantined(plugin: types.ModuleType, url: str) -> None:
    """JSON text may carry "\\ud800", which no database can encode as UTF-8."""
    user = {"id": "u-1", "name": "Ada\ud800", "role": "user"}
    await outlet_with_usage(
        plugin, url, {"prompt_tokens": 1, "cost": 0.1, "note\udfff": "x\ud800"}, "m-s", user=user
    )
    (row,) = ledger_rows(plugin, url)
    assert row["user_name"] == "Ada" and plugin.ledger_for(url).spool.quarantined_count() == 0
    assert json.loads(row["usage_json"]) == {"prompt_tokens": 1, "cost": 0.1, "note": "x"}


async def test_the_money_ceiling_holds_for_a_row_that_sums_calls(plugin: types.ModuleType, url: str) -> None:
    """Three calls, each just under $100,000 (BYOK: upstream too), summed on one row (their ids
    were beyond the MAX_GENERATION_IDS kept) are one absurd figure; each generation of its own
    row is within the domain."""
    usage = {"cost": 99_999.99, "is_byok": True, "cost_details": {"upstream_inference_cost": 99_999.99}}
    kept: list[dict[str, Any]] = [
        {"id": f"gen-{i}", "choices": []} for i in range(plugin.MAX_GENERATION_IDS - 1)
    ]
    chunks = [*kept, *({"id": f"gen-x{i}", "choices": [], "usage": usage} for i in range(3))]
    await outlet_with_usage(plugin, url, None, "m-huge", chunks=chunks)
    priced = next(row for row in ledger_rows(plugin, url) if row["generation_key"] == "gen-x0")
    # gen-x0 is the last id kept; gen-x1 and gen-x2 are beyond, summed with it
    assert priced["cost_pico"] is None and priced["upstream_cost_pico"] is None and priced["spend_pico"] == 0
    assert "summed over the calls is out of range" in priced["notes"]
    three_calls = [{"id": f"gen-y{i}", "choices": [], "usage": usage} for i in range(3)]
    await outlet_with_usage(plugin, url, None, "m-three", chunks=three_calls)
    three = [row for row in ledger_rows(plugin, url) if row["message_id"] == "m-three"]
    assert [row["spend_pico"] for row in three] == [2 * 99_999_990_000_000_000] * 3
