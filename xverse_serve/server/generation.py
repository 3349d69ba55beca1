"""From a request's token outputs to text deltas: whole characters only, stop strings cut and never leaked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..engine.client import EngineClient
from ..engine.messages import SamplingParams, StepOutput, TokenLogprob
from ..model.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Releases text only once its bytes decode whole: a rare character arrives as several byte tokens.

    Decoding a short window of recent tokens (not the whole output) keeps each step cheap, and diffing
    two decodes of the same window keeps spacing right where a token's text depends on its neighbour. A run of
    byte tokens is released only once a token with text ends it: the decoder reads a run as one byte string (an
    invalid run becomes one replacement character per byte, a valid byte in it included; special tokens, which
    it skips, do not end a run), so the joined deltas equal the decode of the whole answer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this have been released as text

    def add(self, token_ids: list[int]) -> str:
        # One token at a time: where bytes do not form valid UTF-8 the text depends on the window, so tokens
        # that arrive together (a busy consumer gets them merged) must read as they do one by one.
        return "".join(self._add_one(token) for token in token_ids)

    def _add_one(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        if self.tokenizer.is_byte(token_id) or self.tokenizer.is_special(token_id):
            return ""  # a run of bytes may go on (decode skips a special token, joining the bytes around it)
        prefix_text = self.tokenizer.decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self.tokenizer.decode(self.token_ids[self.prefix_offset:])
        if full_text.endswith(REPLACEMENT_CHAR) or len(full_text) <= len(prefix_text):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back when generation ends (bytes that never completed a character)."""
        prefix_text = self.tokenizer.decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self.tokenizer.decode(self.token_ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text):]


class StopStringMatcher:
    """Holds back text that could be the start of a stop string; cuts the text at the first stop string."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            released, self.pending = self.pending[:min(hits)], ""
            return released, True
        keep = max((self._partial_len(s) for s in self.stop), default=0)
        released = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return released, False

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released

    def _partial_len(self, stop: str) -> int:
        """Length of the longest end of `pending` that begins `stop`."""
        for length in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:length]):
                return length
        return 0


@dataclass
class TextDelta:
    text: str
    completion_tokens: int  # generated so far
    finish_reason: str | None = None
    # (token id, its log-probs) of the tokens whose text this delta releases, for a request that asked: a token's
    # log-probs wait with its text when the detokenizer or a possible stop string holds it back.
    logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first delta, for a request that asked


class GenerationFailed(RuntimeError):
    """The engine failed this request (the message says why); other requests go on. `status`: 500, or 503
    when the server ended it while shutting down."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class RequestTimedOut(GenerationFailed):
    """The request ran past --request-timeout; it was aborted, others go on."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 504)


async def with_deadline(outputs: AsyncIterator[StepOutput], timeout: float) -> AsyncIterator[StepOutput]:
    """The outputs, ending with RequestTimedOut once `timeout` seconds have passed since the first wait."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            # On timeout the wait is cancelled inside the engine's generator, which aborts the request.
            output = await asyncio.wait_for(anext(outputs), max(remaining, 0))
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimedOut(f"the request took longer than {timeout:g} s (--request-timeout)") from None
        yield output


async def generate_text(engine: EngineClient, tokenizer: Tokenizer, request_id: str, prompt_ids: list[int],
                        params: SamplingParams, timeout: float | None = None,
                        on_tokens: Callable[[int], None] | None = None,
                        shares_prompt_with: str | None = None) -> AsyncIterator[TextDelta]:
    """Text deltas of one request; the last carries finish_reason. Joined, they are the whole answer.
    `on_tokens(n)` is called as each batch of n new tokens arrives, before detokenizing (for latency metrics)."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    matcher = StopStringMatcher(params.stop)
    completion_tokens = 0
    pending: list[tuple[int, TokenLogprob]] = []  # log-probs of tokens whose text has not been released yet
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the prompt's, until a delta carries them

    def delta(text: str, finish_reason: str | None = None) -> TextDelta:
        nonlocal prompt_logprobs
        released, pending[:] = list(pending), []
        prompt, prompt_logprobs = prompt_logprobs, None
        return TextDelta(text, completion_tokens, finish_reason, released, prompt)

    outputs = engine.generate(request_id, prompt_ids, params, shares_prompt_with)
    try:
        async for output in outputs if timeout is None else with_deadline(outputs, timeout):
            completion_tokens += len(output.new_token_ids)
            if on_tokens is not None and output.new_token_ids:
                on_tokens(len(output.new_token_ids))
            if output.logprobs is not None:
                pending.extend(zip(output.new_token_ids, output.logprobs))
            if output.prompt_logprobs is not None:
                prompt_logprobs = output.prompt_logprobs
            text = detokenizer.add(output.new_token_ids)
            if output.finished:
                text += detokenizer.flush()
            text, stopped = matcher.feed(text)
            if output.error is not None:  # the text before the failure is still delivered
                if text:
                    yield delta(text)
                raise GenerationFailed(output.error, output.error_status)
            if stopped:
                yield delta(text, "stop")
                return
            if output.finished:
                yield delta(text + matcher.flush(), output.finish_reason)
                return
            if text or prompt_logprobs is not None:
                yield delta(text)
    finally:
        await outputs.aclose()  # aborts the request if it is still running
