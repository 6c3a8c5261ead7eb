"""The page works under its own Content-Security-Policy: in headless Chromium, loading it, opening a
session, streaming a reply and using the persona editor raise no CSP violation."""

from __future__ import annotations

import pytest

from tests.service.test_web import browser  # noqa: F401  (the headless Chromium fixture)

pytestmark = pytest.mark.browser

WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
  e => window.__csp.push(e.violatedDirective + ' ' + (e.blockedURI || 'inline') + ' ' + (e.sourceFile || '')));
"""


def test_page_runs_without_csp_violations(browser, live_server):  # noqa: F811
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = httpx.get(live_server.url + "/", timeout=10)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["referrer-policy"] == "no-referrer"

    # the listener is installed before any of the page's own scripts run
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH})
    wait = WebDriverWait(browser, 60)
    browser.get(live_server.url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    browser.find_element(By.ID, "new-session").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#session-list li")) == 1)
    browser.find_element(By.ID, "input").send_keys("Say **hi** and `code`")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
    wait.until(lambda d: d.find_element(By.ID, "inspector").get_attribute("data-updated"))
    # the persona editor: Enter in a form field must not submit (reload) the page
    browser.find_element(By.ID, "open-editor").click()
    wait.until(lambda d: d.find_element(By.ID, "editor").is_displayed())
    browser.execute_script("window.__still_here = 1")
    browser.find_element(By.ID, "ed-name").send_keys("x\n")
    assert browser.execute_script("return window.__still_here") == 1
    assert browser.execute_script("return window.__csp") == []
