"""A public app in a real browser: nobody types a rater name, a guest rates under an unguessable
id the browser keeps across reloads, images come from hash-named copies, the page shows no
server path, and statistics show pseudonyms. (Chromium + Playwright, as tests/test_browser.py.)"""

from __future__ import annotations

import re
import urllib.request

import pytest

from tests.test_browser import CHROMIUM, FLAGS, SLOW, set_number, wait_until

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def running(tmp_path_factory, builtin_backend):
    from app.config import AppConfig
    from app.server import start

    app = start(AppConfig(data_dir=tmp_path_factory.mktemp("public-browser"), port=0, public=True,
                          admin_password="pw"), builtin_backend)
    yield app
    app.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's Chromium: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield b
        b.close()


def test_a_guest_rates_under_an_id_the_browser_keeps(running, browser):
    store = running.services.store
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(running.url)
    page.wait_for_selector("#rater:has-text('Rating as a guest')")
    assert page.locator("#rater input, #rater textarea").count() == 0  # nothing to type a name into

    set_number(page, "steps", 4)
    page.locator("#prompt textarea").fill("a red circle")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=SLOW)
    src = page.locator("#current img").first.get_attribute("src")
    assert re.search(r"/[0-9a-f]{64}\.png$", src) and str(running.services.data_dir.resolve()) not in src
    page.click("#star-4")
    wait_until(lambda: store.counts()["ratings"] == 1, what="the rating")
    (guest,) = {r["rater_id"] for r in store.db["ratings"].rows}
    assert re.fullmatch(r"guest-[0-9a-f]{32}", guest)

    page.reload()  # the same browser is the same guest
    page.wait_for_selector("#rater:has-text('Rating as a guest')")
    page.wait_for_timeout(1000)  # the page load sets the rater
    page.click("#load-queue")
    page.wait_for_selector("#gallery img", timeout=SLOW)
    page.click("#star-2")
    wait_until(lambda: store.counts()["ratings"] == 2, what="the second rating")
    assert {r["rater_id"] for r in store.db["ratings"].rows} == {guest}

    other = browser.new_context().new_page()  # another browser: another guest
    other.goto(running.url)
    other.wait_for_selector("#rater:has-text('Rating as a guest')")
    other.wait_for_timeout(1000)
    other.click("#load-queue")
    other.wait_for_selector("#gallery img", timeout=SLOW)
    other.click("#star-5")
    wait_until(lambda: store.counts()["ratings"] == 3, what="the other guest's rating")
    raters = {r["rater_id"] for r in store.db["ratings"].rows}
    assert len(raters) == 2 and guest in raters

    page.get_by_role("tab", name="Data").click()
    page.wait_for_selector("#data-raters:has-text('rater-')")
    assert guest not in page.locator("#data-raters").inner_text()

    with urllib.request.urlopen(f"{running.url}config", timeout=10) as r:
        config = r.read().decode()
    assert str(running.services.data_dir.resolve()) not in config
    context.close()
