"""The server process around the app: what is in flight, graceful shutdown on SIGTERM/SIGINT, exit codes."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from ..engine.client import EngineClient

log = logging.getLogger(__name__)
FLUSH_S = 5.0  # after the grace, how long requests ended with an error get to send it


class Lifecycle:
    """Shutdown state shared by the HTTP layer and the process: whether we drain, what is in flight,
    and the exit code (0 after a shutdown, 1 when the engine died so that a supervisor restarts us)."""

    def __init__(self, engine: EngineClient, grace: float) -> None:
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
