"""Soak: hundreds of requests from dozens of concurrent clients, well-formed and not, some hanging up
mid-stream. Every well-formed request gets exactly one complete answer (the one it gets alone), nothing
gets a 5xx, and afterwards nothing runs, every KV block is free and the server's memory is flat."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import RunningServer, start_server, stop_server
from test_observability import scrape, value

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENTS = 32
ROUNDS = 2
REQUESTS_PER_CLIENT = 6  # per round: 2 rounds x 32 clients x 6 = 384 requests
QUESTIONS = [f"Question {i}: tell me about {topic}" for i, topic in
             enumerate(["the sea", "北京的历史", "prime numbers", "a red fox", "Mars", "茶", "jazz", "rivers"])]


@dataclass
class Outcome:
    kind: str
    status: int
    ok: bool
    detail: str = ""


@pytest.fixture(scope="module")
def soak_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("soak") / "server.log", "--api-key", KEY)
    yield server
    stop_server(server)


def chat_body(question: str, max_tokens: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0, **extra}


def stream_text(response: requests.Response) -> tuple[str, list[str]]:
    """The streamed answer, and every finish_reason seen; checks the stream's framing on the way."""
    events = [line[len(b"data: "):] for line in response.iter_lines() if line]
    assert events and events[-1] == b"[DONE]" and events.count(b"[DONE]") == 1, events[-3:]
    text, reasons = [], []
    for event in events[:-1]:
        payload = json.loads(event)
        assert "error" not in payload, payload
        for choice in payload["choices"]:
            text.append(choice["delta"].get("content") or "")
            if choice["finish_reason"]:
                reasons.append(choice["finish_reason"])
    return "".join(text), reasons


def reference_answers(server: RunningServer) -> dict[tuple[str, int], str]:
    """Each greedy question answered alone, before the load."""
    answers = {}
    for question in QUESTIONS:
        for max_tokens in (8, 16):
            response = requests.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                                     json=chat_body(question, max_tokens))
            answers[question, max_tokens] = response.json()["choices"][0]["message"]["content"]
    return answers


def one_request(server: RunningServer, expected: dict, rng: random.Random) -> Outcome:
    url = server.url
    question, max_tokens = rng.choice(QUESTIONS), rng.choice((8, 16))
    want = expected[question, max_tokens]
    kind = rng.choice(["chat", "chat", "stream", "stream", "seed", "completion", "hang_up", "malformed",
                       "too_long", "wrong_key", "sampled"])
    if kind == "chat":
        response = requests.post(url + "/v1/chat/completions", headers=AUTH, timeout=120,
                                 json=chat_body(question, max_tokens))
        body = response.json()
        ok = (response.status_code == 200 and body["choices"][0]["message"]["content"] == want
              and body["usage"]["completion_tokens"] <= max_tokens)
        return Outcome(kind, response.status_code, ok, response.text[:200])
    if kind == "stream":
        response = requests.post(url + "/v1/chat/completions", headers=AUTH, timeout=120, stream=True,
                                 json=chat_body(question, max_tokens, stream=True))
        text, reasons = stream_text(response)
        return Outcome(kind, response.status_code, text == want and len(reasons) == 1, f"{text!r} vs {want!r}")
    if kind == "seed":
        response = requests.post(url, headers=AUTH, timeout=120,
                                 json={"prompt": question, "max_new_tokens": max_tokens, "temperature": 0})
        return Outcome(kind, response.status_code, response.status_code == 200 and response.json()["response"] == want)
    if kind == "completion":
        response = requests.post(url + "/v1/completions", headers=AUTH, timeout=120, stream=rng.random() < 0.5,
                                 json={"prompt": question, "max_tokens": max_tokens, "temperature": 0})
        return Outcome(kind, response.status_code, response.status_code == 200 and bool(response.text))
    if kind == "sampled":
        response = requests.post(url + "/v1/chat/completions", headers=AUTH, timeout=120,
                                 json={**chat_body(question, max_tokens), "temperature": 1.0, "top_p": 0.9,
                                       "seed": rng.randrange(1000)})
        return Outcome(kind, response.status_code, response.status_code == 200)
    if kind == "hang_up":  # reads the first piece of a long answer, then leaves
        response = requests.post(url + "/v1/chat/completions", headers=AUTH, timeout=120, stream=True,
                                 json=chat_body(question, 200, stream=True))
        next(line for line in response.iter_lines() if line)
        response.close()
        return Outcome(kind, response.status_code, response.status_code == 200)
    if kind == "malformed":
        body = rng.choice([b'{"messages": [', b'{"messages": "hi"}', b'[1, 2]', b'\xff\xfe', b'{"prompt": 5}'])
        response = requests.post(url + rng.choice(["/", "/v1/chat/completions", "/v1/completions"]), data=body,
                                 headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
        return Outcome(kind, response.status_code, response.status_code == 400, response.text[:200])
    if kind == "too_long":
        response = requests.post(url + "/v1/completions", headers=AUTH, timeout=60,
                                 json={"prompt": "word " * 2000, "max_tokens": 4})
        return Outcome(kind, response.status_code, response.status_code == 400, response.text[:200])
    response = requests.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer wrong"}, timeout=60,
                             json=chat_body(question, max_tokens))
    return Outcome(kind, response.status_code, response.status_code == 401)


def client(server: RunningServer, expected: dict, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    return [one_request(server, expected, rng) for _ in range(REQUESTS_PER_CLIENT)]


def wait_until_idle(server: RunningServer) -> dict:
    """/metrics once nothing runs: aborts of hung-up requests reach the engine a step later."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(server, AUTH)
        idle = all(value(samples, name) == 0 for name in ("xverse_requests_running", "xverse_requests_waiting",
                                                          "xverse_kv_cache_blocks_used",
                                                          "xverse_http_requests_in_flight"))
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def rss_bytes(server: RunningServer) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_soak(soak_server: RunningServer) -> None:
    expected = reference_answers(soak_server)
    outcomes, rss = [], []
    for round_index in range(ROUNDS):
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client, soak_server, expected, round_index * 1000 + i) for i in range(CLIENTS)]
            outcomes += [outcome for future in futures for outcome in future.result()]
        samples = wait_until_idle(soak_server)
        for name in ("xverse_requests_running", "xverse_requests_waiting", "xverse_kv_cache_blocks_used",
                     "xverse_http_requests_in_flight"):
            assert value(samples, name) == 0, (name, value(samples, name))
        rss.append(rss_bytes(soak_server))

    kinds = Counter(outcome.kind for outcome in outcomes)
    assert len(outcomes) >= 300 and set(kinds) == {"chat", "stream", "seed", "completion", "hang_up", "malformed",
                                                   "too_long", "wrong_key", "sampled"}, kinds
    failures = [outcome for outcome in outcomes if not outcome.ok]
    assert not failures, failures[:5]
    assert not [outcome for outcome in outcomes if outcome.status >= 500]
    server_errors = {key: count for key, count in samples.items()
                     if key[0] == "xverse_requests_total" and dict(key[1])["status"].startswith("5") and count}
    assert not server_errors, server_errors
    # The second round allocated nothing that stayed: the server's memory is flat.
    assert rss[1] - rss[0] < 32 * 2**20, [f"{r / 2**20:.0f} MiB" for r in rss]
