"""Steps with prompt tokens as CUDA graphs of everything but the attention.

Run eagerly, a step of XVERSE-7B launches some 600 kernels from Python: about 18 ms of host time on an H100,
more than the GPU needs for a few hundred tokens (bench/closed_loop_bench.py --step-costs). Decode steps are
whole graphs (cuda_graphs); a step with prompt chunks cannot be, since its attention's work depends on each
sequence's lengths. So the model is cut at its attentions: everything between two of them (o_proj, norms, MLP,
the next layer's norm, q/k/v projection, RoPE and cache write) is one graph per token-count bucket, captured at
start-up, and the attention runs eagerly between the replays. A step is padded up to its bucket; the padded
rows write their keys and values to the cache's null slot, and their outputs are dropped.
"""

from __future__ import annotations

import torch

from .attention import AttentionBatch, paged_attention
from .kv_cache import KVCache
from .model import Rotary, XverseForCausalLM

# Largest step taken as graphs: above it the GPU's work outlasts the host's launches anyway.
MAX_PIECEWISE_TOKENS = 1024


def token_buckets(max_tokens: int) -> list[int]:
    """32, 64, then every multiple of 64 to 512 and of 128 beyond, up to max_tokens (which is always one)."""
    sizes = {size for size in (32, *range(64, 512, 64), *range(512, max_tokens, 128)) if size < max_tokens}
    sizes.add(max_tokens)
    return sorted(sizes)


class PiecewiseGraphs:
    def __init__(self, model: XverseForCausalLM, kv_cache: KVCache, max_tokens: int) -> None:
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
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
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
        pieces = len(self.model.model.layers) + 1
        # Largest first: the smaller graphs then fit inside the memory the largest ones took from the pool.
        for size in reversed(self.buckets):
            for index in range(pieces):
                self._piece(index, size)  # compiles the Triton kernels for this shape outside the capture
            torch.cuda.synchronize()
            graphs = []
            for index in range(pieces):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._piece(index, size)
                graphs.append(graph)
            self.graphs[size] = graphs
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
        graphs = self.graphs[size]
        graphs[0].replay()
        scale = self.model.model.layers[0].self_attn.scale
        for graph, kv in zip(graphs[1:], self.kv_cache.layers):
            paged_attention(self.q[:n], kv.k, kv.v, batch, scale, kv.k_scale, kv.v_scale, out=self.attn[:n])
            graph.replay()
        return self.hidden[:n]
