"""Decode steps as CUDA graphs: one graph per batch-size bucket, captured at start-up, replayed each step.

A decode step of a 7B model launches hundreds of small kernels; replaying a captured graph removes the
launch gaps and the Python between them. Inputs live in static buffers; a batch is padded up to its bucket,
and the padded rows write their keys and values to the cache's null slot, which no sequence reads.
"""

from __future__ import annotations

import torch

from .attention import AttentionBatch
from .kv_cache import KVCache, blocks_needed
from .model import XverseForCausalLM


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to max_batch (which is always one)."""
    sizes = {size for size in (1, 2, 4, 8) if size < max_batch}
    sizes.update(range(16, max_batch, 16))
    sizes.add(max_batch)
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, model: XverseForCausalLM, kv_cache: KVCache, max_batch: int, max_model_len: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = batch_buckets(max_batch)
        self.max_batch = max_batch
        device = model.lm_head.weight.device
        max_blocks = blocks_needed(max_model_len, kv_cache.block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_batch,), kv_cache.null_slot, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _forward(self, size: int) -> torch.Tensor:
        batch = AttentionBatch(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size], query_lens=[1] * size, context_lens_host=[], num_decodes=size,
        )
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_cache.layers, batch)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # Largest first: the smaller graphs then fit inside the memory the largest one took from the pool.
        for size in reversed(self.buckets):
            self._forward(size)  # compiles the Triton kernels for this shape outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """Host tensors of one decode step (n rows) -> logits [n, vocab], float32, on the device."""
        n = input_ids.shape[0]
        size = next(bucket for bucket in self.buckets if bucket >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slot_mapping, non_blocking=True)
        self.block_tables[:n, :block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.context_lens[:n].copy_(context_lens, non_blocking=True)
        # Rows n..size keep the null slot and a context of one token: harmless, and their logits are dropped.
        self.slot_mapping[n:size].fill_(self.kv_cache.null_slot)
        self.context_lens[n:size].fill_(1)
        self.graphs[size].replay()
        return self.logits[size][:n]
