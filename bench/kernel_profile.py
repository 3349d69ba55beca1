"""Which GPU kernels a step spends its time in, on random weights of the exact XVERSE-7B shape:
a decode step (run eagerly, so each kernel is seen) and a prefill step of 16 prompts of 512 tokens (8,192 tokens,
a step of `--max-batched-tokens 8192`), from torch.profiler, beside each step's wall time and that of a
one-sequence decode step through its CUDA graph (so the gaps between kernels show).

    python bench/kernel_profile.py --decode-batches 1 64 --out bench/results/kernel_profile_h100.json
    python bench/kernel_profile.py --quantize fp8 --decode-batches 64   # fp8 weights, tuned as the server tunes them
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from common import (
    BLOCK_SIZE,
    GREEDY,
    XVERSE_7B,
    abort_all,
    prompts,
    random_model,
    start_decoding,
    wall_ms,
    write_results,
)
from torch.profiler import ProfilerActivity, profile

from xverse_serve.engine.config import CacheConfig, SchedulerConfig
from xverse_serve.engine.engine import Engine
from xverse_serve.engine.loader import assemble_engine, resolve_kv_cache_dtype

# The FLOPs of a prefill token: 2 per weight of the layers' projections (the LM head runs on each prompt's last
# token only, and the embedding table is gathered).
FLOPS_PER_TOKEN = 2 * XVERSE_7B.num_layers * (4 * XVERSE_7B.hidden_size ** 2
                                              + 3 * XVERSE_7B.hidden_size * XVERSE_7B.intermediate_size)


def kernel_table(prof, steps: int) -> list[dict]:
    """GPU kernels by name: calls and µs per step, largest first."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name]
            entry[0] += 1
            entry[1] += event.device_time
    rows = [{"kernel": name[:110], "calls": calls / steps, "us": us / steps} for name, (calls, us) in totals.items()]
    return sorted(rows, key=lambda row: -row["us"])


def decode_profile(engine: Engine, context: int, batch: int = 1, steps: int = 20) -> dict:
    start_decoding(engine, prompts(batch, context, XVERSE_7B.vocab_size, 0), GREEDY, "decode-")
    wall_ms(engine.step, 3)  # decodes that compile this context's attention variant
    step_ms = wall_ms(engine.step, steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall_ms(engine.step, steps)
    abort_all(engine)
    return {"batch": batch, "step_ms": step_ms, "kernels": kernel_table(prof, steps)}


def prefill_profile(engine: Engine, count: int, length: int, repeats: int = 3) -> dict:
    def one_prefill(tag: str) -> float:
        for i, prompt in enumerate(prompts(count, length, XVERSE_7B.vocab_size, hash(tag) % 1000)):
            engine.add_request(f"{tag}-{i}", prompt, GREEDY)
        ms = wall_ms(engine.step, 1)
        abort_all(engine)
        return ms

    one_prefill("warm")
    step_ms = min(one_prefill(f"timed{i}") for i in range(repeats))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        one_prefill("profiled")
    tflops = count * length * FLOPS_PER_TOKEN / (step_ms * 1e-3) / 1e12
    return {"tokens": count * length, "step_ms": step_ms, "matmul_tflops_per_s": tflops,
            "kernels": kernel_table(prof, 1)}


def print_table(title: str, result: dict, limit: int = 14) -> None:
    gpu_us = sum(row["us"] for row in result["kernels"])
    print(f"\n{title}: step {result['step_ms']:.2f} ms wall, kernels {gpu_us / 1e3:.2f} ms")
    print("| kernel | calls/step | µs/step | share |")
    print("|---|---|---|---|")
    for row in result["kernels"][:limit]:
        print(f"| {row['kernel']} | {row['calls']:.0f} | {row['us']:.1f} | {row['us'] / gpu_us:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1],
                        help="sequences in the profiled decode steps, one profile each")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"])
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "int4", "fp8"],
                        help="the projections' weights, quantized and their kernels tuned as --quantize loads them")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = random_model(XVERSE_7B, device, torch.bfloat16, args.quantize)
    kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, device, torch.bfloat16)
    blocks = max(16, *args.decode_batches) * (args.context // BLOCK_SIZE + 24)
    # Steps of 8,192 tokens, so that the 16 prompts are prefilled in one.
    scheduler = SchedulerConfig(max_num_seqs=256, max_batched_tokens=8192, prefix_caching=False)
    engine = assemble_engine(model, CacheConfig(blocks, BLOCK_SIZE, kv_dtype), scheduler,
                             XVERSE_7B.max_position_embeddings)
    engine.warm_up()
    results = {"device": torch.cuda.get_device_name(device), "quantize": args.quantize, "kv_cache_dtype": str(kv_dtype),
               **{f"decode_{batch}": decode_profile(engine, args.context, batch) for batch in args.decode_batches},
               "prefill_16x512": prefill_profile(engine, 16, 512)}
    graphed = assemble_engine(model, CacheConfig(16 * 40, BLOCK_SIZE, kv_dtype),
                              SchedulerConfig(max_num_seqs=8, max_batched_tokens=8192, prefix_caching=False),
                              XVERSE_7B.max_position_embeddings, cuda_graphs=True)
    graphed.add_request("decode", prompts(1, args.context, XVERSE_7B.vocab_size, 0)[0], GREEDY)
    graphed.step()
    wall_ms(graphed.step, 5)
    results["decode_1_graphed_step_ms"] = wall_ms(graphed.step, 50)
    print(results["device"])
    for batch in args.decode_batches:
        print_table(f"decode of {batch} sequence(s), eager", results[f"decode_{batch}"])
    print(f"the same step with the decode graph: {results['decode_1_graphed_step_ms']:.2f} ms")
    print_table("prefill of 16 x 512 tokens", results["prefill_16x512"])
    print(f"prefill matmuls: {results['prefill_16x512']['matmul_tflops_per_s']:.0f} TFLOP/s")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
