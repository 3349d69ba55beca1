"""Sizing the KV pool from the card: what is left of --gpu-memory-utilization after the weights (as loaded:
quantized ones take what they take), the measured activation peak of the largest steps, and the CUDA graphs'
memory pool, divided by the bytes a token takes in the cache's dtype (8-bit caches: with their scales)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..model.kv_cache import KVCache
from ..model.xverse import XverseForCausalLM
from .block_allocator import blocks_needed
from .messages import SamplingParams
from .piecewise_graphs import MAX_PIECEWISE_TOKENS
from .runner import ModelRunner
from .scheduler import ScheduledSequence, Sequence

log = logging.getLogger(__name__)

# Penalty and top-k on: the sampler's largest temporaries are part of the peak.
DUMMY_PARAMS = SamplingParams(max_tokens=1, temperature=1.0, top_k=30, top_p=0.85, repetition_penalty=1.1)


@dataclass
class StepPeaks:
    prefill: int  # bytes above the weights at the peak of a full --max-batched-tokens prefill step
    decode: int  # likewise for a step decoding --max-num-seqs sequences (what a decode graph's pool holds)
    pieces: int = 0  # likewise for a step of the piecewise graphs' most tokens (more than their pool holds)


def measure_peak(model: XverseForCausalLM, lengths: list[int], block_size: int,
                 kv_dtype: torch.dtype | None = None) -> int:
    """Bytes allocated above the model (and above a scratch KV cache for them) at the peak of one step
    over fresh sequences of the given lengths, each prefilled whole. kv_dtype: the cache's (default the model's)."""
    device = model.device
    kv_cache = KVCache(model.config, sum(blocks_needed(n, block_size) for n in lengths), block_size,
                       kv_dtype or model.dtype, device)
    runner = ModelRunner(model, kv_cache)
    scheduled, next_block = [], 0
    for i, length in enumerate(lengths):
        seq = Sequence(f"dummy-{i}", [5] * length, DUMMY_PARAMS)
        count = blocks_needed(length, block_size)
        seq.block_table = list(range(next_block, next_block + count))
        next_block += count
        scheduled.append(ScheduledSequence(seq, length))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    runner.run(scheduled)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del runner, kv_cache
    torch.cuda.empty_cache()
    return peak


def measure_step_peaks(model: XverseForCausalLM, max_num_seqs: int, max_batched_tokens: int,
                       max_model_len: int, block_size: int, kv_dtype: torch.dtype | None = None,
                       with_graphs: bool = True) -> StepPeaks:
    """with_graphs False: no piecewise graphs will be captured, so their step is not measured."""
    full, rest = divmod(max_batched_tokens, max_model_len)
    prefill_lengths = [max_model_len] * full + ([rest] if rest else [])
    return StepPeaks(
        prefill=measure_peak(model, prefill_lengths, block_size, kv_dtype),
        decode=measure_peak(model, [1] * max_num_seqs, block_size, kv_dtype),
        pieces=measure_peak(model, [min(MAX_PIECEWISE_TOKENS, max_batched_tokens, max_model_len)], block_size,
                            kv_dtype) if with_graphs else 0,
    )


def kv_cache_tokens_for_card(model: XverseForCausalLM, utilization: float, peaks: StepPeaks,
                             with_graphs: bool, kv_dtype: torch.dtype | None = None) -> int:
    """Tokens of KV cache (of kv_dtype, default the model's dtype) that fit in `utilization` of the card
    beside everything already there."""
    device = model.device
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free  # weights, CUDA context, other processes
    graphs = peaks.decode + peaks.pieces if with_graphs else 0
    budget = total * utilization - in_use - peaks.prefill - graphs
    log.info("memory plan: %.2f GiB card x %.2f; %.2f GiB in use (weights, context); activation peak %.2f GiB; "
             "CUDA graphs %.2f GiB; %.2f GiB left for the KV cache", total / 2**30, utilization, in_use / 2**30,
             peaks.prefill / 2**30, graphs / 2**30, max(budget, 0) / 2**30)
    return max(0, int(budget)) // KVCache.bytes_per_token(model.config, kv_dtype or model.dtype)
