"""y = x @ W^T for int8, fp8 and int4 weights with bf16 or fp16 activations on the bf16/fp16 tensor cores, the
weights as the dot's first operand: the kernel computes the tile y^T = W x^T.

Why the transposed product: Hopper's wgmma reads its second operand from shared memory but can take its first from
registers. With the weights first, each weight tile goes from shared memory into registers in the dot's own
layout, is dequantized there (int8: converted; int4: unpacked and scaled) and feeds the tensor cores directly, while
the next tiles stream in; with the weights second (quant_matmul's gemm), every dequantized tile is written back to
shared memory and the dot waits for it. It also makes the tokens the dot's narrow side, which wgmma allows down to
8: a tile of 16-64 tokens still fills the tensor cores' 64-row side with weights, so the same kernel serves decode
batches (split along K where the output tiles alone would leave SMs idle) and prefill.

Layouts as quant_matmul's: int8 (or fp8 e4m3) weight [N, K] with a float32 scale per row (applied to the float32
sums at the end; the values convert exactly to bf16 and fp16); int4 weight [N, K // 2] uint8 (k = 2j in byte j's
low nibble, 2j + 1 in its high one) with float16 scale and offset per group of K, dequantized in float32 and
rounded to x's dtype as quant_matmul.dequantize rounds them, so the result is the dense matmul with the dequantized
weight, summed in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .gemv import check_scale
from .imma_gemm import _tile
from .quant_matmul import _check, k_slices
from .split_gemm import MAX_ROWS, _finish, _workspace, check_int4

# (block_m tokens, block_n weight rows, block_k, num_warps, num_stages), no register spills on sm_90 (ptxas -v);
# the tuner times each configuration of the smallest token tile that holds M. A 256-token tile, (256, 128, 64, 8,
# 3), was dropped: on an H100 its int8 results were wrong (relative error 0.16-0.18, the tuner rejected them; fp8
# and int4 in the same tile were right), and it was never the fastest for a decoder shape
# (bench/results/mixed_gemm_h100.json). The 64 x 64 tile on one warpgroup serves the N = 4,096 shapes at 64 rows:
# twice the output tiles of the 128-wide one, so half the slices of K (int4 o_proj 22.1 µs at split 4 against the
# tuner's 28.4, down_proj 43.2 against 51.3 on an H100: bench/results/mixed_gemm_int4_64_h100.json).
CONFIGS = (
    (16, 128, 128, 4, 4),
    (32, 128, 128, 4, 4),
    (64, 128, 128, 8, 4),
    (64, 64, 128, 4, 4),
    (128, 128, 64, 8, 4),
)
# The TMA kernel's, for prefill-sized batches (from TMA_MIN_ROWS rows): (block_m, block_n, block_k, num_warps,
# num_stages), no register spills on sm_90.
TMA_CONFIGS = (
    (128, 128, 64, 8, 4),
    (256, 128, 64, 8, 3),
)
TMA_MIN_ROWS = 128


@triton.jit(do_not_specialize=["M"])
def _kernel(x_ptr, w_ptr, scale_ptr, offset_ptr, y_ptr, partial_ptr, ticket_ptr, M, N, K, k_per_split, stride_xm,
            stride_wn, stride_sn, stride_ym, stride_ysplit, BITS: tl.constexpr, GROUP: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
            TICKETS: tl.constexpr, SPLIT: tl.constexpr, MAX_M: tl.constexpr, PDL: tl.constexpr):
    # Programs in groups of GROUP_N weight tiles that share their token tiles in L2 (the weights are read once);
    # indices past N or M clamped: every load in bounds, the store masks. PDL: launched early (kernels.pdl), as
    # split_gemm's kernels: waits for the kernel before it first, lets the next launch after its loop.
    pdl.wait(PDL)
    outs, rows, outs_in, rows_in = _tile(N, M, BLOCK_N, BLOCK_M, GROUP_N)
    k_begin = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_in[None, :] * stride_xm + (k_begin + ks)[:, None]  # [BLOCK_K, BLOCK_M]: x^T
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    if BITS == 8:
        w_ptrs = w_ptr + outs_in[:, None] * stride_wn + (k_begin + ks)[None, :]
        for _ in range(k_begin, k_end, BLOCK_K):
            acc = tl.dot(tl.load(w_ptrs).to(x_ptr.dtype.element_ty), tl.load(x_ptrs), acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        acc = acc * tl.load(scale_ptr + outs_in)[:, None]
    else:
        pairs = tl.arange(0, BLOCK_K // 2)
        w_ptrs = w_ptr + outs_in[:, None] * stride_wn + (k_begin // 2 + pairs)[None, :]
        s_ptrs = outs_in * stride_sn
        for k0 in range(k_begin, k_end, BLOCK_K):  # BLOCK_K divides GROUP: one scale and offset per row a step
            w = _int4_floats(tl.load(w_ptrs), scale_ptr + s_ptrs, offset_ptr + s_ptrs, k0 // GROUP, BLOCK_N, BLOCK_K)
            acc = tl.dot(w.to(x_ptr.dtype.element_ty), tl.load(x_ptrs), acc)
            w_ptrs += BLOCK_K // 2
            x_ptrs += BLOCK_K
    pdl.launch_next(PDL)
    if TICKETS:  # one token tile, so program 0's index is the weight tile's: split_gemm's in-kernel reduction
        _finish(acc, 1.0, y_ptr, partial_ptr, ticket_ptr, tl.program_id(0), tl.program_id(1), rows, outs, rows < M,
                outs < N, N, stride_ym, BLOCK_M, BLOCK_N, SPLIT, MAX_M)
    else:  # y itself, or slice program_id(1)'s float32 partial sums, added by the wrapper
        y = y_ptr + tl.program_id(1) * stride_ysplit + rows[None, :] * stride_ym + outs[:, None]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[None, :] & (outs < N)[:, None])


@triton.jit
def _int4_floats(packed, scale_ptrs, offset_ptrs, group, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [BLOCK_N, BLOCK_K // 2] tile of packed int4 weights (one group per row) -> [BLOCK_N, BLOCK_K] float32."""
    packed = packed.to(tl.int32)
    scale = tl.load(scale_ptrs + group).to(tl.float32)[:, None]
    offset = tl.load(offset_ptrs + group).to(tl.float32)[:, None] - 128.0 * scale
    # A nibble q becomes the float 128 + q by its bits (q in the mantissa's bits 16-19 under the exponent of 128):
    # an and, a shift and an or where an int-to-float conversion runs at a sixteenth of the FMA rate; the offset
    # takes back the 128 scales (exact to float32's 24 bits, far finer than bf16's 8).
    low = (((packed & 0xF) << 16) | 0x43000000).to(tl.float32, bitcast=True) * scale + offset
    high = (((packed & 0xF0) << 12) | 0x43000000).to(tl.float32, bitcast=True) * scale + offset
    return tl.reshape(tl.join(low, high), [BLOCK_N, BLOCK_K])  # k = 2j from the low nibble, 2j + 1 the high


@triton.jit(do_not_specialize=["M"])
def _tma_kernel(x_desc, w_desc, scale_ptr, offset_ptr, y_ptr, M, N, K, stride_sn, stride_ym, BITS: tl.constexpr,
                GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                STAGES: tl.constexpr):
    # _kernel's product for prefill-sized batches, each tile brought into shared memory by a TMA copy (one thread
    # issues it; tiles past N or M read as zeros) instead of every thread's addresses and cp.async. Token tiles
    # fastest: the programs that share a weight tile run together, so it is read from memory once.
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % tiles_m
    pid_n = tl.program_id(0) // tiles_m
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s_ptrs = tl.minimum(outs, N - 1) * stride_sn
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = x_desc.load([pid_m * BLOCK_M, k0])
        if BITS == 8:
            w = w_desc.load([pid_n * BLOCK_N, k0]).to(x.dtype)
        else:
            w = _int4_floats(w_desc.load([pid_n * BLOCK_N, k0 // 2]), scale_ptr + s_ptrs, offset_ptr + s_ptrs,
                             k0 // GROUP, BLOCK_N, BLOCK_K).to(x.dtype)
        acc = tl.dot(w, tl.trans(x), acc)
    if BITS == 8:
        acc = acc * tl.load(scale_ptr + s_ptrs)[:, None]
    tl.store(y_ptr + rows[None, :] * stride_ym + outs[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[None, :] & (outs < N)[:, None])


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
           group: int = 0, config: tuple[int, int, int, int, int] = CONFIGS[-1], split_k: int = 1,
           tma: bool = False) -> torch.Tensor:
    """x [..., K] (bf16 or fp16) @ W^T in x's dtype, W int8 or fp8 e4m3 with a scale per row (offset None), or
    packed int4 in groups of `group`.
    K must be a multiple of the config's block_k, and for int4 block_k must divide the group. With split_k > 1 the
    K range is cut into that many parts whose float32 partial products are added (in slice order, in the kernel
    where the rows fit one token tile of at most split_gemm.MAX_ROWS). tma: the tiles come by TMA copies (Hopper
    and newer; one slice of K), for prefill-sized batches (TMA_CONFIGS)."""
    if offset is None:
        check_scale(weight, scale)
    else:
        check_int4(weight, scale, offset, group)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, n, k = _check(x2, weight, 8 if offset is None else 4)  # the shapes, and offsets within 32 bits
    block_m, block_n, block_k, num_warps, num_stages = config
    if k % block_k or (offset is not None and group % block_k):
        raise ValueError(f"mixed_gemm's K ({k}) must be a multiple of block_k ({block_k}), which must divide "
                         f"int4's group ({group})")
    k_per_split, split_k = k_slices(k, block_k, split_k)
    if tma and split_k > 1:
        raise ValueError("mixed_gemm's TMA kernel takes K in one slice (split_k=1)")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    if tma:
        _matmul_tma(x2, weight, scale, offset, group, config, y)
        return y.view(*x.shape[:-1], n)
    # Split with one token tile (decode batches): the slices add up inside the kernel, through split_gemm's
    # workspace (allocated by the tuner's first call, before any CUDA graph is captured). Larger: float32 partial
    # sums, added here.
    tickets = split_k > 1 and m <= min(block_m, MAX_ROWS)
    target = y if split_k == 1 or tickets else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    partial, ticket = _workspace(x.device, n, block_n, split_k) if tickets else (y, y)
    offset_arg = scale if offset is None else offset
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    _kernel[grid](x2, weight, scale, offset_arg, target, partial, ticket, m, n, k, k_per_split, x2.stride(0),
                  weight.stride(0), 0 if offset is None else offset.stride(0), target.stride(-2),
                  target.stride(0) if target is not y else 0, BITS=8 if offset is None else 4, GROUP=max(group, 1),
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_N=8, TICKETS=tickets, SPLIT=split_k,
                  MAX_M=MAX_ROWS, num_warps=num_warps, num_stages=num_stages, **pdl.launch(x2))
    if target is not y:
        y.copy_(target.sum(dim=0))
    return y.view(*x.shape[:-1], n)


def _matmul_tma(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int,
                config: tuple[int, int, int, int, int], y: torch.Tensor) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_m, block_n, block_k, num_warps, num_stages = config
    # A TMA copy needs its tensor's start and row stride on 16 bytes: the weights' are fixed (K a multiple of 32
    # for int4, of 16 otherwise), x is copied where a view left it misaligned.
    if weight.stride(0) * weight.element_size() % 16 or weight.data_ptr() % 16:
        raise ValueError("mixed_gemm's TMA kernel needs the weight's rows on 16-byte boundaries")
    if x.data_ptr() % 16 or x.stride(0) * x.element_size() % 16:
        x = x.clone()
    m, k = x.shape
    n = weight.shape[0]
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k // 2 if offset is not None else block_k])
    _tma_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
        x_desc, w_desc, scale, offset if offset is not None else scale, y, m, n, k,
        offset.stride(0) if offset is not None else 1, y.stride(0), BITS=8 if offset is None else 4,
        GROUP=max(group, 1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=num_stages,
        num_warps=num_warps, num_stages=num_stages)
