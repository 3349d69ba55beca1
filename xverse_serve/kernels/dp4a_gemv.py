"""One-row projections on int8 and int4 weights through the integer dot-product instruction (dp4a): the row of
activations is quantized first, then the GEMV multiplies four weights by four activations per instruction. For a
few rows (matmul, up to MAX_ROWS) each row of activations gets its own programs over the same weights, which the
later rows read mostly from L2.

Why: a float GEMV widens every weight and multiplies it in float32: compiled for sm_90, kernels.gemv spends 7.9
instructions per byte of int8 weights (3.25 per byte of bf16), kernels.quant_matmul's int4 GEMV about 9 per
weight. With dp4a the weights stay integers: an int8 word of four weights is one load and two dp4a (1.3
instructions per byte in all), an int4 word of eight is three bit operations and four dp4a. In CUDA graphs on an
H100 (bench/dp4a_bench.py) that took a step's int4 projections from 3.30 to 2.54 ms; int8's float GEMV was
already near the copy bandwidth there, and dp4a only matches it. llama.cpp's MMVQ kernels work this way.

The activations, in two int8 parts so that they keep bf16's precision (quantize_row): with s = max|x| / 127,
x / s = hi + lo / 254 + e, hi and lo in [-127, 127], |e| <= 1 / 508: an error of at most max|x| / 64,516 per value,
far below the weights' own (int8: up to max|w| / 254 per weight). Each part's dot with a row of weights is exact in
int32 (|sum| <= K * 127 * 127 < 2^31 for K < 133,000).

Words: an int8 weight row is read as int32 words of four consecutive weights, matched by words of four
consecutive activations. An int4 row (quantization.quantize_int4: byte j holds k = 2j low, 2j + 1 high) is read
as words of eight weights: masking the low nibbles gives four weights at k = 8i, 8i + 2, 8i + 4, 8i + 6, shifting
first the four at the odd k, so the activations are packed the same way (INT4 order: even word, then odd word).
int4's groups: y = sum_g scale_g * (q_g . x_g) + offset_g * sum(x_g), with sum(x_g) taken in float32.

With programmatic dependent launch (kernels.pdl) a GEMV reads its first step of weights (and int4's scales and
offsets) before it waits for the kernel before it: the weights are written by no kernel, so the GEMV's programs,
launched while the activations are being quantized (one program, the other multiprocessors idle), stream them in
meanwhile. With K in one step (int4's 32 groups a step at K = 4,096), that is all of them.

Every kernel runs in Triton's interpreter too (the tests), where dp4a is spelt out in shifts and multiplies.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import pdl
from .gemv import step_weights, store_row
from .quant_matmul import k_slices

# Triton's interpreter has no inline PTX: there dp4a is computed from the bytes (same result).
EMULATE = os.environ.get("TRITON_INTERPRET", "0") == "1"
INT4_GROUP_WORDS = 16  # 128 weights of a group, eight per int32 word
# (rows per program, words per step, num_warps) for int8 and (rows per program, groups per step, num_warps) for
# int4: within 2% of the best of 36 and 48 block shapes on each of XVERSE-7B's projections (bench/dp4a_bench.py,
# H100: bench/results/dp4a_h100.json). K's loop is unrolled whole (static_range), so that a thread has many loads in
# flight: left to the compiler, int4's 22 steps at K = 11,008 stayed a loop (one weight load per thread a step), and
# down_proj streamed at 1.0 TB/s where gate_up_proj's unrolled 8 steps streamed at 1.9; unrolled, int4's one-sequence
# step took 3.01 ms against 3.29 (H100, one_row_pdl_h100.json against one_row_h100.json). num_stages timed the same.
INT8_CONFIG = (8, 64, 8)
INT4_CONFIG = (8, 4, 4)


@triton.jit
def _dp4a(a, b, c, A_SIGNED: tl.constexpr, EMULATE: tl.constexpr):
    """c + the dot of a's four bytes (signed, or unsigned without A_SIGNED) with b's (signed), per int32 lane."""
    if EMULATE:
        for i in tl.static_range(4):
            if A_SIGNED:
                a_i = (a << (24 - 8 * i)) >> 24
            else:
                a_i = (a >> (8 * i)) & 0xFF
            c += a_i * ((b << (24 - 8 * i)) >> 24)
        return c
    elif A_SIGNED:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _pack(q, axis: tl.constexpr):
    """int32 values in [-128, 127] along an axis of four -> one word, the first value in the lowest byte."""
    if axis == 1:
        shifts = (tl.arange(0, 4) * 8)[None, :]
    else:
        shifts = (tl.arange(0, 4) * 8)[None, None, :]
    return tl.sum((q & 0xFF) << shifts, axis=axis)


@triton.jit
def _quantize_kernel(x_ptr, words_ptr, scale_ptr, sums_ptr, norm_w_ptr, eps, stride_xm, K: tl.constexpr,
                     BLOCK: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr, NORMED: tl.constexpr,
                     ACT_BLOCK: tl.constexpr, PDL: tl.constexpr):
    # One program per row of x, the whole row at once (BLOCK >= K): its scale, the words (hi part, then lo part,
    # K / 4 words each; in INT4 order each part is its even words then its odd words, K / 8 each), and (INT4) the
    # float32 sum of each group. ACT_BLOCK (INT4 only; 0: two parts per row): one part, a scale per ACT_BLOCK
    # values. NORMED: the row's RMSNorm is quantized instead, computed and rounded as fused_ops' norm kernel does.
    # One pass: it runs before every GEMV, so its latency counts.
    pdl.begin(PDL)
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    if INT4:  # [words, parity, byte]: element 8 * word + 2 * byte + parity
        word = tl.arange(0, BLOCK // 8)
        cols = (word * 8)[:, None, None] + tl.arange(0, 2)[None, :, None] + (tl.arange(0, 4) * 2)[None, None, :]
    else:  # [words, byte]: element 4 * word + byte
        word = tl.arange(0, BLOCK // 4)
        cols = (word * 4)[:, None] + tl.arange(0, 4)[None, :]
    x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
    if NORMED:
        dtype = x_ptr.dtype.element_ty
        variance = tl.math.div_rn(tl.sum(x * x), tl.cast(K, tl.float32))
        inv_rms = tl.math.div_rn(1.0, tl.sqrt_rn(variance + eps))
        norm_w = tl.load(norm_w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        x = (norm_w * (x * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    if ACT_BLOCK:
        # Each block of ACT_BLOCK // 8 words: its largest magnitude sets its scale.
        blocks = tl.arange(0, BLOCK // ACT_BLOCK)
        largest = tl.max(tl.reshape(tl.max(tl.max(tl.abs(x), axis=2), axis=1), [BLOCK // ACT_BLOCK, ACT_BLOCK // 8]),
                         axis=1)
        block_scale = largest / 127.0
        tl.store(scale_ptr + row * (K // ACT_BLOCK) + blocks, block_scale, mask=blocks < K // ACT_BLOCK)
        factor = tl.broadcast_to((127.0 / tl.maximum(largest, 1e-30))[:, None], [BLOCK // ACT_BLOCK, ACT_BLOCK // 8])
        q = tl.floor(x * tl.reshape(factor, [BLOCK // 8])[:, None, None] + 0.5).to(tl.int32)  # zeros stay 0
        _store_int4_order(words_ptr + row * (K // 4), word, q, K)
        # The groups' sums of the activations as quantized, so that the GEMV takes the exact product of the weights
        # with them: with the sums of x, each group's rounding errors times its offset would shift every output
        # alike (the offsets of a group are alike across rows), a bias instead of noise.
        block_sums = tl.sum(tl.reshape(tl.sum(tl.sum(q, axis=2), axis=1), [BLOCK // ACT_BLOCK, ACT_BLOCK // 8]),
                            axis=1).to(tl.float32) * block_scale
        group_sums = tl.sum(tl.reshape(block_sums, [BLOCK // GROUP, GROUP // ACT_BLOCK]), axis=1)
        group = tl.arange(0, BLOCK // GROUP)
        tl.store(sums_ptr + row * (K // GROUP) + group, group_sums, mask=group < K // GROUP)
    else:
        if INT4:  # a group is GROUP // 8 consecutive words: their sums, from the values already loaded
            group = tl.arange(0, BLOCK // GROUP)
            word_sums = tl.reshape(tl.sum(tl.sum(x, axis=2), axis=1), [BLOCK // GROUP, GROUP // 8])
            tl.store(sums_ptr + row * (K // GROUP) + group, tl.sum(word_sums, axis=1), mask=group < K // GROUP)
        largest = tl.max(tl.abs(x))
        tl.store(scale_ptr + row, largest / 127.0)
        t = x * (127.0 / tl.maximum(largest, 1e-30))  # a row of zeros: t = 0
        hi = tl.floor(t + 0.5)
        lo = tl.floor((t - hi) * 254.0 + 0.5)
        hi, lo = hi.to(tl.int32), tl.minimum(tl.maximum(lo, -127.0), 127.0).to(tl.int32)
        _store_parts(words_ptr + row * (K // 2), word, hi, lo, K, INT4)


@triton.jit
def _store_parts(words, word, hi, lo, K: tl.constexpr, INT4: tl.constexpr):
    """The two parts' words of a row: hi's, then lo's."""
    if INT4:
        _store_int4_order(words, word, hi, K)
        _store_int4_order(words + K // 4, word, lo, K)
    else:
        tl.store(words + word, _pack(hi, 1), mask=word < K // 4)
        tl.store(words + K // 4 + word, _pack(lo, 1), mask=word < K // 4)


@triton.jit
def _store_int4_order(words, word, q, K: tl.constexpr):
    """One part's words in INT4 order, q [words, parity, byte]: the even words, then the odd words, K / 8 each."""
    parity = tl.arange(0, 2)[None, :] * (K // 8)
    ok = (word < K // 8)[:, None] & (parity >= 0)
    tl.store(words + parity + word[:, None], _pack(q, 2), mask=ok)


def quantize_row(x: torch.Tensor, int4: bool = False, group: int = 128, norm_weight: torch.Tensor | None = None,
                 eps: float = 0.0, act_block: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, K] (float) -> (words int32 [M, K // 2], scale float32 [M], group sums float32 [M, K // group] or None):
    the two int8 parts of each row, packed for int8 weights or (int4) for int4 weights. With `norm_weight`, of the
    rows' RMSNorm (fused_ops.rms_norm with that weight and eps) instead: the norm kernel and this one in one.
    act_block (int4 only; a power of two from 8 to `group`): one int8 part with a scale per act_block values
    instead, words [M, K // 4] and scale [M, K // act_block]."""
    m, k = x.shape
    if k % (group if int4 else 4):
        raise ValueError(f"quantize_row takes rows of a multiple of {group if int4 else 4} values, got {k}")
    if act_block and not (int4 and 8 <= act_block <= group and not act_block & (act_block - 1)):
        raise ValueError(f"one-part activations are for int4 weights, in blocks of a power of two from 8 to {group}")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"the norm's weight must be [{k}], got {tuple(norm_weight.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    words = torch.empty(m, k // 4 if act_block else k // 2, dtype=torch.int32, device=x.device)
    scale = torch.empty((m, k // act_block) if act_block else (m,), dtype=torch.float32, device=x.device)
    sums = torch.empty(m, k // group, dtype=torch.float32, device=x.device) if int4 else None
    block = triton.next_power_of_2(k)
    _quantize_kernel[(m,)](x, words, scale, sums if sums is not None else scale,
                           norm_weight if norm_weight is not None else x, float(eps), x.stride(0), K=k, BLOCK=block,
                           INT4=int4, GROUP=group, NORMED=norm_weight is not None, ACT_BLOCK=act_block,
                           num_warps=4 if block <= 4096 else 8, **pdl.launch(x))
    return words, scale, sums


@triton.jit
def _int8_kernel(words_ptr, x_scale_ptr, w_ptr, w_scale_ptr, y_ptr, residual_ptr, squares_ptr, partial_ptr, count_ptr,
                 N, stride_wn, stride_words_m, stride_xs_m, stride_ym, stride_partial_m, stride_count_m,
                 KW: tl.constexpr, KW_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 SPLIT_K: tl.constexpr, GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr, EMULATE: tl.constexpr,
                 PDL: tl.constexpr):
    # w: int32 words [N, KW] (four int8 weights each; GATED: 2N rows, the gate's then the up's); words: the row's hi
    # words then its lo words. The epilogue is kernels.gemv's (store_row), after the split-K sum (_store_split).
    # PDL: launched early (kernels.pdl). program_id(1): the row of activations (several only without GATED and
    # ADD_RESIDUAL); program_id(2): the slice of K, KW_SPLIT words.
    pdl.launch_next(PDL)
    words_ptr += tl.program_id(1) * stride_words_m
    x_scale_ptr += tl.program_id(1) * stride_xs_m
    y_ptr += tl.program_id(1) * stride_ym
    first_word = _split_start(KW_SPLIT, SPLIT_K)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    # The first step's weights are read before the wait: with PDL they stream in while the kernel before (the
    # activations' quantization, one program) runs, instead of after it.
    w, w_up = step_weights(w_rows, N * stride_wn, first_word + tl.arange(0, BLOCK_KW), row_ok, KW, False, GATED)
    pdl.wait(PDL)
    acc_hi = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.int32)
    acc_lo = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.int32)
    up_hi = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.int32)
    up_lo = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.int32)
    for start in tl.static_range(0, KW_SPLIT, BLOCK_KW):
        cols = first_word + start + tl.arange(0, BLOCK_KW)
        col_ok = cols < KW
        if start > 0:
            w, w_up = step_weights(w_rows, N * stride_wn, cols, row_ok, KW, False, GATED)
        # Loaded at the weights' shape (each thread the words its weights meet, from L1): a [BLOCK_KW] load
        # broadcast over the rows would go through shared memory and a barrier every step.
        x_words = words_ptr + cols[None, :] + 0 * rows[:, None]
        hi = tl.load(x_words, mask=col_ok[None, :], other=0)
        lo = tl.load(x_words + KW, mask=col_ok[None, :], other=0)
        acc_hi = _dp4a(w, hi, acc_hi, True, EMULATE)
        acc_lo = _dp4a(w, lo, acc_lo, True, EMULATE)
        if GATED:
            up_hi = _dp4a(w_up, hi, up_hi, True, EMULATE)
            up_lo = _dp4a(w_up, lo, up_lo, True, EMULATE)
    x_scale = tl.load(x_scale_ptr)
    out = _int8_dot(acc_hi, acc_lo) * x_scale * tl.load(w_scale_ptr + rows, mask=row_ok, other=0.0)
    up = out
    if GATED:
        up = _int8_dot(up_hi, up_lo) * x_scale * tl.load(w_scale_ptr + N + rows, mask=row_ok, other=0.0)
    _store_split(y_ptr, rows, row_ok, out, up, residual_ptr, squares_ptr, partial_ptr + tl.program_id(1) *
                 stride_partial_m, count_ptr + tl.program_id(1) * stride_count_m, N, SPLIT_K, GATED, ADD_RESIDUAL)


@triton.jit
def _split_start(PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr):
    """Where this program's slice of K starts (program_id(2)); 0 as a constant without split-K, so that the masks
    of whole steps fold away as before."""
    if SPLIT_K > 1:
        return tl.program_id(2) * PER_SPLIT
    else:
        return 0


@triton.jit
def _store_split(y_ptr, rows, row_ok, out, up, residual_ptr, squares_ptr, partial_ptr, count_ptr, N,
                 SPLIT_K: tl.constexpr, GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    """store_row once the SPLIT_K programs of these rows have each added their part of K: each adds its float32
    sums into partial (N values, GATED: the gate's then the up's), then counts itself in at count[program_id(0)];
    the last to arrive takes the sums, leaves partial and count zero again for the next launch, and stores. One
    launch, where a second kernel to add the parts would cost a launch of its own."""
    if SPLIT_K == 1:
        store_row(y_ptr, rows, row_ok, out, up, residual_ptr, squares_ptr, GATED, ADD_RESIDUAL)
    else:
        tl.atomic_add(partial_ptr + rows, out, mask=row_ok, sem="relaxed")
        if GATED:
            tl.atomic_add(partial_ptr + N + rows, up, mask=row_ok, sem="relaxed")
        tl.debug_barrier()  # every thread's sums are in before the count says so (the count's release covers them)
        arrived = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # Read where the adds were made (an atomic add of 0: L2), then zeroed by plain stores, as no other
            # program of this launch touches these rows any more.
            # Rows past N read 0 (a masked atomic's result is undefined), as store_row's sum of squares needs.
            zero = tl.zeros_like(out)
            out = tl.where(row_ok, tl.atomic_add(partial_ptr + rows, zero, mask=row_ok, sem="relaxed"), 0.0)
            tl.store(partial_ptr + rows, zero, mask=row_ok)
            if GATED:
                up = tl.where(row_ok, tl.atomic_add(partial_ptr + N + rows, zero, mask=row_ok, sem="relaxed"), 0.0)
                tl.store(partial_ptr + N + rows, zero, mask=row_ok)
            tl.store(count_ptr + tl.program_id(0), 0)
            store_row(y_ptr, rows, row_ok, out, up, residual_ptr, squares_ptr, GATED, ADD_RESIDUAL)


@triton.jit
def _int8_dot(acc_hi, acc_lo):
    """The float32 dot of each row with the activations in units of their scale: hi + lo / 254."""
    return tl.sum(acc_hi, axis=1).to(tl.float32) + tl.sum(acc_lo, axis=1).to(tl.float32) * (1.0 / 254.0)


@triton.jit
def _int4_step(w_rows, s_rows, groups, row_ok, group_ok, scale_ptr, offset_ptr, GROUP_WORDS: tl.constexpr):
    """A step's weights (int32 words [BLOCK_N, BLOCK_G, GROUP_WORDS]) and their groups' scales and offsets
    ([BLOCK_N, BLOCK_G] float32): what no kernel writes, so the first step's may be loaded before the PDL wait."""
    cols = (groups * GROUP_WORDS)[:, None] + tl.arange(0, GROUP_WORDS)[None, :]  # [BLOCK_G, GROUP_WORDS]
    w = tl.load(w_rows + cols[None, :, :], mask=row_ok[:, None, None] & group_ok[:, None][None, :, :], other=0,
                eviction_policy="evict_first")
    scale, offset = _group_affine(s_rows, groups, row_ok, group_ok, scale_ptr, offset_ptr)
    return w, scale, offset


@triton.jit
def _int4_steps(w_rows, s_rows, up_offset, up_s_offset, groups, row_ok, group_ok, scale_ptr, offset_ptr,
                GROUP_WORDS: tl.constexpr, GATED: tl.constexpr):
    """_int4_step's weights, scales and offsets, and (GATED) the up projection's rows' (else the same again)."""
    w, scale, offset = _int4_step(w_rows, s_rows, groups, row_ok, group_ok, scale_ptr, offset_ptr, GROUP_WORDS)
    w_up, scale_up, offset_up = w, scale, offset
    if GATED:
        w_up, scale_up, offset_up = _int4_step(w_rows + up_offset, s_rows + up_s_offset, groups, row_ok, group_ok,
                                               scale_ptr, offset_ptr, GROUP_WORDS)
    return w, scale, offset, w_up, scale_up, offset_up


@triton.jit
def _int4_groups(w, scale, offset, cols, groups, group_ok, words_ptr, sums, x_scale, x_scale_ptr, KW: tl.constexpr,
                 EMULATE: tl.constexpr, ACT_BLOCK: tl.constexpr):
    """[BLOCK_N, BLOCK_G]: each row's products with the activations over a step's groups (float32), from the step's
    weights, scales and offsets (_int4_step). ACT_BLOCK: the activations are one part with a scale per ACT_BLOCK
    values (at x_scale_ptr) instead of two parts with x_scale."""
    col_ok = group_ok[:, None]
    even = w & 0x0F0F0F0F
    odd = (w >> 4) & 0x0F0F0F0F
    zero = tl.zeros(w.shape, dtype=tl.int32)
    hi = _dp4a(even, tl.load(words_ptr + cols, mask=col_ok, other=0)[None, :, :], zero, False, EMULATE)
    hi = _dp4a(odd, tl.load(words_ptr + KW + cols, mask=col_ok, other=0)[None, :, :], hi, False, EMULATE)
    if ACT_BLOCK:  # each block's sum of products times its scale: a block is ACT_BLOCK // 8 consecutive words
        blocks_per_group: tl.constexpr = w.shape[2] * 8 // ACT_BLOCK
        blocks = groups[:, None] * blocks_per_group + tl.arange(0, blocks_per_group)[None, :]
        block_scale = tl.load(x_scale_ptr + blocks, mask=col_ok, other=0.0)
        per_block = tl.sum(tl.reshape(hi, [w.shape[0], w.shape[1], blocks_per_group, ACT_BLOCK // 8]), axis=3)
        dot = tl.sum(per_block.to(tl.float32) * block_scale[None, :, :], axis=2)
        return dot * scale + offset * sums
    lo = _dp4a(even, tl.load(words_ptr + 2 * KW + cols, mask=col_ok, other=0)[None, :, :], zero, False, EMULATE)
    lo = _dp4a(odd, tl.load(words_ptr + 3 * KW + cols, mask=col_ok, other=0)[None, :, :], lo, False, EMULATE)
    dot = tl.sum(hi, axis=2).to(tl.float32) + tl.sum(lo, axis=2).to(tl.float32) * (1.0 / 254.0)
    return dot * scale * x_scale + offset * sums


@triton.jit
def _group_affine(s_rows, groups, row_ok, group_ok, scale_ptr, offset_ptr):
    """[BLOCK_N, BLOCK_G] float32: the int4 weights' scale and offset of each row's groups."""
    ok = row_ok[:, None] & group_ok[None, :]
    scale = tl.load(scale_ptr + s_rows + groups[None, :], mask=ok, other=0.0).to(tl.float32)
    offset = tl.load(offset_ptr + s_rows + groups[None, :], mask=ok, other=0.0).to(tl.float32)
    return scale, offset


@triton.jit
def _int4_kernel(words_ptr, x_scale_ptr, sums_ptr, w_ptr, scale_ptr, offset_ptr, y_ptr, residual_ptr, squares_ptr,
                 partial_ptr, count_ptr, N, stride_wn, stride_sn, stride_words_m, stride_xs_m, stride_sums_m,
                 stride_ym, stride_partial_m, stride_count_m, GROUPS: tl.constexpr, GROUPS_SPLIT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_WORDS: tl.constexpr, SPLIT_K: tl.constexpr,
                 GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr, EMULATE: tl.constexpr, ACT_BLOCK: tl.constexpr,
                 PDL: tl.constexpr):
    # w: int32 words [N, GROUPS * GROUP_WORDS] (eight int4 weights each; GATED: 2N rows, the gate's then the up's);
    # words: hi even, hi odd, lo even, lo odd, GROUPS * GROUP_WORDS words each; scale, offset: float16 [N, GROUPS];
    # sums: the row's group sums; ACT_BLOCK: one part instead, as quantize_row's act_block. The epilogue is
    # kernels.gemv's (store_row), after the split-K sum (_store_split). PDL: launched early (kernels.pdl).
    # program_id(1): the row of activations (several only without GATED and ADD_RESIDUAL); program_id(2): the slice
    # of K, GROUPS_SPLIT groups.
    pdl.launch_next(PDL)
    words_ptr += tl.program_id(1) * stride_words_m
    x_scale_ptr += tl.program_id(1) * stride_xs_m
    sums_ptr += tl.program_id(1) * stride_sums_m
    y_ptr += tl.program_id(1) * stride_ym
    KW: tl.constexpr = GROUPS * GROUP_WORDS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows[:, None, None].to(tl.int64) * stride_wn
    s_rows = rows[:, None].to(tl.int64) * stride_sn
    first_group = _split_start(GROUPS_SPLIT, SPLIT_K)
    # The first step's weights are read before the wait: with PDL they stream in while the kernel before (the
    # activations' quantization, one program) runs, instead of after it.
    groups = first_group + tl.arange(0, BLOCK_G)
    w, scale, offset, w_up, scale_up, offset_up = _int4_steps(w_rows, s_rows, N * stride_wn, N * stride_sn, groups,
                                                              row_ok, groups < GROUPS, scale_ptr, offset_ptr,
                                                              GROUP_WORDS, GATED)
    pdl.wait(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    x_scale = 1.0 if ACT_BLOCK else tl.load(x_scale_ptr)  # one-part activations: a scale per block, read per step
    for start in tl.static_range(0, GROUPS_SPLIT, BLOCK_G):
        groups = first_group + start + tl.arange(0, BLOCK_G)
        group_ok = groups < GROUPS
        if start > 0:
            w, scale, offset, w_up, scale_up, offset_up = _int4_steps(w_rows, s_rows, N * stride_wn, N * stride_sn,
                                                                      groups, row_ok, group_ok, scale_ptr, offset_ptr,
                                                                      GROUP_WORDS, GATED)
        cols = (groups * GROUP_WORDS)[:, None] + tl.arange(0, GROUP_WORDS)[None, :]  # [BLOCK_G, GROUP_WORDS]
        sums = tl.load(sums_ptr + groups, mask=group_ok, other=0.0)[None, :]
        acc += _int4_groups(w, scale, offset, cols, groups, group_ok, words_ptr, sums, x_scale, x_scale_ptr, KW,
                            EMULATE, ACT_BLOCK)
        if GATED:
            acc_up += _int4_groups(w_up, scale_up, offset_up, cols, groups, group_ok, words_ptr, sums, x_scale,
                                   x_scale_ptr, KW, EMULATE, ACT_BLOCK)
    _store_split(y_ptr, rows, row_ok, tl.sum(acc, axis=1), tl.sum(acc_up, axis=1), residual_ptr, squares_ptr,
                 partial_ptr + tl.program_id(1) * stride_partial_m, count_ptr + tl.program_id(1) * stride_count_m, N,
                 SPLIT_K, GATED, ADD_RESIDUAL)


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              config: tuple[int, int, int] = INT8_CONFIG) -> torch.Tensor:
    """x [..., K] holding one row (float), weight int8 [N, K], scale float32 [N] -> x @ (weight * scale[:, None]).T,
    shaped [..., N], in x's dtype (quantize_row, then the dp4a GEMV)."""
    out, _ = fused_gemv(x, weight, scale, config=config)
    return out


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
              config: tuple[int, int, int] = INT4_CONFIG) -> torch.Tensor:
    """x [..., K] holding one row (float), packed uint8 [N, K // 2], scale and offset float16 [N, K // 128]
    (quantize_int4's layout) -> x @ W.T, shaped [..., N], in x's dtype."""
    out, _ = fused_gemv(x, packed, scale, offset, config=config)
    return out


# matmul's largest batch: each row of activations reads the weights again (from L2 where they fit), so beyond a few
# rows the tensor-core kernels are faster.
MAX_ROWS = 8


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None, *,
           act_block: int = 0, config: tuple[int, int, int] | None = None, split_k: int = 1) -> torch.Tensor:
    """x [..., K] of up to MAX_ROWS rows @ W^T, W as fused_gemv takes it, without the fusions: each row quantized
    (one kernel for all), then one GEMV launch whose programs take one block of weight rows and one row of x
    each (and with split_k, one slice of K: fused_gemv's)."""
    k = weight.shape[1] * (2 if offset is not None else 1)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] != k or not 1 <= x2.shape[0] <= MAX_ROWS:
        raise ValueError(f"dp4a_gemv.matmul takes 1 to {MAX_ROWS} rows of {k} values, got {tuple(x.shape)}")
    _check_k(k, offset, scale)
    words, x_scale, sums = quantize_row(x2, offset is not None, 8 * INT4_GROUP_WORDS, act_block=act_block)
    out = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(words, x_scale, sums, weight, scale, offset, out, None, False, config, act_block, split_k)
    return out.view(*x.shape[:-1], weight.shape[0])


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None, *,
               norm: tuple[torch.Tensor, float] | None = None, gated: bool = False,
               residual: torch.Tensor | None = None, config: tuple[int, int, int] | None = None,
               act_block: int = 0, split_k: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one-row path's projection on dp4a (the fusions of kernels.gemv's): x [..., K] holding one row, int8
    weights [N, K] with float32 scales [N], or (with `offset`) int4 ones in quantize_int4's layout, groups of 128.
    norm (weight, eps): the product is taken with x's RMSNorm, computed while quantizing x. gated: the weight holds
    2N rows, the gate's then the up's, and the result is silu(gate) * up. residual [N]: the result is residual +
    the product, and the float32 sums of squares of its slices come with it (kernels.gemv.add_gemv's). act_block
    (int4 only): the activations in one int8 part with a scale per act_block values (quantize_row's), two dp4a per
    word of weights where two parts take four, at that part's precision. split_k: K in up to that many slices of
    whole steps, each its own programs, the last of a block of rows to finish adding them up and storing (more
    programs, each with fewer loads to wait on, where N alone makes few: o_proj's and down_proj's 4,096 rows are
    512 programs). Returns (the result shaped [..., N] in x's dtype, the sums of squares or None)."""
    int4 = offset is not None
    rows, k = weight.shape[0], weight.shape[1] * (2 if int4 else 1)
    n = rows // 2 if gated else rows
    if gated and rows % 2:
        raise ValueError(f"a gated dp4a GEMV takes an even number of weight rows (gate, then up), got {rows}")
    _check_k(k, offset, scale)
    _check(x, k, 8 * INT4_GROUP_WORDS if int4 else 4)
    if residual is not None and (residual.numel() != n or residual.dtype != x.dtype):
        raise ValueError(f"the residual must be {n} values of {x.dtype}, got {tuple(residual.shape)} of "
                         f"{residual.dtype}")
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    words, x_scale, sums = quantize_row(x.reshape(1, k), int4, 8 * INT4_GROUP_WORDS, norm_weight, eps, act_block)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    squares = _launch(words, x_scale, sums, weight, scale, offset, out, residual, gated, config, act_block, split_k)
    return out.view(*x.shape[:-1], n), squares


def _launch(words: torch.Tensor, x_scale: torch.Tensor, sums: torch.Tensor | None, weight: torch.Tensor,
            scale: torch.Tensor, offset: torch.Tensor | None, out: torch.Tensor, residual: torch.Tensor | None,
            gated: bool, config: tuple[int, int, int] | None, act_block: int, split_k: int) -> torch.Tensor | None:
    """The GEMV over quantize_row's output for out's rows [M, N]; returns the sums of squares with a residual."""
    int4 = offset is not None
    m, n = out.shape
    block_n, block, num_warps = config or (INT4_CONFIG if int4 else INT8_CONFIG)
    programs = triton.cdiv(n, block_n)
    per_split, split_k = split_shape(weight.shape[1] * (2 if int4 else 1), int4, config, split_k)
    partial, count = split_scratch(out.device, m, weight.shape[0], programs) if split_k > 1 else (out, out)
    squares = torch.empty(programs, dtype=torch.float32, device=out.device) if residual is not None else None
    epilogue = dict(SPLIT_K=split_k, GATED=gated, ADD_RESIDUAL=residual is not None, EMULATE=EMULATE,
                    num_warps=num_warps, num_stages=1, **pdl.launch(out))
    residual_arg = residual.reshape(n) if residual is not None else out
    squares_arg = squares if squares is not None else out
    w = weight.view(torch.int32)
    rows = (words.stride(0), x_scale.stride(0))
    scratch = (partial.stride(0), count.stride(0))
    if int4:
        _int4_kernel[(programs, m, split_k)](words, x_scale, sums, w, scale, offset, out, residual_arg, squares_arg,
                                             partial, count, n, w.stride(0), scale.stride(0), *rows, sums.stride(0),
                                             out.stride(0), *scratch, GROUPS=scale.shape[1], GROUPS_SPLIT=per_split,
                                             BLOCK_N=block_n, BLOCK_G=block, GROUP_WORDS=INT4_GROUP_WORDS,
                                             ACT_BLOCK=act_block, **epilogue)
    else:
        _int8_kernel[(programs, m, split_k)](words, x_scale, w, scale, out, residual_arg, squares_arg, partial, count,
                                             n, w.stride(0), *rows, out.stride(0), *scratch,
                                             KW=weight.shape[1] // 4, KW_SPLIT=per_split, BLOCK_N=block_n,
                                             BLOCK_KW=block, **epilogue)
    return squares


def split_shape(k: int, int4: bool, config: tuple[int, int, int] | None, split_k: int) -> tuple[int, int]:
    """(K's length a slice, slices) of a launch on K weights a row with `config` (None: the format's default) and
    split_k: whole steps a slice, in groups (int4) or words (int8), fewer slices where K has fewer steps."""
    block = (config or (INT4_CONFIG if int4 else INT8_CONFIG))[1]
    return k_slices(k // (8 * INT4_GROUP_WORDS) if int4 else k // 4, block, split_k)


# Per device: the split-K launches' float32 sums and arrival counts, zero between launches (each launch leaves them
# so). Shared by every split-K launch on the device, which the stream runs one after another. A buffer outgrown is
# kept, not freed: CUDA graphs captured with it still use it.
_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_OUTGROWN: list[tuple[torch.Tensor, torch.Tensor]] = []
SCRATCH_MIN_ROWS = 32768  # weight rows: XVERSE-7B's largest split projection (gate_up_proj) has 22,016
SCRATCH_MIN_PROGRAMS = 4096


def split_scratch(device: torch.device, m: int, rows: int, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums float32 [m, rows], counts int32 [m, programs]) of zeros for a split-K launch, views of the device's
    scratch (MAX_ROWS rows of activations from the first, so that it seldom grows). Grown only outside a CUDA
    graph's capture: a graph's memory is its own (the decode graphs' warm-up step, and the tuner's first call, run
    each shape eagerly first)."""
    partial, count = _SCRATCH.get(device, (None, None))
    if partial is None or partial.numel() < m * rows or count.numel() < m * programs:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the dp4a split-K scratch must be sized before a CUDA graph's capture: run the "
                               "shape once outside it first")
        if partial is not None:
            _OUTGROWN.append((partial, count))
        size = max(m, MAX_ROWS) * max(rows, SCRATCH_MIN_ROWS)
        counts = max(m, MAX_ROWS) * max(programs, SCRATCH_MIN_PROGRAMS)
        partial = torch.zeros(max(size, partial.numel() if partial is not None else 0), dtype=torch.float32,
                              device=device)
        count = torch.zeros(max(counts, count.numel() if count is not None else 0), dtype=torch.int32, device=device)
        _SCRATCH[device] = (partial, count)
    return partial[:m * rows].view(m, rows), count[:m * programs].view(m, programs)


def _check_k(k: int, offset: torch.Tensor | None, scale: torch.Tensor) -> None:
    if offset is not None and k != scale.shape[1] * 8 * INT4_GROUP_WORDS:
        raise ValueError(f"the dp4a GEMV takes int4 groups of {8 * INT4_GROUP_WORDS} weights; got K={k} and "
                         f"{scale.shape[1]} groups")


def _check(x: torch.Tensor, k: int, multiple: int) -> None:
    if x.numel() != k:
        raise ValueError(f"the dp4a GEMV takes one row of {k} values, got a tensor of shape {tuple(x.shape)}")
    if k % multiple:
        raise ValueError(f"the dp4a GEMV takes K a multiple of {multiple}, got {k}")
