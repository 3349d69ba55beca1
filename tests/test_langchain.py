"""LangChain's ChatOpenAI (langchain-openai) pointed at the server: sync and async, whole and streamed.

Greedy answers (temperature 0) are deterministic, so what LangChain returns is compared with what the
official `openai` client gets for the same request. ChatOpenAI sends its max_tokens as max_completion_tokens
and, with stream_usage, asks for the final usage chunk."""

from __future__ import annotations

import asyncio
import functools
import operator

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

MODEL = "XVERSE-7B-Chat"  # the default --served-model-name
MAX_TOKENS = 16
CONVERSATION = [SystemMessage("You are XChat."), HumanMessage("你好，你是谁？"),
                AIMessage("我是元象公司开发的人工智能语言模型。"), HumanMessage("请写一首关于大海的诗")]
CONVERSATION_AS_DICTS = [{"role": "system", "content": "You are XChat."},
                         {"role": "user", "content": "你好，你是谁？"},
                         {"role": "assistant", "content": "我是元象公司开发的人工智能语言模型。"},
                         {"role": "user", "content": "请写一首关于大海的诗"}]


@pytest.fixture(scope="module")
def llm(server) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0,
                      max_tokens=MAX_TOKENS, max_retries=0, timeout=60, stream_usage=True)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def openai_answer(client: openai.OpenAI, messages: list[dict]):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS)


def joined(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    """The chunks added up, as LangChain merges them: content concatenated, usage summed."""
    return functools.reduce(operator.add, chunks)


def test_invoke_returns_the_answer_with_usage_and_metadata(llm, client):
    expected = openai_answer(client, [{"role": "user", "content": "Tell me a story"}])
    message = llm.invoke("Tell me a story")
    assert isinstance(message, AIMessage)
    assert isinstance(message.content, str) and message.content
    assert message.content == expected.choices[0].message.content
    assert message.usage_metadata["input_tokens"] == expected.usage.prompt_tokens
    assert message.usage_metadata["output_tokens"] == expected.usage.completion_tokens
    assert message.usage_metadata["total_tokens"] == expected.usage.total_tokens
    assert message.response_metadata["model_name"] == MODEL
    assert message.response_metadata["finish_reason"] == expected.choices[0].finish_reason
    assert message.response_metadata["id"].startswith("chatcmpl-")


def test_stream_yields_chunks_that_join_to_the_invoked_answer(llm):
    whole = llm.invoke("What is the capital of France?")
    chunks = list(llm.stream("What is the capital of France?"))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    assert all(isinstance(chunk.content, str) for chunk in chunks)
    assert sum(1 for chunk in chunks if chunk.content) > 1, "the answer arrived in one piece: not streamed"
    merged = joined(chunks)
    assert merged.content == whole.content != ""
    # stream_usage: the server's final usage chunk becomes the merged message's usage_metadata.
    assert merged.usage_metadata == whole.usage_metadata
    assert merged.response_metadata["finish_reason"] == whole.response_metadata["finish_reason"]


def test_ainvoke_and_astream_give_the_same_answers_concurrently(llm):
    prompts = ["Tell me a story", "今天天气很好", "北京是中国的首都", "def add(a, b):"]
    expected = [llm.invoke(prompt).content for prompt in prompts]

    async def streamed(prompt: str) -> str:
        return "".join([chunk.content async for chunk in llm.astream(prompt)])

    async def whole(prompt: str) -> str:
        message = await llm.ainvoke(prompt)
        assert isinstance(message, AIMessage) and message.usage_metadata["output_tokens"] > 0
        return message.content

    async def main() -> list[str]:
        return await asyncio.gather(*(streamed(p) if i % 2 else whole(p) for i, p in enumerate(prompts)))

    assert asyncio.run(main()) == expected


def test_a_conversation_with_a_system_message(llm, client, tokenizer):
    expected = openai_answer(client, CONVERSATION_AS_DICTS)
    message = llm.invoke(CONVERSATION)
    assert message.content == expected.choices[0].message.content
    # XVERSE's chat format: the system message, the past round closed by end-of-text, then the live turn.
    encode = tokenizer.encode  # no begin-of-text token, as the server encodes each segment
    prompt = (encode("Human: You are XChat.\n") + encode("Human: 你好，你是谁？\n\n")
              + encode("Assistant: 我是元象公司开发的人工智能语言模型。") + [3]
              + encode("Human: 请写一首关于大海的诗\n\nAssistant: "))
    assert message.usage_metadata["input_tokens"] == len(prompt)
    streamed = joined(list(llm.stream(CONVERSATION)))
    assert streamed.content == message.content


def test_a_prompt_template_chain_ends_in_a_string(llm, client):
    chain = ChatPromptTemplate.from_messages([("system", "You are {name}."), ("human", "{question}")]) \
        | llm | StrOutputParser()
    answer = chain.invoke({"name": "XChat", "question": "Hello, who are you?"})
    expected = openai_answer(client, [{"role": "system", "content": "You are XChat."},
                                      {"role": "user", "content": "Hello, who are you?"}])
    assert answer == expected.choices[0].message.content
    assert "".join(chain.stream({"name": "XChat", "question": "Hello, who are you?"})) == answer


def test_batch_answers_each_prompt_as_alone(llm):
    prompts = ["sea", "sky", "Paris"]
    assert [m.content for m in llm.batch(prompts)] == [llm.invoke(p).content for p in prompts]


def test_sampling_settings_reach_the_server(llm):
    # A seed with temperature 1 repeats exactly; a different seed (almost surely) gives another answer.
    seeded = llm.bind(seed=7, temperature=1.0, top_p=1.0)
    first, second = seeded.invoke("Tell me a story").content, seeded.invoke("Tell me a story").content
    assert first == second
    others = {llm.bind(seed=seed, temperature=1.0, top_p=1.0).invoke("Tell me a story").content for seed in range(4)}
    assert len(others) > 1


def test_server_errors_surface_as_openai_exceptions(llm):
    with pytest.raises(openai.BadRequestError, match="at most .* are left"):
        llm.bind(max_tokens=100_000).invoke("Hello")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        llm.bind(model="gpt-4o").invoke("Hello")
