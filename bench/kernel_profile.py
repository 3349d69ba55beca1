"""Which GPU kernels a step spends its time in, on random weights of the exact XVERSE-7B shape:
a one-sequence decode step (run eagerly, so each kernel is seen) and a prefill step of 16 prompts of
512 tokens (8,192 tokens, a step of `--max-batched-tokens 8192`), from torch.profiler, beside each step's wall time
and the decode graph's replay time (so the gaps between kernels show).

    python bench/kernel_profile.py --out bench/results/kernel_profile.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from engine_bench import XVERSE_7B, prompts, random_model
from torch.profiler import ProfilerActivity, profile

from xverse_serve.engine.loader import assemble_engine, resolve_kv_cache_dtype
from xverse_serve.engine.messages import SamplingParams

GREEDY = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
FLOPS_PER_TOKEN = 2 * 6_476_005_376  # 2 x the parameters a token passes through (all but the embedding table)


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


def timed_steps(engine, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def decode_profile(engine, context: int, batch: int = 1, steps: int = 20) -> dict:
    for i, prompt in enumerate(prompts(batch, context, XVERSE_7B.vocab_size, 0)):
        engine.add_request(f"decode-{i}", prompt, GREEDY)
    while any(seq.num_computed < seq.num_tokens - 1 for seq in engine.sequences.values()):
        engine.step()  # the prefills
    timed_steps(engine, 3)  # decodes that compile this context's attention variant
    step_ms = timed_steps(engine, steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_steps(engine, steps)
    for request_id in list(engine.sequences):
        engine.abort(request_id)
    return {"batch": batch, "step_ms": step_ms, "kernels": kernel_table(prof, steps)}


def prefill_profile(engine, count: int, length: int, repeats: int = 3) -> dict:
    def one_prefill(tag: str) -> float:
        for i, prompt in enumerate(prompts(count, length, XVERSE_7B.vocab_size, hash(tag) % 1000)):
            engine.add_request(f"{tag}-{i}", prompt, GREEDY)
        ms = timed_steps(engine, 1)
        for request_id in list(engine.sequences):
            engine.abort(request_id)
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
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = random_model(XVERSE_7B, device, torch.bfloat16)
    kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, device, torch.bfloat16)
    blocks = max(16, *args.decode_batches) * (args.context // 16 + 24)
    engine = assemble_engine(model, blocks, 16, 256, 8192, XVERSE_7B.max_position_embeddings, cuda_graphs=False,
                             prefix_caching=False, kv_cache_dtype=kv_dtype)
    engine.warm_up()
    results = {"device": torch.cuda.get_device_name(device), "kv_cache_dtype": str(kv_dtype),
               **{f"decode_{batch}": decode_profile(engine, args.context, batch) for batch in args.decode_batches},
               "prefill_16x512": prefill_profile(engine, 16, 512)}
    graphed = assemble_engine(model, 16 * 40, 16, 8, 8192, XVERSE_7B.max_position_embeddings, cuda_graphs=True,
                              prefix_caching=False, kv_cache_dtype=kv_dtype)
    graphed.add_request("decode", prompts(1, args.context, XVERSE_7B.vocab_size, 0)[0], GREEDY)
    graphed.step()
    timed_steps(graphed, 5)
    results["decode_1_graphed_step_ms"] = timed_steps(graphed, 50)
    print(results["device"])
    for batch in args.decode_batches:
        print_table(f"decode of {batch} sequence(s), eager", results[f"decode_{batch}"])
    print(f"the same step with the decode graph: {results['decode_1_graphed_step_ms']:.2f} ms")
    print_table("prefill of 16 x 512 tokens", results["prefill_16x512"])
    print(f"prefill matmuls: {results['prefill_16x512']['matmul_tflops_per_s']:.0f} TFLOP/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
