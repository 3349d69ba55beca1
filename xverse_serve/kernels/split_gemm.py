"""y = x @ W^T for 1 to 64 rows of activations and int8 or fp8 weights with a float32 scale per row
(model/quantization.py's layouts: W[n, k] = weight[n, k] * scale[n]), for decode steps of many sequences.

Such a step is bound by reading the weights once, and the tensor cores do its few rows' products for free. Two
choices make it stream:
- Swap-AB: a program computes a [BLOCK_N, rows] tile of y^T = W x^T. The weight tile is the dot's left operand,
  so its BLOCK_N (64 or more) rows fill the tensor core's tall side, and the activations pad only to 16 columns.
  The weight is widened to the activations' dtype in registers (int8 and e4m3 values are exact in bf16 and fp16),
  and the scale multiplies the float32 sums once, at the end.
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

MAX_ROWS = 64
# (N, K) -> (block_n, block_k, num_warps, num_stages, split), from bench/gemv_bench.py --split on an H200
# (XVERSE-7B's projections); other shapes take DEFAULT_CONFIG with split chosen by default_split.
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, int]] = {}
DEFAULT_CONFIG = (64, 128, 4, 3)
# Configurations the start-up tuner times (model/quantization.py): split chosen for each weight's shape.
TUNED_CONFIGS = ((64, 128, 4, 3), (32, 256, 4, 4), (128, 128, 8, 4))
TARGET_PROGRAMS_PER_SM = 3

# Workspaces for the partial sums and the tickets, per (device, N, BLOCK_N, split): allocated on first use (the
# start-up tuner's calls, before any CUDA graph is captured), and reused by every weight of that shape, since the
# kernels of one stream run one after another.
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@triton.jit(do_not_specialize=["M"])
def _split_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, partial_ptr, ticket_ptr, M, N, stride_xm, stride_wn, stride_ym,
                  K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT: tl.constexpr, PER_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, MAX_M: tl.constexpr):
    # PER_SPLIT: steps of BLOCK_K per slice of K (the last slices may run past K when not EVEN_K).
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
    y_ptrs = y_ptr + rows[None, :] * stride_ym + outs[:, None]
    store_ok = row_ok[None, :] & out_ok[:, None]
    scale = tl.load(scale_ptr + outs, mask=out_ok, other=0.0)[:, None]
    if SPLIT == 1:
        tl.store(y_ptrs, (acc * scale).to(y_ptr.dtype.element_ty), mask=store_ok)
    else:
        # partial[split, row, n]: this program's sums, then a ticket; the last ticket's program adds all of them.
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


def split_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 config: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [..., K] holding 1..MAX_ROWS rows, weight [N, K] int8 or float8_e4m3fn (row-major) with scale [N]
    float32 -> x @ (weight * scale[:, None]).T in x's dtype. `config`: (block_n, block_k, num_warps, num_stages)
    with split chosen by default_split, or with a fifth value, the split."""
    if (weight.dtype not in (torch.int8, torch.float8_e4m3fn) or scale.dtype != torch.float32
            or scale.shape != (weight.shape[0],)):
        raise ValueError(f"split_matmul takes int8 or fp8 [N, K] weights with a float32 scale [N]; got "
                         f"{weight.dtype} {tuple(weight.shape)} and {scale.dtype} {tuple(scale.shape)}")
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"split_matmul takes 1 to {MAX_ROWS} rows, got {rows}")
    if weight.stride(1) != 1:
        raise ValueError("split_matmul needs the weight's rows contiguous")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    config = config or CONFIGS.get((n, k), DEFAULT_CONFIG)
    block_n, block_k, num_warps, num_stages = config[:4]
    split = config[4] if len(config) > 4 else default_split(n, k, block_n, block_k, x.device)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    partial, tickets = _workspace(x.device, n, block_n, split) if split > 1 else (out, out)
    steps = triton.cdiv(k, block_k)
    _split_kernel[(triton.cdiv(n, block_n), split)](
        x2, weight, out, scale, partial, tickets, rows, n, x2.stride(0), weight.stride(0), out.stride(0),
        K=k, BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
        PER_SPLIT=triton.cdiv(steps, split), EVEN_K=k % block_k == 0 and steps % split == 0, MAX_M=MAX_ROWS,
        num_warps=num_warps, num_stages=num_stages)
    return out.view(*x.shape[:-1], n)
