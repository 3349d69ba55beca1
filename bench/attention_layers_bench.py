"""Decode attention as a decode step runs it: one call per layer for 32 layers, each over a cache of its own (cold in
L2, as in a step, where the weights stream through between layers), block tables as wide as an 8,192-token context
(the decode graphs' width), all in one CUDA graph. Prints µs per layer for each kernel configuration, next to the
time the layer's keys and values take at the device's copy bandwidth.

    python bench/attention_layers_bench.py --out bench/results/attention_layers_h200.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import BLOCK_SIZE, XVERSE_7B, copy_bandwidth, replay_ms, write_results

from xverse_serve.kernels.paged_attention import paged_decode_attention
from xverse_serve.model.attention import decode_attention

HEADS, HEAD_DIM, LAYERS = XVERSE_7B.num_heads, XVERSE_7B.head_dim, XVERSE_7B.num_layers
TABLE_TOKENS = XVERSE_7B.max_position_embeddings  # the decode graphs' block-table width


def configs(batch: int, context: int) -> dict[str, dict]:
    """name -> paged_decode_attention keyword arguments: the defaults, then even splits of `context` into
    partitions of 16-128 tokens at 2, 4 and 8 warps, and the lanes variant."""
    result = {"auto": {}}
    for partition in (16, 32, 64, 128):
        parts = max(1, context // partition)
        if batch * HEADS * parts > 64 * 132 or parts > 64:
            continue
        for warps in (2, 4, 8):
            kwargs = dict(partition_size=partition, num_parts=parts, block_n=min(partition, 64), num_warps=warps)
            result[f"p{partition}x{parts}-w{warps}"] = kwargs
        result[f"p{partition}x{parts}-w4-lanes"] = dict(partition_size=partition, num_parts=parts,
                                                        block_n=min(partition, 32), lanes=True)
    return result


def layer_us(batch: int, context: int, kwargs: dict, caches: list, q: torch.Tensor, tables: torch.Tensor,
             lens: torch.Tensor, outs: list[torch.Tensor]) -> float:
    def step() -> None:
        for (k, v), out in zip(caches, outs):
            paged_decode_attention(q, k, v, tables, lens, HEAD_DIM ** -0.5, out, **kwargs)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return replay_ms(graph, repeats=20) / LAYERS * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    results = {"device": torch.cuda.get_device_name(device), "copy_GBps": bandwidth / 1e9, "shapes": []}
    for batch in args.batches:
        for context in args.contexts:
            gen = torch.Generator(device=device).manual_seed(batch * context)
            blocks = batch * context // BLOCK_SIZE
            caches = [tuple(torch.randn(blocks + 1, BLOCK_SIZE, HEADS, HEAD_DIM, device=device, generator=gen,
                                        dtype=torch.bfloat16) for _ in range(2)) for _ in range(LAYERS)]
            tables = torch.zeros(batch, TABLE_TOKENS // BLOCK_SIZE, dtype=torch.int32, device=device)
            tables[:, :context // BLOCK_SIZE] = 1 + torch.randperm(blocks, device=device, generator=gen).view(batch, -1)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            q = torch.randn(batch, HEADS, HEAD_DIM, device=device, generator=gen, dtype=torch.bfloat16)
            outs = [torch.empty_like(q) for _ in range(LAYERS)]
            reference = decode_attention(q.float(), *caches[-1], tables, lens, HEAD_DIM ** -0.5)
            bound_us = batch * context * HEADS * HEAD_DIM * 2 * 2 / bandwidth * 1e6
            row = {"batch": batch, "context": context, "bound_us": bound_us, "configs": {}}
            print(f"batch {batch}, context {context}: K and V at copy bandwidth {bound_us:.1f} µs per layer")
            for name, kwargs in configs(batch, context).items():
                us = layer_us(batch, context, kwargs, caches, q, tables, lens, outs)
                error = ((outs[-1].float() - reference).norm() / reference.norm()).item()
                row["configs"][name] = {"us": us, "rel_error": error}
                print(f"  {name:22s} {us:6.1f} µs  rel err {error:.1e}", flush=True)
            best = min(row["configs"].items(), key=lambda item: item[1]["us"])
            print(f"  best: {best[0]} {best[1]['us']:.1f} µs (auto {row['configs']['auto']['us']:.1f})")
            results["shapes"].append(row)
            del caches
            torch.cuda.empty_cache()
    write_results(results, args.out)


if __name__ == "__main__":
    main()
