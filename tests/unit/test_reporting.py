"""The admin report (panel and CLI share it), the per-user read-out, and their formatting."""

from __future__ import annotations

import types
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.factories import make_record, write

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("usd", "text"),
    [
        ("0", "$0.00"),
        ("0.0042", "$0.0042"),
        ("0.0123", "$0.0123"),
        ("0.00002415", "$0.000024"),
        ("0.4567", "$0.4567"),
        ("12.345", "$12.34"),  # banker's rounding at the cent
        ("1234.5", "$1,234.50"),
    ],
)
def test_money_has_sensible_precision(plugin: types.ModuleType, usd: str, text: str) -> None:
    assert plugin.format_usd(int(Decimal(usd) * 10**12)) == text


@pytest.mark.parametrize(
    "hostile",
    [
        "[click](https://evil.example)",
        "<img src=x onerror=alert(1)>",
        "a | b\n| c |",
        "**bold** `code` ![i](x)",
        "https://evil.example",
        "user@example.com",
    ],
)
def test_user_controlled_text_cannot_form_markdown(plugin: types.ModuleType, hostile: str) -> None:
    escaped = plugin.escape_markdown(hostile)
    assert "\n" not in escaped
    for char in "[]()<>|`*!@:":
        assert all(escaped[i - 1] == "\\" for i, c in enumerate(escaped) if c == char)


def records_for_report(plugin: types.ModuleType) -> list[Any]:
    records = []
    for index, (days_ago, user) in enumerate(
        [(0, "a"), (0, "b"), (3, "a"), (10, "c"), (40, "a"), (400, "b")]
    ):
        records.append(
            make_record(
                plugin,
                index,
                user_id=f"u-{user}",
                user_name=f"Name {user}",
                created_at=NOW - timedelta(days=days_ago, hours=1),
            )
        )
    return records


def test_report_periods_tops_and_location_are_exact(plugin: types.ModuleType, database_url: str) -> None:
    records = records_for_report(plugin)
    write(plugin, database_url, records)
    report = plugin.build_usage_report(plugin.ledger_for(database_url), ZoneInfo("UTC"), 10, now=NOW)

    def spend(days: int | None) -> int:
        return sum(
            r.usage.spend_pico for r in records if days is None or NOW - r.created_at < timedelta(days=days)
        )

    assert report.periods["today"].spend_pico == spend(1)
    assert report.periods["today"].requests == 2
    assert report.periods["last_7_days"].spend_pico == spend(7)
    assert report.periods["last_30_days"].spend_pico == spend(30)
    assert report.periods["all_time"].spend_pico == spend(None)
    assert report.periods["all_time"].requests == 6
    top = {u.user_id: u for u in report.top_users}
    assert set(top) == {"u-a", "u-b", "u-c"}
    assert top["u-a"].spend_pico == sum(r.usage.spend_pico for r in records[:3] if r.user_id == "u-a")
    assert [u.spend_pico for u in report.top_users] == sorted(
        (u.spend_pico for u in report.top_users), reverse=True
    )
    assert report.last_written_at == max(r.created_at for r in records)
    assert report.health.location == plugin.masked_url(database_url)
    markdown = plugin.render_report_markdown(report)
    assert plugin.format_usd(spend(None)) in markdown and "Name a" in markdown


def test_the_ledger_location_is_shown_with_its_password_masked(plugin: types.ModuleType) -> None:
    assert plugin.masked_url("postgresql+psycopg://ledger:s3cret@db:5432/owui") == (
        "postgresql+psycopg://ledger:***@db:5432/owui"
    )


def test_the_panel_report_follows_the_saved_valves(plugin: types.ModuleType, data_dir: Path) -> None:
    url = f"sqlite:///{data_dir / 'custom.sqlite3'}"
    write(plugin, url, [make_record(plugin, 1, created_at=datetime.now(UTC))])
    plugin.Filter.Valves(database_url=url, report_rows=3)  # what Open WebUI builds on save and per hook
    description = plugin.Filter.Valves.model_json_schema()["properties"]["usage_report"]["description"]
    assert (
        description.startswith("Read-only, computed when this panel opens: ")
        and "| Today |" in description
        and "custom.sqlite3" in description
    )
    # A restart forgets the process memory; the settings file remembers.
    assert plugin.SettingsFile().recall()["database_url"] == url


def test_an_unreadable_ledger_still_opens_the_panel_with_one_line(plugin: types.ModuleType) -> None:
    plugin.Filter.Valves(database_url="postgresql://nobody:pw@127.0.0.1:1/none")
    description = plugin.Filter.Valves.model_json_schema()["properties"]["usage_report"]["description"]
    assert description.startswith("Usage report unavailable:")
    assert "\n" not in description and "pw@" not in description


def test_a_user_sees_only_their_own_figures(plugin: types.ModuleType, database_url: str) -> None:
    now = datetime.now(UTC)
    mine = [make_record(plugin, i, user_id="me", created_at=now) for i in range(3)]
    theirs = [
        make_record(plugin, 10 + i, user_id="other", user_name="Other Person", created_at=now)
        for i in range(2)
    ]
    write(plugin, database_url, mine + theirs)
    plugin.Filter.Valves(database_url=database_url)
    options = plugin.Filter.UserValves.my_usage_options(__user__={"id": "me", "name": "Me"})
    text = " ".join(option["label"] for option in options)
    assert f"Today: {plugin.format_usd(sum(r.usage.spend_pico for r in mine))} · 3 requests" in text
    assert "Other" not in text and plugin.format_usd(sum(r.usage.spend_pico for r in theirs)) not in text
    single = plugin.Filter.UserValves.my_usage_options(__user__={"id": "other"})[0]["label"]
    assert " · 2 requests · " in single and plugin.count_of(1, "request") == "1 request"


def test_breakdowns_sum_to_the_period_total(plugin: types.ModuleType, database_url: str) -> None:
    records = records_for_report(plugin)
    write(plugin, database_url, records)
    ledger = plugin.ledger_for(database_url)
    expected = sum(r.usage.spend_pico for r in records if NOW - r.created_at < timedelta(days=30))
    for by in ("user", "model", "day", "provider"):
        rows = plugin.build_usage_report(ledger, None, 10, now=NOW, breakdown=(by, "30d")).breakdown
        assert sum(Decimal(row["spend_usd"]) for row in rows) * 10**12 == expected


def test_valve_titles_are_short_enough_for_a_phone(plugin: types.ModuleType) -> None:
    """At 390 px Open WebUI squeezes a long title's Default button ("Defa/ult")."""
    for model in (plugin.Filter.Valves, plugin.Filter.UserValves):
        titles = {name: field.title or name for name, field in model.model_fields.items()}
        assert all(len(title) <= 24 for title in titles.values()), titles
