"""The engine: a step loop over the scheduler and model runner, and the async bridge the server talks to."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from .scheduler import ScheduledSequence, Scheduler, Sequence
from .runner import Feed, ModelRunner, SampledTokens
from .sampling import SamplingParams

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 10.0  # how often a busy engine logs its state
# The engine thread gives up the GIL while the GPU works and needs it back as soon as the step ends; with
# Python's default 5 ms switch interval a busy event loop (64 streams) held it that long each time, and
# 64 streaming clients got 2,337 tok/s on an H200; at 0.1 ms, 3,123 (bench/serve_bench.py, one machine).
GIL_SWITCH_INTERVAL_S = 1e-4


@dataclass
class StepOutput:
    """New tokens of one request after a step; the last one carries finish_reason (or error)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" (end of text or stop token) or "length"
    error: str | None = None
    error_status: int = 500  # the HTTP status the error maps to: 500 (failed), 503 (shutting down)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for logs and /metrics."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    preemptions: int


# An output token the device has sampled and the host has not read yet (it is never a model input on the host:
# the step that feeds it takes the sampled id on the device).
PLACEHOLDER = -1


@dataclass
class InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    scheduled: list[ScheduledSequence]
    sampled: list[tuple[Sequence, int]]  # each sequence that samples a token, and that token's index in output_ids
    tokens: SampledTokens | None

    def feed(self, scheduled: list[ScheduledSequence]) -> Feed | None:
        """Where the rows of the next step, `scheduled`, find their input tokens among this step's samples."""
        if self.tokens is None:
            return None
        index = {seq: i for i, (seq, _) in enumerate(self.sampled)}
        return Feed(self.tokens.ids, [index.get(entry.seq, -1) for entry in scheduled])


class Engine:
    """Synchronous core: add and abort requests, and advance every running sequence by one step.

    With overlap (the default), each step is scheduled and queued on the device before the tokens of the step
    still running there are read back: a row whose input token that step samples takes it from its sampled ids
    on the device (prompt chunks and admissions need nothing from it; the repetition penalty marks its seen
    tokens from each step's input ids on the device), and the host's work (reading tokens, finishing requests,
    scheduling, building inputs) runs while the GPU computes instead of between its steps. What the host learns
    one step late: an end of text, after which the sequence computes one token more, which is dropped
    (max_tokens and the context's end are known in advance, so such sequences leave the batch on time), and the
    full blocks to cache, which a prompt admitted meanwhile may miss."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, eos_token_id: int, max_model_len: int,
                 overlap: bool = True) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        self.overlap = overlap
        self.sequences: dict[str, Sequence] = {}
        self.in_flight: InFlight | None = None

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len}")
        longest = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        pool = self.scheduler.allocator.num_blocks * self.scheduler.block_size
        if longest > pool:  # it could never be scheduled, and would wait forever
            raise ValueError(f"the prompt and max_tokens need {longest} tokens of KV cache; it holds {pool}")
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already running")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        seq = Sequence(request_id, list(prompt_ids), params, generator)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)
            self.runner.release(request_id)

    def has_work(self) -> bool:
        return self.in_flight is not None or self.scheduler.has_work()

    def warm_up(self) -> None:
        """Runs a few short requests through every kind of step — whole and chunked prefills of odd
        lengths, mixed prefill and decode, sampling with every filter, greedy rows beside sampled ones and
        alone — so that the GPU kernels are compiled before the first user waits on them. The counters start
        from zero afterwards."""
        sampled = SamplingParams(max_tokens=3, temperature=1.0, top_k=30, top_p=0.9, repetition_penalty=1.1,
                                 seed=0, ignore_eos=True)
        greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        chunked = min(self.scheduler.max_batched_tokens + 5, self.max_model_len - sampled.max_tokens)
        lengths = [length for length in (1, 5, 37, 512, 1000) if length < chunked] + [chunked]
        for index, length in enumerate(lengths):
            self.add_request(f"warm-up-{index}", [self.eos_token_id + 1 + i % 7 for i in range(length)],
                             greedy if index % 2 else sampled)
        while self.has_work():
            self.step()
        for name, params in (("greedy", greedy), ("sampled", sampled)):
            self.add_request(f"warm-up-{name}", [self.eos_token_id + 1], params)
            while self.has_work():
                self.step()
        self.scheduler.num_preemptions = 0
        self.scheduler.prefix_queried_tokens = self.scheduler.prefix_hit_tokens = 0

    def stats(self) -> EngineStats:
        scheduler, allocator = self.scheduler, self.scheduler.allocator
        return EngineStats(len(scheduler.running), len(scheduler.waiting), allocator.num_blocks - allocator.num_free,
                           allocator.num_blocks, scheduler.prefix_queried_tokens, scheduler.prefix_hit_tokens,
                           scheduler.num_preemptions)

    def stats_line(self) -> str:
        stats = self.stats()
        return (f"running {stats.running}, waiting {stats.waiting}, KV blocks {stats.kv_blocks_used}/"
                f"{stats.kv_blocks_total} in use ({stats.kv_blocks_used / stats.kv_blocks_total:.0%}), "
                f"prefix cache hit rate {self.scheduler.prefix_hit_rate:.0%}, preemptions {stats.preemptions}")

    def step(self) -> list[StepOutput]:
        """Queues the next step and returns the outputs of the one before it (with overlap), or runs one step and
        returns its outputs."""
        outputs: list[StepOutput] = []
        previous, self.in_flight = self.in_flight, None  # None without overlap: each step completes in its call
        scheduled = self.scheduler.schedule()
        if scheduled:
            launched = self._launch(scheduled, previous)
            if isinstance(launched, InFlight):
                self.in_flight = launched
            else:
                outputs += launched
        if previous is not None:
            outputs += self._complete(previous)
        if self.in_flight is not None and not self.overlap:
            outputs += self._complete(self.in_flight)
            self.in_flight = None
        return outputs

    def _launch(self, scheduled: list[ScheduledSequence], previous: InFlight | None) -> InFlight | list[StepOutput]:
        """Queues a step on the device; its sampled tokens go into output_ids as PLACEHOLDERs until read.
        A step that fails fails its requests (error outputs), not the server."""
        try:
            tokens = self.runner.run(scheduled, previous.feed(scheduled) if previous is not None else None)
        except Exception as exc:
            log.exception("engine step failed")
            for entry in scheduled:
                self.abort(entry.seq.request_id)
            return [StepOutput(e.seq.request_id, [], error=f"{type(exc).__name__}: {exc}") for e in scheduled]
        sampled = []
        for entry in scheduled:
            seq = entry.seq
            samples = entry.samples
            seq.num_computed += entry.num_new_tokens
            if samples:
                sampled.append((seq, len(seq.output_ids)))
                seq.output_ids.append(PLACEHOLDER)
                if self._reaches_length(seq, len(seq.output_ids)):
                    self.scheduler.retire(seq)  # its last token: no step after this one needs it
        return InFlight(scheduled, sampled, tokens)

    def _complete(self, step: InFlight) -> list[StepOutput]:
        """Reads a launched step's tokens back: each takes its PLACEHOLDER's place and may finish its sequence."""
        try:
            tokens = step.tokens.tolist() if step.tokens is not None else []
        except Exception as exc:  # the device failed the step
            log.exception("engine step failed")
            failed = [seq for seq in dict.fromkeys(e.seq for e in step.scheduled) if self._alive(seq)]
            for seq in failed:
                self.abort(seq.request_id)
            return [StepOutput(seq.request_id, [], error=f"{type(exc).__name__}: {exc}") for seq in failed]
        sampled = [(seq, index, token) for (seq, index), token in zip(step.sampled, tokens) if self._alive(seq)]
        for seq, index, token in sampled:  # skipped: aborted, or finished by the step before (end of text, seen late)
            seq.output_ids[index] = token
        for entry in step.scheduled:
            if self._alive(entry.seq):  # full blocks are hashed by their tokens, now known up to what was computed
                self.scheduler.register_full_blocks(entry.seq)
        outputs = []
        for seq, index, token in sampled:
            reason = self._finish_reason(seq, token, index + 1)
            if reason is not None:
                del seq.output_ids[index + 1:]  # a token the next step sampled after the end
                self.abort(seq.request_id)
            outputs.append(StepOutput(seq.request_id, [token], reason))
        return outputs

    def _alive(self, seq: Sequence) -> bool:
        return self.sequences.get(seq.request_id) is seq

    def _reaches_length(self, seq: Sequence, num_output: int) -> bool:
        """Whether a sequence is done by length once it has num_output output tokens."""
        return num_output >= seq.params.max_tokens or len(seq.prompt_ids) + num_output >= self.max_model_len

    def _finish_reason(self, seq: Sequence, token: int, num_output: int) -> str | None:
        params = seq.params
        if (token == self.eos_token_id and not params.ignore_eos) or token in params.stop_token_ids:
            return "stop"
        if self._reaches_length(seq, num_output):
            return "length"
        return None


Command = tuple[str, str, list[int] | None, SamplingParams | None]  # ("add" | "abort", request id, prompt, params)


def apply_commands(engine: Engine, commands: list[Command]) -> list[StepOutput]:
    """Adds and aborts requests; an add the engine refuses comes back as an error output."""
    rejected = []
    for command, request_id, prompt_ids, params in commands:
        if command == "abort":
            engine.abort(request_id)
            continue
        try:
            engine.add_request(request_id, prompt_ids, params)
        except ValueError as exc:
            rejected.append(StepOutput(request_id, [], error=str(exc)))
    return rejected


def run_steps(engine: Engine, take_commands: Callable[[bool], list[Command] | None],
              emit: Callable[[list[StepOutput]], None]) -> None:
    """The engine's loop: apply the pending commands, step while there is work, emit each step's outputs.
    take_commands(idle) returns the commands sent since the last call, waiting for one when idle is True,
    or None to stop. emit is called after every pass that applied a command or ran a step."""
    last_log, busy = time.monotonic(), False
    while (commands := take_commands(not engine.has_work())) is not None:
        outputs = apply_commands(engine, commands)
        if engine.has_work():
            outputs += engine.step()
            busy = True
        if busy and time.monotonic() - last_log > STATS_INTERVAL_S:
            log.info("engine: %s", engine.stats_line())
            last_log, busy = time.monotonic(), False
        emit(outputs)


class EngineDead(RuntimeError):
    """The engine has stopped; no request can be served."""


class AsyncEngine:
    """The server's side of the engine: each request gets an async iterator of its outputs.

    This class runs the Engine in a background thread of this process: requests and aborts go through a
    locked inbox, applied between steps, so the engine's state is only ever touched by its own thread.
    engine_process.EngineProcess runs it in a process of its own behind the same interface."""

    def __init__(self, engine: Engine | None) -> None:
        self.engine = engine
        self.on_death: Callable[[], None] | None = None  # called on the event loop if the engine dies
        self._inbox: list[Command] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._queues: dict[str, asyncio.Queue[StepOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    @property
    def num_waiting(self) -> int:
        """Requests submitted but not yet running (read from the event loop's thread; approximate)."""
        return len(self._inbox) + len(self.engine.scheduler.waiting)

    def stats(self) -> EngineStats:
        """The engine's load (read from the event loop's thread while the engine runs; approximate)."""
        return dataclasses.replace(self.engine.stats(), waiting=self.num_waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StepOutput]:
        """Yields the request's outputs until it finishes; leaving early (or being cancelled) aborts it.
        Outputs that piled up while the consumer was busy come merged into one, so a loaded server
        spends its time generating rather than writing one event per token."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        self._send(("add", request_id, prompt_ids, params))
        finished = False
        try:
            while not finished:
                output = await queue.get()
                while not output.finished and not queue.empty():
                    later = queue.get_nowait()
                    output = StepOutput(request_id, output.new_token_ids + later.new_token_ids,
                                        later.finish_reason, later.error)
                finished = output.finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id, None, None))

    def _send(self, command: Command) -> None:
        with self._lock:
            self._inbox.append(command)
        self._wakeup.set()

    def _take_commands(self, idle: bool) -> list[Command] | None:
        if idle:
            self._wakeup.wait()
            self._wakeup.clear()
        if self._stopping:
            return None
        with self._lock:
            commands, self._inbox = self._inbox, []
        return commands

    def _emit(self, outputs: list[StepOutput]) -> None:
        if outputs:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _run(self) -> None:
        try:
            run_steps(self.engine, self._take_commands, self._emit)
        except BaseException as exc:
            log.exception("the engine thread died")
            self._died(exc)

    def _died(self, exc: BaseException) -> None:
        """From the engine's side (any thread): every request fails and on_death runs on the event loop."""
        self.error = exc
        self._loop.call_soon_threadsafe(self._fail_all, f"the engine stopped: {exc}")
        if self.on_death is not None:
            self._loop.call_soon_threadsafe(self.on_death)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def end_all(self, message: str) -> None:
        """Ends every request with an error (status 503) and aborts it: for shutdown once the grace is over."""
        for request_id in list(self._queues):
            self._send(("abort", request_id, None, None))
        self._fail_all(message, 503)

    def _fail_all(self, message: str, status: int = 500) -> None:
        for request_id, queue in self._queues.items():
            queue.put_nowait(StepOutput(request_id, [], error=message, error_status=status))
