"""Where the quantized one-row GEMVs spend their time: variants of the int8 GEMV and of a swap-AB tensor-core
kernel for int8 and int4 on XVERSE-7B's shapes at 1, 16 and 64 rows, with their PTX/SASS, for a profiler.

A: kernels.gemv.gemv on int8 (the module), and a copy of its loop with a few block shapes
B: the same loop widening int8 by PRMT into float32 bits (inline asm) instead of the compiler's sequence
C: swap-AB tensor-core kernel, acc[BLOCK_N, rows] = dot(W tile, x^T), W int8 -> bf16 (Triton), -> fp16 (Triton),
   -> fp16 by PRMT (asm); no split along K
D: int4 swap-AB (nibbles -> bf16 by Triton, or 128 + n by PRMT), against kernels.quant_matmul's int4 GEMV
Each call follows a 256 MB memset, whose dirty lines are written back while the kernel runs: the times are
inflated alike for every variant (compare them with each other only). --profile runs each once, for ncu:

    python bench/quant_gemv_variants.py
    ncu --clock-control none -k regex:"_row_kernel|_swap_kernel|_swap4_kernel|_gemv_kernel" \
        --section SpeedOfLight --section InstructionStats --section WarpStateStats --section Occupancy \
        python bench/quant_gemv_variants.py --profile

bench/results/quant_gemv_variants_h200.txt holds a run on an H200 and the profile's figures.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from common import cold_time_us

from xverse_serve.kernels import gemv  # noqa: E402
from xverse_serve.model import quantization  # noqa: E402

PROFILE = "--profile" in sys.argv
SHAPES = {"qkv_proj": (12288, 4096), "gate_up_proj": (22016, 4096),
          "down_proj": (4096, 11008)}


@triton.jit
def _i8_to_f32_asm(w):
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t, m;
        xor.b32 t, $4, 0x80808080;
        mov.b32 m, 0x4B000000;
        prmt.b32 $0, t, m, 0x7440;
        prmt.b32 $1, t, m, 0x7441;
        prmt.b32 $2, t, m, 0x7442;
        prmt.b32 $3, t, m, 0x7443;
        sub.f32 $0, $0, 0f4B000080;
        sub.f32 $1, $1, 0f4B000080;
        sub.f32 $2, $2, 0f4B000080;
        sub.f32 $3, $3, 0f4B000080;
        }""",
        "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _i8_to_f16_asm(w):
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t, m, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 m, 0x64646464;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, m, 0x5140;
        prmt.b32 $1, t, m, 0x7362;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _row_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, N, stride_wn, K: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0,
                    eviction_policy="evict_first")
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ASM:
            acc += _i8_to_f32_asm(w) * x
        else:
            acc += ((w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * x
    out = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["M"])
def _swap_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, M, N, stride_xm, stride_wn, stride_ym,
                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 CONV: tl.constexpr):
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    out_ok, row_ok = outs < N, rows < M
    w_ptrs = w_ptr + outs[:, None].to(tl.int64) * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    x_ptrs = x_ptr + rows[None, :] * stride_xm + tl.arange(0, BLOCK_K)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs, mask=out_ok[:, None], other=0, eviction_policy="evict_first")
        xt = tl.load(x_ptrs, mask=row_ok[None, :], other=0.0)
        if CONV == 0:
            acc = tl.dot(w.to(tl.bfloat16), xt, acc)
        elif CONV == 1:
            acc = tl.dot(w.to(tl.float16), xt.to(tl.float16), acc)
        else:
            acc = tl.dot(_i8_to_f16_asm(w), xt.to(tl.float16), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    acc *= tl.load(scale_ptr + outs, mask=out_ok, other=0.0)[:, None]
    tl.store(y_ptr + rows[None, :] * stride_ym + outs[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[None, :] & out_ok[:, None])


@triton.jit
def _u4_to_bf16_biased(packed):
    # 4 bytes -> low nibbles and high nibbles as bf16 128 + n (exact), two regs each
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 s, m;
        mov.b32 m, 0x43434343;
        shr.b32 s, $4, 4;
        prmt.b32 $0, $4, m, 0x5140;
        prmt.b32 $1, $4, m, 0x7362;
        prmt.b32 $2, s, m, 0x5140;
        prmt.b32 $3, s, m, 0x7362;
        and.b32 $0, $0, 0xFF0FFF0F;
        and.b32 $1, $1, 0xFF0FFF0F;
        and.b32 $2, $2, 0xFF0FFF0F;
        and.b32 $3, $3, 0xFF0FFF0F;
        }""",
        "=r,=r,=r,=r,r", [packed], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit(do_not_specialize=["M"])
def _swap4_kernel(x_ptr, w_ptr, scale_ptr, offset_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_sn, stride_ym,
                  K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CONV: tl.constexpr):
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    out_ok, row_ok = outs < N, rows < M
    pairs = tl.arange(0, GROUP // 2)
    w_ptrs = w_ptr + outs[:, None].to(tl.int64) * stride_wn + pairs[None, :]
    x_ptrs = x_ptr + rows[None, :] * stride_xm + 2 * pairs[:, None]
    s_ptrs = outs * stride_sn
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for g in range(0, K // GROUP):
        packed = tl.load(w_ptrs, mask=out_ok[:, None], other=0, eviction_policy="evict_first")
        x_even = tl.load(x_ptrs, mask=row_ok[None, :], other=0.0)
        x_odd = tl.load(x_ptrs + 1, mask=row_ok[None, :], other=0.0)
        xsum = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=0)
        if CONV == 0:
            lo = (packed & 0xF).to(tl.bfloat16)
            hi = (packed >> 4).to(tl.bfloat16)
            bias = 0.0
        else:
            lo, hi = _u4_to_bf16_biased(packed)
            bias = 128.0
        part = tl.dot(lo, x_even.to(tl.bfloat16))
        part = tl.dot(hi, x_odd.to(tl.bfloat16), part)
        scale = tl.load(scale_ptr + s_ptrs, mask=out_ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + s_ptrs, mask=out_ok, other=0.0).to(tl.float32)
        acc += part * scale[:, None] + (offset - bias * scale)[:, None] * xsum[None, :]
        w_ptrs += GROUP // 2
        x_ptrs += GROUP
        s_ptrs += 1
    tl.store(y_ptr + rows[None, :] * stride_ym + outs[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[None, :] & out_ok[:, None])


def swap4(x, packed, scale, offset, config, conv):
    n = packed.shape[0]
    k = x.shape[1]
    m = x.shape[0]
    bn, warps, stages = config
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    h = _swap4_kernel[(triton.cdiv(n, bn),)](x, packed, scale, offset, y, m, n, x.stride(0), packed.stride(0),
                                            scale.stride(0), y.stride(0), K=k, GROUP=128,
                                            BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=bn, CONV=conv,
                                            num_warps=warps, num_stages=stages)
    return y, h


def row(x, q, scale, config, asm):
    n, k = q.shape
    bn, bk, warps, stages = config
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    h = _row_kernel[(triton.cdiv(n, bn),)](x, q, y, scale, n, q.stride(0), K=k, BLOCK_N=bn, BLOCK_K=bk, ASM=asm,
                                          num_warps=warps, num_stages=stages)
    return y, h


def swap(x, q, scale, config, conv):
    n, k = q.shape
    m = x.shape[0]
    bn, bk, warps, stages = config
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    h = _swap_kernel[(triton.cdiv(n, bn),)](x, q, y, scale, m, n, x.stride(0), q.stride(0), y.stride(0), K=k,
                                           BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=bn, BLOCK_K=bk,
                                           CONV=conv, num_warps=warps, num_stages=stages)
    return y, h


def cold_us(fn, flush) -> float:
    return cold_time_us(fn, flush, 2 if PROFILE else 25)


def main():
    out_dir = os.environ.get("OUT", "/tmp/lab")
    os.makedirs("/tmp/asm", exist_ok=True)
    dev = torch.device("cuda")
    flush = torch.empty(64 * 1024 * 1024, device=dev)
    results = {"device": torch.cuda.get_device_name(dev)}
    profile = "--profile" in sys.argv
    row_configs = [(4, 2048, 8, 1), (8, 2048, 8, 1), (4, 4096, 8, 1), (8, 1024, 8, 1), (16, 1024, 8, 1),
                   (2, 4096, 8, 1), (8, 1024, 4, 1), (16, 512, 4, 1)]
    swap_configs = [(64, 128, 4, 3), (64, 256, 4, 3), (128, 128, 4, 3), (128, 256, 8, 3), (32, 256, 4, 4),
                    (64, 512, 4, 2), (128, 128, 8, 4), (32, 512, 4, 3)]
    swap4_configs = [(64, 4, 3), (128, 4, 3), (128, 8, 4), (32, 4, 4), (64, 4, 5), (256, 8, 3)]
    if profile:
        swap4_configs = swap4_configs[:2]
        row_configs, swap_configs = row_configs[:2], swap_configs[:2]
    shapes = SHAPES if not profile else {"qkv_proj": SHAPES["qkv_proj"]}
    for name, (n, k) in shapes.items():
        gen = torch.Generator(device=dev).manual_seed(n)
        dense = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
        q, scale = quantization.quantize_int8(dense)
        deq = quantization.dequantize_int8(q, scale)
        res = results[name] = {}
        gb8 = (n * k + 4 * n) / 1e9
        gb16 = n * k * 2 / 1e9
        for m in (1, 16, 64) if not profile else (1,):
            x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            ref = x.float() @ deq.T
            r = res[m] = {}

            def err(y):
                return ((y.float().reshape(m, n) - ref).norm() / ref.norm()).item()

            r["bf16 F.linear"] = cold_us(lambda: F.linear(x, dense), flush)
            if m == 1:
                r["bf16 gemv module"] = cold_us(lambda: gemv.gemv(x, dense), flush)
                r["int8 gemv module"] = cold_us(lambda: gemv.gemv(x, q, scale=scale), flush)
                for asm in (False, True):
                    for c in row_configs if name == "qkv_proj" else row_configs[:3]:
                        label = f"row asm={asm} {c}"
                        try:
                            y, h = row(x, q, scale, c, asm)
                            e = err(y)
                            r[label] = cold_us(lambda: row(x, q, scale, c, asm), flush)
                            r[label + " err"] = e
                            if c == row_configs[0] and name == "qkv_proj":
                                open(f"/tmp/asm/row_asm{int(asm)}.ptx", "w").write(h.asm["ptx"])
                                open(f"/tmp/asm/row_asm{int(asm)}.cubin", "wb").write(h.asm["cubin"])
                        except Exception as exc:
                            r[label] = f"failed {type(exc).__name__}: {str(exc)[:300]}"
            if m <= 64:
                try:
                    r["int8 skinny module"] = cold_us(lambda: gemv.skinny_matmul(x, q, scale=scale), flush)
                except Exception as exc:
                    r["int8 skinny module"] = f"failed {type(exc).__name__}"
            for conv in (0, 1, 2):
                for c in swap_configs if (name == "qkv_proj" or m in (1, 64)) else swap_configs[:4]:
                    label = f"swap conv={conv} {c}"
                    try:
                        y, h = swap(x, q, scale, c, conv)
                        e = err(y)
                        r[label] = cold_us(lambda: swap(x, q, scale, c, conv), flush)
                        r[label + " err"] = e
                        if c == swap_configs[0] and name == "qkv_proj" and m == 1:
                            open(f"/tmp/asm/swap_conv{conv}.ptx", "w").write(h.asm["ptx"])
                            open(f"/tmp/asm/swap_conv{conv}.cubin", "wb").write(h.asm["cubin"])
                    except Exception as exc:
                        r[label] = f"failed {type(exc).__name__}: {str(exc)[:300]}"

            if True:
                packed, s4, o4 = quantization.quantize_int4(dense)
                deq4 = quantization.dequantize_int4(packed, s4, o4)
                ref4 = x.float() @ deq4.T
                if m == 1:
                    from xverse_serve.kernels import quant_matmul as qm
                    r["int4 module gemv"] = cold_us(lambda: qm.int4_gemv(x, packed, s4, o4, 128), flush)
                for conv in (0, 1):
                    for c in swap4_configs:
                        label = f"int4 swap4 conv={conv} {c}"
                        try:
                            y, h = swap4(x, packed, s4, o4, c, conv)
                            e = ((y.float() - ref4).norm() / ref4.norm()).item()
                            r[label] = cold_us(lambda: swap4(x, packed, s4, o4, c, conv), flush)
                            r[label + " err"] = e
                            if c == swap4_configs[0] and name == "qkv_proj" and m == 1:
                                open(f"/tmp/asm/swap4_conv{conv}.cubin", "wb").write(h.asm["cubin"])
                        except Exception as exc:
                            r[label] = f"failed {type(exc).__name__}: {str(exc)[:300]}"
            timed = {kk: v for kk, v in r.items() if isinstance(v, float) and not kk.endswith("err")}
            i4 = sorted([kv for kv in timed.items() if kv[0].startswith("int4")], key=lambda kv: kv[1])[:3]
            i8 = sorted([kv for kv in timed.items() if not kv[0].startswith(("int4", "bf16"))],
                        key=lambda kv: kv[1])[:5]
            b16 = [kv for kv in timed.items() if kv[0].startswith("bf16")]
            best = b16 + i8 + i4 + [(kk, timed[kk]) for kk in ("int8 gemv module", "int8 skinny module",
                                                                "int4 module gemv") if kk in timed]
            print(f"{name} m={m}: bf16 linear {r['bf16 F.linear']:.1f} us ({gb16 / r['bf16 F.linear'] * 1e3:.2f} TB/s)",
                  flush=True)
            for kk, v in best:
                gb = gb16 if kk.startswith("bf16") else (gb16 / 4 * 1.0625 if kk.startswith("int4") else gb8)
                print(f"   {v:8.1f} us {gb / v * 1e3:5.2f} TB/s  {kk}  err={r.get(kk + ' err', '')}", flush=True)
            fails = [kk for kk, v in r.items() if isinstance(v, str)]
            if fails:
                print("   failed:", fails[:3], r[fails[0]][:200], flush=True)
    if not profile:
        with open(f"{out_dir}/lab.json", "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"took {time.time() - t0:.0f} s")
