"""HTTP routes: the seed's POST /, the OpenAI-compatible /v1 API, health; and their error responses."""

from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .errors import APIError, error_body, send_error
from .chat import PromptError, encode_chat, max_input_tokens
from . import chat_page
from .generation import GenerationFailed, TextDelta, generate_text
from .launch import ServingContext
from .lifecycle import Lifecycle, RequestTracker
from .metrics import Metrics, RequestRecord
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, OpenAIFields, SamplingFields, SeedRequest
from .sampling import SamplingParams



def describe_validation_errors(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        if error["type"] == "json_invalid":
            return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})"
        location = [p for p in error["loc"] if p != "body"]
        if not location and error["type"] in ("model_attributes_type", "dict_type"):
            return "the body must be a JSON object, sent with Content-Type: application/json"
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in location).lstrip(".") or "body"
        parts.append(f"{field}: {error['msg']}")
    return "; ".join(parts)


class BodySizeLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before anything parses it, whether
    it announces its length or arrives in chunks."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await send_error(send, 413, self.message(), "invalid_request_error")
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, counting_receive, send)

    def message(self) -> str:
        return f"the request body is larger than {self.limit} bytes (--max-body-bytes)"



def split_list(value: str) -> list[str]:
    """Comma-separated flag values (API keys, CORS origins)."""
    return [item.strip() for item in value.split(",") if item.strip()]


def now_text() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class Handlers:
    """Request handling around one ServingContext: prompts, sampling parameters, responses."""

    def __init__(self, ctx: ServingContext, metrics: Metrics) -> None:
        self.ctx, self.metrics = ctx, metrics
        self.log_prompts = ctx.settings.log_prompts

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

    def answer_budget(self, prompt_len: int, requested: int | None, field: str = "max_tokens") -> int:
        """max_tokens for a prompt: the request's, which must fit the context, or the default, cut to fit."""
        remaining = self.ctx.max_model_len - prompt_len
        if remaining <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context window holds "
                                f"{self.ctx.max_model_len}: shorten it", param="prompt")
        if requested is None:
            return min(self.ctx.generation_defaults.max_new_tokens, remaining)
        if requested > remaining:
            raise APIError(400, f"{field} is {requested}, but the prompt uses {prompt_len} of the "
                                f"{self.ctx.max_model_len}-token context: at most {remaining} are left",
                           param=field)
        return requested

    def chat_prompt(self, messages: list, requested_tokens: int | None,
                    field: str = "max_tokens") -> tuple[list[int], int]:
        budget = requested_tokens or self.ctx.generation_defaults.max_new_tokens
        limit = max_input_tokens(self.ctx.config, self.ctx.max_model_len, budget)
        try:
            prompt_ids = encode_chat(self.ctx.tokenizer, [m.to_message() for m in messages], limit)
        except PromptError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        return prompt_ids, self.answer_budget(len(prompt_ids), requested_tokens, field)

    def check_capacity(self) -> None:
        """Refuses new work while --max-waiting requests already wait for a place in the batch."""
        waiting = self.ctx.engine.num_waiting
        if waiting >= self.ctx.settings.max_waiting:
            raise APIError(503, f"the server is at capacity ({waiting} requests are waiting): retry shortly",
                           "server_overloaded", headers={"Retry-After": "1"})

    def check_model(self, body: OpenAIFields) -> str:
        served = self.ctx.settings.served_model_name
        if body.model is not None and body.model.lower() != served.lower():
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {served!r}",
                           "not_found_error", "model")
        return served

    def text(self, record: RequestRecord, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TextDelta]:
        return generate_text(self.ctx.engine, self.ctx.tokenizer, record.request_id, prompt_ids, params,
                             self.ctx.settings.request_timeout, self.metrics.token_observer(record))

    async def complete(self, request: Request, prompt_ids: list[int], params: SamplingParams) -> TextDelta:
        """The whole answer as one TextDelta (text, tokens, finish_reason). A client that hangs up first
        cancels it: nothing else would stop its tokens being generated for nobody."""
        record: RequestRecord = request.state.record
        answer = asyncio.ensure_future(self.collect(record, prompt_ids, params))
        hang_up = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait((answer, hang_up), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hang_up.cancel()
            answer.cancel()  # no-op once done; otherwise aborts the request in the engine
        if answer not in done:
            record.error = "the client closed the connection"
            raise APIError(499, "the client closed the connection before the answer was ready", "client_closed")
        return answer.result()

    async def collect(self, record: RequestRecord, prompt_ids: list[int], params: SamplingParams) -> TextDelta:
        pieces, last = [], TextDelta("", 0)
        try:
            async for last in self.text(record, prompt_ids, params):
                pieces.append(last.text)
        except GenerationFailed as exc:
            record.error = str(exc)
            raise APIError(exc.status, failure_message(exc), FAILURE_TYPES[exc.status]) from exc
        result = TextDelta("".join(pieces), last.completion_tokens, last.finish_reason)
        self.finished(record, result.text, result.finish_reason)
        return result

    def finished(self, record: RequestRecord, text: str, finish_reason: str | None) -> None:
        record.finish_reason = finish_reason
        if self.log_prompts:
            record.response = text


FAILURE_TYPES = {500: "server_error", 503: "service_unavailable", 504: "timeout"}


def failure_message(exc: GenerationFailed) -> str:
    return f"generation failed: {exc}" if exc.status == 500 else str(exc)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up: the body has been read, so the next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def api_key_checker(keys: tuple[str, ...]) -> Callable[[Request], None]:
    """A dependency that lets a request through only with `Authorization: Bearer <one of keys>`."""
    expected = [key.encode() for key in keys]

    def require_api_key(request: Request) -> None:
        if not expected:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Compared against every key in constant time, so the time taken reveals nothing about any key.
        matches = [hmac.compare_digest(token.strip().encode(), key) for key in expected]
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(401, "a valid API key is needed: send the header `Authorization: Bearer <key>`",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    return require_api_key


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_app(ctx: ServingContext) -> FastAPI:
    metrics = Metrics(ctx.engine.stats)
    lifecycle = Lifecycle(ctx.engine, ctx.settings.shutdown_grace)
    handlers = Handlers(ctx, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine.start()
        yield
        ctx.engine.stop()

    app = FastAPI(title="xverse-serve", summary="XVERSE-7B-Chat behind the seed's API and an OpenAI-compatible one",
                  lifespan=lifespan)
    app.state.lifecycle = lifecycle
    app.add_middleware(BodySizeLimit, limit=ctx.settings.max_body_bytes)
    if ctx.settings.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=split_list(ctx.settings.cors_origin),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    authorized = [Depends(api_key_checker(tuple(split_list(ctx.settings.api_key or ""))))]

    def refusal(request: Request, status: int, message: str, error_type: str, param: str | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
        record: RequestRecord | None = getattr(request.state, "record", None)
        if record is not None and record.error is None:
            record.error = message
        return JSONResponse(error_body(status, message, error_type, param), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return refusal(request, exc.status, exc.message, exc.error_type, exc.param, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own refusals (unknown path, wrong method, a body that is not UTF-8) in the same shape.
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if isinstance(exc.__cause__, UnicodeDecodeError):
            message = f"the body is not valid UTF-8 ({exc.__cause__.reason} at byte {exc.__cause__.start})"
        return refusal(request, exc.status_code, message, error_type, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return refusal(request, 400, describe_validation_errors(exc), "invalid_request_error")

    app.include_router(chat_page.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine runs and the server takes requests; 503 once it drains or the engine died."""
        if not ctx.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if lifecycle.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=authorized)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/", dependencies=authorized)
    async def seed_chat(body: SeedRequest, request: Request) -> dict:
        """The seed's API: {"prompt": ...} -> {"response", "status", "time"}."""
        handlers.check_capacity()
        messages = [*body.history, ChatMessage(role="user", content=body.prompt)]
        prompt_ids, max_tokens = handlers.chat_prompt(messages, body.max_new_tokens, "max_new_tokens")
        handlers.start(request, prompt_ids, lambda: body.prompt)
        result = await handlers.complete(request, prompt_ids, handlers.sampling_params(body, max_tokens))
        time_text = now_text()
        if handlers.log_prompts:  # the seed's own log line, which holds the text
            print(f'[{time_text}] ", prompt:"{body.prompt}", response:"{result.text!r}"', flush=True)
        return {"response": result.text, "status": 200, "time": time_text}

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> dict:
        return {"object": "list", "data": [{
            "id": ctx.settings.served_model_name, "object": "model", "created": int(time.time()),
            "owned_by": "xverse", "max_model_len": ctx.max_model_len,
        }]}

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = handlers.check_model(body)
        handlers.check_capacity()
        requested = body.max_completion_tokens or body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        prompt_ids, max_tokens = handlers.chat_prompt(body.messages, requested, field)
        params = handlers.sampling_params(body, max_tokens, body.stop_strings(), body.seed)
        record = handlers.start(request, prompt_ids, lambda: [m.model_dump(exclude_none=True) for m in body.messages])
        response_id, created = f"chatcmpl-{record.request_id}", int(time.time())
        head = {"id": response_id, "created": created, "model": model}
        if not body.stream:
            result = await handlers.complete(request, prompt_ids, params)
            return {**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": result.text},
                "logprobs": None, "finish_reason": result.finish_reason,
            }], "usage": usage(len(prompt_ids), result.completion_tokens)}

        def chunk(delta: dict, finish_reason: str | None) -> dict:
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        async def events() -> AsyncIterator[str]:
            yield sse(chunk({"role": "assistant", "content": ""}, None))
            async for piece in stream_deltas(handlers, record, prompt_ids, params):
                if isinstance(piece, str):
                    yield piece
                    return
                if piece.text:
                    yield sse(chunk({"content": piece.text}, None))
                if piece.finish_reason:
                    yield sse(chunk({}, piece.finish_reason))
                    if body.stream_options and body.stream_options.include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                                   "usage": usage(len(prompt_ids), piece.completion_tokens)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request):
        model = handlers.check_model(body)
        handlers.check_capacity()
        prompt_ids = ctx.tokenizer.encode(body.prompt_text())
        if not prompt_ids:
            raise APIError(400, "prompt is empty: send some text to complete", param="prompt")
        max_tokens = handlers.answer_budget(len(prompt_ids), body.max_tokens)
        params = handlers.sampling_params(body, max_tokens, body.stop_strings(), body.seed)
        record = handlers.start(request, prompt_ids, lambda: body.prompt)
        head = {"id": f"cmpl-{record.request_id}", "object": "text_completion", "created": int(time.time()),
                "model": model}

        def choice(text: str, finish_reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        if not body.stream:
            result = await handlers.complete(request, prompt_ids, params)
            return {**head, "choices": [choice(result.text, result.finish_reason)],
                    "usage": usage(len(prompt_ids), result.completion_tokens)}

        async def events() -> AsyncIterator[str]:
            async for piece in stream_deltas(handlers, record, prompt_ids, params):
                if isinstance(piece, str):
                    yield piece
                    return
                if piece.text or piece.finish_reason:
                    yield sse({**head, "choices": [choice(piece.text, piece.finish_reason)]})
                if piece.finish_reason and body.stream_options and body.stream_options.include_usage:
                    yield sse({**head, "choices": [], "usage": usage(len(prompt_ids), piece.completion_tokens)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # Outermost, so that it sees every request and every status, refusals by the other middleware included.
    app.add_middleware(RequestTracker, lifecycle=lifecycle, metrics=metrics, log_prompts=ctx.settings.log_prompts,
                       routes={route.path for route in app.routes})
    return app


async def stream_deltas(handlers: Handlers, record: RequestRecord, prompt_ids: list[int],
                        params: SamplingParams) -> AsyncIterator[TextDelta | str]:
    """The request's deltas; a failure mid-stream becomes an error event followed by [DONE]."""
    pieces = []
    try:
        async for piece in handlers.text(record, prompt_ids, params):
            if handlers.log_prompts:
                pieces.append(piece.text)
            if piece.finish_reason:
                handlers.finished(record, "".join(pieces), piece.finish_reason)
            yield piece
    except GenerationFailed as exc:
        record.error = str(exc)
        yield sse(error_body(exc.status, failure_message(exc), FAILURE_TYPES[exc.status])) + sse("[DONE]")
    finally:
        if record.finish_reason is None and record.error is None:
            record.error = "the client closed the connection"
