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


@pytest.mark.parametrize(
    ("text", "code", "rate", "rate_date"),
    [
        ("", "USD", "1", None),
        ("USD", "USD", "1", None),
        ("EUR 0.92", "EUR", "0.92", None),
        ("  eur   0.920  2026-11-29 ", "EUR", "0.92", "2026-11-29"),
        ("CHF 0.8812345", "CHF", "0.8812345", None),
    ],
)
def test_the_display_currency_is_a_code_a_rate_per_usd_and_an_optional_date(
    plugin: types.ModuleType, text: str, code: str, rate: str, rate_date: str | None
) -> None:
    currency = plugin.parse_display_currency(text)
    assert (currency.code, currency.rate, currency.problem) == (code, Decimal(rate), "")
    assert currency.rate_date == (datetime.fromisoformat(rate_date).date() if rate_date else None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("EUR", "no rate per USD for EUR"),
        ("EUR 0,92", "the rate is not a number"),
        ("EUR NaN", "the rate is not a number"),
        ("EUR 0", "the rate must be above 0"),
        ("EUR -0.92", "the rate must be above 0"),
        ("EUR 1e7", "at most 1,000,000 per USD"),
        ("EUR 0.1234567890123456", "at most 1,000,000 per USD"),  # more digits than are multiplied exactly
        ("EURO 0.92", "expected a currency code"),
        ("€ 0.92", "expected a currency code"),
        ("USD 0.9", "USD's rate per USD is 1"),
        ("EUR 0.92 29/11/2026", "the date must be YYYY-MM-DD"),
        ("EUR 0.92 2026-11-29 today", "the date must be YYYY-MM-DD"),
    ],
)
def test_a_malformed_display_currency_is_usd_with_the_problem_named(
    plugin: types.ModuleType, text: str, problem: str
) -> None:
    currency = plugin.parse_display_currency(text)
    assert problem in currency.problem
    assert (currency.code, currency.rate, currency.text) == ("USD", 1, text)
    assert currency.format(1_005 * 10**9) == plugin.format_usd(1_005 * 10**9)


def test_conversion_is_exact_and_only_the_text_is_rounded(plugin: types.ModuleType) -> None:
    eur = plugin.parse_display_currency("EUR 0.92")
    # $1.005 shows as $1.00 (half-even); converting the exact amount gives €0.9246, not 0.92 x $1.00.
    assert plugin.format_usd(1_005_000_000_000) == "$1.00"
    assert eur.format(1_005_000_000_000) == "€0.9246"
    assert eur.format(1_234_500_000_000) == "€1.14" and eur.format(0) == "€0.00"
    assert plugin.parse_display_currency("GBP 0.79").format(10**12) == "£0.7900"
    assert plugin.parse_display_currency("JPY 155.5").format(10**13) == "JPY 1,555.00"
    # The largest sum a ledger column holds, at a rate with the most digits allowed: exact.
    most = 2**63 - 1
    odd = plugin.parse_display_currency("XAU 0.000412345678901")
    assert odd.convert(most) == Decimal(f"{most * 412345678901}E-27")
    assert odd.format(most) == f"XAU {Decimal(f'{most * 412345678901}E-27').quantize(Decimal('0.01')):,}"


def test_the_panel_report_shows_money_in_the_display_currency_with_its_rate(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    url = f"sqlite:///{data_dir / 'ledger.sqlite3'}"
    records = [make_record(plugin, i, created_at=datetime.now(UTC)) for i in range(3)]
    write(plugin, url, records)
    total = sum(r.usage.spend_pico for r in records)

    def panel(display_currency: str) -> str:
        plugin.Filter.Valves(database_url=url, display_currency=display_currency)
        description: str = plugin.Filter.Valves.model_json_schema()["properties"]["usage_report"][
            "description"
        ]
        return description

    def all_time(report: str) -> str:
        return next(line for line in report.splitlines() if line.startswith("| All time |"))

    dated = panel("EUR 0.92 2026-11-29")
    assert (
        "Amounts in EUR at 0.92 EUR per USD (rate of 2026-11-29); the ledger, the export and the CLI" in dated
    )
    assert all_time(dated).startswith(
        f"| All time | {plugin.parse_display_currency('EUR 0.92').format(total)} |"
    )
    assert "$" not in dated.split("**Top models")[0]
    undated = panel("EUR 0.92")
    assert (
        "(as set by the admin)" in undated
        and "Add the rate's date to the valve: `EUR 0.92 YYYY-MM-DD`" in undated
    )
    broken = panel("EUR 0,92")
    assert (
        f"Display currency {plugin.escape_markdown('EUR 0,92')} not understood (the rate is not a number): "
        "amounts are in USD." in broken
    )
    assert all_time(broken).startswith(f"| All time | {plugin.format_usd(total)} |")
    assert "Amounts in" not in panel("USD") and "not understood" not in panel("USD")


def test_a_user_reads_their_figures_in_the_always_shown_description(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    """As Open WebUI 0.12.4 builds a user's valves spec: UserValves.schema(), then the options
    method with __user__, on the same dicts (docs/contract.md, a user's valves spec)."""
    url = f"sqlite:///{data_dir / 'ledger.sqlite3'}"
    now = datetime.now(UTC)
    mine = [make_record(plugin, i, user_id="me", created_at=now) for i in range(2)]
    write(plugin, url, [*mine, make_record(plugin, 9, user_id="other", created_at=now)])
    plugin.Filter.Valves(database_url=url, display_currency="EUR 0.92 2026-11-29")
    eur = plugin.parse_display_currency("EUR 0.92")
    spend = eur.format(sum(r.usage.spend_pico for r in mine))
    tokens = plugin.count_of(sum(r.usage.total_tokens for r in mine), "token")

    def spec_for(user: dict[str, Any]) -> dict[str, Any]:
        schema: dict[str, Any] = plugin.Filter.UserValves.model_json_schema()
        options = plugin.Filter.UserValves.my_usage_options(__user__=user)
        readout: dict[str, Any] = schema["properties"]["my_usage"]
        return readout | {"input": readout["input"] | {"options": options}}

    readout = spec_for({"id": "me"})
    assert readout["input"]["type"] == plugin.READ_ONLY_INPUT, "no control: nothing to click or type"
    items, chart, note = readout["description"].split("\n\n")
    assert items == (
        f"- **Today:** {spend} · 2 requests · {tokens}\n"
        f"- **This month:** {spend} · 2 requests · {tokens}\n"
        f"- **Last 30 days:** {spend} in total; the busiest day was {now.date().isoformat()} with {spend}; "
        f"today so far {spend}; 29 days without spend. Days in UTC."
    )
    chart_lines = chart.splitlines()
    assert chart_lines[0] == "```text" and chart_lines[-1] == "```"
    assert chart_lines[1].startswith(f"{spend} ┤") and chart_lines[-2].endswith("today ▒")
    assert [line[-1] for line in chart_lines[1:6]] == ["▒"] * 5, "all of her spend is today's"
    assert note == "Converted from USD at 0.92 EUR per USD (rate of 2026-11-29)."
    assert readout["input"]["options"][0]["label"] == f"Today: {spend} · 2 requests · {tokens}"
    other = spec_for({"id": "other"})["description"]
    assert " · 1 request · " in other and spend not in other
    assert "not signed in" in spec_for({})["description"]
    # Without a spec being built (another caller), the options method answers and writes nowhere.
    assert plugin.Filter.UserValves.my_usage_options(__user__={"id": "me"})[1]["label"].startswith(
        "This month:"
    )
    # What the Default/Custom button leaves in the field is never stored.
    assert plugin.Filter.UserValves(my_usage="today").model_dump(exclude_unset=True) == {}


def test_the_report_field_shows_no_control_and_what_is_typed_is_never_stored(
    plugin: types.ModuleType,
) -> None:
    report = plugin.Filter.Valves.model_json_schema()["properties"]["usage_report"]
    # Open WebUI 0.12.4 draws a text box for a string without an input type, and a control for
    # these input types; for any other, only the title, the Default/Custom button and the description.
    assert report["type"] == "string" and report["input"]["type"] not in {
        "password",
        "select",
        "color",
        "map",
    }
    assert "enum" not in report and "usage_report" not in plugin.Filter.Valves.model_json_schema().get(
        "required", []
    )
    assert plugin.Filter.Valves(usage_report="typed anyway").model_dump(exclude_unset=True) == {}


def records_over_a_month(plugin: types.ModuleType) -> list[Any]:
    """Completions on 35 days before NOW and today, with days left out (gaps the chart must keep),
    several per day at hours that fall on other dates in far-off zones."""
    records = []
    for index in range(160):
        days_ago = (index * 7) % 36
        if days_ago in (4, 5, 17):
            continue
        records.append(
            make_record(plugin, index, created_at=NOW - timedelta(days=days_ago, hours=(index * 5) % 12))
        )
    return records


def per_day(records: list[Any], days: list[str], zone: ZoneInfo, **match: str) -> list[int]:
    """Each day's spend of the records matching `match` (attribute: value), by date in `zone`."""
    return [
        sum(
            r.usage.spend_pico
            for r in records
            if r.created_at.astimezone(zone).date().isoformat() == day
            and all(getattr(r, key) == value for key, value in match.items())
        )
        for day in days
    ]


@pytest.mark.parametrize("zone_name", ["UTC", "Pacific/Kiritimati"])
def test_the_chart_holds_each_of_the_last_30_days_exactly_days_without_spend_included(
    plugin: types.ModuleType, database_url: str, zone_name: str
) -> None:
    """The rollups are kept in UTC; in another zone the report counts from the rows (the
    existing path), and the chart's days are that zone's, as the period rows'."""
    records = records_over_a_month(plugin)
    write(plugin, database_url, records)
    zone = ZoneInfo(zone_name)
    report = plugin.build_usage_report(plugin.ledger_for(database_url), zone, 10, now=NOW)
    today = NOW.astimezone(zone).date()
    days = [(today - timedelta(days=29 - n)).isoformat() for n in range(30)]
    expected = per_day(records, days, zone)
    daily = report.daily
    assert (daily.zone, list(daily.days)) == (zone_name, days)
    assert list(daily.spend_pico) == expected
    assert list(daily.requests) == [
        sum(1 for r in records if r.created_at.astimezone(zone).date().isoformat() == day) for day in days
    ]
    assert 0 in expected and expected[-1] > 0, "the fixture has days without spend, and today"
    assert daily.total_pico == report.periods["last_30_days"].spend_pico
    assert daily.spend_pico[-1] == report.periods["today"].spend_pico
    assert [s.spend_pico for s in report.daily_top_users] == [
        tuple(per_day(records, days, zone, user_id=u.user_id)) for u in report.top_users[:3]
    ]
    assert [s.spend_pico for s in report.daily_top_models] == [
        tuple(per_day(records, days, zone, served_model=m.served_model, provider=m.provider))
        for m in report.top_models[:3]
    ]
    busiest = max(range(30), key=lambda n: (expected[n], -n))
    markdown = plugin.render_report_markdown(report)
    assert f"**Spend by day, last 30 days ({zone_name})**" in markdown
    assert (
        f"Last 30 days ({days[0]} to {days[-1]}, days in {zone_name}): {plugin.format_usd(sum(expected))} "
        f"in total; the busiest day was {days[busiest]} with {plugin.format_usd(expected[busiest])}; "
        f"today so far {plugin.format_usd(expected[-1])}; {expected.count(0)} days without spend."
    ) in markdown
    assert "```text\n" + "\n".join(plugin.daily_chart_lines(daily, plugin.format_usd)) + "\n```" in markdown


def test_the_chart_draws_a_bar_per_day_with_today_shaded_and_the_scale_in_the_display_currency(
    plugin: types.ModuleType,
) -> None:
    dollar = 10**12
    spend = [0] * 30
    spend[3], spend[10], spend[20], spend[29] = 8 * dollar, 4 * dollar, dollar // 1000, 2 * dollar
    days = tuple(f"2026-11-{n:02d}" for n in range(1, 31))
    daily = plugin.DailySpend("UTC", days, tuple(spend), tuple(1 if s else 0 for s in spend))
    eur = plugin.parse_display_currency("EUR 0.92")
    lines = plugin.daily_chart_lines(daily, eur.format)
    bars, axis, dates = lines[:8], lines[8], lines[9]
    assert bars[0].startswith("€7.36 ┤") and axis.startswith("€0.00 └"), "the scale in euros: 8 USD at 0.92"
    margin = len("€7.36 ┤")
    assert {len(line) for line in bars} == {margin + 30} and axis == "€0.00 └" + "─" * 30

    def column(day: int) -> str:
        return "".join(line[margin + day] for line in bars)  # top to bottom

    assert column(3) == "█" * 8, "the busiest day fills the scale"
    assert column(10) == " " * 4 + "█" * 4, "half the busiest: half the height"
    assert column(20) == " " * 7 + "▁", "a little spend still shows"
    assert all(column(day) == " " * 8 for day in range(29) if not spend[day]), "a day without spend is empty"
    assert column(29) == " " * 6 + "▒" * 2, "today is shaded: not over yet"
    assert dates.startswith(" " * margin + "11-01") and dates.endswith("11-30 today ▒")
    assert len(dates) == margin + 30, "the shaded mark sits under today's bar"
    assert plugin.daily_figures_text(daily, eur.format) == (
        "€12.88 in total; the busiest day was 2026-11-04 with €7.36; today so far €1.84; "
        "26 days without spend."
    )
    wide = plugin.daily_chart_lines(daily, eur.format, bar_width=3)
    assert wide[0][margin + 9 : margin + 12] == "███" and len(wide[0]) == margin + 90
    empty = plugin.DailySpend("UTC", days, (0,) * 30, (0,) * 30)
    assert plugin.daily_figures_text(empty, plugin.format_usd) == "no spend."
    assert all(
        set(line[len("$0.00 ┤") :]) <= {" "}
        for line in plugin.daily_chart_lines(empty, plugin.format_usd)[:8]
    )


def test_a_name_cannot_close_the_code_block(plugin: types.ModuleType) -> None:
    block = plugin.code_block(["```", "a ```` b"])
    assert block.startswith("`````text\n") and block.endswith("\n`````")


def test_a_users_budget_says_how_much_is_used_and_how_much_of_its_period_has_passed(
    plugin: types.ModuleType, database_url: str
) -> None:
    now = datetime(2026, 11, 16, 0, 0, tzinfo=UTC)  # 15 of November's 30 days have passed
    mine = [
        make_record(
            plugin, i, user_id="me", usage=plugin.Usage(cost_pico=10**12), created_at=now - timedelta(days=i)
        )
        for i in range(5)
    ]
    write(
        plugin,
        database_url,
        [*mine, make_record(plugin, 9, user_id="me", created_at=now - timedelta(days=20))],
    )
    settings = plugin.Settings(budgets="default: $20 per month")
    budget = plugin.user_budget(plugin.ledger_for(database_url), settings, plugin.BudgetUser("me"), now=now)
    assert (budget.used_percent, budget.passed_percent) == (25, 50)  # $5 of $20; October's row not counted
    assert budget.text == (
        "Budget: $20.00 per month · spent $5.00 (25% used, 50% of the month passed) · remaining $15.00 · "
        "resets 1 December 2026 at 00:00 UTC"
    )
    assert budget.bar_lines() == [
        "budget used  │█████               │ 25%",
        "month passed │██████████          │ 50%",
    ]
    unlimited = plugin.Settings(budgets="user me: unlimited")
    assert (
        plugin.user_budget(plugin.ledger_for(database_url), unlimited, plugin.BudgetUser("me")).bar_lines()
        == []
    )


def test_a_budget_period_across_a_daylight_saving_change_passes_in_real_hours(
    plugin: types.ModuleType,
) -> None:
    paris = ZoneInfo("Europe/Paris")
    window = plugin.budget_window("day", datetime(2026, 3, 29, 12, 0, tzinfo=paris), paris)
    # 29 March 2026 has 23 hours in Paris; at noon 11 have passed.
    assert plugin.window_passed_percent(window, datetime(2026, 3, 29, 12, 0, tzinfo=paris)) == 1100 // 23
