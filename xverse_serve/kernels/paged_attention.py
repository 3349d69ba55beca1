"""Decode attention over the paged KV cache in Triton, flash-decoding style (split-K over the context).

One query token per sequence. The context of every sequence is cut into up to `num_parts` partitions of
equal length (a multiple of PARTITION tokens, at least PARTITION), so a short context and a long one keep the
same programs busy. One kernel runs one program per (partition, group of heads, sequence); each writes, per head,
the partition's running max (in log2 units), sum of exponentials and unnormalised output to scratch, then counts
itself in on an arrival counter of its (sequence, group of heads): the last to arrive combines the partitions
(in partition order, so the result does not depend on which one is last) and resets the counter. No second
kernel: at one sequence its launch and wait cost more than the attention's work (docs/benchmarks.md). With one
partition, the program normalises and writes the output directly.

CUDA-graph capturable: the grid and the scratch shapes depend only on tensor shapes
(seqs, heads, max_blocks * block_size), never on context_lens; each sequence's partition length is computed
in the kernel from its context, programs whose partition starts past it return at once (and are not counted),
and the combine reads only the partitions that were written. (A decode graph's block tables are as wide as the
longest context; split by that width, a 512-token context had one busy program per head.) The counters live in
one zeroed buffer per device, left at zero by every launch.
Nothing here synchronises with the device.

One sequence (a one-request decode step) with programmatic dependent launch (kernels.pdl): each program reads its
partition's first tile of keys and values before it waits for the kernel before, RoPE and the cache write, so that
they stream in while that kernel and the QKV projection before it end. Only the context's last token is written by
that kernel; it is read after the wait and enters the softmax apart from the tiles (its state first, then the
tiles without it). Batches take the loop as it was (the preloaded tile's registers would cost programs per SM).

An 8-bit cache (int8 or fp8, model.kv_cache.QUANTIZED_KV_DTYPES) is read directly: each key's dot product with q
is multiplied by the key's scale, and each value's softmax weight by the value's scale.

The reference this is tested against is `xverse_serve.model.attention.decode_attention`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import pdl
from .kv_format import check_kv_scales

LOG2E = 1.4426950408889634
REDUCE_CHUNK = 16  # partitions combined per iteration by the last program to arrive


@triton.jit
def _load_tile(first, end, table, stride_btb, k_cache_ptr, v_cache_ptr, stride_kb, stride_kt, stride_vb, stride_vt,
               k_head, v_head, head_ok, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys and values of tokens [first, first + BLOCK_N) for the program's heads, [BLOCK_N, HEADS, HEAD_DIM];
    tokens at or past `end` are masked (never read) and come back as 0. Also each token's cache block and
    offset in it, [BLOCK_N] int64."""
    tokens = first + tl.arange(0, BLOCK_N)
    token_ok = tokens < end
    blocks = tl.load(table + (tokens // BLOCK_SIZE) * stride_btb, mask=token_ok, other=0).to(tl.int64)
    offsets = (tokens % BLOCK_SIZE).to(tl.int64)
    k_rows = blocks * stride_kb + offsets * stride_kt  # [BLOCK_N]
    v_rows = blocks * stride_vb + offsets * stride_vt
    load_ok = token_ok[:, None, None] & head_ok[None, :, None]
    k = tl.load(k_cache_ptr + (k_rows[:, None, None] + k_head), mask=load_ok, other=0.0)
    v = tl.load(v_cache_ptr + (v_rows[:, None, None] + v_head), mask=load_ok, other=0.0)
    return k, v, token_ok, blocks, offsets


@triton.jit
def _load_scales(k_scale_ptr, v_scale_ptr, blocks, offsets, heads, token_ok, head_ok, stride_sb, stride_st):
    """The scales of the tile's keys and values, [BLOCK_N, HEADS] float32 (0 where masked)."""
    index = (blocks * stride_sb + offsets * stride_st)[:, None] + heads[None, :]
    ok = token_ok[:, None] & head_ok[None, :]
    return (tl.load(k_scale_ptr + index, mask=ok, other=0.0).to(tl.float32),
            tl.load(v_scale_ptr + index, mask=ok, other=0.0).to(tl.float32))


@triton.jit
def _widen(x, VIA_BITS: tl.constexpr):
    """A tile of the cache as float32. VIA_BITS: int8 goes through the float's bits, 1.5 * 2**23 + x, then minus
    1.5 * 2**23 (exact for |x| < 2**22): two adds instead of an int-to-float conversion, which runs at a quarter of
    their rate or less. Only the lanes loop takes it: the other loop measured slower with it (docs/benchmarks.md)."""
    if VIA_BITS and x.dtype == tl.int8:
        return (x.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    return x.to(tl.float32)


@triton.jit
def _fresh_token(q, fresh, start, end, table, stride_btb, k_cache_ptr, v_cache_ptr, stride_kb, stride_kt, stride_vb,
                 stride_vt, k_head, v_head, heads, head_ok, k_scale_ptr, v_scale_ptr, stride_sb, stride_st,
                 BLOCK_SIZE: tl.constexpr, SCALED: tl.constexpr):
    """The online softmax's state (max, sum, output per head) of the token at `fresh` alone where it lies in
    [start, end); else the empty state (max -inf, sum 0, output 0)."""
    here = (fresh >= start) & (fresh < end)
    block = tl.load(table + (fresh // BLOCK_SIZE) * stride_btb).to(tl.int64)  # fresh < the context: in the table
    offset = (fresh % BLOCK_SIZE).to(tl.int64)
    ok = head_ok[:, None] & here
    k_head = tl.reshape(k_head, [k_head.shape[1], k_head.shape[2]])  # [HEADS, HEAD_DIM]
    v_head = tl.reshape(v_head, [v_head.shape[1], v_head.shape[2]])
    k = tl.load(k_cache_ptr + (block * stride_kb + offset * stride_kt + k_head), mask=ok, other=0.0)
    v = tl.load(v_cache_ptr + (block * stride_vb + offset * stride_vt + v_head), mask=ok, other=0.0)
    score = tl.sum(_widen(k, False) * q, axis=1)  # [HEADS]
    v = _widen(v, False)
    if SCALED:
        index = block * stride_sb + offset * stride_st + heads
        score = score * tl.load(k_scale_ptr + index, mask=head_ok & here, other=0.0)
        v = v * tl.load(v_scale_ptr + index, mask=head_ok & here, other=0.0)[:, None]
    m_i = tl.where(here, score, float("-inf"))
    l_i = tl.where(here, 1.0, 0.0) + tl.zeros_like(score)
    return m_i, l_i, tl.where(here, v, 0.0)


@triton.jit
def _online_softmax(q, k, v, token_ok, blocks, offsets, heads, head_ok, m_i, l_i, acc, k_scale_ptr, v_scale_ptr,
                    stride_sb, stride_st, SCALED: tl.constexpr):
    """The classic online softmax's state (running max, sum, unnormalised output per head) after one tile."""
    scores = tl.sum(_widen(k, False) * q[None, :, :], axis=2)  # [BLOCK_N, HEADS]
    if SCALED:
        k_scale, v_scale = _load_scales(k_scale_ptr, v_scale_ptr, blocks, offsets, heads, token_ok, head_ok,
                                        stride_sb, stride_st)
        scores = scores * k_scale
    scores = tl.where(token_ok[:, None], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[None, :])
    l_i = l_i * alpha + tl.sum(p, axis=0)
    p_v = p
    if SCALED:
        p_v = p * v_scale
    acc = acc * alpha[:, None] + tl.sum(p_v[:, :, None] * _widen(v, False), axis=0)
    return m_new, l_i, acc


# Sizes that vary with the batch's shapes are not specialised on (value 1, divisibility by 16), so each
# configuration compiles once per SINGLE value instead of once per partition count.
@triton.jit(do_not_specialize=["num_heads", "num_parts", "stride_bts"])
def _partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, arrivals_ptr,
    k_scale_ptr, v_scale_ptr,  # [blocks, block_size, heads] scales of an 8-bit cache (unused otherwise)
    qk_scale,  # softmax scale * log2(e): scores are kept in log2 units so exp2 can be used
    num_heads, num_parts,
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bts, stride_btb,
    stride_os, stride_oh,
    stride_sb, stride_st,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block (power of two)
    HEAD_DIM: tl.constexpr,
    HEADS: tl.constexpr,  # heads per program
    PARTITION: tl.constexpr,  # the shortest partition (a multiple of BLOCK_N); every partition is a multiple of it
    BLOCK_N: tl.constexpr,  # tokens per loop iteration
    LANES: tl.constexpr,  # softmax state per token lane, combined once after the loop (no reductions in it)
    PRELOAD: tl.constexpr,  # (without LANES) the first tile read before the PDL wait, the fresh token apart
    SINGLE: tl.constexpr,  # only one partition: write the normalised output directly
    SCALED: tl.constexpr,  # an 8-bit cache: keys and values come with per-token-and-head scales
    REDUCE_CHUNK: tl.constexpr,  # partitions combined per iteration by the last program
    PDL: tl.constexpr,  # launched early (kernels.pdl)
):
    # With PDL, what no kernel of the step writes is read before the wait (kernels.pdl): the context lengths and
    # block tables (copied in before the step's kernels) and, with PRELOAD, the first tile's keys and values of
    # every token but the context's last, which the kernel before (RoPE and the cache write) writes this step.
    pdl.launch_next(PDL)
    part = tl.program_id(0)
    head_group = tl.program_id(1)
    seq = tl.program_id(2)

    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    part_len = _partition_length(context_len, num_parts, PARTITION)
    start = part * part_len
    end = tl.minimum(start + part_len, context_len)  # at most start where the partition is past the context

    heads = head_group * HEADS + tl.arange(0, HEADS)
    head_ok = heads < num_heads
    dims = tl.arange(0, HEAD_DIM)
    k_head = (heads * stride_kh)[None, :, None] + dims[None, None, :]  # [1, HEADS, HEAD_DIM]
    v_head = (heads * stride_vh)[None, :, None] + dims[None, None, :]
    table = block_tables_ptr + seq.to(tl.int64) * stride_bts
    fresh = context_len - 1  # the token whose key and value the kernel before wrote
    if PRELOAD:
        k, v, token_ok, blocks, offsets = _load_tile(start, tl.minimum(end, fresh), table, stride_btb, k_cache_ptr,
                                                     v_cache_ptr, stride_kb, stride_kt, stride_vb, stride_vt, k_head,
                                                     v_head, head_ok, BLOCK_SIZE, BLOCK_N)
    pdl.wait(PDL)
    if start >= context_len:
        return

    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None], other=0.0)
    q = q.to(tl.float32) * qk_scale  # [HEADS, HEAD_DIM]

    if LANES:
        # Lane n sees tokens start + n, start + n + BLOCK_N, ...: an online softmax per lane, all elementwise,
        # so the loop has no cross-warp reductions or barriers; the lanes are merged once at the end.
        m_lane = tl.full([BLOCK_N, HEADS], float("-inf"), tl.float32)
        l_lane = tl.zeros([BLOCK_N, HEADS], tl.float32)
        acc_lane = tl.zeros([BLOCK_N, HEADS, HEAD_DIM], tl.float32)
        for first in range(start, end, BLOCK_N):
            k, v, token_ok, blocks, offsets = _load_tile(first, end, table, stride_btb, k_cache_ptr, v_cache_ptr,
                                                         stride_kb, stride_kt, stride_vb, stride_vt, k_head, v_head,
                                                         head_ok, BLOCK_SIZE, BLOCK_N)
            scores = tl.sum(_widen(k, True) * q[None, :, :], axis=2)  # [BLOCK_N, HEADS]
            if SCALED:
                k_scale, v_scale = _load_scales(k_scale_ptr, v_scale_ptr, blocks, offsets, heads, token_ok,
                                                head_ok, stride_sb, stride_st)
                scores = scores * k_scale
            scores = tl.where(token_ok[:, None], scores, float("-inf"))
            m_new = tl.maximum(m_lane, scores)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no token yet: no -inf - -inf
            alpha = tl.exp2(m_lane - m_safe)
            p = tl.exp2(scores - m_safe)
            l_lane = l_lane * alpha + p
            p_v = p  # each value's weight; an 8-bit value's includes its scale
            if SCALED:
                p_v = p * v_scale
            acc_lane = acc_lane * alpha[:, :, None] + p_v[:, :, None] * _widen(v, True)
            m_lane = m_new
        m_i = tl.max(m_lane, axis=0)  # finite: lane 0 saw token `start`
        weight = tl.exp2(m_lane - m_i[None, :])  # 0 for lanes that saw no token
        l_i = tl.sum(l_lane * weight, axis=0)
        acc = tl.sum(acc_lane * weight[:, :, None], axis=0)
    else:
        # Classic online softmax: one running max per head, rescaled every iteration.
        if PRELOAD:
            # The fresh token first (where it lies in this partition the state starts from it, else empty), then
            # the tiles without it, the first read before the wait. A tile with no token (the partition's only
            # token was the fresh one) changes nothing; the first tile has one wherever the fresh token is not in
            # the partition.
            m_i, l_i, acc = _fresh_token(q, fresh, start, end, table, stride_btb, k_cache_ptr, v_cache_ptr,
                                         stride_kb, stride_kt, stride_vb, stride_vt, k_head, v_head, heads, head_ok,
                                         k_scale_ptr, v_scale_ptr, stride_sb, stride_st, BLOCK_SIZE, SCALED)
            m_i, l_i, acc = _online_softmax(q, k, v, token_ok, blocks, offsets, heads, head_ok, m_i, l_i, acc,
                                            k_scale_ptr, v_scale_ptr, stride_sb, stride_st, SCALED)
            tiles_from, tiles_end = start + BLOCK_N, tl.minimum(end, fresh)
        else:  # every iteration holds at least one valid token (start < end), so m_i is finite after the first
            m_i = tl.full([HEADS], float("-inf"), tl.float32)
            l_i = tl.zeros([HEADS], tl.float32)
            acc = tl.zeros([HEADS, HEAD_DIM], tl.float32)
            tiles_from, tiles_end = start, end
        for first in range(tiles_from, tiles_end, BLOCK_N):
            k, v, token_ok, blocks, offsets = _load_tile(first, tiles_end, table, stride_btb, k_cache_ptr,
                                                         v_cache_ptr, stride_kb, stride_kt, stride_vb, stride_vt,
                                                         k_head, v_head, head_ok, BLOCK_SIZE, BLOCK_N)
            m_i, l_i, acc = _online_softmax(q, k, v, token_ok, blocks, offsets, heads, head_ok, m_i, l_i, acc,
                                            k_scale_ptr, v_scale_ptr, stride_sb, stride_st, SCALED)

    out_at = out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + dims[None, :]
    if SINGLE:
        tl.store(out_at, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        base = (seq.to(tl.int64) * num_heads + heads) * num_parts  # [HEADS]: each head's first partition slot
        tl.store(part_max_ptr + base + part, m_i, mask=head_ok)
        tl.store(part_sum_ptr + base + part, l_i, mask=head_ok)
        tl.store(part_out_ptr + (base + part)[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_ok[:, None])
        # Every thread's stores come before the arrival (the barrier), which releases them at GPU scope; the last
        # program's arrival acquires the others' (the combine's loads also skip L1).
        tl.debug_barrier()
        counter = arrivals_ptr + seq * tl.cdiv(num_heads, HEADS) + head_group
        used = tl.cdiv(context_len, part_len)  # partitions with tokens: the programs that arrive
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == used - 1:
            tl.store(counter, 0)  # ready for the next launch
            out = _combine_partitions(part_out_ptr, part_max_ptr, part_sum_ptr, base, used, head_ok, HEADS,
                                      HEAD_DIM, REDUCE_CHUNK)
            tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


@triton.jit
def _combine_partitions(part_out_ptr, part_max_ptr, part_sum_ptr, base, used, head_ok,
                        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):
    """The normalised output of each head, [HEADS, HEAD_DIM], from its first `used` partitions' maxima, sums and
    unnormalised outputs, taken in partition order. Two passes over the maxima (small), so no scalar state is
    carried through a loop."""
    dims = tl.arange(0, HEAD_DIM)
    m_lanes = tl.full([HEADS, CHUNK], float("-inf"), tl.float32)
    for first in range(0, used, CHUNK):
        idx = first + tl.arange(0, CHUNK)
        ok = head_ok[:, None] & (idx < used)[None, :]
        m_lanes = tl.maximum(m_lanes, tl.load(part_max_ptr + base[:, None] + idx[None, :], mask=ok,
                                              other=float("-inf"), cache_modifier=".cg"))
    m_max = tl.max(m_lanes, axis=1)  # finite for real heads: used >= 1 and every used partition saw a token
    m_max = tl.where(head_ok, m_max, 0.0)
    total = tl.zeros([HEADS, CHUNK], tl.float32)
    acc = tl.zeros([HEADS, HEAD_DIM], tl.float32)
    for first in range(0, used, CHUNK):
        idx = first + tl.arange(0, CHUNK)
        ok = head_ok[:, None] & (idx < used)[None, :]
        slots = base[:, None] + idx[None, :]  # [HEADS, CHUNK]
        weight = tl.exp2(tl.load(part_max_ptr + slots, mask=ok, other=float("-inf"), cache_modifier=".cg")
                         - m_max[:, None])  # 0 off the end
        total += weight * tl.load(part_sum_ptr + slots, mask=ok, other=0.0, cache_modifier=".cg")
        o_part = tl.load(part_out_ptr + slots[:, :, None] * HEAD_DIM + dims[None, None, :], mask=ok[:, :, None],
                         other=0.0, cache_modifier=".cg")
        acc += tl.sum(weight[:, :, None] * o_part, axis=1)
    total = tl.sum(total, axis=1)
    return acc / tl.where(head_ok, total, 1.0)[:, None]


@triton.jit
def _partition_length(context_len, num_parts, PARTITION: tl.constexpr):
    """Tokens per partition of a context: an equal share of num_parts, rounded up to a multiple of PARTITION."""
    return tl.cdiv(tl.cdiv(context_len, num_parts), PARTITION) * PARTITION


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


DEFAULT_PARTITION = 128  # the shortest partition: 128 tokens of a 128-wide head are one loop iteration


def default_num_parts(seqs: int, heads: int, max_context: int, num_sms: int, heads_per_program: int = 1,
                      partition: int = DEFAULT_PARTITION) -> int:
    """Partitions per context: enough for two programs per SM (from the batch's shape alone, so that a graph
    captures it), and no more than partitions of `partition` tokens give at `max_context`."""
    groups = seqs * -(-heads // heads_per_program)
    return max(1, min(-(-2 * num_sms // groups), -(-max_context // partition)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, *, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, partition_size: int | None = None,
                           num_parts: int | None = None, heads_per_program: int = 1, block_n: int | None = None,
                           lanes: bool | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q [seqs, heads, head_dim]; k_cache, v_cache [num_blocks, block_size, heads, head_dim];
    block_tables [seqs, max_blocks] (int32 or int64, padded entries are never read);
    context_lens [seqs] (each >= 1 and <= max_blocks * block_size). Returns [seqs, heads, head_dim]
    in q's dtype (written into `out` when given). Scores, softmax and accumulation are float32.
    An 8-bit cache (int8 or float8_e4m3fn) needs k_scale and v_scale, [num_blocks, block_size, heads] float32:
    a cached vector times its scale is the key or value.

    Tuning knobs (the defaults depend only on shapes and the device, so a CUDA graph captures one grid):
    partition_size: the shortest split, in tokens (power of two; default DEFAULT_PARTITION); num_parts: splits
    per context (default: default_num_parts; with only partition_size given, as many as partitions of that size
    need at the tables' width, so each split is exactly partition_size); heads_per_program: heads sharing one program
    (power of two; a partial last group is masked); block_n: tokens per loop iteration (power of two,
    independent of block_size); lanes: keep the online-softmax state per token lane and merge it after
    the loop, instead of reducing across warps every iteration (default: for batches of an 8-bit cache);
    num_warps of the partition kernel (default: see below).
    """
    seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, cache_heads, cache_dim = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if (cache_heads, cache_dim) != (num_heads, head_dim):
        raise ValueError(f"q has {num_heads} heads of {head_dim}, the cache {cache_heads} of {cache_dim}")
    if block_tables.dim() != 2 or block_tables.shape[0] != seqs or context_lens.shape != (seqs,):
        raise ValueError("block_tables must be [seqs, max_blocks] and context_lens [seqs]")
    if block_tables.dtype not in (torch.int32, torch.int64) or context_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError("block_tables and context_lens must be int32 or int64")
    for name, size in (("head_dim", head_dim), ("block_size", block_size), ("heads_per_program", heads_per_program)):
        if size & (size - 1):
            raise ValueError(f"{name} must be a power of two, got {size}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim")
    scaled = check_kv_scales(k_cache, k_scale, v_scale)
    if out is None:
        out = torch.empty((seqs, num_heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)}, contiguous along head_dim")
    if seqs == 0:
        return out

    max_context = block_tables.shape[1] * block_size
    if num_parts is None:
        if partition_size is None:
            num_parts = default_num_parts(seqs, num_heads, max_context, _num_sms(q.device), heads_per_program)
        else:
            num_parts = -(-max_context // partition_size)
    partition_size = partition_size or DEFAULT_PARTITION
    # The fastest of bench/attention_bench.py's sweeps (docs/benchmarks.md): batches of an 8-bit cache take lanes,
    # batches of a 16-bit cache 64 tokens per iteration in 2 warps, one sequence 128 tokens of a 128-wide head in 4
    # warps (32 with lanes).
    if lanes is None:
        lanes = scaled and seqs > 1
    batched = seqs > 1 and not scaled and not lanes and heads_per_program * head_dim == 128
    if block_n is None:
        block_n = 64 if batched else max(16, min(128, (4096 if lanes else 16384) // (heads_per_program * head_dim)))
    if num_warps is None:
        num_warps = 2 if batched else 4
    block_n = min(block_n, partition_size)
    if partition_size & (partition_size - 1) or block_n & (block_n - 1):
        raise ValueError(f"partition_size ({partition_size}) and block_n ({block_n}) must be powers of two")
    num_parts = max(1, num_parts)
    head_groups = -(-num_heads // heads_per_program)
    single = num_parts == 1

    if single:  # the kernel writes `out` directly and never touches these
        part_out = part_max = part_sum = out
    else:
        part_out = torch.empty((seqs, num_heads, num_parts, head_dim), dtype=torch.float32, device=q.device)
        part_max = torch.empty((seqs, num_heads, num_parts), dtype=torch.float32, device=q.device)
        part_sum = torch.empty((seqs, num_heads, num_parts), dtype=torch.float32, device=q.device)

    if not scaled:  # never read
        k_scale = v_scale = part_max
    arrivals = out if single else _arrival_counters(q.device, seqs * head_groups)
    _partition_kernel[(num_parts, head_groups, seqs)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_out, part_max, part_sum, arrivals,
        k_scale, v_scale,
        float(scale) * LOG2E,
        num_heads, num_parts,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1),
        k_scale.stride(0) if scaled else 0, k_scale.stride(1) if scaled else 0,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEADS=heads_per_program,
        PARTITION=partition_size, BLOCK_N=block_n, LANES=lanes, PRELOAD=not lanes and seqs == 1, SINGLE=single,
        SCALED=scaled,
        REDUCE_CHUNK=REDUCE_CHUNK, num_warps=num_warps, **pdl.launch(q),
    )
    return out


_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def _arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """The device's arrival counters, zero between launches (each launch leaves them so), at least `count`."""
    counters = _ARRIVALS.get(device)
    if counters is None or counters.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A buffer made during a capture would be the graph's; the warm-up run before any capture makes it.
            raise RuntimeError(f"decode attention needs {count} arrival counters; run it once before capturing")
        counters = _ARRIVALS[device] = torch.zeros(max(count, 8192), dtype=torch.int32, device=device)
    return counters
