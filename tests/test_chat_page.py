"""The chat page at GET /chat, driven in headless Chromium against a real `python api.py`.

The server runs a small random model that never ends an answer on its own (so an answer without max_tokens
runs for seconds and can be stopped mid-way), one sequence at a time (so a stopped answer still running would
hold up the next), behind an API key (so the page must send the one typed into it)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from conftest import RunningServer, require_system_tool, start_server, stop_server
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from tiny_checkpoint import never_ends, write_checkpoint

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
API_KEY = "chat-page-test-key"
CONTEXT = 2304  # an answer left to run fills what the prompt leaves of it, capped at max_new_tokens 2048: ~9 s


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("chat") / "XVERSE-chat"
    write_checkpoint(folder, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                     max_position_embeddings=CONTEXT)
    never_ends(folder)
    running = start_server(folder, folder.parent / "server.log", "--max-num-seqs", "1", "--api-key", API_KEY)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    require_system_tool(CHROMIUM.exists() and CHROMEDRIVER.exists(), "Chromium", "chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # No network here: without these Chromium waits on connections to its own services.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # An explicit driver path: selenium-manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(30)
    driver.get("about:blank")  # leave the new-tab page, whose own chrome:// loads would fill the network log
    yield driver
    driver.quit()


class ChatPage:
    """The page in the browser, and what a test reads from it."""

    def __init__(self, driver: webdriver.Chrome, server: RunningServer) -> None:
        self.driver, self.server = driver, server

    def open(self) -> None:
        self.driver.get(self.server.url + "/chat")
        self.driver.execute_script("localStorage.clear()")
        self.driver.refresh()
        self.wait_for(lambda: self.driver.execute_script("return document.readyState") == "complete")
        self.requests()  # forget the network log so far
        self.driver.get_log("browser")

    def element(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def fill(self, element_id: str, value: str) -> None:
        field = self.element(element_id)
        field.clear()
        field.send_keys(value)

    def ask(self, question: str) -> None:
        self.element("input").send_keys(question, Keys.ENTER)

    def busy(self) -> bool:
        return self.driver.execute_script("return document.body.classList.contains('busy')")

    def messages(self) -> list[tuple[str, str]]:
        """(role, text) of every message on the page, in order."""
        return [tuple(pair) for pair in self.driver.execute_script("""
            return [...document.querySelectorAll('#messages .message')].map(m =>
                [m.classList.contains('user') ? 'user' : 'assistant', m.querySelector('.body').textContent]);""")]

    def last_answer_length(self) -> int:
        return self.driver.execute_script(
            "const a = document.querySelectorAll('#messages .assistant .body'); "
            "return a.length ? a[a.length - 1].textContent.length : 0")

    def answer_finished(self, timeout: float = 30) -> None:
        """Waits until the page has sent a question and its answer has ended."""
        self.wait_for(lambda: self.messages() and not self.busy(), timeout)

    def note(self) -> str:
        notes = self.driver.find_elements(By.CSS_SELECTOR, "#messages .assistant .note")
        return notes[-1].text if notes else ""

    def error(self) -> str:
        error = self.element("error")
        return error.text if error.is_displayed() else ""

    def requests(self) -> list[dict]:
        """The requests the page sent since the last call: Network.requestWillBeSent's `request` objects."""
        sent = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                sent.append(message["params"]["request"])
        return sent

    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests() if r["url"].endswith("/v1/chat/completions") and r["method"] == "POST"]

    @staticmethod
    def wait_for(condition: Callable[[], object], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"still waiting after {timeout} s"
            time.sleep(0.02)


@pytest.fixture
def page(browser: webdriver.Chrome, chat_server: RunningServer) -> ChatPage:
    chat = ChatPage(browser, chat_server)
    chat.open()
    chat.fill("api_key", API_KEY)
    return chat


def test_the_page_is_served_without_a_key_and_allows_only_its_own_origin(chat_server):
    response = requests.get(chat_server.url + "/chat", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    for asset, media_type in [("chat.js", "text/javascript"), ("chat.css", "text/css")]:
        served = requests.get(f"{chat_server.url}/chat/{asset}", timeout=10)
        assert served.status_code == 200 and served.headers["content-type"].startswith(media_type)
    assert requests.get(chat_server.url + "/chat/server.py", timeout=10).status_code == 404
    assert requests.get(chat_server.url + "/v1/models", timeout=10).status_code == 401


def test_the_page_loads_only_from_this_server_without_console_errors(browser, chat_server):
    chat = ChatPage(browser, chat_server)
    browser.get_log("performance")
    browser.get_log("browser")
    browser.get(chat_server.url + "/chat")
    chat.wait_for(lambda: browser.execute_script("return document.readyState") == "complete")
    urls = [r["url"] for r in chat.requests()]
    assert {urlsplit(url).path for url in urls} >= {"/chat", "/chat/chat.js", "/chat/chat.css"}
    foreign = [url for url in urls if not url.startswith(chat_server.url + "/") and not url.startswith("data:")]
    assert not foreign, f"the page asked another origin for {foreign}"
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
    assert browser.title == "XVERSE-7B-Chat"
    assert chat.element("send").is_enabled() and not chat.element("stop").is_enabled()


def test_an_answer_streams_in_and_ends(page):
    page.fill("max_tokens", "150")
    # Every length the answer's text takes on the page, as it changes.
    page.driver.execute_script("""
        window.answerLengths = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('#messages .assistant .body');
            if (answers.length) window.answerLengths.push(answers[answers.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    page.ask("你好，请介绍一下你自己")
    assert page.element("input").get_attribute("value") == ""
    page.answer_finished()
    lengths = page.driver.execute_script("return window.answerLengths")
    growth = sorted(set(lengths))
    assert len(growth) >= 5, f"the answer did not arrive in pieces: lengths seen {lengths}"
    assert lengths == sorted(lengths), "the answer only grows while it streams"
    [(role, question), (answer_role, answer)] = page.messages()
    assert (role, question, answer_role) == ("user", "你好，请介绍一下你自己", "assistant")
    assert len(answer) == growth[-1] > 0
    assert page.note().startswith("150 tokens in ")
    assert page.error() == ""
    assert page.element("send").is_enabled() and not page.element("stop").is_enabled()
    [sent] = page.chat_requests()
    assert sent["headers"]["Authorization"] == f"Bearer {API_KEY}"
    body = json.loads(sent["postData"])
    assert body["stream"] is True and body["max_tokens"] == 150
    assert body["messages"] == [{"role": "user", "content": "你好，请介绍一下你自己"}]


def test_a_follow_up_sends_the_whole_conversation_with_the_settings(page):
    page.fill("system", "You answer briefly.")
    for field, value in [("temperature", "0.7"), ("top_p", "0.9"), ("top_k", "20"), ("repetition_penalty", "1.05"),
                         ("max_tokens", "12")]:
        page.fill(field, value)
    page.ask("What is the capital of France?")
    page.answer_finished()
    [(_, first_answer)] = page.messages()[1:]
    page.ask("And its population?")
    page.wait_for(lambda: len(page.messages()) == 4 and not page.busy())
    first, second = [json.loads(r["postData"]) for r in page.chat_requests()]
    assert first["messages"] == [{"role": "system", "content": "You answer briefly."},
                                 {"role": "user", "content": "What is the capital of France?"}]
    # The answer goes back as it streamed in; the page shows it rendered (renderMessage drops the leading and
    # trailing blank lines of prose and the backticks of code), so what was shown is that text, rendered.
    sent_answer = second["messages"][2]["content"]
    assert page.driver.execute_script(
        "const box = document.createElement('div'); box.append(renderMessage(arguments[0])); "
        "return box.textContent", sent_answer) == first_answer
    assert second["messages"] == [*first["messages"], {"role": "assistant", "content": sent_answer},
                                  {"role": "user", "content": "And its population?"}]
    assert {k: second[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens")} == \
        {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 12}
    assert [role for role, _ in page.messages()] == ["user", "assistant", "user", "assistant"]
    # The settings outlive a reload; the API key does not.
    page.driver.refresh()
    assert page.element("system").get_attribute("value") == "You answer briefly."
    assert page.element("max_tokens").get_attribute("value") == "12"
    assert page.element("api_key").get_attribute("value") == ""


def test_stop_ends_a_long_answer_and_frees_the_server(page):
    page.ask("Tell me a very long story")  # no max_tokens: about 2,000 tokens, ~9 s
    page.wait_for(lambda: page.last_answer_length() > 20)
    assert page.busy() and page.element("stop").is_enabled()
    page.element("stop").click()
    page.wait_for(lambda: not page.busy(), timeout=5)
    stopped_at = page.last_answer_length()
    time.sleep(0.5)
    assert page.last_answer_length() == stopped_at, "the answer went on growing after Stop"
    assert page.note() == "stopped" and page.error() == ""
    assert requests.get(page.server.url + "/health", timeout=5).json() == {"status": "ok"}
    # One sequence runs at a time: had the stopped answer gone on, this one would wait seconds behind it.
    started = time.monotonic()
    response = requests.post(page.server.url + "/v1/chat/completions", timeout=30,
                             headers={"Authorization": f"Bearer {API_KEY}"},
                             json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - started < 2
    # The stopped answer stays in the conversation, and the page goes on.
    page.fill("max_tokens", "5")
    page.ask("Go on")
    page.wait_for(lambda: len(page.messages()) == 4 and not page.busy())
    follow_up = json.loads(page.chat_requests()[-1]["postData"])
    assert [m["role"] for m in follow_up["messages"]] == ["user", "assistant", "user"]
    assert len(follow_up["messages"][1]["content"]) >= stopped_at


def test_new_conversation_clears_the_page_and_the_history(page):
    page.fill("max_tokens", "6")
    page.ask("First question")
    page.answer_finished()
    page.element("new_conversation").click()
    assert page.messages() == []
    page.ask("A fresh start")
    page.wait_for(lambda: len(page.messages()) == 2 and not page.busy())
    last = json.loads(page.chat_requests()[-1]["postData"])
    assert last["messages"] == [{"role": "user", "content": "A fresh start"}]


def test_new_conversation_while_an_answer_streams_stops_it(page):
    page.ask("Tell me a very long story")
    page.wait_for(lambda: page.last_answer_length() > 0)
    page.element("new_conversation").click()
    page.wait_for(lambda: not page.busy(), timeout=5)
    time.sleep(0.2)
    assert page.messages() == []


def test_enter_sends_but_not_while_an_input_method_composes(page):
    page.fill("max_tokens", "4")
    field = page.element("input")
    field.send_keys("你好", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "世界")
    assert field.get_attribute("value") == "你好\n世界"
    # An IME's Enter picks a candidate: the browser marks it isComposing (and keyCode 229 in older engines).
    for marks in ["isComposing: true", "keyCode: 229"]:
        page.driver.execute_script(f"""
            const event = new KeyboardEvent('keydown', {{key: 'Enter', bubbles: true, cancelable: true, {marks}}});
            document.getElementById('input').dispatchEvent(event);""")
    time.sleep(0.2)
    assert page.messages() == [] and page.chat_requests() == []
    field.send_keys(Keys.ENTER)
    page.answer_finished()
    assert page.messages()[0] == ("user", "你好\n世界")


def test_server_errors_are_shown_and_the_question_is_kept(page):
    page.fill("api_key", "wrong key")
    page.ask("Hello")
    page.wait_for(page.error)
    assert page.error().startswith("401: a valid API key is needed")
    assert page.messages() == []
    assert page.element("input").get_attribute("value") == "Hello"
    page.fill("api_key", API_KEY)
    page.fill("max_tokens", "100000")
    page.element("send").click()
    page.wait_for(lambda: "max_tokens is 100000" in page.error())
    assert page.error().startswith("400: ")
    page.fill("max_tokens", "3")
    page.element("send").click()
    page.answer_finished()
    assert page.error() == "" and len(page.messages()) == 2


def test_an_error_event_in_the_stream_is_shown_after_the_text_so_far(page):
    """The server reports a failure mid-stream (a timeout, an engine error) as a data event with "error"."""
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {"content": "Partial answer"}, "finish_reason": None}]},
              {"error": {"message": "the request took longer than 0.4 s (--request-timeout)", "code": 504},
               "status": 504}]
    stream = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
    page.driver.execute_script("""
        const stream = arguments[0];
        window.fetch = async () => new Response(stream, {headers: {'Content-Type': 'text/event-stream'}});""", stream)
    page.ask("Hello")
    page.wait_for(page.error)
    assert page.error() == "504: the request took longer than 0.4 s (--request-timeout)"
    assert page.messages() == [("user", "Hello"), ("assistant", "Partial answer")]
    assert page.note() == "cut short by an error"


def test_fenced_code_and_inline_code_render_as_code_and_html_stays_text(page):
    text = ("Here is `add`:\n```python\ndef add(a, b):\n    return a + b  # <b>not bold</b>\n```\n"
            "<img src=x onerror=\"document.title='owned'\"> & done\n```\nunclosed <script>")
    rendered = page.driver.execute_script("""
        const box = document.createElement('div');
        box.append(renderMessage(arguments[0]));
        document.getElementById('messages').append(box);
        return {
            children: [...box.children].map(c => c.tagName + (c.firstElementChild ? '>' + c.firstElementChild.tagName : '')),
            blocks: [...box.querySelectorAll('pre > code')].map(c => [c.className, c.textContent]),
            inline: [...box.querySelectorAll('p > code')].map(c => c.textContent),
            prose: [...box.querySelectorAll('p')].map(p => p.textContent),
            images: box.querySelectorAll('img, script, b').length,
        };""", text)
    assert rendered["children"] == ["P>CODE", "PRE>CODE", "P", "PRE>CODE"]
    assert rendered["blocks"] == [["language-python", "def add(a, b):\n    return a + b  # <b>not bold</b>"],
                                  ["", "unclosed <script>"]]
    assert rendered["inline"] == ["add"]
    assert rendered["prose"][1] == "<img src=x onerror=\"document.title='owned'\"> & done"
    assert rendered["images"] == 0
    assert page.driver.title == "XVERSE-7B-Chat"
