"""y = W x for one row of activations (a one-sequence decode step) as a Triton GEMV, and for a few rows
(decode steps of up to 32 sequences) as a skinny Triton GEMM.

At one row a projection is pure weight streaming, which cuBLAS's kernels do well below the copy bandwidth
(bench/gemv_bench.py; docs/benchmarks.md). This kernel gives each program a few whole rows of W and walks K in
wide steps, so hundreds of programs stream W once, evicting it from L2 behind them (it is not read again this step).

Each program accumulates the products of its rows in float32 lanes and reduces them at the end, so the
sum is taken in another order than cuBLAS's: the result differs from F.linear by float32 rounding only.

For 2-32 rows, skinny_matmul pads the rows to one 16- or 32-row tile and streams W through tensor-core dots,
which beats cuBLAS there too (most on the lm_head).

Every kernel also takes W as int8 or fp8 (e4m3) with a float32 scale per row (model/quantization.py's layouts:
W[n, k] = q[n, k] * scale[n]): half the bytes to stream, so a one-row step reads its weights in about half the
time, with the same fusions as the bf16 weights. int8 is widened through the float's bits (see _widen), fp8 by the
hardware's conversion, and the row's scale multiplies its float32 sum once, after the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl

# (rows, K) of a weight -> (block_n, block_k, num_warps, num_stages), the fastest of a sweep on an H200 for
# XVERSE-7B's projections (bench/gemv_bench.py); other shapes take DEFAULT_CONFIG.
CONFIGS = {
    (12288, 4096): (4, 1024, 8, 3),  # qkv_proj
    (4096, 4096): (8, 512, 8, 2),  # o_proj
    (22016, 4096): (4, 512, 4, 3),  # gate_up_proj
    (4096, 11008): (4, 1024, 8, 1),  # down_proj
    (100534, 4096): (4, 1024, 8, 1),  # lm_head
}
DEFAULT_CONFIG = (4, 512, 4, 1)
# For gated_gemv, rows of the gate and of the up projection per program: the gate_up_proj's rows per program.
GATED_CONFIGS = {(22016, 4096): (2, 512, 4, 3)}
# The one-row path's fused GEMVs (bench/gemv_bench.py --fused, cold L2, H200): with the norm in the prologue, the
# residual add in the epilogue.
NORMED_CONFIGS = {(12288, 4096): (16, 256, 4, 3), (22016, 4096): (16, 256, 8, 2)}
RESIDUAL_CONFIGS = {(4096, 4096): (8, 512, 8, 3), (4096, 11008): (4, 1024, 8, 1)}
TABLES = {"plain": CONFIGS, "gated": GATED_CONFIGS, "normed": NORMED_CONFIGS, "residual": RESIDUAL_CONFIGS}
# fp8 weights' own tiles (block_k in bytes), as the one-row path calls each projection: written by a sweep on an
# H100 (bench/gemv_bench.py --fused-format fp8 --write-tables; bench/results/gemv_fp8_h100.json), where a tile beat
# the default by 2%: o_proj 32.3 -> 12.4 µs, down_proj 28.9 -> 22.4. Where a shape has none, and for int8, the bf16
# table's tile in bytes (int8_config).
FP8_TABLES: dict[str, dict[tuple[int, int], tuple[int, int, int, int]]] = {
    "plain": {},
    "gated": {(22016, 4096): (2, 2048, 8, 2)},
    "normed": {(12288, 4096): (8, 1024, 4, 2)},
    "residual": {(4096, 4096): (16, 1024, 8, 2), (4096, 11008): (8, 1024, 4, 2)},
}
MAX_SKINNY_ROWS = 32
# With int8 or fp8 weights the skinny GEMM streams half the bytes and is worth up to 64 rows (the tuner decides).
MAX_SCALED_SKINNY_ROWS = 64
# (rows, K) -> (block_n, block_k, num_warps, num_stages) for skinny_matmul, from a sweep at 8 and 32 rows.
SKINNY_CONFIGS = {
    (12288, 4096): (32, 128, 4, 4),
    (4096, 4096): (32, 256, 4, 6),
    (22016, 4096): (64, 128, 4, 3),
    (4096, 11008): (32, 256, 4, 6),
    (100534, 4096): (128, 128, 4, 3),
}
DEFAULT_SKINNY_CONFIG = (64, 128, 4, 3)


# int8 widened through the float's bits (two adds) rather than converted (see _widen); a switch for the benchmark.
INT8_VIA_BITS = True


def int8_config(config: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """For int8 weights, a bf16 configuration's tile in bytes: twice the columns per step."""
    block_n, block_k, num_warps, num_stages = config
    return block_n, 2 * block_k, num_warps, num_stages


@triton.jit
def _widen(w, VIA_BITS: tl.constexpr):
    """A tile of weights as float32. int8 goes through the float's bits, 1.5 * 2**23 + q, then minus 1.5 * 2**23
    (exact for |q| < 2**22): two adds instead of an int-to-float conversion, which runs at a quarter of their rate
    and would bound a GEMV that streams int8 at the memory's speed."""
    if VIA_BITS and w.dtype == tl.int8:
        return (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    return w.to(tl.float32)


@dataclass(frozen=True)
class RowNorm:
    """An RMSNorm taken inside the GEMV that reads its input: the input is then the residual stream as add_gemv
    wrote it, `squares` the sums of squares of its slices that add_gemv wrote beside it."""

    weight: torch.Tensor  # [K], the norm's weight
    eps: float
    squares: torch.Tensor  # [slices] float32


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, stride_wn,
                 norm_w_ptr, squares_ptr, num_squares, eps,  # NORMED
                 residual_ptr, squares_out_ptr,  # ADD_RESIDUAL
                 scale_ptr,  # SCALED
                 K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 GATED: tl.constexpr, NORMED: tl.constexpr, SQUARES_BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                 SCALED: tl.constexpr, VIA_BITS: tl.constexpr, PDL: tl.constexpr):
    # K is a compile-time constant (a model has two: hidden and intermediate size), so the loop is fixed.
    # GATED: W holds 2N rows, the gate's then the up's; a program takes rows j of both, and stores silu(gate) * up.
    # NORMED: x is a residual stream whose RMSNorm is the real input: every program takes the norm of each slice
    # of x it reads, from the sums of squares of x's slices, summed in one fixed order (the same in every program).
    # ADD_RESIDUAL: stores residual + W x, and the sum of squares of this program's rows of it at squares_out[pid].
    # SCALED: W is int8 and row n of the product is multiplied by scale[n] (gated: the up's rows are N + n).
    # PDL: launched early (kernels.pdl); the first step's weights are read before the wait, so they stream in while
    # the kernel before ends (they are written by no kernel).
    pdl.launch_next(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    cols = tl.arange(0, BLOCK_K)
    w, up_w = step_weights(w_rows, N * stride_wn, cols, row_ok, K, EVEN_K, GATED)
    pdl.wait(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    inv_rms = 1.0
    if NORMED:
        # As fused_ops._rms_norm_kernel (and model.xverse.rms_norm_reference) computes the factor.
        parts = tl.arange(0, SQUARES_BLOCK)
        squares = tl.load(squares_ptr + parts, mask=parts < num_squares, other=0.0)
        variance = tl.math.div_rn(tl.sum(squares, axis=0), tl.cast(K, tl.float32))
        inv_rms = tl.math.div_rn(1.0, tl.sqrt_rn(variance + eps))
    acc, acc_up = _step(acc, acc_up, w, up_w, x_ptr, norm_w_ptr, inv_rms, cols, y_ptr, K, EVEN_K, GATED, NORMED,
                        VIA_BITS)
    for start in range(BLOCK_K, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        w, up_w = step_weights(w_rows, N * stride_wn, cols, row_ok, K, EVEN_K, GATED)
        acc, acc_up = _step(acc, acc_up, w, up_w, x_ptr, norm_w_ptr, inv_rms, cols, y_ptr, K, EVEN_K, GATED,
                            NORMED, VIA_BITS)
    out = tl.sum(acc, axis=1)
    if SCALED:
        out *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    up = out
    if GATED:
        up = tl.sum(acc_up, axis=1)
        if SCALED:
            up *= tl.load(scale_ptr + N + rows, mask=row_ok, other=0.0)
    store_row(y_ptr, rows, row_ok, out, up, residual_ptr, squares_out_ptr, GATED, ADD_RESIDUAL)


@triton.jit
def step_weights(w_rows, up_offset, cols, row_ok, K: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr):
    """A step's tiles of weights, [BLOCK_N, BLOCK_K]: the rows', and (GATED) the up projection's rows' (else the
    same tile again). Also kernels.dp4a_gemv's, for int8 words."""
    mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & (cols < K)[None, :]
    w = tl.load(w_rows + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    up_w = w
    if GATED:
        up_w = tl.load(w_rows + up_offset + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    return w, up_w


@triton.jit
def _step(acc, acc_up, w, up_w, x_ptr, norm_w_ptr, inv_rms, cols, y_ptr, K: tl.constexpr, EVEN_K: tl.constexpr,
          GATED: tl.constexpr, NORMED: tl.constexpr, VIA_BITS: tl.constexpr):
    """The float32 lanes after one step of K: the step's activations (normalised with NORMED) times its weights."""
    dtype = y_ptr.dtype.element_ty
    if EVEN_K:
        x = tl.load(x_ptr + cols).to(tl.float32)
        if NORMED:
            norm_w = tl.load(norm_w_ptr + cols).to(tl.float32)
    else:
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if NORMED:
            norm_w = tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if NORMED:  # rounded where the norm kernel rounds: the normalised value, then its product with the weight
        x = (norm_w * (x * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    x = x[None, :]
    acc += _widen(w, VIA_BITS) * x
    if GATED:
        acc_up += _widen(up_w, VIA_BITS) * x
    return acc, acc_up


@triton.jit
def store_row(y_ptr, rows, row_ok, out, up, residual_ptr, squares_out_ptr, GATED: tl.constexpr,
              ADD_RESIDUAL: tl.constexpr):
    """The one-row GEMVs' epilogue (here and in kernels.dp4a_gemv), `out` and `up` the float32 products of this
    program's rows: stores silu(out) * up (GATED), residual + out and the sum of squares of this program's rows of
    it at squares_out[pid] (ADD_RESIDUAL), or out; each rounded where the unfused path rounds."""
    dtype = y_ptr.dtype.element_ty
    if GATED:
        # The projection's output, then silu, rounded as fused_ops.silu_and_mul rounds them.
        gate = out.to(dtype).to(tl.float32)
        up = up.to(dtype).to(tl.float32)
        silu = tl.math.div_rn(gate, 1.0 + tl.exp(-gate)).to(dtype).to(tl.float32)
        tl.store(y_ptr + rows, (silu * up).to(dtype), mask=row_ok)
    elif ADD_RESIDUAL:
        # The projection's output, then the sum, rounded as fused_ops' residual add rounds them.
        residual = tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        y = (out.to(dtype).to(tl.float32) + residual).to(dtype).to(tl.float32)
        tl.store(y_ptr + rows, y.to(dtype), mask=row_ok)
        tl.store(squares_out_ptr + tl.program_id(0), tl.sum(y * y, axis=0))  # masked rows are 0
    else:
        tl.store(y_ptr + rows, out.to(dtype), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int] | None = None,
         norm: RowNorm | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] (row-major) -> x @ weight.T, shaped [..., N], in x's dtype.
    With `norm`, x is a residual stream from add_gemv and the product is taken with its RMSNorm instead. With
    `scale` [N] float32, weight is int8 and W = weight * scale[:, None]."""
    kind = "normed" if norm is not None else "plain"
    out, _ = _one_row(x, weight, weight.shape[0], _config(config, kind, weight, scale), norm=norm, scale=scale)
    return out


def gated_gemv(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int] | None = None,
               norm: RowNorm | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for one row x [..., K] and weight [2 * inter, K] holding the gate's rows then the up's:
    gate_up = x @ weight.T and fused_ops.silu_and_mul in one kernel, shaped [..., inter], in x's dtype. One kernel
    fewer per layer of a one-sequence decode step, and the gate_up output is never written. `norm` and `scale`
    as in gemv."""
    if weight.shape[0] % 2:
        raise ValueError(f"gated_gemv takes an even number of weight rows (gate, then up), got {weight.shape[0]}")
    kind = "normed" if norm is not None else "gated"
    out, _ = _one_row(x, weight, weight.shape[0] // 2, _config(config, kind, weight, scale), gated=True, norm=norm,
                      scale=scale)
    return out


def add_gemv(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
             config: tuple[int, int, int, int] | None = None,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """residual + x @ weight.T for one row (the product rounded to x's dtype, then the sum, as PyTorch rounds
    them), and the float32 sums of squares of its slices, one per program: what gemv's `norm` takes, so that the
    RMSNorm after a residual add needs no kernel of its own. `scale` as in gemv."""
    if residual.numel() != weight.shape[0] or residual.dtype != x.dtype:
        raise ValueError(f"the residual must be {weight.shape[0]} values of {x.dtype}, got {tuple(residual.shape)} "
                         f"of {residual.dtype}")
    return _one_row(x, weight, weight.shape[0], _config(config, "residual", weight, scale), residual=residual,
                    scale=scale)


def _config(config: tuple[int, int, int, int] | None, kind: str, weight: torch.Tensor,
            scale: torch.Tensor | None) -> tuple[int, int, int, int]:
    """The caller's configuration, else the kind's table's for the weight's shape (FP8_TABLES' for fp8; in bytes
    for int8 weights)."""
    if config is not None:
        return config
    shape = tuple(weight.shape)
    if weight.dtype == torch.float8_e4m3fn and shape in FP8_TABLES[kind]:
        return FP8_TABLES[kind][shape]
    config = TABLES[kind].get(shape, DEFAULT_CONFIG)
    return int8_config(config) if scale is not None else config


def check_scale(weight: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Raises unless `scale` is None or a float32 [N] beside an int8 or fp8 weight [N, K]."""
    if scale is None:
        return
    if (weight.dtype not in (torch.int8, torch.float8_e4m3fn) or scale.dtype != torch.float32
            or scale.shape != (weight.shape[0],)):
        raise ValueError(f"a scaled weight is int8 or fp8 [N, K] with a float32 scale [N]; got {weight.dtype} "
                         f"{tuple(weight.shape)} and {scale.dtype} {tuple(scale.shape)}")


def _one_row(x: torch.Tensor, weight: torch.Tensor, n: int, config: tuple[int, int, int, int], gated: bool = False,
             norm: RowNorm | None = None, residual: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launches _gemv_kernel for n outputs, shaped [..., n]; with a residual, also the sums of squares."""
    check_scale(weight, scale)
    k = weight.shape[1]
    if x.numel() != k:
        raise ValueError(f"the GEMV takes one row of {k} values, got a tensor of shape {tuple(x.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("the GEMV needs the weight's rows contiguous")
    if norm is not None and norm.weight.shape != (k,):
        raise ValueError(f"the norm's weight must be [{k}], got {tuple(norm.weight.shape)}")
    block_n, block_k, num_warps, num_stages = config
    row = x.reshape(k)
    if row.stride(0) != 1:
        row = row.contiguous()
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    programs = triton.cdiv(n, block_n)
    squares_out = torch.empty(programs, dtype=torch.float32, device=x.device) if residual is not None else None
    norm_args = (norm.weight, norm.squares, norm.squares.numel(), float(norm.eps)) if norm else (out, out, 0, 0.0)
    _gemv_kernel[(programs,)](row, weight, out, n, weight.stride(0), *norm_args,
                              residual.reshape(n) if residual is not None else out,
                              squares_out if squares_out is not None else out,
                              scale if scale is not None else out,
                              K=k, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, GATED=gated,
                              NORMED=norm is not None,
                              SQUARES_BLOCK=triton.next_power_of_2(norm.squares.numel()) if norm else 1,
                              ADD_RESIDUAL=residual is not None, SCALED=scale is not None, VIA_BITS=INT8_VIA_BITS,
                              num_warps=num_warps, num_stages=num_stages, **pdl.launch(x))
    return out.view(*x.shape[:-1], n), squares_out


# Not specialized on M: rows vary step by step (decode graphs cover 2, 4, 8, 16 and 32; eager mixed steps anything
# from 2 to 32), and a variant compiled while serving would stall every request in flight.
@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, M, N, stride_xm, stride_wn, stride_ym,
                   K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, SCALED: tl.constexpr, VIA_BITS: tl.constexpr, PDL: tl.constexpr):
    # PDL: launched early (kernels.pdl); waits for the kernel before it first, lets the next launch after its loop
    pdl.wait(PDL)
    rows = tl.arange(0, BLOCK_M)
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, out_ok = rows < M, outs < N
    w_rows = w_ptr + outs[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K if not EVEN_K else cols >= 0
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)
        w = tl.load(w_rows + cols[None, :], mask=out_ok[:, None] & col_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        if SCALED:  # int8 values are exact in bf16 and fp16
            w = _widen(w, VIA_BITS).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc)
    pdl.launch_next(PDL)
    if SCALED:
        acc *= tl.load(scale_ptr + outs, mask=out_ok, other=0.0)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + outs[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & out_ok[None, :])


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int] | None = None,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding 2..MAX_SKINNY_ROWS rows (MAX_SCALED_SKINNY_ROWS with a scale), weight [N, K]
    (row-major) -> x @ weight.T, in x's dtype. `scale` as in gemv."""
    check_scale(weight, scale)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    most = MAX_SKINNY_ROWS if scale is None else MAX_SCALED_SKINNY_ROWS
    if not 1 <= rows <= most:
        raise ValueError(f"skinny_matmul takes 1 to {most} rows, got {rows}")
    if weight.stride(1) != 1:
        raise ValueError("skinny_matmul needs the weight's rows contiguous")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    block_n, block_k, num_warps, num_stages = config or SKINNY_CONFIGS.get((n, k), DEFAULT_SKINNY_CONFIG)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, block_n),)](x2, weight, out, scale if scale is not None else out, rows, n,
                                               x2.stride(0), weight.stride(0), out.stride(0), K=k,
                                               BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n,
                                               BLOCK_K=block_k,
                                               EVEN_K=k % block_k == 0, SCALED=scale is not None,
                                               VIA_BITS=INT8_VIA_BITS,
                                               num_warps=num_warps, num_stages=num_stages, **pdl.launch(x2))
    return out.view(*x.shape[:-1], n)
