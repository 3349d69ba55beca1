"""Many users at once: each gets exactly the answer it gets alone, the server stays responsive while it
generates, and clients that hang up mid-stream leave nothing behind."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests
from conftest import RunningServer, start_server, stop_server
from tiny_checkpoint import never_ends, write_checkpoint

SHARED_PREFIX = ("You are XChat, a language model developed by XVERSE. The quick brown fox jumps over the lazy dog. "
                 "Tell me a story about the sea and the sky. ")


@dataclass(frozen=True)
class Call:
    """One client request: which route, streamed or not, and its body."""

    path: str
    body: dict
    stream: bool = False

    def run(self, url: str) -> str:
        """The answer text, however the route delivers it."""
        body = {**self.body, "stream": True} if self.stream else self.body
        response = requests.post(url + self.path, json=body, stream=self.stream, timeout=120)
        assert response.status_code == 200, response.text
        if self.path == "/":
            return response.json()["response"]
        if not self.stream:
            choice = response.json()["choices"][0]
            return choice["message"]["content"] if "message" in choice else choice["text"]
        text = []
        for line in response.iter_lines(decode_unicode=False):
            if not line or line == b"data: [DONE]":
                continue
            for choice in json.loads(line[len(b"data: "):])["choices"]:
                text.append(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])
        return "".join(text)


def mixed_calls() -> list[Call]:
    """24 different requests: every route, streamed and not, greedy and seeded sampling, shared prefixes."""
    calls = []
    for i in range(24):
        max_tokens = (8, 16, 24, 32)[i % 4]
        sampling = {"temperature": 0} if i % 3 else {"temperature": 1.0, "top_p": 1.0, "seed": i}
        question = f"question {i}: 今天天气很好" if i % 2 else f"Tell me story number {i}."
        if i % 6 == 5:
            calls.append(Call("/", {"prompt": question, "max_new_tokens": max_tokens, "temperature": 0}))
        elif i % 4 == 3:
            calls.append(Call("/v1/completions", {"prompt": SHARED_PREFIX + question, "max_tokens": max_tokens,
                                                  **sampling}, stream=i % 8 == 3))
        else:
            messages = [{"role": "system", "content": SHARED_PREFIX}] if i % 5 == 0 else []
            messages.append({"role": "user", "content": question})
            calls.append(Call("/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens, **sampling},
                              stream=i % 2 == 0))
    return calls


def run_together(calls: list[Call], url: str) -> list[str]:
    """All calls at once: each thread waits at a barrier so the requests arrive together."""
    barrier = threading.Barrier(len(calls))

    def run(call: Call) -> str:
        barrier.wait(timeout=60)
        return call.run(url)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_concurrent_clients_each_get_the_answer_they_get_alone(server):
    calls = mixed_calls()
    alone = [call.run(server.url) for call in calls]
    assert len(set(alone)) > len(calls) // 2, "the requests should differ from each other"
    for _ in range(2):
        together = run_together(calls, server.url)
        mismatches = [(call, a, t) for call, a, t in zip(calls, alone, together) if a != t]
        assert not mismatches, mismatches


def test_identical_requests_at_once_get_identical_answers(server):
    call = Call("/v1/chat/completions", {"messages": [{"role": "system", "content": SHARED_PREFIX},
                                                      {"role": "user", "content": "北京是中国的首都"}],
                                         "max_tokens": 24, "temperature": 0})
    alone = call.run(server.url)
    assert run_together([call] * 12, server.url) == [alone] * 12


def test_answers_do_not_depend_on_what_ran_before(server):
    """Requests sharing a long prefix (several KV blocks) answer the same, whatever was computed earlier."""
    first = Call("/v1/completions", {"prompt": SHARED_PREFIX + "Paris", "max_tokens": 16, "temperature": 0})
    other = Call("/v1/completions", {"prompt": SHARED_PREFIX + "北京", "max_tokens": 16, "temperature": 0})
    before = first.run(server.url)
    other.run(server.url)
    assert first.run(server.url) == before


# --- a slower model: generations that last long enough to watch ------------------------------------------------

SLOW_CONTEXT = 384


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A wider, deeper random model (a few ms per token on a CPU) that never ends an answer on its own,
    running one sequence at a time, with a KV cache that holds exactly one full context."""
    folder = tmp_path_factory.mktemp("slow") / "XVERSE-slow"
    write_checkpoint(folder, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                     max_position_embeddings=SLOW_CONTEXT)
    never_ends(folder)
    running = start_server(folder, folder.parent / "server.log", "--kv-cache-tokens", str(SLOW_CONTEXT),
                           "--max-num-seqs", "1")
    yield running
    stop_server(running)


def open_stream(url: str, prompt: str, max_tokens: int) -> tuple[requests.Response, Iterator[bytes]]:
    """A streamed greedy chat completion, read up to its first piece of text."""
    response = requests.post(url + "/v1/chat/completions", stream=True, timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, "stream": True})
    assert response.status_code == 200
    lines = (line for line in response.iter_lines(chunk_size=None) if line)
    for line in lines:
        if json.loads(line[len(b"data: "):])["choices"][0]["delta"].get("content"):
            break
    return response, lines


class StreamWatcher(threading.Thread):
    """Reads a long stream as it arrives, until told to stop; notes whether it ended before that."""

    def __init__(self, url: str, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.generating = threading.Event()
        self.stop = threading.Event()
        self.ended_early = False

    def run(self) -> None:
        response, lines = open_stream(self.url, self.prompt, self.max_tokens)
        self.generating.set()
        with response:
            for line in lines:
                if self.stop.is_set():
                    return
                if line == b"data: [DONE]":
                    self.ended_early = True
                    return


def test_health_answers_fast_while_a_long_generation_runs(slow_server):
    watcher = StreamWatcher(slow_server.url, "Tell me a long story", SLOW_CONTEXT - 16)
    watcher.start()
    try:
        assert watcher.generating.wait(timeout=60)
        for _ in range(5):
            started = time.monotonic()
            response = requests.get(slow_server.url + "/health", timeout=10)
            assert response.status_code == 200 and response.json() == {"status": "ok"}
            assert time.monotonic() - started < 1.0
        assert requests.get(slow_server.url + "/v1/models", timeout=10).status_code == 200
        # Otherwise the checks did not run alongside the generation and prove nothing.
        assert not watcher.ended_early
    finally:
        watcher.stop.set()
        watcher.join(timeout=60)


def whole_context(url: str) -> str:
    """A greedy answer that fills the context: it needs every block of the KV cache."""
    prompt = [{"role": "user", "content": "Hello"}]
    prompt_tokens = requests.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": prompt, "max_tokens": 1, "temperature": 0}).json()["usage"]["prompt_tokens"]
    response = requests.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": prompt, "max_tokens": SLOW_CONTEXT - prompt_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["total_tokens"] == SLOW_CONTEXT
    assert body["choices"][0]["finish_reason"] == "length"
    return body["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def idle_whole_context(slow_server: RunningServer) -> tuple[str, float]:
    """The whole-context answer on an idle server, and how long it took."""
    started = time.monotonic()
    text = whole_context(slow_server.url)
    return text, time.monotonic() - started


def drop_streams(url: str) -> None:
    for i in range(5):
        response, lines = open_stream(url, f"Tell me a story, take {i}", SLOW_CONTEXT - 16)
        for _ in range(8):
            next(lines)
        response.close()


def give_up_waiting(url: str) -> None:
    """Non-streaming clients that time out: the seed's route and both OpenAI routes."""
    long = SLOW_CONTEXT - 16
    for path, body in [("/", {"prompt": "Tell me a story", "max_new_tokens": long}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": long}),
                       ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": long}),
                       ("/", {"prompt": "Tell me another story", "max_new_tokens": long}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Go on"}],
                                                 "max_tokens": long})]:
        with contextlib.suppress(requests.exceptions.ReadTimeout):
            requests.post(url + path, json={**body, "temperature": 0}, timeout=(10, 0.3))


@pytest.mark.parametrize("hang_up", [drop_streams, give_up_waiting], ids=["streaming", "not streaming"])
def test_clients_that_hang_up_are_aborted_and_give_their_cache_back(slow_server, idle_whole_context, hang_up):
    """One sequence runs at a time and the KV cache holds one full context. Requests whose clients hang up
    must be aborted and their blocks freed, or what follows waits for them to run to max_tokens (or forever)."""
    idle_text, idle_seconds = idle_whole_context
    started = time.monotonic()
    hang_up(slow_server.url)
    assert whole_context(slow_server.url) == idle_text
    seconds = time.monotonic() - started
    # Had each abandoned request run on to its ~370 tokens, this would take about six times the idle run.
    assert seconds < 3 * idle_seconds + 2, (seconds, idle_seconds)
    assert requests.get(slow_server.url + "/health", timeout=10).status_code == 200
