"""Experiments for the quantized formats' prefill GEMMs (issue 16: int8 and int4 first tokens 1.3-1.5x bf16's):
what Triton reaches on Hopper with TMA loads (host tensor descriptors), and whether dequantize + cuBLAS gains by
dequantizing the next projection on a second stream. Lab code: nothing here is served.

    python bench/prefill_gemm_lab.py --out bench/results/prefill_gemm_lab_h100.json

Kernels (`_tma_kernel`), each with TMA loads of a weight tile and a token tile per step of K:
- WX: y^T = W x^T, the weight tile dequantized in registers as the dot's first operand (mixed_gemm's shape);
- XW: y = x W^T, the weight tile dequantized and fed as the second operand (through shared memory);
for bf16 weights (Triton's own ceiling against cuBLAS), int8 and int4 (quant_matmul's layouts).
Overlap: a chain of the decoder's four projections over four layers, dequantize + F.linear one after the other,
against the same with each next weight dequantized on a side stream into the other of two buffers, against bf16.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from common import PROJECTION_SHAPES, graph_us, random_projection, time_candidates, write_results
from triton.tools.tensor_descriptor import TensorDescriptor

from xverse_serve.kernels import quant_matmul
from xverse_serve.kernels.mixed_gemm import _int4_floats
from xverse_serve.model import tuner
from xverse_serve.model.quantization import QuantizedLinear, reference_matmul, relative_error
from xverse_serve.model.tuner import time_call


@triton.jit
def _tma_kernel(x_desc, w_desc, scale_ptr, offset_ptr, y_ptr, M, N, K, stride_sn, stride_ym,
                BITS: tl.constexpr, GROUP: tl.constexpr, WX: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    # Token tiles fastest: the programs that share a weight tile run together, so the weights are read once.
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % tiles_m
    pid_n = tl.program_id(0) // tiles_m
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    outs_in = tl.minimum(outs, N - 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if WX:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = x_desc.load([pid_m * BLOCK_M, k0])
        if BITS == 4:
            w = _int4_floats(w_desc.load([pid_n * BLOCK_N, k0 // 2]), scale_ptr + outs_in * stride_sn,
                             offset_ptr + outs_in * stride_sn, k0 // GROUP, BLOCK_N, BLOCK_K).to(x.dtype)
        else:
            w = w_desc.load([pid_n * BLOCK_N, k0]).to(x.dtype)
        if WX:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if BITS == 8:
        if WX:
            acc = acc * tl.load(scale_ptr + outs_in)[:, None]
        else:
            acc = acc * tl.load(scale_ptr + outs_in)[None, :]
    if WX:
        tl.store(y_ptr + rows[None, :] * stride_ym + outs[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows < M)[None, :] & (outs < N)[:, None])
    else:
        tl.store(y_ptr + rows[:, None] * stride_ym + outs[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows < M)[:, None] & (outs < N)[None, :])


def tma_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None,
               bits: int, group: int, config: tuple[int, int, int, int, int], wx: bool) -> torch.Tensor:
    block_m, block_n, block_k, num_warps, stages = config
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k // 2 if bits == 4 else block_k])
    scale_arg = scale if scale is not None else y
    offset_arg = offset if offset is not None else scale_arg
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _tma_kernel[grid](x_desc, w_desc, scale_arg, offset_arg, y, m, n, k,
                      offset.stride(0) if offset is not None else 0, y.stride(0), BITS=bits, GROUP=max(group, 1),
                      WX=wx, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=num_warps,
                      num_stages=stages)
    return y


CONFIGS = [(128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3)]


def set_allocator() -> None:
    """Triton's scratch for kernels that need global memory of their own (none of these should)."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def kernel_sweep(args, flush: torch.Tensor, gen: torch.Generator) -> dict:
    out: dict = {}
    for name in args.shapes:
        k = PROJECTION_SHAPES[name][1]
        dense, layers = random_projection(name, ("int8", "int4"), gen)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            row: dict = {"bf16 cuBLAS": time_call(lambda: torch.nn.functional.linear(x, dense), flush, 30, False)}
            for scheme, layer in layers.items():  # the start-up tuner's candidates, the best of them
                timed = time_candidates(layer, x, flush, False)
                if timed:
                    key = min(timed, key=timed.get)
                    row[f"{scheme} tuned {key}"] = timed[key]
            variants = [("bf16", dense, None, None, 16, 0, torch.nn.functional.linear(x, dense))]
            for scheme, layer in layers.items():
                variants.append((scheme, layer.weight, layer.weight_scale,
                                 layer.weight_offset if scheme == "int4" else None, layer.bits,
                                 layer.group_size if scheme == "int4" else 0, reference_matmul(x, layer)))
            for label, w, scale, offset, bits, group, reference in variants:
                for wx in (True,) if args.wx_only else (True, False):
                    for config in CONFIGS:
                        key = f"{label} {'WX' if wx else 'XW'} {config}"
                        try:
                            def run(w=w, scale=scale, offset=offset, bits=bits, group=group, config=config, wx=wx):
                                return tma_matmul(x, w, scale, offset, bits, group, config, wx)
                            error = relative_error(run(), reference)
                            row[key] = time_call(run, flush, 30, False) if error < 1e-2 else f"wrong: {error:.3g}"
                        except Exception as exc:  # noqa: BLE001 - out of resources for this configuration
                            row[key] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            best = {}
            for label in ("bf16", "int8", "int4"):
                timed = {key: v for key, v in row.items() if key.startswith(label + " ") and isinstance(v, float)}
                if timed:
                    key = min(timed, key=timed.get)
                    best[label] = (key, round(timed[key], 4), round(timed[key] / row["bf16 cuBLAS"], 3))
            row["best"] = best
            out.setdefault(name, {})[str(m)] = row
            print(name, m, "cuBLAS", round(row["bf16 cuBLAS"], 4), best,
                  {key: round(v, 4) for key, v in row.items() if "tuned" in key}, flush=True)
    return out


def overlap(args, gen: torch.Generator) -> dict:
    """Four layers' projections at args.overlap_rows rows: serial dequantize + F.linear, the same with the next
    weight dequantized on a side stream, and bf16 F.linear alone (each chain timed as one CUDA graph)."""
    out: dict = {}
    m = args.overlap_rows
    names = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    for scheme in ("int8", "int4"):
        weights, dense = [], []
        for _ in range(4):
            for name in names:
                n, k = PROJECTION_SHAPES[name]
                w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
                layer = QuantizedLinear(k, n, scheme).cuda()
                layer.load_rows(0, w)
                weights.append(layer)
                dense.append(w if scheme == "int8" else None)
        xs = {k: torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
              for k in {PROJECTION_SHAPES[name][1] for name in names}}
        largest = max(layer.out_features * layer.in_features for layer in weights)
        buffers = [torch.empty(largest, dtype=torch.bfloat16, device="cuda") for _ in range(2)]

        def slot(layer, buffer):  # the layer's dense weight in one of the two buffers
            return buffer[:layer.out_features * layer.in_features].view(layer.out_features, layer.in_features)

        def dequantized(layer, buffer):
            return quant_matmul.dequantize(layer.weight, layer.weight_scale, layer.weight_offset, layer.bits,
                                           layer.group_size, torch.bfloat16, out=slot(layer, buffer))

        def serial():
            for layer in weights:
                torch.nn.functional.linear(xs[layer.in_features], dequantized(layer, buffers[0]))

        side = torch.cuda.Stream()

        def overlapped():
            main = torch.cuda.current_stream()
            ready = [torch.cuda.Event() for _ in weights]
            used = [torch.cuda.Event() for _ in weights]
            side.wait_stream(main)
            with torch.cuda.stream(side):
                dequantized(weights[0], buffers[0])
                ready[0].record(side)
            for i, layer in enumerate(weights):
                if i + 1 < len(weights):
                    with torch.cuda.stream(side):
                        if i >= 1:
                            side.wait_event(used[i - 1])  # buffer (i + 1) % 2 was read by matmul i - 1
                        dequantized(weights[i + 1], buffers[(i + 1) % 2])
                        ready[i + 1].record(side)
                main.wait_event(ready[i])
                torch.nn.functional.linear(xs[layer.in_features], slot(layer, buffers[i % 2]))
                used[i].record(main)
            main.wait_stream(side)

        result = {"serial_ms": graph_ms(serial), "overlapped_ms": graph_ms(overlapped)}
        if scheme == "int8":
            def bf16_chain():
                for layer, w in zip(weights, dense):
                    torch.nn.functional.linear(xs[layer.in_features], w)
            result["bf16_ms"] = graph_ms(bf16_chain)
        out[scheme] = result
        print("overlap", scheme, m, result, flush=True)
        torch.cuda.empty_cache()
    return out


def graph_ms(fn) -> float:
    """fn's time as one CUDA graph, ms."""
    return graph_us([fn], repeats=20) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--shapes", nargs="*", default=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    parser.add_argument("--overlap-rows", type=int, default=512)
    parser.add_argument("--wx-only", action="store_true", help="only the weights-first kernels (mixed_gemm's shape)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["kernels", "overlap"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    set_allocator()
    started = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "triton": triton.__version__, "configs": CONFIGS}
    flush = torch.empty(tuner.L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    if "overlap" not in args.skip:
        results["overlap"] = overlap(args, gen)
        write_results(results, args.out)
    if "kernels" not in args.skip:
        results["kernels"] = kernel_sweep(args, flush, gen)
    results["bench_s"] = time.perf_counter() - started
    write_results(results, args.out)


if __name__ == "__main__":
    main()
