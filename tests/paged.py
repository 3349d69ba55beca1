"""Shared by the model tests: a model's logits computed step by step over a paged cache, and the tokens the
engine generates for a batch of prompts."""

from __future__ import annotations

import torch

from xverse_serve.engine.block_allocator import blocks_needed
from xverse_serve.engine.engine import Engine
from xverse_serve.engine.messages import SamplingParams
from xverse_serve.engine.runner import ModelRunner
from xverse_serve.engine.scheduler import ScheduledSequence, Sequence
from xverse_serve.model.kv_cache import KVCache
from xverse_serve.model.xverse import XverseForCausalLM


def paged_logits(model: XverseForCausalLM, token_ids: list[int], chunks: list[int],
                 kv_dtype: torch.dtype | None = None, seed: int = 0, num_blocks: int = 64,
                 block_size: int = 4) -> torch.Tensor:
    """Logits at every position of `token_ids`, computed step by step in chunks of the given sizes (a chunk
    of 1 goes through the decode path) over a paged cache with a shuffled block table; on the model's device."""
    assert sum(chunks) == len(token_ids)
    kv_cache = KVCache(model.config, num_blocks, block_size, kv_dtype or model.dtype, model.device)
    runner = ModelRunner(model, kv_cache)
    seq = Sequence("seq", list(token_ids), SamplingParams(max_tokens=1))
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    seq.block_table = order[:blocks_needed(len(token_ids), block_size)]
    logits = []
    for count in chunks:
        input_ids, positions, batch = runner.prepare([ScheduledSequence(seq, count)])
        assert batch.num_decodes == (1 if count == 1 else 0)
        with torch.inference_mode():
            logits.append(model.compute_logits(model(input_ids, positions, kv_cache.layers, batch)))
        seq.num_computed += count
    return torch.cat(logits)


def engine_tokens(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                  ) -> list[list[int]]:
    """All prompts submitted at once (with one params for all, or one each) and stepped to the end; the tokens
    generated for each."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    for i, (ids, request_params) in enumerate(zip(prompts, each)):
        engine.add_request(str(i), ids, request_params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
    return [tokens[str(i)] for i in range(len(prompts))]
