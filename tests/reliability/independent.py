"""What the reliability tests know about the ledger without asking the plugin: its measures, its
rollup tables and their keys, the columns release 1.0.0 created, the rollups recomputed by a full
scan, and release 1.0.0 itself, read from git history.

These facts are restated here on purpose instead of imported from the plugin (`MEASURES`,
`ROLLUP_TABLES`, `local_day`, ...). The tests use them to decide what the database must hold; taken
from the plugin, a measure it dropped or a rollup it keyed wrongly would be in the expected values
too, and the comparison would pass. Written out once here, they are the yardstick the plugin is
measured against, and every test that needs them imports them from this one place.

Nothing here imports the plugin or pytest: tests/reliability/kill9_worker.py imports this module in
every restarted writer, on the test's clock, and bench/ loads release 1.0.0 through it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
import uuid
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parents[2]
RELEASE_1_0_0 = "c1e0c470cd094514d939eb625a07777db109ddff"
RELEASE_1_1_0 = "7869ba1f39ddac3f4031e26e2ca83d5298317004"  # the last commit of 1.1.0: a row per message

# ── the schema, restated ──

TOKEN_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
MONEY_COLUMNS = ("cost_pico", "upstream_cost_pico", "spend_pico")  # integer pico-dollars
# What every rollup row sums, in order: one per record, one per failed record, then the ledger's own.
MEASURES = ("requests", "failed", *TOKEN_COLUMNS, *MONEY_COLUMNS)
ROLLUP_KEYS = {
    "openrouter_usage_rollup_day": ("day",),
    "openrouter_usage_rollup_user_day": ("day", "user_id"),
    "openrouter_usage_rollup_model_day": ("day", "served_model", "provider"),
}
# The ledger's columns as release 1.0.0 created them; every later schema keeps them all.
LEDGER_COLUMNS_1_0_0 = (
    "id",
    "created_at",
    "user_id",
    "user_name",
    "chat_id",
    "message_id",
    "generation_ids",
    "model",
    "served_model",
    "provider",
    *TOKEN_COLUMNS,
    *MONEY_COLUMNS,
    "is_byok",
    "status",
    "error",
    "latency_ms",
    "ttft_ms",
    "usage_json",
)

# ── the rollups, recounted ──

Rollups = dict[str, dict[tuple[str, ...], tuple[int, ...]]]  # table -> key values -> MEASURES


def local_day(created_at: Any, zone: ZoneInfo) -> str:
    """The calendar day in `zone` of a stored created_at (naive UTC; SQLite hands it over as text)."""
    moment = datetime.fromisoformat(created_at) if isinstance(created_at, str) else created_at
    return moment.replace(tzinfo=UTC).astimezone(zone).date().isoformat()


def scanned_rollups(rows: Iterable[Any], zone: ZoneInfo) -> Rollups:
    """What every rollup must hold for the days of `zone`, recomputed the slow way from the ledger
    rows (anything indexable by column name: a dict, a sqlite3.Row)."""
    sums: dict[str, dict[tuple[str, ...], list[int]]] = {
        table: defaultdict(lambda: [0] * len(MEASURES)) for table in ROLLUP_KEYS
    }
    for row in rows:
        keyed = {
            "day": local_day(row["created_at"], zone),
            "user_id": row["user_id"],
            "served_model": row["served_model"],
            "provider": row["provider"],
        }
        values = [1, int(row["status"] == "error"), *(int(row[name] or 0) for name in MEASURES[2:])]
        for table, keys in ROLLUP_KEYS.items():
            bucket = sums[table][tuple(keyed[key] for key in keys)]
            bucket[:] = [total + value for total, value in zip(bucket, values, strict=True)]
    return {table: {key: tuple(bucket) for key, bucket in buckets.items()} for table, buckets in sums.items()}


# ── plugin versions, loaded as Open WebUI loads a function ──


def load_source(source: str, filename: str | None = None) -> types.ModuleType:
    """`source` exec'd into a fresh module, as Open WebUI loads a function (a new module name,
    registered in sys.modules, no __file__), so two versions loaded in one process share no module
    globals. The code is compiled under `filename` when given (tests.factories.load_plugin_module
    names the plugin's real path, for coverage), else under a name of its own."""
    name = f"function_openrouter_usage_{uuid.uuid4().hex}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, filename or f"<function {name}>", "exec"), module.__dict__)  # noqa: S102 (as Open WebUI does)
    return module


def release_source(commit: str = RELEASE_1_0_0) -> str:
    """The plugin as released at `commit`, from this repository's history (whatever the working
    tree holds now)."""
    git = shutil.which("git")
    if git is None:
        raise RuntimeError("git is not installed: released plugins are read from this repository's history")
    shown = subprocess.run(
        [git, "-C", str(REPO), "show", f"{commit}:plugin/openrouter_usage.py"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if shown.returncode != 0:
        raise RuntimeError(
            f"release commit {commit} is not in the clone at {REPO} (a shallow clone?): "
            f"{shown.stderr.strip()}"
        )
    return shown.stdout


def load_release(commit: str = RELEASE_1_0_0) -> types.ModuleType:
    """A released plugin, loaded as Open WebUI loads it."""
    return load_source(release_source(commit))


def load_release_1_0_0() -> types.ModuleType:
    """Release 1.0.0 of the plugin, loaded as Open WebUI loads it."""
    return load_release(RELEASE_1_0_0)


# ── records ──


def successful_record(
    module: types.ModuleType,
    message_id: str,
    name: str,
    *,
    generation_id: str,
    served_model: str,
    provider: str,
    tokens: tuple[int, int],
    cost_pico: int,
    latency_ms: int,
    ttft_ms: int,
    created_at: datetime,
    **overrides: Any,
) -> Any:
    """One successful completion of one generation, through `module`'s own UsageRecord (1.0.0's or
    the current one): user and chat named after `name`, usage of `tokens` (prompt, completion)."""
    prompt, completion = tokens
    fields: dict[str, Any] = {
        "message_id": message_id,
        "chat_id": f"chat-{name.lower()}",
        "user_id": f"user-{name.lower()}",
        "user_name": name,
        "generation_ids": (generation_id,),
        "model": "openrouter/auto",
        "served_model": served_model,
        "provider": provider,
        "usage": module.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cost_pico=cost_pico,
        ),
        "status": "ok",
        "error": "",
        "latency_ms": latency_ms,
        "ttft_ms": ttft_ms,
        "raw_usage": {"prompt_tokens": prompt, "completion_tokens": completion, "cost": cost_pico / 10**12},
        "created_at": created_at,
    }
    return module.UsageRecord(**(fields | overrides))
