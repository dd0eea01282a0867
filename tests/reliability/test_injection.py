"""Hostile text in user names, model ids and providers stays inert wherever the ledger is shown.

Each payload goes in twice: through the real hooks (user name in __user__, model id in the request
body, provider in the stream chunks), and as a raw ledger row inserted with SQL, as an older
release or another writer could have stored it (the hooks now strip control characters; a raw row
keeps them). Then the settings panel's Markdown must hold no live link, image or HTML and no
unescaped pipe that breaks a table; the CSV export must parse into one row per record with no
cell (or line inside a cell) starting like a formula; the CLI table must hold no control or bidi
characters and one line per row.
"""

from __future__ import annotations

import csv
import io
import json
import re
import types
import unicodedata
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from tests.factories import EmitterRecorder, HookDriver, outlet_body, owui_merge_usage

PAYLOADS = {
    "pipe": "a|b||c",
    "cr": "carriage\rreturn",
    "lf": "line\nfeed",
    "crlf-formula": "total\r\n=1+1",
    "lf-formula": "ok\n@SUM(A1)",
    "cr-formula": "ok\r-2+3",
    "script": "<script>alert(1)</script>",
    "html-autolink": "<http://evil.example/a>",
    "link": "[x](javascript:alert(1))",
    "image": "![i](http://evil.example/i.png)",
    "equals": '=HYPERLINK("http://evil.example","x")',
    "plus": "+1+1",
    "minus": "-2+3",
    "at": "@SUM(1+1)*cmd|' /C calc'!A0",
    "tab": "\t=1+1",
    "bidi-override": "invoice\u202egnp.exe",
    "bidi-isolate": "\u2066=isolated\u2069",
    "esc": "\x1b[31mred\x1b[0m \x1b]8;;http://evil.example\x07link\x1b]8;;\x07",
    "c1-csi": "\x9b31mcsi",
}
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# C0 and C1 controls (DEL included) and the bidi embeddings, overrides and isolates.
TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
LINE_BREAK = re.compile(r"\r\n|\r|\n")
REPORT_ROWS = 100  # the panel's top lists then hold every user and model of this test


def hook_ids(index: int) -> tuple[str, str]:
    return f"hook-msg-{index:02d}", f"hook-user-{index:02d}"


def raw_ids(index: int) -> tuple[str, str]:
    return f"raw-msg-{index:02d}", f"raw-user-{index:02d}"


def stream_chunks(generation_id: str, provider: str, usage: dict[str, Any]) -> list[dict[str, Any]]:
    # No "model" key: the served model is then the request's model id, which carries the payload.
    envelope = {"id": generation_id, "provider": provider, "object": "chat.completion.chunk"}
    return [
        {**envelope, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
        {**envelope, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**envelope, "choices": [], "usage": usage},
    ]


async def record_through_hooks(plugin: types.ModuleType, url: str) -> None:
    """One streamed turn per payload, the payload as user name, model id and provider."""
    for index, payload in enumerate(PAYLOADS.values()):
        message_id, user_id = hook_ids(index)
        usage = {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "cost": (index + 1) / 1000,
            "is_byok": False,
        }
        user = {"id": user_id, "name": payload, "email": f"{user_id}@example.com", "role": "user"}
        driver = HookDriver(plugin, valves={"database_url": url, "report_rows": REPORT_ROWS}, user=user)
        request = {"model": payload, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        metadata = {"chat_id": f"chat-{index}", "message_id": message_id, "session_id": "s"}
        outlet = outlet_body(
            request, "Hi", owui_merge_usage(None, usage), message_id=message_id, chat_id=f"chat-{index}"
        )
        chunks = stream_chunks(f"gen-{message_id}", payload, usage)
        await driver.run(request, chunks, outlet, metadata, EmitterRecorder())


def add_to_rollup(
    conn: sa.Connection, table: sa.Table, key: dict[str, str], measures: dict[str, int]
) -> None:
    """Count one row into a rollup as a plain SQL writer would: add to the key's row, or create it."""
    match = sa.and_(*(table.c[name] == value for name, value in key.items()))
    increments = {name: table.c[name] + value for name, value in measures.items()}
    if conn.execute(table.update().where(match).values(increments)).rowcount == 0:
        conn.execute(table.insert().values(**key, **measures))


def insert_raw_rows(plugin: types.ModuleType, url: str) -> None:
    """Each payload as a ledger row, users row and rollup rows written straight with SQL, control
    characters and all, counted in the zone the ledger keeps its rollups in (UTC here)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    day = now.date().isoformat()
    with plugin.ledger_for(url).engine.begin() as conn:
        zone = conn.execute(
            sa.text("SELECT value FROM openrouter_usage_meta WHERE key = 'rollup_timezone'")
        ).scalar_one()
        assert zone == "UTC"
        for index, payload in enumerate(PAYLOADS.values()):
            message_id, user_id = raw_ids(index)
            cost = (index + 1) * 10**9
            served_model = payload + " (raw)"  # the hook rows' rollup keys stay distinct
            values = {
                "created_at": now,
                "user_id": user_id,
                "user_name": payload,
                "chat_id": payload,
                "message_id": message_id,
                "generation_key": f"gen-{message_id}",
                "generation_ids": json.dumps([f"gen-{message_id}"]),
                "model": payload,
                "served_model": served_model,
                "provider": payload,
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "total_tokens": 15,
                "cached_tokens": 0,
                "cache_write_tokens": 0,
                "reasoning_tokens": 0,
                "cost_pico": cost,
                "upstream_cost_pico": cost,
                "spend_pico": cost,
                "is_byok": False,
                "status": "ok",
                "error": payload,
                "latency_ms": 100,
                "ttft_ms": 10,
                "usage_json": json.dumps({"cost": cost / 1e12, "note": payload}),
            }
            conn.execute(plugin.ledger_table.insert().values(values))
            conn.execute(
                plugin.users_table.insert().values(user_id=user_id, user_name=payload, last_seen_at=now)
            )
            measures = dict.fromkeys(plugin.MEASURES, 0) | {
                "requests": 1,
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "total_tokens": 15,
                "cost_pico": cost,
                "upstream_cost_pico": cost,
                "spend_pico": cost,
            }
            keys = [
                (plugin.rollup_day_table, {}),
                (plugin.rollup_user_day_table, {"user_id": user_id}),
                (plugin.rollup_model_day_table, {"served_model": served_model, "provider": payload}),
            ]
            for table, extra in keys:
                add_to_rollup(conn, table, {"zone": zone, "day": day, **extra}, measures)


@pytest.fixture
async def hostile_ledger(plugin: types.ModuleType, database_url: str) -> str:
    """A ledger holding every payload twice: through the hooks, and as raw rows."""
    await record_through_hooks(plugin, database_url)
    insert_raw_rows(plugin, database_url)
    return database_url


RECORDS = 2 * len(PAYLOADS)


def run_cli(plugin: types.ModuleType, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = plugin.cli_main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


# ── Markdown ──

_ESCAPED = re.compile(r"\\[!-/:-@\[-`{-~]")
_CODE_SPAN = re.compile(r"`[^`]*`")


def live_markdown(text: str) -> str:
    """`text` with what Markdown shows literally blanked out: backslash-escaped punctuation, then
    code spans. What remains is what a renderer would interpret."""
    return _CODE_SPAN.sub(lambda m: "_" * len(m.group()), _ESCAPED.sub("__", text))


LIVE_CONSTRUCTS = {
    "html or autolink": re.compile(r"<[A-Za-z/!?]"),
    "link": re.compile(r"\]\("),
    "image": re.compile(r"!\["),
    "bare url": re.compile(r"(?i)\b(?:https?|ftp|javascript|data|vbscript):|\bwww\."),
}


def markdown_tables(markdown: str) -> list[list[str]]:
    """Blocks of consecutive lines that start with a pipe."""
    tables: list[list[str]] = []
    previous_was_row = False
    for line in markdown.split("\n"):
        is_row = line.startswith("|")
        if is_row:
            if previous_was_row:
                tables[-1].append(line)
            else:
                tables.append([line])
        previous_was_row = is_row
    return tables


def unescaped_pipes(line: str) -> int:
    return live_markdown(line).count("|")


async def test_the_panel_markdown_keeps_every_payload_inert(
    plugin: types.ModuleType, hostile_ledger: str
) -> None:
    """Proves: the settings panel shows every hostile user and model in its tables with no live
    link, image, HTML or URL, and no payload adds a cell or breaks a row."""
    markdown = plugin.admin_report_markdown()
    live = live_markdown(markdown)
    found = {name: pattern.findall(live) for name, pattern in LIVE_CONSTRUCTS.items()}
    tables = markdown_tables(markdown)
    widths = [[unescaped_pipes(line) for line in table] for table in tables]
    invisible = sum(1 for c in markdown if unicodedata.category(c) in ("Cc", "Cf") and c != "\n")
    print(
        f"\npanel: {len(markdown)} chars, {len(tables)} tables with {[len(t) - 2 for t in tables]} rows, "
        f"unescaped pipes per row {[sorted(set(w)) for w in widths]}, live constructs "
        f"{ {name: len(hits) for name, hits in found.items()} }, control/format characters {invisible}"
    )
    assert not any(found.values()), found
    assert len(tables) == 3, markdown  # periods, top users, top models
    for table, counts in zip(tables, widths, strict=True):
        assert len(set(counts)) == 1, "\n".join(table)
        assert re.fullmatch(r"\|(?::?-+:?\|)+", table[1]), table[1]  # the delimiter row
    users_rows, models_rows = len(tables[1]) - 2, len(tables[2]) - 2
    assert users_rows == models_rows == RECORDS, "one table row per hostile user and per model"


# ── CSV ──


def formula_starts(cell: str) -> list[str]:
    """The lines of `cell` (the whole cell first) that a spreadsheet would run as a formula."""
    return [line for line in LINE_BREAK.split(cell) if line.startswith(FORMULA_STARTS)]


async def test_the_csv_export_has_one_quoted_row_per_record_and_no_formula(
    plugin: types.ModuleType, hostile_ledger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Proves: the CSV export parses into exactly one row per record (line breaks inside cells are
    quoted, bare CR included) and no cell, nor any line inside one, starts like a formula."""
    out = run_cli(plugin, capsys, "export", "--format", "csv", "--database-url", hostile_ledger)
    header, *rows = list(csv.reader(io.StringIO(out, newline="")))
    ragged = [row for row in rows if len(row) != len(header)]
    whole = [dict(zip(header, row, strict=True)) for row in rows if len(row) == len(header)]
    formulas = [
        (row["message_id"], field, cell)
        for row in whole
        for field, cell in row.items()
        if formula_starts(cell)
    ]
    print(
        f"\ncsv: {len(out)} chars, {out.count(chr(10))} LF and {out.count(chr(13))} CR in the text, "
        f"{len(rows)} rows parsed for {RECORDS} records, {len(ragged)} ragged, "
        f"{len(formulas)} cells with a formula start"
    )
    assert not ragged, f"{len(ragged)} rows split or merged, e.g. {ragged[:3]}"
    expected = sorted(
        [hook_ids(i)[0] for i in range(len(PAYLOADS))] + [raw_ids(i)[0] for i in range(len(PAYLOADS))]
    )
    assert sorted(row["message_id"] for row in whole) == expected
    assert len(rows) == RECORDS
    assert not formulas, formulas[:5]
    by_id = {row["message_id"]: row for row in whole}
    for index, payload in enumerate(PAYLOADS.values()):
        raw_name = by_id[raw_ids(index)[0]]["user_name"]
        # The stored text, line breaks included, survives; only apostrophes are added.
        assert LINE_BREAK.split(raw_name.replace("'", "")) == LINE_BREAK.split(payload.replace("'", ""))


# ── CLI table ──


def breakdown_lines(out: str, by: str) -> list[str]:
    """The data lines of the table under "By <by>, since …:" (after its header and rule)."""
    lines = out.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"By {by}, since "))
    body = lines[start + 4 :]  # the heading, a blank line, the column names, the rule
    return body[:-1] if body and body[-1] == "" else body


@pytest.mark.parametrize("by", ["user", "model"])
async def test_the_cli_table_has_no_control_characters_and_one_line_per_row(
    plugin: types.ModuleType, hostile_ledger: str, capsys: pytest.CaptureFixture[str], by: str
) -> None:
    """Proves: `report --format table --by user|model` prints no C0/C1 control character and no
    bidi override or isolate (nothing can drive or reorder the admin's terminal), and exactly one
    line per row of the breakdown."""
    out = run_cli(plugin, capsys, "report", "--format", "table", "--by", by, "--database-url", hostile_ledger)
    as_json = json.loads(
        run_cli(plugin, capsys, "report", "--format", "json", "--by", by, "--database-url", hostile_ledger)
    )
    unsafe = sorted({f"U+{ord(c):04X}" for c in TERMINAL_UNSAFE.findall(out.replace("\n", ""))})
    lines = breakdown_lines(out, by)
    expected_rows = len(as_json["breakdown"]["rows"])
    print(
        f"\ncli table by {by}: {len(out.splitlines())} lines, {len(lines)} breakdown lines for "
        f"{expected_rows} rows, unsafe characters {unsafe or 'none'}"
    )
    assert not unsafe, unsafe
    assert expected_rows == RECORDS  # every hostile user (or model and provider) is its own row
    assert len(lines) == expected_rows, "\n".join(lines)
