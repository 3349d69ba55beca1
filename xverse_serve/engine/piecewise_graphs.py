"""Steps with prompt tokens as CUDA graphs of everything but the attention.

Run eagerly, a step of XVERSE-7B launches some 600 kernels from Python, which takes the host longer than the GPU
needs for a few hundred tokens (docs/benchmarks.md, bench/closed_loop_bench.py --step-costs). Decode steps are
whole graphs (cuda_graphs); a step with prompt chunks cannot be, since its attention's work depends on each
sequence's lengths. So the model is cut at its attentions: everything between two of them (o_proj, norms, MLP,
the next layer's norm, q/k/v projection, RoPE and cache write) is one graph per token-count bucket, captured at
start-up, and the attention runs eagerly between the replays. A step is padded up to its bucket; the padded
rows write their keys and values to the cache's null slot, and their outputs are dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import torch

from ..model.attention import AttentionBatch
from ..model.kv_cache import KVCache
from ..model.xverse import Rotary, XverseForCausalLM

# Largest step taken as graphs: run eagerly, a step stays bound by the host's launches up to about a thousand tokens
# on some hosts (docs/benchmarks.md). XVERSE_MAX_PIECEWISE_TOKENS sets another, to compare.
MAX_PIECEWISE_TOKENS = int(os.environ.get("XVERSE_MAX_PIECEWISE_TOKENS", "1024"))


def token_buckets(max_tokens: int) -> list[int]:
    """32, then every multiple of 64 up to 512 and of 128 beyond, up to max_tokens (which is always one)."""
    sizes = {size for size in (32, *range(64, 512, 64), *range(512, max_tokens, 128)) if size < max_tokens}
    sizes.add(max_tokens)
    return sorted(sizes)


class PiecewiseGraphs:
    """`capture` False runs the same pieces eagerly from the same buffers: how the tests check the cut and the
    padding on the CPU."""

    def __init__(self, model: XverseForCausalLM, kv_cache: KVCache, max_tokens: int, capture: bool = True) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = token_buckets(max_tokens)
        self.max_tokens = max_tokens
        config, device, dtype = model.config, model.device, model.dtype
        # Static buffers: the step's inputs, each layer's queries (for the attention), the attention's output
        # and the running sum (for the next piece), and the final norm's output.
        self.input_ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_tokens,), kv_cache.null_slot, dtype=torch.long, device=device)
        self.q = torch.zeros(max_tokens, config.num_heads, config.head_dim, dtype=dtype, device=device)
        self.attn = torch.zeros_like(self.q)
        self.residual = torch.zeros(max_tokens, config.hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros_like(self.residual)
        pieces = len(model.model.layers) + 1
        # Per bucket, a call that runs each piece: a graph's replay, or the piece itself.
        self.runs: dict[int, list[Callable[[], None]]] = {
            size: [partial(self._piece, index, size) for index in range(pieces)] for size in self.buckets}
        if capture:
            self._capture_all()

    def _piece(self, index: int, size: int) -> None:
        """Piece `index` of a `size`-token step: layer index - 1 after its attention (the embeddings for the
        first piece), then layer index up to its attention (the final norm for the last piece)."""
        model, layers = self.model, self.model.model.layers
        if index == 0:
            x, residual = model.model.embed_tokens(self.input_ids[:size]), None
        else:
            x, residual = layers[index - 1].attention_output(self.attn[:size], self.residual[:size])
        if index == len(layers):
            hidden, _ = model.model.norm.add_and_norm(x, residual)
            self.hidden[:size].copy_(hidden)
            return
        rotary = Rotary(model.rope_cos, model.rope_sin, self.positions[:size])
        q, residual = layers[index].attention_input(x, residual, rotary, self.kv_cache.layers[index],
                                                     self.slot_mapping[:size])
        self.q[:size].copy_(q)
        self.residual[:size].copy_(residual)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []  # kept alive: self.runs holds their replays
        # Largest first: the smaller graphs then fit inside the memory the largest ones took from the pool.
        for size in reversed(self.buckets):
            for piece in self.runs[size]:
                piece()  # compiles the Triton kernels for this shape outside the capture
            torch.cuda.synchronize()
            replays = []
            for piece in self.runs[size]:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    piece()
                self.graphs.append(graph)
                replays.append(graph.replay)
            self.runs[size] = replays
        torch.cuda.synchronize()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """The model's forward (hidden states after the final norm, [tokens, hidden]) for a step of at most
        max_tokens tokens, its inputs on the device."""
        n = input_ids.shape[0]
        size = next(bucket for bucket in self.buckets if bucket >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.slot_mapping[n:size].fill_(self.kv_cache.null_slot)
        runs = self.runs[size]
        runs[0]()
        for run, layer, kv in zip(runs[1:], self.model.model.layers, self.kv_cache.layers):
            layer.self_attn.paged(self.q[:n], kv, batch, out=self.attn[:n])
            run()
        return self.hidden[:n]
