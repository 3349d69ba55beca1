"""fp8 weights at decode batches (16-64 rows): split_gemm's scaled-rows kernel (the activations quantized to e4m3
per row first, one FP8 dot a step, split along K; by pointers or by TMA copies) in several tiles and two splits
(for its own programs per SM and for the other split kernels': on XVERSE-7B's shapes half and the whole), against
torch._scaled_mm (the same activations, cuBLASLt) and the start-up tuner's other candidates, on XVERSE-7B's
projections.

Each call timed as the tuner times it (tuner.time_call: L2 emptied first, in a CUDA graph), the activations'
quantization included; each result checked against the float32 product of the dequantized weight (the e4m3
activations give ~2.6% relative error, as scaled_mm's).

    XVERSE_CUTLASS=0 python bench/fp8_rows_lab.py --out bench/results/fp8_rows_lab_h100.json
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch
from common import PROJECTION_SHAPES, projection_bench_start, random_projection, time_candidates, write_results

from xverse_serve.kernels import split_gemm
from xverse_serve.kernels.fused_ops import quantize_rows_fp8
from xverse_serve.model.quantization import reference_matmul, relative_error, scaled_mm
from xverse_serve.model.tuner import time_call

# (block_n, block_k, num_warps, num_stages)
CONFIGS = ((64, 128, 4, 4), (64, 256, 4, 4), (128, 128, 4, 4), (128, 256, 8, 3), (32, 256, 4, 4))


def scaled_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: tuple, tma: bool):
    xq, x_scale = quantize_rows_fp8(x)
    return split_gemm.scaled_rows_matmul(xq, x_scale, weight, scale, x.dtype, config, tma)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[16, 32, 64])
    parser.add_argument("--shapes", nargs="*", default=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    results, flush, gen = projection_bench_start()
    for name in args.shapes:
        n, k = PROJECTION_SHAPES[name]
        _, layers = random_projection(name, ("fp8",), gen)
        layer = layers["fp8"]
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            reference = reference_matmul(x, layer)
            row: dict = {"quantize_rows_fp8": time_call(partial(quantize_rows_fp8, x), flush, 30)}
            row["scaled_mm"] = time_call(partial(scaled_mm, x, layer.weight, layer.weight_scale), flush, 30)
            row.update(time_candidates(layer, x, flush, True, skip=("scaled_mm",)))
            for config in CONFIGS:  # K split for the kernel's programs per SM and for the other split kernels'
                splits = {split_gemm.default_split(n, k, config[0], config[1], x.device, per_sm)
                          for per_sm in (split_gemm.SCALED_ROWS_PROGRAMS_PER_SM, split_gemm.TARGET_PROGRAMS_PER_SM)}
                for parts in sorted(splits):
                    for tma in (False, True):
                        label = f"scaled_rows{(*config, parts)}{' tma' if tma else ''}"
                        fn = partial(scaled_rows, x, layer.weight, layer.weight_scale, (*config, parts), tma)
                        try:
                            error = relative_error(fn(), reference)
                            row[label] = time_call(fn, flush, 30) if error < 5e-2 else f"wrong: {error:.3g}"
                        except Exception as exc:  # noqa: BLE001 - a shape this card cannot run
                            row[label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            results["shapes"].setdefault(f"{name} {n}x{k}", {})[str(m)] = row
            timed = sorted((value, key) for key, value in row.items() if isinstance(value, float))
            print(name, m, [(key, round(value * 1000, 1)) for value, key in timed[:6]],
                  {key: value for key, value in row.items() if not isinstance(value, float)}, flush=True)
            write_results(results, args.out)
    results["bench_s"] = time.perf_counter() - started
    write_results(results, args.out)


if __name__ == "__main__":
    main()
