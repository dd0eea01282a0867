"""Event-loop time per completion: inlet + stream (every chunk) + outlet, off-loop write excluded.

Method: one asyncio loop runs completions one after another against an SQLite ledger (the
plugin's durable group-commit writer, usage line on, as with default valves). For each completion
the loop thread reads its own CPU clock (`time.thread_time_ns`, CLOCK_THREAD_CPUTIME_ID) before
inlet and after outlet: the writer thread's work is on another thread, and while outlet awaits
its future the loop thread sleeps, so both are excluded by construction. Chunks are real ones from
the OpenRouter simulator (100 and 2,000 content chunks), outlet bodies are built as Open WebUI
0.12.4 builds them (tests/unit/helpers.py::outlet_body). Median over many completions, after a
warm-up.

On this machine (a microVM) a thread that blocks and is woken up is charged tens of microseconds
of CPU for the sleep itself (see the `idle` figures), which a loop with other ready work would not
pay per completion. The loop therefore runs on a selector that also reads the thread's CPU clock
around every blocking select(), and the benchmark reports the total both with and without that
idle-wait charge.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import json
import resource
import selectors
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

from bench.common import (
    BenchResult,
    Figure,
    SimulatedStream,
    at_most,
    call_hook,
    close_plugin,
    command_for,
    gc_paused,
    isolated_data_dir,
    load_plugin,
    main_for,
    median,
    progress,
    simulated_stream,
    spread,
    sqlite_url,
)

NAME = "event_loop"
TARGET_US = 200.0
MODEL = {"id": "openai/gpt-4o-mini", "urlIdx": 0}


class IdleMeasuringSelector(selectors.EpollSelector):
    """An epoll selector that charges the loop thread's CPU time spent inside blocking selects
    (the loop's idle wait, e.g. for the writer's future) to `idle_ns`."""

    def __init__(self) -> None:
        super().__init__()
        self.idle_ns = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        started = time.thread_time_ns()
        try:
            return super().select(timeout)
        finally:
            self.idle_ns += time.thread_time_ns() - started


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    inlet_ns: int
    stream_ns: int
    outlet_ns: int
    idle_ns: int
    parse_ns: int  # json.loads of the completion's chunks, as Open WebUI parses them (not in total)

    @property
    def total_ns(self) -> int:
        return self.inlet_ns + self.stream_ns + self.outlet_ns

    @property
    def net_ns(self) -> int:
        return self.total_ns - self.idle_ns


class Emitter:
    def __init__(self) -> None:
        self.last: dict[str, Any] | None = None

    async def __call__(self, event: dict[str, Any]) -> None:
        self.last = event


class CompletionRunner:
    """Runs whole completions through one Filter instance, as Open WebUI calls its hooks."""

    def __init__(
        self, plugin: types.ModuleType, url: str, stream: SimulatedStream, selector: IdleMeasuringSelector
    ):
        from tests.unit.helpers import answer_text, usage_from_events

        self.plugin = plugin
        self.hook = plugin.Filter()
        self.saved_valves = plugin.Filter.Valves(database_url=url).model_dump()
        self.hook.valves = plugin.Filter.Valves(**self.saved_valves)
        self.stream = stream
        self.answer = answer_text(stream.chunks)
        self.usage = usage_from_events(stream.chunks)
        self.selector = selector
        self.emitter = Emitter()
        self.user: dict[str, Any] = {
            "id": "user-1",
            "name": "Ada",
            "email": "ada@example.com",
            "role": "user",
        }
        self.counter = 0

    def _rebuild_valves(self) -> None:
        """What Open WebUI 0.12.4 does before each hook call: valves (and user valves) from storage."""
        self.hook.valves = self.plugin.Filter.Valves(**self.saved_valves)

    def prepare(self) -> Prepared:
        """Everything Open WebUI has before the hooks run for one request (not timed)."""
        from tests.unit.helpers import outlet_body

        self.counter += 1
        message_id = f"msg-{self.counter}"
        chat_id = f"chat-{self.counter % 50}"
        return Prepared(
            body=dict(self.stream.request),
            metadata={"chat_id": chat_id, "message_id": message_id, "session_id": "s-1"},
            outlet=outlet_body(
                self.stream.request, self.answer, self.usage, message_id=message_id, chat_id=chat_id
            ),
            user=dict(self.user, valves=self.plugin.Filter.UserValves()),
        )

    async def completion(self, rebuild_valves: bool = False, prepared: Prepared | None = None) -> Sample:
        """One request: inlet, then the chunks (parsed fresh, as Open WebUI hands them over: a
        re-used parsed list would give the hook cache-cold objects; parsing is timed apart and
        left out of the total), then outlet."""
        request = prepared or self.prepare()
        rebuild: Callable[[], None] = self._rebuild_valves if rebuild_valves else _nothing
        hook, metadata = self.hook, request.metadata
        idle_before = self.selector.idle_ns
        started = time.thread_time_ns()
        rebuild()
        await call_hook(hook.inlet, body=request.body, __metadata__=metadata, __model__=MODEL)
        after_inlet = time.thread_time_ns()
        chunks = [json.loads(payload) for payload in self.stream.payloads]
        parsed = time.thread_time_ns()
        if inspect.iscoroutinefunction(hook.stream):
            for chunk in chunks:
                rebuild()
                await hook.stream(event=chunk, __metadata__=metadata)
        else:
            for chunk in chunks:
                rebuild()
                hook.stream(event=chunk, __metadata__=metadata)
        after_stream = time.thread_time_ns()
        rebuild()
        if rebuild_valves:
            request.user["valves"] = self.plugin.Filter.UserValves()
        await call_hook(
            hook.outlet,
            body=request.outlet,
            __user__=request.user,
            __metadata__=metadata,
            __event_emitter__=self.emitter,
        )
        finished = time.thread_time_ns()
        return Sample(
            after_inlet - started,
            after_stream - parsed,
            finished - after_stream,
            self.selector.idle_ns - idle_before,
            parsed - after_inlet,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    body: dict[str, Any]
    metadata: dict[str, Any]
    outlet: dict[str, Any]
    user: dict[str, Any]


def _nothing() -> None:
    return None


class ResolvedWriter:
    """Diagnostic stand-in for the group-commit writer: the outcome is there at once, so outlet
    never waits for another thread (what is left is the plugin's own on-loop work). Offers both
    ways the plugin has awaited its writer: `submit` (a concurrent Future) and `write` (async)."""

    def __init__(self, plugin: types.ModuleType, ledger: Any) -> None:
        self.plugin = plugin
        self.ledger = ledger

    def _outcome(self) -> Any:
        return self.plugin.WriteOutcome("recorded", chat_spend_pico=0)

    def submit(self, request: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_result(self._outcome())
        return future

    async def write(self, request: Any) -> Any:
        return self._outcome()


class SleepingWriter(ResolvedWriter):
    """Control: the outcome arrives after a 2 ms asyncio timer, about as long as a real durable
    write, with no other thread and no database. What outlet then costs the loop is what this
    machine charges any coroutine that sleeps for that long, not the plugin's hand-off."""

    async def write(self, request: Any) -> Any:
        await asyncio.sleep(0.002)
        return self._outcome()


@contextlib.contextmanager
def stubbed_writer(plugin: types.ModuleType, stub: ResolvedWriter) -> Iterator[None]:
    """Point this plugin instance's writer_for at `stub` (the module object only; no file edits)."""
    real = plugin.writer_for
    setattr(plugin, "writer_for", lambda _url: stub)  # noqa: B010 - a ModuleType attribute
    try:
        yield
    finally:
        setattr(plugin, "writer_for", real)  # noqa: B010


def _thread_rusage() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime, usage.ru_stime


def _us(samples: list[Sample], field: Callable[[Sample], int]) -> list[float]:
    return [field(s) / 1000 for s in samples]


@dataclasses.dataclass(slots=True)
class Collected:
    real: dict[int, list[Sample]] = dataclasses.field(default_factory=lambda: {100: [], 2000: []})
    resolved: list[Sample] = dataclasses.field(default_factory=list)
    sleeping: list[Sample] = dataclasses.field(default_factory=list)
    with_valves: list[Sample] = dataclasses.field(default_factory=list)
    concurrent_us: list[float] = dataclasses.field(default_factory=list)
    json_ns: list[float] = dataclasses.field(default_factory=list)
    handoff_us: list[float] = dataclasses.field(default_factory=list)
    cpu: dict[int, list[float]] = dataclasses.field(
        default_factory=lambda: {100: [0.0, 0.0], 2000: [0.0, 0.0]}
    )


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    rounds = 1 if quick else 3
    per_round = {100: 100 if quick else 150, 2000: 15 if quick else 20}
    warmup = 10 if quick else 30
    collected = Collected()
    with isolated_data_dir(NAME) as data:
        plugin = load_plugin()
        url = sqlite_url(data / "ledger.sqlite3")
        streams = {n: simulated_stream(n) for n in per_round}
        selector = IdleMeasuringSelector()
        loop = asyncio.SelectorEventLoop(selector)
        runners = {n: CompletionRunner(plugin, url, streams[n], selector) for n in per_round}
        stub = ResolvedWriter(plugin, plugin.writer_for(plugin.resolve_database_url(url)).ledger)
        try:
            for runner in runners.values():
                for _ in range(warmup):
                    loop.run_until_complete(runner.completion())
            for index in range(rounds):
                progress(
                    f"round {index + 1}/{rounds}: {per_round[100]} completions of 100 chunks (and every "
                    f"variant as a block), {per_round[2000]} of 2000 chunks"
                )
                _round(loop, plugin, runners, stub, per_round, collected)
        finally:
            loop.close()
            close_plugin(plugin)
    for chunks in per_round:
        _report(result, chunks, collected.real[chunks], target=chunks == 100)
        user, system = collected.cpu[chunks]
        result.note(
            f"{chunks} chunks: {100 * system / (user + system):.0f}% of the loop thread's CPU is system time "
            "(getrusage RUSAGE_THREAD)"
        )
    total = _us(collected.with_valves, lambda s: s.total_ns)
    for key, label, values in (
        (
            "outlet_no_handoff_us",
            "  outlet with the writer stubbed (future already resolved)",
            _us(collected.resolved, lambda s: s.outlet_ns),
        ),
        (
            "completion_100_no_handoff_us",
            "100 chunks with the writer stubbed: the plugin's own work, loop never idle",
            _us(collected.resolved, lambda s: s.total_ns),
        ),
        (
            "completion_100_sleeping_writer_us",
            "100 chunks, control: writer replaced by a 2 ms asyncio.sleep (no thread, no database)",
            _us(collected.sleeping, lambda s: s.total_ns),
        ),
    ):
        result.add(Figure(f"event_loop.{key}", label, median(values), "µs", detail=spread(values, unit="µs")))
    result.add(
        Figure(
            "event_loop.bare_handoff_us",
            "await of a future another thread resolves after 2 ms (no plugin)",
            median(collected.handoff_us),
            "µs",
            detail=spread(collected.handoff_us, unit="µs"),
        )
    )
    result.add(
        Figure(
            "event_loop.concurrent_16_us",
            "100 chunks, 16 completions at once: loop CPU per completion",
            median(collected.concurrent_us),
            "µs",
            detail=spread(collected.concurrent_us, unit="µs") + "; one batch's loop CPU / 16",
        )
    )
    result.add(
        Figure(
            "event_loop.completion_100_with_valves_us",
            "100 chunks, incl. Open WebUI's Valves(**saved) before every hook",
            median(total),
            "µs",
            detail=spread(total, unit="µs"),
        )
    )
    result.add(
        Figure(
            "event_loop.json_loads_ns",
            "calibration: json.loads of one chunk, same run",
            median(collected.json_ns),
            "ns/chunk",
            detail="what Open WebUI pays per chunk anyway; shows how fast the machine was",
        )
    )
    result.note(
        "total = loop-thread CPU from inlet to outlet's return (time.thread_time_ns); 'net' subtracts the "
        "CPU this VM charges the loop thread inside blocking epoll waits (idle, waiting for the writer). "
        f"{rounds} round(s), each running every variant as a block."
    )
    return result


def _round(
    loop: asyncio.AbstractEventLoop,
    plugin: types.ModuleType,
    runners: dict[int, CompletionRunner],
    stub: ResolvedWriter,
    per_round: dict[int, int],
    collected: Collected,
) -> None:
    """One block of each variant, back to back (blocks rather than completion-by-completion
    interleaving, so that no variant runs in the wake of another's writer-thread activity)."""
    for chunks in (100, 2000):
        user0, system0 = _thread_rusage()
        for _ in range(per_round[chunks]):
            collected.real[chunks].append(loop.run_until_complete(runners[chunks].completion()))
        user1, system1 = _thread_rusage()
        collected.cpu[chunks][0] += user1 - user0
        collected.cpu[chunks][1] += system1 - system0
    runner, count = runners[100], per_round[100]
    with stubbed_writer(plugin, stub):
        for _ in range(count // 2):
            collected.resolved.append(loop.run_until_complete(runner.completion()))
    with stubbed_writer(plugin, SleepingWriter(plugin, stub.ledger)):
        for _ in range(count // 2):
            collected.sleeping.append(loop.run_until_complete(runner.completion()))
    for _ in range(count // 2):
        collected.with_valves.append(loop.run_until_complete(runner.completion(rebuild_valves=True)))
    for _ in range(count // 3):
        collected.handoff_us.append(loop.run_until_complete(_bare_handoff()))
    for _ in range(max(count // 20, 3)):
        collected.concurrent_us.append(loop.run_until_complete(_concurrent(runner, 16)))
    payloads = runner.stream.payloads
    for _ in range(20):
        with gc_paused():
            started = time.perf_counter_ns()
            for payload in payloads:
                json.loads(payload)
            collected.json_ns.append((time.perf_counter_ns() - started) / len(payloads))


_HANDOFF_POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-handoff")


async def _bare_handoff() -> float:
    """Loop-thread CPU (µs) of awaiting one future another thread resolves after 2 ms: what any
    off-loop hand-off costs on this machine, independent of the plugin."""
    started = time.thread_time_ns()
    await asyncio.wrap_future(_HANDOFF_POOL.submit(time.sleep, 0.002))
    return (time.thread_time_ns() - started) / 1000


async def _concurrent(runner: CompletionRunner, count: int) -> float:
    """Loop-thread CPU (µs) per completion when `count` completions run at once (their outlets
    share group commits and wake-ups); the chunks' json.loads is subtracted."""
    prepared = [runner.prepare() for _ in range(count)]
    started = time.thread_time_ns()
    samples = await asyncio.gather(*(runner.completion(prepared=p) for p in prepared))
    elapsed = time.thread_time_ns() - started - sum(sample.parse_ns for sample in samples)
    return elapsed / 1000 / count


def _report(result: BenchResult, chunks: int, samples: list[Sample], target: bool) -> None:
    total = _us(samples, lambda s: s.total_ns)
    net = _us(samples, lambda s: s.net_ns)
    result.add(
        Figure(
            f"event_loop.completion_{chunks}_us",
            f"{chunks} chunks: inlet + stream + outlet (thread_time)",
            median(total),
            "µs",
            f"<= {TARGET_US:.0f} µs" if target else "",
            at_most(median(total), TARGET_US) if target else None,
            spread(total, unit="µs") + ("" if target else f"; target is for 100 chunks (this: {chunks})"),
        )
    )
    result.add(
        Figure(
            f"event_loop.completion_{chunks}_net_us",
            f"{chunks} chunks: same, net of idle-wait CPU in epoll",
            median(net),
            "µs",
            detail=spread(net, unit="µs"),
        )
    )
    relative = [s.total_ns / s.parse_ns for s in samples]
    result.add(
        Figure(
            f"event_loop.completion_{chunks}_over_parse",
            f"{chunks} chunks: same / json.loads of the completion's chunks",
            median(relative),
            "ratio",
            detail="per completion; Open WebUI's own parsing of the same chunks, timed just before",
        )
    )
    for key, label, field in (
        ("inlet", "inlet", lambda s: s.inlet_ns),
        ("stream", f"stream ({chunks} chunks)", lambda s: s.stream_ns),
        ("outlet", "outlet (incl. idle wait)", lambda s: s.outlet_ns),
        ("idle", "idle-wait CPU in epoll", lambda s: s.idle_ns),
    ):
        values = _us(samples, field)
        result.add(
            Figure(f"event_loop.{key}_{chunks}_us", f"  {label}", median(values), "µs", detail=spread(values))
        )


if __name__ == "__main__":
    raise SystemExit(main_for(NAME, run))
