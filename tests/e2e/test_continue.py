"""The web client's "Continue response" in the real Open WebUI 0.12.4, against the OpenRouter simulator.

A continuation is a new request for the SAME assistant message: Open WebUI replays the history
with the message's partial answer last and appends the new chunks to that message. Each request
is its own OpenRouter generation with its own bill, so the ledger holds one row per generation
(several rows share the message id), the usage line shows the message's total over them and how
many calls it took, the legacy `/api/chat/completed` re-run adds nothing, and a budget admits or
refuses each continuation at inlet like any other call.
"""

from __future__ import annotations

import json
import time
import types
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from scripts.build_manifest import PLUGIN, build_manifest
from tests.e2e.owui import OpenWebUIClient, OpenWebUIServer
from tests.e2e.plugin_under_test import FUNCTION_ID, MODEL, export, generations_for, install, usd
from tests.factories import load_plugin_module

pytestmark = pytest.mark.e2e

PASSWORD = "e2e-continue-password"
PICO = 10**12


@pytest.fixture(scope="module")
def plugin(openwebui: OpenWebUIServer) -> types.ModuleType:
    """The plugin's own formatting helpers, for computing what the user should see."""
    return load_plugin_module()


@pytest.fixture(scope="module")
def installed(admin: OpenWebUIClient, simulator: Any) -> Iterator[None]:
    """Installed the way an admin pastes the file: created from the plugin's content via the API."""
    (item,) = build_manifest(PLUGIN.read_text(encoding="utf-8"))
    install(admin, {**item, "meta": {"description": item["meta"]["description"]}})
    simulator.clear()  # from here on, every request the simulator sees went through the plugin
    yield
    admin.delete_function(FUNCTION_ID)


def usage_lines(message: dict[str, Any]) -> list[str]:
    return [s.get("description", "") for s in message.get("statusHistory") or [] if s.get("done")]


def message_rows(openwebui: OpenWebUIServer, message_id: str) -> list[dict[str, Any]]:
    return sorted(
        (row for row in export(openwebui, missing_ok=True) if row["message_id"] == message_id),
        key=lambda row: (row["created_at"], str(row.get("generation_key"))),
    )


def wait_for_rows(
    openwebui: OpenWebUIServer, message_id: str, count: int, timeout: float = 15.0
) -> list[dict[str, Any]]:
    """The message's rows once there are `count` of them, or what there is after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        rows = message_rows(openwebui, message_id)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def settled_rows(openwebui: OpenWebUIServer, message_id: str, quiet: float = 2.0) -> list[dict[str, Any]]:
    """The message's rows after `quiet` seconds without a change (to see that nothing is added)."""
    rows = message_rows(openwebui, message_id)
    deadline = time.monotonic() + quiet
    while time.monotonic() < deadline:
        time.sleep(0.25)
        again = message_rows(openwebui, message_id)
        if again != rows:
            rows, deadline = again, time.monotonic() + quiet
    return rows


def chat_requests(simulator: Any, marker: str) -> int:
    """Chat completion requests (no title/tag/follow-up task) that reached the simulator."""
    return sum(
        1
        for r in simulator.requests
        if r.path.endswith("/chat/completions") and r.task is None and marker in json.dumps(r.body)
    )


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}: {len(rows)} row(s)")
    print(f"  {'generation_key':<44} {'spend_usd':>16}")
    for row in rows:
        print(f"  {row.get('generation_key', '(no such field)')!s:<44} {row['spend_usd']!s:>16}")


def error_of(message: dict[str, Any]) -> str:
    return str((message.get("error") or {}).get("content") or "")


def new_user(admin: OpenWebUIClient, openwebui: OpenWebUIServer) -> OpenWebUIClient:
    email = f"c-{uuid.uuid4().hex[:8]}@example.com"
    admin.add_user(email.split("@", maxsplit=1)[0], email, PASSWORD, "user")
    return OpenWebUIClient.login(openwebui.url, email, PASSWORD)


def continue_and_check(client: OpenWebUIClient, chat_id: str, message_id: str) -> dict[str, Any]:
    """Continue the message; check (the harness, not the plugin) that Open WebUI appended the new
    answer to the same message."""
    before = client.get_message(chat_id, message_id)
    assert before is not None and before["content"]
    after = client.continue_response(chat_id, message_id)
    assert not after.get("error"), after.get("error")
    grown = after["content"].startswith(before["content"]) and len(after["content"]) > len(before["content"])
    assert grown, "Open WebUI appended the continuation to the same message"
    return after


def check_continuations_reached_the_simulator(generations: list[Any], contents: list[str]) -> None:
    """Each continuation's request ended with the assistant's answer as it was saved before it."""
    for generation, partial in zip(generations[1:], contents, strict=True):
        last = generation.request_body["messages"][-1]
        assert last["role"] == "assistant" and last["content"] == partial, last


def test_answer_continue_continue_is_three_exact_rows_and_the_line_counts_three_calls(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None, plugin: Any
) -> None:
    marker = f"cont3-{uuid.uuid4().hex[:8]}"
    chat_id, message_id = admin.browser_chat(MODEL, f"Tell me about double-entry ledgers {marker}")
    answered = admin.get_message(chat_id, message_id)
    assert answered is not None and not answered.get("error")
    contents = [answered["content"]]
    snapshots = [("after the answer", wait_for_rows(openwebui, message_id, 1))]
    for turn in (1, 2):
        message = continue_and_check(admin, chat_id, message_id)
        contents.append(message["content"])
        snapshots.append((f"after Continue {turn}", wait_for_rows(openwebui, message_id, turn + 1)))
    for title, rows in snapshots:
        print_rows(title, rows)

    generations = generations_for(simulator, marker)
    assert len(generations) == 3, "the simulator billed the answer and both continuations"
    assert len({g.id for g in generations}) == 3
    check_continuations_reached_the_simulator(generations, contents[:-1])
    bill = sum((g.spend for g in generations), Decimal(0))
    print(f"\nsimulator: {[(g.id, str(g.spend)) for g in generations]} · bill {bill}")

    rows = snapshots[-1][1]
    assert len(rows) == 3, f"one row per billed generation, got {len(rows)}"
    by_key = {row["generation_key"]: row for row in rows}
    assert set(by_key) == {g.id for g in generations}
    for generation in generations:
        row = by_key[generation.id]
        assert row["generation_ids"] == [generation.id]
        assert usd(row["spend_usd"]) == generation.spend and usd(row["cost_usd"]) == generation.cost
        assert row["chat_id"] == chat_id and row["status"] == "ok"
    total = sum((usd(row["spend_usd"]) for row in rows), Decimal(0))
    assert total == bill, "the ledger equals the simulator's bill to the pico-dollar"

    final = admin.get_message(chat_id, message_id)
    assert final is not None
    money = plugin.format_usd(int(total * PICO))
    line = [line for line in usage_lines(final) if "$" in line][-1]
    print(f"\nusage line: {line}")
    assert line.startswith(f"{money} · 3 calls · chat {money} · "), line


def test_the_legacy_completed_endpoint_after_a_continue_adds_no_row(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None
) -> None:
    marker = f"cont-legacy-{uuid.uuid4().hex[:8]}"
    chat_id, message_id = admin.browser_chat(MODEL, marker)
    continue_and_check(admin, chat_id, message_id)
    generations = generations_for(simulator, marker)
    assert len(generations) == 2, "the simulator billed the answer and the continuation"
    before = wait_for_rows(openwebui, message_id, 2)
    assert sorted(str(row.get("generation_key")) for row in before) == sorted(g.id for g in generations), (
        "one row per billed generation before the re-run"
    )

    chat = admin.get_chat(chat_id)["chat"]
    messages = [
        {k: m.get(k) for k in ("id", "role", "content", "info", "timestamp", "usage") if k in m}
        for m in chat["history"]["messages"].values()
    ]
    admin.chat_completed(
        {"model": MODEL, "messages": messages, "chat_id": chat_id, "session_id": "legacy", "id": message_id}
    )
    assert settled_rows(openwebui, message_id) == before
    assert len(generations_for(simulator, marker)) == 2


def test_a_budget_refuses_the_continuation_that_would_pass_it(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None, plugin: Any
) -> None:
    saved = admin.get_valves(FUNCTION_ID)
    user = new_user(admin, openwebui)
    rule = f"user {user.user['email']}"
    try:
        # Generous first: the answer and one continuation are admitted like any other call.
        admin.update_valves(
            FUNCTION_ID, {"budgets": f"{rule}: $1 per day", "budget_reservation_usd": "0"}, merge=True
        )
        marker = f"cont-budget-{uuid.uuid4().hex[:8]}"
        chat_id, message_id = user.browser_chat(MODEL, marker)
        answered = user.get_message(chat_id, message_id)
        assert answered is not None and not error_of(answered)
        continued = continue_and_check(user, chat_id, message_id)
        assert len(generations_for(simulator, marker)) == 2

        # The next continuation reserves the user's p95 spend on the model (with this little
        # history, their dearest row); set the limit halfway through that reservation.
        rows = [
            row
            for row in settled_rows(openwebui, message_id)
            if row["user_id"] == user.user["id"] and row["model"] == MODEL
        ]
        assert rows
        spent = sum(int(usd(row["spend_usd"]) * PICO) for row in rows)
        estimate = max(int(usd(row["spend_usd"]) * PICO) for row in rows)
        limit = Decimal(spent + estimate // 2).scaleb(-12)
        admin.update_valves(FUNCTION_ID, {"budgets": f"{rule}: ${limit:f} per day"}, merge=True)

        requests_before, rows_before = chat_requests(simulator, marker), settled_rows(openwebui, message_id)
        refused = user.continue_response(chat_id, message_id)
        error = error_of(refused)
        assert error.startswith("Your budget of $"), refused.get("error")
        assert (
            f" would be exceeded by this request ({plugin.format_usd(spent)} spent, "
            f"{plugin.format_usd(estimate)} held for answers in progress)." in error
        ), error
        assert chat_requests(simulator, marker) == requests_before, "nothing was sent upstream"
        assert settled_rows(openwebui, message_id) == rows_before, "the ledger is unchanged"
        assert refused["content"] == continued["content"]
    finally:
        admin.update_valves(FUNCTION_ID, saved)
        user.close()
