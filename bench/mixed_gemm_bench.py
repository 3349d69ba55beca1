"""kernels.mixed_gemm (the weights dequantized in registers as the first operand of bf16 tensor-core dots) against
bf16 cuBLAS on the dense weight and against the fastest of the start-up tuner's other candidates, for int8, fp8 and
int4 on XVERSE-7B's projection shapes, from decode batches (16 rows) to prefill (2,048).

    python bench/mixed_gemm_bench.py --out bench/results/mixed_gemm_h100.json

Each call timed as the tuner times it (tuner.time_call: L2 emptied first, CUDA graphs up to 64 rows);
every configuration of the sweep with split-K 1, 2, 4, 8 at up to 128 rows. Per shape and M: the bf16 time, the
best other candidate and its time, the best mixed configuration and its time, and every mixed timing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import PROJECTION_SHAPES, projection_bench_start, time_candidates, write_results

from xverse_serve.kernels import mixed_gemm
from xverse_serve.model import tuner
from xverse_serve.model.quantization import QuantizedLinear, reference_matmul, relative_error
from xverse_serve.model.tuner import time_call

# 64-token tiles with 4 warps as well as 8: one warpgroup's wgmma is 64 weight rows tall, so 8 warps on a 64-wide
# weight tile cannot both use it.
SMALL = [(bm, bn, 128, warps, 4) for bm in (16, 32, 64) for bn in (64, 128) for warps in ((4, 8) if bm == 64 else (4,))]
LARGE = [(128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
         (64, 128, 64, 4, 5)]


def sweep(m: int) -> list[tuple[tuple[int, ...], int]]:
    configs = [c for c in SMALL if c[0] >= min(m, 64) and c[0] < 2 * max(m, 16)] if m <= 64 else LARGE
    splits = (1, 2, 4, 8) if m <= 128 else (1, 2)
    return [(config, split) for config in configs for split in splits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[16, 32, 64, 128, 512, 2048])
    parser.add_argument("--shapes", nargs="*", default=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    parser.add_argument("--schemes", nargs="*", default=["int8", "int4", "fp8"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    results, flush, gen = projection_bench_start()
    device = flush.device
    for scheme in args.schemes:
        for name in args.shapes:
            n, k = PROJECTION_SHAPES[name]
            dense = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
            layer = QuantizedLinear(k, n, scheme).to(device)
            layer.load_rows(0, dense)
            group = layer.group_size if scheme == "int4" else 0
            offset = layer.weight_offset if scheme == "int4" else None
            for m in args.rows:
                x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
                reference = reference_matmul(x, layer)
                graph = m <= tuner.GRAPH_TIMING_MAX_ROWS
                row: dict = {"bf16 cuBLAS": time_call(lambda: torch.nn.functional.linear(x, dense), flush, 30, graph)}
                others = time_candidates(layer, x, flush, graph, skip=("mixed",))
                mixed: dict[str, float | str] = {}
                for config, split in sweep(m):
                    if k % config[2] or (group and group % config[2]):
                        continue
                    label = f"{config} split {split}"
                    try:
                        def run(config=config, split=split):
                            return mixed_gemm.matmul(x, layer.weight, layer.weight_scale, offset, group, config,
                                                     split)
                        error = relative_error(run(), reference)
                        mixed[label] = time_call(run, flush, 30, graph) if error < 1e-2 else f"wrong: {error:.3g}"
                    except Exception as exc:  # noqa: BLE001 - out of resources for this configuration
                        mixed[label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                if others:
                    best = min(others, key=others.get)
                    row.update({"best_other": best, "best_other_ms": others[best]})
                timed = {label: ms for label, ms in mixed.items() if isinstance(ms, float)}
                if timed:
                    best = min(timed, key=timed.get)
                    row.update({"best_mixed": best, "best_mixed_ms": timed[best],
                                "mixed_vs_bf16": timed[best] / row["bf16 cuBLAS"]})
                row["mixed"] = mixed
                row["others"] = others
                results["shapes"].setdefault(f"{scheme} {name} {n}x{k}", {})[str(m)] = row
                print(scheme, name, m, {key: value for key, value in row.items() if key not in ("mixed", "others")},
                      flush=True)
            write_results(results, args.out)
    results["bench_s"] = time.perf_counter() - started
    write_results(results, args.out)


if __name__ == "__main__":
    main()
