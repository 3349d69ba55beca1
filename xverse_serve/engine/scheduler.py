"""Who runs each step: sequences, admission under a token budget, chunked prefill, preemption by recompute."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .block_allocator import BlockAllocator, block_hash, blocks_needed
from .config import SchedulerConfig
from .messages import SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    arrival_time: float = field(default_factory=time.monotonic)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks hashed so far
    num_registered: int = 0  # leading blocks of block_table already findable in the prefix cache
    prompt_logprobs: list | None = None  # TokenLogprob | None per prompt token, filled as the prompt is computed
    shares_prompt_with: Sequence | None = None  # another choice of the same request: admitted once its prompt is cached
    matcher: Any = None  # llguidance's LLMatcher for a request with a grammar: it has consumed the output read so far

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_ids)
        if start >= prompt_len:
            return self.output_ids[start - prompt_len:end - prompt_len]
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[:end - prompt_len]

    def full_block_hashes(self, block_size: int, num_blocks: int) -> list[bytes]:
        """Hashes of the first `num_blocks` full blocks of tokens, computed once each."""
        while len(self.block_hashes) < num_blocks:
            index = len(self.block_hashes)
            tokens = self.token_ids(index * block_size, (index + 1) * block_size)
            self.block_hashes.append(block_hash(self.block_hashes[-1] if index else None, tokens))
        return self.block_hashes[:num_blocks]


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last position yields a token."""
        return self.seq.num_computed + self.num_new_tokens == self.seq.num_tokens

    @property
    def draws(self) -> bool:
        """True when the step draws a token for it: it samples, and asked for tokens (an echo of the prompt with
        max_tokens 0 draws none)."""
        return self.samples and self.seq.params.max_tokens > 0


class Scheduler:
    """First come, first served. Running sequences go first (decodes and unfinished prefill chunks);
    waiting ones are admitted while blocks, the token budget and the sequence limit allow.
    When a running sequence needs a block and none is free, the latest arrival is preempted:
    its blocks are freed and it waits at the front of the queue to be recomputed.
    With prefix caching, an admitted sequence starts after the longest run of its leading full blocks
    that is already cached (an earlier turn of the conversation, a shared system prompt).
    With max_prefill_with_decodes, a step that decodes computes at most that many prompt tokens."""

    def __init__(self, allocator: BlockAllocator, block_size: int, config: SchedulerConfig) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = config.max_num_seqs
        # Every running sequence must be able to decode in every step, whatever the token budget.
        self.max_batched_tokens = max(config.max_batched_tokens, config.max_num_seqs)
        # Most prompt tokens in a step that also decodes (None: the step's whole budget). Small chunks spread a
        # burst of prompts over many steps, so running streams never wait for a whole prefill step.
        self.max_prefill_with_decodes = config.max_prefill_with_decodes
        self.prefix_caching = config.prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0  # tokens of admitted sequences
        self.prefix_hit_tokens = 0  # of those, found in the prefix cache

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def retire(self, seq: Sequence) -> None:
        """Takes a running sequence out of later steps, keeping its blocks until remove(): its last token is
        being computed, and its blocks are registered in the prefix cache once that token is read."""
        self.running.remove(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out wherever it is (running, waiting or retired) and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.release(seq.block_table)
        seq.block_table = []

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_batched_tokens
        prefill_budget = budget
        if self.max_prefill_with_decodes is not None and any(
                seq.num_tokens - seq.num_computed == 1 for seq in self.running):
            prefill_budget = self.max_prefill_with_decodes
        scheduled: list[ScheduledSequence] = []
        preemptions_before = self.num_preemptions
        index = 0
        # Victims come off the end of `running`, so everything before `index` stays scheduled.
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            remaining = seq.num_tokens - seq.num_computed
            count = min(remaining, budget) if remaining == 1 else min(remaining, budget, prefill_budget)
            if count == 0:  # a prompt's next chunk, with the prompt tokens of this step spent
                index += 1
                continue
            if remaining > 1:
                prefill_budget -= count
            if not self._reserve(seq, count):
                break  # seq itself was the last one left to preempt
            scheduled.append(ScheduledSequence(seq, count))
            budget -= count
            index += 1
        # Admitting new work in a step that had to preempt would only preempt again.
        preempted = self.num_preemptions > preemptions_before
        position = 0
        while (position < len(self.waiting) and min(budget, prefill_budget) > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[position]
            if self._waits_for_shared_prompt(seq):
                position += 1
                continue
            cached = self._cached_prefix(seq)
            computed = len(cached) * self.block_size
            count = min(seq.num_tokens - computed, budget, prefill_budget)
            needed = blocks_needed(computed + count, self.block_size) - len(cached)
            if needed > self.allocator.num_free:
                self.allocator.release(cached)
                break
            del self.waiting[position]
            seq.block_table = cached + self.allocator.allocate(needed)
            seq.num_computed = computed
            seq.num_registered = len(cached)
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += computed
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, count))
            budget -= count
            prefill_budget -= count
        # Single-token entries first: the attention runs them as one batched decode.
        scheduled.sort(key=lambda entry: entry.num_new_tokens != 1)
        return scheduled

    def _waits_for_shared_prompt(self, seq: Sequence) -> bool:
        """Whether another choice of its request is computing their prompt's full blocks: it is admitted once those
        are in the prefix cache, so that the prompt is computed once. A choice whose lead was preempted or ended
        (it holds no blocks) computes the prompt itself."""
        lead = seq.shares_prompt_with
        if lead is None or not self._reads_prefix_cache(seq):
            return False
        return bool(lead.block_table) and lead.num_registered < len(lead.prompt_ids) // self.block_size

    def _reads_prefix_cache(self, seq: Sequence) -> bool:
        """A prompt that asks for its log-probs needs every position's logits, so it is computed whole."""
        return self.prefix_caching and seq.params.prompt_logprobs is None

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the sequence's leading full blocks, held for it; at least one token is left
        to compute, since the last position's logits are needed."""
        if not self._reads_prefix_cache(seq):
            return []
        cached = self.allocator.cached_prefix(seq.full_block_hashes(self.block_size, seq.num_tokens // self.block_size))
        if cached and len(cached) * self.block_size == seq.num_tokens:
            self.allocator.release([cached.pop()])
        return cached

    def register_full_blocks(self, seq: Sequence) -> None:
        """Makes the sequence's newly computed full blocks findable by later requests."""
        full = seq.num_computed // self.block_size
        if not self.prefix_caching or full <= seq.num_registered:  # most steps fill no block
            return
        for index, block_hash_ in enumerate(seq.full_block_hashes(self.block_size, full)[seq.num_registered:],
                                            start=seq.num_registered):
            self.allocator.register(seq.block_table[index], block_hash_)
        seq.num_registered = max(seq.num_registered, full)

    def _reserve(self, seq: Sequence, count: int) -> bool:
        """Gives `seq` the blocks for `count` more tokens, preempting later arrivals if needed.
        False if `seq` itself had to be preempted."""
        needed = blocks_needed(seq.num_computed + count, self.block_size) - len(seq.block_table)
        while needed > self.allocator.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if needed > 0:
            seq.block_table.extend(self.allocator.allocate(needed))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.remove(seq)
        seq.num_computed = 0
        seq.num_registered = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
