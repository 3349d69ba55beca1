"""Structured outputs in the engine: llguidance matchers that follow each constrained sequence's tokens, and the
masks of the ids each may draw next, filled on the CPU while the GPU runs the step's forward pass.

llguidance was chosen over xgrammar by measurement (bench/grammar_bench.py, docs/benchmarks.md): on a
100,534-token vocabulary its masks took 0.034 ms on average against 0.88, and compiling a 20-field schema 2.9 ms
against 36.8."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.torch
import torch

# Compiled grammars kept, by their text: an application sends the same few schemas again and again.
GRAMMAR_CACHE_SIZE = 256
# Threads filling one step's masks: each row's mask is independent work, 0.03 ms on average but up to a few ms.
MASK_THREADS = min(4, os.cpu_count() or 1)


@dataclass
class TokenMasks:
    """The ids some rows of a step may draw: rows are indices among the step's drawing rows; bit j of word w of a
    row allows id 32 * w + j."""

    rows: list[int]
    bits: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32, on the host


class GrammarCompiler:
    """Turns llguidance grammar texts (a JSON schema's or a lark grammar's, as the server builds them) into matchers
    over the model's vocabulary, compiling each text once."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int) -> None:
        # n_vocab is the model's: ids the tokenizer lacks (the embedding's padding) are never allowed.
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_id)
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._executor = llguidance.LLExecutor(MASK_THREADS)
        # The first matcher and mask of a process pay one-time costs (about 0.1 s on an H200 host): paid here, at
        # start-up, rather than by the first request with a schema.
        warm = llguidance.LLMatcher(self.tokenizer, llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}'),
                                    log_level=0)
        self.masks([0], [warm])

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence; ValueError if the grammar does not compile."""
        compiled = self._compiled.get(grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if compiled.is_error():
                raise ValueError(f"the grammar does not compile: {compiled.get_error()}")
            self._compiled[grammar] = compiled
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(grammar)
        return compiled.deep_copy()

    def masks(self, rows: list[int], matchers: list[llguidance.LLMatcher]) -> TokenMasks:
        """Each matcher's next allowed ids, as bits, filled in parallel."""
        bits = llguidance.torch.allocate_token_bitmask(len(rows), self.vocab_size)
        llguidance.torch.fill_next_token_bitmask_par(self._executor, list(zip(matchers, range(len(rows)))), bits)
        return TokenMasks(rows, bits)

