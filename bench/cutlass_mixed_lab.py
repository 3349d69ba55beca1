"""Lab: CUTLASS's Hopper mixed-input GEMM for our int8, int4 and fp8 weights (xverse_serve/kernels/cutlass_mixed.py,
a tuning candidate on Hopper), against bf16 cuBLAS and the start-up tuner's other candidates, at decode and prefill
sizes, with the weight as stored and shuffled.

    python bench/cutlass_mixed_lab.py [--rows 64 512 2048] [--shapes ...] [--skip-tuner] [--out FILE]

Why: int8's and int4's first token of 512 (1.3-1.4x bf16's on an H100) is set by their prefill GEMMs, 1.4-1.8x
cuBLAS's bf16 time, and Triton 3.6 does not warp-specialise a kernel that dequantizes in registers
(docs/quantization.md). CUTLASS's mixed-input mainloop does: a producer warp copies the tiles by TMA while two
consumer warpgroups convert (and scale) the weights in registers and run the MMAs.

It needs nvcc (with ninja) and the `nvidia-cutlass` wheel; cutlass_mixed.build compiles all 30 GEMMs (3 formats x
2 layouts x 5 tiles: a few minutes on 16 cores) into --build-dir. Each format runs with its weight as we store it
(what the server would serve: the other kernels read that layout) and shuffled at load into the order CUTLASS's
fast converters take (mixed_gemm.cuh, WeightLayout), to see what the shuffle is worth. int4's scales and zeros go
to bf16 [groups, N] once (cutlass_mixed.operands); int8's and fp8's channel scales are applied in the epilogue in
float32. fp8 here keeps the activations in bf16, as mixed_gemm does (`scaled_mm` rounds them to e4m3): its 64-row
GEMMs take 126 µs a layer on an H100 against 68 µs of bytes, which bounds fp8's 64-request ratio.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from common import PROJECTION_SHAPES, projection_bench_start, random_projection, time_candidates, write_results

from xverse_serve.kernels import cutlass_mixed
from xverse_serve.model.quantization import reference_matmul, relative_error, tolerance
from xverse_serve.model.tuner import time_call

SCHEMES = cutlass_mixed.SCHEMES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--shapes", nargs="+", default=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                        choices=sorted(PROJECTION_SHAPES))
    parser.add_argument("--skip-tuner", action="store_true", help="leave out the tuner's candidates")
    parser.add_argument("--build-dir", type=Path, default=Path("/tmp/xverse_cutlass_build"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results, flush, gen = projection_bench_start()
    results["unit"] = "ms a call (tuner.time_call: L2 emptied before each); best: (kernel, µs, ratio to bf16 cuBLAS)"
    gemms = list(itertools.product(SCHEMES, cutlass_mixed.LAYOUTS, cutlass_mixed.CONFIGS))
    started = time.perf_counter()
    module = cutlass_mixed.build("xverse_cutlass_lab", gemms, args.build_dir)
    results["build_s"] = time.perf_counter() - started
    print(f"built in {results['build_s']:.0f} s", flush=True)
    for name in args.shapes:
        k = PROJECTION_SHAPES[name][1]
        dense, layers = random_projection(name, SCHEMES, gen)
        stored = {}
        for scheme, layer in layers.items():
            plain = cutlass_mixed.operands(scheme, layer.weight, layer.weight_scale, layer.weight_offset)
            stored[scheme, False] = plain
            stored[scheme, True] = (module.reorder(scheme, layer.weight, k), *plain[1:])
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            row: dict = {"bf16 cuBLAS": time_call(lambda: torch.nn.functional.linear(x, dense), flush, 30, False)}
            for scheme, layer in layers.items():
                reference = reference_matmul(x, layer)
                for shuffled, config in itertools.product(cutlass_mixed.LAYOUTS, cutlass_mixed.CONFIGS):
                    key = f"{scheme} cutlass {cutlass_mixed.LAYOUTS[shuffled]} {cutlass_mixed.CONFIGS[config]}"
                    try:
                        def run(layer=layer, ops=stored[scheme, shuffled], shuffled=shuffled, config=config):
                            return cutlass_mixed.matmul(module, scheme, ops, layer.group_size, x, config, shuffled)
                        error = relative_error(run(), reference)
                        ok = error < tolerance(torch.bfloat16)
                        row[key] = time_call(run, flush, 30, False) if ok else f"wrong: {error:.3g}"
                        row[key + " error"] = error
                    except RuntimeError as exc:  # this tile cannot take the shape
                        row[key] = f"failed: {str(exc).splitlines()[0][:160]}"
                if not args.skip_tuner:
                    timed = time_candidates(layer, x, flush, False, skip=("cutlass",))
                    if timed:
                        best = min(timed, key=timed.get)
                        row[f"{scheme} tuned {best}"] = timed[best]
            summary = {}
            for scheme in SCHEMES:
                for kind in ("cutlass plain", "cutlass shuffled", "tuned"):
                    timed = {key: v for key, v in row.items()
                             if key.startswith(f"{scheme} {kind}") and isinstance(v, float) and "error" not in key}
                    if timed:
                        key = min(timed, key=timed.get)
                        summary[f"{scheme} {kind}"] = (key, round(timed[key] * 1000, 1),
                                                       round(timed[key] / row["bf16 cuBLAS"], 3))
            row["best"] = summary
            results["shapes"].setdefault(name, {})[str(m)] = row
            print(name, m, f"cuBLAS {row['bf16 cuBLAS'] * 1000:.1f} us", summary, flush=True)
            write_results(results, args.out)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
