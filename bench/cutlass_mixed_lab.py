"""Lab: CUTLASS's Hopper mixed-input GEMM for our int8, int4 and fp8 weights (bench/cutlass_mixed/), against bf16
cuBLAS and the start-up tuner's best candidate, at decode and prefill sizes. Lab code: nothing here is served.

    python bench/cutlass_mixed_lab.py [--rows 64 512 2048] [--shapes ...] [--skip-tuner] [--out FILE]

Why: int8's and int4's first token of 512 (1.3-1.4x bf16's on an H100) is set by their prefill GEMMs, 1.4-1.8x
cuBLAS's bf16 time, and Triton 3.6 does not warp-specialise a kernel that dequantizes in registers
(docs/quantization.md). CUTLASS's mixed-input mainloop does: a producer warp copies the tiles by TMA while two
consumer warpgroups convert (and scale) the weights in registers and run the MMAs.

It needs a CUDA compiler (nvcc, with ninja) and CUTLASS's headers, which the `nvidia-cutlass` wheel carries
(`cutlass_library/source/include`); torch's cpp_extension builds the extension for sm_90a on first use (30
translation units: a few minutes on 16 cores) into --build-dir. Each format runs with its weight as we store it
and shuffled at load into the order CUTLASS's fast converters take (mixed_gemm.cuh, WeightLayout). int4's scales
and zeros are applied as the mainloop converts the weight, in bf16 laid out [groups, N] (CUTLASS reads them along
N), so the lab converts and transposes ours once, outside the timing; int8's and fp8's weights convert exactly to
bf16 and their channel scales are applied in the epilogue in float32, as our kernels do. fp8 here keeps the
activations in bf16, as mixed_gemm does (`scaled_mm` rounds them to e4m3): its 64-row GEMMs take 126 µs a layer on
an H100 against 68 µs of bytes, which bounds fp8's 64-request ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import time
from pathlib import Path

import torch
from common import PROJECTION_SHAPES, projection_bench_start, random_projection, time_candidates, write_results

from xverse_serve.model.quantization import QuantizedLinear, reference_matmul, relative_error
from xverse_serve.model.tuner import time_call

SOURCES = Path(__file__).resolve().parent / "cutlass_mixed"
SCHEMES = ("int8", "int4", "fp8")
# config id -> (weight rows, tokens, K) of the tile and its schedule, as cutlass_mixed/mixed_gemm.cuh lists them
CONFIGS = {0: "128x128x64 cooperative", 1: "128x256x64 cooperative", 2: "64x128x64 pingpong",
           3: "128x64x64 cooperative", 4: "128x64x64 cooperative stream-K"}
# The weight as we store it ([N, K] row-major), or shuffled once at load (mixed_gemm.cuh, WeightLayout)
LAYOUTS = {False: "plain", True: "shuffled"}


def cutlass_include() -> list[str]:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("CUTLASS's headers come with the nvidia-cutlass wheel: pip install nvidia-cutlass")
    source = Path(next(iter(spec.submodule_search_locations))) / "source"
    return [str(source / "include"), str(source / "tools" / "util" / "include"), *curand_include()]


def curand_include() -> list[str]:
    """Where curand_kernel.h is, if a pip package of CUDA's (nvidia-curand) holds it: CUTLASS's utilities include
    it (the weight shuffle comes from cutlass/util/mixed_dtype_utils.hpp), and a CUDA toolkit from pip keeps it
    beside, not in, nvcc's own include folder. None found: nvcc's own folder must have it."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for header in sorted(Path(root).glob("*/include/curand_kernel.h")):
            return [str(header.parent)]
    return []


# Each (format, layout, config) instantiated in a translation unit of its own, so that ninja compiles them side by
# side (a CUTLASS Hopper GEMM takes one to two minutes of one core).
UNIT = {
    "int8": "template void xverse_lab::int8_config<{s}, {c}>(at::Tensor const&, at::Tensor const&, at::Tensor const&, "
            "at::Tensor&);\n",
    "fp8": "template void xverse_lab::fp8_config<{s}, {c}>(at::Tensor const&, at::Tensor const&, at::Tensor const&, "
           "at::Tensor&);\n",
    "int4": "template void xverse_lab::int4_config<{s}, {c}>(at::Tensor const&, at::Tensor const&, at::Tensor const&, "
            "at::Tensor const&, int64_t, at::Tensor&);\n",
}


# torch's extensions build with CUDA's half and bfloat16 operators and conversions turned off; CUTLASS uses them.
CUDA_TYPES = [f"-U__CUDA_NO_{name}__" for name in ("HALF_OPERATORS", "HALF_CONVERSIONS", "HALF2_OPERATORS",
                                                   "BFLOAT16_OPERATORS", "BFLOAT16_CONVERSIONS", "BFLOAT162_OPERATORS")]


def build(build_dir: Path):
    from torch.utils.cpp_extension import load

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")  # wgmma and setmaxnreg need the sm_90a target
    os.environ.setdefault("MAX_JOBS", str(len(os.sched_getaffinity(0))))
    units = build_dir / "units"
    units.mkdir(parents=True, exist_ok=True)
    sources = [str(SOURCES / "binding.cpp"), str(SOURCES / "reorder.cu")]
    for scheme, line in UNIT.items():
        for shuffled, layout in LAYOUTS.items():
            for config in CONFIGS:
                unit = units / f"{scheme}_{layout}_{config}.cu"
                text = (f'#include "{SOURCES / "mixed_gemm.cuh"}"\n\n'
                        + line.format(s=str(shuffled).lower(), c=config))
                if not unit.exists() or unit.read_text() != text:  # unchanged units keep ninja's objects
                    unit.write_text(text)
                sources.append(str(unit))
    started = time.perf_counter()
    module = load(name="xverse_cutlass_mixed", build_directory=str(build_dir), verbose=False, sources=sources,
                  extra_include_paths=[str(SOURCES), *cutlass_include()],
                  extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-DNDEBUG", *CUDA_TYPES])
    return module, time.perf_counter() - started


def operands(module, layer: QuantizedLinear, shuffled: bool) -> tuple[torch.Tensor, ...]:
    """The layer's weight as stored or shuffled, with int8's and fp8's channel scales in float32 [N] (applied in the
    epilogue) or int4's scales and zeros in bf16 as [groups, N] (applied in the mainloop)."""
    weight = module.reorder(layer.scheme, layer.weight, layer.in_features) if shuffled else layer.weight
    if layer.scheme in ("int8", "fp8"):
        return weight, layer.weight_scale.reshape(-1).float().contiguous()
    return (weight, layer.weight_scale.t().to(torch.bfloat16).contiguous(),
            layer.weight_offset.t().to(torch.bfloat16).contiguous())


def cutlass_matmul(module, layer: QuantizedLinear, ops: tuple[torch.Tensor, ...], x: torch.Tensor, shuffled: bool,
                   config: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], layer.out_features, dtype=torch.bfloat16, device=x.device)
    if layer.scheme in ("int8", "fp8"):
        getattr(module, f"{layer.scheme}_gemm")(shuffled, config, x, ops[0], ops[1], y)
    else:
        module.int4_gemm(shuffled, config, x, ops[0], ops[1], ops[2], layer.group_size, y)
    return y


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
    module, results["build_s"] = build(args.build_dir)
    print(f"built in {results['build_s']:.0f} s", flush=True)
    for name in args.shapes:
        k = PROJECTION_SHAPES[name][1]
        dense, layers = random_projection(name, SCHEMES, gen)
        stored = {(scheme, shuffled): operands(module, layer, shuffled)
                  for scheme, layer in layers.items() for shuffled in LAYOUTS}
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            row: dict = {"bf16 cuBLAS": time_call(lambda: torch.nn.functional.linear(x, dense), flush, 30, False)}
            for scheme, layer in layers.items():
                reference = reference_matmul(x, layer)
                for (shuffled, layout), (config, label) in itertools.product(LAYOUTS.items(), CONFIGS.items()):
                    key = f"{scheme} cutlass {layout} {label}"
                    try:
                        def run(layer=layer, ops=stored[scheme, shuffled], shuffled=shuffled, config=config):
                            return cutlass_matmul(module, layer, ops, x, shuffled, config)
                        error = relative_error(run(), reference)
                        row[key] = time_call(run, flush, 30, False) if error < 1e-2 else f"wrong: {error:.3g}"
                        row[key + " error"] = error
                    except RuntimeError as exc:  # this tile cannot take the shape
                        row[key] = f"failed: {str(exc).splitlines()[0][:160]}"
                if not args.skip_tuner:
                    timed = time_candidates(layer, x, flush, False)
                    if timed:
                        best = min(timed, key=timed.get)
                        row[f"{scheme} tuned {best}"] = timed[best]
            summary = {}
            for scheme in SCHEMES:
                for kind in ("cutlass", "tuned"):
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
