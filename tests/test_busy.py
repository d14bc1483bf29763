"""Past what the app can serve: a full queue answers "busy, try again" at once, stores nothing for
the refused request, and the same request succeeds once the queue has room (--queue-size).

The queue is made full on purpose: a queue of 1 and slow generations in the one-at-a-time model
group, so one runs and one waits. Then a rating over the HTTP call API gets 503 and, in the
browser, a star click shows Gradio's busy message; neither is stored, and both go through after.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from bench.gradio_call import call
from tests.test_browser import CHROMIUM, FLAGS, wait_until

# A preview (it stores nothing) of about 15 s on 2 idle cores: long enough to hold the queue full
# while a request is refused, short enough to wait for.
SLOW_GENERATION = ["a red circle", 6, 0, 40, 3.0, None, True]


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory, builtin_backend):
    from app.config import AppConfig
    from app.server import start

    app = start(AppConfig(data_dir=tmp_path_factory.mktemp("busy"), port=0, queue_size=1), builtin_backend)
    app.url = app.url.rstrip("/")
    yield app
    app.close()


def waiting(url: str) -> int:
    return httpx.get(f"{url}/gradio_api/queue/status", timeout=10).json()["queue_size"]


def fill_queue(url: str) -> list[threading.Thread]:
    """Two slow generations: one runs, one waits (a queue of 1 is then full)."""
    threads = [threading.Thread(target=lambda: call(httpx.Client(base_url=url, timeout=300), "generate",
                                                    *SLOW_GENERATION), daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    wait_until(lambda: waiting(url) >= 1, timeout=30, what="a waiting request")
    return threads


def test_the_queue_size_is_the_configured_one(small_queue):
    assert small_queue.demo._queue.max_size == 1


def test_a_full_queue_answers_busy_at_once_and_stores_nothing(small_queue):
    url, store = small_queue.url, small_queue.services.store
    client = httpx.Client(base_url=url, timeout=300)
    (sample,) = call(client, "generate", "a blue square", 1, 0, 4, 3.0, None, False)
    threads = fill_queue(url)
    t = time.perf_counter()
    refused = client.post("/gradio_api/call/rate", json={"data": [sample["sample_id"], 4, "alice"]})
    assert refused.status_code == 503 and "Queue is full" in refused.json()["detail"]
    assert time.perf_counter() - t < 5  # answered at once, not after the generations
    assert store.counts()["ratings"] == 0
    for th in threads:
        th.join(timeout=300)
    ack = call(client, "rate", sample["sample_id"], 4, "alice")  # the same rating, once there is room
    assert [(r["id"], r["stars"]) for r in store.db["ratings"].rows] == [(ack["rating_id"], 4)]


@pytest.mark.browser
def test_the_browser_says_busy_and_the_click_works_again(small_queue):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's Chromium: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    url, store = small_queue.url, small_queue.services.store
    call(httpx.Client(base_url=url, timeout=300), "generate", "a yellow triangle", 2, 1, 4, 3.0, None, False)
    before = store.counts()["ratings"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        name_box = page.locator("#rater textarea, #rater input").first
        try:
            wait_until(lambda: name_box.input_value().startswith("guest-"), timeout=30, what="a guest rater id")
        except AssertionError:
            # with a queue of 1, the page's own load events can fill it and one of them is refused
            # (seen once with the machine loaded by other tests); a person would reload
            page.reload()
            wait_until(lambda: name_box.input_value().startswith("guest-"), what="a guest rater id")
        name_box.fill("bob")  # after the guest id arrived, which would overwrite it
        name_box.press("Tab")
        page.click("#load-queue")
        page.wait_for_selector("#current img")
        threads = fill_queue(url)
        page.click("#star-5")
        page.get_by_text("This application is currently busy. Please try again.").first.wait_for()
        assert store.counts()["ratings"] == before
        for th in threads:
            th.join(timeout=300)
        wait_until(lambda: waiting(url) == 0, what="an empty queue")
        page.click("#star-5")
        wait_until(lambda: store.counts()["ratings"] == before + 1, what="the rating once there is room")
        browser.close()
    assert [r["stars"] for r in store.db["ratings"].rows if r["rater_id"] == "bob"] == [5]
