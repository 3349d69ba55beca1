"""The OpenAI-compatible API, through the official `openai` client and raw HTTP against a real server.

Greedy requests (temperature 0) are deterministic, so a streamed answer can be compared with the same
request's non-streamed answer, and a stop string can be picked from an answer seen first."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest
import requests
from tokenizers import Tokenizer

MODEL = "XVERSE-7B-Chat"  # the default --served-model-name
PROMPTS = ["Tell me a story", "What is the capital of France?", "今天天气很好", "北京是中国的首都",
           "Hello, who are you?", "请写一首关于大海的诗", "sky", "def add(a, b):"]
# Prompts and a budget under which greedy answers may end on their own (end-of-text) before max_tokens.
EARLY_END_PROMPTS = ["sea", "天气", "写诗", "hi 😀", "Paris", "fox", "dog", "1", "2", "a", "b", "谁"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat(client: openai.OpenAI, prompt: str, max_tokens: int = 24, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=user(prompt), temperature=kwargs.pop("temperature", 0),
                                          max_tokens=max_tokens, **kwargs)


def chat_text(client: openai.OpenAI, prompt: str, max_tokens: int = 24, **kwargs) -> str:
    return chat(client, prompt, max_tokens, **kwargs).choices[0].message.content


def chat_stream(client: openai.OpenAI, prompt: str, max_tokens: int = 24, **kwargs) -> list:
    return list(chat(client, prompt, max_tokens, stream=True, **kwargs))


def content_deltas(chunks: list) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def finish_reasons(chunks: list) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def completion_stream(client: openai.OpenAI, prompt: str, max_tokens: int = 24, **kwargs) -> list:
    return list(client.completions.create(model=MODEL, prompt=prompt, temperature=kwargs.pop("temperature", 0),
                                          max_tokens=max_tokens, stream=True, **kwargs))


def completion_text(client: openai.OpenAI, prompt: str, max_tokens: int = 24, **kwargs) -> str:
    return client.completions.create(model=MODEL, prompt=prompt, temperature=kwargs.pop("temperature", 0),
                                     max_tokens=max_tokens, **kwargs).choices[0].text


def clean_piece(text: str, start: int, length: int) -> str | None:
    """text[start:start+length] if it is plain printable text (a good stop string), else None."""
    piece = text[start:start + length]
    if len(piece) == length and piece.isprintable() and "\ufffd" not in piece and piece.strip() == piece:
        return piece
    return None


# --- models ---------------------------------------------------------------------------------------------

def test_models_list_names_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_the_model_name_may_be_given_in_any_case(client):
    response = client.chat.completions.create(model=MODEL.lower(), messages=user("Hello"), max_tokens=4)
    assert response.model == MODEL


# --- chat completions -------------------------------------------------------------------------------------

def test_chat_completion_has_openais_shape(client, tokenizer):
    response = chat(client, "Hello, who are you?", 8)
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == MODEL
    [choice] = response.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    # XVERSE's chat format: the prompt is exactly `Human: {user}\n\nAssistant: `.
    expected_prompt = tokenizer.encode("Human: Hello, who are you?\n\nAssistant: ", add_special_tokens=False).ids
    assert response.usage.prompt_tokens == len(expected_prompt)
    assert response.usage.prompt_tokens + response.usage.completion_tokens == response.usage.total_tokens


@pytest.mark.parametrize("prompt", PROMPTS[:4])
def test_streamed_chat_text_equals_the_non_streamed_text(client, prompt):
    whole = chat(client, prompt, 32).choices[0]
    chunks = chat_stream(client, prompt, 32)
    assert "".join(content_deltas(chunks)) == whole.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert finish_reasons(chunks) == [whole.finish_reason]
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_finish_reason_is_length_when_max_tokens_is_reached(client):
    response = chat(client, "Tell me a story", 7)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 7


def test_finish_reason_is_stop_when_the_model_ends_its_answer(client):
    ended = [r for r in (chat(client, p, 32) for p in EARLY_END_PROMPTS) if r.choices[0].finish_reason == "stop"]
    assert ended, "no candidate prompt ended before max_tokens: pick new EARLY_END_PROMPTS"
    for response in ended:
        assert response.usage.completion_tokens <= 32


def test_stream_options_include_usage_adds_a_final_usage_chunk(client):
    plain = chat(client, "What is the capital of France?", 12)
    chunks = chat_stream(client, "What is the capital of France?", 12, stream_options={"include_usage": True})
    *content, last = chunks
    assert last.choices == []
    assert last.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == \
        plain.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
    assert all(c.usage is None for c in content)


def test_streams_carry_no_usage_unless_asked(client):
    assert all(c.usage is None for c in chat_stream(client, "Hello", 6))


def test_a_conversation_with_system_message_and_history(client, tokenizer):
    messages = [{"role": "system", "content": "You are XChat."},
                {"role": "user", "content": "你好，你是谁？"},
                {"role": "assistant", "content": "我是元象公司开发的人工智能语言模型。"},
                {"role": "user", "content": [{"type": "text", "text": "请写一首"}, {"type": "text", "text": "关于大海的诗"}]}]
    response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    expected = (encode("Human: You are XChat.\n") + encode("Human: 你好，你是谁？\n\n")
                + encode("Assistant: 我是元象公司开发的人工智能语言模型。") + [3] + encode("Human: 请写一首关于大海的诗\n\nAssistant: "))
    assert response.usage.prompt_tokens == len(expected)


def test_a_conversation_longer_than_the_context_drops_its_oldest_rounds(client):
    rounds = []
    for i in range(40):
        rounds += [{"role": "user", "content": f"Tell me a story about the sea and the sky, part {i}."},
                   {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}]
    response = client.chat.completions.create(model=MODEL, messages=[*rounds, *user("Go on.")], temperature=0,
                                              max_tokens=16)
    assert response.usage.total_tokens <= 256  # the tiny model's context
    assert response.usage.completion_tokens == 16


# --- stop strings --------------------------------------------------------------------------------------

def pick_stop(text: str, length: int = 3) -> str:
    for start in range(4, len(text)):
        piece = clean_piece(text, start, length)
        if piece:
            return piece
    pytest.fail(f"no clean {length}-character piece in {text!r}")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_cuts_the_answer_before_it(client, stream):
    full = chat_text(client, "Tell me a story", 32)
    stop = pick_stop(full)
    expected = full[:full.index(stop)]
    if stream:
        chunks = chat_stream(client, "Tell me a story", 32, stop=stop)
        deltas = content_deltas(chunks)
        assert "".join(deltas) == expected
        assert not any(stop in d for d in deltas)
        assert finish_reasons(chunks) == ["stop"]
    else:
        response = chat(client, "Tell me a story", 32, stop=stop)
        assert response.choices[0].message.content == expected
        assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_earliest_of_several_stop_strings_wins(client, stream):
    full = chat_text(client, "What is the capital of France?", 32)
    early, late = pick_stop(full[: len(full) // 2], 2), pick_stop(full[len(full) // 2:], 2)
    stops = ["never in the answer", late, early]
    expected = full[:min(full.index(early), full.index(late))]
    if stream:
        text = "".join(content_deltas(chat_stream(client, "What is the capital of France?", 32, stop=stops)))
    else:
        text = chat_text(client, "What is the capital of France?", 32, stop=stops)
    assert text == expected


def test_a_stop_string_spanning_two_stream_deltas_never_leaks(client):
    prompt = "北京是中国的首都"
    deltas = content_deltas(chat_stream(client, prompt, 32))
    full = "".join(deltas)
    # A stop string made of the end of one delta and the start of the next: the server must hold
    # the first half back until it knows whether the second half follows.
    stop = None
    for first, second in zip(deltas, deltas[1:]):
        candidate = first[-2:] + second[:2]
        if clean_piece(candidate, 0, len(candidate)) and len(candidate) == 4:
            stop = candidate
            break
    assert stop, f"no delta boundary with clean text around it in {deltas!r}"
    chunks = chat_stream(client, prompt, 32, stop=[stop])
    streamed = content_deltas(chunks)
    assert "".join(streamed) == full[:full.index(stop)]
    assert finish_reasons(chunks) == ["stop"]


def test_text_held_back_as_a_possible_stop_string_is_released_at_the_end(client):
    whole = chat(client, "Tell me a story", 16).choices[0]
    full = whole.message.content
    stop = full.rstrip("\ufffd")[-2:] + "never follows"  # the answer ends with the start of the stop string
    response = chat(client, "Tell me a story", 16, stop=stop).choices[0]
    assert (response.message.content, response.finish_reason) == (full, whole.finish_reason)
    chunks = chat_stream(client, "Tell me a story", 16, stop=stop)
    assert "".join(content_deltas(chunks)) == full
    assert finish_reasons(chunks) == [whole.finish_reason]


def test_a_stop_string_only_in_the_prompt_changes_nothing(client):
    prompt = "Tell me a story about XYZZY"
    assert chat_text(client, prompt, 16, stop="XYZZY") == chat_text(client, prompt, 16)


# --- seeds ---------------------------------------------------------------------------------------------

def test_a_seed_makes_sampling_repeatable(client):
    kwargs = dict(temperature=1.0, top_p=1.0, seed=1234)
    first = chat_text(client, "Tell me a story", 24, **kwargs)
    second = chat_text(client, "Tell me a story", 24, **kwargs)
    streamed = "".join(content_deltas(chat_stream(client, "Tell me a story", 24, **kwargs)))
    assert first == second == streamed


def test_different_seeds_give_different_samples(client):
    texts = {chat_text(client, "Tell me a story", 24, temperature=1.0, top_p=1.0, seed=seed) for seed in range(4)}
    assert len(texts) > 1


# --- completions -----------------------------------------------------------------------------------------

def test_completion_has_openais_shape(client, tokenizer):
    response = client.completions.create(model=MODEL, prompt="The quick brown fox", temperature=0, max_tokens=9)
    assert response.object == "text_completion"
    assert response.model == MODEL
    [choice] = response.choices
    assert isinstance(choice.text, str)
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(tokenizer.encode("The quick brown fox", add_special_tokens=False).ids)
    assert response.usage.completion_tokens == 9
    assert response.usage.total_tokens == response.usage.prompt_tokens + 9


@pytest.mark.parametrize("prompt", ["The quick brown fox", "今天天气很好，", "def add(a, b):\n"])
def test_streamed_completion_text_equals_the_non_streamed_text(client, prompt):
    text = completion_text(client, prompt, 32)
    chunks = completion_stream(client, prompt, 32, stream_options={"include_usage": True})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 32


def test_completion_prompt_may_be_a_one_element_list(client):
    response = client.completions.create(model=MODEL, prompt=["The quick brown fox"], temperature=0, max_tokens=8)
    assert response.choices[0].text == completion_text(client, "The quick brown fox", 8)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_stop_strings(client, stream):
    full = completion_text(client, "Paris is the capital of", 32)
    stop = pick_stop(full)
    if stream:
        chunks = completion_stream(client, "Paris is the capital of", 32, stop=[stop])
        text = "".join(c.choices[0].text for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        text = completion_text(client, "Paris is the capital of", 32, stop=[stop])
    assert text == full[:full.index(stop)]


# --- streaming never splits a character -------------------------------------------------------------------

def byte_fallback_characters(text: str, tokenizer: Tokenizer) -> list[str]:
    """Multi-byte characters of `text` that no token spells: the model wrote them as <0xNN> byte tokens."""
    spelled = set("".join(tokenizer.get_vocab()))
    return [ch for ch in text if len(ch.encode()) > 1 and ch not in spelled and ch != "\ufffd"]


def test_streamed_deltas_hold_whole_characters_only(client, tokenizer):
    """A rare character arrives as 2-4 byte tokens; no delta may carry part of one (a U+FFFD in its place)."""
    candidates = PROMPTS + EARLY_END_PROMPTS + ["The quick brown fox", "1234567890", "sea and sky"]
    checked = 0
    for prompt in candidates:
        text = chat_text(client, prompt, 32)
        rare = byte_fallback_characters(text, tokenizer)
        if not rare:
            continue
        deltas = content_deltas(chat_stream(client, prompt, 32))
        # A split character would show as U+FFFD at the end of one delta and the start of the next.
        assert "".join(deltas) == text
        for ch in rare:
            assert any(ch in d for d in deltas), f"{ch!r} never arrives whole in {deltas!r}"
        checked += 1
        if checked == 3:
            break
    assert checked, ("no candidate's greedy answer holds a character made of byte tokens: either the detokenizer "
                     "turns them into U+FFFD, or the candidate prompts need changing")


def test_streamed_completion_deltas_hold_whole_characters_only(client, tokenizer):
    checked = 0
    for prompt in ["今天天气很好", "北京是中国的首都", "Tell me a story", "1234567890", "sky", "海", "你好"]:
        text = completion_text(client, prompt, 32)
        if not byte_fallback_characters(text, tokenizer):
            continue
        deltas = [c.choices[0].text for c in completion_stream(client, prompt, 32)]
        assert "".join(deltas) == text
        checked += 1
    assert checked, ("no candidate's greedy completion holds a character made of byte tokens: either the "
                     "detokenizer turns them into U+FFFD, or the candidate prompts need changing")


# --- raw wire format -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
    ("/v1/completions", {"prompt": "Hello"}),
])
def test_server_sent_events_wire_format(server, path, body):
    response = requests.post(server.url + path, json={**body, "stream": True, "max_tokens": 8, "temperature": 0,
                                                      "stream_options": {"include_usage": True}},
                             stream=True, timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.content.decode("utf-8")
    events = raw.split("\n\n")
    assert events[-1] == "", "the stream ends with a blank line after its last event"
    events = events[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(event[len("data: "):]) for event in events[:-1]]
    assert len({p["id"] for p in payloads}) == 1
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 8
    finished = [p for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
    assert len(finished) == 1 and finished[0]["choices"][0]["finish_reason"] == "length"


# --- async client ---------------------------------------------------------------------------------------

def test_async_client_gets_the_same_answers(server, client):
    expected = [chat_text(client, p, 16) for p in PROMPTS[:4]]

    async def main() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        async def streamed(prompt: str) -> str:
            stream = await async_client.chat.completions.create(model=MODEL, messages=user(prompt), temperature=0,
                                                                max_tokens=16, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def whole(prompt: str) -> str:
            response = await async_client.chat.completions.create(model=MODEL, messages=user(prompt), temperature=0,
                                                                  max_tokens=16)
            return response.choices[0].message.content

        try:
            return await asyncio.gather(*(streamed(p) if i % 2 else whole(p) for i, p in enumerate(PROMPTS[:4])))
        finally:
            await async_client.close()

    assert asyncio.run(main()) == expected


# --- /tokenize and /detokenize (vLLM's shapes) ------------------------------------------------------------------

def test_tokenize_a_prompt_gives_the_ids_completions_uses(server, tokenizer):
    body = requests.post(server.url + "/tokenize", json={"prompt": "北京是中国的首都", "return_token_strs": True},
                         timeout=30).json()
    ids = tokenizer.encode("北京是中国的首都", add_special_tokens=False).ids
    assert body == {"count": len(ids), "max_model_len": 256, "tokens": ids,
                    "token_strs": [tokenizer.id_to_token(i) for i in ids]}


def test_tokenize_messages_gives_xverses_chat_format_and_the_prompt_tokens_chat_completions_counts(server, client,
                                                                                                  tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "sky"}]
    body = requests.post(server.url + "/tokenize", json={"messages": messages, "model": MODEL}, timeout=30).json()

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    eos = 3
    assert body["tokens"] == (ids("Human: Be brief.\n") + ids("Human: hi\n\n") + ids("Assistant: hello") + [eos]
                              + ids("Human: sky\n\nAssistant: "))
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert reply.usage.prompt_tokens == body["count"]


def test_detokenize_gives_the_text_back(server, tokenizer):
    ids = tokenizer.encode("今天天气很好, fine", add_special_tokens=False).ids
    body = requests.post(server.url + "/detokenize", json={"tokens": ids}, timeout=30).json()
    assert body == {"prompt": tokenizer.decode(ids)}


@pytest.mark.parametrize("path, body, words", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "not both"),
    ("/tokenize", {}, "neither"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "does not exist"),
    ("/detokenize", {"tokens": [5, -1]}, "outside the vocabulary"),
    ("/detokenize", {"tokens": [10**9]}, "outside the vocabulary"),
    ("/detokenize", {"tokens": "5"}, "tokens"),
])
def test_bad_tokenize_requests_get_a_4xx_naming_the_problem(server, path, body, words):
    response = requests.post(server.url + path, json=body, timeout=30)
    assert 400 <= response.status_code < 500
    assert words in response.json()["error"]["message"]


# --- presence_penalty, frequency_penalty, logit_bias -----------------------------------------------------------

def test_logit_bias_forces_and_bans_tokens_through_the_openai_client(client, tokenizer):
    a, b = 200, 201
    forced = completion_text(client, "sky", max_tokens=3, logit_bias={str(a): 100, str(b): 99})
    assert forced == tokenizer.decode([a] * 3)
    banned = completion_text(client, "sky", max_tokens=3, logit_bias={str(a): -100, str(b): 99})
    assert banned == tokenizer.decode([b] * 3)
    reply = chat(client, "sky", max_tokens=2, logit_bias={str(b): 100})
    assert reply.choices[0].message.content == tokenizer.decode([b] * 2)


def test_negative_presence_and_frequency_penalties_make_greedy_answers_repeat(client):
    """OpenAI's penalties subtract from the logits of generated tokens; below zero they favour them, so the tiny
    model's greedy answer comes to repeat itself, streamed or not, chat or completions."""
    plain = completion_text(client, "fox", max_tokens=24)
    repeating = completion_text(client, "fox", max_tokens=24, presence_penalty=-2, frequency_penalty=-2)
    assert repeating != plain
    assert len(set(repeating.split())) < len(set(plain.split()))
    chunks = completion_stream(client, "fox", max_tokens=24, presence_penalty=-2, frequency_penalty=-2)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == repeating
    chat_plain = chat_text(client, "fox")
    assert chat_text(client, "fox", presence_penalty=-2, frequency_penalty=-2) != chat_plain


# --- logprobs ------------------------------------------------------------------------------------------------

def test_chat_logprobs_come_per_token_in_openais_shape_streamed_or_not(client, tokenizer):
    reply = chat(client, "sky", max_tokens=8, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    assert "".join(entry.token for entry in content).strip() != ""
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the token is the most likely
        assert entry.token == entry.top_logprobs[0].token and bytes(entry.bytes).decode(errors="replace")
    streamed = [entry for chunk in chat_stream(client, "sky", max_tokens=8, logprobs=True, top_logprobs=3)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert chat(client, "sky", max_tokens=4).choices[0].logprobs is None


def test_completion_logprobs_are_parallel_lists_with_text_offsets(client):
    choice = client.completions.create(model=MODEL, prompt="fox", max_tokens=6, temperature=0, logprobs=2).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 2 and max(top.values()) == logprob and top[token] == logprob
    chunks = completion_stream(client, "fox", max_tokens=6, logprobs=2)
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == logprobs.token_logprobs


@pytest.mark.parametrize("path, body, words", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "needs logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
])
def test_bad_logprobs_requests_get_a_400(server, path, body, words):
    response = requests.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 400 and words in response.json()["error"]["message"]


# --- echo, token-id prompts, several prompts (what lm-evaluation-harness sends) --------------------------------

def test_echo_with_logprobs_gives_every_prompt_tokens_log_prob_the_first_none(server, tokenizer):
    """lm-evaluation-harness's loglikelihood request: prompt as token ids, echo, logprobs 1, max_tokens 1."""
    ids = tokenizer.encode("The fox jumps over the dog", add_special_tokens=False).ids
    body = {"prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234,
            "model": MODEL}
    choice = requests.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 1 and choice["text"].startswith(tokenizer.decode(ids))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert [len(top) for top in logprobs["top_logprobs"][1:]] == [1] * len(ids)
    generated = logprobs["token_logprobs"][-1]
    assert generated == max(logprobs["top_logprobs"][-1].values())  # greedy: the token is the top one
    # The same with max_tokens 0: the prompt alone, the same log-probs.
    only_prompt = requests.post(server.url + "/v1/completions", json={**body, "max_tokens": 0},
                                timeout=60).json()["choices"][0]
    assert only_prompt["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][:-1]
    assert only_prompt["text"] == tokenizer.decode(ids) and only_prompt["finish_reason"] == "length"


def test_several_prompts_get_a_choice_each_equal_to_their_answers_alone(client, tokenizer):
    prompts = ["fox", "sky", "今天天气很好"]
    alone = [completion_text(client, prompt, max_tokens=6) for prompt in prompts]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == alone
    assert batch.usage.prompt_tokens == sum(len(tokenizer.encode(p, add_special_tokens=False).ids) for p in prompts)
    streamed = {i: "" for i in range(3)}
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert list(streamed.values()) == alone
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == alone


def test_streamed_echo_starts_each_choice_with_its_prompt(client):
    chunks = completion_stream(client, "fox", max_tokens=5, echo=True, logprobs=0)
    first = next(c for c in chunks if c.choices)
    assert first.choices[0].text.startswith("fox")
    assert first.choices[0].logprobs.token_logprobs[0] is None
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "fox" + completion_text(client, "fox", max_tokens=5)


@pytest.mark.parametrize("body, words", [
    ({"prompt": [[5, 100000000]]}, "outside the vocabulary"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": ["a"] * 65}, "prompt"),
])
def test_bad_completion_prompts_get_a_400(server, body, words):
    response = requests.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and words in response.json()["error"]["message"]


# --- n > 1 ------------------------------------------------------------------------------------------------

def test_n_choices_each_answer_as_a_request_alone_with_seed_plus_their_index(client):
    reply = chat(client, "Tell me a story", max_tokens=10, temperature=0.9, seed=7, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    alone = [chat(client, "Tell me a story", max_tokens=10, temperature=0.9, seed=7 + j) for j in range(3)]
    assert texts == [a.choices[0].message.content for a in alone]
    assert len(set(texts)) > 1
    assert reply.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert reply.usage.prompt_tokens == alone[0].usage.prompt_tokens
    streamed = {j: "" for j in range(3)}
    for chunk in chat_stream(client, "Tell me a story", max_tokens=10, temperature=0.9, seed=7, n=3):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert list(streamed.values()) == texts


def test_n_with_several_prompts_orders_choices_by_prompt_then_answer(client):
    batch = client.completions.create(model=MODEL, prompt=["fox", "sky"], max_tokens=5, temperature=0, n=2)
    texts = [c.text for c in sorted(batch.choices, key=lambda c: c.index)]
    fox, sky = completion_text(client, "fox", max_tokens=5), completion_text(client, "sky", max_tokens=5)
    assert texts == [fox, fox, sky, sky]


def test_n_beyond_what_the_kv_cache_holds_is_a_400(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "n": 64, "max_tokens": 200}
    response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert "KV-cache blocks" in response.json()["error"]["message"] and response.json()["error"]["param"] == "n"
