"""Who may call, from where, and how much: API keys, CORS, and the bounded waiting queue."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from conftest import RunningServer, start_server, stop_server
from test_server_concurrency import SLOW_CONTEXT, never_ends, open_stream
from tiny_checkpoint import write_checkpoint

KEYS = ("key-one", "key-two")
ORIGIN = "http://chat.example.test"


@pytest.fixture(scope="module")
def locked_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("locked") / "server.log",
                          "--api-key", ",".join(KEYS), "--cors-origin", ORIGIN)
    yield server
    stop_server(server)


def chat(server: RunningServer, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(server.url + "/v1/chat/completions", headers=headers, timeout=30,
                         json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"},
                                     {"Authorization": "Basic key-one"}, {"Authorization": "Bearer "}])
def test_without_a_valid_key_every_route_but_health_answers_401(locked_server, headers) -> None:
    for response in (chat(locked_server, headers),
                     requests.post(locked_server.url, json={"prompt": "Hi"}, headers=headers, timeout=30),
                     requests.get(locked_server.url + "/v1/models", headers=headers, timeout=30),
                     requests.get(locked_server.url + "/metrics", headers=headers, timeout=30),
                     requests.post(locked_server.url + "/tokenize", json={"prompt": "Hi"}, headers=headers, timeout=30),
                     requests.post(locked_server.url + "/detokenize", json={"tokens": [5]}, headers=headers,
                                   timeout=30)):
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and "Authorization: Bearer" in error["message"]
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(locked_server.url + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize("key", KEYS)
def test_each_configured_key_is_accepted(locked_server, key) -> None:
    response = chat(locked_server, {"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    client = openai.OpenAI(base_url=locked_server.url + "/v1", api_key=key, max_retries=0)
    assert client.models.list().data[0].id == "XVERSE-7B-Chat"


def test_the_openai_client_with_a_wrong_key_gets_an_authentication_error(locked_server) -> None:
    client = openai.OpenAI(base_url=locked_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="XVERSE-7B-Chat", messages=[{"role": "user", "content": "Hi"}])


def test_cors_allows_only_the_configured_origin(locked_server) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = requests.options(locked_server.url + "/v1/chat/completions", timeout=30,
                               headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = requests.options(locked_server.url + "/v1/chat/completions", timeout=30,
                             headers={"Origin": "http://elsewhere.test", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_without_cors_origin_no_cross_origin_headers_are_sent(server) -> None:
    response = requests.get(server.url + "/v1/models", headers={"Origin": ORIGIN}, timeout=30)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_beyond_max_waiting_requests_get_503_with_retry_after(tmp_path: Path) -> None:
    """One sequence runs at a time and one may wait: with A running and B waiting, C is turned away."""
    folder = write_checkpoint(tmp_path / "XVERSE-slow", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                              num_attention_heads=8, max_position_embeddings=SLOW_CONTEXT)
    never_ends(folder)
    server = start_server(folder, tmp_path / "server.log", "--max-num-seqs", "1", "--max-waiting", "1")
    try:
        running, _ = open_stream(server.url, "Tell me a long story", SLOW_CONTEXT - 16)  # A: several seconds
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(requests.post, server.url + "/v1/completions", timeout=120,
                                  json={"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0})
            time.sleep(0.5)  # B is queued behind A by now
            refused = requests.post(server.url + "/v1/completions", timeout=30,
                                    json={"prompt": "Jumps over", "max_tokens": 4})
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["type"] == "server_overloaded"
            assert not waiting.done()
            running.close()  # A's client leaves: A is aborted and B runs
            assert waiting.result().status_code == 200
        assert requests.post(server.url + "/v1/completions", timeout=60,
                             json={"prompt": "Again", "max_tokens": 4}).status_code == 200
    finally:
        stop_server(server)


BIG = 5 * 1024 * 1024  # over the default --max-body-bytes of 4 MiB


@pytest.mark.parametrize("route", ["/", "/v1/chat/completions", "/v1/completions"])
def test_a_body_over_the_size_limit_gets_413(server, route) -> None:
    body = b'{"prompt": "' + b"a" * BIG + b'"}'
    response = requests.post(server.url + route, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert "--max-body-bytes" in response.json()["error"]["message"]


def test_a_chunked_body_over_the_size_limit_gets_413_too(server) -> None:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(BIG // 65536 + 1):
            yield b"a" * 65536
        yield b'"}'

    response = requests.post(server.url, data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert requests.post(server.url, json={"prompt": "still serving", "max_new_tokens": 2}, timeout=30).ok


def test_too_many_messages_are_refused_with_400(server) -> None:
    messages = [{"role": "user", "content": "hi"}] * 2049
    response = requests.post(server.url + "/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert response.status_code == 400
    assert "messages" in response.json()["error"]["message"]


def test_a_request_past_request_timeout_ends_with_a_clear_error_and_others_go_on(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "XVERSE-slow", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                              num_attention_heads=8, max_position_embeddings=SLOW_CONTEXT)
    never_ends(folder)
    server = start_server(folder, tmp_path / "server.log", "--request-timeout", "0.4")
    long_body = {"messages": [{"role": "user", "content": "Tell me everything"}], "max_tokens": SLOW_CONTEXT - 16,
                 "temperature": 0}
    try:
        response = requests.post(server.url + "/v1/chat/completions", json=long_body, timeout=60)
        assert response.status_code == 504
        assert "--request-timeout" in response.json()["error"]["message"]

        streamed = requests.post(server.url + "/v1/chat/completions", json={**long_body, "stream": True}, timeout=60)
        events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == 504
        assert any(json.loads(e).get("choices", [{}])[0].get("delta", {}).get("content") for e in events[:-2])

        short = requests.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert short.status_code == 200, short.text
    finally:
        stop_server(server)
