"""The throwaway PostgreSQL fixtures from tests/pg.py work: round trip, fresh databases, outage."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from tests.pg import PostgresServer

pytestmark = pytest.mark.postgres

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(50), nullable=False),
)


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    eng = create_engine(pg_url, connect_args={"connect_timeout": 2})
    try:
        yield eng
    finally:
        eng.dispose()


def test_url_points_at_the_session_server(postgres_server: PostgresServer, pg_url: str) -> None:
    assert pg_url.startswith(f"postgresql+psycopg://postgres@127.0.0.1:{postgres_server.port}/test_")
    assert postgres_server.running()


def test_round_trip(engine: Engine) -> None:
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(items.insert(), [{"name": "alpha"}, {"name": "beta"}])
    with engine.connect() as conn:
        assert conn.execute(select(items.c.name).order_by(items.c.id)).scalars().all() == ["alpha", "beta"]
        assert conn.dialect.name == "postgresql"
        assert conn.dialect.driver == "psycopg"


def test_each_test_gets_a_fresh_empty_database(engine: Engine) -> None:
    # test_round_trip created "items" in its own database; this one must not see it.
    assert inspect(engine).get_table_names() == []


def test_stop_start_keeps_data_and_outage_fails_fast(postgres_server: PostgresServer, engine: Engine) -> None:
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(items.insert(), [{"name": "survives"}])
    engine.dispose()
    port = postgres_server.port

    postgres_server.stop()
    try:
        assert not postgres_server.running()
        started = time.monotonic()
        with pytest.raises(OperationalError), engine.connect():
            pass
        assert time.monotonic() - started < 5
    finally:
        postgres_server.start()

    assert postgres_server.running()
    assert postgres_server.port == port
    with engine.connect() as conn:
        assert conn.execute(select(items.c.name)).scalars().all() == ["survives"]


def test_server_is_usable_after_the_outage_test(engine: Engine) -> None:
    with engine.connect() as conn:
        assert conn.exec_driver_sql("select 1").scalar() == 1
