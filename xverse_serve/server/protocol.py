"""Request bodies of every route, as pydantic models: what is accepted, and what is refused with a 400."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Tag, field_validator, model_validator

from ..model.chat_format import Message

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_CHOICES = 64  # n
MAX_LOGIT_BIAS = 1024  # OpenAI allows 300; beyond this a request is refused, not parsed
MAX_MESSAGES = 2048  # far more turns than an 8K-token context holds; beyond it a request is refused, not parsed


class StrictBody(BaseModel):
    # Unknown fields and wrong types are errors, never silently ignored or coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


def _valid_unicode(text: str) -> str:
    # JSON escapes can carry lone UTF-16 surrogates ("\ud800"): not text, and the tokenizer refuses them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone surrogate (\\u{ord(text[exc.start]):04x}) at position {exc.start}, "
                         "which is not valid Unicode text") from None
    return text


# Text the tokenizer will read; the tag keeps union error messages reading "prompt.str: ...".
Text = Annotated[str, AfterValidator(_valid_unicode), Tag("str")]


class TextPart(StrictBody):
    type: Literal["text"]
    text: Text


class ChatMessage(StrictBody):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def to_message(self) -> Message:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return Message(self.role, content)


class SamplingFields(StrictBody):
    """Sampling overrides shared by every route; None means the model's generation_config.json value."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None  # beyond the vocabulary: no cut
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None


class SeedRequest(SamplingFields):
    """POST / — the seed recipe's body, with optional history and sampling overrides."""

    prompt: Text
    history: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES - 1)] = []
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None


class StreamOptions(StrictBody):
    include_usage: bool = False


StopField = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None


class OpenAIFields(SamplingFields):
    """Fields common to /v1/chat/completions and /v1/completions. Fields of the OpenAI API that this
    server does not implement are accepted only at their neutral value, so no request is half-served."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1  # answers to each prompt, computed from one prefill
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    # Token id (as a string: JSON's keys are) -> bias added to its logit; ids are checked against the vocabulary.
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
        return bias

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(token), bias) for token, bias in (self.logit_bias or {}).items()))

    def logprobs_asked(self) -> int | None:
        """How many alternatives each token's log-probs list, or None for no log-probs (each request kind says)."""
        return None

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop == "":
            raise ValueError("a stop string must not be empty")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(OpenAIFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list, Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    response_format: dict | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict | None) -> dict | None:
        if value is not None and value.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprobs_asked(self) -> int | None:
        """How many alternatives each token's log-probs list, or None for no log-probs."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1 << 20)]


class CompletionRequest(OpenAIFields):
    """A prompt is text or token ids; several prompts (a list of either) get a choice each, in order."""

    prompt: (Text | Annotated[TokenIds, Tag("list[int]")]
             | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS), Tag("list[str]")]
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), Tag("list[list[int]]")])
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0: nothing generated (with echo: the prompt alone)
    echo: bool = False
    best_of: Literal[1] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    suffix: None = None

    def logprobs_asked(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(StrictBody):
    """POST /tokenize: a prompt, or chat messages, to token ids."""

    model: str | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt (a string) or messages (a list), not both and not neither")
        return self


class DetokenizeRequest(StrictBody):
    """POST /detokenize: token ids to text."""

    model: str | None = None
    tokens: Annotated[list[int], Field(max_length=1 << 20)]
