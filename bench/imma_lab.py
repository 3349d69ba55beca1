"""Lab: the int8 tensor-core matmuls with two-part activations (kernels/imma_gemm.py explains them; split_gemm's
two_part kernels for 1-64 rows) in several configurations, and two variants the package does not ship: x in one
int8 part (imma1, W8A8's accuracy) and int4 nibbles unpacked by inline PTX four bytes at a time (imma4 asm),
against bf16 and the current int8/int4 kernels. Decode sizes are timed as a decode step meets its weights: copies
of a projection cycled inside a CUDA graph, so each call reads its weight from DRAM with no flush between calls;
--prefill times 128-2,048 rows.

    python bench/imma_lab.py [--quick] [--prefill] [--no-decode]
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xverse_serve.kernels import gemv, imma_gemm, split_gemm  # noqa: E402
from xverse_serve.kernels.split_gemm import _finish, default_split  # noqa: E402
from xverse_serve.model import quantization  # noqa: E402


@triton.jit
def _one_part(xt):
    amax = tl.max(tl.abs(xt), axis=0)
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    v = xt * inv[None, :]
    q = (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32)
    return q.to(tl.int8), amax * (1.0 / 127.0)


@triton.jit(do_not_specialize=["M"])
def _imma_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, partial_ptr, ticket_ptr, M, N, stride_xm, stride_wn, stride_ym,
                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT: tl.constexpr, PER_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, MAX_M: tl.constexpr):
    # split_gemm._split_kernel's two-part path with x in one int8 part per row and step of K (W8A8's accuracy).
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
            w = tl.load(w_ptrs, mask=out_ok[:, None], other=0, eviction_policy="evict_first")
            xt = tl.load(x_ptrs, mask=row_ok[None, :], other=0.0).to(tl.float32)
        else:
            k_ok = ks < K
            w = tl.load(w_ptrs, mask=out_ok[:, None] & k_ok[None, :], other=0, eviction_policy="evict_first")
            xt = tl.load(x_ptrs, mask=row_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)
            ks += BLOCK_K
        q, s = _one_part(xt)
        acc += tl.dot(w, q).to(tl.float32) * s[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    scale = tl.load(scale_ptr + outs, mask=out_ok, other=0.0)[:, None]
    _finish(acc, scale, y_ptr, partial_ptr, ticket_ptr, tile, split, rows, outs, row_ok, out_ok, N, stride_ym,
            BLOCK_M, BLOCK_N, SPLIT, MAX_M)


@triton.jit
def _low_nibbles(p):
    """Four bytes' low nibbles at once (split_gemm's kernel unpacks them one byte at a time)."""
    return tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [p], dtype=tl.int8, is_pure=True,
                                     pack=4)


@triton.jit
def _high_nibbles(p):
    return tl.inline_asm_elementwise("{ shr.b32 $0, $1, 4; and.b32 $0, $0, 0x0F0F0F0F; }", "=r,r", [p],
                                     dtype=tl.int8, is_pure=True, pack=4)


@triton.jit(do_not_specialize=["M"])
def _imma4_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, offset_ptr, partial_ptr, ticket_ptr, M, N, stride_xm,
                  stride_wn, stride_sn, stride_ym, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PER_SPLIT: tl.constexpr, EVEN: tl.constexpr,
                  MAX_M: tl.constexpr):
    # split_gemm._split_int4_kernel's two-part path with the nibbles unpacked by inline PTX, four bytes at once.
    tile = tl.program_id(0)
    split = tl.program_id(1)
    outs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    out_ok, row_ok = outs < N, rows < M
    first = split * PER_SPLIT
    pairs = tl.arange(0, GROUP // 2)
    w_ptrs = w_ptr + outs[:, None].to(tl.int64) * stride_wn + first * (GROUP // 2) + pairs[None, :]
    x_ptrs = x_ptr + rows[None, :] * stride_xm + first * GROUP + 2 * pairs[:, None]
    s_offsets = outs * stride_sn + first
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for i in range(PER_SPLIT):
        if EVEN:
            w_ok = out_ok
            x_ok = row_ok
        else:
            w_ok = out_ok & (first + i < K // GROUP)
            x_ok = row_ok & (first + i < K // GROUP)
        packed = tl.load(w_ptrs, mask=w_ok[:, None], other=0, eviction_policy="evict_first")
        x_even = tl.load(x_ptrs, mask=x_ok[None, :], other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptrs + 1, mask=x_ok[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x_even), axis=0), tl.max(tl.abs(x_odd), axis=0))
        inv = tl.where(amax > 0, 32639.0 / amax, 0.0)
        ve = x_even * inv[None, :]
        vo = x_odd * inv[None, :]
        qe = (ve + tl.where(ve >= 0, 0.5, -0.5)).to(tl.int32)
        qo = (vo + tl.where(vo >= 0, 0.5, -0.5)).to(tl.int32)
        he = (qe + 128) >> 8
        ho = (qo + 128) >> 8
        le = (qe - (he << 8)).to(tl.int8)
        lo = (qo - (ho << 8)).to(tl.int8)
        w_lo = _low_nibbles(packed)
        w_hi = _high_nibbles(packed)
        p_hi = tl.dot(w_lo, he.to(tl.int8))
        p_hi = tl.dot(w_hi, ho.to(tl.int8), p_hi, out_dtype=tl.int32)
        p_lo = tl.dot(w_lo, le)
        p_lo = tl.dot(w_hi, lo, p_lo, out_dtype=tl.int32)
        part = (p_hi.to(tl.float32) * 256.0 + p_lo.to(tl.float32)) * (amax * (1.0 / 32639.0))[None, :]
        scale = tl.load(scale_ptr + s_offsets, mask=w_ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + s_offsets, mask=w_ok, other=0.0).to(tl.float32)
        x_sum = tl.sum(x_even + x_odd, axis=0)
        acc += part * scale[:, None] + offset[:, None] * x_sum[None, :]
        w_ptrs += GROUP // 2
        x_ptrs += GROUP
        s_offsets += 1
    _finish(acc, 1.0, y_ptr, partial_ptr, ticket_ptr, tile, split, rows, outs, row_ok, out_ok, N, stride_ym,
            BLOCK_M, BLOCK_N, SPLIT, MAX_M)


def imma1_matmul(x, weight, scale, config):
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    block_n, block_k, num_warps, num_stages = config[:4]
    split = config[4] if len(config) > 4 else default_split(n, k, block_n, block_k, x.device)
    out, partial, tickets = split_gemm._outputs(x2, n, block_n, split)
    steps = triton.cdiv(k, block_k)
    _imma_kernel[(triton.cdiv(n, block_n), split)](
        x2, weight, out, scale, partial, tickets, x2.shape[0], n, x2.stride(0), weight.stride(0), out.stride(0),
        K=k, BLOCK_M=max(16, triton.next_power_of_2(x2.shape[0])), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
        PER_SPLIT=triton.cdiv(steps, split), EVEN_K=k % block_k == 0 and steps % split == 0,
        MAX_M=split_gemm.MAX_ROWS, num_warps=num_warps, num_stages=num_stages)
    return out


def imma4_asm_matmul(x, weight, scale, offset, group, config):
    n = weight.shape[0]
    groups = scale.shape[1]
    k = groups * group
    x2 = x.reshape(-1, k)
    block_n, num_warps, num_stages = config[:3]
    split = config[3] if len(config) > 3 else default_split(n, k, block_n, group, x.device)
    out, partial, tickets = split_gemm._outputs(x2, n, block_n, split)
    _imma4_kernel[(triton.cdiv(n, block_n), split)](
        x2, weight, out, scale, offset, partial, tickets, x2.shape[0], n, x2.stride(0), weight.stride(0),
        scale.stride(0), out.stride(0), K=k, GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(x2.shape[0])),
        BLOCK_N=block_n, SPLIT=split, PER_SPLIT=triton.cdiv(groups, split), EVEN=groups % split == 0,
        MAX_M=split_gemm.MAX_ROWS, num_warps=num_warps, num_stages=num_stages)
    return out


def int_mm_rows(x, weight, scale):
    """cuBLAS's int8 GEMM (torch._int_mm) on both parts stacked along M, then the scales in PyTorch."""
    hi, lo, s, _ = imma_gemm.split_rows(x)
    m = x.shape[0]
    both = torch._int_mm(torch.cat((hi, lo)), weight.t())
    return ((both[:m].float() * 256 + both[m:].float()) * s[:, None] * scale[None, :]).to(x.dtype)


def graph_time_us(make_call, copies: int, repeats: int = 20) -> float:
    """µs per call of make_call(i) for copies i = 0..copies-1 captured in one CUDA graph (each call reads its own
    copy of the weight, cold in L2 since the copies together exceed it)."""
    for i in range(copies):
        make_call(i)()
    torch.cuda.synchronize()
    calls = [make_call(i) for i in range(copies)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / copies)
    return sorted(times)[len(times) // 2]


def prefill_rows(name, n, k, ms, emit) -> None:
    """Prefill-sized M: bf16 cuBLAS, the tuner's current int8 and int4 candidates, and the two-part IMMA kernels."""
    dev = torch.device("cuda")
    w = torch.randn(n, k, device=dev) * 0.02
    layer8 = quantization.QuantizedLinear(k, n, "int8").to(dev)
    layer4 = quantization.QuantizedLinear(k, n, "int4").to(dev)
    layer8.load_rows(0, w)
    layer4.load_rows(0, w)
    bf = [layer8.dequantized(torch.bfloat16) for _ in range(2)]
    ref8 = layer8.dequantized(torch.float32)
    ref4 = layer4.dequantized(torch.float32)
    del w
    for m in ms:
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        r8, r4 = x.float() @ ref8.T, x.float() @ ref4.T
        variants = [("bf16 F.linear", lambda: F.linear(x, bf[0]), None),
                    ("split_rows", lambda: imma_gemm.split_rows(x), None),
                    ("split_rows int4", lambda: imma_gemm.split_rows(x, 128), None)]
        for kernel in quantization.candidates(layer8, m):
            variants.append((f"int8 {kernel}", lambda kernel=kernel: kernel(x, layer8), r8))
        variants.append(("int8 int_mm", lambda: int_mm_rows(x, layer8.weight, layer8.weight_scale), r8))
        for config in ((128, 128, 128, 8, 3), (128, 128, 64, 8, 4), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3),
                       (128, 64, 128, 4, 4)):
            variants.append((f"int8 imma_rows {config}",
                             lambda c=config: imma_gemm.rows_matmul(x, layer8.weight, layer8.weight_scale, c), r8))
        for kernel in quantization.candidates(layer4, m):
            variants.append((f"int4 {kernel}", lambda kernel=kernel: kernel(x, layer4), r4))
        for config in ((64, 128, 4, 3), (128, 64, 4, 3), (64, 256, 8, 3), (128, 128, 8, 2)):
            variants.append((f"int4 imma4_rows {config}",
                             lambda c=config: imma_gemm.rows_matmul_int4(x, layer4.weight, layer4.weight_scale,
                                                                         layer4.weight_offset, 128, c), r4))
        for label, call, reference in variants:
            try:
                err = None
                if reference is not None:
                    err = ((call().float() - reference).norm() / reference.norm()).item()
                us = graph_time_us(lambda i, call=call: call, 3)
                row = {"shape": name, "m": m, "variant": label, "us": round(us, 2),
                       "TFLOP/s": round(2 * m * n * k / us / 1e6, 1), "err": err}
            except Exception as exc:
                row = {"shape": name, "m": m, "variant": label, "failed": f"{type(exc).__name__}: {exc}"[:300]}
            emit(row)


SHAPES = {"qkv_proj": (12288, 4096), "o_proj": (4096, 4096), "gate_up_proj": (22016, 4096),
          "down_proj": (4096, 11008)}


def main() -> None:
    quick = "--quick" in sys.argv
    torch.manual_seed(0)
    dev = torch.device("cuda")
    results = []
    log = open(os.path.join(os.environ.get("OUT", "."), "imma_lab.jsonl"), "w")
    ms = (1, 16) if quick else (1, 16, 64)

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()
        results.append(row)

    if "--prefill" in sys.argv:
        for name, (n, k) in SHAPES.items():
            prefill_rows(name, n, k, (512,) if quick else (128, 512, 2048), emit)
    for name, (n, k) in SHAPES.items() if "--no-decode" not in sys.argv else ():
        copies = max(4, (400 << 20) // (n * k))  # >= 400 MB of int8 weights per graph
        w = torch.randn(n, k, device=dev) * 0.02
        q8, s8 = quantization.quantize_int8(w)
        p4, s4, o4 = quantization.quantize_int4(w)
        del w
        bf = [(q8.float() * s8[:, None]).to(torch.bfloat16) for _ in range(copies // 2)]
        i8 = [(q8.clone(), s8.clone()) for _ in range(copies)]
        i4 = [(p4.clone(), s4.clone(), o4.clone()) for _ in range(2 * copies)]
        ref_w = q8.float() * s8[:, None]
        ref_w4 = quantization.dequantize_int4(p4, s4, o4)
        for m in ms:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            ref = x.float() @ ref_w.T
            ref4 = x.float() @ ref_w4.T
            variants = []
            variants.append(("bf16 F.linear", len(bf), lambda i: (lambda: F.linear(x, bf[i])), None))
            if m == 1:
                variants.append(("bf16 gemv", len(bf), lambda i: (lambda: gemv.gemv(x, bf[i])), None))
                variants.append(("int8 rowgemv", copies, lambda i: (lambda: gemv.gemv(x, i8[i][0], scale=i8[i][1])),
                                 ref))
            elif m <= 32:
                variants.append(("bf16 skinny", len(bf), lambda i: (lambda: gemv.skinny_matmul(x, bf[i])), None))
            variants.append(("int8 split", copies,
                             lambda i: (lambda: split_gemm.split_matmul(x, i8[i][0], i8[i][1], (64, 128, 4, 3))), ref))
            configs = [(64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (64, 256, 4, 3), (128, 256, 8, 3),
                       (256, 128, 8, 3), (64, 128, 4, 5)]
            if quick:
                configs = configs[:3]
            for config in configs:
                variants.append((f"imma2 {config}", copies, lambda i, c=config: (
                    lambda: split_gemm.split_matmul(x, i8[i][0], i8[i][1], c, two_part=True)), ref))
            for config in configs[:2]:
                variants.append((f"imma1 {config}", copies,
                                 lambda i, c=config: (lambda: imma1_matmul(x, i8[i][0], i8[i][1], c)), ref))
            variants.append(("int4 split (64,8,3)", 2 * copies,
                             lambda i: (lambda: split_gemm.split_matmul_int4(x, *i4[i], 128, (64, 8, 3))), ref4))
            for config in ((64, 4, 3), (64, 8, 3), (128, 8, 3), (128, 4, 4)):
                variants.append((f"imma4 {config}", 2 * copies, lambda i, c=config: (
                    lambda: split_gemm.split_matmul_int4(x, *i4[i], 128, c, two_part=True)), ref4))
                variants.append((f"imma4 asm {config}", 2 * copies, lambda i, c=config: (
                    lambda: imma4_asm_matmul(x, *i4[i], 128, c)), ref4))
            bytes_by = {"bf16": n * k * 2, "int8": n * k, "imma2": n * k, "imma1": n * k,
                        "int4": n * k // 2 + n * k // 128 * 4, "imma4": n * k // 2 + n * k // 128 * 4}
            for label, count, make, reference in variants:
                try:
                    err = None
                    if reference is not None:
                        out = make(0)()
                        err = ((out.float() - reference).norm() / reference.norm()).item()
                    us = graph_time_us(make, count)
                    tbs = bytes_by[label.split()[0]] / us / 1e6
                    row = {"shape": name, "m": m, "variant": label, "us": round(us, 2), "TB/s": round(tbs, 2),
                           "err": err}
                except Exception as exc:
                    row = {"shape": name, "m": m, "variant": label, "failed": f"{type(exc).__name__}: {exc}"[:300]}
                emit(row)
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "imma_lab.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
