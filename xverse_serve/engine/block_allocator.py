"""Which KV blocks each sequence holds: the allocator, with prefix caching by the hash of a block's tokens."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


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


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
