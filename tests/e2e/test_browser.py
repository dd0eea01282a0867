"""What a person sees, in headless Chromium driving the real Open WebUI 0.12.4.

One scenario on the suite's Open WebUI: the admin signs in through the login form and chats twice;
the usage line shows each answer's cost and the chat's total as billed; a second user is given a
month of history (the demo's --seed-history); the function's settings panel shows the last 30 days
as a chart of block bars in a monospace block, with its total and busiest day in words, at 1280 px
and on a 390 px phone, and renders the report as tables holding the ledger's spend; the second,
ordinary user chats once and reads only their own figures, their own chart and their budget's bars
in their valves panel, at both widths. The expected figures come from the simulator's bill and the
ledger (the CLI's export), never from the page.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import types
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from scripts.demo import install_function, seed_history
from tests.e2e.browser import BrowserUnavailableError, OpenWebUIPage, skip_release_notes, start_chromium
from tests.e2e.owui import OpenWebUIClient, OpenWebUIServer
from tests.factories import load_plugin_module

pytestmark = pytest.mark.e2e

ENSURE_CHROMIUM = Path(__file__).resolve().parents[2] / "scripts" / "ensure-chromium.sh"
FUNCTION_ID = "openrouter_usage"
MODEL = "openai/gpt-4o-mini"
WIDTHS = ((1280, 800, False), (390, 844, True))  # a desktop, and a phone


@pytest.fixture(scope="module")
def chromium() -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium. Missing, it skips with the reason; under CI=true it is installed
    (scripts/ensure-chromium.sh, as `make test` does first) and a browser still missing fails."""
    ci = os.environ.get("CI", "").strip().lower() == "true"
    try:
        driver = start_chromium()
    except BrowserUnavailableError as exc:
        if not ci:
            pytest.skip(f"no headless Chromium: {exc}")
        install = subprocess.run(
            ["bash", str(ENSURE_CHROMIUM)], capture_output=True, text=True, timeout=900, check=False
        )
        try:
            driver = start_chromium()
        except BrowserUnavailableError as again:
            pytest.fail(
                f"CI=true but no headless Chromium: {again}\nensure-chromium.sh exited "
                f"{install.returncode}:\n{install.stdout}{install.stderr}",
                pytrace=False,
            )
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def installed(admin: OpenWebUIClient, simulator: Any) -> Iterator[None]:
    """Installed as `make demo` installs it (the simulator on loopback counts as OpenRouter)."""
    install_function(admin, "127.0.0.1")
    yield
    admin.delete_function(FUNCTION_ID)


@pytest.fixture
def plugin(openwebui: OpenWebUIServer, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The plugin's own code, for its CLI and its formatting (format_usd), pointed at the ledger
    in the server's DATA_DIR as an admin's shell would be."""
    monkeypatch.setenv("DATA_DIR", str(openwebui.data_dir))
    monkeypatch.delenv("OPENROUTER_USAGE_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return load_plugin_module()


def ledger_rows(plugin: types.ModuleType) -> list[dict[str, Any]]:
    """The ledger's rows, read with the admin CLI's export (run in this process: it finds the
    ledger in $DATA_DIR as the console script does)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert plugin.cli_main(["export", "--format", "json"]) == 0
    rows: list[dict[str, Any]] = json.loads(out.getvalue())
    return rows


def ledger_spend(plugin: types.ModuleType) -> dict[str, tuple[str, Decimal]]:
    """Each ledger row's message id -> (user id, exact spend)."""
    return {row["message_id"]: (row["user_id"], Decimal(row["spend_usd"])) for row in ledger_rows(plugin)}


def spend_by_utc_day(plugin: types.ModuleType, user_id: str | None = None) -> dict[str, Decimal]:
    """The last 30 UTC days (today last), each with the ledger's spend on it (of one user)."""
    today = datetime.now(UTC).date()
    days = {(today - timedelta(days=29 - n)).isoformat(): Decimal(0) for n in range(30)}
    for row in ledger_rows(plugin):
        day = row["created_at"][:10]  # the export's created_at is UTC ("…Z")
        if day in days and user_id in (None, row["user_id"]):
            days[day] += Decimal(row["spend_usd"])
    return days


def assert_the_chart_is_seen(page: OpenWebUIPage, root: Any, words: Iterable[str], where: str) -> None:
    """What a person sees of a chart under ``root``: its words in the visible text; a code block
    drawn in a monospace font whose bar rows are all equally wide (the bars line up), none of its
    lines wrapped, inside the viewport and with nothing cut off by overflow."""
    shown = root.text
    missing = [text for text in words if text not in shown]
    assert not missing, f"{where}: {missing} not in what is shown:\n{shown}"
    charts = [block for block in page.code_blocks(root) if "today ▒" in block["text"]]
    assert len(charts) == 1, f"{where}: one chart, found {len(charts)}"
    (chart,) = charts
    bars = [line for line in chart["lines"] if line["text"][-31:-30] in "┤│" and "─" not in line["text"]]
    assert len(bars) >= 5 and any(set(line["text"]) & set("▁▂▃▄▅▆▇█") for line in bars), chart["text"]
    assert "mono" in chart["font"], f"{where}: the chart's font is {chart['font']}"
    assert len({round(line["width"]) for line in bars}) == 1, f"{where}: bar rows of unequal width {bars}"
    assert all(line["rows"] == 1 for line in chart["lines"]), f"{where}: a line wrapped: {chart['lines']}"
    assert chart["overflow"] <= 0, f"{where}: {chart['overflow']} px of the chart hidden by overflow"
    assert chart["left"] >= 0 and chart["right"] <= chart["viewport"], f"{where}: the chart leaves the screen"


def billed(simulator: Any, marker: str) -> Decimal:
    """What the simulator billed for the one chat completion whose last message holds `marker`."""
    (spend,) = [
        g.spend
        for g in simulator.generations.values()
        if g.task is None and marker in json.dumps(g.request_body.get("messages", [])[-1:])
    ]
    result: Decimal = spend
    return result


def total(amounts: Iterable[Decimal]) -> Decimal:
    return sum(amounts, Decimal(0))


def test_a_person_sees_exact_usage_in_the_browser(
    chromium: webdriver.Chrome,
    openwebui: OpenWebUIServer,
    admin: OpenWebUIClient,
    simulator: Any,
    installed: None,
    plugin: types.ModuleType,
) -> None:
    def usd(amount: Decimal) -> str:
        return str(plugin.format_usd(int(amount * 10**12)))

    page = OpenWebUIPage(chromium, openwebui.url)
    skip_release_notes(admin)

    # 1-2. The admin signs in through the login form and chats twice in one chat.
    page.sign_in(openwebui.admin_email, openwebui.admin_password, chat_with=MODEL)
    markers = [f"browser-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    first = page.send(f"What is a ledger? {markers[0]}")
    second = page.send(f"And what is a rollup? {markers[1]}")

    # 3. Each usage line is visible and shows the answer's cost, then the chat's total, as billed.
    costs = [billed(simulator, marker) for marker in markers]
    ledger = ledger_spend(plugin)
    assert [ledger[first], ledger[second]] == [(admin.user["id"], cost) for cost in costs]
    for message_id, cost, chat_total in ((first, costs[0], costs[0]), (second, costs[1], total(costs))):
        line = page.status_line(message_id)
        assert line is not None and line.is_displayed()
        text = line.text
        assert usd(cost) in text and usd(chat_total) in text, text
        assert text.index(usd(cost)) <= text.rindex(usd(chat_total)), f"the cost comes first: {text}"
    assert usd(costs[1]) != usd(total(costs))  # so the second line really shows two figures

    # 4. A second user, with a month of history before today (as `make demo SEED_HISTORY=1`).
    email, password = f"bea-{uuid.uuid4().hex[:6]}@example.com", "bea-password-e2e"
    bea_id = admin.add_user("Bea Browser", email, password)["id"]
    assert seed_history(plugin.resolve_database_url(""), [(bea_id, "Bea Browser")]) > 0

    # 5. The function's settings panel opens with the last 30 days as a chart, its total and busiest
    #    day in words, at both widths; then the report's tables, holding the ledger's spend.
    days = spend_by_utc_day(plugin)
    busiest = max(days, key=days.__getitem__)  # the earliest of equals, as the panel
    words = [
        "Spend by day, last 30 days (UTC)",
        f"{usd(total(days.values()))} in total; the busiest day was {busiest} with {usd(days[busiest])}",
        f"today so far {usd(days[next(reversed(days))])}",
    ]
    for width, height, mobile in WIDTHS:
        page.viewport(width, height, mobile=mobile)
        panel = page.open_function_valves(FUNCTION_ID)
        assert_the_chart_is_seen(page, panel, words, f"the panel at {width} px")
        page.close_dialog()
    page.reset_viewport()
    panel = page.open_function_valves(FUNCTION_ID)
    tables = panel.find_elements(By.TAG_NAME, "table")
    assert tables, "the report renders as Markdown tables"
    all_spend = total(spend for _, spend in ledger_spend(plugin).values())
    assert usd(all_spend) in " ".join(table.text for table in tables)
    page.close_dialog()

    # 6. The second, ordinary user chats once and reads only their own figures, their own chart
    #    and, with a budget, how much of it is used and how much of the month has passed.
    page.sign_out()
    page.sign_in(email, password, chat_with=MODEL)
    marker = f"browser-user-{uuid.uuid4().hex[:8]}"
    theirs = page.send(f"What does a ledger cost? {marker}")
    own = billed(simulator, marker)
    ledger = ledger_spend(plugin)
    assert ledger[theirs] == (bea_id, own)
    line = page.status_line(theirs)
    assert line is not None and line.is_displayed() and usd(own) in line.text

    with OpenWebUIClient.login(openwebui.url, email, password) as bea:
        spec = bea.get_user_valves_spec(FUNCTION_ID)
    assert spec is not None
    hers = spend_by_utc_day(plugin, bea_id)
    # Everyone else's spend, and everyone's: figures her read-out must not show.
    others = {
        usd(total(spend for user, spend in ledger.values() if user != bea_id)),
        usd(total(spend for _, spend in ledger.values())),
        usd(total(days.values())),
    }
    assert usd(own) not in others and usd(total(hers.values())) not in others
    admin.update_valves(FUNCTION_ID, {"budgets": f"user {email}: $50 per month"}, merge=True)
    try:
        readout = page.open_user_valves(FUNCTION_ID)
        for valve in spec["properties"].values():  # a read-out kept in a dropdown shows once custom
            if (valve.get("input") or {}).get("options"):
                page.customize(page.valve_row(readout, valve["title"]))
        for width, height, mobile in WIDTHS:
            page.viewport(width, height, mobile=mobile)
            page.open_chat(page.chat_id())
            readout = page.open_user_valves(FUNCTION_ID)
            shown = readout.get_attribute("textContent") or ""
            assert usd(own) in shown, shown
            assert not [figure for figure in others if figure in shown], shown
            assert_the_chart_is_seen(
                page,
                readout,
                [
                    f"Last 30 days: {usd(total(hers.values()))} in total",
                    f"today so far {usd(own)}",
                    "Days in UTC",
                    "budget used",
                    "month passed",
                    "of the month passed",
                ],
                f"her read-out at {width} px",
            )
    finally:
        admin.update_valves(FUNCTION_ID, {"budgets": ""}, merge=True)
        page.reset_viewport()
