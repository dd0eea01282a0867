"""Shared machinery of the benchmarks: figures, statistics, isolation, command line, output.

Every benchmark module exposes ``run(quick: bool) -> BenchResult`` and ends with
``raise SystemExit(main_for(NAME, run))``, so it runs alone as ``python -m bench.<name>`` and
``bench.run_all`` can collect its figures as JSON (``--json PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import inspect
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO / ".cache" / "bench"
if str(REPO) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(REPO))

from tests.reliability.independent import RELEASE_1_0_0, load_release_1_0_0  # noqa: E402

Verdict = bool | None  # None: informational figure, no target


@dataclasses.dataclass(frozen=True, slots=True)
class Figure:
    """One measured number, with its target when it has one."""

    key: str
    label: str
    value: float
    unit: str
    target: str = ""  # human-readable, e.g. "<= 0.2"
    passed: Verdict = None
    detail: str = ""  # spread, sample size, what it includes

    def value_text(self) -> str:
        return format_value(self.value, self.unit)

    def verdict_text(self, quick: bool = False) -> str:
        """PASS / MISS against the target; '(quick)' when measured at the smaller quick sizes."""
        if self.passed is None:
            return "info"
        return ("PASS" if self.passed else "MISS") + (" (quick)" if quick else "")


@dataclasses.dataclass(slots=True)
class BenchResult:
    name: str
    quick: bool
    command: str
    figures: list[Figure] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    plugin: str = ""  # which plugin source was measured (see measured_plugin)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "quick": self.quick,
            "command": self.command,
            "seconds": round(self.seconds, 2),
            "error": self.error,
            "figures": [dataclasses.asdict(f) for f in self.figures],
            "notes": self.notes,
            "machine": machine_note(),
            "plugin": self.plugin or measured_plugin(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        return cls(
            name=data["name"],
            quick=data["quick"],
            command=data["command"],
            figures=[Figure(**f) for f in data["figures"]],
            notes=list(data["notes"]),
            seconds=float(data["seconds"]),
            error=data.get("error", ""),
            plugin=data.get("plugin", ""),
        )


def at_most(value: float, limit: float) -> Verdict:
    return value <= limit


def at_least(value: float, limit: float) -> Verdict:
    return value >= limit


def format_value(value: float, unit: str) -> str:
    if unit in ("x", "ratio"):
        return f"{value:.3g}" if value < 10 else f"{value:,.1f}"
    if unit in ("records/s", "rows/s", "ns/chunk", "records"):
        return f"{value:,.0f} {unit}"
    if unit == "ms" and value < 1:
        return f"{value:.3f} ms"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


# ── statistics ──


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float], scale: float = 1.0, unit: str = "") -> str:
    """'n=40, p10..p90 1.2..1.9 ms': how much the repetitions varied."""
    ordered = sorted(values)
    if len(ordered) < 2:
        return f"n={len(ordered)}"
    low = ordered[max(0, int(len(ordered) * 0.1))]
    high = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    suffix = f" {unit}" if unit else ""
    return f"n={len(ordered)}, p10..p90 {number(low * scale)}..{number(high * scale)}{suffix}"


def number(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """timeit's convention: no cyclic GC inside a timed region (collected just before)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ── isolation ──


@contextlib.contextmanager
def isolated_data_dir(prefix: str) -> Iterator[Path]:
    """A fresh Open WebUI data directory in $DATA_DIR, with no ambient ledger URL leaking in.

    The directory lives on the machine's regular disk (tempfile's default), so SQLite's fsyncs
    are real ones."""
    saved = {
        key: os.environ.get(key) for key in ("DATA_DIR", "OPENROUTER_USAGE_DATABASE_URL", "DATABASE_URL")
    }
    directory = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    os.environ["DATA_DIR"] = str(directory)
    os.environ.pop("OPENROUTER_USAGE_DATABASE_URL", None)
    os.environ.pop("DATABASE_URL", None)
    try:
        yield directory
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(directory, ignore_errors=True)


_LOADED_PLUGIN: list[str] = []  # the version of the first plugin source this process loaded


def load_plugin() -> types.ModuleType:
    """The plugin as Open WebUI loads it: its source text exec'd into a fresh module."""
    from tests.factories import load_plugin_module

    if not _LOADED_PLUGIN:
        _LOADED_PLUGIN.append(plugin_version())
    return load_plugin_module()


# Release 1.0.0, the plugin the event-loop target is measured against ("no worse than 1.2x today's"),
# read from git history and loaded by the module the upgrade test loads it with.
RELEASE_COMMIT = RELEASE_1_0_0
RELEASE_LABEL = "1.0.0"
load_release_plugin = load_release_1_0_0


def close_plugin(plugin: types.ModuleType) -> None:
    """Dispose of every ledger engine this plugin instance opened (as tests/conftest.py's `plugin`
    fixture does)."""
    for writer in list(getattr(plugin, "_LEDGERS", {}).values()):
        writer.ledger.dispose()


async def call_hook(handler: Callable[..., Any], **params: Any) -> Any:
    """Call a filter hook as Open WebUI 0.12.4's utils/filter.py::run_filter_handler does: await it
    when it is a coroutine function, call it directly otherwise."""
    if inspect.iscoroutinefunction(handler):
        return await handler(**params)
    return handler(**params)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def file_size_mb(path: Path) -> float:
    """Database size on disk: the file plus its WAL, in MB (10^6 bytes)."""
    total = 0
    for candidate in (path, Path(f"{path}-wal")):
        with contextlib.suppress(FileNotFoundError):
            total += candidate.stat().st_size
    return total / 1e6


# ── the simulator ──


@dataclasses.dataclass(frozen=True, slots=True)
class SimulatedStream:
    """One streamed completion from the OpenRouter simulator, as raw SSE payloads and as the
    parsed chunks Open WebUI hands to `stream`."""

    request: dict[str, Any]
    payloads: list[str]  # the text after "data: ", without [DONE]
    chunks: list[dict[str, Any]]  # json.loads of each payload


def simulated_stream(content_chunks: int, model: str = "openai/gpt-4o-mini") -> SimulatedStream:
    """A real streamed response from the simulator with exactly `content_chunks` content chunks
    (plus the role, finish and usage chunks the simulator always sends)."""
    from openrouter_sim import OpenRouterSimulator
    from tests.factories import complete

    request = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": f"Explain WAL mode [sim:chunks={content_chunks}]"}],
    }
    with OpenRouterSimulator() as sim:
        response = complete(sim, {**request, "stream_options": {"include_usage": True}})
        response.raise_for_status()
    payloads = []
    for line in response.text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload and payload != "[DONE]":
                payloads.append(payload)
    return SimulatedStream(request, payloads, [json.loads(p) for p in payloads])


# ── records ──

BENCH_USERS = 200


def make_records(
    plugin: types.ModuleType, count: int, prefix: str, created_at: datetime | None = None
) -> list[Any]:
    """`count` UsageRecords as tests/factories.py::make_record builds them, with unique
    message ids, 200 users, and (like live traffic) all created now, so they share today's rollups."""
    from tests.factories import make_record

    moment = created_at or datetime.now(UTC)
    return [
        make_record(
            plugin,
            index,
            message_id=f"{prefix}-{index}",
            user_id=f"user-{index % BENCH_USERS}",
            user_name=f"User {index % BENCH_USERS}",
            created_at=moment,
        )
        for index in range(count)
    ]


def ledger_row_count(plugin: types.ModuleType, url: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(plugin.ledger_table)).scalar_one())
    finally:
        engine.dispose()


# ── machine and command line ──


def machine_note() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({cpu}), shared and noisy; Linux {platform.release()}; "
        f"Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}"
    )


def plugin_version(source: bytes | None = None) -> str:
    """Which plugin source was measured: git HEAD, and the file's own digest (it may be uncommitted),
    or the digest of `source`, the text a benchmark read earlier."""
    path = REPO / "plugin" / "openrouter_usage.py"
    digest = hashlib.sha256(path.read_bytes() if source is None else source).hexdigest()[:12]
    head = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    return f"plugin sha256 {digest} (git HEAD {head or '?'})"


def measured_plugin() -> str:
    return _LOADED_PLUGIN[0] if _LOADED_PLUGIN else plugin_version()


def mark_measured(source: bytes) -> str:
    """For a benchmark that does not call load_plugin (e.g. one that installs the text into a
    server): record `source` as the plugin this process measured; return its version."""
    if not _LOADED_PLUGIN:
        _LOADED_PLUGIN.append(plugin_version(source))
    return _LOADED_PLUGIN[0]


def command_for(module: str, quick: bool) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    return f"{python} -m {module}" + (" --quick" if quick else "")


def print_result(result: BenchResult, out: Any = None) -> None:
    out = out or sys.stdout
    mode = "QUICK (smaller sizes)" if result.quick else "full"
    out.write(f"\n== {result.name} [{mode}] ==\n")
    if result.error:
        out.write(f"ERROR: {result.error}\n")
    rows = [
        (f.label, f.value_text(), f.target or "-", f.verdict_text(result.quick), f.detail)
        for f in result.figures
    ]
    write_table(["figure", "value", "target", "verdict", "detail"], rows, out)
    for note in result.notes:
        out.write(f"  * {note}\n")
    out.write(
        f"command: {result.command}   ({result.seconds:.0f} s; {machine_note()}; {measured_plugin()})\n"
    )
    out.flush()


def write_table(header: Sequence[str], rows: Sequence[Sequence[str]], out: Any) -> None:
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    out.write(line(header) + "\n")
    out.write(line(["-" * w for w in widths]) + "\n")
    for row in rows:
        out.write(line(row) + "\n")


def progress(text: str) -> None:
    sys.stderr.write(f"  .. {text}\n")
    sys.stderr.flush()


def main_for(name: str, run: Callable[[bool], BenchResult], argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a fast check")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (for run_all)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        result = run(args.quick)
    except Exception:
        result = BenchResult(name, args.quick, command_for(f"bench.{name}", args.quick))
        result.error = traceback.format_exc()
    result.seconds = time.monotonic() - started
    result.note(
        f"machine load (1-minute load average, {os.cpu_count()} cores): {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (other work on this shared machine shows here)"
    )
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2))
    return 1 if result.error else 0
