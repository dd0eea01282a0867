"""Drive the real Open WebUI web UI in headless Chromium, for the browser test and the screenshots.

Debian's ``chromium`` and ``chromium-driver`` (``scripts/ensure-chromium.sh`` installs them) through
selenium. The driver is started from its own path, so Selenium Manager never tries to download
one. Like ``owui.py`` this module needs no pytest.

Facts about the 0.12.4 web UI this module relies on (read from its built sources, whose source
maps ship the Svelte files):

* Sign-in: ``/auth`` has ``#email``, ``#password`` and a submit button; signed in, the chat page
  goes to its ``redirect`` parameter and shows ``#chat-input`` (a contenteditable); typed text
  brings up ``#send-message-button``. ``/?models=<id>`` starts a new chat with that model
  selected. The token lives in ``localStorage.token``.
* An admin sees the "What's New" release notes at sign-in until their settings hold the server's
  version (``ui.version``, which the notes' button saves).
* An assistant message is ``#message-<id>`` holding ``.chat-assistant``. The last status of its
  ``statusHistory`` (a filter's status events) shows in its ``.status-description``, under the
  model name and above the answer. While an answer streams (and while its title, tags and
  follow-ups are generated) the chat box shows a button labelled "Stop".
* Admin Panel -> Functions (``/admin/functions``): each row links to
  ``/admin/functions/edit?id=<id>`` and has a button labelled "Valves" that opens a dialog
  (``[role=dialog]``) holding a form. Each valve is a ``div.py-0.5`` row: a label with its title,
  a button reading "Default" (unset: no input shown) or "Custom" (an input, a switch
  ``[role=switch]`` for booleans, a select for ``input.options``), and its description rendered
  from Markdown (Markdown tables become ``<table>``). Save posts the form and toasts.
* Chat Controls (the navbar button labelled "Controls") has a "Valves" section: a select for
  Tools/Functions, a select for the item, then the user valves, rendered as above inside
  ``.chat-control-valves`` and saved automatically 0.5 s after a change.
"""

from __future__ import annotations

import base64
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.e2e.owui import OpenWebUIClient

__all__ = [
    "BrowserUnavailableError",
    "OpenWebUIPage",
    "chromium_paths",
    "skip_release_notes",
    "start_chromium",
]

T = TypeVar("T")

DEFAULT_CHROMIUM = "/usr/bin/chromium"
DEFAULT_CHROMEDRIVER = "/usr/bin/chromedriver"

# The valve rows of a panel, and the plain text of a row's title (without "*required").
_VALVE_ROW_JS = """
const [root, title] = arguments;
for (const row of root.querySelectorAll('div.py-0\\\\.5')) {
    const label = row.firstElementChild && row.firstElementChild.firstElementChild;
    if (!label) continue;
    const text = [...label.childNodes].filter(n => n.nodeType === Node.TEXT_NODE)
        .map(n => n.textContent).join('').trim();
    if (text === title) return row;
}
return null;
"""

_VALVES_SECTION_XPATH = "//button[@aria-expanded][.//div[normalize-space(text())='Valves']]"

_ASSISTANT_IDS_JS = """
return [...document.querySelectorAll('[id^="message-"]')]
    .filter(e => e.querySelector('.chat-assistant'))
    .map(e => e.id.slice('message-'.length));
"""

# The page rectangle (CSS pixels) around some elements, for a clipped screenshot; little margin
# below, where the next valve's title starts right under a valve's row.
_RECT_JS = """
const [elements, pad] = [arguments[0], arguments[1]];
const rects = elements.map(e => e.getBoundingClientRect());
const left = Math.max(0, Math.min(...rects.map(r => r.left)) - pad);
const top = Math.max(0, Math.min(...rects.map(r => r.top)) - pad);
const right = Math.min(window.innerWidth, Math.max(...rects.map(r => r.right)) + pad);
const bottom = Math.min(window.innerHeight, Math.max(...rects.map(r => r.bottom)) + Math.min(pad, 4));
return {x: left, y: top, width: right - left, height: bottom - top};
"""


# Each code block of a panel as the page lays it out: per line of text, how many boxes the
# browser drew it in (more than one: it wrapped) and how wide; the block's box against the
# viewport, and whether its content is wider than the block (overflow that hides part of it).
_CODE_BLOCKS_JS = """
const root = arguments[0];
return [...root.querySelectorAll('pre')].map(pre => {
    const code = pre.querySelector('code') || pre;
    const node = code.firstChild;
    const text = code.textContent;
    const lines = [];
    let offset = 0;
    for (const line of text.split('\\n')) {
        if (line.length && node && node.nodeType === Node.TEXT_NODE) {
            const range = document.createRange();
            range.setStart(node, offset);
            range.setEnd(node, offset + line.length);
            const boxes = [...range.getClientRects()].filter(r => r.width > 0);
            const top = Math.min(...boxes.map(r => r.top)), bottom = Math.max(...boxes.map(r => r.bottom));
            const lineHeight = parseFloat(getComputedStyle(code).lineHeight);
            lines.push({text: line, rows: Math.round((bottom - top) / lineHeight),
                        width: range.getBoundingClientRect().width});
        }
        offset += line.length + 1;
    }
    const box = pre.getBoundingClientRect();
    return {text, lines, left: box.left, right: box.right, viewport: document.documentElement.clientWidth,
            overflow: pre.scrollWidth - pre.clientWidth, font: getComputedStyle(code).fontFamily};
});
"""


class BrowserUnavailableError(RuntimeError):
    """Chromium or ChromeDriver is missing or does not start."""


def chromium_paths() -> tuple[Path, Path]:
    """The browser and its driver: ``$CHROMIUM_BINARY`` / ``$CHROMEDRIVER_PATH`` or Debian's."""
    return (
        Path(os.environ.get("CHROMIUM_BINARY", DEFAULT_CHROMIUM)),
        Path(os.environ.get("CHROMEDRIVER_PATH", DEFAULT_CHROMEDRIVER)),
    )


def start_chromium(width: int = 1280, height: int = 800) -> webdriver.Chrome:
    """A headless Chromium with a ``width`` x ``height`` viewport; raises BrowserUnavailableError."""
    browser, driver = chromium_paths()
    missing = [str(p) for p in (browser, driver) if not os.access(p, os.X_OK)]
    if missing:
        raise BrowserUnavailableError(
            f"not found: {', '.join(missing)} (scripts/ensure-chromium.sh installs Debian's "
            "chromium and chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(browser)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-color-profile=srgb",
        "--lang=en-US",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    try:
        # An explicit driver path: selenium then skips Selenium Manager (no downloads).
        chrome = webdriver.Chrome(service=Service(executable_path=str(driver)), options=options)
    except WebDriverException as exc:
        raise BrowserUnavailableError(f"Chromium did not start: {exc.msg}") from exc
    return chrome


def skip_release_notes(client: OpenWebUIClient) -> None:
    """Mark Open WebUI's release notes as seen by ``client``'s user (they cover the page of an
    admin's first sign-in); the same setting the notes' own button saves."""
    version = client.get("/api/config")["version"]
    client.post("/api/v1/users/user/settings/update", {"ui": {"version": version}})


class OpenWebUIPage:
    """The Open WebUI web UI at ``base_url`` as a person uses it, in one browser."""

    def __init__(self, driver: webdriver.Chrome, base_url: str, *, timeout: float = 60.0) -> None:
        self.driver = driver
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------------------------

    def wait_for(self, condition: Callable[[], T | None], what: str, timeout: float | None = None) -> T:
        """Poll ``condition`` until it returns something truthy; fail naming ``what``."""

        def probe(_driver: Any) -> T | Literal[False]:
            try:
                value = condition()
            except StaleElementReferenceException:  # Svelte re-rendered it; look again
                return False
            return False if value is None else value

        waiter: WebDriverWait[Any] = WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.1)
        result: T = waiter.until(probe, f"waiting for {what}")
        return result

    def find(self, css: str, root: WebElement | None = None) -> WebElement | None:
        found = (root or self.driver).find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def viewport(self, width: int, height: int, *, mobile: bool = False, scale: float = 1.0) -> None:
        """Emulate a screen of ``width`` x ``height`` CSS pixels (a phone with ``mobile``)."""
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile},
        )

    def reset_viewport(self) -> None:
        """Back to the browser window's own screen (no phone emulation left behind)."""
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    def capture(self, path: Path, *elements: WebElement, pad: int = 12) -> None:
        """Save a PNG of the viewport, or of the part around ``elements`` (on screen)."""
        params: dict[str, Any] = {"format": "png"}
        if elements:
            params["clip"] = {**self.driver.execute_script(_RECT_JS, list(elements), pad), "scale": 1}
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", params)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def park_mouse(self) -> None:
        """Move the pointer off the page, so no hover tooltip shows in a picture."""
        self.driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 0, "y": 0})

    def wait_for_toasts_to_go(self) -> None:
        self.wait_for(lambda: not self.find("[data-sonner-toast]"), "the notifications to fade", 15)

    # -- signing in and out -----------------------------------------------------------------

    def sign_in(self, email: str, password: str, *, chat_with: str | None = None) -> None:
        """Sign in through the login form and wait for the chat page (a new chat with the model
        ``chat_with`` selected, when given)."""
        target = f"/?models={urllib.parse.quote(chat_with, safe='')}" if chat_with else "/"
        self.driver.get(f"{self.base_url}/auth?redirect={urllib.parse.quote(target, safe='')}")
        field = self.wait_for(lambda: self.find("#email"), "the sign-in form")
        field.send_keys(email)
        self.driver.find_element(By.ID, "password").send_keys(password)
        self.driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        self.wait_for(lambda: self.find("#chat-input"), f"the chat page after signing in as {email}")

    def sign_out(self) -> None:
        """Forget the session (token cookie and local storage), as a fresh browser would."""
        self.driver.delete_all_cookies()
        self.driver.execute_script("localStorage.clear(); sessionStorage.clear();")

    # -- chatting ---------------------------------------------------------------------------

    def new_chat(self, model: str) -> None:
        self.driver.get(f"{self.base_url}/?models={urllib.parse.quote(model, safe='')}")
        self.wait_for(lambda: self.find("#chat-input"), "a new chat")

    def open_chat(self, chat_id: str) -> None:
        self.driver.get(f"{self.base_url}/c/{chat_id}")
        self.wait_for(self.assistant_message_ids, f"chat {chat_id}")

    def chat_id(self) -> str:
        path = urllib.parse.urlparse(self.driver.current_url).path
        if not path.startswith("/c/"):
            raise AssertionError(f"not on a saved chat: {self.driver.current_url}")
        return path.removeprefix("/c/")

    def assistant_message_ids(self) -> list[str]:
        ids: list[str] = self.driver.execute_script(_ASSISTANT_IDS_JS)
        return ids

    def status_line(self, message_id: str) -> WebElement | None:
        """The status shown under the model name of an assistant message (the usage line)."""
        return self.find(f"#message-{message_id} .status-description")

    def send(self, text: str) -> str:
        """Type ``text`` into the chat box and send it; wait until the answer is complete and its
        status line is shown; return the assistant message's id."""
        before = set(self.assistant_message_ids())
        box = self.wait_for(lambda: self.find("#chat-input"), "the chat box")
        box.click()
        box.send_keys(text)
        self.wait_for(lambda: self.find("#send-message-button"), "the send button").click()
        new_id: str = self.wait_for(
            lambda: next((i for i in self.assistant_message_ids() if i not in before), None),
            "the answer to appear",
        )

        def finished() -> bool:
            line = self.status_line(new_id)
            return bool(line and line.text.strip() and not self.find('button[aria-label="Stop"]'))

        self.wait_for(finished, f"answer {new_id} to finish with a status line")
        return new_id

    # -- valve panels -----------------------------------------------------------------------

    def valve_row(self, panel: WebElement, title: str) -> WebElement:
        """The row of the valve titled ``title`` in a valves panel."""
        row: WebElement = self.wait_for(
            lambda: self.driver.execute_script(_VALVE_ROW_JS, panel, title), f"the valve {title!r}", 10
        )
        return row

    def customize(self, row: WebElement) -> None:
        """Show a valve's input: click its "Default" button when it reads so."""
        toggle = row.find_element(By.TAG_NAME, "button")
        if toggle.text.strip() != "Custom":
            toggle.click()
            self.wait_for(lambda: toggle.text.strip() == "Custom", "the valve to turn custom", 10)

    def set_switch(self, row: WebElement, *, on: bool) -> None:
        self.customize(row)
        switch = self.wait_for(lambda: self.find("[role=switch]", row), "the valve's switch", 10)
        if (switch.get_attribute("aria-checked") == "true") != on:
            switch.click()
        self.wait_for(
            lambda: (switch.get_attribute("aria-checked") == "true") == on, "the switch to flip", 10
        )

    def open_function_valves(self, function_id: str) -> WebElement:
        """Admin Panel -> Functions -> the function's gear: return the valves dialog's form,
        once its valves (and their descriptions) are shown."""
        self.driver.get(f"{self.base_url}/admin/functions")
        href = f"/admin/functions/edit?id={urllib.parse.quote(function_id, safe='')}"
        link = self.wait_for(lambda: self.find(f'a[href="{href}"]'), f"function {function_id} in the list")
        row = link.find_element(By.XPATH, './ancestor::div[@role="presentation"][1]')
        row.find_element(By.CSS_SELECTOR, 'button[aria-label="Valves"]').click()
        form: WebElement = self.wait_for(
            lambda: (f := self.find("[role=dialog] form")) and self.find(".markdown-prose-xs", f) and f,
            "the function's valves dialog",
        )
        return form

    def save_valves(self, form: WebElement) -> None:
        """Press Save in a valves dialog and wait for Open WebUI's confirmation."""
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        self.wait_for(lambda: self.find('[data-sonner-toast][data-type="success"]'), "the valves to be saved")

    def close_dialog(self) -> None:
        dialog = self.find("[role=dialog]")
        if dialog is not None:
            dialog.find_element(By.CSS_SELECTOR, 'button[aria-label="Close"]').click()
            self.wait_for(lambda: not self.find("[role=dialog]"), "the dialog to close", 10)

    def open_user_valves(self, function_id: str) -> WebElement:
        """Chat Controls -> Valves -> Functions -> the function: return its user valves panel."""
        self.wait_for_toasts_to_go()  # a toast (e.g. the sign-in's) covers the navbar's right end
        if self._valves_selects() is None:
            self.wait_for(lambda: self.find('button[aria-label="Controls"]'), "the Controls button").click()
            section = self.wait_for(
                lambda: next(iter(self.driver.find_elements(By.XPATH, _VALVES_SECTION_XPATH)), None),
                "the Valves section of Chat Controls",
            )
            if section.get_attribute("aria-expanded") != "true":  # Open WebUI remembers it open
                section.click()
        kind, _ = self.wait_for(self._valves_selects, "the Valves selects")
        if kind.first_selected_option.get_attribute("value") != "functions":
            kind.select_by_value("functions")
        _, item = self.wait_for(self._valves_selects, "the function select")
        item.select_by_value(function_id)
        panel: WebElement = self.wait_for(self._shown_user_valves, "the user valves")
        return panel

    def _shown_user_valves(self) -> WebElement | None:
        """The user valves panel on screen: after a phone was emulated the page can also hold a
        hidden copy of Chat Controls (its drawer for small screens)."""
        panels = self.driver.find_elements(By.CSS_SELECTOR, ".chat-control-valves")
        return next((p for p in panels if p.is_displayed() and self.find(".markdown-prose-xs", p)), None)

    def code_blocks(self, root: WebElement) -> list[dict[str, Any]]:
        """The code blocks under ``root`` as laid out: ``text``; ``lines``, each with its ``text``,
        the ``rows`` it takes on screen (1 unless it wrapped) and its ``width`` in pixels; the
        block's ``left`` and ``right`` against the ``viewport`` width; ``overflow``, the pixels
        of content wider than the block; ``font``, its computed font family."""
        blocks: list[dict[str, Any]] = self.driver.execute_script(_CODE_BLOCKS_JS, root)
        return blocks

    def _valves_selects(self) -> tuple[Select, Select] | None:
        """The Tools/Functions select and the item select of the open Valves section."""
        section = next(iter(self.driver.find_elements(By.XPATH, _VALVES_SECTION_XPATH)), None)
        if section is None or section.get_attribute("aria-expanded") != "true":
            return None
        selects = section.find_elements(By.XPATH, "./following-sibling::*//select")
        return (Select(selects[0]), Select(selects[1])) if len(selects) >= 2 else None
