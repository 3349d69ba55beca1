"""Stopping: SIGTERM/SIGINT drains (new requests 503, those in flight finish within --shutdown-grace, the
rest end with an error) and exits 0; a dead engine thread makes the process exit 1."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import free_port, start_server
from test_server_concurrency import SLOW_CONTEXT, never_ends, open_stream
from tiny_checkpoint import write_checkpoint

from xverse_serve.launch import build_engine
from xverse_serve.server.app import create_app
from xverse_serve.server.lifecycle import serve
from xverse_serve.settings import Settings

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few ms per token on a CPU, and answers that never end on their own."""
    folder = write_checkpoint(tmp_path_factory.mktemp("slow") / "XVERSE-slow", hidden_size=512,
                              intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                              max_position_embeddings=SLOW_CONTEXT)
    never_ends(folder)
    return folder


def events(lines) -> list[dict | str]:
    """The SSE events still to come on a stream, decoded; [DONE] stays a string."""
    out = []
    for line in lines:
        data = line[len(b"data: "):].decode()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat_body(max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": "Go on and on"}], "max_tokens": max_tokens, "temperature": 0}


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(slow_model: Path, tmp_path: Path) -> None:
    server = start_server(slow_model, tmp_path / "server.log", "--shutdown-grace", "60")
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(requests.post, server.url + CHAT, json=chat_body(120), timeout=120)
        stream, rest = open_stream(server.url, "Tell me a long story", 240)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the drain starts on uvicorn's next tick (0.1 s)

        refused = requests.post(server.url + CHAT, json=chat_body(4), timeout=30)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert "shutting down" in refused.json()["error"]["message"]
        assert requests.get(server.url + "/health", timeout=30).status_code == 503

        tail = events(rest)
        assert tail[-1] == "[DONE]" and tail[-2]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in event for event in tail[:-1])
        answer = whole.result()
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 120
        stream.close()
    assert server.process.wait(timeout=30) == 0
    assert "shutting down: new requests get 503; 2 in flight" in server.log()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_requests_still_running_after_the_grace_end_with_an_error(slow_model: Path, tmp_path: Path,
                                                                   signal_number: int) -> None:
    server = start_server(slow_model, tmp_path / "server.log", "--shutdown-grace", "0.5")
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(requests.post, server.url + CHAT, json=chat_body(SLOW_CONTEXT - 32), timeout=120)
        stream, rest = open_stream(server.url, "Tell me a long story", SLOW_CONTEXT - 32)
        sent = time.monotonic()
        server.process.send_signal(signal_number)

        tail = events(rest)
        assert tail[-1] == "[DONE]"
        error = tail[-2]["error"]
        assert error["code"] == 503 and "--shutdown-grace" in error["message"]
        answer = whole.result()
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "service_unavailable"
        stream.close()
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - sent < 15  # the grace, the flush, and uvicorn's own shutdown


def test_a_dead_engine_thread_fails_its_requests_and_the_process_exits_1(tiny_model_dir: Path) -> None:
    port = free_port()
    ctx = build_engine(Settings(model_path=tiny_model_dir, device="cpu", host="127.0.0.1", port=port))
    engine = ctx.engine.transport.engine
    schedule = engine.scheduler.schedule
    calls = []

    def broken_schedule():
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("scheduler bug")
        return schedule()

    engine.scheduler.schedule = broken_schedule
    exit_codes = []
    # serve() runs as api.py runs it (signals are only caught on the main thread, and not needed here).
    thread = threading.Thread(target=lambda: exit_codes.append(serve(create_app(ctx), "127.0.0.1", port, "info")))
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(url + "/health", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.05)
    response = requests.post(url + CHAT, json=chat_body(16), timeout=60)
    assert response.status_code == 500
    assert "the engine stopped: RuntimeError: scheduler bug" in response.json()["error"]["message"]
    thread.join(timeout=30)
    assert exit_codes == [1]
