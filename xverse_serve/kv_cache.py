"""The paged KV cache: one preallocated pool of fixed-size blocks and the allocator that hands them out."""

from __future__ import annotations

from collections import deque

import torch

from .checkpoint import ModelConfig


class BlockAllocator:
    """Free-list of block ids; a sequence owns the blocks listed in its block table."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class KVCache:
    """Per layer, a key and a value tensor of shape [num_blocks + 1, block_size, heads, head_dim].
    The extra last block belongs to no sequence: padded rows of a CUDA-graph batch write there."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.null_slot = num_blocks * block_size
        shape = (num_blocks + 1, block_size, config.num_heads, config.head_dim)
        # Zeros, not empty: padded block-table entries are read (and masked), and NaN * 0 is still NaN.
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_layers)
        ]

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * config.num_layers * config.hidden_size * torch.tensor([], dtype=dtype).element_size()


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
