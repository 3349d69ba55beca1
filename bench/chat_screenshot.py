"""Screenshot of the chat page (GET /chat) in headless Chromium, for the README: images/chat_page.png.

Start a server first, then point this at it:

    python api.py                                   # or --model-path DIR --device cpu for a test checkpoint
    python bench/chat_screenshot.py --url http://127.0.0.1:6006

It fills in a system prompt and sampling settings, asks a question holding a code block, lets the answer
stream to its end, asks a follow-up in Chinese and saves the page. Needs Debian's chromium and
chromium-driver (and fonts-noto-cjk, or Chinese shows as boxes), and the `selenium` package
(requirements-test.txt)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

QUESTIONS = ["What does this function do?\n```python\ndef add(a, b):\n    return a + b\n```",
             "请用一句话回答：`add(1, 2)` 返回什么？"]


def open_browser(profile: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    return driver


def ask(driver: webdriver.Chrome, question: str, timeout: float) -> None:
    driver.execute_script("document.getElementById('input').value = arguments[0]", question)
    driver.find_element(By.ID, "send").click()
    time.sleep(0.2)
    deadline = time.monotonic() + timeout
    while driver.execute_script("return document.body.classList.contains('busy')"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete answer after {timeout} s")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:6006", help="the running server")
    parser.add_argument("--api-key", default="", help="the server's --api-key, if it has one")
    parser.add_argument("--max-tokens", default="80", help="max_tokens typed into the settings panel")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "images" / "chat_page.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as profile:
        driver = open_browser(profile)
        try:
            driver.get(args.url.rstrip("/") + "/chat")
            for field, value in [("system", "You are XChat, a helpful assistant. Answer briefly."),
                                 ("temperature", "0.5"), ("max_tokens", args.max_tokens), ("api_key", args.api_key)]:
                driver.find_element(By.ID, field).send_keys(value)
            for question in QUESTIONS:
                ask(driver, question, timeout=300)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
