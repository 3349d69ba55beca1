"""What operators see: /metrics in Prometheus' format, and one structured log line per request."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
from conftest import RunningServer, start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families

CHAT = "/v1/chat/completions"


def scrape(server: RunningServer, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    response = requests.get(server.url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def request_lines(server: RunningServer) -> list[dict]:
    return [json.loads(line.split(" request ", 1)[1]) for line in server.log().splitlines()
            if "xverse_serve.requests: request {" in line]


def wait_for_line(server: RunningServer, request_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in request_lines(server):
            if line["id"] == request_id:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line for request {request_id}:\n{server.log()}")


def test_metrics_count_requests_tokens_and_latencies(server) -> None:
    before = scrape(server)
    body = {"messages": [{"role": "user", "content": "Count me"}], "max_tokens": 6, "temperature": 0}
    answers = [requests.post(server.url + CHAT, json=body, timeout=60) for _ in range(3)]
    streamed = requests.post(server.url + CHAT, json={**body, "stream": True}, timeout=60)
    refused = requests.post(server.url + CHAT, json={"messages": []}, timeout=60)
    assert [a.status_code for a in answers] + [streamed.status_code, refused.status_code] == [200] * 4 + [400]
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("xverse_requests_total", route=CHAT, status="200") == 4
    assert grew("xverse_requests_total", route=CHAT, status="400") == 1
    generated = sum(a.json()["usage"]["completion_tokens"] for a in answers)
    prompt = sum(a.json()["usage"]["prompt_tokens"] for a in answers)
    assert grew("xverse_generation_tokens_total") == generated + 6  # the stream's six tokens too
    assert grew("xverse_prompt_tokens_total") == prompt * 4 // 3
    assert grew("xverse_time_to_first_token_seconds_count") == 4
    assert grew("xverse_inter_token_latency_seconds_count") == generated + 6 - 4  # every token after the first
    assert grew("xverse_request_latency_seconds_count", route=CHAT) == 5
    assert grew("xverse_prefix_cache_queried_tokens_total") > 0
    # Between requests nothing runs or waits, and every KV block is free again.
    assert value(after, "xverse_requests_running") == value(after, "xverse_requests_waiting") == 0
    assert value(after, "xverse_kv_cache_blocks_used") == 0
    assert value(after, "xverse_kv_cache_blocks_free") > 0
    assert value(after, "xverse_http_requests_in_flight") == 0


def test_each_request_logs_one_json_line_without_its_text(server) -> None:
    secret = "my secret question 机密"
    response = requests.post(server.url + CHAT, timeout=60,
                             json={"messages": [{"role": "user", "content": secret}], "max_tokens": 5})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    assert response.json()["id"] == f"chatcmpl-{request_id}"
    line = wait_for_line(server, request_id)
    assert line["route"] == CHAT and line["method"] == "POST" and line["status"] == 200
    assert line["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == response.json()["usage"]["completion_tokens"]
    assert line["finish_reason"] == response.json()["choices"][0]["finish_reason"]
    assert 0 < line["ttft_ms"] <= line["latency_ms"]
    assert "prompt" not in line and "response" not in line
    assert secret not in server.log()
    assert sum(1 for other in request_lines(server) if other["id"] == request_id) == 1


def test_refused_requests_are_logged_with_their_status_and_reason(server) -> None:
    bad = requests.post(server.url + CHAT, json={"messages": "not a list"}, timeout=30)
    missing = requests.get(server.url + "/no/such/route", timeout=30)
    bad_line = wait_for_line(server, bad.headers["x-request-id"])
    assert bad_line["status"] == 400 and "messages" in bad_line["error"]
    missing_line = wait_for_line(server, missing.headers["x-request-id"])
    assert missing_line["status"] == 404 and missing_line["route"] == "other"  # no label per unknown path


def test_log_prompts_adds_the_text_and_the_seeds_own_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(tiny_model_dir, tmp_path / "server.log", "--log-prompts")
    try:
        prompt = "log line check: 北京是中国的首都"
        response = requests.post(server.url, json={"prompt": prompt, "max_new_tokens": 4}, timeout=60)
        body = response.json()
        line = wait_for_line(server, response.headers["x-request-id"])
        assert line["prompt"] == prompt and line["response"] == body["response"]
        seed_line = next(text for text in server.log().splitlines() if prompt in text and "xverse_serve" not in text)
        assert f"[{body['time']}]" in seed_line and repr(body["response"]) in seed_line

        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
        chat = requests.post(server.url + CHAT, json={"messages": messages, "max_tokens": 4, "stream": True},
                             timeout=60)
        line = wait_for_line(server, chat.headers["x-request-id"])
        assert line["prompt"] == messages
        streamed = "".join(json.loads(event[len("data: "):])["choices"][0]["delta"].get("content") or ""
                           for event in chat.text.splitlines()
                           if event.startswith("data: {") and json.loads(event[len("data: "):])["choices"])
        assert line["response"] == streamed
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def locked_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("metrics") / "server.log", "--api-key", "metrics-key")
    yield server
    stop_server(server)


@pytest.mark.parametrize("headers, status", [(None, 401), ({"Authorization": "Bearer wrong"}, 401),
                                             ({"Authorization": "Bearer metrics-key"}, 200)])
def test_metrics_need_the_api_key_when_one_is_set(locked_server, headers, status) -> None:
    assert requests.get(locked_server.url + "/metrics", headers=headers, timeout=30).status_code == status
