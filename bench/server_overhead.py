"""What Open WebUI's server process pays per streamed completion, with and without filters.

Targets (server CPU per 400-chunk streamed API completion, measured interleaved in one run):

* this function / a filter whose `stream` only returns the event: at most 1.05;
* this function with the `capture_stream` valve off / a filter with only inlet and outlet: at
  most 1.05 (reported as "not available yet" while the plugin has no such valve).

Two diagnostic controls split the figures: a filter with this function's interface and none of its
work (see `interface_control_source`), without and with a no-op `stream` hook. "control /
inlet-outlet-only filter" and "stream control / stream no-op filter" are what Open WebUI itself
charges for that interface (it reads a filter's valves from its database before inlet, before
outlet, and, with a stream hook, once more for the stream); "this function, capture_stream off /
control" and "this function / stream control" are the plugin's own work.

Method: the pinned real Open WebUI (tests/e2e/owui.py: the cached 0.12.4 venv, `open-webui serve`
on loopback with a private DATA_DIR) serves the models of the project's OpenRouter simulator, which
runs in this process on loopback and paces its stream events (CHUNK_DELAY_S). Five functions are
installed through `POST /api/v1/functions/create`, as the admin panel installs them: a filter with
only inlet and outlet, a filter whose `stream` only returns the event (plus the same inlet and
outlet), the two interface controls (with the valves the phases they pair with save), and this function
(plugin/openrouter_usage.py's text as `build_manifest` packs it; default valves except
`database_url`, a SQLite file in the benchmark's temp dir). Each is made global once; a phase
switches on exactly one of them (`/toggle`, checked against the function list), or none.
The fifth configuration is this function again with `{"database_url": …, "capture_stream": false}`
saved through `/valves/update`; Open WebUI stores only the fields its Valves model knows, so its
answer tells whether the valve exists.

A phase runs a batch of completions of one configuration, 6 at a time: `POST /api/chat/completions`
with `stream: true` and no chat or session id, as an API client sends it, each asking the simulator
for 400 content chunks. A round runs one phase per configuration; the order keeps each target pair
side by side, is rotated every second round and reversed every other round. The server's CPU is
read from /proc/<pid>/stat (utime + stime, which cover all its threads, live and exited) just before
a phase and a short settle after it. Open WebUI 0.12.4 started this way is one process (uvicorn with
one worker) and spawns no children; the reading would also add any descendant process (utime +
stime + cutime + cstime), and the run notes how many it saw. The simulator and the client run in
this process, so none of their CPU is counted.

Checks, so that a broken setup stops the run instead of giving a cheap-looking figure: every
completion streamed 400 content chunks and `[DONE]` without an error event; the simulator saw one
chat generation per completion and no task call; the upstream request asked for usage
(`stream_options`, added by this function's inlet and the control's) exactly in those phases; in
this function's phases the ledger gained one row per completion, each with its generation id (only
the stream hook sees it) when capture is on, and none when the valve switched capture off; in all
other phases it gained none.

Figures: CPU per completion of each configuration (median over the rounds, with its spread) and its
ratio to "no filter". A ratio is the median of the per-round ratios: the two phases of one round run
seconds apart, so a change in the machine's speed between rounds (this VM's neighbours come and go)
cancels out of it. The per-round ratios are printed as its spread, with median(A) / median(B) for
comparison (bench.event_loop's estimator, which does not pair).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import sqlite3
import sys
import threading
import time
import typing
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    BenchResult,
    Figure,
    at_most,
    command_for,
    isolated_data_dir,
    main_for,
    mark_measured,
    median,
    plugin_version,
    progress,
    spread,
    sqlite_url,
)
from openrouter_sim import GenerationRecord, OpenRouterSimulator
from tests.e2e.owui import DEFAULT_OPENWEBUI_VERSION, OpenWebUIClient, OpenWebUIServer, ensure_openwebui
from tests.reliability.independent import load_source

NAME = "server_overhead"
TARGET_RATIO = 1.05
CHUNKS = 400  # content chunks per completion
CONCURRENCY = 6  # completions in flight at once
# The simulator's pause between stream events. Real providers stream with gaps, so the server reads
# and handles every chunk on its own; an unpaced simulator bursts, and the server then reads several
# chunks at once, more so the slower it is, which changes the per-chunk cost from one configuration
# to the next. 6 streams x 250 events/s keep the costliest configuration well below one core.
CHUNK_DELAY_S = 0.004
MODEL = "openai/gpt-4o-mini"
PLUGIN_ID = "openrouter_usage"  # the id manifest.json gives it
CONTROL_ID = "bench_interface"  # the interface control (interface_control_source)
STREAM_CONTROL_ID = "bench_interface_stream"  # the same with a no-op stream hook
LEDGER_TABLE = "openrouter_usage_ledger"
PLUGIN_PATH = REPO / "plugin" / "openrouter_usage.py"
SETTLE_SECONDS = 0.2  # after a batch, before the CPU reading: the server finishes its last responses
QUIET_SECONDS = 0.1  # after switching the configuration, before the first CPU reading
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# (rounds, completions per configuration per round, warm-up completions per configuration)
SIZES = {"full": (12, 6, 6), "quick": (2, 6, 6)}

INLET_OUTLET_SOURCE = '''"""
title: Bench inlet/outlet pass-through
description: A filter with only inlet and outlet, both returning the body unchanged.
"""


class Filter:
    async def inlet(self, body: dict) -> dict:
        return body

    async def outlet(self, body: dict) -> dict:
        return body
'''

STREAM_NOOP_SOURCE = '''"""
title: Bench stream no-op
description: A filter whose stream only returns the event, plus inlet and outlet pass-through.
"""


class Filter:
    async def inlet(self, body: dict) -> dict:
        return body

    def stream(self, event: dict) -> dict:
        return event

    async def outlet(self, body: dict) -> dict:
        return body
'''

# What the interface control copies from this function: its valve classes field by field (name,
# type, default) and its hooks' parameter names. Open WebUI reads the saved valves from its database
# and builds Valves(**saved) before each hook of a filter that has a `valves` attribute and a
# `Valves` class, and reads the user's valves when the hook takes `__user__` and the module has a
# `UserValves` class (open_webui/utils/filter.py); the other parameters only pick values it has.
_CONTROL_FIELD_TYPES: tuple[type, ...] = (bool, int, float, str)


def _model_lines(name: str, model: Any) -> list[str]:
    lines = [f"    class {name}(BaseModel):"]
    for field_name, field in model.model_fields.items():
        annotation = field.annotation
        if typing.get_origin(annotation) is typing.Literal:  # validated like a str of its values
            annotation = type(typing.get_args(annotation)[0])
        if annotation not in _CONTROL_FIELD_TYPES:
            raise RuntimeError(f"the interface control cannot copy {name}.{field_name}: {field.annotation!r}")
        lines.append(f"        {field_name}: {annotation.__name__} = {field.default!r}")
    return [*lines, ""] if len(lines) > 1 else [*lines, "        pass", ""]


def _hook_lines(name: str, hook: Callable[..., Any], body: list[str]) -> list[str]:
    _self, first, *rest = inspect.signature(hook).parameters
    parameters = ", ".join(["self", f"{first}: dict", *(f"{p}: object = None" for p in rest)])
    kind = "async def" if inspect.iscoroutinefunction(hook) else "def"
    return [f"    {kind} {name}({parameters}) -> dict:", *(f"        {line}" for line in body), ""]


def interface_control_source(plugin_source: str, *, with_stream: bool = False) -> str:
    """A filter with this function's interface and none of its work: the same Valves and UserValves
    fields, an inlet and an outlet taking the same parameters, an inlet that asks the upstream for
    usage as this function's does, and an outlet that returns the body. No stream hook (this
    function has none with capture_stream off), or `with_stream`: a `stream` taking the capture
    hook's parameters and returning the event."""
    plugin = load_source(plugin_source)
    try:
        hooks = plugin.Filter
        lines = [
            '"""',
            f"title: Bench interface control{' with a stream hook' if with_stream else ''}",
            "description: This function's valves and hook parameters, without its work.",
            '"""',
            "",
            "from pydantic import BaseModel",
            "",
            "",
            "class Filter:",
        ]
        for name in ("Valves", "UserValves"):
            if hasattr(hooks, name):
                lines += _model_lines(name, getattr(hooks, name))
        if hasattr(hooks, "Valves"):
            lines += ["    def __init__(self) -> None:", "        self.valves = self.Valves()", ""]
        lines += _hook_lines(
            "inlet",
            hooks.inlet,
            [
                'if isinstance(body, dict) and body.get("stream"):',
                '    options = body.get("stream_options")',
                "    options = options if isinstance(options, dict) else {}",
                '    body["stream_options"] = {**options, "include_usage": True}',
                "return body",
            ],
        )
        if with_stream:
            lines += _hook_lines("stream", hooks.observe_stream, ["return event"])
        lines += _hook_lines("outlet", hooks.outlet, ["return body"])
        return "\n".join(lines)
    finally:
        sys.modules.pop(plugin.__name__, None)


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    key: str
    label: str
    function_id: str | None  # the one active function, None for no filter
    valves: dict[str, Any] | None = None  # this function's valves for the phase (database_url added)
    asks_usage: bool = False  # this function's inlet adds stream_options.include_usage
    records: bool = False  # this function writes one ledger row per completion
    captures: bool = False  # its rows carry generation ids, which only the stream hook sees


CONFIGS = (
    Config("no_filter", "no filter", None),
    Config("inlet_outlet", "inlet/outlet-only filter", "bench_inlet_outlet"),
    Config("stream_noop", "stream no-op filter", "bench_stream_noop"),
    Config("plugin", "this function", PLUGIN_ID, {}, asks_usage=True, records=True, captures=True),
    Config(
        "plugin_no_capture",
        "this function, capture_stream off",
        PLUGIN_ID,
        {"capture_stream": False},
        asks_usage=True,
        records=True,
    ),
    # Diagnostic: what Open WebUI charges for this function's interface, without its work.
    Config(
        "interface", "interface control (this function's interface, no work)", CONTROL_ID, asks_usage=True
    ),
    Config(
        "interface_stream",
        "stream interface control (the same with a no-op stream hook)",
        STREAM_CONTROL_ID,
        asks_usage=True,
    ),
)
BY_KEY = {config.key: config for config in CONFIGS}
# The phases of a round: each target pair side by side. Round i runs this order rotated by i // 2,
# reversed when i is odd, so every configuration takes every place and each pair runs in both orders.
PHASE_ORDER = (
    "no_filter",
    "interface",
    "inlet_outlet",
    "plugin_no_capture",
    "stream_noop",
    "interface_stream",
    "plugin",
)


def round_order(index: int) -> list[Config]:
    shift = (index // 2) % len(PHASE_ORDER)
    keys = list(PHASE_ORDER[shift:] + PHASE_ORDER[:shift])
    return [BY_KEY[key] for key in (reversed(keys) if index % 2 else keys)]


# ── the server's CPU ──


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()  # fields from 3 (state) on; the name may hold spaces


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (each thread's children file, recursively)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                with contextlib.suppress(OSError):
                    for child in (task / "children").read_text().split():
                        found.append(int(child))
                        pending.append(int(child))
    return found


class ServerCpu:
    """The server process's CPU in clock ticks: utime + stime of the process (all its threads),
    plus utime + stime + cutime + cstime of any descendant process, live or reaped by it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.children_seen: set[int] = set()
        self.max_threads = 0

    def ticks(self) -> int:
        fields = _stat_fields(self.pid)
        total = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        self.max_threads = max(self.max_threads, int(fields[17]))
        for child in descendants(self.pid):
            self.children_seen.add(child)
            with contextlib.suppress(OSError):
                child_fields = _stat_fields(child)
                total += sum(int(child_fields[i]) for i in (11, 12, 13, 14))
        return total


def steal_ticks() -> int:
    """CPU time the hypervisor gave to someone else, all CPUs (the `steal` column of /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) if len(fields) > 8 else 0


# ── the ledger and the simulator ──


def ledger_rows(path: Path, after_id: int = 0) -> list[tuple[int, list[str]]]:
    """(id, generation ids) of the ledger rows with an id above `after_id`, read from another
    connection (a row is durable when the outlet that wrote it returns)."""
    if not path.exists():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        query = f"SELECT id, generation_ids FROM {LEDGER_TABLE} WHERE id > ? ORDER BY id"
        try:
            return [(int(row[0]), json.loads(row[1])) for row in connection.execute(query, (after_id,))]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
    finally:
        connection.close()


def chat_generations(sim: OpenRouterSimulator, markers: set[str]) -> list[GenerationRecord]:
    """The simulator's records of the chat completions whose last message holds one of `markers`."""
    found = []
    for generation in sim.generations.values():
        messages = (generation.request_body or {}).get("messages") or [{}]
        text = str(messages[-1].get("content", ""))
        if any(marker in text for marker in markers):
            found.append(generation)
    return found


# ── completions ──


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    marker: str
    content_chunks: int
    events: int
    done: bool
    error: str


class Clients:
    """One signed-in API client per worker thread (each keeps its connection to the server)."""

    def __init__(self, url: str, token: str | None) -> None:
        self._url = url
        self._token = token
        self._local = threading.local()
        self._all: list[OpenWebUIClient] = []
        self._lock = threading.Lock()

    def get(self) -> OpenWebUIClient:
        client: OpenWebUIClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = OpenWebUIClient(self._url, token=self._token, timeout=300.0)
            with self._lock:
                self._all.append(client)
        return client

    def close(self) -> None:
        for client in self._all:
            client.close()


def one_completion(clients: Clients, tag: str) -> Completion:
    marker = f"so-{tag}-{uuid.uuid4().hex[:10]}"
    result = clients.get().chat_completion(
        MODEL,
        [{"role": "user", "content": f"Explain write-ahead logging {marker} [sim:chunks={CHUNKS}]"}],
        stream=True,
    )
    content = 0
    errors = []
    for event in result.events:
        if not isinstance(event, dict):
            errors.append(f"non-JSON event {str(event)[:80]!r}")
            continue
        if event.get("error"):
            errors.append(str(event["error"])[:200])
        for choice in event.get("choices") or []:
            if ((choice or {}).get("delta") or {}).get("content"):
                content += 1
    return Completion(marker, content, len(result.events), result.done, "; ".join(errors))


@dataclasses.dataclass(slots=True)
class Phase:
    config: str
    completions: int
    ticks: int
    seconds: float

    @property
    def cpu_ms(self) -> float:
        """Server CPU per completion, ms."""
        return self.ticks / CLOCK_TICKS * 1000 / self.completions


class Bench:
    """One Open WebUI server with the four functions installed; runs phases against it."""

    def __init__(self, server: OpenWebUIServer, sim: OpenRouterSimulator, ledger: Path) -> None:
        self.server = server
        self.sim = sim
        self.ledger = ledger
        self.admin = server.client()
        self.cpu = ServerCpu(server_pid(server))
        self.clients = Clients(server.url, self.admin.token)
        self.pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="bench-client")
        self.capture_stream_valve = False
        self.last_row_id = 0
        self.rows = 0

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.clients.close()
        self.admin.close()

    # setup

    def install(self, plugin_source: str) -> None:
        from scripts.build_manifest import build_manifest

        (item,) = build_manifest(plugin_source)
        functions: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
            ("bench_inlet_outlet", "Bench inlet/outlet pass-through", INLET_OUTLET_SOURCE, {}),
            ("bench_stream_noop", "Bench stream no-op", STREAM_NOOP_SOURCE, {}),
            (CONTROL_ID, "Bench interface control", interface_control_source(plugin_source), {}),
            (
                STREAM_CONTROL_ID,
                "Bench interface control with a stream hook",
                interface_control_source(plugin_source, with_stream=True),
                {},
            ),
            (item["id"], item["name"], item["content"], item["meta"]),
        )
        for function_id, name, content, meta in functions:
            created = self.admin.create_function(function_id, name, content, meta)
            if created.get("id") != function_id or created.get("type") != "filter":
                raise RuntimeError(f"{function_id} was not installed as a filter: {created}")
            state = self.admin.post(f"/api/v1/functions/id/{function_id}/toggle/global")
            if not state.get("is_global") or state.get("is_active"):
                raise RuntimeError(f"{function_id} is not global and inactive after install: {state}")
        # The controls' valves are saved once, as the phases they pair with save this function's.
        for control_id, twin in ((CONTROL_ID, "plugin_no_capture"), (STREAM_CONTROL_ID, "plugin")):
            wanted = {"database_url": sqlite_url(self.ledger), **(BY_KEY[twin].valves or {})}
            stored = self.admin.update_valves(control_id, wanted)
            if stored.get("database_url") != wanted["database_url"]:
                raise RuntimeError(f"{control_id} did not keep its database_url valve: {stored}")

    def set_valves(self, config: Config) -> None:
        wanted = {"database_url": sqlite_url(self.ledger), **(config.valves or {})}
        stored = self.admin.update_valves(PLUGIN_ID, wanted)
        if stored.get("database_url") != wanted["database_url"]:
            raise RuntimeError(f"{PLUGIN_ID} did not keep its database_url valve: {stored}")
        if "capture_stream" in wanted:
            self.capture_stream_valve = stored.get("capture_stream") == wanted["capture_stream"]

    def activate(self, config: Config) -> None:
        """Exactly `config.function_id` active (all three stay global), or none."""
        functions: dict[str, dict[str, Any]] = {f["id"]: f for f in self.admin.list_functions()}
        for function_id, function in functions.items():
            if function.get("is_active") and function_id != config.function_id:
                self.admin.post(f"/api/v1/functions/id/{function_id}/toggle")
        if config.function_id is not None:
            if not functions[config.function_id].get("is_active"):
                self.admin.post(f"/api/v1/functions/id/{config.function_id}/toggle")
            if config.function_id == PLUGIN_ID:
                self.set_valves(config)
        active = {f["id"] for f in self.admin.list_functions() if f.get("is_active")}
        expected = {config.function_id} if config.function_id else set()
        if active != expected:
            raise RuntimeError(
                f"{config.key}: active functions {sorted(active)}, expected {sorted(expected)}"
            )
        if config.function_id and not functions[config.function_id].get("is_global"):
            raise RuntimeError(f"{config.function_id} is not global")

    # phases

    def batch(self, config: Config, count: int) -> list[Completion]:
        return list(self.pool.map(lambda _: one_completion(self.clients, config.key), range(count)))

    def phase(self, config: Config, count: int) -> Phase:
        self.activate(config)
        time.sleep(QUIET_SECONDS)
        ticks_before = self.cpu.ticks()
        started = time.monotonic()
        completions = self.batch(config, count)
        seconds = time.monotonic() - started
        time.sleep(SETTLE_SECONDS)
        ticks = self.cpu.ticks() - ticks_before
        self.check(config, completions)
        return Phase(config.key, count, ticks, seconds)

    def check(self, config: Config, completions: Sequence[Completion]) -> None:
        """Every completion streamed CHUNKS content chunks; the simulator saw one generation each,
        asked for usage exactly when this function ran; this function recorded one row each, with
        generation ids exactly when its stream hook ran."""
        bad = [c for c in completions if c.content_chunks != CHUNKS or not c.done or c.error]
        if bad:
            sample = bad[0]
            raise RuntimeError(
                f"{config.key}: {len(bad)} of {len(completions)} completions did not stream {CHUNKS} "
                f"content chunks and [DONE] without error (first: {sample.content_chunks} chunks, "
                f"done={sample.done}, error={sample.error!r}); server log tail:\n{self.server.log_tail(30)}"
            )
        markers = {c.marker for c in completions}
        generations = chat_generations(self.sim, markers)
        if len(generations) != len(completions) or any(g.task for g in generations):
            raise RuntimeError(
                f"{config.key}: the simulator saw {len(generations)} generations for {len(completions)} "
                "completions (or a task call)"
            )
        asked = {
            bool(((g.request_body or {}).get("stream_options") or {}).get("include_usage"))
            for g in generations
        }
        if asked != {config.asks_usage}:
            raise RuntimeError(
                f"{config.key}: upstream requests asked for usage: {sorted(asked)}, "
                f"expected {config.asks_usage} (is the right function active?)"
            )
        self.sim.clear()
        rows = ledger_rows(self.ledger, self.last_row_id)
        expected = len(completions) if config.records else 0
        if len(rows) != expected:
            raise RuntimeError(f"{config.key}: the ledger grew by {len(rows)} rows, expected {expected}")
        if rows:
            self.last_row_id = rows[-1][0]
            self.rows += len(rows)
            # Generation ids come only from streamed chunks: present when the stream hook ran.
            captured = config.captures or (
                config.key == "plugin_no_capture" and not self.capture_stream_valve
            )
            with_ids = sum(1 for _, ids in rows if any(str(i).startswith("gen-") for i in ids))
            if with_ids != (len(rows) if captured else 0):
                raise RuntimeError(
                    f"{config.key}: {with_ids} of {len(rows)} new ledger rows carry generation ids; "
                    f"expected {'all' if captured else 'none'} (stream capture {'on' if captured else 'off'})"
                )

    def idle_ticks_per_second(self, seconds: float) -> float:
        self.activate(BY_KEY["no_filter"])
        before = self.cpu.ticks()
        time.sleep(seconds)
        return (self.cpu.ticks() - before) / seconds


def server_pid(server: OpenWebUIServer) -> int:
    """The server's process id (`open-webui serve`, which runs uvicorn in-process)."""
    process = server._proc
    if process is None:
        raise RuntimeError("Open WebUI is not running")
    return process.pid


@contextlib.contextmanager
def running_server(root: Path) -> Iterator[tuple[OpenWebUIServer, OpenRouterSimulator]]:
    """The simulator and the pinned Open WebUI, both on loopback, stopped on the way out."""
    python = ensure_openwebui(os.environ.get("OPENWEBUI_VERSION", DEFAULT_OPENWEBUI_VERSION))
    sim = OpenRouterSimulator(host="127.0.0.1", port=0, chunk_delay_s=CHUNK_DELAY_S).start()
    try:
        server = OpenWebUIServer(
            python,
            root / "openwebui",
            openai_base_url=sim.base_url,
            openai_api_key="sk-or-v1-bench-simulated",
            admin_email="admin@example.com",
            admin_password="bench-admin-password",
            extra_env={"BYPASS_MODEL_ACCESS_CONTROL": "true"},
        )
        with server:
            yield server, sim
    finally:
        sim.stop()


# ── the run ──


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    rounds, count, warmup = SIZES["quick" if quick else "full"]
    source_bytes = PLUGIN_PATH.read_bytes()
    source = source_bytes.decode("utf-8")
    result.plugin = mark_measured(source_bytes)
    phases: list[Phase] = []
    with isolated_data_dir(NAME) as root:
        progress("starting the OpenRouter simulator and Open WebUI")
        with running_server(root) as (server, sim):
            progress(f"Open WebUI up in {server.startup_seconds:.1f} s (pid {server_pid(server)})")
            bench = Bench(server, sim, root / "ledger.sqlite3")
            try:
                bench.install(source)
                for config in CONFIGS:
                    progress(f"warming up: {config.label}, {warmup} completions")
                    bench.phase(config, warmup)
                idle = bench.idle_ticks_per_second(2.0 if quick else 3.0)
                steal_before = steal_ticks()
                for index in range(rounds):
                    for config in round_order(index):
                        phase = bench.phase(config, count)
                        phases.append(phase)
                        progress(
                            f"round {index + 1}/{rounds}: {config.label}: {phase.cpu_ms:.1f} ms CPU per "
                            f"completion ({count} in {phase.seconds:.1f} s)"
                        )
                steal = steal_ticks() - steal_before
                threads, children = bench.cpu.max_threads, len(bench.cpu.children_seen)
                capture_stream = bench.capture_stream_valve
                rows = bench.rows
            finally:
                bench.close()
    _report(result, phases, rounds, count, idle, capture_stream)
    if PLUGIN_PATH.read_bytes() != source_bytes:
        result.note(
            f"the plugin file changed during the run; measured: {result.plugin}, now: {plugin_version()}"
        )
    result.note(
        f"server: Open WebUI {os.environ.get('OPENWEBUI_VERSION', '0.12.4')}, one process, up to {threads} "
        f"threads; {children} descendant process(es) seen during the run (their CPU would be included). "
        f"The ledger gained {rows} rows, one per completion of this function's phases (warm-up included). "
        f"Steal time during the rounds (/proc/stat, all CPUs): {steal / CLOCK_TICKS:.1f} s."
    )
    result.note(
        f"{rounds} round(s) x {len(CONFIGS)} configurations x {count} streamed API completions of {CHUNKS} "
        f"content chunks, {CONCURRENCY} at a time; order {', '.join(PHASE_ORDER)}, rotated by one every "
        f"second round and reversed every other round; {warmup} warm-up "
        "completions per configuration first. CPU = utime + stime of the server process from "
        f"/proc/<pid>/stat (clock ticks of {1000 // CLOCK_TICKS} ms), read before and {SETTLE_SECONDS} s "
        "after each batch; a ratio is the median of the per-round ratios (A and B of one round are "
        "measured seconds apart), its spread the per-round ratios."
    )
    return result


def _per_round(values: Sequence[float], of_medians: float) -> str:
    """Every round's ratio in round order, their spread, and the ratio of the two medians."""
    listed = ", ".join(f"{v:.3g}" for v in values)
    return f"per round {listed} ({spread(values)}); median(A) / median(B) {of_medians:.3g}"


def _report(
    result: BenchResult, phases: list[Phase], rounds: int, count: int, idle: float, capture_stream: bool
) -> None:
    per_round: dict[str, list[float]] = {config.key: [] for config in CONFIGS}
    for phase in phases:
        per_round[phase.config].append(phase.cpu_ms)

    def ratio(a: str, b: str) -> tuple[float, str]:
        """The median of the per-round ratios (each round measures A and B within seconds of each
        other, so a change in the machine's speed between rounds cancels), and its detail."""
        rounds_ratios = [x / y for x, y in zip(per_round[a], per_round[b], strict=True)]
        of_medians = median(per_round[a]) / median(per_round[b])
        return median(rounds_ratios), _per_round(rounds_ratios, of_medians)

    value, ratio_detail = ratio("plugin", "stream_noop")
    result.add(
        Figure(
            f"{NAME}.plugin_over_stream_noop",
            "server CPU per completion: this function / stream no-op filter",
            value,
            "ratio",
            f"<= {TARGET_RATIO}",
            at_most(value, TARGET_RATIO),
            ratio_detail,
        )
    )
    value, ratio_detail = ratio("plugin_no_capture", "inlet_outlet")
    if capture_stream:
        label = "server CPU per completion: this function, capture_stream off / inlet-outlet-only filter"
        target, passed, detail = f"<= {TARGET_RATIO}", at_most(value, TARGET_RATIO), ratio_detail
    else:
        label = "capture_stream off / inlet-outlet-only: not available yet (no capture_stream valve)"
        target, passed = f"<= {TARGET_RATIO} (once the valve exists)", None
        detail = (
            "the plugin has no such valve and Open WebUI dropped it on save, so this phase ran the "
            "function with capture on; " + ratio_detail
        )
    result.add(
        Figure(f"{NAME}.plugin_no_capture_over_inlet_outlet", label, value, "ratio", target, passed, detail)
    )
    # The diagnostic split of each target figure: Open WebUI's price for the interface, then the
    # plugin's own work.
    for key, a, b, label in (
        (
            "interface_stream_over_stream_noop",
            "interface_stream",
            "stream_noop",
            "  stream control: this function's interface, no-op stream / stream no-op (Open WebUI's price)",
        ),
        (
            "plugin_over_interface_stream",
            "plugin",
            "interface_stream",
            "  this function / stream control (the plugin's own work, stream capture included)",
        ),
        (
            "interface_over_inlet_outlet",
            "interface",
            "inlet_outlet",
            "  control: this function's interface, no work / inlet-outlet-only filter (Open WebUI's price)",
        ),
        (
            "plugin_no_capture_over_interface",
            "plugin_no_capture",
            "interface",
            "  this function, capture_stream off / interface control (the plugin's own inlet and outlet)",
        ),
    ):
        value, ratio_detail = ratio(a, b)
        difference = median([x - y for x, y in zip(per_round[a], per_round[b], strict=True)])
        result.add(
            Figure(
                f"{NAME}.{key}",
                label,
                value,
                "ratio",
                detail=f"per-round difference {difference:+.1f} ms (median); {ratio_detail}",
            )
        )
    for config in CONFIGS[1:]:
        value, ratio_detail = ratio(config.key, "no_filter")
        unavailable = config.key == "plugin_no_capture" and not capture_stream
        result.add(
            Figure(
                f"{NAME}.{config.key}_over_no_filter",
                f"  {config.label}{' (valve not available yet)' if unavailable else ''} / no filter",
                value,
                "ratio",
                detail=ratio_detail,
            )
        )
    for config in CONFIGS:
        values = per_round[config.key]
        walls = [p.seconds for p in phases if p.config == config.key]
        result.add(
            Figure(
                f"{NAME}.{config.key}_cpu_ms",
                f"  {config.label}: server CPU per completion",
                median(values),
                "ms",
                detail=spread(values, unit="ms")
                + f"; a batch of {count} took {median(walls):.1f} s (median)",
            )
        )
    result.add(
        Figure(
            f"{NAME}.idle_cpu_ms_per_s",
            "control: idle server CPU (no filter, no requests)",
            idle / CLOCK_TICKS * 1000,
            "ms/s",
            detail=f"a quiet window before the rounds; {SETTLE_SECONDS} s of it is in every batch's reading",
        )
    )


if __name__ == "__main__":
    raise SystemExit(main_for(NAME, run))
