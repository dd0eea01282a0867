"""A secret in the ledger's database URL never shows up anywhere the plugin writes or shows text.

Each URL form carries its own canary string: the user-info password (also one holding an
unencoded "@", which URL parsing splits), the password-like query parameters (password,
sslpassword, secret_token, api_key, passphrase, auth_token, apikey), an unparseable URL and an
unsupported engine; the forms PostgreSQL accepts also run against a working server. For each,
one chat turn runs through the real hooks with logging at DEBUG, then the settings panel, the
user read-out and every CLI command read the same ledger; the logs, the events, those texts, the
CLI's output and every file the plugin wrote are scanned for the canary. A URL that cannot be
written to must not cost the record: it is spooled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.factories import EmitterRecorder, HookDriver, outlet_body, owui_merge_usage

MODEL = "openai/gpt-4o-mini"
MESSAGE_ID = "msg-canary"
USER = {"id": "user-1", "name": "Ada", "email": "ada@example.com", "role": "admin"}


def canary(name: str) -> str:
    """A distinct, URL-safe string per form that nothing else could produce by chance."""
    return "Cnry" + hashlib.sha256(name.encode()).hexdigest()[:12].upper()


@dataclasses.dataclass(frozen=True)
class UrlForm:
    """A database URL with a secret in it. `template` names {secret}, {data} (the data
    directory) and {absent} (a directory that does not exist); `writable`: writes succeed."""

    name: str
    template: str
    writable: bool = False
    # The secret as typed; by default the canary. A password holding an unencoded "@" is split
    # by URL parsing, so each half must stay hidden too.
    secret_parts: tuple[str, ...] = ()

    @property
    def secret(self) -> str:
        return "@".join(self.secret_parts) if self.secret_parts else canary(self.name)

    @property
    def fragments(self) -> tuple[str, ...]:
        """Every string that must appear nowhere."""
        return (self.secret, *self.secret_parts)

    def url(self, data_dir: Path, absent: Path) -> str:
        return self.template.format(secret=self.secret, data=data_dir, absent=absent)


UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
FORMS = [
    UrlForm("userinfo-password", f"postgresql://u:{{secret}}@{UNREACHABLE}/db"),
    UrlForm("password-parameter", f"postgresql://u@{UNREACHABLE}/db?password={{secret}}"),
    UrlForm("sslpassword-parameter", f"postgresql://u@{UNREACHABLE}/db?sslpassword={{secret}}"),
    UrlForm("passphrase-parameter", f"postgresql://u@{UNREACHABLE}/db?passphrase={{secret}}"),
    UrlForm("auth-token-parameter", f"postgresql://u@{UNREACHABLE}/db?auth_token={{secret}}"),
    UrlForm("apikey-parameter", f"postgresql://u@{UNREACHABLE}/db?apikey={{secret}}"),
    UrlForm("sqlite-secret-token-unwritable", "sqlite:///{absent}/ledger.sqlite3?secret_token={secret}"),
    UrlForm("sqlite-api-key", "sqlite:///{data}/ledger.sqlite3?api_key={secret}", writable=True),
    UrlForm("sqlite-secret-token", "sqlite:///{data}/ledger.sqlite3?secret_token={secret}", writable=True),
    UrlForm("unparseable", "postgresql://u:{secret}@127.0.0.1:notaport/db"),
    UrlForm("unsupported-engine", "mysql://u:{secret}@h/db"),
    UrlForm(
        "userinfo-password-with-unencoded-at",
        f"postgresql://u:{{secret}}@{UNREACHABLE}/db",
        secret_parts=(canary("at-head"), canary("at-tail")),
    ),
]


def stream_chunks() -> list[dict[str, Any]]:
    envelope = {"id": "gen-canary-1", "provider": "OpenAI", "model": MODEL, "object": "chat.completion.chunk"}
    return [
        {**envelope, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
        {**envelope, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**envelope, "choices": [], "usage": USAGE},
    ]


USAGE = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10, "cost": 0.00042, "is_byok": False}


async def chat_turn(plugin: types.ModuleType, url: str, emitter: EmitterRecorder) -> None:
    driver = HookDriver(plugin, valves={"database_url": url}, user=USER)
    request = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    metadata = {"chat_id": "chat-canary", "message_id": MESSAGE_ID, "session_id": "s-1"}
    outlet = outlet_body(
        request, "Hi", owui_merge_usage(None, USAGE), message_id=MESSAGE_ID, chat_id="chat-canary"
    )
    await driver.run(request, stream_chunks(), outlet, metadata, emitter)


CLI_COMMANDS = [
    ["report", "--format", "table"],
    ["report", "--format", "json"],
    ["report", "--format", "csv", "--by", "model"],
    ["export", "--format", "json"],
    ["export", "--format", "csv"],
    ["spool"],
    ["spool", "--replay"],
]


def run_cli(plugin: types.ModuleType, capsys: pytest.CaptureFixture[str], url: str) -> dict[str, str]:
    """Every read command against `url`: their output (stdout and stderr) by command line."""
    outputs = {}
    for command in CLI_COMMANDS:
        argv = [*command, "--database-url", url]
        try:
            code: Any = plugin.cli_main(argv)
        except SystemExit as exc:  # argparse refusing the command line
            code = f"SystemExit({exc.code})"
        captured = capsys.readouterr()
        outputs[" ".join(command)] = f"exit {code}\n{captured.out}\n{captured.err}"
    return outputs


def written_files(*roots: Path) -> dict[str, str]:
    """Every file under `roots` (names and contents, bytes decoded leniently)."""
    files = {}
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = Path(directory) / name
                try:
                    files[str(path)] = path.read_bytes().decode("utf-8", "replace")
                except OSError as exc:
                    files[str(path)] = f"(unreadable: {exc})"
    return files


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Everything logged: formatted lines with tracebacks, plus raw arguments and exception text."""
    parts = [caplog.text]
    for record in caplog.records:
        parts += [record.getMessage(), repr(record.args), record.exc_text or ""]
    return "\n".join(parts)


def find_leaks(fragments: tuple[str, ...], surfaces: dict[str, str]) -> list[str]:
    leaks = []
    for where, text in surfaces.items():
        for fragment in fragments:
            if fragment in text or fragment in where:
                line = next((ln for ln in (where + "\n" + text).splitlines() if fragment in ln), "")
                leaks.append(f"{where}: {line.strip()[:300]}")
    return leaks


async def scan_every_surface(
    plugin: types.ModuleType,
    url: str,
    fragments: tuple[str, ...],
    roots: tuple[Path, ...],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> tuple[dict[str, str], list[str]]:
    """One chat turn, then the panel, the read-out and the CLI; returns (surfaces, leaks)."""
    emitter = EmitterRecorder()
    await chat_turn(plugin, url, emitter)
    surfaces = {
        "events": json.dumps(emitter.events, default=str),
        "panel": plugin.admin_report_markdown(),
        "read-out": plugin.user_readout(USER).markdown(),
    }
    surfaces |= {f"cli {command}": output for command, output in run_cli(plugin, capsys, url).items()}
    surfaces["logs"] = log_text(caplog)
    surfaces |= {f"file {path}": text for path, text in written_files(*roots).items()}
    return surfaces, find_leaks(fragments, surfaces)


def recorded_message_ids(url: str) -> list[str]:
    """The ledger's message ids, read with a plain engine (the URL's secret is no password here)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.exec_driver_sql("SELECT message_id FROM openrouter_usage_ledger").scalars())
    finally:
        engine.dispose()


def cli_exit_codes(surfaces: dict[str, str]) -> dict[str, str]:
    return {where: text.split("\n", 1)[0] for where, text in surfaces.items() if where.startswith("cli ")}


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Everything at DEBUG: the plugin's logger, and the root (SQLAlchemy, psycopg, asyncio)."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="openrouter_usage")
    return caplog


@pytest.fixture(autouse=True)
def quiet_writers_afterwards(data_dir: Path) -> Iterator[None]:
    """After the checks, empty the spool: a writer whose ledger cannot be reached keeps retrying
    the spool every few seconds for as long as it holds files, and would log into later tests."""
    yield
    shutil.rmtree(data_dir / "openrouter_usage_spool", ignore_errors=True)


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$TMPDIR, where the spool would go if the data directory were not writable: scanned too."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    return directory


@pytest.mark.parametrize("form", FORMS, ids=[form.name for form in FORMS])
async def test_a_secret_in_the_database_url_appears_nowhere(
    plugin: types.ModuleType,
    data_dir: Path,
    temp_dir: Path,
    tmp_path: Path,
    debug_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    form: UrlForm,
) -> None:
    """Proves: with this URL form as the ledger URL, a full chat turn, the panel, the read-out and
    every CLI command leave the secret out of logs (DEBUG), events, texts and written files; a
    writable ledger gets the record, any other URL spools it (never dropped)."""
    url = form.url(data_dir, tmp_path / "absent")
    surfaces, leaks = await scan_every_surface(
        plugin, url, form.fragments, (tmp_path, temp_dir), debug_logs, capsys
    )
    if form.writable:
        recorded, waiting = recorded_message_ids(url), None
    else:
        # The ledger the outlet wrote to: the Filter resolves (normalises) the valve's URL first.
        recorded, waiting = None, plugin.ledger_for(plugin.resolve_database_url(url)).spool.pending_count()
    files = sum(where.startswith("file ") for where in surfaces)
    print(
        f"\n{form.name}: scanned {len(surfaces)} surfaces ({sum(map(len, surfaces.values()))} chars, "
        f"{files} files, {len(debug_logs.records)} log records); recorded {recorded}, "
        f"spool files waiting {waiting}; leaks {len(leaks)}"
    )
    assert not leaks, "\n".join(leaks)
    if form.writable:
        assert recorded == [MESSAGE_ID]
        assert set(cli_exit_codes(surfaces).values()) == {"exit 0"}, cli_exit_codes(surfaces)
    else:
        assert waiting, "the record was dropped instead of spooled"


POSTGRES_FORMS = ["userinfo-password", "password-parameter", "sslpassword-parameter"]


@pytest.mark.postgres
@pytest.mark.parametrize("form_name", POSTGRES_FORMS)
async def test_a_secret_in_a_working_postgresql_url_appears_nowhere(
    plugin: types.ModuleType,
    pg_url: str,
    temp_dir: Path,
    tmp_path: Path,
    debug_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    form_name: str,
) -> None:
    """Proves: the forms PostgreSQL itself accepts (trust authentication ignores the password)
    leak nowhere either when the ledger works and every surface shows a full report."""
    secret = canary(f"working-{form_name}")
    parsed = sa.engine.make_url(pg_url)
    base = f"postgresql://{parsed.username}"
    where = f"{parsed.host}:{parsed.port}/{parsed.database}"
    url = {
        "userinfo-password": f"{base}:{secret}@{where}",
        "password-parameter": f"{base}@{where}?password={secret}",
        "sslpassword-parameter": f"{base}@{where}?sslpassword={secret}",
    }[form_name]
    roots = (tmp_path, temp_dir)
    surfaces, leaks = await scan_every_surface(plugin, url, (secret,), roots, debug_logs, capsys)
    recorded = recorded_message_ids(pg_url)
    print(
        f"\nworking {form_name}: scanned {len(surfaces)} surfaces ({sum(map(len, surfaces.values()))} "
        f"chars, {len(debug_logs.records)} log records); recorded {recorded}; leaks {len(leaks)}"
    )
    assert not leaks, "\n".join(leaks)
    assert recorded == [MESSAGE_ID]
    assert set(cli_exit_codes(surfaces).values()) == {"exit 0"}, cli_exit_codes(surfaces)
    assert "Top users" in surfaces["panel"], surfaces["panel"]
