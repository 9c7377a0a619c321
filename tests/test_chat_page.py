"""The chat page at ``/`` in a real headless Chromium: a question typed in streams its answer through the API,
and the split appears beside it. The screenshot is kept in ``test-artifacts/``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from seam.edge_server.process import edge_server
from seam.serving.process import http_endpoint, wait_ready

SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts"
KEY = "page-key"


def chromium():
    """Debian's Chromium under Selenium with Debian's matching driver (no browser download is possible)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.browser
def test_a_question_typed_in_the_page_streams_its_answer_and_the_split(served_model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = served_model
    browser = chromium()
    try:
        with edge_server(model) as (_, address), http_endpoint(model, address, "--api-key", KEY) as (_, url):
            wait_ready(url)
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "key-box").is_displayed())  # the endpoint has a key
            browser.find_element(By.ID, "key").send_keys(KEY)
            browser.find_element(By.ID, "save-key").click()
            wait.until(lambda b: b.find_element(By.ID, "model").text == model.name)
            browser.find_element(By.ID, "question").send_keys("What is the capital of France?")
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: b.find_element(By.ID, "send").is_enabled()
                       and b.find_elements(By.CSS_SELECTOR, ".turn.assistant")
                       and b.find_element(By.CSS_SELECTOR, ".turn.assistant").text)
            answer = browser.find_element(By.CSS_SELECTOR, ".turn.assistant").text
            split = browser.find_element(By.ID, "split").text
            rate = browser.find_element(By.ID, "rate").text
            SCREENSHOTS.mkdir(exist_ok=True)
            browser.save_screenshot(str(SCREENSHOTS / "chat-page.png"))
    finally:
        browser.quit()
    assert not answer.startswith("error:"), answer
    assert split.startswith("split: ") and "layers on this device" in split
    assert "tokens" in rate
    if model.name.startswith("smollm2"):
        assert "Paris" in answer
