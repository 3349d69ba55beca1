"""The seed's 24 GB card on a bigger one: cap this process at --budget-gib with
torch.cuda.set_per_process_memory_fraction, plan the KV pool inside that cap as `python api.py` does,
serve a full 8K-token conversation (6,144-token prompt, answer to the end of the context) and report
the KV capacity and the peak memory.

    python bench/memory_cap.py --budget-gib 24 --out bench/results/memory_cap_24g.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from engine_bench import XVERSE_7B, prompts, random_model

from xverse_serve.engine.loader import assemble_engine
from xverse_serve.engine.memory_plan import kv_cache_tokens_for_card, measure_step_peaks
from xverse_serve.engine.messages import SamplingParams
from xverse_serve.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--prompt-len", type=int, default=6144)
    parser.add_argument("--max-num-seqs", type=int, default=Settings().max_num_seqs)
    parser.add_argument("--max-batched-tokens", type=int, default=Settings().max_batched_tokens)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = args.budget_gib * 2**30 / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    config = XVERSE_7B
    model = random_model(config, device, torch.bfloat16)
    max_len, block_size = config.max_position_embeddings, 16
    peaks = measure_step_peaks(model, args.max_num_seqs, args.max_batched_tokens, max_len, block_size)
    # mem_get_info sees the whole card; the planner gets the cap as its utilization of it.
    kv_tokens = kv_cache_tokens_for_card(model, fraction * 0.98, peaks, with_graphs=True)
    if kv_tokens < max_len:
        raise SystemExit(f"only {kv_tokens} tokens of KV cache fit in {args.budget_gib} GiB: less than one context")
    engine = assemble_engine(model, kv_tokens // block_size, block_size, args.max_num_seqs, args.max_batched_tokens, max_len,
                             cuda_graphs=True)
    print(f"KV cache in {args.budget_gib} GiB: {kv_tokens} tokens", flush=True)
    params = SamplingParams(max_tokens=max_len - args.prompt_len, temperature=0.0, ignore_eos=True)
    engine.add_request("conversation", prompts(1, args.prompt_len, config.vocab_size, 0)[0], params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    produced, reason = 0, None
    while engine.has_work():
        for output in engine.step():
            produced += len(output.new_token_ids)
            reason = output.finish_reason or reason
    seconds = time.perf_counter() - start
    result = {
        "device": torch.cuda.get_device_name(device), "budget_GiB": args.budget_gib,
        "kv_cache_tokens": kv_tokens, "full_8k_contexts": kv_tokens / max_len,
        "concurrent_2k_conversations": kv_tokens // 2048,
        "prompt_tokens": args.prompt_len, "generated_tokens": produced, "finish_reason": reason,
        "seconds": seconds, "decode_tok_s": produced / seconds,
        "peak_allocated_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
        "peak_reserved_GiB": torch.cuda.max_memory_reserved(device) / 2**30,
        "activation_peak_GiB": peaks.prefill / 2**30, "decode_graph_pool_GiB": peaks.decode / 2**30,
    }
    for key, value in result.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
