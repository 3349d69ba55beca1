"""What crosses the engine's boundary: requests in, token outputs and load reports out.

msgspec structs, so that the process transport can encode a step's report with msgpack, typed, at about the cost of
pickling plain tuples and well below that of pickling NamedTuples or dataclasses (docs/architecture.md).
The in-thread transport hands the same objects over as they are."""

from __future__ import annotations

import msgspec

# Temperatures below this are greedy: dividing the logits by a far smaller one overflows them to inf.
MIN_TEMPERATURE = 1e-5


class SamplingParams(msgspec.Struct, frozen=True):
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy (as does anything below MIN_TEMPERATURE)
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every id generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once for each time an id was generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # report each generated token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token (the first has none): the prompt is computed
                                        # whole, never taken from the prefix cache
    grammar: str | None = None  # an llguidance grammar (a JSON schema's or a lark text's) the answer must follow

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def counts_outputs(self) -> bool:
        """Whether the sampler needs the counts of the ids this request has generated."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def table_row(self) -> tuple[float, int, float, float, bool]:
        """The sampler's per-row table entry: temperature, top_k, top_p, penalty, greedy."""
        greedy = self.greedy
        return 1.0 if greedy else self.temperature, self.top_k, self.top_p, self.repetition_penalty, greedy


# Commands, from the server to the engine.

class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    shares_prompt_with: str | None = None  # another choice of the same request (n > 1), sent before this one


class AbortRequest(msgspec.Struct, tag=True):
    request_id: str


class Shutdown(msgspec.Struct, tag=True):
    """The engine leaves its loop."""


Command = AddRequest | AbortRequest | Shutdown


# Reports, from the engine to the server.

class TokenLogprob(msgspec.Struct, array_like=True):
    """A token's log-probability under the model (its raw logits' log-softmax, before any penalty, bias,
    temperature or top-k/top-p) and the most likely ids at its position with theirs, most likely first."""

    logprob: float
    top: list[tuple[int, float]]


class StepOutput(msgspec.Struct, array_like=True):
    """New tokens of one request after a step; the last one carries finish_reason (or error)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" (end of text or stop token) or "length"
    error: str | None = None
    error_status: int = 500  # the HTTP status the error maps to: 500 (failed), 400 (refused), 503 (shutting down)
    logprobs: list[TokenLogprob] | None = None  # one per new token, for a request that asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, with the request's first output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def then(self, later: StepOutput) -> StepOutput:
        """This output and a later one of the same request as one: their tokens (and log-probs) together, and
        how the later one ended."""
        logprobs = None if self.logprobs is None and later.logprobs is None else [*(self.logprobs or ()),
                                                                                 *(later.logprobs or ())]
        return msgspec.structs.replace(later, new_token_ids=self.new_token_ids + later.new_token_ids,
                                       logprobs=logprobs, prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs)


class EngineStats(msgspec.Struct, frozen=True):
    """A snapshot of the engine's load, for logs and /metrics."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    preemptions: int


class StepReport(msgspec.Struct, tag=True):
    """What one pass of the engine's loop produced, its load after it, and how many AddRequests it has applied
    in all (so that the server can count requests sent but not yet seen as waiting)."""

    outputs: list[StepOutput]
    stats: EngineStats
    adds_applied: int


class Ready(msgspec.Struct, tag=True):
    """The engine process has loaded the model."""

    stats: EngineStats
    structured_outputs: bool  # whether it has a grammar compiler (llguidance could read the tokenizer)


class Failed(msgspec.Struct, tag=True):
    """The engine process could not start; the message says why."""

    message: str


class Died(msgspec.Struct, tag=True):
    """The engine stopped; no request can be served any more."""

    message: str


Report = StepReport | Ready | Failed | Died
