"""One writer process for tests/reliability/test_kill9.py: concurrent outlets writing records.

Run as `unshare --pid --fork python -m tests.reliability.kill9_worker --url U --tag T`. The protocol
on stdout, one flushed line each:
  PID <pid seen inside> <pid seen from the host>   first, before anything else
  READY                                            the plugin is loaded; waiting for GO on stdin
  ACK <message id> <recorded|spooled>              the record is acknowledged: it must never be lost
  NACK <message id> <other outcome>                answered, but not acknowledged (duplicate, ...)
  ERR <message id> <error>                         the write raised
  REPLAYED <n> / PENDING <n> / QUARANTINED <n>     --final only, after the spool replay
  DONE                                             --final only, last line
A killed run ends wherever SIGKILL finds it; the parent only trusts complete lines.

Every field of a record follows from its message id (`record_fields`), so the test can check each
stored row against what was written without being told.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import select
import sys
import time
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from tests.reliability.independent import TOKEN_COLUMNS, load_source

REPO = Path(__file__).resolve().parents[2]
PLUGIN_PATH = REPO / "plugin" / "openrouter_usage.py"
ZONE_NAME = "America/New_York"
# Four days straddling the 2025 spring-forward in New York: local days of 23 and 24 hours, and
# UTC moments whose local day differs from their UTC day.
FIRST_MOMENT = datetime(2025, 3, 7, 12, 0, tzinfo=UTC)
SPREAD_SECONDS = 4 * 86_400
USERS = (("user-ada", "Ada"), ("user-grace", "Grace"), ("user-linus", "Linus"), ("user-ken", "Ken"))
MODELS = (
    ("openai/gpt-4o-mini", "openai/gpt-4o-mini-2024-07-18", "OpenAI"),
    ("anthropic/claude-3.5-sonnet", "anthropic/claude-3.5-sonnet-20241022", "Anthropic"),
    ("google/gemini-2.0-flash-001", "google/gemini-2.0-flash-001", "Google AI Studio"),
    ("meta-llama/llama-3.3-70b-instruct", "meta-llama/llama-3.3-70b-instruct", "DeepInfra"),
)
GO_WAIT_SECONDS = 60.0  # a standby worker whose parent went away ends by itself
WRITE_SECONDS = 20.0  # the parent kills a writer within a few seconds; this only bounds a lost one
FINAL_RECORDS = 24


def record_fields(message_id: str) -> dict[str, Any]:
    """The record written under `message_id`, as plain values (the same in every process)."""
    rng = random.Random(message_id)
    user_id, user_name = rng.choice(USERS)
    model, served_model, provider = rng.choice(MODELS)
    prompt = rng.randint(1, 120_000)
    completion = rng.randint(0, 8_000)
    cached = rng.choice((0, 0, rng.randint(0, prompt)))
    is_byok = rng.random() < 0.2
    cost_pico: int | None = None if rng.random() < 0.1 else rng.randint(0, 3 * 10**12)
    if is_byok:
        upstream_pico: int | None = rng.randint(1, 5 * 10**12)
    else:  # OpenRouter fills upstream cost with about the same number as cost for non-BYOK
        upstream_pico = cost_pico
    failed = rng.random() < 0.08
    generations = tuple(f"gen-{rng.getrandbits(48):012x}" for _ in range(rng.choice((1, 1, 1, 2))))
    created_at = FIRST_MOMENT + timedelta(
        seconds=rng.randrange(SPREAD_SECONDS), microseconds=rng.randrange(10**6)
    )
    raw_usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost": None if cost_pico is None else cost_pico / 10**12,
        "is_byok": is_byok,
    }
    return {
        "message_id": message_id,
        "chat_id": f"chat-{rng.randrange(60):02d}",
        "user_id": user_id,
        "user_name": user_name,
        "generation_ids": generations,
        "model": model,
        "served_model": served_model,
        "provider": provider,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": cached,
        "cache_write_tokens": rng.choice((0, 0, 0, rng.randint(0, 4_096))),
        "reasoning_tokens": rng.choice((0, rng.randint(0, completion))),
        "cost_pico": cost_pico,
        "upstream_cost_pico": upstream_pico,
        "spend_pico": (cost_pico or 0) + ((upstream_pico or 0) if is_byok else 0),
        "is_byok": is_byok,
        "status": "error" if failed else "ok",
        "error": "Provider returned error (502)" if failed else "",
        "latency_ms": rng.randint(150, 90_000),
        "ttft_ms": None if failed else rng.randint(50, 5_000),
        "raw_usage": raw_usage,
        "created_at": created_at,
    }


def load_plugin() -> types.ModuleType:
    """The plugin as Open WebUI loads it: its source exec'd into a fresh module without __file__.

    Not tests.factories.load_plugin_module: importing tests.factories imports httpx and the
    simulator, and every restart would pay for it on the test's clock."""
    return load_source(PLUGIN_PATH.read_text(encoding="utf-8"))


def build_request(plugin: types.ModuleType, message_id: str, zone: ZoneInfo) -> Any:
    fields = record_fields(message_id)
    # A Usage holds the token and money columns but spend_pico, which it derives.
    usage_fields = (*TOKEN_COLUMNS, "cost_pico", "upstream_cost_pico", "is_byok")
    usage = plugin.Usage(**{name: fields[name] for name in usage_fields})
    record = plugin.UsageRecord(
        message_id=message_id,
        chat_id=fields["chat_id"],
        user_id=fields["user_id"],
        user_name=fields["user_name"],
        generation_ids=fields["generation_ids"],
        model=fields["model"],
        served_model=fields["served_model"],
        provider=fields["provider"],
        usage=usage,
        status=fields["status"],
        error=fields["error"],
        latency_ms=fields["latency_ms"],
        ttft_ms=fields["ttft_ms"],
        raw_usage=fields["raw_usage"],
        created_at=fields["created_at"],
    )
    return plugin.WriteRequest((record,), zone)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def write_records(
    plugin: types.ModuleType, url: str, tag: str, tasks: int, per_task: int | None
) -> None:
    """`tasks` concurrent outlets, each writing its own sequence of messages until killed (or
    `per_task` each, or WRITE_SECONDS at most)."""
    writer = plugin.writer_for(url)
    zone = ZoneInfo(ZONE_NAME)
    deadline = time.monotonic() + WRITE_SECONDS

    async def outlet(task: int) -> None:
        sequence = 0
        while (per_task is None or sequence < per_task) and time.monotonic() < deadline:
            message_id = f"{tag}-{task:02d}-{sequence:05d}"
            sequence += 1
            try:
                outcome = await writer.write(build_request(plugin, message_id, zone))
            except Exception as exc:
                say(f"ERR {message_id} {type(exc).__name__}: {str(exc)[:200]!r}")
                continue
            verdict = "ACK" if outcome.stored in ("recorded", "spooled") else "NACK"
            say(f"{verdict} {message_id} {outcome.stored}")

    await asyncio.gather(*(outlet(task) for task in range(tasks)))


def wait_for_go() -> bool:
    readable, _, _ = select.select([sys.stdin], [], [], GO_WAIT_SECONDS)
    return bool(readable) and sys.stdin.readline().strip() == "GO"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--tag", required=True, help="prefix of this run's message ids")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--final", action="store_true", help="write a few records, replay the spool, exit")
    args = parser.parse_args(argv)
    # /proc is the host's (no --mount-proc), so /proc/self names this process as the host sees it.
    say(f"PID {os.getpid()} {Path('/proc/self').readlink()}")
    plugin = load_plugin()
    say("READY")
    if not wait_for_go():
        return 4
    per_task = FINAL_RECORDS // args.tasks if args.final else None
    asyncio.run(write_records(plugin, args.url, args.tag, args.tasks, per_task))
    if not args.final:
        say("TIMEOUT")  # nobody killed this writer
        return 3
    ledger = plugin.ledger_for(args.url)
    replay = getattr(ledger, "replay_spool", None)
    say(f"REPLAYED {replay() if replay is not None else 'n/a'}")
    say(f"PENDING {ledger.spool.pending_count()}")
    quarantined = getattr(ledger.spool, "quarantined_count", None)
    say(f"QUARANTINED {quarantined() if quarantined is not None else 'n/a'}")
    say("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
