"""kill -9: a writer SIGKILLed 20 times, each restart PID 1 of a fresh PID namespace (the same PID
every time), some runs during a ledger outage that makes outlets spool, some while the spool is
replayed. Afterwards every acknowledged record is in the ledger exactly once, as it was written;
PRAGMA integrity_check is ok; the rollups equal a full scan; nothing is left in the spool.

Each run is `unshare --pid --fork python -m tests.reliability.kill9_worker` (see that module for the
protocol). The next run's interpreter starts while the current one writes, and is told GO only once
the current one is dead: one writer at a time, and its start-up overlaps the previous run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from zoneinfo import ZoneInfo

import pytest

from tests.reliability.independent import (
    LEDGER_COLUMNS_1_0_0,
    MEASURES,
    ROLLUP_KEYS,
    Rollups,
    scanned_rollups,
)
from tests.reliability.kill9_worker import REPO, ZONE_NAME, record_fields

KILLS = 20
LOCK_TIMEOUT_SECONDS = 0.3  # the ledger's own busy timeout: a write blocked by the outage spools soon
START_SECONDS = 60.0  # bound on an interpreter start (imports) on a loaded 2-core machine
DEATH_SECONDS = 10.0
FINAL_SECONDS = 60.0
# The ledger columns a record's fields are stored in as they are; row_mismatches converts the others.
COMPARED_COLUMNS = tuple(
    column
    for column in LEDGER_COLUMNS_1_0_0
    if column not in ("id", "message_id", "generation_ids", "is_byok", "usage_json", "created_at")
)


def namespace_of(pid: int) -> str | None:
    """The PID namespace of a live process, None once it is gone."""
    try:
        return str(Path(f"/proc/{pid}/ns/pid").readlink())
    except FileNotFoundError:
        return None


def pid_inside_namespace(pid: int) -> int:
    """The PID the process has in its innermost namespace (the last NSpid field)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"/proc/{pid}/status has no NSpid line")


class Worker:
    """One writer run in its own PID namespace, its stdout read by a thread line by line."""

    def __init__(self, url: str, tag: str, stderr: IO[bytes], pycache: Path, *, final: bool = False) -> None:
        command = ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m"]
        command += ["tests.reliability.kill9_worker", "--url", url, "--tag", tag]
        env = dict(os.environ, PYTHONPATH=str(REPO))  # DATA_DIR comes from the data_dir fixture
        # Restarts are the test's clock: with bytecode caching off (as it may be in CI), every
        # restart would compile SQLAlchemy from source again. Caches go to the test's own folder.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
        self.tag = tag
        self.stderr_name = stderr.name  # shared by all runs: where a worker's traceback goes
        self.popen = subprocess.Popen(
            [*command, "--final"] if final else command,
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        self.lines: list[str] = []
        self.pids: tuple[int, int] | None = None  # (inside its namespace, as the host sees it)
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, name=f"kill9-{tag}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            if not raw.endswith(b"\n"):
                break  # the line SIGKILL cut short: it acknowledged nothing
            line = raw.decode().rstrip("\n")
            if line.startswith("PID "):
                inside, host = line.split()[1:]
                self.pids = (int(inside), int(host))
            elif line == "READY":
                self.ready.set()
            else:
                self.lines.append(line)
        self.ready.set()  # end of output: whoever waits for READY finds out at once

    @property
    def host_pid(self) -> int:
        assert self.pids is not None
        return self.pids[1]

    def wait_ready(self) -> None:
        assert self.ready.wait(START_SECONDS), f"{self.tag}: not ready after {START_SECONDS} s"
        assert self.pids is not None and self.popen.poll() is None, f"{self.tag}: ended before READY"
        inside, host = self.pids
        assert inside == 1, f"{self.tag}: the writer is PID {inside} in its namespace, not 1"
        assert pid_inside_namespace(host) == 1, f"{self.tag}: /proc/{host}/status disagrees"
        assert namespace_of(host) != namespace_of(os.getpid()), f"{self.tag}: not in its own namespace"

    def go(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(b"GO\n")
        self.popen.stdin.flush()

    def kill(self) -> None:
        """SIGKILL the writer itself (its namespace's init) and make sure it is gone."""
        assert self.popen.poll() is None, (
            f"{self.tag}: the writer ended before it was killed: {self.lines[-3:]}; see {self.stderr_name}"
        )
        namespace = namespace_of(self.host_pid)
        os.kill(self.host_pid, signal.SIGKILL)
        # unshare reaps it and exits; its exit status is not the child's (util-linux 2.38 exits 1).
        self.popen.wait(timeout=DEATH_SECONDS)
        assert namespace_of(self.host_pid) != namespace, f"{self.tag}: PID {self.host_pid} still alive"
        self.finish()

    def finish(self) -> None:
        self.reader.join(timeout=DEATH_SECONDS)
        assert not self.reader.is_alive(), f"{self.tag}: its output never ended"
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def abandon(self) -> None:
        """Cleanup after a failure: no process outlives the test."""
        if self.popen.poll() is None:
            self.popen.kill()  # --kill-child: the kernel SIGKILLs the writer with it
            self.popen.wait(timeout=DEATH_SECONDS)


class LedgerOutage:
    """Makes the ledger unwritable from outside: this process holds its write lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connection: sqlite3.Connection | None = None

    def begin(self) -> None:
        # mode=rw: never create the file (the first run does, with the plugin's own settings)
        connection = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=5.0, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        self.connection = connection

    def end(self) -> None:
        if self.connection is not None:
            self.connection.execute("ROLLBACK")
            self.connection.close()
            self.connection = None


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One run: what the parent does to it, and when (seconds from GO) it is killed.

    kinds: "steady" (nothing), "outage" (the ledger is locked from before GO until `outage_ends`),
    "replay" (spool files wait at GO: the kill comes `after_replay_starts` after the first of them
    is gone, i.e. while the restarted writer replays the rest; `kill_at` only bounds the wait).
    """

    kind: str
    kill_at: float
    outage_ends: float = 0.0
    after_replay_starts: float = 0.0

    @property
    def label(self) -> str:
        if self.kind == "outage":
            return "during outage" if self.kill_at < self.outage_ends else "after outage"
        return self.kind


def plan_run(rng: random.Random, ledger_exists: bool, spool_waiting: bool) -> RunPlan:
    if spool_waiting and rng.random() < 0.6:
        return RunPlan("replay", kill_at=1.5, after_replay_starts=rng.uniform(0.0, 0.03))
    if not ledger_exists or rng.random() < 0.3:
        return RunPlan("steady", kill_at=rng.uniform(0.2, 1.5))
    outage_ends = rng.uniform(0.4, 1.2)
    if rng.random() < 0.5:  # while outlets spool
        return RunPlan("outage", kill_at=rng.uniform(0.2, outage_ends), outage_ends=outage_ends)
    return RunPlan("outage", kill_at=outage_ends + rng.uniform(0.0, 0.5), outage_ends=outage_ends)


def run_until_kill(worker: Worker, plan: RunPlan, outage: LedgerOutage, data_dir: Path) -> set[str]:
    """Let `worker` write under `plan`, then SIGKILL it; returns the spool files there at the kill."""
    waiting = spool_files(data_dir)
    if plan.kind == "outage":
        outage.begin()
    worker.go()
    go_at = time.monotonic()
    if plan.kind == "replay":
        # Poll, bounded by kill_at, for the first spool file to go: replay is under way.
        while time.monotonic() < go_at + plan.kill_at:
            if not waiting <= spool_files(data_dir):
                time.sleep(plan.after_replay_starts)
                break
            time.sleep(0.002)
    elif plan.kind == "outage" and plan.outage_ends < plan.kill_at:
        time.sleep(max(0.0, go_at + plan.outage_ends - time.monotonic()))
        outage.end()
    if plan.kind != "replay":
        time.sleep(max(0.0, go_at + plan.kill_at - time.monotonic()))
    at_kill = spool_files(data_dir)
    worker.kill()
    outage.end()
    return at_kill


def spool_files(data_dir: Path, suffix: str = "") -> set[str]:
    """Names of the spool files waiting or being replayed (not quarantined, not half-written .tmp
    ones, which acknowledged nothing); with `suffix`, only the files whose names end with it."""
    root = data_dir / "openrouter_usage_spool"
    if not root.exists():
        return set()
    names = {
        path.name for path in root.rglob("*") if "quarantine" not in path.parts and ".jsonl" in path.name
    }
    if suffix:
        return {name for name in names if name.endswith(suffix)}
    return {name for name in names if not name.endswith(".tmp")}


@dataclasses.dataclass
class Tally:
    acked: dict[str, str] = dataclasses.field(default_factory=dict)  # message id -> recorded|spooled
    unacknowledged: list[str] = dataclasses.field(default_factory=list)  # NACK and ERR lines
    other: list[str] = dataclasses.field(default_factory=list)

    def take(self, lines: list[str]) -> None:
        for line in lines:
            verdict, _, rest = line.partition(" ")
            if verdict == "ACK":
                message_id, stored = rest.split()
                assert message_id not in self.acked, f"{message_id} acknowledged twice"
                self.acked[message_id] = stored
            elif verdict in ("NACK", "ERR"):
                self.unacknowledged.append(line)
            else:
                self.other.append(line)


@pytest.fixture
def unshare_available() -> None:
    try:
        probe = subprocess.run(
            ["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=30, check=False
        )
        problem = probe.stderr.decode().strip() if probe.returncode else ""
    except FileNotFoundError:
        problem = "unshare is not installed"
    if problem:
        message = f"cannot make a PID namespace: {problem}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def read_only(path: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True))


def ledger_rows(path: Path) -> list[sqlite3.Row]:
    with read_only(path) as connection:
        connection.row_factory = sqlite3.Row
        return connection.execute("SELECT * FROM openrouter_usage_ledger ORDER BY id").fetchall()


def row_mismatches(row: sqlite3.Row) -> list[str]:
    """How a stored row differs from the record its message id was written with."""
    expected = record_fields(row["message_id"])
    found = {name: row[name] for name in COMPARED_COLUMNS}
    found["is_byok"] = bool(row["is_byok"])
    found["generation_ids"] = tuple(json.loads(row["generation_ids"]))
    found["created_at"] = datetime.fromisoformat(row["created_at"]).replace(tzinfo=UTC)
    found["raw_usage"] = json.loads(row["usage_json"]) if row["usage_json"] is not None else None
    problems = [
        f"{name}: {value!r} != {expected[name]!r}" for name, value in found.items() if value != expected[name]
    ]
    keys = row.keys()
    if "notes" in keys and row["notes"] != "":
        problems.append(f"notes: {row['notes']!r} (nothing needed repairing)")
    if "omitted_generation_ids" in keys and row["omitted_generation_ids"] != 0:
        problems.append(f"omitted_generation_ids: {row['omitted_generation_ids']}")
    return problems


def stored_rollups(connection: sqlite3.Connection, zone_name: str) -> tuple[Rollups, set[str]]:
    """The rollups of `zone_name` as stored, and the other zones that have rows."""
    stored: Rollups = {}
    other_zones: set[str] = set()
    for table, keys in ROLLUP_KEYS.items():
        columns = {info[1] for info in connection.execute(f"PRAGMA table_info({table})")}
        selected = ", ".join((*keys, *MEASURES))
        if "zone" in columns:  # zone-keyed rollups: only the active zone must be complete
            result = connection.execute(f"SELECT {selected} FROM {table} WHERE zone = ?", (zone_name,))
            other_zones |= {
                zone
                for (zone,) in connection.execute(
                    f"SELECT DISTINCT zone FROM {table} WHERE zone != ?", (zone_name,)
                )
            }
        else:
            result = connection.execute(f"SELECT {selected} FROM {table}")
        stored[table] = {
            tuple(row[: len(keys)]): tuple(int(value) for value in row[len(keys) :]) for row in result
        }
    return stored, other_zones


def rollup_differences(stored: Rollups, scanned: Rollups) -> list[str]:
    return [
        f"{table}{key}: stored {stored[table].get(key)} != scan {scanned[table].get(key)}"
        for table in ROLLUP_KEYS
        for key in sorted(stored[table].keys() | scanned[table].keys())
        if stored[table].get(key) != scanned[table].get(key)
    ]


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.abandon()


def test_sigkill_twenty_times_under_one_pid_loses_no_acknowledged_record(
    unshare_available: None, data_dir: Path, workers: list[Worker]
) -> None:
    """20 SIGKILLs of a writer at random moments, restarted as PID 1 of a new PID namespace each
    time (so a spool claim named after a PID looks alive to every restart), with outages that
    spool records and kills during replay: every acknowledged record is stored exactly once and
    unchanged, the SQLite file passes integrity_check, the rollups of the active zone equal a full
    scan, and the spool ends empty with nothing quarantined."""
    started = time.monotonic()
    seed = int(os.environ.get("KILL9_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    ledger_path = data_dir / "ledger.sqlite3"
    url = f"sqlite:///{ledger_path}?timeout={LOCK_TIMEOUT_SECONDS}"
    outage = LedgerOutage(ledger_path)
    tally = Tally()
    seen_spool_files: set[str] = set()
    kills: Counter[str] = Counter()
    replayed_in_runs = 0  # spool files a restarted writer replayed (and removed) before its kill
    stderr_path = data_dir.parent / "kill9-workers.stderr"
    with stderr_path.open("wb") as stderr:

        def start(tag: str, *, final: bool = False) -> Worker:
            worker = Worker(url, tag, stderr, data_dir.parent / "pycache", final=final)
            workers.append(worker)
            return worker

        standby = start("k01")
        for run in range(1, KILLS + 1):
            current = standby
            current.wait_ready()
            # The next run's interpreter starts now: it must not touch the ledger before GO.
            standby = start(f"k{run + 1:02d}" if run < KILLS else "final", final=run == KILLS)
            waiting = spool_files(data_dir)
            plan = plan_run(rng, ledger_path.exists(), bool(waiting))
            at_kill = run_until_kill(current, plan, outage, data_dir)
            label = plan.label
            if plan.kind == "replay" and at_kill and not waiting <= at_kill:
                label = "mid replay"  # some files replayed, some still there
            kills[label] += 1
            after = spool_files(data_dir)
            replayed_in_runs += len(waiting - after)
            seen_spool_files |= waiting | at_kill | after
            tally.take(current.lines)

        final = standby
        final.wait_ready()
        final.go()
        final_status = final.popen.wait(timeout=FINAL_SECONDS)
        final.finish()
        tally.take(final.lines)
    stderr_tail = stderr_path.read_text(errors="replace")[-3000:]

    final_report = {word: rest for word, _, rest in (line.partition(" ") for line in tally.other)}
    rows = ledger_rows(ledger_path)
    stored_ids = Counter(row["message_id"] for row in rows)
    lost = sorted(message_id for message_id in tally.acked if message_id not in stored_ids)
    lost_spooled = [message_id for message_id in lost if tally.acked[message_id] == "spooled"]
    twice = sorted(message_id for message_id, count in stored_ids.items() if count > 1)
    # As the plugin counts them (Spool.pending_count, quarantined_count) in the final run, after replay.
    pending, quarantined = final_report.get("PENDING"), final_report.get("QUARANTINED")
    stored_counts = Counter(tally.acked.values())
    figures = (
        f"seed={seed} kills={KILLS} ({', '.join(f'{n} {kind}' for kind, n in sorted(kills.items()))}) "
        f"acked={len(tally.acked)} "
        f"(recorded={stored_counts['recorded']} spooled={stored_counts['spooled']}) rows={len(rows)} "
        f"spool_files_seen={len(seen_spool_files)} replayed_files_in_runs={replayed_in_runs} "
        f"final_replayed={final_report.get('REPLAYED')} pending={pending} quarantined={quarantined} "
        f"half_written_tmp={len(spool_files(data_dir, '.tmp'))} "
        f"lost={len(lost)} (spooled {len(lost_spooled)}) duration={time.monotonic() - started:.1f}s"
    )
    print(f"\nkill9: {figures}")

    assert final_status == 0 and "DONE" in final_report, (
        f"final run failed ({final_status}): {figures}\n{stderr_tail}"
    )
    assert not tally.unacknowledged, f"writes not acknowledged: {tally.unacknowledged[:5]}; {figures}"
    assert stored_counts["spooled"] > 0 and seen_spool_files, f"no outage ever reached the spool: {figures}"
    assert not lost, f"acknowledged records missing from the ledger: {lost[:10]}; {figures}"
    assert not twice, f"message ids stored more than once: {twice[:10]}; {figures}"

    known_tags = {f"k{run:02d}" for run in range(1, KILLS + 1)} | {"final"}
    strangers = [row["message_id"] for row in rows if row["message_id"].split("-")[0] not in known_tags]
    assert not strangers, f"rows nobody wrote: {strangers[:5]}; {figures}"
    altered = {row["message_id"]: problems for row in rows if (problems := row_mismatches(row))}
    assert not altered, f"rows differ from what was written: {list(altered.items())[:3]}; {figures}"

    with read_only(ledger_path) as connection:
        integrity = [line for (line,) in connection.execute("PRAGMA integrity_check")]
        meta = dict(connection.execute("SELECT key, value FROM openrouter_usage_meta").fetchall())
        assert integrity == ["ok"], f"integrity_check: {integrity[:10]}; {figures}"
        assert meta.get("rollup_timezone") == ZONE_NAME, f"meta: {meta}; {figures}"
        assert "rollup_recount" not in meta, f"a recount never finished: {meta}; {figures}"
        stored, other_zones = stored_rollups(connection, ZONE_NAME)
    assert not other_zones, f"rollup rows of zones no recount is building: {other_zones}; {figures}"
    differences = rollup_differences(stored, scanned_rollups(rows, ZoneInfo(ZONE_NAME)))
    assert not differences, f"rollups differ from a full scan: {differences[:10]}; {figures}"

    leftovers = sorted(spool_files(data_dir))
    assert pending == "0" and not leftovers, (
        f"spool files left after the final replay: {leftovers}; {figures}"
    )
    assert quarantined == "0", f"records quarantined: {figures}"
