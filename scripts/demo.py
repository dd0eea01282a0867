"""``make demo``: a local Open WebUI with the openrouter_usage filter installed, ready to click.

* With ``OPENROUTER_API_KEY`` set, chats go to https://openrouter.ai/api/v1 with that key;
  otherwise to the bundled OpenRouter simulator on a free loopback port, streaming at a
  plausible speed.
* Open WebUI (pinned, cached venv) listens on http://127.0.0.1:8080 (``DEMO_PORT``) with its
  data in ``./demo-data`` (``DEMO_DATA_DIR``), kept between runs.
* The admin account is created on the first run from ``DEMO_ADMIN_EMAIL`` /
  ``DEMO_ADMIN_PASSWORD``; a second, ordinary user from ``DEMO_USER_EMAIL`` /
  ``DEMO_USER_PASSWORD`` (defaults printed at start), so the per-user read-out and the
  isolation between users can be seen in two browser windows.
* The function from ``plugin/openrouter_usage.py`` is created or updated, activated, made
  global; in simulator mode its ``openrouter_url_pattern`` valve also matches the simulator.
* Every model of the connection is made public (Open WebUI lets only admins use a model nobody
  shared), as an admin does under Admin Panel -> Settings -> Models -> Access.
* ``--seed-history`` (``make demo SEED_HISTORY=1``) fills the ledger with a month of past
  completions of both users (:func:`seed_history`), so the report's chart of spend by day has
  something to show; today is left to the chats you make.

:func:`running_demo` does all of it and is reused by ``scripts/screenshots.py``.
Ctrl-C (or SIGTERM) stops everything this script started.
"""

from __future__ import annotations

import argparse
import contextlib
import http
import logging
import os
import random
import secrets
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.build_manifest import parse_frontmatter  # noqa: E402
from tests.e2e.owui import (  # noqa: E402
    OpenWebUIClient,
    OpenWebUIError,
    OpenWebUIHTTPError,
    OpenWebUIServer,
    ensure_openwebui,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType

log = logging.getLogger("demo")

FUNCTION_ID = "openrouter_usage"
PLUGIN_PATH = REPO / "plugin" / "openrouter_usage.py"
OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
SIM_CHUNK_DELAY_S = 0.04
DEMO_MODEL = "openai/gpt-4o-mini"
LEDGER_NAME = "openrouter_usage.sqlite3"  # the plugin's default ledger in Open WebUI's DATA_DIR
CLI_NAME = "openrouter-usage"  # [project.scripts] in pyproject.toml
# Open WebUI's grant that lets every user read (use) a model: "Public" in its access editor.
PUBLIC_READ = {"principal_type": "user", "principal_id": "*", "permission": "read"}


@dataclass(frozen=True)
class Account:
    name: str
    email: str
    password: str


DEFAULT_ADMIN = Account("Admin", "admin@example.com", "openrouter-usage-demo")
DEFAULT_USER = Account("Demo User", "user@example.com", "openrouter-usage-user")


@dataclass(frozen=True)
class Demo:
    """A running demo: where it listens, who can sign in, where the ledger is."""

    server: OpenWebUIServer
    admin: Account
    user: Account
    simulated: bool

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / LEDGER_NAME

    def cli_command(self, *args: str) -> str:
        """The shell command that runs the admin CLI on this demo's ledger."""
        script = Path(sys.executable).parent / CLI_NAME
        with contextlib.suppress(ValueError):
            script = script.relative_to(Path.cwd())
        return shlex.join([f"DATA_DIR={self.data_dir}", str(script), *args])


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


HISTORY_DAYS = 29  # the days before today that seed_history fills: with today, the chart's 30
HISTORY_QUIET_DAYS = (9, 16)  # days ago without any completion: the chart shows them as empty bars
HISTORY_SEED = 27


def seed_history(ledger_url: str, users: Sequence[tuple[str, str]], today: date | None = None) -> int:
    """Record a month of past completions of ``users`` (id, name) in the ledger at ``ledger_url``,
    as the function records a non-streamed answer: the simulator's models at its prices, more
    of them as the month goes on, none on HISTORY_QUIET_DAYS, none today. Reproducible: the same
    ``today`` gives the same records, and a second run adds nothing (each has a fixed key).
    Returns how many were added."""
    from openrouter_sim import MODELS
    from tests.factories import load_plugin_module

    plugin = load_plugin_module()
    today = today or datetime.now(UTC).date()
    rng = random.Random(f"{HISTORY_SEED}-{today.isoformat()}")  # noqa: S311 - made-up history, no secret
    models = [MODELS[name] for name in sorted(MODELS)][:4]
    records = []
    for days_ago in range(HISTORY_DAYS, 0, -1):
        day = today - timedelta(days=days_ago)
        if days_ago in HISTORY_QUIET_DAYS:
            continue
        for user_index, (user_id, user_name) in enumerate(users):
            for number in range(rng.randint(1, 3) + (HISTORY_DAYS - days_ago) // (6 + 4 * user_index)):
                model = rng.choice(models)
                prompt, completion = rng.randint(800, 6000), rng.randint(100, 1500)
                cost = prompt * model.prompt_price + completion * model.completion_price
                message_id = f"seed-{day.isoformat()}-{user_index}-{number}"
                minute = rng.randint(8 * 60, 20 * 60)  # in working hours, UTC
                created_at = datetime.combine(day, datetime.min.time(), UTC) + timedelta(minutes=minute)
                records.append(
                    plugin.UsageRecord(
                        message_id=message_id,
                        chat_id=f"seed-chat-{user_index}",
                        user_id=user_id,
                        user_name=user_name,
                        generation_ids=(),
                        model=model.id,
                        served_model=model.id,
                        provider=model.provider,
                        usage=plugin.Usage(
                            prompt_tokens=prompt,
                            completion_tokens=completion,
                            total_tokens=prompt + completion,
                            cost_pico=plugin.usd_to_pico(cost),
                        ),
                        status="ok",
                        error="",
                        latency_ms=rng.randint(900, 6000),
                        ttft_ms=None,
                        raw_usage={"cost": str(cost)},
                        created_at=created_at,
                        generation_key=plugin.fallback_generation_key(message_id, "seed-history"),
                    )
                )
    ledger = plugin.Ledger(ledger_url)
    try:
        return len(ledger.store(records, ZoneInfo("UTC")).inserted)
    finally:
        ledger.dispose()


def install_function(
    admin: OpenWebUIClient, url_fragment: str, lookups: tuple[str, str] | None = None
) -> None:
    """Install the function, active and global, its URL pattern matching the upstream; with
    `lookups` (an API key and base URL) also check each answer against the upstream's bill."""
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
    if lookups is not None:
        api_key, base_url = lookups
        admin.update_valves(
            FUNCTION_ID, {"openrouter_api_key": api_key, "openrouter_api_base": base_url}, merge=True
        )
        log.info(
            "valves openrouter_api_key (set) and openrouter_api_base = %s: answers are reconciled", base_url
        )


def ensure_user(admin: OpenWebUIClient, account: Account) -> None:
    """Create the ordinary user once; later runs check that its password still signs in."""
    try:
        admin.add_user(account.name, account.email, account.password, role="user")
        log.info("user %s created", account.email)
        return
    except OpenWebUIHTTPError as exc:
        if exc.status_code != http.HTTPStatus.BAD_REQUEST:  # the email is taken: an earlier run made it
            raise
    try:
        OpenWebUIClient.login(admin.base_url, account.email, account.password).close()
    except OpenWebUIHTTPError as exc:
        raise OpenWebUIError(
            f"the user {account.email} exists but does not sign in with the password given ({exc.detail}); "
            "use the credentials of the run that created it or delete the data directory"
        ) from exc


def share_models(admin: OpenWebUIClient) -> list[str]:
    """Make every model the connection offers public, so ordinary users can chat with it.

    Open WebUI 0.12.4 lets a non-admin use a model only through an access grant stored with the
    model's own entry; a connection's models have none until an admin shares them. This is what
    Admin Panel -> Settings -> Models -> (model) -> Access -> Public does
    (``POST /api/v1/models/model/access/update``). Already public models are left alone.
    """
    shared = []
    for model in admin.get_models():
        grants = (model.get("info") or {}).get("access_grants") or []
        if any({k: g.get(k) for k in PUBLIC_READ} == PUBLIC_READ for g in grants):
            continue
        admin.post(
            "/api/v1/models/model/access/update",
            {"id": model["id"], "name": model.get("name") or model["id"], "access_grants": [PUBLIC_READ]},
        )
        shared.append(str(model["id"]))
    if shared:
        log.info("made %d model(s) public: %s", len(shared), ", ".join(shared))
    return shared


@contextlib.contextmanager
def running_demo(  # noqa: PLR0913 - every knob of the demo, each with the default `make demo` uses
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    admin: Account = DEFAULT_ADMIN,
    user: Account = DEFAULT_USER,
    api_key: str = "",
    chunk_delay_s: float = SIM_CHUNK_DELAY_S,
    with_history: bool = False,
) -> Iterator[Demo]:
    """Start the upstream (OpenRouter with ``api_key``, else the simulator) and Open WebUI with
    the function installed, both users able to chat (``with_history``: and a month of their past
    completions in the ledger); stop both on exit."""
    sim: Any = None
    server: OpenWebUIServer | None = None
    try:
        python = ensure_openwebui()
        if api_key:
            base_url, url_fragment = OPENROUTER_BASE_URL, "openrouter.ai"
            log.info("upstream: %s (key from OPENROUTER_API_KEY)", base_url)
        else:
            from openrouter_sim import OpenRouterSimulator

            sim = OpenRouterSimulator(host=host, port=0, chunk_delay_s=chunk_delay_s)
            sim.start()
            base_url, url_fragment = sim.base_url, host
            api_key = "sk-or-v1-demo-simulated"
            log.info("upstream: OpenRouter simulator at %s", base_url)

        server = OpenWebUIServer(
            python,
            data_dir,
            openai_base_url=base_url,
            openai_api_key=api_key,
            admin_email=admin.email,
            admin_password=admin.password,
            admin_name=admin.name,
            host=host,
            port=port,
            secret_key=secret_key(data_dir),
        )
        log.info("starting Open WebUI (first run in a fresh data dir takes ~20 s); log: %s", server.log_path)
        server.start()

        try:
            client = server.client()
        except OpenWebUIError as exc:
            raise OpenWebUIError(
                f"cannot sign in as {admin.email} ({exc}). The admin is created only on the first run in "
                f"{data_dir}; use the credentials of that run or delete the directory."
            ) from exc
        with client:
            # Connection settings persist in the data dir: point them at this run's upstream.
            client.set_openai_connection(base_url, api_key)
            install_function(client, url_fragment, (api_key, base_url))
            ensure_user(client, user)
            share_models(client)
            if with_history:
                with OpenWebUIClient.login(server.url, user.email, user.password) as second:
                    users = [(client.user["id"], admin.name), (second.user["id"], user.name)]
                added = seed_history(f"sqlite:///{data_dir / LEDGER_NAME}", users)
                log.info("seeded %d past completions over the %d days before today", added, HISTORY_DAYS)
        yield Demo(server=server, admin=admin, user=user, simulated=sim is not None)
    finally:
        if server is not None:
            server.stop()
        if sim is not None:
            sim.stop()


def banner(demo: Demo) -> str:
    url = demo.url
    rows = [
        "",
        "=" * 76,
        f"  Open WebUI + openrouter_usage is running at  {url}",
        "",
        f"  Admin        {demo.admin.email}   password  {demo.admin.password}",
        f"  Second user  {demo.user.email}   password  {demo.user.password}   (ordinary user)",
        "",
        f"  1. Open {url} and sign in as the admin.",
        f"  2. Pick the model {DEMO_MODEL} (or any other) and ask something.",
        "  3. Under the model name, above the answer: the usage line (cost, chat total, tokens, ...).",
        "  4. Admin Panel -> Functions -> OpenRouter Usage -> gear: valves and the usage report.",
        "  5. In a private window, sign in as the second user and chat: their usage line and their",
        "     own figures (Chat Controls -> Valves -> Functions -> OpenRouter Usage) count only",
        "     their chats. Every model is public, so they can use them all.",
    ]
    if demo.simulated:
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
        f"  Data (kept between runs): {demo.data_dir}",
        f"  Ledger (created at the first recorded chat): {demo.ledger_path}",
        "  Read it from a shell:",
        f"    {demo.cli_command('report')}",
        f"    {demo.cli_command('report', '--by', 'model')}",
        "  Ctrl-C stops everything.",
        "=" * 76,
        "",
    ]
    return "\n".join(rows)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        # One is enough: a second Ctrl-C must not cut the cleanup short (the server runs in its
        # own session, so only this process can stop it).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    # Explicit for SIGINT too: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seed-history",
        action="store_true",
        help=f"add {HISTORY_DAYS} days of past completions of both users to the ledger (kept between runs)",
    )
    args = parser.parse_args()
    host = "127.0.0.1"
    port = int(os.environ.get("DEMO_PORT", "8080"))
    data_dir = Path(os.environ.get("DEMO_DATA_DIR", REPO / "demo-data")).resolve()
    admin = Account(
        DEFAULT_ADMIN.name,
        os.environ.get("DEMO_ADMIN_EMAIL", DEFAULT_ADMIN.email),
        os.environ.get("DEMO_ADMIN_PASSWORD", DEFAULT_ADMIN.password),
    )
    user = Account(
        DEFAULT_USER.name,
        os.environ.get("DEMO_USER_EMAIL", DEFAULT_USER.email),
        os.environ.get("DEMO_USER_PASSWORD", DEFAULT_USER.password),
    )

    if not port_is_free(host, port):
        log.error("port %d on %s is in use; set DEMO_PORT to another port", port, host)
        return 2

    try:
        with running_demo(
            data_dir,
            host=host,
            port=port,
            admin=admin,
            user=user,
            api_key=os.environ.get("OPENROUTER_API_KEY", "").strip(),
            with_history=args.seed_history,
        ) as demo:
            print(banner(demo), flush=True)
            while demo.server.is_running():
                time.sleep(0.5)
            log.error("Open WebUI exited unexpectedly; log tail:\n%s", demo.server.log_tail())
            return 1
    except KeyboardInterrupt:
        log.info("interrupted")
        return 0
    except OpenWebUIError as exc:
        log.error("%s", exc)
        return 1
    finally:
        log.info("stopped")  # running_demo has stopped everything it started


if __name__ == "__main__":
    sys.exit(main())
