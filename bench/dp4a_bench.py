"""One-row projections on int8 and int4 weights: kernels.dp4a_gemv (activations quantized to two int8 parts, then
integer dot products) against the kernels the start-up tuning picks from today (rowgemv, split, gemv, ...), on
XVERSE-7B's weight shapes, timed as a decode step runs them: calls on distinct copies of a weight, back to back in
one CUDA graph (isolated calls after an L2 flush proved too noisy at these sizes: 10-20 µs).

    python bench/dp4a_bench.py --out bench/results/dp4a_h100.json

Per shape: the fastest existing candidate at M = 1, the dp4a GEMV's block shapes (quantize_row included, and
the quantize kernel alone), the errors against the float32 reference. Then a whole step's projections in one
CUDA graph (32 layers of qkv, o, gate_up and down, each fed the previous one's output, then the lm_head) for
bf16 (kernels.gemv), each format's fastest existing kernel per shape, and the dp4a GEMV: what a decode step of one
request would spend on projections, launch gaps included.
"""

from __future__ import annotations

import argparse
import itertools
import time
from functools import partial
from pathlib import Path

import torch
from common import PROJECTION_SHAPES, XVERSE_7B, copy_bandwidth, graph_us, write_results

from xverse_serve.kernels import dp4a_gemv, gemv
from xverse_serve.model.quantization import QuantizedLinear, candidates, relative_error

HIDDEN, INTER = XVERSE_7B.hidden_size, XVERSE_7B.intermediate_size
INT8_SWEEP = list(itertools.product((8, 16, 32), (64, 128, 256), (4, 8)))
INT4_SWEEP = list(itertools.product((4, 8, 16, 32), (1, 2, 4), (4, 8)))


def make_layer(n: int, k: int, scheme: str, device: torch.device, seed: int) -> QuantizedLinear:
    gen = torch.Generator(device=device).manual_seed(seed)
    layer = QuantizedLinear(k, n, scheme).to(device)
    layer.load_rows(0, torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) * 0.02)
    return layer


def dp4a(layer: QuantizedLinear, x: torch.Tensor, config: tuple[int, int, int]) -> torch.Tensor:
    """MatmulKernel("dp4a") with a block shape of the sweep's."""
    return dp4a_gemv.fused_gemv(x, *layer.dp4a_operands(), config=config)[0]


def sweep_shapes(device: torch.device, results: dict) -> dict:
    """Per format and shape: each existing candidate and each dp4a block shape at one row, timed in a graph of
    calls on distinct copies of the weight (32 for the decoder's shapes, 4 of the lm_head); the best of each."""
    best: dict = {}
    for scheme in ("int8", "int4"):
        sweep = INT8_SWEEP if scheme == "int8" else INT4_SWEEP
        print(f"| {scheme} weight | fastest existing µs (TB/s) | kernel | dp4a best µs (TB/s) | config | quantize µs |")
        print("|---|---|---|---|---|---|")
        for name, (n, k) in PROJECTION_SHAPES.items():
            layers = [make_layer(n, k, scheme, device, n + i) for i in range(4 if name == "lm_head" else 32)]
            layer = layers[0]
            x = torch.randn(1, k, device=device).to(torch.bfloat16)
            reference = x.float() @ layer.dequantized(torch.float32).T
            nbytes = sum(t.numel() * t.element_size() for t in layer.buffers() if t is not None)
            existing = {}
            for kernel in candidates(layer, 1):
                if kernel.backend == "torch":
                    continue
                try:
                    existing[str(kernel)] = (graph_us([partial(kernel, x, w) for w in layers]), kernel)
                except Exception as exc:  # noqa: BLE001 - a candidate this card cannot run
                    print(f"  {kernel}: {type(exc).__name__}: {exc}")
            old_label = min(existing, key=lambda label: existing[label][0])
            timings, errors = {}, {}
            for config in sweep:
                try:
                    errors[str(config)] = relative_error(dp4a(layer, x, config), reference)
                    timings[str(config)] = graph_us([partial(dp4a, w, x, config) for w in layers])
                except Exception as exc:  # noqa: BLE001
                    timings[str(config)] = f"failed: {type(exc).__name__}: {exc}"
            measured = {label: t for label, t in timings.items() if isinstance(t, float)}
            new_label = min(measured, key=measured.get)
            quantize_us = graph_us([partial(dp4a_gemv.quantize_row, x, scheme == "int4")] * 32)
            old_us, new_us = existing[old_label][0], measured[new_label]
            results.setdefault(scheme, {})[name] = {
                "n": n, "k": k, "bytes": nbytes, "existing_us": {label: t for label, (t, _) in existing.items()},
                "fastest_existing": old_label, "dp4a_us": timings, "dp4a_best": new_label,
                "quantize_row_us": quantize_us, "max_rel_error": max(errors.values()),
                "existing_rel_error": relative_error(existing[old_label][1](x, layer), reference)}
            best[(scheme, name)] = (existing[old_label][1], next(c for c in sweep if str(c) == new_label))
            print(f"| {name} {n}×{k} | {old_us:.1f} ({nbytes / old_us / 1e6:.2f}) | {old_label} | {new_us:.1f} "
                  f"({nbytes / new_us / 1e6:.2f}) | {new_label} | {quantize_us:.1f} |", flush=True)
    return best


def chain_ms(device: torch.device, best: dict) -> dict[str, float]:
    """A decode step's projections in one CUDA graph, per format and way."""
    results = {}
    shapes = {name: shape for name, shape in PROJECTION_SHAPES.items() if name != "lm_head"}
    x = torch.randn(1, HIDDEN, device=device).to(torch.bfloat16)
    for scheme in ("bf16", "int8", "int4"):
        layers = []
        for index in range(XVERSE_7B.num_layers):
            if scheme == "bf16":
                layers.append({name: torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
                               for name, (n, k) in shapes.items()})
            else:
                layers.append({name: make_layer(n, k, scheme, device, index * 7 + n) for name, (n, k) in
                               shapes.items()})
        n, k = PROJECTION_SHAPES["lm_head"]
        head = (torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 if scheme == "bf16"
                else make_layer(n, k, scheme, device, 1))
        ways = {"gemv": lambda h, w, name: gemv.gemv(h, w)} if scheme == "bf16" else {
            "fastest existing": lambda h, w, name: best[(scheme, name)][0](h, w),
            "dp4a": lambda h, w, name: dp4a(w, h, best[(scheme, name)][1])}
        for label, linear in ways.items():
            def step() -> torch.Tensor:
                h = x
                for layer in layers:
                    h = linear(linear(h, layer["qkv_proj"], "qkv_proj")[:, :HIDDEN], layer["o_proj"], "o_proj")
                    h = linear(linear(h, layer["gate_up_proj"], "gate_up_proj")[:, :INTER], layer["down_proj"],
                               "down_proj")
                return linear(h, head, "lm_head")

            results[f"{scheme} {label}"] = graph_us([step], repeats=20) / 1000
            print(f"step of projections, {scheme} {label}: {results[f'{scheme} {label}']:.3f} ms", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-chain", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    started = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name(device), "copy_bandwidth_GBps": copy_bandwidth(device)}
    best = sweep_shapes(device, results)
    write_results(results, args.out)
    if not args.skip_chain:
        results["chain_ms"] = chain_ms(device, best)
    results["bench_s"] = time.perf_counter() - started
    write_results(results, args.out)


if __name__ == "__main__":
    main()
