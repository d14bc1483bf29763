"""A video app in a real browser: generate clips, rate one with a key and one with a button,
answer a clip comparison; the page plays each clip as one looping animated PNG, enlarged without
smoothing. Screenshots go to tests/artifacts/screenshots/ (ignored)."""

from __future__ import annotations

import re
import urllib.parse
import urllib.request

import pytest

from feedback_store import clips
from tests.clip_model import clip_model_dir
from tests.test_browser import CHROMIUM, FLAGS, SLOW, expect_text, open_tab, set_number, shot, wait_until

pytestmark = pytest.mark.browser
PROMPT = "a small blue square moving slowly up, white background"


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from app.config import AppConfig
    from app.server import start
    from rlr_core.backends.loading import load_backend

    app = start(AppConfig(data_dir=tmp_path_factory.mktemp("video-browser"), port=0),
                load_backend(clip_model_dir()))
    yield app
    app.close()


@pytest.fixture(scope="module")
def page(running):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's Chromium: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(running.url)
        yield page
        browser.close()


def served_frames(page, selector: str):
    """The frames of the file the page shows in ``selector`` (fetched as the browser fetched it)."""
    src = urllib.parse.urljoin(page.url, page.locator(f"{selector} img").first.get_attribute("src"))
    assert re.search(r"/[0-9a-f]{64}\.png$", src)  # a hash-named copy, never a data-folder file
    with urllib.request.urlopen(src, timeout=30) as response:  # the local test server
        return clips.read_frames(response.read())


def test_rate_and_compare_clips_in_the_browser(running, page):
    store = running.services.store
    expect_text(page, "h1", "RLR feedback")
    assert "Rate the model's clips" in page.locator("body").inner_text()
    name_box = page.locator("#rater textarea, #rater input").first
    wait_until(lambda: name_box.input_value().startswith("guest-"), what="a guest rater id")
    name_box.fill("cleo")
    name_box.press("Tab")

    # --- generate two clips: each a looping animated PNG of 8 frames, shown pixel-art style ----
    set_number(page, "steps", 2)
    set_number(page, "n-images", 2)
    page.locator("#prompt textarea").fill(PROMPT)
    page.click("#generate")
    page.wait_for_selector("#current img", timeout=SLOW)
    wait_until(lambda: page.locator("#gallery img").count() == 2, what="two clips in the gallery")
    assert served_frames(page, "#current").shape == (8, 32, 32, 3)
    assert served_frames(page, "#gallery").shape == (8, 32, 32, 3)
    rendering = page.locator("#current img").first.evaluate("el => getComputedStyle(el).imageRendering")
    assert rendering == "pixelated"
    box = page.locator("#current img").first.bounding_box()
    assert box["height"] >= 128  # 32x32 frames, enlarged
    shot(page, "video-01-generate")

    # --- rate: a key rates the shown clip and moves on; a button rates the next ----------------
    page.locator("#current-info").click()  # focus the page, not a text field
    page.keyboard.press("4")
    expect_text(page, "#current-info", "2 / 2")
    wait_until(lambda: store.counts()["ratings"] == 1, what="the first rating")
    page.click("#star-2")
    wait_until(lambda: store.counts()["ratings"] == 2, what="the second rating")
    assert sorted(r["stars"] for r in store.db["ratings"].rows) == [2, 4]
    assert {r["rater_id"] for r in store.db["ratings"].rows} == {"cleo"}
    expect_text(page, "#gallery", "2★")
    shot(page, "video-02-rated")

    # --- compare the two clips --------------------------------------------------------------
    open_tab(page, "Compare")
    page.click("#cmp-next")
    page.wait_for_selector("#cmp-left-img img")
    page.wait_for_selector("#cmp-right-img img")
    expect_text(page, "#cmp-prompt", "Which clip fits")
    assert served_frames(page, "#cmp-left-img").shape == (8, 32, 32, 3)
    shot(page, "video-03-compare")  # (the shot's wait also makes a measurable response time)
    page.keyboard.press("ArrowRight")
    wait_until(lambda: store.counts()["comparisons"] == 1, what="a comparison")
    row = next(iter(store.db["comparisons"].rows))
    assert row["outcome"] == "right" and row["rater_id"] == "cleo" and row["response_time_s"] > 0.2
    expect_text(page, "#cmp-count", "1 comparisons by you")
