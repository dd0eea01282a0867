"""Per-chunk cost of the filter's `stream` hook, as a ratio to json.loads of the same chunk.

Open WebUI parses every upstream SSE payload with json.loads before it calls a filter's `stream`
hook, so json.loads of the chunk text is the cost it pays anyway; the hook should add at most a
fifth of that (target ratio <= 0.2).

Method: one real 2,000-content-chunk stream from the OpenRouter simulator (`[sim:chunks=2000]`,
2,003 SSE data events with the role, finish and usage chunks). Each repetition runs `inlet` (not
timed) to populate a fresh __metadata__, then times, back to back and in alternating order,
`filter.stream(event=chunk, __metadata__=metadata)` over all chunks (awaited when the hook is a
coroutine function, called directly otherwise, as Open WebUI 0.12.4's run_filter_handler does)
and json.loads over the same raw payloads. The figure is the median over repetitions of the
per-repetition ratio (both halves of a ratio share the machine's state of the moment). Cyclic GC
is paused in timed regions.

For information it also times the Valves rebuild Open WebUI performs before every hook call,
stream events included (0.12.4 utils/filter.py: `function_module.valves = Valves(**saved)`, as
tests/factories.py's HookDriver models it), since this plugin's Valves run a model validator: the
validator's share is the difference with a validator-free copy of the same fields.
"""

from __future__ import annotations

import asyncio
import cProfile
import inspect
import io
import json
import pstats
import time
import types
from typing import Any

import pydantic

from bench.common import (
    BenchResult,
    Figure,
    at_most,
    call_hook,
    command_for,
    gc_paused,
    isolated_data_dir,
    load_plugin,
    main_for,
    median,
    progress,
    simulated_stream,
    spread,
)

NAME = "stream_cost"
TARGET_RATIO = 0.2
CONTENT_CHUNKS = 2000
MODEL = {"id": "openai/gpt-4o-mini", "urlIdx": 0}


async def _time_hook(plugin: types.ModuleType, request: dict[str, Any], chunks: list[dict[str, Any]]) -> int:
    """Nanoseconds for one pass of the stream hook over all chunks, after a fresh inlet."""
    hook = plugin.Filter()
    metadata: dict[str, Any] = {"chat_id": "chat-1", "message_id": "msg-1", "session_id": "s-1"}
    await call_hook(hook.inlet, body=dict(request), __metadata__=metadata, __model__=MODEL)
    stream = hook.stream
    with gc_paused():
        if inspect.iscoroutinefunction(stream):
            started = time.perf_counter_ns()
            for chunk in chunks:
                await stream(event=chunk, __metadata__=metadata)
        else:
            started = time.perf_counter_ns()
            for chunk in chunks:
                stream(event=chunk, __metadata__=metadata)
        return time.perf_counter_ns() - started


def _time_json(payloads: list[str]) -> int:
    loads = json.loads
    with gc_paused():
        started = time.perf_counter_ns()
        for payload in payloads:
            loads(payload)
        return time.perf_counter_ns() - started


def _time_observe_chunk(plugin: types.ModuleType, chunks: list[dict[str, Any]]) -> int:
    """The hook's body alone (no coroutine, no keyword call): observe_chunk over all chunks."""
    state = plugin.CaptureState(time.monotonic(), is_openrouter_connection=True)
    observe = plugin.observe_chunk
    with gc_paused():
        started = time.perf_counter_ns()
        for chunk in chunks:
            observe(state, chunk)
        return time.perf_counter_ns() - started


def without_validators(model: type[pydantic.BaseModel]) -> type[pydantic.BaseModel]:
    """The same fields (types, defaults, metadata) in a model with no validators of its own."""
    fields: dict[str, Any] = {name: (info.annotation, info) for name, info in model.model_fields.items()}
    plain: type[pydantic.BaseModel] = pydantic.create_model(f"Plain{model.__name__}", **fields)
    return plain


def _per_call_ns(work: Any, calls: int, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        with gc_paused():
            started = time.perf_counter_ns()
            for _ in range(calls):
                work()
            samples.append((time.perf_counter_ns() - started) / calls)
    return samples


def _profile_hook(plugin: types.ModuleType, request: dict[str, Any], chunks: list[dict[str, Any]]) -> str:
    profiler = cProfile.Profile()

    async def passes() -> None:
        hook = plugin.Filter()
        for _ in range(20):
            metadata: dict[str, Any] = {"chat_id": "c", "message_id": "m"}
            await call_hook(hook.inlet, body=dict(request), __metadata__=metadata, __model__=MODEL)
            profiler.enable()
            for chunk in chunks:
                await call_hook(hook.stream, event=chunk, __metadata__=metadata)
            profiler.disable()

    asyncio.run(passes())
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(8)
    return text.getvalue()


def run(quick: bool) -> BenchResult:
    result = BenchResult(NAME, quick, command_for(f"bench.{NAME}", quick))
    repetitions = 60 if quick else 300
    with isolated_data_dir(NAME) as data:
        plugin = load_plugin()
        progress(f"fetching a {CONTENT_CHUNKS}-chunk stream from the simulator")
        sim = simulated_stream(CONTENT_CHUNKS)
        chunks, payloads = sim.chunks, sim.payloads
        count = len(chunks)

        async def measure() -> tuple[list[float], list[float], list[float]]:
            hook_ns, json_ns, ratios = [], [], []
            for _ in range(5):  # warm-up
                await _time_hook(plugin, sim.request, chunks)
                _time_json(payloads)
            for index in range(repetitions):
                if index % 2:
                    json_total = _time_json(payloads)
                    hook_total = await _time_hook(plugin, sim.request, chunks)
                else:
                    hook_total = await _time_hook(plugin, sim.request, chunks)
                    json_total = _time_json(payloads)
                hook_ns.append(hook_total / count)
                json_ns.append(json_total / count)
                ratios.append(hook_total / json_total)
            return hook_ns, json_ns, ratios

        progress(f"timing {repetitions} passes of the stream hook and of json.loads over {count} chunks")
        hook_ns, json_ns, ratios = asyncio.run(measure())
        ratio = median(ratios)
        result.add(
            Figure(
                "stream_cost.ratio",
                "stream hook / json.loads, per chunk",
                ratio,
                "ratio",
                f"<= {TARGET_RATIO}",
                at_most(ratio, TARGET_RATIO),
                spread(ratios),
            )
        )
        result.add(
            Figure(
                "stream_cost.hook_ns",
                "stream hook, per chunk",
                median(hook_ns),
                "ns/chunk",
                detail=spread(hook_ns, unit="ns"),
            )
        )
        result.add(
            Figure(
                "stream_cost.json_ns",
                "json.loads of the chunk text, per chunk",
                median(json_ns),
                "ns/chunk",
                detail=spread(json_ns, unit="ns") + f"; mean payload {sum(map(len, payloads)) / count:.0f} B",
            )
        )
        observe_ns = [_time_observe_chunk(plugin, chunks) / count for _ in range(repetitions // 3)]
        result.add(
            Figure(
                "stream_cost.observe_chunk_ns",
                "observe_chunk alone (the hook body, no call overhead)",
                median(observe_ns),
                "ns/chunk",
                detail=spread(observe_ns, unit="ns"),
            )
        )

        # Open WebUI rebuilds the valves before every hook call, stream events included.
        url = f"sqlite:///{data / 'ledger.sqlite3'}"
        saved = plugin.Filter.Valves(database_url=url).model_dump()
        plain = without_validators(plugin.Filter.Valves)
        calls, repeats = (1000, 7) if quick else (3000, 15)
        rebuild: list[float] = []
        validator: list[float] = []
        for _ in range(repeats):  # paired: the plugin's Valves, then the same fields without validators
            with_validator = _per_call_ns(lambda: plugin.Filter.Valves(**saved), calls, 1)[0]
            without = _per_call_ns(lambda: plain(**saved), calls, 1)[0]
            rebuild.append(with_validator)
            validator.append(with_validator - without)
        json_median = median(json_ns)
        result.add(
            Figure(
                "stream_cost.valves_rebuild_ns",
                "Open WebUI's per-hook Valves(**saved) rebuild",
                median(rebuild),
                "ns/chunk",
                detail=f"{median(rebuild) / json_median:.2f}x json.loads; " + spread(rebuild, unit="ns"),
            )
        )
        result.add(
            Figure(
                "stream_cost.valves_validator_ns",
                "  of which the plugin's validator(s)",
                median(validator),
                "ns/chunk",
                detail=f"{median(validator) / json_median:.2f}x json.loads; " + spread(validator, unit="ns"),
            )
        )
        result.add(
            Figure(
                "stream_cost.ratio_with_validator",
                "(stream hook + plugin's validator) / json.loads",
                (median(hook_ns) + median(validator)) / json_median,
                "ratio",
                detail="per stream event when Open WebUI rebuilds valves per event",
            )
        )
        result.note(
            f"{count} chunks per pass ({CONTENT_CHUNKS} content + role, finish, usage), {repetitions} passes "
            "each, alternating order; inlet runs untimed before each hook pass; GC paused in timed loops."
        )
        if ratio > TARGET_RATIO:
            result.note(
                "target missed; profile of the hook (tottime):\n" + _profile_hook(plugin, sim.request, chunks)
            )
    return result


if __name__ == "__main__":
    raise SystemExit(main_for(NAME, run))
