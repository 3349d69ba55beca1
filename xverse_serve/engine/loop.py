"""The engine's loop, the same over either transport: apply the server's commands between steps, step while there
is work, report what each pass produced."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .messages import AbortRequest, AddRequest, Command, Shutdown, StepOutput, StepReport

if TYPE_CHECKING:  # the transports import this module; only the engine's side loads the model
    from .engine import Engine

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 10.0  # how often a busy engine logs its state


def apply_commands(engine: Engine, commands: list[Command]) -> list[StepOutput]:
    """Adds and aborts requests; an add the engine refuses comes back as an error output, a 400: each refusal
    (an empty or too long prompt, no room in the KV cache, a grammar that does not compile) is about the request."""
    rejected = []
    for command in commands:
        if isinstance(command, AbortRequest):
            engine.abort(command.request_id)
            continue
        try:
            engine.add_request(command.request_id, command.prompt_ids, command.params, command.shares_prompt_with)
        except ValueError as exc:
            rejected.append(StepOutput(command.request_id, [], error=str(exc), error_status=400))
    return rejected


def run_steps(engine: Engine, take_commands: Callable[[bool], list[Command]],
              report: Callable[[StepReport], None]) -> None:
    """The engine's loop, over either transport: apply the commands sent since the last pass, step while there is
    work, report each pass's outputs and the engine's load. take_commands(idle) waits for a command when idle is
    True; the loop ends at a Shutdown."""
    last_log, busy, adds_applied = time.monotonic(), False, 0
    while True:
        commands = take_commands(not engine.has_work())
        if any(isinstance(command, Shutdown) for command in commands):
            return
        outputs = apply_commands(engine, commands)
        adds_applied += sum(isinstance(command, AddRequest) for command in commands)
        if engine.has_work():
            outputs += engine.step()
            busy = True
        if busy and time.monotonic() - last_log > STATS_INTERVAL_S:
            log.info("engine: %s", engine.stats_line())
            last_log, busy = time.monotonic(), False
        report(StepReport(outputs, engine.stats(), adds_applied))
