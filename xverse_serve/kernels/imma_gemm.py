"""y = x @ W^T for int8 and int4 weights on the int8 tensor cores (IMMA), the weights entering the dots as they
are stored: no int-to-float conversion per weight, which is what bounds the bf16-dot kernels of split_gemm and
quant_matmul (instructions per weight, not bytes).

The bf16 or fp16 activations are split into two int8 parts with one float32 scale s, x ~= s * (256 * hi + lo):
q = round(x / s) with s = amax / 32639 (127 * 256 + 127) is a 16-bit fixed-point number, hi = round(q / 256) and
lo = q - 256 * hi, both in [-128, 127]. Sixteen bits against the block's largest value are finer than bf16's eight
for all but the block's smallest values (which add little to a dot), so the products keep weight-only
quantization's accuracy (relative error ~1e-4 against the exact product in the CPU tests). Both parts' dots run
into one int32 sum, 256 * (W . hi) + W . lo, exact where it stays under 2^31 (per step of K here).

Two shapes of kernel:
- prefill-sized M (`rows_matmul`, `rows_matmul_int4`): one small kernel splits each row of x (one scale per row),
  then an output-tiled GEMM. int8 keeps two int32 sums over the whole of K and scales once at the end; int4
  unpacks the nibbles (0..15, exact in int8) and applies each group's scale to the group's int32 sum and its
  offset to the group's sum of x (written by the split kernel, divided by s).
- 1-64 rows: split_gemm's split-K kernels with `two_part=True` split the activations inside the kernel per step
  of K (per group for int4): no extra kernel per projection in a decode step. fp8 weights take the same path on
  FP8 tensor cores, x in two e4m3 parts (hi, and 8 times the remainder), which keep about 7 of its bits where
  one e4m3 part (torch._scaled_mm's) keeps 4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl, split_gemm
from .gemv import check_scale
from .split_gemm import FIXED, _round

SPLIT_BLOCK = 1024  # elements of a row per step of the split kernel; a multiple of int4's group
COMBINE_BLOCK = 1024  # outputs per program of cublas_rows_matmul's scaling kernel
# cublas_rows_matmul is offered up to this many rows: on an H100 it was the fastest at 64 rows for three of int8's
# four decoder shapes and at none of 128-1,024, where imma_rows took 0.6-0.8 of its time (quant_h100_pdl.json).
CUBLAS_MAX_ROWS = 64
# (block_m, block_n, block_k, num_warps, num_stages) for rows_matmul; no register spills on sm_90 (ptxas -v).
ROWS_CONFIGS = ((128, 128, 128, 8, 3), (64, 128, 128, 4, 4))
# (block_m, block_n, num_warps, num_stages) for rows_matmul_int4: one group of K per step ((128, 64, 4, 3) was
# never the fastest for a shape and batch on an H100, bench/results/quant_h100_twopart.json).
ROWS_INT4_CONFIGS = ((64, 128, 4, 3),)


@triton.jit
def _split_rows_kernel(x_ptr, hi_ptr, lo_ptr, s_ptr, sum_ptr, stride_xm, K: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK: tl.constexpr, INT4: tl.constexpr, PDL: tl.constexpr):
    # One row. For int4 each group of K is written evens first, then odds (the packed nibbles' order: low, high),
    # and sum_ptr gets each group's sum of x divided by s. PDL: launched early (kernels.pdl).
    pdl.begin(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    top = tl.max(amax, axis=0)
    inv = 1.0 / tl.maximum(top, 1e-30) * FIXED  # a row of zeros stays zeros
    tl.store(s_ptr + row, top / FIXED)
    for k0 in range(0, K, BLOCK):
        ks = k0 + offs
        ok = ks < K
        x = tl.load(x_ptr + row * stride_xm + ks, mask=ok, other=0.0).to(tl.float32)
        q = _round(x * inv)
        hi = (q + 128) >> 8
        lo = q - (hi << 8)
        if INT4:
            within = ks % GROUP
            dest = ks - within + (within % 2) * (GROUP // 2) + within // 2
            groups = k0 // GROUP + tl.arange(0, BLOCK // GROUP)
            sums = tl.sum(tl.reshape(x, [BLOCK // GROUP, GROUP]), axis=1) * inv
            tl.store(sum_ptr + row * (K // GROUP) + groups, sums, mask=groups < K // GROUP)
        else:
            dest = ks
        tl.store(hi_ptr + row * K + dest, hi.to(tl.int8), mask=ok)
        tl.store(lo_ptr + row * K + dest, lo.to(tl.int8), mask=ok)


def split_rows(x: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (hi, lo int8 [M, K], s float32 [M], sums float32 [M, K // group]) with x ~= s * (256 * hi +
    lo) per row; with a group (int4), each group's columns reordered evens first and its sum of x / s."""
    parts, s, sums = _split_parts(x, group)
    m = x.shape[0]
    return parts[:m], parts[m:], s, sums


def _split_parts(x: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """split_rows with hi's rows and lo's in one int8 buffer [2M, K], as cuBLAS multiplies them in one call."""
    m, k = x.shape
    if group and (k % group or SPLIT_BLOCK % group):
        raise ValueError(f"int4's activations split in groups of {group} dividing both K ({k}) and {SPLIT_BLOCK}")
    parts = torch.empty(2 * m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    sums = torch.empty(m, k // group if group else 1, dtype=torch.float32, device=x.device)
    _split_rows_kernel[(m,)](x, parts, parts[m:], s, sums, x.stride(0), K=k, GROUP=group or SPLIT_BLOCK,
                             BLOCK=SPLIT_BLOCK, INT4=bool(group), num_warps=4, **pdl.launch(x))
    return parts, s, sums


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's row tile and output tile, in groups of GROUP_M row tiles that share their weight tiles in
    L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's rows and output channels (_tile_ids' tiles); indices past M or N are clamped (loads stay in
    bounds; the store masks them)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, outs, tl.where(rows < M, rows, 0), tl.where(outs < N, outs, 0)


# Not specialized on M, which varies from step to step: a variant compiled while serving would stall every request.
@triton.jit(do_not_specialize=["M"])
def _rows_kernel(hi_ptr, lo_ptr, s_ptr, w_ptr, ws_ptr, y_ptr, M, N, stride_wn, stride_ym, K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 PDL: tl.constexpr):
    # PDL: launched early (kernels.pdl); waits for the kernel before it first, lets the next launch after its loop.
    pdl.wait(PDL)
    rows, outs, rows_in, outs_in = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    ks = tl.arange(0, BLOCK_K)
    a_offsets = rows_in[:, None].to(tl.int64) * K + ks[None, :]
    w_ptrs = w_ptr + outs_in[None, :].to(tl.int64) * stride_wn + ks[:, None]  # [BLOCK_K, BLOCK_N]
    # Two sums: 256 * the high parts' would pass 2^31 over a long K.
    acc_hi = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for _ in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs)
        acc_hi = tl.dot(tl.load(hi_ptr + a_offsets), w, acc_hi, out_dtype=tl.int32)
        acc_lo = tl.dot(tl.load(lo_ptr + a_offsets), w, acc_lo, out_dtype=tl.int32)
        a_offsets += BLOCK_K
        w_ptrs += BLOCK_K
    pdl.launch_next(PDL)
    _store_rows(acc_hi, acc_lo, s_ptr, ws_ptr, y_ptr, rows, outs, rows_in, outs_in, M, N, stride_ym)


@triton.jit
def _store_rows(acc_hi, acc_lo, s_ptr, ws_ptr, y_ptr, rows, outs, rows_in, outs_in, M, N, stride_ym):
    """y = (256 * acc_hi + acc_lo) * each row's scale * each output's scale, stored where rows < M, outs < N
    (rows_in, outs_in: the same indices clamped in bounds, _tile's)."""
    scale = tl.load(s_ptr + rows_in)[:, None] * tl.load(ws_ptr + outs_in)[None, :]
    y = (acc_hi.to(tl.float32) * 256.0 + acc_lo.to(tl.float32)) * scale
    tl.store(y_ptr + rows[:, None] * stride_ym + outs[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (outs < N)[None, :])


@triton.jit(do_not_specialize=["M"])
def _rows_int4_kernel(hi_ptr, lo_ptr, s_ptr, sum_ptr, w_ptr, scale_ptr, offset_ptr, y_ptr, M, N, stride_wn,
                      stride_sn, stride_ym, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)  # as _rows_kernel
    rows, outs, rows_in, outs_in = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    half = tl.arange(0, GROUP // 2)
    a_offsets = rows_in[:, None].to(tl.int64) * K + half[None, :]
    w_ptrs = w_ptr + outs_in[None, :].to(tl.int64) * stride_wn + half[:, None]  # [GROUP // 2, BLOCK_N]
    s_offsets = outs_in * stride_sn
    groups: tl.constexpr = K // GROUP
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, groups):
        packed = tl.load(w_ptrs)
        w_even = (packed & 0xF).to(tl.int8)
        w_odd = (packed >> 4).to(tl.int8)
        # one int32 sum per group: 256 * the high parts' + the low parts' (|sum| < 2^26)
        p = tl.dot(tl.load(hi_ptr + a_offsets), w_even)
        p = tl.dot(tl.load(hi_ptr + a_offsets + GROUP // 2), w_odd, p, out_dtype=tl.int32) * 256
        p = tl.dot(tl.load(lo_ptr + a_offsets), w_even, p, out_dtype=tl.int32)
        p = tl.dot(tl.load(lo_ptr + a_offsets + GROUP // 2), w_odd, p, out_dtype=tl.int32)
        scale = tl.load(scale_ptr + s_offsets + g).to(tl.float32)
        offset = tl.load(offset_ptr + s_offsets + g).to(tl.float32)
        x_sum = tl.load(sum_ptr + rows_in * groups + g)
        acc += p.to(tl.float32) * scale[None, :] + x_sum[:, None] * offset[None, :]
        a_offsets += GROUP
        w_ptrs += GROUP // 2
    pdl.launch_next(PDL)
    y = acc * tl.load(s_ptr + rows_in)[:, None]  # the sums of x were divided by s too
    tl.store(y_ptr + rows[:, None] * stride_ym + outs[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (outs < N)[None, :])


def _as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def rows_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                config: tuple[int, int, int, int, int] = ROWS_CONFIGS[0]) -> torch.Tensor:
    """x [..., K] (bf16 or fp16) @ (weight int8 [N, K] * scale float32 [N, 1]).T in x's dtype, for prefill-sized
    M. K must be a multiple of the config's block_k."""
    check_scale(weight, scale)
    if weight.dtype != torch.int8 or weight.stride(1) != 1:
        raise ValueError("rows_matmul takes an int8 weight with contiguous rows")
    block_m, block_n, block_k, num_warps, num_stages = config
    n, k = weight.shape
    if k % block_k:
        raise ValueError(f"rows_matmul's K ({k}) must be a multiple of block_k ({block_k})")
    x2 = _as_rows(x, k)
    hi, lo, s, _ = split_rows(x2)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _rows_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
        hi, lo, s, weight, scale, y, m, n, weight.stride(0), y.stride(0), K=k, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=8, num_warps=num_warps, num_stages=num_stages, **pdl.launch(x2))
    return y.view(*x.shape[:-1], n)


@triton.jit(do_not_specialize=["M"])
def _combine_kernel(acc_ptr, s_ptr, ws_ptr, y_ptr, M, N, stride_ym, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # acc: int32 [2M, N], the high parts' products then the low parts'; one row of y per program along axis 0.
    pdl.begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    outs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = outs < N
    hi = tl.load(acc_ptr + row * N + outs, mask=ok, other=0).to(tl.float32)
    lo = tl.load(acc_ptr + (row + M) * N + outs, mask=ok, other=0).to(tl.float32)
    y = (hi * 256.0 + lo) * tl.load(s_ptr + row) * tl.load(ws_ptr + outs, mask=ok, other=0.0)
    tl.store(y_ptr + row * stride_ym + outs, y.to(y_ptr.dtype.element_ty), mask=ok)


def cublas_rows_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """rows_matmul's product through cuBLAS's int8 GEMM (torch._int_mm): both parts of x in one call of 2M rows
    (int32 sums, exact: |sum| <= 128 * 127 * K < 2^31 for K < 132,000), then one kernel applies the scales. The
    tuner offers it up to CUBLAS_MAX_ROWS rows. cuBLAS wants M over 16 and K and N multiples of 8."""
    check_scale(weight, scale)
    n, k = weight.shape
    if weight.dtype != torch.int8 or weight.stride(1) != 1 or n % 8 or k % 8:
        raise ValueError(f"cublas_rows_matmul takes an int8 weight with contiguous rows and N, K multiples of 8; "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    x2 = _as_rows(x, k)
    m = x2.shape[0]
    if 2 * m <= 16:
        raise ValueError(f"cublas_rows_matmul takes more than 8 rows, got {m}")
    parts, s, _ = _split_parts(x2)
    sums = torch._int_mm(parts, weight.t())
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _combine_kernel[(m, triton.cdiv(n, COMBINE_BLOCK))](sums, s, scale, y, m, n, y.stride(0), BLOCK=COMBINE_BLOCK,
                                                        num_warps=4, **pdl.launch(x2))
    return y.view(*x.shape[:-1], n)


def rows_matmul_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int,
                     config: tuple[int, int, int, int] = ROWS_INT4_CONFIGS[0]) -> torch.Tensor:
    """x [..., K] (bf16 or fp16) @ dequantized(packed int4 weight).T in x's dtype, for prefill-sized M."""
    if group % 32:
        raise ValueError(f"two-part int4 dots take groups of a multiple of 32, got {group}")
    k = split_gemm.check_int4(weight, scale, offset, group)
    block_m, block_n, num_warps, num_stages = config
    n = weight.shape[0]
    x2 = _as_rows(x, k)
    hi, lo, s, sums = split_rows(x2, group)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _rows_int4_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
        hi, lo, s, sums, weight, scale, offset, y, m, n, weight.stride(0), scale.stride(0), y.stride(0), K=k,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8, num_warps=num_warps, num_stages=num_stages,
        **pdl.launch(x2))
    return y.view(*x.shape[:-1], n)
