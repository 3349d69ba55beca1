"""The seed's 24 GB card on a bigger one: cap this process at --budget-gib with
torch.cuda.set_per_process_memory_fraction, plan the KV pool inside that cap as `python api.py` does,
serve a full 8K-token conversation (6,144-token prompt, answer to the end of the context) and report
the KV capacity and the peak memory.

    python bench/memory_cap.py --budget-gib 24 --out bench/results/memory_cap_h100.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import msgspec
import torch
from common import GREEDY, XVERSE_7B, engine_like_server, prompts, random_model, write_results

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
    max_len = config.max_position_embeddings
    # mem_get_info sees the whole card; the planner gets the cap as its utilization of it.
    served = engine_like_server(model, Settings(gpu_memory_utilization=fraction * 0.98, max_num_seqs=args.max_num_seqs,
                                                max_batched_tokens=args.max_batched_tokens))
    kv_tokens, engine = served.kv_cache_tokens, served.engine
    print(f"KV cache in {args.budget_gib} GiB: {kv_tokens} tokens", flush=True)
    params = msgspec.structs.replace(GREEDY, max_tokens=max_len - args.prompt_len)
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
        "activation_peak_GiB": served.peaks.prefill / 2**30, "decode_graph_pool_GiB": served.peaks.decode / 2**30,
    }
    for key, value in result.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    write_results(result, args.out)


if __name__ == "__main__":
    main()
