"""The sampler on the GPU: time of engine.sampling.sample for a batch of XVERSE-sized logits, greedy and with
XVERSE's defaults (temperature 0.5, top_k 30, top_p 0.85, repetition penalty 1.1), and the kernels it runs.

    python bench/sampling_bench.py --out bench/results/sampling_h100.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from common import GREEDY, XVERSE_7B, XVERSE_SAMPLING, write_results

from xverse_serve.engine.sampling import SamplingRow, SeenTokens, sample

VOCAB = XVERSE_7B.vocab_size


def time_ms(fn, repeats: int = 50) -> float:
    """Wall time per call, each call waiting for its ids on the host as the engine does."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def defaults_step(logits: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A decode step's sampling with XVERSE's defaults for logits' rows, each sequence with 600 seen tokens: marks
    the ids the step feeds, then samples."""
    batch, device = logits.shape[0], logits.device
    seen, request_ids = SeenTokens(VOCAB, device), [f"r{i}" for i in range(batch)]
    for i, request_id in enumerate(request_ids):
        seen.start(request_id, list(range(i, i + 600)))
    step_ids = torch.arange(batch, device=device)
    spans = [(request_id, i, i + 1) for i, request_id in enumerate(request_ids)]  # a decode step's marks
    rows = [SamplingRow(XVERSE_SAMPLING) for _ in range(batch)]

    def step() -> torch.Tensor:
        seen.record(step_ids, spans)
        return sample(logits, rows, seen.rows(request_ids))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--profile-batch", type=int, default=64, help="the batch whose kernels are listed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(device), "rows": []}
    print("| batch | greedy ms | XVERSE defaults ms |")
    print("|---|---|---|")
    for batch in args.batches:
        logits = torch.randn(batch, VOCAB, device=device) * 3
        greedy_rows = [SamplingRow(GREEDY) for _ in range(batch)]
        greedy_ms = time_ms(lambda: sample(logits, greedy_rows).tolist())
        with_defaults = defaults_step(logits)
        default_ms = time_ms(lambda: with_defaults().tolist())
        results["rows"].append({"batch": batch, "greedy_ms": greedy_ms, "xverse_defaults_ms": default_ms})
        print(f"| {batch} | {greedy_ms:.3f} | {default_ms:.3f} |", flush=True)
    with_defaults = defaults_step(torch.randn(args.profile_batch, VOCAB, device=device) * 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(20):
            with_defaults()
    table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table)
    results[f"profile_batch_{args.profile_batch}"] = table
    write_results(results, args.out)


if __name__ == "__main__":
    main()
