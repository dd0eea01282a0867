"""Spend budgets: the rules, their windows, admission with reservations in the ledger, the block's
message, the warning, the read-out, the report's Budgets section and `openrouter-usage budgets`."""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import threading
import time
import types
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
import sqlalchemy.orm

from tests.factories import EmitterRecorder, HookDriver, make_record, write

USD = 10**12  # pico-dollars per dollar
MODEL = "openai/gpt-4o-mini"
ALICE = {"id": "u-alice", "name": "Alice", "email": "alice@example.com", "role": "user"}
ADMIN = {"id": "u-admin", "name": "Root", "email": "root@example.com", "role": "admin"}


def spend(plugin: types.ModuleType, url: str, user_id: str, dollars: str, index: int, **fields: Any) -> None:
    """One recorded completion of `user_id` costing `dollars`, now unless `created_at` says otherwise."""
    cost = plugin.usd_to_pico(plugin.Decimal(dollars))
    record = make_record(
        plugin,
        index,
        user_id=user_id,
        model=fields.pop("model", MODEL),
        usage=plugin.Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cost_pico=cost),
        status="ok",
        error="",
        created_at=fields.pop("created_at", datetime.now(UTC)),
        **fields,
    )
    assert write(plugin, url, [record]) == ["recorded"]


def driver(
    plugin: types.ModuleType, url: str, budgets: str, user: dict[str, Any] = ALICE, **valves: Any
) -> HookDriver:
    return HookDriver(plugin, valves={"database_url": url, "budgets": budgets, **valves}, user=dict(user))


async def inlet(drv: HookDriver, metadata: dict[str, Any], model: str = MODEL) -> None:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    await drv.call("inlet", body, __user__=drv.user, __metadata__=metadata, __model__=drv.model)


def request_reservations(plugin: types.ModuleType, url: str) -> dict[str, int]:
    """Every reservation held, by its id (a request's own: `<message id>~<tag>`)."""
    with plugin.ledger_for(url).engine.connect() as conn:
        table = plugin.reservations_table
        return {row.reservation_id: row.amount_pico for row in conn.execute(sa.select(table))}


def reservations(plugin: types.ModuleType, url: str) -> dict[str, int]:
    """What is held per message (the reservations of its requests added up)."""
    held: dict[str, int] = {}
    for reservation_id, amount in request_reservations(plugin, url).items():
        message_id = reservation_id.split("~")[0]
        held[message_id] = held.get(message_id, 0) + amount
    return held


# ── rules ──


def test_the_issue_example_parses_into_five_rules(plugin: types.ModuleType) -> None:
    rules = plugin.parse_budget_rules(
        "default: $20 per month\n"
        "group Interns: $2 per day\n"
        "group Engineering: $150 per month\n"
        "user alice@example.com: $50 per week\n"
        "user bob@example.com: unlimited\n"
        "\n# a comment\n"
        "USER carol: 0.0001/Day"
    )
    assert rules.errors == ()
    assert [(r.line, r.label, r.limit_pico, r.period) for r in rules.rules] == [
        (1, "default", 20 * USD, "month"),
        (2, "group Interns", 2 * USD, "day"),
        (3, "group Engineering", 150 * USD, "month"),
        (4, "user alice@example.com", 50 * USD, "week"),
        (5, "user bob@example.com", None, "month"),
        (8, "user carol", 100_000_000, "day"),
    ]
    assert rules.rules[0].amount_text == "$20.00 per month"
    assert rules.rules[4].amount_text == "unlimited"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("default: $5 per fortnight", "line 1: 'per fortnight' is not a period (day, week or month)"),
        ("default: $5", "line 1: 'no period' is not a period (day, week or month)"),
        (
            "default: lots per day",
            "line 1: 'lots per day' is not an amount (write '$20 per month' or 'unlimited')",
        ),
        ("everyone: $5 per day", "line 1: 'everyone: $5 per day' is not a rule"),
        ("group: $5 per day", "line 1: 'group: $5 per day' is not a rule"),
        ("default extra: $5 per day", "line 1: 'default extra: $5 per day' is not a rule"),
        ("user alice $5 per day", "line 1: 'user alice $5 per day' is not a rule"),
        ("default: $2000000000 per day", "line 1: '$2000000000 per day' is more than any budget needs"),
    ],
)
def test_a_line_that_does_not_parse_is_named_with_its_reason_and_ignored(
    plugin: types.ModuleType, line: str, reason: str
) -> None:
    rules = plugin.parse_budget_rules(line + "\nuser x: $1 per day")
    assert len(rules.errors) == 1 and rules.errors[0].startswith(reason)
    assert [r.label for r in rules.rules] == ["user x"]  # the bad line never becomes a rule


def test_a_repeated_target_keeps_the_first_rule_and_names_the_second(plugin: types.ModuleType) -> None:
    rules = plugin.parse_budget_rules("group A: $1 per day\ngroup a: $9 per day")
    assert [r.line for r in rules.rules] == [1]
    assert rules.errors == ("line 2: repeats the rule for group a of line 1; ignored",)


def test_saving_bad_rules_never_fails(plugin: types.ModuleType) -> None:
    valves = plugin.Filter.Valves(budgets="nonsense\n: :\n$$$", budget_reservation_usd="abc")
    assert valves.model_dump(exclude_unset=True)["budgets"].startswith("nonsense")
    assert valves.budget_reservation_pico() == 5 * 10**10  # the default $0.05
    assert plugin.Filter.Valves(budget_reservation_usd="$0.2").budget_reservation_pico() == 2 * 10**11


RULES = (
    "default: $20 per month\ngroup Interns: $2 per day\ngroup Engineering: $150 per month\n"
    "user alice@example.com: $50 per week"
)


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({"user_id": "u1"}, "default"),  # no group
        ({"user_id": "u1", "groups": ("Interns",)}, "group Interns"),  # one group
        (
            {"user_id": "u1", "groups": ("interns", "Engineering", "Other")},
            "group Engineering",
        ),  # most generous
        ({"user_id": "u1", "groups": None}, "default"),  # groups unknown
        (
            {"user_id": "u1", "email": "ALICE@example.com", "groups": ("Engineering",)},
            "user alice@example.com",
        ),
        ({"user_id": "u1", "is_admin": True, "groups": ("Interns",)}, None),  # admins: unlimited
        ({"user_id": "u1", "email": "alice@example.com", "is_admin": True}, "user alice@example.com"),
    ],
)
def test_which_rule_applies(plugin: types.ModuleType, user: dict[str, Any], expected: str | None) -> None:
    rule = plugin.parse_budget_rules(RULES).rule_for(plugin.BudgetUser(**user))
    assert (rule.label if rule else None) == expected


def test_without_a_default_a_user_without_a_rule_is_unlimited_and_ties_go_to_the_first_line(
    plugin: types.ModuleType,
) -> None:
    rules = plugin.parse_budget_rules("group A: $7 per week\ngroup B: $1 per day\ngroup C: unlimited")
    assert rules.rule_for(plugin.BudgetUser("u")) is None
    assert (
        rules.rule_for(plugin.BudgetUser("u", groups=("B", "A"))).label == "group A"
    )  # $30 per 30 days each
    assert rules.rule_for(plugin.BudgetUser("u", groups=("A", "C"))).label == "group C"
    by_id = plugin.parse_budget_rules("user u-7: $3 per day").rule_for(plugin.BudgetUser("u-7", "x@y.z"))
    assert by_id.label == "user u-7"


# ── windows ──


@pytest.mark.parametrize(
    ("period", "now", "zone", "first", "resets"),
    [
        ("month", "2026-11-30T23:59:00+00:00", "UTC", "2026-11-01", "2026-12-01"),
        (
            "month",
            "2026-11-30T23:30:00+00:00",
            "Europe/Paris",
            "2026-12-01",
            "2027-01-01",
        ),  # already December
        ("month", "2026-12-01T02:00:00+00:00", "America/Los_Angeles", "2026-11-01", "2026-12-01"),
        ("month", "2028-02-29T12:00:00+00:00", "UTC", "2028-02-01", "2028-03-01"),  # 29 February
        ("month", "2027-01-31T12:00:00+00:00", "UTC", "2027-01-01", "2027-02-01"),  # the 31st
        ("day", "2028-02-29T12:00:00+00:00", "UTC", "2028-02-29", "2028-03-01"),
        ("day", "2026-12-31T23:00:00+00:00", "Asia/Tokyo", "2027-01-01", "2027-01-02"),
        ("week", "2026-11-29T12:00:00+00:00", "UTC", "2026-11-23", "2026-11-30"),  # a Sunday
        ("week", "2026-11-29T23:30:00+00:00", "Europe/Berlin", "2026-11-30", "2026-12-07"),  # Monday there
        ("week", "2028-03-01T00:00:00+00:00", "UTC", "2028-02-28", "2028-03-06"),  # across 29 February
    ],
)
def test_windows_are_calendar_ranges_in_the_report_zone(
    plugin: types.ModuleType, period: str, now: str, zone: str, first: str, resets: str
) -> None:
    window = plugin.budget_window(period, datetime.fromisoformat(now), ZoneInfo(zone))
    assert (window.first_day.isoformat(), window.resets_on.isoformat()) == (first, resets)
    last = (date.fromisoformat(resets) - timedelta(days=1)).isoformat()
    assert window.days[0] == first and window.days[-1] == last == window.last_day.isoformat()


def test_a_window_across_a_daylight_saving_change_starts_at_local_midnight(plugin: types.ModuleType) -> None:
    paris = ZoneInfo("Europe/Paris")
    # 25 October 2026: clocks go back (UTC+2 → UTC+1); the month began under summer time.
    window = plugin.budget_window("month", datetime(2026, 10, 26, 12, tzinfo=UTC), paris)
    assert window.starts_at == datetime(2026, 9, 30, 22, 0, tzinfo=UTC).replace(tzinfo=None)  # 00:00 at UTC+2
    assert len(window.days) == 31  # all of October, the day it is read on or not
    day = plugin.budget_window("day", datetime(2026, 3, 29, 12, tzinfo=UTC), paris)  # 23-hour day
    assert day.starts_at == datetime(2026, 3, 28, 23, 0, tzinfo=UTC).replace(tzinfo=None)
    assert day.resets_text == "30 March 2026 at 00:00 Europe/Paris"
    assert plugin.budget_window("month", datetime(2026, 11, 5, tzinfo=UTC), ZoneInfo("UTC")).resets_text == (
        "1 December 2026 at 00:00 UTC"
    )


# ── admission, reservations, the message ──


async def test_admission_holds_a_reservation_until_the_outlet_and_blocks_past_the_limit(
    plugin: types.ModuleType, database_url: str
) -> None:
    spend(plugin, database_url, "u-alice", "19.91", 1, model="other/model")  # no history on MODEL
    drv = driver(plugin, database_url, "default: $20 per month")
    first: dict[str, Any] = {"message_id": "m-1"}
    await inlet(drv, first)  # 19.91 + 0.05 <= 20
    assert reservations(plugin, database_url) == {"m-1": 5 * 10**10}
    with pytest.raises(plugin.BudgetBlocked) as blocked:  # 19.91 + 0.05 held + 0.05 > 20
        await inlet(drv, {"message_id": "m-2"})
    assert str(blocked.value).startswith(
        "Your budget of $20.00 per month would be exceeded by this request ($19.91 spent, $0.1000 held for "
        "answers in progress). It resets on "
    )
    assert str(blocked.value).endswith(" at 00:00 UTC. Ask an admin to raise it.")
    assert set(reservations(plugin, database_url)) == {"m-1"}
    # The outlet records the completion, then releases the reservation.
    outlet = {
        "model": MODEL,
        "id": "m-1",
        "chat_id": "c",
        "messages": [
            {"id": "m-1", "role": "assistant", "content": "ok", "usage": {"cost": 0.2, "prompt_tokens": 1}}
        ],
    }
    await drv.call("outlet", outlet, __user__=drv.user, __metadata__=first, __event_emitter__=None)
    assert reservations(plugin, database_url) == {}
    with pytest.raises(plugin.BudgetBlocked) as used_up:
        await inlet(drv, {"message_id": "m-3"})
    assert str(used_up.value).startswith(
        "Your budget of $20.00 per month is used up ($20.11 spent). It resets on 1 "
    )


def test_the_message_names_the_budget_the_spend_and_the_reset(plugin: types.ModuleType) -> None:
    rule = plugin.parse_budget_rules("default: $20 per month").rules[0]
    window = plugin.budget_window("month", datetime(2026, 11, 20, tzinfo=UTC), ZoneInfo("UTC"))
    standing = plugin.BudgetStanding("u", "u", rule, window, 0)
    admission = plugin.BudgetAdmission(False, plugin.usd_to_pico(plugin.Decimal("20.13")), 0, 1)
    assert plugin.budget_block_message(standing, admission) == (
        "Your budget of $20.00 per month is used up ($20.13 spent). "
        "It resets on 1 December 2026 at 00:00 UTC. Ask an admin to raise it."
    )


async def test_a_reservation_expires_and_a_used_up_budget_admits_nothing(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    ledger = plugin.ledger_for(url)
    zone = ZoneInfo("UTC")
    now = datetime.now(UTC)
    window = plugin.budget_window("day", now, zone)

    def ask(key: str, at: datetime, limit: int = USD) -> Any:
        return ledger.admit(plugin.AdmissionRequest(key, "u", MODEL, limit, window, 6 * 10**11, at))

    assert ask("a", now).admitted  # $0.60 of $1
    assert not ask("b", now).admitted  # 0.60 + 0.60 > 1
    later = now + timedelta(seconds=plugin.RESERVATION_TTL_SECONDS + 1)
    assert ask("b", later).admitted  # "a" lapsed
    assert set(reservations(plugin, url)) == {"b"}
    ledger.release_reservations(["b"])
    assert not ask("c", now, limit=0).admitted  # at least one pico is always reserved


def test_a_second_admission_waits_until_the_first_one_commits(
    plugin: types.ModuleType, database_url: str
) -> None:
    """Two admissions of one user at once: the second sees the first's reservation, never a state
    from before it (the write lock on SQLite, the per-user advisory lock on PostgreSQL)."""
    ledger = plugin.ledger_for(database_url)
    ledger.ensure_schema()
    now = datetime.now(UTC)
    window = plugin.budget_window("day", now, ZoneInfo("UTC"))

    def ask(key: str) -> Any:
        return plugin.AdmissionRequest(key, "u", MODEL, USD, window, 6 * 10**11, now)

    holding, results = threading.Event(), {}

    def first() -> None:
        with ledger._write_transaction() as conn:
            plugin._budget_lock(conn, "u")
            results["a"] = plugin.admit_in_transaction(conn, ask("a"))
            holding.set()
            time.sleep(0.5)  # the second admission starts meanwhile

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(10)
    results["b"] = ledger.admit(ask("b"))
    thread.join()
    assert results["a"].admitted and not results["b"].admitted
    assert results["b"].held_pico == 6 * 10**11


def test_an_admission_commits_without_waiting_for_the_disk_and_the_connection_then_does_again(
    plugin: types.ModuleType, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reservation lost in a crash only lapses early, so its commit skips the fsync (SQLite:
    synchronous=NORMAL; PostgreSQL: synchronous_commit off for that transaction); the ledger's
    other writes, on the same pooled connections, stay durable."""
    ledger = plugin.ledger_for(database_url)
    ledger.ensure_schema()
    sqlite = database_url.startswith("sqlite")
    durability = "PRAGMA synchronous" if sqlite else "SHOW synchronous_commit"
    seen: list[object] = []
    admit_in_transaction = plugin.admit_in_transaction

    def spy(conn: Any, request: Any) -> Any:
        seen.append(conn.exec_driver_sql(durability).scalar())
        return admit_in_transaction(conn, request)

    monkeypatch.setitem(vars(plugin), "admit_in_transaction", spy)
    now = datetime.now(UTC)
    window = plugin.budget_window("day", now, ZoneInfo("UTC"))
    assert ledger.admit(plugin.AdmissionRequest("a", "u", MODEL, USD, window, 1, now)).admitted
    with ledger._write_transaction() as conn:
        after = conn.exec_driver_sql(durability).scalar()
    assert (seen, after) == (([1], 2) if sqlite else (["off"], "on"))  # NORMAL = 1, FULL = 2


async def test_the_reservation_is_the_users_p95_for_the_model(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    for index in range(1, 21):  # $0.01 … $0.20
        spend(plugin, url, "u-alice", f"{index / 100:.2f}", index)
    spend(plugin, url, "u-alice", "5", 99, model="other/model")
    spend(plugin, url, "u-alice", "5", 98, created_at=datetime.now(UTC) - timedelta(days=31))
    drv = driver(plugin, url, "default: $1000 per month")
    await inlet(drv, {"message_id": "m"})
    assert reservations(plugin, url) == {"m": plugin.usd_to_pico(plugin.Decimal("0.19"))}  # nearest rank


def test_the_estimate_is_the_nearest_rank_p95_of_the_latest_completions_computed_in_sql(
    plugin: types.ModuleType, database_url: str
) -> None:
    """The admission statement's p95 is rank ceil(0.95 n) of the user's sorted spends on the model
    (n = 1, 2, 19, 20, 21, 39, ties), over the latest ESTIMATE_SAMPLE completions only; None
    without any."""
    rng = random.Random(7)
    cases = {  # user: (spends, expected p95)
        "one": ([7], 7),
        "two": ([9, 3], 9),
        "nineteen": (rng.sample(range(1, 20), 19), 19),  # 0.05 n = 0.95 is rounded down, not to 1
        "twenty": (rng.sample(range(1, 21), 20), 19),
        "twenty-one": (rng.sample(range(1, 22), 21), 20),
        "thirty-nine": (rng.sample(range(1, 40), 39), 38),  # 0.05 n = 1.95
        "ties": ([4] * 18 + [9] * 3, 9),
        "ties-below": ([100] + [2] * 20, 2),
        # Over all 1,060 the p95 would be 50; over the latest 1,000 it is 1.
        "sample": ([1] * plugin.ESTIMATE_SAMPLE + [50] * 60, 1),
    }
    now = datetime.now(UTC)
    records = [
        make_record(
            plugin,
            index * 2_000 + order,
            user_id=user,
            model=MODEL,
            usage=plugin.Usage(cost_pico=pico),
            status="ok",
            error="",
            created_at=now - timedelta(seconds=order),  # listed from the latest
        )
        for index, (user, (spends, _)) in enumerate(cases.items())
        for order, pico in enumerate(spends)
    ]
    assert set(write(plugin, database_url, records)) == {"recorded"}
    since = plugin._naive_utc(now) - timedelta(days=plugin.ESTIMATE_DAYS)
    with plugin.ledger_for(database_url).engine.connect() as conn:

        def estimate(user: str) -> int | None:
            parameters = {"user_id": user, "model": MODEL, "since": since}
            value = conn.execute(plugin._SELECT_ESTIMATE, parameters).scalar_one_or_none()
            return None if value is None else int(value)

        for user, (spends, expected) in cases.items():
            sample = sorted(spends[: plugin.ESTIMATE_SAMPLE])
            assert sample[math.ceil(len(sample) * 95 / 100) - 1] == expected  # the definition
            assert estimate(user) == expected, user
        assert estimate("nobody") is None


def test_lapsed_reservations_are_not_counted_and_go_at_the_users_next_admission(
    plugin: types.ModuleType, database_url: str
) -> None:
    ledger = plugin.ledger_for(database_url)
    now = datetime.now(UTC)
    window = plugin.budget_window("day", now, ZoneInfo("UTC"))
    lapsed = now - timedelta(seconds=plugin.RESERVATION_TTL_SECONDS + 1)

    def ask(key: str, user: str, at: datetime) -> Any:
        return ledger.admit(plugin.AdmissionRequest(key, user, MODEL, USD, window, 10**11, at))

    assert ask("lapsed", "u", lapsed).admitted
    assert ask("lapsed-of-v", "v", lapsed).admitted
    assert ask("live", "u", now - timedelta(minutes=1)).admitted
    assert ask("live", "u", now - timedelta(minutes=1)).held_pico == 10**11  # "lapsed" still holds then
    admission = ask("new", "u", now)
    assert admission.admitted and admission.held_pico == 10**11  # "live" only
    # The user's lapsed reservation is gone; another user's waits for that user's next admission.
    assert reservations(plugin, database_url) == {"lapsed-of-v": 10**11, "live": 10**11, "new": 10**11}


async def test_a_tool_round_is_stopped_at_the_request_hook_once_the_turn_reached_the_limit(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    drv = driver(plugin, url, "default: $1 per day", budget_reservation_usd="0.3")
    metadata: dict[str, Any] = {"message_id": "m", "chat_id": "c"}
    await inlet(drv, metadata)
    body = {"model": MODEL, "messages": []}
    await drv.call(
        "request", body, __user__=drv.user, __metadata__=metadata
    )  # the first call: admitted at inlet
    assert reservations(plugin, url) == {"m": 3 * 10**11}
    chunk = {"id": "gen-1", "choices": [], "usage": {"cost": 0.5, "prompt_tokens": 1}}
    await drv.call("stream", chunk, __metadata__=metadata)
    await drv.call("request", body, __user__=drv.user, __metadata__=metadata)  # 0.5 spent + 0.3 <= 1
    assert reservations(plugin, url) == {"m": 8 * 10**11}
    await drv.call("stream", {"id": "gen-2", "choices": [], "usage": {"cost": 0.3}}, __metadata__=metadata)
    with pytest.raises(plugin.BudgetBlocked, match="would be exceeded by this request"):  # 0.8 + 0.3 > 1
        await drv.call("request", body, __user__=drv.user, __metadata__=metadata)
    assert reservations(plugin, url) == {}


async def test_calls_whose_cost_is_unknown_each_count_one_reservation(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    drv = driver(plugin, url, "default: $1 per day", budget_reservation_usd="0.3", capture_stream=False)
    metadata: dict[str, Any] = {"message_id": "m"}
    await drv.call("request", {"model": MODEL}, __user__=drv.user, __metadata__=metadata)  # no inlet ran
    await drv.call("request", {"model": MODEL}, __user__=drv.user, __metadata__=metadata)
    assert reservations(plugin, url) == {"m": 6 * 10**11}
    await drv.call("request", {"model": MODEL}, __user__=drv.user, __metadata__=metadata)
    assert reservations(plugin, url) == {"m": 9 * 10**11}
    with pytest.raises(plugin.BudgetBlocked):
        await drv.call("request", {"model": MODEL}, __user__=drv.user, __metadata__=metadata)


async def test_admins_unlimited_warn_only_never_blocks_and_other_connections_are_not_counted(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    spend(plugin, url, "u-admin", "30", 1)
    spend(plugin, url, "u-alice", "30", 2)
    await inlet(driver(plugin, url, "default: $20 per month", ADMIN), {"message_id": "a"})
    await inlet(driver(plugin, url, "default: $20 per month", budget_mode="warn only"), {"message_id": "b"})
    other = driver(plugin, url, "default: $20 per month")
    other.model = {"id": "llama", "urlIdx": 0}
    plugin._base_urls_cache.items, plugin._base_urls_cache.expires = ["http://ollama:11434"], float("inf")
    try:
        await inlet(other, {"message_id": "c"})
    finally:
        plugin._base_urls_cache.expires = 0.0
    assert reservations(plugin, url) == {}
    with pytest.raises(plugin.BudgetBlocked):
        await inlet(
            driver(plugin, url, "default: $20 per month\nuser root@example.com: $5 per day", ADMIN), {}
        )


async def test_an_unreadable_ledger_lets_requests_through_unless_fail_closed(
    plugin: types.ModuleType, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{data_dir / 'missing' / 'l.sqlite3'}"  # its directory does not exist
    await inlet(driver(plugin, url, "default: $20 per month"), {"message_id": "a"})
    assert (
        plugin.BUDGET_CHECK_FAILURE.fail_closed is False
        and "unable to open" in plugin.BUDGET_CHECK_FAILURE.reason
    )
    with pytest.raises(plugin.BudgetBlocked) as blocked:
        await inlet(
            driver(plugin, url, "default: $20 per month", budget_fail_closed=True), {"message_id": "b"}
        )
    assert str(blocked.value) == plugin.BUDGET_UNCHECKED_MESSAGE
    markdown = plugin.render_budgets_markdown(
        plugin.BudgetReport("block", 80, "UTC", (), (), (), "the ledger")
    )
    assert "requests were blocked (fail closed)" in markdown


async def test_over_the_warning_line_the_usage_line_says_so_and_one_notification_per_window(
    plugin: types.ModuleType, database_url: str
) -> None:
    spend(plugin, database_url, "u-alice", "16", 1)
    drv = driver(plugin, database_url, "default: $20 per month", budget_mode="warn only")
    for turn in range(2):
        emitter = EmitterRecorder()
        outlet = {
            "model": MODEL,
            "id": f"m-{turn}",
            "chat_id": "c",
            "messages": [
                {
                    "id": f"m-{turn}",
                    "role": "assistant",
                    "content": "ok",
                    "usage": {"cost": 0.4, "prompt_tokens": 1},
                }
            ],
        }
        await drv.call("outlet", outlet, __user__=drv.user, __metadata__={}, __event_emitter__=emitter)
        assert emitter.statuses[-1].endswith(f" · budget {82 + 2 * turn}% of $20/month")
        warnings = [n for n in emitter.notifications if "budget" in n["content"]]
        assert len(warnings) == (1 if turn == 0 else 0)
    assert warnings == [] and "You have used 82% of your budget ($16.40 of $20.00 per month)" in str(
        plugin.BudgetStanding(
            "u",
            "u",
            plugin.parse_budget_rules("default: $20 per month").rules[0],
            plugin.budget_window("month", datetime.now(UTC), ZoneInfo("UTC")),
            plugin.usd_to_pico(plugin.Decimal("16.4")),
        ).warning_text
    )


async def test_the_stopped_generation_path_releases_by_metadata(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    metadata: dict[str, Any] = {"message_id": "m"}
    await inlet(driver(plugin, url, "default: $20 per month"), metadata)
    assert set(reservations(plugin, url)) == {"m"}
    await plugin.release_budget_reservation(metadata, url)
    await plugin.release_budget_reservation(metadata, url)  # twice: nothing left, no error
    await plugin.release_budget_reservation({}, url)
    assert reservations(plugin, url) == {}


# ── Open WebUI's groups, the read-out, the report, the CLI ──


@pytest.fixture
def open_webui_groups(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, plugin: types.ModuleType
) -> Iterator[sa.Engine]:
    """Open WebUI's synchronous session over a database holding its `user`, `group` and
    `group_member` tables (an in-process stand-in for open_webui.internal.db)."""
    engine = sa.create_engine(f"sqlite:///{data_dir / 'webui.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql('CREATE TABLE "user" (id TEXT, email TEXT, role TEXT, name TEXT)')
        conn.exec_driver_sql('CREATE TABLE "group" (id TEXT, name TEXT)')
        conn.exec_driver_sql("CREATE TABLE group_member (id TEXT, group_id TEXT, user_id TEXT)")
        conn.exec_driver_sql(
            "INSERT INTO \"user\" VALUES ('u-alice', 'alice@example.com', 'user', 'Alice'), "
            "('u-bob', 'bob@example.com', 'user', 'Bob'), ('u-admin', 'root@example.com', 'admin', 'Root')"
        )
        conn.exec_driver_sql("INSERT INTO \"group\" VALUES ('g1', 'Interns'), ('g2', 'Engineering')")
        conn.exec_driver_sql("INSERT INTO group_member VALUES ('1', 'g1', 'u-alice'), ('2', 'g1', 'u-admin')")

    @contextlib.contextmanager
    def get_db() -> Iterator[Any]:
        with sa.orm.Session(engine) as session:
            yield session

    monkeypatch.setitem(sys.modules, "open_webui.internal.db", types.SimpleNamespace(get_db=get_db))
    plugin._groups_cache.clear()
    yield engine
    engine.dispose()


async def test_a_group_rule_applies_through_open_webui_groups_cached_a_minute(
    plugin: types.ModuleType, data_dir: Path, open_webui_groups: sa.Engine
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    spend(plugin, url, "u-alice", "1.99", 1)
    with pytest.raises(plugin.BudgetBlocked, match=r"^Your budget of \$2.00 per day would be exceeded"):
        await inlet(
            driver(plugin, url, "default: $20 per month\ngroup interns: $2 per day"), {"message_id": "a"}
        )
    with open_webui_groups.begin() as conn:
        conn.exec_driver_sql("DELETE FROM group_member")
    assert plugin.user_group_names("u-alice") == ("Interns",)  # cached
    plugin._groups_cache["u-alice"] = (0.0, ("Interns",))  # … for at most GROUPS_TTL_SECONDS
    assert plugin.user_group_names("u-alice") == ()


def test_groups_read_as_unknown_outside_open_webui_or_when_unreadable(
    plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert plugin.user_group_names("u") is None

    @contextlib.contextmanager
    def broken() -> Iterator[Any]:
        raise RuntimeError("no database")
        yield

    monkeypatch.setitem(sys.modules, "open_webui.internal.db", types.SimpleNamespace(get_db=broken))
    assert plugin.user_group_names("u") is None


def test_the_read_out_shows_budget_spent_remaining_and_reset(
    plugin: types.ModuleType, data_dir: Path, open_webui_groups: sa.Engine
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    spend(plugin, url, "u-alice", "0.5", 1)
    plugin.Filter.Valves(database_url=url, budgets="group Interns: $2 per day")  # saved, as the panel does
    labels = [option["label"] for option in plugin.user_readout(ALICE).options()]
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    used, passed_and_rest = labels[-1].split(" used, ")
    assert used == "Budget: $2.00 per day · spent $0.5000 (25%"
    passed, rest = passed_and_rest.split("% of the day passed) · ")
    assert 0 <= int(passed) <= 100  # the share of today gone by: the clock's, tested with a fixed one
    assert rest == f"remaining $1.50 · resets {tomorrow.day} {tomorrow:%B %Y} at 00:00 UTC"
    assert plugin.user_readout(ADMIN).options()[-1]["label"] == "Budget: unlimited"
    assert "- **Budget:** unlimited" in plugin.user_readout(ADMIN).markdown()
    plugin.Filter.Valves(database_url=url, budgets="")
    no_budget = ["Today", "This month", "Last 30 days"]
    assert [label for label, _ in plugin.user_readout(ALICE).lines] == no_budget


def test_the_report_counts_users_per_rule_and_lists_those_over_the_warning_line(
    plugin: types.ModuleType, data_dir: Path, open_webui_groups: sa.Engine
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    spend(plugin, url, "u-alice", "1.7", 1, user_name="Alice *bold*")
    spend(plugin, url, "u-bob", "25", 2)
    spend(plugin, url, "u-ghost", "1", 3)  # in the ledger, no longer in Open WebUI
    plugin.Filter.Valves(
        database_url=url,
        budgets="default: $20 per month\ngroup Interns: $2 per day\ngroup Nobody: $1 per day\nbad",
    )
    markdown = plugin.admin_report_markdown()
    section = markdown[markdown.index("**Budgets**") :]
    assert "| default | $20.00 per month | 2 |" in section  # bob and the ghost
    assert "| group Interns | $2.00 per day | 1 |" in section  # alice (the admin is unlimited)
    assert "| group Nobody | $1.00 per day | 0 |" in section
    assert "| User 2 | default | $25.00 | $20.00 per month | 125% (blocked now) |" in section
    assert "| Alice \\*bold\\* | group Interns | $1.70 | $2.00 per day | 85% |" in section
    assert "line 4: 'bad' is not a rule" in section.replace("\\", "")
    assert "Open WebUI's 3 users and their groups" in section.replace("\\", "")


def test_the_cli_prints_the_budgets_as_table_json_and_csv(
    plugin: types.ModuleType,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    spend(plugin, url, "u-bob", "19", 1)
    plugin.Filter.Valves(
        database_url=url, budgets="default: $20 per month\nuser alice@example.com: $1 per day\nx"
    )
    webui = sa.create_engine(f"sqlite:///{data_dir / 'webui.db'}")
    with webui.begin() as conn:
        conn.exec_driver_sql('CREATE TABLE "user" (id TEXT, email TEXT, role TEXT)')
        conn.exec_driver_sql('CREATE TABLE "group" (id TEXT, name TEXT)')
        conn.exec_driver_sql("CREATE TABLE group_member (group_id TEXT, user_id TEXT)")
        conn.exec_driver_sql("INSERT INTO \"user\" VALUES ('u-alice', 'alice@example.com', 'user')")
    webui.dispose()
    assert plugin.cli_main(["budgets", "--format", "json", "--database-url", url]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["rule"], r["users"]) for r in data["rules"]] == [("default", 1), ("user alice@example.com", 1)]
    assert data["users"] == [
        {
            "user_id": "u-bob",
            "user_name": "User 1",
            "rule": "default",
            "spent_usd": "19",
            "limit_usd": "20",
            "period": "month",
            "percent": 95,
            "blocked": False,
            "resets_on": plugin.budget_window(
                "month", datetime.now(UTC), ZoneInfo("UTC")
            ).resets_on.isoformat(),
        }
    ]
    assert data["ignored_lines"][0].startswith("line 3: 'x' is not a rule")
    assert plugin.cli_main(["budgets", "--format", "csv", "--database-url", url]) == 0
    csv_lines = capsys.readouterr().out.splitlines()
    assert csv_lines[0].startswith("section,line,rule") and [
        line.split(",")[0] for line in csv_lines[1:]
    ] == ["rule", "rule", "user", "ignored"]
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{data_dir / 'nowhere' / 'x.db'}")
    assert plugin.cli_main(["budgets", "--database-url", url]) == 0
    table = capsys.readouterr()
    assert "Users counted: the 1 users in the ledger, by id" in table.out
    assert "Open WebUI's users unreadable" in table.err
    assert "u-bob" in table.out and "$19.00" in table.out and "Ignored: line 3" in table.out
    assert plugin.find_webui_database_url("sqlite:///explicit.db") == "sqlite:///explicit.db"
    assert plugin.webui_directory_at(None) is None
    monkeypatch.delenv("DATABASE_URL")
    assert plugin.find_webui_database_url() == f"sqlite:///{data_dir / 'webui.db'}"


def test_spend_is_read_from_rows_while_the_rollups_are_kept_in_another_zone(
    plugin: types.ModuleType, data_dir: Path
) -> None:
    url = f"sqlite:///{data_dir / 'l.sqlite3'}"
    now = datetime.now(UTC)
    spend(plugin, url, "u", "1.25", 1, created_at=now)
    spend(plugin, url, "u", "7", 2, created_at=now - timedelta(days=40))
    ledger = plugin.ledger_for(url)
    for zone in ("UTC", "Pacific/Kiritimati"):  # rollups kept in UTC; the second one reads rows
        window = plugin.budget_window("month", now - timedelta(hours=1), ZoneInfo(zone))
        assert plugin.user_window_spend(ledger, "u", window) == (
            125 * 10**10 if window.first_day <= now.date() else 0
        )
        with ledger.reading() as (conn, state):
            by_day = plugin.spend_by_user_day(conn, state, ZoneInfo(zone), window.first_day)
        assert sum(by_day.values()) == plugin.user_window_spend(ledger, "u", window)


def test_compact_amounts_for_the_usage_line(plugin: types.ModuleType) -> None:
    assert plugin.compact_usd(20 * USD) == "$20"
    assert plugin.compact_usd(1_500 * USD) == "$1,500"
    assert plugin.compact_usd(USD // 2) == "$0.5000"
    assert plugin.compact_usd(USD * 5 // 2) == "$2.50"
