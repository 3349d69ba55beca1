"""Lab: imma_gemm's int8 GEMM (two-part activations, kernels/imma_gemm.py) with both operands copied by TMA, with and
without Triton's warp specialisation on Hopper (`tl.range(..., warp_specialize=True)`). Lab code: nothing here is
served. Each configuration runs in a process of its own under a time limit, as a kernel that deadlocks never
returns: "hung" is a result.

    python bench/imma_ws_lab.py [--rows 64 512 2048] [--shapes qkv_proj] [--out FILE]

Why: int8's first token of 512 (1.3x bf16's on an H100) is set by its prefill GEMMs, which take 1.4-1.5x cuBLAS's
bf16 time (docs/quantization.md). This is the one kernel here whose loop Triton can warp-specialise on Hopper (a
producer warpgroup for the copies, two consumer warpgroups for the dots, setmaxnreg): its tiles enter the dots
as they are copied, where int4's and mixed_gemm's are computed in registers first. The lab reports, per
configuration, whether Triton split it into partitions (warps, setmaxnreg in its PTX), its product's error against
the dequantized weight's, and its time; beside them cuBLAS's bf16 GEMM and the served imma_rows kernel.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from common import PROJECTION_SHAPES, projection_bench_start, random_projection, write_results
from triton.tools.tensor_descriptor import TensorDescriptor

from xverse_serve.kernels import imma_gemm
from xverse_serve.model.quantization import QuantizedLinear, reference_matmul, relative_error
from xverse_serve.model.tuner import time_call

# (block_m, block_n, block_k, num_warps, num_stages, warp_specialize): with warp_specialize, num_warps is one
# consumer warpgroup's and Triton adds the others (12 warps in all); (128, 256, 64) spills without it.
CONFIGS = [(128, 128, 128, 8, 3, 0), (128, 128, 64, 8, 4, 0), (64, 128, 128, 4, 4, 0), (128, 128, 128, 4, 3, 1),
           (64, 128, 128, 4, 4, 1), (128, 128, 64, 4, 4, 1), (64, 256, 128, 4, 3, 1)]


@triton.jit(do_not_specialize=["M"])
def _rows_tma_kernel(parts_desc, w_desc, s_ptr, ws_ptr, y_ptr, M, N, stride_ym, K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     STAGES: tl.constexpr, WS: tl.constexpr):
    # imma_gemm._rows_kernel's product. parts_desc: the high parts' rows, then the low parts' ([2M, K]); a high
    # tile past M reads low rows, whose products the store leaves out, and a low tile past 2M reads zeros.
    pid_m, pid_n = imma_gemm._tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_lo = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        w = w_desc.load([pid_n * BLOCK_N, k0])
        acc_hi = tl.dot(parts_desc.load([pid_m * BLOCK_M, k0]), w.T, acc_hi, out_dtype=tl.int32)
        acc_lo = tl.dot(parts_desc.load([M + pid_m * BLOCK_M, k0]), w.T, acc_lo, out_dtype=tl.int32)
    rows, outs, rows_in, outs_in = imma_gemm._tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    imma_gemm._store_rows(acc_hi, acc_lo, s_ptr, ws_ptr, y_ptr, rows, outs, rows_in, outs_in, M, N, stride_ym)


def tma_matmul(x: torch.Tensor, layer: QuantizedLinear, config: tuple[int, ...]) -> tuple[torch.Tensor, object]:
    block_m, block_n, block_k, num_warps, num_stages, ws = config
    parts, s, _ = imma_gemm._split_parts(x)
    m, k = x.shape
    n = layer.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    compiled = _rows_tma_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
        TensorDescriptor.from_tensor(parts, [block_m, block_k]),
        TensorDescriptor.from_tensor(layer.weight, [block_n, block_k]), s, layer.weight_scale, y, m, n, y.stride(0),
        K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, STAGES=num_stages, WS=bool(ws),
        num_warps=num_warps, num_stages=num_stages)
    return y, compiled


def setup(shape: str, m: int) -> tuple[QuantizedLinear, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, flush, gen = projection_bench_start()
    layer = random_projection(shape, ("int8",), gen)[1]["int8"]
    x = torch.randn(m, layer.in_features, device="cuda", generator=gen).to(torch.bfloat16)
    return layer, x, reference_matmul(x, layer), flush


def one_config(shape: str, m: int, config: tuple[int, ...]) -> dict:
    """Run in a process of its own (--one): the configuration's partitions, error and µs."""
    layer, x, reference, flush = setup(shape, m)
    y, compiled = tma_matmul(x, layer, config)
    torch.cuda.synchronize()
    ptx = compiled.asm["ptx"]
    return {"warps": compiled.metadata.num_warps, "setmaxnreg": ptx.count("setmaxnreg"),
            "relative_error": relative_error(y, reference),
            "us": 1000 * time_call(lambda: tma_matmul(x, layer, config), flush, 30, False)}


def baselines(shape: str, m: int) -> dict:
    """cuBLAS's bf16 GEMM and the served imma_rows kernel in each of its configurations, µs and error."""
    layer, x, reference, flush = setup(shape, m)
    dense = layer.dequantized(torch.bfloat16)
    out = {"bf16 cuBLAS us": 1000 * time_call(lambda: torch.nn.functional.linear(x, dense), flush, 30, False)}
    for config in imma_gemm.ROWS_CONFIGS:
        def run(config=config):
            return imma_gemm.rows_matmul(x, layer.weight, layer.weight_scale, config)
        out[f"imma_rows {config}"] = {"relative_error": relative_error(run(), reference),
                                      "us": 1000 * time_call(run, flush, 30, False)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--shapes", nargs="+", default=["qkv_proj"], choices=sorted(PROJECTION_SHAPES))
    parser.add_argument("--hang-s", type=float, default=40.0,
                        help="a configuration's process is stopped after this long (compile, check and time: ~10 s)")
    parser.add_argument("--one", nargs=3, metavar=("SHAPE", "ROWS", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.one:
        shape, m, config = args.one
        print(json.dumps(one_config(shape, int(m), tuple(json.loads(config)))))
        return
    results, _, _ = projection_bench_start()
    for shape in args.shapes:
        for m in args.rows:
            row = baselines(shape, m)
            for config in CONFIGS:
                try:
                    done = subprocess.run([sys.executable, __file__, "--one", shape, str(m), json.dumps(config)],
                                          capture_output=True, text=True, timeout=args.hang_s)
                    lines, errors = done.stdout.strip().splitlines(), done.stderr.strip().splitlines()
                    row[f"tma {config}"] = json.loads(lines[-1]) if done.returncode == 0 and lines else (
                        f"failed: {errors[-1][:200] if errors else done.returncode}")
                except subprocess.TimeoutExpired:
                    row[f"tma {config}"] = f"hung: no result in {args.hang_s:g} s"
                print(shape, m, config, row[f"tma {config}"], flush=True)
                results["shapes"].setdefault(shape, {})[str(m)] = row
                write_results(results, args.out)
            print(shape, m, {key: value for key, value in row.items() if not key.startswith("tma")}, flush=True)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
