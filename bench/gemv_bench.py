"""One-row projections (a one-sequence decode step): cuBLAS (F.linear) against triton_gemv.gemv on XVERSE-7B's
weight shapes, bf16, with a cold L2 cache before every call (as in a decode step, where each weight is read
once). Sweeps the GEMV's block shapes and prints the fastest beside the configuration the module uses.

    python bench/gemv_bench.py --out bench/results/gemv_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xverse_serve import triton_gemv  # noqa: E402

SHAPES = {"qkv_proj": (12288, 4096), "o_proj": (4096, 4096), "gate_up_proj": (22016, 4096),
          "down_proj": (4096, 11008), "lm_head": (100534, 4096)}
PER_TOKEN = {"qkv_proj": 32, "o_proj": 32, "gate_up_proj": 32, "down_proj": 32, "lm_head": 1}
SWEEP = [(n, k, w, s) for n in (4, 8, 16) for k in (256, 512, 1024) for w in (4, 8) for s in (1, 2, 3)
         if n * k <= 8192]


def cold_time_us(fn, flush: torch.Tensor, repeats: int = 30) -> float:
    """Median time of fn() in µs, with L2 overwritten (a 256 MB memset) before each call."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    fn()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) * 1000 for start, end in zip(starts, ends))
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    flush = torch.empty(64 * 1024 * 1024, device=device)
    results = {"device": torch.cuda.get_device_name(device), "shapes": {}}
    totals = {"cuBLAS": 0.0, "gemv (module's config)": 0.0, "gemv (best of sweep)": 0.0}
    print("| weight | cuBLAS µs (TB/s) | gemv, module's config µs (TB/s) | best of sweep µs | best config |")
    print("|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        gen = torch.Generator(device=device).manual_seed(n)
        weight = torch.randn(n, k, device=device, generator=gen).to(torch.bfloat16)
        x = torch.randn(1, k, device=device, generator=gen).to(torch.bfloat16)
        reference = x.float() @ weight.float().T
        errors, timings = {}, {}
        for config in [None, *SWEEP]:
            out = triton_gemv.gemv(x, weight, config)
            errors[str(config)] = ((out.float() - reference).norm() / reference.norm()).item()
            timings[str(config)] = cold_time_us(lambda: triton_gemv.gemv(x, weight, config), flush)
        cublas = cold_time_us(lambda: F.linear(x, weight), flush)
        best = min((t, c) for c, t in timings.items() if c != "None")
        gigabytes = n * k * 2 / 1e9
        results["shapes"][name] = {"n": n, "k": k, "cublas_us": cublas, "module_us": timings["None"],
                                   "module_config": list(triton_gemv.CONFIGS.get((n, k), triton_gemv.DEFAULT_CONFIG)),
                                   "best_us": best[0], "best_config": best[1], "timings_us": timings,
                                   "max_rel_error": max(errors.values())}
        for label, value in (("cuBLAS", cublas), ("gemv (module's config)", timings["None"]),
                             ("gemv (best of sweep)", best[0])):
            totals[label] += value * PER_TOKEN[name]
        print(f"| {name} {n}×{k} | {cublas:.1f} ({gigabytes / cublas * 1e3:.2f}) | {timings['None']:.1f} "
              f"({gigabytes / timings['None'] * 1e3:.2f}) | {best[0]:.1f} | {best[1]} |", flush=True)
    results["per_token_ms"] = {label: value / 1000 for label, value in totals.items()}
    print("projections of one decode step, ms: " + ", ".join(f"{k} {v / 1000:.2f}" for k, v in totals.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
