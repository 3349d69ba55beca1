"""Quantized weights (--quantize int8 / int4) and 8-bit KV caches (--kv-cache-dtype int8 / fp8) on random
weights of the exact XVERSE-7B shape: memory, speed and error, in one run.

    python bench/quant_bench.py --out bench/results/quant_h200.json            # a few minutes on an H100 or H200
    python bench/quant_bench.py --quick --out /tmp/quant.json                  # shorter runs, fewer kernel shapes

No download: the random bf16 checkpoint (bench/random_checkpoint.py's, 14.6 GB of safetensors) is written to
--checkpoint-dir once (or pass --model-path), and every configuration loads it as `python api.py` does, shard
by shard, quantizing each tensor as it arrives. For each configuration:
- weights: GiB on the device after load, and the peak while loading (never the bf16 model for int8/int4);
- KV pool: tokens it holds when planned as the server plans it (--gpu-memory-utilization 0.9), memory with it;
- speed: one request's decode tokens/s (512-token prompt), and the output tokens/s of 64 requests at once;
- error: relative error of the logits (float32, last 64 positions of a 512-token prompt) against bf16 weights
  with a bf16 cache, and how often the top token agrees.
"int8 + CUTLASS", "int4 + CUTLASS" and "fp8 + CUTLASS" (only when named in --configs) load the format again with
XVERSE_CUTLASS=1: CUTLASS's GEMMs among the tuning candidates (Hopper, nvcc and the nvidia-cutlass wheel). The
other configurations load as the server does, with XVERSE_CUTLASS as the environment has it (auto: CUTLASS where it
builds); `XVERSE_CUTLASS=0 python bench/quant_bench.py --configs bf16 int8 "int8 + CUTLASS"` compares without and
with in one run.
Then the capped runs: the process limited to 10 GiB (int8 weights) and 6 GiB (int4) with
torch.cuda.set_per_process_memory_fraction, loading, planning and serving inside the cap with an int8 cache and
--max-model-len 2048 (the cap covers the CUDA context too, as on a real card; the step limits are
--capped-max-batched-tokens and --capped-max-num-seqs: quant_h200.json used 1024 and 16), and how many
concurrent 2K-token conversations fit;
that many are served at once, each 1,536 prompt + 512 new tokens.
And the kernels: each quantized matmul candidate (Triton gemv / gemm, dequantize + cuBLAS, torch's int8 op,
torch's int4 tinygemm op on a converted copy) against bf16 cuBLAS at M = 1, 64, 512, for each layer shape,
and the per-M choices the start-up tuning made.

Every configuration runs in its own try/except: a failure is recorded in the JSON and the next one runs.
`--device cpu --tiny` runs the same code on a tiny checkpoint on the CPU (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from common import (
    BLOCK_SIZE,
    PROJECTION_SHAPES,
    GcPauses,
    allocator_events,
    copy_bandwidth,
    engine_like_server,
    prompts,
    release_engines,
    run_engine,
    slowest_steps,
    write_results,
)
from gpu_monitor import GpuMonitor

from xverse_serve.engine.block_allocator import blocks_needed
from xverse_serve.engine.engine import Engine
from xverse_serve.engine.memory_plan import kv_cache_tokens_for_card, measure_step_peaks
from xverse_serve.engine.messages import SamplingParams
from xverse_serve.engine.runner import ModelRunner
from xverse_serve.engine.scheduler import ScheduledSequence, Sequence
from xverse_serve.kernels import cutlass_mixed
from xverse_serve.model import quantization, tuner
from xverse_serve.model.checkpoint import load_config
from xverse_serve.model.kv_cache import KVCache
from xverse_serve.model.quantization import (
    MatmulKernel,
    QuantizedLinear,
    candidates,
    reference_matmul,
    relative_error,
)
from xverse_serve.model.tuner import time_call
from xverse_serve.model.xverse import XverseForCausalLM, load_model
from xverse_serve.settings import Settings

GiB = 2**30
KV_DTYPES = {"auto": None, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
# (name, --quantize, --kv-cache-dtype); the first is the reference for the logit error.
CONFIGS = [("bf16", "none", "auto"), ("bf16 + int8 KV", "none", "int8"), ("bf16 + fp8 KV", "none", "fp8"),
           ("int8", "int8", "auto"), ("int4", "int4", "auto"), ("fp8", "fp8", "auto"),
           ("fp8 + fp8 KV", "fp8", "fp8"),  # against "bf16 + fp8 KV": the same cache dtype
           # loaded and tuned with XVERSE_CUTLASS=1: CUTLASS's GEMMs among the candidates (Hopper, nvcc, nvidia-cutlass)
           ("int8 + CUTLASS", "int8", "auto"), ("int4 + CUTLASS", "int4", "auto"), ("fp8 + CUTLASS", "fp8", "auto")]
CUTLASS = " + CUTLASS"
CAPPED = [("int8, 10 GiB", "int8", 10.0), ("int4, 6 GiB", "int4", 6.0)]
ERROR_PROMPT_LEN, ERROR_POSITIONS = 512, 64


def cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def sync(device: torch.device) -> None:
    if cuda(device):
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / GiB if cuda(device) else 0.0


def peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GiB if cuda(device) else 0.0


def reset_peak(device: torch.device) -> None:
    if cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


@torch.inference_mode()
def prompt_logits(model: XverseForCausalLM, ids: list[int], kv_dtype: torch.dtype | None) -> torch.Tensor:
    """float32 logits at the last ERROR_POSITIONS positions of one prefill of `ids`, on the CPU."""
    blocks = blocks_needed(len(ids), BLOCK_SIZE)
    kv_cache = KVCache(model.config, blocks, BLOCK_SIZE, kv_dtype or model.dtype, model.device)
    runner = ModelRunner(model, kv_cache)
    seq = Sequence("error", list(ids), SamplingParams(max_tokens=1))
    seq.block_table = list(range(blocks))
    input_ids, positions, batch = runner.prepare([ScheduledSequence(seq, len(ids))])
    hidden = model(input_ids, positions, kv_cache.layers, batch)
    return model.compute_logits(hidden[-ERROR_POSITIONS:]).float().cpu()


def write_random_checkpoint(folder: Path, tiny: bool, device: torch.device) -> None:
    """Runs random_checkpoint.py (its shard sizes, seed 0) to write the checkpoint every configuration loads."""
    script = Path(__file__).with_name("random_checkpoint.py")
    subprocess.run([sys.executable, str(script), str(folder), "--device", str(device), *(["--tiny"] if tiny else [])],
                   check=True)


def load(model_dir: Path, device: torch.device, dtype: torch.dtype, quantize: str) -> tuple[XverseForCausalLM, dict]:
    release_engines()
    reset_peak(device)
    before = allocated(device)
    started = time.perf_counter()
    model = load_model(model_dir, load_config(model_dir), device, dtype, 8192, quantize)
    sync(device)
    # A decode step streams every weight but the embedding table, of which it reads one row per token.
    streamed = quantization.quantized_bytes(model) - quantization.quantized_bytes(model.model.embed_tokens)
    facts = {"load_s": time.perf_counter() - started, "weights_GiB": quantization.quantized_bytes(model) / GiB,
             "streamed_weights_GiB": streamed / GiB,
             "allocated_after_load_GiB": allocated(device) - before, "peak_while_loading_GiB": peak(device) - before}
    return model, facts


def serve(model: XverseForCausalLM, settings: Settings) -> tuple[Engine, dict]:
    """Our engine as the server builds it from `settings` (common.engine_like_server), and what its plan found."""
    device = model.device
    release_engines()
    started = time.perf_counter()
    served = engine_like_server(model, settings)
    sync(device)
    engine, kv_tokens = served.engine, served.kv_cache_tokens
    facts = {} if served.peaks is None else {"activation_peak_GiB": served.peaks.prefill / GiB,
                                             "decode_graph_pool_GiB": served.peaks.decode / GiB}
    bytes_per_token = KVCache.bytes_per_token(model.config, engine.runner.kv_cache.dtype)
    facts.update({"startup_s": time.perf_counter() - started, "kv_cache_tokens": kv_tokens,
                  "kv_bytes_per_token": bytes_per_token, "kv_cache_GiB": kv_tokens * bytes_per_token / GiB,
                  "full_8k_contexts": kv_tokens / engine.max_model_len,
                  "concurrent_2k_conversations": kv_tokens // 2048, "allocated_with_kv_pool_GiB": allocated(device)})
    return engine, facts


def measure_speed(engine: Engine, vocab: int, args: argparse.Namespace) -> dict:
    """One request, then `requests` at once, `repeats` times over (new prompts each time, so that no prefix is
    cached): the medians, and every run's figure beside them (a 64-request run is a few seconds, and one alone
    moved by up to 15% between runs of the same code). The many-request run in two parts: until every request has
    its first token (the prompts' prefills, with the first decode steps among them), and after."""
    device = engine.runner.device
    reset_peak(device)
    n = args.requests
    runs: dict[str, list[float]] = {"ttft_ms": [], "decode_tok_s": [], f"throughput_{n}_tok_s": [],
                                    f"first_tokens_{n}_s": [], f"first_tokens_{n}_gpu_wait_s": [],
                                    f"after_first_tokens_{n}_s": []}
    # the card's clocks and power meanwhile (gpu_monitor.py: why), the garbage collector's pauses, the allocator's
    # trips to the driver, each many-request run's slowest steps and its waits for the GPU: where a slow run lost time
    slowest: list[list[tuple[int, float, float]]] = []
    allocator_before = allocator_events(device)
    with GpuMonitor(device.index or 0) as monitor, GcPauses() as pauses:
        for run in range(args.repeats):
            seed = 1 + 1000 * run
            single = run_engine(engine, prompts(1, args.prompt_len, vocab, seed), args.output_len)
            many = run_engine(engine, prompts(n, args.prompt_len, vocab, seed + n), args.output_len)
            slowest.append(slowest_steps(many["step_s"], many["wait_s"]))
            prompt_steps = [i for i, at in enumerate(itertools.accumulate(many["step_s"])) if at <= many["ttft"][-1]]
            runs[f"first_tokens_{n}_gpu_wait_s"].append(sum(many["wait_s"][i] for i in prompt_steps))
            runs["ttft_ms"].append(single["ttft"][0] * 1e3)
            runs["decode_tok_s"].append((args.output_len - 1) / (single["last"][0] - single["ttft"][0]))
            runs[f"throughput_{n}_tok_s"].append(many["tokens"] / many["seconds"])
            runs[f"first_tokens_{n}_s"].append(many["ttft"][-1])
            runs[f"after_first_tokens_{n}_s"].append(many["seconds"] - many["ttft"][-1])
    facts = {key: statistics.median(values) for key, values in runs.items()}
    facts.update({f"{key}_runs": values for key, values in runs.items()})
    gpu = monitor.summary() if cuda(device) else {}
    allocator = {name: count - allocator_before[name] for name, count in allocator_events(device).items()}
    return {**facts, "preemptions": engine.scheduler.num_preemptions, "peak_serving_GiB": peak(device), "gpu": gpu,
            "gc": pauses.summary(), "allocator": allocator, f"slowest_steps_{n}_runs": slowest}


def run_configs(model_dir: Path, device: torch.device, args: argparse.Namespace, results: dict) -> None:
    vocab = load_config(model_dir).vocab_size
    error_ids = prompts(1, ERROR_PROMPT_LEN, vocab, 7)[0]
    reference: torch.Tensor | None = None
    cutlass_setting = os.environ.get("XVERSE_CUTLASS")  # the server's, for the configurations without "+ CUTLASS"
    for quantize, with_cutlass in itertools.product(("none", "int8", "int4", "fp8"), (False, True)):
        # the CUTLASS configurations only when named: they need nvcc and a Hopper card, and take minutes to build
        configs = [c for c in CONFIGS if c[1] == quantize and c[0].endswith(CUTLASS) == with_cutlass
                   and (c[0] in args.configs if args.configs is not None else not with_cutlass)]
        if not configs:
            continue
        # read as the tuner builds its candidates
        if with_cutlass:
            os.environ["XVERSE_CUTLASS"] = "1"
        elif cutlass_setting is None:
            os.environ.pop("XVERSE_CUTLASS", None)
        else:
            os.environ["XVERSE_CUTLASS"] = cutlass_setting
        try:
            model, load_facts = load(model_dir, device, torch.bfloat16 if cuda(device) else torch.float32, quantize)
        except Exception as exc:
            for name, _, _ in configs:
                results["configs"][name] = {"error": f"loading: {type(exc).__name__}: {exc}"}
            write_results(results, args.out)
            continue
        for name, _, kv_name in configs:
            print(f"--- {name}", flush=True)
            entry: dict = {"quantize": quantize, "kv_cache_dtype": kv_name, **load_facts}
            results["configs"][name] = entry
            engine = None
            try:
                kv_dtype = KV_DTYPES[kv_name]
                logits = prompt_logits(model, error_ids, kv_dtype)
                if reference is None:
                    reference = logits
                entry["logit_relative_error"] = relative_error(logits, reference)
                entry["top1_agreement"] = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
                engine, facts = serve(model, Settings(gpu_memory_utilization=args.gpu_memory_utilization,
                                                      max_num_seqs=args.max_num_seqs, kv_cache_dtype=kv_name))
                entry.update(facts)
                entry.update(measure_speed(engine, vocab, args))
                entry.update(roofline(entry, args, results.get("copy_bandwidth_GBps")))
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            del engine
            release_engines()
            print(json.dumps(entry), flush=True)
            write_results(results, args.out)
        if quantize != "none" and cuda(device):
            results["matmul_tuning"].update(tuning_table(model))
        del model
        release_engines()
        write_results(results, args.out)


def tuning_table(model: XverseForCausalLM) -> dict:
    """The start-up tuning's choices and timings for this model's layer shapes (called while XVERSE_CUTLASS is as
    it was for the tuning)."""
    table = {}
    without = "" if cutlass_mixed.enabled() else ", without CUTLASS"
    for layer in model.modules():
        if not isinstance(layer, QuantizedLinear) or layer.plan is None:
            continue
        table.setdefault(f"{layer.scheme} {layer.out_features}x{layer.in_features} {model.dtype}{without}", {
            "plan": [[m, str(kernel)] for m, kernel in layer.plan],
            "timings_ms": {str(m): t for m, t in tuner.TIMINGS.get(tuner.plan_key(layer, model.dtype), {}).items()},
        })
    return table


def run_capped(model_dir: Path, device: torch.device, args: argparse.Namespace, results: dict) -> None:
    total = torch.cuda.get_device_properties(device).total_memory
    vocab = load_config(model_dir).vocab_size
    for name, quantize, budget in CAPPED:
        print(f"--- capped: {name}", flush=True)
        entry: dict = {"quantize": quantize, "kv_cache_dtype": "int8", "budget_GiB": budget,
                       "max_batched_tokens": args.capped_max_batched_tokens, "max_num_seqs": args.capped_max_num_seqs,
                       "max_model_len": args.capped_max_model_len}
        results["capped"][name] = entry
        model = engine = None
        fraction = budget * GiB / total
        index = device.index if device.index is not None else torch.cuda.current_device()  # the cap wants an index
        try:
            release_engines()
            torch.cuda.set_per_process_memory_fraction(fraction, index)
            model, load_facts = load(model_dir, device, torch.bfloat16, quantize)
            entry.update(load_facts)
            # mem_get_info sees the whole card; the planner gets the cap as its utilization of it (as memory_cap.py).
            peaks = measure_step_peaks(model, args.capped_max_num_seqs, args.capped_max_batched_tokens,
                                       args.capped_max_model_len, BLOCK_SIZE, torch.int8)
            entry["kv_cache_tokens_if_bf16_kv"] = kv_cache_tokens_for_card(model, fraction * 0.98, peaks, True,
                                                                           torch.bfloat16)
            engine, facts = serve(model, Settings(
                gpu_memory_utilization=fraction * 0.98, max_num_seqs=args.capped_max_num_seqs,
                max_batched_tokens=args.capped_max_batched_tokens, max_model_len=args.capped_max_model_len,
                kv_cache_dtype="int8"))
            entry.update(facts)
            entry["concurrent_2k_conversations_if_bf16_kv"] = entry["kv_cache_tokens_if_bf16_kv"] // 2048
            single = run_engine(engine, prompts(1, args.prompt_len, vocab, 1), args.output_len)
            entry["decode_tok_s"] = (args.output_len - 1) / (single["last"][0] - single["ttft"][0])
            conversations = min(entry["concurrent_2k_conversations"], args.capped_max_num_seqs)
            if conversations:
                reset_peak(device)
                run = run_engine(engine, prompts(conversations, 1536, vocab, 11), 512)
                entry["served"] = {"conversations": conversations, "prompt_tokens": 1536, "new_tokens": 512,
                                   "tok_s": run["tokens"] / run["seconds"], "seconds": run["seconds"],
                                   "preemptions": engine.scheduler.num_preemptions,
                                   "peak_allocated_GiB": peak(device),
                                   "peak_reserved_GiB": torch.cuda.max_memory_reserved(device) / GiB}
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        del engine, model
        release_engines()
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        print(json.dumps(entry), flush=True)
        write_results(results, args.out)


def tinygemm(layer: QuantizedLinear):
    """torch's int4 op (tinygemm) on a converted copy of an int4 layer, or None where this build lacks it."""
    q = quantization.unpack_int4(layer.weight)
    scale = layer.weight_scale.to(torch.bfloat16).t().contiguous()
    zero = (layer.weight_offset.float() + 8 * layer.weight_scale.float()).to(torch.bfloat16).t().contiguous()
    scales_and_zeros = torch.stack((scale, zero), dim=-1)  # [K / group, N, 2]: w = (q - 8) * scale + zero
    packed = torch._convert_weight_to_int4pack((q[:, 0::2] << 4) | q[:, 1::2], 8)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x, packed, layer.group_size, scales_and_zeros)

    return run


def bench_kernels(device: torch.device, args: argparse.Namespace, results: dict) -> None:
    """Each matmul candidate at M = 1, 64, 512 for each layer shape, with bf16 cuBLAS beside it."""
    flush = torch.empty(tuner.L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    shapes = PROJECTION_SHAPES
    if args.quick:
        shapes = {name: shapes[name] for name in ("o_proj", "gate_up_proj")}
    gen = torch.Generator(device=device).manual_seed(0)
    for scheme in ("int8", "int4"):
        for name, (n, k) in shapes.items():
            if name == "lm_head" and scheme == "int4":
                continue  # the lm_head is int8 in both modes
            entry = results["kernels"].setdefault(f"{scheme} {name} {n}x{k}", {})
            try:
                dense = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
                layer = QuantizedLinear(k, n, scheme).to(device)
                layer.load_rows(0, dense)
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
                continue
            extra = {}
            if scheme == "int4":
                try:
                    extra["tinygemm"] = tinygemm(layer)
                except Exception as exc:  # this build's int4 op may want another layout or be missing
                    entry["tinygemm"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            for m in (1, 64, 512):
                row = entry.setdefault(str(m), {})
                x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
                reference = reference_matmul(x, layer)
                row["bf16 cuBLAS"] = time_call(lambda: torch.nn.functional.linear(x, dense), flush, 30)
                kernels = {str(kernel): (lambda kernel=kernel: kernel(x, layer)) for kernel in
                           candidates(layer, m) + [MatmulKernel("dequantize")] * (m == 1)}
                kernels.update({label: (lambda fn=fn: fn(x)) for label, fn in extra.items()})
                for label, fn in kernels.items():
                    try:
                        error = relative_error(fn(), reference)
                        if error > 2e-2:
                            row[label] = f"wrong: relative error {error:.3g}"
                            continue
                        row[label] = time_call(fn, flush, 30)
                    except Exception as exc:
                        row[label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                weight_bytes = quantization.quantized_bytes(layer)
                timed = {label: ms for label, ms in row.items() if isinstance(ms, float) and label != "bf16 cuBLAS"}
                if timed:
                    best = min(timed, key=timed.get)
                    row["best"] = best
                    row["best_weight_GBps"] = weight_bytes / (timed[best] * 1e-3) / 1e9
                row["bf16_weight_GBps"] = 2 * n * k / (row["bf16 cuBLAS"] * 1e-3) / 1e9
            write_results(results, args.out)


def roofline(entry: dict, args: argparse.Namespace, bandwidth_gbps: float | None) -> dict:
    """The format's own bound for one request's decode: each step reads the streamed weights and the cache of its
    context (on average the prompt and half the answer) at the card's measured copy bandwidth."""
    if not bandwidth_gbps:
        return {}
    context = args.prompt_len + args.output_len / 2
    step_bytes = entry["streamed_weights_GiB"] * GiB + context * entry["kv_bytes_per_token"]
    bound = bandwidth_gbps * 1e9 / step_bytes
    return {"roofline_decode_tok_s": bound, "roofline_share": entry["decode_tok_s"] / bound}


def print_tables(results: dict) -> None:
    requests = results["args"]["requests"]
    requests_key = f"throughput_{requests}_tok_s"
    print("\n| configuration | weights GiB | peak while loading GiB | KV pool tokens (GiB) | with the KV pool GiB "
          f"| decode tok/s, 1 request (share of its roofline) | output tok/s, {requests} requests "
          "| logit rel. error vs bf16 | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, e in results["configs"].items():
        if "error" in e and "decode_tok_s" not in e:
            print(f"| {name} | {e.get('error')} |")
            continue
        print(f"| {name} | {e['weights_GiB']:.2f} | {e['peak_while_loading_GiB']:.2f} | {e['kv_cache_tokens']:,} "
              f"({e['kv_cache_GiB']:.1f}) | {e['allocated_with_kv_pool_GiB']:.2f} | {e['decode_tok_s']:.1f} "
              f"({e.get('roofline_share', float('nan')):.0%}) | "
              f"{e[requests_key]:.0f} | {e['logit_relative_error']:.4f} | {e['top1_agreement']:.3f} |")
    for name, e in results["capped"].items():
        if "error" in e:
            print(f"capped {name}: {e['error']}")
            continue
        served = e.get("served", {})
        print(f"capped {name}: weights {e['weights_GiB']:.2f} GiB, decode {e.get('decode_tok_s', 0):.0f} tok/s, "
              f"KV {e['kv_cache_tokens']:,} tokens (int8) = "
              f"{e['concurrent_2k_conversations']} concurrent 2K conversations "
              f"({e['concurrent_2k_conversations_if_bf16_kv']} with a bf16 cache); served {served.get('conversations')}"
              f" at {served.get('tok_s', 0):.0f} tok/s, {served.get('preemptions')} preemptions, "
              f"peak {served.get('peak_allocated_GiB', 0):.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None, help="an XVERSE-7B-shaped checkpoint folder")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/xverse-random-7b"),
                        help="where the random checkpoint is written (kept for later runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (smoke test, e.g. on CPU)")
    parser.add_argument("--quick", action="store_true", help="64 new tokens, fewer kernel shapes")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="speed runs per configuration (medians reported)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--capped-max-batched-tokens", type=int, default=2048)
    parser.add_argument("--capped-max-num-seqs", type=int, default=64)
    parser.add_argument("--capped-max-model-len", type=int, default=2048, help="the conversations are 2K tokens")
    parser.add_argument("--skip", nargs="*", default=[], choices=["configs", "capped", "kernels"])
    parser.add_argument("--configs", nargs="*", default=None, choices=[c[0] for c in CONFIGS],
                        help="only these configurations (default all; the first, bf16, is the logit reference)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.output_len = 64
    device = torch.device(args.device)
    results: dict = {"device": torch.cuda.get_device_name(device) if cuda(device) else "cpu",
                     "torch": torch.__version__, "args": vars(args), "configs": {}, "capped": {}, "kernels": {},
                     "matmul_tuning": {}}
    if cuda(device):
        results["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9
        results["capability"] = list(torch.cuda.get_device_capability(device))

    model_dir = args.model_path
    if model_dir is None:
        model_dir = args.checkpoint_dir
        if args.tiny:
            model_dir = model_dir.with_name(model_dir.name + "-tiny")
        if not (model_dir / "model.safetensors.index.json").is_file():
            started = time.perf_counter()
            write_random_checkpoint(model_dir, args.tiny, device)
            results["checkpoint_write_s"] = time.perf_counter() - started
    results["model_path"] = str(model_dir)

    started = time.perf_counter()
    if "configs" not in args.skip:
        run_configs(model_dir, device, args, results)
    if "capped" not in args.skip and cuda(device):
        run_capped(model_dir, device, args, results)
    if "kernels" not in args.skip and cuda(device):
        bench_kernels(device, args, results)
    results["bench_s"] = time.perf_counter() - started
    write_results(results, args.out)
    print_tables(results)


if __name__ == "__main__":
    sys.exit(main())
