"""Log-probs in OpenAI's response shapes: per token for chat completions, as parallel lists for completions."""

from __future__ import annotations

from ..engine.messages import TokenLogprob
from ..model.tokenizer import Tokenizer


def chat_logprobs(tokenizer: Tokenizer, tokens: list[tuple[int, TokenLogprob]]) -> dict:
    """`choices[i].logprobs` of a chat completion (or of one streamed chunk, for its tokens)."""

    def entry(token: int, logprob: float) -> dict:
        return {"token": tokenizer.token_text(token), "logprob": logprob, "bytes": tokenizer.token_bytes(token)}

    content = [{**entry(token, found.logprob), "top_logprobs": [entry(*alternative) for alternative in found.top]}
               for token, found in tokens]
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """`choices[i].logprobs` of a completion, built token by token: tokens, token_logprobs (None where a token has
    none: the prompt's first), top_logprobs (token text -> log-prob, the most likely first) and text_offset (where
    each token's text starts in the choice's text, counting on from `offset`)."""

    def __init__(self, tokenizer: Tokenizer, offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.offset = offset

    def shape(self, tokens: list[tuple[int, TokenLogprob | None]]) -> dict:
        """The lists for these tokens; the next call's offsets continue after them."""
        shaped: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, found in tokens:
            text = self.tokenizer.token_text(token)
            shaped["tokens"].append(text)
            shaped["token_logprobs"].append(None if found is None else found.logprob)
            top = None
            if found is not None:
                top = {}
                for alternative, logprob in found.top:  # two ids with the same text: the likelier one shows
                    top.setdefault(self.tokenizer.token_text(alternative), logprob)
            shaped["top_logprobs"].append(top)
            shaped["text_offset"].append(self.offset)
            self.offset += len(text)
        return shaped
