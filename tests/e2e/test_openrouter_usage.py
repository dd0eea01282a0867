"""The real plugin inside a real Open WebUI 0.12.4, against the OpenRouter simulator.

Each scenario asserts on the ledger (read through the CLI export, as an admin would) and on what
the user sees (the saved message's statusHistory, the valve panels).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import types
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from scripts.build_manifest import MANIFEST, PLUGIN, build_manifest
from tests.e2e.owui import OpenWebUIClient, OpenWebUIHTTPError, OpenWebUIServer
from tests.e2e.plugin_under_test import (
    FUNCTION_ID,
    MODEL,
    export,
    generation_for,
    install,
    rows_by_message,
    usd,
    wait_for_row,
)
from tests.factories import load_plugin_module

pytestmark = pytest.mark.e2e

SOURCE = PLUGIN.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def plugin(openwebui: OpenWebUIServer) -> types.ModuleType:
    """The plugin's own formatting helpers, for computing what the user should see."""
    return load_plugin_module()


@pytest.fixture(scope="module")
def installed(admin: OpenWebUIClient, simulator: Any) -> Iterator[None]:
    """Installed the way an admin pastes the file: created from the plugin's content via the API."""
    (item,) = build_manifest(SOURCE)
    install(admin, {**item, "meta": {"description": item["meta"]["description"]}})
    simulator.clear()  # from here on, every request the simulator sees went through the plugin
    yield
    admin.delete_function(FUNCTION_ID)


def usage_lines(message: dict[str, Any]) -> list[str]:
    return [s.get("description", "") for s in message.get("statusHistory") or [] if s.get("done")]


def test_browser_streaming_chat_records_exactly_and_shows_the_line(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None, plugin: Any
) -> None:
    marker = f"browser-{uuid.uuid4().hex[:8]}"
    chat_id, message_id = admin.browser_chat(MODEL, f"Tell me about ledgers {marker}")
    row = wait_for_row(openwebui, message_id)
    generation = generation_for(simulator, marker)
    assert row["chat_id"] == chat_id and row["user_id"] == admin.user["id"]
    assert usd(row["cost_usd"]) == generation.cost and usd(row["spend_usd"]) == generation.spend
    assert row["prompt_tokens"] == generation.usage["prompt_tokens"]
    assert row["completion_tokens"] == generation.usage["completion_tokens"]
    assert row["generation_ids"] == [generation.id]
    assert (row["provider"], row["served_model"], row["model"]) == ("OpenAI", MODEL, MODEL)
    assert row["status"] == "ok"
    message = admin.get_message(chat_id, message_id)
    assert message is not None
    (line,) = [line for line in usage_lines(message) if "$" in line]
    spend_pico = int(generation.spend * 10**12)
    assert line.startswith(f"{plugin.format_usd(spend_pico)} · chat {plugin.format_usd(spend_pico)} · ")
    assert line.endswith(" · OpenAI") and MODEL not in line  # the model shown is the one requested


def test_direct_api_calls_stream_and_not_each_give_one_exact_row(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None
) -> None:
    before = {row["message_id"] for row in export(openwebui, missing_ok=True)}
    streamed_marker, plain_marker = f"api-s-{uuid.uuid4().hex[:8]}", f"api-n-{uuid.uuid4().hex[:8]}"
    streamed = admin.chat_completion(MODEL, [{"role": "user", "content": streamed_marker}], stream=True)
    assert streamed.done and streamed.content and not any("error" in e for e in streamed.events)
    plain = admin.chat_completion(MODEL, [{"role": "user", "content": plain_marker}], stream=False)
    assert plain["choices"][0]["message"]["content"]
    new_rows = [row for row in export(openwebui) if row["message_id"] not in before]
    assert len(new_rows) == 2
    spends = sorted(usd(row["spend_usd"]) for row in new_rows)
    expected = sorted(generation_for(simulator, m).spend for m in (streamed_marker, plain_marker))
    assert spends == expected
    assert all(row["chat_id"] == "" and row["message_id"].startswith("msg") for row in new_rows)
    # Each under its own generation id: the non-streamed one's reaches the ledger through the
    # model-call tap, since Open WebUI hands a filter no id for it (contract rows 37, 39).
    ids = sorted(row["generation_key"] for row in new_rows)
    assert ids == sorted(generation_for(simulator, m).id for m in (streamed_marker, plain_marker))
    assert all(row["generation_ids"] == [row["generation_key"]] for row in new_rows)


def test_non_streamed_replies_that_open_webui_gives_no_outlet_are_still_recorded_once(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None
) -> None:
    """Open WebUI runs no outlet for a non-streamed reply that is only tool calls, nor for a
    provider's error reply; OpenRouter bills the first, and an admin wants to see the second."""
    before = {row["generation_key"] for row in export(openwebui, missing_ok=True)}
    tools_marker, error_marker = f"api-t-{uuid.uuid4().hex[:8]}", f"api-e-{uuid.uuid4().hex[:8]}"
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    reply = admin.chat_completion(
        MODEL,
        [{"role": "user", "content": f"Weather in Paris? {tools_marker} [sim:tool-call]"}],
        stream=False,
        extra={"tools": [tool]},
    )
    assert reply["choices"][0]["message"]["tool_calls"] and not reply["choices"][0]["message"]["content"]
    with pytest.raises(OpenWebUIHTTPError) as refused:
        admin.chat_completion(MODEL, [{"role": "user", "content": f"{error_marker} [sim:error=402]"}])
    assert refused.value.status_code == 402
    generation = generation_for(simulator, tools_marker)
    deadline = time.monotonic() + 15
    while len(new_rows := [r for r in export(openwebui) if r["generation_key"] not in before]) < 2:
        assert time.monotonic() < deadline, f"expected 2 new rows, found {new_rows}"
        time.sleep(0.2)
    time.sleep(1.0)  # a second record of either would have arrived by now
    by_status = {row["status"]: row for row in export(openwebui) if row["generation_key"] not in before}
    assert len(by_status) == 2, by_status
    tools_row, error_row = by_status["ok"], by_status["error"]
    assert tools_row["generation_key"] == generation.id and usd(tools_row["spend_usd"]) == generation.spend
    assert tools_row["user_id"] == admin.user["id"] and tools_row["chat_id"] == ""
    assert error_row["error"].startswith("HTTP 402: ") and "Insufficient credits" in error_row["error"]
    assert error_row["cost_usd"] is None and error_row["user_id"] == admin.user["id"]


@pytest.mark.parametrize("directive", ["[sim:shape=A]", "[sim:shape=B]", "[sim:shape=C]", "[sim:byok]"])
def test_every_usage_shape_and_byok_is_exact(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None, directive: str
) -> None:
    marker = f"shape-{uuid.uuid4().hex[:8]}"
    _, message_id = admin.browser_chat(MODEL, f"{marker} {directive}")
    row = wait_for_row(openwebui, message_id)
    generation = generation_for(simulator, marker)
    assert usd(row["spend_usd"]) == generation.spend
    if directive == "[sim:byok]":
        assert row["is_byok"] and generation.is_byok
        assert usd(row["spend_usd"]) == generation.cost + generation.upstream_inference_cost
    else:
        assert not row["is_byok"] and usd(row["spend_usd"]) == generation.cost  # upstream never added


def test_second_turn_line_shows_the_chat_total_of_both_turns(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None, plugin: Any
) -> None:
    first_marker, second_marker = f"turn1-{uuid.uuid4().hex[:8]}", f"turn2-{uuid.uuid4().hex[:8]}"
    chat_id, first_id = admin.browser_chat(MODEL, first_marker)
    _, second_id = admin.browser_chat(MODEL, second_marker, chat_id=chat_id)
    rows = rows_by_message(export(openwebui))
    total = usd(rows[first_id]["spend_usd"]) + usd(rows[second_id]["spend_usd"])
    assert (
        total
        == generation_for(simulator, first_marker).spend + generation_for(simulator, second_marker).spend
    )
    message = admin.get_message(chat_id, second_id)
    assert message is not None
    (line,) = [line for line in usage_lines(message) if "$" in line]
    assert f"chat {plugin.format_usd(int(total * 10**12))}" in line


def test_a_mid_stream_error_shows_open_webui_error_and_marks_the_row_failed(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None
) -> None:
    marker = f"fail-{uuid.uuid4().hex[:8]}"
    chat_id, message_id = admin.browser_chat(
        MODEL, f"{marker} [sim:midstream-error] [sim:midstream-error-usage]"
    )
    message = admin.get_message(chat_id, message_id)
    assert message is not None and message.get("error"), "Open WebUI shows its normal error under the message"
    row = wait_for_row(openwebui, message_id)
    assert row["status"] == "error" and row["error"]
    assert usd(row["spend_usd"]) == generation_for(simulator, marker).spend


def test_two_users_at_once_each_get_their_own_rows_and_figures(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None, plugin: Any
) -> None:
    email = f"bob-{uuid.uuid4().hex[:6]}@example.com"
    admin.add_user("Bob Builder", email, "bob-password-e2e")
    bob = OpenWebUIClient.login(openwebui.url, email, "bob-password-e2e")
    results: dict[str, tuple[str, str]] = {}
    markers = {"admin": f"two-a-{uuid.uuid4().hex[:8]}", "bob": f"two-b-{uuid.uuid4().hex[:8]}"}

    def chat(name: str, client: OpenWebUIClient) -> None:
        results[name] = client.browser_chat(MODEL, markers[name])

    threads = [threading.Thread(target=chat, args=(n, c)) for n, c in (("admin", admin), ("bob", bob))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    rows = rows_by_message(export(openwebui))
    admin_row, bob_row = rows[results["admin"][1]], rows[results["bob"][1]]
    assert admin_row["user_id"] == admin.user["id"] and bob_row["user_id"] == bob.user["id"]
    assert bob_row["user_name"] == "Bob Builder"
    for name, row in (("admin", admin_row), ("bob", bob_row)):
        assert usd(row["spend_usd"]) == generation_for(simulator, markers[name]).spend
    bob_message = bob.get_message(*results["bob"])
    assert bob_message is not None
    (line,) = [line for line in usage_lines(bob_message) if "$" in line]
    assert plugin.format_usd(int(usd(bob_row["spend_usd"]) * 10**12)) in line

    # Issue 5: a user reads only their own figures; the admin spec is not theirs to read.
    spec = bob.get_user_valves_spec(FUNCTION_ID)
    assert spec is not None
    readout = spec["properties"]["my_usage"]
    bob_spend = sum(usd(r["spend_usd"]) for r in rows.values() if r["user_id"] == bob.user["id"])
    # Issue 15: the figures are the field's description, which the panel always shows, with no
    # control to click (docs/contract.md, valves rendering); the options carry the same figures.
    assert readout["description"].startswith(
        f"- **Today:** {plugin.format_usd(int(bob_spend * 10**12))} · 1 request ·"
    )
    assert "\n- **This month:** " in readout["description"]
    assert readout["input"]["type"] == plugin.READ_ONLY_INPUT
    labels = " ".join(o["label"] for o in readout["input"]["options"])
    assert f"Today: {plugin.format_usd(int(bob_spend * 10**12))} · 1 request ·" in labels
    assert admin.user.get("name", "Admin") not in labels + readout["description"]
    own = admin.get_user_valves_spec(FUNCTION_ID)  # the next spec built is the admin's own, not Bob's
    assert own is not None and own["properties"]["my_usage"]["description"] != readout["description"]
    with pytest.raises(OpenWebUIHTTPError) as denied:
        bob.get_valves_spec(FUNCTION_ID)
    assert denied.value.status_code == 401
    bob.close()


def test_a_user_who_turns_the_line_off_sees_none_and_is_still_recorded(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, installed: None
) -> None:
    """The hooks read the user and their valves from the request Open WebUI authenticated, not
    from `__user__` (docs/contract.md, row 34): a setting saved in the user's panel still rules."""
    email = f"carol-{uuid.uuid4().hex[:6]}@example.com"
    admin.add_user("Carol Cook", email, "carol-password-e2e")
    carol = OpenWebUIClient.login(openwebui.url, email, "carol-password-e2e")
    carol.update_user_valves(FUNCTION_ID, {"show_usage_line": False})
    hidden_chat, hidden_id = carol.browser_chat(MODEL, f"quiet-{uuid.uuid4().hex[:8]}")
    carol.update_user_valves(FUNCTION_ID, {"show_usage_line": True})
    shown_chat, shown_id = carol.browser_chat(MODEL, f"loud-{uuid.uuid4().hex[:8]}")
    rows = rows_by_message(export(openwebui))
    for message_id in (hidden_id, shown_id):
        assert rows[message_id]["user_id"] == carol.user["id"]
        assert rows[message_id]["user_name"] == "Carol Cook"
    hidden, shown = carol.get_message(hidden_chat, hidden_id), carol.get_message(shown_chat, shown_id)
    assert hidden is not None and shown is not None
    assert [line for line in usage_lines(hidden) if "$" in line] == []
    assert len([line for line in usage_lines(shown) if "$" in line]) == 1
    carol.close()


def test_the_legacy_completed_endpoint_does_not_double_count(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, installed: None
) -> None:
    chat_id, message_id = admin.browser_chat(MODEL, f"legacy-{uuid.uuid4().hex[:8]}")
    wait_for_row(openwebui, message_id)
    chat = admin.get_chat(chat_id)["chat"]
    messages = [
        {k: m.get(k) for k in ("id", "role", "content", "info", "timestamp", "usage") if k in m}
        for m in chat["history"]["messages"].values()
    ]
    admin.chat_completed(
        {"model": MODEL, "messages": messages, "chat_id": chat_id, "session_id": "legacy", "id": message_id}
    )
    assert [row["message_id"] for row in export(openwebui)].count(message_id) == 1


def test_title_and_tag_generations_happen_but_are_not_rows(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None
) -> None:
    marker = f"tasks-{uuid.uuid4().hex[:8]}"
    chat_id, message_id = admin.browser_chat(MODEL, marker)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        tasks = {r.task for r in simulator.requests if r.task and marker in json.dumps(r.body)}
        if {"title", "tags"} <= tasks:
            break
        time.sleep(0.2)
    assert {"title", "tags"} <= tasks, "Open WebUI generated a title and tags (the documented gap)"
    rows_for_chat = [row for row in export(openwebui) if row["chat_id"] == chat_id]
    assert [row["message_id"] for row in rows_for_chat] == [message_id]


def test_the_simulator_was_asked_for_usage_and_never_for_a_bulk_listing(
    simulator: Any, installed: None
) -> None:
    chats = [r for r in simulator.requests if r.path.endswith("/chat/completions") and r.task is None]
    assert chats
    assert all(r.body["usage"] == {"include": True} for r in chats), "inlet asked OpenRouter for usage"
    assert all(r.body["stream_options"]["include_usage"] for r in chats if r.body.get("stream"))
    assert not [r for r in simulator.requests if r.path.endswith("/generations")]


def test_bulk_sync_valve_round_trip_shows_the_notice_and_tracking_goes_on(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, installed: None
) -> None:
    admin.update_valves(FUNCTION_ID, {"bulk_sync": True}, merge=True)
    valves = admin.get_valves(FUNCTION_ID)
    assert valves["bulk_sync"] is False  # never suggests that a sync is running
    assert "Bulk sync has been disabled" in valves["bulk_sync_notice"]
    assert "GET /api/v1/generations does not exist" in valves["bulk_sync_notice"]
    spec = admin.get_valves_spec(FUNCTION_ID)
    assert spec is not None and spec["properties"]["bulk_sync"]["title"] == "Bulk sync (deprecated)"
    notice = spec["properties"]["bulk_sync_notice"]["description"]
    assert notice.startswith("**Deprecated.** Bulk sync has been disabled")
    assert "- **Impact:** No data loss" in notice
    assert spec["properties"]["bulk_sync_notice"]["input"]["type"] == "readonly", "shown once: no text box"
    # A later save (the admin's next edit) is still accepted: stored valves stay valid.
    admin.update_valves(FUNCTION_ID, {"report_rows": 5}, merge=True)
    _, message_id = admin.browser_chat(MODEL, f"after-bulk-{uuid.uuid4().hex[:8]}")
    wait_for_row(openwebui, message_id)
    # The dismissal the notice gives: Custom → Default leaves null in the form, and the save drops it.
    admin.update_valves(FUNCTION_ID, {"bulk_sync_notice": None}, merge=True)
    assert "bulk_sync_notice" not in admin.get_valves(FUNCTION_ID)
    spec = admin.get_valves_spec(FUNCTION_ID)
    assert spec is not None and not spec["properties"]["bulk_sync_notice"]["description"].startswith(
        "**Deprecated"
    )


def test_a_second_copy_under_another_id_shows_only_its_own_notice(
    admin: OpenWebUIClient, installed: None
) -> None:
    copy_id = f"{FUNCTION_ID}_copy"
    admin.create_function(copy_id, "OpenRouter Usage (copy)", SOURCE)  # inactive: records nothing
    try:
        admin.update_valves(FUNCTION_ID, {"bulk_sync": True}, merge=True)
        spec = admin.get_valves_spec(copy_id)
        assert spec is not None and not spec["properties"]["bulk_sync_notice"]["description"].startswith(
            "**Dep"
        )
        assert "bulk_sync_notice" not in admin.get_valves(copy_id)
        admin.update_valves(copy_id, {"bulk_sync": True}, merge=True)
        admin.update_valves(FUNCTION_ID, {"bulk_sync_notice": None}, merge=True)  # dismissed in the first
        spec = admin.get_valves_spec(copy_id)
        assert spec is not None and spec["properties"]["bulk_sync_notice"]["description"].startswith("**Dep")
        spec = admin.get_valves_spec(FUNCTION_ID)
        assert spec is not None and not spec["properties"]["bulk_sync_notice"]["description"].startswith(
            "**Dep"
        )
    finally:
        admin.delete_function(copy_id)


def test_the_admin_panel_report_matches_the_ledger(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, installed: None, plugin: Any
) -> None:
    rows = export(openwebui)
    spec = admin.get_valves_spec(FUNCTION_ID)
    assert spec is not None
    report = spec["properties"]["usage_report"]["description"]
    total = sum(usd(row["spend_usd"]) for row in rows)
    all_time = next(line for line in report.splitlines() if line.startswith("| All time |"))
    assert all_time == (
        f"| All time | {plugin.format_usd(int(total * 10**12))} | {len(rows):,} | "
        f"{sum(r['total_tokens'] for r in rows):,} | "
        f"{sum(1 for r in rows if r['status'] != 'ok'):,} |"
    )
    spend_by_user: dict[str, Decimal] = {}
    names: dict[str, str] = {}
    for row in rows:
        spend_by_user[row["user_id"]] = spend_by_user.get(row["user_id"], Decimal(0)) + usd(row["spend_usd"])
        names[row["user_id"]] = row["user_name"] or names.get(row["user_id"], row["user_id"])
    top_spender = max(spend_by_user, key=lambda user_id: spend_by_user[user_id])
    top_spend = plugin.format_usd(int(spend_by_user[top_spender] * 10**12))
    assert f"| {plugin.escape_markdown(names[top_spender])} | {top_spend} |" in report
    assert "openrouter_usage.sqlite3" in report
    # Read-only: no control is drawn, and what the Default button leaves ("") is never stored.
    assert spec["properties"]["usage_report"]["input"]["type"] == plugin.READ_ONLY_INPUT
    admin.update_valves(FUNCTION_ID, {"usage_report": ""}, merge=True)
    assert "usage_report" not in admin.get_valves(FUNCTION_ID)


def test_money_shows_in_the_display_currency_and_the_ledger_stays_in_usd(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, installed: None, plugin: Any
) -> None:
    eur = plugin.parse_display_currency("EUR 0.92 2026-11-29")
    admin.update_valves(FUNCTION_ID, {"display_currency": "EUR 0.92 2026-11-29"}, merge=True)
    try:
        chat_id, message_id = admin.browser_chat(MODEL, f"euro-{uuid.uuid4().hex[:8]}")
        row = wait_for_row(openwebui, message_id)
        spend = int(usd(row["spend_usd"]) * 10**12)
        message = admin.get_message(chat_id, message_id)
        assert message is not None
        (line,) = [line for line in usage_lines(message) if "€" in line]
        assert line.startswith(f"{eur.format(spend)} · chat {eur.format(spend)} · ")
        rows = export(openwebui)
        spec = admin.get_valves_spec(FUNCTION_ID)
        assert spec is not None
        report = spec["properties"]["usage_report"]["description"]
        assert "Amounts in EUR at 0.92 EUR per USD (rate of 2026-11-29)" in report
        total = sum(int(usd(r["spend_usd"]) * 10**12) for r in rows)
        assert f"| All time | {eur.format(total)} |" in report
        own = admin.get_user_valves_spec(FUNCTION_ID)
        assert own is not None
        readout = own["properties"]["my_usage"]["description"]
        assert readout.startswith("- **Today:** €") and "Converted from USD at 0.92 EUR per USD" in readout
        admin.update_valves(FUNCTION_ID, {"display_currency": "EUR 0,92"}, merge=True)  # saved, never refused
        spec = admin.get_valves_spec(FUNCTION_ID)
        assert spec is not None
        assert "not understood" in spec["properties"]["usage_report"]["description"]
        assert (
            f"| All time | {plugin.format_usd(total)} |" in spec["properties"]["usage_report"]["description"]
        )
    finally:
        admin.update_valves(FUNCTION_ID, {"display_currency": "USD"}, merge=True)
    assert all(r["spend_usd"] and "€" not in json.dumps(r) for r in export(openwebui)), "the ledger stays USD"


def test_the_panel_reads_the_valves_saved_in_open_webui_not_what_this_worker_last_saw(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, installed: None
) -> None:
    """Another worker or replica saving the valves is a change to Open WebUI's database that this
    process never sees in a hook: written here straight into the `function` table."""
    saved = admin.get_valves(FUNCTION_ID)
    elsewhere = openwebui.data_dir / f"elsewhere-{uuid.uuid4().hex[:8]}.sqlite3"
    with sqlite3.connect(openwebui.data_dir / "webui.db") as db:
        db.execute(
            "UPDATE function SET valves = ? WHERE id = ?",
            (json.dumps({**saved, "database_url": f"sqlite:///{elsewhere}"}), FUNCTION_ID),
        )
    try:
        spec = admin.get_valves_spec(FUNCTION_ID)
        assert spec is not None
        report = spec["properties"]["usage_report"]["description"]
        assert "Usage report unavailable: no ledger at" in report and elsewhere.name in report
        options = admin.get_user_valves_spec(FUNCTION_ID)  # the read-out follows the same valves
        assert options is not None and "Your usage is unavailable right now" in json.dumps(options)
    finally:
        admin.update_valves(FUNCTION_ID, saved)
    spec = admin.get_valves_spec(FUNCTION_ID)
    assert spec is not None and "| All time |" in spec["properties"]["usage_report"]["description"]
    assert not elsewhere.exists(), "a read never creates a ledger"


def test_with_stream_capture_off_a_streamed_chat_is_still_recorded_exactly(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None
) -> None:
    admin.update_valves(FUNCTION_ID, {"capture_stream": False}, merge=True)
    try:
        marker = f"no-stream-{uuid.uuid4().hex[:8]}"
        _, message_id = admin.browser_chat(MODEL, f"Quietly {marker}")
        row = wait_for_row(openwebui, message_id)
    finally:
        admin.update_valves(FUNCTION_ID, {"capture_stream": True}, merge=True)
    generation = generation_for(simulator, marker)
    assert usd(row["spend_usd"]) == generation.spend and row["status"] == "ok"
    assert row["generation_ids"] == [] and row["provider"] == "", "what the valve says is lost"


def test_installed_from_manifest_like_the_import_button(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, installed: None
) -> None:
    admin.delete_function(FUNCTION_ID)
    (created,) = admin.import_manifest(MANIFEST)
    assert created["id"] == FUNCTION_ID
    install_state = admin.activate_global(FUNCTION_ID)
    assert install_state["is_active"] and install_state["is_global"]
    function = admin.get_function(FUNCTION_ID)
    assert function is not None and function["meta"]["manifest"]["version"]
    _, message_id = admin.browser_chat(MODEL, f"manifest-{uuid.uuid4().hex[:8]}")
    assert wait_for_row(openwebui, message_id)["status"] == "ok"
