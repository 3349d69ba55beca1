"""Which torch._scaled_mm call is fastest for fp8 weights with a scale per output channel, at decode and prefill
batch sizes, on XVERSE-7B's projection shapes: the row-wise call the tuner's "scaled_mm" makes (its scales inside
the kernel, with and without fast accumulation) against cuBLAS's tensor-wise call (scales of 1) whose float32 or
bf16 result is scaled per token and channel afterwards, and bf16 cuBLAS on the dense weight.

Each call timed as the tuner times it (tuner.time_call: L2 emptied first, CUDA graphs up to 64 rows), the
activations' quantization included; each result checked against the float32 product of the dequantized weight.

    python bench/fp8_gemm_lab.py --out bench/results/fp8_gemm_lab_h100.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import PROJECTION_SHAPES, projection_bench_start, write_results

from xverse_serve.kernels.fused_ops import quantize_rows_fp8
from xverse_serve.model import quantization, tuner
from xverse_serve.model.quantization import relative_error
from xverse_serve.model.tuner import time_call


def variants(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> dict:
    one = torch.ones((), dtype=torch.float32, device=x.device)
    w_t = weight.t()

    def rowwise(fast: bool):
        xq, x_scale = quantize_rows_fp8(x)
        return torch._scaled_mm(xq, w_t, scale_a=x_scale, scale_b=scale[None, :], out_dtype=x.dtype,
                                use_fast_accum=fast)

    def tensorwise(out_dtype: torch.dtype, fast: bool):
        xq, x_scale = quantize_rows_fp8(x)
        sums = torch._scaled_mm(xq, w_t, scale_a=one, scale_b=one, out_dtype=out_dtype, use_fast_accum=fast)
        return (sums.float() * x_scale * scale[None, :]).to(x.dtype)

    return {
        "rowwise": lambda: rowwise(False),
        "rowwise fast_accum": lambda: rowwise(True),
        "tensorwise f32 out": lambda: tensorwise(torch.float32, False),
        "tensorwise f32 out fast_accum": lambda: tensorwise(torch.float32, True),
        "tensorwise bf16 out fast_accum": lambda: tensorwise(torch.bfloat16, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--shapes", nargs="*", default=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    results, flush, gen = projection_bench_start()
    device = flush.device
    for name in args.shapes:
        n, k = PROJECTION_SHAPES[name]
        dense = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        weight, scale = quantization.quantize_fp8(dense)
        reference_weight = quantization.dequantize_fp8(weight, scale, torch.float32)
        for m in args.rows:
            x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
            reference = x.float() @ reference_weight.t()
            graph = m <= tuner.GRAPH_TIMING_MAX_ROWS
            row: dict = {"bf16 cuBLAS": time_call(lambda: F.linear(x, dense), flush, 30, graph)}
            for label, fn in variants(x, weight, scale).items():
                try:
                    error = relative_error(fn(), reference)
                    row[label] = time_call(fn, flush, 30, graph) if error < 5e-2 else f"wrong: {error:.3g}"
                    row[label + " error"] = error
                except Exception as exc:  # noqa: BLE001 - a call this torch or card does not take
                    row[label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            results["shapes"].setdefault(f"{name} {n}x{k}", {})[str(m)] = row
            print(name, m, {key: (round(value * 1000, 1) if isinstance(value, float) and "error" not in key
                                  else value) for key, value in row.items() if "error" not in key}, flush=True)
        write_results(results, args.out)
    results["bench_s"] = time.perf_counter() - started
    write_results(results, args.out)


if __name__ == "__main__":
    main()
