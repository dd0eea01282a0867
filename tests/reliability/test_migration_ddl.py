"""Released migrations are frozen: the SQL each one runs, on each engine, is the SQL it ran when
it was released.

`migrations_ddl.json` beside this file holds that SQL, migration by migration. An old ledger is
upgraded by replaying exactly these statements, so a change to a released migration (for example
one that follows a live column list) would build another schema on old ledgers than on new ones.
A new migration is added to the snapshot once, by hand, when it is released.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).with_name("migrations_ddl.json")


def emitted(plugin: types.ModuleType) -> dict[str, dict[str, list[str]]]:
    return {m.name: {"sqlite": list(m.sqlite), "postgresql": list(m.postgresql)} for m in plugin.MIGRATIONS}


def test_every_released_migration_runs_the_sql_it_was_released_with(plugin: types.ModuleType) -> None:
    """Each migration in the snapshot emits the same statements, in the same order, on SQLite and
    PostgreSQL; migrations keep their order; and every migration the code has is in the snapshot."""
    frozen: dict[str, Any] = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    now = emitted(plugin)
    assert list(now)[: len(frozen)] == list(frozen), "released migrations were renamed, removed or reordered"
    changed = [
        f"{name} ({dialect})"
        for name, statements in frozen.items()
        for dialect in ("sqlite", "postgresql")
        if now[name][dialect] != statements[dialect]
    ]
    assert not changed, f"released migrations changed: {changed}; add a new migration instead"
    unreleased = [name for name in now if name not in frozen]
    assert not unreleased, f"record the SQL of {unreleased} in {SNAPSHOT.name} when releasing it"


def test_the_snapshot_would_catch_a_migration_that_follows_a_live_column_list(
    plugin: types.ModuleType,
) -> None:
    """The check can fail: a rollup migration built from one more measure emits other SQL."""
    frozen = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    grown = plugin._frozen_rollup_ddl(
        "openrouter_usage_rollup_day", ("day",), (*plugin._MEASURES_1_0, "new_measure"), " WITHOUT ROWID"
    )
    assert grown not in frozen["0002_daily_rollups"]["sqlite"]
    assert frozen["0002_daily_rollups"]["sqlite"][0] == plugin._frozen_rollup_ddl(
        "openrouter_usage_rollup_day", ("day",), plugin._MEASURES_1_0, " WITHOUT ROWID"
    )
