"""The engine: each step schedules sequences, runs the model on them and reads their tokens back."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .grammar import GrammarCompiler, TokenMasks
from .messages import EngineStats, SamplingParams, StepOutput
from .runner import Feed, ModelRunner, SampledTokens
from .scheduler import ScheduledSequence, Scheduler, Sequence

log = logging.getLogger(__name__)


# An output token the device has sampled and the host has not read yet (it is never a model input on the host:
# the step that feeds it takes the sampled id on the device).
PLACEHOLDER = -1


@dataclass
class InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    scheduled: list[ScheduledSequence]
    sampled: list[tuple[Sequence, int]]  # each sequence that samples a token, and that token's index in output_ids
    tokens: SampledTokens | None
    echoed: list[Sequence]  # sequences with max_tokens 0, whose prompt this step finished: they end without a token
    read: bool = False  # whether its tokens have been read back (by _complete)

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
                 overlap: bool = True, grammars: GrammarCompiler | None = None) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        self.overlap = overlap
        self.grammars = grammars  # None: requests with a grammar are refused
        self.sequences: dict[str, Sequence] = {}
        self.in_flight: InFlight | None = None

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    shares_prompt_with: str | None = None) -> None:
        """Queues a request; `shares_prompt_with` names a running request with the same prompt (another choice of
        the same API request), whose prompt this one then takes from the prefix cache instead of computing it."""
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
        if params.grammar is not None:
            if self.grammars is None:
                raise ValueError("this engine was built without a tokenizer for grammars: structured outputs are off")
            seq.matcher = self.grammars.matcher(params.grammar)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None] * len(prompt_ids)
        lead = self.sequences.get(shares_prompt_with) if shares_prompt_with is not None else None
        if lead is not None and lead.prompt_ids == seq.prompt_ids:
            seq.shares_prompt_with = lead
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
            self.in_flight, launch_outputs = self._launch(scheduled, previous)
            outputs += launch_outputs
        if previous is not None and not previous.read:
            outputs += self._complete(previous)
        if self.in_flight is not None and not self.overlap:
            outputs += self._complete(self.in_flight)
            self.in_flight = None
        return outputs

    def _launch(self, scheduled: list[ScheduledSequence],
                previous: InFlight | None) -> tuple[InFlight | None, list[StepOutput]]:
        """Queues a step on the device; its sampled tokens go into output_ids as PLACEHOLDERs until read. Returns
        the step (None if it failed) and the outputs launching it produced: a failed step's errors (it fails its
        requests, not the server), and the previous step's outputs if it had to read them. A step that draws for a
        sequence with a grammar reads the previous step's tokens between its forward pass and its draw: the
        grammar's mask depends on them, and the forward pass runs meanwhile."""
        try:
            logits = self.runner.forward(scheduled, previous.feed(scheduled) if previous is not None else None)
        except Exception as exc:
            return None, self._fail_step(scheduled, exc)
        step = self._account(scheduled)
        drawing = [scheduled[index].seq for index in logits.drawing]
        constrained = any(seq.matcher is not None for seq in drawing)
        outputs = self._complete(previous) if constrained and previous is not None else []
        try:
            step.tokens = self.runner.sample(logits, self._grammar_masks(drawing) if constrained else None)
        except Exception as exc:
            return None, outputs + self._fail_step(scheduled, exc)
        return step, outputs

    def _fail_step(self, scheduled: list[ScheduledSequence], exc: Exception) -> list[StepOutput]:
        log.error("engine step failed", exc_info=exc)
        failed = [seq for seq in dict.fromkeys(e.seq for e in scheduled) if self._alive(seq)]
        for seq in failed:
            self.abort(seq.request_id)
        return [StepOutput(seq.request_id, [], error=f"{type(exc).__name__}: {exc}") for seq in failed]

    def _account(self, scheduled: list[ScheduledSequence]) -> InFlight:
        """Books a queued step: computed tokens, a PLACEHOLDER for each token it draws, and the sequences it ends."""
        sampled, echoed = [], []
        for entry in scheduled:
            seq, samples, draws = entry.seq, entry.samples, entry.draws  # before num_computed moves on
            seq.num_computed += entry.num_new_tokens
            if samples and not draws:
                echoed.append(seq)
                self.scheduler.retire(seq)
            elif draws:
                sampled.append((seq, len(seq.output_ids)))
                seq.output_ids.append(PLACEHOLDER)
                if self._reaches_length(seq, len(seq.output_ids)):
                    self.scheduler.retire(seq)  # its last token: no step after this one needs it
        return InFlight(scheduled, sampled, None, echoed)

    def _grammar_masks(self, drawing: list[Sequence]) -> TokenMasks | None:
        """The allowed ids of a step's drawing rows that follow a grammar, from their matchers (which have read
        every earlier token). A sequence that has ended, or whose grammar has, draws unconstrained: that token is
        dropped."""
        rows, matchers = [], []
        for row, seq in enumerate(drawing):
            matcher = seq.matcher
            if matcher is not None and self._alive(seq) and not matcher.is_stopped() and not matcher.is_error():
                rows.append(row)
                matchers.append(matcher)
        return self.grammars.masks(rows, matchers) if rows else None

    def _complete(self, step: InFlight) -> list[StepOutput]:
        """Reads a launched step's tokens back: each takes its PLACEHOLDER's place and may finish its sequence."""
        step.read = True
        try:
            tokens = step.tokens.tolist() if step.tokens is not None else []
        except Exception as exc:  # the device failed the step
            return self._fail_step(step.scheduled, exc)
        logprobs = step.tokens.logprobs() if step.tokens is not None else {}
        sampled = [(seq, index, token, logprobs.get(row)) for row, ((seq, index), token)
                   in enumerate(zip(step.sampled, tokens)) if self._alive(seq)]
        # Skipped: aborted, or finished by the step before (an end of text, seen late).
        for seq, index, token, _ in sampled:
            seq.output_ids[index] = token
        for entry in step.scheduled:
            if self._alive(entry.seq):  # full blocks are hashed by their tokens, now known up to what was computed
                self.scheduler.register_full_blocks(entry.seq)
        for seq, start, logprobs in step.tokens.prompt_logprobs() if step.tokens is not None else []:
            if self._alive(seq):  # the log-prob of the token after each position: the first prompt token has none
                seq.prompt_logprobs[start + 1:start + 1 + len(logprobs)] = logprobs
        outputs = []
        for seq, index, token, logprob in sampled:
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                self.abort(seq.request_id)  # never expected: the token was drawn within this matcher's mask
                outputs.append(StepOutput(seq.request_id, [], error=f"the grammar refused token {token}: "
                                                                    f"{seq.matcher.get_error()}"))
                continue
            reason = self._finish_reason(seq, token, index + 1)
            if reason is not None:
                del seq.output_ids[index + 1:]  # a token the next step sampled after the end
                self.abort(seq.request_id)
            outputs.append(StepOutput(seq.request_id, [token], reason, logprobs=None if logprob is None else [logprob],
                                      prompt_logprobs=seq.prompt_logprobs if index == 0 else None))
        for seq in step.echoed:
            if self._alive(seq):
                self.abort(seq.request_id)
                outputs.append(StepOutput(seq.request_id, [], "length", prompt_logprobs=seq.prompt_logprobs))
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
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar allows nothing more
            return "stop"
        if self._reaches_length(seq, num_output):
            return "length"
        return None
