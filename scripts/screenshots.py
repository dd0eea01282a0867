"""``make screenshots``: regenerate the README's pictures (docs/images/*.png) in headless Chromium.

A fresh demo (``scripts/demo.py``'s :func:`running_demo`: simulator, Open WebUI, the function, the
second user, a month of their history) in a throwaway data directory; then, in the browser, as a
person would:

* ``chat-desktop.png``: the admin's chat of two questions with their usage lines (1280 px wide);
* ``chat-phone.png``: the same chat on a 390 px phone screen;
* ``admin-report.png``: the report in the function's settings panel, opening with the chart of
  spend by day;
* ``daily-chart-phone.png``: that chart and its sentence in the panel on a 390 px phone screen;
* ``bulk-sync-notice.png``: the panel reopened after the bulk-sync switch was turned on and saved;
* ``user-readout.png``: the second user's chat with their own figures, their chart and their
  budget in Chat Controls -> Valves.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from selenium.webdriver.common.by import By

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.demo import DEMO_MODEL, FUNCTION_ID, Demo, running_demo  # noqa: E402
from tests.e2e.browser import (  # noqa: E402
    BrowserUnavailableError,
    OpenWebUIPage,
    skip_release_notes,
    start_chromium,
)
from tests.e2e.owui import OpenWebUIClient, OpenWebUIError, free_port  # noqa: E402

if TYPE_CHECKING:
    from selenium.webdriver.remote.webelement import WebElement

log = logging.getLogger("screenshots")

IMAGES = REPO / "docs" / "images"
DESKTOP = (1280, 800)
PHONE = (390, 844)
ADMIN_QUESTIONS = (
    "What does a usage ledger record for each chat completion?",
    "How do daily rollups keep a spend report fast?",
)
USER_QUESTION = "Summarize what OpenRouter charges for."
ADMIN_CHAT_TITLE = "Usage ledger questions"
USER_CHAT_TITLE = "OpenRouter pricing"
USER_BUDGET = "$2 per month"  # the second user's read-out shows a budget partly used


def take_pictures(page: OpenWebUIPage, demo: Demo, admin: OpenWebUIClient) -> None:
    page.viewport(*DESKTOP)
    page.sign_in(demo.admin.email, demo.admin.password, chat_with=DEMO_MODEL)
    for question in ADMIN_QUESTIONS:
        page.send(question)
    chat_id = page.chat_id()
    rename_chat(admin, chat_id, ADMIN_CHAT_TITLE)
    page.open_chat(chat_id)
    snap(page, "chat-desktop.png")

    page.viewport(*PHONE, mobile=True, scale=2)
    page.open_chat(chat_id)
    snap(page, "chat-phone.png")

    page.viewport(*DESKTOP)
    wait_until_checked(admin)
    panel = page.open_function_valves(FUNCTION_ID)
    report = panel.find_element(By.TAG_NAME, "table").find_element(
        By.XPATH, "./ancestor::div[contains(@class, 'py-0.5')][1]"
    )
    snap(page, "admin-report.png", report)
    page.close_dialog()

    page.viewport(*PHONE, mobile=True, scale=2)
    panel = page.open_function_valves(FUNCTION_ID)
    heading = panel.find_element(By.XPATH, ".//strong[starts-with(normalize-space(), 'Spend by day')]")
    chart = panel.find_element(By.TAG_NAME, "pre")
    page.driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", heading)
    time.sleep(0.5)
    page.wait_for_toasts_to_go()
    page.capture(IMAGES / "daily-chart-phone.png", heading, chart)
    log.info("wrote %s", (IMAGES / "daily-chart-phone.png").relative_to(REPO))
    page.close_dialog()
    page.reset_viewport()
    panel = page.open_function_valves(FUNCTION_ID)

    spec = admin.get_valves_spec(FUNCTION_ID) or {}
    bulk_sync_title = spec["properties"]["bulk_sync"]["title"]
    page.set_switch(page.valve_row(panel, bulk_sync_title), on=True)
    page.save_valves(panel)
    page.close_dialog()
    panel = page.open_function_valves(FUNCTION_ID)
    bulk_sync = page.valve_row(panel, bulk_sync_title)
    # From the switch to the Save button: the notice follows the switch, wherever it is shown.
    snap(page, "bulk-sync-notice.png", bulk_sync, panel.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    page.close_dialog()

    admin.update_valves(FUNCTION_ID, {"budgets": f"user {demo.user.email}: {USER_BUDGET}"}, merge=True)
    page.sign_out()
    page.sign_in(demo.user.email, demo.user.password, chat_with=DEMO_MODEL)
    page.send(USER_QUESTION)
    with OpenWebUIClient.login(demo.url, demo.user.email, demo.user.password) as user:
        rename_chat(user, page.chat_id(), USER_CHAT_TITLE)
        user_spec = user.get_user_valves_spec(FUNCTION_ID) or {}
    page.open_chat(page.chat_id())
    readout = page.open_user_valves(FUNCTION_ID)
    for valve in user_spec.get("properties", {}).values():  # a read-out kept in a dropdown
        if (valve.get("input") or {}).get("options"):
            page.customize(page.valve_row(readout, valve["title"]))
            # Open WebUI saves user valves by itself half a second after a change, with a toast.
            page.wait_for(lambda: page.find("[data-sonner-toast]"), "the user valves to be saved")
    snap(page, "user-readout.png")


def wait_until_checked(admin: OpenWebUIClient, seconds: float = 60.0) -> None:
    """Wait until every answer is checked against the upstream's bill (the first lookup waits a
    few seconds after a completion), so the report shows reconciliation done."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        report = str(
            ((admin.get_valves_spec(FUNCTION_ID) or {}).get("properties") or {})
            .get("usage_report", {})
            .get("description", "")
        )
        if "checked (100.0%)" in report:
            return
        time.sleep(1.0)
    log.warning("the answers were not all checked against the bill within %.0f s", seconds)


def rename_chat(client: OpenWebUIClient, chat_id: str, title: str) -> None:
    """Give a chat a fitting title (the simulator's title generator picks from a fixed list)."""
    client.post(f"/api/v1/chats/{chat_id}", {"chat": {"title": title}})


def snap(page: OpenWebUIPage, name: str, *elements: WebElement) -> None:
    """Save a picture of the viewport, or of the part from the first of ``elements`` to the last
    (the viewport made tall enough to hold it, then set back)."""
    page.wait_for_toasts_to_go()
    page.park_mouse()
    if elements:
        height = page.driver.execute_script(
            "return arguments[1].getBoundingClientRect().bottom - arguments[0].getBoundingClientRect().top;",
            elements[0],
            elements[-1],
        )
        page.viewport(DESKTOP[0], max(DESKTOP[1], int(height) + 120))
        page.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", elements[0])
    time.sleep(0.5)  # let scrolling and fades settle
    page.capture(IMAGES / name, *elements)
    if elements:
        page.viewport(*DESKTOP)
    log.info("wrote %s", (IMAGES / name).relative_to(REPO))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="openrouter-usage-screenshots-") as data_dir,
            running_demo(Path(data_dir), port=free_port(), with_history=True) as demo,
            OpenWebUIClient.login(demo.url, demo.admin.email, demo.admin.password) as admin,
        ):
            skip_release_notes(admin)
            driver = start_chromium(*DESKTOP)
            try:
                take_pictures(OpenWebUIPage(driver, demo.url), demo, admin)
            finally:
                driver.quit()
    except (BrowserUnavailableError, OpenWebUIError) as exc:
        log.error("%s", exc)  # noqa: TRY400 - one line the person can act on
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
