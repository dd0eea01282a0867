"""Drive a real, pinned Open WebUI from tests and from the demo.

Three pieces, none of which needs pytest:

* :func:`ensure_openwebui` builds (once) and returns a cached virtualenv holding the slim
  install of a pinned Open WebUI release.
* :class:`OpenWebUIServer` runs ``open-webui serve`` on loopback with a private ``DATA_DIR``
  and stops its whole process group.
* :class:`OpenWebUIClient` speaks the HTTP API the web UI uses: sign-in, functions, valves,
  chat completions (API style and browser style) and saved chats.
* :class:`UserEvents` holds a user's socket.io connection, as the web UI does, and collects the
  ``events`` messages Open WebUI sends it (notifications are not saved anywhere else).

Facts about Open WebUI 0.12.4 that this module relies on (read from its source):

* The admin account is created at first start from ``WEBUI_ADMIN_EMAIL`` /
  ``WEBUI_ADMIN_PASSWORD`` (``WEBUI_ADMIN_NAME``) only when the user table is empty
  (``main.py`` lifespan -> ``utils/auth.py::create_admin_user``); sign-up is then disabled.
* The browser does not create a chat before sending the first message: it posts
  ``/api/chat/completions`` with ``parent_id: null``, no ``chat_id``, the new ``user_message``
  and the assistant message id, and the server creates the chat (``main.py::chat_completion``).
  Follow-up turns send ``chat_id`` and ``parent_id`` (the previous assistant message); for saved
  chats the server rebuilds ``messages`` from the database, so the browser sends none.
* With a truthy ``session_id`` and a ``chat_id`` the request is answered at once with
  ``{"status", "task_ids", "chat_id"}`` and the completion runs as a background task.  The event
  emitter broadcasts to the ``user:<id>`` room and persists to the database whatever the session
  id is, so a made-up session id is enough (only ``__event_call__`` needs a live socket).
* That broadcast is the socket.io message ``events`` (``{"chat_id", "message_id", "data":
  event}``); every socket of the user is in the room once it connects at ``/ws/socket.io`` with
  ``auth={"token": …}`` (``socket/main.py::connect``, again on ``user-join``).
* The assistant message is saved with ``done: True`` *before* the outlet filters and the
  tag/follow-up generation run (``utils/middleware.py``), so "done" alone does not mean an
  outlet's status is saved yet: wait until the chat has no running task as well.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import httpx

__all__ = [
    "DEFAULT_OPENWEBUI_VERSION",
    "BrowserTurn",
    "OpenWebUIClient",
    "OpenWebUIError",
    "OpenWebUIHTTPError",
    "OpenWebUIServer",
    "OpenWebUIStartError",
    "StreamResult",
    "UserEvents",
    "cache_root",
    "ensure_openwebui",
    "eventually",
    "find_uv",
    "free_port",
    "parse_sse",
]

log = logging.getLogger(__name__)

DEFAULT_OPENWEBUI_VERSION = "0.12.4"
OPENWEBUI_PYTHON = "3.11"

JSON = Any
T = TypeVar("T")


class OpenWebUIError(RuntimeError):
    """Anything that went wrong while preparing, running or talking to Open WebUI."""


class OpenWebUIStartError(OpenWebUIError):
    """The server did not come up; the message carries the tail of its log."""


class OpenWebUIHTTPError(OpenWebUIError):
    """An API call answered with an HTTP error status."""

    def __init__(self, method: str, path: str, status_code: int, detail: Any) -> None:
        super().__init__(f"{method} {path} -> HTTP {status_code}: {detail}")
        self.method = method
        self.path = path
        self.status_code = status_code
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Installing a pinned Open WebUI
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$OPENROUTER_USAGE_CACHE`` or ``~/.cache/openrouter-usage``."""
    configured = os.environ.get("OPENROUTER_USAGE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "openrouter-usage"


def find_uv() -> list[str]:
    """The command that runs uv: ``uv`` from PATH, else ``python -m uv`` when it is installed."""
    exe = shutil.which("uv")
    if exe:
        return [exe]
    probe = subprocess.run(
        [sys.executable, "-m", "uv", "--version"], capture_output=True, text=True, check=False
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "uv"]
    raise OpenWebUIError("uv not found: install it (`pip install uv`) or put it on PATH")


def _venv_python(venv: Path) -> Path:
    if os.name == "nt":  # pragma: no cover - the project targets POSIX
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _run_logged(cmd: Sequence[str | os.PathLike[str]], what: str) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise OpenWebUIError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def _installed_version(python: Path) -> str | None:
    proc = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('open-webui'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_openwebui(version: str = DEFAULT_OPENWEBUI_VERSION) -> Path:
    """Return the python executable of a cached venv holding the slim install of ``version``.

    Built on first use with uv (``uv venv``, ``uv pip install --no-deps open-webui==X``, then the
    wheel's ``requirements-slim.txt``) in a temporary directory that is renamed into place only
    when complete, so an interrupted install never looks finished.  A file lock keeps concurrent
    callers from building twice.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"openwebui-{version}"
    python = _venv_python(final)
    if python.exists():
        return python

    with (root / f".openwebui-{version}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists():  # someone else finished while we waited
            return python
        if final.exists():  # a directory without its interpreter is not a usable venv
            shutil.rmtree(final)
        tmp = root / f".openwebui-{version}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        uv = find_uv()
        started = time.monotonic()
        log.info("installing Open WebUI %s into %s (once)", version, final)
        try:
            # --relocatable: entry points and activation scripts survive the rename below.
            # --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (common in CI and containers)
            # every server start would otherwise recompile ~9,000 modules (about 5 s).
            _run_logged([*uv, "venv", "--relocatable", "-q", "-p", OPENWEBUI_PYTHON, tmp], "uv venv")
            tmp_python = _venv_python(tmp)
            _run_logged(
                [
                    *uv,
                    "pip",
                    "install",
                    "-q",
                    "--compile-bytecode",
                    "--python",
                    tmp_python,
                    "--no-deps",
                    f"open-webui=={version}",
                ],
                f"uv pip install open-webui=={version}",
            )
            requirements = site_packages(tmp_python) / "requirements-slim.txt"
            if not requirements.is_file():
                raise OpenWebUIError(f"open-webui {version} ships no requirements-slim.txt")  # noqa: TRY301
            _run_logged(
                [
                    *uv,
                    "pip",
                    "install",
                    "-q",
                    "--compile-bytecode",
                    "--python",
                    tmp_python,
                    "-r",
                    requirements,
                ],
                "uv pip install -r requirements-slim.txt",
            )
            installed = _installed_version(tmp_python)
            if installed != version:
                raise OpenWebUIError(f"expected open-webui {version}, found {installed!r}")  # noqa: TRY301
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("Open WebUI %s installed in %.1f s", version, time.monotonic() - started)
    return python


# --------------------------------------------------------------------------------------------
# Running a server
# --------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# Variables a developer's shell may carry that would point the server elsewhere or change how
# it stores its state; the server gets only what this module sets for them.
_SCRUBBED_ENV = (
    "DATABASE_URL",
    "DATABASE_TYPE",
    "REDIS_URL",
    "WEBSOCKET_MANAGER",
    "WEBSOCKET_REDIS_URL",
    "OPENAI_API_BASE_URLS",
    "OPENAI_API_KEYS",
    "OPENAI_API_CONFIGS",
    "OLLAMA_BASE_URLS",
    "ENABLE_PERSISTENT_CONFIG",
    "RESET_CONFIG_ON_START",
    "WEBUI_AUTH",
    "WEBUI_URL",
    "UVICORN_WORKERS",
    "PORT",
    "HOST",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
)

# The console script may carry an absolute shebang; calling the Typer app through the venv's
# interpreter works wherever the venv lives.
_SERVE_BOOTSTRAP = "import sys; sys.argv[0] = 'open-webui'; from open_webui import app; app()"


class OpenWebUIServer:
    """``open-webui serve`` on loopback with a private ``DATA_DIR``; a context manager.

    Output goes to ``<data_dir>/open-webui.log``.  :meth:`stop` always terminates the whole
    process group (SIGTERM, then SIGKILL after ``stop_timeout``).
    """

    def __init__(
        self,
        python: Path,
        data_dir: Path,
        *,
        openai_base_url: str,
        openai_api_key: str = "sk-e2e-not-a-real-key",
        admin_email: str = "admin@example.com",
        admin_password: str = "admin-password-e2e",
        admin_name: str = "Admin",
        host: str = "127.0.0.1",
        port: int | None = None,
        secret_key: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        startup_timeout: float = 180.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.python = Path(python)
        self.data_dir = Path(data_dir).resolve()
        self.openai_base_url = openai_base_url
        self.openai_api_key = openai_api_key
        self.admin_email = admin_email
        self.admin_password = admin_password
        self.admin_name = admin_name
        self.host = host
        self.port = port or free_port(host)
        self.secret_key = secret_key or uuid.uuid4().hex + uuid.uuid4().hex
        self.extra_env = dict(extra_env or {})
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.log_path = self.data_dir / "open-webui.log"
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def environment(self) -> dict[str, str]:
        """The full environment the server process gets."""
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        no_proxy = ",".join(
            p for p in (env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1,localhost") if p
        )
        env.update(
            {
                "DATA_DIR": str(self.data_dir),
                # Open WebUI copies its static files into STATIC_DIR at start; by default that is
                # inside the package, shared by every server run from the same venv.
                "STATIC_DIR": str(self.data_dir / "static"),
                "USE_SLIM_DOCKER": "true",
                "WEBUI_SECRET_KEY": self.secret_key,
                "ENABLE_OLLAMA_API": "False",
                "ENABLE_OPENAI_API": "True",
                "OPENAI_API_BASE_URL": self.openai_base_url,
                "OPENAI_API_KEY": self.openai_api_key,
                "WEBUI_ADMIN_EMAIL": self.admin_email,
                "WEBUI_ADMIN_PASSWORD": self.admin_password,
                "WEBUI_ADMIN_NAME": self.admin_name,
                # Offline: no version check, no HF downloads, no pip installs from frontmatter.
                "OFFLINE_MODE": "true",
                "ENABLE_VERSION_UPDATE_CHECK": "false",
                "HF_HUB_OFFLINE": "1",
                "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
                "RAG_RERANKING_MODEL_AUTO_UPDATE": "false",
                "ENABLE_PIP_INSTALL_FRONTMATTER_REQUIREMENTS": "false",
                # Libraries that phone home unless told not to.
                "ANONYMIZED_TELEMETRY": "false",
                "DO_NOT_TRACK": "true",
                "SCARF_NO_ANALYTICS": "true",
                "NO_PROXY": no_proxy,
                "no_proxy": no_proxy,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> Self:
        if self._proc is not None:
            raise OpenWebUIError("server already started")
        # Open WebUI binds its port only after its (slow) startup; a foreign server already on
        # the port would answer /health in the meantime.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise OpenWebUIStartError(f"{self.host}:{self.port} is not free: {exc}") from exc
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")  # closed in stop()
        started = time.monotonic()
        self._proc = subprocess.Popen(
            [
                str(self.python),
                "-c",
                _SERVE_BOOTSTRAP,
                "serve",
                "--host",
                self.host,
                "--port",
                str(self.port),
            ],
            cwd=self.data_dir,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches every child
        )
        atexit.register(self.stop)
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        log.info("Open WebUI up at %s in %.1f s (log: %s)", self.url, self.startup_seconds, self.log_path)
        return self

    def _wait_healthy(self, started: float) -> None:
        assert self._proc is not None
        deadline = started + self.startup_timeout
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise OpenWebUIStartError(
                        f"Open WebUI exited with code {code} during startup; log tail:\n{self.log_tail()}"
                    )
                try:
                    if http.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise OpenWebUIStartError(
                        f"Open WebUI not healthy after {self.startup_timeout:.0f} s; log tail:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.2)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the server's process group: SIGTERM, then SIGKILL. Safe to call twice."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None:
            _kill_group(proc, self.stop_timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def client(self, *, timeout: float = 120.0) -> OpenWebUIClient:
        """A client signed in as the admin."""
        client = OpenWebUIClient(self.url, timeout=timeout)
        client.signin(self.admin_email, self.admin_password)
        return client

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    pgid = proc.pid  # start_new_session=True: the child leads its own group
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure stragglers in its group are too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        return


# --------------------------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    """A streamed ``/api/chat/completions`` answer.

    ``events`` holds every ``data:`` payload parsed as JSON (a non-JSON payload is kept as its
    string), ``done`` says whether ``data: [DONE]`` arrived.  When the server answered with JSON
    instead of an event stream (background-task mode, when ``chat_id`` and ``session_id`` are
    given) that JSON is in ``json`` and ``events`` is empty.
    """

    events: list[JSON] = field(default_factory=list)
    raw: str = ""
    done: bool = False
    json: JSON = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def content(self) -> str:
        """The concatenated ``choices[0].delta.content`` of all events."""
        parts: list[str] = []
        for event in self.events:
            if not isinstance(event, dict):
                continue
            for choice in event.get("choices") or []:
                delta = (choice or {}).get("delta") or {}
                if isinstance(delta.get("content"), str):
                    parts.append(delta["content"])
        return "".join(parts)

    @property
    def usage_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e, dict) and e.get("usage")]


@dataclass(frozen=True)
class BrowserTurn:
    """A browser-style chat turn Open WebUI accepted: its chat, the assistant message being
    written, and the ids of the tasks writing it."""

    chat_id: str
    message_id: str
    task_ids: list[str]


def parse_sse(text: str) -> tuple[list[JSON], bool]:
    """Parse an event stream into its ``data:`` payloads; also say whether ``[DONE]`` came."""
    events: list[JSON] = []
    done = False
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if not payload:
            continue
        if payload == "[DONE]":
            done = True
            continue
        try:
            events.append(json.loads(payload))
        except json.JSONDecodeError:
            events.append(payload)
    return events, done


def eventually(check: Callable[[], T | None], timeout: float = 15.0, what: str = "condition") -> T:
    """``check()``'s first truthy value, polled for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _new_id() -> str:
    return str(uuid.uuid4())


def _web_client_request(model: str, session_id: str) -> dict[str, Any]:
    """The keys the 0.12.4 web UI sends with every chat request (new turn or Continue) as it
    leaves them by default: no tools, no features, the socket session that receives the events."""
    return {
        "stream": True,
        "model": model,
        "params": {"model_controls": {}},
        "tool_ids": [],
        "tool_servers": [],
        "features": {
            "voice": False,
            "image_generation": False,
            "code_interpreter": False,
            "web_search": False,
        },
        "variables": {},
        "session_id": session_id,
    }


def web_client_background_tasks(*, first_turn: bool) -> dict[str, bool]:
    """What the web UI asks for after an answer: follow-ups always, title and tags on a chat's
    first turn."""
    tasks = {"follow_up_generation": True}
    return {"title_generation": True, "tags_generation": True, **tasks} if first_turn else tasks


class OpenWebUIClient:
    """Synchronous client for the parts of the Open WebUI API the tests and the demo need."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.user: dict[str, Any] = {}
        # trust_env=False: loopback only, never through a proxy from the environment.
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, trust_env=False)

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, *, json_body: Any = None, **kwargs: Any) -> JSON:
        """Call the API; return the decoded JSON body, raise :class:`OpenWebUIHTTPError` on >= 400."""
        response = self.http.request(
            method, path, json=json_body, headers={**self._headers(), **kwargs.pop("headers", {})}, **kwargs
        )
        return self._decode(method, path, response)

    @staticmethod
    def _decode(method: str, path: str, response: httpx.Response) -> JSON:
        if response.status_code >= 400:
            try:
                body = response.json()
                detail = body.get("detail", body) if isinstance(body, dict) else body
            except ValueError:
                detail = response.text
            raise OpenWebUIHTTPError(method, path, response.status_code, detail)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def get(self, path: str, **kwargs: Any) -> JSON:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> JSON:
        return self.request("POST", path, json_body=body if body is not None else {}, **kwargs)

    # -- auth and users ---------------------------------------------------------------------

    def signin(self, email: str, password: str) -> str:
        data = self.post("/api/v1/auths/signin", {"email": email, "password": password})
        token = data.get("token") if isinstance(data, dict) else None
        if not token:
            raise OpenWebUIError(f"sign-in as {email} returned no token (MFA step?): {sorted(data or {})}")
        self.token = str(token)
        self.user = dict(data)
        return self.token

    @classmethod
    def login(cls, base_url: str, email: str, password: str, *, timeout: float = 120.0) -> OpenWebUIClient:
        client = cls(base_url, timeout=timeout)
        client.signin(email, password)
        return client

    def add_user(self, name: str, email: str, password: str, role: str = "user") -> dict[str, Any]:
        """Admin: create a user (``POST /api/v1/auths/add``)."""
        result: dict[str, Any] = self.post(
            "/api/v1/auths/add", {"name": name, "email": email, "password": password, "role": role}
        )
        return result

    # -- connections and models -------------------------------------------------------------

    def get_models(self) -> list[dict[str, Any]]:
        data = self.get("/api/models")
        return list(data.get("data", []) if isinstance(data, dict) else data)

    def set_openai_connection(self, base_url: str, api_key: str) -> None:
        """Admin: make ``base_url``/``api_key`` the only OpenAI-compatible connection."""
        self.post(
            "/openai/config/update",
            {
                "ENABLE_OPENAI_API": True,
                "OPENAI_API_BASE_URLS": [base_url],
                "OPENAI_API_KEYS": [api_key],
                "OPENAI_API_CONFIGS": {},
            },
        )

    # -- functions --------------------------------------------------------------------------

    def list_functions(self) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/functions/") or [])

    def get_function(self, function_id: str) -> dict[str, Any] | None:
        """The function, or None when it does not exist (Open WebUI answers 401 for that)."""
        if not any(f.get("id") == function_id for f in self.list_functions()):
            return None
        result: dict[str, Any] = self.get(f"/api/v1/functions/id/{function_id}")
        return result

    def create_function(
        self, function_id: str, name: str, content: str, meta: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Admin: ``POST /api/v1/functions/create`` (created inactive and not global)."""
        body = {
            "id": function_id,
            "name": name,
            "content": content,
            "meta": dict(meta or {"description": ""}),
        }
        result: dict[str, Any] = self.post("/api/v1/functions/create", body)
        return result

    def update_function(
        self, function_id: str, name: str, content: str, meta: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        body = {
            "id": function_id,
            "name": name,
            "content": content,
            "meta": dict(meta or {"description": ""}),
        }
        result: dict[str, Any] = self.post(f"/api/v1/functions/id/{function_id}/update", body)
        return result

    def upsert_function(
        self, function_id: str, name: str, content: str, meta: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Create the function, or update it in place (valves and flags kept) when it exists."""
        if self.get_function(function_id) is None:
            return self.create_function(function_id, name, content, meta)
        return self.update_function(function_id, name, content, meta)

    def delete_function(self, function_id: str) -> bool:
        return bool(self.request("DELETE", f"/api/v1/functions/id/{function_id}/delete"))

    def import_manifest(self, path: str | os.PathLike[str], *, strict: bool = True) -> list[dict[str, Any]]:
        """Do what Admin -> Functions -> Import does with a JSON file.

        The file holds a JSON array; each item, or its ``"function"`` member when it has one,
        is posted as is to ``/api/v1/functions/create``.  The browser reports a failing item
        and goes on; with ``strict`` (default) the first failure raises instead.
        """
        items = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(items, list):
            raise OpenWebUIError(f"{path}: a function manifest is a JSON array, got {type(items).__name__}")
        created: list[dict[str, Any]] = []
        for item in items:
            func = item["function"] if isinstance(item, dict) and "function" in item else item
            try:
                created.append(self.post("/api/v1/functions/create", func))
            except OpenWebUIHTTPError:
                if strict:
                    raise
                log.warning("import of %r failed", (func or {}).get("id") if isinstance(func, dict) else func)
        return created

    def activate_global(self, function_id: str) -> dict[str, Any]:
        """Make the function active and global.

        ``/toggle`` and ``/toggle/global`` flip their flag, so read the state first and flip
        only what is off.
        """
        func = self.get(f"/api/v1/functions/id/{function_id}")
        if not func.get("is_active"):
            func = self.post(f"/api/v1/functions/id/{function_id}/toggle")
        if not func.get("is_global"):
            func = self.post(f"/api/v1/functions/id/{function_id}/toggle/global")
        final: dict[str, Any] = self.get(f"/api/v1/functions/id/{function_id}")
        if not (final.get("is_active") and final.get("is_global")):
            raise OpenWebUIError(f"function {function_id} not active+global: {final}")
        return final

    def get_valves(self, function_id: str) -> dict[str, Any]:
        return dict(self.get(f"/api/v1/functions/id/{function_id}/valves") or {})

    def get_valves_spec(self, function_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.get(f"/api/v1/functions/id/{function_id}/valves/spec")
        return result

    def update_valves(
        self, function_id: str, values: Mapping[str, Any], *, merge: bool = False
    ) -> dict[str, Any]:
        """Save admin valves.  Open WebUI replaces the stored dict; ``merge`` keeps the others."""
        body = {**(self.get_valves(function_id) if merge else {}), **values}
        return dict(self.post(f"/api/v1/functions/id/{function_id}/valves/update", body) or {})

    def get_user_valves(self, function_id: str) -> dict[str, Any]:
        return dict(self.get(f"/api/v1/functions/id/{function_id}/valves/user") or {})

    def get_user_valves_spec(self, function_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.get(f"/api/v1/functions/id/{function_id}/valves/user/spec")
        return result

    def update_user_valves(self, function_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.post(f"/api/v1/functions/id/{function_id}/valves/user/update", dict(values)) or {})

    # -- completions ------------------------------------------------------------------------

    @overload
    def chat_completion(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        stream: Literal[True],
        chat_id: str | None = None,
        session_id: str | None = None,
        message_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> StreamResult: ...

    @overload
    def chat_completion(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        stream: Literal[False] = False,
        chat_id: str | None = None,
        session_id: str | None = None,
        message_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]: ...

    def chat_completion(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        stream: bool = False,
        chat_id: str | None = None,
        session_id: str | None = None,
        message_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> StreamResult | dict[str, Any]:
        """``POST /api/chat/completions`` as an API client does.

        Streaming returns a :class:`StreamResult`; non-streaming the JSON body.  ``chat_id``,
        ``session_id`` and ``message_id`` (sent as ``id``) are passed only when given.  With
        ``chat_id`` and ``session_id`` the server answers ``{"status", "task_ids", "chat_id"}``
        at once and runs the completion as a background task; with ``chat_id`` and
        ``message_id`` but no ``session_id`` it consumes the stream itself, saves it into that
        (existing) chat message and answers ``null``.  Either way the answer is in
        :attr:`StreamResult.json`, not in ``events``.
        """
        body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages], "stream": stream}
        if chat_id is not None:
            body["chat_id"] = chat_id
        if session_id is not None:
            body["session_id"] = session_id
        if message_id is not None:
            body["id"] = message_id
        body.update(extra or {})
        path = "/api/chat/completions"
        if not stream:
            result: dict[str, Any] = self.post(path, body)
            return result
        with self.http.stream("POST", path, json=body, headers=self._headers()) as response:
            response.read()
        if response.status_code >= 400:
            self._decode("POST", path, response)
        text = response.text
        headers = dict(response.headers)
        if "text/event-stream" not in response.headers.get("content-type", ""):
            return StreamResult(raw=text, json=self._decode("POST", path, response), headers=headers)
        events, done = parse_sse(text)
        return StreamResult(events=events, raw=text, done=done, headers=headers)

    def chat_completed(self, payload: Mapping[str, Any]) -> JSON:
        """Legacy ``POST /api/chat/completed`` (runs outlets again; needs id, chat_id, session_id)."""
        return self.post("/api/chat/completed", dict(payload))

    # -- chats ------------------------------------------------------------------------------

    def create_chat(self, chat: Mapping[str, Any], folder_id: str | None = None) -> dict[str, Any]:
        """``POST /api/v1/chats/new`` with a chat object (``{"title", "models", "history", ...}``)."""
        body: dict[str, Any] = {"chat": dict(chat)}
        if folder_id is not None:
            body["folder_id"] = folder_id
        result: dict[str, Any] = self.post("/api/v1/chats/new", body)
        return result

    def get_chat(self, chat_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/api/v1/chats/{chat_id}")
        return result

    def get_message(self, chat_id: str, message_id: str) -> dict[str, Any] | None:
        chat = self.get_chat(chat_id)
        messages = ((chat.get("chat") or {}).get("history") or {}).get("messages") or {}
        message = messages.get(message_id)
        return dict(message) if isinstance(message, dict) else None

    def chat_task_ids(self, chat_id: str) -> list[str]:
        """Ids of the chat's running tasks (completion + outlet + tags/follow-ups)."""
        data = self.get(f"/api/tasks/chat/{chat_id}")
        return list((data or {}).get("task_ids") or [])

    def wait_for_chat_message_done(
        self,
        chat_id: str,
        message_id: str,
        *,
        timeout: float = 60.0,
        settle: bool = True,
        poll: float = 0.1,
    ) -> dict[str, Any]:
        """Poll the saved chat until the assistant message is ``done``; return that message.

        With ``settle`` (default) also wait until the chat has no running task: Open WebUI marks
        the message done before it runs the outlet filters and the tag/follow-up generation.
        """
        deadline = time.monotonic() + timeout
        message: dict[str, Any] | None = None
        while True:
            message = self.get_message(chat_id, message_id)
            if (
                message is not None
                and message.get("done")
                and (not settle or not self.chat_task_ids(chat_id))
            ):
                return message
            if time.monotonic() > deadline:
                state = "missing" if message is None else f"done={message.get('done')!r}"
                raise OpenWebUIError(
                    f"message {message_id} of chat {chat_id} not finished after {timeout:.0f} s ({state}): "
                    f"{json.dumps(message)[:2000] if message else ''}"
                )
            time.sleep(poll)

    def browser_chat(
        self,
        model: str,
        text: str,
        chat_id: str | None = None,
        *,
        session_id: str | None = None,
        background_tasks: Mapping[str, bool] | None = None,
        precreate: bool = False,
        timeout: float = 60.0,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[str, str]:
        """:meth:`send_browser_chat`, then wait for the saved answer.

        Returns ``(chat_id, assistant_message_id)`` once the message is done and the chat's tasks
        have finished (the new chat's title is generated by a separate, untracked task and may land
        later).  A failure after the request was accepted (e.g. an inlet exception) is saved in the
        message's ``error`` and does not raise here.
        """
        turn = self.send_browser_chat(
            model,
            text,
            chat_id,
            session_id=session_id,
            background_tasks=background_tasks,
            precreate=precreate,
            extra=extra,
        )
        self.wait_for_chat_message_done(turn.chat_id, turn.message_id, timeout=timeout)
        return turn.chat_id, turn.message_id

    def stop_task(self, task_id: str) -> dict[str, Any]:
        """Admin: ``POST /api/tasks/stop/{task_id}``; Open WebUI cancels the task and awaits its end."""
        result: dict[str, Any] = self.post(f"/api/tasks/stop/{task_id}")
        return result

    def send_browser_chat(
        self,
        model: str,
        text: str,
        chat_id: str | None = None,
        *,
        session_id: str | None = None,
        background_tasks: Mapping[str, bool] | None = None,
        precreate: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> BrowserTurn:
        """Send ``text`` the way the 0.12.4 web UI does; return the accepted turn without waiting.

        Without ``chat_id`` a new chat is started: the request carries ``parent_id: null`` and
        the new ``user_message`` and Open WebUI creates the chat itself.  With ``chat_id`` the
        turn is appended under the chat's current message.  ``precreate`` instead first creates
        the chat with ``POST /api/v1/chats/new`` holding the user message and an empty assistant
        placeholder (what the UI does when it needs the chat id early, e.g. for uploads).

        Background tasks default to what the UI asks for: title and tags on a chat's first turn,
        follow-ups always.  Open WebUI answers at once with the ids of the tasks it started, one
        per model (``main.py::chat_completion``); the stop button's ``POST /api/tasks/stop/{id}``
        takes one of them.
        """
        session_id = session_id or f"e2e-{uuid.uuid4().hex[:20]}"
        user_message_id, assistant_id = _new_id(), _new_id()
        now = int(time.time())
        parent_id: str | None = None
        if chat_id is not None:
            history = (self.get_chat(chat_id).get("chat") or {}).get("history") or {}
            parent_id = history.get("currentId")
        first_turn = parent_id is None
        user_message: dict[str, Any] = {
            "id": user_message_id,
            "parentId": parent_id,
            "childrenIds": [],
            "role": "user",
            "content": text,
            "timestamp": now,
            "models": [model],
        }
        if self.user.get("id"):
            user_message["user"] = {"id": self.user["id"], "name": self.user.get("name")}
            user_message["user_id"] = self.user["id"]
        if precreate and chat_id is None:
            assistant = {
                "id": assistant_id,
                "parentId": user_message_id,
                "childrenIds": [],
                "role": "assistant",
                "content": "",
                "done": False,
                "model": model,
                "modelName": model,
                "modelIdx": 0,
                "timestamp": now,
            }
            created = self.create_chat(
                {
                    "title": "New Chat",
                    "models": [model],
                    "params": {},
                    "history": {
                        "currentId": assistant_id,
                        "messages": {
                            user_message_id: {**user_message, "childrenIds": [assistant_id]},
                            assistant_id: assistant,
                        },
                    },
                    "messages": [
                        {k: v for k, v in m.items() if k != "childrenIds"} for m in (user_message, assistant)
                    ],
                    "tags": [],
                    "timestamp": now * 1000,
                }
            )
            chat_id = str(created["id"])
        if background_tasks is None:
            background_tasks = web_client_background_tasks(first_turn=first_turn)
        body: dict[str, Any] = {
            **_web_client_request(model, session_id),
            "id": assistant_id,
            "message_ids": [{"model_id": model, "message_id": assistant_id, "modelIdx": 0}],
            "parent_id": parent_id,
            "user_message": user_message,
            "background_tasks": dict(background_tasks),
        }
        if chat_id is not None:
            body["chat_id"] = chat_id
        body.update(extra or {})  # e.g. tool_ids and params, as the UI sends them
        answer = self.post("/api/chat/completions", body)
        if not isinstance(answer, dict) or not answer.get("chat_id"):
            raise OpenWebUIError(f"browser-style completion was not accepted as a task: {answer!r}")
        task_ids = [str(task_id) for task_id in answer.get("task_ids") or []]
        return BrowserTurn(str(answer["chat_id"]), assistant_id, task_ids)

    def send_continue_response(
        self,
        chat_id: str,
        message_id: str,
        *,
        session_id: str | None = None,
        background_tasks: Mapping[str, bool] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> BrowserTurn:
        """Press "Continue Response" under the saved assistant message ``message_id`` the way the
        0.12.4 web UI does; return the accepted turn without waiting.

        Mirrors ``src/lib/components/chat/Chat.svelte`` of 0.12.4 (its source is embedded in the
        wheel's ``frontend/_app/immutable/chunks/CNDyKy5F.js.map``): ``continueResponse(message)``
        (only for a message that is ``done``) calls ``sendMessageSocket(model, …, message.id,
        chatId, {continueResponse: true})``, which posts ``/api/chat/completions`` with the same
        keys as a new turn (see :meth:`send_browser_chat`) except: ``id`` is the EXISTING assistant
        message's id, ``assistant_message_id`` (the key that makes it a continuation) is that id
        again, ``user_message`` is the existing parent user message, ``parent_id`` is that user
        message's ``parentId``, there is no ``message_ids``, and no ``messages`` for a saved chat
        (the UI sends only a system prompt when one is set). ``model`` is the message's
        ``selectedModelId`` or ``model``. Title and tags are asked for again when the message
        answers the chat's first user message (``parentId`` null: the history is two messages
        long), follow-ups always. Not sent here as in :meth:`send_browser_chat`: ``model_item``
        (the backend only uses it for direct connections) and the user's ``params`` settings.

        The backend (``main.py::chat_completion``) checks that the message exists and is the
        user's and that every ``message_ids`` entry names it (else 403/400), does NOT insert a
        new turn, and sets ``user_message_id`` to the message's ``parentId``;
        ``utils/middleware.py::process_chat_payload`` then rebuilds ``messages`` from the database
        up to that user message and appends the saved assistant message (its partial content),
        so the model continues it, and the new chunks are appended to the same message.
        """
        session_id = session_id or f"e2e-{uuid.uuid4().hex[:20]}"
        history = (self.get_chat(chat_id).get("chat") or {}).get("history") or {}
        messages = history.get("messages") or {}
        assistant = messages.get(message_id)
        if not isinstance(assistant, dict) or assistant.get("role") != "assistant":
            raise OpenWebUIError(f"chat {chat_id} has no assistant message {message_id}")
        if assistant.get("done") is not True:
            raise OpenWebUIError(f"message {message_id} is not done: the UI continues only a finished answer")
        user_message = messages.get(assistant.get("parentId"))
        if not isinstance(user_message, dict):
            raise OpenWebUIError(f"message {message_id} has no parent user message in chat {chat_id}")
        model = str(assistant.get("selectedModelId") or assistant.get("model") or "")
        parent_id = user_message.get("parentId")
        if background_tasks is None:
            background_tasks = web_client_background_tasks(first_turn=parent_id is None)
        body: dict[str, Any] = {
            **_web_client_request(model, session_id),
            "chat_id": chat_id,
            "id": message_id,
            "parent_id": parent_id,
            "user_message": dict(user_message),
            "assistant_message_id": message_id,
            "background_tasks": dict(background_tasks),
        }
        body.update(extra or {})
        answer = self.post("/api/chat/completions", body)
        if not isinstance(answer, dict) or not answer.get("chat_id"):
            raise OpenWebUIError(f"continuation was not accepted as a task: {answer!r}")
        task_ids = [str(task_id) for task_id in answer.get("task_ids") or []]
        return BrowserTurn(str(answer["chat_id"]), message_id, task_ids)

    def continue_response(
        self,
        chat_id: str,
        message_id: str,
        *,
        session_id: str | None = None,
        background_tasks: Mapping[str, bool] | None = None,
        timeout: float = 60.0,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """:meth:`send_continue_response`, then wait for the saved message; return it.

        The saved message is already ``done`` from its first answer (the UI clears ``done`` only
        in its own copy), so "done" says nothing here: what this waits for is the end of the
        chat's tasks. Open WebUI registers the continuation's task (``tasks.py::create_task``)
        before it answers the POST, and the outlet filters run inside that task. A failure after
        the request was accepted (e.g. an inlet exception) is saved in the message's ``error``
        and does not raise here.
        """
        turn = self.send_continue_response(
            chat_id, message_id, session_id=session_id, background_tasks=background_tasks, extra=extra
        )
        return self.wait_for_chat_message_done(turn.chat_id, turn.message_id, timeout=timeout)


# --------------------------------------------------------------------------------------------
# A user's socket.io connection
# --------------------------------------------------------------------------------------------

# Run by Open WebUI's own interpreter, whose venv ships python-socketio. It connects as the web UI
# does (path, websocket transport, the token as `auth`, then `user-join`) and writes one JSON line
# per message: ["joined", ack] once, then ["events", payload] for each `events` message, until its
# stdin closes. The token comes on stdin, never on the command line.
_USER_EVENTS_CLIENT = """
import asyncio, json, sys
import socketio

def say(kind, payload):
    print(json.dumps([kind, payload]), flush=True)

async def main(url):
    token = sys.stdin.readline().strip()
    sio = socketio.AsyncClient(reconnection=False)
    sio.on("events", lambda payload: say("events", payload))
    await sio.connect(url, socketio_path="/ws/socket.io", transports=["websocket"],
                      auth={"token": token}, wait_timeout=30)
    say("joined", await sio.call("user-join", {"auth": {"token": token}}, timeout=30))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await sio.disconnect()

asyncio.run(main(sys.argv[1]))
"""


class UserEvents:
    """The ``events`` messages Open WebUI sends to one user's browser sessions, collected from a
    socket.io connection of that user; a context manager.

    Entering returns once the server has answered ``user-join`` (the session is in the user's
    room); from then on :attr:`events` holds every message's payload,
    ``{"chat_id", "message_id", "data": event}``, in the order it arrived.  The client runs in
    Open WebUI's venv (``server.python``) as a child process, ended on exit.
    """

    def __init__(self, server: OpenWebUIServer, token: str, *, timeout: float = 30.0) -> None:
        self.server = server
        self.token = token
        self.timeout = timeout
        self.joined: dict[str, Any] = {}
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def wait_for(self, matches: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The first collected event that ``matches``, waiting up to ``timeout`` for it."""
        return eventually(lambda: next(filter(matches, self._live_events()), None), self.timeout, what)

    def _live_events(self) -> list[dict[str, Any]]:
        if self._proc is not None and self._proc.poll() is not None:
            stderr = self._proc.stderr.read() if self._proc.stderr else ""
            raise OpenWebUIError(f"the socket.io client exited ({self._proc.returncode}): {stderr[-2000:]}")
        return self.events

    def _joined(self) -> dict[str, Any]:
        self._live_events()  # raises when the client is gone
        return self.joined

    def _read(self, stdout: Any) -> None:
        for line in stdout:
            kind, payload = json.loads(line)
            with self._lock:
                if kind == "joined":
                    self.joined = dict(payload)
                else:
                    self._events.append(payload)

    def __enter__(self) -> Self:
        environment = {
            k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
        }
        self._proc = subprocess.Popen(
            [str(self.server.python), "-c", _USER_EVENTS_CLIENT, self.server.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write(self.token + "\n")
        self._proc.stdin.flush()
        self._reader = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True)
        self._reader.start()
        try:
            eventually(self._joined, self.timeout, "the socket.io session to join the user's room")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """End the client: closing its stdin disconnects it; killed if it does not exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
