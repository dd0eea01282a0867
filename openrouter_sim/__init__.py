"""OpenRouter API simulator for tests and demos (standard library only)."""

from openrouter_sim.server import (
    AUTO_ROUTER_ID,
    AUTO_ROUTER_TARGET,
    BYOK_FEE_RATE,
    MODELS,
    Directives,
    GenerationRecord,
    ModelInfo,
    OpenRouterSimulator,
    RecordedRequest,
    compute_charge,
    detect_task,
    format_decimal,
    parse_directives,
    to_json,
)

__all__ = [
    "AUTO_ROUTER_ID",
    "AUTO_ROUTER_TARGET",
    "BYOK_FEE_RATE",
    "MODELS",
    "Directives",
    "GenerationRecord",
    "ModelInfo",
    "OpenRouterSimulator",
    "RecordedRequest",
    "compute_charge",
    "detect_task",
    "format_decimal",
    "parse_directives",
    "to_json",
]
