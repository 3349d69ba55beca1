"""ASGI middleware around every request: its record, metrics and log line (RequestTracker), and the body size
limit (BodySizeLimit)."""

from __future__ import annotations

import logging
import uuid

from starlette.exceptions import HTTPException

from .errors import send_error
from .lifecycle import Lifecycle
from .metrics import Metrics, RequestRecord

request_log = logging.getLogger("xverse_serve.requests")
UNTRACKED = ("/health", "/metrics")  # probes and scrapes: neither counted in flight nor refused while draining


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
