"""The decoder's elementwise stages as fused Triton kernels: residual add + RMSNorm, RoPE + KV-cache write,
SiLU * up, an 8-bit cache's gather and dequantization for prefills, and FP8 activations per row (on their own, or
made by the norm or SiLU * up in the same kernel for an fp8 projection that multiplies them: model.xverse.takes_fp8).

In PyTorch each of these is a handful of tiny kernels (RMSNorm alone is ~7), and at batch 1 a decode step
is dominated by them rather than by streaming the weights. Each kernel here reads its inputs once and
writes its outputs once.

Numerics follow the PyTorch reference in model/xverse.py operation by operation: values are loaded, computed in
float32, and rounded to the model dtype exactly where PyTorch's eager code rounds (a bf16 or fp16 product
of two bf16/fp16 numbers is exact in float32, so "multiply in float32, round" equals PyTorch's own
bf16 multiply). What still differs from PyTorch:
- RMSNorm's sum of squares is reduced in another order (float32, so ~1e-7 relative in the variance);
- SiLU's exp is the GPU's fast one, exp2.approx(x * log2 e) (relative error up to ~|x| * 4e-8);
  in bf16/fp16 either shows only where the normalised value or silu(gate) sits on a rounding near-tie:
  it rounds the other way, one ulp, up to two ulps of the product after it, on well under 1% of elements;
- everything else is bit-exact: the residual add, the RoPE (float32 too, since FMA contraction is
  turned off for that kernel) and the cache write, into an 8-bit cache too (model.attention.quantize_kv's
  operations: the same scale, division and rounding), and reading an 8-bit cache back (dequantize_kv's).

All wrappers are CUDA-graph capturable: grids and block shapes depend only on tensor shapes, nothing is
read back to the host, and the caller's tensors (positions, slot_mapping) are only read on the device.

The references these are tested against are model.xverse.rms_norm_reference / apply_rope / F.silu and
model.attention.write_kv (tests/test_triton_ops.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .kv_format import KV_MIN_AMAX, KV_QMAX, check_kv_scales

MAX_NORM_BLOCK = 65536  # RMSNorm keeps one row in registers; XVERSE's is 4096 wide
SILU_BLOCK = 1024  # columns per program of silu_and_mul: 8 bf16 (16 bytes) per thread at 4 warps


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x (float32) rounded to DTYPE and back: where PyTorch would store an intermediate in the model dtype."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, scale_ptr,
    hidden, eps,
    stride_x, stride_r, stride_o, stride_ro,
    BLOCK: tl.constexpr,  # next power of two >= hidden: the whole row in one block
    HAS_RESIDUAL: tl.constexpr,
    FP8_OUT: tl.constexpr,  # out in e4m3 with the row's scale (an FP8 matmul's activations), not in the model dtype
    PDL: tl.constexpr,  # launched early (kernels.pdl)
):
    pdl.begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, dtype)  # the sum is the next residual, kept in the model dtype as PyTorch does
        tl.store(residual_out_ptr + row * stride_ro + cols, x.to(dtype), mask=mask)
    variance = tl.math.div_rn(tl.sum(x * x, axis=0), tl.cast(hidden, tl.float32))  # the mean, as torch divides
    # 1 / sqrt rounded twice, as torch.rsqrt on CPU (the reference) computes it; the GPU's rsqrt is approximate.
    inv_rms = tl.math.div_rn(1.0, tl.sqrt_rn(variance + eps))
    normed = _round(x * inv_rms, dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if FP8_OUT:  # the norm's output as the model dtype holds it, then quantized as quantize_rows_fp8 does
        _store_fp8_row(_round(weight * normed, dtype), out_ptr + row * stride_o + cols, scale_ptr + row, mask)
    else:
        tl.store(out_ptr + row * stride_o + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _norm_num_warps(block: int) -> int:
    """16 bytes per thread for bf16 (8 values), up to 16 warps: 4096 values -> 16 warps."""
    return max(1, min(16, block // 256))


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(out, the new residual or None, out's scale per row [rows, 1] with fp8, else None)."""
    hidden = x.shape[-1]
    if fp8 and weight.dtype != x.dtype:
        raise TypeError(f"an fp8 output takes the weight in x's dtype {x.dtype}, got {weight.dtype}")
    if weight.shape != (hidden,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({hidden},)")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual is {residual.dtype}, x is {x.dtype}")
    block = triton.next_power_of_2(hidden)
    if block > MAX_NORM_BLOCK:
        raise ValueError(f"hidden size {hidden} is over {MAX_NORM_BLOCK}, the widest row kept in one block")
    x2 = x.reshape(-1, hidden)
    r2 = residual.reshape(-1, hidden) if residual is not None else x2
    if x2.stride(-1) != 1 or r2.stride(-1) != 1 or weight.stride(0) != 1:
        x2, r2, weight = x2.contiguous(), r2.contiguous(), weight.contiguous()
    # weight * normed promotes as in PyTorch (a float32 weight on bf16 activations gives float32).
    out_dtype = torch.float8_e4m3fn if fp8 else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    residual_out = torch.empty_like(x2) if residual is not None else x2
    rows = x2.shape[0]
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device) if fp8 else None
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, residual_out, scale if fp8 else out,
            hidden, float(eps),
            x2.stride(0), r2.stride(0), out.stride(0), residual_out.stride(0),
            BLOCK=block, HAS_RESIDUAL=residual is not None, FP8_OUT=fp8, num_warps=_norm_num_warps(block),
            **pdl.launch(x),
        )
    if not fp8:
        out = out.view(*x.shape[:-1], hidden)
    return out, (residual_out.view(x.shape) if residual is not None else None), scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dimension, as model.RMSNorm computes it (variance in float32,
    the normalised value rounded to x's dtype before the weight). x [..., hidden]; weight [hidden]."""
    out, _, _ = _launch_rms_norm(x, None, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the sum is rounded to x's dtype as PyTorch's add
    rounds it, and the norm is taken of that rounded sum. With residual None: (rms_norm(x), x).
    Returns new tensors; the inputs are not modified."""
    if residual is None:
        return rms_norm(x, weight, eps), x
    out, new_residual, _ = _launch_rms_norm(x, residual, weight, eps)
    return out, new_residual


def rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm with its output quantized for an FP8 matmul in the same kernel: (e4m3 [rows, hidden],
    float32 scale [rows, 1], the new residual), bit for bit quantize_rows_fp8 of fused_add_rms_norm's output. x
    [..., hidden] is taken as rows of hidden; the weight must be in x's dtype."""
    out, new_residual, scale = _launch_rms_norm(x, residual, weight, eps, fp8=True)
    return out, scale, (new_residual if residual is not None else x)


@triton.jit
def _rope_halves(x1, x2, cos1, cos2, sin1, sin2, DTYPE: tl.constexpr):
    """Both halves of x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1): each product and
    the sum rounded to DTYPE, as model.apply_rope computes it in the model dtype. Returns float32."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    out1 = _round(x1 * cos1, DTYPE) + _round(-x2 * sin1, DTYPE)
    out2 = _round(x2 * cos2, DTYPE) + _round(x1 * sin2, DTYPE)
    return out1, out2


@triton.jit
def _kv_scale(x1, x2, QMAX: tl.constexpr, MIN_AMAX: tl.constexpr):
    """Per head (row), the largest |element| of both halves over QMAX: model.attention.quantize_kv's scale."""
    amax = tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1))
    return tl.maximum(amax, MIN_AMAX) * (1.0 / QMAX)


@triton.jit
def _kv_quantize(x, scale, QMAX: tl.constexpr, INT8: tl.constexpr):
    """x / scale as model.attention.quantize_kv computes it, in float32 (int8: already rounded, half up)."""
    y = tl.math.div_rn(x, scale[:, None])
    if INT8:
        y = tl.floor(y + 0.5)
    return tl.minimum(tl.maximum(y, -QMAX), QMAX)


@triton.jit
def _to_fp8(x):
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")  # to nearest, ties to even, as torch converts


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    k_scale_ptr, v_scale_ptr,  # [blocks, block_size, heads] float32 for an 8-bit cache (unused otherwise)
    num_heads, block_size,
    stride_qkv, stride_cos, stride_sin,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_sb, stride_st,
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    HEADS: tl.constexpr,  # heads per program
    QMAX: tl.constexpr,  # 0: the cache holds the model dtype; 127 (int8) or 448 (fp8): an 8-bit cache
    INT8: tl.constexpr,  # the 8-bit cache is int8 (values rounded to integers), not fp8
    MIN_AMAX: tl.constexpr,
    PDL: tl.constexpr,  # launched early (kernels.pdl)
):
    pdl.begin(PDL)
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < HALF
    mask = (heads < num_heads)[:, None] & dim_ok[None, :]
    dtype = qkv_ptr.dtype.element_ty

    position = tl.load(positions_ptr + token).to(tl.int64)
    cos_row = cos_ptr + position * stride_cos
    sin_row = sin_ptr + position * stride_sin
    cos1 = tl.load(cos_row + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_row + HALF + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_row + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_row + HALF + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]

    # qkv row: [q heads | k heads | v heads], each head HALF * 2 wide and contiguous.
    width = num_heads * (2 * HALF)
    first = qkv_ptr + token * stride_qkv + heads[:, None] * (2 * HALF) + dims[None, :]  # [HEADS, BLOCK_HALF]
    q1 = tl.load(first, mask=mask, other=0.0)
    q2 = tl.load(first + HALF, mask=mask, other=0.0)
    k1 = tl.load(first + width, mask=mask, other=0.0)
    k2 = tl.load(first + width + HALF, mask=mask, other=0.0)
    v1 = tl.load(first + 2 * width, mask=mask, other=0.0)
    v2 = tl.load(first + 2 * width + HALF, mask=mask, other=0.0)

    q1, q2 = _rope_halves(q1, q2, cos1, cos2, sin1, sin2, dtype)
    k1, k2 = _rope_halves(k1, k2, cos1, cos2, sin1, sin2, dtype)

    q_dst = q_out_ptr + token * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    tl.store(q_dst, q1.to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(q_dst + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=mask)

    slot = tl.load(slots_ptr + token).to(tl.int64)
    block = slot // block_size
    offset = slot % block_size
    k_dst = k_cache_ptr + block * stride_kb + offset * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    v_dst = v_cache_ptr + block * stride_vb + offset * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    if QMAX > 0:
        # The reference quantizes k as rounded to the model dtype by apply_rope, and v as it is in qkv.
        k1, k2 = _round(k1, dtype), _round(k2, dtype)
        v1, v2 = v1.to(tl.float32), v2.to(tl.float32)
        k_scale = _kv_scale(k1, k2, QMAX, MIN_AMAX)
        v_scale = _kv_scale(v1, v2, QMAX, MIN_AMAX)
        k1, k2 = _kv_quantize(k1, k_scale, QMAX, INT8), _kv_quantize(k2, k_scale, QMAX, INT8)
        v1, v2 = _kv_quantize(v1, v_scale, QMAX, INT8), _kv_quantize(v2, v_scale, QMAX, INT8)
        if not INT8:  # int8: the stores below convert the (integral) values exactly
            k1, k2, v1, v2 = _to_fp8(k1), _to_fp8(k2), _to_fp8(v1), _to_fp8(v2)
        scale_at = block * stride_sb + offset * stride_st + heads
        head_ok = heads < num_heads
        tl.store(k_scale_ptr + scale_at, k_scale, mask=head_ok)
        tl.store(v_scale_ptr + scale_at, v_scale, mask=head_ok)
    tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def default_rope_heads_per_program(tokens: int, num_heads: int) -> int:
    """One head per program while that still leaves few programs; at prefill sizes, groups of heads so
    that a program moves more than one 256-byte row per tensor."""
    return 1 if tokens * num_heads <= 8192 else min(4, triton.next_power_of_2(num_heads))


def rope_and_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      out: torch.Tensor | None = None, *, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None, heads_per_program: int | None = None,
                      num_warps: int | None = None) -> torch.Tensor:
    """Rotary embedding of q and k and the cache write of k and v, in one kernel.

    qkv [tokens, 3 * heads * head_dim] (the fused projection's output: q, k, v heads in that order, each
    row contiguous); cos, sin [max_positions, head_dim], the full tables in qkv's dtype (rotate-half
    layout, model.rope_tables); positions [tokens] and slot_mapping [tokens] (int32 or int64) on the
    device; k_cache, v_cache [num_blocks, block_size, heads, head_dim]. Writes the rotated k and the v of
    token t at slot slot_mapping[t] (as model.attention.write_kv), touches no other slot, and returns the
    rotated q, [tokens, heads, head_dim] (into `out` when given).

    The result equals model.apply_rope in qkv's dtype bit for bit (each product and the sum rounded to
    the dtype, no FMA contraction). Positions are not range-checked (that would need a host sync).
    An 8-bit cache (int8 or float8_e4m3fn) needs k_scale and v_scale [num_blocks, block_size, heads] float32:
    k and v are stored as model.attention.quantize_kv stores them, bit for bit, with their scales.
    """
    _, block_size, num_heads, head_dim = k_cache.shape
    tokens = qkv.shape[0]
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if qkv.dim() != 2 or qkv.shape[1] != 3 * num_heads * head_dim:
        raise ValueError(f"qkv must be [tokens, {3 * num_heads * head_dim}] for the cache's {num_heads} heads "
                         f"of {head_dim}, got {tuple(qkv.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
        raise ValueError(f"cos and sin must both be [max_positions, {head_dim}]")
    if cos.dtype != qkv.dtype or sin.dtype != qkv.dtype:
        raise TypeError(f"cos/sin are {cos.dtype}/{sin.dtype}; the reference rounds in qkv's dtype {qkv.dtype}")
    if positions.shape != (tokens,) or slot_mapping.shape != (tokens,):
        raise ValueError(f"positions {tuple(positions.shape)} and slot_mapping {tuple(slot_mapping.shape)} "
                         f"must be [{tokens}]")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    for name, t in (("qkv", qkv), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along its last dimension")
    check_kv_scales(k_cache, k_scale, v_scale)
    qmax = KV_QMAX.get(k_cache.dtype, 0.0)
    if out is None:
        out = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    elif out.shape != (tokens, num_heads, head_dim) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{tokens}, {num_heads}, {head_dim}], contiguous along head_dim")
    if tokens == 0:
        return out
    if heads_per_program is None:
        heads_per_program = default_rope_heads_per_program(tokens, num_heads)
    if heads_per_program & (heads_per_program - 1):
        raise ValueError(f"heads_per_program must be a power of two, got {heads_per_program}")
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    if num_warps is None:  # about 8 values per thread and load
        num_warps = max(1, min(8, heads_per_program * block_half // 256))
    grid = (tokens, triton.cdiv(num_heads, heads_per_program))
    scale_args = (k_scale, v_scale, k_scale.stride(0), k_scale.stride(1)) if qmax else (out, out, 0, 0)
    _rope_kv_kernel[grid](
        qkv, cos, sin, positions, slot_mapping, out, k_cache, v_cache,
        scale_args[0], scale_args[1],
        num_heads, block_size,
        qkv.stride(0), cos.stride(0), sin.stride(0),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        scale_args[2], scale_args[3],
        HALF=half, BLOCK_HALF=block_half, HEADS=heads_per_program, QMAX=qmax,
        INT8=k_cache.dtype == torch.int8, MIN_AMAX=KV_MIN_AMAX,
        num_warps=num_warps,
        enable_fp_fusion=False,  # no FMA: in float32 too, each product is rounded as in PyTorch
        **pdl.launch(qkv),
    )
    return out


@triton.jit
def _gather_dequantize_kernel(cache_ptr, scale_ptr, slots_ptr, out_ptr, num_heads,
                              stride_cs, stride_ch, stride_ss, stride_os, stride_oh,
                              HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    row = tl.program_id(0)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    head_ok = heads < num_heads
    dims = tl.arange(0, HEAD_DIM)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    x = tl.load(cache_ptr + slot * stride_cs + heads[:, None] * stride_ch + dims[None, :], mask=head_ok[:, None])
    scale = tl.load(scale_ptr + slot * stride_ss + heads, mask=head_ok, other=0.0)
    y = x.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + row.to(tl.int64) * stride_os + heads[:, None] * stride_oh + dims[None, :],
             y.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


def gather_dequantize(cache: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """model.attention.dequantize_kv(cache[slots], scales[slots], dtype) in one pass: an 8-bit cache [blocks,
    block_size, heads, head_dim] and its scales [blocks, block_size, heads] -> [slots, heads, head_dim] in dtype.
    (In PyTorch that is a gather, a widening, a product and a narrowing, each over the whole context.)"""
    check_kv_scales(cache, scales, scales)
    _, _, num_heads, head_dim = cache.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    flat, flat_scales = cache.view(-1, num_heads, head_dim), scales.view(-1, num_heads)
    if flat.stride(-1) != 1:
        raise ValueError("the cache must be contiguous along head_dim")
    out = torch.empty((slots.shape[0], num_heads, head_dim), dtype=dtype, device=cache.device)
    heads = min(triton.next_power_of_2(num_heads), max(1, 4096 // head_dim))  # ~4K elements per program
    if slots.shape[0]:
        _gather_dequantize_kernel[(slots.shape[0], triton.cdiv(num_heads, heads))](
            flat, flat_scales, slots, out, num_heads,
            flat.stride(0), flat.stride(1), flat_scales.stride(0), out.stride(0), out.stride(1),
            HEADS=heads, HEAD_DIM=head_dim, num_warps=4,
        )
    return out


@triton.jit
def _silu_times_up(row_ptr, inter, cols, mask):
    """F.silu(gate) * up in float32 for a row's columns `cols` (gate at row_ptr, up `inter` after it), the SiLU
    rounded to the row's dtype first, as PyTorch stores F.silu's result."""
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row_ptr + inter + cols, mask=mask, other=0.0).to(tl.float32)
    return _round(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), row_ptr.dtype.element_ty) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    out = _silu_times_up(x_ptr + row * stride_x, inter, cols, mask)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """F.silu(gate) * up with gate, up = gate_up.chunk(2, -1): [..., 2 * inter] -> [..., inter]."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"the last dimension must be even (gate then up), got {width}")
    inter = width // 2
    x2 = gate_up.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if out is None:
        out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != (*gate_up.shape[:-1], inter) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(*gate_up.shape[:-1], inter)}")
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, SILU_BLOCK))](
            x2, out, inter, x2.stride(0), inter, BLOCK=SILU_BLOCK, num_warps=4, **pdl.launch(x2),
        )
    return out


FP8_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)  # 448; a constexpr, since kernels read it


@triton.jit
def _store_fp8_row(x, q_ptrs, scale_ptr, mask):
    """Row x (float32, zero where masked) as e4m3 at q_ptrs, its largest |value| mapped to 448, and that scale at
    scale_ptr: model.quantization.quantize_activations_fp8's arithmetic."""
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), FP8_MAX)
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
    tl.store(q_ptrs, _to_fp8(y), mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _quantize_rows_fp8_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr,
                              PDL: tl.constexpr):
    pdl.begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    _store_fp8_row(x, q_ptr + row * stride_q + cols, scale_ptr + row, mask)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1]), each row's largest |value| mapped to 448: the
    activations of an FP8 matmul, in one kernel (PyTorch takes seven), bit for bit as
    model.quantization.quantize_activations_fp8 computes them."""
    if x.dim() != 2 or x.shape[1] > MAX_NORM_BLOCK:
        raise ValueError(f"quantize_rows_fp8 takes [M, K] with K <= {MAX_NORM_BLOCK}, got {tuple(x.shape)}")
    return _launch_fp8_rows(_quantize_rows_fp8_kernel, x if x.stride(1) == 1 else x.contiguous(), x.shape[1])


def _launch_fp8_rows(kernel, x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kernel (x_ptr, q_ptr, scale_ptr, width, stride_x, stride_q, BLOCK, PDL) in one program per row of x, each
    writing `width` e4m3 values and the row's scale; launched early where the card has PDL (kernels.pdl)."""
    rows = x.shape[0]
    q = torch.empty(rows, width, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(width)
        kernel[(rows,)](x, q, scale, width, x.stride(0), q.stride(0), BLOCK=block, num_warps=_norm_num_warps(block),
                        **pdl.launch(x))
    return q, scale


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, scale_ptr, inter, stride_x, stride_q, BLOCK: tl.constexpr,
                             PDL: tl.constexpr):
    pdl.begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < inter
    out = _silu_times_up(x_ptr + row * stride_x, inter, cols, mask)  # rounded to the model dtype, as stored unfused
    _store_fp8_row(_round(out, x_ptr.dtype.element_ty), q_ptr + row * stride_q + cols, scale_ptr + row, mask)


def silu_and_mul_fp8(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_fp8(silu_and_mul(gate_up)) in one kernel, bit for bit: gate_up [rows, 2 * inter] ->
    (e4m3 [rows, inter], float32 scale [rows, 1]). One program per row (the scale needs the row's maximum)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.shape[1] // 2 > MAX_NORM_BLOCK:
        raise ValueError(f"silu_and_mul_fp8 takes [rows, 2 * inter] with inter <= {MAX_NORM_BLOCK}, "
                         f"got {tuple(gate_up.shape)}")
    return _launch_fp8_rows(_silu_and_mul_fp8_kernel, gate_up if gate_up.stride(1) == 1 else gate_up.contiguous(),
                            gate_up.shape[1] // 2)


ARGMAX_BLOCK = 2048  # logits per program of the first pass: ~50 programs per row of XVERSE's 100,534
# The second pass reads at least this many chunks (masked): one compiled kernel for every row width up to
# 131,072, whatever the batch's top-k.
ARGMAX_MIN_CHUNKS = 64


# Not specialised on sizes (value 1, divisibility by 16): the sampler takes the argmax of rows as wide as the
# batch's largest top-k, and a user's top_k of 1 or 32 must not compile a new kernel while others wait.
@triton.jit(do_not_specialize=["n", "stride_x", "chunks"])
def _argmax_chunks_kernel(x_ptr, values_ptr, indices_ptr, n, stride_x, chunks, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # a NaN counts as the largest value, as in torch.argmax
    best = tl.max(x, axis=0)
    tl.store(values_ptr + row * chunks + chunk, best)
    tl.store(indices_ptr + row * chunks + chunk, tl.min(tl.where(x == best, cols, n), axis=0))


@triton.jit(do_not_specialize=["chunks"])
def _argmax_rows_kernel(values_ptr, indices_ptr, out_ptr, chunks, CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, CHUNKS)
    ok = parts < chunks
    values = tl.load(values_ptr + row * chunks + parts, mask=ok, other=float("-inf"))
    indices = tl.load(indices_ptr + row * chunks + parts, mask=ok, other=2**31 - 1)
    best = tl.max(values, axis=0)
    # Chunks are in index order, each holding its first best: the smallest index is the row's first maximum.
    tl.store(out_ptr + row, tl.min(tl.where(values == best, indices, 2**31 - 1), axis=0).to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) for [rows, vocab] (the first index of each row's maximum; a NaN counts as +inf), in
    two passes: chunks of ARGMAX_BLOCK across all SMs, then one small program per row. torch's kernel reads a
    single row with one block, slow on XVERSE's 100,534-wide rows in every greedy step (docs/benchmarks.md)."""
    rows, n = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunks = triton.cdiv(n, ARGMAX_BLOCK)
    values = torch.empty((rows, chunks), dtype=torch.float32, device=logits.device)
    indices = torch.empty((rows, chunks), dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows and n:
        _argmax_chunks_kernel[(chunks, rows)](logits, values, indices, n, logits.stride(0), chunks,
                                              BLOCK=ARGMAX_BLOCK, num_warps=4)
        _argmax_rows_kernel[(rows,)](values, indices, out, chunks,
                                     CHUNKS=max(ARGMAX_MIN_CHUNKS, triton.next_power_of_2(chunks)), num_warps=1)
    return out
