"""The engine in a background thread of the server's process (--no-engine-process).

Commands go through a locked inbox and are applied between steps, so the engine's state is only ever touched by
its own thread. The thread shares the GIL with the event loop: under many streams the loop's per-token work can
keep the engine waiting between steps, which is why the process transport is the default."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .loop import run_steps
from .messages import Command, Died, Report, Shutdown

if TYPE_CHECKING:  # the server imports this module; the engine it is given was loaded by engine.loader
    from .engine import Engine

log = logging.getLogger(__name__)


class ThreadTransport:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.initial_stats = engine.stats()
        self.structured_outputs = engine.grammars is not None
        self._inbox: list[Command] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_report: Callable[[Report], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(on_report,), name="engine", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        with self._lock:
            self._inbox.append(command)
        self._wakeup.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self.send(Shutdown())
        if self._thread is not None:
            self._thread.join()

    def _take_commands(self, idle: bool) -> list[Command]:
        if idle:
            self._wakeup.wait()
        self._wakeup.clear()
        with self._lock:
            commands, self._inbox = self._inbox, []
        return commands

    def _run(self, on_report: Callable[[Report], None]) -> None:
        try:
            run_steps(self.engine, self._take_commands, on_report)
        except BaseException as exc:
            log.exception("the engine thread died")
            on_report(Died(f"{type(exc).__name__}: {exc}"))
