"""Attention over the paged KV cache, in pure PyTorch.

This is the reference path: it runs on CPU and GPU, and the GPU kernels are tested against it.
A step's flat batch holds the decoding sequences first (one token each), then the prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_GATHERED_ELEMENTS = 1 << 26


@dataclass
class AttentionBatch:
    """Where each token of one step sits: in its sequence and in the paged cache."""

    slot_mapping: torch.Tensor  # [tokens] flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [seqs, max_blocks] block ids of each sequence, padded with 0
    context_lens: torch.Tensor  # [seqs] tokens cached for each sequence once this step's are written
    query_lens: list[int]  # new tokens of each sequence this step
    context_lens_host: list[int]  # context_lens on the host, so no layer waits on the device
    num_decodes: int  # the first num_decodes sequences contribute exactly one token each


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Stores this step's keys and values ([tokens, heads, head_dim]) at their slots."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached vectors of one sequence, [length, heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_table[:num_blocks]].flatten(0, 1)[:length]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence: q [seqs, heads, head_dim]. Sequences go in groups so that the
    gathered keys and values stay under MAX_GATHERED_ELEMENTS."""
    seqs, max_blocks = block_tables.shape
    per_seq = max_blocks * k_cache[0].numel()
    group = max(1, MAX_GATHERED_ELEMENTS // per_seq)
    if seqs > group:
        return torch.cat([
            decode_attention(q[i:i + group], k_cache, v_cache, block_tables[i:i + group], context_lens[i:i + group], scale)
            for i in range(0, seqs, group)
        ])
    block_size = k_cache.shape[1]
    keys = k_cache[block_tables].flatten(1, 2)  # [seqs, max_blocks * block_size, heads, head_dim]
    values = v_cache[block_tables].flatten(1, 2)
    scores = torch.einsum("shd,skhd->shk", q.float(), keys.float()) * scale
    positions = torch.arange(max_blocks * block_size, device=q.device)
    padding = positions[None, :] >= context_lens[:, None]
    scores.masked_fill_(padding[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("shk,skhd->shd", probs, values.float()).to(q.dtype)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last q.shape[0] positions of one sequence over all of its keys."""
    num_queries, num_keys = q.shape[0], keys.shape[0]
    # On the GPU, SDPA's fused kernels work in the cache's dtype; the CPU reference computes in float32.
    dtype = q.dtype if q.is_cuda else torch.float32
    # [1, heads, tokens, head_dim]: SDPA's flash and memory-efficient kernels take 4-D inputs only
    # (3-D falls back to the math kernel, which materialises every score).
    q_t, k_t, v_t = (t.transpose(0, 1).unsqueeze(0).to(dtype) for t in (q, keys, values))
    if num_queries == num_keys:
        out = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True, scale=scale)
    else:  # a later chunk: its queries sit at the end of the context
        query_positions = torch.arange(num_keys - num_queries, num_keys, device=q.device)
        allowed = torch.arange(num_keys, device=q.device)[None, :] <= query_positions[:, None]
        out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=allowed, scale=scale)
    return out[0].transpose(0, 1).to(q.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q [tokens, heads, head_dim] -> [tokens, heads, head_dim]; the step's K/V are already cached.
    On CUDA the decodes go through the Triton kernel (no host sync, so the step can be a CUDA graph)."""
    out = torch.empty_like(q)
    n = batch.num_decodes
    if n:
        if q.is_cuda:
            from .triton_attention import paged_decode_attention

            paged_decode_attention(q[:n], k_cache, v_cache, batch.block_tables[:n], batch.context_lens[:n], scale,
                                   out=out[:n])
        else:
            out[:n] = decode_attention(q[:n], k_cache, v_cache, batch.block_tables[:n], batch.context_lens[:n], scale)
    if n == len(batch.query_lens):
        return out
    context_lens = batch.context_lens_host
    start = n
    for seq in range(n, len(batch.query_lens)):
        end = start + batch.query_lens[seq]
        keys = gather_context(k_cache, batch.block_tables[seq], context_lens[seq])
        values = gather_context(v_cache, batch.block_tables[seq], context_lens[seq])
        out[start:end] = prefill_attention(q[start:end], keys, values, scale)
        start = end
    return out
