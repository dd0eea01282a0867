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
import dataclasses
import resource
import selectors
import time
import types
from collections.abc import Callable
from typing import Any

from bench.common import (
    BenchResult,
    Figure,
    SimulatedStream,
    at_most,
    close_plugin,
    command_for,
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

    async def completion(self, rebuild_valves: bool = False) -> Sample:
        from tests.unit.helpers import outlet_body

        self.counter += 1
        message_id = f"msg-{self.counter}"
        chat_id = f"chat-{self.counter % 50}"
        metadata: dict[str, Any] = {"chat_id": chat_id, "message_id": message_id, "session_id": "s-1"}
        body = dict(self.stream.request)
        outlet = outlet_body(
            self.stream.request, self.answer, self.usage, message_id=message_id, chat_id=chat_id
        )
        user = dict(self.user, valves=self.plugin.Filter.UserValves())
        rebuild: Callable[[], None] = self._rebuild_valves if rebuild_valves else _nothing
        hook, chunks = self.hook, self.stream.chunks
        idle_before = self.selector.idle_ns
        started = time.thread_time_ns()
        rebuild()
        await hook.inlet(body=body, __metadata__=metadata, __model__=MODEL)
        after_inlet = time.thread_time_ns()
        for chunk in chunks:
            rebuild()
            await hook.stream(event=chunk, __metadata__=metadata)
        after_stream = time.thread_time_ns()
        rebuild()
        if rebuild_valves:
            user["valves"] = self.plugin.Filter.UserValves()
        await hook.outlet(body=outlet, __user__=user, __metadata__=metadata, __event_emitter__=self.emitter)
        finished = time.thread_time_ns()
        return Sample(
            after_inlet - started,
            after_stream - after_inlet,
            finished - after_stream,
            self.selector.idle_ns - idle_before,
        )


def _nothing() -> None:
    return None


class ResolvedWriter:
    """Diagnostic stand-in for the group-commit writer: the future is already resolved, so outlet
    never waits for another thread (what is left is the plugin's own on-loop work)."""

    def __init__(self, plugin: types.ModuleType, ledger: Any) -> None:
        self.plugin = plugin
        self.ledger = ledger

    def submit(self, request: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_result(self.plugin.WriteOutcome("recorded", chat_spend_pico=0))
        return future


def _thread_rusage() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime, usage.ru_stime


def _us(samples: list[Sample], field: Callable[[Sample], int]) -> list[float]:
    return [field(s) / 1000 for s in samples]


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    sizes = {100: 100 if quick else 400, 2000: 15 if quick else 60}
    warmup = 10 if quick else 30
    with isolated_data_dir(NAME) as data:
        plugin = load_plugin()
        url = sqlite_url(data / "ledger.sqlite3")
        streams = {n: simulated_stream(n) for n in sizes}
        selector = IdleMeasuringSelector()
        loop = asyncio.SelectorEventLoop(selector)
        try:
            for chunks, count in sizes.items():
                runner = CompletionRunner(plugin, url, streams[chunks], selector)
                for _ in range(warmup):
                    loop.run_until_complete(runner.completion())
                progress(f"{count} completions of {chunks} chunks")
                user0, system0 = _thread_rusage()
                samples = [loop.run_until_complete(runner.completion()) for _ in range(count)]
                user1, system1 = _thread_rusage()
                _report(result, chunks, samples, target=chunks == 100)
                cpu = (user1 - user0) + (system1 - system0)
                result.note(
                    f"{chunks} chunks: loop-thread CPU is {100 * (system1 - system0) / cpu:.0f}% system time "
                    f"(getrusage RUSAGE_THREAD over the {count} completions)"
                )
                if chunks == 100:
                    progress("the same with Open WebUI's per-hook valves rebuild")
                    rebuilt = [loop.run_until_complete(runner.completion(True)) for _ in range(count // 2)]
                    total = _us(rebuilt, lambda s: s.total_ns)
                    result.add(
                        Figure(
                            "event_loop.completion_100_with_valves_us",
                            "100 chunks, incl. Open WebUI's Valves(**saved) before every hook",
                            median(total),
                            "µs",
                            detail=spread(total, unit="µs"),
                        )
                    )
                    progress("the same with the writer's future already resolved (diagnostic)")
                    real_writer_for = plugin.writer_for
                    stub = ResolvedWriter(plugin, real_writer_for(plugin.resolve_database_url(url)).ledger)
                    plugin.writer_for = lambda _url, stub=stub: stub
                    try:
                        resolved = [loop.run_until_complete(runner.completion()) for _ in range(count // 2)]
                    finally:
                        plugin.writer_for = real_writer_for
                    outlet = _us(resolved, lambda s: s.outlet_ns)
                    result.add(
                        Figure(
                            "event_loop.outlet_no_handoff_us",
                            "  outlet with no thread hand-off (writer stubbed, diagnostic)",
                            median(outlet),
                            "µs",
                            detail=spread(outlet, unit="µs"),
                        )
                    )
            loop.run_until_complete(_pure_handoff(result, 60 if quick else 200))
        finally:
            loop.close()
            close_plugin(plugin)
    result.note(
        "total = loop-thread CPU from inlet to outlet's return (time.thread_time_ns); 'net' subtracts the "
        "CPU this VM charges the loop thread inside blocking epoll waits (idle, waiting for the writer)."
    )
    return result


async def _pure_handoff(result: BenchResult, count: int) -> None:
    """The loop-thread CPU of awaiting one future resolved by another thread after 2 ms: what any
    off-loop hand-off costs on this machine, independent of the plugin."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    samples = []
    try:
        for _ in range(count):
            started = time.thread_time_ns()
            await asyncio.wrap_future(pool.submit(time.sleep, 0.002))
            samples.append((time.thread_time_ns() - started) / 1000)
    finally:
        pool.shutdown()
    result.add(
        Figure(
            "event_loop.bare_handoff_us",
            "await of a future another thread resolves after 2 ms (no plugin)",
            median(samples),
            "µs",
            detail=spread(samples, unit="µs"),
        )
    )


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
