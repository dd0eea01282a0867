"""A throwaway, durable PostgreSQL server for the benchmarks, started with tests/pg.py's machinery.

tests/pg.py starts the server for the test suite with fsync and synchronous_commit off; a write
benchmark compared with durable SQLite needs them on, so this starts it with those options
(passed after pytest-postgresql's own `-F`, later options win) and checks them with SHOW.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import Any

from bench.common import REPO, progress

DURABLE_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c full_page_writes=on "
    "-c max_connections=100"
)


class PostgresUnavailableError(Exception):
    pass


def _bindir() -> Any:
    from tests import pg

    bindir = pg.find_bindir()
    if bindir is None:
        script = REPO / "scripts" / "ensure-postgres.sh"
        progress("PostgreSQL binaries not found; running scripts/ensure-postgres.sh")
        completed = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
        bindir = pg.find_bindir()
        if bindir is None:
            raise PostgresUnavailableError(
                f"PostgreSQL server binaries not found: {completed.stderr.strip()[-300:]}"
            )
    return bindir


@contextlib.contextmanager
def durable_postgres() -> Iterator[Any]:
    """A running tests.pg.PostgresServer with fsync=on and synchronous_commit=on; removed on exit."""
    from tests import pg

    bindir = _bindir()
    original = pg.SERVER_OPTIONS
    pg.SERVER_OPTIONS = DURABLE_OPTIONS  # read by PostgresServer._make_executor at start
    try:
        server = pg.start_server(bindir)
    finally:
        pg.SERVER_OPTIONS = original
    try:
        with server.connect() as conn:
            settings = {name: _show(conn, name) for name in ("fsync", "synchronous_commit")}
        if settings != {"fsync": "on", "synchronous_commit": "on"}:
            raise PostgresUnavailableError(f"server is not durable: {settings}")
        yield server
    finally:
        server.cleanup()


def _show(conn: Any, name: str) -> str:
    row = conn.execute(f"SHOW {name}").fetchone()
    return str(row[0]) if row else ""


def server_version(server: Any) -> str:
    with server.connect() as conn:
        return _show(conn, "server_version")
