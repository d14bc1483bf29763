"""The whole loop in a real browser: generate, rate, compare, prompt lab, train, new version.

Drives Debian's Chromium with Playwright (sync API) against the app started in this process on
a temporary data directory; screenshots go to tests/artifacts/screenshots/ (ignored). Tiny settings (6 sampling
steps, a 2-step round at batch 2) keep it to about a minute on two busy CPU cores.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Written to an ignored folder, so a test run leaves the tree clean; scripts/screenshots.sh
# copies them into docs/images (the README's tour) when the UI changes on purpose.
SHOTS = Path(os.environ.get("RLR_SCREENSHOTS", Path(__file__).parent / "artifacts" / "screenshots"))
SLOW = 120_000  # ms: generation and training on two shared CPU cores


@pytest.fixture(scope="module")
def running(running_app):
    return running_app


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


def dismiss_messages(page) -> None:
    """Close the toasts still showing (only so they do not cover the screenshot). A toast can
    time out and leave the page between finding it and clicking it: that one needs no click."""
    from playwright.sync_api import Error as PlaywrightError

    for button in page.locator(".toast-close").all():
        try:
            if button.is_visible():
                button.click(timeout=2_000)
        except PlaywrightError:
            pass


def shot(page, name: str, keep_messages: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    if not keep_messages:
        dismiss_messages(page)
    page.wait_for_timeout(400)  # let transitions settle
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def wait_until(fn, timeout: float = 60, what: str = "condition") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if fn():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def count(store, table: str) -> int:
    return store.counts()[table]


def test_model_versions_show_the_base_version_on_first_load(running, page, recwarn):
    """A fresh app: the Model versions tab lists v0 and its picker holds it, without Refresh; and
    looking stores nothing (an export can still be imported into the empty data folder)."""
    from playwright.sync_api import expect

    store = running.services.store
    assert store.model_versions() == [] and not any(store.counts().values())
    open_tab(page, "Model versions")
    expect_text(page, "#versions-table", "v0 (base)")
    expect(page.locator("#version-pick input")).to_have_value("v0 (base)")
    assert store.model_versions() == []
    assert not [w for w in recwarn if "Dropdown" in str(w.message)], [str(w.message) for w in recwarn]
    open_tab(page, "Generate & rate")


def test_full_loop_in_the_browser(running, page):
    store = running.services.store
    # --- a session gets a guest rater id; a person types a name ------------------------------
    name_box = page.locator("#rater textarea, #rater input").first
    wait_until(lambda: name_box.input_value().startswith("guest-"), what="a guest rater id")
    name_box.fill("alice")
    name_box.press("Tab")

    # --- generate ---------------------------------------------------------------------------
    set_number(page, "steps", 6)
    page.locator("#prompt textarea").fill("a large red circle on the left, black background")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=SLOW)
    assert page.locator("#gallery img").count() == 4
    assert "v0" in page.locator("#gallery").inner_text()  # the model version on each sample
    shot(page, "01-generate")

    # --- rate with the keyboard: 1-5 rates and moves on, arrows move -------------------------
    page.locator("#current-info").click()  # focus the page, not a text field
    for i, key in enumerate(["4", "5"]):
        page.keyboard.press(key)  # rates the shown sample, then shows the next one
        expect_text(page, "#current-info", f"{i + 2} / 4")
        assert count(store, "ratings") == i + 1
    page.dblclick("#star-2")  # a double click: one rating, and it moves on once
    expect_text(page, "#current-info", "4 / 4")
    page.wait_for_timeout(500)
    assert count(store, "ratings") == 3
    page.keyboard.press("ArrowLeft")
    expect_text(page, "#current-info", "3 / 4")
    expect_text(page, "#current-info", "★★☆☆☆")  # what you gave this one
    page.keyboard.press("ArrowRight")
    expect_text(page, "#current-info", "4 / 4")
    page.click("#star-3")
    wait_until(lambda: count(store, "ratings") == 4, what="the 4th rating")
    stars = sorted(r["stars"] for r in store.db["ratings"].rows)
    assert stars == [2, 3, 4, 5] and {r["rater_id"] for r in store.db["ratings"].rows} == {"alice"}
    expect_text(page, "#gallery", "4★")
    shot(page, "02-rated")

    # --- bad input: clear messages, the gallery and the store stay as they were --------------
    for bad, message in [("a red dragon on the left", "unknown word: dragon"), ("   ", "the prompt is empty"),
                         ("a " * 5000, "the limit is 500")]:
        page.locator("#prompt textarea").fill(bad)
        page.click("#generate")
        page.get_by_text(re.compile(message)).first.wait_for()
        dismiss_messages(page)
    page.locator("#prompt textarea").fill("a red dragon on the left")
    expect_text(page, "#prompt-note", "dragon")  # unknown words are shown while typing
    page.click("#generate")
    page.get_by_text(re.compile("unknown word: dragon")).first.wait_for()
    assert page.locator("#gallery img").count() == 4 and count(store, "samples") == 4
    shot(page, "03-unknown-word", keep_messages=True)
    dismiss_messages(page)
    page.locator("#prompt textarea").fill("a large red circle on the left, black background")

    # --- compare -----------------------------------------------------------------------------
    open_tab(page, "Compare")
    page.click("#cmp-next")
    page.wait_for_selector("#cmp-left-img img")
    page.wait_for_selector("#cmp-right-img img")
    expect_text(page, "#cmp-prompt", "Which image fits")
    page.wait_for_timeout(300)  # a measurable response time
    page.keyboard.press("ArrowLeft")
    wait_until(lambda: count(store, "comparisons") == 1, what="a comparison")
    expect_text(page, "#cmp-count", "1 comparisons by you")
    row = next(iter(store.db["comparisons"].rows))
    assert row["outcome"] == "left" and row["rater_id"] == "alice" and row["response_time_s"] > 0.2
    page.click("#cmp-both-good")
    wait_until(lambda: count(store, "comparisons") == 2, what="a second comparison")
    page.wait_for_selector("#cmp-left-img img")
    shot(page, "04-compare")

    # --- prompt lab --------------------------------------------------------------------------
    open_tab(page, "Prompt lab")
    page.click("#lab-split")
    wait_until(lambda: page.locator("#lab-coarse textarea").input_value().startswith("a large shape"),
               what="the split")
    assert page.locator("#lab-mid textarea").input_value() == "a large circle on the left, black background"
    page.locator("#lab-mid textarea").fill("a large circle on the left, black background")
    set_number(page, "lab-steps", 6)
    page.click("#lab-preview")
    wait_until(lambda: page.locator("#lab-gallery img").count() == 6, timeout=SLOW / 1000, what="the preview")
    expect_text(page, "#lab-gallery", "stages · final")
    page.click("#lab-save")
    expect_text(page, "#lab-status", "Saved stage prompts")
    assert count(store, "prompt_edits") == 3
    page.locator("#lab-focus").get_by_text("mid: shape").click()
    expect_text(page, "#lab-window", "mid stage")
    assert running.services.state.get().focus_stage == "mid"
    shot(page, "05-prompt-lab")

    # --- a short training round, watched live ------------------------------------------------
    open_tab(page, "Train")
    expect_text(page, "#train-panel", "The default here is RLR")
    expect_text(page, "#train-panel", "fidelity guard")
    # RLR (the built-in model's default), whose half-order block the prompt lab's focus stage places
    page.locator("#train-estimator input").click()
    page.get_by_role("option", name="RLR", exact=True).click()
    set_number(page, "train-steps", 2)
    set_number(page, "train-batch", 2)
    set_number(page, "train-sampling-steps", 6)
    page.get_by_text("More settings").click()
    set_number(page, "train-sample-steps", 6)
    set_number(page, "train-fidelity-probe-prompts", 8)  # a quicker guard than the default 32 on 2 cores
    page.click("#train-start")
    expect_text(page, "#train-progress", re.compile("queued|running|finished"), timeout=30_000)
    expect_text(page, "#train-progress", "finished", timeout=SLOW)
    expect_text(page, "#train-summary", "Made v1")
    expect_text(page, "#train-prompts-used", "a large red circle on the left, black background")
    page.wait_for_selector("#train-reward-plot canvas, #train-reward-plot svg")
    rounds = store.training_rounds()
    assert [r["state"] for r in rounds] == ["finished"] and rounds[0]["config"]["window"]  # mid-stage window
    shot(page, "06-train")

    # --- the new version: listed, its samples in the queue, before/after pairs to compare ----
    open_tab(page, "Model versions")
    expect_text(page, "#versions-table", "v1 (rlr)")
    shot(page, "07-versions")
    open_tab(page, "Generate & rate")
    page.click("#load-queue")
    expect_text(page, "#gallery", "v1")
    shot(page, "08-new-version-in-queue")
    open_tab(page, "Compare")
    shown = image_src(page, "#cmp-left-img")
    page.click("#cmp-next")
    wait_until(lambda: image_src(page, "#cmp-left-img") != shown, what="a new pair")
    after_round = [r["model_version_id"] for r in store.db.query(
        "SELECT model_version_id FROM samples WHERE json_extract(sampler_settings, '$.origin') = 'round'")]
    assert sorted(set(after_round)) == [1, 2]  # the same prompts and noise through parent and child
    before = count(store, "comparisons")
    page.keyboard.press("ArrowRight")
    wait_until(lambda: count(store, "comparisons") == before + 1, what="a before/after judgement")
    last = list(store.db.query("SELECT left_id, right_id FROM comparisons ORDER BY id DESC LIMIT 1"))[0]
    versions = {store.get_sample(i)["model_version_id"] for i in (last["left_id"], last["right_id"])}
    assert versions == {1, 2}, "the first pair after a round compares the new version with its parent"

    open_tab(page, "Data")
    page.click("#data-refresh")
    expect_text(page, "#data-raters", "alice")
    shot(page, "09-data")


def image_src(page, selector: str) -> str | None:
    img = page.locator(f"{selector} img")
    return img.first.get_attribute("src") if img.count() else None


def expect_text(page, selector: str, text, timeout: float = 30_000) -> None:
    from playwright.sync_api import expect

    expect(page.locator(selector).first).to_contain_text(text, timeout=timeout)
