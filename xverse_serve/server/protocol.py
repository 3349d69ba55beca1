"""Request bodies of every route, as pydantic models: what is accepted, and what is refused with a 400."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Tag, field_validator, model_validator

from ..model.chat_format import Message, ToolCall

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_CHOICES = 64  # n
MAX_LOGIT_BIAS = 1024  # OpenAI allows 300; beyond this a request is refused, not parsed
MAX_TOOLS = 128  # functions in one request, and calls in one message
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


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]  # OpenAI's rule for function names


class CalledFunction(StrictBody):
    name: FunctionName
    arguments: Text  # the arguments object as JSON text


class MessageToolCall(StrictBody):
    """A call the assistant made, as a past assistant message carries it."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(StrictBody):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None  # None only for an assistant message that made tool calls
    name: str | None = None
    tool_calls: Annotated[list[MessageToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = None  # a tool message: the call whose result it is

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is missing: only an assistant message with tool_calls may leave it out")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"a {self.role} message cannot have tool_calls; only assistant messages make calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id belongs to tool messages only")
        return self

    def to_message(self, call_names: dict[str, str] | None = None) -> Message:
        """The message for the chat format; `call_names` (call id -> function name) names a tool message's
        function from the call it answers."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        calls = tuple(ToolCall(c.function.name, c.function.arguments) for c in self.tool_calls or ())
        name = self.name
        if self.role == "tool" and name is None and call_names is not None:
            name = call_names.get(self.tool_call_id or "")
        return Message(self.role, content, calls, name if self.role == "tool" else None)


def to_messages(messages: list[ChatMessage]) -> list[Message]:
    """The conversation for the chat format, each tool result named by the call it answers."""
    call_names = {call.id: call.function.name for m in messages for call in m.tool_calls or ()}
    return [m.to_message(call_names) for m in messages]


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


class JsonSchemaFormat(StrictBody):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the answer always follows the schema here, strict or not


class TextFormat(StrictBody):
    type: Literal["text"]


class JsonObjectFormat(StrictBody):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(StrictBody):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class FunctionDefinition(StrictBody):
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object; None: no arguments
    strict: bool | None = None  # the arguments always follow the schema here, strict or not


class Tool(StrictBody):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(StrictBody):
    name: FunctionName


class NamedToolChoice(StrictBody):
    type: Literal["function"]
    function: ChosenFunction


class ChatCompletionRequest(OpenAIFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("tools: two functions have the same name")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools: send the functions the model may call")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not among the tools")
        if self.calls_tools() and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format cannot be combined with tools unless tool_choice is 'none'")
        return self

    def calls_tools(self) -> bool:
        """Whether the model may call the tools: there are some, and tool_choice is not 'none'."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_choice_mode(self) -> str:
        """'auto', 'required', or the name of the one function to call."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return choice.function.name
        return choice if choice in ("auto", "required") else "auto"

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
