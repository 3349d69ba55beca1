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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


@triton.jit(do_not_specialize=["M"])
def _split_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, partial_ptr, ticket_ptr, M, N, stride_xm, stride_wn, stride_ym,
                  K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT: tl.constexpr, PER_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, MAX_M: tl.constexpr):
    # int8 or fp8 weights. PER_SPLIT: steps of BLOCK_K per slice of K (the last slices may run past K unless
    # EVEN_K).
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
        if EVEN_K:
            w = tl.load(w_ptrs, mask=out_ok[:, None], other=0.0, eviction_policy="evict_first")
            xt = tl.load(x_ptrs, mask=row_ok[None, :], other=0.0)
        else:  # the last slices run past K: their columns read as zeros
            k_ok = ks < K
            w = tl.load(w_ptrs, mask=out_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
            xt = tl.load(x_ptrs, mask=row_ok[None, :] & k_ok[:, None], other=0.0)
            ks += BLOCK_K
        acc = tl.dot(w.to(xt.dtype), xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    scale = tl.load(scale_ptr + outs, mask=out_ok, other=0.0)[:, None]
    _finish(acc, scale, y_ptr, partial_ptr, ticket_ptr, tile, split, rows, outs, row_ok, out_ok, N, stride_ym,
            BLOCK_M, BLOCK_N, SPLIT, MAX_M)


@triton.jit(do_not_specialize=["M"])
def _split_int4_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, offset_ptr, partial_ptr, ticket_ptr, M, N, stride_xm,
                       stride_wn, stride_sn, stride_ym, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PER_SPLIT: tl.constexpr, EVEN: tl.constexpr,
                       MAX_M: tl.constexpr):
    # int4 (quantization.quantize_int4's layout): one group of K per step. The nibbles go into the dots as their
    # integer values (exact in bf16 and fp16), against x's even and odd columns; the group's scale and offset
    # apply to the float32 sums: sum_k x_k W_nk = scale_ng * sum_k x_k q_nk + offset_ng * sum_k x_k.
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
        part = tl.dot((packed & 0xF).to(x_even.dtype), x_even)
        part = tl.dot((packed >> 4).to(x_even.dtype), x_odd, part)
        scale = tl.load(scale_ptr + s_offsets, mask=w_ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + s_offsets, mask=w_ok, other=0.0).to(tl.float32)
        x_sum = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=0)
        acc += part * scale[:, None] + offset[:, None] * x_sum[None, :]
        w_ptrs += GROUP // 2
        x_ptrs += GROUP
        s_offsets += 1
    _finish(acc, 1.0, y_ptr, partial_ptr, ticket_ptr, tile, split, rows, outs, row_ok, out_ok, N, stride_ym,
            BLOCK_M, BLOCK_N, SPLIT, MAX_M)


def default_split(n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """The fewest slices of K (a power of two) that give every SM TARGET_PROGRAMS_PER_SM programs, keeping at
    least two steps of BLOCK_K per slice."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    tiles = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    split = 1
    while tiles * split < TARGET_PROGRAMS_PER_SM * sms and steps // (split * 2) >= 2:
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


def _outputs(x2: torch.Tensor, n: int, block_n: int, split: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
    partial, tickets = _workspace(x2.device, n, block_n, split) if split > 1 else (out, out)
    return out, partial, tickets


def split_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 config: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [..., K] holding 1..MAX_ROWS rows, weight [N, K] int8 or float8_e4m3fn (row-major) with scale [N]
    float32 -> x @ (weight * scale[:, None]).T in x's dtype. `config`: (block_n, block_k, num_warps, num_stages)
    with split chosen by default_split, or with a fifth value, the split."""
    check_scale(weight, scale)
    if weight.stride(1) != 1:
        raise ValueError("split_matmul needs the weight's rows contiguous")
    n, k = weight.shape
    x2 = _rows(x, k)
    block_n, block_k, num_warps, num_stages = (config or CONFIGS.get((n, k), DEFAULT_CONFIG))[:4]
    split = config[4] if config and len(config) > 4 else default_split(n, k, block_n, block_k, x.device)
    out, partial, tickets = _outputs(x2, n, block_n, split)
    steps = triton.cdiv(k, block_k)
    _split_kernel[(triton.cdiv(n, block_n), split)](
        x2, weight, out, scale, partial, tickets, x2.shape[0], n, x2.stride(0), weight.stride(0), out.stride(0),
        K=k, BLOCK_M=max(16, triton.next_power_of_2(x2.shape[0])), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
        PER_SPLIT=triton.cdiv(steps, split), EVEN_K=k % block_k == 0 and steps % split == 0, MAX_M=MAX_ROWS,
        num_warps=num_warps, num_stages=num_stages)
    return out.view(*x.shape[:-1], n)


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
                      group: int, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [..., K] holding 1..MAX_ROWS rows, weight [N, K // 2] packed int4 with scale and offset [N, K // group]
    (quantization.quantize_int4's layout) -> x @ dequantized(weight).T in x's dtype. `config`: (block_n,
    num_warps, num_stages) with split chosen by default_split, or with a fourth value, the split."""
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
        MAX_M=MAX_ROWS, num_warps=num_warps, num_stages=num_stages)
    return out.view(*x.shape[:-1], n)
