"""Weight-only quantized matmuls in Triton: y = x @ W^T with W stored as int8 or int4 (quantization.py).

Layouts (quantization.quantize_int8 / quantize_int4 make them):
- int8: weight [N, K] int8, scale [N] float32; W[n, k] = weight[n, k] * scale[n].
- int4: weight [N, K // 2] uint8, byte j of a row holding k = 2j in its low nibble and k = 2j + 1 in its
  high one; scale and offset [N, K // group] (float16); W[n, k] = q * scale[n, g] + offset[n, g], g = k // group.

Three kernels, each right for another batch size M (quantization.py picks one per M, by timing them at start-up):
- gemv: one program per (row of x, block of output channels); it streams the block's weights once, multiplies
  and adds elementwise in float32 and reduces once after the loop. For decode at small batch, where the step is
  bound by reading the weights.
- gemm: tiles of x times tiles of W on the tensor cores (tl.dot), optionally split along K into float32
  partial sums (few output tiles would leave SMs idle). int8 goes into the dot as its integer values (exact in
  bf16/fp16) and the channel scales multiply the float32 result; int4 is dequantized in registers, a group at
  a time, to x's dtype (as the dequantize kernel rounds it).
- dequantize: W in the activation dtype, for a dense matmul when M is large (prefill is compute-bound).

Every wrapper is CUDA-graph capturable (nothing is read back to the host) and runs in Triton's interpreter on
CPU tensors (the tests). The references are quantization.dequantize_* followed by a float matmul. Offsets are
32-bit (each tensor must have fewer than 2^31 elements: XVERSE's largest, the lm_head, has 412M); with the
pointers advanced each step rather than recomputed, the kernels compile without register spills on sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 activations: no tf32 rounding of the inputs
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit(do_not_specialize=["M"])
def _int8_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_K)
    # int32 offsets (the wrappers check every tensor has fewer than 2^31 elements): fewer registers than
    # 64-bit pointers per element, and pointers advanced each step instead of recomputed.
    x_ptrs = x_ptr + m * stride_xm + ks
    w_ptrs = w_ptr + rows[:, None] * stride_wn + ks[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0)
        acc += w.to(tl.float32) * x[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    tl.store(out_ptr + m * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["M"])
def _int4_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, offset_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,  # groups per loop iteration
):
    m = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    groups_in_row = K // GROUP
    gi = tl.arange(0, GROUPS)
    pairs = gi[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]  # [GROUPS, GROUP // 2] bytes of a row
    x_ptrs = x_ptr + m * stride_xm + 2 * pairs
    w_ptrs = w_ptr + rows[:, None, None] * stride_wn + pairs[None, :, :]
    s_offsets = rows[:, None] * stride_sn + gi[None, :]
    # sum_k x_k W_nk = sum_g scale_ng * sum_{k in g} x_k q_nk + offset_ng * sum_{k in g} x_k
    acc = tl.zeros([BLOCK_N, GROUPS, GROUP // 2], tl.float32)
    acc_offset = tl.zeros([BLOCK_N, GROUPS], tl.float32)
    for g0 in range(0, groups_in_row, GROUPS):
        group_ok = g0 + gi < groups_in_row
        x_even = tl.load(x_ptrs, mask=group_ok[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptrs + 1, mask=group_ok[:, None], other=0.0).to(tl.float32)
        ok = row_ok[:, None] & group_ok[None, :]
        packed = tl.load(w_ptrs, mask=ok[:, :, None], other=0)
        low = (packed & 0xF).to(tl.float32)
        high = (packed >> 4).to(tl.float32)
        scale = tl.load(scale_ptr + s_offsets, mask=ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + s_offsets, mask=ok, other=0.0).to(tl.float32)
        acc += (low * x_even[None, :, :] + high * x_odd[None, :, :]) * scale[:, :, None]
        acc_offset += offset * tl.sum(x_even + x_odd, axis=1)[None, :]
        x_ptrs += GROUPS * GROUP
        w_ptrs += GROUPS * (GROUP // 2)
        s_offsets += GROUPS
    y = tl.sum(tl.sum(acc, axis=2) + acc_offset, axis=1)
    tl.store(out_ptr + m * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(
    x_ptr, w_ptr, scale_ptr, offset_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_sn, stride_om, stride_osplit,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # int4: BLOCK_K == GROUP
    IEEE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_ok = rows < M
    col_ok = cols < N
    dtype = x_ptr.dtype.element_ty
    k_begin = split * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if BITS == 8:
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_begin + ks)[None, :]
        w_ptrs = w_ptr + cols[None, :] * stride_wn + (k_begin + ks)[:, None]  # [BLOCK_K, BLOCK_N]
        for k0 in range(k_begin, k_end, BLOCK_K):
            k_ok = k0 + ks < k_end
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0)
            acc = _dot(x, w.to(dtype), acc, IEEE)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        # Whole groups per iteration (K and k_per_split are multiples of GROUP): the group's scale and offset
        # are vectors over the tile's columns. The nibbles are dequantized in registers (to x's dtype, as the
        # dequantize kernel rounds them) and multiplied with x's even and odd columns.
        pairs = tl.arange(0, BLOCK_K // 2)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_begin + tl.arange(0, BLOCK_K))[None, :]
        w_ptrs = w_ptr + cols[None, :] * stride_wn + (k_begin // 2 + pairs)[:, None]  # [BLOCK_K // 2, BLOCK_N]
        s_ptrs = cols * stride_sn + k_begin // GROUP
        for k0 in range(k_begin, k_end, BLOCK_K):
            packed = tl.load(w_ptrs, mask=col_ok[None, :], other=0)
            scale = tl.load(scale_ptr + s_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            offset = tl.load(offset_ptr + s_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            # Converted, not made by their bits (_nibble_float): the bits took 5-15% longer here on an H100
            # (bench/results/quant_h100_int4_bits.json against quant_h100_fused.json).
            low = ((packed & 0xF).to(tl.float32) * scale + offset).to(dtype)
            high = ((packed >> 4).to(tl.float32) * scale + offset).to(dtype)
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)  # contiguous, then split into even and odd k
            x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_M, BLOCK_K // 2, 2]))
            acc = _dot(x_even, low, acc, IEEE)
            acc = _dot(x_odd, high, acc, IEEE)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // 2
            s_ptrs += 1
    out = out_ptr + split * stride_osplit + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _nibble_float(q):
    """Integers 0..15 as float32 by their bits, 2^23 + q minus 2^23: an or and an add at full rate, where an
    int-to-float conversion runs at a quarter of it (the same exact values). For the dequantize kernel's words of
    eight nibbles."""
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _dequantize_kernel(
    w_ptr, scale_ptr, offset_ptr, out_ptr,
    N, K,
    stride_wn, stride_sn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    store_ok = row_ok[:, None] & (ks < K)[None, :]
    if BITS == 8:
        q = tl.load(w_ptr + rows[:, None] * stride_wn + ks[None, :], mask=store_ok, other=0).to(tl.float32)
        w = (q * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]).to(out_ptr.dtype.element_ty)
    else:
        # w_ptr: int32 words of eight weights, k = 8i + e in bits 4e .. 4e + 3 of word i. Each thread turns whole
        # words into eight outputs (one vector store), the group's scale and offset read once per word, and a
        # nibble becomes a float by its bits (2^23 + q, minus 2^23: no int-to-float conversion).
        words = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        ok = row_ok[:, None] & (words < K // 8)[None, :]
        packed = tl.load(w_ptr + rows[:, None] * stride_wn + words[None, :], mask=ok, other=0)
        s_offsets = rows[:, None] * stride_sn + ((8 * words) // GROUP)[None, :]
        scale = tl.load(scale_ptr + s_offsets, mask=ok, other=0.0).to(tl.float32)[:, :, None]
        offset = tl.load(offset_ptr + s_offsets, mask=ok, other=0.0).to(tl.float32)[:, :, None]
        q = _nibble_float((packed[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF)
        w = tl.reshape((q * scale + offset).to(out_ptr.dtype.element_ty), [BLOCK_N, BLOCK_K])
    tl.store(out_ptr + rows[:, None] * stride_on + ks[None, :], w, mask=store_ok)


def _check(x: torch.Tensor, weight: torch.Tensor, bits: int) -> tuple[int, int, int]:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K], contiguous along K; got {tuple(x.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    packed_k = k // 2 if bits == 4 else k
    if weight.shape != (n, packed_k) or weight.stride(-1) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} for int{bits}")
    if max(x.stride(0) * m, weight.stride(0) * n, m * n) >= 2**31:
        raise ValueError("the kernels index with 32-bit offsets: split a matmul this large")
    return m, n, k


def k_slices(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(elements of K per slice, slices) for cutting K into at most split_k slices of whole block_k steps."""
    steps = triton.cdiv(k, block_k)
    k_per_split = triton.cdiv(steps, max(1, min(split_k, steps))) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def _output(x: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if out.shape != (x.shape[0], n) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{x.shape[0]}, {n}], contiguous along its last dimension")
    return out


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, *,
              block_n: int = 8, block_k: int = 512, num_warps: int = 4) -> torch.Tensor:
    """x [M, K] @ (weight * scale[:, None])^T -> [M, N] in x's dtype; for small M."""
    m, n, k = _check(x, weight, 8)
    out = _output(x, n, out)
    if m:
        _int8_gemv_kernel[(m, triton.cdiv(n, block_n))](
            x, weight, scale, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        )
    return out


def int4_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int,
              out: torch.Tensor | None = None, *, block_n: int = 8, groups_per_iter: int = 4,
              num_warps: int = 4) -> torch.Tensor:
    """x [M, K] @ dequantized(weight)^T -> [M, N] in x's dtype; for small M."""
    m, n, k = _check(x, weight, 4)
    out = _output(x, n, out)
    if m:
        _int4_gemv_kernel[(m, triton.cdiv(n, block_n))](
            x, weight, scale, offset, out, m, n, k,
            x.stride(0), weight.stride(0), scale.stride(0), out.stride(0),
            GROUP=group, BLOCK_N=block_n, GROUPS=groups_per_iter, num_warps=num_warps,
        )
    return out


def gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
         group: int, out: torch.Tensor | None = None, *, block_m: int = 16, block_n: int = 64, block_k: int = 128,
         split_k: int = 1, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [M, K] @ dequantized(weight)^T -> [M, N] in x's dtype, on the tensor cores. With split_k > 1 the
    K range is cut into that many parts whose float32 partial products are summed afterwards."""
    m, n, k = _check(x, weight, bits)
    out = _output(x, n, out)
    if bits == 4:
        block_k = group  # one group per iteration: its scale and offset are a vector over the tile's columns
    k_per_split, split_k = k_slices(k, block_k, split_k)
    if m == 0:
        return out
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    offset_arg = offset if offset is not None else scale
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _gemm_kernel[grid](
        x, weight, scale, offset_arg, target, m, n, k, k_per_split,
        x.stride(0), weight.stride(0), offset_arg.stride(0) if bits == 4 else 0,
        target.stride(-2), target.stride(0) if split_k > 1 else 0,
        BITS=bits, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    if split_k > 1:
        out.copy_(target.sum(dim=0))
    return out


def dequantize(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int, group: int,
               dtype: torch.dtype, *, block_n: int = 16, block_k: int = 256,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as a dense [N, K] tensor of `dtype` (written into `out` where given)."""
    n = weight.shape[0]
    k = weight.shape[1] * (2 if bits == 4 else 1)
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=weight.device)
    elif out.shape != (n, k) or out.dtype != dtype or out.stride(1) != 1:
        raise ValueError(f"dequantize's out must be [{n}, {k}] {dtype}, rows contiguous; got {tuple(out.shape)} "
                         f"{out.dtype}")
    offset_arg = offset if offset is not None else scale
    words = weight.view(torch.int32) if bits == 4 else weight  # int4: K is a multiple of the group, so of 8
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        words, scale, offset_arg, out, n, k,
        words.stride(0), offset_arg.stride(0) if bits == 4 else 0, out.stride(0),
        BITS=bits, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
