"""Decode attention on the paged cache: the Triton kernel against the PyTorch reference, on CUDA, bf16
(or, with --kv-cache-dtype int8 / fp8, an 8-bit cache with its scales).

One command on any CUDA machine:
    python bench/attention_bench.py --out bench/results/attention_h100.json
XVERSE-7B's attention shape (32 heads of 128, block_size 16); batch sizes 1, 8, 64, 256 and context
lengths 512, 2048, 8192, skipping what does not fit. For each shape: every kernel configuration is
checked against a float32 reference (relative error ||out - ref|| / ||ref||, output poisoned with NaN
first) and timed with triton.testing.do_bench (median; it clears L2 before every run), beside
model.attention.decode_attention in bf16. Achieved bandwidth = bytes of K and V read / time, next to the
device's copy bandwidth (bytes read + written by a large device-to-device copy). The "auto"
configuration (the defaults) is also captured in a CUDA graph, replayed on fresh inputs, checked and timed.
Also checks each batch size once with random context lengths in [1, max].
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from common import BLOCK_SIZE, XVERSE_7B, Log, copy_bandwidth, device_facts, write_checked_report, write_results
from triton.testing import do_bench

from xverse_serve.kernels.paged_attention import default_num_parts, paged_decode_attention
from xverse_serve.model.attention import decode_attention, quantize_kv

HEADS, HEAD_DIM = XVERSE_7B.num_heads, XVERSE_7B.head_dim
DTYPE = torch.bfloat16
BATCHES = [1, 8, 64, 256]
CONTEXTS = [512, 2048, 8192]
# name -> keyword arguments of paged_decode_attention; "auto" is the defaults.
# p: partition_size, g: heads_per_program, n: block_n, L: lanes=True, w: num_warps
CONFIGS = {
    "auto": {},
    "p256-g1-n64": dict(partition_size=256, heads_per_program=1, block_n=64),
    "p512-g1-n64": dict(partition_size=512, heads_per_program=1, block_n=64),
    "p1024-g1-n64": dict(partition_size=1024, heads_per_program=1, block_n=64),
    "p512-g1-n32": dict(partition_size=512, heads_per_program=1, block_n=32),
    "p512-g1-n128": dict(partition_size=512, heads_per_program=1, block_n=128),
    "p512-g2-n32": dict(partition_size=512, heads_per_program=2, block_n=32),
    "p512-g4-n16": dict(partition_size=512, heads_per_program=4, block_n=16),
    "p256-g1-n32-L": dict(partition_size=256, heads_per_program=1, block_n=32, lanes=True),
    "p512-g1-n32-L": dict(partition_size=512, heads_per_program=1, block_n=32, lanes=True),
    "p512-g1-n64-L": dict(partition_size=512, heads_per_program=1, block_n=64, lanes=True),
    "auto-n64-w2": dict(block_n=64, num_warps=2),
    "auto-n32-w2": dict(block_n=32, num_warps=2),
    "auto-n64-w4": dict(block_n=64, num_warps=4),
    "auto-n128-w2": dict(block_n=128, num_warps=2),
    "auto-n128-w8": dict(block_n=128, num_warps=8),
    "auto-n256-w4": dict(block_n=256, num_warps=4),
    "auto-n256-w8": dict(block_n=256, num_warps=8),
    "auto-L": dict(lanes=True),
    "auto-no-L": dict(lanes=False),
    "auto-L-w2": dict(lanes=True, num_warps=2),
    "auto-L-w8": dict(lanes=True, num_warps=8),
    "auto-n16-L": dict(block_n=16, lanes=True),
    "auto-n64-L-w8": dict(block_n=64, lanes=True, num_warps=8),
    "p256-g1-n32-L-w2": dict(partition_size=256, heads_per_program=1, block_n=32, lanes=True, num_warps=2),
    "p512-g1-n32-L-w2": dict(partition_size=512, heads_per_program=1, block_n=32, lanes=True, num_warps=2),
    "p512-g1-n32-L-w8": dict(partition_size=512, heads_per_program=1, block_n=32, lanes=True, num_warps=8),
    "p1024-g1-n32-L": dict(partition_size=1024, heads_per_program=1, block_n=32, lanes=True),
    "p512-g1-n16-L": dict(partition_size=512, heads_per_program=1, block_n=16, lanes=True),
    "g2-L": dict(heads_per_program=2, lanes=True),
    "g2-n32-L": dict(heads_per_program=2, block_n=32, lanes=True),
    "g2-n32-L-w8": dict(heads_per_program=2, block_n=32, lanes=True, num_warps=8),
    "g4-L": dict(heads_per_program=4, lanes=True),
    "g4-L-w8": dict(heads_per_program=4, lanes=True, num_warps=8),
    "auto-L-parts2": dict(lanes=True, num_parts=2),
    "auto-L-parts4": dict(lanes=True, num_parts=4),
    "p128-g1-n128": dict(partition_size=128, heads_per_program=1, block_n=128),
    "p256-g1-n128": dict(partition_size=256, heads_per_program=1, block_n=128),
    "p512-g1-n128-w8": dict(partition_size=512, heads_per_program=1, block_n=128, num_warps=8),
    "p256-g1-n128-w8": dict(partition_size=256, heads_per_program=1, block_n=128, num_warps=8),
    "p512-g1-n64-w2": dict(partition_size=512, heads_per_program=1, block_n=64, num_warps=2),
    # Shorter partitions for one sequence: more programs, each with fewer tokens to wait on.
    "p64-g1-n64": dict(partition_size=64, heads_per_program=1, block_n=64),
    "p64-g1-n64-w2": dict(partition_size=64, heads_per_program=1, block_n=64, num_warps=2),
    "p32-g1-n32": dict(partition_size=32, heads_per_program=1, block_n=32),
    "p32-g1-n32-w2": dict(partition_size=32, heads_per_program=1, block_n=32, num_warps=2),
}
MAX_REL_ERROR = 1e-2  # bf16 output rounding alone gives ~2e-3


KV_DTYPES = {"bf16": DTYPE, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


def random_cache(shape: tuple[int, ...], kv_dtype: torch.dtype, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A cache of random keys or values and, for an 8-bit one, its scales (quantized a slice at a time)."""
    if kv_dtype == DTYPE:
        return torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen), None
    cache = torch.empty(shape, device="cuda", dtype=kv_dtype)
    scales = torch.empty(shape[:-1], device="cuda", dtype=torch.float32)
    for first in range(0, shape[0], 1024):
        x = torch.randn((min(1024, shape[0] - first), *shape[1:]), device="cuda", dtype=DTYPE, generator=gen)
        values, scale = quantize_kv(x.flatten(0, 1), kv_dtype)
        cache[first:first + x.shape[0]] = values.view(x.shape)
        scales[first:first + x.shape[0]] = scale.view(x.shape[:-1])
    return cache, scales


class Shape:
    """A pool with exactly the blocks the batch needs (plus a padding block 0), handed out in random order."""

    def __init__(self, batch: int, context: int, seed: int, kv_dtype: torch.dtype = DTYPE) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.batch, self.context = batch, context
        max_blocks = context // BLOCK_SIZE
        num_blocks = batch * max_blocks + 1
        shape = (num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM)
        self.k_cache, self.k_scale = random_cache(shape, kv_dtype, gen)
        self.v_cache, self.v_scale = random_cache(shape, kv_dtype, gen)
        perm = torch.randperm(num_blocks - 1, device="cuda", generator=gen) + 1
        self.block_tables = perm.view(batch, max_blocks).to(torch.int32)
        self.context_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        self.q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
        self.scale = HEAD_DIM ** -0.5

    def kv_bytes(self, context_lens: torch.Tensor | None = None) -> int:
        lens = self.context_lens if context_lens is None else context_lens
        per_head = HEAD_DIM * self.k_cache.element_size() + (0 if self.k_scale is None else 4)
        return int(lens.sum().item()) * HEADS * per_head * 2

    def reference(self, q: torch.Tensor | None = None, context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 result from the bf16 cache (decode_attention upcasts keys and values)."""
        q = self.q if q is None else q
        lens = self.context_lens if context_lens is None else context_lens
        return decode_attention(q.float(), self.k_cache, self.v_cache, self.block_tables, lens, self.scale,
                                self.k_scale, self.v_scale)

    def kernel(self, out: torch.Tensor, context_lens: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        lens = self.context_lens if context_lens is None else context_lens
        return paged_decode_attention(self.q, self.k_cache, self.v_cache, self.block_tables, lens, self.scale,
                                      out, k_scale=self.k_scale, v_scale=self.v_scale, **kwargs)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref).norm() / ref.norm()).item()


def fits(batch: int, context: int, element_size: int = 2) -> tuple[bool, str]:
    cache = 2 * batch * context * HEADS * HEAD_DIM * element_size
    working = 3 << 30  # reference gathers (~1 GiB), float32 reference, scratch, do_bench's L2 flush buffer
    free, _ = torch.cuda.mem_get_info()
    need = cache + working
    return need < 0.9 * free, f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def bench_shape(batch: int, context: int, configs: dict, copy_bw: float, args: argparse.Namespace, log: Log) -> dict:
    shape = Shape(batch, context, seed=batch * 100003 + context, kv_dtype=KV_DTYPES[args.kv_cache_dtype])
    kv_bytes = shape.kv_bytes()
    ref = shape.reference()
    result = {"batch": batch, "context": context, "kv_bytes": kv_bytes,
              "auto_num_parts": default_num_parts(
                  batch, HEADS, context, torch.cuda.get_device_properties(0).multi_processor_count),
              "configs": {}}

    if not args.skip_reference:
        ref_bf16 = decode_attention(shape.q, shape.k_cache, shape.v_cache, shape.block_tables,
                                    shape.context_lens, shape.scale, shape.k_scale, shape.v_scale)
        ms = do_bench(lambda: decode_attention(shape.q, shape.k_cache, shape.v_cache, shape.block_tables,
                                               shape.context_lens, shape.scale, shape.k_scale, shape.v_scale),
                      warmup=args.warmup, rep=args.rep, return_mode="median")
        result["reference"] = {"ms": ms, "rel_error": rel_error(ref_bf16, ref), "gbps": kv_bytes / ms / 1e6}
        del ref_bf16

    out = torch.empty_like(shape.q)
    for name, kwargs in configs.items():
        out.fill_(float("nan"))
        shape.kernel(out, **kwargs)
        error = rel_error(out, ref)
        ms = do_bench(lambda: shape.kernel(out, **kwargs), warmup=args.warmup, rep=args.rep, return_mode="median")
        gbps = kv_bytes / ms / 1e6
        result["configs"][name] = {"ms": ms, "rel_error": error, "ok": error < MAX_REL_ERROR, "gbps": gbps,
                                   "frac_copy_bw": gbps * 1e9 / copy_bw}
        log(f"  {name:14s} {ms * 1e3:9.1f} us  {gbps:7.0f} GB/s  {gbps * 1e9 / copy_bw:5.1%} of copy  "
            f"rel err {error:.2e}")

    # The defaults in a CUDA graph: replay on fresh q / lengths written into the captured tensors.
    try:
        out.fill_(float("nan"))
        shape.kernel(out)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            shape.kernel(out)
        shape.q.copy_(torch.randn_like(shape.q))
        out.fill_(float("nan"))
        graph.replay()
        error = rel_error(out, shape.reference())
        ms = do_bench(graph.replay, warmup=args.warmup, rep=args.rep, return_mode="median")
        result["graph"] = {"ms": ms, "rel_error": error, "ok": error < MAX_REL_ERROR, "gbps": kv_bytes / ms / 1e6}
        log(f"  {'auto (graph)':14s} {ms * 1e3:9.1f} us  {kv_bytes / ms / 1e6:7.0f} GB/s  rel err {error:.2e}")
        del graph
    except Exception as exc:  # noqa: BLE001 - record and go on
        result["graph"] = {"error": repr(exc)}
        log(f"  graph capture FAILED: {exc!r}")

    # Random context lengths in [1, context]: only correctness (and time, for the record).
    gen = torch.Generator(device="cuda").manual_seed(batch + context)
    lens = torch.randint(1, context + 1, (batch,), device="cuda", generator=gen, dtype=torch.int32)
    lens[0] = 1
    if batch > 1:
        lens[1] = context
    out.fill_(float("nan"))
    shape.kernel(out, context_lens=lens)
    error = rel_error(out, shape.reference(context_lens=lens))
    ms = do_bench(lambda: shape.kernel(out, context_lens=lens), warmup=args.warmup, rep=args.rep,
                  return_mode="median")
    mixed_bytes = shape.kv_bytes(lens)
    result["mixed_lengths"] = {"ms": ms, "rel_error": error, "ok": error < MAX_REL_ERROR, "kv_bytes": mixed_bytes,
                               "gbps": mixed_bytes / ms / 1e6}
    log(f"  {'auto (mixed)':14s} {ms * 1e3:9.1f} us  {mixed_bytes / ms / 1e6:7.0f} GB/s  rel err {error:.2e}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--skip-reference", action="store_true", help="do not time decode_attention")
    parser.add_argument("--kv-cache-dtype", default="bf16", choices=list(KV_DTYPES),
                        help="the cache's element type; 8-bit caches come with a float32 scale per token and head")
    parser.add_argument("--budget-s", type=float, default=90.0,
                        help="after this long, time only the default configuration on the remaining shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")

    start = time.perf_counter()
    log = Log()
    copy_bw = copy_bandwidth(torch.device("cuda"))
    report = {
        **device_facts(), "heads": HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE, "dtype": str(DTYPE),
        "kv_cache_dtype": str(KV_DTYPES[args.kv_cache_dtype]),
        "copy_bandwidth_gbps": copy_bw / 1e9, "max_rel_error": MAX_REL_ERROR, "shapes": [], "skipped": [],
    }
    log(f"{report['device']}, {report['sms']} SMs; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    configs = {name: CONFIGS[name] for name in args.configs}

    for context in sorted(args.contexts):
        for batch in sorted(args.batches):
            elapsed = time.perf_counter() - start
            ok, why = fits(batch, context, KV_DTYPES[args.kv_cache_dtype].itemsize)
            if not ok:
                report["skipped"].append({"batch": batch, "context": context, "reason": why})
                log(f"batch {batch:3d} context {context:5d}: skipped, {why}")
                continue
            kv_mib = 2 * batch * context * HEADS * HEAD_DIM * 2 / 2**20
            over = elapsed > args.budget_s  # past the budget: only the defaults, so every shape still gets a number
            log(f"batch {batch:3d} context {context:5d}: {kv_mib:.0f} MiB of K+V"
                + (f" (over the {args.budget_s:.0f} s budget: auto only)" if over else ""))
            shape_configs = {name: configs[name] for name in configs if name == "auto"} if over else configs
            report["shapes"].append(bench_shape(batch, context, shape_configs or configs, copy_bw, args, log))
            torch.cuda.empty_cache()  # the shape's cache is gone with bench_shape's locals
            report["shapes"][-1]["over_budget"] = over
            report["elapsed_s"] = time.perf_counter() - start
            write_results(report, args.out)

    # The table last, so it ends the output.
    log("")
    log(f"{'batch':>5} {'ctx':>5} {'ref us':>9} {'auto us':>9} {'GB/s':>6} {'%copy':>6} {'graph us':>9} "
        f"{'best':>14} {'best us':>8} {'%copy':>6} {'max err':>8} all ok")
    all_ok = True
    for r in report["shapes"]:
        cfgs = r["configs"]
        best = min(cfgs, key=lambda n: cfgs[n]["ms"])
        auto = cfgs.get("auto", cfgs[best])
        ok = all(c["ok"] for c in cfgs.values()) and r["mixed_lengths"]["ok"] and r["graph"].get("ok", False)
        all_ok &= ok
        worst = max((c["rel_error"] for c in cfgs.values()), key=lambda e: math.inf if math.isnan(e) else e)
        ref_us = r["reference"]["ms"] * 1e3 if "reference" in r else float("nan")
        graph_us = r["graph"].get("ms", float("nan")) * 1e3
        log(f"{r['batch']:5d} {r['context']:5d} {ref_us:9.1f} {auto['ms'] * 1e3:9.1f} {auto['gbps']:6.0f} "
            f"{auto['frac_copy_bw']:6.1%} {graph_us:9.1f} {best:>14} {cfgs[best]['ms'] * 1e3:8.1f} "
            f"{cfgs[best]['frac_copy_bw']:6.1%} {worst:8.1e} {'yes' if ok else 'NO'}")
    write_checked_report(report, all_ok, start, log, args.out)


if __name__ == "__main__":
    main()
