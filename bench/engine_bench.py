"""Offline engine benchmark on random weights of the exact XVERSE-7B shape, beside transformers' generate.

One command on any CUDA machine, no download:
    python bench/engine_bench.py --kv-cache-dtype auto int8 fp8 --out bench/results/engine_h100.json
Measures, in one run: device copy bandwidth (-> the weight-streaming roofline for one request) and matmul rate
(-> card_bound.py's bound for each batch), one request (time to first token for a 512-token prompt, decode
tokens/s), offline throughput for several numbers of concurrent requests (512-token prompts, 256 output tokens,
end-of-text ignored), and transformers' LlamaForCausalLM.generate on the same weights. Ours is built as
`python api.py` builds it (common.engine_like_server), once for each --kv-cache-dtype in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from card_bound import bound_tok_s, model_shape
from common import (
    WEIGHT_BYTES,
    XVERSE_7B,
    copy_bandwidth,
    engine_like_server,
    prompts,
    random_model,
    release_engines,
    run_engine,
    write_results,
)
from triton.testing import do_bench

from xverse_serve.engine.loader import resolve_kv_cache_dtype
from xverse_serve.model.checkpoint import ModelConfig
from xverse_serve.model.xverse import XverseForCausalLM, checkpoint_tensors
from xverse_serve.settings import Settings

TTFT_REPEATS = 5  # one-request TTFT: the median of this many new 512-token prompts


def hf_model_sharing(model: XverseForCausalLM, config: ModelConfig):
    """transformers' LlamaForCausalLM over the very same weight tensors (no copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        torch_dtype=model.lm_head.weight.dtype, attn_implementation="sdpa",
    )
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_config)
    ours = checkpoint_tensors(model)
    for name, _ in list(hf.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        setattr(hf.get_submodule(module_name), attr, torch.nn.Parameter(ours[name], requires_grad=False))
    with model.lm_head.weight.device:
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config)
    return hf.eval()


@torch.inference_mode()
def run_hf(hf, batch: list[list[int]], max_tokens: int) -> dict:
    input_ids = torch.tensor(batch, device=hf.lm_head.weight.device)
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=1)
    hf.generate(input_ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=1)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = hf.generate(input_ids, **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": (out.shape[1] - input_ids.shape[1]) * out.shape[0]}


def matmul_rate(device: torch.device, dtype: torch.dtype, rows: int, config: ModelConfig) -> float:
    """FLOP/s of a prefill step's largest matmul (gate and up projections of `rows` tokens), median of many."""
    a = torch.randn(rows, config.hidden_size, device=device, dtype=dtype)
    b = torch.randn(config.hidden_size, 2 * config.intermediate_size, device=device, dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (ms * 1e-3)


def bench_ours(model: XverseForCausalLM, settings: Settings, args: argparse.Namespace) -> dict:
    """Our engine with its KV pool sized as the server sizes it: one request, then each concurrency."""
    config = model.config
    started = time.perf_counter()
    served = engine_like_server(model, settings)
    engine = served.engine
    results: dict = {"kv_cache_dtype": str(engine.runner.kv_cache.dtype).removeprefix("torch."),
                     "startup_s": time.perf_counter() - started, "kv_cache_tokens": served.kv_cache_tokens,
                     "activation_peak_GiB": {"prefill": served.peaks.prefill / 2**30,
                                             "decode": served.peaks.decode / 2**30}}
    label = f"[{results['kv_cache_dtype']} cache]"
    print(f"{label} KV pool: {served.kv_cache_tokens} tokens; memory plan and graph capture "
          f"{results['startup_s']:.1f} s", flush=True)

    single = run_engine(engine, prompts(1, args.prompt_len, config.vocab_size, 1), args.output_len)
    decode_seconds = single["last"][0] - single["ttft"][0]
    # The first request alone moved between runs (14-43 ms on an H100); the median of several new prompts does not.
    ttfts = [single["ttft"][0]] + [
        run_engine(engine, prompts(1, args.prompt_len, config.vocab_size, seed), 1)["ttft"][0]
        for seed in range(100, 100 + TTFT_REPEATS - 1)]
    results["single"] = {"ttft_ms": statistics.median(ttfts) * 1e3, "ttft_ms_each": [t * 1e3 for t in ttfts],
                         "decode_tok_s": (args.output_len - 1) / decode_seconds}
    print(f"{label} one request: TTFT {results['single']['ttft_ms']:.1f} ms (median of {TTFT_REPEATS}), decode "
          f"{results['single']['decode_tok_s']:.1f} tok/s", flush=True)
    long_ttft = min(run_engine(engine, prompts(1, args.long_prompt_len, config.vocab_size, seed), 2)["ttft"][0]
                    for seed in (2, 3))  # the first run meets new matrix shapes
    results["single_long"] = {"prompt_len": args.long_prompt_len, "ttft_ms": long_ttft * 1e3}
    print(f"{label} one request of {args.long_prompt_len} prompt tokens: TTFT "
          f"{results['single_long']['ttft_ms']:.1f} ms", flush=True)

    results["throughput"] = {}
    for n in args.concurrency:
        preempted_before = engine.scheduler.num_preemptions
        run = run_engine(engine, prompts(n, args.prompt_len, config.vocab_size, n), args.output_len)
        results["throughput"][n] = {"tok_s": run["tokens"] / run["seconds"], "seconds": run["seconds"],
                                    "preemptions": engine.scheduler.num_preemptions - preempted_before}
        print(f"{label} {n} requests: {run['tokens'] / run['seconds']:.1f} output tok/s ({run['seconds']:.1f} s, "
              f"{results['throughput'][n]['preemptions']} preemptions)", flush=True)
    del engine, served
    release_engines()  # the next user needs that memory
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 128, 256])
    # Up to 256, so that generate's best batch is measured, not assumed (a batch whose cache does not fit the card
    # is reported as out of memory).
    parser.add_argument("--hf-concurrency", type=int, nargs="*", default=[1, 8, 64, 128, 256],
                        help="none: ours only")
    parser.add_argument("--gpu-memory-utilization", type=float, default=Settings().gpu_memory_utilization)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--max-batched-tokens", type=int, default=Settings().max_batched_tokens,
                        help="the step's token budget (default: the server's)")
    parser.add_argument("--long-prompt-len", type=int, default=6144, help="also: TTFT at idle for a prompt this long")
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=["auto", "int8", "fp8"],
                        help="ours with each of these KV caches in turn (the first fills the top-level results)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device("cuda")
    dtype = torch.bfloat16
    config = XVERSE_7B
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    bandwidth = copy_bandwidth(device)
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    results["roofline_tok_s_batch1"] = bandwidth / WEIGHT_BYTES
    flops = matmul_rate(device, dtype, args.max_batched_tokens, config)
    results["matmul_TFLOPs"] = flops / 1e12
    print(f"{results['device']}: copy {bandwidth / 1e12:.2f} TB/s -> batch-1 roofline "
          f"{results['roofline_tok_s_batch1']:.0f} tok/s; matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    results["max_batched_tokens"] = args.max_batched_tokens

    model = random_model(config, device, dtype)
    server = Settings(gpu_memory_utilization=args.gpu_memory_utilization, max_batched_tokens=args.max_batched_tokens,
                      enforce_eager=args.eager)
    results["by_kv_cache_dtype"] = {}
    for name in args.kv_cache_dtype:
        ours = bench_ours(model, dataclasses.replace(server, kv_cache_dtype=name), args)
        shape = model_shape(model, resolve_kv_cache_dtype(name, device, dtype))
        for n, row in ours["throughput"].items():
            row["card_bound_tok_s"] = bound_tok_s(shape, n, args.prompt_len, args.output_len, bandwidth, flops)
        results["by_kv_cache_dtype"][ours["kv_cache_dtype"]] = ours
        if name == args.kv_cache_dtype[0]:
            results.update(ours)
        write_results(results, args.out)

    hf = hf_model_sharing(model, config)
    results["hf_generate"] = {}
    for n in args.hf_concurrency:
        try:
            run = run_hf(hf, prompts(n, args.prompt_len, config.vocab_size, n), args.output_len)
        except torch.OutOfMemoryError:
            results["hf_generate"][n] = "out of memory"
            print(f"transformers generate, batch {n}: out of GPU memory", flush=True)
            torch.cuda.empty_cache()
            continue
        results["hf_generate"][n] = {"tok_s": run["tokens"] / run["seconds"], "seconds": run["seconds"]}
        print(f"transformers generate, batch {n}: {run['tokens'] / run['seconds']:.1f} tok/s", flush=True)
        write_results(results, args.out)
    print_summary(results)
    write_results(results, args.out)


def print_summary(results: dict) -> None:
    measured = [v["tok_s"] for v in results["hf_generate"].values() if isinstance(v, dict)]
    best = max(measured, default=None)
    for name, ours in results["by_kv_cache_dtype"].items():
        print(f"\n{name} KV cache ({ours['kv_cache_tokens']} tokens)")
        print("| requests | ours tok/s | card bound tok/s | of the bound | generate tok/s | ratio | "
              "ratio to generate's best |")
        print("|---|---|---|---|---|---|---|")
        for n, row in ours["throughput"].items():
            theirs = results["hf_generate"].get(n)
            same = (f"{theirs['tok_s']:.1f} | {row['tok_s'] / theirs['tok_s']:.2f}x" if isinstance(theirs, dict)
                    else f"{theirs or 'not run'} | -")
            to_best = f"{row['tok_s'] / best:.2f}x" if best else "-"
            print(f"| {n} | {row['tok_s']:.1f} | {row['card_bound_tok_s']:.0f} | "
                  f"{row['tok_s'] / row['card_bound_tok_s']:.0%} | {same} | {to_best} |")
        print(f"one-request decode: {ours['single']['decode_tok_s']:.1f} tok/s = "
              f"{ours['single']['decode_tok_s'] / results['roofline_tok_s_batch1']:.0%} of the roofline")


if __name__ == "__main__":
    main()
