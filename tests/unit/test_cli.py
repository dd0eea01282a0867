"""`openrouter-usage export | report | sync`, in-process and as the installed console script."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import types
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tests.unit.test_ledger import make_record, write


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
    assert row["chat_id"] == "'+1, -2\n@3"
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


def test_the_console_script_is_installed_and_works(data_dir: Path) -> None:
    script = shutil.which("openrouter-usage", path=str(Path(sys.executable).parent))
    assert script, "pip install -e . declares the console script"
    result = subprocess.run(
        [script, "report", "--format", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "DATA_DIR": str(data_dir)},
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout)["periods"]["all_time"]["requests"] == 0


def test_a_bad_database_url_is_a_clear_error(
    plugin: types.ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    code = plugin.cli_main(["report", "--database-url", "mysql://x@localhost/db"])
    assert code == 2 and "SQLite and PostgreSQL" in capsys.readouterr().err
