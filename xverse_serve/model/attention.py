"""Attention over the paged KV cache, in pure PyTorch.

This is the reference path: it runs on CPU and GPU, and the GPU kernels are tested against it.
A step's flat batch holds the decoding sequences first (one token each), then the prefill chunks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.kv_format import KV_MIN_AMAX, KV_QMAX

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10
    varlen_attn = None

MAX_GATHERED_ELEMENTS = 1 << 26
VARLEN_DTYPES = (torch.float16, torch.bfloat16)  # the only ones flash attention takes


@dataclass
class VarlenLayout:
    """Prefills of a step packed for one variable-length attention call per layer; built once per step."""

    tokens: slice  # where their queries sit among the step's tokens
    context_slots: torch.Tensor  # [context tokens] long: the cache slot of every context position, sequence by sequence
    cu_seq_q: torch.Tensor  # [prefills + 1] int32: where each prefill's queries start among the layout's tokens
    cu_seq_k: torch.Tensor  # [prefills + 1] int32: where each prefill's context starts in context_slots
    max_q: int
    max_k: int


@dataclass
class AttentionBatch:
    """Where each token of one step sits: in its sequence and in the paged cache."""

    slot_mapping: torch.Tensor  # [tokens] flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [seqs, max_blocks] block ids of each sequence, padded with 0
    context_lens: torch.Tensor  # [seqs] tokens cached for each sequence once this step's are written
    query_lens: list[int]  # new tokens of each sequence this step
    context_lens_host: list[int]  # context_lens on the host, so no layer waits on the device
    num_decodes: int  # the first num_decodes sequences contribute exactly one token each
    varlen: list[VarlenLayout] | None = None  # the prefills in varlen_attn calls; without it, one call per sequence


@functools.cache
def takes_window_and_scale(function: Callable) -> bool:
    """torch 2.11's varlen_attn takes window_size (causal masks) and scale; 2.10's takes neither."""
    return {"window_size", "scale"} <= inspect.signature(function).parameters.keys()


def varlen_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch can run a step's prefills on `device` in `dtype` through varlen_attn."""
    return (device.type == "cuda" and dtype in VARLEN_DTYPES and varlen_attn is not None
            and takes_window_and_scale(varlen_attn))


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, heads, head_dim] -> (x / scale in `dtype`, scale [tokens, heads] float32), with one scale per
    token and head: its largest |element| / KV_QMAX[dtype]. int8 rounds half up (floor(y + 0.5)); fp8 to nearest.
    The fused kernel (fused_ops.rope_and_write_kv) does the same operations, so it stores the same values."""
    qmax = KV_QMAX[dtype]
    x32 = x.float()
    # Times the reciprocal, not divided: PyTorch on CUDA divides by a scalar that way, so every device (and
    # the fused kernel) computes the same bits.
    scale = x32.abs().amax(dim=-1).clamp_min(KV_MIN_AMAX) * (1.0 / qmax)
    y = x32 / scale[..., None]
    if dtype == torch.int8:
        return torch.floor(y + 0.5).clamp_(-qmax, qmax).to(torch.int8), scale
    return y.clamp_(-qmax, qmax).to(dtype), scale


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached 8-bit vectors [..., head_dim] and their scales [...] -> the keys or values in `dtype`."""
    return (values.float() * scales[..., None]).to(dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Stores this step's keys and values ([tokens, heads, head_dim]) at their slots; into an 8-bit cache
    quantized (quantize_kv), with their scales."""
    if k_scale is None:
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)
        return
    for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        values, scale = quantize_kv(x, cache.dtype)
        # As bytes: index_copy_ has no float8 kernel on the CPU.
        cache.view(torch.uint8).view(-1, *x.shape[1:]).index_copy_(0, slot_mapping, values.view(torch.uint8))
        scales.view(-1, x.shape[1]).index_copy_(0, slot_mapping, scale)


def gather(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache[index]; a float8 cache is indexed as bytes (not every device has an fp8 indexing kernel)."""
    if cache.dtype == torch.float8_e4m3fn:
        return cache.view(torch.uint8)[index].view(cache.dtype)
    return cache[index]


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached vectors of one sequence, [length, heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return gather(cache, block_table[:num_blocks]).flatten(0, 1)[:length]


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """[seqs, max_blocks * block_size, heads, head_dim] float32: every table's blocks, dequantized."""
    values = gather(cache, block_tables).flatten(1, 2).float()
    if scales is not None:
        values = values * scales[block_tables].flatten(1, 2)[..., None]
    return values


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence: q [seqs, heads, head_dim]. Sequences go in groups so that the
    gathered keys and values stay under MAX_GATHERED_ELEMENTS. An 8-bit cache comes with its scales."""
    seqs, max_blocks = block_tables.shape
    per_seq = max_blocks * k_cache[0].numel()
    group = max(1, MAX_GATHERED_ELEMENTS // per_seq)
    if seqs > group:
        return torch.cat([
            decode_attention(q[i:i + group], k_cache, v_cache, block_tables[i:i + group], context_lens[i:i + group],
                             scale, k_scale, v_scale)
            for i in range(0, seqs, group)
        ])
    block_size = k_cache.shape[1]
    keys = gather_blocks(k_cache, block_tables, k_scale)
    values = gather_blocks(v_cache, block_tables, v_scale)
    scores = torch.einsum("shd,skhd->shk", q.float(), keys) * scale
    positions = torch.arange(max_blocks * block_size, device=q.device)
    padding = positions[None, :] >= context_lens[:, None]
    scores.masked_fill_(padding[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("shk,skhd->shd", probs, values).to(q.dtype)


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


def gather_slots(cache: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """The cached vectors at flat slots, [slots, heads, head_dim]; from an 8-bit cache dequantized to `dtype`."""
    if scales is not None and cache.is_cuda:
        from ..kernels.fused_ops import gather_dequantize

        return gather_dequantize(cache, scales, slots, dtype)
    values = gather(cache.view(-1, *cache.shape[2:]), slots)
    if scales is None:
        return values
    return dequantize_kv(values, scales.view(-1, scales.shape[-1])[slots], dtype)


def varlen_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: VarlenLayout,
                             scale: float, k_scale: torch.Tensor | None = None,
                             v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The prefills of a layout at once: q [their tokens, heads, head_dim], sequence after sequence.
    Flash attention aligns its causal mask bottom-right, so each sequence's queries are its context's last."""
    keys = gather_slots(k_cache, layout.context_slots, k_scale, q.dtype)
    values = gather_slots(v_cache, layout.context_slots, v_scale, q.dtype)
    return varlen_attn(q, keys, values, layout.cu_seq_q, layout.cu_seq_k, layout.max_q, layout.max_k,
                       scale=scale, window_size=(-1, 0))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [tokens, heads, head_dim] -> [tokens, heads, head_dim] (into `out` if given); the step's K/V are already
    cached.
    On CUDA the decodes go through the Triton kernel (no host sync, so the step can be a CUDA graph), and the
    prefills through varlen_attn calls where the batch has VarlenLayouts.
    An 8-bit cache comes with its scales; prefills read it dequantized to q's dtype."""
    out = torch.empty_like(q) if out is None else out
    n = batch.num_decodes
    if n:
        if q.is_cuda:
            from ..kernels.paged_attention import paged_decode_attention

            paged_decode_attention(q[:n], k_cache, v_cache, batch.block_tables[:n], batch.context_lens[:n], scale,
                                   out=out[:n], k_scale=k_scale, v_scale=v_scale)
        else:
            out[:n] = decode_attention(q[:n], k_cache, v_cache, batch.block_tables[:n], batch.context_lens[:n], scale,
                                       k_scale, v_scale)
    if n == len(batch.query_lens):
        return out
    if batch.varlen is not None:
        for layout in batch.varlen:
            out[layout.tokens] = varlen_prefill_attention(q[layout.tokens], k_cache, v_cache, layout, scale, k_scale,
                                                          v_scale)
        return out
    context_lens = batch.context_lens_host
    start = n
    for seq in range(n, len(batch.query_lens)):
        end = start + batch.query_lens[seq]
        table, length = batch.block_tables[seq], context_lens[seq]
        keys = gather_context(k_cache, table, length)
        values = gather_context(v_cache, table, length)
        if k_scale is not None:
            keys = dequantize_kv(keys, gather_context(k_scale, table, length), q.dtype)
            values = dequantize_kv(values, gather_context(v_scale, table, length), q.dtype)
        out[start:end] = prefill_attention(q[start:end], keys, values, scale)
        start = end
    return out
