"""Where a decode step's time goes, on random weights of the exact XVERSE-7B shape:
the GPU time of a replayed decode graph against a whole engine step (scheduling, inputs, sampling).

    python bench/step_profile.py --out bench/results/step_profile.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from engine_bench import XVERSE_7B, copy_bandwidth, prompts, random_model

from xverse_serve.engine.loader import assemble_engine
from xverse_serve.engine.messages import SamplingParams
from xverse_serve.model.xverse import Linear

WEIGHT_BYTES = 7_299_846_144 * 2
KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # keys and values, 32 layers, 4096 wide, bf16


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 50) -> float:
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def engine_step_ms(engine, batch: int, context: int, params: SamplingParams, steps: int = 40) -> dict:
    """Mean wall time of a decode step with `batch` sequences of about `context` tokens, and its parts."""
    for i, prompt in enumerate(prompts(batch, context, XVERSE_7B.vocab_size, batch)):
        engine.add_request(f"p{batch}-{i}", prompt, params)
    while any(seq.num_computed < len(seq.prompt_ids) for seq in engine.sequences.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    timers = {"schedule": 0.0, "step": 0.0}
    original_schedule = engine.scheduler.schedule

    def timed_schedule():
        started = time.perf_counter()
        result = original_schedule()
        timers["schedule"] += time.perf_counter() - started
        return result

    engine.scheduler.schedule = timed_schedule
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    timers["step"] = time.perf_counter() - start
    engine.scheduler.schedule = original_schedule
    for request_id in list(engine.sequences):
        engine.abort(request_id)
    return {name: seconds / steps * 1e3 for name, seconds in timers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=XVERSE_7B.max_position_embeddings,
                        help="the graphs' block-table width (the decode kernel's grid covers it)")
    parser.add_argument("--unfused-one-row", action="store_true",
                        help="one-sequence steps through the per-op path (norm kernels of their own), to compare")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.unfused_one_row:
        Linear.runs_one_row = classmethod(lambda cls, x: False)
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    model = random_model(XVERSE_7B, device, torch.bfloat16)
    # The largest batch's contexts plus its steps, and at least one full context (the warm-up's longest request).
    blocks = max(max(args.batches) * -(-(args.context + 64) // 16), -(-args.max_model_len // 16) + 1)
    engine = assemble_engine(model, blocks, 16, 256, 4096, args.max_model_len, cuda_graphs=True)
    graphs = engine.runner.graphs
    results = {"device": torch.cuda.get_device_name(device), "copy_GBps": bandwidth / 1e9,
               "weights_ms": WEIGHT_BYTES / bandwidth * 1e3, "rows": []}
    print(f"{results['device']}: streaming the weights once takes {results['weights_ms']:.2f} ms")
    greedy = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    xverse_defaults = SamplingParams(max_tokens=10_000, temperature=0.5, top_k=30, top_p=0.85,
                                     repetition_penalty=1.1, ignore_eos=True)
    print("| batch | bytes-bound ms (weights + KV read) | graph replay ms | step ms greedy | step ms greedy, "
          "one at a time | step ms XVERSE sampling | schedule ms |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        size = next(bucket for bucket in graphs.buckets if bucket >= batch)
        plain = engine_step_ms(engine, batch, args.context, greedy)
        engine.overlap = False  # each step's tokens read back before the next step is queued
        serial = engine_step_ms(engine, batch, args.context, greedy)
        engine.overlap = True
        sampled = engine_step_ms(engine, batch, args.context, xverse_defaults)
        # The graph's static inputs still hold the last step of this batch (its real contexts, so attention
        # reads what a step reads); replaying rewrites that step's keys and values with the same ones.
        graph_ms = replay_ms(graphs.graphs[size])
        bound_ms = (WEIGHT_BYTES + batch * args.context * KV_BYTES_PER_TOKEN) / bandwidth * 1e3
        row = {"batch": batch, "bytes_bound_ms": bound_ms, "graph_ms": graph_ms, "step_ms_greedy": plain["step"],
               "step_ms_greedy_one_at_a_time": serial["step"], "step_ms_sampled": sampled["step"],
               "schedule_ms": sampled["schedule"]}
        results["rows"].append(row)
        print(f"| {batch} | {bound_ms:.2f} | {graph_ms:.2f} | {plain['step']:.2f} | {serial['step']:.2f} "
              f"| {sampled['step']:.2f} | {sampled['schedule']:.2f} |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
