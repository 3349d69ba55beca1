"""How the scheduler's choices play out on the GPU, on random weights of the exact XVERSE-7B shape, without HTTP:
  1. what one step costs by its decodes and its prompt tokens (a step of D decodes that also computes P prompt
     tokens), to see how many prompt tokens ride along on the decodes' weight reads;
  2. clients in a closed loop, each sending its next request (the same lengths, new tokens) as soon as the last
     one ends, as serve_bench's clients do: output tokens/s, time to first token and between tokens, for each
     --max-prefill-with-decodes setting.

    python bench/closed_loop_bench.py --clients 64 --max-prefill-with-decodes none 1024 512 256 --out RUN.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import msgspec
import torch
from common import (
    GREEDY,
    XVERSE_7B,
    abort_all,
    engine_like_server,
    percentile,
    prompts,
    random_model,
    start_decoding,
    write_results,
)

from xverse_serve.engine.engine import Engine
from xverse_serve.settings import Settings


def step_cost_ms(engine: Engine, decodes: int, context: int, prompt_tokens: int, seed: int, repeats: int = 5) -> float:
    """Median wall time of an engine step, from an idle GPU to its tokens on the host, that holds `decodes` decodes
    of about `context` tokens and one chunk of `prompt_tokens` of a new prompt (0: a decode step)."""
    engine.overlap = False  # each step() runs one step to its end
    start_decoding(engine, prompts(decodes, context, XVERSE_7B.vocab_size, seed - 1), GREEDY, "d")
    times = []
    for repeat in range(repeats + 1):  # the first meets new shapes
        request_id = f"p{repeat}"
        if prompt_tokens:
            engine.add_request(request_id, prompts(1, prompt_tokens, XVERSE_7B.vocab_size, seed + repeat)[0], GREEDY)
        torch.cuda.synchronize()
        started = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - started) * 1e3)
        if prompt_tokens:
            engine.abort(request_id)
    abort_all(engine)
    engine.overlap = True
    return statistics.median(times[1:])


def closed_loop(engine: Engine, clients: int, requests_per_client: int, prompt_len: int, output_len: int, seed: int,
                repetition_penalty: float = 1.0) -> dict:
    """Each client sends its next request in the step after its last one ended; greedy, with the penalty."""
    params = msgspec.structs.replace(GREEDY, max_tokens=output_len, repetition_penalty=repetition_penalty)
    batch = prompts(clients * requests_per_client, prompt_len, XVERSE_7B.vocab_size, seed)
    sent: dict[str, float] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    next_prompt = 0

    def send(now: float) -> None:
        nonlocal next_prompt
        request_id = f"r{next_prompt}"
        engine.add_request(request_id, batch[next_prompt], params)
        sent[request_id] = now
        next_prompt += 1

    mixed_steps = steps = produced = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(clients):
        send(0.0)
    while engine.has_work():
        mixed_steps += any(seq.num_tokens - seq.num_computed > 1 for seq in engine.scheduler.running) or bool(
            engine.scheduler.waiting)
        steps += 1
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            produced += len(out.new_token_ids)
            if out.request_id in first:
                gaps.append(now - last[out.request_id])
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
            if out.finished and next_prompt < len(batch):
                send(now)
    seconds = time.perf_counter() - start
    ttft = [first[r] - sent[r] for r in sent]
    return {"seconds": seconds, "output_tok_s": produced / seconds, "steps": steps,
            "steps_with_prompts": mixed_steps,
            "ttft_ms_p50": percentile(ttft, 50) * 1e3, "ttft_ms_p99": percentile(ttft, 99) * 1e3,
            "itl_ms_p50": percentile(gaps, 50) * 1e3, "itl_ms_p99": percentile(gaps, 99) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=516, help="serve_bench's prompts are 516 tokens")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-batched-tokens", type=int, default=Settings().max_batched_tokens)
    parser.add_argument("--max-prefill-with-decodes", nargs="+", default=["none", "1024", "512", "256"])
    parser.add_argument("--repetition-penalty", type=float, nargs="+", default=[1.1, 1.0],
                        help="1.1: XVERSE's default, which the server applies to serve_bench's requests")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"])
    parser.add_argument("--step-costs", action="store_true", help="also part 1, the cost of a step")
    parser.add_argument("--without-pieces", action="store_true",
                        help="steps with prompt tokens eagerly, as before the piecewise CUDA graphs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = random_model(XVERSE_7B, torch.device("cuda"), torch.bfloat16)
    served = engine_like_server(model, Settings(max_batched_tokens=args.max_batched_tokens,
                                                kv_cache_dtype=args.kv_cache_dtype))
    engine = served.engine
    engine.scheduler.prefix_caching = False  # every prompt is new anyway; no run may find an earlier one's blocks
    if args.without_pieces:
        engine.runner.pieces = None
    results: dict = {"device": torch.cuda.get_device_name(), "kv_cache_dtype": args.kv_cache_dtype,
                     "piecewise_graphs": engine.runner.pieces is not None,
                     "kv_cache_tokens": served.kv_cache_tokens, "max_batched_tokens": args.max_batched_tokens,
                     "clients": args.clients, "prompt_len": args.prompt_len, "output_len": args.output_len}
    print(results, flush=True)
    if args.step_costs:
        results["step_ms"] = []
        for decodes in (0, 16, 64):
            for prompt_tokens in (0, 64, 128, 256, 512, 1024, 2048):
                if decodes == 0 and prompt_tokens == 0:
                    continue
                ms = step_cost_ms(engine, decodes, args.prompt_len, prompt_tokens,
                                  seed=len(results["step_ms"]) * 100 + 1)
                results["step_ms"].append({"decodes": decodes, "prompt_tokens": prompt_tokens, "ms": ms})
                print(f"step of {decodes} decodes and {prompt_tokens} prompt tokens: {ms:.2f} ms", flush=True)
    results["closed_loop"] = []
    settings = [(cap, penalty) for cap in args.max_prefill_with_decodes for penalty in args.repetition_penalty]
    for index, (setting, penalty) in enumerate(settings):
        engine.scheduler.max_prefill_with_decodes = None if setting == "none" else int(setting)
        run = closed_loop(engine, args.clients, args.requests_per_client, args.prompt_len, args.output_len,
                          seed=10_000 + index, repetition_penalty=penalty)
        run["max_prefill_with_decodes"] = setting
        run["repetition_penalty"] = penalty
        results["closed_loop"].append(run)
        print(f"max_prefill_with_decodes {setting}, repetition penalty {penalty}: {run['output_tok_s']:.0f} tok/s, "
              f"TTFT p50 {run['ttft_ms_p50']:.0f} p99 {run['ttft_ms_p99']:.0f} ms, ITL p50 {run['itl_ms_p50']:.1f} p99 "
              f"{run['itl_ms_p99']:.1f} ms, {run['steps']} steps ({run['steps_with_prompts']} with prompts)",
              flush=True)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
