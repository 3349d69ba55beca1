"""The FastAPI app: its state, middleware, error handlers and routers."""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import chat_page, monitoring, openai_api, seed_api, structured, tokenize_api
from .config import ServingContext
from .errors import install_error_handlers
from .lifecycle import Lifecycle
from .metrics import Metrics
from .middleware import BodySizeLimit, RequestTracker
from .service import GenerationService


def create_app(ctx: ServingContext) -> FastAPI:
    """The app around a started-up engine; the engine's loop runs while the app does (its lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine.start()
        structured.warm_up()
        # What start-up built (the app, the tokenizer, the libraries: some 200,000 objects) taken out of the garbage
        # collector's scans, as vLLM does: a full collection over them took 65 ms on a CPU, a pause of every stream.
        gc.collect()
        gc.freeze()
        yield
        ctx.engine.stop()

    app = FastAPI(title="xverse-serve", summary="XVERSE-7B-Chat behind the seed's API and an OpenAI-compatible one",
                  lifespan=lifespan)
    metrics = Metrics(ctx.engine.stats)
    app.state.engine = ctx.engine
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle = Lifecycle(ctx.engine, ctx.config.shutdown_grace)
    app.state.service = GenerationService(ctx, metrics)
    app.state.api_keys = [key.encode() for key in ctx.config.api_keys]
    install_error_handlers(app)
    for router in (chat_page.router, monitoring.router, seed_api.router, openai_api.router, tokenize_api.router):
        app.include_router(router)
    app.add_middleware(BodySizeLimit, limit=ctx.config.max_body_bytes)
    if ctx.config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(ctx.config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    # Outermost, so that it sees every request and every status, refusals by the other middleware included.
    app.add_middleware(RequestTracker, lifecycle=lifecycle, metrics=metrics, log_prompts=ctx.config.log_prompts,
                       routes={route.path for route in app.routes})
    return app
