"""Reconciliation with OpenRouter's bill, inside the real Open WebUI 0.12.4 (issue 13).

The plugin's lookups go to the session's simulator (its valves `openrouter_api_key` and
`openrouter_api_base`); every figure asserted comes from the simulator's own records of what it
billed. The server process cannot be monkeypatched, so each wait covers the plugin's real delays
(the first lookup 5 s after a completion, a stopped generation recorded 2 s after the stop).
"""

from __future__ import annotations

import csv
import io
import json
import time
import types
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.e2e.owui import OpenWebUIClient, OpenWebUIServer, eventually
from tests.e2e.plugin_under_test import (
    FUNCTION_ID,
    MODEL,
    export,
    generation_for,
    installed_looking_up_at,
    rows_by_message,
    run_cli,
    usd,
)
from tests.factories import load_plugin_module

pytestmark = pytest.mark.e2e

LOOKUP_KEY = "sk-or-v1-e2e-reconcile-lookups"  # any key may look any generation up
WAIT_SECONDS = 30.0  # the first lookup comes 5 s after a completion; a 404 backs off 5 s more


@pytest.fixture(scope="module")
def plugin(openwebui: OpenWebUIServer) -> types.ModuleType:
    """The plugin's own helpers (money formatting, the opaque user id, the panel's view)."""
    return load_plugin_module()


@pytest.fixture(scope="module")
def reconciling(admin: OpenWebUIClient, simulator: Any) -> Iterator[None]:
    with installed_looking_up_at(admin, simulator, LOOKUP_KEY):
        yield


def reconciled(
    openwebui: OpenWebUIServer, message_ids: list[str], *database_url: str
) -> dict[str, dict[str, Any]]:
    """The rows of `message_ids` once none of them is pending any more."""

    def settled() -> dict[str, dict[str, Any]] | None:
        rows = rows_by_message(export(openwebui, *database_url, missing_ok=True))
        found = {m: rows[m] for m in message_ids if m in rows and rows[m]["reconcile_status"] != "pending"}
        return found if len(found) == len(message_ids) else None

    return eventually(settled, WAIT_SECONDS, f"rows {message_ids} checked against the simulator's bill")


def panel(admin: OpenWebUIClient) -> str:
    """The settings panel's report, fetched as the panel does (the admin valves' spec)."""
    spec = admin.get_valves_spec(FUNCTION_ID)
    assert spec is not None
    return str(spec["properties"]["usage_report"]["description"])


def panel_saying(admin: OpenWebUIClient, words: str) -> str | None:
    """The panel's report if it says `words`."""
    report = panel(admin)
    return report if words in report else None


def chat_requests(simulator: Any, marker: str) -> list[Any]:
    """The chat completion requests (not Open WebUI's task calls) whose last message holds `marker`."""
    return [
        r
        for r in simulator.requests
        if r.path.endswith("/chat/completions")
        and r.task is None
        and marker in json.dumps((r.body or {}).get("messages", [])[-1:])
    ]


def test_a_chat_stopped_mid_stream_is_one_stopped_row_priced_at_the_simulators_bill(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, reconciling: None
) -> None:
    """Proves (contract rows 18, 22, 23): the stop button's POST /api/tasks/stop/{task_id} cancels
    the task that reads the stream, no outlet runs, the upstream stream is broken off (OpenRouter
    bills a cancelled generation), and the plugin records exactly one `stopped` row whose cost,
    after reconciliation, is the simulator's bill to the pico-dollar."""
    marker = f"stop-{uuid.uuid4().hex[:8]}"
    turn = admin.send_browser_chat(MODEL, f"Tell me a long story {marker} [sim:delay-ms=250] [sim:chunks=60]")
    (task_id,) = turn.task_ids
    eventually(lambda: chat_requests(simulator, marker), 15, "the completion to reach the simulator")
    time.sleep(1.5)  # a few chunks (the first carries the generation id) pass through `stream`
    stopped = admin.stop_task(task_id)
    assert stopped["status"] is True, stopped

    row = reconciled(openwebui, [turn.message_id])[turn.message_id]
    generation = generation_for(simulator, marker)
    print(
        f"\nstopped: {generation.id} cancelled={generation.cancelled} prompt={generation.prompt_tokens} "
        f"completion={generation.completion_tokens} billed ${generation.spend}; row {row['status']} "
        f"{row['reconcile_status']} billed_usd={row['billed_usd']} spend_usd={row['spend_usd']}"
    )
    assert generation.cancelled, "Open WebUI broke the upstream stream off, so OpenRouter bills it cancelled"
    assert (row["status"], row["reconcile_status"]) == ("stopped", "matched")
    assert usd(row["billed_usd"]) == generation.spend == usd(row["spend_usd"]) == usd(row["cost_usd"])
    assert generation.spend > 0 and row["generation_ids"] == [generation.id]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        generation.prompt_tokens,
        generation.completion_tokens,
    ), "the tokens come from OpenRouter's record: no usage was streamed before the stop"
    assert (row["chat_id"], row["user_id"]) == (turn.chat_id, admin.user["id"])
    assert [r["message_id"] for r in export(openwebui)].count(turn.message_id) == 1, "recorded once"
    message = admin.get_message(turn.chat_id, turn.message_id)
    assert message is not None and message.get("done"), "Open WebUI saved the stopped answer"


def test_ordinary_streamed_rows_reach_matched_at_the_simulators_bill(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, reconciling: None
) -> None:
    """Proves: a first turn and a follow-up turn, each streamed, are looked up once due and stored
    as `matched`, with OpenRouter's bill beside (equal to) the ledger's own spend."""
    markers = [f"match1-{uuid.uuid4().hex[:8]}", f"match2-{uuid.uuid4().hex[:8]}"]
    chat_id, first_id = admin.browser_chat(MODEL, f"What is a ledger? {markers[0]}")
    _, second_id = admin.browser_chat(MODEL, f"And a journal? {markers[1]} [sim:shape=A]", chat_id=chat_id)
    rows = reconciled(openwebui, [first_id, second_id])
    for marker, message_id in zip(markers, (first_id, second_id), strict=True):
        row, generation = rows[message_id], generation_for(simulator, marker)
        print(f"\n{marker}: {generation.id} billed ${generation.spend}; row billed_usd={row['billed_usd']}")
        assert (row["status"], row["reconcile_status"]) == ("ok", "matched")
        assert usd(row["billed_usd"]) == usd(row["spend_usd"]) == generation.spend
        assert row["generation_ids"] == [generation.id] and row["reconciled_at"]


def test_a_row_billed_differently_reaches_differs_and_the_panel_shows_the_difference(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, reconciling: None, plugin: Any
) -> None:
    """Proves: when OpenRouter bills more than the stream's usage said, the row is `differs`, both
    figures are kept (spend_usd as streamed, billed_usd as billed) and the panel counts it and
    shows the total difference the ledger holds."""
    marker = f"differs-{uuid.uuid4().hex[:8]}"
    _, message_id = admin.browser_chat(MODEL, f"Bill me {marker} [sim:bill-extra=0.0001]")
    row = reconciled(openwebui, [message_id])[message_id]
    generation = generation_for(simulator, marker)
    print(
        f"\ndiffers: wire cost {generation.usage['cost']}, billed ${generation.spend} "
        f"(extra {generation.bill_extra}); row spend_usd={row['spend_usd']} billed_usd={row['billed_usd']}"
    )
    assert row["reconcile_status"] == "differs"
    assert usd(row["spend_usd"]) == generation.usage["cost"], "our own figure is never overwritten"
    assert usd(row["billed_usd"]) == generation.spend
    assert usd(row["billed_usd"]) - usd(row["spend_usd"]) == generation.bill_extra > 0

    def panel_shows_the_ledgers_difference() -> str | None:
        differing = [r for r in export(openwebui) if r["reconcile_status"] == "differs"]
        total = sum(usd(r["billed_usd"]) - usd(r["spend_usd"]) for r in differing)
        total_pico = plugin.usd_to_pico(total)
        expected = (
            f"{plugin.format_count(len(differing))} differ by {'+' if total_pico >= 0 else '-'}"
            f"{plugin.format_usd(abs(total_pico))} in total (OpenRouter's bill minus the ledger)"
        )
        return expected if expected in panel(admin) else None

    shown = eventually(panel_shows_the_ledgers_difference, 15, "the panel to show the difference")
    print(f"panel: ... {shown} ...")


def test_a_rejected_key_shows_in_the_panel_and_a_new_key_resumes(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, reconciling: None
) -> None:
    """Proves: with a key OpenRouter answers 401, lookups stop (the row stays pending) and the panel
    says the key was rejected, without showing the key; once the key is changed, the next
    completion resumes reconciliation, both rows are checked and the rejection is gone."""
    rejected_key = f"sk-or-v1-e2e-rejected-{uuid.uuid4().hex}"
    simulator.reject_key(rejected_key)
    admin.update_valves(FUNCTION_ID, {"openrouter_api_key": rejected_key}, merge=True)
    try:
        _, rejected_id = admin.browser_chat(MODEL, f"rejected-{uuid.uuid4().hex[:8]}")
        report = eventually(lambda: panel_saying(admin, "The key was rejected"), WAIT_SECONDS, "rejection")
        print("\npanel: " + next(line for line in report.splitlines() if "The key was rejected" in line))
        assert "**The key was rejected** (HTTP 401, " in report and rejected_key not in report
        assert rows_by_message(export(openwebui))[rejected_id]["reconcile_status"] == "pending"
        with_rejected_key = [
            r for r in simulator.requests if r.headers.get("authorization") == f"Bearer {rejected_key}"
        ]
        assert with_rejected_key and all(r.path.endswith("/key") for r in with_rejected_key), (
            "one /key request learnt of the rejection; no generation was looked up with that key"
        )
    finally:
        admin.update_valves(FUNCTION_ID, {"openrouter_api_key": LOOKUP_KEY}, merge=True)
    _, resumed_id = admin.browser_chat(MODEL, f"resumed-{uuid.uuid4().hex[:8]}")
    rows = reconciled(openwebui, [rejected_id, resumed_id])
    assert {rows[m]["reconcile_status"] for m in (rejected_id, resumed_id)} == {"matched"}
    assert "The key was rejected" not in panel(admin)


def test_title_and_tag_calls_are_the_key_difference_in_the_panel(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, reconciling: None, plugin: Any
) -> None:
    """Proves (contract row 25): Open WebUI's title, tag and follow-up calls go to the same
    connection with the same key but past the filter, so OpenRouter's daily spend on that key (from
    /key, sampled by `openrouter-usage reconcile`) minus the ledger's is exactly their spend, and
    the panel's table shows it. A key and a ledger of its own keep other tests' spend out."""
    task_key = f"sk-or-v1-e2e-key-usage-{uuid.uuid4().hex}"
    url = f"sqlite:///{openwebui.data_dir / f'key-usage-{uuid.uuid4().hex[:8]}.sqlite3'}"
    connections = admin.get("/openai/config")
    admin.set_openai_connection(simulator.base_url, task_key)
    admin.update_valves(FUNCTION_ID, {"openrouter_api_key": task_key, "database_url": url}, merge=True)
    try:
        marker = f"tasks-{uuid.uuid4().hex[:8]}"
        _, message_id = admin.browser_chat(MODEL, f"Plan a trip {marker}")

        def generations_of_the_key() -> list[Any]:
            return [g for g in simulator.generations.values() if g.api_key == task_key]

        eventually(
            lambda: {"title", "tags"} <= {g.task for g in generations_of_the_key()},
            WAIT_SECONDS,
            "Open WebUI to generate the title and the tags",
        )
        settled = eventually(
            lambda: _unchanged_for(generations_of_the_key, 2.0), WAIT_SECONDS, "the last task"
        )
        row = reconciled(openwebui, [message_id], url)[message_id]
        sampled = run_cli(
            openwebui,
            "reconcile",
            "--database-url",
            url,
            "--base-url",
            simulator.base_url,
            env={"OPENROUTER_API_KEY": task_key},
        )
        report = panel(admin)
    finally:
        admin.post("/openai/config/update", connections)
        admin.update_valves(FUNCTION_ID, {"openrouter_api_key": LOOKUP_KEY, "database_url": ""}, merge=True)

    tasks = [g for g in settled if g.task]
    task_spend = sum(g.spend for g in tasks)
    openrouter_spend = sum(g.spend for g in settled)
    print(
        f"\n/key: {len(settled)} generations on the key, ${openrouter_spend}; tasks "
        f"{sorted(g.task for g in tasks)} ${task_spend}; ledger ${row['spend_usd']}\n{sampled.stdout}"
    )
    assert [g.id for g in settled if not g.task] == row["generation_ids"], "one chat completion: the row's"
    assert usd(row["spend_usd"]) == openrouter_spend - task_spend and task_spend > 0
    day = _key_day(plugin, url, datetime.now(UTC).date().isoformat())
    assert plugin.pico_to_usd(day.openrouter_pico) == openrouter_spend
    assert plugin.pico_to_usd(day.ledger_pico) == usd(row["spend_usd"])
    assert plugin.pico_to_usd(day.openrouter_pico - day.ledger_pico) == task_spend
    shown = (
        f"| {day.day} (to {day.sampled_at}) | {plugin.format_usd(day.openrouter_pico)} | "
        f"{plugin.format_usd(day.ledger_pico)} | {plugin.format_usd(plugin.usd_to_pico(task_spend))} |"
    )
    assert shown in report, report
    assert "background tasks (titles, tags, follow-ups)" in report


def _unchanged_for(read: Callable[[], list[Any]], seconds: float) -> list[Any] | None:
    """`read()` if it gives the same ids again after `seconds`, else None."""
    before = read()
    time.sleep(seconds)
    after = read()
    return after if [g.id for g in before] == [g.id for g in after] else None


def _key_day(plugin: Any, url: str, day: str) -> Any:
    """The panel's /key comparison for one UTC day, read from the ledger with the panel's code."""
    ledger = plugin.Ledger(url)
    try:
        view = plugin.read_reconciliation_view(ledger, plugin.build_usage_report(ledger, None, 10))
    finally:
        ledger.dispose()
    (key_day,) = [d for d in view.key_days if d.day == day]
    return key_day


def test_requests_carry_an_opaque_user_id_that_the_cli_prints(
    admin: OpenWebUIClient,
    openwebui: OpenWebUIServer,
    simulator: Any,
    reconciling: None,
    plugin: Any,
) -> None:
    """Proves (contract rows 23, 24): inlet's `user` reaches the connection unchanged, and it is the
    HMAC of the signed-in user's id (from `__metadata__["user_id"]`) keyed by WEBUI_SECRET_KEY:
    `owui-…`, never the e-mail or name; `report --by user --format csv` prints it beside the user."""
    marker = f"attribution-{uuid.uuid4().hex[:8]}"
    admin.browser_chat(MODEL, f"Who am I? {marker}")
    expected = plugin.openrouter_user_id(admin.user["id"], openwebui.secret_key.encode())
    sent = [r.body.get("user") for r in chat_requests(simulator, marker)]
    print(f"\nuser sent to OpenRouter: {sent}")
    assert sent == [expected] and expected.startswith("owui-")
    assert admin.user["email"] not in expected and admin.user["name"] not in expected

    report = run_cli(openwebui, "report", "--by", "user", "--format", "csv").stdout
    by_user = {row["user_id"]: row for row in csv.DictReader(io.StringIO(report))}
    assert by_user[admin.user["id"]]["openrouter_user"] == expected
    assert admin.user["email"] not in report
