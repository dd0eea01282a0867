"""Run the simulator in the foreground: ``python -m openrouter_sim --port 8081``."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import TYPE_CHECKING

from openrouter_sim.server import OpenRouterSimulator

if TYPE_CHECKING:
    from types import FrameType


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openrouter_sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port to bind, 0 for any (default: 8081)")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=40.0, help="pause between stream chunks (default: 40)"
    )
    parser.add_argument(
        "--generation-ready-after-ms",
        type=float,
        default=0.0,
        help="how long /generation answers 404 after a generation finished (default: 0)",
    )
    parser.add_argument(
        "--cancelled-ready-extra-ms",
        type=float,
        default=250.0,
        help="how much longer /generation answers 404 after a stream the client broke off (default: 250)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    sim = OpenRouterSimulator(
        host=args.host,
        port=args.port,
        chunk_delay_s=args.chunk_delay_ms / 1000,
        generation_ready_after_s=args.generation_ready_after_ms / 1000,
        cancelled_ready_extra_s=args.cancelled_ready_extra_ms / 1000,
    )
    done = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        done.set()

    # Handle SIGINT ourselves too: a shell starting us in the background sets it to "ignore".
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sim.start()
    try:
        while not done.wait(0.5):
            pass
    finally:
        logging.getLogger("openrouter_sim").info("shutting down")
        sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
