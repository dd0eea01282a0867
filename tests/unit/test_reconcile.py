"""Reconciliation with OpenRouter's bill: every status transition and backoff path, with time
controlled (a fake clock whose sleep advances it), and the lease that keeps it to one process."""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tests.factories import make_record, write
from tests.unit.rollup_checks import scan_rollups, stored_rollups

START = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class FakeClock:
    """Epoch seconds that only move when something sleeps (or the test advances them)."""

    def __init__(self, moment: datetime) -> None:
        self.now = moment.timestamp()
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeAccount:
    """OpenRouter as a script: for each generation id, the answers to give in turn (the last one
    repeats); every lookup is counted."""

    fingerprint = "fake-key"

    def __init__(self, plugin: types.ModuleType, answers: Mapping[str, list[Any]], key: Any = None) -> None:
        self.plugin = plugin
        self.answers = {gid: list(script) for gid, script in answers.items()}
        self.key_answer = key if key is not None else plugin.Lookup("found", {"usage_daily": 0})
        self.looked_up: list[str] = []

    def generation(self, generation_id: str) -> Any:
        self.looked_up.append(generation_id)
        script = self.answers.get(generation_id) or [self.plugin.Lookup("not_ready")]
        return script.pop(0) if len(script) > 1 else script[0]

    def key(self) -> Any:
        return self.key_answer

    def close(self) -> None:
        pass


def billed(plugin: types.ModuleType, total_usd: str, **extra: Any) -> Any:
    """A found lookup: OpenRouter's record with this total cost."""
    data = {
        "total_cost": Decimal(total_usd),
        "upstream_inference_cost": None,
        "is_byok": False,
        "native_tokens_prompt": 10,
        "native_tokens_completion": 5,
        "provider_name": "OpenAI",
        "cancelled": False,
    } | extra
    return plugin.Lookup("found", data)


def usd_pico(text: str) -> int:
    return int(Decimal(text).scaleb(12))


def ledger_row(plugin: types.ModuleType, url: str, message_id: str) -> dict[str, Any]:
    with plugin.ledger_for(url).engine.connect() as conn:
        row = conn.execute(
            sa.select(plugin.ledger_table).where(plugin.ledger_table.c.message_id == message_id)
        ).one()
        return dict(row._mapping)


def record(
    plugin: types.ModuleType, index: int, cost_usd: str, ids: tuple[str, ...] | None = None, **kw: Any
) -> Any:
    """A ledger record created at START with this cost (not BYOK)."""
    usage = plugin.Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cost_pico=usd_pico(cost_usd))
    return make_record(
        plugin,
        index,
        usage=usage,
        status="ok",
        error="",
        created_at=START,
        generation_ids=ids if ids is not None else (f"gen-{index}",),
        **kw,
    )


def reconciler(
    plugin: types.ModuleType, url: str, account: FakeAccount, clock: FakeClock, holder: str = "test"
) -> Any:
    return plugin.Reconciler(
        plugin.ledger_for(url), account, clock=clock, sleep=clock.sleep, holder=holder, lookups_per_second=5
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START + timedelta(seconds=10))


def test_a_row_billed_as_recorded_is_matched_and_the_export_shows_both_figures(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    write(plugin, database_url, [record(plugin, 1, "0.00012345")])
    account = FakeAccount(plugin, {"gen-1": [billed(plugin, "0.00012345")]})

    summary = reconciler(plugin, database_url, account, clock).run_pass()

    assert (summary.matched, summary.differs, summary.waiting) == (1, 0, 0)
    row = ledger_row(plugin, database_url, "msg-1")
    assert (row["reconcile_status"], row["billed_pico"]) == ("matched", usd_pico("0.00012345"))
    exported = next(plugin.export_rows(plugin.ledger_for(database_url)))
    assert (exported["billed_usd"], exported["spend_usd"], exported["reconcile_status"]) == (
        "0.00012345",
        "0.00012345",
        "matched",
    )


def test_a_row_billed_differently_differs_and_keeps_our_own_spend(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    write(plugin, database_url, [record(plugin, 1, "0.001"), record(plugin, 2, "0.002")])
    account = FakeAccount(plugin, {"gen-1": [billed(plugin, "0.0011")], "gen-2": [billed(plugin, "0.002")]})

    summary = reconciler(plugin, database_url, account, clock).run_pass()

    assert (summary.matched, summary.differs, summary.difference_pico) == (1, 1, usd_pico("0.0001"))
    row = ledger_row(plugin, database_url, "msg-1")
    assert (row["reconcile_status"], row["spend_pico"], row["billed_pico"]) == (
        "differs",
        usd_pico("0.001"),
        usd_pico("0.0011"),
    )


def test_byok_is_billed_as_total_cost_plus_the_upstream_charge(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    usage = plugin.Usage(cost_pico=usd_pico("0.00001"), upstream_cost_pico=usd_pico("0.0005"), is_byok=True)
    write(
        plugin, database_url, [make_record(plugin, 1, usage=usage, created_at=START, status="ok", error="")]
    )
    answer = billed(plugin, "0.00001", is_byok=True, upstream_inference_cost=Decimal("0.0005"))
    summary = reconciler(plugin, database_url, FakeAccount(plugin, {"gen-1": [answer]}), clock).run_pass()

    assert summary.matched == 1
    assert ledger_row(plugin, database_url, "msg-1")["billed_pico"] == usd_pico("0.00051")


def test_the_first_lookup_waits_a_few_seconds_after_the_completion(
    plugin: types.ModuleType, database_url: str
) -> None:
    write(plugin, database_url, [record(plugin, 1, "0.001")])
    clock = FakeClock(START + timedelta(seconds=1))
    account = FakeAccount(plugin, {"gen-1": [billed(plugin, "0.001")]})
    checker = reconciler(plugin, database_url, account, clock)

    assert checker.run_pass().looked_up == 0
    assert checker.next_due() == pytest.approx(START.timestamp() + plugin.FIRST_LOOKUP_DELAY_SECONDS)
    clock.advance(plugin.FIRST_LOOKUP_DELAY_SECONDS)
    assert checker.run_pass().matched == 1
    assert checker.next_due() is None


def drive_until_settled(checker: Any, clock: FakeClock, passes: int = 40) -> list[float]:
    """Run passes at each due time until nothing is pending; the waits between them."""
    waits: list[float] = []
    for _ in range(passes):
        checker.run_pass()
        due = checker.next_due()
        if due is None:
            return waits
        waits.append(due - clock())
        clock.now = max(clock.now, due)
    raise AssertionError("still pending after the passes allowed")


def test_a_generation_still_404_after_about_an_hour_of_doubling_backoff_is_not_found(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    write(plugin, database_url, [record(plugin, 1, "0.001")])
    account = FakeAccount(plugin, {"gen-1": [plugin.Lookup("not_ready")]})

    waits = drive_until_settled(reconciler(plugin, database_url, account, clock), clock)

    assert [round(w) for w in waits[:5]] == [5, 10, 20, 40, 80]
    assert max(waits) == plugin.BACKOFF_CAP_SECONDS
    assert 3_000 <= sum(waits) <= 5_400, "about an hour of backoff"
    assert len(account.looked_up) == plugin.GIVE_UP_ATTEMPTS
    row = ledger_row(plugin, database_url, "msg-1")
    assert (row["reconcile_status"], row["reconcile_attempts"]) == ("not_found", plugin.GIVE_UP_ATTEMPTS)


@pytest.mark.parametrize("reason", ["HTTP 500", "timeout", "malformed JSON"])
def test_server_errors_timeouts_and_malformed_answers_back_off_are_counted_and_finally_fail(
    plugin: types.ModuleType, database_url: str, clock: FakeClock, reason: str
) -> None:
    write(plugin, database_url, [record(plugin, 1, "0.001")])
    account = FakeAccount(plugin, {"gen-1": [plugin.Lookup("error", reason=reason)]})
    checker = reconciler(plugin, database_url, account, clock)

    checker.run_pass()
    row = ledger_row(plugin, database_url, "msg-1")
    assert (row["reconcile_status"], row["reconcile_error"], row["reconcile_attempts"]) == (
        "pending",
        reason,
        1,
    )
    drive_until_settled(checker, clock)

    row = ledger_row(plugin, database_url, "msg-1")
    assert (row["reconcile_status"], row["reconcile_error"]) == ("failed", reason)
    with plugin.ledger_for(database_url).engine.connect() as conn:
        state = plugin.read_meta_json(conn, plugin.RECONCILE_STATE_KEY)
    assert state["errors"] == {reason: plugin.GIVE_UP_ATTEMPTS}


def test_an_error_then_a_record_recovers_to_matched(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    write(plugin, database_url, [record(plugin, 1, "0.001")])
    script = [plugin.Lookup("error", reason="HTTP 502"), plugin.Lookup("not_ready"), billed(plugin, "0.001")]
    drive_until_settled(
        reconciler(plugin, database_url, FakeAccount(plugin, {"gen-1": script}), clock), clock
    )
    row = ledger_row(plugin, database_url, "msg-1")
    assert (row["reconcile_status"], row["reconcile_error"], row["reconcile_attempts"]) == ("matched", "", 2)


def test_429_waits_for_retry_after_before_the_next_request(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    write(plugin, database_url, [record(plugin, 1, "0.001")])
    script = [plugin.Lookup("slow_down", retry_after=7.0), billed(plugin, "0.001")]
    account = FakeAccount(plugin, {"gen-1": script})

    summary = reconciler(plugin, database_url, account, clock).run_pass()

    assert summary.matched == 1
    assert pytest.approx(7.0) in clock.slept
    assert summary.errors == {"HTTP 429": 1}
    assert ledger_row(plugin, database_url, "msg-1")["reconcile_attempts"] == 0, (
        "a 429 is not the row's fault"
    )


def test_a_rejected_key_stops_every_lookup_and_the_panel_says_so(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    write(plugin, database_url, [record(plugin, i, "0.001") for i in range(1, 4)])
    account = FakeAccount(plugin, {}, key=plugin.Lookup("rejected", reason="HTTP 401"))

    summary = reconciler(plugin, database_url, account, clock).run_pass()

    assert (summary.rejected, account.looked_up) == ("HTTP 401", [])
    ledger = plugin.ledger_for(database_url)
    report = plugin.build_usage_report(ledger, None, 5, now=START)
    view = plugin.read_reconciliation_view(ledger, report)
    markdown = plugin.render_reconciliation_markdown(
        view, "this function's settings", enabled=True, key_in_use=account.fingerprint
    )
    assert "**The key was rejected** (HTTP 401, 2026-11-29 12:00 UTC)" in markdown
    assert "3 waiting" in markdown
    another_key = plugin.render_reconciliation_markdown(view, "this function's settings", enabled=True)
    assert "rejected" not in another_key, "a rejection of the previous key is not shown for a new one"


@pytest.mark.parametrize("pasted", ["sk-or-v1-abc\ndef", "sk-or-v1-abc\u00a0def", "sk-or-v1-ключ"])
def test_a_malformed_key_is_never_used_and_the_panel_says_why(
    plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch, pasted: str
) -> None:
    monkeypatch.delenv(plugin.API_KEY_ENV, raising=False)
    settings = plugin.Settings(openrouter_api_key=pasted)
    key, source = plugin.openrouter_api_key(settings)
    assert (key, plugin.reconcile_config(settings)) == ("", None)
    markdown = plugin.render_reconciliation_markdown(None, source, enabled=True)
    assert "API key: this function's settings, but it is not a valid key" in markdown
    assert pasted not in markdown
    monkeypatch.setenv(plugin.API_KEY_ENV, pasted)
    assert plugin.openrouter_api_key(plugin.Settings())[0] == ""


def test_lookups_are_paced_to_the_rate(plugin: types.ModuleType, database_url: str, clock: FakeClock) -> None:
    write(plugin, database_url, [record(plugin, i, "0.001") for i in range(1, 11)])
    account = FakeAccount(plugin, {f"gen-{i}": [billed(plugin, "0.001")] for i in range(1, 11)})
    started = clock()

    summary = reconciler(plugin, database_url, account, clock).run_pass()

    assert summary.matched == 10
    # 11 requests (the key, then 10 lookups) at 5 per second: the last starts 2 s after the first.
    assert clock() - started == pytest.approx(2.0)


def test_a_generation_found_in_an_earlier_pass_is_never_looked_up_again(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    write(plugin, database_url, [record(plugin, 1, "0.003", ids=("gen-a", "gen-b"))])
    account = FakeAccount(
        plugin,
        {"gen-a": [billed(plugin, "0.001")], "gen-b": [plugin.Lookup("not_ready"), billed(plugin, "0.002")]},
    )
    drive_until_settled(reconciler(plugin, database_url, account, clock), clock)

    assert account.looked_up == ["gen-a", "gen-b", "gen-b"]
    row = ledger_row(plugin, database_url, "msg-1")
    assert (row["reconcile_status"], row["billed_pico"]) == ("matched", usd_pico("0.003"))
    assert set(json.loads(row["billed_json"])) == {"gen-a", "gen-b"}


def test_rows_without_an_openrouter_generation_id_are_not_checked(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    write(
        plugin,
        database_url,
        [record(plugin, 1, "0.001", ids=()), record(plugin, 2, "0.001", ids=("chatcmpl-x",))],
    )
    summary = reconciler(plugin, database_url, FakeAccount(plugin, {}), clock).run_pass()
    assert summary.looked_up == 0
    statuses = {ledger_row(plugin, database_url, f"msg-{i}")["reconcile_status"] for i in (1, 2)}
    assert statuses == {"no_id"}


def test_one_process_holds_the_lease_until_it_expires(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    write(plugin, database_url, [record(plugin, 1, "0.001")])
    ledger = plugin.ledger_for(database_url)
    now = datetime.fromtimestamp(clock(), UTC).replace(tzinfo=None)
    with ledger.writing() as conn:
        assert (
            plugin.hold_lease(conn, plugin.RECONCILE_LEASE, "worker-a", now, plugin.LEASE_SECONDS)
            == "worker-a"
        )
    account = FakeAccount(plugin, {"gen-1": [billed(plugin, "0.001")]})
    second = reconciler(plugin, database_url, account, clock, holder="worker-b")

    assert second.run_pass().busy == "worker-a"
    assert account.looked_up == []
    clock.advance(plugin.LEASE_SECONDS + 1)  # worker-a died: it stopped renewing
    assert second.run_pass().matched == 1
    with ledger.writing() as conn:  # released after the pass: the next process may take it at once
        assert plugin.hold_lease(conn, plugin.RECONCILE_LEASE, "worker-a", now, 1) == "worker-a"


def stopped_record(plugin: types.ModuleType, index: int, **kw: Any) -> Any:
    return make_record(
        plugin,
        index,
        usage=plugin.Usage(),
        status="stopped",
        error="",
        created_at=START,
        generation_ids=(f"gen-{index}",),
        raw_usage=None,
        **kw,
    )


def test_a_stopped_generation_is_priced_from_the_bill_and_the_rollups_follow(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    records = [stopped_record(plugin, 1), record(plugin, 2, "0.002")]
    write(plugin, database_url, records)
    ledger = plugin.ledger_for(database_url)
    before = plugin.build_usage_report(ledger, None, 5, now=START)
    assert before.periods["today"].spend_pico == usd_pico("0.002")
    view = plugin.read_reconciliation_view(ledger, before)
    assert view.unpriced_stopped == 1
    answer = billed(plugin, "0.0007", cancelled=True, native_tokens_prompt=300, native_tokens_completion=40)
    account = FakeAccount(plugin, {"gen-1": [answer], "gen-2": [billed(plugin, "0.002")]})

    summary = reconciler(plugin, database_url, account, clock).run_pass()

    assert (summary.priced_stopped, summary.matched) == (1, 2)
    row = ledger_row(plugin, database_url, "msg-1")
    assert (
        row["status"],
        row["cost_pico"],
        row["spend_pico"],
        row["prompt_tokens"],
        row["completion_tokens"],
    ) == (
        "stopped",
        usd_pico("0.0007"),
        usd_pico("0.0007"),
        300,
        40,
    )
    assert json.loads(row["billed_json"])["gen-1"]["cancelled"] is True
    after = plugin.build_usage_report(ledger, None, 5, now=START)
    assert after.periods["today"].spend_pico == usd_pico("0.0027")
    assert after.periods["today"].requests == 2
    assert after.periods["today"].failed == 0, "a stopped answer is not a failure"
    assert plugin.read_reconciliation_view(ledger, after).unpriced_stopped == 0
    assert scan_rollups(plugin, database_url, ZoneInfo("UTC")) == stored_rollups(plugin, database_url)


def test_the_key_is_sampled_and_the_panel_compares_each_utc_day_with_the_ledger(
    plugin: types.ModuleType, database_url: str, clock: FakeClock
) -> None:
    write(plugin, database_url, [record(plugin, 1, "0.001")])
    key = plugin.Lookup(
        "found",
        {
            "usage_daily": Decimal("0.0015"),
            "byok_usage_daily": Decimal(0),
            "limit": Decimal(25),
            "limit_remaining": Decimal("24.5"),
            "limit_reset": "monthly",
        },
    )
    account = FakeAccount(plugin, {"gen-1": [billed(plugin, "0.001")]}, key=key)
    reconciler(plugin, database_url, account, clock).run_pass()

    ledger = plugin.ledger_for(database_url)
    report = plugin.build_usage_report(ledger, None, 5, now=START)
    view = plugin.read_reconciliation_view(ledger, report)
    assert [(d.day, d.openrouter_pico, d.ledger_pico) for d in view.key_days] == [
        ("2026-11-29", usd_pico("0.0015"), usd_pico("0.001"))
    ]
    markdown = plugin.render_reconciliation_markdown(view, "$OPENROUTER_API_KEY", enabled=True)
    assert "| 2026-11-29 (to 12:00) | $0.0015 | $0.0010 | $0.00050 |" in markdown
    assert "Key limit (admins only): $24.50 remaining of $25.00, resets monthly." in markdown
    assert "API key: set ($OPENROUTER_API_KEY)." in markdown


def test_without_a_key_the_panel_says_so_in_one_line_and_how_stopped_answers_get_priced(
    plugin: types.ModuleType, database_url: str
) -> None:
    write(plugin, database_url, [stopped_record(plugin, 1)])
    ledger = plugin.ledger_for(database_url)
    report = plugin.build_usage_report(ledger, None, 5, now=START)
    markdown = plugin.render_reconciliation_markdown(
        plugin.read_reconciliation_view(ledger, report), "", enabled=True
    )
    assert "No OpenRouter API key" in markdown
    assert "1 stopped answer without a cost yet: set an OpenRouter API key above" in markdown


def test_the_reconcile_config_takes_the_valve_then_the_environment(
    plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(plugin.API_KEY_ENV, raising=False)
    assert plugin.reconcile_config(plugin.Settings()) is None
    monkeypatch.setenv(plugin.API_KEY_ENV, "sk-or-from-env")
    config = plugin.reconcile_config(plugin.Settings())
    assert (config.api_key, config.base_url) == ("sk-or-from-env", plugin.OPENROUTER_API_BASE)
    assert "sk-or" not in repr(config)
    assert plugin.openrouter_api_key(plugin.Settings(openrouter_api_key="sk-or-valve"))[1] == (
        "this function's settings"
    )
    assert plugin.reconcile_config(plugin.Settings(reconcile=False)) is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), (None, 10.0), ("banana", 10.0), ("99999", 300.0), ("Sun, 29 Nov 2026 12:00:30 GMT", 30.0)],
)
def test_retry_after_is_read_as_seconds_or_a_date(
    plugin: types.ModuleType, header: str | None, expected: float
) -> None:
    assert plugin.retry_after_seconds(header, START.timestamp()) == pytest.approx(expected)


def test_a_generation_record_without_a_total_cost_is_not_a_bill(plugin: types.ModuleType) -> None:
    assert plugin.parse_generation({"usage": 1}) is None
    assert plugin.parse_generation("nope") is None
    generation = plugin.parse_generation({"total_cost": 0.5, "tokens_prompt": 3, "provider_name": "X\u202e"})
    assert (generation.billed_pico, generation.prompt_tokens, generation.provider) == (
        usd_pico("0.5"),
        3,
        "X",
    )
