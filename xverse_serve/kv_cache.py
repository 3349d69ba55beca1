"""The paged KV cache: one preallocated pool of fixed-size blocks and the allocator that hands them out."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import NamedTuple

import torch

from .checkpoint import ModelConfig

# 8-bit element types of the cache (--kv-cache-dtype int8 / fp8): each cached vector of one token and head is
# stored divided by its own scale (a float32 beside the cache), so that its largest element is the type's largest.
QUANTIZED_KV_DTYPES = (torch.int8, torch.float8_e4m3fn)
KV_SCALE_DTYPE = torch.float32


class BlockAllocator:
    """Hands out KV blocks, counting the sequences that hold each, and keeps full blocks findable by the
    hash of their tokens (prefix caching). A block nobody holds is free, but keeps its cached content
    until it is handed out again, least recently freed first."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._holders = [0] * num_blocks
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._holders[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        # Last blocks first, so that a sequence's prefix is the last of it to be evicted.
        for block in reversed(blocks):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                self._free[block] = None

    def cached_prefix(self, block_hashes: list[bytes]) -> list[int]:
        """The blocks that hold the longest cached run of these leading blocks, now also held by the caller."""
        blocks = []
        for block_hash in block_hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            if self._holders[block] == 0:
                del self._free[block]
            self._holders[block] += 1
            blocks.append(block)
        return blocks

    def register(self, block: int, block_hash: bytes) -> None:
        """Makes a full, computed block findable; a block with the same content already cached wins."""
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash

    def _forget(self, block: int) -> None:
        block_hash = self._hash_of.pop(block, None)
        if block_hash is not None:
            del self._block_of[block_hash]


def block_hash(previous: bytes | None, tokens: list[int]) -> bytes:
    """Identifies a block by its tokens and everything before them: its keys and values depend on both.
    A cryptographic hash, so that no crafted prompt can collide with another user's cached block."""
    digest = hashlib.blake2b(previous or b"", digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


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
            per_token += 2 * config.num_layers * config.num_heads * torch.tensor([], dtype=KV_SCALE_DTYPE).element_size()
        return per_token


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
