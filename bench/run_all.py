"""Run every benchmark, each in its own process, and print one results table.

    python -m bench.run_all            # full sizes, about 13 minutes (plus ~2 minutes the first
                                       # time, to generate the cached 1M-row fixture)
    python -m bench.run_all --quick    # smaller sizes, about 4 minutes; labelled QUICK

Each benchmark also runs alone: python -m bench.<name> [--quick]. The combined figures are also
written to .cache/bench/last-run[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    CACHE_DIR,
    REPO,
    BenchResult,
    command_for,
    machine_note,
    plugin_version,
    write_table,
)

BENCHMARKS = (
    "stream_cost",
    "event_loop",
    "ledger_throughput",
    "report_scale",
    "budget_admission",
    "multiprocess_writers",
    "server_overhead",
)
TIMEOUT_SECONDS = {"full": 1800, "quick": 600}  # generous: the machine is shared and slows down


def run_one(name: str, quick: bool, directory: Path) -> BenchResult:
    output = directory / f"{name}.json"
    command = [sys.executable, "-m", f"bench.{name}", "--json", str(output)] + (["--quick"] if quick else [])
    started = time.monotonic()
    try:
        completed = subprocess.run(
            command, cwd=REPO, timeout=TIMEOUT_SECONDS["quick" if quick else "full"], check=False
        )
        failure = "" if completed.returncode == 0 else f"exited with status {completed.returncode}"
    except subprocess.TimeoutExpired:
        failure = "timed out"
    if output.exists():
        result = BenchResult.from_json(json.loads(output.read_text()))
        if failure and not result.error:
            result.error = failure
        return result
    result = BenchResult(name, quick, command_for(f"bench.{name}", quick), error=failure or "no results")
    result.seconds = time.monotonic() - started
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 2 minutes)")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results: list[BenchResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-run-all-") as scratch:
        for name in args.only or BENCHMARKS:
            print(f"\n>>> {command_for(f'bench.{name}', args.quick)}", flush=True)
            results.append(run_one(name, args.quick, Path(scratch)))
    elapsed = time.monotonic() - started
    mode = "QUICK: smaller sizes, not the target sizes" if args.quick else "full sizes"
    print(f"\n==== Results ({mode}) — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC ====")
    print(machine_note())
    measured: dict[str, list[str]] = {}
    for result in results:
        measured.setdefault(result.plugin or plugin_version(), []).append(result.name)
    if len(measured) == 1:
        print(f"measured: {next(iter(measured))}")
    else:
        print(
            "the plugin changed during the run: "
            + "; ".join(f"{v}: {', '.join(n)}" for v, n in measured.items())
        )
    rows = []
    for result in results:
        if result.error:
            rows.append([result.name, "ERROR", result.error.strip().splitlines()[-1][:80], "-", "-"])
        rows.extend(
            [
                result.name,
                figure.label.strip(),
                figure.value_text(),
                figure.target or "-",
                figure.verdict_text(result.quick),
            ]
            for figure in result.figures
        )
    write_table(["benchmark", "figure", "value", "target", "verdict"], rows, sys.stdout)
    targeted = [f for r in results for f in r.figures if f.passed is not None]
    missed = [f for f in targeted if not f.passed]
    errors = [r.name for r in results if r.error]
    print(
        f"\n{len(targeted) - len(missed)}/{len(targeted)} targets met"
        + (f"; missed: {', '.join(f.key for f in missed)}" if missed else "")
        + (f"; errors: {', '.join(errors)}" if errors else "")
        + f"; total {elapsed / 60:.1f} min"
    )
    print("commands: " + "; ".join(r.command for r in results))
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    summary = CACHE_DIR / ("last-run-quick.json" if args.quick else "last-run.json")
    summary.write_text(json.dumps({"seconds": elapsed, "results": [_json(r) for r in results]}, indent=2))
    print(f"figures written to {summary.relative_to(REPO)}")
    return 1 if errors else 0


def _json(result: BenchResult) -> dict[str, object]:
    data = result.to_json()
    data["seconds"] = round(result.seconds, 1)
    return data


if __name__ == "__main__":
    raise SystemExit(main())
