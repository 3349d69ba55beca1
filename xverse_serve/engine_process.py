"""The engine in a process of its own, behind AsyncEngine's interface.

In one process, the engine thread and the event loop share the GIL: with 64 streaming clients the event
loop's per-token work (detokenizing, SSE, sockets) kept the engine waiting for the GIL between the GPU's
steps. Here the child process loads the model and runs the step loop (engine.run_steps); the server process
keeps the tokenizer and HTTP. Commands go to the child and outputs come back over a pipe, one message per
step; a sender and a reader thread keep the event loop from ever blocking on it.

The child ignores SIGINT and SIGTERM: the server drains on them and then stops the child itself. If the
server process disappears, the child's pipe closes and it exits; if the child dies, every request fails,
/health turns 503 and the server exits 1 (Lifecycle.engine_died), as when the engine thread dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection

from .checkpoint import CheckpointError
from .engine import GIL_SWITCH_INTERVAL_S, AsyncEngine, Command, EngineDead, EngineStats, StepOutput, run_steps
from .launch import load_engine
from .settings import Settings

log = logging.getLogger(__name__)
STOP: Command = ("stop", "", None, None)
STOP_TIMEOUT_S = 10.0  # how long the child gets to leave its loop before it is killed
# An output as it travels: (request_id, new_token_ids, finish_reason, error, error_status); plain tuples
# pickle several times faster than dataclasses, and a step sends one per running request.
WireOutput = tuple[str, list[int], str | None, str | None, int]


class EngineProcess(AsyncEngine):
    """Spawns the engine process and waits until it has loaded the model (raising CheckpointError with the
    child's message if it could not); start() then connects it to the running event loop."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(None)
        # The child's OpenMP threads (CPU inference) must sleep, not spin, between parallel regions: spinning,
        # they took the cores this process needs for each token, and a tiny CPU model ran 14x slower.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA cannot be forked
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=engine_main, args=(settings, child_conn), name="xverse-engine",
                                        daemon=True)
        self._process.start()
        child_conn.close()
        self._stats = self._wait_until_ready()
        self._sent_adds = 0  # "add" commands sent, and applied by the child as of its last report
        self._applied_adds = 0
        self._outbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def _wait_until_ready(self) -> EngineStats:
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._process.join()
            raise CheckpointError(f"the engine process exited while loading the model "
                                  f"(exit code {self._process.exitcode}); its log is above") from None
        if kind == "failed":
            self._process.join()
            raise CheckpointError(payload)
        return payload

    @property
    def pid(self) -> int:
        """The engine process's id."""
        return self._process.pid

    @property
    def num_waiting(self) -> int:
        # The child's last count, plus requests sent since that it had not yet seen.
        return self._stats.waiting + self._sent_adds - self._applied_adds

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats, waiting=self.num_waiting)

    @property
    def alive(self) -> bool:
        return bool(self._threads) and self.error is None and not self._stopping and self._process.is_alive()

    def start(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the reader thread hands outputs over without delay
        self._loop = asyncio.get_running_loop()
        self._threads = [threading.Thread(target=self._write, name="engine-sender", daemon=True),
                         threading.Thread(target=self._read, name="engine-reader", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._outbox.put(STOP)
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("the engine process did not stop within %g s: killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join()
        self._conn.close()
        for thread in self._threads:
            thread.join()

    def _send(self, command: Command) -> None:
        if command[0] == "add":
            self._sent_adds += 1
        self._outbox.put(command)

    def _write(self) -> None:
        while True:
            command = self._outbox.get()
            try:
                self._conn.send(command)
            except (OSError, ValueError):  # the child is gone; the reader reports it
                return
            if command is STOP:
                return

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    self._process.join(1.0)  # reaped, so that its exit code is known
                    log.critical("the engine process exited (exit code %s)", self._process.exitcode)
                    self._died(EngineDead(f"the engine process exited (exit code {self._process.exitcode})"))
                return
            if kind == "died":
                self._died(EngineDead(payload))
                return
            wire, self._stats, self._applied_adds = payload
            if wire:
                self._loop.call_soon_threadsafe(self._deliver, [StepOutput(*output) for output in wire])


def engine_main(settings: Settings, conn: Connection) -> None:
    """The child process: loads the engine, reports ("ready", stats) or ("failed", message), then steps,
    sending ("outputs", (wire outputs, stats, adds applied)) after each pass, or ("died", message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = load_engine(settings)
    except CheckpointError as exc:
        conn.send(("failed", str(exc)))
        return
    except Exception as exc:
        log.exception("the engine could not start")
        conn.send(("failed", f"the engine could not start: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", engine.stats()))
    adds_applied = 0

    def take_commands(idle: bool) -> list[Command] | None:
        nonlocal adds_applied
        commands = [conn.recv()] if idle else []  # EOFError when the server process is gone
        while conn.poll():
            commands.append(conn.recv())
        if STOP in commands:
            return None
        adds_applied += sum(1 for command in commands if command[0] == "add")
        return commands

    def emit(outputs: list[StepOutput]) -> None:
        wire: list[WireOutput] = [(o.request_id, o.new_token_ids, o.finish_reason, o.error, o.error_status)
                                  for o in outputs]
        conn.send(("outputs", (wire, engine.stats(), adds_applied)))

    try:
        run_steps(engine, take_commands, emit)
    except (EOFError, BrokenPipeError):
        log.info("the server process is gone: the engine stops")
    except Exception as exc:
        log.exception("the engine process died")
        conn.send(("died", f"the engine stopped: {type(exc).__name__}: {exc}"))
