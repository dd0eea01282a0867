"""`openrouter-usage export | report | sync`, in-process and as the installed console script."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import types
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.factories import make_record, write


def run_cli(plugin: types.ModuleType, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = plugin.cli_main(list(args))
    return code, capsys.readouterr().out


def test_export_json_has_one_exact_object_per_record(
    plugin: types.ModuleType, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [make_record(plugin, i) for i in range(5)]
    write(plugin, database_url, records)
    code, out = run_cli(plugin, capsys, "export", "--format", "json", "--database-url", database_url)
    assert code == 0
    exported = json.loads(out)
    assert [row["message_id"] for row in exported] == sorted(r.message_id for r in records)
    by_id = {r.message_id: r for r in records}
    for row in exported:
        record = by_id[row["message_id"]]
        assert Decimal(row["cost_usd"]) == Decimal(record.usage.cost_pico) / 10**12
        assert Decimal(row["spend_usd"]) == Decimal(record.usage.spend_pico) / 10**12
        assert row["generation_ids"] == list(record.generation_ids)
        assert row["created_at"].endswith("Z")
        for field in (
            "chat_id",
            "user_id",
            "model",
            "served_model",
            "provider",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "reasoning_tokens",
            "upstream_cost_usd",
            "is_byok",
            "status",
        ):
            assert field in row


def test_export_since_keeps_later_records(
    plugin: types.ModuleType, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old = make_record(plugin, 1, created_at=datetime(2026, 1, 1, tzinfo=UTC))
    new = make_record(plugin, 2, created_at=datetime(2026, 6, 1, tzinfo=UTC))
    write(plugin, database_url, [old, new])
    _, out = run_cli(plugin, capsys, "export", "--since", "2026-03-01", "--database-url", database_url)
    assert [row["message_id"] for row in json.loads(out)] == ["msg-2"]


def test_export_csv_is_quoted_and_neutralises_formulas(
    plugin: types.ModuleType,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"sqlite:///{data_dir / 'x.sqlite3'}"
    monkeypatch.setenv("OPENROUTER_USAGE_DATABASE_URL", url)  # no --database-url: the env var
    hostile = make_record(plugin, 1, user_name='=HYPERLINK("http://evil","x")', chat_id="+1, -2\n@3")
    write(plugin, url, [hostile])
    _, out = run_cli(plugin, capsys, "export", "--format", "csv")
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["user_name"] == '\'=HYPERLINK("http://evil","x")'
    assert row["chat_id"] == "'+1, -2\n'@3"  # after a line break too
    assert row["message_id"] == "msg-1" and Decimal(row["cost_usd"]) > 0


def test_the_default_ledger_is_the_sqlite_file_in_data_dir(
    plugin: types.ModuleType, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default_url = plugin.resolve_database_url("")
    assert default_url == f"sqlite:///{data_dir / 'openrouter_usage.sqlite3'}"
    write(plugin, default_url, [make_record(plugin, 3)])
    _, out = run_cli(plugin, capsys, "export")
    assert [row["message_id"] for row in json.loads(out)] == ["msg-3"]


def test_open_webui_postgres_is_the_default_when_it_has_one(
    plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://owui:pw@db:5432/owui")
    assert plugin.resolve_database_url("") == "postgresql+psycopg://owui:pw@db:5432/owui"
    assert plugin.resolve_database_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("by", ["user", "model", "day", "provider"])
def test_report_formats_agree(
    plugin: types.ModuleType, database_url: str, capsys: pytest.CaptureFixture[str], by: str
) -> None:
    now = datetime.now(UTC)
    records = [make_record(plugin, i, created_at=now - timedelta(days=i)) for i in range(12)]
    write(plugin, database_url, records)
    _, out = run_cli(plugin, capsys, "report", "--by", by, "--format", "json", "--database-url", database_url)
    report = json.loads(out)
    month = sum(r.usage.spend_pico for r in records)
    assert Decimal(report["periods"]["last_30_days"]["spend_usd"]) * 10**12 == month
    assert sum(Decimal(row["spend_usd"]) for row in report["breakdown"]["rows"]) * 10**12 == month
    _, table = run_cli(plugin, capsys, "report", "--by", by, "--database-url", database_url)
    assert "Last 30 days" in table and plugin.format_usd(month) in table
    _, text = run_cli(plugin, capsys, "report", "--by", by, "--format", "csv", "--database-url", database_url)
    assert len(list(csv.DictReader(io.StringIO(text)))) == len(report["breakdown"]["rows"])


def test_the_console_script_is_installed_and_works(plugin: types.ModuleType, data_dir: Path) -> None:
    script = shutil.which("openrouter-usage", path=str(Path(sys.executable).parent))
    assert script, "pip install -e . declares the console script"

    def report() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [script, "report", "--format", "json"],
            capture_output=True,
            text=True,
            env={**os.environ, "DATA_DIR": str(data_dir)},
            timeout=60,
            check=False,
        )

    nothing = report()  # no ledger yet: a clear "not found", and none is created
    assert (
        nothing.returncode == 2 and "no ledger found" in nothing.stderr and "--database-url" in nothing.stderr
    )
    assert not (data_dir / "openrouter_usage.sqlite3").exists()
    write(plugin, plugin.resolve_database_url(""), [make_record(plugin, 1, created_at=datetime.now(UTC))])
    found = report()
    assert found.returncode == 0 and json.loads(found.stdout)["periods"]["all_time"]["requests"] == 1


def test_a_bad_database_url_is_a_clear_error(
    plugin: types.ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    code = plugin.cli_main(["report", "--database-url", "mysql://x@localhost/db"])
    assert code == 2 and "SQLite and PostgreSQL" in capsys.readouterr().err


def test_spool_lists_replays_and_discards_what_waits_outside_the_ledger(
    plugin: types.ModuleType, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{data_dir / 'spooled.sqlite3'}"
    write(plugin, url, [make_record(plugin, 1)])
    ledger = plugin.ledger_for(url)
    ledger.spool.append([make_record(plugin, 2), make_record(plugin, 3)])
    refused = make_record(plugin, 4, usage=plugin.Usage(cost_pico=10**19))
    ledger.spool.quarantine([(refused, "DataError: integer out of range")])

    code, listing = run_cli(plugin, capsys, "spool", "--database-url", url)
    assert code == 0
    assert "1 file(s) waiting for replay; 1 record(s) quarantined." in listing
    assert "msg-2" in listing and "msg-3" in listing and "integer out of range" in listing

    code, replayed = run_cli(plugin, capsys, "spool", "--replay", "--database-url", url)
    assert code == 1  # the quarantined record is refused again, and says so
    assert "Replayed 2 spooled record(s); 0 quarantined record(s) stored, 1 still refused." in replayed
    assert ledger.spool.pending_count() == 0 and ledger.spool.quarantined_count() == 1

    assert plugin.cli_main(["spool", "--discard", "--database-url", url]) == 2  # no terminal, no --yes
    assert ledger.spool.quarantined_count() == 1
    code, discarded = run_cli(plugin, capsys, "spool", "--discard", "--yes", "--database-url", url)
    assert code == 0 and "1 quarantined record(s)" in discarded
    assert ledger.spool.quarantined_count() == 0
    _, out = run_cli(plugin, capsys, "export", "--database-url", url)
    assert [row["message_id"] for row in json.loads(out)] == ["msg-1", "msg-2", "msg-3"]


def test_the_cli_finds_the_ledger_in_the_documented_order(
    plugin: types.ModuleType, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert plugin.find_ledger_url("") is None  # nothing anywhere: the caller exits with status 2
    (data_dir / "openrouter_usage.sqlite3").touch()
    assert plugin.find_ledger_url("") == f"sqlite:///{data_dir / 'openrouter_usage.sqlite3'}"
    monkeypatch.setenv("DATABASE_URL", "postgresql://owui@db/owui")
    assert plugin.find_ledger_url("") == "postgresql+psycopg://owui@db/owui"
    monkeypatch.setenv("OPENROUTER_USAGE_DATABASE_URL", "sqlite:////srv/usage.sqlite3")
    assert plugin.find_ledger_url("") == "sqlite:////srv/usage.sqlite3"
    assert plugin.find_ledger_url("sqlite:////x.sqlite3") == "sqlite:////x.sqlite3"


def test_a_report_in_another_zone_counts_from_the_rows_and_leaves_the_rollups(
    plugin: types.ModuleType, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    write(
        plugin,
        database_url,
        [make_record(plugin, i, created_at=now - timedelta(hours=5 * i)) for i in range(20)],
    )
    _, utc = run_cli(plugin, capsys, "report", "--format", "json", "--database-url", database_url)
    _, kiritimati = run_cli(
        plugin,
        capsys,
        "report",
        "--format",
        "json",
        "--timezone",
        "Pacific/Kiritimati",
        "--database-url",
        database_url,
    )
    assert json.loads(utc)["timezone"] == "UTC" and json.loads(kiritimati)["timezone"] == "Pacific/Kiritimati"
    both = [json.loads(text)["periods"]["all_time"] for text in (utc, kiritimati)]
    assert both[0] == both[1]  # the same records, whatever the zone of their days
    with plugin.ledger_for(database_url).engine.connect() as conn:
        zones = {row.zone for table in plugin.ROLLUP_TABLES for row in conn.execute(sa.select(table.c.zone))}
    assert zones == {"UTC"}


def test_reports_give_the_byok_upstream_spend_only(
    plugin: types.ModuleType, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """OpenRouter fills upstream_inference_cost for non-BYOK calls too; summing it over every row
    would report more upstream spend than was paid."""
    records = [make_record(plugin, i, created_at=datetime.now(UTC)) for i in range(40)]
    write(plugin, database_url, records)
    code, out = run_cli(plugin, capsys, "report", "--format", "json", "--database-url", database_url)
    assert code == 0
    all_time = json.loads(out)["periods"]["all_time"]
    byok_upstream = sum(r.usage.upstream_cost_pico for r in records if r.usage.is_byok)
    assert any(r.usage.is_byok for r in records) and any(not r.usage.is_byok for r in records)
    assert Decimal(all_time["byok_upstream_cost_usd"]) == Decimal(byok_upstream) / 10**12
    assert "upstream_cost_usd" not in all_time


def test_a_bad_since_is_one_line_naming_the_accepted_forms(
    plugin: types.ModuleType, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write(plugin, database_url, [make_record(plugin, 1)])
    code = plugin.cli_main(["report", "--since", "banana", "--database-url", database_url])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert error == (
        "openrouter-usage: --since 'banana' is neither a number of days nor a date. Give a number of "
        "days, such as 30d for the last 30 days, or a date as YYYY-MM-DD, such as 2026-11-01.\n"
    ), "a sentence for a person: no exception class, no ledger location"
    code = plugin.cli_main(["export", "--since", "banana", "--database-url", database_url])
    error = capsys.readouterr().err
    assert code == 2 and "Error" not in error and "'banana' is not a date" in error and "2026-11-01" in error


def test_a_reader_that_goes_away_ends_the_output_quietly(plugin: types.ModuleType, data_dir: Path) -> None:
    script = shutil.which("openrouter-usage", path=str(Path(sys.executable).parent))
    assert script
    write(plugin, plugin.resolve_database_url(""), [make_record(plugin, i) for i in range(3000)])
    # About 2 MB of JSON: far more than a pipe buffer, so the writer meets the closed pipe (a
    # report's output shares the same exit path but fits in the buffer, so it cannot be forced).
    piped = subprocess.run(  # noqa: S602 - the pipe is the point; every part is the test's own
        f"{script} export | head -c 100 >/dev/null",
        shell=True,
        capture_output=True,
        text=True,
        env={**os.environ, "DATA_DIR": str(data_dir)},
        timeout=120,
        check=False,
    )
    assert piped.stderr == ""


def test_report_tables_show_money_and_counts_as_the_summary_does(
    plugin: types.ModuleType, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write(plugin, database_url, [make_record(plugin, i, created_at=datetime.now(UTC)) for i in range(30)])
    code, out = run_cli(plugin, capsys, "report", "--by", "user", "--database-url", database_url)
    assert code == 0
    breakdown = out.split("By user")[1].splitlines()[4:]
    assert breakdown and all("$" in line for line in breakdown)
    assert all(re.search(r"\d,\d{3}", line) for line in breakdown), "token counts with thousands separators"
    code, out = run_cli(
        plugin, capsys, "report", "--by", "user", "--format", "json", "--database-url", database_url
    )
    assert "$" not in out and re.search(r'"spend_usd": "0\.\d+"', out), "JSON keeps exact decimals"


def test_report_tables_can_show_another_currency_and_json_and_csv_stay_in_usd(
    plugin: types.ModuleType, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{data_dir / 'ledger.sqlite3'}"
    records = [make_record(plugin, i, user_id="u-1", created_at=datetime.now(UTC)) for i in range(3)]
    write(plugin, url, records)
    total = sum(r.usage.spend_pico for r in records)
    eur = plugin.parse_display_currency("EUR 0.92")
    code, out = run_cli(plugin, capsys, "report", "--currency", "EUR 0.92", "--database-url", url)
    assert (
        code == 0
        and "Money in EUR at 0.92 EUR per USD (as set by the admin); the ledger keeps exact USD." in out
    )
    assert "$" not in out and "spend_usd" not in out
    (all_time,) = [line for line in out.splitlines() if line.startswith("All time")]
    assert all_time.split()[2] == eur.format(total)
    header, _, row = out.split("By user")[1].splitlines()[2:5]
    end = header.index("spend_eur") + len("spend_eur")
    assert row[:end].endswith(" " + eur.format(total)), "money in euros, right-aligned as a number"
    capsys.readouterr()
    for fmt in ("json", "csv"):
        code = plugin.cli_main(["report", "--currency", "EUR 0.92", "--format", fmt, "--database-url", url])
        error = capsys.readouterr().err
        assert code == 2 and f"--currency applies to tables; --format {fmt} keeps exact USD" in error
    code = plugin.cli_main(["report", "--currency", "EUR", "--database-url", url])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "no rate per USD for EUR" in error and "EUR 0.92" in error


def test_report_prints_the_daily_chart_as_wide_as_the_terminal_and_carries_the_days_as_data(
    plugin: types.ModuleType,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    today = datetime.now(UTC).date()
    noon = datetime.combine(today, datetime.min.time(), UTC) + timedelta(hours=12)
    records = [
        make_record(plugin, i, created_at=noon - timedelta(days=(i * 3) % 40))
        for i in range(90)
        if (i * 3) % 40 not in (2, 11, 25)  # days without spend
    ]
    write(plugin, database_url, records)
    days = [(today - timedelta(days=29 - n)).isoformat() for n in range(30)]
    expected = {
        day: sum(r.usage.spend_pico for r in records if r.created_at.date().isoformat() == day)
        for day in days
    }
    assert 0 in expected.values(), "some days have no spend"

    _, out = run_cli(plugin, capsys, "report", "--format", "json", "--database-url", database_url)
    daily = json.loads(out)["daily"]
    assert [(d["day"], Decimal(d["spend_usd"]) * 10**12) for d in daily["days"]] == list(expected.items())
    assert [d["partial"] for d in daily["days"]] == [False] * 29 + [True]
    assert Decimal(daily["total_usd"]) * 10**12 == sum(expected.values())
    top = daily["top_users"][0]
    assert [Decimal(v) * 10**12 for v in top["spend_usd"]] == [
        sum(
            r.usage.spend_pico
            for r in records
            if r.user_id == top["user_id"] and r.created_at.date().isoformat() == day
        )
        for day in days
    ]

    _, text = run_cli(
        plugin, capsys, "report", "--by", "day", "--format", "csv", "--database-url", database_url
    )
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(row["day"], Decimal(row["spend_usd"]) * 10**12) for row in rows] == list(expected.items())
    assert sum(int(row["cache_write_tokens"]) for row in rows) == sum(
        r.usage.cache_write_tokens for r in records if r.created_at.date().isoformat() in expected
    )

    for columns, bar_width in (("60", 1), ("80", 2), ("200", 3)):
        monkeypatch.setenv("COLUMNS", columns)
        _, table = run_cli(plugin, capsys, "report", "--database-url", database_url)
        chart = table.split("Spend by day: ")[1].split("\n\n")[1].splitlines()
        busiest = max(expected.values())
        assert chart[0].startswith(f"{plugin.format_usd(busiest)} ┤"), table
        assert all(len(line) < int(columns) for line in chart), "fits the terminal without wrapping"
        assert chart[-2].endswith("└" + "─" * 30 * bar_width)
        assert "today so far" in table and f"{plugin.format_usd(sum(expected.values()))} in total" in table
