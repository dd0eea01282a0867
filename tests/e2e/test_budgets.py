"""Spend budgets in the real Open WebUI 0.12.4, against the OpenRouter simulator: a block at inlet
(browser-like chat and API call, nothing sent upstream), a tool-calling turn stopped at the
`request` hook, a group budget through a real Open WebUI group, an admin under `default`, the
warning notification once (over the user's socket.io connection) and the usage line's budget."""

from __future__ import annotations

import json
import types
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pytest

from scripts.build_manifest import PLUGIN, build_manifest
from tests.e2e.owui import OpenWebUIClient, OpenWebUIHTTPError, OpenWebUIServer, UserEvents
from tests.e2e.plugin_under_test import generation_for
from tests.factories import load_plugin_module

pytestmark = pytest.mark.e2e

FUNCTION_ID = "openrouter_usage"
MODEL = "openai/gpt-4o-mini"
TINY = "$0.000001 per day"  # below one simulated completion's cost (about $0.00001)
PASSWORD = "e2e-budget-password"
TOOL = '''
class Tools:
    def lookup_weather(self, city: str) -> str:
        """Look up the weather in a city.
        :param city: the city
        """
        return "sunny"
'''


@pytest.fixture(scope="module")
def plugin(openwebui: OpenWebUIServer) -> types.ModuleType:
    """The plugin's own formatting helpers, for computing what the user should see."""
    return load_plugin_module()


@pytest.fixture(scope="module")
def installed(admin: OpenWebUIClient, simulator: Any) -> Iterator[None]:
    (item,) = build_manifest(PLUGIN.read_text(encoding="utf-8"))
    admin.create_function(item["id"], item["name"], item["content"], {"description": "budgets"})
    admin.activate_global(FUNCTION_ID)
    yield
    admin.delete_function(FUNCTION_ID)


def set_budgets(admin: OpenWebUIClient, budgets: str, **valves: Any) -> None:
    # Reservation 0: a user without history reserves one pico-dollar, so the first call of a fresh
    # user is admitted and the limit is reached by what it cost.
    admin.update_valves(
        FUNCTION_ID,
        {
            "openrouter_url_pattern": "openrouter.ai,127.0.0.1",
            "budgets": budgets,
            "budget_reservation_usd": "0",
            **valves,
        },
    )


def new_user(admin: OpenWebUIClient, openwebui: OpenWebUIServer, role: str = "user") -> OpenWebUIClient:
    email = f"b-{uuid.uuid4().hex[:8]}@example.com"
    admin.add_user(email.split("@", maxsplit=1)[0], email, PASSWORD, role)
    return OpenWebUIClient.login(openwebui.url, email, PASSWORD)


def upstream_calls(simulator: Any, marker: str) -> int:
    return sum(
        1
        for g in simulator.generations.values()
        if g.task is None and marker in json.dumps(g.request_body.get("messages", []))
    )


def chat(client: OpenWebUIClient, text: str, **extra: Any) -> dict[str, Any]:
    chat_id, message_id = client.browser_chat(MODEL, text, extra=extra or None)
    message = client.get_message(chat_id, message_id)
    assert message is not None
    return message


def error_of(message: dict[str, Any]) -> str:
    return str((message.get("error") or {}).get("content") or "")


def test_over_budget_user_gets_the_message_in_chat_and_api_and_nothing_goes_upstream(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None
) -> None:
    user = new_user(admin, openwebui)
    set_budgets(admin, f"default: $100 per day\nuser {user.user['email']}: {TINY}")
    first = chat(user, f"first {uuid.uuid4().hex[:8]}")
    assert not error_of(first)
    lines = [s.get("description", "") for s in first.get("statusHistory") or [] if s.get("done")]
    assert any("budget " in line and "% of $0.0000010/day" in line for line in lines), lines
    marker = f"blocked-{uuid.uuid4().hex[:8]}"
    blocked = chat(user, marker)
    assert error_of(blocked).startswith("Your budget of $0.0000010 per day is used up ($")
    assert error_of(blocked).endswith(" at 00:00 UTC. Ask an admin to raise it.")
    api_marker = f"api-{uuid.uuid4().hex[:8]}"
    with pytest.raises(OpenWebUIHTTPError) as refused:
        user.chat_completion(MODEL, [{"role": "user", "content": api_marker}], stream=False)
    assert refused.value.status_code == 400
    assert str(refused.value.detail).startswith("Your budget of $0.0000010 per day is used up")
    assert upstream_calls(simulator, marker) == upstream_calls(simulator, api_marker) == 0


def test_an_admin_is_not_blocked_by_default(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None
) -> None:
    set_budgets(admin, f"default: {TINY}")
    for turn in range(2):
        marker = f"admin-{turn}-{uuid.uuid4().hex[:8]}"
        assert not error_of(chat(admin, marker))
        assert upstream_calls(simulator, marker) == 1


def test_a_group_budget_applies_through_a_real_open_webui_group(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None
) -> None:
    name = f"Interns {uuid.uuid4().hex[:6]}"
    group = admin.post("/api/v1/groups/create", {"name": name, "description": "budget test"})
    member, outsider = new_user(admin, openwebui), new_user(admin, openwebui)
    admin.post(f"/api/v1/groups/id/{group['id']}/users/add", {"user_ids": [member.user["id"]]})
    set_budgets(admin, f"default: $100 per day\ngroup {name.upper()}: {TINY}")
    for turn in range(2):
        assert not error_of(chat(outsider, f"outsider {turn}"))
    assert not error_of(chat(member, "member first"))
    assert error_of(chat(member, "member second")).startswith("Your budget of $0.0000010 per day is used up")


def test_a_tool_calling_turn_is_stopped_at_the_request_hook_mid_turn(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None
) -> None:
    tool_id = f"weather_{uuid.uuid4().hex[:6]}"
    admin.post(
        "/api/v1/tools/create",
        {"id": tool_id, "name": "Weather", "content": TOOL, "meta": {"description": "w"}},
    )
    agent = new_user(admin, openwebui, role="admin")  # may use the admin's tool; named by a rule below
    set_budgets(admin, f"default: $100 per day\nuser {agent.user['email']}: {TINY}")
    marker = f"tool-{uuid.uuid4().hex[:8]}"
    message = chat(agent, f"{marker} weather in Paris? [sim:tool-call]", tool_ids=[tool_id])
    # The first call was admitted (nothing spent yet) and asked for the tool; before the follow-up
    # call the turn had spent more than the budget, so `request` stopped it: one call upstream.
    assert upstream_calls(simulator, marker) == 1
    assert "would be exceeded by this request" in error_of(message)
    admin.request("DELETE", f"/api/v1/tools/id/{tool_id}/delete")


def outlet_ran(message_id: str) -> Callable[[dict[str, Any]], bool]:
    """Open WebUI sends `chat:outlet` after the outlet filters, on the same connection: once it has
    arrived, every event the plugin's outlet sent for that message has too."""
    return lambda event: event.get("message_id") == message_id and event["data"].get("type") == "chat:outlet"


def two_figures(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal(1).scaleb(amount.adjusted() - 1), rounding=ROUND_HALF_EVEN)


def test_the_warning_notification_arrives_once_and_the_line_shows_the_budget(
    admin: OpenWebUIClient, openwebui: OpenWebUIServer, simulator: Any, installed: None, plugin: Any
) -> None:
    # The limit is ten first turns at the simulator's prices (another ordinary user's turn of the
    # same length, under no rule; an admin's costs more, Open WebUI sending admins more built-in
    # tool definitions) and the warning line 15%: turn 1 stays under it (about 10%), turn 2
    # crosses it (about 20%).
    warn_percent = 15
    set_budgets(admin, "")
    calibration = f"turn 1 {uuid.uuid4().hex[:8]}"
    chat(new_user(admin, openwebui), calibration)
    limit = two_figures(10 * generation_for(simulator, calibration).spend)
    limit_pico = int(limit * 10**12)
    user = new_user(admin, openwebui)
    set_budgets(admin, f"user {user.user['email']}: ${limit:f} per day", budget_warn_percent=warn_percent)
    first_day = datetime.now(UTC).date()
    turns: list[tuple[str, str, str]] = []  # (chat id, message id, marker)
    with UserEvents(openwebui, str(user.token)) as browser:
        assert browser.joined["id"] == user.user["id"]
        chat_id: str | None = None
        for turn in range(1, 5):
            marker = f"turn {turn} {uuid.uuid4().hex[:8]}"
            # Turns 1-3 in one chat, turn 4 in a new one: once per window, not once per chat.
            chat_id, message_id = user.browser_chat(MODEL, marker, chat_id if turn < 4 else None)
            browser.wait_for(outlet_ran(message_id), f"turn {turn}'s outlet")
            turns.append((chat_id, message_id, marker))
        events = browser.events
    # The day window ends tomorrow (two candidates if the turns straddled midnight UTC).
    resets = {day + timedelta(days=1) for day in (first_day, datetime.now(UTC).date())}
    spends = [int(generation_for(simulator, marker).spend * 10**12) for _, _, marker in turns]
    percents = [sum(spends[: turn + 1]) * 100 // limit_pico for turn in range(len(spends))]
    assert percents[0] < warn_percent <= percents[1], (percents, spends, limit)

    warnings = [
        event
        for event in events
        if event["data"].get("type") == "notification" and event["data"]["data"].get("type") == "warning"
    ]
    assert [event["message_id"] for event in warnings] == [turns[1][1]], warnings  # once, after turn 2
    spent = plugin.format_usd(sum(spends[:2]))
    assert warnings[0]["data"]["data"]["content"] in {
        f"You have used {percents[1]}% of your budget ({spent} of {plugin.format_usd(limit_pico)} per day). "
        f"It resets on {day.day} {day:%B %Y} at 00:00 UTC."
        for day in resets
    }
    for (chat_id, message_id, _), percent in zip(turns, percents, strict=True):
        message = user.get_message(chat_id, message_id)
        assert message is not None
        (line,) = [
            s["description"] for s in message.get("statusHistory") or [] if "$" in s.get("description", "")
        ]
        budget = f" · budget {percent}% of {plugin.compact_usd(limit_pico)}/day"
        assert line.endswith(budget) if percent >= warn_percent else "budget" not in line, line
