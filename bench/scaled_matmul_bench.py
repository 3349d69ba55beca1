"""Quantized weights at decode batch sizes (1-64 rows) on XVERSE-7B's projection shapes: the split-K GEMM
(kernels.split_gemm, each tuner configuration, its own split and forced splits) against, for int8 and fp8, the
one-row GEMV and the skinny GEMM (kernels.gemv) and FP8 tensor cores (torch._scaled_mm), for int4 the GEMV of
kernels.quant_matmul, and bf16 cuBLAS on the same weights.

Each call meets a cold L2, emptied by reading 256 MB (a memset would leave 50 MB of dirty lines whose write-back
steals bandwidth from the kernel timed, which a decode step does not see). Every result is checked against the
float32 product of the dequantized weight, and two calls must give the same bits.

    python bench/scaled_matmul_bench.py --out bench/results/scaled_matmul_h200.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import PROJECTION_SHAPES, cold_time_us, write_results

from xverse_serve.kernels import gemv, quant_matmul, split_gemm
from xverse_serve.model import quantization as qz

ROWS = (1, 4, 16, 32, 64)
FORCED_SPLITS = (1, 2, 4, 8)
FORMATS = {"int8": (qz.quantize_int8, qz.dequantize_int8), "fp8": (qz.quantize_fp8, qz.dequantize_fp8)}


def cold_us(fn, flush: torch.Tensor) -> float:
    """Median µs of fn(), L2 emptied by a read before each call."""
    return cold_time_us(fn, flush, 25, by_reading=True)


def measure(name: str, fn, reference: torch.Tensor, flush: torch.Tensor, results: dict) -> bool:
    """Times fn into results[name] if its result is within 1% of the reference and repeatable; says why not."""
    try:
        out = fn()
        error = ((out.float() - reference).norm() / reference.norm()).item()
        if error > 1e-2 or not torch.equal(out, fn()):
            results[name] = f"wrong: relative error {error:.2e}, repeatable {torch.equal(out, fn())}"
            return False
        results[name] = cold_us(fn, flush)
    except Exception as exc:  # a block shape this card cannot run
        results[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shapes", nargs="*", default=[name for name in PROJECTION_SHAPES if name != "lm_head"],
                        choices=list(PROJECTION_SHAPES))
    args = parser.parse_args()
    device = torch.device("cuda")
    flush = torch.empty(64 * 1024 * 1024, device=device)
    results: dict = {"device": torch.cuda.get_device_name(device), "shapes": {}}
    all_ok = True
    for name in args.shapes:
        n, k = PROJECTION_SHAPES[name]
        gen = torch.Generator(device=device).manual_seed(n)
        dense = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        formats = {fmt: quantize(dense) for fmt, (quantize, _) in FORMATS.items()}
        int4 = qz.quantize_int4(dense)
        for m in ROWS:
            x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
            row = results["shapes"].setdefault(name, {}).setdefault(str(m), {})
            row["bf16 cuBLAS"] = cold_us(lambda: F.linear(x, dense), flush)
            if m == 1:
                row["bf16 gemv"] = cold_us(lambda: gemv.gemv(x, dense), flush)
            for fmt, (q, scale) in formats.items():
                reference = x.float() @ FORMATS[fmt][1](q, scale).T
                if m == 1:
                    all_ok &= measure(f"{fmt} rowgemv", lambda: gemv.gemv(x, q, scale=scale), reference, flush, row)
                else:
                    all_ok &= measure(f"{fmt} skinny", lambda: gemv.skinny_matmul(x, q, scale=scale), reference,
                                      flush, row)
                if fmt == "fp8" and m >= 16:
                    row["fp8 scaled_mm"] = cold_us(lambda: qz.scaled_mm(x, q, scale), flush)
                for config in split_gemm.SWEEP_CONFIGS:
                    for split in (None, *FORCED_SPLITS):
                        full = config if split is None else (*config, split)
                        label = f"{fmt} split {full}" if split else f"{fmt} split {config} own split"
                        all_ok &= measure(label, lambda full=full: split_gemm.split_matmul(x, q, scale, full),
                                          reference, flush, row)
            packed, scale4, offset4 = int4
            reference = x.float() @ qz.dequantize_int4(packed, scale4, offset4).T
            if m <= 16:
                all_ok &= measure("int4 gemv", lambda: quant_matmul.int4_gemv(x, packed, scale4, offset4,
                                                                              qz.INT4_GROUP), reference, flush, row)
            for config in split_gemm.INT4_TUNED_CONFIGS:
                for split in (None, *FORCED_SPLITS):
                    full = config if split is None else (*config, split)
                    label = f"int4 split {full}" if split else f"int4 split {config} own split"
                    all_ok &= measure(label, lambda full=full: split_gemm.split_matmul_int4(
                        x, packed, scale4, offset4, qz.INT4_GROUP, full), reference, flush, row)
            timed = {label: t for label, t in row.items() if isinstance(t, float)}
            summary = [f"{name} {n}x{k}, {m} rows: bf16 cuBLAS {row['bf16 cuBLAS']:.1f} µs"]
            for fmt, weight_bytes in (("int8", n * k), ("fp8", n * k), ("int4", n * k // 2 * 17 / 16)):
                own = {label: t for label, t in timed.items() if label.startswith(f"{fmt} split") and "own" in label}
                others = {label: t for label, t in timed.items() if label.startswith(fmt) and "split" not in label}
                best = min(((t, label) for label, t in timed.items() if label.startswith(f"{fmt} split")),
                           default=None)
                if best is None or not own:
                    summary.append(f"{fmt}: no split kernel ran")
                    continue
                summary.append(f"{fmt}: " + ", ".join(f"{label.split()[1]} {t:.1f}" for label, t in others.items())
                               + f", split (own) {min(own.values()):.1f}, best split {best[0]:.1f} "
                               f"({weight_bytes / best[0] / 1e3:.2f} TB/s) {best[1].split(' ', 2)[2]}")
            print(" | ".join(summary), flush=True)
            write_results(results, args.out)
    results["all_ok"] = all_ok
    print(f"all checks {'passed' if all_ok else 'FAILED'}")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
