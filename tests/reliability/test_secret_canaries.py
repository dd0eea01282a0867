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

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from openrouter_sim import LookupFault, OpenRouterSimulator
from tests.factories import EmitterRecorder, HookDriver, outlet_body, owui_merge_usage, streamed_turn

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


# ── The OpenRouter API key ──
# The key reconciliation looks generations up with: the valve (used by the hooks' background
# reconciler and named by the panel) and $OPENROUTER_API_KEY (the CLI's only source). Each is its
# own canary; every path a lookup can take runs: checked and matched, OpenRouter failing (5xx,
# malformed JSON, no data, /key failing, nothing listening), and the key rejected.

CANARY_KEY_PREFIX = "sk-or-v1-"


def wait_for(check: Any, what: str, seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while (value := check()) is None or value is False:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {seconds:.0f} s")
        time.sleep(0.05)
    return value


@dataclasses.dataclass
class KeyScan:
    """What a scan for the OpenRouter API key works with: the plugin (its first lookup a moment
    after a completion instead of 5 s), the simulator, the default ledger, and the places scanned."""

    plugin: types.ModuleType
    sim: OpenRouterSimulator
    caplog: pytest.LogCaptureFixture
    capsys: pytest.CaptureFixture[str]
    roots: tuple[Path, ...]
    emitter: EmitterRecorder = dataclasses.field(default_factory=EmitterRecorder)

    @property
    def url(self) -> str:
        return str(self.plugin.resolve_database_url(""))

    def statuses(self) -> dict[str, str]:
        table = self.plugin.ledger_table
        with self.plugin.ledger_for(self.url).engine.connect() as conn:
            return dict(conn.execute(sa.select(table.c.message_id, table.c.reconcile_status)).all())

    def state(self) -> dict[str, Any]:
        with self.plugin.ledger_for(self.url).engine.connect() as conn:
            state: dict[str, Any] = self.plugin.read_meta_json(conn, self.plugin.RECONCILE_STATE_KEY)
            return state

    def panel_saying(self, words: str) -> str | None:
        """The settings panel's report if it says `words`."""
        report: str = self.plugin.admin_report_markdown()
        return report if words in report else None

    async def turn(self, valves: dict[str, Any], message_id: str) -> None:
        """One streamed chat turn through the hooks with these valves (which the panel then follows)."""
        await streamed_turn(
            HookDriver(self.plugin, valves=valves),
            self.sim,
            message_id,
            message_id=message_id,
            emitter=self.emitter,
        )

    def reconcile_cli(self, base_url: str, label: str) -> dict[str, str]:
        """`openrouter-usage reconcile` once (the key from $OPENROUTER_API_KEY): its output by label."""
        code = self.plugin.cli_main(["reconcile", "--database-url", self.url, "--base-url", base_url])
        captured = self.capsys.readouterr()
        return {f"cli reconcile ({label})": f"exit {code}\n{captured.out}\n{captured.err}"}

    def last_surfaces(self) -> dict[str, str]:
        """The events sent, everything logged and every file written, read at the end."""
        files = {f"file {path}": text for path, text in written_files(*self.roots).items()}
        return {"events": json.dumps(self.emitter.events, default=str), "logs": log_text(self.caplog)} | files


@pytest.fixture
def scan(
    plugin: types.ModuleType,
    temp_dir: Path,
    tmp_path: Path,
    debug_logs: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[KeyScan]:
    monkeypatch.setattr(plugin, "FIRST_LOOKUP_DELAY_SECONDS", 0.2)
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    with OpenRouterSimulator(generation_ready_after_s=0.1) as sim:
        yield KeyScan(plugin, sim, debug_logs, capsys, (tmp_path, temp_dir))


async def test_the_openrouter_api_key_appears_nowhere(
    scan: KeyScan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves: with the valve key and $OPENROUTER_API_KEY each a canary, rows checked and matched,
    lookups failing every way OpenRouter can fail, the key rejected (by the background reconciler
    and by the CLI), the panel, the read-out and every CLI command leave both keys out of logs
    (DEBUG), events, texts, error messages and written files (ledger, settings file, spool)."""
    plugin, sim = scan.plugin, scan.sim
    valve_key = CANARY_KEY_PREFIX + canary("api-key-valve")
    env_key = CANARY_KEY_PREFIX + canary("api-key-env")
    valves = {"openrouter_api_key": valve_key, "openrouter_api_base": sim.base_url}
    surfaces: dict[str, str] = {}

    await scan.turn(valves, "m-matched")
    await asyncio.to_thread(wait_for, lambda: scan.statuses().get("m-matched") == "matched", "matched")
    surfaces["panel (matched)"] = plugin.admin_report_markdown()

    # OpenRouter failing: /key answers 500, and /generation 500, malformed JSON and no data.
    sim.inject_lookup_faults(LookupFault.server_error(), endpoint="key")
    sim.inject_lookup_faults(LookupFault.server_error(), LookupFault.not_json(), LookupFault.without_data())
    for index in range(3):
        await scan.turn(valves, f"m-failing-{index}")
    await asyncio.to_thread(
        wait_for, lambda: sum((scan.state().get("errors") or {}).values()) >= 4, "four lookup errors counted"
    )
    surfaces["panel (errors)"] = plugin.admin_report_markdown()
    assert "Lookup errors so far" in surfaces["panel (errors)"], surfaces["panel (errors)"]

    # The key rejected: the background reconciler stops and the panel says so.
    sim.reject_key(valve_key)
    await scan.turn(valves, "m-rejected")
    surfaces["panel (rejected)"] = await asyncio.to_thread(
        wait_for, lambda: scan.panel_saying("The key was rejected"), "the panel shows the rejection"
    )
    surfaces["read-out"] = plugin.user_readout(USER).markdown()

    # The CLI, with its key from the environment: checks the rows left pending, then fails to
    # reach anything, then is rejected; and every other command.
    monkeypatch.setenv("OPENROUTER_API_KEY", env_key)
    surfaces |= scan.reconcile_cli(sim.base_url, "checks")
    assert set(scan.statuses().values()) == {"matched"}, surfaces
    surfaces |= scan.reconcile_cli(f"http://{UNREACHABLE}/api/v1", "unreachable")
    sim.reject_key(env_key)
    surfaces |= scan.reconcile_cli(sim.base_url, "rejected")
    surfaces |= {
        f"cli {command}": output for command, output in run_cli(plugin, scan.capsys, scan.url).items()
    }
    surfaces["panel (env key too)"] = plugin.admin_report_markdown()

    # A ledger that cannot be written: the record is spooled (the spool file is scanned), and the
    # reconciler started for that ledger fails on it.
    unwritable = f"sqlite:///{tmp_path / 'absent' / 'ledger.sqlite3'}"
    await scan.turn(valves | {"database_url": unwritable}, "m-spooled")
    assert plugin.ledger_for(plugin.resolve_database_url(unwritable)).spool.pending_count() == 1
    surfaces["panel (spooling)"] = plugin.admin_report_markdown()
    surfaces |= scan.last_surfaces()

    leaks = find_leaks((valve_key, env_key, canary("api-key-valve"), canary("api-key-env")), surfaces)
    print(
        f"\nscanned {len(surfaces)} surfaces ({sum(map(len, surfaces.values()))} chars, "
        f"{len(scan.caplog.records)} log records); lookup errors counted {scan.state().get('errors')}; "
        f"leaks {len(leaks)}"
    )
    assert not leaks, "\n".join(leaks)
    assert "connection failed (ConnectError)" in surfaces["cli reconcile (unreachable)"]
    assert "OpenRouter rejected the key (HTTP 401)" in surfaces["cli reconcile (rejected)"]
    assert "API key: set (this function's settings)" in surfaces["panel (env key too)"]
    assert any("OpenRouter rejected the API key" in r.getMessage() for r in scan.caplog.records)


async def test_a_key_with_a_line_break_inside_appears_nowhere_either(
    scan: KeyScan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key pasted across two lines, in the valve or in $OPENROUTER_API_KEY, is never sent (an
    HTTP library would refuse the header and may log it): the panel and the CLI say the key is not
    valid, and it leaks nowhere."""
    halves = (CANARY_KEY_PREFIX + canary("line-break-head"), canary("line-break-tail"))
    env_halves = (CANARY_KEY_PREFIX + canary("env-line-break-head"), canary("env-line-break-tail"))
    await scan.turn(
        {"openrouter_api_key": "\n".join(halves), "openrouter_api_base": scan.sim.base_url}, "m-1"
    )
    monkeypatch.setenv("OPENROUTER_API_KEY", "\r\n".join(env_halves))
    surfaces = scan.reconcile_cli(scan.sim.base_url, "line break")
    surfaces |= {"panel": scan.plugin.admin_report_markdown()} | scan.last_surfaces()
    leaks = find_leaks((*halves, *env_halves), surfaces)
    lookups = [r for r in scan.sim.requests if r.path.endswith(("/generation", "/key"))]
    print(f"\nlookups sent {len(lookups)}; leaks {len(leaks)}")
    assert not leaks, "\n".join(leaks)
    assert lookups == [], "a malformed key is never sent"
    assert "it is not a valid key" in surfaces["panel"]
    assert "it is not a valid key" in surfaces["cli reconcile (line break)"]
