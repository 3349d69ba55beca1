"""Lab: the int8 tensor-core matmuls with two-part activations (kernels/imma_gemm.py explains them; split_gemm's
two_part kernels for 1-64 rows) in several configurations, against bf16 and the current int8/int4 kernels.
Decode sizes are timed as a decode step meets its weights: copies of a projection cycled inside a CUDA graph, so
each call reads its weight from DRAM with no flush between calls; --prefill times 128-2,048 rows.

    python bench/imma_lab.py [--quick] [--prefill] [--no-decode]
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xverse_serve.kernels import gemv, imma_gemm, split_gemm  # noqa: E402
from xverse_serve.model import quantization  # noqa: E402


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
            variants.append(("int4 split (64,8,3)", 2 * copies,
                             lambda i: (lambda: split_gemm.split_matmul_int4(x, *i4[i], 128, (64, 8, 3))), ref4))
            for config in ((64, 4, 3), (64, 8, 3), (128, 8, 3), (128, 4, 4)):
                variants.append((f"imma4 {config}", 2 * copies, lambda i, c=config: (
                    lambda: split_gemm.split_matmul_int4(x, *i4[i], 128, c, two_part=True)), ref4))
            bytes_by = {"bf16": n * k * 2, "int8": n * k, "imma2": n * k,
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
