"""Decode steps as CUDA graphs: one graph per batch-size bucket, captured at start-up, replayed each step.

A decode step of a 7B model launches hundreds of small kernels; replaying a captured graph removes the
launch gaps and the Python between them. Inputs live in static buffers; a batch is padded up to its bucket,
and the padded rows write their keys and values to the cache's null slot, which no sequence reads.
"""

from __future__ import annotations

import torch

from ..model.attention import AttentionBatch
from ..model.kv_cache import KVCache
from ..model.xverse import XverseForCausalLM
from .block_allocator import blocks_needed


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
        # Every input of a step in one int32 buffer, so that a step's inputs reach the device in one copy:
        # token ids, positions, cache slots and context lengths (max_batch each), then the block tables.
        self.inputs = torch.zeros(4 * max_batch + max_batch * max_blocks, dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = self.inputs[:4 * max_batch].view(4, -1)
        self.block_tables = self.inputs[4 * max_batch:].view(max_batch, max_blocks)
        self.slot_mapping.fill_(kv_cache.null_slot)
        self.context_lens.fill_(1)
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
            block_tables: torch.Tensor, context_lens: list[int], fed_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Host tensors of one decode step (n rows) -> logits [n, vocab], float32, on the device. fed_ids: the
        step's token ids already on the device (taken from the previous step's samples), instead of input_ids."""
        n = input_ids.shape[0]
        size = next(bucket for bucket in self.buckets if bucket >= n)
        max_batch, width = self.max_batch, self.block_tables.shape[1]
        # Staged in page-locked memory: the copy is queued behind the step still running, not waited for.
        staged = torch.zeros(4 * max_batch + size * width, dtype=torch.int32, pin_memory=True)
        heads = staged[:4 * max_batch].view(4, max_batch)
        heads[0, :n], heads[1, :n], heads[2, :n] = input_ids, positions, slot_mapping
        heads[3, :n] = torch.tensor(context_lens, dtype=torch.int32)
        # Rows n..size: the null slot and a context of one token: harmless, and their logits are dropped.
        heads[2, n:size], heads[3, n:size] = self.kv_cache.null_slot, 1
        staged[4 * max_batch:].view(size, width)[:n, :block_tables.shape[1]] = block_tables
        self.inputs[:staged.numel()].copy_(staged, non_blocking=True)
        if fed_ids is not None:
            self.input_ids[:n].copy_(fed_ids, non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:n]
