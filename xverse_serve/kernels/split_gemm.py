"""y = x @ W^T for 1 to 64 rows of activations and int8 or fp8 weights with a float32 scale per row, or int4
weights with a scale and offset per group (model/quantization.py's layouts), for decode steps of many sequences.

Such a step is bound by reading the weights once, and the tensor cores do its few rows' products for free. Two
choices make it stream:
- Swap-AB: a program computes a [BLOCK_N, rows] tile of y^T = W x^T. The weight tile is the dot's left operand,
  so its BLOCK_N (64 or more) rows fill the tensor core's tall side, and the activations pad only to 16 columns.
  The weight is widened to the activations' dtype in registers (int8, int4 and e4m3 values are exact in bf16
  and fp16), and the scales multiply the float32 sums: once at the end, or per group for int4.
- Split-K: N / BLOCK_N tiles alone leave most SMs idle (o_proj and down_proj have 4096 outputs), so SPLIT programs
  share a tile, each taking a slice of K. Each writes its float32 partial sums to a workspace and takes a ticket;
  the one that takes the last ticket adds the partials in split order (the result does not depend on which
  program finished first), scales and stores them, and resets the ticket for the next call. One kernel, no
  memset, and CUDA-graph capturable.

scaled_rows_matmul takes fp8 weights with activations already in e4m3 (a scale per row, as torch._scaled_mm takes
them): one FP8 dot a step, nothing converted, both scales on the sums; its tiles by pointers or by TMA copies.

Launched with programmatic dependent launch (kernels.pdl, Hopper) as the one-row kernels are: each program waits
for the kernel before it first, so its programs are placed on the SMs while that kernel ends, and lets the next
kernel launch once its loop is done, so that kernel's programs are placed while the split's last programs add the
partial sums. The weights are not read before the wait: a step's tiles are software-pipelined by Triton, which
puts the first loads of weights and x together.

With `two_part`, the weights skip the widening: int8 (and int4's nibbles) go into int8 tensor-core dots, e4m3 into
FP8 ones, as stored, and each step's activations are split into two parts with one scale per row (kernels/imma_gemm.py
explains the split): the conversion per weight, which bounds the widening kernels, is gone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .gemv import check_scale

MAX_ROWS = 64
# (N, K) -> (block_n, block_k, num_warps, num_stages, split), from bench/gemv_bench.py --split on an H200
# (XVERSE-7B's projections); other shapes take DEFAULT_CONFIG with split chosen by default_split.
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, int]] = {}
DEFAULT_CONFIG = (64, 128, 4, 3)
# Configurations the start-up tuner times (model/quantization.py), split chosen for each weight's shape. Of
# (64, 128, 4, 3), (32, 256, 4, 4) and (128, 128, 8, 4), only the first was ever the fastest kernel for an int8
# or fp8 shape and batch on an H200 (bench/results/quant_h200_split.json); each one more is compiled at start-up.
TUNED_CONFIGS = ((64, 128, 4, 3),)
# bench/scaled_matmul_bench.py sweeps these.
SWEEP_CONFIGS = ((64, 128, 4, 3), (32, 256, 4, 4), (128, 128, 8, 4))
# int4: (block_n, num_warps, num_stages), one group of K per step.
INT4_DEFAULT_CONFIG = (64, 8, 3)
INT4_TUNED_CONFIGS = ((64, 8, 3), (128, 8, 3))
TARGET_PROGRAMS_PER_SM = 3
# fp8 weights with fp8 activations (scaled_rows_matmul): (block_n, block_k, num_warps, num_stages, tma) the tuner
# times, from SCALED_ROWS_MIN_ROWS rows (fewer are served by exact-activation kernels at close to the weights'
# bandwidth already: no reason to round the activations to e4m3 there). Its split fills the card half as densely
# as the others': on an H100 at 32 and 64 rows, of 5 tiles and two splits each, the fastest for every projection
# had 1.9-2.9 programs per SM, and the same tile with twice as many was 5-36% slower (fp8_rows_lab_h100.json).
SCALED_ROWS_CONFIGS = ((64, 128, 4, 4, 0), (64, 256, 4, 4, 1))
SCALED_ROWS_MIN_ROWS = 16
SCALED_ROWS_PROGRAMS_PER_SM = 1.5
# Two-part activations (two_part=True, kernels/imma_gemm.py explains them): the configurations the tuner times,
# (block_n, block_k, num_warps, num_stages) for int8 and fp8, (block_n, num_warps, num_stages) for int4; none
# spills registers on sm_90. block_k stays <= 512, under which the int32 sums cannot overflow. (256, 64, 8, 3) for
# int8/fp8 and (128, 8, 3) for int4 were timed too and never the fastest, for any shape and batch on an H100
# (bench/results/quant_h100_twopart.json): each one more is compiled at start-up.
TWO_PART_CONFIGS = ((64, 128, 4, 3), (128, 128, 8, 3))
TWO_PART_INT4_CONFIGS = ((64, 4, 3),)
FIXED = tl.constexpr(32639.0)  # 127 * 256 + 127: q = round(x / s) splits into int8 halves
FP8_MAX = tl.constexpr(448.0)  # e4m3's largest value

# Workspaces for the partial sums and the tickets, per (device, N, BLOCK_N, split): allocated on first use (the
# start-up tuner's calls, before any CUDA graph is captured), and reused by every weight of that shape, since the
# kernels of one stream run one after another.
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@triton.jit
def _finish(acc, scale, y_ptr, partial_ptr, ticket_ptr, tile, split, rows, outs, row_ok, out_ok, N, stride_ym,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, MAX_M: tl.constexpr):
    """Stores y^T's tile, acc * scale; split along K, the program that takes the tile's last ticket does, from
    all the slices' partial sums (partial[split, row, n]) added in split order, then resets the ticket."""
    y_ptrs = y_ptr + rows[None, :] * stride_ym + outs[:, None]
    store_ok = row_ok[None, :] & out_ok[:, None]
    if SPLIT == 1:
        tl.store(y_ptrs, (acc * scale).to(y_ptr.dtype.element_ty), mask=store_ok)
    else:
        p_ptrs = partial_ptr + rows[None, :] * N + outs[:, None]
        tl.store(p_ptrs + split * MAX_M * N, acc, mask=store_ok)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in tl.static_range(SPLIT):  # in split order, whichever program finished first
                total += tl.load(p_ptrs + s * MAX_M * N, mask=store_ok, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, (total * scale).to(y_ptr.dtype.element_ty), mask=store_ok)
            tl.atomic_xchg(ticket_ptr + tile, 0)


@triton.jit
def _step_tiles(w_ptrs, x_ptrs, ks, out_ok, row_ok, K: tl.constexpr, EVEN_K: tl.constexpr):
    """One step's weight tile [BLOCK_N, BLOCK_K] and x^T tile [BLOCK_K, BLOCK_M] (rows past M, outputs past N and,
    unless EVEN_K, columns past K read as zeros: the last slices may run past K)."""
    if EVEN_K:
        w = tl.load(w_ptrs, mask=out_ok[:, None], other=0.0, eviction_policy="evict_first")
        xt = tl.load(x_ptrs, mask=row_ok[None, :], other=0.0)
    else:
        k_ok = ks < K
        w = tl.load(w_ptrs, mask=out_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        xt = tl.load(x_ptrs, mask=row_ok[None, :] & k_ok[:, None], other=0.0)
    return w, xt


@triton.jit
def _round(v):
    return (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32)


@triton.jit
def _two_part_dot_int8(w, xt):
    """W . x^T for int8 weights [BLOCK_N, BLOCK_K] and float32 xt [BLOCK_K, M] on int8 tensor cores, x split per
    column into two int8 halves of q = round(x / s), s = amax / 32639; one int32 sum, 256 * (W . hi) + W . lo
    (under 2^31 for BLOCK_K <= 512)."""
    amax = tl.max(tl.abs(xt), axis=0)
    q = _round(xt * (1.0 / tl.maximum(amax, 1e-30) * FIXED)[None, :])
    hi = (q + 128) >> 8
    p = tl.dot(w, hi.to(tl.int8), out_dtype=tl.int32) * 256
    p = tl.dot(w, (q - (hi << 8)).to(tl.int8), p, out_dtype=tl.int32)
    return p.to(tl.float32) * (amax / FIXED)[None, :]


@triton.jit
def _two_part_dot_fp8(w, xt):
    """W . x^T for e4m3 weights [BLOCK_N, BLOCK_K] and float32 xt [BLOCK_K, M] on FP8 tensor cores, x in two e4m3
    parts per column: hi = e4m3(x / s) with s = amax / 448, lo = e4m3(8 * (x / s - hi)) (the remainder is under
    an eighth of |x / s| whichever way hi rounded, so 8 times it stays in range): about 7 of x's bits."""
    amax = tl.max(tl.abs(xt), axis=0)
    v = xt * (1.0 / tl.maximum(amax, 1e-30) * FP8_MAX)[None, :]
    hi = v.to(tl.float8e4nv)
    lo = ((v - hi.to(tl.float32)) * 8.0).to(tl.float8e4nv)
    p = tl.dot(w, lo) * 0.125
    p = tl.dot(w, hi, p)
    return p * (amax / FP8_MAX)[None, :]


@triton.jit
def _two_part_dot_int4(packed, x_even, x_odd):
    """W . x^T for one group of packed int4 weights [BLOCK_N, GROUP // 2] (the nibbles 0..15, exact in int8)
    against x's even and odd columns (float32 [GROUP // 2, M]), x in two int8 halves with one scale per column."""
    amax = tl.maximum(tl.max(tl.abs(x_even), axis=0), tl.max(tl.abs(x_odd), axis=0))
    inv = (1.0 / tl.maximum(amax, 1e-30) * FIXED)[None, :]
    q_even, q_odd = _round(x_even * inv), _round(x_odd * inv)
    hi_even, hi_odd = (q_even + 128) >> 8, (q_odd + 128) >> 8
    w_even = (packed & 0xF).to(tl.int8)
    w_odd = (packed >> 4).to(tl.int8)
    p = tl.dot(w_even, hi_even.to(tl.int8), out_dtype=tl.int32)
    p = tl.dot(w_odd, hi_odd.to(tl.int8), p, out_dtype=tl.int32) * 256
    p = tl.dot(w_even, (q_even - (hi_even << 8)).to(tl.int8), p, out_dtype=tl.int32)
    p = tl.dot(w_odd, (q_odd - (hi_odd << 8)).to(tl.int8), p, out_dtype=tl.int32)
    return p.to(tl.float32) * (amax / FIXED)[None, :]


@triton.jit(do_not_specialize=["M"])
def _split_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, partial_ptr, ticket_ptr, M, N, stride_xm, stride_wn, stride_ym,
                  K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT: tl.constexpr, PER_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, MAX_M: tl.constexpr,
                  TWO_PART: tl.constexpr, PDL: tl.constexpr):
    # int8 or fp8 weights. PER_SPLIT: steps of BLOCK_K per slice of K (the last slices may run past K unless
    # EVEN_K). TWO_PART: the weights enter int8 or FP8 dots as stored, x split in two parts per step. PDL: launched
    # early (module docstring).
    pdl.wait(PDL)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    outs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    out_ok, row_ok = outs < N, rows < M
    ks = split * PER_SPLIT * BLOCK_K + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + outs[:, None].to(tl.int64) * stride_wn + ks[None, :]
    x_ptrs = x_ptr + rows[None, :] * stride_xm + ks[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(PER_SPLIT):
        w, xt = _step_tiles(w_ptrs, x_ptrs, ks, out_ok, row_ok, K, EVEN_K)
        if not EVEN_K:
            ks += BLOCK_K
        if TWO_PART and w.dtype == tl.float8e4nv:
            acc += _two_part_dot_fp8(w, xt.to(tl.float32))
        elif TWO_PART:
            acc += _two_part_dot_int8(w, xt.to(tl.float32))
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    pdl.launch_next(PDL)
    scale = tl.load(scale_ptr + outs, mask=out_ok, other=0.0)[:, None]
    _finish(acc, scale, y_ptr, partial_ptr, ticket_ptr, tile, split, rows, outs, row_ok, out_ok, N, stride_ym,
            BLOCK_M, BLOCK_N, SPLIT, MAX_M)


@triton.jit(do_not_specialize=["M"])
def _scaled_rows_kernel(x, w, x_scale_ptr, y_ptr, scale_ptr, partial_ptr, ticket_ptr, M, N, stride_xm, stride_wn,
                        stride_ym, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PER_SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                        MAX_M: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    # e4m3 weights and e4m3 activations quantized per row beforehand (x_scale [M]): one FP8 dot a step, nothing
    # converted in the loop, both scales on the float32 sums. TMA: x and w are tensor descriptors and each tile
    # comes by a TMA copy (rows past M and columns past K read as zeros); else pointers and cp.async.
    pdl.wait(PDL)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    outs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    out_ok, row_ok = outs < N, rows < M
    first = split * PER_SPLIT * BLOCK_K
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if TMA:
        for i in tl.range(0, PER_SPLIT, num_stages=STAGES):
            wt = w.load([tile * BLOCK_N, first + i * BLOCK_K])
            xt = x.load([0, first + i * BLOCK_K])
            acc = tl.dot(wt, tl.trans(xt), acc)
    else:
        ks = first + tl.arange(0, BLOCK_K)
        w_ptrs = w + outs[:, None].to(tl.int64) * stride_wn + ks[None, :]
        x_ptrs = x + rows[None, :] * stride_xm + ks[:, None]
        for _ in tl.range(0, PER_SPLIT, num_stages=STAGES):
            wt, xt = _step_tiles(w_ptrs, x_ptrs, ks, out_ok, row_ok, K, EVEN_K)
            if not EVEN_K:
                ks += BLOCK_K
            acc = tl.dot(wt, xt, acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    pdl.launch_next(PDL)
    scale = (tl.load(scale_ptr + outs, mask=out_ok, other=0.0)[:, None]
             * tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)[None, :])
    _finish(acc, scale, y_ptr, partial_ptr, ticket_ptr, tile, split, rows, outs, row_ok, out_ok, N, stride_ym,
            BLOCK_M, BLOCK_N, SPLIT, MAX_M)


@triton.jit
def _nibbles_plus_128(q, dtype: tl.constexpr):
    """Values 0..15 as 128 + q in bf16 or fp16, by their bits (128's exponent, q in the mantissa's bits of the
    units, where both formats hold 128..143 exactly): two or three integer operations instead of an int-to-float
    conversion and a narrowing, which bound the kernel. The dot's extra 128 * sum(x) goes with the group's offset."""
    if dtype == tl.bfloat16:
        w = (q.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
    else:
        w = ((q.to(tl.uint16) << 3) | 0x5800).to(tl.float16, bitcast=True)  # 128's spacing is 1/8 in fp16
    return w


@triton.jit(do_not_specialize=["M"])
def _split_int4_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, offset_ptr, partial_ptr, ticket_ptr, M, N, stride_xm,
                       stride_wn, stride_sn, stride_ym, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PER_SPLIT: tl.constexpr, EVEN: tl.constexpr,
                       MAX_M: tl.constexpr, TWO_PART: tl.constexpr, PDL: tl.constexpr):
    # int4 (quantization.quantize_int4's layout): one group of K per step. The nibbles go into the dots as
    # 128 + q (exact in bf16 and fp16, _nibbles_plus_128), against x's even and odd columns; the group's scale and
    # offset apply to the float32 sums: sum_k x_k W_nk = scale_ng * sum_k x_k (128 + q_nk) + (offset_ng - 128 *
    # scale_ng) * sum_k x_k.
    pdl.wait(PDL)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    outs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    out_ok, row_ok = outs < N, rows < M
    first = split * PER_SPLIT  # this slice's first group
    pairs = tl.arange(0, GROUP // 2)
    w_ptrs = w_ptr + outs[:, None].to(tl.int64) * stride_wn + first * (GROUP // 2) + pairs[None, :]
    x_ptrs = x_ptr + rows[None, :] * stride_xm + first * GROUP + 2 * pairs[:, None]
    s_offsets = outs * stride_sn + first
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for i in range(PER_SPLIT):
        if EVEN:
            w_ok = out_ok
            x_ok = row_ok
        else:  # the last slices run past K: their groups read as zeros
            w_ok = out_ok & (first + i < K // GROUP)
            x_ok = row_ok & (first + i < K // GROUP)
        packed = tl.load(w_ptrs, mask=w_ok[:, None], other=0, eviction_policy="evict_first")
        x_even = tl.load(x_ptrs, mask=x_ok[None, :], other=0.0)
        x_odd = tl.load(x_ptrs + 1, mask=x_ok[None, :], other=0.0)
        if TWO_PART:
            part = _two_part_dot_int4(packed, x_even.to(tl.float32), x_odd.to(tl.float32))
            bias = 0.0
        elif x_even.dtype == tl.float32:  # the exact comparisons, not a speed path: no offset to cancel
            part = tl.dot((packed & 0xF).to(tl.float32), x_even)
            part = tl.dot((packed >> 4).to(tl.float32), x_odd, part)
            bias = 0.0
        else:
            part = tl.dot(_nibbles_plus_128(packed & 0xF, x_even.dtype), x_even)
            part = tl.dot(_nibbles_plus_128(packed >> 4, x_even.dtype), x_odd, part)
            bias = 128.0
        scale = tl.load(scale_ptr + s_offsets, mask=w_ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + s_offsets, mask=w_ok, other=0.0).to(tl.float32)
        x_sum = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=0)
        acc += part * scale[:, None] + (offset - bias * scale)[:, None] * x_sum[None, :]
        w_ptrs += GROUP // 2
        x_ptrs += GROUP
        s_offsets += 1
    pdl.launch_next(PDL)
    _finish(acc, 1.0, y_ptr, partial_ptr, ticket_ptr, tile, split, rows, outs, row_ok, out_ok, N, stride_ym,
            BLOCK_M, BLOCK_N, SPLIT, MAX_M)


def default_split(n: int, k: int, block_n: int, block_k: int, device: torch.device,
                  per_sm: float = TARGET_PROGRAMS_PER_SM) -> int:
    """The fewest slices of K (a power of two) that give every SM `per_sm` programs, keeping at least two steps of
    BLOCK_K per slice."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    tiles = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    split = 1
    while tiles * split < per_sm * sms and steps // (split * 2) >= 2:
        split *= 2
    return split


def _workspace(device: torch.device, n: int, block_n: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device, n, block_n, split)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.empty(split * MAX_ROWS * n, dtype=torch.float32, device=device),
                            torch.zeros(triton.cdiv(n, block_n), dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., k] as [rows, k], contiguous along k, with 1..MAX_ROWS rows."""
    x2 = x.reshape(-1, k)
    if not 1 <= x2.shape[0] <= MAX_ROWS:
        raise ValueError(f"split_matmul takes 1 to {MAX_ROWS} rows, got {x2.shape[0]}")
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _outputs(x2: torch.Tensor, n: int, block_n: int, split: int,
             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output [rows, n] (in x2's dtype unless given) and the split's partial sums and tickets."""
    out = torch.empty(x2.shape[0], n, dtype=dtype or x2.dtype, device=x2.device)
    partial, tickets = _workspace(x2.device, n, block_n, split) if split > 1 else (out, out)
    return out, partial, tickets


def split_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 config: tuple[int, ...] | None = None, two_part: bool = False) -> torch.Tensor:
    """x [..., K] holding 1..MAX_ROWS rows, weight [N, K] int8 or float8_e4m3fn (row-major) with scale [N]
    float32 -> x @ (weight * scale[:, None]).T in x's dtype. `config`: (block_n, block_k, num_warps, num_stages)
    with split chosen by default_split, or with a fifth value, the split. `two_part`: the weights go into int8 or
    FP8 (compute capability 8.9+) dots as stored, x split into two parts per step of K (kernels/imma_gemm.py)."""
    check_scale(weight, scale)
    if weight.stride(1) != 1:
        raise ValueError("split_matmul needs the weight's rows contiguous")
    n, k = weight.shape
    x2 = _rows(x, k)
    block_n, block_k, num_warps, num_stages = (config or CONFIGS.get((n, k), DEFAULT_CONFIG))[:4]
    if two_part and block_k > 512:
        raise ValueError("two-part int32 sums hold steps of K up to 512")
    split = config[4] if config and len(config) > 4 else default_split(n, k, block_n, block_k, x.device)
    out, partial, tickets = _outputs(x2, n, block_n, split)
    steps = triton.cdiv(k, block_k)
    _split_kernel[(triton.cdiv(n, block_n), split)](
        x2, weight, out, scale, partial, tickets, x2.shape[0], n, x2.stride(0), weight.stride(0), out.stride(0),
        K=k, BLOCK_M=max(16, triton.next_power_of_2(x2.shape[0])), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
        PER_SPLIT=triton.cdiv(steps, split), EVEN_K=k % block_k == 0 and steps % split == 0, MAX_M=MAX_ROWS,
        TWO_PART=two_part, num_warps=num_warps, num_stages=num_stages, **pdl.launch(x2))
    return out.view(*x.shape[:-1], n)


def scaled_rows_matmul(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       out_dtype: torch.dtype, config: tuple[int, ...] | None = None,
                       tma: bool = False) -> torch.Tensor:
    """xq [M, K] (1..MAX_ROWS rows) with x_scale float32 [M] or [M, 1], weight [N, K] with scale float32 [N] ->
    (xq * x_scale) @ (weight * scale[:, None]).T in out_dtype: e4m3 x and weight on FP8 tensor cores (any dtype
    that both share and tl.dot takes, for Triton's interpreter). `config`: (block_n, block_k, num_warps,
    num_stages), with a fifth value the split (else default_split for SCALED_ROWS_PROGRAMS_PER_SM). `tma`: the tiles
    come by TMA copies (Hopper)."""
    if xq.dtype != weight.dtype or xq.dim() != 2 or weight.stride(1) != 1 or scale.shape != (weight.shape[0],):
        raise ValueError(f"scaled_rows_matmul takes xq [M, K] and weight [N, K] of one dtype with scale [N]; got "
                         f"{xq.dtype} {tuple(xq.shape)}, {weight.dtype} {tuple(weight.shape)}, {tuple(scale.shape)}")
    n, k = weight.shape
    x2 = _rows(xq, k)
    x_scale = x_scale.reshape(-1)
    block_n, block_k, num_warps, num_stages = (config or DEFAULT_CONFIG)[:4]
    split = config[4] if config and len(config) > 4 else default_split(n, k, block_n, block_k, xq.device,
                                                                       SCALED_ROWS_PROGRAMS_PER_SM)
    out, partial, tickets = _outputs(x2, n, block_n, split, out_dtype)
    steps = triton.cdiv(k, block_k)
    block_m = max(16, triton.next_power_of_2(x2.shape[0]))
    x_arg, w_arg = x2, weight
    row_bytes = (k * weight.element_size(), x2.stride(0) * x2.element_size())
    if tma and (row_bytes[0] % 16 or row_bytes[1] % 16 or x2.data_ptr() % 16 or weight.data_ptr() % 16):
        raise ValueError(f"scaled_rows_matmul's TMA copies need rows on 16-byte boundaries; K is {k}")
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_arg = TensorDescriptor.from_tensor(x2, [block_m, block_k])
        w_arg = TensorDescriptor.from_tensor(weight, [block_n, block_k])
    _scaled_rows_kernel[(triton.cdiv(n, block_n), split)](
        x_arg, w_arg, x_scale, out, scale, partial, tickets, x2.shape[0], n, x2.stride(0), weight.stride(0),
        out.stride(0), K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
        PER_SPLIT=triton.cdiv(steps, split), EVEN_K=k % block_k == 0 and steps % split == 0, MAX_M=MAX_ROWS,
        TMA=tma, STAGES=num_stages, num_warps=num_warps, num_stages=num_stages, **pdl.launch(x2))
    return out


def check_int4(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> int:
    """K of a packed int4 weight in quantization.quantize_int4's layout, with contiguous rows; else ValueError."""
    n = weight.shape[0]
    groups = scale.shape[1] if scale.dim() == 2 else 0
    if (weight.dtype != torch.uint8 or scale.shape != (n, groups) or offset.shape != scale.shape
            or weight.shape[1] * 2 != groups * group or weight.stride(1) != 1):
        raise ValueError(f"an int4 weight is packed uint8 [N, K // 2] with scale and offset [N, K // {group}]; got "
                         f"{weight.dtype} {tuple(weight.shape)}, {tuple(scale.shape)} and {tuple(offset.shape)}")
    return groups * group


def split_matmul_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      group: int, config: tuple[int, ...] | None = None, two_part: bool = False) -> torch.Tensor:
    """x [..., K] holding 1..MAX_ROWS rows, weight [N, K // 2] packed int4 with scale and offset [N, K // group]
    (quantization.quantize_int4's layout) -> x @ dequantized(weight).T in x's dtype. `config`: (block_n,
    num_warps, num_stages) with split chosen by default_split, or with a fourth value, the split. `two_part`: the
    nibbles go into int8 dots, x split into two int8 parts per group."""
    if two_part and group % 32:
        raise ValueError(f"two-part int4 dots take groups of a multiple of 32, got {group}")
    k = check_int4(weight, scale, offset, group)
    n, groups = weight.shape[0], k // group
    x2 = _rows(x, k)
    block_n, num_warps, num_stages = (config or INT4_DEFAULT_CONFIG)[:3]
    split = config[3] if config and len(config) > 3 else default_split(n, k, block_n, group, x.device)
    out, partial, tickets = _outputs(x2, n, block_n, split)
    _split_int4_kernel[(triton.cdiv(n, block_n), split)](
        x2, weight, out, scale, offset, partial, tickets, x2.shape[0], n, x2.stride(0), weight.stride(0),
        scale.stride(0), out.stride(0), K=k, GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(x2.shape[0])),
        BLOCK_N=block_n, SPLIT=split, PER_SPLIT=triton.cdiv(groups, split), EVEN=groups % split == 0,
        MAX_M=MAX_ROWS, TWO_PART=two_part, num_warps=num_warps, num_stages=num_stages, **pdl.launch(x2))
    return out.view(*x.shape[:-1], n)
