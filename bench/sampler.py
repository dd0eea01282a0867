"""A small statistical profiler for the plugin's own threads (its writer thread lives inside the
plugin, where cProfile, which profiles only the thread that enables it, cannot follow).

A daemon thread wakes every `interval` seconds and reads the Python stack of every thread whose
name matches (sys._current_frames), and that thread's CPU clock. A sample is "on CPU" when the
thread ran for at least ON_CPU_SHARE of the time since the previous sample; on-CPU samples are
bucketed by their innermost Python frame: the plugin (the exec'd source's filename: the plugin's
real path, as tests.factories compiles it, or "<function function_openrouter_usage…", as release
1.0.0 is loaded), SQLAlchemy, or a database driver call (SQLAlchemy's
do_execute/do_executemany/do_commit, where the time is spent in the C driver and SQLite's
library). Off-CPU samples inside a driver call are waits on the disk (fsync), a lock or the
server; other off-CPU samples are idle (or waiting for the GIL). Cumulative shares count a plugin
function once per on-CPU sample when it is anywhere on the stack. Sampling takes the GIL briefly,
so run it apart from timed runs.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Self

PLUGIN_FILE_PREFIXES = (
    str(Path(__file__).resolve().parent.parent / "plugin" / "openrouter_usage.py"),
    "<function function_openrouter_usage",
)
ON_CPU_SHARE = 0.3
SWITCH_INTERVAL = 0.00005  # seconds, while sampling
DRIVER_CALLS = frozenset({"do_execute", "do_executemany", "do_commit", "do_rollback", "do_begin"})


def _seconds() -> collections.defaultdict[str, float]:
    return collections.defaultdict(float)


def _most(weights: dict[str, float], count: int | None = None) -> list[tuple[str, float]]:
    """The heaviest entries first, as Counter.most_common (whose counts are typed as int)."""
    return sorted(weights.items(), key=lambda item: item[1], reverse=True)[:count]


@dataclasses.dataclass(slots=True)
class Profile:
    """Seconds of wall time, each sample weighted by the time since the previous one: a thread
    running Python holds the GIL, so the sampler reaches it later than one inside a C call that
    released it; weighting by the interval keeps that from favouring C calls."""

    samples: float = 0.0
    busy: float = 0.0  # on CPU
    driver_wait: float = 0.0  # off CPU inside a driver call: fsync, a database lock, a server round trip
    buckets: collections.defaultdict[str, float] = dataclasses.field(default_factory=_seconds)
    other_files: collections.defaultdict[str, float] = dataclasses.field(default_factory=_seconds)
    plugin_cumulative: collections.defaultdict[str, float] = dataclasses.field(default_factory=_seconds)
    plugin_self: collections.defaultdict[str, float] = dataclasses.field(default_factory=_seconds)

    def shares(self) -> dict[str, float]:
        """Share of on-CPU time per bucket."""
        return {key: weight / max(self.busy, 1e-9) for key, weight in _most(self.buckets)}

    def top_plugin(self, count: int = 6) -> list[tuple[str, float]]:
        """Plugin functions by cumulative share of on-CPU time."""
        return [(name, t / max(self.busy, 1e-9)) for name, t in _most(self.plugin_cumulative, count)]

    def summary(self) -> str:
        buckets = ", ".join(f"{share:.0%} {key}" for key, share in self.shares().items())
        top = ", ".join(f"{name} {share:.0%}" for name, share in self.top_plugin())
        busy = max(self.busy, 1e-9)
        other = ", ".join(f"{name} {t / busy:.0%}" for name, t in _most(self.other_files, 3))
        if other:
            buckets += f" (other: {other})"
        sampled = max(self.samples, 1e-9)
        return (
            f"{self.samples:.1f} s sampled: {self.busy / sampled:.0%} on CPU, "
            f"{self.driver_wait / sampled:.0%} off CPU in a driver call (fsync, lock, server); "
            f"on-CPU innermost frame: {buckets}; plugin functions on the stack (cumulative, of on-CPU): {top}"
        )


def _bucket(frame: FrameType) -> str:  # noqa: PLR0911 (a return per bucket)
    code = frame.f_code
    filename = code.co_filename
    if code.co_name in DRIVER_CALLS and "/sqlalchemy/" in filename:
        return f"driver {code.co_name} (C driver / database)"
    if filename.startswith(PLUGIN_FILE_PREFIXES):
        return "plugin Python"
    if "/sqlalchemy/" in filename:
        return "SQLAlchemy Python"
    if "/psycopg/" in filename:
        return "psycopg Python"
    if "/json/" in filename:
        return "json"
    if "/asyncio/" in filename:
        return "asyncio"
    if "/concurrent/futures/" in filename or filename.endswith(("/threading.py", "/queue.py")):
        return "futures/threading"
    if "/bench/" in filename:
        return "benchmark harness"
    return "other Python"


class ThreadSampler:
    """Samples the stacks of threads while in a `with` block: `group(thread)` names the profile a
    thread's samples go to (None: not sampled)."""

    def __init__(self, group: Callable[[threading.Thread], str | None], interval: float = 0.0005) -> None:
        self.group = group
        self.interval = interval
        self.profiles: dict[str, Profile] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Self:
        # A thread running Python keeps the GIL for up to the switch interval (5 ms), so samples
        # would land where it next releases it (a select, a C call), not where it is: a short
        # interval lets the sampler in promptly (the sampled run is slower for it, and untimed).
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        sys.setswitchinterval(self._switch_interval)

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # bounded whatever the caller does
        clocks: dict[int, tuple[int, int]] = {}  # thread -> (its CPU clock, wall clock) at the last sample
        while not self._stop.wait(self.interval) and time.monotonic() < deadline:
            threads = {thread.ident: thread for thread in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                group = self.group(threads[ident]) if ident in threads else None
                if group is None:
                    continue
                try:
                    cpu = time.clock_gettime_ns(time.pthread_getcpuclockid(ident))
                except OSError:  # the thread just ended
                    continue
                wall = time.monotonic_ns()
                previous = clocks.get(ident)
                clocks[ident] = (cpu, wall)
                if previous is not None:
                    # On CPU for most of the last interval, not just a brief wake-up before blocking.
                    elapsed = (wall - previous[1]) / 1e9
                    on_cpu = cpu - previous[0] >= ON_CPU_SHARE * (wall - previous[1])
                    self._record(self.profiles.setdefault(group, Profile()), frame, on_cpu, elapsed)

    def _record(self, profile: Profile, frame: FrameType, on_cpu: bool, weight: float) -> None:
        profile.samples += weight
        if not on_cpu:
            code = frame.f_code
            if code.co_name in DRIVER_CALLS and "/sqlalchemy/" in code.co_filename:
                profile.driver_wait += weight
            return
        profile.busy += weight
        bucket = _bucket(frame)
        profile.buckets[bucket] += weight
        if bucket == "other Python":
            path = frame.f_code.co_filename
            profile.other_files[f"{path.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"] += weight
        seen: set[str] = set()
        innermost_plugin = True
        current: FrameType | None = frame
        while current is not None:
            code = current.f_code
            if code.co_filename.startswith(PLUGIN_FILE_PREFIXES):
                name = code.co_qualname if hasattr(code, "co_qualname") else code.co_name
                if innermost_plugin:
                    profile.plugin_self[name] += weight
                    innermost_plugin = False
                if name not in seen:
                    seen.add(name)
                    profile.plugin_cumulative[name] += weight
            current = current.f_back
