"""Bad requests: each is refused with a 4xx whose JSON body names the problem, never a 500, and the server
keeps serving afterwards. Bodies use OpenAI's error shape {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json

import openai
import pytest
import requests

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
SEED = "/"
HELLO = [{"role": "user", "content": "Hello"}]
CONTEXT = 256  # the tiny model's max_position_embeddings
TOO_LONG = "The quick brown fox jumps over the lazy dog. " * 40  # ~400 tokens


def chat_body(**fields) -> dict:
    return {"messages": HELLO, "max_tokens": 4, **fields}


# (route, body, status, words the message must contain). A str body is sent as raw bytes.
CASES = {
    # The body itself
    "malformed JSON": (SEED, '{"prompt": "Hello"', 400, ["JSON"]),
    "malformed JSON (chat)": (CHAT, '{"messages": [}', 400, ["JSON"]),
    "body is a list": (SEED, '["Hello"]', 400, ["object"]),
    "body is a string": (CHAT, '"Hello"', 400, ["object"]),
    "body is not UTF-8": (SEED, b'{"prompt": "\xff\xfe"}', 400, ["UTF-8"]),
    "empty body": (SEED, "", 400, ["body"]),
    # The seed route
    "missing prompt": (SEED, {"history": []}, 400, ["prompt", "required"]),
    "prompt is a number": (SEED, {"prompt": 42}, 400, ["prompt", "string"]),
    "prompt is null": (SEED, {"prompt": None}, 400, ["prompt", "string"]),
    "prompt with a lone surrogate": (SEED, '{"prompt": "Hello \\ud800"}', 400, ["prompt", "surrogate"]),
    "unknown field": (SEED, {"prompt": "Hello", "promt": "typo"}, 400, ["promt"]),
    "negative temperature": (SEED, {"prompt": "Hello", "temperature": -0.5}, 400, ["temperature"]),
    "temperature above 2": (SEED, {"prompt": "Hello", "temperature": 2.5}, 400, ["temperature"]),
    "temperature as text": (SEED, {"prompt": "Hello", "temperature": "hot"}, 400, ["temperature"]),
    "top_p of 0": (SEED, {"prompt": "Hello", "top_p": 0}, 400, ["top_p"]),
    "top_p above 1": (SEED, {"prompt": "Hello", "top_p": 1.5}, 400, ["top_p"]),
    "max_new_tokens of 0": (SEED, {"prompt": "Hello", "max_new_tokens": 0}, 400, ["max_new_tokens"]),
    "max_new_tokens beyond the context": (SEED, {"prompt": "Hello", "max_new_tokens": 10_000}, 400,
                                          ["max_new_tokens", str(CONTEXT), "10000"]),
    "prompt too long": (SEED, {"prompt": TOO_LONG}, 400, ["prompt tokens", "shorten"]),
    "history with an unknown role": (SEED, {"prompt": "Hello", "history": [{"role": "bot", "content": "Hi"}]}, 400,
                                     ["role", "user"]),
    "history that is not a list": (SEED, {"prompt": "Hello", "history": "Hi"}, 400, ["history"]),
    "history system message not first": (SEED, {"prompt": "Hello", "history": [
        {"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]}, 400, ["system", "first"]),
    # Chat completions
    "missing messages": (CHAT, {"max_tokens": 4}, 400, ["messages", "required"]),
    "empty messages": (CHAT, {"messages": []}, 400, ["messages"]),
    "unknown role": (CHAT, {"messages": [{"role": "robot", "content": "Hi"}]}, 400, ["role", "user"]),
    "message without content": (CHAT, {"messages": [{"role": "user"}]}, 400, ["content", "missing"]),
    "last message from the assistant": (CHAT, {"messages": [*HELLO, {"role": "assistant", "content": "Hi"}]}, 400,
                                        ["last message", "user"]),
    "only a system message": (CHAT, {"messages": [{"role": "system", "content": "Be brief."}]}, 400,
                              ["last message", "user"]),
    "system message not first": (CHAT, {"messages": [*HELLO, {"role": "assistant", "content": "Hi"},
                                                     {"role": "system", "content": "Be brief."}, *HELLO]}, 400,
                                 ["system", "first"]),
    "image content part": (CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, ["content"]),
    "content with a lone surrogate": (CHAT, '{"messages": [{"role": "user", "content": "Hi \\udc80"}]}', 400,
                                      ["content", "surrogate"]),
    "chat prompt too long": (CHAT, {"messages": [{"role": "user", "content": TOO_LONG}]}, 400,
                             ["prompt tokens", "shorten"]),
    "max_tokens of 0": (CHAT, chat_body(max_tokens=0), 400, ["max_tokens"]),
    "max_tokens negative": (CHAT, chat_body(max_tokens=-1), 400, ["max_tokens"]),
    "max_tokens as a float": (CHAT, chat_body(max_tokens=4.5), 400, ["max_tokens", "integer"]),
    "max_tokens beyond the context": (CHAT, chat_body(max_tokens=CONTEXT), 400, ["max_tokens", str(CONTEXT)]),
    "max_tokens huge": (CHAT, chat_body(max_tokens=10**30), 400, ["max_tokens"]),
    "max_completion_tokens beyond the context": (CHAT, {"messages": HELLO, "max_completion_tokens": 5000}, 400,
                                                 ["max_completion_tokens", str(CONTEXT)]),
    "temperature out of range (chat)": (CHAT, chat_body(temperature=3), 400, ["temperature"]),
    "temperature NaN": (CHAT, '{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400,
                        ["temperature"]),
    "top_p out of range (chat)": (CHAT, chat_body(top_p=-0.1), 400, ["top_p"]),
    "unknown field (chat)": (CHAT, chat_body(frequency_penalty=0, stream_usage=True), 400, ["stream_usage"]),
    "n of 0": (CHAT, chat_body(n=0), 400, ["n"]),
    "n beyond 64": (COMPLETIONS, {"prompt": "hi", "n": 65}, 400, ["n", "64"]),
    "logprobs not a bool": (CHAT, chat_body(logprobs=2), 400, ["logprobs"]),
    "top_k beyond 32 bits": (CHAT, chat_body(top_k=10**30), 400, ["top_k"]),
    "top_logprobs without logprobs": (CHAT, chat_body(top_logprobs=3), 400, ["top_logprobs", "logprobs: true"]),
    "tools with a bad schema": (CHAT, chat_body(tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "strin"}}}}}]),
        400, ["tools"]),
    "tool_choice": (CHAT, chat_body(tool_choice="required"), 400, ["tool_choice"]),
    "json_schema without its schema": (CHAT, chat_body(response_format={"type": "json_schema"}), 400,
                                       ["json_schema"]),
    "presence_penalty out of range": (CHAT, chat_body(presence_penalty=2.5), 400, ["presence_penalty", "2"]),
    "frequency_penalty out of range": (COMPLETIONS, {"prompt": "hi", "frequency_penalty": -3}, 400,
                                       ["frequency_penalty"]),
    "logit_bias beyond the vocabulary": (CHAT, chat_body(logit_bias={"999999": 10}), 400,
                                         ["logit_bias", "999999", "outside the vocabulary"]),
    "logit_bias key not an id": (CHAT, chat_body(logit_bias={"hello": 10}), 400, ["logit_bias", "token ids"]),
    "logit_bias value out of range": (CHAT, chat_body(logit_bias={"42": 101}), 400, ["logit_bias", "100"]),
    "empty stop string": (CHAT, chat_body(stop=""), 400, ["stop"]),
    "stop is a number": (CHAT, chat_body(stop=7), 400, ["stop"]),
    "too many stop strings": (CHAT, chat_body(stop=[str(i) for i in range(17)]), 400, ["stop"]),
    "negative seed": (CHAT, chat_body(seed=-1), 400, ["seed"]),
    "stream is not a boolean": (CHAT, chat_body(stream="yes"), 400, ["stream"]),
    "unknown model": (CHAT, chat_body(model="gpt-4o"), 404, ["gpt-4o", "XVERSE-7B-Chat"]),
    "unknown model, streamed": (CHAT, chat_body(model="gpt-4o", stream=True), 404, ["gpt-4o"]),
    # Completions
    "missing completion prompt": (COMPLETIONS, {"max_tokens": 4}, 400, ["prompt", "required"]),
    "empty completion prompt": (COMPLETIONS, {"prompt": ""}, 400, ["prompt", "empty"]),
    "completion prompt is a number": (COMPLETIONS, {"prompt": 42}, 400, ["prompt"]),
    "token-id completion prompt mixed with text": (COMPLETIONS, {"prompt": [1, "a"]}, 400, ["prompt"]),
    "completion prompt too long": (COMPLETIONS, {"prompt": TOO_LONG, "max_tokens": 4}, 400,
                                   ["prompt", str(CONTEXT)]),
    "completion max_tokens beyond the context": (COMPLETIONS, {"prompt": "Hello", "max_tokens": CONTEXT}, 400,
                                                 ["max_tokens", str(CONTEXT)]),
    "echo not a bool": (COMPLETIONS, {"prompt": "Hello", "echo": "yes"}, 400, ["echo"]),
    "completion logprobs out of range": (COMPLETIONS, {"prompt": "Hello", "logprobs": 25}, 400, ["logprobs", "20"]),
    "best_of": (COMPLETIONS, {"prompt": "Hello", "best_of": 3}, 400, ["best_of"]),
    "suffix": (COMPLETIONS, {"prompt": "Hello", "suffix": "end"}, 400, ["suffix"]),
    "unknown model (completions)": (COMPLETIONS, {"prompt": "Hello", "model": "davinci"}, 404, ["davinci"]),
}


def post(server, path: str, body: dict | str | bytes) -> requests.Response:
    if isinstance(body, dict):
        return requests.post(server.url + path, json=body, timeout=60)
    return requests.post(server.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("path, body, status, words", CASES.values(), ids=CASES.keys())
def test_bad_request_is_refused_with_a_message_naming_the_problem(server, path, body, status, words):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    for word in words:
        assert word.lower() in error["message"].lower(), (word, error["message"])


def test_the_server_keeps_serving_after_every_bad_request(server):
    for path, body, _, _ in CASES.values():
        assert post(server, path, body).status_code < 500
    assert requests.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    answer = requests.post(server.url, json={"prompt": "Hello", "max_new_tokens": 4}, timeout=60)
    assert answer.status_code == 200 and isinstance(answer.json()["response"], str)


def test_unknown_paths_and_methods_answer_in_the_same_error_shape(server):
    missing = requests.post(server.url + "/v1/embeddings", json={"input": "Hello"}, timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    wrong_method = requests.get(server.url + "/v1/chat/completions", timeout=10)
    assert wrong_method.status_code == 405
    assert "POST" in wrong_method.headers["allow"]
    assert wrong_method.json()["error"]["message"]


def test_an_answer_may_use_exactly_what_the_context_leaves(server):
    usage = requests.post(server.url + CHAT, json=chat_body(max_tokens=1), timeout=60).json()["usage"]
    left = CONTEXT - usage["prompt_tokens"]
    response = requests.post(server.url + CHAT, json=chat_body(max_tokens=left), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["total_tokens"] <= CONTEXT
    refused = requests.post(server.url + CHAT, json=chat_body(max_tokens=left + 1), timeout=60)
    assert refused.status_code == 400
    assert str(left) in refused.json()["error"]["message"]


def test_the_seed_route_refuses_a_body_not_sent_as_json(server):
    """The seed's clients all send Content-Type: application/json; without it the error says so."""
    response = requests.post(server.url, data=json.dumps({"prompt": "Hello"}),
                             headers={"Content-Type": "text/plain"}, timeout=10)
    assert response.status_code == 400
    assert "Content-Type: application/json" in response.json()["error"]["message"]


# --- through the official client ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_raises_bad_request_with_the_servers_message(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="XVERSE-7B-Chat", messages=HELLO, n=0)
    assert "n:" in raised.value.message
    assert raised.value.body["type"] == "invalid_request_error"


def test_the_openai_client_raises_not_found_for_an_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4)
    assert "gpt-4o" in raised.value.message
    assert raised.value.body["param"] == "model"


def test_the_openai_client_raises_before_a_stream_starts(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="XVERSE-7B-Chat", messages=[{"role": "assistant", "content": "Hi"}],
                                       stream=True)
    assert "last message" in raised.value.message
