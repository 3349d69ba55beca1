"""The seed recipe's interface, over real HTTP: `POST /` with {"prompt": ...} -> {"response", "status", "time"}.

Every call here is one the seed's README shows (its curl command, its `requests` client) or one of the
optional fields the server adds beside `prompt` (history, sampling overrides)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import requests

CURL = "/usr/bin/curl"
TIME_FORMAT = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
GREEDY = {"temperature": 0, "max_new_tokens": 24}


def get_completion(url: str, prompt: str) -> str:
    """The seed README's client, as written there (url made a parameter)."""
    headers = {"Content-Type": "application/json"}
    data = {"prompt": prompt}
    response = requests.post(url=url, headers=headers, data=json.dumps(data))
    return response.json()["response"]


def ask(server, **body) -> dict:
    response = requests.post(server.url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_seed_curl_command_gets_response_status_and_time(server):
    result = subprocess.run(
        [CURL, "-X", "POST", server.url, "-H", "Content-Type: application/json",
         "-d", '{"prompt": "Hello, who are you?"}'],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert set(body) == {"response", "status", "time"}
    assert isinstance(body["response"], str)
    assert body["status"] == 200
    assert TIME_FORMAT.fullmatch(body["time"]), body["time"]


def test_the_seed_requests_client_gets_a_string(server):
    answer = get_completion(server.url, "Hello, who are you?")
    assert isinstance(answer, str)


def test_time_is_the_servers_local_time_of_the_answer(server):
    before = time.strftime("%Y-%m-%d %H:%M:%S")
    body = ask(server, prompt="What time is it?", max_new_tokens=4)
    after = time.strftime("%Y-%m-%d %H:%M:%S")
    assert before <= body["time"] <= after


def test_greedy_answers_are_deterministic(server):
    first = ask(server, prompt="Tell me a story about the sea.", **GREEDY)["response"]
    second = ask(server, prompt="Tell me a story about the sea.", **GREEDY)["response"]
    assert first == second
    assert first, "a 24-token greedy answer of the tiny model is not empty"


def test_max_new_tokens_bounds_the_answer(server):
    short = ask(server, prompt="What is the capital of France?", temperature=0, max_new_tokens=3)["response"]
    long = ask(server, prompt="What is the capital of France?", temperature=0, max_new_tokens=30)["response"]
    # The short answer's last bytes may be half a character (shown as U+FFFD) that the longer answer completes.
    assert long.startswith(short.rstrip("\ufffd"))
    assert len(long) > len(short)


def test_the_answer_matches_the_chat_completions_api_for_the_same_conversation(server):
    history = [{"role": "user", "content": "你好，你是谁？"},
               {"role": "assistant", "content": "我是元象公司开发的人工智能语言模型。"}]
    seed_answer = ask(server, prompt="请写一首关于大海的诗", history=history, **GREEDY)["response"]
    chat = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [*history, {"role": "user", "content": "请写一首关于大海的诗"}],
        "temperature": 0, "max_tokens": GREEDY["max_new_tokens"],
    }).json()
    assert seed_answer == chat["choices"][0]["message"]["content"]


def test_history_is_part_of_the_prompt(server):
    prompt = "What did I just say?"
    without = ask(server, prompt=prompt, **GREEDY)["response"]
    histories = [
        [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."},
         {"role": "assistant", "content": "Paris is the capital of France."}],
        [{"role": "system", "content": "You are XChat."},
         {"role": "user", "content": "今天天气很好"}, {"role": "assistant", "content": "我们去公园散步吧。"}],
    ]
    answers = [ask(server, prompt=prompt, history=history, **GREEDY)["response"] for history in histories]
    assert any(answer != without for answer in answers), "history changed no answer: is it ignored?"


def test_sampling_overrides_are_accepted(server):
    body = ask(server, prompt="Hello", temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.2, max_new_tokens=8)
    assert isinstance(body["response"], str)
