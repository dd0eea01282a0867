"""Event-loop time per completion: inlet + stream (every chunk) + outlet, off-loop write excluded,
for the current plugin and for release 1.0.0, measured interleaved in one run.

Target: the current plugin's event-loop CPU per 100-chunk completion is at most 1.2x release
1.0.0's (git c1e0c47). The machine is shared and noisy, and an absolute figure moves by tens of
percent from one run to the next, so the comparison is a ratio of two figures measured in the
same process, on the same event loop, in alternating blocks.

Method: both versions are loaded in this process as Open WebUI loads a function (the source text
exec'd into a fresh module, tests/factories.py::load_plugin_module; 1.0.0's source comes from
`git show c1e0c47…:plugin/openrouter_usage.py`), so they share no module globals: each has its own
group-commit writer, writer thread and SQLite ledger file. One asyncio loop runs completions one
after another, in blocks of BLOCK completions alternating between the two versions (ABBA order);
within each block the loop thread reads its own CPU clock (`time.thread_time_ns`,
CLOCK_THREAD_CPUTIME_ID) before inlet and after outlet: the writer thread's work is on another
thread, and while outlet awaits the write the loop thread sleeps, so both are excluded by
construction. Chunks are real ones from the OpenRouter simulator (100 and 2,000 content chunks),
parsed fresh for every completion (timed apart, left out); outlet bodies are built as Open WebUI
0.12.4 builds them (tests/factories.py::outlet_body); valves are the defaults (usage line on
with the chat total, so the writer also sums the chat's spend off the loop). The ratio is
median(current) / median(1.0.0) over all interleaved completions; the per-block-pair ratios are
printed as its spread.

On this machine (a microVM) a thread that blocks and is woken up is charged tens of microseconds
of CPU for the sleep itself (see the `idle` figures). The loop therefore runs on a selector that
also reads the thread's CPU clock around every blocking select(), and the benchmark reports the
total both with and without that idle-wait charge.
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
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from bench.common import (
    RELEASE_COMMIT,
    RELEASE_LABEL,
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
    load_release_plugin,
    main_for,
    median,
    progress,
    simulated_stream,
    spread,
    sqlite_url,
)

NAME = "event_loop"
TARGET_RATIO = 1.2  # current / release 1.0.0, loop CPU per 100-chunk completion
BLOCK = 10  # completions per block; blocks alternate between the two versions
MODEL = {"id": "openai/gpt-4o-mini", "urlIdx": 0}
VERSIONS = ("current", "release")


class IdleMeasuringSelector(selectors.EpollSelector):
    """An epoll selector that charges the loop thread's CPU time spent inside blocking selects
    (the loop's idle wait, e.g. for the writer's answer) to `idle_ns`."""

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
    """Counts the usage lines outlet shows: every measured completion must show one, so an outlet
    that failed (and returned early, which would look cheap) stops the benchmark."""

    def __init__(self) -> None:
        self.last: dict[str, Any] | None = None
        self.lines = 0

    async def __call__(self, event: dict[str, Any]) -> None:
        self.last = event
        if event.get("type") == "status":
            self.lines += 1


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    body: dict[str, Any]
    metadata: dict[str, Any]
    outlet: dict[str, Any]
    outlet_extra: dict[str, Any]  # the dunders outlet names, as Open WebUI picks them


class CompletionRunner:
    """Runs whole completions through one Filter instance of one plugin version, as Open WebUI
    calls its hooks."""

    def __init__(
        self,
        plugin: types.ModuleType,
        url: str,
        stream: SimulatedStream,
        selector: IdleMeasuringSelector,
        label: str,
    ) -> None:
        from tests.factories import answer_text, usage_from_events

        self.plugin = plugin
        self.hook = plugin.Filter()
        self.saved_valves = plugin.Filter.Valves(database_url=url).model_dump()
        self.hook.valves = plugin.Filter.Valves(**self.saved_valves)
        self.stream = stream
        self.answer = answer_text(stream.chunks)
        self.usage = usage_from_events(stream.chunks)
        self.selector = selector
        self.label = label  # keeps message ids unique per runner on a ledger shared by two runners
        self.emitter = Emitter()
        self.user: dict[str, Any] = {
            "id": "user-1",
            "name": "Ada",
            "email": "ada@example.com",
            "role": "user",
        }
        self.counter = 0

    def prepare(self) -> Prepared:
        """Everything Open WebUI has before the hooks run for one request (not timed)."""
        from tests.factories import outlet_body

        self.counter += 1
        message_id = f"msg-{self.label}-{self.counter}"
        chat_id = f"chat-{self.counter % 50}"
        metadata = {"chat_id": chat_id, "message_id": message_id, "session_id": "s-1"}
        return Prepared(
            body=dict(self.stream.request),
            metadata=metadata,
            outlet=outlet_body(
                self.stream.request, self.answer, self.usage, message_id=message_id, chat_id=chat_id
            ),
            outlet_extra=self.outlet_extra(metadata),
        )

    def outlet_extra(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """What Open WebUI offers outlet, narrowed to the parameters it names (utils/filter.py::
        get_filter_params); 1.0.0 takes `__user__`, the current plugin `__request__`."""
        from tests.factories import FUNCTION_ID, webui_request

        offered = {
            "__id__": FUNCTION_ID,
            "__user__": dict(self.user, valves=self.plugin.Filter.UserValves()),
            "__request__": webui_request(self.user),
            "__metadata__": metadata,
            "__event_emitter__": self.emitter,
        }
        accepted = inspect.signature(self.hook.outlet).parameters
        return {key: value for key, value in offered.items() if key in accepted}

    async def completion(self, prepared: Prepared | None = None) -> Sample:
        """One request: inlet, then the chunks (parsed fresh, as Open WebUI hands them over: a
        re-used parsed list would give the hook cache-cold objects; parsing is timed apart and
        left out of the total), then outlet."""
        request = prepared or self.prepare()
        hook, metadata = self.hook, request.metadata
        idle_before = self.selector.idle_ns
        started = time.thread_time_ns()
        await call_hook(hook.inlet, body=request.body, __metadata__=metadata, __model__=MODEL)
        after_inlet = time.thread_time_ns()
        chunks = [json.loads(payload) for payload in self.stream.payloads]
        parsed = time.thread_time_ns()
        if inspect.iscoroutinefunction(hook.stream):
            for chunk in chunks:
                await hook.stream(event=chunk, __metadata__=metadata)
        else:
            for chunk in chunks:
                hook.stream(event=chunk, __metadata__=metadata)
        after_stream = time.thread_time_ns()
        lines = self.emitter.lines
        await call_hook(hook.outlet, body=request.outlet, **request.outlet_extra)
        finished = time.thread_time_ns()
        if self.emitter.lines == lines:
            raise RuntimeError(
                f"{self.label}: outlet showed no usage line for {request.metadata['message_id']}: the "
                "completion was not recorded (see the plugin's log above)"
            )
        return Sample(
            after_inlet - started,
            after_stream - parsed,
            finished - after_stream,
            self.selector.idle_ns - idle_before,
            parsed - after_inlet,
        )


class ResolvedWriter:
    """Diagnostic stand-in for the group-commit writer: the outcome is there at once, so outlet
    never waits for another thread (what is left is the plugin's own on-loop work). Offers both
    ways an outlet may await its writer: `submit` (a concurrent Future, e.g. through
    asyncio.wrap_future) and `write` (a coroutine). Counts its calls, so a plugin that no longer
    reaches its writer through `writer_for` is noticed instead of measured wrongly."""

    def __init__(self, plugin: types.ModuleType, ledger: Any) -> None:
        self.plugin = plugin
        self.ledger = ledger  # outlet may read through it (the one-time bulk-sync notice)
        self.calls = 0

    def _outcome(self) -> Any:
        """A recorded outcome; for a plugin whose writer renders the usage line (it builds the
        record off the loop), with a line, so outlet still shows one."""
        self.calls += 1
        fields = {f.name for f in dataclasses.fields(self.plugin.WriteOutcome)}
        if "usage_line" in fields:
            return self.plugin.WriteOutcome("recorded", chat_spend_pico=0, usage_line="model · $0.0001")
        return self.plugin.WriteOutcome("recorded", chat_spend_pico=0)

    def submit(self, request: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_result(self._outcome())
        return future

    async def write(self, request: Any) -> Any:
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


def _total(sample: Sample) -> int:
    return sample.total_ns


@dataclasses.dataclass(slots=True)
class Paired:
    """One comparison: samples of both versions, and the ratio of each interleaved block pair."""

    samples: dict[str, list[Any]] = dataclasses.field(default_factory=lambda: {v: [] for v in VERSIONS})
    block_ratios: list[float] = dataclasses.field(default_factory=list)
    cpu: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {v: [0.0, 0.0] for v in VERSIONS})

    def ratio(self, value: Callable[[Any], float]) -> float:
        current = median([value(s) for s in self.samples["current"]])
        release = median([value(s) for s in self.samples["release"]])
        return current / release


def interleave(
    loop: asyncio.AbstractEventLoop,
    work: Mapping[str, Callable[[], Awaitable[Any]]],
    blocks: int,
    per_block: int,
    into: Paired,
    value: Callable[[Any], float],
) -> None:
    """`blocks` pairs of blocks of `per_block` runs of each version's `work`, in ABBA order, so
    neither version always runs first or in the wake of the other's writer."""
    for index in range(blocks):
        order = VERSIONS if index % 2 == 0 else VERSIONS[::-1]
        block_medians: dict[str, float] = {}
        for version in order:
            user0, system0 = _thread_rusage()
            block = [loop.run_until_complete(work[version]()) for _ in range(per_block)]
            user1, system1 = _thread_rusage()
            into.cpu[version][0] += user1 - user0
            into.cpu[version][1] += system1 - system0
            into.samples[version].extend(block)
            block_medians[version] = median([value(sample) for sample in block])
        into.block_ratios.append(block_medians["current"] / block_medians["release"])


@dataclasses.dataclass(slots=True)
class Collected:
    real: dict[int, Paired] = dataclasses.field(default_factory=lambda: {100: Paired(), 2000: Paired()})
    resolved: Paired = dataclasses.field(default_factory=Paired)
    concurrent: Paired = dataclasses.field(default_factory=Paired)
    json_ns: list[float] = dataclasses.field(default_factory=list)
    stub_missed: dict[str, bool] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class Version:
    plugin: types.ModuleType
    runners: dict[int, CompletionRunner]
    stub: ResolvedWriter


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    rounds = 1 if quick else 3
    blocks = {100: 6 if quick else 15, 2000: 2 if quick else 3}  # block pairs per round
    per_block = {100: BLOCK, 2000: 5}
    warmup = 10 if quick else 30
    collected = Collected()
    with isolated_data_dir(NAME) as data:
        plugins = {"current": load_plugin(), "release": load_release_plugin()}
        streams = {n: simulated_stream(n) for n in per_block}
        selector = IdleMeasuringSelector()
        loop = asyncio.SelectorEventLoop(selector)
        versions: dict[str, Version] = {}
        for key, plugin in plugins.items():
            url = sqlite_url(data / f"ledger-{key}.sqlite3")  # one ledger file per version
            versions[key] = Version(
                plugin,
                {n: CompletionRunner(plugin, url, streams[n], selector, f"{key}-{n}") for n in per_block},
                ResolvedWriter(plugin, plugin.ledger_for(url)),
            )
        try:
            for key, version in versions.items():
                progress(f"warming up {key}: {warmup} completions of each size")
                for runner in version.runners.values():
                    for _ in range(warmup):
                        loop.run_until_complete(runner.completion())
            for index in range(rounds):
                progress(
                    f"round {index + 1}/{rounds}: {blocks[100]} x {per_block[100]} completions of 100 chunks "
                    f"per version, interleaved; {blocks[2000]} x {per_block[2000]} of 2000 chunks; controls"
                )
                _round(loop, versions, blocks, per_block, collected)
        finally:
            loop.close()
            for plugin in plugins.values():
                close_plugin(plugin)
    _report(result, collected, rounds)
    return result


def _round(
    loop: asyncio.AbstractEventLoop,
    versions: dict[str, Version],
    blocks: dict[int, int],
    per_block: dict[int, int],
    collected: Collected,
) -> None:
    """One round: both versions interleaved for each comparison, then the current plugin's controls
    as blocks (so that no control runs in the wake of a real writer's work)."""
    for chunks in (100, 2000):
        work = {key: v.runners[chunks].completion for key, v in versions.items()}
        interleave(loop, work, blocks[chunks], per_block[chunks], collected.real[chunks], _total)
    for key, version in versions.items():  # the plugin's own work: every writer stubbed
        with stubbed_writer(version.plugin, version.stub):
            before = version.stub.calls
            loop.run_until_complete(version.runners[100].completion())
            collected.stub_missed[key] = version.stub.calls == before
    with contextlib.ExitStack() as stack:
        for version in versions.values():
            stack.enter_context(stubbed_writer(version.plugin, version.stub))
        work = {key: v.runners[100].completion for key, v in versions.items()}
        interleave(loop, work, max(blocks[100] // 2, 2), per_block[100], collected.resolved, _total)
    concurrent_work = {key: _concurrent_factory(v.runners[100], 16) for key, v in versions.items()}
    interleave(loop, concurrent_work, max(blocks[100] // 5, 2), 3, collected.concurrent, float)
    payloads = versions["current"].runners[100].stream.payloads
    for _ in range(20):
        with gc_paused():
            started = time.perf_counter_ns()
            for payload in payloads:
                json.loads(payload)
            collected.json_ns.append((time.perf_counter_ns() - started) / len(payloads))


def _concurrent_factory(runner: CompletionRunner, count: int) -> Callable[[], Awaitable[float]]:
    async def completions() -> float:
        return await _concurrent(runner, count)

    return completions


async def _concurrent(runner: CompletionRunner, count: int) -> float:
    """Loop-thread CPU (µs) per completion when `count` completions run at once (their outlets
    share group commits and wake-ups); the chunks' json.loads is subtracted."""
    prepared = [runner.prepare() for _ in range(count)]
    started = time.thread_time_ns()
    samples = await asyncio.gather(*(runner.completion(prepared=p) for p in prepared))
    elapsed = time.thread_time_ns() - started - sum(sample.parse_ns for sample in samples)
    return elapsed / 1000 / count


def _ratio_detail(paired: Paired) -> str:
    return f"per block pair: {spread(paired.block_ratios)}; medians of {len(paired.samples['current'])} each"


def _ratio_figure(key: str, label: str, paired: Paired, measure: Callable[[Any], float]) -> Figure:
    """median(current) / median(release) of `measure` over the paired samples (informational)."""
    return Figure(key, label, paired.ratio(measure), "ratio", detail=_ratio_detail(paired))


def _us_figure(key: str, label: str, values: list[float], detail: str = "") -> Figure:
    """The median of `values` in µs, with their spread (then `detail`) as the detail."""
    return Figure(key, label, median(values), "µs", detail=spread(values, unit="µs") + detail)


def _report(result: BenchResult, collected: Collected, rounds: int) -> None:
    real = collected.real[100]
    ratio = real.ratio(_total)
    release = f"{RELEASE_LABEL} (git {RELEASE_COMMIT[:7]})"
    result.add(
        Figure(
            "event_loop.ratio_100",
            f"100 chunks: loop CPU per completion, current / {RELEASE_LABEL}",
            ratio,
            "ratio",
            f"<= {TARGET_RATIO}",
            at_most(ratio, TARGET_RATIO),
            _ratio_detail(real),
        )
    )
    for key, label in (("current", "current plugin"), ("release", release)):
        result.add(
            _us_figure(
                f"event_loop.{key}_completion_100_us",
                f"  100 chunks, {label}: inlet + stream + outlet (thread_time)",
                _us(real.samples[key], _total),
            )
        )
    result.add(
        Figure(
            "event_loop.ratio_100_net",
            f"  100 chunks, net of idle-wait CPU in epoll: current / {RELEASE_LABEL}",
            real.ratio(lambda s: s.net_ns),
            "ratio",
            detail="the same completions, each minus the CPU charged inside blocking epoll waits",
        )
    )
    for key, label in (("current", "current"), ("release", RELEASE_LABEL)):
        samples = real.samples[key]
        for part, field in (
            ("inlet", lambda s: s.inlet_ns),
            ("stream", lambda s: s.stream_ns),
            ("outlet", lambda s: s.outlet_ns),
            ("idle", lambda s: s.idle_ns),
        ):
            result.add(
                _us_figure(
                    f"event_loop.{key}_{part}_100_us",
                    f"    {label}: {part}" + (" (CPU inside blocking epoll waits)" if part == "idle" else ""),
                    _us(samples, field),
                )
            )
        user, system = real.cpu[key]
        result.note(
            f"100 chunks, {label}: {100 * system / (user + system):.0f}% of the loop thread's CPU is system "
            "time (getrusage RUSAGE_THREAD)"
        )
    current_total = _us(real.samples["current"], _total)
    relative = [s.total_ns / s.parse_ns for s in real.samples["current"]]
    result.add(
        Figure(
            "event_loop.current_completion_100_over_parse",
            "  100 chunks, current / json.loads of the completion's chunks",
            median(relative),
            "ratio",
            detail=f"per completion; median total {median(current_total):.0f} µs",
        )
    )
    long = collected.real[2000]
    result.add(
        _ratio_figure(
            "event_loop.ratio_2000",
            f"2000 chunks: loop CPU per completion, current / {RELEASE_LABEL}",
            long,
            _total,
        )
    )
    for key, label in (("current", "current"), ("release", RELEASE_LABEL)):
        result.add(
            _us_figure(
                f"event_loop.{key}_completion_2000_us",
                f"  2000 chunks, {label}",
                _us(long.samples[key], _total),
            )
        )
    missed = [key for key, was_missed in collected.stub_missed.items() if was_missed]
    if missed:
        result.note(
            "writer stub not reached through writer_for by: "
            + ", ".join(missed)
            + " (their 'writer stubbed' figures measure a real write)"
        )
    resolved = collected.resolved
    result.add(
        _ratio_figure(
            "event_loop.ratio_100_no_handoff",
            f"100 chunks, writer stubbed (the plugin's own work): current / {RELEASE_LABEL}",
            resolved,
            _total,
        )
    )
    for key, label in (("current", "current"), ("release", RELEASE_LABEL)):
        for part, field in (("completion", _total), ("outlet", lambda s: s.outlet_ns)):
            result.add(
                _us_figure(
                    f"event_loop.{key}_{part}_100_no_handoff_us",
                    f"  {label}, writer stubbed: {'whole completion' if part == 'completion' else 'outlet'}",
                    _us(resolved.samples[key], field),
                )
            )
    concurrent = collected.concurrent
    result.add(
        _ratio_figure(
            "event_loop.ratio_concurrent_16",
            f"100 chunks, 16 completions at once, loop CPU per completion: current / {RELEASE_LABEL}",
            concurrent,
            float,
        )
    )
    for key, label in (("current", "current"), ("release", RELEASE_LABEL)):
        result.add(
            _us_figure(
                f"event_loop.{key}_concurrent_16_us",
                f"  {label}, 16 at once: per completion",
                [float(v) for v in concurrent.samples[key]],
                "; one batch's loop CPU / 16",
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
        f"both versions loaded in this process, each with its own module globals, writer and SQLite file; "
        f"{release} from `git show {RELEASE_COMMIT}:plugin/openrouter_usage.py`. total = loop-thread CPU "
        "from inlet to outlet's return (time.thread_time_ns); 'net' subtracts the CPU this VM charges the "
        f"loop thread inside blocking epoll waits. {rounds} round(s); blocks of each version alternate "
        "(ABBA); the ratio is median(current) / median(release) over all interleaved completions."
    )


if __name__ == "__main__":
    raise SystemExit(main_for(NAME, run))
