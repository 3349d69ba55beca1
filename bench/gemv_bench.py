"""One-row projections (a one-sequence decode step): cuBLAS (F.linear) against kernels.gemv.gemv on XVERSE-7B's
weight shapes, bf16, with a cold L2 cache before every call (as in a decode step, where each weight is read
once). Sweeps the GEMV's block shapes and prints the fastest beside the configuration the module uses.

    python bench/gemv_bench.py --out bench/results/gemv_h200.json

With --chain, it also times a whole step's projections back to back in one CUDA graph (32 layers of qkv, o,
gate_up and down, each fed the previous one's output, then the lm_head): cuBLAS against the GEMV. (An H100 run of
it also timed programmatic dependent launch, each GEMV prefetching its weights into L2 and waiting on the previous
grid: 5.09 ms against 4.65 without, so the experiment was dropped; docs/quantization.md.)

With --scaled int8 (or fp8), it sweeps the GEMV's block shapes on weights of that format with their row scales
(for int8 also the two ways of widening the integers, kernels.gemv.INT8_VIA_BITS), beside the bf16 GEMV:

    python bench/gemv_bench.py --scaled int8 --skip-sweep --out bench/results/gemv_int8_h200.json

With --fused-format fp8 (or int8), it sweeps the fused GEMVs as the one-row path calls them on weights of that
format (qkv_proj with the norm inside, o_proj and down_proj with the residual add, gate_up_proj gated), the source
of kernels.gemv.FP8_TABLES; --write-tables writes fp8's winners (2% or more faster than the module's tile) there:

    python bench/gemv_bench.py --skip-sweep --fused-format fp8 --write-tables --out bench/results/gemv_fp8_h100.json
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import torch
import torch.nn.functional as F
from common import PROJECTION_SHAPES, XVERSE_7B, cold_time_us, write_results

from xverse_serve.kernels import gemv
from xverse_serve.model import quantization

HIDDEN, INTER = XVERSE_7B.hidden_size, XVERSE_7B.intermediate_size
SWEEP = [(n, k, w, s) for n in (4, 8, 16) for k in (256, 512, 1024) for w in (4, 8) for s in (1, 2, 3)
         if n * k <= 8192]


def chain_ms(device: torch.device, layers: int = XVERSE_7B.num_layers) -> dict[str, float]:
    """Replay time of one decode step's projections in a CUDA graph, per way of computing them."""
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [{name: (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
                for name, (n, k) in PROJECTION_SHAPES.items() if name != "lm_head"} for _ in range(layers)]
    lm_head = (torch.randn(*PROJECTION_SHAPES["lm_head"], device=device, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, HIDDEN, device=device, generator=gen).to(torch.bfloat16)
    ways = {"cuBLAS": F.linear, "gemv": gemv.gemv}
    results = {}
    for label, linear in ways.items():
        def step() -> torch.Tensor:
            h = x
            for layer in weights:
                h = linear(linear(h, layer["qkv_proj"])[:, :HIDDEN], layer["o_proj"])
                h = linear(linear(h, layer["gate_up_proj"])[:, :INTER], layer["down_proj"])
            return linear(h, lm_head)

        expected = step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(out.float(), expected.float(), rtol=0.05, atol=0.05), label
        starts, ends = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        starts.record()
        for _ in range(20):
            graph.replay()
        ends.record()
        torch.cuda.synchronize()
        results[label] = starts.elapsed_time(ends) / 20
    weight_bytes = sum(n * k for name, (n, k) in PROJECTION_SHAPES.items() if name != "lm_head") * 2 * layers
    weight_bytes += PROJECTION_SHAPES["lm_head"][0] * PROJECTION_SHAPES["lm_head"][1] * 2
    for label, ms in results.items():
        print(f"chain of one step's projections, {label}: {ms:.3f} ms ({weight_bytes / ms / 1e9:.2f} TB/s)")
    return results


SCALED_SWEEP = [(n, k, w, s) for n in (1, 2, 4, 8) for k in (1024, 2048, 4096) for w in (4, 8) for s in (1, 3)
                if n * k <= 16384]


def scaled_sweep(device: torch.device, flush: torch.Tensor, fmt: str) -> dict:
    """The one-row GEMV on int8 or fp8 weights with their row scales: each shape's best block shape (and way of
    widening int8) against the module's choice and the bf16 GEMV on the same weights."""
    quantize, dequantize = {"int8": (quantization.quantize_int8, quantization.dequantize_int8),
                            "fp8": (quantization.quantize_fp8, quantization.dequantize_fp8)}[fmt]
    results = {}
    print(f"| weight | bf16 gemv µs (TB/s) | {fmt}, module's config µs (TB/s) | best µs (TB/s) | best config |")
    print("|---|---|---|---|---|")
    for name, (n, k) in PROJECTION_SHAPES.items():
        gen = torch.Generator(device=device).manual_seed(n)
        dense = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        q, scale = quantize(dense)
        x = torch.randn(1, k, device=device, generator=gen).to(torch.bfloat16)
        reference = x.float() @ dequantize(q, scale).T
        bf16_us = cold_time_us(lambda: gemv.gemv(x, dense), flush)
        timings, errors = {}, {}
        for via_bits in (True, False) if fmt == "int8" else (True,):
            gemv.INT8_VIA_BITS = via_bits
            for config in [None, *SCALED_SWEEP]:
                label = f"{config} bits={via_bits}"
                try:
                    out = gemv.gemv(x, q, config, scale=scale)
                    errors[label] = ((out.float() - reference).norm() / reference.norm()).item()
                    timings[label] = cold_time_us(lambda: gemv.gemv(x, q, config, scale=scale), flush)
                except Exception as exc:  # a block shape this card cannot run
                    timings[label] = f"failed: {type(exc).__name__}"
        gemv.INT8_VIA_BITS = True
        measured = {label: t for label, t in timings.items() if isinstance(t, float)}
        best_label = min(measured, key=measured.get)
        module_us = measured["None bits=True"]
        gigabytes = (n * k * q.element_size() + 4 * n) / 1e9
        results[name] = {"n": n, "k": k, "bf16_gemv_us": bf16_us, "module_us": module_us,
                         "best_us": measured[best_label], "best": best_label, "timings_us": timings,
                         "max_rel_error": max(errors.values())}
        print(f"| {name} {n}×{k} | {bf16_us:.1f} ({n * k * 2 / 1e9 / bf16_us * 1e3:.2f}) | {module_us:.1f} "
              f"({gigabytes / module_us * 1e3:.2f}) | {measured[best_label]:.1f} "
              f"({gigabytes / measured[best_label] * 1e3:.2f}) | {best_label} |", flush=True)
    return results


# Tiles in bytes for one-byte weights: rows per program, block_k, warps, stages (which timed alike in the bf16
# sweeps; each tile is a kernel to compile).
FUSED_SCALED_SWEEP = [(n, k, w, 2) for n in (2, 4, 8, 16) for k in (512, 1024, 2048) for w in (4, 8)
                      if 4096 <= n * k <= 16384 and n * k // (32 * w) >= 16]


def fused_scaled_sweep(device: torch.device, flush: torch.Tensor, fmt: str) -> dict:
    """The one-row path's GEMVs (model/one_row.py, family "gemv") on int8 or fp8 weights with their row scales, each
    called as the path calls it: the module's tile (kernels.gemv's tables) against each of FUSED_SCALED_SWEEP."""
    quantize = {"int8": quantization.quantize_int8, "fp8": quantization.quantize_fp8}[fmt]
    gen = torch.Generator(device=device).manual_seed(2)
    hidden = torch.randn(1, HIDDEN, device=device, generator=gen).to(torch.bfloat16)
    squares = torch.rand(1024, device=device, generator=gen) * 4
    norm = gemv.RowNorm(torch.ones(HIDDEN, device=device, dtype=torch.bfloat16), XVERSE_7B.rms_norm_eps, squares)
    cases = {  # name -> (weight shape, kind of call (kernels.gemv.TABLES), its output from (x, weight, scale, config))
        "qkv_proj normed": (PROJECTION_SHAPES["qkv_proj"], "normed",
                            lambda x, w, s, c: gemv.gemv(x, w, c, norm, scale=s)),
        "o_proj + residual": (PROJECTION_SHAPES["o_proj"], "residual",
                              lambda x, w, s, c: gemv.add_gemv(x, w, hidden, c, scale=s)[0]),
        "gate_up_proj gated": (PROJECTION_SHAPES["gate_up_proj"], "gated",
                               lambda x, w, s, c: gemv.gated_gemv(x, w, c, scale=s)),
        "down_proj + residual": (PROJECTION_SHAPES["down_proj"], "residual",
                                 lambda x, w, s, c: gemv.add_gemv(x, w, hidden, c, scale=s)[0]),
    }
    results, total_module, total_best = {}, 0.0, 0.0
    print(f"| {fmt} one-row GEMV | module's tile µs (TB/s) | best of sweep µs (TB/s) | best tile |")
    print("|---|---|---|---|")
    for name, ((n, k), kind, call) in cases.items():
        q, scale = quantize((torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16))
        x = torch.randn(1, k, device=device, generator=gen).to(torch.bfloat16)
        expected = call(x, q, scale, None)
        timings = {}
        for config in [None, *FUSED_SCALED_SWEEP]:
            try:
                out = call(x, q, scale, config)
            except Exception as exc:  # a tile this card cannot compile (registers, shared memory)
                timings[str(config)] = f"failed: {type(exc).__name__}"
                continue
            if not torch.allclose(out.float(), expected.float(), rtol=2e-2, atol=2e-2):
                raise AssertionError(f"{name}: tile {config} disagrees with the module's")
            timings[str(config)] = cold_time_us(lambda: call(x, q, scale, config), flush)
        best = min((t, c) for c, t in timings.items() if c != "None" and isinstance(t, float))
        gigabytes = (n * k + 4 * n) / 1e9
        results[name] = {"n": n, "k": k, "kind": kind, "module_us": timings["None"], "best_us": best[0],
                         "best_config": best[1], "timings_us": timings}
        total_module += timings["None"] * XVERSE_7B.num_layers
        total_best += best[0] * XVERSE_7B.num_layers
        print(f"| {name} {n}×{k} | {timings['None']:.1f} ({gigabytes / timings['None'] * 1e3:.2f}) | {best[0]:.1f} "
              f"({gigabytes / best[0] * 1e3:.2f}) | {best[1]} |", flush=True)
    print(f"per decode step: module's tiles {total_module / 1000:.3f} ms, best {total_best / 1000:.3f} ms")
    return results


def winning_tables(sweep: dict, margin: float = 0.98) -> dict[str, dict[tuple[int, int], tuple[int, ...]]]:
    """fused_scaled_sweep's results -> FP8_TABLES: each case's best tile where it beat the module's by 2% or more."""
    tables: dict[str, dict[tuple[int, int], tuple[int, ...]]] = {kind: {} for kind in gemv.TABLES}
    for case in sweep.values():
        if case["best_us"] < margin * case["module_us"]:
            tables[case["kind"]][(case["n"], case["k"])] = tuple(ast.literal_eval(case["best_config"]))
    return tables


def with_fp8_tables(source: str, tables: dict) -> str:
    """kernels/gemv.py's source with its FP8_TABLES assignment replaced by `tables`, a kind a line."""
    node = next(node for node in ast.parse(source).body
                if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "FP8_TABLES")
    lines = source.splitlines(keepends=True)
    head = ast.get_source_segment(source, node.annotation)
    body = "".join(f"    {kind!r}: {table!r},\n".replace("'", '"') for kind, table in tables.items())
    assignment = f"FP8_TABLES: {head} = {{\n{body}}}\n"
    return "".join(lines[:node.lineno - 1]) + assignment + "".join(lines[node.end_lineno:])


def fused_sweep(device: torch.device, flush: torch.Tensor) -> dict:
    """The one-row path's GEMVs (DecoderLayer.forward_one_row in model/xverse.py): the RMSNorm in the prologue of
    qkv_proj and gate_up_proj (gated), the residual add in the epilogue of o_proj and down_proj; each against the
    plain GEMV of the same weight, both at the module's config, and the fastest config of a sweep."""
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(1, HIDDEN, device=device, generator=gen).to(torch.bfloat16)
    squares = torch.rand(1024, device=device, generator=gen) * 4  # as down_proj's add_gemv leaves them
    norm = gemv.RowNorm(torch.ones(HIDDEN, device=device, dtype=torch.bfloat16), XVERSE_7B.rms_norm_eps, squares)
    cases = {  # name -> (weight shape, fused call, plain call), each taking (x, weight, config)
        "qkv_proj normed": (PROJECTION_SHAPES["qkv_proj"], lambda x, w, c: gemv.gemv(x, w, c, norm), gemv.gemv),
        "o_proj + residual": (PROJECTION_SHAPES["o_proj"], lambda x, w, c: gemv.add_gemv(x, w, hidden, c),
                              gemv.gemv),
        "gate_up_proj normed, gated": (PROJECTION_SHAPES["gate_up_proj"],
                                       lambda x, w, c: gemv.gated_gemv(x, w, c, norm), gemv.gated_gemv),
        "down_proj + residual": (PROJECTION_SHAPES["down_proj"], lambda x, w, c: gemv.add_gemv(x, w, hidden, c),
                                 gemv.gemv),
    }
    results, total_fused, total_plain = {}, 0.0, 0.0
    print("| one-row GEMV | plain µs | fused µs | fused, best of sweep µs | best config |")
    print("|---|---|---|---|---|")
    for name, ((n, k), fused, plain) in cases.items():
        weight = torch.randn(n, k, device=device, generator=gen).to(torch.bfloat16)
        x = torch.randn(1, k, device=device, generator=gen).to(torch.bfloat16)
        plain_table = gemv.GATED_CONFIGS if "gated" in name else gemv.CONFIGS
        table = gemv.NORMED_CONFIGS if "normed" in name else gemv.RESIDUAL_CONFIGS
        module_config = table.get((n, k), gemv.DEFAULT_CONFIG)
        plain_us = cold_time_us(lambda: plain(x, weight, plain_table.get((n, k), gemv.DEFAULT_CONFIG)), flush)
        timings = {str(c): cold_time_us(lambda: fused(x, weight, c), flush) for c in [module_config, *SWEEP]}
        best = min((t, c) for c, t in timings.items())
        results[name] = {"plain_us": plain_us, "fused_us": timings[str(module_config)], "best_us": best[0],
                         "best_config": best[1], "module_config": list(module_config)}
        total_fused += timings[str(module_config)] * XVERSE_7B.num_layers
        total_plain += plain_us * XVERSE_7B.num_layers
        print(f"| {name} {n}×{k} | {plain_us:.1f} | {timings[str(module_config)]:.1f} | {best[0]:.1f} | {best[1]} |",
              flush=True)
    print(f"per decode step: plain {total_plain / 1000:.3f} ms, fused {total_fused / 1000:.3f} ms (norm kernels not "
          "counted)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--chain", action="store_true", help="also time a whole step's projections in a graph")
    parser.add_argument("--skip-sweep", action="store_true", help="only the chain (and --fused)")
    parser.add_argument("--fused", action="store_true", help="also sweep the one-row path's fused GEMVs")
    parser.add_argument("--scaled", choices=("int8", "fp8"), default=None,
                        help="also sweep the GEMV on weights of this format with their row scales")
    parser.add_argument("--fused-format", choices=("int8", "fp8"), default=None,
                        help="also sweep the one-row path's fused GEMVs on weights of this format")
    parser.add_argument("--write-tables", action="store_true",
                        help="with --fused-format fp8: write the winners into kernels/gemv.py's FP8_TABLES")
    args = parser.parse_args()
    if args.write_tables and args.fused_format != "fp8":
        parser.error("--write-tables writes fp8's tiles: it needs --fused-format fp8")
    device = torch.device("cuda")
    flush = torch.empty(64 * 1024 * 1024, device=device)
    results = {"device": torch.cuda.get_device_name(device), "shapes": {}}
    totals = {"cuBLAS": 0.0, "gemv (module's config)": 0.0, "gemv (best of sweep)": 0.0}
    print("| weight | cuBLAS µs (TB/s) | gemv, module's config µs (TB/s) | best of sweep µs | best config |")
    print("|---|---|---|---|---|")
    if args.chain:
        results["chain_ms"] = chain_ms(device)
    if args.fused:
        results["fused"] = fused_sweep(device, flush)
    if args.fused_format:
        results[f"fused_{args.fused_format}"] = fused_scaled_sweep(device, flush, args.fused_format)
        if args.write_tables:
            path = Path(gemv.__file__)
            tables = winning_tables(results["fused_fp8"])
            path.write_text(with_fp8_tables(path.read_text(), tables))
            print(f"wrote FP8_TABLES = {tables} into {path}")
    if args.scaled:
        results[f"scaled_{args.scaled}"] = scaled_sweep(device, flush, args.scaled)
    for name, (n, k) in ({} if args.skip_sweep else PROJECTION_SHAPES).items():
        gen = torch.Generator(device=device).manual_seed(n)
        weight = torch.randn(n, k, device=device, generator=gen).to(torch.bfloat16)
        x = torch.randn(1, k, device=device, generator=gen).to(torch.bfloat16)
        reference = x.float() @ weight.float().T
        errors, timings = {}, {}
        for config in [None, *SWEEP]:
            out = gemv.gemv(x, weight, config)
            errors[str(config)] = ((out.float() - reference).norm() / reference.norm()).item()
            timings[str(config)] = cold_time_us(lambda: gemv.gemv(x, weight, config), flush)
        cublas = cold_time_us(lambda: F.linear(x, weight), flush)
        best = min((t, c) for c, t in timings.items() if c != "None")
        gigabytes = n * k * 2 / 1e9
        results["shapes"][name] = {"n": n, "k": k, "cublas_us": cublas, "module_us": timings["None"],
                                   "module_config": list(gemv.CONFIGS.get((n, k), gemv.DEFAULT_CONFIG)),
                                   "best_us": best[0], "best_config": best[1], "timings_us": timings,
                                   "max_rel_error": max(errors.values())}
        for label, value in (("cuBLAS", cublas), ("gemv (module's config)", timings["None"]),
                             ("gemv (best of sweep)", best[0])):
            totals[label] += value * (1 if name == "lm_head" else XVERSE_7B.num_layers)
        print(f"| {name} {n}×{k} | {cublas:.1f} ({gigabytes / cublas * 1e3:.2f}) | {timings['None']:.1f} "
              f"({gigabytes / timings['None'] * 1e3:.2f}) | {best[0]:.1f} | {best[1]} |", flush=True)
    results["per_token_ms"] = {label: value / 1000 for label, value in totals.items()}
    print("projections of one decode step, ms: " + ", ".join(f"{k} {v / 1000:.2f}" for k, v in totals.items()))
    write_results(results, args.out)


if __name__ == "__main__":
    main()
