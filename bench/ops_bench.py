"""The fused Triton elementwise kernels (xverse_serve.kernels.fused_ops) against the PyTorch sequences they replace.

One command on any CUDA machine (well under a minute):
    python bench/ops_bench.py --out bench/results/ops_h200.json

XVERSE-7B's shapes in bf16 (hidden 4096, 32 heads of 128, intermediate 11008, block_size 16), at 1, 64,
256 and 4096 tokens. Ops, each fused kernel beside the PyTorch code of xverse_serve/model/xverse.py:
  add_norm   residual + x, then RMSNorm (RMSNorm.add_and_norm; twice per layer and the final norm)
  norm       RMSNorm alone (the first layer's input norm)
  rope_kv    RoPE of q and k + the cache write of k and v (Attention.rope_and_cache; the PyTorch
             side gets its per-token cos/sin rows for free, as it gathers them once per step)
  silu_mul   F.silu(gate) * up (MLP)
  layer      all of one layer's elementwise work in order: add_norm, rope_kv, add_norm, silu_mul
Two times per op: "eager" is triton.testing.do_bench's median of single calls (L2 flushed before each, so
launch overhead and cold data included); "graph" is one call's share of a CUDA graph that replays the op
32 times back to back (L2 warm after the first), which is how a captured decode step sees it. The decode
step's saving is estimated from the "layer" graph times x 32 layers (+ the final norm).
Correctness of every op at every size is checked against the PyTorch code first (residual add, RoPE and
cache write bit-exact; norm and silu within 2 bf16 ulps on < 2% of the elements). rope_kv is also timed
with other heads_per_program values, to check the default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import BLOCK_SIZE, XVERSE_7B, Log, device_facts, write_checked_report, write_results
from triton.testing import do_bench

from xverse_serve.kernels.fused_ops import (
    default_rope_heads_per_program,
    fused_add_rms_norm,
    rms_norm,
    rope_and_write_kv,
    silu_and_mul,
)
from xverse_serve.model.attention import write_kv
from xverse_serve.model.xverse import apply_rope, rms_norm_reference, rope_tables

HIDDEN, INTER = XVERSE_7B.hidden_size, XVERSE_7B.intermediate_size
HEADS, HEAD_DIM = XVERSE_7B.num_heads, XVERSE_7B.head_dim
MAX_POSITIONS, LAYERS, EPS = XVERSE_7B.max_position_embeddings, XVERSE_7B.num_layers, XVERSE_7B.rms_norm_eps
DTYPE = torch.bfloat16
TOKENS = [1, 64, 256, 4096]
GRAPH_REPEATS = 32
ELEMENT = 2  # bytes per bf16 value


def ulps(out: torch.Tensor, ref: torch.Tensor) -> tuple[int, float]:
    """(max distance in ulps, fraction of elements that differ), bf16."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).long()
        return torch.where(bits < 0, -(bits + (1 << 15)), bits)

    if not torch.isfinite(out).all():
        return 1 << 30, 1.0
    distance = (ordered(out) - ordered(ref)).abs()
    return int(distance.max().item()), (distance > 0).float().mean().item()


class Step:
    """Random inputs of one size: activations, a rope step over shuffled cache slots, the MLP's gate/up."""

    def __init__(self, tokens: int, seed: int) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(DTYPE)

        self.tokens = tokens
        self.x, self.residual = randn(tokens, HIDDEN), randn(tokens, HIDDEN, scale=4.0)
        self.weight = 1 + randn(HIDDEN, scale=0.1)
        self.qkv = randn(tokens, 3 * HIDDEN, scale=2.0)
        self.gate_up = randn(tokens, 2 * INTER, scale=2.0)
        num_blocks = -(-tokens // BLOCK_SIZE) + 4
        shape = (num_blocks + 1, BLOCK_SIZE, HEADS, HEAD_DIM)
        self.k_cache, self.v_cache = randn(*shape), randn(*shape)
        slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda", generator=gen)[:tokens]
        self.slot_mapping = slots.to(torch.long)
        self.positions = torch.randint(0, MAX_POSITIONS, (tokens,), device="cuda", generator=gen)
        cos, sin = rope_tables(HEAD_DIM, MAX_POSITIONS, XVERSE_7B.rope_theta, torch.device("cuda"))
        self.cos_table, self.sin_table = cos.to(DTYPE), sin.to(DTYPE)
        self.cos, self.sin = self.cos_table[self.positions], self.sin_table[self.positions]  # once per step

    # The PyTorch code of the model (xverse_serve/model/xverse.py).
    def torch_add_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        residual = self.residual + self.x
        return rms_norm_reference(residual, self.weight, EPS), residual

    def torch_norm(self) -> torch.Tensor:
        return rms_norm_reference(self.x, self.weight, EPS)

    def torch_rope_kv(self) -> torch.Tensor:
        q, k, v = self.qkv.view(self.tokens, 3, HEADS, HEAD_DIM).unbind(dim=1)
        q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        write_kv(self.k_cache, self.v_cache, k, v, self.slot_mapping)
        return q

    def torch_silu_mul(self) -> torch.Tensor:
        gate, up = self.gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    # The fused kernels.
    def fused_add_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_add_rms_norm(self.x, self.residual, self.weight, EPS)

    def fused_norm(self) -> torch.Tensor:
        return rms_norm(self.x, self.weight, EPS)

    def fused_rope_kv(self, **kwargs) -> torch.Tensor:
        return rope_and_write_kv(self.qkv, self.cos_table, self.sin_table, self.positions, self.k_cache,
                                 self.v_cache, self.slot_mapping, **kwargs)

    def fused_silu_mul(self) -> torch.Tensor:
        return silu_and_mul(self.gate_up)

    def torch_layer(self) -> None:
        self.torch_add_norm()
        self.torch_rope_kv()
        self.torch_add_norm()
        self.torch_silu_mul()

    def fused_layer(self) -> None:
        self.fused_add_norm()
        self.fused_rope_kv()
        self.fused_add_norm()
        self.fused_silu_mul()

    def bytes_moved(self, op: str) -> int:
        """Bytes an ideal kernel reads and writes."""
        t = self.tokens
        sizes = {
            "add_norm": (4 * t * HIDDEN + HIDDEN) * ELEMENT,  # x, residual in; normed, residual out; weight
            "norm": (2 * t * HIDDEN + HIDDEN) * ELEMENT,
            "rope_kv": (6 * t * HIDDEN + 4 * t * HEAD_DIM) * ELEMENT,  # qkv in; q, k, v out; cos/sin rows
            "silu_mul": 3 * t * INTER * ELEMENT,
        }
        sizes["layer"] = 2 * sizes["add_norm"] + sizes["rope_kv"] + sizes["silu_mul"]
        return sizes[op]

    def check(self) -> dict:
        """Fused against PyTorch, every op; the rope step from the same cache contents on both sides."""
        results = {}
        normed, residual = self.fused_add_norm()
        ref_normed, ref_residual = self.torch_add_norm()
        max_ulps, off = ulps(normed, ref_normed)
        results["add_norm"] = {"residual_exact": torch.equal(residual, ref_residual), "max_ulps": max_ulps,
                               "fraction_off": off}
        results["add_norm"]["ok"] = results["add_norm"]["residual_exact"] and max_ulps <= 2 and off < 0.02
        max_ulps, off = ulps(self.fused_norm(), self.torch_norm())
        results["norm"] = {"max_ulps": max_ulps, "fraction_off": off, "ok": max_ulps <= 2 and off < 0.02}
        k_before, v_before = self.k_cache.clone(), self.v_cache.clone()
        q_ref = self.torch_rope_kv()
        k_ref, v_ref = self.k_cache.clone(), self.v_cache.clone()
        self.k_cache.copy_(k_before)
        self.v_cache.copy_(v_before)
        ok = True
        for hpp in (None, 1, 2, 4, 8):
            q = self.fused_rope_kv(heads_per_program=hpp)
            ok &= torch.equal(q, q_ref) and torch.equal(self.k_cache, k_ref) and torch.equal(self.v_cache, v_ref)
            self.k_cache.copy_(k_before)
            self.v_cache.copy_(v_before)
        results["rope_kv"] = {"bit_exact": ok, "ok": ok}
        max_ulps, off = ulps(self.fused_silu_mul(), self.torch_silu_mul())
        results["silu_mul"] = {"max_ulps": max_ulps, "fraction_off": off, "ok": max_ulps <= 2 and off < 0.02}
        return results


def graph_ms(fn: Callable[[], object], args) -> float:
    """One call's share of a CUDA graph of GRAPH_REPEATS calls, replayed (median of do_bench)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_REPEATS):
            fn()
    ms = do_bench(graph.replay, warmup=args.warmup, rep=args.rep, return_mode="median") / GRAPH_REPEATS
    del graph
    return ms


def eager_ms(fn: Callable[[], object], args) -> float:
    return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--warmup", type=int, default=20, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=60, help="do_bench repetition time, ms")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")

    start = time.perf_counter()
    log = Log()
    report = {**device_facts(), "dtype": str(DTYPE),
              "hidden": HIDDEN, "heads": HEADS, "head_dim": HEAD_DIM, "intermediate": INTER,
              "graph_repeats": GRAPH_REPEATS, "sizes": []}
    log(f"{report['device']}, {report['sms']} SMs, torch {report['torch']}, triton {report['triton']}")
    ops = ["add_norm", "norm", "rope_kv", "silu_mul", "layer"]

    for tokens in args.tokens:
        step = Step(tokens, seed=tokens)
        checks = step.check()
        row = {"tokens": tokens, "checks": checks, "ops": {}}
        for op in ops:
            reference, fused = getattr(step, f"torch_{op}"), getattr(step, f"fused_{op}")
            timing = {"bytes": step.bytes_moved(op)}
            for mode, timer in (("eager", eager_ms), ("graph", graph_ms)):
                timing[f"torch_{mode}_ms"] = timer(reference, args)
                timing[f"fused_{mode}_ms"] = timer(fused, args)
            timing["fused_graph_gbps"] = timing["bytes"] / timing["fused_graph_ms"] / 1e6
            row["ops"][op] = timing
        sweep = {}
        for hpp in (1, 2, 4, 8):
            sweep[hpp] = graph_ms(lambda hpp=hpp, step=step: step.fused_rope_kv(heads_per_program=hpp), args)
        row["rope_heads_per_program_graph_ms"] = sweep
        row["rope_default_heads_per_program"] = default_rope_heads_per_program(tokens, HEADS)
        layer = row["ops"]["layer"]
        row["decode_step_saving_ms"] = (LAYERS * (layer["torch_graph_ms"] - layer["fused_graph_ms"])
                                        + row["ops"]["add_norm"]["torch_graph_ms"]
                                        - row["ops"]["add_norm"]["fused_graph_ms"])
        report["sizes"].append(row)
        ok = all(c["ok"] for c in checks.values())
        log(f"{tokens:5d} tokens: checks {'ok' if ok else 'FAILED ' + json.dumps(checks)}; rope graph us by "
            f"heads/program " + ", ".join(f"{h}: {ms * 1e3:.1f}" for h, ms in sweep.items())
            + f" (default {row['rope_default_heads_per_program']})")
        report["elapsed_s"] = time.perf_counter() - start
        write_results(report, args.out)
        del step
        torch.cuda.empty_cache()

    log("")
    log(f"{'op':>9} {'tokens':>6} {'torch us':>9} {'fused us':>9} {'x':>6} {'torch gr':>9} {'fused gr':>9} {'x':>6} "
        f"{'GB/s gr':>8}  check")
    all_ok = True
    for row in report["sizes"]:
        for op in ops:
            t = row["ops"][op]
            check = row["checks"].get(op)
            ok = all(c["ok"] for c in row["checks"].values()) if check is None else check["ok"]
            all_ok &= ok
            detail = "" if check is None or "max_ulps" not in check else f" ({check['max_ulps']} ulp)"
            log(f"{op:>9} {row['tokens']:6d} {t['torch_eager_ms'] * 1e3:9.1f} {t['fused_eager_ms'] * 1e3:9.1f} "
                f"{t['torch_eager_ms'] / t['fused_eager_ms']:6.1f} {t['torch_graph_ms'] * 1e3:9.1f} "
                f"{t['fused_graph_ms'] * 1e3:9.1f} {t['torch_graph_ms'] / t['fused_graph_ms']:6.1f} "
                f"{t['fused_graph_gbps']:8.0f}  {'ok' if ok else 'FAILED'}{detail}")
    log("")
    for row in report["sizes"]:
        log(f"decode step at {row['tokens']} tokens: elementwise work {LAYERS} x layer graph time "
            f"{LAYERS * row['ops']['layer']['torch_graph_ms']:.3f} ms -> "
            f"{LAYERS * row['ops']['layer']['fused_graph_ms']:.3f} ms; saving ~{row['decode_step_saving_ms']:.3f} ms")
    write_checked_report(report, all_ok, start, log, args.out)


if __name__ == "__main__":
    main()
