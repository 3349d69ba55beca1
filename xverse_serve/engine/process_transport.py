"""The engine in a process of its own (--engine-process, the default).

In one process, the engine thread and the event loop share the GIL: with many streaming clients the event loop's
per-token work (detokenizing, SSE, sockets) kept the engine waiting for it between the GPU's steps. Here the child
process loads the model and runs the step loop; the server process keeps the tokenizer and HTTP, and never imports
the model. Commands go to the child and reports come back over a pipe, msgpack-encoded, one report per pass of the
engine's loop; a sender and a reader thread keep the event loop from ever blocking on the pipe.

The child ignores SIGINT and SIGTERM: the server drains on them and then stops the child itself. If the server
process disappears, the child's pipe closes and it exits; if the child dies, the reader reports Died.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

import msgspec

from ..model.checkpoint import CheckpointError
from .config import EngineConfig
from .loop import run_steps
from .messages import Command, Died, Failed, Ready, Report, Shutdown, StepReport

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 10.0  # how long the child gets to leave its loop before it is killed


class ProcessTransport:
    """Spawns the engine process and waits until it has loaded the model (raising CheckpointError with the child's
    message if it could not)."""

    def __init__(self, config: EngineConfig) -> None:
        # The child's OpenMP threads (CPU inference) must sleep, not spin, between parallel regions: spinning,
        # they took the cores this process needs for each token, and a tiny CPU model ran 14x slower.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA cannot be forked
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=engine_main, args=(config, child_conn), name="xverse-engine",
                                        daemon=True)
        self._process.start()
        child_conn.close()
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Report).decode
        ready = self._wait_until_ready()
        self.initial_stats, self.structured_outputs = ready.stats, ready.structured_outputs
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # None: the last one
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def _wait_until_ready(self) -> Ready:
        try:
            report = self._decode(self._conn.recv_bytes())
        except EOFError:
            self._process.join()
            raise CheckpointError(f"the engine process exited while loading the model "
                                  f"(exit code {self._process.exitcode}); its log is above") from None
        if isinstance(report, Failed):
            self._process.join()
            raise CheckpointError(report.message)
        return report

    @property
    def pid(self) -> int:
        """The engine process's id."""
        return self._process.pid

    def start(self, on_report: Callable[[Report], None]) -> None:
        self._threads = [threading.Thread(target=self._write, name="engine-sender", daemon=True),
                         threading.Thread(target=self._read, args=(on_report,), name="engine-reader", daemon=True)]
        for thread in self._threads:
            thread.start()

    def send(self, command: Command) -> None:
        """Encodes the command here, in the caller's thread, so that one that cannot be encoded fails its caller
        rather than the sender thread."""
        self._outbox.put(self._encode(command))

    def alive(self) -> bool:
        return self._process.is_alive()

    def stop(self) -> None:
        self._stopping = True
        self._outbox.put(self._encode(Shutdown()))
        self._outbox.put(None)
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("the engine process did not stop within %g s: killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join()
        self._conn.close()
        for thread in self._threads:
            thread.join()

    def _write(self) -> None:
        while (command := self._outbox.get()) is not None:
            try:
                self._conn.send_bytes(command)
            except (OSError, ValueError):  # the child is gone; the reader reports it
                return

    def _read(self, on_report: Callable[[Report], None]) -> None:
        while True:
            try:
                report = self._decode(self._conn.recv_bytes())
            except (EOFError, OSError):
                if not self._stopping:
                    self._process.join(1.0)  # reaped, so that its exit code is known
                    log.critical("the engine process exited (exit code %s)", self._process.exitcode)
                    on_report(Died(f"the engine process exited (exit code {self._process.exitcode})"))
                return
            on_report(report)
            if isinstance(report, Died):
                return


def engine_main(config: EngineConfig, conn: Connection) -> None:
    """The child process: loads the engine, reports Ready or Failed, then runs the engine's loop until Shutdown,
    sending a StepReport after each pass, or Died if the loop fails."""
    # Imported here, in the child: the server process never loads the model or the kernels.
    from .loader import load_engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(Command).decode
    try:
        engine = load_engine(config)
    except CheckpointError as exc:
        conn.send_bytes(encode(Failed(str(exc))))
        return
    except Exception as exc:
        log.exception("the engine could not start")
        conn.send_bytes(encode(Failed(f"the engine could not start: {type(exc).__name__}: {exc}")))
        return
    conn.send_bytes(encode(Ready(engine.stats(), engine.grammars is not None)))

    def take_commands(idle: bool) -> list[Command]:
        commands = [decode(conn.recv_bytes())] if idle else []  # EOFError when the server process is gone
        while conn.poll():
            commands.append(decode(conn.recv_bytes()))
        return commands

    def send(report: StepReport) -> None:
        conn.send_bytes(encode(report))

    try:
        run_steps(engine, take_commands, send)
    except (EOFError, BrokenPipeError):
        log.info("the server process is gone: the engine stops")
    except Exception as exc:
        log.exception("the engine process died")
        conn.send_bytes(encode(Died(f"{type(exc).__name__}: {exc}")))
