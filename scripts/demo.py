"""``make demo``: a local Open WebUI with the openrouter_usage filter installed, ready to click.

* With ``OPENROUTER_API_KEY`` set, chats go to https://openrouter.ai/api/v1 with that key;
  otherwise to the bundled OpenRouter simulator on a free loopback port, streaming at a
  plausible speed.
* Open WebUI (pinned, cached venv) listens on http://127.0.0.1:8080 (``DEMO_PORT``) with its
  data in ``./demo-data`` (``DEMO_DATA_DIR``), kept between runs.
* The admin account is created on the first run from ``DEMO_ADMIN_EMAIL`` /
  ``DEMO_ADMIN_PASSWORD`` (defaults printed at start).
* The function from ``plugin/openrouter_usage.py`` is created or updated, activated, made
  global; in simulator mode its ``openrouter_url_pattern`` valve also matches the simulator.

Ctrl-C (or SIGTERM) stops everything this script started.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.build_manifest import parse_frontmatter  # noqa: E402
from tests.e2e.owui import (  # noqa: E402
    OpenWebUIClient,
    OpenWebUIError,
    OpenWebUIServer,
    ensure_openwebui,
)

if TYPE_CHECKING:
    from types import FrameType

log = logging.getLogger("demo")

FUNCTION_ID = "openrouter_usage"
PLUGIN_PATH = REPO / "plugin" / "openrouter_usage.py"
OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_ADMIN_EMAIL = "admin@example.com"
DEFAULT_ADMIN_PASSWORD = "openrouter-usage-demo"
SIM_CHUNK_DELAY_S = 0.04
DEMO_MODEL = "openai/gpt-4o-mini"


def with_fragment(pattern: str, fragment: str) -> str:
    """``pattern`` (comma-separated URL fragments) with ``fragment`` added when missing."""
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    if fragment.lower() not in (p.lower() for p in parts):
        parts.append(fragment)
    return ",".join(parts)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def secret_key(data_dir: Path) -> str:
    """A per-install secret kept in the data dir, so sign-ins survive restarts."""
    path = data_dir / ".demo_secret_key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def install_function(admin: OpenWebUIClient, url_fragment: str) -> None:
    source = PLUGIN_PATH.read_text(encoding="utf-8")
    front = parse_frontmatter(source)
    meta = {"description": front.get("description", "OpenRouter usage and cost per completion")}
    existed = admin.get_function(FUNCTION_ID) is not None
    admin.upsert_function(FUNCTION_ID, front.get("title", "OpenRouter Usage"), source, meta)
    admin.activate_global(FUNCTION_ID)
    log.info("function %s %s, active and global", FUNCTION_ID, "updated" if existed else "created")

    valves = admin.get_valves(FUNCTION_ID)
    pattern = str(valves.get("openrouter_url_pattern") or "openrouter.ai")
    wanted = with_fragment(pattern, url_fragment)
    if wanted != pattern or "openrouter_url_pattern" not in valves:
        admin.update_valves(FUNCTION_ID, {"openrouter_url_pattern": wanted}, merge=True)
        log.info("valve openrouter_url_pattern = %r", wanted)


def banner(url: str, email: str, password: str, data_dir: Path, *, simulated: bool) -> str:
    rows = [
        "",
        "=" * 72,
        f"  Open WebUI + openrouter_usage is running at  {url}",
        "",
        f"  Sign in as   {email}",
        f"  Password     {password}",
        "",
        f"  1. Open {url} and sign in.",
        f"  2. Pick the model {DEMO_MODEL} (or any other) and ask something.",
        "  3. Under the answer: the usage line (model, provider, tokens, cost, chat total).",
        "  4. Admin Panel -> Functions -> OpenRouter Usage -> gear: valves and the usage report.",
        "     Your own view: Chat Controls -> Valves -> Functions.",
    ]
    if simulated:
        rows += [
            "",
            "  Upstream: the OpenRouter SIMULATOR (no key set, nothing leaves this machine).",
            "  Steer it from the message text, e.g. '[sim:byok]', '[sim:shape=A]',",
            "  '[sim:midstream-error]'.  Set OPENROUTER_API_KEY to use the real OpenRouter.",
        ]
    else:
        rows += ["", "  Upstream: https://openrouter.ai (OPENROUTER_API_KEY) - real money is spent."]
    rows += [
        "",
        f"  Data (kept between runs): {data_dir}",
        f"  Ledger: {data_dir / 'openrouter_usage.sqlite3'}",
        "  Ctrl-C stops everything.",
        "=" * 72,
        "",
    ]
    return "\n".join(rows)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Explicit for SIGINT too: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    host = "127.0.0.1"
    port = int(os.environ.get("DEMO_PORT", "8080"))
    data_dir = Path(os.environ.get("DEMO_DATA_DIR", REPO / "demo-data")).resolve()
    email = os.environ.get("DEMO_ADMIN_EMAIL", DEFAULT_ADMIN_EMAIL)
    password = os.environ.get("DEMO_ADMIN_PASSWORD", DEFAULT_ADMIN_PASSWORD)
    api_key = os.environ.get("OPENROUTER_API_KEY", "").strip()

    if not port_is_free(host, port):
        log.error("port %d on %s is in use; set DEMO_PORT to another port", port, host)
        return 2

    sim: Any = None
    server: OpenWebUIServer | None = None
    try:
        python = ensure_openwebui()
        if api_key:
            base_url, url_fragment = OPENROUTER_BASE_URL, "openrouter.ai"
            log.info("upstream: %s (key from OPENROUTER_API_KEY)", base_url)
        else:
            from openrouter_sim import OpenRouterSimulator

            sim = OpenRouterSimulator(host=host, port=0, chunk_delay_s=SIM_CHUNK_DELAY_S)
            sim.start()
            base_url, url_fragment = sim.base_url, host
            api_key = "sk-or-v1-demo-simulated"
            log.info("upstream: OpenRouter simulator at %s", base_url)

        server = OpenWebUIServer(
            python,
            data_dir,
            openai_base_url=base_url,
            openai_api_key=api_key,
            admin_email=email,
            admin_password=password,
            host=host,
            port=port,
            secret_key=secret_key(data_dir),
        )
        log.info("starting Open WebUI (first run in a fresh data dir takes ~20 s); log: %s", server.log_path)
        server.start()

        try:
            admin = server.client()
        except OpenWebUIError as exc:
            log.error(
                "cannot sign in as %s (%s). The admin is created only on the first run in %s; "
                "use the credentials of that run or delete the directory.",
                email,
                exc,
                data_dir,
            )
            return 1
        with admin:
            # Connection settings persist in the data dir: point them at this run's upstream.
            admin.set_openai_connection(base_url, api_key)
            install_function(admin, url_fragment)

        print(banner(server.url, email, password, data_dir, simulated=sim is not None), flush=True)
        while server.is_running():
            time.sleep(0.5)
        log.error("Open WebUI exited unexpectedly; log tail:\n%s", server.log_tail())
        return 1
    except KeyboardInterrupt:
        log.info("interrupted, shutting down")
        return 0
    except OpenWebUIError as exc:
        log.error("%s", exc)
        return 1
    finally:
        # A second Ctrl-C must not cut the cleanup short: the server runs in its own session.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if server is not None:
            server.stop()
        if sim is not None:
            sim.stop()
        log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
