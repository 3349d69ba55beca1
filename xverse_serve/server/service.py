"""What every generating route shares: the prompt and its answer budget, sampling parameters from the request and
the model's defaults, and running a request to its whole answer or as a stream of text deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
from fastapi import Request

from ..engine.messages import SamplingParams
from ..model.chat_format import FunctionSpec, PromptError, encode_chat, max_input_tokens
from .config import ServingContext
from .errors import APIError
from .generation import GenerationFailed, TextDelta, generate_text
from .metrics import Metrics, RequestRecord
from .protocol import ChatMessage, OpenAIFields, SamplingFields, to_messages

FAILURE_TYPES = {400: "invalid_request_error", 500: "server_error", 503: "service_unavailable", 504: "timeout"}


@dataclass(frozen=True)
class Job:
    """One answer of a request: its prompt, its sampling, and the index of an earlier job of the same request with
    the same prompt (another choice, n > 1) whose prompt it takes from the prefix cache instead of computing it."""

    prompt_ids: list[int]
    params: SamplingParams
    shares_prompt_with: int | None = None


def failure_message(exc: GenerationFailed) -> str:
    return f"generation failed: {exc}" if exc.status == 500 else str(exc)


class GenerationService:
    def __init__(self, ctx: ServingContext, metrics: Metrics) -> None:
        self.ctx, self.metrics = ctx, metrics
        self.log_prompts = ctx.config.log_prompts

    def start(self, request: Request, prompt_ids: list[int], prompt: Callable[[], object]) -> RequestRecord:
        """The request's record, now that its prompt is known. `prompt()` gives the prompt as the log line
        shows it; it is called only with --log-prompts, so no request pays for it otherwise."""
        record: RequestRecord = request.state.record
        record.prompt_tokens = len(prompt_ids)
        if self.log_prompts:
            record.prompt = prompt()
        return record

    def sampling_params(self, fields: SamplingFields, max_tokens: int, stop: tuple[str, ...] = (),
                        seed: int | None = None) -> SamplingParams:
        defaults = self.ctx.generation_defaults
        default_temperature = defaults.temperature if defaults.do_sample else 0.0
        top_k = defaults.top_k if fields.top_k is None else fields.top_k
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=default_temperature if fields.temperature is None else fields.temperature,
            top_p=defaults.top_p if fields.top_p is None else fields.top_p,
            top_k=max(top_k, 0),
            repetition_penalty=defaults.repetition_penalty if fields.repetition_penalty is None
            else fields.repetition_penalty,
            seed=seed,
            stop=stop,
        )

    def openai_params(self, body: OpenAIFields, max_tokens: int) -> SamplingParams:
        """sampling_params with the OpenAI fields: stop strings, seed, presence and frequency penalties,
        logit_bias (whose ids must be in the vocabulary)."""
        bias = body.logit_bias_pairs()
        vocab = self.ctx.model_config.vocab_size
        outside = [token for token, _ in bias if token >= vocab]
        if outside:
            raise APIError(400, f"logit_bias names token {outside[0]}, outside the vocabulary (0 to {vocab - 1})",
                           param="logit_bias")
        params = self.sampling_params(body, max_tokens, body.stop_strings(), body.seed)
        return msgspec.structs.replace(params, presence_penalty=body.presence_penalty,
                                       frequency_penalty=body.frequency_penalty, logit_bias=bias,
                                       logprobs=body.logprobs_asked())

    def choices(self, prompt_ids: list[int], params: SamplingParams, n: int, first_index: int = 0) -> list[Job]:
        """n answers to one prompt: the first computes the prompt, the others share it; with a seed, choice j draws
        with seed + j, so each is reproducible and they differ."""
        jobs = []
        for choice in range(n):
            seed = None if params.seed is None else (params.seed + choice) % 2**63
            jobs.append(Job(prompt_ids, msgspec.structs.replace(params, seed=seed),
                            None if choice == 0 else first_index))
        return jobs

    def check_kv_room(self, jobs: list[Job]) -> None:
        """Refuses a request whose answers could never be in the KV cache together (the shared prompts' full blocks
        once, then each answer's own blocks): it would only preempt itself, forever."""
        block, total = self.ctx.config.kv_block_size, self.ctx.engine.stats().kv_blocks_total
        needed = 0
        for job in jobs:
            shared = len(job.prompt_ids) // block if job.shares_prompt_with is not None else 0
            needed += -(-(len(job.prompt_ids) - shared * block + job.params.max_tokens) // block)
        if needed > total:
            raise APIError(400, f"{len(jobs)} answers of up to their max_tokens need {needed} KV-cache blocks of "
                                f"{block} tokens; the cache holds {total}: lower n or max_tokens", param="n")

    def answer_budget(self, prompt_len: int, requested: int | None, field: str = "max_tokens") -> int:
        """max_tokens for a prompt: the request's, which must fit the context, or the default, cut to fit."""
        context = self.ctx.max_model_len
        remaining = context - prompt_len
        if remaining <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context window holds {context}: "
                                "shorten it", param="prompt")
        if requested is None:
            return min(self.ctx.generation_defaults.max_new_tokens, remaining)
        if requested > remaining:
            raise APIError(400, f"{field} is {requested}, but the prompt uses {prompt_len} of the {context}-token "
                                f"context: at most {remaining} are left", param=field)
        return requested

    def chat_prompt(self, messages: list[ChatMessage], requested_tokens: int | None, field: str = "max_tokens",
                    tools: tuple[FunctionSpec, ...] = ()) -> tuple[list[int], int]:
        """The conversation's prompt (describing `tools`, which the model may call) and the answer's budget."""
        budget = requested_tokens or self.ctx.generation_defaults.max_new_tokens
        limit = max_input_tokens(self.ctx.model_config, self.ctx.max_model_len, budget)
        try:
            prompt_ids = encode_chat(self.ctx.tokenizer, to_messages(messages), limit, tools)
        except PromptError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        return prompt_ids, self.answer_budget(len(prompt_ids), requested_tokens, field)

    def check_capacity(self) -> None:
        """Refuses new work while --max-waiting requests already wait for a place in the batch."""
        waiting = self.ctx.engine.num_waiting
        if waiting >= self.ctx.config.max_waiting:
            raise APIError(503, f"the server is at capacity ({waiting} requests are waiting): retry shortly",
                           "server_overloaded", headers={"Retry-After": "1"})

    def check_model(self, requested: str | None) -> str:
        """The served model's name; a request naming another gets a 404."""
        served = self.ctx.config.served_model_name
        if requested is not None and requested.lower() != served.lower():
            raise APIError(404, f"the model {requested!r} does not exist; this server serves {served!r}",
                           "not_found_error", "model")
        return served

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A completion prompt's ids: text encoded as is (no begin-of-text token), ids checked against the
        vocabulary."""
        if isinstance(prompt, str):
            ids = self.ctx.tokenizer.encode(prompt)
            if not ids:
                raise APIError(400, "prompt is empty: send some text to complete", param="prompt")
            return ids
        vocab = self.ctx.model_config.vocab_size
        outside = [token for token in prompt if token >= vocab]
        if outside:
            raise APIError(400, f"prompt holds token {outside[0]}, outside the vocabulary (0 to {vocab - 1})",
                           param="prompt")
        return prompt

    def text(self, record: RequestRecord, job: Job, index: int = 0) -> AsyncIterator[TextDelta]:
        """The deltas of one answer; `index` tells a request's answers apart."""
        lead = None if job.shares_prompt_with is None else answer_id(record, job.shares_prompt_with)
        return generate_text(self.ctx.engine, self.ctx.tokenizer, answer_id(record, index), job.prompt_ids,
                             job.params, self.ctx.config.request_timeout, self.metrics.token_observer(record), lead)

    async def complete(self, request: Request, prompt_ids: list[int], params: SamplingParams) -> TextDelta:
        """The whole answer as one TextDelta (text, tokens, finish_reason, log-probs)."""
        return (await self.complete_all(request, [Job(prompt_ids, params)]))[0]

    async def complete_all(self, request: Request, jobs: list[Job]) -> list[TextDelta]:
        """The whole answer to each (prompt, params), generated together. A client that hangs up first cancels
        them: nothing else would stop their tokens being generated for nobody."""
        record: RequestRecord = request.state.record
        answers = asyncio.ensure_future(asyncio.gather(*(self._collect(record, job, index)
                                                         for index, job in enumerate(jobs))))
        hang_up = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait((answers, hang_up), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hang_up.cancel()
            answers.cancel()  # no-op once done; otherwise aborts the requests in the engine
        if answers not in done:
            record.error = "the client closed the connection"
            raise APIError(499, "the client closed the connection before the answer was ready", "client_closed")
        return answers.result()

    async def stream(self, record: RequestRecord, job: Job,
                     index: int = 0) -> AsyncIterator[TextDelta | GenerationFailed]:
        """The answer's deltas; a failure mid-stream comes as the GenerationFailed, last."""
        pieces = []
        try:
            async for piece in self.text(record, job, index):
                if self.log_prompts:
                    pieces.append(piece.text)
                if piece.finish_reason:
                    self._finished(record, "".join(pieces), piece.finish_reason)
                yield piece
        except GenerationFailed as exc:
            record.error = str(exc)
            yield exc
        finally:
            if record.finish_reason is None and record.error is None:
                record.error = "the client closed the connection"

    async def stream_all(self, record: RequestRecord,
                         jobs: list[Job]) -> AsyncIterator[tuple[int, TextDelta | GenerationFailed]]:
        """The deltas of every job, as they come, each with its job's index. Leaving early aborts every answer still
        running."""
        if len(jobs) == 1:
            async for piece in self.stream(record, jobs[0]):
                yield 0, piece
            return
        arrived: asyncio.Queue[tuple[int, TextDelta | GenerationFailed] | None] = asyncio.Queue()

        async def pump(index: int, job: Job) -> None:
            async for piece in self.stream(record, job, index):
                await arrived.put((index, piece))
            await arrived.put(None)

        tasks = [asyncio.ensure_future(pump(index, job)) for index, job in enumerate(jobs)]
        try:
            running = len(tasks)
            while running:
                item = await arrived.get()
                if item is None:
                    running -= 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _collect(self, record: RequestRecord, job: Job, index: int = 0) -> TextDelta:
        pieces, logprobs, prompt_logprobs, last = [], [], None, TextDelta("", 0)
        try:
            async for last in self.text(record, job, index):
                pieces.append(last.text)
                logprobs += last.logprobs
                prompt_logprobs = prompt_logprobs or last.prompt_logprobs
        except GenerationFailed as exc:
            record.error = str(exc)
            raise APIError(exc.status, failure_message(exc), FAILURE_TYPES[exc.status]) from exc
        result = TextDelta("".join(pieces), last.completion_tokens, last.finish_reason, logprobs, prompt_logprobs)
        self._finished(record, result.text, result.finish_reason)
        return result

    def _finished(self, record: RequestRecord, text: str, finish_reason: str | None) -> None:
        record.finish_reason = finish_reason
        if self.log_prompts:
            record.response = text


def answer_id(record: RequestRecord, index: int) -> str:
    """The engine's id for a request's answer `index` (the request's own id for the first)."""
    return record.request_id if index == 0 else f"{record.request_id}-{index}"


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up: the body has been read, so the next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def get_service(request: Request) -> GenerationService:
    """The app's GenerationService, as a route dependency."""
    return request.app.state.service
