"""The web chat page end to end in headless Chromium: a streamed reply appears and the context
inspector (token budget bar, memory panel) updates."""

from __future__ import annotations

import shutil
import tempfile

import pytest

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        from tests.store_fixtures import in_ci

        msg = "needs Debian chromium + chromium-driver (apt-get install -y chromium chromium-driver)"
        pytest.fail(msg) if in_ci() else pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="memento-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_streamed_reply_and_inspector(browser, live_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(live_server.url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")

    personas = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "persona-select")).options]
    assert {"assistant", "pirate"} <= set(personas)
    Select(browser.find_element(By.ID, "persona-select")).select_by_value("pirate")
    Select(browser.find_element(By.ID, "memory-select")).select_by_value("window")
    browser.find_element(By.ID, "memory-params").send_keys('{"turns": 2}')
    browser.find_element(By.ID, "new-session").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "session-title"), "pirate"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#session-list li")) == 1)

    box = browser.find_element(By.ID, "input")
    box.send_keys("Ahoy, who are you?")
    browser.find_element(By.ID, "send").click()

    # the reply streams into an assistant bubble, then the bubble is marked done
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant.done").get_attribute("data-raw")  # unrendered
    assert reply.strip()
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Ahoy, who are you?"

    # the inspector shows this turn's budget: persona + recent, and the bar has width
    wait.until(lambda d: d.find_element(By.ID, "inspector").get_attribute("data-updated"))
    assert int(browser.find_element(By.ID, "tok-persona").text) > 0
    assert int(browser.find_element(By.ID, "tok-recent").text) > 0
    assert browser.find_element(By.ID, "bar-persona").size["width"] > 0
    assert "strategy: window" in browser.find_element(By.ID, "memory-strategy").text
    assert "cache" in browser.find_element(By.ID, "usage").text

    # the stored transcript matches what the page showed
    import httpx

    sid = browser.find_element(By.CSS_SELECTOR, "#session-list li").get_attribute("data-id")
    stored = httpx.get(f"{live_server.url}/v1/sessions/{sid}/messages").json()["data"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"].strip() == reply.strip()

    # a second turn updates the inspector again (recent grows: the first exchange is in context)
    before = int(browser.find_element(By.ID, "tok-recent").text)
    stamp = browser.find_element(By.ID, "inspector").get_attribute("data-updated")
    box.send_keys("Tell me more")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 2)
    wait.until(lambda d: d.find_element(By.ID, "inspector").get_attribute("data-updated") != stamp)
    assert int(browser.find_element(By.ID, "tok-recent").text) > before
