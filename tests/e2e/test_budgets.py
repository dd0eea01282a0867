"""Spend budgets in the real Open WebUI 0.12.4, against the OpenRouter simulator: a block at inlet
(browser-like chat and API call, nothing sent upstream), a tool-calling turn stopped at the
`request` hook, a group budget through a real Open WebUI group, an admin under `default`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from scripts.build_manifest import PLUGIN, build_manifest
from tests.e2e.owui import OpenWebUIClient, OpenWebUIHTTPError, OpenWebUIServer

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
def installed(admin: OpenWebUIClient, simulator: Any) -> Iterator[None]:
    (item,) = build_manifest(PLUGIN.read_text(encoding="utf-8"))
    admin.create_function(item["id"], item["name"], item["content"], {"description": "budgets"})
    admin.activate_global(FUNCTION_ID)
    yield
    admin.delete_function(FUNCTION_ID)


def set_budgets(admin: OpenWebUIClient, budgets: str) -> None:
    # Reservation 0: a user without history reserves one pico-dollar, so the first call of a fresh
    # user is admitted and the limit is reached by what it cost.
    admin.update_valves(
        FUNCTION_ID,
        {
            "openrouter_url_pattern": "openrouter.ai,127.0.0.1",
            "budgets": budgets,
            "budget_reservation_usd": "0",
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
