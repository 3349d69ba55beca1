"""XVERSE's own chat format: messages -> token ids, with left truncation by whole rounds.

XVERSE-7B-Chat has no native tool format, so tool calling is taught in the prompt: the functions and the
calling convention go into the system message (see `tools_prompt`), past calls are rendered the way the model
is told to write them, and tool results come back as a Human turn of `<tool_response>` blocks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from .checkpoint import ModelConfig
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOLS_INTRO = ("You may call the following functions. Each line describes one as JSON: its name, what it does and "
               "the JSON schema of its arguments.")
TOOLS_HOW_TO_CALL = (
    "To call functions, reply with the calls and nothing else, one call per line, each exactly in this form:\n"
    f'{TOOL_CALL_OPEN}{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}{TOOL_CALL_CLOSE}\n'
    "Otherwise answer in plain text."
)


class PromptError(ValueError):
    """The messages or prompt cannot be turned into a prompt that fits; the message says what to change."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the JSON text of the arguments object


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    description: str | None
    parameters: dict  # a JSON schema of the arguments object


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant messages only
    name: str | None = None  # tool messages: the function whose result `content` is


def max_input_tokens(config: ModelConfig, max_model_len: int, max_new_tokens: int) -> int:
    """As upstream chat(): at least half the context for the input, never more than the tokenizer limit."""
    return min(config.max_tokenizer_truncation, max_model_len, max(max_model_len // 2, max_model_len - max_new_tokens))


def validate_messages(messages: list[Message]) -> None:
    if not messages:
        raise PromptError("messages is empty: send at least one message with role 'user'")
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise PromptError(f"messages[{index}].role is {message.role!r}; use one of {', '.join(ROLES)}")
        if message.role == "system" and index != 0:
            raise PromptError(f"messages[{index}] is a system message; only the first message may be one")
        if message.tool_calls and message.role != "assistant":
            raise PromptError(f"messages[{index}] has tool_calls; only assistant messages may have them")
        if message.role == "tool" and not follows_tool_calls(messages, index):
            raise PromptError(f"messages[{index}].role is 'tool', but a tool message must follow an assistant "
                              "message with tool_calls (or another tool message)")
    if messages[-1].role not in ("user", "tool"):
        raise PromptError("the last message must have role 'user' (or 'tool', the results of the calls the model "
                          "made): it is the turn the model answers")


def follows_tool_calls(messages: list[Message], index: int) -> bool:
    previous = messages[index - 1] if index else None
    return previous is not None and (previous.role == "tool" or bool(previous.tool_calls))


def tools_prompt(tools: Sequence[FunctionSpec]) -> str:
    """The block that teaches the model its functions, added to the system message:

    You may call the following functions. Each line describes one as JSON: its name, what it does and the JSON
    schema of its arguments.
    {"name": "get_weather", "description": "...", "parameters": {...}}
    To call functions, reply with the calls and nothing else, one call per line, each exactly in this form:
    <tool_call>{"name": "<function name>", "arguments": <the arguments as a JSON object>}</tool_call>
    Otherwise answer in plain text.
    """
    lines = [json.dumps({"name": tool.name, **({"description": tool.description} if tool.description is not None
                                                else {}), "parameters": tool.parameters}, ensure_ascii=False)
             for tool in tools]
    return "\n".join([TOOLS_INTRO, *lines, TOOLS_HOW_TO_CALL])


def tool_call_prefix(name: str) -> str:
    """What a call says before its arguments; the grammar and the parsers match this same text."""
    return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '


def format_tool_call(call: ToolCall) -> str:
    # Clients send "" for a call without arguments; the model was told to write an object.
    return f"{TOOL_CALL_OPEN}{tool_call_prefix(call.name)}{call.arguments.strip() or '{}'}}}{TOOL_CALL_CLOSE}"


def format_tool_response(message: Message) -> str:
    opening = "<tool_response>" if message.name is None else \
        f"<tool_response name={json.dumps(message.name, ensure_ascii=False)}>"
    return f"{opening}\n{message.content}\n</tool_response>"


def split_turns(messages: list[Message]) -> list[list[Message]]:
    """Each user or assistant message is a turn of its own; a run of tool messages is one turn."""
    turns: list[list[Message]] = []
    for message in messages:
        if message.role == "tool" and turns and turns[-1][0].role == "tool":
            turns[-1].append(message)
        else:
            turns.append([message])
    return turns


def human_text(turn: list[Message]) -> str:
    if turn[0].role == "tool":
        return "\n".join(format_tool_response(message) for message in turn)
    return turn[0].content


def encode_turn(tokenizer: Tokenizer, turn: list[Message]) -> list[int]:
    message = turn[0]
    if message.role != "assistant":
        return tokenizer.encode(f"Human: {human_text(turn)}\n\n")
    calls = "\n".join(format_tool_call(call) for call in message.tool_calls)
    separator = "\n" if message.content and calls else ""
    return tokenizer.encode(f"Assistant: {message.content}{separator}{calls}") + [tokenizer.eos_token_id]


def encode_chat(tokenizer: Tokenizer, messages: list[Message], limit: int,
                tools: Sequence[FunctionSpec] = ()) -> list[int]:
    """Token ids of the conversation, ending with the live turn `Human: {user or tool results}\n\nAssistant: `.

    With `tools`, `tools_prompt` is added to the system message (one is made if there is none).
    A round is a user message with the assistant replies and tool results after it. While the ids exceed
    `limit`, the oldest round is dropped; the system message and the last round are always kept (when the
    conversation ends with tool results, the last round holds the question and the calls they answer)."""
    validate_messages(messages)
    system = messages[0].content if messages[0].role == "system" else None
    if tools:
        system = tools_prompt(tools) if system is None else f"{system}\n\n{tools_prompt(tools)}"
    head = tokenizer.encode(f"Human: {system}\n") if system is not None else []
    *past, live = split_turns(messages[1:] if messages[0].role == "system" else messages)
    rounds: list[list[int]] = []
    for turn in past:
        ids = encode_turn(tokenizer, turn)
        if turn[0].role == "user" or not rounds:
            rounds.append(ids)
        else:
            rounds[-1] += ids
    live_round_is_live_turn = live[0].role == "user"  # tool results join the round of the calls they answer
    live_turn = tokenizer.encode(f"Human: {human_text(live)}\n\nAssistant: ")
    if live_round_is_live_turn:
        rounds.append(live_turn)
    else:
        rounds[-1] += live_turn
    total = len(head) + sum(len(r) for r in rounds)
    while total > limit and len(rounds) > 1:
        total -= len(rounds.pop(0))
    if total > limit:
        what = "the last message needs" if live_round_is_live_turn else \
            "the last round (from the last user message to the tool results) needs"
        raise PromptError(
            f"{what} {total} prompt tokens (with the system message, if any); at most {limit} "
            "fit in the context window beside the tokens reserved for the answer: shorten it or lower max_tokens"
        )
    return head + [token for r in rounds for token in r]
