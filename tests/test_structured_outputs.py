"""Structured outputs and tool calls over HTTP, with the clients applications use: the `openai` package and
LangChain's ChatOpenAI (with_structured_output, bind_tools).

The tiny checkpoint's weights are random, so its free text is gibberish: every answer below that parses and
validates does so because the grammar made it, which is what these tests check."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pytest
import requests
import tokenizers
from conftest import RunningServer, start_server, stop_server
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from tiny_checkpoint import write_checkpoint

MODEL = "XVERSE-7B-Chat"
PROMPT = [{"role": "user", "content": "What is the weather in Paris?"}]

FORECAST = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "warnings": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["city", "days", "unit", "warnings"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The local time of a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
                   "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER_TOOL, TIME_TOOL)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A tiny checkpoint with room for the tools block (500 to 750 tokens with the tiny tokenizer's vocabulary)."""
    folder = write_checkpoint(tmp_path_factory.mktemp("structured") / "XVERSE-tiny", max_position_embeddings=2048,
                              max_tokenizer_truncation=1536)
    running = start_server(folder, folder.parent / "server.log")
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": True}}


def streamed(client: openai.OpenAI, **request) -> tuple[list[str], list[list[dict]], list[str]]:
    """Per choice: the content joined, the tool calls assembled from their deltas, and the finish reason."""
    n = request.get("n", 1)
    contents, calls, reasons = [""] * n, [[] for _ in range(n)], [""] * n
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **request):
        for choice in chunk.choices:
            delta = choice.delta
            contents[choice.index] += delta.content or ""
            for call in delta.tool_calls or ():
                if call.id is not None:
                    assert call.index == len(calls[choice.index]) and call.function.name
                    calls[choice.index].append({"id": call.id, "name": call.function.name, "arguments": ""})
                calls[choice.index][call.index]["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return contents, calls, reasons


def test_json_schema_answers_parse_and_validate_whole_and_streamed(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=300, n=3, temperature=1.0,
                                              seed=1, response_format=json_schema_format(FORECAST))
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), FORECAST)
    assert len({choice.message.content for choice in response.choices}) > 1
    contents, _, reasons = streamed(client, messages=PROMPT, max_tokens=300, n=3, temperature=1.0, seed=1,
                                    response_format=json_schema_format(FORECAST))
    assert contents == [choice.message.content for choice in response.choices] and reasons == ["stop"] * 3


def test_json_object_answers_are_json_objects(client: openai.OpenAI) -> None:
    for seed in range(3):
        response = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=400, temperature=1.0,
                                                  seed=seed, response_format={"type": "json_object"})
        choice = response.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # cut by max_tokens: what there is still begins a JSON object
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_free_requests_beside_constrained_ones_get_the_answers_they_get_alone(client: openai.OpenAI) -> None:
    free = [[{"role": "user", "content": f"Tell me story number {i}"}] for i in range(4)]

    def answer_free(messages: list[dict]) -> str:
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40,
                                              temperature=0).choices[0].message.content

    def answer_constrained(seed: int) -> str:
        return client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=300, temperature=1.0,
                                              seed=seed, response_format=json_schema_format(FORECAST)
                                              ).choices[0].message.content

    alone = [answer_free(messages) for messages in free]
    with ThreadPoolExecutor(12) as pool:
        constrained = [pool.submit(answer_constrained, seed) for seed in range(8)]
        together = [pool.submit(answer_free, messages) for messages in free]
        assert [future.result() for future in together] == alone
        for future in constrained:
            jsonschema.validate(json.loads(future.result()), FORECAST)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_tool_calls_parse_and_validate(client: openai.OpenAI, tool_choice) -> None:
    for seed in range(3):
        request = dict(messages=PROMPT, max_tokens=300, temperature=1.0, seed=seed, tools=[WEATHER_TOOL, TIME_TOOL],
                       tool_choice=tool_choice)
        choice = client.chat.completions.create(model=MODEL, **request).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and len({call.id for call in calls}) == len(calls)
        for call in calls:
            assert call.type == "function"
            if isinstance(tool_choice, dict):
                assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        contents, streamed_calls, reasons = streamed(client, **request)
        assert reasons == ["tool_calls"] and contents == [""]
        assert [(c["name"], c["arguments"]) for c in streamed_calls[0]] == [
            (call.function.name, call.function.arguments) for call in calls]


def test_one_call_without_parallel_tool_calls_and_auto_gives_text_or_calls(client: openai.OpenAI) -> None:
    for seed in range(4):
        choice = client.chat.completions.create(
            model=MODEL, messages=PROMPT, max_tokens=300, temperature=1.0, seed=seed, tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice="required", parallel_tool_calls=False).choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    kinds = set()
    for seed in range(6):
        choice = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=60, temperature=1.0,
                                                seed=seed, tools=[WEATHER_TOOL, TIME_TOOL]).choices[0]
        if choice.message.tool_calls:
            kinds.add("calls")
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        else:
            kinds.add("text")
            assert not choice.message.content.lstrip(" ").startswith("<tool_call>")
    assert "text" in kinds


def test_a_conversation_with_calls_and_their_results_is_answered(client: openai.OpenAI) -> None:
    messages = [*PROMPT, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                              tools=[WEATHER_TOOL], tool_choice="none")
    assert response.choices[0].message.content is not None and response.usage.prompt_tokens > 40


@pytest.mark.parametrize(("request_fields", "complaint"), [
    ({"response_format": json_schema_format({"type": "object", "properties": {"a": {"type": "strin"}}})},
     "response_format"),
    ({"response_format": json_schema_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})},
     "response_format"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}, "response_format cannot be combined"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "same name"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_forms_are_refused_with_a_400_that_names_the_problem(server, request_fields: dict, complaint: str) -> None:
    response = requests.post(server.url + "/v1/chat/completions", timeout=60,
                             json={"model": MODEL, "messages": PROMPT, "max_tokens": 4, **request_fields})
    assert response.status_code == 400, response.text
    assert complaint in response.json()["error"]["message"]


class Forecast(BaseModel):
    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=14)
    unit: Literal["celsius", "fahrenheit"]


class GetWeather(BaseModel):
    """The weather forecast of a city."""

    city: str = Field(max_length=10)
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(scope="module")
def llm(server) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=1.0, max_tokens=300,
                      max_retries=0, timeout=120, seed=3)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_the_pydantic_model(llm: ChatOpenAI, method: str) -> None:
    structured = llm.with_structured_output(Forecast, method=method)
    answer = structured.invoke("What is the weather in Paris?")
    assert isinstance(answer, Forecast)
    streamed_answers = list(structured.stream("What is the weather in Paris?"))
    assert isinstance(streamed_answers[-1], Forecast)


def test_langchain_bind_tools_gets_validated_calls_and_answers_their_results(llm: ChatOpenAI) -> None:
    with_tools = llm.bind_tools([GetWeather], tool_choice="any")
    message = with_tools.invoke("What is the weather in Paris?")
    assert isinstance(message, AIMessage) and message.tool_calls
    for call in message.tool_calls:
        assert call["name"] == "GetWeather"
        GetWeather(**call["args"])
    chunks = list(with_tools.stream("What is the weather in Paris?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.tool_calls and all(GetWeather(**call["args"]) for call in merged.tool_calls)
    results = [ToolMessage('{"temperature": 21}', tool_call_id=call["id"]) for call in message.tool_calls]
    answer = llm.bind_tools([GetWeather]).invoke([HumanMessage("What is the weather in Paris?"), message, *results])
    assert isinstance(answer, AIMessage)


def test_a_server_whose_tokenizer_llguidance_cannot_read_serves_text_and_refuses_forms_with_a_400(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A WordPiece decoder (bench/random_checkpoint.py's) is one llguidance does not know: the server starts, answers
    free text, and refuses response_format and tools with a 400 instead of failing them in the engine."""
    folder = write_checkpoint(tmp_path_factory.mktemp("wordpiece") / "XVERSE-tiny")
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.save(str(folder / "tokenizer.json"))
    running = start_server(folder, folder.parent / "server.log")
    try:
        url, body = running.url + "/v1/chat/completions", {"model": MODEL, "messages": PROMPT, "max_tokens": 4}
        assert requests.post(url, json=body, timeout=60).status_code == 200
        for fields, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                              ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, "tools"),
                              ({"response_format": {"type": "json_object"}, "stream": True}, "response_format")):
            response = requests.post(url, json={**body, **fields}, timeout=60)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == param and "structured outputs and tool calls are off" in error["message"]
        assert "llguidance cannot read" in running.log()
    finally:
        stop_server(running)
