"""What the rollups must hold, counted from the ledger rows through the plugin's own measures, and
what they do hold: the unit tests' check that the rollups stay equal to a full scan."""

from __future__ import annotations

import types
from collections import defaultdict
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa


def scan_rollups(plugin: types.ModuleType, url: str, zone: ZoneInfo) -> list[dict[Any, dict[str, int]]]:
    """What the rollups must hold, computed the slow way: a full scan of the ledger."""
    expected: list[dict[Any, dict[str, int]]] = [
        defaultdict(lambda: dict.fromkeys(plugin.MEASURES, 0)) for _ in plugin.ROLLUP_TABLES
    ]
    with plugin.ledger_for(url).engine.connect() as conn:
        for row in conn.execute(sa.select(plugin.ledger_table)):
            r = row._mapping
            day = plugin.local_day(r["created_at"], zone)
            measures = {
                "requests": 1,
                "failed": int(r["status"] == "error"),
                **{m: int(r[m] or 0) for m in plugin.MEASURES[2:]},
            }
            for index, key in enumerate(
                ((day,), (day, r["user_id"]), (day, r["served_model"], r["provider"]))
            ):
                for name, value in measures.items():
                    expected[index][key][name] += value
    return [dict(e) for e in expected]


def stored_rollups(plugin: types.ModuleType, url: str) -> list[dict[Any, dict[str, int]]]:
    """The rollups of the zone the ledger keeps them in, keyed without the zone; no other zone's
    rows may be left over."""
    stored = []
    with plugin.ledger_for(url).engine.connect() as conn:
        state = plugin.read_rollup_state(conn)
        assert state.recount_zone is None, "a recount is still running"
        for table in plugin.ROLLUP_TABLES:
            keys = [column.name for column in table.primary_key.columns]
            rows = list(conn.execute(sa.select(table)))
            assert {row._mapping["zone"] for row in rows} <= {state.zone}
            stored.append(
                {
                    tuple(row._mapping[k] for k in keys[1:]): {
                        m: int(row._mapping[m]) for m in plugin.MEASURES
                    }
                    for row in rows
                }
            )
    return stored
