"""The persona editor end to end in headless Chromium: validation as you type (line and field),
form <-> raw file, the lorebook entry editor, the prompt preview with token costs, register flags,
card import from a file, save and "try it". `MEMENTO_SCREENSHOTS=DIR` saves docs/editor.png."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from tests.service.test_web import browser  # noqa: F401  (the headless Chromium fixture)

pytestmark = pytest.mark.browser

DRAFT = """---
name: jiwoo
display_name: 지우
language: ko
register: banmal
register_mode: guard
user_name: 아빠
greeting: 아빠 왔어요?
---
지우는 아빠와 반말로 이야기하는 딸이다.
"""


def set_raw(driver, text):
    driver.execute_script(
        "const r = document.getElementById('ed-raw'); r.value = arguments[0];"
        "r.dispatchEvent(new Event('input'));", text)


def test_persona_editor(browser, live_server, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = live_server.url
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    browser.find_element(By.ID, "open-editor").click()
    wait.until(lambda d: d.find_element(By.ID, "editor").is_displayed())
    browser.find_element(By.ID, "ed-name").clear()
    browser.find_element(By.ID, "ed-name").send_keys("jiwoo")

    # an error names its line and field
    set_raw(browser, DRAFT.replace("register_mode: guard", "register_mode: loud"))
    wait.until(lambda d: "line 6, field register_mode" in d.find_element(By.ID, "ed-error").text)

    # fixed: the form fills in, the preview shows the exact prompt and its cost, the greeting is flagged
    set_raw(browser, DRAFT)
    wait.until(lambda d: d.find_element(By.ID, "editor").get_attribute("data-valid") == "1")
    wait.until(lambda d: d.find_element(By.ID, "ed-display_name").get_attribute("value") == "지우")
    wait.until(lambda d: "tokens" in d.find_element(By.ID, "ed-costs").text)
    assert "지우는 아빠와 반말로" in browser.find_element(By.CSS_SELECTOR, ".preview-msg.system").text
    flags = browser.find_element(By.ID, "ed-flags").text
    assert "greeting" in flags and "아빠 왔어요?" in flags and "banmal" in flags

    # the form writes the file: change the greeting, add a lorebook entry
    greeting = browser.find_element(By.ID, "ed-greeting")
    greeting.clear()
    greeting.send_keys("아빠 왔어?")
    browser.find_element(By.ID, "ed-add-lore").click()
    row = browser.find_element(By.CSS_SELECTOR, "#ed-lore .lore-entry")
    row.find_element(By.CSS_SELECTOR, ".lore-keys").send_keys("동백")
    row.find_element(By.CSS_SELECTOR, ".lore-content").send_keys("동백꽃은 마을의 상징이다.")
    wait.until(lambda d: "동백꽃은 마을의 상징이다." in d.find_element(By.ID, "ed-raw").get_attribute("value"))
    wait.until(lambda d: "greeting" not in d.find_element(By.ID, "ed-flags").text)
    raw = browser.find_element(By.ID, "ed-raw").get_attribute("value")
    assert "greeting: 아빠 왔어?" in raw and "lorebook:" in raw
    shots = os.environ.get("MEMENTO_SCREENSHOTS")
    if shots:
        browser.save_screenshot(os.path.join(shots, "editor.png"))

    # try it: saved, and a scratch session with that persona is open
    browser.find_element(By.ID, "ed-try").click()
    wait.until(lambda d: "persona jiwoo" in d.find_element(By.ID, "session-title").text)
    saved = httpx.get(f"{url}/v1/personas/jiwoo").json()
    assert saved["greeting"] == "아빠 왔어?" and saved["lorebook"]["entries"][0]["keys"] == ["동백"]

    # the inspector names the lorebook entry a message activates, with its token cost
    browser.find_element(By.ID, "input").send_keys("동백꽃 봤어?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: "lore: 동백 (before_char," in d.find_element(By.ID, "memory-lore").text)
    assert int(browser.find_element(By.ID, "tok-lore").text) > 0
    assert browser.find_element(By.ID, "bar-lore").size["width"] > 0

    # card import from a file (the drop zone's file input)
    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "Mina", "description": "Mina runs an inn.", "first_mes": "Welcome!"}}
    path = tmp_path / "mina.json"
    path.write_text(json.dumps(card), encoding="utf-8")
    browser.find_element(By.ID, "open-editor").click()
    browser.find_element(By.ID, "ed-file").send_keys(str(path))
    wait.until(lambda d: d.find_element(By.ID, "ed-display_name").get_attribute("value") == "Mina")
    assert browser.find_element(By.ID, "ed-name").get_attribute("value") == "mina"
