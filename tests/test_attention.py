"""Paged attention equals plain causal attention, wherever the blocks of each sequence happen to lie."""

from __future__ import annotations

import math

import pytest
import torch

from xverse_serve.engine.block_allocator import blocks_needed
from xverse_serve.model import attention
from xverse_serve.model.attention import AttentionBatch, decode_attention, paged_attention, write_kv

HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 16, 4, 48
SCALE = HEAD_DIM ** -0.5


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Textbook attention of one whole sequence ([length, heads, head_dim]), in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    length = q.shape[0]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


class PagedSequences:
    """Random sequences scattered over a shared pool through shuffled block tables.

    Every block of the pool belongs to some sequence or holds garbage, so a wrong block id or
    an unmasked padding entry changes the result."""

    def __init__(self, lengths: list[int], seed: int, dtype: torch.dtype = torch.float32) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.lengths = lengths
        self.q = [torch.randn(n, HEADS, HEAD_DIM, generator=gen).to(dtype) for n in lengths]
        self.k = [torch.randn(n, HEADS, HEAD_DIM, generator=gen).to(dtype) for n in lengths]
        self.v = [torch.randn(n, HEADS, HEAD_DIM, generator=gen).to(dtype) for n in lengths]
        shape = (NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
        self.k_cache = (torch.randn(shape, generator=gen) * 100).to(dtype)
        self.v_cache = (torch.randn(shape, generator=gen) * 100).to(dtype)
        pool = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        self.block_tables = []
        for n in lengths:
            count = blocks_needed(n, BLOCK_SIZE)
            self.block_tables.append(pool[:count])
            pool = pool[count:]
        assert all(sorted(t) != t for t in self.block_tables if len(t) > 2), "tables should be non-contiguous"

    def slots(self, seq: int, start: int, end: int) -> list[int]:
        table = self.block_tables[seq]
        return [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]

    def cache_prefix(self, seq: int, end: int) -> None:
        """Writes positions [0, end) of `seq` as earlier steps would have."""
        write_kv(self.k_cache, self.v_cache, self.k[seq][:end], self.v[seq][:end],
                 torch.tensor(self.slots(seq, 0, end), dtype=torch.long))

    def step(self, query_lens: list[int], num_decodes: int) -> tuple[torch.Tensor, AttentionBatch]:
        """One step in which sequence i computes its last query_lens[i] positions."""
        queries, slots = [], []
        keys, values = [], []
        for seq, (n, count) in enumerate(zip(self.lengths, query_lens)):
            self.cache_prefix(seq, n - count)
            queries.append(self.q[seq][n - count:])
            keys.append(self.k[seq][n - count:])
            values.append(self.v[seq][n - count:])
            slots += self.slots(seq, n - count, n)
        max_blocks = max(len(t) for t in self.block_tables)
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in self.block_tables]),
            context_lens=torch.tensor(self.lengths),
            query_lens=query_lens,
            context_lens_host=list(self.lengths),
            num_decodes=num_decodes,
        )
        write_kv(self.k_cache, self.v_cache, torch.cat(keys), torch.cat(values), batch.slot_mapping)
        return torch.cat(queries), batch

    def expected(self, query_lens: list[int]) -> torch.Tensor:
        return torch.cat([
            dense_causal_attention(self.q[i], self.k[i], self.v[i])[n - count:]
            for i, (n, count) in enumerate(zip(self.lengths, query_lens))
        ])


def test_decode_batch_equals_dense_attention_at_the_last_position() -> None:
    lengths = [1, 7, 16, 33, 12]
    paged = PagedSequences(lengths, seed=0)
    q, batch = paged.step([1] * len(lengths), num_decodes=len(lengths))
    out = paged_attention(q, paged.k_cache, paged.v_cache, batch, SCALE)
    torch.testing.assert_close(out.double(), paged.expected([1] * len(lengths)), rtol=1e-5, atol=1e-5)


def test_whole_prompt_prefills_equal_dense_causal_attention() -> None:
    lengths = [5, 1, 17, 30]
    paged = PagedSequences(lengths, seed=1)
    q, batch = paged.step(lengths, num_decodes=0)
    out = paged_attention(q, paged.k_cache, paged.v_cache, batch, SCALE)
    torch.testing.assert_close(out.double(), paged.expected(lengths), rtol=1e-5, atol=1e-5)


def test_prefill_chunks_over_cached_context_equal_dense_causal_attention() -> None:
    lengths = [20, 9, 26]
    query_lens = [6, 9, 3]  # later chunks of 20 and 26 tokens, and a first chunk of 9
    paged = PagedSequences(lengths, seed=2)
    q, batch = paged.step(query_lens, num_decodes=0)
    out = paged_attention(q, paged.k_cache, paged.v_cache, batch, SCALE)
    torch.testing.assert_close(out.double(), paged.expected(query_lens), rtol=1e-5, atol=1e-5)


def test_mixed_step_of_decodes_then_prefill_chunks() -> None:
    lengths = [11, 3, 25, 8, 14]
    query_lens = [1, 1, 1, 8, 5]
    paged = PagedSequences(lengths, seed=3)
    q, batch = paged.step(query_lens, num_decodes=3)
    out = paged_attention(q, paged.k_cache, paged.v_cache, batch, SCALE)
    torch.testing.assert_close(out.double(), paged.expected(query_lens), rtol=1e-5, atol=1e-5)


def test_bfloat16_cache_agrees_with_float64_reference_and_keeps_its_dtype() -> None:
    lengths = [13, 29]
    query_lens = [1, 10]
    paged = PagedSequences(lengths, seed=4, dtype=torch.bfloat16)
    q, batch = paged.step(query_lens, num_decodes=1)
    out = paged_attention(q, paged.k_cache, paged.v_cache, batch, SCALE)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), paged.expected(query_lens), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("limit_in_sequences", [1, 2, 3])
def test_decode_in_groups_equals_decode_at_once(monkeypatch: pytest.MonkeyPatch, limit_in_sequences: int) -> None:
    lengths = [2, 19, 7, 33, 15, 4, 26]
    paged = PagedSequences(lengths, seed=5)
    q, batch = paged.step([1] * len(lengths), num_decodes=len(lengths))
    at_once = decode_attention(q, paged.k_cache, paged.v_cache, batch.block_tables, batch.context_lens, SCALE)
    per_seq = batch.block_tables.shape[1] * paged.k_cache[0].numel()
    monkeypatch.setattr(attention, "MAX_GATHERED_ELEMENTS", limit_in_sequences * per_seq)
    grouped = decode_attention(q, paged.k_cache, paged.v_cache, batch.block_tables, batch.context_lens, SCALE)
    torch.testing.assert_close(grouped, at_once)  # same math; only the matmul batch shapes differ
    torch.testing.assert_close(grouped.double(), paged.expected([1] * len(lengths)), rtol=1e-5, atol=1e-5)


def test_write_kv_stores_each_token_at_its_slot() -> None:
    k_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(3, HEADS, HEAD_DIM), torch.randn(3, HEADS, HEAD_DIM)
    write_kv(k_cache, v_cache, k, v, torch.tensor([5 * BLOCK_SIZE + 2, 0, 9 * BLOCK_SIZE + 3]))
    assert torch.equal(k_cache[5, 2], k[0]) and torch.equal(v_cache[5, 2], v[0])
    assert torch.equal(k_cache[0, 0], k[1]) and torch.equal(v_cache[0, 0], v[1])
    assert torch.equal(k_cache[9, 3], k[2]) and torch.equal(v_cache[9, 3], v[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 3
