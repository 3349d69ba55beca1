"""The OpenAI-compatible API: /v1/models, /v1/chat/completions and /v1/completions, streamed as server-sent events."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from .auth import require_api_key
from .errors import APIError, error_body
from .generation import GenerationFailed, TextDelta
from .logprobs import CompletionLogprobs, chat_logprobs
from .protocol import ChatCompletionRequest, CompletionRequest, StreamOptions
from .service import FAILURE_TYPES, GenerationService, failure_message, get_service

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
    model = service.check_model(body.model)
    service.check_capacity()
    requested = body.max_completion_tokens or body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    prompt_ids, max_tokens = service.chat_prompt(body.messages, requested, field)
    params = service.openai_params(body, max_tokens)
    record = service.start(request, prompt_ids, lambda: [m.model_dump(exclude_none=True) for m in body.messages])
    head = {"id": f"chatcmpl-{record.request_id}", "created": int(time.time()), "model": model}
    tokenizer = service.ctx.tokenizer

    def logprobs(piece: TextDelta) -> dict | None:
        return chat_logprobs(tokenizer, piece.logprobs) if params.logprobs is not None else None

    if not body.stream:
        result = await service.complete(request, prompt_ids, params)
        return {**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": result.text},
            "logprobs": logprobs(result), "finish_reason": result.finish_reason,
        }], "usage": usage(len(prompt_ids), result.completion_tokens)}

    def chunk(delta: dict, finish_reason: str | None, piece_logprobs: dict | None = None) -> dict:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": piece_logprobs, "finish_reason": finish_reason}]}

    async def events() -> AsyncIterator[str]:
        yield sse(chunk({"role": "assistant", "content": ""}, None))
        async for piece in service.stream(record, prompt_ids, params):
            if isinstance(piece, GenerationFailed):
                yield error_event(piece)
                return
            if piece.text or piece.logprobs:
                yield sse(chunk({"content": piece.text}, None, logprobs(piece)))
            if piece.finish_reason:
                yield sse(chunk({}, piece.finish_reason))
                if wants_usage(body.stream_options):
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                               "usage": usage(len(prompt_ids), piece.completion_tokens)})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, service: Service):
    model = service.check_model(body.model)
    service.check_capacity()
    prompt_ids = service.ctx.tokenizer.encode(body.prompt_text())
    if not prompt_ids:
        raise APIError(400, "prompt is empty: send some text to complete", param="prompt")
    max_tokens = service.answer_budget(len(prompt_ids), body.max_tokens)
    params = service.openai_params(body, max_tokens)
    record = service.start(request, prompt_ids, lambda: body.prompt)
    head = {"id": f"cmpl-{record.request_id}", "object": "text_completion", "created": int(time.time()),
            "model": model}
    shaper = CompletionLogprobs(service.ctx.tokenizer) if params.logprobs is not None else None

    def choice(piece: TextDelta) -> dict:
        logprobs = shaper.shape(piece.logprobs) if shaper is not None else None
        return {"index": 0, "text": piece.text, "logprobs": logprobs, "finish_reason": piece.finish_reason}

    if not body.stream:
        result = await service.complete(request, prompt_ids, params)
        return {**head, "choices": [choice(result)], "usage": usage(len(prompt_ids), result.completion_tokens)}

    async def events() -> AsyncIterator[str]:
        async for piece in service.stream(record, prompt_ids, params):
            if isinstance(piece, GenerationFailed):
                yield error_event(piece)
                return
            if piece.text or piece.finish_reason or piece.logprobs:
                yield sse({**head, "choices": [choice(piece)]})
            if piece.finish_reason and wants_usage(body.stream_options):
                yield sse({**head, "choices": [], "usage": usage(len(prompt_ids), piece.completion_tokens)})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
