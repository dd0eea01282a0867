"""The corpus of real OpenRouter replies in ``tests/recordings/`` (``manifest.json``), loaded for
the simulator's replay tests and the end-to-end replay through Open WebUI.

Each entry names its body file, the recorded status and ``Content-Type``, whether it was a
stream, where it was recorded (repository, path, commit, licence) and what the ledger must hold
after it: the generation id, the money as the decimal literal the reply itself wrote (``None``:
the reply carries no cost), and the token counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from openrouter_sim import Recording

RECORDINGS_DIR = Path(__file__).resolve().parent / "recordings"
MANIFEST = RECORDINGS_DIR / "manifest.json"
README = RECORDINGS_DIR / "README.md"
PICO_PER_USD = 10**12


@dataclass(frozen=True)
class Expected:
    """What the ledger's one row must hold after the reply. ``generation_id`` "" for an error before
    any generation, whose row carries ``error``."""

    status: str = "ok"
    generation_id: str = ""
    error: str = ""
    cost: Decimal | None = None
    upstream_inference_cost: Decimal | None = None
    is_byok: bool = False
    spend: Decimal = Decimal(0)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def cost_pico(self) -> int | None:
        """The recorded cost in pico-dollars (exact: the literal times 10**12), None if unknown."""
        return None if self.cost is None else int(self.cost * PICO_PER_USD)

    @property
    def spend_pico(self) -> int:
        return int(self.spend * PICO_PER_USD)


@dataclass(frozen=True)
class CorpusEntry:
    name: str
    file: str
    recording: Recording
    stream: bool
    exact: bool  # the body is the recorded bytes (not re-serialized from a parsed cassette)
    covers: tuple[str, ...]
    source: dict[str, str]
    expect: Expected


def _money(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _expected(raw: dict[str, Any]) -> Expected:
    return Expected(
        status=str(raw["status"]),
        generation_id=str(raw["generation_id"] or ""),
        error=str(raw.get("error", "")),
        cost=_money(raw["cost"]),
        upstream_inference_cost=_money(raw["upstream_inference_cost"]),
        is_byok=bool(raw["is_byok"]),
        spend=Decimal(str(raw["spend"])),
        prompt_tokens=int(raw["prompt_tokens"]),
        completion_tokens=int(raw["completion_tokens"]),
        reasoning_tokens=int(raw["reasoning_tokens"]),
        cached_tokens=int(raw["cached_tokens"]),
    )


def load_corpus() -> list[CorpusEntry]:
    """Every recording the manifest lists, in its order."""
    manifest = json.loads(MANIFEST.read_text(encoding="utf-8"))
    entries: list[CorpusEntry] = []
    for item in manifest["recordings"]:
        body = (RECORDINGS_DIR / item["file"]).read_bytes()
        recording = Recording(body, int(item["status"]), str(item["content_type"]), str(item["name"]))
        entries.append(
            CorpusEntry(
                name=str(item["name"]),
                file=str(item["file"]),
                recording=recording,
                stream=bool(item["stream"]),
                exact=bool(item["exact"]),
                covers=tuple(item["covers"]),
                source=dict(item["source"]),
                expect=_expected(item["expect"]),
            )
        )
    return entries


CORPUS = load_corpus()
