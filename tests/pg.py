"""Throwaway PostgreSQL server for the tests (a pytest plugin: ``pytest_plugins = ["tests.pg"]``).

One server per test session, started from the machine's own PostgreSQL binaries on a free
loopback port with its data directory in a fresh temp dir. Process management is
pytest-postgresql's :class:`PostgreSQLExecutor` (initdb / ``pg_ctl start -w`` / ``pg_ctl stop``);
this module only adds binary discovery, the root workaround and the fixtures.

Fixtures:

* ``postgres_server`` (session): a :class:`PostgresServer` with ``url_for(dbname)``, ``stop()``,
  ``stop_immediately()`` (a crash-like stop), ``start()`` (same data dir, same port),
  ``running()``, ``port``, ``host``, ``user``.
* ``pg_url`` (function): SQLAlchemy URL of a fresh empty database, dropped afterwards.

Binaries are looked up in ``$PG_BINDIR``, on ``PATH`` and in ``/usr/lib/postgresql/*/bin``.
When they are missing the tests are skipped, except under ``CI=true``: there
``scripts/ensure-postgres.sh`` is run to install them and a still-missing PostgreSQL fails.

Running as root: ``initdb`` and ``postgres`` refuse to run as root. In that case the executable
handed to pytest-postgresql is a tiny generated wrapper around the real ``pg_ctl`` that drops to
the unprivileged ``postgres`` system user (created if missing) with ``setpriv`` (or ``runuser``).
Every pg_ctl call pytest-postgresql makes (``--version``, ``initdb``, ``start``, ``status``,
``stop``) goes through it, and the temp dir holding data, socket and log is owned by that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import psycopg
import pytest
from mirakuru.exceptions import AlreadyRunning, ProcessExitedWithError, ProcessFinishedWithError
from psycopg import sql
from pytest_postgresql.executors import PostgreSQLExecutor

HOST = "127.0.0.1"
SUPERUSER = "postgres"  # database role created by initdb; unrelated to the OS user below
MAINTENANCE_DB = "postgres"
SERVICE_USER = "postgres"  # OS user the server runs as when the tests run as root
ENSURE_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ensure-postgres.sh"
# Loopback only; -F (fsync off) is already set by pytest-postgresql. Durability is irrelevant here.
SERVER_OPTIONS = "-c listen_addresses=127.0.0.1 -c full_page_writes=off -c synchronous_commit=off"
START_TIMEOUT = 60
_REQUIRED_BINARIES = ("pg_ctl", "initdb", "postgres")


# --------------------------------------------------------------------------- binary discovery


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """Directory holding pg_ctl, initdb and postgres, or None."""
    candidates: list[Path] = []
    if env_dir := os.environ.get("PG_BINDIR"):
        candidates.append(Path(env_dir))
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).resolve().parent)
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True))
    return next((c for c in candidates if _has_server_binaries(c)), None)


def _is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _require_bindir() -> Path:
    """Find the binaries; under CI install them. Skips (or fails under CI) when unavailable."""
    bindir = find_bindir()
    if bindir is not None:
        return bindir
    if not _is_ci():
        pytest.skip(
            "PostgreSQL server binaries (pg_ctl, initdb, postgres) not found; "
            "run scripts/ensure-postgres.sh or set PG_BINDIR"
        )
    detail = ""
    if ENSURE_SCRIPT.is_file():
        proc = subprocess.run(
            ["bash", str(ENSURE_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
        )
        detail = f"\nensure-postgres.sh exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        bindir = find_bindir()
        if bindir is not None:
            return bindir
    pytest.fail(f"CI=true but PostgreSQL server binaries are not available{detail}", pytrace=False)


# --------------------------------------------------------------------------- root workaround


def _service_account() -> pwd.struct_passwd:
    """The unprivileged OS user that runs the server when we are root; created if missing."""
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            SERVICE_USER,
        ],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(SERVICE_USER)


def _traversable_by_others(path: Path) -> bool:
    """Whether every directory from / down to path is searchable by an unrelated user."""
    path = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def _temp_parent() -> Path:
    parent = Path(tempfile.gettempdir())
    if os.geteuid() == 0 and not _traversable_by_others(parent):
        return Path("/tmp")  # noqa: S108 (sticky, world-writable; the service user can reach it)
    return parent


def _write_pg_ctl_wrapper(path: Path, real_pg_ctl: Path, account: pwd.struct_passwd, home: Path) -> None:
    """Write an executable that runs the real pg_ctl as ``account`` with all arguments unchanged."""
    if setpriv := shutil.which("setpriv"):
        # setpriv execs in place: no extra process between pytest-postgresql and pg_ctl.
        drop = [setpriv, f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", "--"]
    elif runuser := shutil.which("runuser"):
        drop = [runuser, "-u", account.pw_name, "--"]
    else:
        raise RuntimeError("running as root, but neither setpriv nor runuser is available to drop privileges")
    command = " ".join(shlex.quote(part) for part in [*drop, str(real_pg_ctl)])
    path.write_text(
        "#!/bin/sh\n"
        "# Generated by tests/pg.py: PostgreSQL refuses to run as root, so run pg_ctl as"
        f" {account.pw_name}.\n"
        f"cd {shlex.quote(str(home))} || exit 1\n"
        f"HOME={shlex.quote(str(home))}\n"
        "export HOME\n"
        f'exec {command} "$@"\n'
    )
    path.chmod(0o755)


# --------------------------------------------------------------------------- the server


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """A throwaway PostgreSQL server driven by pytest-postgresql's executor.

    ``stop()`` / ``start()`` stop and restart the server process on the same port with the same
    data directory, for outage tests. ``executor`` is the underlying
    :class:`pytest_postgresql.executors.PostgreSQLExecutor`.
    """

    host: str
    user: str
    startup_seconds: float = 0.0

    def __init__(self, bindir: Path, base_dir: Path, work_dir: Path, pg_ctl: Path) -> None:
        self.bindir = bindir
        self.base_dir = base_dir
        self.host = HOST
        self.user = SUPERUSER
        self.datadir = work_dir / "data"
        self.socket_dir = work_dir / "socket"
        self.logfile = work_dir / "postgresql.log"
        self._pg_ctl = pg_ctl
        self.executor = self._make_executor(_free_loopback_port())

    def _make_executor(self, port: int) -> PostgreSQLExecutor:
        return PostgreSQLExecutor(
            executable=str(self._pg_ctl),
            host=self.host,
            port=port,
            datadir=str(self.datadir),
            unixsocketdir=str(self.socket_dir),
            logfile=str(self.logfile),
            startparams="-w",
            dbname=MAINTENANCE_DB,
            user=self.user,
            timeout=START_TIMEOUT,
            postgres_options=SERVER_OPTIONS,
        )

    @property
    def port(self) -> int:
        return self.executor.port

    def url_for(self, dbname: str, **query: str | int) -> str:
        """SQLAlchemy URL (psycopg 3 driver) for ``dbname``; ``query`` adds URL parameters."""
        user, db = quote(self.user, safe=""), quote(dbname, safe="")
        url = f"postgresql+psycopg://{user}@{self.host}:{self.port}/{db}"
        return f"{url}?{urlencode(query)}" if query else url

    def connect(self, dbname: str = MAINTENANCE_DB, *, connect_timeout: int = 5) -> psycopg.Connection:
        """Plain autocommit psycopg connection (for admin work in tests)."""
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=dbname,
            connect_timeout=connect_timeout,
            autocommit=True,
        )

    def running(self) -> bool:
        return self.executor.running()

    def launch(self) -> None:
        """First start (initdb + start); retries on a new port if the chosen one was taken meanwhile."""
        for attempt in range(3):
            try:
                self._start_executor()
            except AlreadyRunning:  # something else answered on the port before we started
                pass
            except ProcessExitedWithError:
                if "could not bind" not in self.log_tail():
                    raise
            else:
                return
            if attempt == 2:
                raise RuntimeError("could not find a free loopback port for PostgreSQL")
            self.executor = self._make_executor(_free_loopback_port())

    def start(self) -> None:
        """Start the server again (same port, same data). No-op when it is running."""
        if not self.running():
            self._start_executor()

    def _start_executor(self) -> None:
        # mirakuru returns as soon as the port accepts connections; also let ``pg_ctl start -w``
        # finish, so that its verdict counts and a quick stop() does not race its polling loop.
        self.executor.start()
        launcher = self.executor.process
        if launcher is not None and launcher.wait(timeout=START_TIMEOUT) != 0:
            raise RuntimeError(f"pg_ctl start exited with {launcher.returncode}")

    def stop(self) -> None:
        """Stop the server (fast shutdown), keeping its data. No-op when it is stopped."""
        if self.running():
            self.executor.stop()

    def stop_immediately(self) -> None:
        """Stop the server as a crash would (``pg_ctl stop -m immediate``): every backend is cut off
        without a checkpoint and the next ``start()`` runs crash recovery. No-op when it is stopped."""
        if not self.running():
            return
        subprocess.run(
            [str(self._pg_ctl), "stop", "-D", str(self.datadir), "-m", "immediate"],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT,
        )
        # mirakuru still holds the `pg_ctl start` launcher (long exited); until it lets go of it,
        # executor.start() would not launch anything. Its own stop() releases it, as stop() does.
        with contextlib.suppress(ProcessFinishedWithError):
            super(PostgreSQLExecutor, self.executor).stop()

    def create_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(Exception):
            self.executor.clean_directory()
        shutil.rmtree(self.base_dir, ignore_errors=True)


def start_server(bindir: Path) -> PostgresServer:
    """Start a server in a fresh temp dir.

    Layout: ``<base>/pg_ctl`` (root-owned wrapper, only when running as root) and ``<base>/pg/``
    holding ``data/``, ``socket/`` and ``postgresql.log``; ``<base>/pg`` belongs to the user that
    runs the server. The wrapper stays in the root-owned ``<base>`` so that user cannot replace it.
    """
    base_dir = Path(tempfile.mkdtemp(prefix="pytest-pg-", dir=_temp_parent()))
    work_dir = base_dir / "pg"
    work_dir.mkdir(mode=0o700)
    (work_dir / "socket").mkdir(mode=0o700)
    pg_ctl = bindir / "pg_ctl"
    if os.geteuid() == 0:
        account = _service_account()
        base_dir.chmod(0o755)
        for path in (work_dir, work_dir / "socket"):
            os.chown(path, account.pw_uid, account.pw_gid)
        pg_ctl = base_dir / "pg_ctl"
        _write_pg_ctl_wrapper(pg_ctl, bindir / "pg_ctl", account, work_dir)
    server = PostgresServer(bindir, base_dir, work_dir, pg_ctl)
    try:
        server.launch()
    except Exception as exc:
        log = server.log_tail()
        server.cleanup()
        raise RuntimeError(f"PostgreSQL failed to start from {bindir}: {exc}\nserver log:\n{log}") from exc
    except BaseException:
        server.cleanup()
        raise
    return server


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole session (see module docstring)."""
    bindir = _require_bindir()
    started = time.monotonic()
    try:
        server = start_server(bindir)
    except Exception as exc:
        pytest.fail(str(exc), pytrace=False)
    server.startup_seconds = time.monotonic() - started
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database on the session server; dropped afterwards."""
    postgres_server.start()  # in case an earlier (outage) test left it stopped
    name = f"test_{uuid.uuid4().hex[:16]}"
    postgres_server.create_database(name)
    try:
        yield postgres_server.url_for(name)
    finally:
        with contextlib.suppress(Exception):
            postgres_server.start()
            postgres_server.drop_database(name)
