"""The tables the migrations build are the tables the plugin declares (`schema`), on both engines.

The migrations are frozen SQL, written once per release; the declared tables are what the code reads
and writes through. This compares the two with SQLAlchemy's inspector: same tables, columns,
nullability, generic column types, primary keys, unique constraints and indexes.
"""

from __future__ import annotations

import types

import sqlalchemy as sa

from tests.reliability.schema_shape import schema_differences


def test_a_freshly_migrated_ledger_matches_the_declared_schema(
    plugin: types.ModuleType, database_url: str
) -> None:
    """Migrating an empty database builds exactly the declared tables: same columns, nullability,
    generic types, primary keys, unique constraints and indexes, on SQLite and PostgreSQL."""
    plugin.ledger_for(database_url).ensure_schema()
    differences = schema_differences(plugin, database_url)
    engine_name = sa.engine.make_url(database_url).get_backend_name()
    print(f"\nschema: {len(plugin.schema.tables)} declared tables compared on {engine_name}")
    assert not differences, "the migrated database differs from the declared schema:\n" + "\n".join(
        differences
    )
