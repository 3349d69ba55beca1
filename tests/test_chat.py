"""XVERSE's chat format, token for token, built from the literal segment strings of the model's own chat()."""

from __future__ import annotations

import dataclasses

import pytest

from xverse_serve.model.chat_format import (
    FunctionSpec,
    Message,
    PromptError,
    ToolCall,
    encode_chat,
    max_input_tokens,
    tools_prompt,
    validate_messages,
)
from xverse_serve.model.checkpoint import ModelConfig
from xverse_serve.model.tokenizer import Tokenizer

EOS = 3
NO_LIMIT = 10_000


def user(text: str) -> Message:
    return Message("user", text)


def assistant(text: str) -> Message:
    return Message("assistant", text)


def system(text: str) -> Message:
    return Message("system", text)


def test_tokenizer_adds_no_bos_and_decoding_skips_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello, who are you?")
    assert ids and tokenizer.bos_token_id not in ids
    assert tokenizer.decode([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]) == "Hello, who are you?"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2, 3)


def test_single_turn(tokenizer: Tokenizer) -> None:
    ids = encode_chat(tokenizer, [user("Hello, who are you?")], NO_LIMIT)
    assert ids == tokenizer.encode("Human: Hello, who are you?\n\nAssistant: ")


def test_single_turn_in_chinese(tokenizer: Tokenizer) -> None:
    ids = encode_chat(tokenizer, [user("你好，你是谁？")], NO_LIMIT)
    assert ids == tokenizer.encode("Human: 你好，你是谁？\n\nAssistant: ")


def test_past_rounds_are_encoded_segment_by_segment_with_eos_after_each_answer(tokenizer: Tokenizer) -> None:
    messages = [user("Hello"), assistant("I am XChat."), user("天气?"), assistant("很好。"), user("Tell me a story")]
    expected = (
        tokenizer.encode("Human: Hello\n\n") + tokenizer.encode("Assistant: I am XChat.") + [EOS]
        + tokenizer.encode("Human: 天气?\n\n") + tokenizer.encode("Assistant: 很好。") + [EOS]
        + tokenizer.encode("Human: Tell me a story\n\nAssistant: ")
    )
    assert encode_chat(tokenizer, messages, NO_LIMIT) == expected


def test_system_message_is_a_leading_human_line(tokenizer: Tokenizer) -> None:
    messages = [system("You are a poet."), user("Hello"), assistant("Hi."), user("A poem about the sea")]
    expected = (
        tokenizer.encode("Human: You are a poet.\n")
        + tokenizer.encode("Human: Hello\n\n") + tokenizer.encode("Assistant: Hi.") + [EOS]
        + tokenizer.encode("Human: A poem about the sea\n\nAssistant: ")
    )
    assert encode_chat(tokenizer, messages, NO_LIMIT) == expected


def test_consecutive_user_messages_are_each_their_own_segment(tokenizer: Tokenizer) -> None:
    ids = encode_chat(tokenizer, [user("first"), user("second")], NO_LIMIT)
    assert ids == tokenizer.encode("Human: first\n\n") + tokenizer.encode("Human: second\n\nAssistant: ")


# --- left truncation -----------------------------------------------------------------------------------


@pytest.fixture
def long_conversation(tokenizer: Tokenizer) -> tuple[list[Message], list[list[int]]]:
    """system, three past rounds, live turn; and the ids of each of those five parts."""
    messages = [
        system("You are XChat."),
        user("What is the capital of France?"), assistant("Paris is the capital of France."),
        user("今天天气很好"), assistant("我们去公园散步吧。"),
        user("Tell me a story about the sea"), assistant("The quick brown fox jumps over the lazy dog."),
        user("Now one about the sky"),
    ]
    parts = [tokenizer.encode("Human: You are XChat.\n")]
    for question, answer in zip(messages[1:-1:2], messages[2:-1:2]):
        parts.append(tokenizer.encode(f"Human: {question.content}\n\n")
                     + tokenizer.encode(f"Assistant: {answer.content}") + [EOS])
    parts.append(tokenizer.encode("Human: Now one about the sky\n\nAssistant: "))
    return messages, parts


def join(*parts: list[int]) -> list[int]:
    return [token for part in parts for token in part]


def test_a_conversation_that_fits_exactly_is_kept_whole(tokenizer: Tokenizer, long_conversation) -> None:
    messages, parts = long_conversation
    total = len(join(*parts))
    assert encode_chat(tokenizer, messages, total) == join(*parts)


def test_oldest_round_is_dropped_first_keeping_system_and_live_turn(tokenizer: Tokenizer, long_conversation) -> None:
    messages, (head, first, second, third, live) = long_conversation
    total = len(join(head, first, second, third, live))
    assert encode_chat(tokenizer, messages, total - 1) == join(head, second, third, live)
    assert encode_chat(tokenizer, messages, total - len(first)) == join(head, second, third, live)
    assert encode_chat(tokenizer, messages, total - len(first) - 1) == join(head, third, live)


def test_every_past_round_may_go_but_never_part_of_one(tokenizer: Tokenizer, long_conversation) -> None:
    messages, (head, first, second, third, live) = long_conversation
    assert encode_chat(tokenizer, messages, len(head) + len(live)) == join(head, live)
    assert encode_chat(tokenizer, messages, len(head) + len(third) + len(live) - 1) == join(head, live)


def test_too_long_even_alone_is_a_prompt_error(tokenizer: Tokenizer, long_conversation) -> None:
    messages, (head, *_, live) = long_conversation
    with pytest.raises(PromptError, match=f"needs {len(head) + len(live)} prompt tokens.*at most {len(head) + len(live) - 1}"):
        encode_chat(tokenizer, messages, len(head) + len(live) - 1)
    live_alone = [user("Now one about the sky")]
    with pytest.raises(PromptError):
        encode_chat(tokenizer, live_alone, len(live) - 1)
    assert encode_chat(tokenizer, live_alone, len(live)) == live


# --- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages, complaint", [
    ([], "empty"),
    ([Message("tool", "x"), user("hi")], r"messages\[0\].role is 'tool'"),
    ([user("hi"), assistant("hello")], "last message must have role 'user'"),
    ([system("s")], "last message must have role 'user'"),
    ([user("hi"), system("s"), user("again")], r"messages\[1\] is a system message"),
])
def test_invalid_conversations_are_prompt_errors(tokenizer: Tokenizer, messages: list[Message], complaint: str) -> None:
    with pytest.raises(PromptError, match=complaint):
        validate_messages(messages)
    with pytest.raises(PromptError, match=complaint):
        encode_chat(tokenizer, messages, NO_LIMIT)


def test_prompt_error_is_a_value_error() -> None:
    assert issubclass(PromptError, ValueError)


# --- input budget --------------------------------------------------------------------------------------


@pytest.mark.parametrize("truncation, max_model_len, max_new, expected", [
    (6144, 8192, 2048, 6144),  # XVERSE-7B-Chat's defaults: the tokenizer limit binds
    (6144, 8192, 1, 6144),
    (6144, 8192, 3000, 5192),  # L - max_new
    (6144, 8192, 6000, 4096),  # never less than half the context
    (6144, 8192, 100_000, 4096),
    (6144, 4096, 100, 3996),  # a shorter --max-model-len
    (192, 256, 10, 192),  # the tiny checkpoint
    (192, 256, 200, 128),
])
def test_max_input_tokens_is_upstream_formula(config: ModelConfig, truncation: int, max_model_len: int,
                                              max_new: int, expected: int) -> None:
    model_config = dataclasses.replace(config, max_tokenizer_truncation=truncation)
    assert max_input_tokens(model_config, max_model_len, max_new) == expected
    assert expected == min(truncation, max(max_model_len // 2, max_model_len - max_new))


# --- tools ---------------------------------------------------------------------------------------------

WEATHER = FunctionSpec("get_weather", "天气 in a city", {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]})
NOW = FunctionSpec("now", None, {"type": "object", "properties": {}})
TOOLS_BLOCK = (
    "You may call the following functions. Each line describes one as JSON: its name, what it does and the JSON "
    "schema of its arguments.\n"
    '{"name": "get_weather", "description": "天气 in a city", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}}, "required": ["city"]}}\n'
    '{"name": "now", "parameters": {"type": "object", "properties": {}}}\n'
    "To call functions, reply with the calls and nothing else, one call per line, each exactly in this form:\n"
    '<tool_call>{"name": "<function name>", "arguments": <the arguments as a JSON object>}</tool_call>\n'
    "Otherwise answer in plain text."
)
PARIS = ToolCall("get_weather", ' {"city": "Paris"} ')
PARIS_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
ROME_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'


def calling(text: str, *calls: ToolCall) -> Message:
    return Message("assistant", text, tool_calls=calls)


def tool(text: str, name: str | None = None) -> Message:
    return Message("tool", text, name=name)


def test_tools_block_lists_each_function_as_one_json_line_and_says_how_to_call() -> None:
    assert tools_prompt([WEATHER, NOW]) == TOOLS_BLOCK


def test_tools_make_a_system_message_when_there_is_none(tokenizer: Tokenizer) -> None:
    expected = tokenizer.encode(f"Human: {TOOLS_BLOCK}\n") + tokenizer.encode("Human: Weather?\n\nAssistant: ")
    assert encode_chat(tokenizer, [user("Weather?")], NO_LIMIT, tools=[WEATHER, NOW]) == expected


def test_tools_are_appended_to_an_existing_system_message(tokenizer: Tokenizer) -> None:
    expected = (tokenizer.encode(f"Human: You are XChat.\n\n{TOOLS_BLOCK}\n")
                + tokenizer.encode("Human: Weather?\n\nAssistant: "))
    messages = [system("You are XChat."), user("Weather?")]
    assert encode_chat(tokenizer, messages, NO_LIMIT, tools=[WEATHER, NOW]) == expected


def test_past_tool_calls_and_results_are_rendered_as_the_model_is_told_to_write_them(tokenizer: Tokenizer) -> None:
    messages = [user("Weather in Paris?"), calling("", PARIS), tool("18C, sunny"), assistant("It is 18C."),
                user("And in Rome? Paris too."), calling("Let me check.", ToolCall("get_weather", '{"city": "Rome"}'),
                                                          PARIS),
                tool("22C", name="get_weather"), tool("19C", name="get_weather"), assistant("Rome 22C, Paris 19C."),
                user("Thanks")]
    expected = (
        tokenizer.encode("Human: Weather in Paris?\n\n")
        + tokenizer.encode(f"Assistant: {PARIS_CALL}") + [EOS]
        + tokenizer.encode("Human: <tool_response>\n18C, sunny\n</tool_response>\n\n")
        + tokenizer.encode("Assistant: It is 18C.") + [EOS]
        + tokenizer.encode("Human: And in Rome? Paris too.\n\n")
        + tokenizer.encode(f"Assistant: Let me check.\n{ROME_CALL}\n{PARIS_CALL}") + [EOS]
        + tokenizer.encode('Human: <tool_response name="get_weather">\n22C\n</tool_response>\n'
                           '<tool_response name="get_weather">\n19C\n</tool_response>\n\n')
        + tokenizer.encode("Assistant: Rome 22C, Paris 19C.") + [EOS]
        + tokenizer.encode("Human: Thanks\n\nAssistant: ")
    )
    assert encode_chat(tokenizer, messages, NO_LIMIT) == expected


def test_a_call_without_arguments_text_is_rendered_with_an_empty_object(tokenizer: Tokenizer) -> None:
    expected = (
        tokenizer.encode("Human: Time?\n\n")
        + tokenizer.encode('Assistant: <tool_call>{"name": "now", "arguments": {}}</tool_call>') + [EOS]
        + tokenizer.encode("Human: <tool_response>\n12:00\n</tool_response>\n\nAssistant: ")
    )
    messages = [user("Time?"), calling("", ToolCall("now", "")), tool("12:00")]
    assert encode_chat(tokenizer, messages, NO_LIMIT) == expected


def test_a_conversation_ending_with_tool_results_makes_them_the_live_turn(tokenizer: Tokenizer) -> None:
    messages = [user("Weather in Paris and Rome?"), calling("", PARIS, ToolCall("get_weather", '{"city": "Rome"}')),
                tool("18C", name="get_weather"), tool("22C")]
    expected = (
        tokenizer.encode("Human: Weather in Paris and Rome?\n\n")
        + tokenizer.encode(f"Assistant: {PARIS_CALL}\n{ROME_CALL}") + [EOS]
        + tokenizer.encode('Human: <tool_response name="get_weather">\n18C\n</tool_response>\n'
                           "<tool_response>\n22C\n</tool_response>\n\nAssistant: ")
    )
    assert encode_chat(tokenizer, messages, NO_LIMIT) == expected


@pytest.fixture
def conversation_with_tools(tokenizer: Tokenizer) -> tuple[list[Message], list[list[int]]]:
    """system, a round with a call and its result, a plain round, the live turn; and the ids of each part."""
    messages = [system("You are XChat."), user("Weather in Paris?"), calling("", PARIS), tool("18C"),
                assistant("It is 18C."), user("Tell me a story"), assistant("The quick brown fox."), user("Another")]
    parts = [
        tokenizer.encode("Human: You are XChat.\n"),
        tokenizer.encode("Human: Weather in Paris?\n\n") + tokenizer.encode(f"Assistant: {PARIS_CALL}") + [EOS]
        + tokenizer.encode("Human: <tool_response>\n18C\n</tool_response>\n\n")
        + tokenizer.encode("Assistant: It is 18C.") + [EOS],
        tokenizer.encode("Human: Tell me a story\n\n") + tokenizer.encode("Assistant: The quick brown fox.") + [EOS],
        tokenizer.encode("Human: Another\n\nAssistant: "),
    ]
    return messages, parts


def test_truncation_drops_a_round_with_its_tool_calls_and_results_whole(tokenizer: Tokenizer,
                                                                        conversation_with_tools) -> None:
    messages, (head, with_tools, story, live) = conversation_with_tools
    assert encode_chat(tokenizer, messages, len(join(head, with_tools, story, live))) == \
        join(head, with_tools, story, live)
    assert encode_chat(tokenizer, messages, len(join(head, with_tools, story, live)) - 1) == join(head, story, live)


def test_a_round_waiting_on_tool_results_is_kept_whole_as_the_live_round(tokenizer: Tokenizer) -> None:
    messages = [user("Hello"), assistant("Hi."), user("Weather in Paris?"), calling("", PARIS), tool("18C")]
    past = tokenizer.encode("Human: Hello\n\n") + tokenizer.encode("Assistant: Hi.") + [EOS]
    live_round = (tokenizer.encode("Human: Weather in Paris?\n\n")
                  + tokenizer.encode(f"Assistant: {PARIS_CALL}") + [EOS]
                  + tokenizer.encode("Human: <tool_response>\n18C\n</tool_response>\n\nAssistant: "))
    assert encode_chat(tokenizer, messages, len(past) + len(live_round) - 1) == live_round
    with pytest.raises(PromptError, match=f"last round .* needs {len(live_round)} prompt tokens"):
        encode_chat(tokenizer, messages, len(live_round) - 1)


@pytest.mark.parametrize("messages, complaint", [
    ([user("hi"), tool("18C")], r"messages\[1\].role is 'tool', but a tool message must follow an assistant message "
                                "with tool_calls"),
    ([user("hi"), assistant("hello"), tool("18C")], r"messages\[2\].role is 'tool', but"),
    ([system("s"), tool("18C"), user("hi")], r"messages\[1\].role is 'tool', but"),
    ([user("hi"), calling("", PARIS)], "last message must have role 'user'"),
    ([Message("user", "hi", tool_calls=(PARIS,))], r"messages\[0\] has tool_calls; only assistant messages"),
])
def test_invalid_tool_conversations_are_prompt_errors(tokenizer: Tokenizer, messages: list[Message],
                                                      complaint: str) -> None:
    with pytest.raises(PromptError, match=complaint):
        encode_chat(tokenizer, messages, NO_LIMIT, tools=[WEATHER])


def test_tool_results_after_tool_results_or_a_call_are_valid() -> None:
    validate_messages([user("hi"), calling("", PARIS), tool("18C"), tool("19C")])
