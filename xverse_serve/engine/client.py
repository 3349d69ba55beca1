"""The server's side of the engine: each request gets an async iterator of its outputs.

EngineClient keeps what the server needs to know (the requests' queues, the engine's last reported load) and
leaves moving messages to a transport: ThreadTransport runs the engine in a thread of this process,
ProcessTransport in a process of its own. Both deliver the same reports, so the client works the same over either.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import msgspec

from .messages import (
    AbortRequest,
    AddRequest,
    Command,
    Died,
    EngineStats,
    Report,
    SamplingParams,
    StepOutput,
    StepReport,
)

# The engine's side (the engine thread, or the process transport's reader) needs the GIL back as soon as it has
# something to hand over; with Python's default 5 ms switch interval a busy event loop holds it that long each
# time (docs/architecture.md).
GIL_SWITCH_INTERVAL_S = 1e-4


class EngineDead(RuntimeError):
    """The engine has stopped; no request can be served."""


class Transport(Protocol):
    """Carries commands to the engine and its reports back."""

    initial_stats: EngineStats  # the engine's load when it was ready
    structured_outputs: bool  # whether the engine can constrain answers with grammars

    def start(self, on_report: Callable[[Report], None]) -> None:
        """Starts the engine's loop; on_report is then called, from another thread, with each StepReport and,
        if the engine stops by itself, one Died."""

    def send(self, command: Command) -> None: ...

    def alive(self) -> bool: ...

    def stop(self) -> None:
        """Ends the engine's loop and waits for it; no report comes after."""


class EngineClient:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.on_death: Callable[[], None] | None = None  # called on the event loop if the engine dies
        self.error: str | None = None  # why the engine died
        self._queues: dict[str, asyncio.Queue[StepOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = transport.initial_stats
        self.structured_outputs = transport.structured_outputs
        self._sent_adds = 0  # AddRequests sent, and applied by the engine as of its last report
        self._applied_adds = 0
        self._started = self._stopping = False

    @property
    def num_waiting(self) -> int:
        """Requests submitted but not yet running: the engine's last count, plus those sent since that it had
        not yet seen."""
        return self._stats.waiting + self._sent_adds - self._applied_adds

    def stats(self) -> EngineStats:
        return msgspec.structs.replace(self._stats, waiting=self.num_waiting)

    @property
    def alive(self) -> bool:
        return self._started and self.error is None and not self._stopping and self.transport.alive()

    def start(self) -> None:
        """Starts the engine's loop; called on the running event loop, where outputs are delivered."""
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._loop = asyncio.get_running_loop()
        self.transport.start(self._report_arrived)
        self._started = True

    def stop(self) -> None:
        self._stopping = True
        self.transport.stop()

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       shares_prompt_with: str | None = None) -> AsyncIterator[StepOutput]:
        """Yields the request's outputs until it finishes; leaving early (or being cancelled) aborts it.
        Outputs that piled up while the consumer was busy come merged into one, so a loaded server
        spends its time generating rather than writing one event per token."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        self._send(AddRequest(request_id, prompt_ids, params, shares_prompt_with))
        finished = False
        try:
            while not finished:
                output = await queue.get()
                while not output.finished and not queue.empty():
                    later = queue.get_nowait()
                    output = output.then(later)
                finished = output.finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._send(AbortRequest(request_id))

    def end_all(self, message: str) -> None:
        """Ends every request with an error (status 503) and aborts it: for shutdown once the grace is over."""
        for request_id in list(self._queues):
            self._send(AbortRequest(request_id))
        self._fail_all(message, 503)

    def _send(self, command: Command) -> None:
        if isinstance(command, AddRequest):
            self._sent_adds += 1
        self.transport.send(command)

    def _report_arrived(self, report: Report) -> None:
        """From the transport's thread: the report is handled on the event loop."""
        self._loop.call_soon_threadsafe(self._handle, report)

    def _handle(self, report: Report) -> None:
        if isinstance(report, StepReport):
            self._stats, self._applied_adds = report.stats, report.adds_applied
            for output in report.outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
        elif isinstance(report, Died) and not self._stopping:
            self.error = report.message
            self._fail_all(f"the engine stopped: {report.message}")
            if self.on_death is not None:
                self.on_death()

    def _fail_all(self, message: str, status: int = 500) -> None:
        for request_id, queue in self._queues.items():
            queue.put_nowait(StepOutput(request_id, [], error=message, error_status=status))
