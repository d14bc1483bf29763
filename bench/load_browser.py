"""A browser rater for ``bench/load.py``: Chromium (Playwright) on the Rate tab, timing each click
on a star until the next image is on screen, while the locust raters load the app."""

from __future__ import annotations

import re
import threading
import time


class BrowserRater(threading.Thread):
    """Chromium on the Rate tab: click a star, time until the next image is on screen; repeat."""

    def __init__(self, url: str, think: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.think, self.stop_event = url, think, stop
        self.latency_ms: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        from playwright.sync_api import sync_playwright

        from tests.test_browser import CHROMIUM, FLAGS

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            try:
                self.rate_in(page)
            except Exception as err:  # noqa: BLE001 - reported, the benchmark goes on
                self.errors.append(f"{type(err).__name__}: {str(err)[:300]}")
            browser.close()

    def rate_in(self, page) -> None:
        page.goto(self.url)
        box = page.locator("#rater textarea, #rater input").first
        deadline = time.time() + 60
        while not box.input_value().startswith("guest-") and time.time() < deadline:
            time.sleep(0.1)  # the guest id arrives first and would overwrite a typed name
        visitor = 0
        while not self.stop_event.is_set():
            visitor += 1  # a new name once the queue is rated through: a new person arrives
            box.fill(f"browser-{visitor}")
            box.press("Tab")
            page.click("#load-queue")
            try:  # the new queue is on screen (until then the last visitor's "8 / 8" still shows)
                page.locator("#current-info").filter(has_text=re.compile(r"(^|\s)1 / \d+")).wait_for()
            except Exception as err:  # noqa: BLE001 - reported with what the page showed; the next visitor tries again
                self.errors.append(f"loading a queue as {box.input_value()!r} (visitor {visitor}, "
                                   f"{len(self.latency_ms)} clicks timed so far): {type(err).__name__}; the page "
                                   f"showed {self.shown(page)!r}")
                continue
            if not self.wait_for_image(page, None):
                continue
            while not self.stop_event.is_set():
                place = re.search(r"(\d+) / (\d+)", page.locator("#current-info").inner_text())
                shown, total = int(place[1]), int(place[2])
                src = page.locator("#current img").first.get_attribute("src")
                t = time.perf_counter()
                page.click(f"#star-{1 + len(self.latency_ms) % 5}")
                if shown == total:  # the batch's last: rated, and nothing follows it
                    page.locator("#current-info", has_text="your rating: ★").wait_for()
                    break
                if self.wait_for_image(page, src):
                    self.latency_ms.append((time.perf_counter() - t) * 1000)
                time.sleep(self.think)

    @staticmethod
    def shown(page) -> str:
        """The place line and any toasts, for an error report."""
        try:
            toasts = " | ".join(page.locator(".toast-body").all_inner_texts())
            return f"{page.locator('#current-info').inner_text(timeout=5000)[:120]} [toasts: {toasts[:200]}]"
        except Exception as err:  # noqa: BLE001 - the report must not raise
            return f"unreadable ({type(err).__name__})"

    @staticmethod
    def wait_for_image(page, old_src: str | None, timeout_s: float = 60) -> bool:
        """Until the big image shows a different picture, fully decoded."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            shown = page.evaluate("""(old) => { const im = document.querySelector('#current img');
                return !!im && im.getAttribute('src') !== old && im.complete && im.naturalWidth > 0; }""", old_src)
            if shown:
                return True
            time.sleep(0.01)
        return False
