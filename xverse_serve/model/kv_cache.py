"""The paged KV cache's memory: per layer, one preallocated pool of fixed-size blocks of keys and values.
engine.block_allocator hands the blocks out."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .checkpoint import ModelConfig

# 8-bit element types of the cache (--kv-cache-dtype int8 / fp8): each cached vector of one token and head is
# stored divided by its own scale (a float32 beside the cache), so that its largest element is the type's largest.
QUANTIZED_KV_DTYPES = (torch.int8, torch.float8_e4m3fn)
KV_SCALE_DTYPE = torch.float32


class LayerCache(NamedTuple):
    """One layer's cache. k, v: [num_blocks + 1, block_size, heads, head_dim]; for an 8-bit cache, k_scale and
    v_scale [num_blocks + 1, block_size, heads] float32 (a cached vector times its scale is the key or value)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


class KVCache:
    """Per layer, a key and a value tensor of shape [num_blocks + 1, block_size, heads, head_dim] (LayerCache),
    with per-token-and-head scales when `dtype` is one of QUANTIZED_KV_DTYPES.
    The extra last block belongs to no sequence: padded rows of a CUDA-graph batch write there."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.null_slot = num_blocks * block_size
        shape = (num_blocks + 1, block_size, config.num_heads, config.head_dim)

        def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            # Zeros, not empty: padded block-table entries are read (and masked), and NaN * 0 is still NaN.
            if dtype in QUANTIZED_KV_DTYPES:  # as bytes: not every device fills float8
                return torch.zeros(shape, dtype=torch.uint8, device=device).view(dtype)
            return torch.zeros(shape, dtype=dtype, device=device)

        self.layers = []
        for _ in range(config.num_layers):
            if dtype in QUANTIZED_KV_DTYPES:
                self.layers.append(LayerCache(zeros(shape, dtype), zeros(shape, dtype),
                                              zeros(shape[:3], KV_SCALE_DTYPE), zeros(shape[:3], KV_SCALE_DTYPE)))
            else:
                self.layers.append(LayerCache(zeros(shape, dtype), zeros(shape, dtype)))

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        per_token = 2 * config.num_layers * config.hidden_size * element
        if dtype in QUANTIZED_KV_DTYPES:
            scale_bytes = torch.tensor([], dtype=KV_SCALE_DTYPE).element_size()
            per_token += 2 * config.num_layers * config.num_heads * scale_bytes
        return per_token
