"""The chat page's operations end to end in headless Chromium: swipe arrows, regenerate, continue,
edit, delete, fork, session titles, and sanitised Markdown. `MEMENTO_SCREENSHOTS=DIR` saves a
screenshot of the page there (docs/chat-ops.png was made that way)."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.service.test_web import browser  # noqa: F401  (the headless Chromium fixture)

pytestmark = pytest.mark.browser


def wait_for_reload(wait, d, stamp):
    wait.until(lambda d: d.find_element("id", "messages").get_attribute("data-updated") not in (None, stamp))
    return d.find_element("id", "messages").get_attribute("data-updated")


def test_chat_operations_in_the_page(browser, live_server):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = live_server.url
    body = {"messages": [
        {"role": "user", "content": "Show me some markdown"},
        {"role": "assistant", "content": "**bold** and `code` <img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "A plain reply."},
    ]}
    assert httpx.post(f"{url}/v1/sessions/page-1/import", json=body).status_code == 201
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    browser.find_element(By.CSS_SELECTOR, '#session-list li[data-id="page-1"]').click()
    stamp = wait_for_reload(wait, browser, None)

    # Markdown is rendered, HTML in the text is shown as text and never runs
    first = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[0]
    assert first.find_element(By.TAG_NAME, "strong").text == "bold"
    assert first.find_element(By.TAG_NAME, "code").text == "code"
    assert not first.find_elements(By.TAG_NAME, "img") and not first.find_elements(By.TAG_NAME, "script")
    assert "<img" in first.text and browser.execute_script("return window.pwned") is None

    def last_actions():
        return browser.find_elements(By.CSS_SELECTOR, ".actions.assistant")[-1]

    # regenerate: the old reply becomes swipe 1/2, the new one 2/2; the arrows walk between them
    last_actions().find_element(By.CSS_SELECTOR, ".regenerate").click()
    stamp = wait_for_reload(wait, browser, stamp)
    wait.until(lambda d: last_actions().find_elements(By.CSS_SELECTOR, ".swipe-count"))
    assert last_actions().find_element(By.CSS_SELECTOR, ".swipe-count").text == "2/2"
    last_actions().find_element(By.CSS_SELECTOR, ".swipe-prev").click()
    stamp = wait_for_reload(wait, browser, stamp)
    wait.until(lambda d: last_actions().find_element(By.CSS_SELECTOR, ".swipe-count").text == "1/2")
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text == "A plain reply."

    # continue extends the shown reply
    last_actions().find_element(By.CSS_SELECTOR, ".continue").click()
    stamp = wait_for_reload(wait, browser, stamp)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-raw"))
               > len("A plain reply."))
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-raw").startswith(
        "A plain reply.")

    # edit the second user message in place
    browser.find_elements(By.CSS_SELECTOR, ".actions.user")[1].find_element(By.CSS_SELECTOR, ".edit").click()
    box = browser.find_element(By.CSS_SELECTOR, ".edit-box")
    box.clear()
    box.send_keys("And now, edited?")
    browser.find_element(By.CSS_SELECTOR, ".save-edit").click()
    stamp = wait_for_reload(wait, browser, stamp)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.user")[1].text == "And now, edited?")
    stored = httpx.get(f"{url}/v1/sessions/page-1/messages").json()["data"]
    assert stored[2]["content"] == "And now, edited?" and stored[2]["metadata"]["history"][0]["content"] == "And now?"

    # session title
    browser.find_element(By.ID, "title-input").send_keys("Markdown test")
    browser.find_element(By.ID, "rename").click()
    wait.until(lambda d: "Markdown test" in d.find_element(By.ID, "session-title").text)
    wait.until(lambda d: any(li.text == "Markdown test" for li in d.find_elements(By.CSS_SELECTOR, "#session-list li")))
    shots = os.environ.get("MEMENTO_SCREENSHOTS")
    if shots:
        browser.save_screenshot(os.path.join(shots, "chat-ops.png"))

    # fork at the first reply opens the new session with two messages
    browser.find_elements(By.CSS_SELECTOR, ".actions.assistant")[0].find_element(By.CSS_SELECTOR, ".fork").click()
    wait.until(lambda d: "page-1" not in d.find_element(By.ID, "session-title").text)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 2)
    fork_id = browser.find_element(By.ID, "session-title").text.split("session ")[1].split(" ")[0]
    assert len(httpx.get(f"{url}/v1/sessions/{fork_id}/messages").json()["data"]) == 2

    # delete the fork's reply
    stamp = browser.find_element(By.ID, "messages").get_attribute("data-updated")
    browser.find_elements(By.CSS_SELECTOR, ".actions.assistant")[-1].find_element(By.CSS_SELECTOR, ".delete").click()
    wait_for_reload(wait, browser, stamp)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 1)
    assert [m["role"] for m in httpx.get(f"{url}/v1/sessions/{fork_id}/messages").json()["data"]] == ["user"]


def test_new_session_opens_with_the_greeting_and_its_alternates(browser, live_server):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = live_server.url
    persona = ("---\nname: greeter\ndisplay_name: Mina\ndescription: Mina runs an inn.\ngreeting: Welcome!\n"
               "alternate_greetings:\n  - Back again?\n---\n")
    assert httpx.put(f"{url}/v1/personas/greeter", content=persona.encode()).status_code == 200
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    Select(browser.find_element(By.ID, "persona-select")).select_by_value("greeter")
    browser.find_element(By.ID, "new-session").click()
    wait.until(lambda d: "greeter" in d.find_element(By.ID, "session-title").text)

    def shown(d, selector):
        try:  # the transcript is re-rendered after each change: look the element up afresh
            return d.find_element(By.CSS_SELECTOR, selector).text
        except Exception:
            return None

    wait.until(lambda d: shown(d, ".msg.assistant") == "Welcome!" and shown(d, ".swipe-count") == "1/2")
    browser.execute_script("document.querySelector('.actions.assistant .swipe-next').click()")
    wait.until(lambda d: shown(d, ".msg.assistant") == "Back again?" and shown(d, ".swipe-count") == "2/2")
