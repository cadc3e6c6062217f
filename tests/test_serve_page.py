"""The page of `streamprune serve` (GET /) in a real headless Chromium: start a stream, watch its
overlay update, ask a question and see the answer, see the plots drawn, see API errors.

Set STREAMPRUNE_SCREENSHOT=1 to also write docs/serve_page.png (1280x860) after an answer."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve_page.png"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1280,860")


@pytest.fixture(scope="module")
def server():
    from streamprune.config.serve import ServeConfig
    from streamprune.serve.app import create_server

    server = create_server(ServeConfig(port=0, api_key="k")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = Options()
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # a 1280x860 viewport for the screenshot
                           {"width": 1280, "height": 860, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()


def wait(driver, timeout: float = 20.0) -> WebDriverWait:
    return WebDriverWait(driver, timeout, poll_frequency=0.1)


def stream_time(driver) -> float | None:
    found = re.search(r"\d+(\.\d+)?", driver.find_element(By.ID, "stream-time").text)
    return float(found.group()) if found else None


def overlay_loaded(driver) -> bool:
    return driver.execute_script("const i = document.getElementById('overlay');"
                                 "return !!i.getAttribute('src') && i.complete && i.naturalWidth > 0;")


def points(driver, canvas: str) -> int:
    return int(driver.execute_script(f"return document.getElementById('{canvas}').dataset.points || 0;"))


@pytest.fixture(scope="module")
def page(server, browser):
    """The page with the key, a stream started from it with the default synthetic source."""
    browser.get(f"{server.url}/?api_key=k")
    assert browser.find_element(By.ID, "source").get_attribute("value") == "synthetic:scene_every=20"
    browser.find_element(By.ID, "start").click()
    wait(browser).until(lambda d: d.find_element(By.ID, "streams").get_attribute("value").startswith("stream-"))
    return browser


def test_page_loads_and_starts_a_stream(page):
    wait(page).until(lambda d: overlay_loaded(d) and stream_time(d) is not None)
    assert page.find_element(By.ID, "error").text == ""
    src, t = page.find_element(By.ID, "overlay").get_attribute("src"), stream_time(page)
    assert "overlay.png" in src and "api_key=k" in src
    wait(page).until(lambda d: d.find_element(By.ID, "overlay").get_attribute("src") != src and overlay_loaded(d)
                     and stream_time(d) > t)
    stats = page.find_element(By.ID, "stats").text
    assert "frames" in stats and "/ 2048" in stats and "cacher hit" in stats and "dropped" in stats


def test_question_typed_into_the_page_gets_an_answer(page):
    page.find_element(By.ID, "question").send_keys("what colour is the object that appeared last ?")
    page.find_element(By.ID, "ask").click()

    def answered(driver):
        for item in driver.find_elements(By.CSS_SELECTOR, "#answers .answer"):
            text = item.find_element(By.CSS_SELECTOR, ".a").text.strip()
            if text and "t=" in item.text and "what colour is the object that appeared last ?" in item.text:
                return item
        return None

    item = wait(page, 60).until(answered)
    assert re.search(r"t=\d+\.\d\ds", item.text) and "memory" in item.text
    assert page.find_element(By.ID, "error").text == ""
    if os.environ.get("STREAMPRUNE_SCREENSHOT"):
        wait(page).until(lambda d: points(d, "plot-tokens") >= 8 and overlay_loaded(d))
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.save_screenshot(str(SCREENSHOT))


def test_plots_draw(page):
    canvases = ("plot-tokens", "plot-hit", "plot-latency")
    wait(page).until(lambda d: all(points(d, c) >= 3 for c in canvases))
    for canvas in canvases:
        varied = page.execute_script(
            "const c = document.getElementById(arguments[0]);"
            "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "for (let i = 4; i < px.length; i += 4)"
            "  if (px[i] !== px[0] || px[i + 1] !== px[1] || px[i + 2] !== px[2]) return c.width > 0;"
            "return false;", canvas)
        assert varied, f"{canvas} is blank"


def test_api_error_shows_in_the_page(page):
    source = page.find_element(By.ID, "source")
    source.clear()
    source.send_keys("file:/no/such/video.mp4")
    page.find_element(By.ID, "start").click()
    wait(page).until(lambda d: "allowed-local-media-path" in d.find_element(By.ID, "error").text)


def test_page_without_key_shows_the_error(server, browser):
    browser.get(f"{server.url}/")  # the page itself needs the key: the body is the 401 JSON error
    body = json.loads(browser.find_element(By.TAG_NAME, "body").text)
    assert body["error"]["code"] == "invalid_api_key" and "API key" in body["error"]["message"]
