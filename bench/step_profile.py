"""Where a decode step's time goes, on random weights of the exact XVERSE-7B shape:
the GPU time of a replayed decode graph against a whole engine step (scheduling, inputs, sampling).

    python bench/step_profile.py --out bench/results/step_profile_h200.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import (
    BLOCK_SIZE,
    GREEDY,
    XVERSE_7B,
    XVERSE_SAMPLING,
    abort_all,
    copy_bandwidth,
    prompts,
    random_model,
    replay_ms,
    start_decoding,
    wall_ms,
    write_results,
)

from xverse_serve.engine.config import CacheConfig, SchedulerConfig
from xverse_serve.engine.engine import Engine
from xverse_serve.engine.loader import assemble_engine
from xverse_serve.engine.messages import SamplingParams
from xverse_serve.model.kv_cache import KVCache
from xverse_serve.model.quantization import quantized_bytes
from xverse_serve.model.xverse import Linear

KV_BYTES_PER_TOKEN = KVCache.bytes_per_token(XVERSE_7B, torch.bfloat16)


def engine_step_ms(engine: Engine, batch: int, context: int, params: SamplingParams, steps: int = 40) -> dict:
    """Mean wall time of a decode step with `batch` sequences of about `context` tokens, and its parts."""
    start_decoding(engine, prompts(batch, context, XVERSE_7B.vocab_size, batch), params, f"p{batch}-")
    for _ in range(3):
        engine.step()
    schedule_seconds = 0.0
    original_schedule = engine.scheduler.schedule

    def timed_schedule():
        nonlocal schedule_seconds
        started = time.perf_counter()
        result = original_schedule()
        schedule_seconds += time.perf_counter() - started
        return result

    engine.scheduler.schedule = timed_schedule
    step_ms = wall_ms(engine.step, steps)
    engine.scheduler.schedule = original_schedule
    abort_all(engine)
    return {"schedule": schedule_seconds / steps * 1e3, "step": step_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=XVERSE_7B.max_position_embeddings,
                        help="the graphs' block-table width (the decode kernel's grid covers it)")
    parser.add_argument("--unfused-one-row", action="store_true",
                        help="one-sequence steps through the per-op path (norm kernels of their own), to compare")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "int4", "fp8"],
                        help="the projections' weights, quantized and their kernels tuned as --quantize loads them")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.unfused_one_row:
        Linear.runs_one_row = classmethod(lambda cls, x: False)
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    model = random_model(XVERSE_7B, device, torch.bfloat16, args.quantize)
    # A decode step streams every weight but the embedding table, of which it reads one row per token.
    weight_bytes = quantized_bytes(model) - quantized_bytes(model.model.embed_tokens)
    # The largest batch's contexts plus its steps, and at least one full context (the warm-up's longest request).
    blocks = max(max(args.batches) * -(-(args.context + 64) // BLOCK_SIZE), -(-args.max_model_len // BLOCK_SIZE) + 1)
    engine = assemble_engine(model, CacheConfig(blocks, BLOCK_SIZE), SchedulerConfig(256, 4096), args.max_model_len,
                             cuda_graphs=True)
    graphs = engine.runner.graphs
    results = {"device": torch.cuda.get_device_name(device), "quantize": args.quantize, "copy_GBps": bandwidth / 1e9,
               "weights_ms": weight_bytes / bandwidth * 1e3, "rows": []}
    print(f"{results['device']}: streaming the weights once takes {results['weights_ms']:.2f} ms")
    print("| batch | bytes-bound ms (weights + KV read) | graph replay ms | step ms greedy | step ms greedy, "
          "one at a time | step ms XVERSE sampling | schedule ms |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        size = next(bucket for bucket in graphs.buckets if bucket >= batch)
        plain = engine_step_ms(engine, batch, args.context, GREEDY)
        engine.overlap = False  # each step's tokens read back before the next step is queued
        serial = engine_step_ms(engine, batch, args.context, GREEDY)
        engine.overlap = True
        sampled = engine_step_ms(engine, batch, args.context, XVERSE_SAMPLING)
        # The graph's static inputs still hold the last step of this batch (its real contexts, so attention
        # reads what a step reads); replaying rewrites that step's keys and values with the same ones.
        graph_ms = replay_ms(graphs.graphs[size])
        bound_ms = (weight_bytes + batch * args.context * KV_BYTES_PER_TOKEN) / bandwidth * 1e3
        row = {"batch": batch, "bytes_bound_ms": bound_ms, "graph_ms": graph_ms, "step_ms_greedy": plain["step"],
               "step_ms_greedy_one_at_a_time": serial["step"], "step_ms_sampled": sampled["step"],
               "schedule_ms": sampled["schedule"]}
        results["rows"].append(row)
        print(f"| {batch} | {bound_ms:.2f} | {graph_ms:.2f} | {plain['step']:.2f} | {serial['step']:.2f} "
              f"| {sampled['step']:.2f} | {sampled['schedule']:.2f} |", flush=True)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
