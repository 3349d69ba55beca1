"""XVERSE's own chat format: messages -> token ids, with left truncation by whole rounds."""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import ModelConfig
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """The messages or prompt cannot be turned into a prompt that fits; the message says what to change."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


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
    if messages[-1].role != "user":
        raise PromptError("the last message must have role 'user': it is the turn the model answers")


def encode_message(tokenizer: Tokenizer, message: Message) -> list[int]:
    if message.role == "system":
        return tokenizer.encode(f"Human: {message.content}\n")
    if message.role == "user":
        return tokenizer.encode(f"Human: {message.content}\n\n")
    return tokenizer.encode(f"Assistant: {message.content}") + [tokenizer.eos_token_id]


def encode_chat(tokenizer: Tokenizer, messages: list[Message], limit: int) -> list[int]:
    """Token ids of the conversation, ending with the live turn `Human: {user}\n\nAssistant: `.

    A round is a user message with the assistant replies after it. While the ids exceed `limit`,
    the oldest round is dropped; the system message and the live turn are always kept."""
    validate_messages(messages)
    system = messages[0] if messages[0].role == "system" else None
    head = encode_message(tokenizer, system) if system else []
    live_turn = tokenizer.encode(f"Human: {messages[-1].content}\n\nAssistant: ")
    rounds: list[list[int]] = []
    for message in messages[1 if system else 0:-1]:
        ids = encode_message(tokenizer, message)
        if message.role == "user" or not rounds:
            rounds.append(ids)
        else:
            rounds[-1] += ids
    total = len(head) + len(live_turn) + sum(len(r) for r in rounds)
    while total > limit and rounds:
        total -= len(rounds.pop(0))
    if total > limit:
        raise PromptError(
            f"the last message needs {total} prompt tokens (with the system message, if any); at most {limit} "
            "fit in the context window beside the tokens reserved for the answer: shorten it or lower max_tokens"
        )
    return head + [token for r in rounds for token in r] + live_turn
