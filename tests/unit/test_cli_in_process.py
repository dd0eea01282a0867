"""The CLI's paths that other tests reach only through a child process (whose coverage is not
measured) or not at all: `sync` and "no ledger" in-process, `spool --discard` answered at a
terminal, the ledger of an importable Open WebUI install; and the report's health lines."""

from __future__ import annotations

import io
import json
import logging
import sys
import types
from pathlib import Path

import pytest

from tests.factories import make_record, write


class Terminal(io.StringIO):
    """A standard input that is a terminal, holding what the person will type."""

    def isatty(self) -> bool:
        return True


def test_sync_prints_the_deprecation_notice_and_exits_zero(
    plugin: types.ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert plugin.cli_main(["sync", "--date", "2026-11-01"]) == 0
    notice = json.loads(capsys.readouterr().out)
    assert notice["status"] == "deprecated" and notice["results"] == []


def test_with_no_ledger_anywhere_a_read_exits_2_and_creates_none(
    plugin: types.ModuleType, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if plugin.find_ledger_url("") is not None:
        pytest.skip("this machine has an Open WebUI ledger of its own")
    assert plugin.cli_main(["report"]) == 2
    error = capsys.readouterr().err
    assert "no ledger found" in error and "--database-url" in error
    assert list(data_dir.iterdir()) == []


def test_the_ledger_of_an_importable_open_webui_install_is_found_without_importing_it(
    plugin: types.ModuleType, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site-packages" / "open_webui"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the CLI must not import Open WebUI')\n")
    monkeypatch.syspath_prepend(str(package.parent))
    assert package / "data" in plugin.open_webui_data_dirs()
    ledger = package / "data" / "openrouter_usage.sqlite3"
    ledger.parent.mkdir()
    ledger.touch()
    assert plugin.find_ledger_url("") == f"sqlite:///{ledger}"
    assert "open_webui" not in sys.modules


@pytest.mark.parametrize(("typed", "code", "left"), [("no", 1, 1), ("  Yes ", 0, 0)])
def test_discard_at_a_terminal_deletes_only_after_yes(
    plugin: types.ModuleType,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    typed: str,
    code: int,
    left: int,
) -> None:
    url = f"sqlite:///{data_dir / 'ledger.sqlite3'}"
    write(plugin, url, [make_record(plugin, 1)])
    spool = plugin.ledger_for(url).spool
    spool.append([make_record(plugin, 2)])
    monkeypatch.setattr(sys, "stdin", Terminal(f"{typed}\n"))
    assert plugin.cli_main(["spool", "--discard", "--database-url", url]) == code
    out = capsys.readouterr().out
    assert "Delete 1 spool file(s) and 0 quarantined record(s) for good? Type yes:" in out
    assert spool.pending_count() == left
    assert ("Nothing discarded." in out) == bool(left)


def test_the_health_lines_say_what_waits_and_what_is_recounted(plugin: types.ModuleType) -> None:
    assert plugin.health_lines(plugin.LedgerHealth("sqlite:///l.sqlite3")) == []
    health = plugin.LedgerHealth("sqlite:///l.sqlite3", spooled_files=2, recount="UTC, 45%")
    text = " ".join(plugin.health_lines(health))
    assert "Recounting the rollups for time zone UTC: 45% done." in text
    assert "2 spooled batch(es) waiting to be replayed." in text


def test_an_unknown_time_zone_falls_back_to_utc_and_says_so(
    plugin: types.ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert plugin.resolve_zone("Mars/Olympus_Mons").key == "UTC"
    assert "unknown time zone 'Mars/Olympus_Mons'; using UTC" in caplog.text
