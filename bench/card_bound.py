"""The most output tokens per second a card could give an offline batch: what the batch must move and compute,
at the card's measured copy bandwidth and matmul rate, with every sequence in memory at once.

For n requests of p prompt tokens and m new tokens each:
- the prefill computes n * p tokens through every layer (2 FLOPs per weight, plus causal attention), and
  each sequence's last position through the LM head, at the measured matmul rate;
- each of the m - 1 decode steps reads every weight the step uses (all but the embedding table, of which
  it gathers n rows) and each sequence's whole cached context, at the copy bandwidth; if its matmuls
  would take longer at the matmul rate, the step takes that long instead.
Nothing else is counted (no elementwise work, no launches, no preemption, no host time), so a real run
stays below it; its ratio to this bound says how much of the card a run uses.

engine_bench.py prints it beside each offline figure. For another load, from a run's measured card:
    python bench/card_bound.py bench/results/engine_h100.json --requests 64 --prompt-len 516 --output-len 128
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from common import XVERSE_7B

from xverse_serve.model.kv_cache import KVCache
from xverse_serve.model.xverse import XverseForCausalLM


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    weight_bytes_per_step: int  # what one decode step reads of the weights
    kv_bytes_per_token: int  # one cached token across all layers, scales included

    @property
    def layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        return self.num_layers * (4 * h * h + 3 * h * i)

    def attention_flops(self, context: int) -> int:
        """Scores and weighted values of one query over `context` cached tokens, all layers."""
        return 4 * self.num_layers * self.hidden_size * context


def model_shape(model: XverseForCausalLM, kv_dtype: torch.dtype) -> ModelShape:
    """The shape as the bound counts it, from the model's own parameters (a meta-device model will do)."""
    config = model.config
    streamed = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed" not in name)
    return ModelShape(config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size,
                      streamed, KVCache.bytes_per_token(config, kv_dtype))


def bound_seconds(shape: ModelShape, requests: int, prompt_len: int, output_len: int,
                  bandwidth: float, matmul_flops: float) -> float:
    """The least time, in seconds, for the batch; bandwidth in bytes/s, matmul_flops in FLOP/s."""
    head_flops = 2 * shape.vocab_size * shape.hidden_size
    prefill = requests * (prompt_len * 2 * shape.layer_params
                          + sum(shape.attention_flops(j + 1) for j in range(prompt_len)) + head_flops)
    seconds = prefill / matmul_flops
    for step in range(1, output_len):
        context = prompt_len + step  # the token this step feeds is cached first, then read with the rest
        moved = shape.weight_bytes_per_step + requests * context * shape.kv_bytes_per_token
        computed = requests * (2 * shape.layer_params + shape.attention_flops(context) + head_flops)
        seconds += max(moved / bandwidth, computed / matmul_flops)
    return seconds


def bound_tok_s(shape: ModelShape, requests: int, prompt_len: int, output_len: int,
                bandwidth: float, matmul_flops: float) -> float:
    return requests * output_len / bound_seconds(shape, requests, prompt_len, output_len, bandwidth, matmul_flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_json", type=Path, help="an engine_bench.py result: the card's measured copy "
                                                       "bandwidth and matmul rate")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=516)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    card = json.loads(args.engine_json.read_text())
    bandwidth, flops = card["copy_bandwidth_GBps"] * 1e9, card["matmul_TFLOPs"] * 1e12
    print(f"{card['device']}: copy {bandwidth / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s; "
          f"{args.requests} requests of {args.prompt_len} prompt and {args.output_len} new tokens")
    with torch.device("meta"):  # the shapes alone: model_shape counts what engine_bench counts on the real model
        model = XverseForCausalLM(XVERSE_7B).to(torch.bfloat16)
    for cache, kv_dtype in (("bf16", torch.bfloat16), ("8-bit", torch.int8)):
        shape = model_shape(model, kv_dtype)
        bound = bound_tok_s(shape, args.requests, args.prompt_len, args.output_len, bandwidth, flops)
        print(f"{cache} cache: at most {bound:,.0f} output tok/s")


if __name__ == "__main__":
    main()
