"""The OpenAI-compatible API: /v1/models, /v1/chat/completions and /v1/completions, streamed as server-sent events."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from .auth import require_api_key
from .errors import error_body
from .generation import GenerationFailed, TextDelta
from .logprobs import CompletionLogprobs, chat_logprobs
from .protocol import ChatCompletionRequest, CompletionRequest, StreamOptions
from .service import FAILURE_TYPES, GenerationService, failure_message, get_service
from .structured import answer_form
from .tool_calls import ContentDelta, ToolCallStream, new_call_id, parse_tool_calls

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
Service = Annotated[GenerationService, Depends(get_service)]


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def wants_usage(options: StreamOptions | None) -> bool:
    return options is not None and options.include_usage


def error_event(exc: GenerationFailed) -> str:
    """A failure mid-stream: an error event, then [DONE]."""
    return sse(error_body(exc.status, failure_message(exc), FAILURE_TYPES[exc.status])) + sse("[DONE]")


@router.get("/models")
async def list_models(service: Service) -> dict:
    ctx = service.ctx
    return {"object": "list", "data": [{
        "id": ctx.config.served_model_name, "object": "model", "created": int(time.time()),
        "owned_by": "xverse", "max_model_len": ctx.max_model_len,
    }]}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, service: Service):
    """n answers (choices) to the conversation, generated together from one prefill of it; as JSON or tool calls
    where the request asks (the grammar of answer_form)."""
    model = service.check_model(body.model)
    service.check_capacity()
    form = answer_form(body, service.ctx.engine.structured_outputs)
    requested = body.max_completion_tokens or body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    prompt_ids, max_tokens = service.chat_prompt(body.messages, requested, field, form.tools)
    params = msgspec.structs.replace(service.openai_params(body, max_tokens), grammar=form.grammar)
    jobs = service.choices(prompt_ids, params, body.n)
    service.check_kv_room(jobs)
    record = service.start(request, prompt_ids, lambda: [m.model_dump(exclude_none=True) for m in body.messages])
    head = {"id": f"chatcmpl-{record.request_id}", "created": int(time.time()), "model": model}
    tokenizer = service.ctx.tokenizer

    def logprobs(piece: TextDelta) -> dict | None:
        return chat_logprobs(tokenizer, piece.logprobs) if params.logprobs is not None else None

    if not body.stream:
        results = await service.complete_all(request, jobs)
        choices = []
        for index, result in enumerate(results):
            message, finish_reason = {"role": "assistant", "content": result.text}, result.finish_reason
            calls = parse_tool_calls(result.text) if form.parses_calls else None
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls]}
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            choices.append({"index": index, "message": message, "logprobs": logprobs(result),
                            "finish_reason": finish_reason})
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": usage(len(prompt_ids), sum(result.completion_tokens for result in results))}

    def chunk(index: int, delta: dict, finish_reason: str | None = None, piece_logprobs: dict | None = None) -> str:
        return sse({**head, "object": "chat.completion.chunk", "choices": [
            {"index": index, "delta": delta, "logprobs": piece_logprobs, "finish_reason": finish_reason}]})

    def deltas(events: list) -> list[dict]:
        """Chunk deltas for the events of a tool-call stream."""
        return [{"content": event.text} if isinstance(event, ContentDelta) else {"tool_calls": [event.as_dict()]}
                for event in events]

    async def events() -> AsyncIterator[str]:
        generated = [0] * len(jobs)
        calls = [ToolCallStream() if form.parses_calls else None for _ in jobs]
        for index in range(len(jobs)):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for index, piece in service.stream_all(record, jobs):
            if isinstance(piece, GenerationFailed):
                yield error_event(piece)
                return
            generated[index] = piece.completion_tokens
            stream = calls[index]
            if stream is None:
                if piece.text or piece.logprobs:
                    yield chunk(index, {"content": piece.text}, None, logprobs(piece))
            else:
                parts = deltas(stream.feed(piece.text) + (stream.finish() if piece.finish_reason else []))
                if piece.logprobs and not parts:
                    parts = [{}]
                for number, delta in enumerate(parts):
                    yield chunk(index, delta, None, logprobs(piece) if number == 0 else None)
            if piece.finish_reason:
                finish_reason = piece.finish_reason
                if stream is not None and stream.saw_tool_calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
                yield chunk(index, {}, finish_reason)
        if wants_usage(body.stream_options):
            yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                       "usage": usage(len(prompt_ids), sum(generated))})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, service: Service):
    """Each prompt gets n choices, generated together (choice i * n + j is prompt i's answer j). With echo, a
    choice's text (and log-probs) begin with its prompt's; the prompt's first token has no log-prob."""
    model = service.check_model(body.model)
    service.check_capacity()
    prompts = body.prompts()
    encoded = [service.encode_prompt(prompt) for prompt in prompts]
    jobs = []
    for prompt_ids in encoded:
        params = service.openai_params(body, service.answer_budget(len(prompt_ids), body.max_tokens))
        if body.echo and body.logprobs is not None:
            params = msgspec.structs.replace(params, prompt_logprobs=body.logprobs)
        jobs += service.choices(prompt_ids, params, body.n, first_index=len(jobs))
    service.check_kv_room(jobs)
    record = service.start(request, [token for ids in encoded for token in ids], lambda: body.prompt)
    head = {"id": f"cmpl-{record.request_id}", "object": "text_completion", "created": int(time.time()),
            "model": model}
    tokenizer = service.ctx.tokenizer
    shapers = [CompletionLogprobs(tokenizer) if body.logprobs is not None else None for _ in jobs]
    echoes = [prompt if isinstance(prompt, str) else tokenizer.decode(prompt) for prompt in prompts]

    def choice(index: int, piece: TextDelta, first: bool) -> dict:
        """Choice `index`'s part for this delta; its first part carries the echoed prompt, if asked for."""
        text, tokens = piece.text, list(piece.logprobs)
        if first and body.echo:
            text = echoes[index // body.n] + text
            if piece.prompt_logprobs is not None:
                tokens = list(zip(jobs[index].prompt_ids, piece.prompt_logprobs)) + tokens
        shaper = shapers[index]
        logprobs = shaper.shape(tokens) if shaper is not None else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": piece.finish_reason}

    def total_usage(completion_tokens: int) -> dict:
        return usage(sum(len(ids) for ids in encoded), completion_tokens)

    if not body.stream:
        results = await service.complete_all(request, jobs)
        return {**head, "choices": [choice(i, result, True) for i, result in enumerate(results)],
                "usage": total_usage(sum(result.completion_tokens for result in results))}

    async def events() -> AsyncIterator[str]:
        started, generated = set(), [0] * len(jobs)
        async for index, piece in service.stream_all(record, jobs):
            if isinstance(piece, GenerationFailed):
                yield error_event(piece)
                return
            generated[index] = piece.completion_tokens
            first = index not in started
            started.add(index)
            if piece.text or piece.finish_reason or piece.logprobs or (first and body.echo):
                yield sse({**head, "choices": [choice(index, piece, first)]})
        if wants_usage(body.stream_options):
            yield sse({**head, "choices": [], "usage": total_usage(sum(generated))})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
