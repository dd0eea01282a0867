"""How a database's tables differ from the tables the plugin declares (`schema`), compared with
SQLAlchemy's inspector: same tables, columns, nullability, generic column types, primary keys,
unique constraints and indexes. Used by test_schema.py (a fresh migration) and
test_upgrade_from_releases.py (ledgers upgraded from releases 1.0.0 and 1.1.0)."""

from __future__ import annotations

import types
from typing import Any

import sqlalchemy as sa


def generic_type(column_type: Any, dialect: sa.Dialect) -> str:
    """The generic SQLAlchemy type of a column type as this dialect stores it, by class name (BIGINT
    and TIMESTAMP WITHOUT TIME ZONE are BigInteger and DateTime; a variant resolves for the dialect)."""
    return type(column_type.dialect_impl(dialect).as_generic()).__name__


def declared_shape(table: sa.Table, dialect: sa.Dialect) -> dict[str, Any]:
    return {
        "columns": {
            column.name: (column.nullable, generic_type(column.type, dialect)) for column in table.columns
        },
        "primary_key": [column.name for column in table.primary_key.columns],
        "unique": sorted(
            (constraint.name, tuple(column.name for column in constraint.columns))
            for constraint in table.constraints
            if isinstance(constraint, sa.UniqueConstraint)
        ),
        "indexes": sorted(
            (index.name, tuple(column.name for column in index.columns), bool(index.unique))
            for index in table.indexes
        ),
    }


def stored_shape(inspector: sa.Inspector, name: str, dialect: sa.Dialect) -> dict[str, Any]:
    return {
        "columns": {
            column["name"]: (column["nullable"], generic_type(column["type"], dialect))
            for column in inspector.get_columns(name)
        },
        "primary_key": inspector.get_pk_constraint(name)["constrained_columns"],
        "unique": sorted(
            (constraint["name"], tuple(constraint["column_names"]))
            for constraint in inspector.get_unique_constraints(name)
        ),
        # PostgreSQL lists the index behind each unique constraint too; it is compared above.
        "indexes": sorted(
            (index["name"], tuple(index["column_names"]), bool(index["unique"]))
            for index in inspector.get_indexes(name)
            if not index.get("duplicates_constraint")
        ),
    }


def schema_differences(plugin: types.ModuleType, url: str) -> list[str]:
    """How the database at `url` differs from the plugin's declared schema (empty: not at all)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            stored_tables = set(inspector.get_table_names())
            declared_tables = set(plugin.schema.tables)
            differences = [
                f"table {name} is not declared" for name in sorted(stored_tables - declared_tables)
            ]
            differences += [f"table {name} is missing" for name in sorted(declared_tables - stored_tables)]
            for name in sorted(stored_tables & declared_tables):
                declared = declared_shape(plugin.schema.tables[name], conn.dialect)
                stored = stored_shape(inspector, name, conn.dialect)
                declared_columns, stored_columns = declared.pop("columns"), stored.pop("columns")
                differences += [
                    f"{name}.{column}: declared (nullable, type) {declared_columns.get(column)}, "
                    f"stored {stored_columns.get(column)}"
                    for column in sorted(declared_columns.keys() | stored_columns.keys())
                    if declared_columns.get(column) != stored_columns.get(column)
                ]
                differences += [
                    f"{name} {aspect}: declared {declared[aspect]!r}, stored {stored[aspect]!r}"
                    for aspect in declared
                    if declared[aspect] != stored[aspect]
                ]
            return differences
    finally:
        engine.dispose()
