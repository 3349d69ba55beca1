"""The server process around the app: requests in flight, graceful shutdown on SIGTERM/SIGINT, exit codes."""

from __future__ import annotations

import asyncio
import logging
import uuid

import uvicorn

from .engine import AsyncEngine
from .errors import send_error
from .metrics import Metrics, RequestRecord

log = logging.getLogger(__name__)
request_log = logging.getLogger("xverse_serve.requests")
FLUSH_S = 5.0  # after the grace, how long requests ended with an error get to send it
UNTRACKED = ("/health", "/metrics")  # probes and scrapes: neither counted in flight nor refused while draining


class Lifecycle:
    """Shutdown state shared by the HTTP layer and the process: whether we drain, what is in flight,
    and the exit code (0 after a shutdown, 1 when the engine died so that a supervisor restarts us)."""

    def __init__(self, engine: AsyncEngine, grace: float) -> None:
        self.engine, self.grace = engine, grace
        self.draining = False
        self.in_flight = 0
        self.exit_code = 0
        self.exit_requested = False
        engine.on_death = self.engine_died

    def engine_died(self) -> None:
        log.critical("the engine died: exiting so that a supervisor can restart the server")
        self.exit_code, self.exit_requested = 1, True

    async def drain(self) -> None:
        """Lets requests in flight finish within the grace, ends the rest with an error, then asks to exit."""
        loop = asyncio.get_running_loop()
        log.info("shutting down: new requests get 503; %d in flight get up to %g s to finish",
                 self.in_flight, self.grace)
        deadline = loop.time() + self.grace
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("shutdown: ending %d requests still in flight after %g s", self.in_flight, self.grace)
            self.engine.end_all(f"the server is shutting down; the request was stopped after the "
                                f"{self.grace:g} s grace (--shutdown-grace)")
            deadline = loop.time() + FLUSH_S
            while self.in_flight and loop.time() < deadline:
                await asyncio.sleep(0.05)
        self.exit_requested = True


class RequestTracker:
    """ASGI middleware around every request: gives it an id and a RequestRecord, counts it in flight,
    refuses it with 503 while draining, and when its response ends, records its metrics and log line."""

    def __init__(self, app, lifecycle: Lifecycle, metrics: Metrics, routes: set[str], log_prompts: bool) -> None:
        self.app, self.lifecycle, self.metrics = app, lifecycle, metrics
        self.routes, self.log_prompts = routes, log_prompts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        tracked = path not in UNTRACKED
        record = RequestRecord(uuid.uuid4().hex, scope["method"], path if path in self.routes else "other",
                               scope["client"][0] if scope.get("client") else None)
        if tracked and self.lifecycle.draining:
            self.finish(record, 503, tracked)
            return await send_error(send, 503, "the server is shutting down: retry on another replica or later",
                                    "service_unavailable", [(b"retry-after", b"1"), (b"connection", b"close")])
        scope.setdefault("state", {})["record"] = record
        status = 500  # if the app raises before it starts a response

        async def tracking_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", record.request_id.encode())]}
            await send(message)

        if tracked:
            self.lifecycle.in_flight += 1
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, tracking_send)
        finally:
            if tracked:
                self.lifecycle.in_flight -= 1
                self.metrics.in_flight.dec()
            self.finish(record, status, tracked)

    def finish(self, record: RequestRecord, status: int, tracked: bool) -> None:
        self.metrics.request_done(record, status)
        # Probes and scrapes come every few seconds: their lines only at debug level.
        request_log.log(logging.INFO if tracked else logging.DEBUG, "request %s",
                        record.log_line(status, self.log_prompts))


class GracefulServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains (Lifecycle.drain) instead of stopping at once;
    a second one stops at once, as uvicorn does. It also stops when the engine dies."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.lifecycle.draining:
            return super().handle_exit(sig, frame)
        self.lifecycle.draining = True  # runs in a signal handler: the drain itself starts on the next tick

    async def on_tick(self, counter: int) -> bool:
        if self.lifecycle.draining and self.drain_task is None:
            self.drain_task = asyncio.ensure_future(self.lifecycle.drain())
        if self.lifecycle.exit_requested:
            return True
        return await super().on_tick(counter)


def serve(app, host: str, port: int, log_level: str) -> int:
    """Runs the app until it is shut down; returns the process's exit code."""
    lifecycle: Lifecycle = app.state.lifecycle
    # Our request log lines replace uvicorn's access log. Connections still open after the drain are closed
    # within FLUSH_S.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=FLUSH_S)
    GracefulServer(config, lifecycle).run()
    return lifecycle.exit_code
