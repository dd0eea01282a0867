"""Shared fixtures: a fresh data directory, the plugin loaded as Open WebUI loads it, both ledger
engines, and the pinned Open WebUI. What the tests build (hook drivers, emitter recorders, outlet
bodies, records, ...) comes from tests/factories.py."""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import load_plugin_module

pytest_plugins = ["tests.pg"]


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh Open WebUI data directory; no ambient ledger settings leak in."""
    directory = tmp_path / "data"
    directory.mkdir()
    monkeypatch.setenv("DATA_DIR", str(directory))
    monkeypatch.delenv("OPENROUTER_USAGE_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return directory


@pytest.fixture
def plugin(data_dir: Path) -> Iterator[types.ModuleType]:
    module = load_plugin_module()
    yield module
    for writer in list(module._LEDGERS.values()):
        writer.ledger.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, data_dir: Path) -> str:
    """Every ledger test runs on both engines: an SQLite file and a real PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{data_dir / 'ledger.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def openwebui_python() -> Path:
    """The pinned Open WebUI's interpreter, in a cached venv built on first use."""
    from tests.e2e.owui import DEFAULT_OPENWEBUI_VERSION, ensure_openwebui

    version = os.environ.get("OPENWEBUI_VERSION", DEFAULT_OPENWEBUI_VERSION)
    try:
        return ensure_openwebui(version)
    except Exception as exc:
        message = f"cannot prepare Open WebUI {version}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def never_a_bulk_listing_request() -> Iterator[None]:
    """Across the whole session, no simulator was ever asked for GET …/generations."""
    yield
    from openrouter_sim.server import PATHS_SEEN_BY_ANY_SIMULATOR

    bulk = [path for path in PATHS_SEEN_BY_ANY_SIMULATOR if path.rstrip("/").endswith("/generations")]
    assert not bulk, f"something asked for the non-existent bulk listing: {bulk}"
