"""One-sequence decode steps of each weight format under each family of one-row kernels (model/one_row.py):
kernels.gemv's fused float GEMVs ("gemv"), kernels.dp4a_gemv's fused integer ones ("dp4a"), or each projection's
tuned kernel through the general path ("tuned"), against bf16, on an XVERSE-7B-shaped checkpoint (the one
quant_bench.py writes: random_checkpoint.py's). Each row: the decode graph's replay and a whole engine step at a
512-token context, and whether the start-up tuner chose that family; with --profile, the kernels of the graph by
name (calls and µs per step); with --pdl both, each family with and without programmatic dependent launch
(kernels.pdl), in the same process.

    python bench/one_row_bench.py --out bench/results/one_row_h200.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import (
    BLOCK_SIZE,
    GREEDY,
    abort_all,
    prompts,
    replay_ms,
    start_decoding,
    wall_ms,
    write_results,
)
from kernel_profile import kernel_table
from quant_bench import free_memory, write_random_checkpoint
from torch.profiler import ProfilerActivity, profile

from xverse_serve.engine.config import CacheConfig, SchedulerConfig
from xverse_serve.engine.loader import assemble_engine
from xverse_serve.kernels import pdl
from xverse_serve.model.checkpoint import load_config
from xverse_serve.model.quantization import QuantizedLinear
from xverse_serve.model.tuner import TIMINGS, one_row_options, plan_key
from xverse_serve.model.xverse import XverseForCausalLM, load_model

FAMILIES = {"none": ("gemv",), "int8": ("gemv", "dp4a", "tuned"), "int4": ("dp4a", "dp4a_one_part", "tuned"),
            "fp8": ("gemv", "tuned")}
MAX_MODEL_LEN = 2048
PROFILED_REPLAYS = 20


def projections(model: XverseForCausalLM) -> list:
    return [projection for layer in model.model.layers for projection in layer.projections()]


def decode_step(model: XverseForCausalLM, family: str, context: int, steps: int, profiled: bool) -> dict:
    """The decode graph's replay and an engine step, in ms, with every projection's one-row family set; with
    `profiled`, the kernels of the graph's replays by name (torch.profiler sees each kernel a graph launches)."""
    for projection in projections(model):
        projection.one_row = None if family == "tuned" else family
        if isinstance(projection, QuantizedLinear):  # the family's fastest shape for this projection, as tune sets
            timings = TIMINGS.get(plan_key(projection, torch.bfloat16), {}).get(1, {})
            projection.one_row_options = one_row_options(timings, projection.one_row)
    model.__dict__.pop("one_row_ready", None)  # a cached_property
    engine = assemble_engine(model, CacheConfig(MAX_MODEL_LEN // BLOCK_SIZE + 64, BLOCK_SIZE),
                             SchedulerConfig(max_num_seqs=1, max_batched_tokens=4096), MAX_MODEL_LEN,
                             cuda_graphs=True)
    start_decoding(engine, prompts(1, context, model.config.vocab_size, 0), GREEDY, "decode-")
    wall_ms(engine.step, 3)
    step_ms = wall_ms(engine.step, steps)
    graph = engine.runner.graphs.graphs[1]  # still holding the last step's inputs
    graph_ms = replay_ms(graph)
    kernels = None
    if profiled:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            wall_ms(graph.replay, PROFILED_REPLAYS)
        kernels = kernel_table(prof, PROFILED_REPLAYS)
    abort_all(engine)
    del engine
    free_memory(model.device)
    return {"graph_ms": graph_ms, "step_ms": step_ms, "tok_s": 1e3 / step_ms, "kernels": kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/xverse-random-7b"))
    parser.add_argument("--formats", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="each graph's kernels by name, µs per step")
    parser.add_argument("--pdl", choices=("on", "off", "both"), default="on",
                        help="programmatic dependent launch (kernels.pdl; Hopper and newer): on, off, or both")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    if not (args.checkpoint_dir / "config.json").is_file():
        write_random_checkpoint(args.checkpoint_dir, False, device)
    config = load_config(args.checkpoint_dir)
    results = {"device": torch.cuda.get_device_name(device), "context": args.context, "rows": []}
    print(f"{results['device']}, one sequence at {args.context} tokens")
    print("| weights | one-row kernels | PDL | tuner's choice | graph replay ms | engine step ms | tok/s | vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    bf16_step: dict[bool, float] = {}
    launches = {"on": (True,), "off": (False,), "both": (False, True)}[args.pdl]
    for quantize in args.formats:
        model = load_model(args.checkpoint_dir, config, device, torch.bfloat16, MAX_MODEL_LEN, quantize)
        chosen = projections(model)[0].one_row or "tuned"
        for family, on in [(family, on) for family in FAMILIES[quantize] for on in launches]:
            pdl.ENABLED = on  # read at each launch, so the graphs captured next take it
            row = {"quantize": quantize, "family": family, "pdl": on, "tuner_chose": family == chosen}
            try:
                row.update(decode_step(model, family, args.context, args.steps, args.profile))
            except Exception as exc:  # one family failing leaves the others to measure
                row["error"] = f"{type(exc).__name__}: {exc}"
                print(f"| {quantize} | {family} | {'on' if on else 'off'} | {row['error'][:200]} |", flush=True)
                results["rows"].append(row)
                continue
            if quantize == "none":
                bf16_step[on] = row["step_ms"]
            baseline = bf16_step.get(on)  # bf16 launched the same way
            row["vs_bf16"] = baseline / row["step_ms"] if baseline else None
            results["rows"].append(row)
            ratio = f"{row['vs_bf16']:.2f}x" if row["vs_bf16"] else "-"
            print(f"| {quantize} | {family} | {'on' if on else 'off'} | {'yes' if row['tuner_chose'] else ''} "
                  f"| {row['graph_ms']:.3f} "
                  f"| {row['step_ms']:.3f} | {row['tok_s']:.1f} | {ratio} |", flush=True)
            for kernel in (row["kernels"] or [])[:16]:
                print(f"|  | {kernel['kernel'][:60]} | {kernel['calls']:.0f} calls | {kernel['us']:.1f} µs |",
                      flush=True)
        del model
        free_memory(device)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
